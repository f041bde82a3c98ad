"""Writing a compressed model to a directory: weights (safetensors), recipe and report, atomically."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_model


def save_cooked(cooked, out: Path, recipe: Path | None = None, model: str | None = None) -> Path:
    """Write `model.safetensors`, `report.txt` and the recipe into `out` via a temporary directory."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_model(cooked, str(tmp / "model.safetensors"), metadata={"model": model or "", "fxcook": "1"})
        (tmp / "report.txt").write_text(cooked.report(per_layer=True) + "\n")
        if recipe is not None:
            shutil.copyfile(recipe, tmp / recipe.name)
        if out.exists():
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
            tmp.rmdir()
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
