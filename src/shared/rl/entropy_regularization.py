r"""SIREN, selective entropy regularisation (Jiang et al., 2025, *Rethinking Entropy Regularization in
Large Reasoning Models*, arXiv 2509.25133; official code: github.com/Linn3a/siren, ``dp_actor.py``).

**SIREN = GRPO + an extra loss term**: the squared distance between a *selective* entropy of the
policy and that same entropy under the initial policy. Rewards, advantages, clipping and sampling
are GRPO's. The plain entropy bonus $-\lambda_H \bar H$ of classical RL spreads probability over every
token of a huge vocabulary at every position of a long response, and global entropy explodes; SIREN
restricts the entropy to a meaningful subset and pulls it back towards an anchor from either side.

1. **Top-p entropy** (which actions count). At each position sort the top-$k$ probabilities, keep
   the tokens *strictly before* the cumulative probability first reaches $p$ (the nucleus $N_t$; as
   coded, the crossing token is excluded, so a position with top-1 probability $\ge p$ has an empty
   nucleus and entropy 0), renormalise and take

   $$\mathcal H^p_t = -\sum_{v \in N_t} \tilde\pi(v)\log\tilde\pi(v), \qquad \tilde\pi(v) = \frac{\pi(v)}{\sum_{u\in N_t}\pi(u)}.$$

2. **Peak-entropy mask** (which states count). Within each response keep the positions whose
   $\mathcal H^p_t$ is strictly above that response's $q$-quantile ($q = 0.8$: the top 20 %).
3. **Selective entropy** $\bar{\mathcal H}_{sel}$: mean over responses of the mean of $\mathcal H^p_t$
   over the kept positions (a response with none kept contributes 0).
4. **Self-anchored regulariser**: $\mathcal H_{anc}$ is $\bar{\mathcal H}_{sel}$ on the first training
   batch under the initial policy, then fixed;

   $$\mathcal L = \mathcal L_{PG} + \beta\,\big(\bar{\mathcal H}_{sel} - \mathcal H_{anc}\big)^2 .$$

Both masks are recomputed at every forward pass and carry no gradient; the gradient flows through
the renormalised nucleus distribution at the kept positions only.

**Activity.** The term can move the policy only at the positions it *touches*: kept by the peak mask
with a nucleus of two tokens or more ($\mathcal H^p_t > 0$). :func:`touched_fraction` is their share
of the valid response positions; about $1 - q$ (20 %) at most by design, it is near 0 for a confident
policy whose nucleus is empty almost everywhere, and the hook records it at every update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from shared.entropy import top_p_entropy  # the statistic SIREN regularises (re-exported here)
from shared.rl.grpo import GRPOHooks, TokenBatch


@dataclass(frozen=True)
class SIRENConfig:
    """SIREN's knobs; defaults from ``exp_scripts/siren.sh`` and ``dp_actor.py`` of the official code."""

    coef: float = 0.005  # beta, `entropy_coeff=0.005` in siren.sh
    top_p: float = 0.8  # nucleus mass p, `entropy_topp=0.8` in siren.sh
    top_k: int = 10_000  # candidates before the nucleus cut, `entropy_topk=10000` (min(k, V) is used)
    quantile: float = 0.8  # peak mask: keep H^p_t above the per-response 0.8 quantile, `mask_ratio=0.8`
    use_top_p: bool = True  # ablation `abla_wo_topp`: False uses the full-vocabulary entropy
    use_peak_mask: bool = True  # ablation `abla_wo_token`: False keeps every response position
    use_anchor: bool = True  # ablation `abla_wo_anchor`: False gives the bonus -beta * H_sel (no anchor)

    def __post_init__(self) -> None:
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} is not allowed: 0 < top_p <= 1")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} is not allowed: top_k >= 1")
        if not 0 <= self.quantile < 1:
            raise ValueError(f"quantile={self.quantile} is not allowed: 0 <= quantile < 1")
        if self.coef < 0:
            raise ValueError(f"coef={self.coef} is not allowed: coef >= 0")


# ## Pure pieces


@torch.no_grad()
def peak_mask(values: Tensor, mask: Tensor, quantile: float = 0.8) -> Tensor:
    r"""Positions of each row whose value is strictly above the row's ``quantile`` (linear interpolation,
    over valid positions only), as the official ``mask_by_quantile``: ``[B, L]`` bool, ``False`` where ``mask`` is."""
    x = values.detach().float().masked_fill(~mask, float("nan"))
    bound = torch.nanquantile(x, quantile, dim=-1, keepdim=True)
    return (values.detach() > bound) & mask


def selective_entropy_rows(entropy: Tensor, keep: Tensor) -> Tensor:
    r"""Each row's mean of ``entropy`` over ``keep`` (``[B]``), 0 for a row with nothing kept; their mean is
    :func:`selective_entropy`, so a probe may process rows in chunks and average at the end."""
    k = keep.float()
    n = k.sum(-1)
    per_seq = (entropy * k).sum(-1) / n.clamp(min=1)
    return torch.where(n > 0, per_seq, torch.zeros_like(per_seq))


def selective_entropy(entropy: Tensor, keep: Tensor) -> Tensor:
    r"""$\bar{\mathcal H}_{sel}$ = seq-mean-token-mean of ``entropy`` over ``keep``; rows with nothing kept count as 0."""
    return selective_entropy_rows(entropy, keep).mean()


def touched_fraction(entropy: Tensor, keep: Tensor, mask: Tensor) -> float:
    r"""Share of the valid positions (``mask``) where the selective term has a gradient: kept and $\mathcal H^p_t > 0$."""
    touched = keep & mask & (entropy.detach() > 0)
    return float(touched.sum() / mask.sum().clamp(min=1))


def anchored_penalty(h_sel: Tensor, anchor: Tensor | float, coef: float) -> Tensor:
    r"""$\beta\,(\bar{\mathcal H}_{sel} - \mathcal H_{anc})^2$: zero at the anchor, pulls back from either side."""
    return coef * (h_sel - anchor) ** 2


# ## The hook


@dataclass
class SIREN:
    """SIREN's regulariser as a GRPO ``extra_loss`` hook; holds the anchor (set on the first call).

    Use ``SIREN(SIRENConfig()).hooks()`` as the ``hooks`` of :func:`shared.rl.trainer.train_rl`; a fresh
    instance per run (the anchor is the initial policy's). ``trace`` records ``H_sel`` and ``touched``
    the :func:`touched_fraction` at every update (the mechanism's activity).
    """

    config: SIRENConfig = field(default_factory=SIRENConfig)
    anchor: float | None = None
    trace: list[float] = field(default_factory=list)
    touched: list[float] = field(default_factory=list)

    def masked(self, batch: TokenBatch) -> tuple[Tensor, Tensor]:
        """The per-position entropy the term sees (top-p, with gradient) and the positions it keeps."""
        c = self.config
        h = top_p_entropy(batch.logits, c.top_p, c.top_k) if c.use_top_p else batch.entropy
        keep = peak_mask(h, batch.mask, c.quantile) if c.use_peak_mask else batch.mask
        return h, keep

    def selective(self, batch: TokenBatch) -> Tensor:
        """$\\bar{\\mathcal H}_{sel}$ of a batch under the current policy (with gradient)."""
        return selective_entropy(*self.masked(batch))

    def __call__(self, batch: TokenBatch) -> Tensor:
        h, keep = self.masked(batch)
        h_sel = selective_entropy(h, keep)
        self.trace.append(float(h_sel.detach()))
        self.touched.append(touched_fraction(h, keep, batch.mask))
        if not self.config.use_anchor:
            return -self.config.coef * h_sel
        if self.anchor is None:  # first update: the initial policy (on-policy step), as ray_trainer.py step 1
            self.anchor = float(h_sel.detach())
            if not self.anchor > 0:
                raise ValueError(f"SIREN anchor is {self.anchor}: the initial selective entropy must be > 0 "
                                 "(an anchor of 0 would turn the regulariser into an entropy penalty)")
        return anchored_penalty(h_sel, self.anchor, self.config.coef)

    def hooks(self) -> GRPOHooks:
        return GRPOHooks(extra_loss=self)
