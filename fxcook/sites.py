"""The site index: what a pass can target, found once at capture from the flat exported graph.

Kinds: `linear` (CookedLinear leaves, incl. GPT-2 Conv1D), `expert_bmm` (GEMMs on 3-D expert
parameters of HF MoE layers), `norm`, `activation`, `attention_matmul` (GEMMs with no parameter
operand), `ffn` (linear -> activation -> linear, incl. gated variants, found by data flow, so it
works across module boundaries such as BERT's `intermediate`/`output`) and `block` (the repeated
children of a ModuleList that hold linears: the transformer blocks).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fxcook.nn import CookedLinear

aten = torch.ops.aten
ACT_OPS = {
    aten.gelu.default: "gelu",
    aten.relu.default: "relu",
    aten.silu.default: "silu",
    aten.tanh.default: "tanh",
    aten.sigmoid.default: "sigmoid",
    aten.erf.default: "gelu",
    aten.relu_.default: "relu",
    aten.silu_.default: "silu",
    aten.gelu_.default: "gelu",
}
STOP_OPS = {
    aten.matmul.default,
    aten.bmm.default,
    aten.mm.default,
    aten._softmax.default,
    aten.softmax.int,
    aten.scaled_dot_product_attention.default,
    aten.embedding.default,
    aten.layer_norm.default,
}
GELU_TANH_COEF = 0.044715  # the cubic term of tanh-GELU: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))
ATTENTION_OPS = {aten.matmul.default, aten.bmm.default, aten.scaled_dot_product_attention.default}
ACT_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.ReLU6, nn.LeakyReLU)
KINDS = ("linear", "expert_bmm", "norm", "activation", "attention_matmul", "ffn", "block")


@dataclass(frozen=True)
class Site:
    path: str
    kind: str
    info: dict = field(default_factory=dict, compare=False, hash=False)


class SiteIndex:
    """All sites of a captured model, queried by kind and block."""

    def __init__(self, sites: Iterable[Site]):
        sites = list(sites)
        blocks = {s.path for s in sites if s.kind == "block"}
        nested = {b for b in blocks if any(b.startswith(o + ".") for o in blocks)}
        self.sites = [s for s in sites if not (s.kind == "block" and s.path in nested)]
        self.blocks = [s.path for s in self.sites if s.kind == "block"]

    def find(self, kind: str) -> list[Site]:
        if kind not in KINDS:
            raise ValueError(f"unknown site kind {kind!r}; kinds are {', '.join(KINDS)}")
        return [s for s in self.sites if s.kind == kind]

    def block_of(self, path: str) -> str | None:
        return next((b for b in self.blocks if path == b or path.startswith(b + ".")), None)

    def add(self, site: Site) -> None:
        self.sites.append(site)

    def update(self, path: str, kind: str, **info) -> Site:
        """Record what a pass changed at a site: a new Site with `info` merged in replaces it (sites
        are frozen, and a copied model or an earlier query keeps the Site it had)."""
        for i, site in enumerate(self.sites):
            if site.path == path and site.kind == kind:
                self.sites[i] = replace(site, info={**site.info, **info})
                return self.sites[i]
        raise KeyError(f"no {kind} site at {path!r}")

    def remove(self, paths: set[str], kind: str) -> None:
        self.sites = [s for s in self.sites if not (s.kind == kind and s.path in paths)]

    def __len__(self) -> int:
        return len(self.sites)


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _has_gelu_coef(node: torch.fx.Node) -> bool:
    return any(isinstance(a, float) and abs(a - GELU_TANH_COEF) < 1e-6 for a in node.args)


def _is_activation(mod: nn.Module) -> bool:
    return isinstance(mod, ACT_MODULES) or type(mod).__module__ == "transformers.activations"


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    out = []
    for a in node.all_input_nodes:
        if isinstance(a.meta.get("val"), torch.Tensor):
            out.append(a)
    return out


class _FlatGraph:
    """The exported graph with parameter names resolved."""

    def __init__(self, ep: torch.export.ExportedProgram, linear_paths: set[str]):
        sig = ep.graph_signature
        self.params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        self.user_inputs = set(sig.user_inputs)
        self.graph = ep.graph
        self.linears: dict[torch.fx.Node, str] = {}
        for node in self.graph.nodes:
            weight = None
            if node.target == aten.linear.default:
                weight = node.args[1]
            elif node.target == aten.addmm.default:
                weight = node.args[2]
            if isinstance(weight, torch.fx.Node) and weight.name in self.params:
                path = self.params[weight.name].rpartition(".")[0]
                if path in linear_paths:
                    self.linears[node] = path

    def ffn_from(self, down: torch.fx.Node, budget: int = 40) -> dict | None:
        """Walk back from a linear's input to the linears feeding it through an activation."""
        start = down.args[0] if down.target == aten.linear.default else down.args[1]
        stack, seen, reached, acts = [(start, False)], set(), {}, []
        while stack:
            node, saw_act = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if len(seen) > budget:
                return None
            if node in self.linears:
                reached[node] = reached.get(node, False) or saw_act
                continue
            if node.op == "placeholder":
                if node.name in self.user_inputs:
                    return None
                continue
            if node.op != "call_function" or node.target in STOP_OPS:
                return None
            if node.target in ACT_OPS:
                acts.append(node)
                saw_act = True
            stack.extend((a, saw_act) for a in _tensor_inputs(node))
        if not acts:
            return None
        gated = [n for n, a in reached.items() if a]
        plain = [n for n, a in reached.items() if not a]
        act = acts[-1]
        act_op = "gelu" if any(ACT_OPS[a.target] == "gelu" for a in acts) else ACT_OPS[act.target]
        if act_op == "tanh" and any(_has_gelu_coef(n) for n in seen):  # tanh inside the tanh-GELU formula
            act_op = "gelu_tanh"
        if len(reached) == 1 and gated:
            up, gate = gated[0], None
        elif len(gated) == 1 and len(plain) == 1:
            up, gate = plain[0], gated[0]
        else:
            return None
        return {
            "up": self.linears[up],
            "gate": self.linears[gate] if gate is not None else None,
            "act_node": act,
            "act_op": act_op,
            "down": self.linears[down],
        }


def build_sites(ep: torch.export.ExportedProgram, root: nn.Module, model: nn.Module) -> SiteIndex:
    """Index the sites of the captured `root` (the unflattened hierarchy of `ep` from `model`)."""
    captured = dict(root.named_modules())
    sites: list[Site] = []
    linear_paths = {p for p, m in captured.items() if isinstance(m, CookedLinear)}
    sites += [Site(p, "linear") for p in sorted(linear_paths, key=list(captured).index)]
    for path, mod in model.named_modules():
        if path not in captured:
            continue
        name = type(mod).__name__
        if "Norm" in name:
            sites.append(Site(path, "norm", {"type": name}))
        elif _is_activation(mod):
            sites.append(Site(path, "activation", {"type": name}))
        if isinstance(mod, nn.ModuleList):
            for child in mod._modules:
                block = f"{path}.{child}"
                if any(p.startswith(block + ".") for p in linear_paths):
                    sites.append(Site(block, "block"))
    flat = _FlatGraph(ep, linear_paths)
    act_paths = {s.path for s in sites if s.kind == "activation"}
    experts: set[str] = set()
    for node in flat.graph.nodes:
        if node.op != "call_function":
            continue
        params = [a for a in node.all_input_nodes if a.name in flat.params]
        if node.target in ATTENTION_OPS and not params:
            sites.append(Site(_module_path(node), "attention_matmul", {"node": node.name, "op": str(node.target)}))
        three_d = [a for a in params if getattr(a.meta.get("val"), "dim", lambda: 0)() == 3]
        if three_d and flat.params[three_d[0].name] not in experts:
            experts.add(flat.params[three_d[0].name])
            sites.append(Site(flat.params[three_d[0].name], "expert_bmm", {"op": str(node.target)}))
        if node in flat.linears:
            ffn = flat.ffn_from(node)
            if ffn is not None:
                act_path = _module_path(ffn.pop("act_node"))
                ffn["act"] = act_path if act_path in act_paths else None
                sites.append(Site(_common_prefix(ffn["up"], ffn["down"]), "ffn", ffn))
    return SiteIndex(sites)


def _common_prefix(a: str, b: str) -> str:
    pa, pb = a.split("."), b.split(".")
    out = []
    for x, y in zip(pa, pb):
        if x != y:
            break
        out.append(x)
    return ".".join(out)
