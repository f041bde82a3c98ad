"""`fxcook adapt` and `adapt()`: the Pruning-Adapter pipeline on a classification task.

    probe      train the new classifier head alone (`probe_steps`), so the task loss means something
    importance head importance I_h = E|dL/dxi_h| with the task loss (fxcook.passes.prune.head_importance)
    prune      Prune(method="importance", granularity=("heads",), loss="task", target) then Slice()
    int8       optionally Quantize (int8 weights and tokens): the adapters then train over an int8 base
    lora       Lora on query/key/value/attention output, rank `high` on the `top_blocks` most important
               blocks and `low` elsewhere (or one uniform `rank`)
    train      only LoRA, norms and the head train (`trainable="lora+norm+classifier.*"`), task loss
    merge      MergeLora folds the adapters into the (re-masked / re-quantized) weights
    export     fxcook.save to OUT/model, ONNX to OUT/model.onnx, OUT/results.json

A front end (like the recipe and the CLI), so it may name techniques; core code never does.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fxcook.cli.args import at_least
from fxcook.errors import FxcookError

ATTENTION = ["query", "key", "value", "attention.output.dense"]  # BERT/MiniLM names; the q, k, v, o
TRAINABLE = "lora+norm+classifier.*"


@dataclass
class AdaptResult:
    task: str
    classes: tuple[str, ...]
    accuracy: float
    trainable_params: int
    total_params: int  # while training (with the adapters)
    inference_params: int  # after the merge (and the slice)
    peak_memory_bytes: int
    memory_measure: str
    heads_pruned: int = 0
    ranks: dict[str, int] = field(default_factory=dict)
    importance: dict[str, list[float]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    balance: dict = field(default_factory=dict)
    artifact: str | None = None
    onnx: str | None = None


def _train_kw(steps: int, batch_size: int, lr: float, seed: int) -> dict:
    return dict(steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.01, warmup=steps // 10, seed=seed)


def _heads(cooked, head_dim: int) -> int:
    """Attention heads left: each query projection's width over the head width, summed over blocks."""
    queries = [s.path for s in cooked.sites.find("linear") if s.path.endswith(".query")]
    return sum(cooked.get_submodule(q).out_features // head_dim for q in queries)


def adapt(
    model: str = "minilm",
    task: str = "genre",
    out: str | Path | None = None,
    *,
    mode: str = "prune_lora",
    target: float = 0.1,
    rank: int = 8,
    high: int = 8,
    low: int = 4,
    top_blocks: int = 2,
    steps: int = 200,
    probe_steps: int = 50,
    batch_size: int = 16,
    lr: float = 5e-4,
    importance_batches: int = 8,
    per_class: int = 400,
    test_per_class: int = 100,
    window: int = 2,
    max_length: int = 64,
    int8: bool = False,
    onnx: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> AdaptResult:
    """Run the pipeline (module docstring) and return its numbers. `mode`: "full" (fine-tune every
    weight), "lora" (uniform `rank`, no pruning) or "prune_lora" (importance-pruned heads, rank-varied)."""
    import fxcook
    from fxcook.models import load_model
    from fxcook.passes import REGISTRY
    from fxcook.passes.lora import adapters
    from fxcook.passes.prune import head_importance
    from fxcook.training.losses import DistillLoss
    from fxcook.training.task import SequenceClassifier, accuracy, model_inputs
    from fxcook.training.taskdata import shakespeare_task

    if mode not in ("full", "lora", "prune_lora"):
        raise FxcookError(f"adapt: mode must be full, lora or prune_lora, got {mode!r}")
    out = Path(out) if out is not None else None
    if out is not None:
        from fxcook.paths import check_out_dir

        check_out_dir(out, "adapt out")
    torch.manual_seed(seed)
    encoder, tokenizer = load_model(model)
    data = shakespeare_task(task, tokenizer, per_class, test_per_class, window, max_length, seed)
    example = model_inputs(data.train.batch(range(2)))
    head_dim = encoder.config.hidden_size // encoder.config.num_attention_heads
    cooked = fxcook.compile(SequenceClassifier(encoder, len(data.classes)), [], example)
    loss = DistillLoss(task=1.0)
    kw = dict(progress=progress)
    if probe_steps:
        fxcook.train(
            cooked,
            None,
            data.train,
            loss,
            trainable="classifier.*",
            **_train_kw(probe_steps, batch_size, 1e-2, seed),
            **kw,
        )
    calib = [data.train.batch(range(i * batch_size, (i + 1) * batch_size)) for i in range(importance_batches)]
    importance = head_importance(cooked, calib, loss="task", seed=seed)
    heads_before = _heads(cooked, head_dim)
    passes = []
    if mode == "prune_lora":
        passes += [
            REGISTRY["prune"](
                method="importance", granularity=("heads",), loss="task", target=target, calibration=calib
            ),
            REGISTRY["slice"](),
        ]
    if int8:
        passes.append(REGISTRY["quantize"]())
    if mode != "full":
        ranks = (
            {"by": "importance", "high": high, "low": low, "top_blocks": top_blocks} if mode == "prune_lora" else None
        )
        passes.append(REGISTRY["lora"](select={"include": ATTENTION}, rank=rank, ranks=ranks, importance=importance))
    fxcook.apply(cooked, passes)
    chosen = {p: b.rank for p, b in adapters(cooked).items()}
    trained = fxcook.train(
        cooked,
        None,
        data.train,
        loss,
        trainable=TRAINABLE if mode != "full" else "all",
        **_train_kw(steps, batch_size, lr, seed),
        **kw,
    )
    if mode != "full":
        fxcook.apply(cooked, [REGISTRY["merge_lora"]()])
    result = AdaptResult(
        task=task,
        classes=data.classes,
        accuracy=accuracy(cooked, data.test.batches(64))["accuracy"],
        trainable_params=trained.trainable_params,
        total_params=trained.total_params,
        inference_params=sum(p.numel() for p in cooked.parameters()),
        peak_memory_bytes=trained.peak_memory_bytes,
        memory_measure=trained.memory_measure,
        heads_pruned=heads_before - _heads(cooked, head_dim),
        ranks=chosen,
        importance={k: v.tolist() for k, v in importance.items()},
        losses=trained.losses,
        balance=data.balance,
    )
    if out is not None:
        from fxcook.artifact import tokenizer_extra

        result.artifact = str(fxcook.save(cooked, out / "model", extras=tokenizer_extra(tokenizer)))
        if onnx:
            from fxcook.runtime import onnx as onnx_rt

            result.onnx = str(onnx_rt.export(cooked, out / "model.onnx", example_inputs=example))
        (out / "results.json").write_text(json.dumps(asdict(result), indent=1))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="the encoder: 'minilm' (embedded) or a local HF directory")
    p.add_argument("--task", default="genre", choices=("genre", "play"), help="the offline Shakespeare task")
    p.add_argument("--out", required=True, help="output directory: model/ (fxcook.save), model.onnx, results.json")
    p.add_argument(
        "--mode",
        default="prune_lora",
        choices=("full", "lora", "prune_lora"),
        help="full fine-tuning, uniform LoRA, or importance-pruned heads + rank-varied LoRA (default)",
    )
    p.add_argument("--target", type=float, default=0.1, help="share of block weights the head pruning removes")
    p.add_argument("--high", type=at_least(1), default=8, help="LoRA rank on the most important blocks")
    p.add_argument("--low", type=at_least(1), default=4, help="LoRA rank on the other blocks")
    p.add_argument("--top-blocks", type=at_least(0), default=2, help="how many blocks get the high rank")
    p.add_argument("--rank", type=at_least(1), default=8, help="the uniform rank of --mode lora")
    p.add_argument("--steps", type=at_least(1), default=200, help="adapter (or full) training steps")
    p.add_argument("--probe-steps", type=at_least(0), default=50, help="head-only steps before importance")
    p.add_argument("--batch-size", type=at_least(1), default=16, help="passages per training step")
    p.add_argument("--importance-batches", type=at_least(1), default=8, help="task batches head importance reads")
    p.add_argument("--per-class", type=at_least(1), default=400, help="training passages per class")
    p.add_argument("--test-per-class", type=at_least(1), default=100, help="held-out passages per class")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate of the trained parameters")
    p.add_argument("--int8", action="store_true", help="quantize the base to int8 before the adapters")
    p.add_argument("--onnx", action="store_true", help="also export OUT/model.onnx")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, head init and training")


def main(args) -> int:
    keys = (
        "task",
        "mode",
        "target",
        "high",
        "low",
        "top_blocks",
        "rank",
        "steps",
        "probe_steps",
        "batch_size",
        "importance_batches",
        "per_class",
        "test_per_class",
        "lr",
        "int8",
        "onnx",
        "seed",
    )
    r = adapt(args.model, out=args.out, **{k: getattr(args, k) for k in keys})
    print(
        f"{r.task}: accuracy {r.accuracy:.3f}, trainable {r.trainable_params:,} of {r.total_params:,}, "
        f"inference params {r.inference_params:,}, heads pruned {r.heads_pruned}; wrote {r.artifact}"
    )
    return 0
