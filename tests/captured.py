"""Captured tiny models shared by the tests: one capture per family (capture dominates the run time),
handed out as fresh copies, and the masked linears of a model."""

import copy

import fxcook
from fxcook.nn import CookedLinear
from fxcook.testing import tiny_inputs, tiny_model

_CACHE = {}


def captured(family: str):
    """A fresh copy of the captured tiny model of `family`."""
    if family not in _CACHE:
        _CACHE[family] = fxcook.compile(tiny_model(family), [], example_inputs=tiny_inputs(family))
    return copy.deepcopy(_CACHE[family])


def masked_linears(model) -> dict:
    """{path: CookedLinear} for every linear of `model` that carries a weight mask."""
    return {p: m for p, m in model.named_modules() if isinstance(m, CookedLinear) and m.weight_mask is not None}
