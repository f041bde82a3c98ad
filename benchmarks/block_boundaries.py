"""Block boundaries for FSDP2: whole-model capture + unflatten vs per-region capture vs a flat graph.

FSDP2 shards per block through the block's forward hooks, so the captured model must still *call*
each block. Three ways to get a graph, each sharded with `fully_shard` per block (where possible)
and on the root, run on 2 gloo ranks (CPU) over a Llama config:

- unflatten: `torch.export` of the whole model, `torch.export.unflatten` (what fxcook.capture does);
- per-region: the eager model with every block replaced by its own export+unflatten;
- flat: `ExportedProgram.module()` - no block is ever called, so only the root can be sharded.

Measured per rank: persistent parameter bytes (the local shards), peak all-gathered parameter bytes
during forward+backward (parameters that are plain tensors rather than DTensor shards, sampled at
every module call), median step time (forward+backward+AdamW), and the output's max abs difference
from eager. Writes benchmarks/results/block_boundaries.md.

    python benchmarks/block_boundaries.py [--layers 8 --hidden 256 --steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fxcook.tracing import main_output

RESULTS = Path(__file__).parent / "results" / "block_boundaries.md"


def _model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        use_cache=False,
    )
    return LlamaForCausalLM(cfg).eval()


def _inputs(args):
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)}


def build(kind: str, model, x):
    """(module to shard, block modules or [] when blocks are never called)."""
    if kind == "unflatten":
        from fxcook.pipeline import capture

        cooked = capture(model, x)
        return cooked, [cooked.get_submodule(s.path) for s in cooked.sites.find("block")]
    if kind == "per-region":
        import copy

        eager = copy.deepcopy(model)
        seen = {}
        hooks = [
            blk.register_forward_pre_hook(lambda m, a, k, i=i: seen.__setitem__(i, (a, k)), with_kwargs=True)
            for i, blk in enumerate(eager.model.layers)
        ]
        with torch.no_grad():
            eager(**x)
        for h in hooks:
            h.remove()
        for i, blk in enumerate(eager.model.layers):
            a, k = seen[i]
            ep = torch.export.export(blk, a, k, strict=False)
            eager.model.layers[i] = torch.export.unflatten(ep)
        return eager, list(eager.model.layers)
    if kind == "flat":
        ep = torch.export.export(model, (), x, strict=False)
        return ep.module(), []
    raise ValueError(kind)


def _measure(kind: str, args, rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model, x = _model(args), _inputs(args)
    with torch.no_grad():
        ref = main_output(model(**x))
    root, blocks = build(kind, model, x)
    with torch.no_grad():
        diff = float((main_output(root(**x)) - ref).abs().max())
    if world > 1:
        for b in blocks:
            fully_shard(b)
        fully_shard(root)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in root.parameters())
    peak = [0]

    def sample(*_):
        live = sum(
            p.numel() * p.element_size()
            for m in root.modules()
            for p in m._parameters.values()
            if p is not None and not hasattr(p, "to_local")
        )
        peak[0] = max(peak[0], live)

    handles = [m.register_forward_pre_hook(sample) for m in root.modules()]
    handles += [
        m.register_full_backward_pre_hook(lambda m, g: sample()) for m in root.modules() if not list(m.children())
    ]
    opt = torch.optim.AdamW(root.parameters(), lr=1e-4)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = main_output(root(**x)).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    for h in handles:
        h.remove()
    return {
        "kind": kind,
        "local_param_bytes": local,
        "peak_unsharded_param_bytes": peak[0],
        "step_s": statistics.median(times[1:]),
        "max_abs_diff": diff,
        "blocks_sharded": len(blocks),
    }


def _worker(rank: int, world: int, args, tmp: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    rows = [_measure(k, args, rank, world) for k in ("unflatten", "per-region", "flat")]
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, args, tmp), nprocs=2, join=True)
        ranks = [json.load(open(f"{tmp}/rank{r}.json")) for r in range(2)]
    total = sum(p.numel() * p.element_size() for p in _model(args).parameters())
    lines = [
        "# Block boundaries: unflatten vs per-region capture vs flat graph (FSDP2, 2 gloo ranks, CPU)",
        "",
        f"Llama config: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; "
        f"batch {args.batch} x {args.seq} tokens per rank; fp32 parameters total {total / 2**20:.2f} MiB.",
        f"Command: `python benchmarks/block_boundaries.py --layers {args.layers} --hidden {args.hidden} "
        f"--vocab {args.vocab} --steps {args.steps}`",
        "",
        "| capture | blocks sharded | param bytes / rank (MiB) | peak all-gathered params (MiB) | step (s, median) | max abs diff vs eager |",
        "|---|---|---|---|---|---|",
    ]
    for i, kind in enumerate(("unflatten", "per-region", "flat")):
        r0, r1 = ranks[0][i], ranks[1][i]
        lines.append(
            f"| {kind} | {r0['blocks_sharded']} | {r0['local_param_bytes'] / 2**20:.2f} / {r1['local_param_bytes'] / 2**20:.2f} "
            f"| {max(r0['peak_unsharded_param_bytes'], r1['peak_unsharded_param_bytes']) / 2**20:.2f} "
            f"| {max(r0['step_s'], r1['step_s']):.3f} | {r0['max_abs_diff']:.2e} |"
        )
    lines += [
        "",
        "Peak all-gathered parameters are sampled at every module call in forward and backward: "
        "with per-block sharding only the root group (embeddings, final norm, LM head) and the running "
        "block are unsharded at once; the flat graph must all-gather the whole model.",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
