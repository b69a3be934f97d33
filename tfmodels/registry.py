"""Model registry: model name -> long-sequence module ("module:Class"), imported lazily.

Adding a method = one new file under ``tfmodels/methods/`` + one line here.
``None`` means no long module (DIN on the short sequence only).
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Type

MODELS: Dict[str, Optional[str]] = {
    "din": None,                                          # B2: short sequence only
    "din_l": "tfmodels.methods.din_long:DinLong",         # B3: DIN over the long sequence
    "avg_pool": "tfmodels.methods.avg_pool:AvgPooling",   # B1: mean of the long sequence
}


class UnknownModelError(KeyError):
    def __str__(self):
        return self.args[0]


def names():
    return sorted(MODELS)


def long_module_class(name: str) -> Optional[Type]:
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; registered: {', '.join(names())}")
    target = MODELS[name]
    if target is None:
        return None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
