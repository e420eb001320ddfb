"""Submodules as attributes of their package, imported on first use (PEP 562)."""

from __future__ import annotations

import importlib


def submodule_getattr(package: str, names):
    """A module ``__getattr__`` for ``package`` that imports the submodules in ``names``."""
    names = frozenset(names)

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return importlib.import_module(f"{package}.{name}")

    return __getattr__
