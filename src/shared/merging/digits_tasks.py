r"""A four-task merging testbed on digits-c: one pre-trained encoder, four domains, four label functions.

The analogue of AdaMerging's eight vision tasks at CPU scale. The pre-trained model $\theta_0$ is the
book's GroupNorm :class:`~shared.models.cnn.SmallCNN` trained on clean digits (no BatchNorm, whose
running statistics would have to be merged too). Each task is a digits-c corruption at severity 5 with
its own label function of the digit $d$:

| task | domain | label | classes |
|---|---|---|---|
| ``digit`` | Gaussian noise | $d$ | 10 |
| ``parity`` | Gaussian blur | $d \bmod 2$ | 2 |
| ``greater-than-4`` | contrast | $[d > 4]$ | 2 |
| ``mod-3`` | pixelate | $d \bmod 3$ | 3 |

As with CLIP's zero-shot heads in the paper, each task's head is fixed before fine-tuning: a linear
probe on $\theta_0$'s features of the clean training digits. Fine-tuning then trains the whole encoder
under that frozen head on the task's corrupted training images, and $\tau_k = \theta_k - \theta_0$.
Everything is seeded and runs on one thread in seconds; :func:`finetuned_encoder` keeps each
fine-tuned encoder in the book's cache of trained weights (keyed on its settings, the code and the kernels).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.data.digits_c import corrupt, load_digits_splits
from shared.entropy import entropy_from_logits


@dataclass(frozen=True)
class DigitsTask:
    """One task: a digits-c domain and a label function of the digit."""

    name: str
    corruption: str
    severity: int
    num_classes: int
    label: Callable[[Tensor], Tensor]


TASKS: tuple[DigitsTask, ...] = (
    DigitsTask("digit", "gaussian_noise", 5, 10, lambda d: d),
    DigitsTask("parity", "gaussian_blur", 5, 2, lambda d: d % 2),
    DigitsTask("greater-than-4", "contrast", 5, 2, lambda d: (d > 4).long()),
    DigitsTask("mod-3", "pixelate", 5, 3, lambda d: d % 3),
)
"""The catalog's four tasks."""


@dataclass(frozen=True)
class TaskData:
    """A task's corrupted splits with task labels (``clean_train_x`` is for the head's linear probe)."""

    task: DigitsTask
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    clean_train_x: Tensor


def task_data(task: DigitsTask, data_seed: int = 0) -> TaskData:
    """The task's train / val / test splits, corrupted with the task's domain (deterministic)."""
    d = load_digits_splits(seed=data_seed)
    c = lambda x, seed: corrupt(x, task.corruption, task.severity, seed=seed)  # noqa: E731
    # The test images are digits-c's own corrupted test set (seed = data_seed); train and val get their own noise.
    return TaskData(task, c(d.train.x, 1000 * data_seed + 1), task.label(d.train.y), c(d.val.x, 1000 * data_seed + 2),
                    task.label(d.val.y), c(d.test.x, data_seed), task.label(d.test.y), d.train.x)


def encoder_of(model: nn.Module) -> nn.Module:
    """A copy of a :class:`SmallCNN` whose head is the identity: its output is the pooled features."""
    enc = copy.deepcopy(model)
    enc.head = nn.Identity()
    return enc.eval()


def linear_probe_head(encoder: nn.Module, x: Tensor, y: Tensor, num_classes: int, *, steps: int = 300, lr: float = 0.05, seed: int = 0) -> nn.Linear:
    """A linear head fitted by full-batch Adam on the frozen encoder's features of ``(x, y)``."""
    with torch.no_grad():
        feats = encoder.eval()(x)
    torch.manual_seed(seed)
    head = nn.Linear(feats.shape[1], num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(feats), y).backward()
        opt.step()
    return head.eval().requires_grad_(False)


def finetune_encoder(encoder: nn.Module, head: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float = 1e-3,
                     batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Fine-tune every encoder weight under a frozen head with Adam (cross-entropy, shuffled mini-batches)."""
    g = torch.Generator().manual_seed(seed)
    enc = copy.deepcopy(encoder).train().requires_grad_(True)
    head = copy.deepcopy(head).eval().requires_grad_(False)
    opt = torch.optim.Adam(enc.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), batch_size):
            ids = perm[start:start + batch_size]
            opt.zero_grad()
            F.cross_entropy(head(enc(x[ids])), y[ids]).backward()
            opt.step()
    return enc.eval().requires_grad_(False)


@torch.no_grad()
def evaluate(encoder: nn.Module, heads: Sequence[nn.Module], xs: Sequence[Tensor], ys: Sequence[Tensor]) -> dict[str, list[float]]:
    """Per-task accuracy, mean cross-entropy and mean prediction entropy (nats) of one encoder."""
    feats = encoder.eval()(torch.cat(list(xs))).split([len(x) for x in xs])
    out: dict[str, list[float]] = {"accuracy": [], "loss": [], "entropy": []}
    for f, head, y in zip(feats, heads, ys):
        logits = head(f)
        out["accuracy"].append(float((logits.argmax(-1) == y).double().mean()))
        out["loss"].append(float(F.cross_entropy(logits, y)))
        out["entropy"].append(float(entropy_from_logits(logits, reduction="mean")))
    return out


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that determines a fine-tuned task encoder (its cache key): the pre-trained GroupNorm
    SmallCNN of width ``width``, the task (its data and its linear-probe head) and the fine-tuning run."""

    task: str
    width: int = 8
    epochs: int = 5
    seed: int = 0
    lr: float = 1e-3
    batch_size: int = 64
    data_seed: int = 0


FINETUNE_CODE: tuple[str, ...] = ("shared.merging.digits_tasks", "shared.models.training", "shared.models.cnn", "shared.data.digits_c")
"""The code a cached fine-tuned encoder depends on (part of its cache key, with the CPU kernels)."""


def train_finetuned_encoder(config: FinetuneConfig) -> nn.Module:
    """:func:`finetune_encoder` on task ``config.task`` from the pre-trained encoder, under the task's
    linear-probe head (both rebuilt deterministically here), on one thread."""
    from shared.models.training import SourceConfig, one_thread, source_model

    task = {t.name: t for t in TASKS}.get(config.task)
    if task is None:
        raise ValueError(f"unknown task {config.task!r}: use one of {', '.join(t.name for t in TASKS)}")
    with one_thread():
        encoder0 = encoder_of(source_model(SourceConfig(norm="gn", width=config.width)))
        data = task_data(task, config.data_seed)
        head = linear_probe_head(encoder0, data.clean_train_x, data.train_y, task.num_classes)
        return finetune_encoder(encoder0, head, data.train_x, data.train_y, epochs=config.epochs, lr=config.lr,
                                batch_size=config.batch_size, seed=config.seed)


def finetuned_encoder(config: FinetuneConfig, *, use_cache: bool = True) -> nn.Module:
    """The fine-tuned encoder of ``config``: from the disk cache of trained weights if present, else
    trained (:func:`train_finetuned_encoder`) and cached. A fresh copy in eval mode on every call."""
    from shared.models.cnn import SmallCNN
    from shared.models.training import cached_weights

    enc = cached_weights("digits-task-encoder", config, lambda: encoder_of(SmallCNN(width=config.width, norm="gn")),
                         lambda: train_finetuned_encoder(config), use_cache, code=FINETUNE_CODE)
    return enc.requires_grad_(False)
