"""CoFi's L0 machinery: hard-concrete gates, the expected model size they imply, and the Lagrangian
that drives that size to a target while training.

A `HardConcrete` gate samples z in [0, 1] per structure (head, FFN unit, hidden dim, whole sublayer)
with exact zeros and ones; `ExpectedSize` turns the gates' closed-form P(z != 0) into the expected
count of remaining weights (nested structures multiply: a head survives only inside a surviving
layer); `Lagrangian` is `lambda1 (s_hat - t) + lambda2 (s_hat - t)^2` with t ramped to the target,
whose lambdas `fxcook.train` maximises; `L0Regulariser` ties them into the `Regulariser` protocol of
`fxcook.cooked`. Gradients reach log_alpha through z (never detached: BMCook's pruner was).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fxcook.errors import FxcookError

__all__ = ["BETA", "LEFT", "RIGHT", "ExpectedSize", "HardConcrete", "L0Regulariser", "Lagrangian", "SizeTerm"]

BETA, LEFT, RIGHT = 2 / 3, -0.1, 1.1  # temperature and stretch interval (l, r) of the hard concrete
EPS = 1e-6  # u ~ U(EPS, 1 - EPS): log u and log(1 - u) stay finite
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)
TEST_TIME_SCALE = 0.8  # CoFi's deterministic gate: sigmoid(log_alpha / beta * 0.8)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor also under FSDP2 outside forward (a sharded DTensor: differentiable all-gather)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class HardConcrete(nn.Module):
    """`n` hard-concrete gates (Louizos et al.; CoFi's settings): forward() returns z [n].

    Training: a fresh stochastic sample each call, differentiable in `log_alpha`. Eval: the deterministic
    test-time gate (soft values, the round(E[#zeros]) smallest set to 0). Once `fix()`ed (`final`), the
    gate is that deterministic z for good, kept in the state so a saved model shows it. log_alpha is
    kept within [log 1e-2, log 1e2] by `constrain()`, which `fxcook.train` calls after every optimizer
    step (through `L0Regulariser.after_step`); the init (default mean 10, CoFi's "start on") lies above
    that range until the first step.
    """

    def __init__(self, n: int, init_mean: float = 10.0, init_std: float = 0.01):
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise FxcookError(f"HardConcrete: n must be a positive integer (structures gated), got {n!r}")
        self.log_alpha = nn.Parameter(torch.empty(n).normal_(init_mean, init_std))
        self.register_buffer("fixed", torch.ones(n))
        self.register_buffer("is_final", torch.zeros((), dtype=torch.bool))

    @property
    def n(self) -> int:
        return self.fixed.numel()

    @property
    def final(self) -> bool:
        return bool(self.is_final)

    def forward(self) -> torch.Tensor:
        if self.final:
            return self.fixed
        return self.sample() if self.training else self.deterministic()

    def sample(self) -> torch.Tensor:
        """z = clamp(s (r - l) + l, 0, 1), s = sigmoid((log u - log(1 - u) + log_alpha) / beta)."""
        log_alpha = _whole(self.log_alpha)
        u = torch.rand(log_alpha.shape, device=log_alpha.device, dtype=log_alpha.dtype) * (1 - 2 * EPS) + EPS
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
        return (s * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)

    def prob_nonzero(self) -> torch.Tensor:
        """P(z != 0) = 1 - sigmoid(beta log(-l / r) - log_alpha), differentiable in log_alpha."""
        return 1 - torch.sigmoid(BETA * math.log(-LEFT / RIGHT) - _whole(self.log_alpha))

    def expected_zeros(self) -> torch.Tensor:
        return (1 - self.prob_nonzero()).sum()

    @torch.no_grad()
    def deterministic(self) -> torch.Tensor:
        """CoFi's test-time gate: soft = sigmoid(log_alpha / beta * 0.8), its round(E[#zeros]) smallest zeroed."""
        soft = torch.sigmoid(_whole(self.log_alpha) / BETA * TEST_TIME_SCALE)
        zeros = int(torch.round(self.expected_zeros()))
        if zeros:
            soft[torch.topk(soft, zeros, largest=False).indices] = 0.0
        return soft

    @torch.no_grad()
    def constrain(self) -> None:
        """Clamp log_alpha into [log 1e-2, log 1e2] (in place, also on FSDP2 shards)."""
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    @torch.no_grad()
    def fix(self) -> torch.Tensor:
        """Freeze the gate at its deterministic value (`final`); log_alpha stops training. Returns z."""
        self.fixed.copy_(self.deterministic())
        self.is_final.fill_(True)
        self.log_alpha.requires_grad_(False)
        return self.fixed

    def extra_repr(self) -> str:
        return f"n={self.n}, final={self.final}"

    def describe(self) -> str:
        """The note beside this gate's node in `CookedModel.graph_text()`."""
        z = self.fixed if self.final else self.deterministic()
        kind = "fixed" if self.final else "learned"
        return f"hard-concrete gates ({kind}): {int(z.count_nonzero())}/{self.n} open at test time"


@dataclass(frozen=True)
class SizeTerm:
    """`weights` weights per element of the outer product of the gates' index sets.

    A gate listed twice (a hidden x hidden weight gated by one hidden gate on both sides) counts its
    kept structures squared. No gates: a constant count (ungated weights in the denominator).
    """

    weights: float
    gates: tuple[HardConcrete, ...] = ()


def _moment(gate: HardConcrete, power: int, term: int) -> torch.Tensor:
    """E[N^power] for N = the number of open gates (independent Bernoullis with P(z != 0))."""
    p = gate.prob_nonzero()
    if power == 1:
        return p.sum()
    if power == 2:  # Var N + (E N)^2
        return (p * (1 - p)).sum() + p.sum() ** 2
    raise FxcookError(f"ExpectedSize: term {term} lists one gate {power} times; at most twice is supported")


class ExpectedSize:
    """Remaining weights under the gates: expected (differentiable), dense, and kept at the test-time gates.

    Gates are independent, so the expectation of a term is `weights` times the product over its gates
    of E[#open] (E[#open^2] for a gate listed twice). `dense` is the size with every gate open (by
    default the terms' own total), the denominator of `sparsity()`.
    """

    def __init__(self, terms: Sequence[SizeTerm], dense: float | None = None):
        if not terms:
            raise FxcookError("ExpectedSize: no terms (give one SizeTerm per gated group of weights)")
        self.terms = list(terms)
        self.dense = float(dense) if dense is not None else sum(self._count(t, lambda g: g.n) for t in self.terms)
        if self.dense <= 0:
            raise FxcookError(f"ExpectedSize: the dense size must be positive, got {self.dense}")

    def gates(self) -> list[HardConcrete]:
        """Every gate the terms use, each once, in order of first use."""
        return list(dict.fromkeys(g for t in self.terms for g in t.gates))

    @staticmethod
    def _count(term: SizeTerm, open_of) -> float:
        return term.weights * math.prod(open_of(g) ** k for g, k in Counter(term.gates).items())

    def expected(self) -> torch.Tensor:
        total = 0.0
        for i, term in enumerate(self.terms):
            moments = [_moment(g, k, i) for g, k in Counter(term.gates).items()]
            total = total + term.weights * (torch.stack(moments).prod() if moments else 1.0)
        return torch.as_tensor(total)

    def sparsity(self) -> torch.Tensor:
        """Expected fraction of the dense size removed: s_hat."""
        return 1 - self.expected() / self.dense

    @torch.no_grad()
    def kept(self) -> float:
        """Weights left at the gates' test-time (or fixed) values."""
        return sum(
            self._count(t, lambda g: int((g.fixed if g.final else g.deterministic()).count_nonzero()))
            for t in self.terms
        )


class Lagrangian(nn.Module):
    """`lambda1 (s_hat - t) + lambda2 (s_hat - t)^2`, t ramped linearly from 0 to `target` over `warmup_steps`.

    The lambdas start at 0 and are trained by gradient *ascent* (`fxcook.train` maximises them with
    their own optimizer at `lr`), so a persistent gap to the target grows its own penalty.
    """

    def __init__(self, target: float, warmup_steps: int = 0, lr: float = 0.01):
        super().__init__()
        if not 0 < target < 1:
            raise FxcookError(f"Lagrangian: target must lie in (0, 1) (fraction of weights removed), got {target!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise FxcookError(f"Lagrangian: warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if not lr > 0:
            raise FxcookError(f"Lagrangian: lr must be positive, got {lr!r}")
        self.target, self.warmup_steps, self.lr = float(target), warmup_steps, float(lr)
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))

    def target_at(self, step: int) -> float:
        if not self.warmup_steps:
            return self.target
        return self.target * min(step / self.warmup_steps, 1.0)

    def loss(self, expected_sparsity: torch.Tensor, step: int) -> torch.Tensor:
        gap = expected_sparsity - self.target_at(step)
        return self.lambda1 * gap + self.lambda2 * gap * gap


class L0Regulariser:
    """The `Regulariser` a pruning pass appends to `cooked.regularisers`: the Lagrangian of `size`.

    Training-only (no state in the model's state dict): the lambdas are its ascent parameters, the gates'
    log_alpha its descent parameters, trained at `gate_lr` (CoFi: 0.01, far above a model lr) when
    given, else at the model's lr.
    """

    name = "l0"

    def __init__(self, size: ExpectedSize, lagrangian: Lagrangian, gate_lr: float | None = 0.01):
        self.size, self.lagrangian, self.descent_lr = size, lagrangian, gate_lr
        self._terms: dict[str, float] = {}

    @property
    def ascent_lr(self) -> float:
        return self.lagrangian.lr

    def ascent_parameters(self) -> list[nn.Parameter]:
        return [self.lagrangian.lambda1, self.lagrangian.lambda2]

    def descent_parameters(self) -> list[nn.Parameter]:
        return [g.log_alpha for g in self.size.gates() if g.log_alpha.requires_grad]

    def loss(self, cooked: nn.Module, step: int) -> torch.Tensor:
        s_hat = self.size.sparsity()
        value = self.lagrangian.loss(s_hat, step)
        lag = self.lagrangian
        self._terms = {
            "l0.expected_sparsity": float(s_hat.detach()),
            "l0.target": lag.target_at(step),
            "l0.lambda1": float(lag.lambda1.detach()),
            "l0.lambda2": float(lag.lambda2.detach()),
            "l0.lagrangian": float(value.detach()),
        }
        return value

    def log_terms(self) -> dict[str, float]:
        return dict(self._terms)

    def after_step(self, cooked: nn.Module, step: int) -> None:
        for gate in self.size.gates():
            gate.constrain()
