"""Loss terms normalised to the LM loss's magnitude, as Jha et al. (2023) weigh their distillation terms.

A term t enters the total as w * t * (lm / t) with the ratio detached: it keeps its own gradient
direction at the size of the LM term, so the weights (lambda on KL) alone set the mix.
"""

from __future__ import annotations

import torch


def normalized(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each term but `lm` rescaled to the LM term's size by the detached ratio lm / term."""
    lm = values["lm"].detach()
    return {k: v if k == "lm" else v * (lm / v.detach().clamp_min(1e-12)) for k, v in values.items()}
