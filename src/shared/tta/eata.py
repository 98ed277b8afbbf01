r"""EATA: Efficient Test-Time Model Adaptation without Forgetting (Niu et al., ICML 2022).

**EATA = Tent + a reliable-sample filter + a redundancy filter + entropy re-weighting + a Fisher anchor.**
ETA is EATA without the Fisher anchor.

For a test batch with softmax outputs $p(x)$ and entropies $E(x) = -\sum_c p_c(x)\log p_c(x)$:

1. *Reliable* samples (Eqn. 3): $S_1(x) = \mathbb 1[E(x) < E_0]$, $E_0 = 0.4 \ln C$.
2. *Non-redundant* samples (Eqns. 4-5): with $m_{t-1}$ the moving average of the mean prediction
   of the samples used so far,
   $S_2(x) = \mathbb 1\big[\,|\cos(p(x), m_{t-1})| < \epsilon\,\big]$ (all pass while $m$ is undefined);
   then $m_t = 0.9\, m_{t-1} + 0.1\cdot\mathrm{mean}_{x\in S}\, p(x)$ (the plain mean on the first use).
3. Re-weighting (Eqn. 6, detached): $w(x) = 1 / \exp\big(E(x) - E_0\big)$.
4. Anti-forgetting (Eqns. 8-9): $\mathcal R(\theta) = \beta \sum_i F_i (\theta_i - \theta^0_i)^2$ with
   $F$ the diagonal Fisher of the source model on clean, pseudo-labelled data.

$$\mathcal L = \frac{1}{|S|}\sum_{x\in S} w(x)\, E(x) + \beta\sum_i F_i(\theta_i-\theta_i^0)^2,
\qquad S = \{x : S_1(x) S_2(x) = 1\};$$

the backward pass and the step happen only when $S$ is non-empty (the efficiency gain).

The filters and the weight are pure functions (:func:`reliable_mask`, :func:`redundancy_mask`,
:func:`update_moving_probs`, :func:`entropy_weights`) so that SAR and DeYO reuse them;
:class:`FisherAnchor` (from :func:`compute_fisher`) is the reusable quadratic anchor.

Official code: https://github.com/mr-eggplant/EATA (``eata.py``, ``main.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.entropy import entropy_from_logits
from shared.tta.base import OptimizerFactory, TTAMethod, named_optimizer

# ## The pure pieces (shared with SAR and DeYO)


def entropy_margin(num_classes: int, factor: float = 0.4) -> float:
    r"""The reliability margin $E_0 = \text{factor}\cdot\ln C$ (EATA/SAR: factor 0.4)."""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} is not allowed: need at least 2 classes")
    if not factor > 0:
        raise ValueError(f"factor={factor} is not allowed: the margin factor must be > 0")
    return factor * math.log(num_classes)


def reliable_mask(entropy: Tensor, e_margin: float) -> Tensor:
    r"""$S_1(x) = \mathbb 1[E(x) < E_0]$: the samples whose prediction entropy is below the margin (strict)."""
    return entropy < e_margin


def redundancy_mask(probs: Tensor, moving_probs: Tensor | None, d_margin: float) -> Tensor:
    r"""$S_2(x) = \mathbb 1[\,|\cos(p(x), m)| < \epsilon\,]$ for ``probs`` ``[N, C]`` and the moving average ``m`` ``[C]``.

    Every sample passes while ``moving_probs`` is ``None`` (nothing has been used yet).
    """
    if moving_probs is None:
        return torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    if moving_probs.shape != probs.shape[1:]:
        raise ValueError(f"moving_probs has shape {tuple(moving_probs.shape)}, expected {tuple(probs.shape[1:])}")
    cos = F.cosine_similarity(moving_probs.unsqueeze(0), probs, dim=1)
    return cos.abs() < d_margin


@torch.no_grad()
def update_moving_probs(moving_probs: Tensor | None, used_probs: Tensor, momentum: float = 0.9) -> Tensor | None:
    r"""$m_t = \mu\, m_{t-1} + (1-\mu)\,\mathrm{mean}(p_\text{used})$; the plain mean when $m_{t-1}$ is undefined;
    unchanged when no sample was used (``used_probs`` has zero rows)."""
    if used_probs.shape[0] == 0:
        return moving_probs
    mean = used_probs.detach().mean(0)
    return mean if moving_probs is None else momentum * moving_probs + (1.0 - momentum) * mean


def entropy_weights(entropy: Tensor, e_margin: float) -> Tensor:
    r"""$w(x) = 1/\exp(E(x) - E_0)$, detached (no gradient flows through the weight)."""
    return torch.exp(e_margin - entropy.detach())


def weighted_entropy_loss(entropy: Tensor, mask: Tensor, e_margin: float, reweight: bool = True) -> Tensor | None:
    r"""$\frac{1}{|S|}\sum_{x\in S} w(x)E(x)$ over the samples where ``mask`` is true; ``None`` if none is."""
    if not bool(mask.any()):
        return None
    kept = entropy[mask]
    return (kept * entropy_weights(kept, e_margin)).mean() if reweight else kept.mean()


# ## The Fisher anchor


@dataclass
class FisherAnchor:
    r"""$\mathcal R(\theta) = \beta\sum_i F_i(\theta_i - \theta^0_i)^2$ for named parameters (no ½ factor, as in ``eata.py``)."""

    fisher: dict[str, Tensor]
    anchor: dict[str, Tensor]

    def penalty(self, named_parameters: Iterable[tuple[str, Tensor]], beta: float) -> Tensor:
        """$\\beta\\sum_i F_i(\\theta_i-\\theta^0_i)^2$ over the parameters whose names the anchor holds."""
        total: Tensor | None = None
        for name, p in named_parameters:
            if name in self.fisher:
                term = (self.fisher[name] * (p - self.anchor[name]) ** 2).sum()
                total = term if total is None else total + term
        if total is None:
            raise ValueError(f"no parameter matches the Fisher anchor's names {sorted(self.fisher)[:4]}...")
        return beta * total

    def total(self) -> float:
        """$\\sum_i F_i$ over all anchored parameters (the scale that sets a sensible $\\beta$)."""
        return float(sum(f.sum() for f in self.fisher.values()))


@torch.enable_grad()
def compute_fisher(model: nn.Module, clean_x: Tensor, *, batch_size: int = 64) -> FisherAnchor:
    r"""The diagonal Fisher of ``model``'s trainable parameters, as in EATA's ``main.py``:

    $$F_i = \frac{1}{K}\sum_{k=1}^{K}\Big(\frac{\partial}{\partial\theta_i}\,
    \frac{1}{|B_k|}\sum_{x\in B_k}\mathrm{CE}\big(f_\theta(x), \arg\max f_\theta(x)\big)\Big)^2,$$

    the square of each batch's *mean* gradient, averaged over the $K$ batches of ``clean_x`` (unlabelled,
    in-distribution images, pseudo-labelled with the model's own argmax). Pass the model already
    configured for adaptation (BatchNorm on batch statistics), as the official code does; the anchor
    $\theta^0$ is the parameters' current value. No parameter changes.
    """
    if clean_x.shape[0] == 0:
        raise ValueError("compute_fisher needs at least one clean image")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed: batch_size must be >= 1")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("compute_fisher found no trainable parameter: configure the model for adaptation first")
    fisher = {n: torch.zeros_like(p) for n, p in named}
    n_batches = 0
    for start in range(0, clean_x.shape[0], batch_size):
        logits = model(clean_x[start:start + batch_size])
        loss = F.cross_entropy(logits, logits.argmax(-1).detach())
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (n, _), g in zip(named, grads):
            if g is not None:
                fisher[n] += g.detach() ** 2
        n_batches += 1
    return FisherAnchor({n: f / n_batches for n, f in fisher.items()}, {n: p.detach().clone() for n, p in named})


# ## The adapters


@dataclass(frozen=True)
class EATAConfig:
    """EATA's defaults (ImageNet, ResNet-50), from the official ``main.py`` unless noted."""

    margin_factor: float = 0.4  # main.py --e_margin = 0.4 * ln(1000); E_0 = margin_factor * ln C, C from the logits
    e_margin: float | None = None  # absolute E_0 overriding margin_factor (the EATA class default is ln(1000)/2 - 1)
    d_margin: float = 0.05  # main.py --d_margin (ImageNet); CIFAR-10 harnesses use 0.4, CIFAR-100 0.1
    fisher_alpha: float = 2000.0  # main.py --fisher_alpha (beta, Eqn. 8); CIFAR harnesses use 1.0
    probs_momentum: float = 0.9  # eata.py::update_model_probs
    lr: float = 2.5e-4  # main.py: SGD lr 0.00025 at batch 64
    optimizer: str = "sgd"  # main.py: SGD momentum 0.9; "adam" for the CIFAR recipe (lr 1e-3)
    steps: int = 1  # eata.py default
    episodic: bool = False  # main.py continual protocol: never reset
    reweight: bool = True  # ablation switch: the weight w(x) of Eqn. 6
    use_redundancy: bool = True  # ablation switch: the redundancy filter S_2 of Eqn. 5

    def __post_init__(self) -> None:
        if not self.margin_factor > 0:
            raise ValueError(f"margin_factor={self.margin_factor} is not allowed: it must be > 0")
        if self.e_margin is not None and not self.e_margin > 0:
            raise ValueError(f"e_margin={self.e_margin} is not allowed: it must be > 0 (or None for margin_factor * ln C)")
        if not self.d_margin > 0:
            raise ValueError(f"d_margin={self.d_margin} is not allowed: the cosine margin must be > 0")
        if self.fisher_alpha < 0:
            raise ValueError(f"fisher_alpha={self.fisher_alpha} is not allowed: beta must be >= 0")
        if not 0 <= self.probs_momentum < 1:
            raise ValueError(f"probs_momentum={self.probs_momentum} is not allowed: need 0 <= momentum < 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} is not allowed: lr must be > 0")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer={self.optimizer!r} is not allowed: use 'sgd' or 'adam'")

    def make_optimizer(self) -> OptimizerFactory:
        return named_optimizer(self.optimizer, self.lr)

    def margin(self, num_classes: int) -> float:
        """$E_0$ for ``num_classes`` classes."""
        return self.e_margin if self.e_margin is not None else entropy_margin(num_classes, self.margin_factor)


class ETA(TTAMethod):
    r"""EATA without the Fisher anchor: entropy minimisation on reliable, non-redundant, re-weighted samples.

    Counters: ``n_seen``, ``n_reliable`` (passed $S_1$), ``n_backward`` (passed both filters: the samples
    back-propagated), ``n_updates`` (batches with a step). ``last_mask`` is the last batch's selection.
    ``entropy_loss_sum`` and ``penalty_sum`` add up, over the updates, the two terms of $\mathcal L$ (the
    weighted entropy and the anti-forgetting term, zero for ETA); :attr:`penalty_share` is their ratio.
    """

    name = "eta"

    def __init__(self, model: nn.Module, config: EATAConfig = EATAConfig(), **kw) -> None:
        self.init_from_config(model, config, **kw)
        self.moving_probs: Tensor | None = None
        self.n_seen = self.n_reliable = self.n_backward = self.n_updates = 0
        self.entropy_loss_sum = self.penalty_sum = 0.0
        self.last_mask: Tensor | None = None

    @property
    def penalty_share(self) -> float:
        r"""How much of the loss the anti-forgetting term is, over the stream:
        $\sum_t \mathcal R_t / \sum_t (\mathcal L^{\text{ent}}_t + \mathcal R_t)$ over the updates (0 before any)."""
        total = self.entropy_loss_sum + self.penalty_sum
        return self.penalty_sum / total if total > 0 else 0.0

    def regularizer(self) -> Tensor | None:
        """The anti-forgetting term added to the loss (none for ETA)."""
        return None

    def loss(self, logits: Tensor, x: Tensor) -> Tensor | None:
        cfg = self.config
        e_margin = cfg.margin(logits.shape[-1])
        entropy = entropy_from_logits(logits)
        probs = logits.softmax(-1)
        reliable = reliable_mask(entropy, e_margin)
        mask = reliable
        if cfg.use_redundancy:
            mask = reliable & redundancy_mask(probs.detach(), self.moving_probs, cfg.d_margin)
            # the moving average follows the samples that pass both filters (without S_2: the reliable ones)
        self.moving_probs = update_moving_probs(self.moving_probs, probs[mask], cfg.probs_momentum)
        self.n_seen += int(entropy.numel())
        self.n_reliable += int(reliable.sum())
        self.n_backward += int(mask.sum())
        self.last_mask = mask.detach()
        loss = weighted_entropy_loss(entropy, mask, e_margin, reweight=cfg.reweight)
        if loss is None:
            return None
        self.n_updates += 1
        reg = self.regularizer()
        self.entropy_loss_sum += float(loss.detach())
        if reg is not None:
            self.penalty_sum += float(reg.detach())
        return loss if reg is None else loss + reg

    def reset(self) -> None:
        super().reset()
        self.moving_probs = None


class EATA(ETA):
    """ETA plus the Fisher anchor $\\beta\\sum_i F_i(\\theta_i-\\theta^0_i)^2$ (Eqn. 8).

    Give either ``fisher`` (a :class:`FisherAnchor` computed elsewhere) or ``fisher_data`` (clean
    unlabelled images): then the Fisher is computed after the model is configured, as in ``main.py``.
    """

    name = "eata"

    def __init__(self, model: nn.Module, config: EATAConfig = EATAConfig(), *, fisher: FisherAnchor | None = None,
                 fisher_data: Tensor | None = None, fisher_batch_size: int = 64, **kw) -> None:
        if (fisher is None) == (fisher_data is None):
            raise ValueError("EATA needs exactly one of fisher= (a FisherAnchor) or fisher_data= (clean images)")
        super().__init__(model, config, **kw)
        self.fisher = fisher if fisher is not None else compute_fisher(self.model, fisher_data, batch_size=fisher_batch_size)
        missing = set(self.param_names) - set(self.fisher.fisher)
        if missing:
            raise ValueError(f"the Fisher anchor lacks the adapted parameters {sorted(missing)}")

    def regularizer(self) -> Tensor | None:
        if self.config.fisher_alpha == 0:
            return None
        return self.fisher.penalty(self.model.named_parameters(), self.config.fisher_alpha)
