"""Quantize: int8 (or 2..8-bit) fake quantization of selected linear sites, for PTQ and QAT.

Each selected `CookedLinear` gets a `weight_quant` (per output channel, or per input-column group
for low-bit weight-only) and an `input_quant` (dynamic per token, or static per tensor with a
calibrated scale). Nothing else in the graph changes, so the model trains as is (QAT: STE rounding,
optional learnable LSQ scales) and `fxcook.runtime.onnx.export` lowers the same modules to integer
ONNX. Masks from `Sparsify` are applied before quantization, so pruned weights stay exactly 0.

By default only linears inside transformer blocks are quantized: embeddings, poolers and output
heads are left in float (`select.scope: all` or include patterns change that). `embeddings: true`
also stores every embedding table as int8 per row (weight-only, `fxcook.passes.quantize.embeddings`; a table tied to
an output head stays tied).

HF MoE expert matmuls (`expert_bmm` sites: 3-D expert weights read by a grouped GEMM) are quantized
too unless `experts: false`: `fxcook.passes.quantize.experts` inserts quantizer nodes into the experts module's
graph (weights per expert and output channel, the GEMM's token operand with `acts`), selected by
their parameter path with the same include/exclude patterns and scope. SmoothQuant and
`sensitive_inputs` apply to linears only.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from fxcook.errors import FxcookError, PassError, PreconditionError, SelectorError
from fxcook.nn import CookedLinear, swapped_quantizers
from fxcook.passbase import Change, DataPass, PassConfig, PassResult
from fxcook.passes.quantize.embeddings import cook_embeddings
from fxcook.passes.quantize.experts import quantize_experts, select_experts
from fxcook.passes.quantize.quantizers import (
    OBSERVERS,
    WeightQuant,
    act_quantizer,
    calibrate,
    parse_acts,
    parse_weights,
    smooth_factors,
)
from fxcook.select import Select
from fxcook.tracing import calibration_batches, call_batch, main_output, record_inputs

__all__ = ["Quantize", "QuantizeConfig"]


class QuantizeConfig(PassConfig):
    weights: str = "int8/channel"  # int<b>/channel | int<b>/group<g>
    acts: str | None = "int8/token"  # int<b>/token | int<b>/tensor (static) | int8/tensor/dynamic | None
    observer: Literal[OBSERVERS] = "minmax"  # static acts: minmax | percentile | mse
    percentile: float = Field(99.99, gt=0.0, le=100.0)
    learnable_scales: bool = False  # LSQ: weight (and static act) scales become Parameters
    smoothquant: float | None = Field(None, ge=0.0, le=1.0)  # SmoothQuant migration strength alpha
    # FFN down-projections read the activation's output: no op before them can absorb the divisor, so
    # smoothing them costs a full multiply over the widest activation at run time (and on MiniLM it
    # lowered fidelity: ORT min cos 0.9885 with, 0.9889 without); off unless asked for
    smooth_down_proj: bool = False
    calib_batches: int = Field(32, gt=0)
    # mixed scheme: the `sensitive_inputs` linear inputs (q/k/v's shared input counts once) whose
    # quantization with `sensitive_acts` most reduces the quantized model's output error on the
    # calibration data use `sensitive_acts` instead of `acts`
    sensitive_inputs: int = Field(0, ge=0)
    sensitive_acts: str = "int8/token"
    experts: bool = True  # also quantize HF MoE expert matmuls (expert_bmm sites) in the selection
    embeddings: bool = False  # also quantize embedding tables, int<b> per row (weight-only)
    select: Select = Select()

    @model_validator(mode="before")
    @classmethod
    def _flat_select(cls, data):
        """Accept include/exclude/scope at the top level (BMCook's `quantized_module` import)."""
        if isinstance(data, dict) and any(k in data for k in ("include", "exclude", "scope")):
            data = dict(data)
            sel = dict(data.pop("select", {}) or {})
            for k in ("include", "exclude", "scope"):
                if k in data:
                    sel[k] = data.pop(k)
            data["select"] = sel
        return data

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        try:
            parse_weights(v)
        except FxcookError as e:
            raise ValueError(str(e).removeprefix("weights: ")) from None
        return v

    @field_validator("acts", "sensitive_acts")
    @classmethod
    def _acts(cls, v: str | None) -> str | None:
        try:
            if v is not None:
                parse_acts(v)
        except FxcookError as e:
            raise ValueError(str(e).removeprefix("acts: ")) from None
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if parse_weights(self.weights).group_size is not None and self.acts is not None:
            raise ValueError(f"weights: group-wise {self.weights!r} is for weight-only quantization; set acts: null")
        if self.smoothquant is not None and self.acts is None:
            raise ValueError("smoothquant: needs quantized activations (acts is null)")
        if self.sensitive_inputs and self.acts is None:
            raise ValueError("sensitive_inputs: needs quantized activations (acts is null)")
        if self.embeddings and parse_weights(self.weights).group_size is not None:
            raise ValueError(f"embeddings: tables are quantized per row; weights {self.weights!r} is group-wise")
        if self.sensitive_inputs and not parse_acts(self.sensitive_acts).dynamic:
            raise ValueError(
                f"sensitive_acts: {self.sensitive_acts!r} must be dynamic (int<b>/token or int8/tensor/dynamic)"
            )
        return self


class Quantize(DataPass):
    """Fake-quantize weights and inputs of the selected linears (see module docstring).

    `calibration`: an iterable of model inputs; needed for static (`int8/tensor`) activations, for
    SmoothQuant and for `sensitive_inputs`, ignored otherwise. Restored (`fxcook.load`), static
    scales and SmoothQuant divisors are placeholders the saved state replaces, and the sensitive
    inputs are the recorded ones.
    """

    name = "quantize"
    Config = QuantizeConfig
    after = ("sparsify",)
    sensitive: tuple[str, ...] = ()  # the linears switched to sensitive_acts by the last call

    def _static(self) -> bool:
        return self.config.acts is not None and not parse_acts(self.config.acts).dynamic

    def _needs_data(self) -> bool:
        return self._static() or self.config.smoothquant is not None or self.config.sensitive_inputs > 0

    def requires(self, cooked) -> None:
        if self._needs_data() and self.calibration is None and not self.restoring:
            what = (
                "static activations (int/tensor)"
                if self._static()
                else "smoothquant"
                if self.config.smoothquant is not None
                else "sensitive_inputs"
            )
            raise PreconditionError(f"quantize: {what} need calibration=<iterable of model inputs>")

    def _batches(self) -> list:
        batches = list(calibration_batches(self.calibration, self.name, self.config.calib_batches))
        if not batches:
            raise PreconditionError("quantize: calibration got no data (the calibration iterable is empty)")
        return batches

    def _linear_sites(self, cooked, experts: list[str]) -> list:
        """The selected linear sites; none is fine when the selector picks expert matmuls instead."""
        try:
            return self.config.select.resolve(cooked)
        except SelectorError:
            if not experts:
                raise
            return []

    def call(self, cooked) -> PassResult:
        cfg = self.config
        experts = select_experts(cooked, cfg.select) if cfg.experts else []
        linears = {}
        for s in self._linear_sites(cooked, experts):
            mod = cooked.get_submodule(s.path)
            if not isinstance(mod, CookedLinear):
                raise PassError(f"quantize: site {s.path} is a {type(mod).__name__}, not a CookedLinear")
            linears[s.path] = mod
        data = self.calibration is not None and self._needs_data() and not self.restoring
        batches = self._batches() if data else []
        factors = {}
        if cfg.smoothquant is not None:
            down = set() if cfg.smooth_down_proj else {s.info["down"] for s in cooked.sites.find("ffn")}
            smoothed = {p: m for p, m in linears.items() if p not in down}
            factors = (
                {p: torch.ones_like(m.weight[0]).detach() for p, m in smoothed.items()}
                if self.restoring
                else self._smooth(cooked, smoothed, batches)
            )
        w = parse_weights(cfg.weights)
        a = parse_acts(cfg.acts) if cfg.acts else None
        changes = []
        for path, mod in linears.items():
            prev = getattr(mod.input_quant, "smooth", None)
            smooth = prev if path not in factors else (factors[path] if prev is None else prev * factors[path])
            if a is None and smooth is not None:
                raise PassError(f"quantize: {path} carries SmoothQuant factors; its activations must stay quantized")
            weight = mod.weight.detach() if mod.weight_mask is None else (mod.weight * mod.weight_mask).detach()
            mod.weight_quant = WeightQuant(w.bits, w.group_size, cfg.learnable_scales, weight=weight)
            mod.input_quant = (
                None if a is None else act_quantizer(a, cfg.observer, cfg.percentile, cfg.learnable_scales)
            )
            if mod.input_quant is not None:
                mod.input_quant.set_smooth(smooth)
        sensitive = self._sensitive_linears(cooked, linears, batches)
        for path in sensitive:
            linears[path].input_quant = _switched(linears[path].input_quant, parse_acts(cfg.sensitive_acts))
        for path in linears:
            acts = cfg.sensitive_acts + " (sensitive)" if path in sensitive else (cfg.acts or "float")
            changes.append(
                Change(
                    path,
                    f"weights {cfg.weights}, acts {acts}"
                    + (f", smoothquant a={cfg.smoothquant}" if path in factors else ""),
                )
            )
        if cfg.experts:
            for path in quantize_experts(cooked, experts, w, a, cfg.observer, cfg.percentile, cfg.learnable_scales):
                changes.append(Change(path, f"expert weights {cfg.weights}, acts {cfg.acts or 'float'}"))
        if cfg.embeddings:
            for path, emb in cook_embeddings(cooked).items():
                emb.weight_quant = WeightQuant(w.bits, None, cfg.learnable_scales, weight=emb.weight.detach())
                changes.append(Change(path, f"embedding table int{w.bits} per row"))
        if self._static() and not self.restoring:
            calibrate(cooked, batches, desc="quantize calibration")
        return self.finish(cooked, changes)

    def record(self) -> dict:
        return {"sensitive": list(self.sensitive)} if self.config.sensitive_inputs else {}

    def _sensitive_linears(self, cooked, linears: dict[str, CookedLinear], batches: list) -> list[str]:
        """The linears switched to `sensitive_acts`: searched on the data, or as recorded when restored."""
        if not self.config.sensitive_inputs:
            self.sensitive = ()
        elif self.restoring:
            self.sensitive = tuple(self.restore.get("sensitive", ()))
            if unknown := [p for p in self.sensitive if p not in linears]:
                raise PassError(f"quantize: recorded sensitive inputs {unknown[:3]} are not selected linears")
        else:
            self.sensitive = tuple(self._sensitive(cooked, linears, batches))
        return list(self.sensitive)

    @torch.no_grad()
    def _sensitive(self, cooked, linears: dict[str, CookedLinear], batches: list) -> list[str]:
        """The linears of the `sensitive_inputs` inputs whose quantization with `sensitive_acts`
        instead of `acts` most reduces the error of the fully quantized model on the calibration
        data (masked squared error of the first output against the float model).

        Each input is measured inside the quantized model, so errors that only show once every
        layer is quantized are seen. Linears reading one tensor (q, k, v) switch together: the
        exported graph quantizes that tensor once.
        """
        if self._static():
            calibrate(cooked, batches, desc="quantize calibration")
        # the float reference keeps the SmoothQuant divisors
        with swapped_quantizers(linears.values(), lambda m: (None, _SmoothOnly(m.input_quant))):
            refs = [_first_tensor(call_batch(cooked, b)) for b in batches]

        def error() -> float:
            return sum(_masked_sq_error(_first_tensor(call_batch(cooked, b)), r, b) for b, r in zip(batches, refs))

        groups = _input_groups(cooked, linears)
        base, gain = error(), {}
        spec = parse_acts(self.config.sensitive_acts)
        for key, paths in tqdm(groups.items(), desc="quantize sensitivity", leave=False):
            with swapped_quantizers(
                [linears[p] for p in paths], lambda m: (m.weight_quant, _switched(m.input_quant, spec))
            ):
                gain[key] = base - error()
        ranked = [k for k in sorted(gain, key=gain.__getitem__, reverse=True) if gain[k] > 0]
        return [p for k in ranked[: self.config.sensitive_inputs] for p in groups[k]]

    @torch.no_grad()
    def _smooth(self, cooked, linears: dict[str, CookedLinear], batches: list) -> dict[str, torch.Tensor]:
        """SmoothQuant: per input channel, move activation range into the weight columns (exact).

        Linears reading the same tensor (q, k, v) share one set of factors, so the exported graph
        scales and quantizes that input once.
        """
        amax: dict[str, torch.Tensor] = {}

        def record(path, x):
            m = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
            amax[path] = m if path not in amax else torch.maximum(amax[path], m)

        with swapped_quantizers(linears.values(), lambda m: (None, None)):
            record_inputs(cooked, linears, record, batches, "smoothquant calibration")
        factors = {}
        for paths in _input_groups(cooked, linears).values():
            mods = [linears[p] for p in paths]
            prev = getattr(mods[0].input_quant, "smooth", None)
            x_amax = torch.stack([amax[p] for p in paths]).amax(0)
            x_amax = x_amax if prev is None else x_amax / prev  # what the quantizer sees
            f = smooth_factors(x_amax, [m.weight for m in mods], self.config.smoothquant).to(mods[0].weight.dtype)
            for p, m in zip(paths, mods):
                m.weight.mul_(f)  # columns absorb the factors; the input is divided by them
                factors[p] = f
        return factors

    def ensures(self, cooked) -> None:
        experts = select_experts(cooked, self.config.select) if self.config.experts else []
        for s in self._linear_sites(cooked, experts):
            mod = cooked.get_submodule(s.path)
            if not isinstance(mod.weight_quant, WeightQuant):
                raise PassError(f"quantize: {s.path} has no weight quantizer after the pass")


def _input_groups(cooked, paths) -> dict[str, list[str]]:
    """`paths` grouped by the graph value each linear reads (q, k and v share one group)."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        groups.setdefault(_input_of(cooked, path), []).append(path)
    return groups


def _input_of(cooked, path: str) -> str:
    """The graph value a linear reads, as `<graph owner>:<node>` (its own path if not unique)."""
    parent, _, name = path.rpartition(".")
    graph = getattr(cooked.get_submodule(parent), "graph", None)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name] if graph is not None else []
    if len(calls) != 1 or not calls[0].args:
        return path
    return f"{parent}:{calls[0].args[0]}"


class _SmoothOnly(torch.nn.Module):
    """An input quantizer's SmoothQuant division without its rounding: the float model whose weights
    already absorbed the factors."""

    def __init__(self, quant):
        super().__init__()
        self.quant = quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant._pre(x)


def _switched(quant, spec):
    """A fresh quantizer for `spec` that keeps `quant`'s SmoothQuant divisor."""
    new = act_quantizer(spec)
    new.set_smooth(quant.smooth)
    return new


def _masked_sq_error(out: torch.Tensor, ref: torch.Tensor, batch) -> float:
    """Squared error of `out` vs `ref`, over real tokens only when the batch has an attention mask
    shaped like the output's leading dims (padding positions carry no meaning)."""
    err = (out - ref).float().square()
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is not None and tuple(mask.shape) == tuple(err.shape[: mask.dim()]):
        err = err * mask.reshape(*mask.shape, *([1] * (err.dim() - mask.dim()))).to(err.dtype)
    return float(err.sum())


def _first_tensor(out) -> torch.Tensor:
    """`main_output`, which sensitivity measurement cannot do without."""
    main = main_output(out)
    if main is not None:
        return main
    raise PassError(f"quantize: sensitive_inputs needs a tensor output, the model returned {type(out).__name__}")
