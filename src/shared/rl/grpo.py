r"""GRPO (Shao et al., 2024, DeepSeekMath) and the DAPO options (Yu et al., 2025), on one screen.

For each prompt $q$ the policy samples a group of $G$ responses $o_1..o_G$ with verifiable rewards
$r_i$. GRPO's advantage is the group-normalised reward, shared by every token of a response,

$$\hat A_{i,t} = \frac{r_i - \mathrm{mean}(r_{1..G})}{\mathrm{std}(r_{1..G}) + \epsilon}$$

(Dr. GRPO drops the division by the std). With the importance ratio
$\rho_{i,t} = \pi_\theta(o_{i,t} \mid q, o_{i,<t}) / \pi_{\theta_\text{old}}(o_{i,t} \mid \cdot)$, the
per-token loss is the clipped surrogate of PPO with a possibly asymmetric range (DAPO's
clip-higher: $\varepsilon_\text{high} > \varepsilon_\text{low}$),

$$\ell_{i,t} = -\min\big(\rho_{i,t} \hat A_{i,t},\ \mathrm{clip}(\rho_{i,t}, 1-\varepsilon_\text{low}, 1+\varepsilon_\text{high}) \hat A_{i,t}\big)
 + \beta\,\mathrm{KL}_{k3}(\pi_\theta \Vert \pi_\text{ref})_{i,t} - \lambda_H H_{i,t},$$

aggregated either per sequence then over sequences (GRPO) or over all tokens of the batch (DAPO's
token-level loss). DAPO also drops groups whose rewards are all equal (*dynamic sampling*: their
advantage is zero) and penalises responses that run into the length limit (*overlong shaping*).

Hooks let a chapter change one step and nothing else (each defaults to the baseline):
``shape_rewards``, ``transform_advantages``, ``token_weights``, ``clip_ranges``, ``extra_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from shared.entropy import entropy_from_logits
from shared.lm.rollout import Rollout, never_sample_specials, special_ids
from shared.models.transformer import TinyTransformer

AGGREGATIONS: tuple[str, ...] = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO's knobs; the defaults are plain GRPO, with the DAPO options off (their values in comments)."""

    clip_low: float = 0.2  # PPO/GRPO epsilon; DAPO keeps 0.2 for the lower side
    clip_high: float = 0.2  # DAPO clip-higher: 0.28
    dual_clip: float | None = None  # dual-clip PPO (Ye et al., 2020): cap a negative-advantage token's loss at c|A| (verl: clip_ratio_c = 3)
    aggregation: str = "seq-mean-token-mean"  # GRPO; DAPO: "token-mean"; Dr. GRPO: "seq-mean-token-sum-norm"
    std_normalize: bool = True  # GRPO divides by the group std; Dr. GRPO does not
    kl_coef: float = 0.0  # DeepSeekMath GRPO: 0.04 (k3 estimator); DAPO: 0 (no reference model)
    entropy_coef: float = 0.0  # optional entropy bonus (0 in GRPO and DAPO)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    overlong_max: int | None = None  # DAPO overlong shaping: L_max (tokens); None = off
    overlong_buffer: int = 0  # DAPO: L_cache, the soft-penalty band before L_max
    temperature: float = 1.0  # rollout temperature; the training log-probs use the same
    ppo_epochs: int = 1  # passes over each rollout (verl: ppo_epochs; 1 = strictly on-policy)
    minibatches: int = 1  # optimiser steps per pass, on contiguous slices of the rollout (verl: batch / ppo_mini_batch_size)
    micro_batch_size: int | None = None  # rows per forward/backward, gradients accumulated (verl: ppo_micro_batch_size); None = the whole mini-batch
    max_grad_norm: float = 1.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r} is not allowed: use one of {', '.join(AGGREGATIONS)}")
        if not (0 <= self.clip_low <= 1 and self.clip_high >= 0):
            raise ValueError(f"clip range ({self.clip_low}, {self.clip_high}) is not allowed: 0 <= clip_low <= 1, clip_high >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip={self.dual_clip} is not allowed: it must be > 1 (or None)")
        if self.ppo_epochs < 1 or self.minibatches < 1:
            raise ValueError(f"ppo_epochs={self.ppo_epochs}, minibatches={self.minibatches}: both must be >= 1")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={self.micro_batch_size}: must be >= 1 or None")


@dataclass
class TokenBatch:
    """Everything a hook may look at for one update (``[B, L]`` tensors over response tokens)."""

    logp: Tensor  # log pi_theta(token), requires grad
    old_logp: Tensor  # log pi_old(token) from the rollout
    advantages: Tensor  # token-level advantages
    mask: Tensor  # valid response tokens
    entropy: Tensor  # H(pi_theta) at each position (with grad)
    logits: Tensor  # [B, L, V] at temperature T
    rewards: Tensor  # [B]
    group_ids: Tensor  # [B]
    ref_logp: Tensor | None = None


@dataclass
class GRPOHooks:
    """Where a paper changes the baseline (``None`` = GRPO's own step)."""

    shape_rewards: Callable[[Tensor, Rollout], Tensor] | None = None
    transform_advantages: Callable[[Tensor, TokenBatch], Tensor] | None = None
    token_weights: Callable[[TokenBatch], Tensor] | None = None
    clip_ranges: Callable[[TokenBatch], tuple[Tensor, Tensor]] | None = None
    extra_loss: Callable[[TokenBatch], Tensor] | None = None


# ## Pure pieces


def group_advantages(rewards: Tensor, group_ids: Tensor, std_normalize: bool = True, eps: float = 1e-6) -> Tensor:
    r"""$\hat A_i = (r_i - \bar r_g) / (\sigma_g + \epsilon)$ within each group $g$ (population std; Dr. GRPO: no division)."""
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    for g in torch.unique(group_ids):
        m = group_ids == g
        r = rewards[m].float()
        centred = r - r.mean()
        adv[m] = centred / (r.std(unbiased=False) + eps) if std_normalize else centred
    return adv


def informative_groups(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """DAPO's dynamic sampling: ``True`` for samples whose group's rewards are not all equal."""
    keep = torch.zeros_like(group_ids, dtype=torch.bool)
    for g in torch.unique(group_ids):
        m = group_ids == g
        keep[m] = bool(rewards[m].max() > rewards[m].min())
    return keep


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int) -> Tensor:
    r"""DAPO's soft overlong punishment: 0 below $L_\max - L_c$, linear to $-1$ at $L_\max$, $-1$ beyond."""
    start = max_len - buffer
    pen = torch.zeros_like(lengths, dtype=torch.float32)
    if buffer > 0:
        pen = torch.where(lengths > start, (start - lengths).float() / buffer, pen)
    return torch.where(lengths > max_len, torch.full_like(pen, -1.0), pen.clamp(min=-1.0))


def clipped_surrogate(logp: Tensor, old_logp: Tensor, adv: Tensor, clip_low: Tensor | float, clip_high: Tensor | float,
                      dual_clip: float | None = None) -> Tensor:
    r"""Per-token $-\min(\rho A, \mathrm{clip}(\rho, 1-\varepsilon_l, 1+\varepsilon_h) A)$ with $\rho = e^{\log\pi - \log\pi_\text{old}}$.

    With ``dual_clip`` $= c > 1$, a token with $A < 0$ loses at most $c|A|$ (dual-clip PPO): a very large
    ratio on a negative-advantage token no longer gives an unbounded loss (and its gradient is zero there).
    """
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - torch.as_tensor(clip_low), 1 + torch.as_tensor(clip_high))
    loss = torch.maximum(-adv * ratio, -adv * clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    r"""Schulman's unbiased, non-negative estimator of $\mathrm{KL}(\pi_\theta \Vert \pi_\text{ref})$: $e^{\delta} - \delta - 1$, $\delta = \log\pi_\text{ref} - \log\pi_\theta$."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def aggregate(values: Tensor, mask: Tensor, mode: str, max_len: int | None = None) -> Tensor:
    """Reduce per-token ``values`` over valid tokens: per sequence then batch, or over all tokens."""
    m = mask.float()
    if mode == "token-mean":
        return (values * m).sum() / m.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return ((values * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if mode == "seq-mean-token-sum-norm":  # Dr. GRPO: divide by a constant length, not each sequence's own
        return ((values * m).sum(-1) / float(max_len or values.shape[-1])).mean()
    raise ValueError(f"mode={mode!r} is not allowed: use one of {', '.join(AGGREGATIONS)}")


# ## The update


def response_logits(model: TinyTransformer, rollout: Rollout, temperature: float = 1.0) -> Tensor:
    """Logits ``[B, L, V]`` (at temperature T, specials masked) that predicted each response token."""
    full = torch.cat([rollout.prompt_tokens, rollout.tokens], 1)
    attn = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.mask)], 1)
    p = rollout.prompt_tokens.shape[1]
    logits = model(full, attention_mask=attn).logits[:, p - 1 : -1]
    return never_sample_specials(logits / temperature, special_ids(model)[2])


def grpo_loss(batch: TokenBatch, config: GRPOConfig, hooks: GRPOHooks = GRPOHooks()) -> tuple[Tensor, dict[str, float]]:
    """The GRPO/DAPO loss of one batch, with the hooks applied; returns the loss and diagnostics."""
    adv = batch.advantages if hooks.transform_advantages is None else hooks.transform_advantages(batch.advantages, batch)
    low, high = (config.clip_low, config.clip_high) if hooks.clip_ranges is None else hooks.clip_ranges(batch)
    per_token = clipped_surrogate(batch.logp, batch.old_logp, adv, low, high, config.dual_clip)
    if hooks.token_weights is not None:
        per_token = per_token * hooks.token_weights(batch)
    if config.kl_coef and batch.ref_logp is not None:
        per_token = per_token + config.kl_coef * kl_k3(batch.logp, batch.ref_logp)
    if config.entropy_coef:
        per_token = per_token - config.entropy_coef * batch.entropy
    loss = aggregate(per_token, batch.mask, config.aggregation, max_len=batch.mask.shape[-1])
    if hooks.extra_loss is not None:
        loss = loss + hooks.extra_loss(batch)
    with torch.no_grad():
        ratio = torch.exp(batch.logp - batch.old_logp)
        clipped = ((ratio < 1 - torch.as_tensor(low)) | (ratio > 1 + torch.as_tensor(high))) & batch.mask
        stats = {"loss": float(loss), "clip_fraction": float(clipped.sum() / batch.mask.sum().clamp(min=1))}
    return loss, stats


@dataclass
class StepStats:
    """What one update reports (the chapters plot these per step)."""

    values: dict[str, float] = field(default_factory=dict)


def _micro_batches(idx: Tensor, valid: Tensor, config: GRPOConfig) -> list[tuple[Tensor, float]]:
    """Split a mini-batch's rows into micro-batches with the weight of each in the mini-batch's loss.

    The weight makes the accumulated gradient equal the mini-batch's: the share of valid tokens for the
    token-level loss, the share of rows for the per-sequence ones.
    """
    size = config.micro_batch_size or len(idx)
    chunks = list(torch.split(idx, size))
    if len(chunks) == 1:
        return [(idx, 1.0)]
    if config.aggregation == "token-mean":
        total = float(valid[idx].sum().clamp(min=1))
        return [(c, float(valid[c].sum()) / total) for c in chunks]
    return [(c, len(c) / len(idx)) for c in chunks]


def _token_batch(model: TinyTransformer, sub: Rollout, adv: Tensor, mask: Tensor, rewards: Tensor, group_ids: Tensor,
                 config: GRPOConfig, ref_model: TinyTransformer | None) -> TokenBatch:
    """Log-probs, entropies and logits of the current policy on the rows of ``sub``, with the rollout's data."""
    logits = response_logits(model, sub, config.temperature)
    logp = torch.log_softmax(logits, -1).gather(-1, sub.tokens[..., None]).squeeze(-1)
    ref_logp = None
    if ref_model is not None and config.kl_coef:
        with torch.no_grad():
            ref_logits = response_logits(ref_model, sub, config.temperature)
            ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, sub.tokens[..., None]).squeeze(-1)
    return TokenBatch(logp, sub.logprobs, adv[:, None].expand_as(logp), mask, entropy_from_logits(logits), logits,
                      rewards, group_ids, ref_logp)


def grpo_step(model: TinyTransformer, optimizer: torch.optim.Optimizer, rollout: Rollout, rewards: Tensor,
              group_ids: Tensor, config: GRPOConfig = GRPOConfig(), hooks: GRPOHooks = GRPOHooks(),
              ref_model: TinyTransformer | None = None) -> dict[str, float]:
    """The updates from one rollout and its verifiable rewards; returns per-step diagnostics.

    Order: shape rewards → (dynamic sampling) → group advantages → then ``ppo_epochs`` passes of
    ``minibatches`` clipped-gradient optimiser steps, each on log-probs under the current policy with
    the hooks. The default (1, 1) is one strictly on-policy step; more make the importance ratio, and
    so clipping, act. ``micro_batch_size`` only bounds memory: each mini-batch's gradient is
    accumulated over micro-batches, equal to the whole mini-batch's (hooks that use batch statistics,
    e.g. quantiles, then see one micro-batch, as in verl). Reported loss and clip fraction are means
    over the steps; the entropy is the sampling policy's.
    """
    raw_rewards = rewards.float()
    shaped = raw_rewards if hooks.shape_rewards is None else hooks.shape_rewards(raw_rewards, rollout)
    if config.overlong_max is not None:
        shaped = shaped + overlong_penalty(rollout.lengths, config.overlong_max, config.overlong_buffer)
    keep = informative_groups(shaped, group_ids) if config.dynamic_sampling else torch.ones_like(group_ids, dtype=torch.bool)
    stats = {"reward": float(raw_rewards.mean()), "kept_fraction": float(keep.float().mean()),
             "response_length": float(rollout.lengths.float().mean())}
    if not keep.any():
        return stats | {"loss": 0.0, "clip_fraction": 0.0, "entropy": float((rollout.entropies * rollout.mask).sum() / rollout.mask.sum())}
    adv = group_advantages(shaped, group_ids, config.std_normalize, config.eps)
    valid = rollout.mask & keep[:, None]
    model.train()
    rows = torch.arange(len(rewards), device=rewards.device)
    updates = []
    for _ in range(config.ppo_epochs):  # after the first step the ratio departs from 1 and clipping can bind
        for idx in torch.tensor_split(rows, config.minibatches):
            optimizer.zero_grad(set_to_none=True)
            step_stats: dict[str, float] = {}
            entropy_sum, token_count = torch.zeros(()), torch.zeros(())
            for chunk, weight in _micro_batches(idx, valid, config):
                sub = rollout.select(chunk)
                batch = _token_batch(model, sub, adv[chunk], valid[chunk], shaped[chunk], group_ids[chunk], config, ref_model)
                loss, loss_stats = grpo_loss(batch, config, hooks)
                (loss * weight).backward()
                for k, v in loss_stats.items():
                    step_stats[k] = step_stats.get(k, 0.0) + weight * v
                with torch.no_grad():
                    entropy_sum = entropy_sum.to(batch.entropy.device) + (batch.entropy * sub.mask).sum()
                    token_count = token_count.to(batch.entropy.device) + sub.mask.sum()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            updates.append((step_stats, entropy_sum, token_count))
    if len(updates) == 1:  # the default single on-policy step: its forward pass is the sampling policy
        stats["entropy"] = float(updates[0][1] / updates[0][2])
    else:  # later mini-batches see an updated policy: report the sampler's own per-token entropies
        stats["entropy"] = float((rollout.entropies * rollout.mask).sum() / rollout.mask.sum())
    loss_stats = {k: sum(u[0][k] for u in updates) / len(updates) for k in updates[0][0]}
    return stats | loss_stats
