"""Which blocks of one stack of `n` a placement drops (Jha et al. 2023, Figure 1; ShortGPT).

Pure index arithmetic, so docs/layer_dropping.md can list what each placement gives and the tests can
check every rule. With `keep_first_last` the candidates are blocks 1..n-2, otherwise 0..n-1; `d` of
the `m` candidates are dropped:

- `input`: the d candidates nearest the input; `output`: the d nearest the output;
- `middle`: a contiguous run of d centred in the candidates (ties lean to the output side);
- `both`: ceil(d/2) from the input end and floor(d/2) from the output end (the middle survives);
- `max-gap`: the kept blocks are spread evenly over the stack, kept_i = floor(i (n-1)/(k-1) + 1/2)
  (first and last included), so the dropped ones are as far apart as they can be;
- `block-influence`: the d candidates whose output is most like their input (lowest BI).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fxcook.errors import PreconditionError

PLACEMENTS = ("max-gap", "input", "output", "middle", "both", "block-influence")


def candidates(n: int, keep_first_last: bool) -> list[int]:
    return list(range(1, n - 1)) if keep_first_last else list(range(n))


def _spread(n: int, keep: int) -> list[int]:
    if keep == 1:
        return [0]
    return [math.floor(i * (n - 1) / (keep - 1) + 0.5) for i in range(keep)]


def choose(
    n: int, drop: int, placement: str, keep_first_last: bool, influence: Sequence[float] | None = None
) -> list[int]:
    """The sorted indices (0..n-1) of the blocks `placement` drops from a stack of `n`."""
    cand = candidates(n, keep_first_last)
    m = len(cand)
    if placement == "input":
        out = cand[:drop]
    elif placement == "output":
        out = cand[m - drop :]
    elif placement == "middle":
        start = (m - drop + 1) // 2
        out = cand[start : start + drop]
    elif placement == "both":
        head = (drop + 1) // 2
        out = cand[:head] + cand[m - (drop - head) :]
    elif placement == "max-gap":
        kept = set(_spread(n, n - drop))
        out = [i for i in range(n) if i not in kept]
    elif placement == "block-influence":
        if influence is None or len(influence) != n:
            raise PreconditionError("droplayers: block-influence needs one influence score per block")
        out = sorted(cand, key=lambda i: (influence[i], i))[:drop]
    else:
        raise PreconditionError(f"droplayers: unknown placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
    return sorted(out)
