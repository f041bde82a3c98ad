"""Quantize: int8 (or 2..8-bit) fake quantization of selected linear sites, for PTQ and QAT.

Each selected `CookedLinear` gets a `weight_quant` (per output channel, or per input-column group
for low-bit weight-only) and an `input_quant` (dynamic per token, or static per tensor with a
calibrated scale). Nothing else in the graph changes, so the model trains as is (QAT: STE rounding,
optional learnable LSQ scales) and `fxcook.runtime.onnx.export` lowers the same modules to integer
ONNX. Masks from `Sparsify` are applied before quantization, so pruned weights stay exactly 0.

By default only linears inside transformer blocks are quantized: embeddings, poolers and output
heads are left in float (`select.scope: all` or include patterns change that). HF MoE expert
matmuls (3-D expert weights) are not quantized by this pass yet.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from fxcook.errors import FxcookError, PassError, PreconditionError
from fxcook.nn import CookedLinear
from fxcook.passbase import Change, Pass, PassConfig, PassResult
from fxcook.quant import (OBSERVERS, WeightQuant, act_quantizer, calibrate, parse_acts, parse_weights,
                          smooth_factors)
from fxcook.select import Select
from fxcook.tracing import call_batch

__all__ = ["Quantize", "QuantizeConfig"]


class QuantizeConfig(PassConfig):
    weights: str = "int8/channel"          # int<b>/channel | int<b>/group<g>
    acts: str | None = "int8/token"        # int<b>/token | int<b>/tensor (static) | int8/tensor/dynamic | None
    observer: Literal[OBSERVERS] = "minmax"  # static acts: minmax | percentile | mse
    percentile: float = Field(99.99, gt=0.0, le=100.0)
    learnable_scales: bool = False         # LSQ: weight (and static act) scales become Parameters
    smoothquant: float | None = Field(None, ge=0.0, le=1.0)  # SmoothQuant migration strength alpha
    calib_batches: int = Field(32, gt=0)
    # mixed scheme: the `sensitive_layers` linears whose output error under `acts` is largest on the
    # calibration data (measured per layer) quantize their inputs with `sensitive_acts` instead
    sensitive_layers: int = Field(0, ge=0)
    sensitive_acts: str = "int8/token"
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
        if self.sensitive_layers and self.acts is None:
            raise ValueError("sensitive_layers: needs quantized activations (acts is null)")
        if self.sensitive_layers and not parse_acts(self.sensitive_acts).dynamic:
            raise ValueError(f"sensitive_acts: {self.sensitive_acts!r} must be dynamic (int<b>/token or int8/tensor/dynamic)")
        return self


class Quantize(Pass):
    """Fake-quantize weights and inputs of the selected linears (see module docstring).

    `calibration`: an iterable of model inputs; needed for static (`int8/tensor`) activations, for
    SmoothQuant and for `sensitive_layers`, ignored otherwise.
    """

    name = "quantize"
    Config = QuantizeConfig
    after = ("sparsify",)

    def __init__(self, calibration: Iterable | None = None, **kwargs):
        super().__init__(**kwargs)
        self.calibration = calibration

    def _static(self) -> bool:
        return self.config.acts is not None and not parse_acts(self.config.acts).dynamic

    def _needs_data(self) -> bool:
        return self._static() or self.config.smoothquant is not None or self.config.sensitive_layers > 0

    def requires(self, cooked) -> None:
        if self._needs_data() and self.calibration is None:
            what = ("static activations (int/tensor)" if self._static() else
                    "smoothquant" if self.config.smoothquant is not None else "sensitive_layers")
            raise PreconditionError(f"quantize: {what} need calibration=<iterable of model inputs>")

    def _batches(self) -> list:
        batches = list(itertools.islice(iter(self.calibration), self.config.calib_batches))
        if not batches:
            raise PreconditionError("quantize: calibration got no data (the calibration iterable is empty)")
        return batches

    def call(self, cooked) -> PassResult:
        cfg = self.config
        sites = cfg.select.resolve(cooked)
        linears = {}
        for s in sites:
            mod = cooked.get_submodule(s.path)
            if not isinstance(mod, CookedLinear):
                raise PassError(f"quantize: site {s.path} is a {type(mod).__name__}, not a CookedLinear")
            linears[s.path] = mod
        batches = self._batches() if self.calibration is not None and self._needs_data() else []
        factors = self._smooth(cooked, linears, batches) if cfg.smoothquant is not None else {}
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
            mod.input_quant = None if a is None else act_quantizer(a, cfg.observer, cfg.percentile,
                                                                   cfg.learnable_scales)
            if mod.input_quant is not None:
                mod.input_quant.set_smooth(smooth)
        sensitive = self._sensitive(cooked, linears, batches) if cfg.sensitive_layers else []
        for path in sensitive:
            smooth = linears[path].input_quant.smooth
            linears[path].input_quant = act_quantizer(parse_acts(cfg.sensitive_acts))
            linears[path].input_quant.set_smooth(smooth)
        for path in linears:
            acts = cfg.sensitive_acts + " (sensitive)" if path in sensitive else (cfg.acts or "float")
            changes.append(Change(path, f"weights {cfg.weights}, acts {acts}"
                                        + (f", smoothquant a={cfg.smoothquant}" if path in factors else "")))
        if self._static():
            calibrate(cooked, batches, desc="quantize calibration")
        return PassResult(changes)

    @torch.no_grad()
    def _sensitive(self, cooked, linears: dict[str, CookedLinear], batches: list) -> list[str]:
        """The `sensitive_layers` paths whose input quantization with `acts` moves the model's output
        most: for each linear alone (everything else float), the squared error of the first output
        tensor against the float model, summed over the calibration batches."""
        if self._static():
            calibrate(cooked, batches, desc="quantize calibration")
        stash = {p: (m.weight_quant, m.input_quant) for p, m in linears.items()}
        for m in linears.values():
            m.weight_quant = m.input_quant = None
        err = dict.fromkeys(linears, 0.0)
        try:
            refs = [_first_tensor(call_batch(cooked, b)) for b in batches]
            for path, mod in tqdm(linears.items(), desc="quantize sensitivity", leave=False):
                mod.input_quant = stash[path][1]
                for batch, ref in zip(batches, refs):
                    err[path] += float((_first_tensor(call_batch(cooked, batch)) - ref).float().square().sum())
                mod.input_quant = None
        finally:
            for p, m in linears.items():
                m.weight_quant, m.input_quant = stash[p]
        return sorted(linears, key=err.__getitem__, reverse=True)[:self.config.sensitive_layers]

    @torch.no_grad()
    def _smooth(self, cooked, linears: dict[str, CookedLinear], batches: list) -> dict[str, torch.Tensor]:
        """SmoothQuant: per input channel, move activation range into the weight columns (exact).

        Linears reading the same tensor (q, k, v) share one set of factors, so the exported graph
        scales and quantizes that input once.
        """
        amax: dict[str, torch.Tensor] = {}

        def hook_for(path):
            def hook(_mod, args):
                x = args[0].detach()
                m = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
                amax[path] = m if path not in amax else torch.maximum(amax[path], m)
            return hook

        stash = [(m, m.weight_quant, m.input_quant) for m in linears.values()]
        for m in linears.values():
            m.weight_quant = m.input_quant = None
        hooks = [m.register_forward_pre_hook(hook_for(p)) for p, m in linears.items()]
        try:
            for batch in tqdm(batches, desc="smoothquant calibration", leave=False):
                call_batch(cooked, batch)
        finally:
            for h in hooks:
                h.remove()
            for m, wq, iq in stash:
                m.weight_quant, m.input_quant = wq, iq
        missing = [p for p in linears if p not in amax]
        if missing:
            raise PassError(f"smoothquant calibration never reached {missing[:5]}")
        groups: dict[str, list[str]] = {}
        for path in linears:
            groups.setdefault(_input_of(cooked, path), []).append(path)
        factors = {}
        for paths in groups.values():
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
        for s in self.config.select.resolve(cooked):
            mod = cooked.get_submodule(s.path)
            if not isinstance(mod.weight_quant, WeightQuant):
                raise PassError(f"quantize: {s.path} has no weight quantizer after the pass")


def _input_of(cooked, path: str) -> str:
    """The graph value a linear reads, as `<graph owner>:<node>` (its own path if not unique)."""
    parent, _, name = path.rpartition(".")
    graph = getattr(cooked.get_submodule(parent), "graph", None)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name] if graph is not None else []
    if len(calls) != 1 or not calls[0].args:
        return path
    return f"{parent}:{calls[0].args[0]}"


def _first_tensor(out) -> torch.Tensor:
    """The model's main output: the tensor itself, or the first tensor of a tuple / ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if hasattr(out, "values") else out
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise PassError(f"quantize: sensitive_layers needs a tensor output, the model returned {type(out).__name__}")
