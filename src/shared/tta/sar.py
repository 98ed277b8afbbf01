r"""SAR: Towards Stable Test-Time Adaptation in Dynamic Wild World (Niu et al., ICLR 2023).

**SAR = Tent + EATA's reliable-sample filter + a sharpness-aware (SAM) step + model recovery.**

For a test batch with entropies $E(x;\Theta)$ and $E_0 = 0.4\ln C$:

1. Reliable entropy (Eqn. 2): keep $S = \{x : E(x;\Theta) < E_0\}$.
2. Sharpness-aware entropy (Eqns. 3-5):
   $\min_\Theta \max_{\|\epsilon\|_2\le\rho} \frac{1}{|S|}\sum_{x\in S} E(x;\Theta+\epsilon)$, solved to first order by
   one SAM update: climb to $\Theta + \hat\epsilon$, $\hat\epsilon = \rho\,\nabla E / \|\nabla E\|_2$; forward the batch again;
   keep the samples of $S$ whose entropy there is still below $E_0$; their mean entropy $\mathcal L_2$ gives
   the gradient of the base SGD step taken from $\Theta$.
3. Model recovery: $e_m \leftarrow 0.9\, e_m + 0.1\,\mathcal L_2$ (first value: $\mathcal L_2$); if
   $e_m < e_0$ (0.2 in ``sar.py``) the weights and optimiser go back to their initial state.

The predictions are those of the first forward (before the update). The norm layers of the top block
are not adapted (ResNet ``layer4``, ViT ``blocks.9-11`` and the last ``norm``); name it in ``skip``.
BatchNorm layers (all of them, as in ``sar.py::configure_model``) normalise with the test batch.

Three details of the official code, kept or changed explicitly: after a reset, ``SAR.forward`` writes
the pre-reset EMA back, so the EMA is *not* cleared (kept: ``clear_ema_on_reset=False``); a batch where
no sample passes a filter takes no step here, while the official code lets SGD's momentum move the
weights on a zero gradient (changed); a reset here also clears SGD's momentum buffers, which the
official SAM wrapper keeps outside its state dict (changed, see :mod:`shared.optim.sam`).

Official code: https://github.com/mr-eggplant/SAR (``sar.py``, ``sam.py``, ``main.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from shared.entropy import entropy_from_logits
from shared.optim.sam import SAM
from shared.tta.base import OptimizerFactory, TTAMethod, configure_norm_adaptation
from shared.tta.eata import entropy_margin, reliable_mask


def official_lr(batch_size: int, arch: str = "resnet", bs1_double: bool = True) -> float:
    """SAR ``main.py``'s learning rate: ResNet (BN/GN) ``0.00025`` if ``B >= 32`` else ``2 * 0.00025 * B / 64``;
    ViT ``0.001 * B / 64``; doubled for SAR at batch size 1 (``bs1_double``, "double lr for sar under bs=1")."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed: batch_size must be >= 1")
    if arch == "resnet":
        lr = 0.00025 if batch_size >= 32 else 2 * 0.00025 * batch_size / 64
    elif arch == "vit":
        lr = 0.001 * batch_size / 64
    else:
        raise ValueError(f"arch={arch!r} is not allowed: use 'resnet' or 'vit'")
    return 2 * lr if (bs1_double and batch_size == 1) else lr


def update_ema(ema: float | None, value: float, momentum: float = 0.9) -> float:
    r"""$e_m \leftarrow \mu\, e_m + (1-\mu)\,v$; the first value is $v$ itself (``sar.py::update_ema``)."""
    return value if ema is None else momentum * ema + (1.0 - momentum) * value


@dataclass(frozen=True)
class SARConfig:
    """SAR's defaults (ImageNet, batch 64), from the official ``sar.py`` / ``sam.py`` / ``main.py``."""

    lr: float = 2.5e-4  # main.py: ResNet lr 0.00025 at batch >= 32 (see official_lr for other batch sizes)
    momentum: float = 0.9  # main.py: SGD momentum 0.9 as SAM's base optimiser
    rho: float = 0.05  # sam.py default radius, non-adaptive
    margin_factor: float = 0.4  # main.py --sar_margin_e0 = 0.4 * ln(1000); E_0 = margin_factor * ln C
    e_margin: float | None = None  # absolute E_0 overriding margin_factor
    reset_constant: float = 0.2  # sar.py: hard-coded `ema < 0.2` (tuned for 1000 classes)
    ema_momentum: float = 0.9  # sar.py::update_ema
    steps: int = 1  # sar.py default
    episodic: bool = False
    use_filter: bool = True  # ablation: reliable entropy filter (off: every sample, E_0 = inf)
    use_sam: bool = True  # ablation: SAM step (off: one plain SGD step on the filtered entropy)
    use_recovery: bool = True  # ablation: model recovery
    clear_ema_on_reset: bool = False  # sar.py: forward() writes the old EMA back after reset()

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} is not allowed: lr must be > 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum} is not allowed: need 0 <= momentum < 1")
        if not self.rho >= 0:
            raise ValueError(f"rho={self.rho} is not allowed: the SAM radius must be >= 0")
        if not self.margin_factor > 0 or (self.e_margin is not None and not self.e_margin > 0):
            raise ValueError(f"margin_factor={self.margin_factor}, e_margin={self.e_margin}: margins must be > 0")
        if not self.reset_constant >= 0:
            raise ValueError(f"reset_constant={self.reset_constant} is not allowed: it must be >= 0")
        if not 0 <= self.ema_momentum < 1:
            raise ValueError(f"ema_momentum={self.ema_momentum} is not allowed: need 0 <= momentum < 1")

    def margin(self, num_classes: int) -> float:
        """$E_0$ for ``num_classes`` classes (infinite when the filter is off)."""
        if not self.use_filter:
            return math.inf
        return self.e_margin if self.e_margin is not None else entropy_margin(num_classes, self.margin_factor)

    def make_optimizer(self) -> OptimizerFactory:
        if self.use_sam:
            return lambda params: SAM(params, torch.optim.SGD, rho=self.rho, lr=self.lr, momentum=self.momentum)
        return lambda params: torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)


class SAR(TTAMethod):
    """Sharpness-aware and reliable entropy minimisation with model recovery.

    Records: ``ema`` (the recovery EMA), ``n_resets``, ``reset_batches`` (batch indices of the resets),
    ``ema_history`` (EMA after each batch, ``nan`` while undefined), ``n_backward`` (samples in the first
    backward), ``n_seen``.
    """

    name = "sar"

    def __init__(self, model: nn.Module, config: SARConfig = SARConfig(), **kw) -> None:
        self.init_from_config(model, config, **kw)
        self.ema: float | None = None
        self.n_resets = 0
        self.reset_batches: list[int] = []
        self.ema_history: list[float] = []
        self.n_seen = self.n_backward = self._batch = 0

    def configure(self) -> None:
        # sar.py::configure_model: every BN layer on batch statistics, even in the skipped top block;
        # the skip list only keeps their affine parameters out of the optimiser.
        configure_norm_adaptation(self.model)
        for name, module in self.model.named_modules():
            if any(name == s or name.startswith(s + ".") for s in self.skip):
                module.requires_grad_(False)

    def _step_loss(self, x: Tensor, ids: Tensor, e_margin: float) -> Tensor | None:
        """Mean entropy at the current weights of the samples ``ids`` still below ``E_0`` (``None`` if none)."""
        ent = entropy_from_logits(self.model(x))[ids]
        keep = reliable_mask(ent, e_margin)
        return ent[keep].mean() if bool(keep.any()) else None

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        cfg = self.config
        opt = self.optimizer
        logits = self.model(x)
        e_margin = cfg.margin(logits.shape[-1])
        ent = entropy_from_logits(logits)
        ids = torch.nonzero(reliable_mask(ent, e_margin)).flatten()
        self.n_seen += int(ent.numel())
        self.n_backward += int(ids.numel())
        second: Tensor | None = None
        if opt is not None and ids.numel() > 0:
            opt.zero_grad(set_to_none=True)
            ent[ids].mean().backward()
            if cfg.use_sam:
                opt.first_step(zero_grad=True)  # Θ + ε̂
                second = self._step_loss(x, ids, e_margin)
                if second is None:
                    opt.restore()  # nothing reliable at Θ + ε̂: back to Θ, no step
                else:
                    second.backward()
                    opt.second_step(zero_grad=True)
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
                second = ent[ids].mean()
        if second is not None:
            self.ema = update_ema(self.ema, float(second.detach()), cfg.ema_momentum)
        if cfg.use_recovery and self.ema is not None and self.ema < cfg.reset_constant:
            ema = self.ema
            self.reset()
            self.n_resets += 1
            self.reset_batches.append(self._batch)
            self.ema = None if cfg.clear_ema_on_reset else ema
        self.ema_history.append(math.nan if self.ema is None else self.ema)
        self._batch += 1
        return logits.detach()

    def reset(self) -> None:
        """Source weights and a fresh optimiser; the EMA is cleared (``forward_and_adapt`` may write it back)."""
        super().reset()
        self.ema = None
