"""Output paths, checked before any long work (capture, calibration, training).

A bad `--out` (an existing file, an unwritable place, the input model's own directory) is an error
naming it at once, not a traceback after minutes of compile or an overwritten original model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from fxcook.errors import FxcookError


def _writable(path: Path, what: str) -> None:
    """`path` can be created: its nearest existing ancestor is a directory we can write into."""
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise FxcookError(f"{what} {path}: {ancestor} is a file, so nothing can be created under it")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise FxcookError(f"{what} {path}: cannot write into {ancestor} ({e.strerror or e})") from e


def check_out_dir(path: Path, what: str = "--out", source: Path | None = None) -> Path:
    """An output directory: not an existing file, writable, and not the input model directory
    `source` or inside it (writing there would overwrite the original weights)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FxcookError(f"{what} {path} is an existing file, not a directory; choose another path")
    if source is not None:
        out, src = path.resolve(), Path(source).resolve()
        if out == src or src in out.parents:
            raise FxcookError(
                f"{what} {path} is inside the input model directory {source}: writing there "
                f"would overwrite the original model; choose a directory outside it"
            )
    _writable(path, what)
    return path


def check_out_file(path: Path, what: str = "--out") -> Path:
    """A single output file: not an existing directory, and its directory writable."""
    path = Path(path)
    if path.is_dir():
        raise FxcookError(f"{what} {path} is an existing directory; give a file name (e.g. {path / 'model.onnx'})")
    _writable(path, what)
    return path
