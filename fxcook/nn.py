"""CookedLinear: the one linear site type every pass rewrites.

Capture turns each `nn.Linear` and HF `Conv1D` into a CookedLinear with the canonical `[out, in]`
weight. Passes attach behaviour through three hooks instead of subclassing, so techniques compose
in any order: the effective weight is `weight_quant(weight * weight_mask)` and the input goes
through `input_quant`. A pruned weight is exactly zero before quantization and stays zero after.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


def describe_quant(quant: nn.Module) -> str:
    """A quantizer's scheme (`int8/channel`): its own `describe()`, else its class name."""
    return quant.describe() if callable(getattr(quant, "describe", None)) else type(quant).__name__


class HookedWeight:
    """Size metadata of a module carrying the `weight_mask` / `weight_quant` hooks."""

    weight_mask: torch.Tensor | None
    weight_quant: nn.Module | None
    mask_note: str | None = None  # how the mask was made, e.g. "2:4 mask (wanda)"; set with the mask

    @property
    def bits(self) -> int:
        return int(getattr(self.weight_quant, "bits", 32)) if self.weight_quant is not None else 32

    @property
    def density(self) -> float:
        return 1.0 if self.weight_mask is None else float(self.weight_mask.float().mean())

    def compression(self) -> list[str]:
        """What passes did to this weight, in words: `["int8/channel x int8/token", "2:4 mask (wanda), density
        0.50"]`; empty when nothing was (what `CookedModel.print_graph` shows beside the node)."""
        out = []
        wq, iq = self.weight_quant, getattr(self, "input_quant", None)
        if wq is not None or iq is not None:
            schemes = [describe_quant(wq) if wq is not None else "float"]
            out.append(" x ".join(schemes + ([describe_quant(iq)] if iq is not None else [])))
        if self.weight_mask is not None:
            out.append(f"{self.mask_note or 'mask'}, density {self.density:.2f}")
        return out


class CookedLinear(HookedWeight, nn.Module):
    """`y = linear(input_quant(x), weight_quant(weight * weight_mask), bias)`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"CookedLinear needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        self.register_buffer("weight_mask", None)
        self.weight_quant: nn.Module | None = None
        self.input_quant: nn.Module | None = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def set_mask(self, mask: torch.Tensor | None, note: str | None = None) -> None:
        """Install (or remove) a weight mask as a persistent buffer named `weight_mask`; `note` says how it
        was made (shown by `CookedModel.print_graph`)."""
        if mask is not None and mask.shape != self.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(self.weight.shape)}")
        self.weight_mask = None if mask is None else mask.to(self.weight.dtype)
        self.mask_note = None if mask is None else note

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        if self.weight_mask is not None:
            w = w * self.weight_mask
        if self.weight_quant is not None:
            w = self.weight_quant(w)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.effective_weight(), self.bias)

    def stored_params(self) -> int:
        return self.weight.numel()

    def activated_params(self) -> float:
        """Weight parameters run per token, scaled by bits/32 and density (BMCook's measure)."""
        return self.weight.numel() * self.bits / 32 * self.density

    def describe(self) -> str:
        """`QuantLinear int8/channel x int8/token, 2:4 mask (wanda), density 0.50`; "" if uncompressed."""
        parts = self.compression()
        if not parts:
            return ""
        quantized = self.weight_quant is not None or self.input_quant is not None
        return ("QuantLinear " if quantized else "Linear, ") + ", ".join(parts)

    def extra_repr(self) -> str:
        tags = [f"in={self.in_features}", f"out={self.out_features}", f"bias={self.bias is not None}"]
        if self.weight_mask is not None:
            tags.append(f"density={self.density:.3f}")
        if self.weight_quant is not None:
            tags.append(f"w{self.bits}")
        if self.input_quant is not None:
            tags.append(f"act={type(self.input_quant).__name__}")
        return ", ".join(tags)


@contextlib.contextmanager
def swapped_quantizers(linears: Iterable[CookedLinear], swap: Callable[[CookedLinear], tuple]) -> Iterator[None]:
    """Give each linear the (weight_quant, input_quant) pair `swap` returns for it; restore the old pair on exit.

    Calibration and error measurement run the model with some quantizers off or changed, and must
    leave it exactly as it was even when they fail.
    """
    stash = [(m, m.weight_quant, m.input_quant) for m in linears]
    try:
        for m, wq, iq in stash:
            m.weight_quant, m.input_quant = swap(m)
        yield
    finally:
        for m, wq, iq in stash:
            m.weight_quant, m.input_quant = wq, iq


class CookedEmbedding(HookedWeight, nn.Module):
    """`embedding(ids, weight_quant(weight))`: an embedding table a pass can quantize (weight-only).

    Made from a captured embedding submodule on demand (`fxcook.passes.quantize.embeddings.cook_embeddings`); it keeps
    the original Parameter, so a table tied to an output head stays tied.
    """

    weight_mask = None

    def __init__(self, weight: nn.Parameter, padding_idx: int = -1):
        super().__init__()
        self.weight = weight
        self.padding_idx = padding_idx
        self.weight_quant: nn.Module | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight_quant is None else self.weight_quant(self.weight)
        return torch.ops.aten.embedding(w, ids, self.padding_idx)

    def describe(self) -> str:
        """`QuantEmbedding int8/channel` once a pass quantized the table; "" before."""
        return "" if self.weight_quant is None else f"QuantEmbedding {describe_quant(self.weight_quant)}"

    def extra_repr(self) -> str:
        return f"num={self.weight.shape[0]}, dim={self.weight.shape[1]}" + (
            f", w{self.bits}" if self.weight_quant is not None else ""
        )


class ParamQuant(nn.Module):
    """Base of the quantizers a graph applies to a parameter itself (`get_attr -> call_module`, e.g. HF
    MoE expert weights, which never pass through a CookedLinear): checkpoints store such a parameter as
    the int codes its `quantize(weight) -> (codes, scale)` gives, and lowering swaps it for an export form."""


def param_quants(model: nn.Module) -> dict[str, ParamQuant]:
    """Parameter path -> its ParamQuant, for every parameter quantized in a graph of `model`."""
    out = {}
    for path, mod in model.named_modules():
        graph = getattr(mod, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op != "call_module" or not node.args or getattr(node.args[0], "op", None) != "get_attr":
                continue
            quant = getattr(mod, node.target, None)
            if isinstance(quant, ParamQuant):
                out[f"{path}.{node.args[0].target}" if path else node.args[0].target] = quant
    return out
