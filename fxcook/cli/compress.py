"""`fxcook compress`: apply a recipe and save the compressed model."""

from __future__ import annotations

from pathlib import Path

from fxcook.cli.inspect import load_named
from fxcook.data import calibration_for
from fxcook.models import model_dir
from fxcook.paths import check_out_dir


def cmd_compress(args) -> int:
    from fxcook import compile
    from fxcook.artifact import save, tokenizer_extra
    from fxcook.recipe import load_recipe

    out = check_out_dir(Path(args.out), "--out", source=model_dir(args.model))
    recipe = load_recipe(args.recipe)
    model, tok, batch = load_named(args.model)
    calibration = calibration_for(recipe, tok, args.model)
    cooked = compile(model, recipe.build(calibration=calibration), example_inputs=calibration[0])
    extras = tokenizer_extra(tok)
    if args.onnx:  # inside the artifact, so its manifest covers it
        from fxcook.runtime import onnx as onnx_rt

        extras["model.onnx"] = lambda path: onnx_rt.export(cooked, path, example_inputs=batch)
    save(cooked, out, recipe=Path(recipe.source), extras=extras)
    print(cooked.report(per_layer=args.per_layer))
    print(f"wrote {out}" + (f" (with {out / 'model.onnx'})" if args.onnx else ""))
    return 0
