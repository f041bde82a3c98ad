"""Checks on exported ONNX files: which GEMM weights are 2:4 sparse along their reduction axis, so a
sparse tactic (TensorRT, cuSPARSELt) can use them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fxcook.passes.sparsify.masks import count_24_violations

__all__ = ["GemmWeight", "Sparse24Report", "validate_onnx_24"]

# op type -> index of the weight input; the weight's reduction axis is found per node below.
# (com.microsoft fused forms included: ORT's optimizer rewrites DQ -> MatMul into them.)
_GEMM_WEIGHT_INPUT = {
    "MatMul": 1,
    "Gemm": 1,
    "MatMulInteger": 1,
    "QLinearMatMul": 3,
    "MatMulIntegerToFloat": 1,
    "DynamicQuantizeMatMul": 1,
    "QGemm": 3,
}
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
        lines = [
            "| node | op | weight | K x N | 2:4 groups ok | density | sparse tactic |",
            "|---|---|---|---|---|---|---|",
        ]
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
            GemmWeight(
                node.name or node.output[0],
                node.op_type,
                name,
                tuple(w.shape),
                k,
                n_out,
                groups,
                bad,
                density,
                not reason,
                reason,
            )
        )
    return report
