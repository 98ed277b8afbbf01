"""Tent: fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021).

On each test batch, minimise the mean Shannon entropy of the model's own predictions,

$$\\mathcal L(x) = \\frac{1}{B} \\sum_{i=1}^{B} H\\big(\\mathrm{softmax}(f_\\theta(x_i))\\big),$$

over the affine parameters $\\theta$ of the normalisation layers only, with BatchNorm using the test
batch's statistics. One gradient step per batch, online, never reset (unless ``episodic``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from shared.entropy import entropy_from_logits
from shared.tta.base import OptimizerFactory, TTAMethod, named_optimizer


@dataclass(frozen=True)
class TentConfig:
    """Tent's defaults: Adam lr 1e-3 (the CIFAR recipe of the official code), one step, no reset."""

    lr: float = 1e-3  # official CIFAR-10-C config (Adam, batch 128); ImageNet: SGD 0.00025 at batch 64
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9)
    steps: int = 1  # official default STEPS: 1
    episodic: bool = False

    def make_optimizer(self) -> OptimizerFactory:
        return named_optimizer(self.optimizer, self.lr)


class Tent(TTAMethod):
    """Entropy minimisation on the norm layers' affine parameters (the book's shared baseline)."""

    name = "tent"

    def __init__(self, model: nn.Module, config: TentConfig = TentConfig(), **kw) -> None:
        self.init_from_config(model, config, **kw)

    def loss(self, logits: Tensor, x: Tensor) -> Tensor:
        return entropy_from_logits(logits, reduction="mean")
