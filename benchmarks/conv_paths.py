"""Every way a 3x3 convolution can run from JAX on this CPU, against PyTorch's.

`vs_pytorch.py --parts` puts what remains between layerfreeze's frozen step and
PyTorch's in the convolutions. This script times each stage's 3x3 stride-1
convolution of the CIFAR ResNet-18 (batch 32; 32x32x64, 16x16x128, 8x8x256,
4x4x512) in each direction a train step runs (forward, input gradient, weight
gradient) along each path:

* `xla-eigen`: `lax.conv_general_dilated` compiled with `platform.CPU_EIGEN_CONV`
  (`make_steps`' default on CPU: Eigen's convolution);
* `xla-ynn`: the same with XLA's own defaults (XNNPACK's YNN kernels);
* `shifted`: nine matmuls, one per kernel tap, each over only the outputs whose
  input is not padding (im2col multiplies the padding's zeros; a direct
  convolution such as oneDNN's skips them: 31% of the taps at 4x4);
* `im2col`: the nine shifted inputs side by side, one matmul;
* `winograd`: Winograd's F(2x2, 3x3) (Lavin and Gray, 2016): 16 matmuls over
  transformed 4x4 tiles, 2.25x fewer multiplies;
* `pytorch`: `F.conv2d` and `aten.convolution_backward` (oneDNN), NCHW.

The JAX formulations compile with `platform.CPU_EIGEN_CONV` too, and their
gradients are JAX's autodiff of them, as in a train step. Calls run round-robin
per (shape, direction) with a pause before each (see `report.time_round_robin`).
Reported: the median, IQR, `xtorch` (median / PyTorch's), CPU/wall and each
path's largest difference from `xla-eigen`, relative to its largest value.

Commands:
  python benchmarks/conv_paths.py --quick
  python benchmarks/conv_paths.py --json /tmp/conv_paths.json --markdown /tmp/conv_paths.md
"""

import argparse
import functools
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

# Run as a script, this file's folder is on sys.path.
from report import (
    call_and_block,
    check_choices,
    command_line,
    cpu_threads,
    machine_description,
    markdown_table,
    quartiles,
    text_table,
    time_round_robin,
    write_json,
)
from vs_pytorch import CONV_DIRECTIONS, conv3x3, conv_shapes, jax_conv, torch_conv

from layerfreeze.train.platform import cpu_conv_options

Conv = Callable[[jax.Array, jax.Array], jax.Array]


def shifted_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1 (NHWC, HWIO): one matmul per tap, padding skipped."""
    n, h, wd, c = x.shape
    out = None
    for di in range(3):
        i0, i1 = max(0, 1 - di), min(h, h + 1 - di)  # outputs whose input row exists
        for dj in range(3):
            j0, j1 = max(0, 1 - dj), min(wd, wd + 1 - dj)
            if i1 <= i0 or j1 <= j0:
                continue
            start, stop = (0, i0 + di - 1, j0 + dj - 1, 0), (n, i1 + di - 1, j1 + dj - 1, c)
            xs = jax.lax.slice(x, start, stop)
            y = jnp.einsum("nhwc,cd->nhwd", xs, w[di, dj])
            y = jnp.pad(y, ((0, 0), (i0, h - i1), (j0, wd - j1), (0, 0)))
            out = y if out is None else out + y
    return out


def im2col_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1: the nine shifted inputs concatenated, one matmul."""
    _, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i : i + h, j : j + wd] for i in range(3) for j in range(3)], -1)
    return jnp.einsum("nhwk,kd->nhwd", cols, w.reshape(9 * c, -1))


# Winograd F(2x2, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A over 4x4 tiles with stride 2.
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)


def _combine(coeffs: np.ndarray, terms: Sequence[jax.Array]) -> jax.Array:
    out = None
    for c, t in zip(coeffs, terms, strict=True):
        if c:
            t = t if c == 1 else -t if c == -1 else t * c
            out = t if out is None else out + t
    return out


def winograd_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1 by Winograd's F(2x2, 3x3)."""
    n, h, wd, c = x.shape
    th, tw = -(-h // 2), -(-wd // 2)
    xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - wd), (0, 0)))
    rows = [jax.lax.slice_in_dim(xp, k, k + 2 * th - 1, stride=2, axis=1) for k in range(4)]
    v = []
    for row in (_combine(_BT[i], rows) for i in range(4)):
        cols = [jax.lax.slice_in_dim(row, k, k + 2 * tw - 1, stride=2, axis=2) for k in range(4)]
        v += [_combine(_BT[j], cols) for j in range(4)]
    v = jnp.stack(v).reshape(16, n * th * tw, c)
    u = jnp.einsum("ik,klcd,jl->ijcd", _G, w, _G).reshape(16, c, -1)
    m = jnp.einsum("ptc,pcd->ptd", v, u).reshape(4, 4, n, th, tw, -1)
    half = [_combine(_AT[i], list(m)) for i in range(2)]  # (4, n, th, tw, d) each
    y = jnp.stack([jnp.stack([_combine(_AT[j], list(r)) for j in range(2)]) for r in half])
    y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * th, 2 * tw, -1)
    return y[:, :h, :wd]


FORMULATIONS: dict[str, Conv] = {
    "xla-eigen": conv3x3,
    "xla-ynn": conv3x3,
    "shifted": shifted_conv,
    "im2col": im2col_conv,
    "winograd": winograd_conv,
}
PATHS: tuple[str, ...] = (*FORMULATIONS, "pytorch")


def _options(path: str) -> dict[str, Any] | None:
    # xla-ynn: XLA's own defaults. Every other JAX path: make_steps' default.
    return None if path == "xla-ynn" else dict(cpu_conv_options()) or None


def measure(
    *,
    batch_size: int = 32,
    image_size: int = 32,
    width: int = 64,
    paths: Sequence[str] = PATHS,
    directions: Sequence[str] = CONV_DIRECTIONS,
    steps: int = 10,
    warmup: int = 3,
    threads: int | None = None,
    pause: float = 0.02,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One row per (shape, direction, path): `part`, `path`, `step_ms`, `q1_ms`,
    `q3_ms`, `ratio_torch` (None without a `pytorch` path), `cpu_ms`, `rel_diff`
    (largest difference from `xla-eigen`'s result / its largest magnitude)."""
    check_choices("path", list(paths), list(PATHS))
    check_choices("direction", list(directions), list(CONV_DIRECTIONS))
    torch.set_num_threads(threads or cpu_threads())
    rng = np.random.default_rng(seed)
    rows = []
    for side, channels in conv_shapes(image_size, width):
        x, g = (
            jnp.asarray(rng.normal(size=(batch_size, side, side, channels)), jnp.float32)
            for _ in range(2)
        )
        w = jnp.asarray(rng.normal(size=(3, 3, channels, channels)) * 0.05, jnp.float32)
        for direction in directions:
            part = f"{side}x{side}x{channels} {direction}"
            eigen = jax.jit(jax_conv(direction)).lower(x, w, g)
            reference = np.asarray(eigen.compile(_options("xla-eigen"))(x, w, g))
            fns, diffs = [], []
            for path in paths:
                if path == "pytorch":
                    fns.append(torch_conv(direction, x, w, g))
                    diffs.append(None)
                    continue
                f = (
                    jax.jit(jax_conv(direction, FORMULATIONS[path]))
                    .lower(x, w, g)
                    .compile(compiler_options=_options(path))
                )
                fns.append(functools.partial(call_and_block, f, x, w, g))
                diff = np.max(np.abs(np.asarray(f(x, w, g)) - reference))
                diffs.append(float(diff / np.max(np.abs(reference))))
            log(f"  {part}: {len(fns)} paths, {warmup} warm-up + {steps} timed rounds")
            cpu: list[list[float]] = []
            times = time_round_robin(fns, steps=steps, warmup=warmup, pause=pause, cpu_times=cpu)
            medians = [statistics.median(t) for t in times]
            torch_ms = medians[paths.index("pytorch")] if "pytorch" in paths else None
            for path, t, c, median, diff in zip(paths, times, cpu, medians, diffs, strict=True):
                q1, _, q3 = quartiles(t)
                rows.append(
                    {
                        "part": part,
                        "path": path,
                        "step_ms": median,
                        "q1_ms": q1,
                        "q3_ms": q3,
                        "ratio_torch": median / torch_ms if torch_ms else None,
                        "cpu_ms": statistics.median(c),
                        "rel_diff": diff,
                    }
                )
    return rows


def format_rows(rows: Sequence[Mapping[str, Any]], markdown: bool = False) -> str:
    header = ["convolution", "path", "ms", "IQR", "xtorch", "CPU/wall", "diff"]
    body = [
        [
            r["part"],
            r["path"],
            f"{r['step_ms']:.1f}",
            f"{r['q1_ms']:.1f}-{r['q3_ms']:.1f}",
            "-" if r["ratio_torch"] is None else f"{r['ratio_torch']:.2f}",
            f"{r['cpu_ms'] / r['step_ms']:.2f}",
            "-" if r["rel_diff"] is None else f"{r['rel_diff']:.0e}",
        ]
        for r in rows
    ]
    if markdown:
        return markdown_table(header, body, left=2)
    return text_table(header, body, left=2, sections=[r["part"] for r in rows])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 timed rounds, 1 warm-up")
    p.add_argument("--steps", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up rounds (default 3)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--image_size", type=int, default=32, help="stage1's side (32)")
    p.add_argument("--width", type=int, default=64, help="stage1's channels (64)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"from: {', '.join(PATHS)}")
    p.add_argument(
        "--directions",
        default=",".join(CONV_DIRECTIONS),
        help=f"from: {', '.join(CONV_DIRECTIONS)}",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs)")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument("--markdown", default=None, help="append a markdown section here")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 3, 1
    for name in ("steps", "batch_size", "image_size", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be at least 0, got {args.warmup}")
    args.paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    args.directions = [s.strip() for s in args.directions.split(",") if s.strip()]
    try:
        check_choices("path", args.paths, list(PATHS))
        check_choices("direction", args.directions, list(CONV_DIRECTIONS))
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    machine = machine_description()
    print(f"{machine}; torch {torch.__version__} with {args.threads or cpu_threads()} threads")
    rows = measure(
        batch_size=args.batch_size,
        image_size=args.image_size,
        width=args.width,
        paths=args.paths,
        directions=args.directions,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
    )
    print(format_rows(rows))
    if args.json:
        write_json(args.json, rows)
    if args.markdown:
        command = command_line("conv_paths.py", argv)
        with open(args.markdown, "a") as f:
            f.write(
                f"## conv_paths\n\nMachine: {machine}; torch {torch.__version__}.\n\n"
                f"Command: `{command.strip()}`\n\n{format_rows(rows, markdown=True)}\n"
            )
    return rows


if __name__ == "__main__":
    main()
