r"""Lp-Reg: low-probability regularisation (Huang, Xu et al., 2025, "Low-probability Tokens Sustain
Exploration in Reinforcement Learning with Verifiable Reward", arXiv 2510.03222).

**Lp-Reg = GRPO + a penalty, on a few low-probability negative tokens, pulling them toward a
min-p-filtered copy of the rollout policy.** Rewards and group advantages are unchanged.

1. *Proxy distribution.* At each position, tokens below $\kappa$ times the top probability of the
   rollout policy $\pi_\text{old}$ are presumed noise and removed; the survivors (including the
   low-probability "reasoning sparks") are renormalised, so each gains mass:

   $$\pi_\text{proxy}(v) = \frac{\pi_\text{old}(v)\,\mathbb 1[\pi_\text{old}(v) \ge \kappa \max_u \pi_\text{old}(u)]}
   {\sum_{u} \pi_\text{old}(u)\,\mathbb 1[\pi_\text{old}(u) \ge \kappa \max_{u'} \pi_\text{old}(u')]}.$$

   As in the official code, filtered logits are set to $-10^4$ before the log-softmax, so a filtered
   token's proxy log-probability is about $-10^4$.
2. *Selection.* Among valid response tokens with $\hat A_{i,t} < 0$, take the $k = \lfloor\rho\,n_-\rfloor$
   with the lowest current $\log\pi_\theta(y_t)$ (the official code acts only when $k \ge 2$), and keep
   those with $\log\pi_\theta(y_t) < \log\pi_\text{proxy}(y_t)$: this drops filtered noise tokens and
   tokens already above their proxy value.
3. *Loss.* On a selected token the surrogate is the unclipped $-\hat A\rho_{i,t}$ plus
   $\beta$ times Schulman's k3 estimator, clamped to $[-10, 10]$ (verl's ``low_var_kl``):

   $$\ell_{i,t} = -\hat A_{i,t}\rho_{i,t} + \beta\big(e^{\delta} - \delta - 1\big),\qquad
   \delta = \log\pi_\text{proxy}(y_t) - \log\pi_\theta(y_t).$$

   For tokens sampled from $\pi_\theta$ this estimates $\mathrm{KL}(\pi_\theta \Vert \pi_\text{proxy})$;
   its gradient in $\log\pi_\theta(y_t)$ is $\beta(1 - \pi_\text{proxy}/\pi_\theta) < 0$, so it raises
   the token. All other tokens keep the clipped surrogate with a very loose range
   ($\varepsilon_\text{low} = 1$, $\varepsilon_\text{high} = 9$, i.e. $\rho \in [0, 10]$). Inside that range the
   clipped and unclipped surrogates coincide, so the replacement is GRPO's per-token loss plus the
   penalty on the selected tokens: that is what :func:`lp_reg_loss` adds through ``GRPOHooks.extra_loss``.

On-policy (one update per rollout, the paper's headline setting) $\pi_\theta = \pi_\text{old}$ when the loss
is computed, so the proxy is built from the detached logits of the batch. An off-policy variant
(several mini-batches per rollout) would need the rollout's full logits, which ``TokenBatch`` does not
carry; :func:`lp_reg_loss` is therefore on-policy only.

Diagnostics (the paper's mass bands, on any distribution): :func:`spark_mass` is the probability on
plausible low-probability tokens ($\kappa p_\max \le \pi(v) < \tau$), :func:`noise_mass` the probability
on presumed noise ($\pi(v) < \kappa p_\max$).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from shared.entropy import entropy_from_probs
from shared.lm.rollout import Rollout
from shared.models.transformer import TinyTransformer
from shared.rl.grpo import GRPOHooks, TokenBatch, aggregate, response_logits
from shared.sampling import min_p_mask

MASK_LOGIT: float = -1e4  # official ``apply_min_p``: filtered logits are set to -1e4, not -inf
KL_CLAMP: float = 10.0  # verl ``kl_penalty``: the k3 value is clamped to [-10, 10]


@dataclass(frozen=True)
class LpRegConfig:
    """Lp-Reg's knobs; defaults from the official Qwen3-14B on-policy script (``recipe/lp_reg/``)."""

    kappa: float = 0.02  # ``minp_p_threshold``: noise = below kappa * p_max of pi_old
    rho: float = 0.01  # ``logp_neg_k_percent``: fraction of negative-advantage tokens considered
    beta: float = 1.0  # ``ppo_kl_coef``, with ``kl_type="low_var_kl"`` (k3, clamped to [-10, 10])
    clip_low: float = 1.0  # ``clip_ratio_low``: ratio >= 0
    clip_high: float = 9.0  # ``clip_ratio_high``: ratio <= 10

    def __post_init__(self) -> None:
        if not 0.0 < self.kappa < 1.0:
            raise ValueError(f"kappa={self.kappa} is not allowed: 0 < kappa < 1")
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"rho={self.rho} is not allowed: 0 < rho <= 1")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta} is not allowed: beta >= 0")
        if not (0.0 <= self.clip_low <= 1.0 and self.clip_high >= 0.0):
            raise ValueError(f"clip range ({self.clip_low}, {self.clip_high}) is not allowed: 0 <= clip_low <= 1, clip_high >= 0")


# ## Pure pieces


def noise_filter(logits: Tensor, kappa: float) -> Tensor:
    r"""``True`` where $\pi(v) < \kappa \max_u \pi(u)$ (the tokens the proxy removes), over the last dim:
    the tokens min-p sampling drops (:func:`shared.sampling.min_p_mask` with ``min_p = kappa``)."""
    return torch.isneginf(min_p_mask(logits.float(), kappa))


def proxy_log_probs(logits: Tensor, kappa: float) -> Tensor:
    r"""$\log\pi_\text{proxy}$ over the vocabulary: filtered logits set to $-10^4$, then log-softmax."""
    z = logits.detach().float()
    return torch.log_softmax(z.masked_fill(noise_filter(z, kappa), MASK_LOGIT), -1)


def k3_penalty(logp: Tensor, target_logp: Tensor) -> Tensor:
    r"""$e^{\delta} - \delta - 1$ with $\delta = \log\pi_\text{target} - \log\pi_\theta$, clamped to $[-10, 10]$ (verl ``low_var_kl``)."""
    delta = target_logp - logp
    return (torch.exp(delta) - delta - 1).clamp(-KL_CLAMP, KL_CLAMP)


def select_tokens(logp: Tensor, proxy_logp: Tensor, advantages: Tensor, mask: Tensor, rho: float) -> Tensor:
    r"""Boolean ``[B, L]``: the $\lfloor\rho\,n_-\rfloor$ lowest-$\log\pi_\theta$ valid tokens with $\hat A<0$
    (none unless that count is at least 2, as in the official code), kept where $\log\pi_\theta < \log\pi_\text{proxy}$."""
    selected = torch.zeros_like(mask, dtype=torch.bool)
    neg = (mask.bool() & (advantages < 0)).reshape(-1).nonzero(as_tuple=True)[0]
    k = max(1, int(len(neg) * rho))
    if k <= 1:
        return selected
    lp = logp.detach().reshape(-1)
    lowest = neg[lp[neg].topk(k, largest=False).indices]
    flat = selected.reshape(-1)
    flat[lowest] = lp[lowest] < proxy_logp.detach().reshape(-1)[lowest]
    return flat.reshape(mask.shape)


def token_proxy_log_prob(logits: Tensor, token_logp: Tensor, kappa: float) -> Tensor:
    r"""$\log\pi_\text{proxy}(y_t)$ of the sampled tokens from the logits ``[..., V]`` and $\log\pi(y_t)$ ``[...]``
    (the same distribution): $\log\pi(y_t) - \log\sum_{u\,\text{kept}}\pi(u)$ if $y_t$ is kept, else
    $-10^4 - \operatorname{logsumexp}$ of the filtered logits, as :func:`proxy_log_probs` gives."""
    z = logits.detach().float()
    logp_all = torch.log_softmax(z, -1)
    noise = noise_filter(z, kappa)
    log_kept = torch.logsumexp(logp_all.masked_fill(noise, float("-inf")), -1)
    lp = token_logp.detach().float()
    kept = torch.exp(lp) >= kappa * torch.exp(logp_all.amax(-1))
    return torch.where(kept, lp - log_kept, MASK_LOGIT - torch.logsumexp(z.masked_fill(noise, MASK_LOGIT), -1))


def lp_reg_terms(batch: TokenBatch, config: LpRegConfig) -> tuple[Tensor, Tensor]:
    r"""Per-token penalty ``beta * k3`` (zero off the selected set) and the selection mask of one batch.

    On-policy the batch's detached logits are $\pi_\text{old}$'s, so the proxy is built from them.
    """
    penalty, selected, _ = _penalty_parts(batch, config)
    return penalty, selected


def _penalty_parts(batch: TokenBatch, config: LpRegConfig) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`lp_reg_terms` and the sampled tokens' proxy log-probabilities it was built from."""
    tokens_proxy = token_proxy_log_prob(batch.logits, batch.logp, config.kappa)
    selected = select_tokens(batch.logp, tokens_proxy, batch.advantages, batch.mask, config.rho)
    # off the set (padding has log pi = -inf) the penalty's argument is zeroed, so no inf or nan reaches the gradient
    logp = torch.where(selected, batch.logp, torch.zeros_like(batch.logp))
    penalty = config.beta * k3_penalty(logp, torch.where(selected, tokens_proxy, 0.0)) * selected
    return penalty, selected, tokens_proxy


def pull_and_push(batch: TokenBatch, selected: Tensor, tokens_proxy: Tensor, beta: float) -> dict[str, float]:
    r"""How hard the penalty lifts the tokens it touches, against the surrogate's push on the same tokens.

    On a selected token the penalty's gradient in $\log\pi_\theta(y_t)$ is $-\beta\,(e^{\delta} - 1)$, with
    $\delta = \log\pi_\text{proxy}(y_t) - \log\pi_\theta(y_t) > 0$ (zero where the k3 value is clamped): its
    *pull* raises the token by $\beta\,(e^{\delta} - 1)$. The surrogate's gradient there is $-\hat A\rho$: its
    *push* lowers a negative-advantage token by $\lvert\hat A\rvert\rho$. Both terms are aggregated with the
    same per-token weight, so ``pull / push`` is the share of the push the penalty cancels: below 1 the token
    still falls, only more slowly. On-policy $e^{\delta} - 1 = m / (1 - m)$, where $m$ is the noise mass at
    that position. Returns the batch's sums: ``n_touched`` (tokens), ``pull`` and ``push``.
    """
    with torch.no_grad():
        lp = torch.where(selected, batch.logp.detach(), torch.zeros_like(tokens_proxy))
        delta = torch.where(selected, tokens_proxy - lp, torch.zeros_like(lp))
        unclamped = (torch.exp(delta) - delta - 1) <= KL_CLAMP
        pull = torch.where(selected & unclamped, beta * (torch.exp(delta) - 1), torch.zeros_like(lp))
        ratio = torch.exp(torch.where(selected, lp - batch.old_logp, torch.zeros_like(lp)))
        push = torch.where(selected, batch.advantages.abs() * ratio, torch.zeros_like(lp))
    return {"n_touched": int(selected.sum()), "pull": float(pull.sum()), "push": float(push.sum())}


def pull_to_push(log: list[dict]) -> float:
    r"""Lp-Reg's activity over a run: $\sum \text{pull} / \sum \text{push}$ over every token it touched
    (``log`` of :func:`lp_reg_hooks`, one entry per batch; see :func:`pull_and_push`); 0 if it touched none."""
    if not log:
        raise ValueError("empty log: pass the list that lp_reg_hooks(config, aggregation, log) filled during training")
    push = sum(e["push"] for e in log)
    return sum(e["pull"] for e in log) / push if push > 0 else 0.0


# ## The hooks


def lp_reg_loss(config: LpRegConfig = LpRegConfig(), aggregation: str = "token-mean",
                log: list | None = None) -> Callable[[TokenBatch], Tensor]:
    """``GRPOHooks.extra_loss``: the Lp-Reg penalty aggregated like the surrogate (paper: token-mean).
    ``log``, if given, gets one entry per batch: :func:`pull_and_push` (the tokens touched, pull and push)."""

    def extra_loss(batch: TokenBatch) -> Tensor:
        penalty, selected, tokens_proxy = _penalty_parts(batch, config)
        if log is not None:
            log.append(pull_and_push(batch, selected, tokens_proxy, config.beta))
        return aggregate(penalty, batch.mask, aggregation, max_len=batch.mask.shape[-1])

    return extra_loss


def lp_reg_hooks(config: LpRegConfig = LpRegConfig(), aggregation: str = "token-mean", log: list | None = None) -> GRPOHooks:
    """The full Lp-Reg change to GRPO: the loose clip range and the penalty on selected tokens
    (``log``: see :func:`lp_reg_loss`)."""

    def clip_ranges(batch: TokenBatch) -> tuple[Tensor, Tensor]:
        return torch.tensor(config.clip_low), torch.tensor(config.clip_high)

    return GRPOHooks(clip_ranges=clip_ranges, extra_loss=lp_reg_loss(config, aggregation, log))


# ## Diagnostics: probability mass in the paper's bands


def noise_mass(probs: Tensor, kappa: float = 0.02) -> Tensor:
    r"""$\sum_v \pi(v)\,\mathbb 1[\pi(v) < \kappa p_\max]$ over the last dim: the mass the proxy removes."""
    return (probs * (probs < kappa * probs.amax(-1, keepdim=True))).sum(-1)


def spark_mass(probs: Tensor, kappa: float = 0.02, tail: float = 0.1) -> Tensor:
    r"""$\sum_v \pi(v)\,\mathbb 1[\kappa p_\max \le \pi(v) < \tau]$ over the last dim ($\tau$ = ``tail``): plausible low-probability tokens."""
    keep = (probs >= kappa * probs.amax(-1, keepdim=True)) & (probs < tail)
    return (probs * keep).sum(-1)


@torch.no_grad()
def teacher_forced_bands(model: TinyTransformer, rollout: Rollout, kappa: float = 0.02, tail: float = 0.1,
                         rows: int | None = None) -> dict[str, float]:
    """Mean spark mass, noise mass, contested mass (runners-up at or above ``tail``: the tokens a sharpening
    policy moves down into the spark band) and entropy (nats) of ``model`` over the valid tokens of a fixed
    ``rollout`` (teacher-forced: the responses are given, only the model's distributions at their positions change).

    ``model`` is any policy :func:`~shared.rl.grpo.response_logits` accepts (the tiny LM or an
    :class:`~shared.lm.hf_policy.HFPolicy`), on the rollout's device. ``rows`` bounds memory: the rollout is
    teacher-forced that many responses at a time (a 150k-token vocabulary makes ``[B, L, V]`` large); ``None``
    takes all rows in one pass.
    """
    was_training = model.training
    model.eval()
    sums = {"spark": 0.0, "noise": 0.0, "contested": 0.0, "entropy": 0.0}
    for part in rollout.chunks(rows):
        probs = torch.softmax(response_logits(model, part), -1)
        m = part.mask.float()
        contested = (probs * ((probs >= tail) & (probs < probs.amax(-1, keepdim=True)))).sum(-1)
        bands = {"spark": spark_mass(probs, kappa, tail), "noise": noise_mass(probs, kappa), "contested": contested,
                 "entropy": entropy_from_probs(probs)}
        del probs
        for key, x in bands.items():
            sums[key] = sums[key] + (x * m).sum()
    model.train(was_training)
    n = rollout.mask.float().sum().clamp(min=1)
    return {key: float(total / n) for key, total in sums.items()}
