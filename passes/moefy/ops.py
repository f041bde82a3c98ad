"""`fxcook::moe_ffn`: the routed-expert FFN as one op (its ONNX translation, to ONNX Runtime's MoE / QMoE:
`fxcook.runtime.onnx.translations.moe`).

The ONNX lowering (`fxcook.runtime.lowering`) swaps each `MoEFFN` for a form that calls this op, so the
exported graph carries the routed FFN as a single node instead of data-dependent per-expert loops.
The CPU/CUDA kernel is the same routed computation the module runs eagerly.
"""

from __future__ import annotations

from typing import Optional

import torch

from fxcook.passes.moefy.routed import routed_ffn


@torch.library.custom_op("fxcook::moe_ffn", mutates_args=())
def moe_ffn(
    x: torch.Tensor,
    scores: torch.Tensor,
    up: torch.Tensor,
    up_bias: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    gate_bias: Optional[torch.Tensor],
    down: torch.Tensor,
    down_bias: Optional[torch.Tensor],
    top_k: int,
    activation: str,
    weight_bits: int,
) -> torch.Tensor:
    """Top-k routed FFN on tokens x [T, d]; up/gate [E, m, d], down [E, d, m] (see fxcook.passes.moefy.routed)."""
    return routed_ffn(x, scores, up, up_bias, gate, gate_bias, down, down_bias, top_k, activation)


@moe_ffn.register_fake
def _(x, scores, up, up_bias, gate, gate_bias, down, down_bias, top_k, activation, weight_bits):
    return x.new_empty(x.shape[0], down.shape[1])
