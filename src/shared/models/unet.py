"""A tiny U-Net (Ronneberger et al., MICCAI 2015) for 32×32 slices: two levels down, two up.

One ``conv 3×3 → BatchNorm → ReLU`` per level; going down halves the resolution by max pooling, going
up doubles it with a learned 2×2 transposed convolution and adds the encoder's features of the same
resolution (additive skip connections, as in LinkNet, instead of U-Net's concatenation: half the
cost on one CPU thread for the same receptive field)::

    x [N, 1, 32, 32] → enc0 [N, w, 32, 32] → enc1 [N, 2w, 16, 16] → bottleneck [N, 2w, 8, 8]
      → up1 + enc1 → dec1 [N, 2w, 16, 16] → up0 + enc0 → dec0 [N, w, 32, 32] → head 1×1 [N, K, 32, 32]

With ``width=8`` (channels 8–16) it has about 8k parameters and one Adam step on a batch of 24
slices takes a few milliseconds on one CPU thread. The official SFDA code uses a deeper UNet of the
same family (four levels, 32–256 channels, BatchNorm, concatenated skips).

:func:`source_unet` trains the SFDA testbed's source model once per seed and keeps it in the book's
cache of trained weights (keyed on its settings, the code and the kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyUNet(nn.Module):
    """Two-level U-Net returning per-pixel logits ``[N, num_classes, H, W]`` (H, W divisible by 4)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 8) -> None:
        super().__init__()
        if num_classes < 2 or width < 1 or in_channels < 1:
            raise ValueError(f"need in_channels >= 1, num_classes >= 2 and width >= 1, got {in_channels}, {num_classes}, {width}")
        self.num_classes = num_classes
        self.enc0 = _conv_bn_relu(in_channels, width)
        self.enc1 = _conv_bn_relu(width, 2 * width)
        self.bottleneck = _conv_bn_relu(2 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, 2 * width, 2, stride=2)
        self.dec1 = _conv_bn_relu(2 * width, 2 * width)
        self.up0 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec0 = _conv_bn_relu(width, width)
        self.head = nn.Conv2d(width, num_classes, 1)
        self.to(memory_format=torch.channels_last)  # about 1.5x faster convolutions on CPU (oneDNN)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"input must be [N, C, H, W] with H and W divisible by 4, got {tuple(x.shape)}")
        e0 = self.enc0(x.contiguous(memory_format=torch.channels_last))
        e1 = self.enc1(F.max_pool2d(e0, 2))
        b = self.bottleneck(F.max_pool2d(e1, 2))
        d1 = self.dec1(self.up1(b) + e1)
        d0 = self.dec0(self.up0(d1) + e0)
        return self.head(d0)


def fit_cross_entropy(model: nn.Module, images: Tensor, masks: Tensor, *, epochs: int, lr: float, batch_size: int = 24,
                      weight_decay: float = 1e-4, seed: int = 0) -> nn.Module:
    """Supervised training (source model, or the target oracle) with pixel-wise cross-entropy and Adam,
    as the official ``cesource`` / ``fs`` recipes (``CrossEntropy`` with weights [1, 1]). Returns the
    model in eval mode."""
    if images.shape[0] != masks.shape[0]:
        raise ValueError(f"one mask per image: got {images.shape[0]} images and {masks.shape[0]} masks")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(images[idx]), masks[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def predict_masks(model: nn.Module, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Arg-max masks ``[N, H, W]`` and predicted soft organ ratios ``[N]`` (mean organ probability), with
    the model in whatever mode it is (eval: BatchNorm running statistics)."""
    masks, ratios = [], []
    for start in range(0, images.shape[0], batch_size):
        probs = torch.softmax(model(images[start:start + batch_size]), dim=1)
        masks.append(probs.argmax(1))
        ratios.append(probs[:, 1].mean(dim=(1, 2)))
    return torch.cat(masks), torch.cat(ratios)


class PixelLogits(nn.Module):
    """A segmenter seen as a per-pixel classifier: logits ``[N, K, H, W]`` → ``[N·H·W, K]``, so that
    classifier adapters (Tent's mean entropy over a batch) treat every pixel as one prediction."""

    def __init__(self, segmenter: nn.Module) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, x: Tensor) -> Tensor:
        z = self.segmenter(x)
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


@dataclass(frozen=True)
class UNetSourceConfig:
    """Everything that determines the weights of the SFDA testbed's source U-Net (its cache key):
    the labelled source slices of :func:`shared.data.synthetic_segmentation.source_and_target`
    (``n_source``, ``seed``) and the cross-entropy training of :func:`fit_cross_entropy`."""

    n_source: int = 800
    seed: int = 0
    width: int = 8
    epochs: int = 4
    lr: float = 1e-2
    batch_size: int = 32
    weight_decay: float = 1e-4


UNET_SOURCE_CODE: tuple[str, ...] = ("shared.models.unet", "shared.data.synthetic_segmentation")
"""The code a cached source U-Net depends on (part of its cache key, with the CPU kernels)."""


def train_source_unet(config: UNetSourceConfig) -> TinyUNet:
    """Train a :class:`TinyUNet` on the source slices of seed ``config.seed`` (deterministic, one thread):
    ``torch.manual_seed(seed)`` initialises the network, ``seed`` also orders the mini-batches."""
    from shared.data.synthetic_segmentation import source_and_target
    from shared.models.training import one_thread

    with one_thread():
        source = source_and_target(n_source=config.n_source, seed=config.seed).source
        torch.manual_seed(config.seed)
        return fit_cross_entropy(TinyUNet(width=config.width), source.images, source.masks, epochs=config.epochs,
                                 lr=config.lr, batch_size=config.batch_size, weight_decay=config.weight_decay, seed=config.seed)


def source_unet(config: UNetSourceConfig = UNetSourceConfig(), *, use_cache: bool = True) -> TinyUNet:
    """The trained source U-Net for ``config``: from the disk cache of trained weights if present, else
    trained (:func:`train_source_unet`) and cached. A fresh copy in eval mode on every call."""
    from shared.models.training import cached_weights

    return cached_weights("tinyunet", config, lambda: TinyUNet(width=config.width), lambda: train_source_unet(config),
                          use_cache, code=UNET_SOURCE_CODE)
