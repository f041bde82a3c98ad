"""The paper's training recipes after layer dropping (Jha et al. 2023) as `DistillLoss` configs.

- `continued`: continued pretraining, next-token cross-entropy alone, no teacher;
- `kd`: vanilla logit distillation, `lam` x KL(teacher || student) + LM;
- `minilm`: MiniLM-style relation transfer on the last block (Q-K attention maps and V-V relations)
  + `lam` x KL + LM;
- `homotopic`: every student block's output against the teacher block it came from (MSE), their
  Q-K attention maps, the embedding output (MSE), `lam` x KL and LM.

The distillation recipes normalise each term to the LM loss's magnitude (`normalize=True`, see
`fxcook.training.scaling`).
"""

from __future__ import annotations

from fxcook.errors import FxcookError
from fxcook.training.losses import DistillLoss

BASELINES = {
    "continued": {"lm": 1.0},
    "kd": {"kl": 1.0, "lm": 1.0, "normalize": True},
    "minilm": {"attention": 1.0, "relation": 1.0, "layer_map": "last_k", "last_k": 1, "kl": 1.0, "lm": 1.0, "normalize": True},
    "homotopic": {
        "hidden_mse": 1.0, "attention": 1.0, "embedding": 1.0, "layer_map": "origin", "kl": 1.0, "lm": 1.0,
        "normalize": True,
    },
}  # fmt: skip


def baseline_config(name: str, lam: float = 1.0, **overrides) -> dict:
    """The DistillLoss keywords of baseline `name`, its KL weight set to `lam` (not for `continued`)."""
    if name not in BASELINES:
        raise FxcookError(f"unknown training baseline {name!r}; baselines are {', '.join(BASELINES)}")
    config = dict(BASELINES[name])
    if "kl" in config:
        config["kl"] = lam
    return {**config, **overrides}


def baseline(name: str, lam: float = 1.0, **overrides):
    """A DistillLoss for baseline `name` (e.g. `baseline("kd", lam=0.5, causal=True)`)."""
    return DistillLoss(**baseline_config(name, lam, **overrides))
