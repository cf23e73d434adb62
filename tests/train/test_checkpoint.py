"""Tests for layerfreeze.train.checkpoint."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorstore as ts

from layerfreeze.train import TrainState
from layerfreeze.train.checkpoint import (
    CheckpointDamagedError,
    Checkpointer,
    CheckpointSourceError,
    Reference,
)

# Orbax names a step being written "<step>" + this suffix until it renames it.
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _params() -> dict:
    return {
        "backbone": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.full((3,), 0.25)},
        "head": {"kernel": jnp.linspace(-1.0, 1.0, 4, dtype=jnp.bfloat16)},
    }


def _labels() -> dict:
    return {"backbone": {"kernel": "frozen", "bias": "frozen"}, "head": {"kernel": "trainable"}}


def _tx() -> optax.GradientTransformation:
    return optax.partition(
        {"trainable": optax.adamw(1e-2, weight_decay=1e-3), "frozen": optax.set_to_zero()},
        _labels(),
    )


def _make_rng(kind: str) -> jax.Array:
    if kind == "raw":
        return jax.random.PRNGKey(7)
    return jax.random.key(7, impl=kind)


def _state(rng_kind: str = "raw", seed: int = 0) -> dict:
    """A small training state after one optimizer update (non-zero Adam moments)."""
    params = _params()
    tx = _tx()
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5 + seed), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return {
        "params": optax.apply_updates(params, updates),
        "batch_stats": {"bn": {"mean": jnp.full((3,), 0.1 * seed), "var": jnp.ones((3,))}},
        "opt_state": opt_state,
        "rng": jax.random.fold_in(_make_rng(rng_kind), seed),
        "step": jnp.int32(seed),
        "epoch": seed,
        "lr_scale": 0.5,
        "seen": np.arange(3, dtype=np.int64) + seed,
    }


def _bits(leaf):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return ("key", str(jax.random.key_impl(leaf)), np.asarray(jax.random.key_data(leaf)))
    if isinstance(leaf, bool | int | float):
        return (type(leaf), leaf)
    arr = np.asarray(leaf)
    return (type(leaf), arr.dtype, arr.shape, arr.tobytes())


def assert_bitwise_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        gb, wb = _bits(g), _bits(w)
        if gb[0] == "key":
            assert gb[:2] == wb[:2]
            np.testing.assert_array_equal(gb[2], wb[2], strict=True)
        else:
            assert gb == wb


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"


@pytest.mark.parametrize("rng_kind", ["raw", "threefry2x32", "rbg"])
@pytest.mark.parametrize("abstract_target", [False, True], ids=["concrete", "abstract"])
def test_round_trip_is_bitwise(ckpt_dir, rng_kind, abstract_target):
    saved = _state(rng_kind, seed=3)
    fresh = _state(rng_kind, seed=0)
    target = jax.eval_shape(lambda: fresh) if abstract_target else fresh
    if abstract_target:
        # eval_shape turns Python and NumPy leaves into ShapeDtypeStructs; keep them
        # concrete so the target still says "restore a Python int / NumPy array".
        target = {**target, "epoch": 0, "lr_scale": 0.0, "seen": fresh["seen"]}
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(3, saved, metadata={"phase": 0})
    with Checkpointer(ckpt_dir) as ckpt:
        restored, _ = ckpt.restore(target)
    assert_bitwise_equal(restored, saved)
    assert isinstance(restored["opt_state"], optax.PartitionState)
    assert isinstance(
        restored["opt_state"].inner_states["trainable"].inner_state[0].mu["backbone"]["kernel"],
        optax.MaskedNode,
    )


def test_metadata_round_trip_and_read_alone(ckpt_dir):
    metadata = {
        "freeze": "stem,stage1",
        "phase": 2,
        "data": {"epoch": 1, "index": 512, "order": (3, 1, 2)},
        "lr": 1e-3,
        "note": None,
    }
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(5, _state(), metadata=metadata)
    expected = json.loads(json.dumps(metadata))  # tuples come back as lists
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.restore_metadata() == expected
        assert ckpt.restore_metadata(5) == expected
        _, restored_metadata = ckpt.restore(_state())
    assert restored_metadata == expected


@pytest.mark.parametrize(
    "metadata",
    [{"x": object()}, {1: "int key"}, {"x": float("nan")}, ["not", "a", "mapping"]],
    ids=["object", "int-key", "nan", "list"],
)
def test_save_rejects_non_json_metadata(ckpt_dir, metadata):
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(TypeError, match="metadata"):
            ckpt.save(1, _state(), metadata=metadata)
        assert ckpt.all_steps() == []


def test_latest_step_all_steps_and_pruning(ckpt_dir):
    with Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.all_steps() == []
        for step in (10, 20, 30):
            ckpt.save(step, _state(seed=step), metadata={"step": step})
        assert ckpt.all_steps() == [20, 30]
        assert ckpt.latest_step() == 30
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == ["20", "30"]
    with Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
        assert ckpt.all_steps() == [20, 30]


def test_max_to_keep_none_keeps_everything(ckpt_dir):
    with Checkpointer(ckpt_dir, max_to_keep=None) as ckpt:
        for step in range(5):
            ckpt.save(step, {"w": jnp.full((2,), float(step))}, metadata={})
        assert ckpt.all_steps() == [0, 1, 2, 3, 4]


def test_restore_specific_step(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _state(seed=step), metadata={"step": step})
        restored, metadata = ckpt.restore(_state(), step=2)
        latest, latest_metadata = ckpt.restore(_state())
    assert metadata == {"step": 2}
    assert_bitwise_equal(restored, _state(seed=2))
    assert latest_metadata == {"step": 3}
    assert_bitwise_equal(latest, _state(seed=3))


def test_restore_from_empty_directory_names_it(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(FileNotFoundError, match=str(ckpt_dir)):
            ckpt.restore(_state())
        with pytest.raises(FileNotFoundError, match=str(ckpt_dir)):
            ckpt.restore_metadata()


def test_restore_missing_step_lists_saved_steps(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(4, _state(), metadata={})
        with pytest.raises(FileNotFoundError, match=r"step 5 .*saved steps: \[4\]"):
            ckpt.restore(_state(), step=5)


def _drop_head(state):
    return {**state, "params": {"backbone": state["params"]["backbone"]}}


def _add_leaf(state):
    return {**state, "extra": jnp.zeros(2)}


def _reshape(state):
    params = state["params"]
    return {**state, "params": {**params, "head": {"kernel": jnp.zeros(5, jnp.bfloat16)}}}


def _recast(state):
    params = state["params"]
    return {**state, "params": {**params, "head": {"kernel": jnp.zeros(4, jnp.float32)}}}


def _as_list(state):
    bn = state["batch_stats"]["bn"]
    return {**state, "batch_stats": {"bn": [bn["mean"], bn["var"]]}}


def _scalar_as_array(state):
    return {**state, "epoch": jax.ShapeDtypeStruct((), jnp.int32)}


def _typed_rng(state):
    return {**state, "rng": jax.random.key(0)}


def _other_labels(state):
    # Freezing a different set changes where optax puts MaskedNodes.
    params = _params()
    labels = {"backbone": {"kernel": "trainable", "bias": "frozen"}, "head": {"kernel": "frozen"}}
    tx = optax.partition({"trainable": optax.adamw(1e-2), "frozen": optax.set_to_zero()}, labels)
    return {**state, "opt_state": tx.init(params)}


@pytest.mark.parametrize(
    ("change", "hint"),
    [
        (_drop_head, "in checkpoint but not in target: .*params/head/kernel"),
        (_add_leaf, "in target but not in checkpoint: extra"),
        (_reshape, r"params/head/kernel \(checkpoint bfloat16\[4\], target bfloat16\[5\]\)"),
        (_recast, r"params/head/kernel \(checkpoint bfloat16\[4\], target float32\[4\]\)"),
        (_as_list, "batch_stats"),
        (_scalar_as_array, r"epoch \(checkpoint Python scalar int64\[\], target int32\[\]\)"),
        (_typed_rng, r"typed PRNG key.*: rng \(checkpoint uint32, target key<fry>\)"),
        (_other_labels, "opt_state/inner_states/trainable/inner_state/0/mu/backbone/kernel"),
    ],
    ids=[
        "missing",
        "unexpected",
        "shape",
        "dtype",
        "container",
        "scalar",
        "typed-key",
        "freeze-set",
    ],
)
def test_mismatched_target_raises(ckpt_dir, change, hint):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, _state(), metadata={})
        with pytest.raises(ValueError, match="does not match the structure of `target`") as info:
            ckpt.restore(change(_state()))
    assert info.match(hint)


def test_save_refuses_steps_that_are_not_newer(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(10, _state(seed=1), metadata={})
        for step in (10, 5):
            with pytest.raises(ValueError, match=f"Step {step} is not newer .*force=True"):
                ckpt.save(step, _state(seed=2), metadata={})
        assert ckpt.all_steps() == [10]
        restored, _ = ckpt.restore(_state())
    assert_bitwise_equal(restored, _state(seed=1))


@pytest.mark.parametrize("rollback_to", [15, 30])
def test_force_save_rolls_back_newer_steps(ckpt_dir, rollback_to):
    with Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
        for step in (10, 20, 30):
            ckpt.save(step, _state(seed=1), metadata={"step": step})
        ckpt.save(rollback_to, _state(seed=2), metadata={"step": rollback_to}, force=True)
        expected_steps = [20, rollback_to] if rollback_to > 20 else [rollback_to]
        assert ckpt.all_steps() == expected_steps
        assert ckpt.latest_step() == rollback_to
    with Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
        assert ckpt.all_steps() == expected_steps
        restored, metadata = ckpt.restore(_state())
    assert metadata == {"step": rollback_to}
    assert_bitwise_equal(restored, _state(seed=2))


@pytest.mark.parametrize(("step", "error"), [(-1, ValueError), (1.0, TypeError), (True, TypeError)])
def test_save_rejects_bad_steps(ckpt_dir, step, error):
    with Checkpointer(ckpt_dir) as ckpt, pytest.raises(error, match="step"):
        ckpt.save(step, _state(), metadata={})


@pytest.mark.parametrize("max_to_keep", [0, -1, 2.0, True])
def test_rejects_bad_max_to_keep(ckpt_dir, max_to_keep):
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(ckpt_dir, max_to_keep=max_to_keep)


def test_close_is_idempotent(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, _state(seed=1), metadata={"tag": "kept"})
    ckpt.close()  # a second close (after the with block's) is harmless
    with Checkpointer(ckpt_dir) as again:
        assert again.all_steps() == [1]
        assert again.restore_metadata()["tag"] == "kept"


def test_leftover_temporary_directory_is_ignored_and_removed(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, _state(seed=1), metadata={"tag": "good"})
    # What a save of step 2 killed mid-write leaves behind: a half-written
    # temporary directory (here it even holds a commit marker and junk).
    torn = ckpt_dir / f"2{TMP_SUFFIX}"
    (torn / "state").mkdir(parents=True)
    (torn / "state" / "junk").write_bytes(b"\x00" * 16)
    (torn / "commit_success.txt").write_text("not really")
    with Checkpointer(ckpt_dir) as ckpt:
        assert not torn.exists()
        assert ckpt.latest_step() == 1
        restored, metadata = ckpt.restore(_state())
        assert metadata == {"tag": "good"}
        assert_bitwise_equal(restored, _state(seed=1))
        ckpt.save(2, _state(seed=2), metadata={"tag": "new"})
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.restore_metadata() == {"tag": "new"}


_CRASHING_SAVE = textwrap.dedent(
    """
    import os, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from layerfreeze.train.checkpoint import Checkpointer

    directory, crash_at = sys.argv[1:]
    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        # Orbax commits each item ("state", "metadata") and then the step ("2")
        # by renaming its temporary directory; die just before one of them.
        if self.get_final().name == crash_at:
            os._exit(42)
        await commit(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    ckpt = Checkpointer(directory)
    ckpt.save(2, {"w": jnp.full((4,), 2.0)}, metadata={"tag": "torn"})
    sys.exit("unreachable: the save should have killed the process")
    """
)


@pytest.mark.parametrize(
    ("crash_at", "written"),
    [
        ("state", f"state{TMP_SUFFIX}/_METADATA"),
        ("2", "state/commit_success.txt"),
    ],
    ids=["before-item-commit", "before-step-rename"],
)
def test_process_killed_mid_save_keeps_last_good_checkpoint(ckpt_dir, crash_at, written):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, {"w": jnp.full((4,), 1.0)}, metadata={"tag": "good"})
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _CRASHING_SAVE, str(ckpt_dir), crash_at],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 42, proc.stderr
    # Orbax wrote step 2's data under its temporary name and never renamed it.
    torn = ckpt_dir / f"2{TMP_SUFFIX}"
    assert (torn / written).exists()
    assert not (ckpt_dir / "2").exists()

    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.latest_step() == 1
        restored, metadata = ckpt.restore({"w": jnp.zeros(4)})
        assert metadata == {"tag": "good"}
        np.testing.assert_array_equal(restored["w"], np.full((4,), 1.0, np.float32))
        ckpt.save(2, {"w": jnp.full((4,), 3.0)}, metadata={"tag": "retried"})
        restored, metadata = ckpt.restore({"w": jnp.zeros(4)})
    assert metadata == {"tag": "retried"}
    np.testing.assert_array_equal(restored["w"], np.full((4,), 3.0, np.float32))
    assert not torn.exists()


def test_resumed_run_ends_bitwise_identical(ckpt_dir):
    tx = _tx()

    @jax.jit
    def train_step(state):
        rng, noise_rng = jax.random.split(state["rng"])
        grads = jax.tree.map(
            lambda p: jax.random.normal(noise_rng, p.shape, jnp.float32).astype(p.dtype),
            state["params"],
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "rng": rng, "step": state["step"] + 1}

    def init():
        params = _params()
        return {
            "params": params,
            "opt_state": tx.init(params),
            "rng": jax.random.key(0),
            "step": jnp.int32(0),
        }

    uninterrupted = init()
    for _ in range(6):
        uninterrupted = train_step(uninterrupted)

    state = init()
    with Checkpointer(ckpt_dir) as ckpt:
        for _ in range(4):
            state = train_step(state)
            if int(state["step"]) % 2 == 0:
                ckpt.save(int(state["step"]), state, metadata={"phase": 0})
    # The run dies after step 4; a new process resumes from the latest checkpoint.
    with Checkpointer(ckpt_dir) as ckpt:
        state, metadata = ckpt.restore(jax.eval_shape(init))
    assert metadata == {"phase": 0}
    assert int(state["step"]) == 4
    for _ in range(2):
        state = train_step(state)
    assert_bitwise_equal(state, uninterrupted)


def test_restore_arrays_takes_entries_without_a_target(ckpt_dir):
    state = _state()
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(7, state, metadata={})
        got = ckpt.restore_arrays(("params",))
        assert set(got) == {"params"}
        assert_bitwise_equal(got["params"], jax.device_get(state["params"]))
        with pytest.raises(ValueError, match=r"no entries \['nope'\]; it has \["):
            ckpt.restore_arrays(("params", "nope"))


# Damaged checkpoints: files of a finished step truncated, emptied or deleted later.


def _small(seed: int) -> dict:
    # `w` (2 KiB) is over Orbax's 1 KiB limit for values kept inside the OCDBT
    # index, so it has a data file of its own.
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "w": jnp.asarray(rng.standard_normal(512), jnp.float32),
            "b": jnp.full((3,), float(seed)),
        },
        "step": jnp.int32(seed),
    }


def _array_data_file(step_dir: Path) -> Path:
    # The largest file in an OCDBT data directory (`d/`) holds `w`'s bytes.
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _delete(path: Path) -> None:
    path.unlink()


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _nan_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = np.full(2, np.nan, np.float32).tobytes()
    path.write_bytes(bytes(data))


_DAMAGE = {
    "array-data-truncated": (_array_data_file, _truncate),
    "array-data-emptied": (_array_data_file, _empty),
    "array-data-deleted": (_array_data_file, _delete),
    # Same length, other bytes: only the checksums can tell.
    "array-data-bit-flipped": (_array_data_file, _flip_bit),
    "array-data-nan-bytes": (_array_data_file, _nan_bytes),
    "state-METADATA-truncated": (lambda d: d / "state" / "_METADATA", _truncate),
    "state-METADATA-emptied": (lambda d: d / "state" / "_METADATA", _empty),
    "state-METADATA-deleted": (lambda d: d / "state" / "_METADATA", _delete),
    "manifest-truncated": (lambda d: d / "state" / "manifest.ocdbt", _truncate),
    "manifest-deleted": (lambda d: d / "state" / "manifest.ocdbt", _delete),
    "array-metadatas-truncated": (
        lambda d: d / "state" / "array_metadatas" / "process_0",
        _truncate,
    ),
    "json-metadata-truncated": (lambda d: d / "metadata" / "metadata", _truncate),
    "json-metadata-deleted": (lambda d: d / "metadata" / "metadata", _delete),
}


def _damage(step_dir: Path, kind: str) -> None:
    find, act = _DAMAGE[kind]
    path = find(step_dir)
    assert path.is_file(), sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*"))
    act(path)


def _save_10_and_20(ckpt_dir: Path) -> None:
    with Checkpointer(ckpt_dir) as ckpt:
        for step in (10, 20):
            ckpt.save(step, _small(step), metadata={"step": step})


def _listing(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("kind", list(_DAMAGE))
def test_damaged_latest_step_is_moved_aside_and_the_previous_one_restored(ckpt_dir, kind, caplog):
    _save_10_and_20(ckpt_dir)
    _damage(ckpt_dir / "20", kind)
    with Checkpointer(ckpt_dir) as ckpt:
        # Plain reads of the damaged step say so, in one clear error.
        with pytest.raises(CheckpointDamagedError, match=r"step 20 .* is damaged") as info:
            ckpt.restore(_small(0))
        assert info.value.step == 20
        assert info.value.damaged == [(20, info.value.reason)]
        assert "\n" not in info.value.reason
        if kind.startswith("json-metadata"):
            with pytest.raises(CheckpointDamagedError, match="'metadata' item"):
                ckpt.restore_metadata()
            assert set(ckpt.restore_arrays(("params",))) == {"params"}
        else:
            assert ckpt.restore_metadata() == {"step": 20}
            with pytest.raises(CheckpointDamagedError, match=r"step 20 .* is damaged"):
                ckpt.restore_arrays(("params",))

        step, state, metadata, damaged = ckpt.restore_latest_intact(lambda meta: _small(0))
        assert (step, metadata) == (10, {"step": 10})
        assert_bitwise_equal(state, _small(10))
        assert damaged == [(20, info.value.reason)]
        assert ckpt.damaged_directory == ckpt_dir.with_name("ckpt_damaged")
        assert (ckpt.damaged_directory / "20").is_dir()
        assert not (ckpt_dir / "20").exists()
        assert ckpt.all_steps() == [10]
        assert ckpt.latest_step() == 10
        # The run carries on: step 20 is saved again, over nothing.
        ckpt.save(20, _small(21), metadata={"step": 21})
        restored, metadata = ckpt.restore(_small(0))
    assert metadata == {"step": 21}
    assert_bitwise_equal(restored, _small(21))
    assert any(
        r.levelname == "WARNING"
        and "step 20" in r.getMessage()
        and "ckpt_damaged" in r.getMessage()
        for r in caplog.records
    )


def test_every_step_damaged_lists_them_and_where_they_went(ckpt_dir):
    _save_10_and_20(ckpt_dir)
    _damage(ckpt_dir / "20", "array-data-truncated")
    _damage(ckpt_dir / "10", "json-metadata-deleted")
    with Checkpointer(ckpt_dir) as ckpt:
        # A step 20 moved aside by an earlier run is kept: this one gets a suffix.
        (ckpt.damaged_directory / "20").mkdir(parents=True)
        with pytest.raises(CheckpointDamagedError, match="Every checkpoint") as info:
            ckpt.restore_latest_intact(lambda meta: _small(0))
        error = info.value
        assert [s for s, _ in error.damaged] == [20, 10]
        assert error.moved_to == {
            20: ckpt.damaged_directory / "20.1",
            10: ckpt.damaged_directory / "10",
        }
        for step, reason in error.damaged:
            assert f"step {step}: {reason} (moved to {error.moved_to[step]})" in str(error)
            assert error.moved_to[step].is_dir()
        assert ckpt.all_steps() == []
        # The caller may start afresh in the same directory.
        ckpt.save(0, _small(0), metadata={"step": 0})
        assert ckpt.all_steps() == [0]


def test_restore_latest_intact_mismatch_is_not_damage(ckpt_dir):
    _save_10_and_20(ckpt_dir)
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(ValueError, match="does not match the structure"):
            ckpt.restore_latest_intact(lambda meta: {"params": {"w": jnp.zeros(3)}})
        assert ckpt.all_steps() == [10, 20]
    assert not ckpt_dir.with_name("ckpt_damaged").exists()


def test_restore_latest_intact_without_checkpoints(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt, pytest.raises(FileNotFoundError, match="No checkpoint"):
        ckpt.restore_latest_intact(lambda meta: _small(0))


def test_container_mismatch_found_by_orbax_is_a_value_error(ckpt_dir):
    # Same leaf names ("a/0", "a/1"), different containers: only Orbax sees it.
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, {"a": [jnp.ones(2), jnp.zeros(2)]}, metadata={})
        with pytest.raises(ValueError, match="does not match the structure"):
            ckpt.restore({"a": {"0": jnp.ones(2), "1": jnp.zeros(2)}})


@pytest.mark.parametrize("kind", ["array-data-deleted", "state-METADATA-truncated"])
def test_restore_arrays_latest_intact_skips_damage_and_moves_nothing(ckpt_dir, kind):
    _save_10_and_20(ckpt_dir)
    _damage(ckpt_dir / "20", kind)
    before = _listing(ckpt_dir)
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(CheckpointDamagedError, match="step 20"):
            ckpt.restore_arrays(("params",))
        step, arrays, damaged = ckpt.restore_arrays_latest_intact(("params",))
        assert ckpt.all_steps() == [10, 20]
    assert step == 10
    assert [s for s, _ in damaged] == [20]
    assert_bitwise_equal(arrays["params"], jax.device_get(_small(10)["params"]))
    assert _listing(ckpt_dir) == before
    assert not ckpt_dir.with_name("ckpt_damaged").exists()


def test_restore_arrays_latest_intact_all_damaged_or_missing_keys(ckpt_dir):
    _save_10_and_20(ckpt_dir)
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(ValueError, match=r"step 20 .* no entries \['opt_state'\]"):
            ckpt.restore_arrays_latest_intact(("params", "opt_state"))
    for step in ("10", "20"):
        _damage(ckpt_dir / step, "manifest-deleted")
    before = _listing(ckpt_dir)
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(CheckpointDamagedError, match="Every checkpoint") as info:
            ckpt.restore_arrays_latest_intact(("params",))
        assert [s for s, _ in info.value.damaged] == [20, 10]
        assert info.value.moved_to == {}
        assert ckpt.all_steps() == [10, 20]
    assert _listing(ckpt_dir) == before


# The environment: linked steps, no space, no permission.


def test_a_linked_older_step_is_pruned_by_removing_the_link_only(ckpt_dir, tmp_path):
    _save_10_and_20(ckpt_dir)  # max_to_keep=3
    archive = tmp_path / "archive" / "10"
    archive.parent.mkdir()
    (ckpt_dir / "10").rename(archive)
    (ckpt_dir / "10").symlink_to(archive, target_is_directory=True)
    with Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
        assert ckpt.all_steps() == [10, 20]
        np.testing.assert_array_equal(
            ckpt.restore_arrays(("params",), step=10)["params"]["w"], _small(10)["params"]["w"]
        )
        ckpt.save(30, _small(30), metadata={"step": 30})
        assert ckpt.all_steps() == [20, 30]
        ckpt.save(40, _small(40), metadata={"step": 40}, force=True)
    assert not (ckpt_dir / "10").exists() and not (ckpt_dir / "10").is_symlink()
    assert (archive / "state").is_dir()  # what the link pointed to is left alone


def test_a_step_that_does_not_fit_is_refused_before_anything_is_written(ckpt_dir, monkeypatch):
    import shutil as real_shutil

    from layerfreeze.train import checkpoint

    _save_10_and_20(ckpt_dir)
    before = _listing(ckpt_dir)
    usage = real_shutil.disk_usage(ckpt_dir)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(checkpoint.CheckpointWriteError) as info:
            ckpt.save(30, _small(30), metadata={"step": 30})
        assert ckpt.all_steps() == [10, 20]
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert "\n" not in message
    assert (
        f"No space for checkpoint step 30 in {ckpt_dir}: it needs about 2.0 KiB and 1000 B is free"
        in message
    )
    assert "Nothing was written; the newest checkpoint is still step 20." in message
    assert _listing(ckpt_dir) == before


@pytest.mark.parametrize(
    ("code", "strerror"),
    [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")],
)
def test_a_write_that_fails_for_the_environment_keeps_nothing_of_the_step(
    ckpt_dir, monkeypatch, code, strerror
):
    from layerfreeze.train import checkpoint

    _save_10_and_20(ckpt_dir)
    before = _listing(ckpt_dir)
    with Checkpointer(ckpt_dir) as ckpt:

        def failing_save(step, *args, **kwargs):
            # What Orbax leaves and raises when TensorStore's write fails midway.
            (ckpt_dir / f"{step}{TMP_SUFFIX}" / "state").mkdir(parents=True)
            (ckpt_dir / f"{step}{TMP_SUFFIX}" / "state" / "part").write_bytes(b"x" * 10)
            raise ValueError(
                f'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database: Failed '
                f"to write 2048 bytes to file 15: {strerror} [os_error_code='{code}']"
            )

        monkeypatch.setattr(ckpt._manager, "save", failing_save)
        with pytest.raises(checkpoint.CheckpointWriteError) as info:
            ckpt.save(30, _small(30), metadata={"step": 30})
        assert ckpt.all_steps() == [10, 20]
    assert info.value.errno == code
    assert str(info.value) == (
        f"Cannot write checkpoint step 30 in {ckpt_dir}: {strerror}. Nothing of step 30 was "
        "kept; the newest checkpoint is still step 20."
    )
    assert _listing(ckpt_dir) == before  # the partial step is gone, the others untouched


def test_a_failure_that_is_not_the_environment_is_raised_as_it_is(ckpt_dir, monkeypatch):
    with Checkpointer(ckpt_dir) as ckpt:
        monkeypatch.setattr(ckpt._manager, "save", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            ckpt.save(30, _small(30), metadata={"step": 30})


def test_an_unreadable_step_is_not_damage_and_stays_in_place(ckpt_dir, monkeypatch):
    _save_10_and_20(ckpt_dir)
    unreadable = ckpt_dir / "20" / "state" / "_METADATA"
    read_bytes = Path.read_bytes

    def guarded(path):
        if path == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", guarded)
    target = jax.eval_shape(lambda: _small(20))
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(PermissionError) as info:
            ckpt.restore_latest_intact(lambda meta: target)
        assert ckpt.all_steps() == [10, 20]
    assert str(info.value).startswith(
        f"[Errno 13] Cannot read checkpoint step 20 in {ckpt_dir}: Permission denied "
        f"({unreadable}). It is not damaged and was left in place"
    )
    assert not (ckpt_dir.parent / "ckpt_damaged").exists()


def test_checksums_do_not_depend_on_how_a_leaf_is_split(monkeypatch):
    from layerfreeze.train import checkpoint as checkpoint_module

    def checksum(blocks, shape):  # as the shards of a leaf on several processes sum up
        return sum(checkpoint_module._block_sum(b, s, shape) for s, b in blocks) % 2**64

    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    whole = checksum([([0, 0], x)], x.shape)
    quarters = [([a, b], x[a : a + 2, b : b + 3]) for a in (0, 2) for b in (0, 3)]
    assert checksum(quarters, x.shape) == whole
    monkeypatch.setattr(checkpoint_module, "_CHUNK", 5)  # large leaves are hashed in chunks
    assert checksum([([0, 0], x)], x.shape) == whole
    flipped = x.copy()
    flipped.view(np.uint32)[1, 2] ^= 1  # one bit
    swapped = x.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    for changed in (flipped, swapped, x.T.copy().reshape(4, 6)):
        assert checksum([([0, 0], changed)], x.shape) != whole
    for value in (np.float32(1.5), np.bool_(True), np.zeros((0, 3))):  # scalars, empty leaves
        assert checksum([([0] * np.ndim(value), np.asarray(value))], np.shape(value)) >= 0


def test_steps_with_crc32_checksums_are_still_checked(ckpt_dir):
    from layerfreeze.train import checkpoint as checkpoint_module

    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, _small(1), metadata={"step": 1})
    # Rewrite the step's checksums as earlier versions recorded them: CRC-32s.
    path = ckpt_dir / "1" / "metadata" / "metadata"
    stored = json.loads(path.read_text())
    leaves = jax.tree_util.tree_flatten_with_path(_small(1))[0]
    crcs = {checkpoint_module._path_str(p): checkpoint_module._crc32(x) for p, x in leaves}
    assert set(crcs) == set(stored["layerfreeze.checksums"])
    path.write_text(json.dumps({**stored, "layerfreeze.checksums": crcs}))
    with Checkpointer(ckpt_dir) as ckpt:
        assert_bitwise_equal(ckpt.restore(_small(0))[0], _small(1))
        name = sorted(crcs)[0]
        path.write_text(json.dumps({**stored, "layerfreeze.checksums": {**crcs, name: "0" * 8}}))
        with pytest.raises(CheckpointDamagedError, match="checksum mismatch"):
            ckpt.restore(_small(0))


# Steps saved against a source (a Reference): what still equals it is left out.


def _source(shift: float = 0.0) -> dict:
    """What a fine-tuning run started from; `shift` changes the stem (another source)."""
    rng = np.random.default_rng(5)
    return {
        "params": {
            "stem": {"kernel": rng.standard_normal((16, 32)).astype(np.float32) + shift},
            "low": {"kernel": rng.standard_normal(512).astype(np.float32)},
            "head": {"kernel": np.zeros((4, 2), np.float32)},
        },
        "batch_stats": {"stem": {"mean": rng.standard_normal(8).astype(np.float32)}},
    }


def _finetuned(seed: int = 1, *, stem_trained: bool = False) -> TrainState:
    """A state started from `_source()`: `low` frozen in bfloat16, the head trained."""
    source = _source()
    stem = source["params"]["stem"]["kernel"] + (0.5 if stem_trained else 0.0)
    params = {
        "stem": {"kernel": jnp.asarray(stem)},
        "low": {"kernel": jnp.asarray(source["params"]["low"]["kernel"], jnp.bfloat16)},
        "head": {"kernel": jnp.full((4, 2), 0.5 * seed)},
    }
    return TrainState(
        step=jnp.int32(seed),
        params=params,
        batch_stats={"stem": {"mean": jnp.asarray(source["batch_stats"]["stem"]["mean"])}},
        opt_state={"mu": {"head": jnp.full((4, 2), 0.1 * seed)}},
        rng=jax.random.PRNGKey(seed),
    )


LEFT_OUT = ["batch_stats/stem/mean", "params/low/kernel", "params/stem/kernel"]


def _stored_arrays(step_dir: Path) -> list[str]:
    """The arrays a step's OCDBT store holds values of, e.g. `params.head.kernel`."""
    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{step_dir / 'state'}/"}).result()
    return sorted({key.decode().split("/")[0] for key in store.list().result()})


@pytest.fixture(scope="module")
def against_source(tmp_path_factory) -> Path:
    """Step 1 saved against `_source()`; tests read it, or copy it to change it."""
    directory = tmp_path_factory.mktemp("against_source") / "ckpt"
    with Checkpointer(directory, reference=Reference("runs/src (step 400)", _source())) as ckpt:
        ckpt.save(1, _finetuned(1), metadata={"phase": 0})
    return directory


def test_leaves_equal_to_the_source_are_left_out_and_restored_bitwise(against_source, tmp_path):
    assert _stored_arrays(against_source / "1") == [
        "opt_state.mu.head",
        "params.head.kernel",
        "rng",
        "step",
    ]
    stored = json.loads((against_source / "1" / "metadata" / "metadata").read_text())
    record = stored["layerfreeze.source"]
    assert record["name"] == "runs/src (step 400)" and sorted(record["omitted"]) == LEFT_OUT
    assert record["omitted"]["params/low/kernel"]["dtype"] == "bfloat16"
    # Another checkpointer (a resumed run) loads its source again, under any name.
    reference = Reference("moved/src", _source())
    with Checkpointer(against_source, reference=reference) as ckpt:
        for target in (_finetuned(0), jax.eval_shape(lambda: _finetuned(0))):
            restored, metadata = ckpt.restore(target)
            assert metadata == {"phase": 0}
            assert_bitwise_equal(restored, _finetuned(1))
        arrays = ckpt.restore_arrays(("params", "batch_stats"))
    assert_bitwise_equal(arrays["params"], jax.device_get(_finetuned(1).params))
    assert_bitwise_equal(arrays["batch_stats"], jax.device_get(_finetuned(1).batch_stats))

    # A leaf that trains (unfrozen later) no longer equals its source: saved again.
    directory = Path(shutil.copytree(against_source, tmp_path / "ckpt"))
    with Checkpointer(directory, reference=reference) as ckpt:
        ckpt.save(2, _finetuned(2, stem_trained=True), metadata={"phase": 1})
        assert_bitwise_equal(ckpt.restore(_finetuned(0))[0], _finetuned(2, stem_trained=True))
    assert "params.stem.kernel" in _stored_arrays(directory / "2")


def test_a_step_left_out_is_refused_without_its_source_and_never_moved(against_source, caplog):
    with Checkpointer(against_source) as ckpt:
        for read in (
            lambda: ckpt.restore(_finetuned(0)),
            lambda: ckpt.restore_arrays(("params",)),
            lambda: ckpt.restore_latest_intact(lambda meta: _finetuned(0)),
        ):
            with pytest.raises(CheckpointSourceError) as info:
                read()
            message = str(info.value)
            assert "\n" not in message
            assert message.startswith(
                f"Checkpoint step 1 in {against_source} does not store 3 leaves equal to its "
                "source 'runs/src (step 400)', and this Checkpointer was given no reference"
            )
            assert (info.value.step, info.value.recorded, info.value.given) == (
                1,
                "runs/src (step 400)",
                None,
            )
        # What the step holds in full reads without its source.
        assert set(ckpt.restore_arrays(("opt_state",))) == {"opt_state"}
        assert ckpt.all_steps() == [1]
    assert not against_source.with_name("ckpt_damaged").exists()

    other = Reference("runs/other", _source(shift=1.0))
    with Checkpointer(against_source, reference=other) as ckpt:
        with pytest.raises(CheckpointSourceError) as info:
            ckpt.restore(_finetuned(0))
    assert info.value.differ == ["params/stem/kernel"] and info.value.given == "runs/other"
    assert (
        "but the reference given, 'runs/other', differs in content at 1 of them: "
        "params/stem/kernel. Give the source the run started from (its content is checked, "
        "not its name), or strict=False to load the given values anyway."
    ) in str(info.value)

    # strict=False loads the other source's values, and says so.
    with Checkpointer(against_source, reference=other, strict=False) as ckpt:
        restored, _ = ckpt.restore(_finetuned(0))
    np.testing.assert_array_equal(
        restored.params["stem"]["kernel"], other.tree["params"]["stem"]["kernel"]
    )
    assert any(
        r.levelname == "WARNING" and "strict=False" in r.getMessage() for r in caplog.records
    )
    # A source that lacks a leaf cannot fill it, strict or not.
    source = _source()
    del source["batch_stats"]
    with Checkpointer(against_source, reference=Reference("src", source), strict=False) as ckpt:
        with pytest.raises(CheckpointSourceError, match=r"lacks 1: batch_stats/stem/mean"):
            ckpt.restore(_finetuned(0))


def test_a_target_that_does_not_fit_a_leaf_left_out_is_a_clear_mismatch(against_source):
    def low_in_float32(state):
        params = {**state.params, "low": {"kernel": jnp.zeros(512, jnp.float32)}}
        return state.replace(params=params)

    def no_stem(state):
        return state.replace(params={k: v for k, v in state.params.items() if k != "stem"})

    with Checkpointer(against_source, reference=Reference("src", _source())) as ckpt:
        with pytest.raises(ValueError, match=r"params/low/kernel \(checkpoint bfloat16\[512\], "):
            ckpt.restore(low_in_float32(_finetuned(0)))
        with pytest.raises(ValueError, match="in checkpoint but not in target: params/stem/kernel"):
            ckpt.restore(no_stem(_finetuned(0)))


def test_a_step_saved_without_a_reference_is_read_as_before(ckpt_dir):
    # The layout of every step written before references existed, and of one saved
    # without: every leaf stored, no source recorded. Its reader's source is never loaded.
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, _finetuned(1), metadata={})
    stored = json.loads((ckpt_dir / "1" / "metadata" / "metadata").read_text())
    assert set(stored) == {"layerfreeze.checksums"}

    def unused():
        raise AssertionError("the source was loaded")

    with Checkpointer(ckpt_dir, reference=unused) as ckpt:
        assert_bitwise_equal(ckpt.restore(_finetuned(0))[0], _finetuned(1))
        assert_bitwise_equal(
            ckpt.restore_arrays(("params",))["params"], jax.device_get(_finetuned(1).params)
        )
    with pytest.raises(TypeError, match=r"reference must be a checkpoint\.Reference"):
        Checkpointer(ckpt_dir, reference={"params": {}})


def test_damaged_metadata_of_a_step_left_out_refuses_its_arrays(against_source, tmp_path):
    directory = Path(shutil.copytree(against_source, tmp_path / "ckpt"))
    _damage(directory / "1", "json-metadata-truncated")
    with Checkpointer(directory, reference=Reference("src", _source())) as ckpt:
        with pytest.raises(CheckpointDamagedError, match="stores no values for params/low/kernel"):
            ckpt.restore_arrays(("params",))
        assert set(ckpt.restore_arrays(("opt_state",))) == {"opt_state"}  # read unchecked
