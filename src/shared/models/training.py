"""Train a source model once, deterministically, and cache it on disk keyed by its full settings.

A chapter asks for ``source_model(SourceConfig(norm="gn"))``: the first call trains it (a few seconds
on a CPU, one thread, seeded) and saves the weights under the cache folder; later calls, in the same
notebook or another chapter, load the identical weights. Training is deterministic, so a cache hit
and a fresh training give the same tensors bit for bit. Nothing is ever downloaded.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.cache import cache_dir, cache_key
from shared.data.digits_c import load_digits_splits
from shared.models.cnn import SmallCNN, accuracy

SOURCE_CODE: tuple[str, ...] = ("shared.models.training", "shared.models.cnn", "shared.data.digits_c")
"""The code a cached source model depends on (part of its cache key, with the CPU kernels)."""


@dataclass(frozen=True)
class SourceConfig:
    """Everything that determines a source model's weights (the cache key)."""

    norm: str = "bn"
    width: int = 16
    classes: tuple[int, ...] = tuple(range(10))  # train on these digits only (open-set models use 0-5)
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    augment_shift: int = 1  # random ±pixels translation during training
    seed: int = 0
    data_seed: int = 0
    version: int = 1  # bump when the training code changes




def shift_images(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by a random integer offset in ``[-max_shift, max_shift]`` (zero padding)."""
    if max_shift == 0:
        return x
    n, _, s, _ = x.shape
    pad = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    return torch.stack([pad[i, :, dy[i]:dy[i] + s, dx[i]:dx[i] + s] for i in range(n)])


def fit_classifier(model: nn.Module, n_train: int, batch: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]],
                   *, epochs: int, batch_size: int, lr: float, weight_decay: float, generator: torch.Generator) -> nn.Module:
    """The book's one source-training loop: Adam with a cosine schedule, shuffled mini-batches, cross-entropy.

    ``batch(ids, generator)`` returns the (augmented) images and labels of the training indices ``ids``;
    ``generator`` drives the shuffling and the augmentation, so training is deterministic.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * -(-n_train // batch_size))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=generator)
        for start in range(0, n_train, batch_size):
            x, y = batch(perm[start:start + batch_size], generator)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@contextmanager
def one_thread():
    """Run the block on one torch thread (weights, and so caches, then do not depend on the machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_source_model(config: SourceConfig) -> SmallCNN:
    """Train :class:`SmallCNN` on the clean digits of ``config.classes`` with Adam (deterministic, one thread)."""
    with one_thread():
        g = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        train = load_digits_splits(seed=config.data_seed).train.subset(config.classes)
        label_map = {c: i for i, c in enumerate(config.classes)}
        y = torch.tensor([label_map[int(v)] for v in train.y])
        model = SmallCNN(num_classes=len(config.classes), width=config.width, norm=config.norm)
        return fit_classifier(model, len(y), lambda ids, gen: (shift_images(train.x[ids], config.augment_shift, gen), y[ids]),
                              epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                              weight_decay=config.weight_decay, generator=g)


def cached_weights(name: str, config: object, build: Callable[[], nn.Module], train: Callable[[], nn.Module],
                   use_cache: bool = True, code: Sequence[str] = SOURCE_CODE) -> nn.Module:
    """A fresh model (``build()``) holding the weights ``train()`` gives for ``config``, cached on disk.

    The cache file is ``<cache>/source-models/<name>-<key>.pt``, the key covering ``config``, the
    source of the modules ``code`` and the CPU kernels (:func:`shared.cache.cache_key`); it is
    written atomically, so two notebooks training the same model never see a half-written file.
    """
    key = cache_key(dataclasses.asdict(config), code)
    path = cache_dir() / "source-models" / f"{name}-{key}.pt"
    model = build()
    if use_cache and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    trained = train()
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(trained.state_dict(), tmp)
        os.replace(tmp, path)
    model.load_state_dict(copy.deepcopy(trained.state_dict()))
    return model.eval()


def source_model(config: SourceConfig = SourceConfig(), *, use_cache: bool = True) -> SmallCNN:
    """The trained source model for ``config``: from the disk cache if present, else trained and cached.

    Returns a fresh copy in eval mode each call, so adapters can modify it freely.
    """
    return cached_weights("smallcnn", config, lambda: SmallCNN(num_classes=len(config.classes), width=config.width, norm=config.norm),
                          lambda: train_source_model(config), use_cache)


def source_accuracy(model: SmallCNN, classes: Sequence[int] = tuple(range(10)), data_seed: int = 0) -> float:
    """Clean test accuracy of a source model on the digits of ``classes`` (labels re-indexed)."""
    test = load_digits_splits(seed=data_seed).test.subset(classes)
    label_map = {c: i for i, c in enumerate(classes)}
    return accuracy(model, test.x, torch.tensor([label_map[int(v)] for v in test.y]))
