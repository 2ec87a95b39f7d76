"""Shared test fixtures."""

import textwrap

import pytest


def _write_plugin_package(root, name: str, module_body: str, *, version: str) -> None:
    """A minimal installable algorithm plugin: package ``<name>_pkg`` whose ``__init__`` is
    ``module_body``, distribution ``<name>-plugin``, entry point ``<name>`` → ``<name>_pkg``."""
    (root / f"{name}_pkg").mkdir(parents=True)
    (root / f"{name}_pkg" / "__init__.py").write_text(textwrap.dedent(module_body))
    (root / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name}-plugin"
        version = "{version}"
        dependencies = []
        [project.entry-points."posttrain.algorithms"]
        {name} = "{name}_pkg"
        [tool.setuptools]
        packages = ["{name}_pkg"]
    """))


@pytest.fixture(scope="session")
def write_plugin_package():
    return _write_plugin_package
