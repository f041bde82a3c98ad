"""PyTorch CUDA backend: real int8 GEMMs (`torch._int_mm`) and 2:4 sparse GEMMs (cuSPARSELt, CUTLASS).

`lower(cooked)` replaces each `CookedLinear` by the fastest kernel its weight allows and says, per
layer, why a layer stayed dense. It follows fxcook's canonical int8 scheme: symmetric, zero-point 0,
weights per output channel, activations per token (computed at run time), int32 accumulation and one
rescale (weight scale x activation scale, + bias). Activations follow the model's own scheme
(`fxcook.qview.quant_view`): per token, per tensor with its calibrated scale, or per tensor dynamic
(DynamicQuantizeLinear's uint8 codes, run as int8 with a zero-point correction); layers without
one (int8=True on a float layer, weight-only quantization) quantize them per token. A SmoothQuant divisor on a layer's input quantizer
becomes an `inv_smooth` buffer multiplied into the input (the weight columns already carry the
factors). Everything CUDA-only is imported when used, so this
module imports and plans on a CPU machine (where every 2:4 layer stays dense: no CPU kernel exists).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fxcook.nn import CookedLinear
from fxcook.passes.quantize.quantizers import DynamicTensorQuant
from fxcook.passes.sparsify.masks import count_24_violations
from fxcook.qview import absmax_scale, quant_view

__all__ = [
    "SPARSE_BACKENDS",
    "ActScheme",
    "TOKEN",
    "quantize_rows",
    "int8_linear",
    "Int8Linear",
    "Sparse24Linear",
    "Int8Sparse24Linear",
    "sparse24_reason",
    "int8_reason",
    "LayerPlan",
    "Lowering",
    "lower",
]

SPARSE_BACKENDS = ("cusparselt", "cutlass")
_INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows
_compiled: dict[str, object] = {}


def _fused(name: str, fn, t: torch.Tensor):
    """`fn` compiled by Inductor for CUDA tensors (one fused kernel instead of several passes)."""
    if not t.is_cuda:
        return fn
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[name]


@dataclass(frozen=True)
class ActScheme:
    """How a kernel quantizes its input: "token", "tensor" (static `scale`) or "dynamic" (per tensor)."""

    kind: str = "token"
    scale: torch.Tensor | None = None
    bits: int = 8

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


TOKEN = ActScheme()


def _quantize_rows(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    scale = absmax_scale(x, qmax)
    return torch.round(x / scale).clamp(-qmax, qmax).to(torch.int8), scale


def quantize_rows(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (per token for activations, per output channel for weights): (q, scale[:, 1])."""
    return _fused("quantize_rows", _quantize_rows, x)(x, qmax)


def _quantize_acts(x2: torch.Tensor, acts: ActScheme):
    """(int8 codes, scale [m, 1] or 0-d, zero-point offset or None) of the 2-D input under `acts`; with an
    offset `o`, the integer input is `codes + o` (DynamicQuantizeLinear's uint8 codes minus 128)."""
    if acts.kind == "token":
        return (*quantize_rows(x2, acts.qmax), None)
    x = x2.float()
    if acts.kind == "tensor":
        s = acts.scale.to(x.device)
        return torch.round(x / s).clamp(-acts.qmax, acts.qmax).to(torch.int8), s, None
    s, zp = DynamicTensorQuant.params(x)
    u = torch.clamp(torch.round(x / s) + zp, 0, 255)
    return (u - 128).to(torch.int8), s, (128 - zp).to(torch.int32)


def _offset_acc(acc: torch.Tensor, offset: torch.Tensor | None, wsum: torch.Tensor) -> torch.Tensor:
    """`acc` of (codes + offset) @ wq.T from that of codes @ wq.T, `wsum` the int32 row sums of wq (exact)."""
    return acc if offset is None else acc + offset * wsum


def _row_sums(wq: torch.Tensor) -> torch.Tensor:
    return wq.to(torch.int32).sum(1)


def _rescale(
    acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
):
    y = acc.to(torch.float32) * row_scale * col_scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(dtype)


def _row_rescale(y: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    y = y.to(torch.float32) * row_scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(dtype)


def _pad_rows(t: torch.Tensor, multiple: int, minimum: int = 0) -> torch.Tensor:
    rows = max(t.shape[0], minimum)
    rows += (-rows) % multiple
    return t if rows == t.shape[0] else F.pad(t, (0, 0, 0, rows - t.shape[0]))


def _smoothed(x2: torch.Tensor, inv_smooth: torch.Tensor | None) -> torch.Tensor:
    """The input as the quantizer sees it: divided per channel by the SmoothQuant factors (in fp32)."""
    return x2 if inv_smooth is None else x2.float() * inv_smooth


def _pad_scale(s: torch.Tensor, multiple: int, minimum: int = 0) -> torch.Tensor:
    return _pad_rows(s, multiple, minimum) if s.dim() else s


def int8_linear(
    x: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    inv_smooth: torch.Tensor | None = None,
    acts: ActScheme = TOKEN,
) -> torch.Tensor:
    """`(x * inv_smooth) @ dequant(wq).T + bias` with x quantized as `acts` says, an int8 x int8 -> int32
    GEMM and a fused rescale.

    wq: int8 [N, K]; w_scale: float32 [N]; inv_smooth: float32 [K] or None. Works on CPU too
    (torch._int_mm has a CPU kernel).
    """
    shape, k = x.shape, x.shape[-1]
    x2 = _smoothed(x.reshape(-1, k), inv_smooth)
    m = x2.shape[0]
    xq, xs, offset = _quantize_acts(x2, acts)
    if x.is_cuda:  # cuBLASLt int8: more than 16 rows
        xq, xs = _pad_rows(xq, 8, _INT_MM_MIN_ROWS), _pad_scale(xs, 8, _INT_MM_MIN_ROWS)
    acc = torch._int_mm(xq, wq.t())
    acc = acc if offset is None else _offset_acc(acc, offset, _row_sums(wq))
    y = _fused("rescale", _rescale, acc)(acc, xs, w_scale, bias, out_dtype or x.dtype)
    return y[:m].reshape(*shape[:-1], wq.shape[0])


class Int8Linear(nn.Module):
    """int8 weights (per output channel) and int8 activations (`acts`, per token by default), via torch._int_mm.

    `codes`: the weight's own int8 codes and [out] scales (a quantized layer's view); else `weight` is
    quantized per output channel."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        inv_smooth: torch.Tensor | None = None,
        acts: ActScheme = TOKEN,
        codes: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        wq, ws = codes or _quantize_rows(weight.detach())
        self.acts = acts
        self.register_buffer("wq", wq.contiguous())
        self.register_buffer("w_scale", ws.reshape(-1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("inv_smooth", None if inv_smooth is None else inv_smooth.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.wq, self.w_scale, self.bias, inv_smooth=self.inv_smooth, acts=self.acts)

    def extra_repr(self) -> str:
        return f"in={self.wq.shape[1]}, out={self.wq.shape[0]}, int8, acts={self.acts.kind}"


def _sparse_class(backend: str):
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"unknown 2:4 backend {backend!r}; choose one of {SPARSE_BACKENDS}")
    return SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS


class Sparse24Linear(nn.Module):
    """fp16/bf16 2:4 linear: the weight compressed by `to_sparse_semi_structured` (cuSPARSELt or CUTLASS)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        backend: str = "cusparselt",
        inv_smooth: torch.Tensor | None = None,
    ):
        super().__init__()
        self.backend = backend
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(_sparse_class(backend).from_dense(weight.detach().contiguous()), requires_grad=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("inv_smooth", None if inv_smooth is None else inv_smooth.detach().to(weight.dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        y = F.linear(x.reshape(-1, shape[-1]).contiguous(), self.weight, self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, 2:4 {self.backend}"


class Int8Sparse24Linear(nn.Module):
    """int8 x int8 2:4 GEMM: cuSPARSELt with the weight scale as per-channel alpha, or CUTLASS int32 + rescale."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        backend: str = "cusparselt",
        out_dtype=torch.bfloat16,
        inv_smooth: torch.Tensor | None = None,
        acts: ActScheme = TOKEN,
        codes: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.backend, self.out_dtype, self.acts = backend, out_dtype, acts
        wq, ws = codes or _quantize_rows(weight.detach())
        wq = wq.contiguous()
        self.register_buffer("wsum", _row_sums(wq))
        self.out_features, self.in_features = wq.shape
        self.register_buffer("w_scale", ws.reshape(-1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype).clone())
        self.register_buffer("inv_smooth", None if inv_smooth is None else inv_smooth.detach().float().clone())
        if backend == "cusparselt":
            self.register_buffer("packed", torch._cslt_compress(wq))
            self.register_buffer("meta", None)
        else:
            sp = _sparse_class("cutlass").from_dense(wq)
            self.register_buffer("packed", sp.packed)
            self.register_buffer("meta", sp.meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = _smoothed(x.reshape(-1, shape[-1]), self.inv_smooth)
        m = x2.shape[0]
        xq, xs, offset = _quantize_acts(x2, self.acts)
        xq, xs = _pad_rows(xq, 16), _pad_scale(xs, 16)
        # sparse operand first: [N, K] (2:4) x [K, M] -> [N, M], read back transposed as [M, N]
        if self.backend == "cusparselt":
            # the weight scale is cuSPARSELt's per-row alpha (GEMM epilogue); then * x_scale + bias
            y = torch._cslt_sparse_mm(self.packed, xq.t(), alpha=self.w_scale, out_dtype=self.out_dtype).t()
            if offset is not None:
                y = y.float() + (offset * self.wsum).float() * self.w_scale
            y = _fused("row_rescale", _row_rescale, y)(y, xs, self.bias, self.out_dtype)
        else:
            acc = torch._sparse_semi_structured_mm(self.packed, self.meta, xq.t(), out_dtype=torch.int32).t()
            acc = _offset_acc(acc, offset, self.wsum)
            y = _fused("rescale", _rescale, acc)(acc, xs, self.w_scale, self.bias, self.out_dtype)
        return y[:m].reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 2:4 {self.backend}, acts={self.acts.kind}"


# ---------------------------------------------------------------- eligibility


def _cuda_reason(device) -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if torch.device(device).type != "cuda":
        return f"device {device} is not CUDA"
    return None


def sparse24_reason(weight: torch.Tensor, dtype: torch.dtype, backend: str = "cusparselt", device="cuda") -> str | None:
    """Why `weight` ([out, in]) cannot run as a 2:4 GEMM in `dtype` on `backend`, or None if it can."""
    if weight.shape[1] % 4:
        return f"in_features={weight.shape[1]} is not a multiple of 4"
    bad, groups = count_24_violations(weight)
    if bad:
        return f"not 2:4: {bad}/{groups} groups of 4 along the input dim have more than 2 nonzeros"
    reason = _cuda_reason(device)
    if reason:
        return reason
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"sm_{major}{minor} has no sparse tensor cores (needs sm_80 or newer)"
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt; use backend='cutlass'"
    cons = _sparse_class(backend)._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if cons is None or (dtype == torch.float32 and backend == "cutlass"):
        return f"{backend} 2:4 does not take {dtype} here (use float16, bfloat16 or int8)"
    n, k = weight.shape
    if n < cons.sparse_min_rows or n % cons.sparse_min_rows or k < cons.sparse_min_cols or k % cons.sparse_min_cols:
        return f"shape {n}x{k} must be multiples of {cons.sparse_min_rows}x{cons.sparse_min_cols} for {backend} {dtype}"
    return None


def int8_reason(weight: torch.Tensor) -> str | None:
    """Why `weight` cannot run through torch._int_mm, or None if it can (K and N multiples of 8)."""
    n, k = weight.shape
    if k % 8 or n % 8:
        return f"shape {n}x{k}: torch._int_mm needs in and out features to be multiples of 8"
    return None


# ---------------------------------------------------------------- lowering


@dataclass
class LayerPlan:
    path: str
    kernel: str  # "dense" | "int8" | "2:4" | "int8+2:4"
    reason: str = ""  # why a faster kernel was not used


@dataclass
class Lowering:
    model: nn.Module
    layers: list[LayerPlan] = field(default_factory=list)

    def count(self, kernel: str) -> int:
        return sum(p.kernel == kernel for p in self.layers)

    def table(self) -> str:
        lines = ["| layer | kernel | note |", "|---|---|---|"]
        lines += [f"| {p.path} | {p.kernel} | {p.reason} |" for p in self.layers]
        return "\n".join(lines)


def _plan(mod: CookedLinear, w: torch.Tensor, dtype, device, backend, sparse: bool, int8) -> LayerPlan:
    want_int8 = int8 is True or (int8 == "auto" and mod.weight_quant is not None and mod.bits == 8)
    notes = []
    i8_reason = int8_reason(w) if want_int8 else None
    if want_int8 and i8_reason:
        notes.append(f"int8: {i8_reason}")
    use_int8 = want_int8 and not i8_reason
    kernel_dtype = torch.int8 if use_int8 else dtype
    if not sparse:
        sp_reason = "2:4 lowering switched off"
    elif mod.weight_mask is None:
        sp_reason = "no 2:4 mask"
    else:
        sp_reason = sparse24_reason(w, kernel_dtype, backend, device)
    if sp_reason:
        notes.append(f"2:4: {sp_reason}")
    kernel = {(True, True): "int8+2:4", (True, False): "int8", (False, True): "2:4", (False, False): "dense"}[
        (use_int8, sp_reason is None)
    ]
    return LayerPlan("", kernel, "; ".join(notes))


def lower(
    cooked,
    dtype: torch.dtype = torch.bfloat16,
    device="cuda",
    backend: str = "cusparselt",
    sparse: bool = True,
    int8="auto",
    inplace: bool = False,
) -> Lowering:
    """Move a CookedModel (a copy unless `inplace`) to `device`/`dtype` and swap its CookedLinears
    for int8 / 2:4 kernels, which run the masked, SmoothQuant-scaled weight (`effective_weight()`)
    on the input divided by the layer's SmoothQuant factors.

    int8: "auto" (layers that Quantize made 8-bit), True (every eligible layer) or False. A 2:4 layer
    needs a mask from Sparsify and a weight that passes `sparse24_reason`. Returns the model and a
    per-layer plan naming the kernel and, for each faster kernel not used, the reason.
    """
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"unknown 2:4 backend {backend!r}; choose one of {SPARSE_BACKENDS}")
    if int8 not in (True, False, "auto"):
        raise ValueError(f"int8 must be True, False or 'auto', got {int8!r}")
    model = cooked if inplace else copy.deepcopy(cooked)
    todo = []
    for path, mod in model.named_modules():
        if isinstance(mod, CookedLinear):
            w = mod.effective_weight().detach().float()  # quant(weight * mask)
            plan = _plan(mod, w, dtype, device, backend, sparse, int8)
            plan.path = path
            todo.append((plan, w, *_kernel_inputs(mod)))
    model.to(device=device, dtype=dtype)
    for plan, w, b, inv, acts, codes in todo:
        w, b, inv = (None if t is None else t.to(device) for t in (w, b, inv))
        codes = None if codes is None else tuple(t.to(device) for t in codes)
        if plan.kernel == "int8+2:4":
            new = Int8Sparse24Linear(w, b, backend, out_dtype=dtype, inv_smooth=inv, acts=acts, codes=codes)
        elif plan.kernel == "int8":
            new = Int8Linear(w, b, inv, acts, codes)
        elif plan.kernel == "2:4":
            new = Sparse24Linear(w.to(dtype), None if b is None else b.to(dtype), backend, inv)
        else:
            continue
        model.swap(plan.path, new)
    return Lowering(model, [p for p, *_ in todo])


def _kernel_inputs(mod: CookedLinear):
    """(bias, SmoothQuant inverse, activation scheme, int8 weight codes or None) of a layer, from its quantized view:
    the model's own activation scheme and, for int8 per-channel weights, its own codes and scales."""
    if mod.weight_quant is None:
        smooth = getattr(mod.input_quant, "smooth", None)
        return (
            None if mod.bias is None else mod.bias.detach().float(),
            None if smooth is None else 1.0 / smooth.detach().float(),
            TOKEN,
            None,
        )
    view = quant_view(mod)
    acts = TOKEN if view.act is None else ActScheme(view.act, view.act_scale, view.act_bits)
    codes = (view.codes, view.scale) if view.bits == 8 and view.group is None else None
    return view.bias, view.inv_smooth, acts, codes
