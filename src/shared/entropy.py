r"""
---
title: Entropy toolkit
summary: Shannon, cross-, KL, JS, Rényi and Tsallis entropies and the BALD mutual information,
  computed stably from logits or probabilities in PyTorch.
---

# Entropy toolkit

Every quantity the book measures at test time reduces to a handful of sums over a categorical
distribution $p$ on $C$ classes (or vocabulary entries):

* Shannon entropy $H(p) = -\sum_c p_c \log p_c$,
* cross-entropy $H(p, q) = -\sum_c p_c \log q_c = H(p) + D_{KL}(p \| q)$,
* Kullback-Leibler divergence $D_{KL}(p \| q) = \sum_c p_c \log (p_c / q_c)$,
* Jensen-Shannon divergence, Rényi and Tsallis entropies, the entropy of the top-$p$ nucleus, and
* the mutual information between a prediction and the model (BALD) for an ensemble.

**Conventions used everywhere in this module.**

* **Units are nats.** All logarithms are natural; there is no `base` argument. Divide by
  $\log 2$ to get bits.
* **`dim=-1` is the class / vocabulary axis.** The result has that axis removed.
* **$0 \log 0 = 0$.** Classes with zero probability (one-hot targets, logits set to $-\infty$ by
  top-$k$/top-$p$ masking) contribute nothing, and neither the value nor its gradient is `NaN`.
* **Logits go through `torch.log_softmax`** (log-sum-exp), never through `softmax().log()`.
* **No silent fallbacks.** Invalid input raises `ValueError` saying what was wrong and what is
  allowed: negative or non-normalised probabilities (tolerance `atol=1e-4` on the sum), bad
  `reduction`, temperature $\le 0$, $\alpha < 0$, mismatched shapes, non-boolean masks, and a
  mean over a fully masked selection (its value would be $0/0$).

A row of logits that is entirely $-\infty$ is not a distribution; its entropy is `NaN` unless the
position is masked out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "entropy_from_logits",
    "entropy_from_probs",
    "token_entropy",
    "top_p_entropy",
    "masked_mean",
    "cross_entropy_from_logits",
    "cross_entropy",
    "kl_divergence",
    "kl_from_logits",
    "js_divergence",
    "renyi_entropy",
    "tsallis_entropy",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "max_entropy",
    "normalized_entropy",
]

_REDUCTIONS = ("none", "mean", "sum")
_PROB_ATOL = 1e-4


# ## Validation helpers


def _check_float(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must have a floating-point dtype, got {x.dtype}")


def _norm_dim(x: Tensor, dim: int, name: str) -> int:
    """Turn a possibly negative `dim` into an index in `[0, x.ndim)`."""
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (the class axis), got a scalar")
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim={dim} is out of range for {name} with {x.ndim} dimensions")
    return dim % x.ndim


def _check_probs(p: Tensor, dim: int, name: str) -> None:
    """Probabilities must be finite, non-negative and sum to one along `dim` (atol 1e-4)."""
    _check_float(p, name)
    _norm_dim(p, dim, name)
    if torch.isnan(p).any():
        raise ValueError(f"{name} contains NaN; probabilities must be finite numbers in [0, 1]")
    if (p < 0).any():
        raise ValueError(f"{name} has negative entries (min {p.min().item():.3g}); probabilities must be >= 0")
    total = p.sum(dim)
    if not torch.allclose(total, torch.ones_like(total), rtol=0.0, atol=_PROB_ATOL):
        worst = (total - 1).abs().max().item()
        raise ValueError(
            f"{name} must sum to 1 along dim={dim} (atol {_PROB_ATOL}); largest deviation is {worst:.3g}"
        )


def _check_same_shape(a: Tensor, b: Tensor, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} and {nb} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_mask(mask: Tensor, shape: torch.Size, what: str) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a boolean tensor (True = keep), got {got}; use mask.bool()")
    if mask.shape != shape:
        raise ValueError(f"mask must have shape {tuple(shape)} ({what}), got {tuple(mask.shape)}")


# ## Safe elementwise terms
#
# $x \log y$ with the convention $0 \log y = 0$ for every $y$ (including $y = 0$).
# `torch.xlogy` gets the value right but its gradient at $x = y = 0$ is `NaN`, so we replace
# $y$ by $1$ wherever $x = 0$ *before* taking the log: both the value and the gradient are then finite.
# Where $x > 0$ and $y = 0$ the term is $-\infty$, as it should be.


def _xlogy(x: Tensor, y: Tensor) -> Tensor:
    return x * torch.log(torch.where(x > 0, y, torch.ones_like(y)))


def _shannon_terms(p: Tensor) -> Tensor:
    r"""Elementwise $-p_c \log p_c$ with $0 \log 0 = 0$."""
    return 0.0 - _xlogy(p, p)  # `0.0 - x` rather than `-x`: no negative zero for one-hot inputs


def _reduce(values: Tensor, reduction: str, mask: Tensor | None) -> Tensor:
    if reduction == "none":
        return values if mask is None else torch.where(mask, values, torch.zeros_like(values))
    if reduction == "sum":
        return values.sum() if mask is None else torch.where(mask, values, torch.zeros_like(values)).sum()
    if mask is None:
        return values.mean()
    return masked_mean(values, mask)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


# ## Shannon entropy


def entropy_from_logits(
    logits: Tensor,
    dim: int = -1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "none",
) -> Tensor:
    r"""
    Shannon entropy of $p = \mathrm{softmax}(z / T)$, in nats:

    $$H(p) = -\sum_c p_c \log p_c, \qquad \log p_c = z_c / T - \log \sum_{c'} e^{z_{c'} / T}$$

    * `logits` $z$: any shape, classes along `dim`; $-\infty$ entries are allowed (they get
      $p_c = 0$ and contribute $0$).
    * `temperature` $T > 0$: $T \to 0$ gives $H \to 0$ (argmax), $T \to \infty$ gives $H \to \log C$.
    * `mask`: optional boolean tensor with the shape of `logits` without `dim` (e.g. `[B, T]` for
      `[B, T, V]`); `True` marks a valid position.
    * `reduction`: `"none"` returns the shape of `logits` without `dim` (masked positions are $0$);
      `"sum"` sums the valid positions; `"mean"` averages over the valid positions only and raises
      `ValueError` if every position is masked.
    """
    _check_float(logits, "logits")
    d = _norm_dim(logits, dim, "logits")
    _check_reduction(reduction)
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if mask is not None:
        _check_mask(mask, logits.shape[:d] + logits.shape[d + 1 :], "logits without the class dim")
    # Log-sum-exp through `log_softmax`.
    log_p = torch.log_softmax(logits / temperature, dim=d)
    p = log_p.exp()
    # $0 \log 0 = 0$: zero out $\log p_c$ where $p_c = 0$ so that $0 \cdot (-\infty)$ never appears.
    log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
    h = 0.0 - (p * log_p).sum(d)  # `0.0 - x`, not `-x`: a one-hot gives +0.0, not -0.0
    return _reduce(h, reduction, mask)


def entropy_from_probs(probs: Tensor, dim: int = -1, reduction: str = "none") -> Tensor:
    r"""
    Shannon entropy of a probability vector, in nats, with $0 \log 0 = 0$:

    $$H(p) = -\sum_c p_c \log p_c \in [0, \log C]$$

    `probs` must be non-negative and sum to one along `dim` (atol `1e-4`); the result has `dim`
    removed. `reduction` in `{"none", "mean", "sum"}`.
    """
    _check_probs(probs, dim, "probs")
    _check_reduction(reduction)
    return _reduce(_shannon_terms(probs).sum(dim), reduction, None)


def token_entropy(logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    r"""
    Per-token entropy $H_{b,t} = -\sum_v p_{b,t,v} \log p_{b,t,v}$ (nats) of language-model logits.

    `logits` `[B, T, V]`, `mask` optional boolean `[B, T]` (`True` = real token). Returns `[B, T]`
    with masked positions set to $0$. This is exactly
    `entropy_from_logits(logits, dim=-1, temperature=temperature, mask=mask, reduction="none")`;
    average over valid tokens with `masked_mean(h, mask)`.
    """
    if isinstance(logits, Tensor) and logits.ndim != 3:
        raise ValueError(f"logits must have shape [B, T, V], got {tuple(logits.shape)}")
    return entropy_from_logits(logits, dim=-1, temperature=temperature, mask=mask, reduction="none")


def top_p_entropy(logits: Tensor, p: float = 0.8, k: int = 10_000) -> Tensor:
    r"""$\mathcal H^p_t$ of the renormalised nucleus $N_t$ = the top-$k$ tokens whose cumulative
    probability is still $< p$ (the crossing token excluded, as SIREN's official ``efficient_top_p_sampling``:
    the entropy SIREN regularises, :mod:`shared.rl.entropy_regularization`).

    ``logits`` ``[..., V]`` (``-inf`` allowed); returns ``[...]``, 0 where the nucleus is empty or a single token.
    Differentiable through the renormalised distribution; the nucleus itself carries no gradient.
    """
    with torch.no_grad():
        probs = torch.softmax(logits.float(), -1)
        top, idx = torch.topk(probs, min(k, logits.shape[-1]), dim=-1)
        cutoff = (top.cumsum(-1) < p).sum(-1, keepdim=True)  # = searchsorted(cumsum, p): first index with cum >= p
        ranks = torch.arange(top.shape[-1], device=logits.device)
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, idx, ranks < cutoff)
        nonempty = keep.any(-1)
    safe = torch.where(keep, logits, torch.full_like(logits, float("-inf")))
    safe = torch.where(nonempty[..., None], safe, torch.zeros_like(logits))  # no NaN gradient on empty nuclei
    return torch.where(nonempty, entropy_from_logits(safe), torch.zeros_like(nonempty, dtype=logits.dtype))


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    r"""
    Mean over the valid entries only:

    $$\bar{v} = \frac{\sum_i m_i v_i}{\sum_i m_i}, \qquad m_i \in \{0, 1\}$$

    `mask` is a boolean tensor with the shape of `values` (`True` = valid). With `dim=None` the
    result is a scalar; with an integer `dim` that axis is averaged and removed. Masked entries may
    hold anything, even `inf` or `NaN`: they are selected away, not multiplied by zero.

    A mean over zero valid entries is $0/0$; this raises `ValueError` (for `dim=None` if the mask
    is all `False`, otherwise if any slice along `dim` is).
    """
    _check_float(values, "values")
    _check_mask(mask, values.shape, "the shape of values")
    kept = torch.where(mask, values, torch.zeros_like(values))
    if dim is None:
        count = mask.sum()
        if count.item() == 0:
            raise ValueError("masked_mean got a mask with no True entries; a mean over nothing is undefined")
        return kept.sum() / count
    d = _norm_dim(values, dim, "values")
    count = mask.sum(d)
    if (count == 0).any():
        raise ValueError(
            f"masked_mean: {(count == 0).sum().item()} slice(s) along dim={dim} are fully masked; "
            "a mean over nothing is undefined"
        )
    return kept.sum(d) / count


# ## Cross-entropy and divergences


def cross_entropy_from_logits(logits: Tensor, target_probs: Tensor, dim: int = -1) -> Tensor:
    r"""
    Cross-entropy of the model $p = \mathrm{softmax}(z)$ under the target $q$, in nats:

    $$H(q, p) = -\sum_c q_c \log p_c = H(q) + D_{KL}(q \| p)$$

    `logits` and `target_probs` have the same shape; the result has `dim` removed. Terms with
    $q_c = 0$ are $0$ (even if $z_c = -\infty$); $q_c > 0$ with $p_c = 0$ gives $+\infty$.
    """
    _check_float(logits, "logits")
    _check_probs(target_probs, dim, "target_probs")
    _check_same_shape(logits, target_probs, "logits", "target_probs")
    log_p = torch.log_softmax(logits, dim=dim)
    log_p = torch.where(target_probs > 0, log_p, torch.zeros_like(log_p))
    return -(target_probs * log_p).sum(dim)


def cross_entropy(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    r"""
    Cross-entropy of $q$ under the reference distribution $p$ (both probabilities), in nats:

    $$H(p, q) = -\sum_c p_c \log q_c = H(p) + D_{KL}(p \| q)$$

    Same shapes; the result has `dim` removed. $0 \log q_c = 0$; $p_c > 0$ with $q_c = 0$ gives $+\infty$.
    """
    _check_probs(p, dim, "p")
    _check_probs(q, dim, "q")
    _check_same_shape(p, q, "p", "q")
    return -_xlogy(p, q).sum(dim)


def kl_divergence(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    r"""
    Kullback-Leibler divergence between probability vectors, in nats:

    $$D_{KL}(p \| q) = \sum_c p_c \log \frac{p_c}{q_c} \ge 0$$

    with $0 \log (0 / q) = 0$ and $+\infty$ wherever $p_c > 0$ and $q_c = 0$. Same shapes; `dim` removed.
    """
    _check_probs(p, dim, "p")
    _check_probs(q, dim, "q")
    _check_same_shape(p, q, "p", "q")
    return (_xlogy(p, p) - _xlogy(p, q)).sum(dim)


def kl_from_logits(logits_p: Tensor, logits_q: Tensor, dim: int = -1) -> Tensor:
    r"""
    $D_{KL}(p \| q)$ in nats for $p = \mathrm{softmax}(z^p)$, $q = \mathrm{softmax}(z^q)$:

    $$D_{KL}(p \| q) = \sum_c p_c \big(\log p_c - \log q_c\big)$$

    computed from `log_softmax` of both. Same shapes; `dim` removed. Classes with $p_c = 0$
    contribute $0$; $p_c > 0$ with $z^q_c = -\infty$ gives $+\infty$.
    """
    _check_float(logits_p, "logits_p")
    _check_float(logits_q, "logits_q")
    _check_same_shape(logits_p, logits_q, "logits_p", "logits_q")
    log_p = torch.log_softmax(logits_p, dim=dim)
    log_q = torch.log_softmax(logits_q, dim=dim)
    p = log_p.exp()
    # Select before multiplying, so that $(-\infty) - (-\infty)$ at $p_c = 0$ never reaches the product.
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * diff).sum(dim)


def js_divergence(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    r"""
    Jensen-Shannon divergence, in nats:

    $$JS(p, q) = \tfrac12 D_{KL}(p \| m) + \tfrac12 D_{KL}(q \| m), \qquad m = \tfrac12 (p + q)$$

    Symmetric, finite, $0$ iff $p = q$, and at most $\log 2$ (reached for disjoint supports).
    Same shapes; `dim` removed.
    """
    _check_probs(p, dim, "p")
    _check_probs(q, dim, "q")
    _check_same_shape(p, q, "p", "q")
    m = 0.5 * (p + q)
    js = 0.5 * (_xlogy(p, p) - _xlogy(p, m)).sum(dim) + 0.5 * (_xlogy(q, q) - _xlogy(q, m)).sum(dim)
    # JS >= 0 mathematically; clamp only the ~1e-16 negatives that rounding can produce.
    return js.clamp_min(0.0)


# ## Generalised entropies
#
# Both Rényi and Tsallis need $\sum_c p_c^a$ near $a = 1$, where $\sum_c p_c^a \approx 1$ and
# the difference to $1$ is what matters. We compute
#
# $$S_a = \sum_c p_c^a - 1 = \sum_{c: p_c > 0} p_c \,\mathrm{expm1}\big((a - 1)\log p_c\big)$$
#
# whose terms all have the same sign, so there is no cancellation, even in float32.


def _sum_pow_minus_one(p: Tensor, a: float, dim: int) -> Tensor:
    support = p > 0
    log_p = torch.log(torch.where(support, p, torch.ones_like(p)))
    if a >= 0.5:
        terms = p * torch.expm1((a - 1.0) * log_p)
    else:
        # Far from $a = 1$ there is no cancellation to avoid; $p^a - p$ also cannot overflow for tiny $p$.
        terms = torch.exp(a * log_p) - p
    return torch.where(support, terms, torch.zeros_like(terms)).sum(dim)


def _check_order(value: float, name: str, allow_inf: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a real number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {value}")


def renyi_entropy(probs: Tensor, alpha: float, dim: int = -1) -> Tensor:
    r"""
    Rényi entropy of order $\alpha \ge 0$, in nats:

    $$H_\alpha(p) = \frac{1}{1 - \alpha} \log \sum_c p_c^\alpha$$

    The special orders are handled exactly, not by plugging into the formula:

    * $\alpha = 0$: Hartley entropy $\log |\{c : p_c > 0\}|$ (log of the support size),
    * $\alpha = 1$: Shannon entropy $-\sum_c p_c \log p_c$ (the limit $\alpha \to 1$),
    * $\alpha = \infty$: min-entropy $-\log \max_c p_c$.

    $H_\alpha$ is non-increasing in $\alpha$ and equals $\log C$ for every $\alpha$ when $p$ is uniform.
    Near $\alpha = 1$ it is computed with `expm1`/`log1p` so that $\alpha = 1 \pm 10^{-6}$ agrees with
    Shannon. `probs` must be a distribution along `dim`; the result has `dim` removed.
    """
    _check_order(alpha, "alpha", allow_inf=True)
    _check_probs(probs, dim, "probs")
    if alpha == 0:
        return torch.log((probs > 0).sum(dim).to(probs.dtype))
    if alpha == 1:
        return _shannon_terms(probs).sum(dim)
    if math.isinf(alpha):
        return 0.0 - torch.log(probs.amax(dim))
    if abs(alpha - 1.0) < 0.5:
        return torch.log1p(_sum_pow_minus_one(probs, alpha, dim)) / (1.0 - alpha) + 0.0  # + 0.0: no -0.0
    # Far from 1: log-sum-exp of $\alpha \log p_c$ over the support (no underflow for large $\alpha$).
    support = probs > 0
    log_p = torch.log(torch.where(support, probs, torch.ones_like(probs))).masked_fill(~support, -math.inf)
    return torch.logsumexp(alpha * log_p, dim=dim) / (1.0 - alpha) + 0.0  # + 0.0: no -0.0


def tsallis_entropy(probs: Tensor, q: float, dim: int = -1) -> Tensor:
    r"""
    Tsallis entropy of finite order $q \ge 0$, in nats (natural-log limit):

    $$S_q(p) = \frac{1 - \sum_c p_c^q}{q - 1}, \qquad S_1(p) = -\sum_c p_c \log p_c$$

    $q = 1$ returns Shannon exactly and values near $1$ converge to it; $q = 2$ is the Gini
    impurity $1 - \sum_c p_c^2$. Sums run over the support ($0^q = 0$ for $q = 0$ too).
    `probs` must be a distribution along `dim`; the result has `dim` removed.
    """
    _check_order(q, "q", allow_inf=False)
    _check_probs(probs, dim, "probs")
    if q == 1:
        return _shannon_terms(probs).sum(dim)
    return -_sum_pow_minus_one(probs, q, dim) / (q - 1.0)


# ## Ensembles: predictive entropy, expected entropy and BALD
#
# For $M$ members $p^{(1)}, \dots, p^{(M)}$ (ensemble members, MC-dropout samples):
#
# $$\underbrace{H\Big(\tfrac1M \sum_m p^{(m)}\Big)}_{\text{predictive (total)}}
#   = \underbrace{\tfrac1M \sum_m H\big(p^{(m)}\big)}_{\text{expected (aleatoric)}}
#   + \underbrace{I}_{\text{mutual information (epistemic)}}$$


def _member_dims(member_probs: Tensor, dim: int, member_dim: int) -> tuple[int, int]:
    _check_probs(member_probs, dim, "member_probs")
    d = _norm_dim(member_probs, dim, "member_probs")
    md = _norm_dim(member_probs, member_dim, "member_probs")
    if d == md:
        raise ValueError(f"dim and member_dim must be different axes, both point to axis {d}")
    return d, md


def predictive_entropy(member_probs: Tensor, dim: int = -1, member_dim: int = 0) -> Tensor:
    r"""
    Entropy of the ensemble-mean distribution, in nats:

    $$H\big(\bar p\big), \qquad \bar p = \frac1M \sum_{m=1}^M p^{(m)}$$

    `member_probs` holds $M$ distributions along `member_dim`, classes along `dim`; the result has
    both axes removed.
    """
    d, md = _member_dims(member_probs, dim, member_dim)
    p_bar = member_probs.mean(md, keepdim=True)
    return _shannon_terms(p_bar).sum(d, keepdim=True).squeeze(max(d, md)).squeeze(min(d, md))


def expected_entropy(member_probs: Tensor, dim: int = -1, member_dim: int = 0) -> Tensor:
    r"""
    Mean entropy of the members, in nats:

    $$\frac1M \sum_{m=1}^M H\big(p^{(m)}\big)$$

    Same shapes as `predictive_entropy`.
    """
    d, md = _member_dims(member_probs, dim, member_dim)
    h = _shannon_terms(member_probs).sum(d, keepdim=True).mean(md, keepdim=True)
    return h.squeeze(max(d, md)).squeeze(min(d, md))


def mutual_information(member_probs: Tensor, dim: int = -1, member_dim: int = 0) -> Tensor:
    r"""
    BALD mutual information between the label and the model, in nats:

    $$I = H\Big(\frac1M \sum_m p^{(m)}\Big) - \frac1M \sum_m H\big(p^{(m)}\big) \in [0, \log \min(M, C)]$$

    i.e. `predictive_entropy - expected_entropy`. $0$ when all members agree; $\log 2$ for two
    members with disjoint one-hot predictions. Same shapes as `predictive_entropy`.
    """
    mi = predictive_entropy(member_probs, dim, member_dim) - expected_entropy(member_probs, dim, member_dim)
    # Jensen's inequality makes I >= 0; clamp only the tiny negatives that rounding produces
    # when the members (nearly) agree.
    return mi.clamp_min(0.0)


# ## Normalisation


def max_entropy(num_classes: int) -> float:
    r"""
    The largest entropy over $C$ classes, reached by the uniform distribution: $\log C$ nats.
    `num_classes` must be an integer $\ge 1$.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return math.log(num_classes)


def normalized_entropy(logits: Tensor, dim: int = -1) -> Tensor:
    r"""
    Entropy of $\mathrm{softmax}(z)$ divided by its maximum, dimensionless:

    $$\tilde H = \frac{H(\mathrm{softmax}(z))}{\log C} \in [0, 1]$$

    $C$ is the size of `dim`, which must be at least 2 (for $C = 1$ the ratio is $0/0$). The
    result has `dim` removed.
    """
    _check_float(logits, "logits")
    d = _norm_dim(logits, dim, "logits")
    num_classes = logits.shape[d]
    if num_classes < 2:
        raise ValueError(f"normalized_entropy needs at least 2 classes along dim={dim}, got {num_classes}")
    return entropy_from_logits(logits, dim=d) / max_entropy(num_classes)
