r"""Clip-Cov and KL-Cov (Cui et al., 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning
Language Models"): keep the policy's entropy from collapsing by restraining the few tokens whose
log-probability and advantage covary most.

For a softmax policy one policy-gradient step changes the entropy by about
$-\eta\,\mathrm{Cov}(\log\pi, A)$ (see :mod:`shared.rl.tabular`), so the tokens with a large centred product

$$\mathrm{Cov}(y_i) = \big(\log\pi_\theta(y_i) - \overline{\log\pi_\theta}\big)\big(A_i - \bar A\big)$$

(over all valid response tokens of the batch, no gradient; :func:`shared.rl.entropy_terms.token_covariance`)
are the ones that drive the entropy down. With $N$ valid tokens and ratio $\rho_i = \pi_\theta/\pi_\text{old}$:

- **Clip-Cov = GRPO + a per-token weight in {0, 1}.** Among tokens that PPO's clip did not already
  clip and whose $\mathrm{Cov}(y_i) \in (\omega_\text{low}, \omega_\text{high})$, pick uniformly at random
  $\max(1, \lfloor rN\rfloor)$ and multiply their (clipped-surrogate) loss by 0: their gradient is detached.
- **KL-Cov = GRPO without clipping + a penalty on the top tokens.** Rank the tokens by $\mathrm{Cov}$; the
  top $\max(1, \lfloor kN\rfloor)$ get the loss $-A_i\rho_i + \beta\,\lvert\log\pi_\theta(y_i) - \log\pi_\text{old}(y_i)\rvert$,
  every other token $-A_i\rho_i$ (no clipping anywhere).

Both are written as :class:`shared.rl.grpo.GRPOHooks`; the token selections are pure functions.
Conventions: ``ratio`` arguments here are **fractions** of the valid tokens (upstream verl's
``clip_cov_ratio`` / ``kl_cov_ratio``); the original scripts' ``k_percent=0.2`` is a *percentage*
(0.2 % = 2e-3), see :data:`KL_COV_K_PERCENT_7B`. The covariance is centred over the whole batch the hook
sees (the official code centres over one GPU's micro-batch).

Note: when the update is exactly on-policy (one step per rollout, as in :func:`shared.rl.trainer.train_rl`),
$\log\rho = 0$ up to numerical noise, so the KL-Cov penalty is zero and its gradient is
$\beta\,\mathrm{sign}(\text{noise})\nabla\log\pi$; it acts only once $\pi_\theta$ has moved from
$\pi_\text{old}$ (later mini-batches of the same rollout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shared.rl.entropy_terms import token_covariance
from shared.rl.grpo import AGGREGATIONS, GRPOHooks, TokenBatch, aggregate

KL_COV_K_PERCENT_7B = 0.2  # official recipe/dapo/7b_kl_cov.sh: k_percent=0.2, a percentage -> fraction 2e-3
KL_COV_K_PERCENT_32B = 0.02  # official recipe/dapo/32b_kl_cov.sh -> fraction 2e-4


@dataclass(frozen=True)
class ClipCovConfig:
    """Clip-Cov's knobs; defaults from the official ``compute_policy_loss_clip_cov`` and ``7b_clip_cov.sh``."""

    ratio: float = 2e-4  # r, fraction of valid tokens detached (clip_cov_ratio=0.0002)
    omega_low: float = 1.0  # clip_cov_lb
    omega_high: float = 5.0  # clip_cov_ub
    omega_quantiles: tuple[float, float] | None = None  # if set, bounds = these quantiles of the batch's Cov (not in the paper)
    clip_low: float = 0.2  # PPO range used to find the already-clipped tokens: match GRPOConfig (7b_clip_cov.sh: 1, 1)
    clip_high: float = 0.2
    seed: int = 0  # the random pick among eligible tokens (official: torch.randperm, unseeded)

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio={self.ratio} is not allowed: a fraction of the tokens in (0, 1]")
        if self.omega_quantiles is None and not self.omega_low < self.omega_high:
            raise ValueError(f"bounds ({self.omega_low}, {self.omega_high}) are not allowed: omega_low < omega_high")
        if self.omega_quantiles is not None and not 0 <= self.omega_quantiles[0] < self.omega_quantiles[1] <= 1:
            raise ValueError(f"omega_quantiles={self.omega_quantiles} is not allowed: 0 <= q_low < q_high <= 1")


@dataclass(frozen=True)
class KLCovConfig:
    """KL-Cov's knobs; defaults from the official ``compute_policy_loss_kl_cov`` and ``7b_kl_cov.sh``."""

    ratio: float = KL_COV_K_PERCENT_7B / 100  # k as a FRACTION: 2e-3 (the script's k_percent=0.2 is in percent)
    beta: float = 1.0  # ppo_kl_coef
    aggregation: str = "token-mean"  # loss_agg_mode in the scripts; set it to the GRPOConfig's to change only the loss

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio={self.ratio} is not allowed: a fraction of the tokens in (0, 1] (k_percent/100)")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r} is not allowed: use one of {', '.join(AGGREGATIONS)}")


# ## Pure pieces


def masked_token_covariance(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    r"""$\mathrm{Cov}(y_i)$ over valid tokens, 0 elsewhere; safe when ``logp`` is $-\infty$ at padding."""
    logp = torch.where(mask, logp.detach(), torch.zeros_like(logp))
    return token_covariance(logp, advantages.detach(), mask)


def n_selected(ratio: float, n_valid: int) -> int:
    r"""$\max(1, \lfloor \text{ratio}\cdot N\rfloor)$, as in the official code."""
    return max(1, int(ratio * n_valid))


def ppo_clipped(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float) -> Tensor:
    r"""Tokens where PPO's clip binds: $-A\,\mathrm{clip}(\rho) > -A\rho$ (official ``clip_by_origin``)."""
    ratio = torch.exp(torch.where(mask, logp.detach() - old_logp, torch.zeros_like(old_logp)))
    return ((-advantages * ratio.clamp(1 - clip_low, 1 + clip_high)) > (-advantages * ratio)) & mask


def clip_cov_select(cov: Tensor, eligible: Tensor, count: int, omega_low: float, omega_high: float,
                    generator: torch.Generator | None = None) -> Tensor:
    r"""Clip-Cov's tokens: ``count`` of $E = \{i \text{ eligible}: \omega_\text{low} < \mathrm{Cov}_i < \omega_\text{high}\}$
    (all of $E$ if it is smaller), drawn uniformly without replacement; ``eligible`` = valid and not
    PPO-clipped, ``count`` = :func:`n_selected` of the number of *valid* tokens. Returns a boolean mask.
    """
    inside = eligible & (cov > omega_low) & (cov < omega_high)
    idx = torch.nonzero(inside.reshape(-1), as_tuple=True)[0]
    picked = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    if len(idx):
        perm = torch.randperm(len(idx), generator=generator)  # drawn on the generator's device (CPU), then moved
        picked[idx[perm[: min(count, len(idx))].to(idx.device)]] = True
    return picked.reshape(cov.shape)


def batch_quantile(x: Tensor, q: float) -> float:
    """The ``q``-quantile of a 1-D tensor (linear interpolation); numpy's beyond ``torch.quantile``'s
    2**24-element limit (a paper-sized batch holds millions of tokens)."""
    if x.numel() <= 2**24:
        return float(torch.quantile(x, q))
    import numpy as np

    return float(np.quantile(x.detach().float().cpu().numpy(), q))


def clip_cov_weights(batch: TokenBatch, config: ClipCovConfig, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
    """Per-token weights (0 for the detached tokens, 1 otherwise) and diagnostics for one batch."""
    mask = batch.mask
    cov = masked_token_covariance(batch.logp, batch.advantages, mask)
    low, high = config.omega_low, config.omega_high
    if config.omega_quantiles is not None:
        valid = cov[mask]
        low, high = (batch_quantile(valid, q) for q in config.omega_quantiles)
    clipped = ppo_clipped(batch.logp, batch.old_logp, batch.advantages, mask, config.clip_low, config.clip_high)
    eligible = mask & ~clipped
    n_valid = int(mask.sum())
    picked = clip_cov_select(cov, eligible, n_selected(config.ratio, n_valid), low, high, generator)
    in_band = int((eligible & (cov > low) & (cov < high)).sum())
    return (~picked).float(), {"n_valid": n_valid, "n_in_band": in_band, "n_detached": int(picked.sum()),
                               "omega_low": low, "omega_high": high}


def kl_cov_select(cov: Tensor, mask: Tensor, ratio: float) -> Tensor:
    r"""KL-Cov's tokens: the top $\max(1,\lfloor kN\rfloor)$ valid tokens by $\mathrm{Cov}$ (boolean mask)."""
    valid_idx = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    values = cov.reshape(-1)[valid_idx]
    top = torch.topk(values, min(n_selected(ratio, len(valid_idx)), len(valid_idx)), largest=True).indices
    picked = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    picked[valid_idx[top]] = True
    return picked.reshape(cov.shape)


def kl_cov_penalty(logp: Tensor, old_logp: Tensor, selected: Tensor, beta: float) -> Tensor:
    r"""Per-token $\beta\,\lvert\log\pi_\theta - \log\pi_\text{old}\rvert$ on the selected tokens, 0 elsewhere."""
    diff = torch.where(selected, logp - old_logp, torch.zeros_like(logp))
    return beta * diff.abs()


# ## Hooks


def clip_cov_hooks(config: ClipCovConfig = ClipCovConfig(), log: list | None = None) -> GRPOHooks:
    """Clip-Cov as a ``token_weights`` hook (the clipped surrogate is GRPO's own); ``log`` collects diagnostics."""
    generator = torch.Generator().manual_seed(config.seed)

    def token_weights(batch: TokenBatch) -> Tensor:
        weights, stats = clip_cov_weights(batch, config, generator)
        if log is not None:
            log.append(stats)
        return weights

    return GRPOHooks(token_weights=token_weights)


def kl_cov_hooks(config: KLCovConfig = KLCovConfig(), log: list | None = None) -> GRPOHooks:
    r"""KL-Cov: ``clip_ranges`` opens the clip to $[0, \infty)$ (so the surrogate is $-A\rho$) and
    ``extra_loss`` adds the aggregated penalty on the top-covariance tokens."""

    def clip_ranges(batch: TokenBatch) -> tuple[Tensor, Tensor]:
        device = batch.logp.device
        return torch.tensor(1.0, device=device), torch.tensor(float("inf"), device=device)  # clamp(rho, 0, inf) = rho: no clipping

    def extra_loss(batch: TokenBatch) -> Tensor:
        cov = masked_token_covariance(batch.logp, batch.advantages, batch.mask)
        selected = kl_cov_select(cov, batch.mask, config.ratio)
        penalty = kl_cov_penalty(batch.logp, batch.old_logp, selected, config.beta)
        if log is not None:
            log.append({"n_valid": int(batch.mask.sum()), "n_penalised": int(selected.sum()),
                        "penalty": float(penalty.sum().detach())})
        return aggregate(penalty, batch.mask, config.aggregation, max_len=batch.mask.shape[-1])

    return GRPOHooks(clip_ranges=clip_ranges, extra_loss=extra_loss)


# ## Activity: how much each mechanism does in a run (the claims protocol's activity measures)


def detached_share(log: list[dict]) -> float:
    r"""Clip-Cov's activity over a run: the share of valid response tokens whose gradient it detached,
    $\sum n_\text{detached} / \sum n_\text{valid}$ over the hook's calls (``log`` of :func:`clip_cov_hooks`).

    By design it is about $r$ when the band $(\omega_\text{low}, \omega_\text{high})$ holds enough tokens,
    less when it holds fewer, and 0 when it is empty.
    """
    if not log:
        raise ValueError("empty log: pass the list that clip_cov_hooks(config, log) filled during training")
    return sum(e["n_detached"] for e in log) / max(1, sum(e["n_valid"] for e in log))


def penalised_log_ratio(log: list[dict], beta: float) -> float:
    r"""KL-Cov's activity over a run: the mean $\lvert\log\pi_\theta - \log\pi_\text{old}\rvert$ of the tokens it
    penalised, $\sum \text{penalty} / (\beta \sum n_\text{penalised})$ over the hook's calls (``log`` of :func:`kl_cov_hooks`).

    Exactly on-policy (one update per rollout) it is zero up to float noise: the penalty has no value.
    With several updates per rollout it grows with how far the policy has moved since sampling.
    """
    if not log:
        raise ValueError("empty log: pass the list that kl_cov_hooks(config, log) filled during training")
    if beta <= 0:
        raise ValueError(f"beta={beta} is not allowed: the penalty's coefficient must be > 0")
    return sum(e["penalty"] for e in log) / (beta * max(1, sum(e["n_penalised"] for e in log)))
