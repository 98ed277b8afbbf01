r"""RMT: Robust Mean Teacher for continual and gradual test-time adaptation (Döbler, Marsden, Yang, CVPR 2023).

A student $f_\theta$ (every parameter trains, BatchNorm on test-batch statistics) and a teacher
$f_{\theta'}$ (an EMA of the student) start from the source model, after a short **warm-up** on
source images. On each test batch $x$, with an augmented view $\tilde x$, student probabilities
$p = \sigma(f_\theta(x))$ and $\tilde p = \sigma(f_\theta(\tilde x))$, and teacher probabilities
$q = \sigma(f_{\theta'}(x))$:

- **Symmetric cross-entropy** to the teacher, on both views (the official code averages them):
  $$\mathcal L_{\mathrm{SCE}} = \tfrac12\,\mathrm{SCE}(p, q) + \tfrac12\,\mathrm{SCE}(\tilde p, q),\qquad
    \mathrm{SCE}(p, q) = -\tfrac12 \sum_c \big[q_c \log p_c + p_c \log q_c\big].$$
  Its gradient with respect to the student's logits is bounded by the teacher's probabilities,
  whereas plain CE $-\sum_c q_c \log p_c$ pushes hardest on the classes the student finds least
  likely. That is the paper's argument for why SCE accumulates fewer errors.
- **Contrastive alignment to the source**: each test feature $z$, its augmented feature $\tilde z$
  and the nearest source prototype $\pi_{k^*}$ ($k^* = \arg\max_k \cos(z, \pi_k)$, $\pi_k$ the
  class-mean source feature) form the positives of a SupCon loss with temperature $T$ on projected,
  L2-normalised features.
- **Source replay**: cross-entropy on a labelled source batch, weight $\lambda_{\mathrm{src}}$ (0: source-free).

$\mathcal L = \lambda_{\mathrm{trg}}\mathcal L_{\mathrm{SCE}} + \lambda_{\mathrm{cont}}\mathcal L_{\mathrm{cont}} +
\lambda_{\mathrm{src}}\mathcal L_{\mathrm{CE,src}}$, one optimiser step, then
$\theta' \leftarrow m\,\theta' + (1-m)\,\theta$. The prediction is the ensemble
$f_\theta(x) + f_{\theta'}(x)$ (logits before the step).

RMT = CoTTA's mean teacher (without augmentation-averaged targets and without restore) with SCE
instead of CE + a contrastive pull towards the source prototypes + source replay + a warm-up.

**How much each part does** (the activity measures of the book's claims): the teacher's
movement, the share of the student's displacement since the stream began that the EMA has
followed, $\lVert\theta'_t - \theta'_0\rVert / \lVert\theta_t - \theta_0\rVert$ (for a student that
jumps to new weights and stays there it is $1 - m^t$: about 4 % after 40 steps at $m = 0.999$);
the warm-up's relative change of the student's weights; and each term's share of the loss.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.tta.base import OptimizerFactory, TTAMethod, named_optimizer
from shared.tta.teacher import (DigitAugmentConfig, augment_digits, collect_weights_and_biases,
                                configure_all_parameters, ema_update, frozen_copy)

Split = Callable[[nn.Module], tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]]


@dataclass(frozen=True)
class RMTConfig:
    """RMT's settings; defaults from ``classification/conf.py`` and ``cfgs/cifar10_c/rmt.yaml`` of the official code."""

    lr: float = 1e-3  # cfgs/cifar10_c/rmt.yaml OPTIM.LR (Adam, beta 0.9); ImageNet-C: SGD 0.01
    optimizer: str = "adam"  # rmt.yaml OPTIM.METHOD; "sgd" = momentum 0.9
    momentum: float = 0.999  # conf.py M_TEACHER.MOMENTUM
    lambda_src: float = 1.0  # conf.py RMT.LAMBDA_CE_SRC (0 = the source-free variant)
    lambda_trg: float = 1.0  # conf.py RMT.LAMBDA_CE_TRG
    lambda_cont: float = 1.0  # conf.py RMT.LAMBDA_CONT
    warmup_samples: int = 50_000  # conf.py RMT.NUM_SAMPLES_WARM_UP (steps = samples // source batch)
    temperature: float = 0.1  # conf.py CONTRAST.TEMPERATURE (base temperature = temperature, rmt.py)
    projection_dim: int = 128  # conf.py CONTRAST.PROJECTION_DIM (0 = no projector, as for DomainNet-126)
    source_batch_size: int = 200  # rmt.py: the test batch size (200 for CIFAR-10-C)
    consistency: str = "sce"  # "sce" (the paper) or "ce" (ablation: CoTTA's teacher -> student cross-entropy)
    steps: int = 1  # rmt.yaml OPTIM.STEPS
    episodic: bool = False
    augment: DigitAugmentConfig = field(default_factory=DigitAugmentConfig)  # get_tta_transforms, for 16-px digits
    seed: int = 0  # augmentations, source batches and the projector's initialisation

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} is not allowed: lr must be > 0")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum={self.momentum} is not allowed: 0 <= momentum <= 1")
        for name in ("lambda_src", "lambda_trg", "lambda_cont"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is not allowed: weights must be >= 0")
        if self.warmup_samples < 0 or self.source_batch_size < 2:
            raise ValueError("warmup_samples must be >= 0 and source_batch_size >= 2")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} is not allowed: temperature must be > 0")
        if self.projection_dim < 0:
            raise ValueError(f"projection_dim={self.projection_dim} is not allowed: projection_dim must be >= 0")
        if self.consistency not in ("sce", "ce"):
            raise ValueError(f"consistency={self.consistency!r} is not allowed: use 'sce' or 'ce'")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer={self.optimizer!r} is not allowed: use 'adam' or 'sgd'")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} is not allowed: RMT needs steps >= 1")

    @property
    def warmup_steps(self) -> int:
        return self.warmup_samples // self.source_batch_size

    def make_optimizer(self) -> OptimizerFactory:
        return named_optimizer(self.optimizer, self.lr)


# ## The losses


def symmetric_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.5) -> Tensor:
    r"""Per-sample $-(1-\alpha)\sum_c q_c \log p_c - \alpha \sum_c p_c \log q_c$ with $p$ the student's and $q$ the
    teacher's softmax (the official ``SymmetricCrossEntropy``, $\alpha = 0.5$). $\alpha = 0$ is CE to the teacher."""
    q, log_q = torch.softmax(teacher_logits, -1), torch.log_softmax(teacher_logits, -1)
    p, log_p = torch.softmax(student_logits, -1), torch.log_softmax(student_logits, -1)
    return -(1.0 - alpha) * (q * log_p).sum(-1) - alpha * (p * log_q).sum(-1)


def supcon_loss(views: Tensor, temperature: float, projector: nn.Module | None = None,
                base_temperature: float | None = None) -> Tensor:
    r"""SupCon without labels (Khosla et al., 2020; RMT's ``contrastive_loss``, mode ``all``): ``views`` is
    ``[B, V, d]``, the $V$ views of a sample are its positives, every other sample's views are negatives:

    $$\mathcal L = -\frac{T}{T_b}\,\frac{1}{BV} \sum_{a} \frac{1}{V-1} \sum_{p \in P(a)}
       \log \frac{\exp(u_a \cdot u_p / T)}{\sum_{j \ne a} \exp(u_a \cdot u_j / T)},\qquad u = \frac{g(z)}{\lVert g(z) \rVert}.$$
    """
    b, v, _ = views.shape
    flat = torch.cat(torch.unbind(views, dim=1), dim=0)  # [V*B, d], view-major as in the official code
    if projector is not None:
        flat = projector(flat)
    u = F.normalize(flat, p=2, dim=1)
    logits = u @ u.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(b * v, dtype=torch.bool, device=views.device)
    positive = torch.eye(b, dtype=torch.bool, device=views.device).repeat(v, v) & not_self
    exp = torch.exp(logits) * not_self
    log_prob = logits - torch.log(exp.sum(1, keepdim=True))
    mean_log_prob_pos = (log_prob * positive).sum(1) / positive.sum(1)
    return -(temperature / (base_temperature or temperature)) * mean_log_prob_pos.mean()


def nearest_prototype(features: Tensor, prototypes: Tensor) -> Tensor:
    """Index of the prototype with the largest cosine similarity to each feature row."""
    return (F.normalize(features, dim=1) @ F.normalize(prototypes, dim=1).T).argmax(dim=1)


# ## Model split, source batches, prototypes


def split_model(model: nn.Module) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(features, classifier)`` of the book's :class:`~shared.models.cnn.SmallCNN` (``features``/``head``)
    or of a RobustBench WideResNet (everything before ``fc``, then ``fc``), like the official ``split_up_model``."""
    if hasattr(model, "features") and hasattr(model, "head"):
        return model.features, model.head
    if all(hasattr(model, n) for n in ("conv1", "block1", "block2", "block3", "bn1", "relu", "fc")):
        def features(x: Tensor) -> Tensor:
            out = model.block3(model.block2(model.block1(model.conv1(x))))
            return F.adaptive_avg_pool2d(model.relu(model.bn1(out)), 1).flatten(1)
        return features, model.fc
    raise ValueError(f"cannot split {type(model).__name__} into features and classifier: pass split=")


class SourceBatches:
    """Endless shuffled batches of the labelled source set (a ``DataLoader(shuffle=True, drop_last=True)``)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int) -> None:
        if len(x) != len(y) or len(y) < batch_size:
            raise ValueError(f"need as many labels as images and at least batch_size={batch_size} source images, got {len(x)}, {len(y)}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order, self._pos = torch.randperm(len(y), generator=self.generator), 0

    def next(self) -> tuple[Tensor, Tensor]:
        if self._pos + self.batch_size > len(self.y):
            self._order, self._pos = torch.randperm(len(self.y), generator=self.generator), 0
        ids = self._order[self._pos:self._pos + self.batch_size].to(self.x.device)
        self._pos += self.batch_size
        return self.x[ids], self.y[ids]


@torch.no_grad()
def class_prototypes(features: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, num_classes: int, batch_size: int) -> Tensor:
    r"""$\pi_k$ = mean feature of the source images of class $k$ (features computed in batches, as the official
    code extracts them with its source loader)."""
    feats = torch.cat([features(x[i:i + batch_size]) for i in range(0, len(y), batch_size)])
    missing = [k for k in range(num_classes) if not (y == k).any()]
    if missing:
        raise ValueError(f"no source images of classes {missing}: every class needs a prototype")
    return torch.stack([feats[y == k].mean(0) for k in range(num_classes)])


def weight_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    r"""$\lVert a - b \rVert_2$ over every floating-point tensor of two state dicts with the same keys."""
    if a.keys() != b.keys():
        raise ValueError("the two state dicts do not hold the same tensors")
    return float(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a if a[k].is_floating_point()) ** 0.5)


def relative_change(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> float:
    r"""$\lVert \theta_{\mathrm{after}} - \theta_{\mathrm{before}} \rVert_2 / \lVert \theta_{\mathrm{before}} \rVert_2$ over
    the floating-point tensors of two state dicts (0 when ``before`` is all zeros and nothing moved)."""
    zero = {k: torch.zeros_like(v) for k, v in before.items()}
    norm = weight_distance(before, zero)
    moved = weight_distance(before, after)
    return moved / norm if norm > 0 else (0.0 if moved == 0 else float("inf"))


_WARMUP_CACHE: dict[str, tuple[dict, dict, dict]] = {}


def clear_warmup_cache() -> None:
    """Forget the cached warm-ups (the official code caches them on disk under ``ckpt/warmup``)."""
    _WARMUP_CACHE.clear()


def _fingerprint(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            h.update(part.detach().contiguous().numpy().tobytes())
        elif isinstance(part, dict):
            for k, v in part.items():
                h.update(k.encode())
                h.update(v.detach().contiguous().numpy().tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


class RMT(TTAMethod):
    """Robust mean teacher: SCE to the EMA teacher on two views, contrast to source prototypes, source replay, warm-up.

    Args:
        model: the source model (modified in place).
        config: :class:`RMTConfig`.
        source: the labelled source set ``(x, y)``, for the prototypes, the replay and the warm-up.
        split: a function from the model to ``(features, classifier)`` (default :func:`split_model`).
    """

    name = "rmt"

    def __init__(self, model: nn.Module, config: RMTConfig = RMTConfig(), *, source: tuple[Tensor, Tensor] | None = None,
                 split: Split = split_model, **kw) -> None:
        self.init_from_config(model, config, **kw)
        needs_source = config.lambda_src > 0 or config.lambda_cont > 0 or config.warmup_steps > 0
        if needs_source and source is None:
            raise ValueError("RMT needs source=(x, y) for its prototypes, replay or warm-up "
                             "(set lambda_src=lambda_cont=warmup_samples=0 to run without source data)")
        self.split = split
        self.generator = torch.Generator().manual_seed(config.seed)
        self.teacher = frozen_copy(self.model)  # f_θ' (rmt.py: copy of the configured model, detached)
        self.source = SourceBatches(*source, config.source_batch_size, seed=config.seed + 1) if source is not None else None
        self.prototypes: Tensor | None = None
        dim = 0
        if source is not None:
            features, classifier = self.split(self.model)
            with torch.no_grad():
                dim = features(source[0][:2]).shape[1]
            if config.lambda_cont > 0:
                num_classes = classifier(torch.zeros(1, dim, device=source[0].device)).shape[1]
                self.prototypes = class_prototypes(features, source[0], source[1], num_classes, config.source_batch_size)
        with torch.random.fork_rng():  # the projector's initialisation is seeded, not drawn from the global RNG
            torch.manual_seed(config.seed)
            self.projector = (nn.Sequential(nn.Linear(dim, config.projection_dim), nn.ReLU(),
                                            nn.Linear(config.projection_dim, config.projection_dim))
                              if config.projection_dim > 0 and dim > 0 else nn.Identity())
        if any(True for _ in self.projector.parameters()):
            self.optimizer.add_param_group({"params": list(self.projector.parameters()), "lr": config.lr})
        before_warmup = copy.deepcopy(self.model.state_dict())
        if config.warmup_steps > 0:
            self.warmup()
        self.warmup_change = relative_change(before_warmup, self.model.state_dict())
        """Relative change of the student's weights during the warm-up (0 without one)."""
        self.last: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        """``last`` of every adaptation step since the start (or the last reset)."""
        self._start = copy.deepcopy((self.model.state_dict(), self.teacher.state_dict(), self.projector.state_dict(),
                                     self.optimizer.state_dict()))

    def configure(self) -> None:
        configure_all_parameters(self.model)

    def collect(self) -> tuple[list[nn.Parameter], list[str]]:
        return collect_weights_and_biases(self.model)

    # -- warm-up -------------------------------------------------------------------------------
    @torch.enable_grad()
    def warmup(self) -> None:
        """Before adaptation: minimise SCE(student, teacher) on source batches with a linearly rising learning rate,
        updating the teacher after each step (``rmt.py::warmup``). Cached by its inputs, like the official checkpoint."""
        cfg = self.config
        key = _fingerprint(self.model.state_dict(), self.source.x, self.source.y, cfg.warmup_steps, cfg.source_batch_size,
                           cfg.lr, cfg.optimizer, cfg.momentum, cfg.seed, cfg.projection_dim)
        if key in _WARMUP_CACHE:
            student, teacher, optimizer = copy.deepcopy(_WARMUP_CACHE[key])
            self.model.load_state_dict(student)
            self.teacher.load_state_dict(teacher)
            self.optimizer.load_state_dict(optimizer)
            for _ in range(cfg.warmup_steps):  # keep the source sampler where the warm-up left it
                self.source.next()
            return
        for i in range(cfg.warmup_steps):
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * (i + 1) / cfg.warmup_steps
            x_src, _ = self.source.next()
            with torch.no_grad():
                teacher_logits = self.teacher(x_src)
            loss = symmetric_cross_entropy(self.model(x_src), teacher_logits).mean()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            ema_update(self.teacher, self.model, cfg.momentum)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr
        _WARMUP_CACHE[key] = copy.deepcopy((self.model.state_dict(), self.teacher.state_dict(), self.optimizer.state_dict()))

    # -- adaptation ----------------------------------------------------------------------------
    def loss_terms(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The ensemble prediction and each term of the loss on one test batch."""
        cfg = self.config
        features, classifier = self.split(self.model)
        feats = features(x)
        logits = classifier(feats)
        feats_aug = features(augment_digits(x, self.generator, cfg.augment))
        logits_aug = classifier(feats_aug)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        alpha = 0.5 if cfg.consistency == "sce" else 0.0
        terms = {"self_training": (0.5 * symmetric_cross_entropy(logits, teacher_logits, alpha)
                                   + 0.5 * symmetric_cross_entropy(logits_aug, teacher_logits, alpha)).mean()}
        if cfg.lambda_cont > 0:
            with torch.no_grad():
                nearest = nearest_prototype(feats, self.prototypes)
            views = torch.stack([self.prototypes[nearest], feats, feats_aug], dim=1)
            terms["contrastive"] = supcon_loss(views, cfg.temperature, self.projector)
        if cfg.lambda_src > 0:
            x_src, y_src = self.source.next()
            terms["source_ce"] = F.cross_entropy(self.model(x_src), y_src)
        return (logits + teacher_logits).detach(), terms

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        cfg = self.config
        prediction, terms = self.loss_terms(x)
        weights = {"self_training": cfg.lambda_trg, "contrastive": cfg.lambda_cont, "source_ce": cfg.lambda_src}
        loss = sum(weights[k] * v for k, v in terms.items())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.teacher, self.model, cfg.momentum)
        self.last = {k: float(v.detach()) for k, v in terms.items()}
        self.history.append(self.last)
        return prediction

    # -- how much each part does ---------------------------------------------------------------
    def teacher_movement(self) -> float:
        r"""$\lVert\theta'_t - \theta'_0\rVert / \lVert\theta_t - \theta_0\rVert$: the share of the student's
        displacement since the stream began (after the warm-up) that the teacher has followed (0 before any step)."""
        student0, teacher0 = self._start[0], self._start[1]
        student_moved = weight_distance(student0, self.model.state_dict())
        if student_moved == 0:
            return 0.0
        return weight_distance(teacher0, self.teacher.state_dict()) / student_moved

    def loss_shares(self) -> dict[str, float]:
        r"""Mean over the adaptation steps of each weighted term's share of the loss,
        $\lambda_k \mathcal L_k / \sum_j \lambda_j \mathcal L_j$ (an empty dict before any step)."""
        cfg = self.config
        weights = {"self_training": cfg.lambda_trg, "contrastive": cfg.lambda_cont, "source_ce": cfg.lambda_src}
        shares: dict[str, list[float]] = {}
        for step in self.history:
            weighted = {k: weights[k] * v for k, v in step.items()}
            total = sum(weighted.values())
            for k, v in weighted.items():
                shares.setdefault(k, []).append(v / total if total > 0 else 0.0)
        return {k: sum(v) / len(v) for k, v in shares.items()}

    def reset(self) -> None:
        """Back to the state after the warm-up: student, teacher, projector and optimiser (as the official reset)."""
        student, teacher, projector, optimizer = copy.deepcopy(self._start)
        self.model.load_state_dict(student)
        self.teacher.load_state_dict(teacher)
        self.projector.load_state_dict(projector)
        self.optimizer.load_state_dict(optimizer)
        self.history = []
