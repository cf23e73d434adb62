"""`benchmarks/conv_paths.py`: every formulation is the same convolution, rows, bad input."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")


import conv_paths  # noqa: E402  (needs torch, checked above)


@pytest.mark.parametrize("name", ["shifted", "im2col", "winograd"])
@pytest.mark.parametrize("direction", ["forward", "input grad", "weight grad"])
@pytest.mark.parametrize("shape", [(2, 4, 4, 8), (1, 5, 3, 4), (2, 1, 1, 4)])
def test_formulations_are_xlas_convolution(name, direction, shape):
    rng = np.random.default_rng(0)
    x, g = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
    w = rng.normal(size=(3, 3, shape[-1], shape[-1])).astype(np.float32)
    reference = jax.jit(conv_paths.jax_conv(direction))(x, w, g)
    ours = jax.jit(conv_paths.jax_conv(direction, conv_paths.FORMULATIONS[name]))(x, w, g)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)


def test_shifted_skips_the_padding_taps():
    # At 4x4 a 3x3 kernel with padding 1 reaches real inputs with 100 of its 144 taps.
    x = np.ones((1, 4, 4, 1), np.float32)
    w = np.ones((3, 3, 1, 1), np.float32)
    jaxpr = jax.make_jaxpr(conv_paths.shifted_conv)(x, w)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert sum(int(np.prod(e.outvars[0].aval.shape)) for e in dots) == 100
    assert np.asarray(conv_paths.shifted_conv(x, w))[0, :, :, 0].tolist() == [
        [4, 6, 6, 4],
        [6, 9, 9, 6],
        [6, 9, 9, 6],
        [4, 6, 6, 4],
    ]


def test_rows_and_tables(tmp_path):
    rows = conv_paths.measure(
        batch_size=2,
        image_size=4,
        width=4,
        paths=["xla-eigen", "winograd", "pytorch"],
        directions=["forward", "weight grad"],
        steps=1,
        warmup=0,
        threads=1,
        pause=0.0,
        log=lambda msg: None,
    )
    parts = list(dict.fromkeys(r["part"] for r in rows))
    assert parts == [
        f"{s}x{s}x{c} {d}" for s, c in [(4, 4), (2, 8), (1, 16)] for d in ("forward", "weight grad")
    ]
    for r in rows:
        assert r["step_ms"] > 0 and r["cpu_ms"] >= 0
        if r["path"] == "pytorch":
            assert r["ratio_torch"] == 1.0 and r["rel_diff"] is None
        else:
            assert r["rel_diff"] < 1e-4
    assert all(r["rel_diff"] == 0.0 for r in rows if r["path"] == "xla-eigen")  # the reference
    assert "winograd" in conv_paths.format_rows(rows)
    assert conv_paths.format_rows(rows, markdown=True).startswith("| convolution | path |")
    out = tmp_path / "rows.json"
    conv_paths.main(
        [
            "--quick",
            "--image_size",
            "2",
            "--width",
            "2",
            "--batch_size",
            "1",
            "--paths",
            "xla-eigen,shifted",
            "--directions",
            "input grad",
            "--json",
            str(out),
        ]
    )
    assert out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--paths", "xla-eigen,onednn"], "xla-eigen, xla-ynn, shifted, im2col, winograd, pytorch"),
        (["--directions", "backward"], "forward, input grad, weight grad"),
        (["--steps", "0"], "--steps"),
        (["--width", "0"], "--width"),
    ],
)
def test_bad_arguments_name_the_choices(argv, message, capsys):
    with pytest.raises(SystemExit):
        conv_paths.parse_args(argv)
    assert message in capsys.readouterr().err
