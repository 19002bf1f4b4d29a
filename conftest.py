"""pytest configuration for the docstring examples of the package (``--doctest-modules``)."""

import importlib.util

import pytest


def pytest_collection_modifyitems(config, items):
    """Skip the examples that need an optional dependency when it is missing, like their tests."""
    if importlib.util.find_spec("mudata") is None:
        skip = pytest.mark.skip(reason="optional dependency mudata is not installed")
        for item in items:
            if item.name.endswith("setup_mudata"):
                item.add_marker(skip)
