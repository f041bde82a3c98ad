"""`fxcook train`: compress a model, distil it on text, save the trained artifact."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import nn

from fxcook.cli.args import at_least
from fxcook.errors import FxcookError
from fxcook.stages import TRAIN_DEFAULTS
from fxcook.training.checkpoints import claim_out
from fxcook.training.distributed import init_distributed
from fxcook.training.loop import train
from fxcook.training.losses import DistillLoss


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fxcook train` (launch with torchrun --nproc_per_node N for FSDP2)."""
    parser.add_argument(
        "--model",
        default="minilm",
        help="'minilm', a local HF model directory, or a directory fxcook saved (then --teacher)",
    )
    parser.add_argument(
        "--teacher", help="the model to distil from (default: --model; required when --model is a saved fxcook model)"
    )
    parser.add_argument("--recipe", help="recipe YAML/JSON: passes to apply, plus an optional train: section")
    parser.add_argument(
        "--data", help="a text file or directory, or 'shakespeare' (default: the recipe's train.data, or shakespeare)"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output directory: checkpoints/, log.jsonl, results.json, the trained model in model/",
    )
    parser.add_argument("--steps", type=at_least(1), help="optimizer steps (default: recipe or 100)")
    parser.add_argument("--batch-size", type=at_least(1), help="global batch size (default: recipe or 16)")
    parser.add_argument("--grad-accum", type=at_least(1), help="micro-batches per step (default 1)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    parser.add_argument("--warmup", type=at_least(0), help="linear warmup steps (default 0)")
    parser.add_argument(
        "--schedule", choices=("cosine", "linear", "constant"), help="LR decay after warmup (default cosine)"
    )
    parser.add_argument("--max-length", type=at_least(2), help="tokens per line (default 128)")
    parser.add_argument("--save-every", type=at_least(0), help="checkpoint every N steps (default 50; 0: at the end)")
    parser.add_argument("--seed", type=int, help="seed (default 0)")
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start afresh instead of resuming the run in --out (refused if one is there, unless --overwrite)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="move an earlier run in --out aside (to --out/old-run-<time>) and start afresh",
    )
    parser.add_argument("--onnx", action="store_true", help="also export the trained model to --out/model.onnx")
    parser.add_argument("--shard-teacher", action="store_true", help="FSDP2-shard the teacher too")
    parser.add_argument("--lines", type=at_least(1), default=None, help="use only the first N lines of --data")
    parser.add_argument("--eval-lines", type=at_least(0), default=64, help="held-out lines for the fidelity table")


def _flags(args) -> dict:
    """The train settings given on the command line (they override the recipe's)."""
    return {key: getattr(args, key) for key in TRAIN_DEFAULTS if getattr(args, key, None) is not None}


def _train_settings(args, recipe_train: dict) -> tuple[dict, dict]:
    """Merge defaults < recipe `train:` section (validated by the recipe) < CLI flags; returns
    (train kwargs, loss config)."""
    recipe_train = dict(recipe_train or {})
    loss_cfg = recipe_train.pop("loss", None) or {"hidden_mse": 1.0, "hidden_cos": 1.0}
    return {**TRAIN_DEFAULTS, **recipe_train, **_flags(args)}, loss_cfg


def main(args: argparse.Namespace) -> int:
    """`fxcook train`: compress --model with --recipe, distill it from the original on --data, then
    save the trained model as a compressed artifact in --out/model (and --out/model.onnx with --onnx)."""
    from fxcook.artifact import is_artifact, load, load_tokenizer, save, tokenizer_extra
    from fxcook.checkpoint import write_atomic
    from fxcook.data import calibration_for, check_known_tokens, lines_from
    from fxcook.models import example_batch, load_model, model_dir
    from fxcook.paths import check_out_dir
    from fxcook.pipeline import apply
    from fxcook.pipeline import compile as fx_compile

    out = check_out_dir(Path(args.out), "--out", source=model_dir(args.model))
    claim_out(out, not args.no_resume, args.overwrite, move=False)  # refuse before the long compile
    recipe, recipe_train = None, {}
    if args.recipe:
        from fxcook.recipe import load_recipe

        recipe = load_recipe(args.recipe)
        recipe_train = recipe.train.settings() if recipe.train else {}
        if args.data is None and recipe.train is not None:
            args.data = recipe.train.data
    args.data = args.data or "shakespeare"
    if recipe is not None and recipe.staged:
        from fxcook.cli.train_staged import run_staged

        return run_staged(args, recipe, out, _flags(args), _fidelity)
    settings, loss_cfg = _train_settings(args, recipe_train)
    rank, world, _ = init_distributed()
    saved = is_artifact(args.model)  # a model fxcook saved: train it further, distilling from --teacher
    if saved and not args.teacher:
        raise FxcookError(
            f"--model {args.model} is a saved fxcook model: give --teacher (the original model, "
            f"e.g. 'minilm' or its HF directory) to distil it from"
        )
    teacher, tokenizer = load_model(args.teacher or args.model)
    if saved:
        tokenizer = load_tokenizer(args.model)
    lines = lines_from(args.data, seed=settings["seed"])
    held_out = []
    if args.eval_lines > 0:  # lines[:-0] would be empty: split only when lines are held out
        held_out, lines = lines[-args.eval_lines :], lines[: -args.eval_lines]  # calibration uses the first lines
    if args.lines:
        lines = lines[: args.lines]
    passes, example = [], example_batch(tokenizer, (held_out or lines)[:4], settings["max_length"])
    check_known_tokens([example], tokenizer, args.model)
    if recipe is not None:
        calibration = calibration_for(recipe, tokenizer, args.model)
        passes, example = recipe.build(calibration=calibration), calibration[0]
    student = apply(load(args.model), passes) if saved else fx_compile(teacher, passes, example)
    spare = copy.deepcopy(student) if world > 1 and rank == 0 else None  # gathers the sharded result
    before = _fidelity(teacher, student, tokenizer, held_out)
    loss = DistillLoss(**loss_cfg)
    steps = settings.pop("steps")
    result = train(
        student,
        teacher,
        lines,
        loss,
        tokenizer=tokenizer,
        steps=steps,
        out=out,
        resume=not args.no_resume,
        overwrite=args.overwrite,
        shard_teacher=args.shard_teacher,
        **settings,
    )
    after = _fidelity(teacher, student, tokenizer, held_out)
    trained = _whole(student, spare, world)
    if rank == 0:
        summary = {
            "steps": result.step,
            "world": world,
            "resumed_from": result.resumed_from,
            "final_loss": result.losses[-1] if result.losses else None,
            "before": before,
            "after": after,
        }
        write_atomic(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
        trained.cpu()
        save(trained, out / "model", recipe=Path(recipe.source) if recipe else None, extras=tokenizer_extra(tokenizer))
        print(f"wrote {out / 'model'}")
        if args.onnx:
            from fxcook.runtime import onnx as onnx_rt

            print(f"wrote {onnx_rt.export(trained, out / 'model.onnx', example_inputs=example)}")
        if before is not None:
            print(f"fidelity vs fp32 on {len(held_out)} held-out lines:")
            print(f"  one-shot : min cos {before['min_cos']:.4f}  mean cos {before['mean_cos']:.4f}")
            print(f"  distilled: min cos {after['min_cos']:.4f}  mean cos {after['mean_cos']:.4f}")
    return 0


def _whole(student: nn.Module, spare: nn.Module | None, world: int) -> nn.Module | None:
    """The trained student unsharded: itself on one process; under FSDP2 its gathered full state
    loaded into `spare` (a copy made before sharding) on rank 0, None on the other ranks."""
    if world == 1:
        return student
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if spare is not None:
        spare.load_state_dict(full)
    return spare


def _fidelity(teacher, student, tokenizer, lines) -> dict | None:
    """Embedding fidelity of the student vs the teacher (encoders only; None for LMs or no lines)."""
    if not lines:
        return None
    if hasattr(getattr(teacher, "config", None), "vocab_size") and "ForCausalLM" in type(teacher).__name__:
        return None
    from fxcook.evaluate import embed, fidelity

    with torch.no_grad():
        ref = embed(teacher, tokenizer, lines)
        emb = embed(student, tokenizer, lines)
    return fidelity(ref, emb)
