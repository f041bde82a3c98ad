"""Moefy: split each selected FFN into E routed experts that really compute less (MoEfication).

Each FFN site (up -> act -> down, or gated down(act(gate(x)) * up(x))) becomes one
`fxcook.passes.moefy.routed.MoEFFN`: its intermediate neurons are partitioned into E equal groups (balanced
k-means on the L2-normalised rows of the activated projection, or a co-activation graph partition
from calibration data) and the weights are permuted into an expert-major layout, keeping every
value. A router (the ground-truth oracle, or an MLP trained on calibration hidden states) picks
the top-k experts per token and only those run.

The rewrite is visible in the graph, in one of two forms:
  * local (GPT-2, T5, Llama: up/gate/act/down are called from one module's graph): the FFN
    subgraph is replaced by a single `call_module` node to `<owner>.moe`, and the old linears
    and activation are deleted;
  * split (BERT: up+act live in `intermediate`, down in `output`): the `up` linear is swapped
    for the MoEFFN (which returns the whole FFN output) and `act`/`down` for `nn.Identity`,
    after following the intermediate value through the module graphs to prove that nothing but
    act -> down consumes it.

Ordering: after Relufy (MoEfication needs ReLU unless `require_relu=false`), and after Quantize
and Sparsify, whose hooks (`weight_quant`, `weight_mask`, `input_quant`) the experts inherit, except
the down projection's `input_quant`: the expert hidden states stay float, as in every routed runtime.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from fxcook.errors import PassError, PreconditionError, SelectorError
from fxcook.nn import CookedLinear
from fxcook.passbase import Change, DataPass, PassConfig, PassResult
from fxcook.passes.moefy.partition import balanced_kmeans, coactivation_partition
from fxcook.passes.moefy.routed import ACTIVATIONS, MoEFFN
from fxcook.passes.moefy.router import train_router
from fxcook.select import Select
from fxcook.tracing import call_sites, check_calibration, record_inputs

__all__ = ["Moefy"]


class MoefyConfig(PassConfig):
    experts: int = Field(gt=0)
    top_k: int = Field(gt=0)
    method: Literal["kmeans", "coactivation"] = "kmeans"
    router: Literal["oracle", "mlp"] = "mlp"
    select: Select = Field(default_factory=lambda: Select(kind="ffn"))
    require_relu: bool = True  # MoEfication's premise; false allows exact-but-dense-ish splits of GELU/SiLU
    calib_batches: int = Field(16, gt=0)
    max_tokens: int = Field(16384, gt=0)  # calibration tokens kept per FFN for router training
    epochs: int = Field(30, gt=0)
    lr: float = Field(1e-2, gt=0)
    kmeans_iters: int = Field(15, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _k_le_e(self):
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} is larger than experts={self.experts}")
        if self.select.kind != "ffn":
            raise ValueError(f"select.kind must be 'ffn', got {self.select.kind!r}")
        return self


def _join(owner: str, target: str) -> str:
    return f"{owner}.{target}" if owner else target


def _placeholders(mod: nn.Module) -> list[torch.fx.Node]:
    return [n for n in mod.graph.nodes if n.op == "placeholder"]


def _flows_only_to(root: nn.Module, calls, start: str, through: set[str], end: str) -> bool:
    """True if the output of module `start` reaches nothing but `through` modules and then `end`.

    The value is followed across module boundaries: into a callee's placeholder, and out of a
    module's graph into its callers' graphs.
    """
    work = [(c.owner, c.node) for c in calls.get(start, [])]
    seen = set()
    while work:
        owner, node = work.pop()
        if (owner, node) in seen:
            continue
        seen.add((owner, node))
        for user in node.users:
            if user.op == "call_module":
                target = _join(owner, user.target)
                if target == end:
                    continue
                if target in through:
                    work.append((owner, user))
                    continue
                if node in user.kwargs.values() or list(user.args).count(node) != 1:
                    return False
                callee = root.get_submodule(target)
                if not isinstance(getattr(callee, "graph", None), torch.fx.Graph):
                    return False
                work.append((target, _placeholders(callee)[list(user.args).index(node)]))
            elif user.op == "output":
                if user.args[0] is not node or not owner:
                    return False
                work += [(c.owner, c.node) for c in calls.get(owner, [])]
            else:
                return False
    return True


def _local_slice(graph: torch.fx.Graph, calls: dict, owner: str, info: dict):
    """(input node, down call, nodes to remove) if the whole FFN sits in `owner`'s graph, else None."""
    nodes = {}
    for key in ("up", "gate", "down", "act"):
        path = info.get(key)
        if path is None:
            continue
        sites = calls.get(path, [])
        if len(sites) != 1 or sites[0].owner != owner:
            return None
        nodes[key] = sites[0].node
    x = nodes["up"].args[0]
    if "gate" in nodes and nodes["gate"].args[0] is not x:
        return None
    body, stack = set(), [nodes["down"].args[0]]
    while stack:
        n = stack.pop()
        if n is x or n in body or n.op in ("get_attr", "placeholder"):
            if n.op == "placeholder" and n is not x:
                return None
            continue
        body.add(n)
        stack.extend(n.all_input_nodes)
    if not {nodes[k] for k in nodes if k != "down"} <= body:
        return None
    for n in body:
        if any(u not in body and u is not nodes["down"] for u in n.users):
            return None
    return x, nodes["down"], body


class Moefy(DataPass):
    """FFN sites -> `MoEFFN` with `experts` equal experts, `top_k` active per token.

    `calibration` (needed for `router="mlp"` and `method="coactivation"`): an iterable of model
    inputs (dicts of keyword tensors, tuples, or tensors); runtime data, so a constructor argument.
    After the pass, `self.stats[site] = {"recall": ..., ...}` holds each router's held-out recall.
    Restored (`fxcook.load`), the partition is a placeholder and routers are not trained: the saved
    state holds the expert layout (`labels`, `perm`) and router weights; recalls are the recorded ones.
    """

    name = "moefy"
    Config = MoefyConfig
    after = ("relufy", "quantize", "sparsify")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stats: dict[str, dict] = {}

    def _sites(self, cooked):
        if not cooked.sites.find("ffn"):
            raise PreconditionError(
                "moefy: no FFN found in the model (no linear -> activation -> linear chain in the graph)"
            )
        try:
            sites = self.config.select.resolve(cooked)
        except SelectorError as e:
            raise PreconditionError(f"moefy: {e}") from e
        return [s for s in sites if "moe" not in s.info]

    def requires(self, cooked) -> None:
        cfg = self.config
        sites = self._sites(cooked)
        if not sites:
            raise PreconditionError("moefy: every selected FFN site is already routed (Moefy ran before)")
        if (cfg.router == "mlp" or cfg.method == "coactivation") and self.calibration is None and not self.restoring:
            raise PreconditionError(
                f"moefy: router={cfg.router!r} / method={cfg.method!r} needs calibration=<iterable of model inputs>"
            )
        for site in sites:
            info = site.info
            for key in ("up", "gate", "down"):
                if info.get(key) and not isinstance(cooked.get_submodule(info[key]), CookedLinear):
                    raise PreconditionError(f"moefy: FFN {site.path}: {info[key]} is not a CookedLinear")
            width = cooked.get_submodule(info["up"]).out_features
            if width % cfg.experts:
                raise PreconditionError(
                    f"moefy: FFN {site.path} has width {width}, which experts={cfg.experts} does not divide"
                )
            act = info.get("act_op")
            if cfg.require_relu and act != "relu":
                raise PreconditionError(
                    f"moefy: FFN {site.path} uses {act}; MoEfication needs ReLU activations: run Relufy "
                    f"before Moefy (or set require_relu=false for an exact but non-sparse split)"
                )
            if act not in ACTIVATIONS:
                raise PreconditionError(f"moefy: FFN {site.path}: activation {act!r} is not supported")
            if info.get("act") is None:
                raise PreconditionError(f"moefy: FFN {site.path}: its activation is inline, not a module")
        scheduled = [p for st in cooked.mask_schedules for p in st.paths]
        ffn_paths = {s.info[k] for s in sites for k in ("up", "gate", "down") if s.info.get(k)}
        if ffn_paths & set(scheduled):
            raise PreconditionError(
                f"moefy: {sorted(ffn_paths & set(scheduled))[:3]} still have a Sparsify schedule; finish "
                "sparsification (train it out) before Moefy, or exclude the FFNs from the schedule"
            )

    @torch.no_grad()
    def _calibrate(self, cooked, sites) -> dict[str, torch.Tensor]:
        """FFN input hidden states per site (before input quantization), at most max_tokens each."""
        cfg = self.config
        store: dict[str, list[torch.Tensor]] = {s.path: [] for s in sites}
        counts = {s.path: 0 for s in sites}

        def record(path, x):
            if counts[path] < cfg.max_tokens:
                x = x.reshape(-1, x.shape[-1]).float()[: cfg.max_tokens - counts[path]]
                store[path].append(x.cpu())
                counts[path] += x.shape[0]

        check_calibration(self.calibration, self.name)
        ups = {s.path: cooked.get_submodule(s.info["up"]) for s in sites}
        record_inputs(cooked, ups, record, self.calibration, "moefy calibration", cfg.calib_batches, skip_padding=True)
        return {p: torch.cat(xs) for p, xs in store.items()}

    def _labels(self, site, cooked, hidden: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        info = site.info
        activated = cooked.get_submodule(info["gate"] or info["up"])
        if self.restoring:  # any equal partition: the saved labels and expert-major weights replace it
            width = activated.out_features
            return torch.arange(width) // (width // cfg.experts)
        if cfg.method == "kmeans":
            rows = F.normalize(activated.effective_weight().detach().float(), dim=1)
            return balanced_kmeans(rows, cfg.experts, iters=cfg.kmeans_iters, seed=cfg.seed)
        fn = ACTIVATIONS[info["act_op"]]
        h = fn(F.linear(hidden, activated.effective_weight().float(), activated.bias))
        return coactivation_partition(h, cfg.experts, seed=cfg.seed)

    def _build(self, site, cooked, hidden) -> MoEFFN:
        cfg = self.config
        info = site.info
        up, down = cooked.get_submodule(info["up"]), cooked.get_submodule(info["down"])
        gate = cooked.get_submodule(info["gate"]) if info.get("gate") else None
        moe = MoEFFN(
            copy.deepcopy(up),
            copy.deepcopy(down),
            info["act_op"],
            self._labels(site, cooked, hidden),
            cfg.experts,
            cfg.top_k,
            gate=copy.deepcopy(gate),
            router=cfg.router,
        )
        self._check_exact(site, moe, up, gate, down)
        if self.restoring:
            stats = {"recall": self.restore.get("recall", {}).get(site.path, float("nan"))}
        elif cfg.router == "mlp":
            mass = moe.expert_mass(hidden)
            stats = train_router(
                moe.router,
                hidden,
                mass,
                cfg.top_k,
                epochs=cfg.epochs,
                lr=cfg.lr,
                seed=cfg.seed,
                desc=f"router {site.path}",
            )
        else:
            stats = {"recall": 1.0}
        moe.router_recall = stats["recall"]
        self.stats[site.path] = stats
        return moe

    def _check_exact(self, site, moe: MoEFFN, up, gate, down) -> None:
        """With all experts active the MoE must compute the dense FFN (same parameter values)."""
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(8, up.in_features, generator=gen).to(up.weight)
        fn = ACTIVATIONS[moe.act]
        h = fn(gate(x)) * up(x) if gate is not None else fn(up(x))
        want = F.linear(h, down.effective_weight(), down.bias)  # float hidden states, as MoEFFN keeps them
        k = moe.top_k
        moe.top_k = moe.experts
        try:
            got = moe(x)
        finally:
            moe.top_k = k
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.detach().abs().max().clamp_min(1))):
            raise PassError(
                f"moefy: FFN {site.path}: the expert split does not reproduce the FFN "
                f"(max error {float((got - want).abs().max()):.3g})"
            )

    def _install(self, cooked, site, moe: MoEFFN, calls) -> str:
        info = site.info
        owner = info["down"].rpartition(".")[0]  # the module path, for the new module's path
        parent, _ = cooked.parent(info["down"])
        local = (
            _local_slice(parent.graph, calls, owner, info)
            if isinstance(getattr(parent, "graph", None), torch.fx.Graph)
            else None
        )
        if local is not None:
            x, down_call, body = local
            name, i = "moe", 1
            while hasattr(parent, name):
                name, i = f"moe_{i}", i + 1
            parent.add_module(name, moe)
            graph = parent.graph
            graph.owning_module = parent  # as unflatten sets it; recompile rebuilds the GraphModule
            with graph.inserting_before(down_call):
                new = graph.call_module(name, (x,))
            new.meta = dict(down_call.meta)
            down_call.replace_all_uses_with(new)
            graph.erase_node(down_call)
            for n in reversed([n for n in graph.nodes if n in body]):
                graph.erase_node(n)
            for key in ("up", "gate", "act", "down"):
                if info.get(key):
                    delattr(*cooked.parent(info[key]))
            return _join(owner, name)
        if info.get("gate"):
            raise PreconditionError(f"moefy: gated FFN {site.path} spans several modules; not supported")
        if not _flows_only_to(cooked, calls, info["up"], {info["act"]}, info["down"]):
            raise PreconditionError(
                f"moefy: FFN {site.path}: the intermediate values of {info['up']} are used outside "
                f"{info['act']} -> {info['down']}, so the FFN cannot be replaced as a whole"
            )
        cooked.swap(info["up"], moe)
        cooked.swap(info["act"], nn.Identity())
        cooked.swap(info["down"], nn.Identity())
        return info["up"]

    def call(self, cooked) -> PassResult:
        cfg = self.config
        sites = self._sites(cooked)
        need_data = (cfg.router == "mlp" or cfg.method == "coactivation") and not self.restoring
        hidden = self._calibrate(cooked, sites) if need_data else {}
        built = [(s, self._build(s, cooked, hidden.get(s.path))) for s in tqdm(sites, desc="moefy", leave=False)]
        calls = call_sites(cooked)
        changes = []
        for site, moe in built:
            path = self._install(cooked, site, moe, calls)
            info = cooked.sites.update(site.path, "ffn", moe=path).info
            cooked.sites.remove({info[k] for k in ("up", "gate", "down") if info.get(k)}, "linear")
            width = moe.up.weight.shape[0] * moe.up.weight.shape[1]
            changes.append(
                Change(
                    path,
                    (
                        f"FFN {info['up']} -> {info['act_op']} -> {info['down']} as MoEFFN: {cfg.experts} experts of "
                        f"{width // cfg.experts} neurons ({cfg.method}), top-{cfg.top_k}, router {cfg.router} "
                        f"(recall {moe.router_recall:.3f})"
                    ),
                )
            )
        return self.finish(cooked, changes)

    def record(self) -> dict:
        return {"recall": {path: stats["recall"] for path, stats in self.stats.items()}}

    def ensures(self, cooked) -> None:
        for path in self.stats:
            site = next(s for s in cooked.sites.find("ffn") if s.path == path)
            moe = cooked.get_submodule(site.info["moe"])
            if not isinstance(moe, MoEFFN):
                raise PassError(f"moefy: {site.info['moe']} is {type(moe).__name__}, not MoEFFN")
            sizes = torch.bincount(moe.labels, minlength=moe.experts)
            if not bool((sizes == sizes[0]).all()):
                raise PassError(f"moefy: {site.info['moe']} has unequal experts {sizes.tolist()}")
