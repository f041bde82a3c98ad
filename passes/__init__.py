"""Compression passes, one per module; `REGISTRY` maps recipe names to pass classes.

Pass modules are discovered, so adding a file here adds a pass to recipes and the CLI.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from fxcook.passbase import Pass

REGISTRY: dict[str, type[Pass]] = {}

for _info in pkgutil.iter_modules(__path__):
    _mod = importlib.import_module(f"{__name__}.{_info.name}")
    for _name, _obj in inspect.getmembers(_mod, inspect.isclass):
        if issubclass(_obj, Pass) and _obj is not Pass and _obj.__module__ == _mod.__name__:
            REGISTRY[_obj.name] = _obj
            globals()[_name] = _obj

__all__ = ["REGISTRY", *sorted(c.__name__ for c in REGISTRY.values())]
