"""Manifests: a sha256 of every file of an artifact plus a fingerprint of what it was made from.

Every directory fxcook writes (a compressed model, a training checkpoint) carries `manifest.json`:
`{"files": {name: sha256}, "fingerprint": ..., **extra}`. Readers call `verify` before touching
any file, so a flipped byte, a missing or an unlisted file, or an artifact made by another recipe
or for another model shape is an error naming it, never a silent load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fxcook.errors import FxcookError

MANIFEST = "manifest.json"


class ManifestError(FxcookError):
    """An artifact's files do not match its manifest, or it was made for another recipe or model."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(model, recipe: Any = None) -> str:
    """sha256 over the model's state names, shapes and dtypes and the recipe (any JSON-able value)."""
    shapes = [(k, list(v.shape), str(v.dtype)) for k, v in sorted(model.state_dict().items())]
    blob = json.dumps({"state": shapes, "recipe": recipe}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write(directory: Path, fingerprint: str | None = None, **extra) -> Path:
    """Hash every file in `directory` (recursively, the manifest aside) into `directory/manifest.json`."""
    files = {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    path = directory / MANIFEST
    path.write_text(json.dumps({"files": files, "fingerprint": fingerprint, **extra}, indent=1))
    return path


def read(directory: Path) -> dict:
    """The manifest of `directory`, checked for shape (not yet against the files)."""
    path = directory / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST}: it is incomplete or not a fxcook artifact")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is corrupt: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict) or not data["files"]:
        raise ManifestError(f"{path} lists no files (got {json.dumps(data)[:80]}): the artifact is damaged")
    return data


def verify(directory: Path, fingerprint: str | None = None) -> dict:
    """Check every file against the manifest (missing, unlisted, altered) and, if given, the
    fingerprint; returns the manifest."""
    directory = Path(directory)
    data = read(directory)
    listed = data["files"]
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
    if unlisted := sorted(present - set(listed)):
        raise ManifestError(f"{directory}: files not listed in its manifest: {', '.join(unlisted)}")
    for name, digest in listed.items():
        f = directory / name
        if not f.is_file():
            raise ManifestError(f"{directory}: file {name} listed in the manifest is missing")
        if sha256_file(f) != digest:
            raise ManifestError(f"{directory}: file {name} is corrupt (sha256 does not match the manifest)")
    if fingerprint is not None and data.get("fingerprint") != fingerprint:
        raise ManifestError(
            f"{directory} was made for another recipe or model shape (fingerprint "
            f"{str(data.get('fingerprint'))[:12]}, this model {fingerprint[:12]})"
        )
    return data
