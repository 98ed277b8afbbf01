r"""CoTTA: continual test-time domain adaptation (Wang, Fink, Van Gool, Dai, CVPR 2022).

Three copies of the source network: the **student** $f_\theta$ (trained), the **teacher**
$f_{\theta'}$ (an EMA of the student; it makes the pseudo-labels *and* the predictions) and the
frozen **anchor** $f_{\theta_0}$ (the source weights). All three normalise with the test batch's
BatchNorm statistics. On each test batch $x$:

1. *Augmentation-averaged pseudo-label*, triggered by the anchor's batch-mean confidence:

   $$\tilde y = \begin{cases} \frac1N \sum_{n=1}^{N} f_{\theta'}(\mathrm{aug}_n(x)) & \text{if } \frac1B \sum_i \max_c p_{\theta_0}(c \mid x_i) < p_{th},\\
   f_{\theta'}(x) & \text{otherwise;}\end{cases}$$

2. *Student step*: one optimiser step on every weight and bias for the soft cross-entropy
   $\mathcal L = -\frac1B \sum_i \sum_c \sigma(\tilde y_i)_c \log \sigma(f_\theta(x_i))_c$;
3. *Teacher update*: $\theta' \leftarrow \alpha\,\theta' + (1-\alpha)\,\theta$;
4. *Stochastic restore*: $W \leftarrow M \odot W_0 + (1-M) \odot W$, $M \sim \mathrm{Bernoulli}(p)$;
5. the prediction is $\tilde y$ (the teacher's, not the student's).

CoTTA = Tent's predict-then-adapt loop + a weight-averaged teacher whose (augmentation-averaged)
soft predictions replace the entropy as the target + stochastic restore to the source, with every
parameter trainable instead of the norm layers only. The EMA, restore and augmentations live in
:mod:`shared.tta.teacher` (shared with RMT).

With ``adapt=False`` steps 2 to 4 are skipped: the teacher stays the source network, and the
prediction is the source model with test-batch statistics, averaged over the same augmentations
when the anchor is unsure. That is BN-adapt plus test-time augmentation, no gradient: the control
that separates what CoTTA's weight updates add from what its augmentation ensemble gives.
How far the weights move is :func:`weight_displacement`,
$\lVert\theta - \theta_0\rVert_2 / \lVert\theta_0\rVert_2$ over every weight and bias.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from shared.entropy import cross_entropy_from_logits
from shared.tta.base import OptimizerFactory, TTAMethod, named_optimizer
from shared.tta.teacher import (DigitAugmentConfig, augment_digits, collect_weights_and_biases,
                                configure_all_parameters, ema_update, frozen_copy, stochastic_restore)


@dataclass(frozen=True)
class CoTTAConfig:
    """CoTTA's settings; defaults are the official CIFAR-10-C ones (``cifar/cfgs/cifar10/cotta.yaml``)."""

    lr: float = 1e-3  # cotta.yaml OPTIM.LR (Adam, beta 0.9, wd 0); ImageNet: SGD 0.01 (imagenet cfgs)
    optimizer: str = "adam"  # cotta.yaml OPTIM.METHOD; "sgd" = momentum 0.9
    alpha: float = 0.999  # cotta.yaml OPTIM.MT (the class default 0.99 in cotta.py is overridden)
    restore_prob: float = 0.01  # cotta.yaml OPTIM.RST (class default 0.1 overridden)
    threshold: float = 0.92  # cotta.yaml OPTIM.AP, CIFAR-10 (CIFAR-100: 0.72; class default 0.9)
    n_augmentations: int = 32  # N = 32, hard-coded in cotta.py::forward_and_adapt
    steps: int = 1  # cotta.yaml OPTIM.STEPS
    episodic: bool = False  # continual: never reset
    augment: DigitAugmentConfig = field(default_factory=DigitAugmentConfig)  # get_tta_transforms, for 16-px digits
    seed: int = 0  # the generator of the augmentations and restore masks (the official code uses torch's global RNG)
    # ablation switches (the paper's Table 2 adds them one at a time)
    augment_average: bool = True  # False: the pseudo-label is always the teacher on the plain input
    restore: bool = True  # False: no stochastic restore
    adapt: bool = True  # False: no student step, no EMA, no restore (BN-adapt + augmentation average, no gradient)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} is not allowed: lr must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} is not allowed: 0 <= alpha <= 1")
        if not 0.0 <= self.restore_prob <= 1.0:
            raise ValueError(f"restore_prob={self.restore_prob} is not allowed: 0 <= restore_prob <= 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} is not allowed: 0 <= threshold <= 1 (a probability)")
        if self.n_augmentations < 1:
            raise ValueError(f"n_augmentations={self.n_augmentations} is not allowed: n_augmentations must be >= 1")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} is not allowed: CoTTA needs steps >= 1")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer={self.optimizer!r} is not allowed: use 'adam' or 'sgd'")

    def make_optimizer(self) -> OptimizerFactory:
        return named_optimizer(self.optimizer, self.lr)


@torch.no_grad()
def weight_displacement(model: nn.Module, reference: Mapping[str, Tensor]) -> float:
    r"""$\lVert\theta - \theta_0\rVert_2 / \lVert\theta_0\rVert_2$ over every parameter named ``weight`` or
    ``bias`` (the tensors CoTTA trains and restores): how far ``model`` has moved from ``reference``."""
    moved, size = 0.0, 0.0
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] not in ("weight", "bias"):
            continue
        if name not in reference:
            raise ValueError(f"parameter {name!r} has no value in the reference state")
        ref = reference[name].to(p.device, p.dtype)
        moved += float((p - ref).pow(2).sum())
        size += float(ref.pow(2).sum())
    if size == 0.0:
        raise ValueError("the reference weights are all zero: a relative displacement is undefined")
    return math.sqrt(moved / size)


class CoTTA(TTAMethod):
    """Weight-averaged teacher, augmentation-averaged pseudo-labels, stochastic restore; all parameters train.

    After each batch, ``last`` holds what the chapters plot: the anchor's mean confidence, whether the
    augmentation average was used, the student's own logits on the batch (before its step; ``None``
    with ``adapt=False``), the fraction of the batch on which the teacher's class on the plain input
    differs from the source's (``teacher_changed``: what the weight updates change, before this
    batch's step), how many weight elements the stochastic restore reset and the L2 norm of the change
    it made (``restored``, ``restore_shift``; 0 when the restore is off).
    """

    name = "cotta"

    def __init__(self, model: nn.Module, config: CoTTAConfig = CoTTAConfig(), **kw) -> None:
        self.init_from_config(model, config, **kw)
        self.teacher = frozen_copy(self.model)  # f_θ', starts at the source weights
        self.anchor = frozen_copy(self.model)  # f_θ0, never changes
        self.generator = torch.Generator().manual_seed(config.seed)
        self.last: dict[str, object] = {}

    def configure(self) -> None:
        configure_all_parameters(self.model)

    def collect(self) -> tuple[list[nn.Parameter], list[str]]:
        return collect_weights_and_biases(self.model)

    @torch.no_grad()
    def pseudo_label(self, x: Tensor) -> tuple[Tensor, float, bool]:
        """The teacher's logits $\\tilde y$ (augmentation-averaged when the anchor is unsure), the anchor's
        batch-mean confidence, and whether the average was used."""
        logits, confidence, triggered, _ = self._label(x)
        return logits, confidence, triggered

    @torch.no_grad()
    def _label(self, x: Tensor) -> tuple[Tensor, float, bool, float]:
        """:meth:`pseudo_label`, plus the fraction of the batch on which the teacher's class on the plain
        input differs from the anchor's (what the teacher's weights change; one more teacher forward
        when the average is used, none with ``adapt=False``, where the teacher is the anchor)."""
        anchor_logits = self.anchor(x)
        confidence = float(torch.softmax(anchor_logits, -1).max(-1).values.mean())
        triggered = self.config.augment_average and confidence < self.config.threshold
        if triggered:
            views = [self.teacher(augment_digits(x, self.generator, self.config.augment))
                     for _ in range(self.config.n_augmentations)]
            logits = torch.stack(views).mean(0)
        else:
            logits = self.teacher(x)
        if not self.config.adapt:
            return logits, confidence, triggered, 0.0
        plain = self.teacher(x) if triggered else logits
        changed = float((plain.argmax(-1) != anchor_logits.argmax(-1)).double().mean())
        return logits, confidence, triggered, changed

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        if not self.config.adapt:  # the no-gradient control: the (augmented) source teacher, test-batch statistics
            teacher_logits, confidence, triggered, _ = self._label(x)
            self.last = {"anchor_confidence": confidence, "triggered": triggered, "student_logits": None,
                         "teacher_changed": 0.0, "restored": 0, "restore_shift": 0.0}
            return teacher_logits
        student_logits = self.model(x)
        teacher_logits, confidence, triggered, changed = self._label(x)
        loss = cross_entropy_from_logits(student_logits, torch.softmax(teacher_logits, -1)).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.teacher, self.model, self.config.alpha)
        restored, shift = 0, 0.0
        if self.config.restore and self.config.restore_prob > 0:
            before = [p.detach().clone() for p in self.params]
            restored = stochastic_restore(self.model, self._source_state, self.config.restore_prob, self.generator)
            shift = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(self.params, before)))
        self.last = {"anchor_confidence": confidence, "triggered": triggered, "student_logits": student_logits.detach(),
                     "teacher_changed": changed, "restored": restored, "restore_shift": shift}
        return teacher_logits

    @property
    def n_weights(self) -> int:
        """Elements of the weights and biases the student trains and the restore may reset."""
        return sum(p.numel() for p in self.params)

    def teacher_displacement(self) -> float:
        """How far the teacher (the predicting network) has moved from the source, :func:`weight_displacement`."""
        return weight_displacement(self.teacher, self._source_state)

    def student_displacement(self) -> float:
        """How far the student has moved from the source, :func:`weight_displacement`."""
        return weight_displacement(self.model, self._source_state)

    def reset(self) -> None:
        """Student, teacher and optimiser back to the source state (the anchor never moves)."""
        super().reset()
        self.teacher.load_state_dict(self._source_state, strict=True)
