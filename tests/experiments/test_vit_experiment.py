"""The CIFAR experiment with a ViT: unrolled and scanned, .npz and run init, bad options."""

import functools
import importlib
import json

import cifar_train as cifar
import jax
import numpy as np
import pytest
from flax import traverse_util
from test_cifar_experiment import ROOT, _assert_trees_equal, _params, _rows, _run_cli, tiny_config

from layerfreeze import models
from layerfreeze.train import checkpoint

# Two blocks of width 16 on 8x8 patches of 32x32 images: 16 tokens, seconds per run.
TINY_VIT = dict(
    model="vit_ti4", vit_width=16, vit_depth=2, vit_mlp_dim=32, vit_heads=2, freeze="none"
)
EMBEDDINGS = ("embedding", "pos_embedding", "cls")


def vit_config(**overrides):
    return tiny_config(**{**TINY_VIT, **overrides})


def _write_npz(path, num_classes, seed=0):
    """A big_vision-style .npz of the tiny ViT (unrolled), random values."""
    model = cifar.build_model(vit_config(), num_classes)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(shapes["params"], sep="/")
    arrays = {k: rng.normal(scale=0.1, size=v.shape).astype(np.float32) for k, v in flat.items()}
    np.savez(path, **arrays)
    return traverse_util.unflatten_dict(arrays, sep="/")


@pytest.fixture(scope="module")
def unrolled_run(tmp_path_factory):
    """A run from a 20-class .npz: embeddings and block 0 frozen, layer-wise decay."""
    tmp = tmp_path_factory.mktemp("vit")
    source = _write_npz(tmp / "vit.npz", num_classes=20)
    config = vit_config(
        init_from=str(tmp / "vit.npz"),
        freeze=",".join([*EMBEDDINGS, "Transformer/encoderblock_0"]),
        layer_decay=0.75,
    )
    return source, cifar.train_and_evaluate(config, str(tmp / "run")), tmp / "run"


def test_unrolled_vit_from_npz_keeps_frozen_params_bit_identical(unrolled_run, capsys):
    source, result, workdir = unrolled_run
    assert result["steps"] == 8 and result["compilations"] == 1
    params = _params(workdir)["params"]
    for group in EMBEDDINGS:
        _assert_trees_equal(params[group], source[group])
    _assert_trees_equal(
        params["Transformer"]["encoderblock_0"], source["Transformer"]["encoderblock_0"]
    )
    for leaf, before in zip(
        jax.tree.leaves(params["Transformer"]["encoderblock_1"]),
        jax.tree.leaves(source["Transformer"]["encoderblock_1"]),
        strict=True,
    ):
        assert not np.array_equal(leaf, before)
    assert params["head"]["kernel"].shape == (16, 10)  # re-initialised for 10 classes
    assert all(np.isfinite(r["loss"]) for r in _rows(workdir) if r["split"] == "train")


def test_unrolled_vit_output_names_the_blocks_and_decay(tmp_path, capsys):
    _write_npz(tmp_path / "vit.npz", num_classes=10)
    config = vit_config(
        init_from=str(tmp_path / "vit.npz"), freeze="embedding", layer_decay=0.5, num_train_steps=1
    )
    cifar.train_and_evaluate(config, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert f"big_vision weights from {tmp_path / 'vit.npz'}" in out
    assert "re-initialised" not in out  # 10 classes in the file and in the data
    # Layer-wise decay over (embeddings), block 0, block 1, (norm, head): 0.5 ** 3 ... 1.
    assert "lr embedding=0.125, pos_embedding=0.125, cls=0.125" in out
    assert "Transformer/encoderblock_0=0.25, Transformer/encoderblock_1=0.5" in out
    summary_rows = [line.split()[0] for line in out.splitlines() if "trainable" in line]
    assert "Transformer/encoderblock_1" in summary_rows and "head" in summary_rows


def test_scanned_vit_starts_from_an_unrolled_run(unrolled_run, tmp_path, capsys):
    _, _, source_dir = unrolled_run
    source = _params(source_dir)["params"]
    config = vit_config(
        scan=True,
        init_from=str(source_dir),
        freeze=",".join([*EMBEDDINGS, "Transformer/encoderblock[:1]"]),
        layer_decay=0.5,
        num_train_steps=4,
    )
    result = cifar.train_and_evaluate(config, str(tmp_path))
    assert result["steps"] == 4
    params = _params(tmp_path)["params"]
    for group in EMBEDDINGS:
        _assert_trees_equal(params[group], source[group])
    stacked = params["Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_0"]["kernel"]
    assert stacked.shape == (2, 16, 32)
    before = models.stack_blocks(source)["Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_0"]
    np.testing.assert_array_equal(stacked[0], before["kernel"][0])  # block 0 is frozen
    assert not np.array_equal(stacked[1], before["kernel"][1])  # block 1 trains
    out = capsys.readouterr().out
    assert "Transformer/encoderblock[1]=0.5" in out  # one rate per stacked block
    assert f"run {source_dir} (step 8)" in out


def test_autofreeze_freezes_scanned_blocks_as_a_prefix_range(tmp_path):
    source = _write_npz(tmp_path / "vit.npz", num_classes=10)
    config = vit_config(
        scan=True,
        schedule="auto",
        init_from=str(tmp_path / "vit.npz"),
        freeze=",".join([*EMBEDDINGS, "Transformer/encoderblock[:1]"]),
        augment=False,
    )
    config.auto.interval = 2
    config.auto.percentile = 90.0
    config.auto.groups = "Transformer/encoderblock[1]"
    result = cifar.train_and_evaluate(config, str(tmp_path / "run"))
    rows = _rows(tmp_path / "run")
    (decision,) = [r for r in rows if r["split"] == "phase"]
    blocks = ["Transformer/encoderblock[0]", "Transformer/encoderblock[1]"]
    assert decision["frozen"] == [*EMBEDDINGS, *blocks]
    assert decision["spec"] == ",".join([*EMBEDDINGS, "Transformer/encoderblock[:2]"])
    assert rows[-2]["split"] == "train" and rows[-2]["frozen"] == decision["frozen"]
    assert result["compilations"] == 2 and decision["step"] == 6
    source_of_run = functools.partial(cifar.run_source, tmp_path / "run")
    with checkpoint.Checkpointer(tmp_path / "run" / "checkpoints", reference=source_of_run) as ckpt:
        at_decision = ckpt.restore_arrays(("params",), step=6)["params"]
    params = _params(tmp_path / "run")["params"]
    for group in EMBEDDINGS:
        _assert_trees_equal(params[group], source[group])
    stacked = params["Transformer"]["encoderblock"]
    initial = models.stack_blocks(source)["Transformer"]["encoderblock"]
    decided = at_decision["Transformer"]["encoderblock"]
    for leaf, init, then in zip(*map(jax.tree.leaves, (stacked, initial, decided)), strict=True):
        np.testing.assert_array_equal(leaf[0], init[0])  # frozen all run
        np.testing.assert_array_equal(leaf[1], then[1])  # frozen by the policy at step 6
        assert not np.array_equal(leaf[1], init[1])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train_bn": True}, "has no BatchNorm"),
        ({"cache_frozen_features": True}, "supported for the ResNets only"),
        ({"head": "mlp"}, "a ViT's head is one Dense layer"),
        ({"pool": "max"}, "Unknown pool 'max'; valid: tok, gap"),
        ({"vit_depth": -1}, "config.vit_depth must be >= 0"),
        ({"vit_heads": 3}, "num_heads=3 does not divide width=16"),
        ({"scan": True, "freeze": "Transformer/encoderblock[:5]"}, "of depth 2 (blocks 0..1)"),
        ({"schedule": "auto", "layer_decay": 0.75}, "cannot be combined with config.schedule"),
        (
            {"schedule": "freezeout", "freeze": "Transformer/encoderblock_0/MlpBlock_3"},
            "freezes part of Transformer/encoderblock_0; name whole groups",
        ),
        ({"layer_decay": 0.75, "lr_multipliers": "ulmfit"}, "set one of them"),
        ({"layer_decay": 1.5}, "decay must be in (0, 1]"),
        ({"freeze": "Transformer/encoderblock_7"}, "encoderblock_7"),
        ({"freeze": "blocks"}, "Unknown group 'blocks'"),
        ({"freeze": "stem,stage1"}, "names a ResNet's stages; for a ViT freeze its groups"),
        ({"model": "resnet18", "scan": True}, "'resnet18' is a ResNet"),
    ],
)
def test_bad_vit_options_are_one_clear_error(tmp_path, overrides, message):
    with pytest.raises(cifar.UsageError) as info:
        cifar.train_and_evaluate(vit_config(**overrides), str(tmp_path / "run"))
    assert message in str(info.value)
    assert not (tmp_path / "run" / "config.json").exists()


def test_npz_that_does_not_fit_names_the_keys(tmp_path):
    _write_npz(tmp_path / "vit.npz", num_classes=10)
    config = vit_config(init_from=str(tmp_path / "vit.npz"), vit_mlp_dim=48)
    with pytest.raises(cifar.UsageError) as info:
        cifar.train_and_evaluate(config, str(tmp_path / "run"))
    message = str(info.value)
    assert "does not fit this model" in message and "shapes differ" in message
    assert "MlpBlock_3/Dense_0/kernel (file (16, 32), model (16, 48))" in message
    with pytest.raises(cifar.UsageError, match=r"is an .npz file: big_vision ViT weights"):
        cifar.train_and_evaluate(
            tiny_config(init_from=str(tmp_path / "vit.npz")), str(tmp_path / "run2")
        )


@pytest.mark.parametrize("name", ["vit_cifar100_source", "vit_cifar10_finetune"])
def test_vit_configs_are_valid_and_their_specs_fit_vit_ti4(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    cifar.validate_config(config)
    model = cifar.build_model(config, 10)
    groups = cifar.model_groups(model)
    schedule = cifar.build_schedule(config, groups)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    frozen = schedule.phases[0].spec.resolve(shapes["params"])
    frozen_blocks = {p.split("/")[1] for p, f in frozen.items() if f and p.startswith("Trans")}
    if name == "vit_cifar10_finetune":
        assert frozen_blocks == {f"encoderblock_{i}" for i in range(6)}
        assert frozen["embedding/kernel"] and not frozen["head/kernel"]
        assert dict(schedule.phases[0].lr_multipliers)["head"] == 1.0
    else:
        assert not any(frozen.values())


def test_cli_refuses_train_bn_for_a_vit(tmp_path):
    proc = _run_cli(
        f"--workdir={tmp_path / 'run'}",
        f"--config={ROOT / 'experiments' / 'configs' / 'vit_cifar10_finetune.py'}",
        "--config.dataset=synthetic",
        "--config.train_bn=True",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "has no BatchNorm" in errors[0], proc.stderr[-2000:]


def test_frozen_random_blocks_of_a_scanned_vit_are_announced_and_recorded(tmp_path, capsys):
    freeze = ",".join([*EMBEDDINGS, "Transformer/encoderblock[:1]"])
    cifar.train_and_evaluate(vit_config(scan=True, freeze=freeze, num_train_steps=1), tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())["frozen_random_init"]
    assert recorded == [*EMBEDDINGS, "Transformer/encoderblock[0]"]
    assert "Transformer/encoderblock[0])" in capsys.readouterr().err
