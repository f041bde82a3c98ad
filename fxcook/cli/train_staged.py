"""`fxcook train` with a staged recipe: every stage in turn (`fxcook.stages`), resumable in --out."""

from __future__ import annotations

import json
from pathlib import Path

from fxcook.errors import FxcookError


def run_staged(args, recipe, out: Path, flags: dict, score) -> int:
    """Run `recipe`'s stages on --model, distilling each from the original (or previous) model; save
    the final model in --out/model with stages.json (what each stage did, its fidelity). `flags`: the
    train settings given on the command line; `score(teacher, student, tokenizer, lines)`: fidelity."""
    from fxcook.artifact import is_artifact, save, tokenizer_extra
    from fxcook.checkpoint import write_atomic
    from fxcook.data import calibration_for, check_known_tokens, lines_from
    from fxcook.models import example_batch, load_model
    from fxcook.recipe import Recipe
    from fxcook.stages import run_stages, stages_extra
    from fxcook.training.distributed import init_distributed

    if is_artifact(args.model):
        raise FxcookError(
            f"--model {args.model} is a saved fxcook model; a staged recipe ({recipe.source}) starts from "
            f"the original: give --model the base model (e.g. 'minilm' or its HF directory)"
        )
    if init_distributed()[1] > 1:
        raise FxcookError(f"{recipe.source}: staged recipes run in one process; launch without torchrun")
    teacher, tokenizer = load_model(args.teacher or args.model)
    lines = lines_from(args.data, seed=args.seed or 0)
    held_out = []
    if args.eval_lines > 0:
        held_out, lines = lines[-args.eval_lines :], lines[: -args.eval_lines]
    if args.lines:
        lines = lines[: args.lines]
    example = example_batch(tokenizer, (held_out or lines)[:4], args.max_length or 128)
    check_known_tokens([example], tokenizer, args.model)

    def after_stage(i, model):
        fid = score(teacher, model, tokenizer, held_out)
        if fid is not None:
            print(f"{recipe.stage_label(i)}: min cos {fid['min_cos']:.4f}  mean cos {fid['mean_cos']:.4f}")
        return fid

    run = run_stages(
        teacher,
        recipe,
        tokenizer,
        lines,
        example_inputs=example,
        calibration_for=lambda cal: calibration_for(Recipe(calibration=cal), tokenizer, args.model),
        out=out,
        resume=not args.no_resume,
        overwrite=args.overwrite,
        overrides=flags,
        after_stage=after_stage,
    )
    summary = {"stages": run.record(), "after": run.stages[-1].info or None}
    write_atomic(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    save(
        run.model, out / "model", recipe=Path(recipe.source), extras={**tokenizer_extra(tokenizer), **stages_extra(run)}
    )
    print(f"wrote {out / 'model'}")
    if args.onnx:
        from fxcook.runtime import onnx as onnx_rt

        print(f"wrote {onnx_rt.export(run.model, out / 'model.onnx', example_inputs=example)}")
    return 0
