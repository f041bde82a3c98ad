"""Where OpenVINO needs another ONNX form than ONNX Runtime: `fxcook::moe_ffn` as its dense equivalent.

OpenVINO's ONNX frontend reads no routed-expert op (ONNX Runtime's `com.microsoft.MoE` / `QMoE`), and
expressing the routing with its standard ops (a gather of each expert's tokens, per-expert GEMMs,
a scatter back) needs data-dependent shapes per expert, which its CPU plugin runs as a chain of
small dynamic-shape ops. So each routed FFN is lowered to what it computes, densely: every expert's
GEMMs over all tokens, each token keeping the sum over its top-k experts (a one-hot mask). The
values are the routed ones exactly; the cost is E / top_k times the routed FLOPs, and the experts'
weights run as the float values of their (fake-)quantized weights.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from onnxscript import FLOAT
from onnxscript import opset20 as op

from fxcook.passes.moefy import ops as _moe_ops  # noqa: F401  (registers fxcook::moe_ffn, translated below)
from fxcook.runtime.onnx.translations import load_all

__all__ = ["dense_moe_ffn_onnx", "openvino_translations"]


def _activation(pre, activation: str):
    if activation == "relu":
        return op.Relu(pre)
    if activation == "silu":
        return op.Mul(pre, op.Sigmoid(pre))
    return op.Gelu(pre, approximate="tanh" if activation == "gelu_tanh" else "none")


def _expert_gemm(a, w, bias):
    """a [E, T, in] times every expert's w [E, out, in] -> [E, T, out], plus bias [E, out]."""
    y = op.MatMul(a, op.Transpose(w, perm=[0, 2, 1]))
    return y if bias is None else op.Add(y, op.Unsqueeze(bias, op.Constant(value_ints=[1])))


def dense_moe_ffn_onnx(
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
    """fxcook::moe_ffn (x [T, d], up/gate [E, m, d], down [E, d, m]) computed densely, routed values."""
    _, chosen = op.TopK(scores, op.Constant(value_ints=[top_k]), axis=-1)
    zeros = op.Mul(scores, op.Constant(value_float=0.0))
    onehot = op.ScatterElements(zeros, chosen, op.Expand(op.Constant(value_float=1.0), op.Shape(chosen)), axis=1)
    mask = op.Unsqueeze(op.Transpose(onehot, perm=[1, 0]), op.Constant(value_ints=[-1]))  # [E, T, 1]
    # the tokens repeated per expert: the CPU plugin's MatMul does not broadcast a batch of 1 here
    tokens = op.Expand(
        op.Unsqueeze(x, op.Constant(value_ints=[0])), op.Concat(op.Shape(up, start=0, end=1), op.Shape(x), axis=0)
    )
    h = _activation(
        _expert_gemm(tokens, gate if gate is not None else up, gate_bias if gate is not None else up_bias), activation
    )
    if gate is not None:
        h = op.Mul(h, _expert_gemm(tokens, up, up_bias))
    out = op.ReduceSum(
        op.MatMul(op.Mul(h, mask), op.Transpose(down, perm=[0, 2, 1])), op.Constant(value_ints=[0]), keepdims=0
    )
    return out if down_bias is None else op.Add(out, down_bias)


OPENVINO_OVERRIDES = {torch.ops.fxcook.moe_ffn.default: dense_moe_ffn_onnx}


@contextlib.contextmanager
def openvino_translations():
    """fxcook's ONNX translations with OpenVINO's forms in place of ONNX Runtime's, for the block."""
    table = load_all()
    saved = {k: table[k] for k in OPENVINO_OVERRIDES if k in table}
    table.update(OPENVINO_OVERRIDES)
    try:
        yield table
    finally:
        for k in OPENVINO_OVERRIDES:
            table.pop(k, None)
        table.update(saved)
