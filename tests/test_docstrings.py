"""Every docstring example of the library and the experiment runs and prints what it shows."""

import doctest
import importlib
import pathlib
import pkgutil

import pytest

import layerfreeze

SRC = pathlib.Path(layerfreeze.__file__).parent
LIBRARY = sorted(
    name for _, name, _ in pkgutil.walk_packages(layerfreeze.__path__, prefix="layerfreeze.")
)
# The experiment's modules, importable as they are when `experiments/cifar.py` runs.
EXPERIMENT = ["cifar_train", "input_pipeline", "plot"]


def _is_public(name):
    return not any(part.startswith("_") for part in name.split("."))


def test_every_source_file_is_collected():
    files = {
        ".".join(("layerfreeze", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for p in SRC.rglob("*.py")
    }
    assert files - {"layerfreeze"} == set(LIBRARY)


@pytest.mark.parametrize("name", ["layerfreeze", *LIBRARY, *EXPERIMENT])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    if _is_public(name) and name != "cifar_train":
        # A public module shows how it is used.
        assert result.attempted > 0, f"{name} has no docstring example"
