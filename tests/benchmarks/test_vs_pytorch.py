"""`benchmarks/vs_pytorch.py` on a tiny ResNet-18: the model check, the PyTorch setups, rows."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")


import vs_pytorch  # noqa: E402  (needs torch, checked above)

WIDTH, IMAGE, BATCH = 4, 8, 2


@pytest.fixture(scope="module")
def setup():
    return vs_pytorch._setup(BATCH, IMAGE, WIDTH, seed=0)


def test_every_torch_key_maps_to_a_distinct_flax_variable(setup):
    _, variables, _, _ = setup
    keys = vs_pytorch.TorchResNet18(10, WIDTH).state_dict()
    paths = [vs_pytorch.flax_path(k) for k in keys]
    mapped = [p for p in paths if p is not None]
    flat = {
        tuple(str(getattr(k, "key", k)) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]
    }
    assert len(set(mapped)) == len(mapped)
    assert set(mapped) == flat
    unmapped = [k for k, p in zip(keys, paths, strict=True) if p is None]
    assert unmapped and all(k.endswith("num_batches_tracked") for k in unmapped)


def test_same_model_check_passes_and_catches_a_difference(setup):
    model, variables, images, _ = setup
    net = vs_pytorch.TorchResNet18(10, WIDTH)
    vs_pytorch.load_into_torch(net, variables)
    check = vs_pytorch.check_same_model(model, variables, net, images)
    assert check["params"] == check["torch_params"]
    assert check["forward_flops"] == check["torch_forward_flops"] > 0
    assert check["logits_rel_diff"] <= vs_pytorch.LOGITS_TOLERANCE

    with torch.no_grad():
        net.layer3[0].conv1.weight.mul_(2.0)
    with pytest.raises(ValueError, match="differ"):
        vs_pytorch.check_same_model(model, variables, net, images)


@pytest.mark.parametrize("setting", ["frozen", "lr0"])
def test_torch_frozen_settings_keep_frozen_modules_bit_identical(setup, setting):
    _, variables, images, labels = setup
    net = vs_pytorch.TorchResNet18(10, WIDTH)
    vs_pytorch.load_into_torch(net, variables)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    step = vs_pytorch.torch_step(
        net,
        setting,
        torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(labels.astype(np.int64)),
    )
    for _ in range(2):
        step()
    after = net.state_dict()
    frozen = [k for k in before if k.split(".")[0] in vs_pytorch.TORCH_FROZEN]
    trained = [k for k in before if k.startswith("layer3") and k.endswith("weight")]
    assert frozen and trained
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in trained)


VIT_KW = {"width": 8, "depth": 2, "mlp_dim": 16, "num_heads": 2}


@pytest.fixture(scope="module")
def vit_case():
    return vs_pytorch.make_case("vit_ti4", IMAGE, VIT_KW)


def test_vit_same_model_check_passes(vit_case):
    images, _ = vs_pytorch._batch(BATCH, IMAGE, seed=0)
    net = vit_case.make_torch()
    assert set(vit_case.variables["params"]) == {
        vs_pytorch.vit_flax_path(k)[1] for k in net.state_dict()
    }
    check = vs_pytorch.check_same_model(vit_case.model, vit_case.variables, net, images)
    assert check["params"] == check["torch_params"]
    assert check["forward_flops"] == check["torch_forward_flops"] > 0
    assert vit_case.freeze == "embedding,pos_embedding,cls,Transformer/encoderblock_0"
    assert vit_case.torch_frozen == ("embedding", "pos_embedding", "cls", "blocks.0")


def test_vit_frozen_setting_trains_only_the_second_half(vit_case):
    images, labels = vs_pytorch._batch(BATCH, IMAGE, seed=0)
    net = vit_case.make_torch()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    step = vs_pytorch.torch_step(
        net,
        "frozen",
        torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(labels.astype(np.int64)),
        vit_case.torch_frozen,
    )
    step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("blocks.1.", "encoder_norm", "head")) for k in changed)


def test_torch_step_rejects_an_unknown_setting(setup):
    with pytest.raises(ValueError, match="full, frozen, lr0"):
        vs_pytorch.torch_step(vs_pytorch.TorchResNet18(10, WIDTH), "half", None, None)


@pytest.fixture(scope="module")
def measured():
    return vs_pytorch.measure(
        batch_size=BATCH,
        image_size=IMAGE,
        model_kw={"width": WIDTH},
        steps=2,
        warmup=1,
        threads=1,
        pause=0.0,
        log=lambda msg: None,
    )


def test_rows_cover_both_frameworks_and_every_setting(measured):
    rows, info = measured
    assert [(r["framework"], r["setting"]) for r in rows] == [
        (f, s) for s in vs_pytorch.SETTINGS for f in vs_pytorch.FRAMEWORKS
    ]
    assert all(r["model"] == "resnet18" for r in rows)
    assert info["threads"] == 1 and info["check"]["params"] == rows[0]["trainable_params"]
    by = {(r["framework"], r["setting"]): r for r in rows}
    for row in rows:
        assert set(vs_pytorch.ROW_KEYS) <= set(row)
        assert len(row["samples_ms"]) == 2
        assert row["min_ms"] <= row["q1_ms"] <= row["step_ms"] <= row["q3_ms"] <= row["max_ms"]
        assert row["ratio_full"] == pytest.approx(
            row["step_ms"] / by[(row["framework"], "full")]["step_ms"]
        )
    for setting in vs_pytorch.SETTINGS:
        assert by[("pytorch", setting)]["ratio_torch"] == 1.0
        assert by[("pytorch", setting)]["ratio_torch_min"] == 1.0
        assert (
            by[("pytorch", setting)]["trainable_params"]
            == by[("layerfreeze", setting)]["trainable_params"]
        )
    assert by[("layerfreeze", "frozen")]["trainable_params"] < rows[0]["trainable_params"]


def test_table_and_markdown_name_the_setup(measured, tmp_path):
    rows, info = measured
    table = vs_pytorch.format_table(rows)
    assert "xtorch" in table and "layerfreeze" in table
    path = tmp_path / "results.md"
    vs_pytorch.write_markdown(str(path), [(rows, info)], "python benchmarks/vs_pytorch.py --quick")
    text = path.read_text()
    assert text.startswith("## vs_pytorch: resnet18")
    assert "Machine:" in text and "--quick" in text and "with 1 threads" in text
    assert text.count("| pytorch |") == len(vs_pytorch.SETTINGS)


def test_parts_rows(setup):
    rows = vs_pytorch.measure_parts(
        batch_size=BATCH,
        image_size=IMAGE,
        width=WIDTH,
        steps=1,
        warmup=0,
        threads=1,
        pause=0.0,
        log=lambda msg: None,
    )
    parts = list(dict.fromkeys(r["part"] for r in rows))
    assert parts[:3] == ["frozen forward", "trainable fwd+bwd", "Adam update"]
    convs = [
        vs_pytorch.conv_part_name(side, channels, direction)
        for side, channels in [(8, 4), (4, 8), (2, 16), (1, 32)]
        for direction in vs_pytorch.CONV_DIRECTIONS
    ]
    assert parts[3:5] == ["frozen forward to stem", "frozen forward to stage1"]
    assert parts[5:] == convs
    assert "conv 3x3 4x4x8 weight grad" in convs
    for part in parts:
        frameworks = sorted(r["framework"] for r in rows if r["part"] == part)
        assert frameworks == ["layerfreeze", "pytorch"], part
    assert all(r["ratio_torch"] == 1.0 for r in rows if r["framework"] == "pytorch")
    assert all(r["cpu_ms"] >= 0 for r in rows)
    assert "Adam update" in vs_pytorch.format_parts(rows, markdown=True)


@pytest.mark.parametrize("direction", vs_pytorch.CONV_DIRECTIONS)
def test_conv_parts_compute_the_same_pass(direction):
    rng = np.random.default_rng(0)
    x, g = (rng.normal(size=(2, 4, 4, 8)).astype(np.float32) for _ in range(2))
    w = rng.normal(size=(3, 3, 8, 8)).astype(np.float32)
    ours = np.asarray(jax.jit(vs_pytorch.jax_conv(direction))(x, w, g))
    theirs = vs_pytorch.torch_conv(direction, x, w, g)().numpy()
    # Back to NHWC / HWIO; the pass returns what the direction names.
    to_ours = (2, 3, 1, 0) if direction == "weight grad" else (0, 2, 3, 1)
    theirs = theirs.transpose(to_ours)
    assert ours.shape == theirs.shape == (w.shape if direction == "weight grad" else x.shape)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--settings", "full,half"], "full, frozen, lr0"),
        (["--xla_variant", "fast"], "ynn-conv"),
        (["--steps", "0"], "--steps"),
        (["--models", "resnet18,vgg"], "resnet18, vit_ti4"),
        (["--pause_ms", "-1"], "--pause_ms"),
        (["--host_memory", "keep"], "'retain', 'release'"),
    ],
)
def test_bad_arguments_exit_nonzero(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vs_pytorch.main(argv)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
