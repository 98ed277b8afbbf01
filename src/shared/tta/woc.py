r"""Wisdom of crowds (WoC): keep only the samples whose confidence did not drop (Lee, Das, Choo, Choi, ICCV 2023).

*Towards Open-Set Test-Time Adaptation Utilizing the Wisdom of Crowds in Entropy Minimization*,
arXiv 2308.06879. No official code; the third-party re-implementation we compare with is ``OSTTA`` in
the UniEnt repository (https://github.com/gaozhengqing/UniEnt, ``cifar/ostta.py``).

**WoC = Tent + a frozen copy of the source model + a per-sample "confidence did not drop" mask.**

Entropy minimisation asks every sample to raise the probability of its predicted class, but the
parameters are shared: one step follows the majority of the batch (the "crowd"). Samples whose
prediction agrees with the crowd (mostly correct ones) gain confidence; wrong and open-set samples
often lose it. With $\theta_o$ the frozen source model and $\theta_a$ the adapted one (before this
batch's update),

$$c_o(x) = \arg\max_c p_{\theta_o}(c \mid x), \qquad
\Delta(x) = p_{\theta_a}(c_o \mid x) - p_{\theta_o}(c_o \mid x), \qquad
S(x) = \mathbb 1[\Delta(x) \ge 0],$$

and the update minimises the entropy of the selected samples only,

$$\mathcal L = \frac{\sum_{x\in B} S(x)\, H\big(p_{\theta_a}(\cdot\mid x)\big)}{\sum_{x\in B} S(x)}
\;-\; \alpha\, H\Big(\tfrac{1}{|B|}\textstyle\sum_{x\in B} p_{\theta_a}(\cdot\mid x)\Big).$$

The second term (diversity: entropy of the batch-mean prediction) is not in the abstract; UniEnt's
re-implementation adds it with $\alpha = 0.5$ to every method, Tent included. Here it is off by
default ($\alpha = 0$) and a :class:`WoCConfig` switch.

Two details follow the re-implementation: $\theta_o$ is a copy of the model *after* Tent's
configuration, so its BatchNorm layers also normalise with the test batch's statistics (only the
affine weights stay at their source values), and ties count as selected, so on the first batch,
where $\theta_a = \theta_o$, every sample is used. One deliberate difference: when no sample is selected
(and $\alpha = 0$) no step is taken, whereas the re-implementation back-propagates an empty mean (zero
gradients) and still calls Adam's step, which moves the weights along their momentum.

:class:`WoC` wraps any adapter whose update is ``loss(logits, x)`` averaged over the batch (Tent,
EATA's ETA, ...): the adapter's loss is evaluated on the selected rows only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from shared.entropy import entropy_from_probs
from shared.tta.base import TTAMethod
from shared.tta.tent import Tent, TentConfig


def _check_probs_pair(adapted_probs: Tensor, original_probs: Tensor) -> None:
    if adapted_probs.shape != original_probs.shape or adapted_probs.dim() != 2:
        raise ValueError(f"adapted_probs and original_probs must both be [N, C], got {tuple(adapted_probs.shape)} "
                         f"and {tuple(original_probs.shape)}")


def confidence_delta(adapted_probs: Tensor, original_probs: Tensor) -> Tensor:
    r"""$\Delta(x) = p_{\theta_a}(c_o\mid x) - p_{\theta_o}(c_o\mid x)$ with $c_o = \arg\max_c p_{\theta_o}(c\mid x)$.

    Both arguments are softmax outputs ``[N, C]``; returns ``[N]``. The class is the *original* model's
    prediction, even where the adapted model predicts another class.
    """
    _check_probs_pair(adapted_probs, original_probs)
    c_o = original_probs.argmax(-1, keepdim=True)
    return (adapted_probs.gather(-1, c_o) - original_probs.gather(-1, c_o)).squeeze(-1)


def confidence_drop_mask(adapted_probs: Tensor, original_probs: Tensor) -> Tensor:
    r"""$S(x) = \mathbb 1[p_{\theta_a}(c_o\mid x) \ge p_{\theta_o}(c_o\mid x)]$: ``True`` keeps a sample.

    A sample is dropped when the adapted model is *less* confident than the original model in the
    original model's class; an unchanged confidence (a tie) keeps it.
    """
    _check_probs_pair(adapted_probs, original_probs)
    c_o = original_probs.argmax(-1, keepdim=True)
    return (adapted_probs.gather(-1, c_o) >= original_probs.gather(-1, c_o)).squeeze(-1)


def marginal_entropy(probs: Tensor) -> Tensor:
    r"""$H(\bar p)$ with $\bar p = \frac1N\sum_x p(x)$: the entropy of the batch-mean prediction (diversity)."""
    return entropy_from_probs(probs.mean(0))


def diversity_loss(probs: Tensor, weight: float) -> Tensor:
    r"""$-\alpha\, H(\bar p)$: minimising it spreads the batch's predictions over the classes."""
    return -weight * marginal_entropy(probs)


@dataclass(frozen=True)
class WoCConfig:
    """What WoC adds to its base adapter (the base keeps its own optimiser settings)."""

    diversity_weight: float = 0.0  # alpha of -alpha*H(mean p): 0 = selection only (abstract, Fig. 6);
    # UniEnt's re-implementation uses 0.5 (cifar/main.py --alpha, grid {1, 0.5, 0.2, 0.1})
    select: bool = True  # ablation switch: False uses every sample (with diversity_weight > 0: UniEnt's "Tent" baseline)

    def __post_init__(self) -> None:
        if not self.diversity_weight >= 0:
            raise ValueError(f"diversity_weight={self.diversity_weight} is not allowed: it must be >= 0")


class WoC(nn.Module):
    r"""Confidence-drop selection on top of an entropy adapter: ``WoC(Tent(model, TentConfig()), WoCConfig())``.

    The adapter's optimiser, parameters, ``steps``, ``episodic`` and :meth:`reset` are used as they are;
    only the batch its loss sees changes (the rows with $S(x)=1$), plus the optional diversity term.
    After each step, ``last_mask`` and ``last_delta`` hold $S$ and $\Delta$ of the last batch, and
    ``n_seen`` / ``n_selected`` / ``n_updates`` count samples, samples used in the loss and optimiser steps.
    """

    def __init__(self, adapter: TTAMethod, config: WoCConfig = WoCConfig()) -> None:
        super().__init__()
        if not isinstance(adapter, TTAMethod):
            raise ValueError(f"WoC wraps a TTAMethod (Tent, ETA, ...), got {type(adapter).__name__}")
        if type(adapter).forward_and_adapt is not TTAMethod.forward_and_adapt:
            raise ValueError(f"{type(adapter).__name__} overrides forward_and_adapt; WoC wraps adapters whose update "
                             "is one loss(logits, x) per step")
        if adapter.optimizer is None:
            raise ValueError(f"{type(adapter).__name__} has no optimiser: there is nothing for WoC to select for")
        self.adapter = adapter
        self.config = config
        self.name = adapter.name + ("+woc" if config.select else "") + ("+div" if config.diversity_weight > 0 else "")
        # theta_o: the configured model (batch-statistics BN) with the source weights, frozen for good.
        self.reference = copy.deepcopy(adapter.model)
        self.reference.load_state_dict(adapter._source_state)
        self.reference.requires_grad_(False)
        self.last_mask: Tensor | None = None
        self.last_delta: Tensor | None = None
        self.n_seen = self.n_selected = self.n_updates = 0

    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    @property
    def selected_share(self) -> float:
        """Share of the samples seen so far that entered the loss, ``n_selected / n_seen`` (1 before any sample:
        nothing was rejected). This is how much the selection does: 1 means it acted as plain Tent."""
        return self.n_selected / self.n_seen if self.n_seen else 1.0

    def loss(self, logits: Tensor, x: Tensor, original_probs: Tensor) -> Tensor | None:
        """The base adapter's loss on the selected rows, minus ``diversity_weight`` times $H(\\bar p)$ over the batch."""
        probs = logits.softmax(-1)
        self.last_delta = confidence_delta(probs.detach(), original_probs)
        self.last_mask = confidence_drop_mask(probs.detach(), original_probs)
        keep = self.last_mask if self.config.select else torch.ones_like(self.last_mask)
        self.n_seen += len(keep)
        self.n_selected += int(keep.sum())
        loss = self.adapter.loss(logits[keep], x[keep]) if bool(keep.any()) else None
        if self.config.diversity_weight > 0:
            div = diversity_loss(probs, self.config.diversity_weight)
            loss = div if loss is None else loss + div
        return loss

    @torch.enable_grad()
    def forward_and_adapt(self, x: Tensor) -> Tensor:
        """Frozen and adapted forwards, selection, one optimiser step; returns the pre-update logits."""
        with torch.no_grad():
            original_probs = self.reference(x).softmax(-1)
        logits = self.adapter.model(x)
        loss = self.loss(logits, x, original_probs)
        if loss is not None and loss.requires_grad:
            loss.backward()
            self.adapter.optimizer.step()
            self.adapter.optimizer.zero_grad(set_to_none=True)
            self.n_updates += 1
        return logits.detach()

    def forward(self, x: Tensor) -> Tensor:
        if self.adapter.episodic:
            self.reset()
        if self.adapter.steps == 0:
            with torch.no_grad():
                return self.adapter.model(x)
        for _ in range(self.adapter.steps):
            logits = self.forward_and_adapt(x)
        return logits

    def reset(self) -> None:
        """Reset the base adapter (source weights, fresh optimiser); the reference never changes."""
        self.adapter.reset()


def tent_woc(model: nn.Module, tent: TentConfig = TentConfig(), woc: WoCConfig = WoCConfig()) -> WoC:
    """Tent + WoC, the paper's main combination."""
    return WoC(Tent(model, tent), woc)


# ## Open-set detection metrics (known = positive class, higher score = "more likely known")


def open_set_auroc(scores: np.ndarray, is_known: np.ndarray) -> float:
    r"""AUROC of telling known from open-set samples by ``scores`` (e.g. max softmax, energy $\log\sum_c e^{z_c}$).

    Equals $P(s_\text{known} > s_\text{unknown}) + \tfrac12 P(s_\text{known} = s_\text{unknown})$ (Mann-Whitney).
    """
    from sklearn.metrics import roc_auc_score

    scores, is_known = np.asarray(scores, dtype=float), np.asarray(is_known, dtype=bool)
    if scores.shape != is_known.shape or is_known.all() or not is_known.any():
        raise ValueError("open_set_auroc needs scores and is_known of the same shape, with both known and open-set samples")
    return float(roc_auc_score(is_known, scores))


def fpr_at_95_tpr(scores: np.ndarray, is_known: np.ndarray) -> float:
    r"""FPR@95: the share of open-set samples scored at or above the threshold that keeps 95 % of known samples.

    The threshold is the 5 % quantile of the known samples' scores (the lower order statistic).
    """
    scores, is_known = np.asarray(scores, dtype=float), np.asarray(is_known, dtype=bool)
    if scores.shape != is_known.shape or is_known.all() or not is_known.any():
        raise ValueError("fpr_at_95_tpr needs scores and is_known of the same shape, with both known and open-set samples")
    threshold = np.quantile(scores[is_known], 0.05, method="lower")
    return float((scores[~is_known] >= threshold).mean())
