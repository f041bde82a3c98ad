"""Prune: structured gates over heads, FFN units and whole sublayers, set by importance (or L0).

The gates keep every shape, so the gated model is the pruned model's exact reference; `Slice` then
makes it physically smaller. The structures and the gates' paths are kept on the model
(`cooked.prune_plan`) for `Slice`, and in `record()` so `fxcook.load` rebuilds them without data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator

from fxcook.errors import NotSupportedYet, PassError, PreconditionError
from fxcook.nn import CookedLinear
from fxcook.passbase import Change, DataPass, PassConfig, PassResult
from fxcook.passes.prune import gates as G
from fxcook.passes.prune.importance import gradient_scores, normalise
from fxcook.passes.prune.l0 import ExpectedSize, HardConcrete, L0Regulariser, Lagrangian, SizeTerm
from fxcook.passes.prune.structure import FFN, Attention, attentions, ffns, structure_from
from fxcook.report import block_weights
from fxcook.tracing import calibration_batches

PLAN = "prune_plan"  # attribute of a CookedModel: {"attentions": [...], "ffns": [...], "gates": {...}}
GRANULARITY = ("heads", "ffn", "hidden", "mha", "ffn_layer")
Granularity = Literal["heads", "ffn", "hidden", "mha", "ffn_layer"]


class PruneConfig(PassConfig):
    method: Literal["importance", "l0"] = "importance"
    target: float = Field(0.5, gt=0.0, lt=1.0)  # fraction of block weights removed
    granularity: tuple[Granularity, ...] = ("heads", "ffn")
    loss: Literal["output", "task"] = "output"
    ffn_score: Literal["taylor", "activation"] = "taylor"
    calib_batches: int = Field(16, gt=0)
    seed: int = 0
    warmup: int = Field(0, ge=0)  # l0: optimizer steps over which the Lagrangian's target ramps up from 0
    lambda_lr: float = Field(0.01, gt=0)  # l0: lr of the Lagrange multipliers (gradient ascent)
    gate_lr: float | None = Field(0.01, gt=0)  # l0: lr of the gates' log_alpha (None: the model's)

    @field_validator("granularity")
    @classmethod
    def _known(cls, v):
        if not v:
            raise ValueError(f"granularity: name at least one of {', '.join(GRANULARITY)}")
        return tuple(dict.fromkeys(v))


@dataclass
class Candidate:
    """One removable structure: a unit of a gate, what it costs in block weights, and its score."""

    gate: str
    index: int
    layer: str  # the attention or FFN it belongs to
    cost: int
    score: float


def head_cost(cooked, a: Attention) -> int:
    """Block weights one KV group holds: its q and k/v rows and its o columns."""
    width = a.head_dim
    q_in = cooked.get_submodule(a.q.path).in_features
    kv_in = cooked.get_submodule(a.k.path).in_features
    return a.group * width * (q_in + cooked.get_submodule(a.o).out_features) + 2 * width * kv_in


def unit_cost(cooked, f: FFN) -> int:
    up = cooked.get_submodule(f.up).in_features
    gate = cooked.get_submodule(f.gate).in_features if f.gate else 0
    return up + gate + cooked.get_submodule(f.down).out_features


class Prune(DataPass):
    """Gate heads / FFN units / sublayers and switch off the least important until `target` is removed."""

    name = "prune"
    Config = PruneConfig

    def record(self) -> dict:
        return self.plan

    # ------------------------------------------------------------------ checks

    def requires(self, cooked) -> None:
        cfg = self.config
        if "hidden" in cfg.granularity:
            raise NotSupportedYet(
                "prune: granularity 'hidden' (hidden-dimension pruning) is not built yet; use heads, ffn, mha, ffn_layer"
            )
        if getattr(cooked, PLAN, None) is not None:
            raise PreconditionError("prune: the model already carries prune gates; run Slice, or prune once")
        for path, mod in cooked.named_modules():
            if isinstance(mod, CookedLinear) and (mod.weight_quant is not None or mod.input_quant is not None):
                raise PreconditionError(
                    f"prune: {path} is already quantized; Prune must run before Quantize (order [Prune, Slice, Quantize])"
                )
        if cfg.method == "importance" and self.calibration is None and not self.restoring:
            raise PreconditionError("prune: method 'importance' needs calibration=<iterable of model inputs>")

    def _structures(self, cooked) -> tuple[list[Attention], list[FFN]]:
        if self.restoring:
            return structure_from(self.restore)
        cfg = self.config
        wants_att = {"heads", "mha"} & set(cfg.granularity)
        wants_ffn = {"ffn", "ffn_layer"} & set(cfg.granularity)
        atts = attentions(cooked) if wants_att else []
        fs = ffns(cooked) if wants_ffn else []
        if wants_att and not atts:
            raise PreconditionError(
                f"prune: granularity {sorted(wants_att)}: the model has no attention in its blocks "
                f"(no scaled_dot_product_attention node in {cooked.sites.blocks or 'any block'})"
            )
        if wants_ffn and not fs:
            raise PreconditionError(
                f"prune: granularity {sorted(wants_ffn)}: the model has no dense FFN (linear -> activation -> linear) "
                "in its blocks"
            )
        for a in atts:
            if "heads" in cfg.granularity and a.kv_heads < 2:
                raise PreconditionError(
                    f"prune: attention at {a.path} has a single key/value head group; heads cannot be pruned "
                    "there (use granularity 'mha')"
                )
        return atts, fs

    # ------------------------------------------------------------------ gates

    def _install(self, cooked, atts: list[Attention], fs: list[FFN]) -> dict:
        kinds, gates = set(self.config.granularity), {}
        for a in atts:
            mine = {}
            if "heads" in kinds:
                gate = G.Gate("heads", a.units, a.group * a.head_dim)
                mine["heads"] = G.install(cooked, "heads", a.o, gate, on_output=False)
            if "mha" in kinds:
                gate = G.Gate("mha", 1, cooked.get_submodule(a.o).out_features)
                mine["mha"] = G.install(cooked, "mha", a.o, gate, on_output=True)
            gates[a.path] = mine
        for f in fs:
            mine = {}
            if "ffn" in kinds:
                mine["ffn"] = G.install(cooked, "ffn", f.down, G.Gate("ffn", f.width, 1), on_output=False)
            if "ffn_layer" in kinds:
                gate = G.Gate("ffn_layer", 1, cooked.get_submodule(f.down).out_features)
                mine["ffn_layer"] = G.install(cooked, "ffn_layer", f.down, gate, on_output=True)
            gates[f.path] = mine
        cooked.recompile()
        return gates

    # ------------------------------------------------------------------ call

    def call(self, cooked) -> PassResult:
        atts, fs = self._structures(cooked)
        gate_paths = self._install(cooked, atts, fs)
        self.plan = {"attentions": [a.as_dict() for a in atts], "ffns": [f.as_dict() for f in fs], "gates": gate_paths}
        cooked.__dict__[PLAN] = self.plan
        if self.config.method == "l0":
            return self.finish(cooked, attach_l0(cooked, self.config, atts, fs, gate_paths))
        if self.restoring:
            return self.finish(cooked, [Change(p, "gates rebuilt") for p in gate_paths])
        candidates = self._candidates(cooked, atts, fs, gate_paths)
        removed = self._remove(cooked, candidates, atts, fs, gate_paths)
        return self.finish(cooked, self._changes(cooked, atts, fs, gate_paths, removed))

    def _candidates(self, cooked, atts, fs, gate_paths) -> dict[str, list[Candidate]]:
        """Removable structures per pool ("attention", "ffn") with normalised scores."""
        cfg = self.config
        module = cooked.get_submodule
        head_gates = {a.path: module(gate_paths[a.path]["heads"]) for a in atts if "heads" in gate_paths[a.path]}
        layer_gates = {a.path: module(gate_paths[a.path]["mha"]) for a in atts if "heads" not in gate_paths[a.path]}
        unit_gates = {
            f.path: (f, module(gate_paths[f.path]["ffn"]) if "ffn" in gate_paths[f.path] else None) for f in fs
        }
        ffn_layers = {f.path: module(gate_paths[f.path]["ffn_layer"]) for f in fs if "ffn" not in gate_paths[f.path]}
        batches = calibration_batches(self.calibration, self.name, cfg.calib_batches)
        probes = {**head_gates, **layer_gates, **{f"{k}#layer": g for k, g in ffn_layers.items()}}
        units = {k: v for k, v in unit_gates.items() if v[1] is not None}
        raw_heads, raw_units = gradient_scores(cooked, probes, units, batches, cfg.loss, cfg.ffn_score, cfg.seed)
        att_scores = normalise({k: v for k, v in raw_heads.items() if not k.endswith("#layer")})
        ffn_scores = {
            **normalise(raw_units),
            **{k.removesuffix("#layer"): v for k, v in raw_heads.items() if k.endswith("#layer")},
        }
        pools: dict[str, list[Candidate]] = {"attention": [], "ffn": []}
        for a in atts:
            kind = "heads" if a.path in head_gates else "mha"
            cost = head_cost(cooked, a) * (1 if kind == "heads" else a.units)
            for i, s in enumerate(att_scores[a.path].tolist()):
                pools["attention"].append(Candidate(gate_paths[a.path][kind], i, a.path, cost, s))
        for f in fs:
            kind = "ffn" if f.path in units else "ffn_layer"
            cost = unit_cost(cooked, f) * (1 if kind == "ffn" else f.width)
            for i, s in enumerate(ffn_scores[f.path].tolist()):
                pools["ffn"].append(Candidate(gate_paths[f.path][kind], i, f.path, cost, s))
        return pools

    def _remove(self, cooked, pools, atts, fs, gate_paths) -> int:
        """Switch off the lowest-scored structures of each pool until each pool gives up its share of the target
        (the same fraction of the weights it holds, so `target` of the block weights goes in all)."""
        cfg, base = self.config, block_weights(cooked)
        held = {k: sum(c.cost for c in pool) for k, pool in pools.items()}
        total = sum(held.values())
        share = cfg.target * base / total if total else float("inf")
        if share >= 1.0:
            raise PreconditionError(
                f"prune: target {cfg.target} of the block weights ({cfg.target * base:,.0f} of {base:,}) is more than "
                f"the gated structures hold ({total:,}); lower target or add granularity"
            )
        units = {layer: 0 for layer in [a.path for a in atts] + [f.path for f in fs]}
        for pool in pools.values():
            for c in pool:
                units[c.layer] += 1
        removed = 0
        for name, pool in pools.items():
            goal, taken = share * held[name], 0
            for c in sorted(pool, key=lambda c: c.score):
                if taken >= goal:
                    break
                if units[c.layer] == 1 and not self._may_empty(name, c.layer, gate_paths):
                    continue
                cooked.get_submodule(c.gate).mask[c.index] = 0.0
                units[c.layer] -= 1
                taken += c.cost
            if taken < goal:
                layer = "mha" if name == "attention" else "ffn_layer"
                raise PassError(
                    f"prune: target {cfg.target} cannot be met without removing whole {name} sublayers "
                    f"(the last structure of each is kept); allow {layer!r} in granularity"
                )
            removed += taken
        for layer, left in units.items():
            if left == 0:  # all structures of a sublayer gone: its layer gate (if any) goes too
                lg = gate_paths[layer].get("mha") or gate_paths[layer].get("ffn_layer")
                if lg:
                    cooked.get_submodule(lg).mask.zero_()
        return removed

    def _may_empty(self, pool: str, layer: str, gate_paths) -> bool:
        return ("mha" if pool == "attention" else "ffn_layer") in gate_paths[layer]

    def _changes(self, cooked, atts, fs, gate_paths, removed) -> list[Change]:
        base = block_weights(cooked)
        out = [
            Change(
                "(model)",
                f"gates remove {removed:,} of {base:,} block weights ({removed / base:.3f}); Slice makes it physical",
            )
        ]
        for layer, mine in gate_paths.items():
            for kind, path in mine.items():
                gate = cooked.get_submodule(path)
                out.append(Change(path, f"{layer}: {kind} {gate.kept()}/{gate.count} kept"))
        return out


INIT_MEAN = {"heads": 10.0, "mha": 10.0, "ffn_layer": 10.0, "ffn": 0.0}  # CoFi's log_alpha init per kind


def attach_l0(cooked, cfg: PruneConfig, atts, fs, gate_paths) -> list[Change]:
    """Give every gate a hard-concrete source and the model an L0 regulariser: the expected block weights
    under the gates (nested: a head counts inside its sublayer) pushed to `1 - target` by a Lagrangian."""
    torch.manual_seed(cfg.seed)
    sources: dict[str, HardConcrete] = {}
    for mine in gate_paths.values():
        for kind, path in mine.items():
            gate = cooked.get_submodule(path)
            gate.source = sources[path] = HardConcrete(gate.count, init_mean=INIT_MEAN[kind])
    terms, gated = [], 0
    for a in atts:
        mine = [sources[gate_paths[a.path][k]] for k in ("heads", "mha") if k in gate_paths[a.path]]
        per = head_cost(cooked, a) * (1 if "heads" in gate_paths[a.path] else a.units)
        terms.append(SizeTerm(per, tuple(mine)))
        gated += head_cost(cooked, a) * a.units
    for f in fs:
        mine = [sources[gate_paths[f.path][k]] for k in ("ffn", "ffn_layer") if k in gate_paths[f.path]]
        per = unit_cost(cooked, f) * (1 if "ffn" in gate_paths[f.path] else f.width)
        terms.append(SizeTerm(per, tuple(mine)))
        gated += unit_cost(cooked, f) * f.width
    base = block_weights(cooked)
    terms.append(SizeTerm(base - gated))  # ungated block weights: always kept
    lagrangian = Lagrangian(cfg.target, warmup_steps=cfg.warmup, lr=cfg.lambda_lr)
    cooked.regularisers.append(L0Regulariser(ExpectedSize(terms, dense=base), lagrangian, gate_lr=cfg.gate_lr))
    what = f"hard-concrete gates, L0 Lagrangian to {cfg.target} of {base:,} block weights (warm-up {cfg.warmup})"
    return [Change(path, what) for path in sources]


def fix_gates(cooked) -> int:
    """Freeze every L0 gate at its deterministic test-time value (training done); returns how many."""
    fixed = 0
    for gate in G.gates(cooked).values():
        if gate.source is not None and not gate.source.final:
            gate.source.fix()
            fixed += 1
    return fixed


def plan_of(cooked) -> dict | None:
    return getattr(cooked, PLAN, None)


def kept_units(values: torch.Tensor) -> list[int]:
    return torch.nonzero(values.detach() != 0).flatten().tolist()
