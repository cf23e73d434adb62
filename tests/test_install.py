"""The core installs and imports light: jax, flax, optax, numpy; no training stack."""

import importlib.metadata
import json
import re
import subprocess
import sys

# absl-py is not here: optax itself depends on it.
HEAVY = ("orbax", "tensorstore", "tensorflow_datasets", "tensorflow", "matplotlib",
         "ml_collections", "tqdm", "PIL", "torch")  # fmt: skip


def _imported_after(statement):
    code = (
        f"import sys, json; {statement}; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_import_layerfreeze_and_its_training_steps_pull_in_nothing_heavy():
    for statement in ("import layerfreeze", "from layerfreeze import models, train"):
        assert not _imported_after(statement) & set(HEAVY), statement


def test_checkpoints_bring_orbax():
    assert {"orbax", "tensorstore"} <= _imported_after("from layerfreeze.train import checkpoint")


def test_installed_core_requires_only_jax_flax_optax_numpy():
    core = set()
    for requirement in importlib.metadata.requires("layerfreeze"):
        if "extra ==" not in requirement:
            core.add(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower())
    assert core == {"jax", "flax", "optax", "numpy"}
    extras = importlib.metadata.metadata("layerfreeze").get_all("Provides-Extra")
    assert {"train", "experiment", "cifar", "test"} <= set(extras)
