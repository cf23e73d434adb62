"""Side by side with PyTorch: the same frozen and full train steps, timed in one run.

A CIFAR ResNet-18 (3x3 stem, batch 32, 32x32 images, Adam, cross-entropy) is
trained one step at a time three ways in each framework:

* `full`: everything trains (layerfreeze: `make_steps` with spec `none`);
* `frozen`: stem, stage1 and stage2 frozen, their BatchNorm on running
  statistics. PyTorch: `requires_grad_(False)` on `conv1, bn1, layer1, layer2`,
  their BatchNorm modules in eval mode, Adam over the trainable parameters only.
  layerfreeze: `make_steps(..., "stem,stage1,stage2", method="zero")`;
* `lr0`: the same frozen set given learning rate 0 (PyTorch: a param group with
  `lr=0`, every parameter requires grad; layerfreeze: `method="lr0"`), frozen
  BatchNorm on running statistics in both.

With `--models resnet18,vit_ti4` the ViT-Ti/4 (unrolled blocks) runs too, its
embeddings (`embedding, pos_embedding, cls`) and first half of the blocks frozen.

The PyTorch models are written here with torchvision's (ResNet) and big_vision's
(ViT) names and get the layerfreeze model's weights by name; before timing, the
script checks that both have the same parameter count, the same convolution and
matmul FLOPs (`torch.utils.flop_counter` against the jaxpr) and the same eval-mode
logits.

Steps are timed round-robin over every (framework, setting) after warm-up, so
load drift on a shared machine hits every row alike. Reported per row: the
median, min, max and interquartile range of the step time, `xtorch` (median /
PyTorch's median for the same setting), `xtorch-min` (the same with the fastest
steps: on a loaded machine the least disturbed ones) and `xfull` (median / the
same framework's full step). PyTorch gets as many threads as XLA's CPU client uses
(the CPUs this process may run on), and the output says how many.

`--parts` also times the three parts of a frozen step alone in each framework
(the frozen prefix's forward pass, the trainable part's forward and backward
pass, the Adam update) and each stage's 3x3 convolution alone (forward, input
gradient, weight gradient), to show where the difference lies.

The `layerfreeze` rows compile as `make_steps` does by default: on CPU with
`platform.CPU_EIGEN_CONV` (convolutions through Eigen instead of XNNPACK's YNN
kernels). `--xla_variant` adds layerfreeze rows compiled with other XLA CPU
options in the same process: `ynn-conv` is XLA's own default on this jaxlib
(convolutions through YNN too), `no-ynn` turns YNN off altogether.

Commands:
  python benchmarks/vs_pytorch.py --quick
  python benchmarks/vs_pytorch.py --models resnet18,vit_ti4 --parts \
      --xla_variant ynn-conv --json /tmp/vs_pytorch.json --markdown /tmp/vs_pytorch.md
"""

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

# Run as a script, this file's folder is on sys.path.
from freeze_cost import init_variables
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
from torch import nn as tnn
from torch.utils.flop_counter import FlopCounterMode

from layerfreeze import train
from layerfreeze.models import create_vit, resnet18, vit_groups
from layerfreeze.train.platform import cpu_conv_options, retain_host_memory

SETTINGS: tuple[str, ...] = ("full", "frozen", "lr0")
FRAMEWORKS: tuple[str, ...] = ("pytorch", "layerfreeze")
MODELS: tuple[str, ...] = ("resnet18", "vit_ti4")
FREEZE = "stem,stage1,stage2"
TORCH_FROZEN: tuple[str, ...] = ("conv1", "bn1", "layer1", "layer2")
# jaxlib 0.10.2's default YNN fusion types are individual dots, individual
# convolutions and reductions (read from compiled HLO).
# The `layerfreeze` rows compile with make_steps' default options
# (`cpu_conv_options()`: convolutions through Eigen on CPU).
XLA_VARIANTS: dict[str, Mapping[str, Any]] = {
    "ynn-conv": {},  # XLA's own defaults: convolutions through YNN as well
    "no-ynn": {"xla_cpu_experimental_ynn_fusion_type": ""},
}
HOST_MEMORY: tuple[str, ...] = ("retain", "release")
_HOST_MEMORY_TEXT = {
    "retain": "retained for the whole process (`retain_host_memory()`, both frameworks)",
    "release": "as glibc's defaults leave it (buffers above 32 MiB unmapped when freed)",
}
ROW_KEYS: tuple[str, ...] = (
    "model",
    "framework",
    "setting",
    "step_ms",
    "min_ms",
    "q1_ms",
    "q3_ms",
    "max_ms",
    "ratio_torch",
    "ratio_torch_min",
    "ratio_full",
    "trainable_params",
)
NUM_CLASSES = 10
LEARNING_RATE = 1e-3
LOGITS_TOLERANCE = 1e-3  # relative to the largest logit; float32 summation order differs


# --------------------------------------------------------------------------- PyTorch


class BasicBlock(tnn.Module):
    """torchvision's BasicBlock (conv-bn-relu-conv-bn, projection shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(cout)
        self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class TorchResNet18(tnn.Module):
    """torchvision's resnet18 with the CIFAR stem (3x3 stride-1 conv, no max-pool).

    Module names are torchvision's (`conv1, bn1, layerN.i.convK, fc`), the layout
    of `layerfreeze.models.resnet18(stem="cifar")`. Inputs are NCHW.
    """

    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(width)
        cin = width
        for i in range(4):
            cout = width * 2**i
            stride = 1 if i == 0 else 2
            blocks = tnn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))
            setattr(self, f"layer{i + 1}", blocks)
            cin = cout
        self.fc = tnn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def flax_path(torch_key: str) -> tuple[str, ...] | None:
    """The layerfreeze ResNet variable of a torchvision key; None for `num_batches_tracked`.

    >>> flax_path("layer2.0.downsample.1.running_var")
    ('batch_stats', 'stage2', 'Block_0', 'Downsample_BatchNorm', 'var')
    """
    *modules, leaf = torch_key.split(".")
    if leaf == "num_batches_tracked":
        return None
    if modules[0] == "fc":
        return ("params", "head", "Dense_0", {"weight": "kernel", "bias": "bias"}[leaf])
    if modules[0].startswith("layer"):
        group = ("stage" + modules[0].removeprefix("layer"), "Block_" + modules[1])
        rest = modules[2:]
    else:
        group, rest = ("stem",), modules
    if rest[0] == "downsample":
        kind = "Conv" if rest[1] == "0" else "BatchNorm"
        module = f"Downsample_{kind}"
    else:
        kind = "Conv" if rest[0].startswith("conv") else "BatchNorm"
        module = f"{kind}_{int(rest[0][-1]) - 1}"
    if kind == "Conv":
        return ("params", *group, module, "kernel")
    name = _BN_NAMES[leaf]
    collection = "batch_stats" if name in ("mean", "var") else "params"
    return (collection, *group, module, name)


def load_into_torch(torch_model: tnn.Module, variables: Mapping[str, Any]) -> None:
    """Copies layerfreeze ResNet variables into the PyTorch model, by name."""
    state = {}
    for key, tensor in torch_model.state_dict().items():
        path = flax_path(key)
        if path is None:
            state[key] = tensor
            continue
        value = variables
        for part in path:
            value = value[part]
        value = np.asarray(value)
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif value.ndim == 2:
            value = value.T
        if value.shape != tuple(tensor.shape):
            raise ValueError(f"{key}: torch shape {tuple(tensor.shape)}, flax {value.shape}.")
        state[key] = torch.from_numpy(np.array(value))  # a writable copy
    torch_model.load_state_dict(state)


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def torch_step(
    model: tnn.Module,
    setting: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    frozen_prefixes: Sequence[str] = TORCH_FROZEN,
) -> Callable[[], float]:
    """Configures `model` for `setting` (frozen modules, BN modes, Adam); returns a step.

    Parameters and modules named `frozen_prefixes` (or below them) are the
    frozen ones of settings `frozen` and `lr0`.
    """
    check_choices("setting", [setting], SETTINGS)
    model.train()
    named = list(model.named_parameters())
    frozen = [p for name, p in named if _under(name, frozen_prefixes)]
    trainable = [p for name, p in named if not _under(name, frozen_prefixes)]
    if setting != "full":
        for name, module in model.named_modules():
            if _under(name, frozen_prefixes) and isinstance(module, tnn.BatchNorm2d):
                module.eval()  # running statistics, and they stay unchanged
    if setting == "frozen":
        for p in frozen:
            p.requires_grad_(False)
        optimizer = torch.optim.Adam(trainable, lr=LEARNING_RATE)
    elif setting == "lr0":
        optimizer = torch.optim.Adam(
            [{"params": trainable}, {"params": frozen, "lr": 0.0}], lr=LEARNING_RATE
        )
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images.float()), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


class TorchEncoderBlock(tnn.Module):
    """A pre-norm ViT block with big_vision's layout (q, k, v, out projections)."""

    def __init__(self, width: int, mlp_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.LayerNorm_0 = tnn.LayerNorm(width, eps=1e-6)  # flax's default epsilon
        self.query = tnn.Linear(width, width)
        self.key = tnn.Linear(width, width)
        self.value = tnn.Linear(width, width)
        self.out = tnn.Linear(width, width)
        self.LayerNorm_2 = tnn.LayerNorm(width, eps=1e-6)
        self.Dense_0 = tnn.Linear(width, mlp_dim)
        self.Dense_1 = tnn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        y = self.LayerNorm_0(x)

        def heads(t):
            return t.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.query(y)), heads(self.key(y)), heads(self.value(y))
        )
        x = x + self.out(y.transpose(1, 2).reshape(b, n, c))
        # flax's nn.gelu is the tanh approximation by default.
        y = self.Dense_1(F.gelu(self.Dense_0(self.LayerNorm_2(x)), approximate="tanh"))
        return x + y


class TorchViT(tnn.Module):
    """`layerfreeze.models.ViT` (pool "tok", unrolled blocks) in PyTorch; NCHW inputs."""

    def __init__(self, vit: Any, image_size: int):
        super().__init__()
        p, width = vit.patch_size, vit.width
        tokens = (image_size // p) ** 2
        self.embedding = tnn.Conv2d(3, width, p, p)
        self.pos_embedding = tnn.Parameter(torch.zeros(1, tokens, width))
        self.cls = tnn.Parameter(torch.zeros(1, 1, width))
        self.blocks = tnn.ModuleList(
            TorchEncoderBlock(width, vit.mlp_dim, vit.num_heads) for _ in range(vit.depth)
        )
        self.encoder_norm = tnn.LayerNorm(width, eps=1e-6)
        self.head = tnn.Linear(width, vit.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embedding(x).flatten(2).transpose(1, 2) + self.pos_embedding
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.encoder_norm(x)[:, 0])


def vit_flax_path(torch_key: str) -> tuple[str, ...]:
    """The layerfreeze ViT parameter of a `TorchViT` key.

    >>> vit_flax_path("blocks.3.query.weight")
    ('params', 'Transformer', 'encoderblock_3', 'MultiHeadDotProductAttention_1', 'query', 'kernel')
    """
    *modules, leaf = torch_key.split(".")
    if not modules:  # pos_embedding, cls
        return ("params", leaf)
    leaf = {"weight": "kernel", "bias": "bias"}[leaf]
    if modules[0] == "blocks":
        block = ("Transformer", f"encoderblock_{modules[1]}")
        name = modules[2]
        if name in ("query", "key", "value", "out"):
            return ("params", *block, "MultiHeadDotProductAttention_1", name, leaf)
        if name.startswith("Dense"):
            return ("params", *block, "MlpBlock_3", name, leaf)
        return ("params", *block, name, "scale" if leaf == "kernel" else "bias")
    if modules[0] == "encoder_norm":
        return ("params", "Transformer", "encoder_norm", "scale" if leaf == "kernel" else "bias")
    return ("params", modules[0], leaf)


def load_vit_into_torch(torch_model: TorchViT, variables: Mapping[str, Any]) -> None:
    """Copies layerfreeze ViT parameters into the PyTorch ViT, by name."""
    state = {}
    for key, tensor in torch_model.state_dict().items():
        value = variables
        for part in vit_flax_path(key):
            value = value[part]
        value = np.asarray(value)
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif key.endswith(".weight") and value.ndim >= 2 and "pos" not in key:
            # Dense (in, out), DenseGeneral q/k/v (in, heads, dim), out (heads, dim, out).
            out_features = tensor.shape[0]
            value = value.reshape(-1, out_features).T
        value = value.reshape(tuple(tensor.shape))
        state[key] = torch.from_numpy(np.array(value))
    torch_model.load_state_dict(state)


# ------------------------------------------------------------------------- model check


def _jaxpr_matmul_flops(jaxpr: Any) -> int:
    """2 x multiply-adds of every convolution and dot_general, sub-jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            lhs, rhs = (v.aval for v in eqn.invars)
            out = eqn.outvars[0].aval
            dn = eqn.params["dimension_numbers"]
            kernel_in = rhs.shape[dn.rhs_spec[1]]
            kernel_spatial = int(np.prod([rhs.shape[d] for d in dn.rhs_spec[2:]]))
            total += 2 * int(np.prod(out.shape)) * kernel_in * kernel_spatial
        elif eqn.primitive.name == "dot_general":
            lhs = eqn.invars[0].aval
            (contract, _), _ = eqn.params["dimension_numbers"]
            k = int(np.prod([lhs.shape[d] for d in contract]))
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * k
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _jaxpr_matmul_flops(sub)
    return total


def check_same_model(
    model: Any, variables: Mapping[str, Any], torch_model: tnn.Module, images: np.ndarray
) -> dict[str, Any]:
    """Parameter counts, forward conv/matmul FLOPs and eval logits of both models.

    Raises:
      ValueError: the counts or FLOPs differ, or the logits differ by more
        than `LOGITS_TOLERANCE` of the largest logit.
    """
    jax_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    torch_params = sum(p.numel() for p in torch_model.parameters())
    x = images.astype(np.float32)

    def forward(v, x):
        return model.apply(v, x, train=False)

    jax_flops = _jaxpr_matmul_flops(jax.make_jaxpr(forward)(variables, x).jaxpr)
    jax_logits = np.asarray(jax.jit(forward)(variables, x))
    torch_model.eval()
    counter = FlopCounterMode(display=False)
    # The math attention kernel is made of matmuls that the counter sees.
    math = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
    with torch.no_grad(), math, counter:
        torch_logits = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    torch_flops = int(counter.get_total_flops())
    diff = float(np.max(np.abs(jax_logits - torch_logits)) / np.max(np.abs(jax_logits)))
    check = {
        "params": jax_params,
        "torch_params": torch_params,
        "forward_flops": jax_flops,
        "torch_forward_flops": torch_flops,
        "logits_rel_diff": diff,
    }
    if jax_params != torch_params or jax_flops != torch_flops or not diff <= LOGITS_TOLERANCE:
        raise ValueError(f"The PyTorch and layerfreeze models differ: {check}.")
    return check


# ---------------------------------------------------------------------------- timing


def _jax_step(
    model: Any,
    variables: Mapping[str, Any],
    spec: str,
    setting: str,
    batch: Mapping[str, jax.Array],
    compiler_options: Mapping[str, Any] | None,
    seed: int,
) -> tuple[Callable[[], Any], int]:
    method = "lr0" if setting == "lr0" else "zero"
    # No gradient-norm metric: the PyTorch step computes none either.
    steps = train.make_steps(
        model,
        optax.adam(LEARNING_RATE),
        spec,
        variables["params"],
        method=method,
        grad_norm=False,
        compiler_options=compiler_options,
    )
    state = steps.init_state(variables, jax.random.key(seed))
    compiled = steps.train_step.lower(state, batch).compile()
    box = [state]

    def step():
        box[0], metrics = compiled(box[0], batch)
        return jax.block_until_ready(metrics["loss"])

    return step, steps.trainable_params


def measure(
    *,
    model: str = "resnet18",
    batch_size: int = 32,
    image_size: int = 32,
    model_kw: Mapping[str, Any] | None = None,
    settings: Sequence[str] = SETTINGS,
    xla_variants: Sequence[str] = (),
    steps: int = 10,
    warmup: int = 3,
    threads: int | None = None,
    pause: float = 0.05,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Times every (framework, setting) round-robin; returns the rows and the run's facts.

    Args:
      model: one of `MODELS`.
      batch_size: images per step.
      image_size: image side.
      model_kw: attributes of the layerfreeze model (see `make_case`), e.g.
        a smaller `width` for tests.
      settings: from `SETTINGS`; `full` is always measured (the `xfull` baseline).
      xla_variants: extra layerfreeze rows compiled with the options of these
        `XLA_VARIANTS` (framework `layerfreeze+<name>`).
      steps: timed steps per row.
      warmup: untimed steps per row before timing.
      threads: PyTorch intra-op threads (default: `cpu_threads()`, what XLA uses).
      pause: seconds of sleep before each timed call (see `time_round_robin`).
      seed: seed of the weights and the batch.
      log: progress messages go here.

    Returns:
      `(rows, info)`: rows with the keys of `ROW_KEYS` plus `samples_ms`; `info`
      with the model check (`check_same_model`), threads and setup.
    """
    check_choices("setting", list(settings), SETTINGS)
    check_choices("XLA variant", list(xla_variants), list(XLA_VARIANTS))
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0; got {steps} and {warmup}.")
    settings = ["full"] + [s for s in dict.fromkeys(settings) if s != "full"]
    threads = threads or cpu_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)

    case = make_case(model, image_size, model_kw, seed)
    images, labels = _batch(batch_size, image_size, seed)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    torch_labels = torch.from_numpy(labels.astype(np.int64))

    check = check_same_model(case.model, case.variables, case.make_torch(), images)
    log(
        f"  same model: {check['params']:,} parameters, "
        f"{check['forward_flops'] / 1e9:.3f} GFLOP conv+matmul forward, logits within "
        f"{check['logits_rel_diff']:.1e}"
    )

    variants = {"layerfreeze": cpu_conv_options()} | {
        f"layerfreeze+{v}": XLA_VARIANTS[v] for v in xla_variants
    }
    configs = []
    for setting in settings:
        torch_model = case.make_torch()
        step = torch_step(torch_model, setting, torch_images, torch_labels, case.torch_frozen)
        trainable = sum(
            p.numel()
            for name, p in torch_model.named_parameters()
            if setting == "full" or not _under(name, case.torch_frozen)
        )
        configs.append(("pytorch", setting, step, trainable))
        for framework, options in variants.items():
            t0 = time.perf_counter()
            spec = "none" if setting == "full" else case.freeze
            step, trainable = _jax_step(
                case.model, case.variables, spec, setting, batch, options, seed
            )
            log(f"  compiled {framework} {setting} ({time.perf_counter() - t0:.1f} s)")
            configs.append((framework, setting, step, trainable))

    log(f"  timing {len(configs)} rows: {warmup} warm-up + {steps} timed rounds, round-robin")
    cpu: list[list[float]] = []
    times = time_round_robin(
        [c[2] for c in configs], steps=steps, warmup=warmup, pause=pause, cpu_times=cpu
    )

    medians = {(f, s): statistics.median(t) for (f, s, _, _), t in zip(configs, times, strict=True)}
    mins = {(f, s): min(t) for (f, s, _, _), t in zip(configs, times, strict=True)}
    rows = []
    for (framework, setting, _, trainable), samples, cpu_samples in zip(
        configs, times, cpu, strict=True
    ):
        q1, _, q3 = quartiles(samples)
        median = medians[(framework, setting)]
        rows.append(
            {
                "model": model,
                "framework": framework,
                "setting": setting,
                "step_ms": median,
                "min_ms": min(samples),
                "q1_ms": q1,
                "q3_ms": q3,
                "max_ms": max(samples),
                "ratio_torch": median / medians[("pytorch", setting)],
                "ratio_torch_min": min(samples) / mins[("pytorch", setting)],
                "ratio_full": median / medians[(framework, "full")],
                "trainable_params": trainable,
                "cpu_ms": statistics.median(cpu_samples),
                "samples_ms": [round(t, 3) for t in samples],
            }
        )
    info = {
        "model": model,
        "description": case.description,
        "check": check,
        "threads": threads,
        "cpus": cpu_threads(),
        "torch": torch.__version__,
        "jax": jax.__version__,
        "batch_size": batch_size,
        "image_size": image_size,
        "steps": steps,
        "warmup": warmup,
        "pause": pause,
    }
    return rows, info


def _features(model: Any, upto: str, variables: Any, x: jax.Array) -> jax.Array:
    return model.apply(variables, x, upto=upto, method=type(model).features)


def _no_grad(module: tnn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(images.float())


def conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    """XLA's 3x3, stride-1, padding-1 convolution of `x` (NHWC) with `w` (HWIO)."""
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


CONV_DIRECTIONS = ("forward", "input grad", "weight grad")
"""The passes of one convolution that `--parts` times: a frozen layer runs only the
forward; a trainable one runs all three (the first trainable layer skips the
input gradient)."""


def conv_shapes(image_size: int, width: int) -> list[tuple[int, int]]:
    """(side, channels) of the four ResNet stages' 3x3 stride-1 convolutions."""
    return [(image_size >> k, width << k) for k in range(4) if image_size >> k >= 1]


def conv_part_name(side: int, channels: int, direction: str) -> str:
    name = f"conv 3x3 {side}x{side}x{channels}"
    return name if direction == "forward" else f"{name} {direction}"


def jax_conv(
    direction: str, conv: Callable[[jax.Array, jax.Array], jax.Array] = conv3x3
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """`f(x, w, g)`: `conv(x, w)` of `x` (NHWC) with `w` (HWIO), or the gradient of
    `<conv(x, w), g>` with respect to `x` or `w` (JAX's autodiff, as inside a
    train step). `conv`: a 3x3, stride-1, padding-1 convolution, XLA's by default."""
    check_choices("direction", [direction], CONV_DIRECTIONS)
    if direction == "forward":
        return lambda x, w, g: conv(x, w)
    if direction == "input grad":
        return lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]
    return lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]


def torch_conv(direction: str, x: Any, w: Any, g: Any) -> Callable[[], torch.Tensor]:
    """PyTorch's same pass on the same (NHWC/HWIO) arrays, moved to NCHW/OIHW once:
    `F.conv2d`, or `aten.convolution_backward` (what autograd calls) for one gradient."""
    check_choices("direction", [direction], CONV_DIRECTIONS)
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    tw = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy())
    tg = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy())

    if direction == "forward":

        def run():
            with torch.no_grad():
                return F.conv2d(tx, tw, padding=1)

        return run
    mask = [direction == "input grad", direction == "weight grad", False]

    def run_backward():
        with torch.no_grad():
            grads = torch.ops.aten.convolution_backward(
                tg, tx, tw, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
            )
        return grads[0] if mask[0] else grads[1]

    return run_backward


class Case(NamedTuple):
    """One benchmarked model in both frameworks."""

    model: Any
    variables: dict[str, Any]
    freeze: str
    torch_frozen: tuple[str, ...]
    make_torch: Callable[[], tnn.Module]
    description: str


def make_case(
    name: str, image_size: int = 32, model_kw: Mapping[str, Any] | None = None, seed: int = 0
) -> Case:
    """The layerfreeze model, its variables and its PyTorch twin (weights copied).

    `resnet18`: CIFAR stem, frozen stem..stage2 (`model_kw`: `width`).
    `vit_ti4`: ViT-Ti/4, unrolled blocks, frozen embeddings and the first half of
    the blocks (`model_kw`: any `ViT` attribute, e.g. a smaller `depth`).
    """
    check_choices("model", [name], MODELS)
    model_kw = dict(model_kw or {})
    if name == "resnet18":
        model = resnet18(NUM_CLASSES, stem="cifar", **model_kw)
        variables = init_variables(model, image_size, seed)
        # Non-trivial running statistics, so the model check means something.
        rng = np.random.default_rng(seed)
        variables["batch_stats"] = jax.tree.map(
            lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype),
            variables["batch_stats"],
        )

        def make_torch():
            net = TorchResNet18(NUM_CLASSES, model.width)
            load_into_torch(net, variables)
            return net

        return Case(
            model,
            variables,
            FREEZE,
            TORCH_FROZEN,
            make_torch,
            f"ResNet-18 (CIFAR stem, width {model.width}), frozen = {FREEZE}",
        )
    model = create_vit(name, num_classes=NUM_CLASSES, **{"head_zeroinit": False, **model_kw})
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(lambda r: model.init(r, x))(jax.random.key(seed))
    half = model.depth // 2
    groups = vit_groups(model.depth, pool=model.pool)
    freeze = ",".join(groups[: 3 + half])  # embedding, pos_embedding, cls, blocks
    blocks = tuple(f"blocks.{i}" for i in range(half))
    torch_frozen = ("embedding", "pos_embedding", "cls", *blocks)

    def make_torch():
        net = TorchViT(model, image_size)
        load_vit_into_torch(net, variables)
        return net

    return Case(
        model,
        variables,
        freeze,
        torch_frozen,
        make_torch,
        f"ViT (patch {model.patch_size}, width {model.width}, depth {model.depth}, "
        f"{model.num_heads} heads, unrolled), frozen = embeddings + blocks 0-{half - 1}",
    )


def _batch(batch_size: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, (batch_size,), dtype=np.int32)
    return images, labels


def _setup(batch_size: int, image_size: int, width: int, seed: int) -> tuple[Any, ...]:
    case = make_case("resnet18", image_size, {"width": width}, seed)
    return (case.model, case.variables, *_batch(batch_size, image_size, seed))


def measure_parts(
    *,
    batch_size: int = 32,
    image_size: int = 32,
    width: int = 64,
    xla_variants: Sequence[str] = (),
    steps: int = 10,
    warmup: int = 3,
    threads: int | None = None,
    pause: float = 0.05,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Where a frozen step's time goes, in each framework: its parts timed alone.

    * `frozen forward`: stem..stage2 on running statistics, no gradients
      (layerfreeze: `ResNet.features(upto="stage2")`, jitted; PyTorch: the frozen
      modules in eval mode under `torch.no_grad`); `frozen forward to stem` and
      `to stage1`: the same pass cut shorter;
    * `trainable fwd+bwd`: stage3..head in train mode from stage2's output, loss,
      and the gradients of their parameters (layerfreeze: `jax.value_and_grad`
      of `apply(..., start_after="stage2")`; PyTorch: `loss.backward()`);
    * `Adam update`: one Adam step of the trainable parameters from given
      gradients (optax `adam` + `apply_updates`, jitted; `torch.optim.Adam.step`);
    * `conv 3x3 HxWxC[ input grad| weight grad]`: one 3x3 stride-1 convolution
      of each stage's shape, forward or one of its two gradients (NHWC in XLA,
      NCHW in PyTorch, as the models run them; `jax_conv`, `torch_conv`).

    Returns:
      Rows with `part`, `framework`, `step_ms`, `q1_ms`, `q3_ms`, `ratio_torch`,
      `cpu_ms` (median process CPU time of a call, see `time_round_robin`).
    """
    check_choices("XLA variant", list(xla_variants), list(XLA_VARIANTS))
    torch.set_num_threads(threads or cpu_threads())
    model, variables, images, labels = _setup(batch_size, image_size, width, seed)
    params, stats = variables["params"], variables["batch_stats"]
    frozen_groups = ("stem", "stage1", "stage2")
    x = jnp.asarray(images)
    y = jnp.asarray(labels)
    feats = _features(model, "stage2", variables, x)
    trainable = {k: v for k, v in params.items() if k not in frozen_groups}
    optimizer = optax.adam(LEARNING_RATE)
    opt_state = optimizer.init(trainable)

    features = functools.partial(_features, model, "stage2")

    def loss_grad(trainable, feats, y):
        def loss_fn(trainable):
            logits, updates = model.apply(
                {"params": {**params, **trainable}, "batch_stats": stats},
                feats,
                train=True,
                start_after="stage2",
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates

        return jax.value_and_grad(loss_fn, has_aux=True)(trainable)

    (_, _), grads = jax.jit(loss_grad)(trainable, feats, y)

    def update(trainable, grads, opt_state):
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    rng = np.random.default_rng(seed + 1)

    def rng_normal(shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    fns: list[tuple[str, str, Callable[[], Any]]] = []
    variants = {"layerfreeze": cpu_conv_options()} | {
        f"layerfreeze+{v}": XLA_VARIANTS[v] for v in xla_variants
    }
    for framework, options in variants.items():
        opts = dict(options) or None
        f = jax.jit(features).lower(variables, x).compile(compiler_options=opts)
        g = jax.jit(loss_grad).lower(trainable, feats, y).compile(compiler_options=opts)
        u = jax.jit(update).lower(trainable, grads, opt_state).compile(compiler_options=opts)
        fns += [
            ("frozen forward", framework, lambda f=f: jax.block_until_ready(f(variables, x))),
            (
                "trainable fwd+bwd",
                framework,
                lambda g=g: jax.block_until_ready(g(trainable, feats, y)),
            ),
            (
                "Adam update",
                framework,
                lambda u=u: jax.block_until_ready(u(trainable, grads, opt_state)),
            ),
        ]

    net = TorchResNet18(NUM_CLASSES, width)
    load_into_torch(net, variables)
    net.train()
    frozen_net = tnn.Sequential(net.conv1, net.bn1, tnn.ReLU(), net.layer1, net.layer2).eval()
    for p in frozen_net.parameters():
        p.requires_grad_(False)
    t_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    t_labels = torch.from_numpy(labels.astype(np.int64))
    with torch.no_grad():
        t_feats = frozen_net(t_images.float())
    t_trainable = [p for p in net.parameters() if p.requires_grad]
    t_opt = torch.optim.Adam(t_trainable, lr=LEARNING_RATE)

    def t_forward():
        with torch.no_grad():
            return frozen_net(t_images.float())

    def t_fwd_bwd():
        t_opt.zero_grad(set_to_none=True)
        out = net.fc(net.layer4(net.layer3(t_feats)).mean(dim=(2, 3)))
        F.cross_entropy(out, t_labels).backward()

    t_fwd_bwd()  # gradients for the update to read
    fns += [
        ("frozen forward", "pytorch", t_forward),
        ("trainable fwd+bwd", "pytorch", t_fwd_bwd),
        ("Adam update", "pytorch", t_opt.step),
    ]
    # The frozen forward cut shorter, to tell which stage holds a difference.
    for upto, modules in (("stem", 3), ("stage1", 4)):
        part = f"frozen forward to {upto}"
        for framework, options in variants.items():
            f = (
                jax.jit(functools.partial(_features, model, upto))
                .lower(variables, x)
                .compile(compiler_options=dict(options) or None)
            )
            fns.append((part, framework, functools.partial(call_and_block, f, variables, x)))
        fns.append((part, "pytorch", functools.partial(_no_grad, frozen_net[:modules], t_images)))
    # Each stage's 3x3 stride-1 convolution alone: forward, input and weight gradients.
    for side, channels in conv_shapes(image_size, width):
        conv_x, conv_w, conv_g = (
            rng_normal(s)
            for s in (
                (batch_size, side, side, channels),
                (3, 3, channels, channels),
                (batch_size, side, side, channels),
            )
        )
        conv_w = conv_w * 0.05
        for direction in CONV_DIRECTIONS:
            part = conv_part_name(side, channels, direction)
            for framework, options in variants.items():
                c = (
                    jax.jit(jax_conv(direction))
                    .lower(conv_x, conv_w, conv_g)
                    .compile(compiler_options=dict(options) or None)
                )
                fns.append(
                    (part, framework, functools.partial(call_and_block, c, conv_x, conv_w, conv_g))
                )
            fns.append((part, "pytorch", torch_conv(direction, conv_x, conv_w, conv_g)))
    log(f"  timing {len(fns)} parts: {warmup} warm-up + {steps} timed rounds, round-robin")
    cpu: list[list[float]] = []
    times = time_round_robin(
        [f for _, _, f in fns], steps=steps, warmup=warmup, pause=pause, cpu_times=cpu
    )
    medians = {(p, fw): statistics.median(t) for (p, fw, _), t in zip(fns, times, strict=True)}
    rows = []
    for part in dict.fromkeys(p for p, _, _ in fns):
        for (p, framework, _), samples, cpu_samples in zip(fns, times, cpu, strict=True):
            if p != part:
                continue
            q1, _, q3 = quartiles(samples)
            rows.append(
                {
                    "part": part,
                    "framework": framework,
                    "step_ms": medians[(part, framework)],
                    "q1_ms": q1,
                    "q3_ms": q3,
                    "ratio_torch": medians[(part, framework)] / medians[(part, "pytorch")],
                    "cpu_ms": statistics.median(cpu_samples),
                    "samples_ms": [round(t, 3) for t in samples],
                }
            )
    return rows


def format_parts(rows: Sequence[Mapping[str, Any]], markdown: bool = False) -> str:
    """The parts table, plain text or markdown."""
    header = ["part", "framework", "ms", "IQR", "xtorch", "CPU ms", "CPU/wall"]
    body = [
        [
            r["part"],
            r["framework"],
            f"{r['step_ms']:.1f}",
            f"{r['q1_ms']:.1f}-{r['q3_ms']:.1f}",
            f"{r['ratio_torch']:.2f}",
            f"{r['cpu_ms']:.1f}",
            f"{r['cpu_ms'] / r['step_ms']:.2f}",
        ]
        for r in rows
    ]
    if markdown:
        return markdown_table(header, body, left=2)
    return text_table(header, body, left=2)


# --------------------------------------------------------------------------- output

_COLUMNS = (
    ("model", "model", "{}"),
    ("framework", "framework", "{}"),
    ("setting", "setting", "{}"),
    ("trainable", "trainable_params", "{:,}"),
    ("ms/step", "step_ms", "{:.1f}"),
    ("min", "min_ms", "{:.1f}"),
    ("IQR", None, None),
    ("max", "max_ms", "{:.1f}"),
    ("xtorch", "ratio_torch", "{:.2f}"),
    ("xtorch-min", "ratio_torch_min", "{:.2f}"),
    ("xfull", "ratio_full", "{:.2f}"),
)


def _cells(row: Mapping[str, Any]) -> list[str]:
    out = []
    for _, key, fmt in _COLUMNS:
        if key is None:
            out.append(f"{row['q1_ms']:.1f}-{row['q3_ms']:.1f}")
        else:
            out.append(fmt.format(row[key]))
    return out


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table: text columns left-aligned, numbers right-aligned."""
    return text_table([h for h, _, _ in _COLUMNS], [_cells(r) for r in rows])


def format_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table as GitHub markdown."""
    return markdown_table([h for h, _, _ in _COLUMNS], [_cells(r) for r in rows])


def describe(info: Mapping[str, Any]) -> str:
    """The setup and the model check, one paragraph."""
    check = info["check"]
    return (
        f"{info['description']}; batch {info['batch_size']}, "
        f"{info['image_size']}x{info['image_size']}, float32, Adam; "
        f"torch {info['torch']} with {info['threads']} threads (`torch.set_num_threads`; "
        f"XLA's CPU client uses the {info['cpus']} CPUs this process may run on), "
        f"jax {info['jax']}; "
        f"{info['warmup']} warm-up + {info['steps']} timed steps per row, round-robin, "
        f"{1e3 * info['pause']:.0f} ms sleep before each; host memory "
        f"{_HOST_MEMORY_TEXT[info.get('host_memory', 'release')]}. "
        f"Same model in both: {check['params']:,} parameters, "
        f"{check['forward_flops'] / 1e9:.3f} GFLOP of convolutions and matmuls per forward "
        f"pass, eval logits equal to {check['logits_rel_diff']:.1e} (relative)."
    )


def write_markdown(
    path: str,
    runs: Sequence[tuple[Sequence[Mapping[str, Any]], Mapping[str, Any]]],
    command: str,
    parts: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Appends a section: the machine, the command, each model's setup and table, the parts."""
    models = ", ".join(info["model"] for _, info in runs)
    text = f"## vs_pytorch: {models}\n\nMachine: {machine_description()}.\n\nCommand: `{command}`\n"
    for rows, info in runs:
        text += f"\n{info['model']}: {describe(info)}\n\n{format_markdown(rows)}\n"
    if parts:
        text += f"\nThe parts of a frozen step, each timed alone:\n\n{format_parts(parts, True)}\n"
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if exists else "") + text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="layerfreeze and PyTorch train steps (full, frozen, lr0) in one run.",
    )
    parser.add_argument("--quick", action="store_true", help="5 timed steps, 2 warm-up")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3)")
    parser.add_argument("--batch_size", type=int, default=32, help="default 32")
    parser.add_argument(
        "--models", default="resnet18", help=f"comma-separated, from: {', '.join(MODELS)}"
    )
    parser.add_argument("--width", type=int, default=64, help="ResNet stem channels (64)")
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"from: {', '.join(SETTINGS)}"
    )
    parser.add_argument(
        "--xla_variant",
        default="",
        help=f"comma-separated extra layerfreeze rows, from: {', '.join(XLA_VARIANTS)}",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs)")
    parser.add_argument(
        "--pause_ms", type=float, default=50.0, help="sleep before each timed call (default 50)"
    )
    parser.add_argument(
        "--parts", action="store_true", help="also time a frozen step's parts alone in each"
    )
    parser.add_argument(
        "--host_memory",
        default="release",
        choices=HOST_MEMORY,
        help="retain: retain_host_memory() for the whole process, both frameworks; "
        "release: glibc's defaults (default)",
    )
    parser.add_argument("--json", default=None, help="write the rows and setup as JSON here")
    parser.add_argument("--markdown", default=None, help="append a markdown section here")
    args = parser.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    args.xla_variant = [s.strip() for s in args.xla_variant.split(",") if s.strip()]
    args.models = [s.strip() for s in args.models.split(",") if s.strip()]
    try:
        if not args.models:
            raise ValueError(f"--models is empty; valid choices: {', '.join(MODELS)}.")
        check_choices("model", args.models, MODELS)
        check_choices("setting", args.settings, SETTINGS)
        check_choices("XLA variant", args.xla_variant, list(XLA_VARIANTS))
    except ValueError as e:
        parser.error(str(e))
    if args.steps is None:
        args.steps = 5 if args.quick else 10
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    for flag in ("steps", "batch_size", "width", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be a positive integer; got {value}.")
    if args.warmup < 0 or args.pause_ms < 0:
        parser.error(f"--warmup and --pause_ms must be >= 0; got {args.warmup}, {args.pause_ms}.")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmark from command-line arguments; returns the rows."""
    args = parse_args(argv)
    command = command_line("vs_pytorch.py", argv)
    # Before anything runs on JAX's backend: the setting holds for threads started later.
    if args.host_memory == "retain" and not retain_host_memory():
        args.host_memory = "release"  # not glibc, or called too late: say what ran
    print(f"machine: {machine_description()}", flush=True)
    start = time.perf_counter()
    common = {
        "batch_size": args.batch_size,
        "xla_variants": args.xla_variant,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "pause": args.pause_ms / 1e3,
        "log": lambda msg: print(msg, flush=True),
    }
    runs = []
    for model in args.models:
        print(f"{model}:", flush=True)
        model_kw = {"width": args.width} if model == "resnet18" else {}
        runs.append(measure(model=model, model_kw=model_kw, settings=args.settings, **common))
    parts = measure_parts(width=args.width, **common) if args.parts else []
    for rows, info in runs:
        info["host_memory"] = args.host_memory
        print()
        print(describe(info))
        print(format_table(rows))
    if parts:
        print()
        print(format_parts(parts))
    print(f"total {time.perf_counter() - start:.0f} s")
    rows = [row for rows, _ in runs for row in rows]
    if args.json:
        write_json(args.json, [{**row, "setup": info} for rs, info in runs for row in rs] + parts)
    if args.markdown:
        write_markdown(args.markdown, runs, command.strip(), parts)
    return rows


if __name__ == "__main__":
    main()
