r"""Token-level entropy change and STEER (Hao, Wang et al., ACL 2026, "Rethinking Entropy Interventions in RLVR").

**The estimate.** For a response token $y_{i,t}$ with current probability $p = \pi_\theta(y_{i,t}\mid\cdot)$,
behaviour probability $\pi_\text{old}(y_{i,t})$, position entropy $\mathcal H_{i,t}$ and advantage
$A_{i,t}$, a first-order step on the (unclipped) surrogate $\rho_{i,t} A_{i,t}$ changes the entropy of that
position's next-token distribution by

$$\Omega_{i,t} \;\propto\; -\,\frac{A_{i,t}}{\pi_\text{old}(y_{i,t})}\; p\,(1-p)\,\big(\log p + \mathcal H_{i,t}\big),$$

and by $0$ when the PPO clip removes the token's gradient (the learning rate is dropped: only
relative sizes matter). $\Omega > 0$ means the update raises entropy: a positive advantage on a token
rarer than "typical" ($\log p + \mathcal H < 0$), or a negative one on a token more likely than typical.
The factors are the ones the paper uses to read other interventions: clipping, advantage,
probability and entropy. (The constant factors are those of the official ``compute_token_weights``,
which differ from an exact one-softmax-step derivation; only the sign and the ranking are used.)

**STEER** = GRPO + clip-higher + token-mean + a per-token loss weight that damps the tokens whose update
would move entropy most, in either direction (exponential mapping, the paper's main runs):

$$\lambda_{i,t} = \mathrm{clip}\big(e^{-\kappa\,|\Omega_{i,t}|},\ \lambda_\min,\ 1\big), \qquad
\kappa = \frac{-\ln \lambda_\min}{\max(\max_\text{batch} |\Omega|,\ 0.02)},$$

so the batch's largest $|\Omega|$ gets exactly $\lambda_\min$; the linear variant maps $|\Omega|$
onto $[\lambda_\min, \lambda_\max]$ with the largest at $\lambda_\min$. The loss is the clipped
surrogate times $\lambda_{i,t}$ (no gradient through $\lambda$), aggregated token-mean. Nothing else
changes: reward, group advantage and sampling are GRPO's. Expressed here as the
:class:`~shared.rl.grpo.GRPOHooks` ``token_weights`` hook (:func:`steer_hooks`).

The last functions are a tiny exact softmax bandit (logits are the parameters) used to test $\Omega$:
one exact gradient step on $\rho A$ and the entropy change it causes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shared.rl.grpo import GRPOConfig, GRPOHooks, TokenBatch


@dataclass(frozen=True)
class STEERConfig:
    """STEER's weight mapping; defaults are the paper's main runs (``run/run_exp.sh`` of the official code)."""

    lambda_min: float = 0.8  # run_exp.sh: token_weight_min=0.8
    lambda_max: float = 1.0  # run_exp.sh: token_weight_max=1.0 (the exponential map caps at 1 anyway)
    linear: bool = False  # run_exp.sh: exponential mapping (compute_token_weights' linear=False)
    omega_floor: float = 0.02  # compute_token_weights: kappa uses max(max |Omega|, 0.02)

    def __post_init__(self) -> None:
        if not (0 < self.lambda_min <= self.lambda_max):
            raise ValueError(f"lambda range ({self.lambda_min}, {self.lambda_max}) is not allowed: need 0 < lambda_min <= lambda_max")
        if not self.linear and self.lambda_min > 1:
            raise ValueError(f"lambda_min={self.lambda_min} is not allowed for the exponential map: it must be <= 1")
        if self.omega_floor <= 0:
            raise ValueError(f"omega_floor={self.omega_floor} is not allowed: it must be > 0")


# The optimiser-side settings of the released runs (run_exp.sh): clip-higher 0.2/0.28, token-mean loss,
# no KL, no entropy bonus. Dual-clip (c = 10) is not in GRPOConfig; it only acts on off-policy tokens
# with negative advantage and ratio > c, which one on-policy update per batch never has.
STEER_GRPO = GRPOConfig(clip_low=0.2, clip_high=0.28, aggregation="token-mean")


def entropy_change_estimate(logp: Tensor, old_logp: Tensor, entropy: Tensor, advantages: Tensor,
                            clip_low: float | None = None, clip_high: float | None = None) -> Tensor:
    r"""$\Omega = -\frac{A}{\pi_\text{old}}\,p(1-p)(\log p + \mathcal H)$ per token (signed; $>0$ raises entropy).

    With ``clip_low``/``clip_high`` the clipping indicator is applied: $\Omega = 0$ where the clipped
    surrogate has no gradient ($A > 0$ and $\rho > 1+\varepsilon_h$, or $A < 0$ and $\rho < 1-\varepsilon_l$).
    Probabilities are clamped to $[10^{-8}, 1-10^{-8}]$ as in the official code. No gradient.
    """
    with torch.no_grad():
        p = logp.exp().clamp(1e-8, 1 - 1e-8)
        old_p = old_logp.exp().clamp(1e-8, 1.0)
        omega = -advantages / old_p * p * (1 - p) * (p.log() + entropy)
        if clip_low is not None or clip_high is not None:
            ratio = (logp - old_logp).exp()
            hi = (advantages > 0) & (ratio > 1 + (clip_high if clip_high is not None else float("inf")))
            lo = (advantages < 0) & (ratio < 1 - (clip_low if clip_low is not None else 1.0))
            omega = torch.where(hi | lo, torch.zeros_like(omega), omega)
        return torch.where(torch.isfinite(omega), omega, torch.zeros_like(omega))


def steer_weights(omega: Tensor, mask: Tensor, config: STEERConfig = STEERConfig()) -> Tensor:
    r"""$\lambda = \mathrm{clip}(e^{-\kappa|\Omega|}, \lambda_\min, 1)$, $\kappa = -\ln\lambda_\min / \max(\max|\Omega|, 0.02)$ (or the linear map); 0 off ``mask``."""
    with torch.no_grad():
        m = mask.bool()
        mag = omega.abs()
        weights = torch.zeros_like(mag, dtype=torch.float32)
        if not m.any():
            return weights
        valid = mag[m]
        lo, hi = valid.min(), valid.max()
        if config.linear:
            if hi > lo:
                w = config.lambda_max - (valid - lo) * (config.lambda_max - config.lambda_min) / (hi - lo)
            else:
                w = torch.full_like(valid, (config.lambda_min + config.lambda_max) / 2)
            w = w.clamp(config.lambda_min, config.lambda_max)
        else:
            kappa = -torch.log(torch.tensor(config.lambda_min, dtype=valid.dtype)) / torch.clamp(hi, min=config.omega_floor)
            w = torch.exp(-kappa * valid).clamp(config.lambda_min, 1.0)
        weights[m] = w.float()
        return weights


def steer_batch_weights(batch: TokenBatch, config: STEERConfig = STEERConfig()) -> Tensor:
    """STEER's weights of one training batch, from the current-policy probability and entropy (as the official code: no clip indicator)."""
    omega = entropy_change_estimate(batch.logp.detach(), batch.old_logp, batch.entropy.detach(), batch.advantages)
    return steer_weights(omega, batch.mask, config)


def weight_activity(weights: Tensor, mask: Tensor, tolerance: float = 0.01) -> tuple[float, float]:
    r"""How much a token weighting acts on a batch: $\frac{1}{N}\sum_{i,t} |1-\lambda_{i,t}|$ over the $N$ tokens of
    ``mask``, and the fraction of them with $|1-\lambda_{i,t}| >$ ``tolerance``. ``(0, 0)`` for a batch without tokens.

    Weights all equal to 1 (plain GRPO) give ``(0, 0)``; STEER's are in $[\lambda_\min, 1]$, so the first number is at
    most $1-\lambda_\min$, reached only if every token gets the smallest weight.
    """
    m = mask.bool()
    if not m.any():
        return 0.0, 0.0
    dev = (1.0 - weights[m].double()).abs()
    return float(dev.mean()), float((dev > tolerance).double().mean())


@dataclass
class WeightLog:
    r"""The activity of STEER's weights over a run, accumulated over every batch the hook weighted.

    ``mean_deviation`` is the token-weighted mean of $|1-\lambda|$ (see :func:`weight_activity`), ``fraction_moved``
    the fraction of tokens with $|1-\lambda| >$ ``tolerance``, ``batches`` how many weightings were logged.
    """

    tolerance: float = 0.01
    tokens: int = 0
    deviation_sum: float = 0.0
    moved: int = 0
    batches: int = 0

    def record(self, weights: Tensor, mask: Tensor) -> None:
        """Add one batch's weights (``mask`` marks its response tokens)."""
        dev = (1.0 - weights[mask.bool()].double()).abs()
        self.tokens += int(dev.numel())
        self.deviation_sum += float(dev.sum())
        self.moved += int((dev > self.tolerance).sum())
        self.batches += 1

    @property
    def mean_deviation(self) -> float:
        return self.deviation_sum / self.tokens if self.tokens else 0.0

    @property
    def fraction_moved(self) -> float:
        return self.moved / self.tokens if self.tokens else 0.0


def steer_hooks(config: STEERConfig = STEERConfig(), log: WeightLog | None = None) -> GRPOHooks:
    """STEER as a GRPO hook: the per-token loss weight $\\lambda_{i,t}$ (use with :data:`STEER_GRPO`).

    With ``log``, every batch's weights are also recorded there (the mechanism's activity, see :class:`WeightLog`).
    """

    def token_weights(batch: TokenBatch) -> Tensor:
        weights = steer_batch_weights(batch, config)
        if log is not None:
            log.record(weights, batch.mask)
        return weights

    return GRPOHooks(token_weights=token_weights)


# ## A tiny exact softmax bandit (the logits are the parameters)


def softmax_entropy(logits: Tensor) -> Tensor:
    r"""$\mathcal H(\mathrm{softmax}(z)) = -\sum_k \pi_k \log \pi_k$ over the last axis."""
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def bandit_step(logits: Tensor, action: int, advantage: float, lr: float, old_logits: Tensor | None = None) -> Tensor:
    r"""Logits after one exact gradient-ascent step on $\rho A$, $\rho = \pi(a)/\pi_\text{old}(a)$:
    $z' = z + \eta A \rho\,(e_a - \pi)$ (``old_logits`` defaults to ``logits``: $\rho = 1$)."""
    pi = torch.softmax(logits, -1)
    old = pi if old_logits is None else torch.softmax(old_logits, -1)
    rho = pi[action] / old[action]
    onehot = torch.zeros_like(pi)
    onehot[action] = 1.0
    return logits + lr * advantage * rho * (onehot - pi)


def bandit_entropy_change(logits: Tensor, action: int, advantage: float, lr: float) -> float:
    """The exact entropy change $\\mathcal H(z') - \\mathcal H(z)$ of one on-policy :func:`bandit_step`."""
    return float(softmax_entropy(bandit_step(logits, action, advantage, lr)) - softmax_entropy(logits))


def bandit_first_order_change(logits: Tensor, action: int, advantage: float, lr: float) -> float:
    r"""First order of :func:`bandit_entropy_change`:
    $-\eta A\,[\pi_a(\log\pi_a + \mathcal H) - \sum_k \pi_k^2(\log\pi_k + \mathcal H)]$ (exact in the limit $\eta\to0$)."""
    logp = torch.log_softmax(logits, -1)
    pi, h = logp.exp(), softmax_entropy(logits)
    return float(-lr * advantage * (pi[action] * (logp[action] + h) - (pi**2 * (logp + h)).sum()))
