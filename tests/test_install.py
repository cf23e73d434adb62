"""The core installs and imports light: jax, flax, optax, numpy; no training stack."""

import importlib.metadata
import json
import re
import subprocess
import sys

# absl-py is not here: optax itself depends on it.
HEAVY = ("orbax", "tensorstore", "tensorflow_datasets", "tensorflow", "matplotlib",
         "ml_collections", "tqdm", "PIL", "torch")  # fmt: skip


_IMPORTS = """
import json, sys
seen = lambda: sorted({m.split('.')[0] for m in sys.modules})
import layerfreeze
core = seen()
from layerfreeze import models, train
stack = seen()
from layerfreeze.train import checkpoint
print(json.dumps({"core": core, "stack": stack, "checkpoint": seen()}))
"""


def test_the_core_and_the_training_steps_import_nothing_heavy_checkpoints_bring_orbax():
    out = subprocess.run(
        [sys.executable, "-c", _IMPORTS], capture_output=True, text=True, check=True
    )
    imported = {k: set(v) for k, v in json.loads(out.stdout).items()}
    assert not imported["core"] & set(HEAVY), "import layerfreeze"
    assert not imported["stack"] & set(HEAVY), "from layerfreeze import models, train"
    assert {"orbax", "tensorstore"} <= imported["checkpoint"]


def test_installed_core_requires_only_jax_flax_optax_numpy():
    core = set()
    for requirement in importlib.metadata.requires("layerfreeze"):
        if "extra ==" not in requirement:
            core.add(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower())
    assert core == {"jax", "flax", "optax", "numpy"}
    extras = importlib.metadata.metadata("layerfreeze").get_all("Provides-Extra")
    assert {"train", "experiment", "cifar", "test"} <= set(extras)
