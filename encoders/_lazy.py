"""Packages that re-export their submodules' names without importing them up front.

``import encoders`` (or ``indexer``) must stay cheap: every ``matchmap X --help`` imports the package
of X's ``cli.py``, and help has to answer without loading torch, faiss or SQLAlchemy. A package
lists which submodule defines each public name; the submodule is imported on first use of a name
(PEP 562), so ``from encoders import create_model`` works as before.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[list[str], Callable, Callable]:
    """``(__all__, __getattr__, __dir__)`` for ``package``, from ``{submodule: names it defines}``."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return sorted(where), __getattr__, __dir__
