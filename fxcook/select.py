"""Selectors: which sites a pass rewrites, by path pattern, kind and scope.

Patterns are globs matched against the full module path or a dotted suffix of it, so BMCook-style
names such as `intermediate.dense` work; a `re:` prefix makes a regular expression (searched).
Every pattern must match some site of the model (of any kind, in or out of scope): a mistyped
exclude would otherwise rewrite what the user meant to keep. A selector or pattern that matches
nothing is an error that lists the most similar paths, never a silent no-op.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from fxcook.errors import SelectorError
from fxcook.sites import KINDS, Site


def match(pattern: str, path: str) -> bool:
    """True when `pattern` selects `path` (glob on the path or a dotted suffix; `re:` regex)."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*." + pattern)


def nearest(pattern: str, paths: list[str], n: int = 5) -> list[str]:
    """The `n` paths most similar to `pattern` (difflib ratio to the path or any dotted suffix), best first."""
    pat = pattern.removeprefix("re:")

    def score(path: str) -> float:
        parts = path.split(".")
        return max(difflib.SequenceMatcher(None, pat, ".".join(parts[i:])).ratio() for i in range(len(parts)))

    return sorted(dict.fromkeys(paths), key=score, reverse=True)[:n]


def _as_list(v):
    return [v] if isinstance(v, str) else list(v)


class Select(BaseModel):
    """Sites of one `kind` whose path matches an `include` pattern and no `exclude` pattern.

    `scope="blocks"` keeps only sites inside transformer blocks (so embeddings, poolers and output
    heads are left alone by default); `scope="all"` takes every site of the kind.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    include: list[str] = ["*"]
    exclude: list[str] = []
    kind: str = "linear"
    scope: Literal["blocks", "all"] = "blocks"

    _listify = field_validator("include", "exclude", mode="before")(lambda cls, v: _as_list(v))

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in KINDS:
            raise ValueError(f"unknown site kind {v!r}; kinds are {', '.join(KINDS)}")
        return v

    @field_validator("include", "exclude")
    @classmethod
    def _regex(cls, v: list[str]) -> list[str]:
        for p in v:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"bad regex {p!r}: {e}") from e
        return v

    def _paths(self, site: Site) -> list[str]:
        extra = [site.info[k] for k in ("up", "gate", "down") if site.info.get(k)] if site.kind == "ffn" else []
        return [site.path, *extra]

    def resolve(self, cooked) -> list[Site]:
        """The matching sites of `cooked` in graph order; SelectorError if there are none, or if one of
        the patterns matches no site of the model at all."""
        candidates = cooked.sites.find(self.kind)
        if self.scope == "blocks":
            candidates = [s for s in candidates if cooked.sites.block_of(s.path) is not None]
        out = []
        for site in candidates:
            paths = self._paths(site)
            if not any(match(p, q) for p in self.include for q in paths):
                continue
            if any(match(p, q) for p in self.exclude for q in paths):
                continue
            out.append(site)
        if not out:
            raise SelectorError(self._nothing_matched(cooked, candidates))
        self._check_patterns(cooked)
        return out

    def _check_patterns(self, cooked) -> None:
        every = list(dict.fromkeys(q for kind in KINDS for s in cooked.sites.find(kind) for q in self._paths(s)))
        for key in ("include", "exclude"):
            for p in getattr(self, key):
                if not any(match(p, q) for q in every):
                    raise SelectorError(
                        f"selector {key} pattern {p!r} matches no site of the model ({len(every)} site paths); "
                        f"fix or remove it; nearest paths: {', '.join(nearest(p, every)) or 'none'}"
                    )

    def _nothing_matched(self, cooked, candidates: list[Site]) -> str:
        every = [s.path for s in cooked.sites.find(self.kind)]
        pool = [s.path for s in candidates] or every
        near = list(dict.fromkeys(q for p in self.include for q in nearest(p, pool)))[:5]
        where = " inside blocks" if self.scope == "blocks" else ""
        return (
            f"selector include={self.include} exclude={self.exclude} matched no {self.kind} site{where} "
            f"({len(pool)} {self.kind} sites exist); nearest paths: {', '.join(near) or 'none'}"
        )
