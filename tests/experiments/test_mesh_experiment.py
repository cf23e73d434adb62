"""The experiment on a mesh: `--config.mesh` and `--config.sharding`.

Bad values are checked in process (one device); a run on four CPU devices,
resumed onto a mesh of another shape, runs in one subprocess. Several
processes are tested on the library's path (`tests/train/test_multiprocess.py`).
"""

import json
import os
import textwrap

import cifar_train as cifar
import fresh
import jax
import pytest
from configs import cifar10 as default_config

# A tiny ViT: the quickest model of the experiment to compile.
TINY = dict(
    dataset="synthetic",
    model="vit_ti4",
    vit_width=16,
    vit_depth=1,
    vit_mlp_dim=32,
    vit_heads=2,
    freeze="embedding,pos_embedding,cls",
    synthetic_train_size=64,
    synthetic_test_size=16,
    batch_size=16,
    warmup_steps=1,
    log_every=1,
    eval_every=100,
    checkpoint_every=2,
    progress=False,
    plot=False,
    compilation_cache="",
    compile_ahead=False,  # background compiles: test_unfreezing_experiment.py checks them
)


def tiny_config(**overrides):
    config = default_config.get_config()
    for key, value in {**TINY, **overrides}.items():
        config[key] = value
    return config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"mesh": "data=2,fsdp=2"},
            "config.mesh='data=2,fsdp=2': make_mesh({'data': 2, 'fsdp': 2}): the sizes "
            "multiply to 4, but there are 1 devices; valid: sizes whose product is 1 (or -1 "
            "for one axis: the rest). This run has 1 devices (1 process x 1).",
        ),
        ({"mesh": "model=1"}, "valid axes: data, fsdp; 'model=1' is not one."),
        ({"mesh": "data=one"}, "'data=one' has no integer size."),
        ({"mesh": "data=1,data=1"}, "'data' is given twice."),
        ({"sharding": "zero"}, "Unknown sharding 'zero'; valid: '', 'fsdp', 'fsdp:<min size>'"),
        (
            {"sharding": "fsdp"},
            "config.sharding='fsdp' splits the state over the mesh axis fsdp, which "
            "config.mesh='' lacks; give one, e.g. --config.mesh=data=1,fsdp=-1.",
        ),
    ],
)
def test_a_bad_mesh_or_sharding_is_one_clear_error(overrides, message):
    with pytest.raises(cifar.UsageError) as info:
        cifar.validate_config(tiny_config(**overrides))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_several_processes_compile_each_phase_at_its_change(monkeypatch):
    assert cifar._compile_ahead(tiny_config(compile_ahead=True))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert not cifar._compile_ahead(tiny_config(compile_ahead=True))


_ON_FOUR_DEVICES = textwrap.dedent(
    """
    import json, sys
    import cifar_train as cifar
    from test_mesh_experiment import tiny_config

    workdir, out = sys.argv[1], {}
    # Data parallel over four devices, the state replicated.
    cifar.train_and_evaluate(tiny_config(mesh="", num_train_steps=2), workdir)
    # Resumed onto data=2 x fsdp=2 with the state split over fsdp.
    second = cifar.train_and_evaluate(
        tiny_config(mesh="data=2,fsdp=2", sharding="fsdp:256", num_train_steps=4), workdir)
    kernel = second["state"].params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"][
        "kernel"]
    out["steps"] = second["steps"]
    out["spec"] = str(kernel.sharding.spec)
    out["shard"] = list(kernel.addressable_shards[0].data.shape)
    try:
        cifar.train_and_evaluate(tiny_config(mesh="data=3"), workdir)
    except cifar.UsageError as e:
        out["error"] = str(e)
    print(json.dumps(out))
    """
)


def test_a_run_on_four_devices_resumes_onto_a_mesh_of_another_shape(tmp_path):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    proc = fresh.run_code(
        _ON_FOUR_DEVICES,
        tmp_path / "run",
        cwd=tmp_path,
        timeout=300,
        env={"XLA_FLAGS": flags},
        # As conftest: quicker random initialisers, and the session's compilation cache.
        jax_config={
            "jax_platforms": "cpu",
            "jax_threefry_partitionable": False,
            "jax_compilation_cache_dir": str(jax.config.jax_compilation_cache_dir or ""),
            "jax_persistent_cache_min_compile_time_secs": 0,
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Resuming from step 2" in proc.stdout
    assert out["steps"] == 4
    # Split over fsdp=2 along its larger dimension (32 of 16 x 32), as the new mesh says.
    assert out["spec"] == "P(None, 'fsdp')" and out["shard"] == [16, 16]
    assert "there are 4 devices" in out["error"] and "(1 process x 4)" in out["error"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mesh"] == "data=2,fsdp=2"
