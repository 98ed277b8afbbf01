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
"""

from __future__ import annotations

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


class CoTTA(TTAMethod):
    """Weight-averaged teacher, augmentation-averaged pseudo-labels, stochastic restore; all parameters train.

    After each batch, ``last`` holds what the chapters plot: the anchor's mean confidence, whether the
    augmentation average was used, and the student's own logits on the batch (before its step).
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
        confidence = float(torch.softmax(self.anchor(x), -1).max(-1).values.mean())
        triggered = self.config.augment_average and confidence < self.config.threshold
        if triggered:
            views = [self.teacher(augment_digits(x, self.generator, self.config.augment))
                     for _ in range(self.config.n_augmentations)]
            return torch.stack(views).mean(0), confidence, True
        return self.teacher(x), confidence, False

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        student_logits = self.model(x)
        teacher_logits, confidence, triggered = self.pseudo_label(x)
        loss = cross_entropy_from_logits(student_logits, torch.softmax(teacher_logits, -1)).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.teacher, self.model, self.config.alpha)
        if self.config.restore and self.config.restore_prob > 0:
            stochastic_restore(self.model, self._source_state, self.config.restore_prob, self.generator)
        self.last = {"anchor_confidence": confidence, "triggered": triggered, "student_logits": student_logits.detach()}
        return teacher_logits

    def reset(self) -> None:
        """Student, teacher and optimiser back to the source state (the anchor never moves)."""
        super().reset()
        self.teacher.load_state_dict(self._source_state, strict=True)
