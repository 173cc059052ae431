"""Module-level lazy attribute loading, so importing the package never imports Triton or
compiles anything until an op is actually used."""
from __future__ import annotations

import importlib


def lazy_getattr(package: str, table: dict[str, str]):
    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(table[name], package)
        # A subpackage listed under its own name is returned itself (segformer_fast.ops).
        return module if table[name] == "." + name else getattr(module, name)

    return __getattr__
