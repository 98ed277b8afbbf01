"""The shared shape of every test-time adapter (after the official Tent code, Wang et al., ICLR 2021).

An adapter wraps a source model and, for each incoming test batch ``x``:

1. predicts: ``logits = model(x)`` (these are the predictions that count for the online error);
2. adapts: computes an unsupervised loss from the batch and takes an optimiser step on the
   parameters it collected;

then returns the logits of step 1. :meth:`TTAMethod.reset` restores the source weights, the
normalisation statistics and the optimiser state. Subclasses change only what differs:
:meth:`TTAMethod.loss` (most methods), or :meth:`TTAMethod.forward_and_adapt` (methods with several
forward passes, e.g. SAR's sharpness-aware step or CoTTA's teacher).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def configure_norm_adaptation(model: nn.Module, *, use_batch_stats: bool = True, skip: Sequence[str] = ()) -> nn.Module:
    """Tent's ``configure_model``: freeze everything, then let the norm layers' affine weights train.

    BatchNorm layers normalise with the **current test batch's** statistics when ``use_batch_stats``
    (``track_running_stats=False`` and no running buffers, as in the official code). Layers under a
    name in ``skip`` (e.g. ``"block3"``) keep their source statistics and stay frozen.
    """
    model.train()
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if not isinstance(module, NORM_TYPES) or _skipped(name, skip):
            if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                module.eval()  # skipped BN layers keep their source statistics
            continue
        if module.weight is not None:
            module.requires_grad_(True)
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d) and use_batch_stats:
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
    return model


def collect_norm_params(model: nn.Module, skip: Sequence[str] = ()) -> tuple[list[nn.Parameter], list[str]]:
    """Tent's ``collect_params``: the affine weight and bias of every norm layer not under ``skip``."""
    params, names = [], []
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES) and not _skipped(name, skip):
            for pname, p in module.named_parameters(recurse=False):
                if pname in ("weight", "bias"):
                    params.append(p)
                    names.append(f"{name}.{pname}")
    return params, names


def adam(lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0) -> OptimizerFactory:
    """Tent's CIFAR recipe: Adam, lr 1e-3, betas (0.9, 0.999), no weight decay."""
    return lambda params: torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)


def sgd(lr: float = 2.5e-4, momentum: float = 0.9, weight_decay: float = 0.0) -> OptimizerFactory:
    """Tent's ImageNet recipe: SGD with momentum 0.9, lr 0.00025 at batch 64."""
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")


def named_optimizer(name: str, lr: float) -> OptimizerFactory:
    """``adam(lr)`` or ``sgd(lr)`` (momentum 0.9) by name: the choice every adapter config offers."""
    if name == "adam":
        return adam(lr)
    if name == "sgd":
        return sgd(lr)
    raise ValueError(f"optimizer={name!r} is not allowed: use one of {', '.join(map(repr, OPTIMIZERS))}")


class TTAMethod(nn.Module):
    """Predict-then-adapt on each batch, with reset. Subclasses override :meth:`loss` or
    :meth:`forward_and_adapt`, and may override :meth:`configure` / :meth:`collect` to move other parameters.

    Args:
        model: the source model (it is modified in place; pass a copy to keep the original).
        optimizer: a factory from the collected parameters to an optimiser (``None``: no gradient steps).
        steps: adaptation steps per batch (Tent: 1).
        episodic: reset to the source state before every batch.
        skip: module names whose norm layers stay frozen with source statistics.
    """

    name = "tta"

    def __init__(self, model: nn.Module, optimizer: OptimizerFactory | None = adam(), *, steps: int = 1,
                 episodic: bool = False, skip: Sequence[str] = ()) -> None:
        super().__init__()
        if steps < 0:
            raise ValueError(f"steps={steps} is not allowed: steps must be >= 0")
        self.model = model
        self.steps = steps
        self.episodic = episodic
        self.skip = tuple(skip)
        self.configure()
        self.params, self.param_names = self.collect()
        self.optimizer = optimizer(self.params) if (optimizer is not None and self.params) else None
        self._source_state = copy.deepcopy(self.model.state_dict())
        self._optimizer_state = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None

    def init_from_config(self, model: nn.Module, config: Any, optimizer: OptimizerFactory | None = None, **kw: Any) -> None:
        """``__init__`` of an adapter with a config dataclass: keep ``config`` (set first, so that
        ``configure``/``collect`` can read it), and build from ``optimizer`` (default: the config's
        ``make_optimizer()``) and the config's ``steps`` and ``episodic`` unless ``kw`` overrides them."""
        self.config = config
        kw.setdefault("steps", config.steps)
        kw.setdefault("episodic", config.episodic)
        TTAMethod.__init__(self, model, optimizer if optimizer is not None else config.make_optimizer(), **kw)

    # -- what adapts ---------------------------------------------------------------------------
    def configure(self) -> None:
        """Put the model in its adaptation mode (default: Tent's norm-layer configuration)."""
        configure_norm_adaptation(self.model, skip=self.skip)

    def collect(self) -> tuple[list[nn.Parameter], list[str]]:
        """The parameters the optimiser updates (default: norm affine weights)."""
        return collect_norm_params(self.model, skip=self.skip)

    # -- how it adapts -------------------------------------------------------------------------
    def loss(self, logits: Tensor, x: Tensor) -> Tensor | None:
        """The unsupervised loss on one batch; ``None`` means "no update on this batch"."""
        raise NotImplementedError

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        """One step: forward, loss, backward, optimiser step; returns the logits computed before the step."""
        logits = self.model(x)
        loss = self.loss(logits, x)
        if self.optimizer is not None and loss is not None and loss.requires_grad:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    def forward(self, x: Tensor) -> Tensor:
        if self.episodic:
            self.reset()
        if self.steps == 0:
            with torch.no_grad():
                return self.model(x)
        for _ in range(self.steps):
            logits = self.forward_and_adapt(x)
        return logits

    def reset(self) -> None:
        """Restore the source weights (and norm statistics) and a fresh optimiser state."""
        self.model.load_state_dict(self._source_state, strict=True)
        if self.optimizer is not None and self._optimizer_state is not None:
            self.optimizer.load_state_dict(self._optimizer_state)


def parameters_snapshot(params: Iterable[Tensor]) -> list[Tensor]:
    """Detached copies of ``params`` (for tests and for "did anything move?" checks)."""
    return [p.detach().clone() for p in params]
