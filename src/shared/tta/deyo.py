r"""DeYO: destroy your object, then trust only the predictions that fall apart (Lee et al., ICLR 2024).

"Entropy is not Enough for Test-Time Adaptation: From the Perspective of Disentangled Factors"
(arXiv 2403.07366); official code https://github.com/Jhyun17/DeYO (``methods/deyo.py``).

A prediction can be confident because of a feature that has nothing to do with the object's
shape (a colour, a background). DeYO measures how much the prediction depends on shape by
destroying the shape with a transform $T$ that keeps the low-level statistics (shuffling the
image's patches) and looking at how much the probability of the pseudo-label drops, the
**pseudo-label probability difference**

$$\mathrm{PLPD}_\theta(x) = p_\theta(\hat y \mid x) - p_\theta(\hat y \mid T(x)),
\qquad \hat y = \arg\max_c p_\theta(c \mid x).$$

On each test batch it keeps the samples that are confident *and* shape-dependent,

$$S(x) = \mathbb 1[\mathrm{Ent}_\theta(x) < \tau_\mathrm{Ent}] \cdot \mathbb 1[\mathrm{PLPD}_\theta(x) > \tau_\mathrm{PLPD}],$$

weights them (the weight is a constant: no gradient flows through it)

$$\alpha(x) = \frac{1}{\exp(\mathrm{Ent}_\theta(x) - \mathrm{Ent}_0)} + \frac{1}{\exp(-\mathrm{PLPD}_\theta(x))},$$

and takes one SGD step on $\mathcal L = \frac{1}{|S|}\sum_{x \in S} \alpha(x)\,\mathrm{Ent}_\theta(x)$ over
the norm layers' affine parameters. ``T(x)`` goes through the model without gradient and only for
the samples that passed the entropy filter (with BatchNorm in batch-statistics mode it is therefore
normalised by the statistics of that shuffled sub-batch, as in the official code).

**DeYO = Tent + entropy filter + PLPD filter + entropy/PLPD sample weights** (the entropy filter and
its weight are EATA's, with different constants; DeYO drops EATA's redundancy filter and Fisher term).
The four mechanisms can be switched off one by one (``filter_ent``, ``filter_plpd``, ``reweight_ent``,
``reweight_plpd``), as in the official ablations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.entropy import entropy_from_logits
from shared.tta.base import TTAMethod, collect_norm_params, configure_norm_adaptation, sgd

AUG_TYPES: tuple[str, ...] = ("patch", "pixel", "occ")


@dataclass(frozen=True)
class DeYOConfig:
    r"""DeYO's defaults (official ``config.py`` / ``main.py`` / ``exp_deyo.sh``). Entropy margins are
    fractions of $\ln C$, as ``main.py`` multiplies them by ``log(num_class)``."""

    lr: float = 0.00025  # main.py: ResNet-BN/GN at batch >= 32 (else 2·0.00025·B/64; ViT 0.001·B/64)
    lr_mul: float = 1.0  # config.py; exp_deyo.sh uses 5 for Waterbirds and ColoredMNIST
    momentum: float = 0.9  # main.py: torch.optim.SGD(params, lr, momentum=0.9)
    margin: float = 0.5  # tau_Ent / ln C: config.py deyo_margin, exp_deyo.sh ETHR=0.5 (ColoredMNIST 1.0)
    margin_e0: float = 0.4  # Ent_0 / ln C: config.py deyo_margin_e0, EMAR=0.4 (ColoredMNIST 1.0)
    plpd_threshold: float = 0.2  # tau_PLPD: config.py; exp_deyo.sh 0.3 mild, 0.2 wild, 0.5 biased
    aug_type: str = "patch"  # config.py: "patch", "pixel" or "occ"
    patch_len: int = 4  # config.py: patches per row/column (4 × 4 = 16 patches)
    occlusion_size: int = 112  # config.py (224-pixel ImageNet images)
    row_start: int = 56  # config.py
    column_start: int = 56  # config.py
    filter_ent: bool = True  # config.py filter_ent=1
    filter_plpd: bool = True  # config.py filter_plpd=1
    reweight_ent: bool = True  # config.py reweight_ent=1
    reweight_plpd: bool = True  # config.py reweight_plpd=1
    steps: int = 1  # DeYO(..., steps=1)
    episodic: bool = False  # DeYO(..., episodic=False)
    seed: int = 2024  # config.py seed; here it seeds the transform's own generator

    def __post_init__(self) -> None:
        if self.aug_type not in AUG_TYPES:
            raise ValueError(f"aug_type={self.aug_type!r} is not allowed: use one of {', '.join(map(repr, AUG_TYPES))}")
        if self.patch_len < 1:
            raise ValueError(f"patch_len={self.patch_len} is not allowed: patch_len (patches per side) must be >= 1")
        if self.lr <= 0 or self.lr_mul <= 0:
            raise ValueError(f"lr={self.lr}, lr_mul={self.lr_mul} are not allowed: both must be > 0")
        if self.margin <= 0 or self.margin_e0 <= 0:
            raise ValueError(f"margin={self.margin}, margin_e0={self.margin_e0} are not allowed: both must be > 0 (fractions of ln C)")
        if not -1.0 <= self.plpd_threshold <= 1.0:
            raise ValueError(f"plpd_threshold={self.plpd_threshold} is not allowed: PLPD lies in [-1, 1]")


# ## Shape-destroying transforms T (pure functions)


def _resize(x: Tensor, size: int) -> Tensor:
    """torchvision ``Resize((size, size))`` on tensors: bilinear with anti-aliasing (identity if the size is unchanged)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def patch_shuffle(x: Tensor, patch_len: int, generator: torch.Generator | None = None) -> Tensor:
    """Cut each image into ``patch_len × patch_len`` patches and permute them, independently per image.

    As in the official code, ``patch_len`` is the number of patches per side (4 → 16 patches), the
    image is first resized to a multiple of ``patch_len`` and resized back afterwards, and the
    permutation of image ``i`` is ``argsort(rand(B, patch_len²))[i]``. When the side is a multiple of
    ``patch_len`` the multiset of pixel values of every image, hence its mean, is unchanged.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if patch_len < 1 or patch_len > x.shape[-1]:
        raise ValueError(f"patch_len={patch_len} is not allowed: 1 <= patch_len <= image side {x.shape[-1]}")
    b, c, side = x.shape[0], x.shape[1], x.shape[-1]
    inner = side // patch_len * patch_len
    x = _resize(x, inner)
    h = inner // patch_len
    # b c (p1 h) (p2 w) -> b (p1 p2) c h w
    patches = x.reshape(b, c, patch_len, h, patch_len, h).permute(0, 2, 4, 1, 3, 5).reshape(b, patch_len * patch_len, c, h, h)
    perm = torch.argsort(torch.rand(b, patch_len * patch_len, generator=generator), dim=-1)
    patches = patches[torch.arange(b).unsqueeze(-1), perm]
    # b (p1 p2) c h w -> b c (p1 h) (p2 w)
    x = patches.reshape(b, patch_len, patch_len, c, h, h).permute(0, 3, 1, 4, 2, 5).reshape(b, c, inner, inner)
    return _resize(x, side)


def pixel_shuffle(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Permute all pixel positions with **one** random permutation shared by the whole batch (official ``pixel``)."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    perm = torch.randperm(h * w, generator=generator)
    return x.reshape(b, c, h * w)[:, :, perm].reshape(b, c, h, w)


def occlude(x: Tensor, size: int, row: int, column: int) -> Tensor:
    """Paint the ``size × size`` square at ``(row, column)`` with each image's per-channel mean (official ``occ``)."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    out = x.clone()
    mean = x.mean(dim=(2, 3), keepdim=True)
    window = out[:, :, row:row + size, column:column + size]
    out[:, :, row:row + size, column:column + size] = mean.expand_as(window)
    return out


def destroy_shape(x: Tensor, config: DeYOConfig, generator: torch.Generator | None = None) -> Tensor:
    """The transform $T$ named by ``config.aug_type``."""
    if config.aug_type == "patch":
        return patch_shuffle(x, config.patch_len, generator)
    if config.aug_type == "pixel":
        return pixel_shuffle(x, generator)
    return occlude(x, config.occlusion_size, config.row_start, config.column_start)


# ## PLPD, selection and weights (pure functions)


def plpd(logits: Tensor, logits_transformed: Tensor) -> Tensor:
    r"""$p(\hat y \mid x) - p(\hat y \mid T(x))$ per sample, with $\hat y = \arg\max$ of ``logits``."""
    if logits.shape != logits_transformed.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and logits_transformed {tuple(logits_transformed.shape)} must match")
    p, p_t = logits.softmax(-1), logits_transformed.softmax(-1)
    y_hat = p.argmax(-1, keepdim=True)
    return (p.gather(-1, y_hat) - p_t.gather(-1, y_hat)).squeeze(-1)


def entropy_filter(entropy: Tensor, threshold: float) -> Tensor:
    r"""The first filter, $\mathrm{Ent}(x) < \tau_\mathrm{Ent}$ (boolean mask)."""
    return entropy < threshold


def plpd_filter(plpd_values: Tensor, threshold: float) -> Tensor:
    r"""The second filter, $\mathrm{PLPD}(x) > \tau_\mathrm{PLPD}$ (boolean mask)."""
    return plpd_values > threshold


def deyo_weights(entropy: Tensor, plpd_values: Tensor, e0: float, *, reweight_ent: bool = True,
                 reweight_plpd: bool = True) -> Tensor:
    r"""$\alpha(x) = \mathbb 1_\mathrm{ent}\, e^{-(\mathrm{Ent}(x) - \mathrm{Ent}_0)} + \mathbb 1_\mathrm{plpd}\, e^{\mathrm{PLPD}(x)}$, detached."""
    entropy, plpd_values = entropy.detach(), plpd_values.detach()
    return float(reweight_ent) * torch.exp(-(entropy - e0)) + float(reweight_plpd) * torch.exp(plpd_values)


@dataclass
class Selection:
    """What DeYO did on the last batch (masks over the whole batch; ``plpd`` is ``nan`` where not computed)."""

    entropy: Tensor
    plpd: Tensor
    keep_ent: Tensor
    keep: Tensor

    @property
    def n_ent(self) -> int:
        return int(self.keep_ent.sum())

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())


class DeYO(TTAMethod):
    """Tent with DeYO's entropy and PLPD filters and sample weights (see the module docstring).

    ``skip`` names modules whose norm parameters do not train (the official ``collect_params`` skips
    ResNet ``layer4`` and ViT ``blocks.9-11``/``norm``); unlike SAR's harness, every BatchNorm layer,
    skipped or not, still normalises with the test batch's statistics (official ``configure_model``).
    """

    name = "deyo"

    def __init__(self, model: nn.Module, config: DeYOConfig = DeYOConfig(), *, skip: Sequence[str] = (), **kw) -> None:
        self.init_from_config(model, config, sgd(config.lr * config.lr_mul, momentum=config.momentum), skip=skip, **kw)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.last: Selection | None = None

    def configure(self) -> None:
        configure_norm_adaptation(self.model, skip=())  # batch statistics in every BN layer

    def collect(self) -> tuple[list[nn.Parameter], list[str]]:
        return collect_norm_params(self.model, skip=self.skip)

    def reset(self) -> None:
        super().reset()
        self.generator.manual_seed(self.config.seed)

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        cfg = self.config
        logits = self.model(x)
        num_classes = logits.shape[-1]
        entropy = entropy_from_logits(logits)
        # filter 1: Ent(x) < tau_Ent (off: the official code keeps Ent <= ln C, i.e. everything)
        keep_ent = entropy_filter(entropy, cfg.margin * math.log(num_classes)) if cfg.filter_ent else entropy <= math.log(num_classes)
        plpd_all = torch.full_like(entropy, float("nan")).detach()
        keep = torch.zeros_like(keep_ent)
        if keep_ent.any():
            # PLPD on the kept samples: T(x) through the model, no gradient
            with torch.no_grad():
                logits_t = self.model(destroy_shape(x[keep_ent].detach(), cfg, self.generator))
            plpd_kept = plpd(logits[keep_ent].detach(), logits_t)
            plpd_all[keep_ent] = plpd_kept
            # filter 2: PLPD(x) > tau_PLPD (off: the official code keeps PLPD >= -2, i.e. everything)
            keep2 = plpd_filter(plpd_kept, cfg.plpd_threshold) if cfg.filter_plpd else plpd_kept >= -2.0
            keep[keep_ent] = keep2
            if keep2.any():
                ent_sel, plpd_sel = entropy[keep_ent][keep2], plpd_kept[keep2]
                if cfg.reweight_ent or cfg.reweight_plpd:
                    ent_sel = ent_sel * deyo_weights(ent_sel, plpd_sel, cfg.margin_e0 * math.log(num_classes),
                                                     reweight_ent=cfg.reweight_ent, reweight_plpd=cfg.reweight_plpd)
                loss = ent_sel.mean()
                if self.optimizer is not None:
                    loss.backward()
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
        self.last = Selection(entropy.detach(), plpd_all, keep_ent.detach(), keep.detach())
        return logits.detach()
