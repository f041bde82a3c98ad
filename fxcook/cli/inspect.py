"""`fxcook inspect`: compressible sites, parameter counts and activated size of a model, or (`--graph`)
its graphs with every compression written beside its node."""

from __future__ import annotations

INSPECT_SENTENCES = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be: that is the question."]


def load_named(name: str):
    from fxcook.models import example_batch, load_model

    model, tok = load_model(name)
    return model, tok, example_batch(tok, INSPECT_SENTENCES)


def load_cooked(name: str):
    """A saved compressed model as it was saved, or a named model freshly captured."""
    from fxcook import capture, load
    from fxcook.artifact import is_artifact

    if is_artifact(name):
        return load(name)
    model, _, batch = load_named(name)
    return capture(model, batch)


def cmd_inspect(args) -> int:
    from fxcook.report import render

    cooked = load_cooked(args.model)
    if args.graph:
        cooked.print_graph()
        return 0
    print(f"model {args.model}: {cooked.origin.cls.rpartition(':')[2]}")
    linears = cooked.sites.find("linear")
    print(
        f"linear layers: {len(linears)} ({sum(1 for s in linears if cooked.sites.block_of(s.path))} in "
        f"{len(cooked.sites.blocks)} blocks)"
    )
    for s in linears:
        w = cooked.get_submodule(s.path).weight
        print(f"  {s.path:56} {tuple(w.shape)!s:14} {w.numel():>10,}")
    ffns = cooked.sites.find("ffn")
    print(f"FFN blocks: {len(ffns)}")
    for s in ffns:
        gate = f" * {s.info['gate']}" if s.info["gate"] else ""
        print(f"  {s.path}: {s.info['up']}{gate} -> {s.info['act_op']} -> {s.info['down']}")
    print(f"transformer blocks: {len(cooked.sites.blocks)}: {', '.join(cooked.sites.blocks)}")
    for kind in ("norm", "activation", "attention_matmul", "expert_bmm"):
        print(f"{kind} sites: {len(cooked.sites.find(kind))}")
    print(render(cooked, per_layer=args.per_layer))
    return 0
