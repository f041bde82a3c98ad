"""ONNX translation of `fxcook::moe_ffn` (`fxcook.passes.moefy.ops`) to `com.microsoft.MoE` (float experts)
or `com.microsoft.QMoE` (int8 experts, weight-only).

ORT's MoE applies softmax to `router_probs`, keeps the top-k and renormalises them. The
translation turns fxcook's scores into probabilities that are 0 on the chosen experts and -1e4
elsewhere (so each chosen expert gets weight exactly 1/k) and scales the down-projection weights
by k, which makes ORT compute the plain sum of the chosen experts' outputs, as the module does.
"""

from __future__ import annotations

from typing import Optional

import torch
from onnxscript import FLOAT, UINT8
from onnxscript import opset18 as op

from fxcook.errors import NotSupportedYet
from fxcook.passes.moefy import ops as _moe_ops  # noqa: F401  (registers fxcook::moe_ffn, translated below)
from fxcook.qview import EPS
from fxcook.runtime.onnx.translations import ONNX_TRANSLATIONS, ort_op

ORT_MOE, ORT_QMOE = ort_op("MoE"), ort_op("QMoE")

# fxcook activation name -> ORT MoE activation_type (ORT's gelu is the tanh approximation).
ORT_ACTIVATIONS = {"relu": "relu", "silu": "silu", "gelu_tanh": "gelu"}


def _ort_activation(activation: str, gated: bool) -> dict:
    if gated:
        if activation != "silu":
            raise NotSupportedYet(
                f"ONNX export of a gated MoE FFN with activation {activation!r}: ONNX Runtime's MoE only "
                "has SwiGLU (silu-gated); ReLU-gated experts run in torch only"
            )
        return {"activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0}
    if activation not in ORT_ACTIVATIONS:
        raise NotSupportedYet(
            f"ONNX export of a MoE FFN with activation {activation!r}: ONNX Runtime's MoE supports "
            f"{sorted(ORT_ACTIVATIONS)} (its gelu is the tanh approximation)"
        )
    return {"activation_type": ORT_ACTIVATIONS[activation]}


def _interleave(a, b):
    """Rows of a and b interleaved along axis 1 ([E, m, ...] x2 -> [E, 2m, ...]): ORT's fused SwiGLU."""
    both = op.Concat(op.Unsqueeze(a, [2]), op.Unsqueeze(b, [2]), axis=2)
    shape = op.Concat(op.Shape(a, start=0, end=1), op.Constant(value_ints=[-1]), op.Shape(a, start=2), axis=0)
    return op.Reshape(both, shape)


def _int8_rows(w, row_scale):
    """Symmetric int8 weights (stored with ORT's default zero point 128) from fake-quant floats."""
    q = op.Clip(op.Round(op.Div(w, row_scale)), op.Constant(value_float=-127.0), op.Constant(value_float=127.0))
    return op.Cast(op.Add(q, op.Constant(value_float=128.0)), to=UINT8.dtype)


def _absmax(w, axes: list[int]):
    tiny = op.Constant(value_float=EPS)
    return op.Max(op.Div(op.ReduceMax(op.Abs(w), axes, keepdims=1), op.Constant(value_float=127.0)), tiny)


def moe_ffn_onnx(
    x: FLOAT,
    scores: FLOAT,
    up: FLOAT,
    up_bias: Optional[FLOAT],
    gate: Optional[FLOAT],
    gate_bias: Optional[FLOAT],
    down: FLOAT,
    down_bias: Optional[FLOAT],
    top_k: int,
    activation: str,
    weight_bits: int,
) -> FLOAT:
    """ONNX translation of fxcook::moe_ffn to com.microsoft.MoE / QMoE."""
    gated = gate is not None
    attrs = _ort_activation(activation, gated)
    _, chosen = op.TopK(scores, op.Constant(value_ints=[top_k]), axis=-1)
    probs = op.ScatterElements(
        op.Expand(op.Constant(value_float=-1e4), op.Shape(scores)),
        chosen,
        op.Expand(op.Constant(value_float=0.0), op.Shape(chosen)),
        axis=1,
    )
    k = op.Constant(value_float=float(top_k))
    fc1 = _interleave(gate, up) if gated else up
    fc1_bias = None
    if up_bias is not None or gate_bias is not None:
        zeros_up = op.Mul(op.ReduceSum(up, [2], keepdims=0), op.Constant(value_float=0.0))
        ub = up_bias if up_bias is not None else zeros_up
        fc1_bias = _interleave(gate_bias if gate_bias is not None else zeros_up, ub) if gated else ub
    fc2_bias = None
    if down_bias is not None:
        experts_by_hidden = op.Concat(op.Shape(down, start=0, end=1), op.Shape(down_bias), axis=0)
        fc2_bias = op.Expand(down_bias, experts_by_hidden)
    common = dict(k=top_k, normalize_routing_weights=1, **attrs)
    if weight_bits == 8:
        s1 = _absmax(fc1, [2])  # per expert row = per original output row
        s2 = _absmax(down, [0, 2])  # per output row over all experts' columns
        q1, q2 = _int8_rows(fc1, s1), _int8_rows(down, s2)
        scale1 = op.Squeeze(s1, [2])
        scale2 = op.Mul(op.Expand(op.Squeeze(s2, [2]), op.Shape(down, start=0, end=2)), k)
        return ORT_QMOE(x, probs, q1, scale1, fc1_bias, q2, scale2, fc2_bias, expert_weight_bits=8, **common)
    return ORT_MOE(x, probs, fc1, fc1_bias, op.Mul(down, k), fc2_bias, **common)


ONNX_TRANSLATIONS[torch.ops.fxcook.moe_ffn.default] = moe_ffn_onnx
