"""Every docstring example of the library runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import layerfreeze

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(layerfreeze.__path__, prefix="layerfreeze.")
)


def test_every_module_is_listed():
    assert {"layerfreeze._freeze", "layerfreeze.phases", "layerfreeze.models.resnet"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
