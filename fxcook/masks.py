"""Sparsity masks for `[out, in]` weights, and checks that a weight (or an ONNX file) is 2:4.

2:4 groups run along the reduction (input) dimension, the one sparse tensor cores compress. Every
mask function returns a bool tensor shaped like the weight (True = kept) and never changes its
input. `m4n2_2d` solves each 4x4 block exactly over the 90 patterns with two kept per row and per
column (a greedy walk by |w| can end with only 7 kept), so the transposed weight, used by the
weight-gradient GEMM, is 2:4 as well.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

__all__ = [
    "METHODS",
    "nm_mask",
    "m4n2_1d",
    "m4n2_2d",
    "wanda",
    "magnitude",
    "make_mask",
    "is_24",
    "count_24_violations",
    "GemmWeight",
    "Sparse24Report",
    "validate_onnx_24",
]

METHODS = ("m4n2_1d", "m4n2_2d", "wanda", "magnitude")


def _check_2d(weight: torch.Tensor, what: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")


def nm_mask(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the `n` highest scores in every group of `m` consecutive entries of the last dim."""
    if score.shape[-1] % m:
        raise ValueError(f"{n}:{m} sparsity needs the input dim ({score.shape[-1]}) to be a multiple of {m}")
    groups = score.detach().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(score.shape)


def m4n2_1d(weight: torch.Tensor) -> torch.Tensor:
    """2:4 along the input dim: the two largest |w| of each group of 4."""
    _check_2d(weight, "m4n2_1d")
    return nm_mask(weight.detach().abs(), 2, 4)


@lru_cache(maxsize=None)
def _patterns_4x4() -> torch.Tensor:
    """The 90 4x4 0/1 patterns with exactly two ones in every row and every column, as [16, 90]."""
    rows = [r for r in itertools.product((0, 1), repeat=4) if sum(r) == 2]
    pats = [p for p in itertools.product(rows, repeat=4) if all(sum(c) == 2 for c in zip(*p))]
    return torch.tensor(pats, dtype=torch.float64).reshape(len(pats), 16).t().contiguous()


def m4n2_2d(weight: torch.Tensor) -> torch.Tensor:
    """Transposable 2:4: per 4x4 block, the pattern (2 per row and column) maximising sum |w|."""
    _check_2d(weight, "m4n2_2d")
    out_f, in_f = weight.shape
    if out_f % 4 or in_f % 4:
        raise ValueError(f"m4n2_2d needs both weight dims to be multiples of 4, got {tuple(weight.shape)}")
    a = weight.detach().abs().to(torch.float64)
    blocks = a.reshape(out_f // 4, 4, in_f // 4, 4).permute(0, 2, 1, 3).reshape(-1, 16)
    pats = _patterns_4x4().to(a.device)
    best = (blocks @ pats).argmax(dim=1)
    keep = pats.t()[best].bool()
    return keep.reshape(out_f // 4, in_f // 4, 4, 4).permute(0, 2, 1, 3).reshape(out_f, in_f)


def _keep_top(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep the (1 - sparsity) share of highest scores, per output row or over the whole tensor."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    s = score.detach()
    flat = s.reshape(s.shape[0], -1) if per_row else s.reshape(1, -1)
    n_prune = int(round(flat.shape[1] * sparsity))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune:
        keep.scatter_(1, flat.topk(n_prune, dim=1, largest=False).indices, False)
    return keep.reshape(s.shape)


def wanda(weight: torch.Tensor, act_norm: torch.Tensor, pattern: str = "2:4", sparsity: float = 0.5) -> torch.Tensor:
    """Wanda: score |W_ij| * ||X_j||_2 (input-feature norm from calibration); 2:4 or per-row unstructured."""
    _check_2d(weight, "wanda")
    if act_norm.shape != (weight.shape[1],):
        raise ValueError(f"wanda: act_norm shape {tuple(act_norm.shape)} != ({weight.shape[1]},) (the input dim)")
    score = weight.detach().abs().float() * act_norm.detach().float().to(weight.device)[None, :]
    if pattern == "2:4":
        return nm_mask(score, 2, 4)
    return _keep_top(score, sparsity, per_row=True)


def magnitude(weight: torch.Tensor, sparsity: float = 0.5) -> torch.Tensor:
    """Unstructured magnitude pruning: drop the `sparsity` share of smallest |w| in the layer."""
    _check_2d(weight, "magnitude")
    return _keep_top(weight.detach().abs(), sparsity, per_row=False)


def make_mask(
    weight: torch.Tensor,
    method: str,
    pattern: str = "2:4",
    sparsity: float = 0.5,
    act_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch by method name; `pattern` is "2:4" or "unstructured"."""
    if pattern not in ("2:4", "unstructured"):
        raise ValueError(f"pattern must be '2:4' or 'unstructured', got {pattern!r}")
    if method == "wanda":
        if act_norm is None:
            raise ValueError("method 'wanda' needs act_norm (input-activation norms from calibration)")
        return wanda(weight, act_norm, pattern, sparsity)
    if pattern == "unstructured":
        if method != "magnitude":
            raise ValueError(f"method {method!r} is 2:4 only; use 'magnitude' or 'wanda' for unstructured")
        return magnitude(weight, sparsity)
    if method in ("m4n2_1d", "magnitude"):
        return m4n2_1d(weight)
    if method == "m4n2_2d":
        return m4n2_2d(weight)
    raise ValueError(f"unknown mask method {method!r}; choose one of {METHODS}")


def count_24_violations(t: torch.Tensor, dim: int = -1) -> tuple[int, int]:
    """(groups of 4 along `dim` holding more than two nonzeros, total groups)."""
    x = t.detach().movedim(dim, -1)
    if x.shape[-1] % 4:
        raise ValueError(f"2:4 check needs the size of dim {dim} ({x.shape[-1]}) to be a multiple of 4")
    nnz = (x.reshape(-1, 4) != 0).sum(dim=1)
    return int((nnz > 2).sum()), int(nnz.numel())


def is_24(weight_or_mask: torch.Tensor, dim: int = -1) -> bool:
    """True when every group of 4 along `dim` (default: the input dim) has at most two nonzeros."""
    if weight_or_mask.shape[dim] % 4:
        return False
    return count_24_violations(weight_or_mask, dim)[0] == 0


# ---------------------------------------------------------------- ONNX validator

# op type -> index of the weight input; the weight's reduction axis is found per node below.
# (com.microsoft fused forms included: ORT's optimizer rewrites DQ -> MatMul into them.)
_GEMM_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "MatMulInteger": 1, "QLinearMatMul": 3, "MatMulIntegerToFloat": 1,
                      "DynamicQuantizeMatMul": 1, "QGemm": 3}
# nodes a weight may pass through between its initializer and the GEMM, keeping its values' zeros.
_PASS_THROUGH = {"DequantizeLinear", "QuantizeLinear", "Cast", "Identity", "Transpose"}


@dataclass
class GemmWeight:
    """One constant GEMM weight in an ONNX graph, with its 2:4 status along the reduction dim."""

    node: str
    op: str
    initializer: str
    shape: tuple[int, ...]  # as stored in the initializer
    k: int  # reduction size
    n: int  # output features
    groups: int
    bad_groups: int
    density: float
    eligible: bool  # 2:4 along K and shapes a sparse tactic accepts
    reason: str  # why not eligible ("" when eligible)

    @property
    def is_24(self) -> bool:
        return self.groups > 0 and self.bad_groups == 0


@dataclass
class Sparse24Report:
    path: str
    weights: list[GemmWeight] = field(default_factory=list)

    @property
    def eligible(self) -> list[GemmWeight]:
        return [w for w in self.weights if w.eligible]

    def check(self, expect: int | None = None) -> None:
        """Raise ValueError naming the offending weights if fewer than `expect` (default: all) are 2:4."""
        bad = [w for w in self.weights if not w.is_24]
        n_ok = len(self.weights) - len(bad)
        if (expect is None and bad) or (expect is not None and n_ok < expect):
            names = ", ".join(f"{w.node} ({w.initializer}: {w.bad_groups}/{w.groups} groups dense)" for w in bad[:8])
            raise ValueError(f"{self.path}: {n_ok}/{len(self.weights)} GEMM weights are 2:4; not 2:4: {names}")

    def table(self) -> str:
        lines = ["| node | op | weight | K x N | 2:4 groups ok | density | sparse tactic |", "|---|---|---|---|---|---|---|"]
        for w in self.weights:
            tactic = "eligible" if w.eligible else f"dense ({w.reason})"
            ok = f"{w.groups - w.bad_groups}/{w.groups}"
            lines.append(f"| {w.node} | {w.op} | {w.initializer} | {w.k} x {w.n} | {ok} | {w.density:.3f} | {tactic} |")
        return "\n".join(lines)


def _reduction_axis(node) -> int:
    """Which axis of the GEMM's weight input is the reduction axis: MatMul B is [K, N]; Gemm per transB."""
    if node.op_type in ("Gemm", "QGemm"):
        return 1 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 0
    return 0


def validate_onnx_24(model, min_k: int = 16, min_n: int = 16) -> Sparse24Report:
    """Check every constant GEMM weight of an ONNX model (path or ModelProto) for 2:4 along K.

    The weight is traced back from the GEMM through Q/DQ, Cast, Identity and Transpose nodes to its
    initializer; a Transpose swaps which stored axis is the reduction axis. A weight is listed as
    eligible for sparse tactics when it is 2:4 along K and K, N are multiples of `min_k`, `min_n`.
    """
    import onnx
    from onnx import numpy_helper

    path = str(model) if isinstance(model, (str, Path)) else "<ModelProto>"
    proto = onnx.load(str(model), load_external_data=True) if isinstance(model, (str, Path)) else model
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    for n in graph.node:  # Constant nodes hold weights too
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    inits.setdefault(n.output[0], a.t)
    report = Sparse24Report(path)
    for node in graph.node:
        idx = _GEMM_WEIGHT_INPUT.get(node.op_type)
        if idx is None or len(node.input) <= idx:
            continue
        name, k_axis = node.input[idx], _reduction_axis(node)
        while name not in inits and name in producer and producer[name].op_type in _PASS_THROUGH:
            p = producer[name]
            if p.op_type == "Transpose":
                perm = next((list(a.ints) for a in p.attribute if a.name == "perm"), None)
                k_axis = perm[k_axis] if perm else 1 - k_axis
            name = p.input[0]
        if name not in inits:
            continue  # not a constant weight (e.g. attention scores)
        arr = numpy_helper.to_array(inits[name])
        if arr.ndim != 2:
            continue
        w = torch.from_numpy(arr.copy())
        k, n_out = w.shape[k_axis], w.shape[1 - k_axis]
        bad, groups = count_24_violations(w, dim=k_axis) if k % 4 == 0 else (0, 0)
        reason = ""
        if k % 4:
            reason = f"K={k} is not a multiple of 4"
        elif bad:
            reason = f"{bad}/{groups} groups of 4 along K have more than 2 nonzeros"
        elif k % min_k or n_out % min_n:
            reason = f"K={k}, N={n_out} not multiples of {min_k}, {min_n}"
        density = float((w != 0).float().mean())
        report.weights.append(
            GemmWeight(node.name or node.output[0], node.op_type, name, tuple(w.shape), k, n_out, groups, bad, density, not reason, reason)
        )
    return report
