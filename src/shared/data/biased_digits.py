"""biased-digits: a ColoredMNIST-like binary task on scikit-learn's digits, with a spurious feature.

DeYO (Lee et al., ICLR 2024) tests test-time adaptation where a confident prediction can rest on a
shortcut. Its ColoredMNIST (after Arjovsky et al., 2019, ``dataset/ColoredMNIST_dataset.py`` of the
official code) labels a digit ``y = 1[digit >= 5]``, colours it by the label in most training images
and flips that colour-label correlation at test time. Here the colour is replaced by a **background
brightness** $b \\in \\{0, 1\\}$: every pixel is lifted toward white,

$$x' = x + s\\, b\\, (1 - x),$$

so the background (``x = 0``) gains ``+s`` (default 0.3) and the strokes (``x = 1``) are unchanged.
The spurious bit agrees with the label, $b = y$, in a fraction ``train_alignment`` (0.9) of the
training images and in only ``test_alignment`` (0.1) of the test stream. Brightness is a *global*
cue: DeYO's patch shuffle keeps every pixel value, hence the mean brightness, so a prediction made
from brightness survives the shuffle (small PLPD), while one made from the digit's shape does not.

The four **groups** are ``group = 2·y + b`` (label × background, as ``main.py`` of the official code
computes ``2*target + place``); worst-group accuracy is the minimum of the four group accuracies.
Optionally a fraction ``label_noise`` of the training labels is flipped before the background is
assigned, as the official ColoredMNIST does (25 %), which makes the shortcut more predictive than
the shape. Everything is deterministic from ``seed`` (which images are bright, which labels flip)
and ``data_seed`` (the digits split).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from shared.data.digits_c import Batch, DigitsSplit, Stream, _generator, load_digits_splits
from shared.models.cnn import SmallCNN
from shared.models.training import SOURCE_CODE, cached_weights, fit_classifier, one_thread, shift_images

GROUP_NAMES: tuple[str, ...] = ("y=0 dark", "y=0 bright", "y=1 dark", "y=1 bright")
"""``group = 2·y + b``: label ``y`` (digit >= 5) × background ``b`` (1 = bright)."""


@dataclass(frozen=True)
class BiasedDigitsConfig:
    """How the spurious background is attached to the digits (the catalog's ColoredMNIST analogue)."""

    strength: float = 0.3  # background lift s (catalog 08-deyo: "+0.3 to all background pixels")
    train_alignment: float = 0.9  # P(b = y) in training (catalog; ColoredMNIST train2 env: 0.9)
    test_alignment: float = 0.1  # P(b = y) in the test stream: the correlation flips (catalog)
    label_noise: float = 0.0  # fraction of training labels flipped (official ColoredMNIST: 0.25)
    digit_threshold: int = 5  # y = 1[digit >= 5] (ColoredMNIST: "0 if label < 5 else 1")
    seed: int = 0  # which images are bright, which training labels flip
    data_seed: int = 0  # the digits train/val/test split

    def __post_init__(self) -> None:
        for name in ("train_alignment", "test_alignment", "label_noise"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v} is not allowed: it is a probability, 0 <= {name} <= 1")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength={self.strength} is not allowed: 0 <= strength <= 1 keeps images in [0, 1]")
        if not 1 <= self.digit_threshold <= 9:
            raise ValueError(f"digit_threshold={self.digit_threshold} is not allowed: 1 <= digit_threshold <= 9")


@dataclass(frozen=True)
class BiasedSplit:
    """Images ``x`` [N, 1, S, S] in [0, 1], binary labels ``y``, background bits ``bright``, original ``digit``."""

    x: Tensor
    y: Tensor
    bright: Tensor
    digit: Tensor

    def __len__(self) -> int:
        return len(self.y)

    @property
    def group(self) -> Tensor:
        """``2·y + bright`` in {0, 1, 2, 3} (see :data:`GROUP_NAMES`)."""
        return 2 * self.y + self.bright

    @property
    def aligned(self) -> Tensor:
        """True where the background agrees with the label (the shortcut gives the right answer)."""
        return self.bright == self.y


def add_background(x: Tensor, bright: Tensor, strength: float) -> Tensor:
    """$x' = x + s\\,b\\,(1 - x)$: lift the background of the images with ``bright = 1`` by ``strength``."""
    b = bright.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return x + strength * b * (1.0 - x)


def make_biased_split(split: DigitsSplit, *, alignment: float, strength: float, label_noise: float = 0.0,
                      digit_threshold: int = 5, generator: torch.Generator) -> BiasedSplit:
    """Binary labels ``1[digit >= threshold]`` (a fraction ``label_noise`` flipped), then ``b = y`` with
    probability ``alignment`` (else ``1 - y``), then the background lift."""
    y = (split.y >= digit_threshold).long()
    flip = torch.rand(len(y), generator=generator) < label_noise
    y = torch.where(flip, 1 - y, y)
    agree = torch.rand(len(y), generator=generator) < alignment
    bright = torch.where(agree, y, 1 - y)
    return BiasedSplit(add_background(split.x, bright, strength), y, bright, split.y.clone())


def biased_digits(config: BiasedDigitsConfig = BiasedDigitsConfig()) -> tuple[BiasedSplit, BiasedSplit]:
    """The biased training split (digits' train split) and the flipped test split (digits' test split).

    Label noise applies to the training split only; test labels are clean.
    """
    digits = load_digits_splits(seed=config.data_seed)
    g_train = _generator("biased-digits", "train", config.seed, config.data_seed)
    g_test = _generator("biased-digits", "test", config.seed, config.data_seed)
    train = make_biased_split(digits.train, alignment=config.train_alignment, strength=config.strength,
                              label_noise=config.label_noise, digit_threshold=config.digit_threshold, generator=g_train)
    test = make_biased_split(digits.test, alignment=config.test_alignment, strength=config.strength,
                             label_noise=0.0, digit_threshold=config.digit_threshold, generator=g_test)
    return train, test


def biased_stream(test: BiasedSplit, *, batch_size: int = 64, seed: int = 0, rounds: int = 1) -> tuple[Stream, np.ndarray]:
    """The test split in a seeded random order, cut into batches, repeated ``rounds`` times (no reset
    in between); returns the stream and the group of every sample in stream order."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed: batch_size must be >= 1")
    if rounds < 1:
        raise ValueError(f"rounds={rounds} is not allowed: rounds must be >= 1")
    rng = np.random.default_rng([seed, 4099])
    stream, groups = Stream("biased-digits"), []
    for _ in range(rounds):
        idx = torch.from_numpy(rng.permutation(len(test)))
        for start in range(0, len(idx), batch_size):
            ids = idx[start:start + batch_size]
            stream.batches.append(Batch(test.x[ids], test.y[ids], "flipped background", 0))
            groups.append(test.group[ids].numpy())
    return stream, np.concatenate(groups)


def group_accuracies(predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Accuracy of each of the four groups (``nan`` for an empty group), in the order of :data:`GROUP_NAMES`."""
    correct = np.asarray(predictions) == np.asarray(labels)
    groups = np.asarray(groups)
    return np.array([correct[groups == g].mean() if (groups == g).any() else np.nan for g in range(4)])


def worst_group_accuracy(predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """$\\min_g \\mathrm{acc}_g$ over the non-empty groups (the official code's ``min(LL, LS, SL, SS)``)."""
    return float(np.nanmin(group_accuracies(predictions, labels, groups)))


# ## The source model: SmallCNN trained on the biased training split (cached like shared.models.training)


@dataclass(frozen=True)
class BiasedModelConfig:
    """Everything that determines the biased source model's weights (the cache key)."""

    data: BiasedDigitsConfig = BiasedDigitsConfig()
    norm: str = "bn"
    width: int = 16
    epochs: int = 60  # the recipe of shared.models.training.SourceConfig
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    augment_shift: int = 1
    seed: int = 0
    version: int = 1


def train_biased_model(config: BiasedModelConfig) -> SmallCNN:
    """Train a two-class :class:`SmallCNN` on the biased training split (the shared loop, one thread).

    The random shift is applied to the clean digit before the background lift, so that the padding
    takes the image's own background value.
    """
    with one_thread():
        g = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        train, _ = biased_digits(config.data)
        clean = load_digits_splits(seed=config.data.data_seed).train.x
        model = SmallCNN(num_classes=2, width=config.width, norm=config.norm)

        def batch(ids: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
            x = add_background(shift_images(clean[ids], config.augment_shift, gen), train.bright[ids], config.data.strength)
            return x, train.y[ids]

        return fit_classifier(model, len(train), batch, epochs=config.epochs, batch_size=config.batch_size,
                              lr=config.lr, weight_decay=config.weight_decay, generator=g)


def biased_source_model(config: BiasedModelConfig = BiasedModelConfig(), *, use_cache: bool = True) -> SmallCNN:
    """The biased source model for ``config``: from the disk cache if present, else trained and cached
    (a fresh copy in eval mode each call)."""
    return cached_weights("biased-digits", config, lambda: SmallCNN(num_classes=2, width=config.width, norm=config.norm),
                          lambda: train_biased_model(config), use_cache, code=(*SOURCE_CODE, "shared.data.biased_digits"))
