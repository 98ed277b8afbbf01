r"""AdaMerging: adaptive model merging for multi-task learning (Yang et al., ICLR 2024).

Task arithmetic merges $K$ fine-tuned models with one hand-set coefficient. AdaMerging **learns** the
coefficients, without labels, by minimising the prediction entropy of the merged model on unlabelled
test batches of every task, each read through that task's own frozen head $h_k$:

$$\theta(\lambda)^{l} = \theta_0^{l} + \sum_{k=1}^{K} \lambda_k^{l}\, \tau_k^{l}, \qquad
\min_{\lambda} \sum_{k=1}^{K} \sum_{b=1}^{2} \frac{1}{|\mathcal B_{k,b}|} \sum_{x \in \mathcal B_{k,b}}
H\Big(\operatorname{softmax}\big(h_k(f_{\theta(\lambda)}(x))\big)\Big).$$

- **global** (not a variant of the paper): one $\lambda$ for every task and layer, i.e. task arithmetic
  $\theta_0 + \lambda \sum_k \tau_k$ with its single coefficient learned by the same entropy loss and
  schedule: the control that isolates what the finer coefficients add;
- **task-wise**: one $\lambda_k$ per task, shared by all layers ($\lambda_k^l = \lambda_k$);
- **layer-wise**: one $\lambda_k^l$ per task and per parameter tensor $l$ (weights and biases apart);
- **AdaMerging++**: the same, with the $\tau_k$ first cleaned by TIES (trim, elect sign, disjoint
  selection; :func:`shared.merging.task_vectors.ties_task_vectors`).

AdaMerging = task arithmetic + per-task (or per-layer) coefficients learned by Tent's entropy loss.
Unlike Tent, nothing of the network itself trains: only the $K$ (or $K \times L$) coefficients. The
coefficient of $\theta_0$ stays 1, the raw $\lambda$ is clamped to $[0, 1]$ in the forward pass (so its
gradient is zero once it leaves that range), and the merged weights are rebuilt from
$(\theta_0, \tau_1, \dots, \tau_K, \lambda)$ at every forward with :func:`torch.func.functional_call`, so the
gradient reaches $\lambda$. Official code: ``main_task_wise_adamerging.py``,
``main_layer_wise_adamerging.py`` and their ``*pp.py`` variants in github.com/EnnengYang/AdaMerging.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from shared.entropy import entropy_from_logits

GRANULARITIES: tuple[str, ...] = ("global", "task", "layer")


@dataclass(frozen=True)
class AdaMergingConfig:
    """The official defaults (both ``main_*_adamerging.py`` scripts)."""

    granularity: str = "layer"  # "task" (main_task_wise_adamerging.py), "layer" (main_layer_wise_adamerging.py) or "global" (ours: one lambda)
    init: float = 0.3  # `prior = 0.3` in AdaMerging.__init__: every lambda starts at task arithmetic's 0.3
    clamp_min: float = 0.0  # lambdas(): torch.clamp(lambdas_raw, min=0.0, max=1.0)
    clamp_max: float = 1.0
    lr: float = 1e-3  # torch.optim.Adam(..., lr=1e-3, betas=(0.9, 0.999), weight_decay=0.)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    iterations: int = 500  # `epochs = 500`: one Adam step per "epoch"
    batch_size: int = 16  # get_dataset(..., batch_size=16)
    batches_per_task: int = 2  # `if i > 0: break`: two shuffled test batches per task per step

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r} is not allowed: use one of {', '.join(map(repr, GRANULARITIES))}")
        if not self.clamp_min <= self.init <= self.clamp_max:
            raise ValueError(f"init={self.init} must lie in [clamp_min, clamp_max] = [{self.clamp_min}, {self.clamp_max}]")
        if self.lr <= 0 or self.iterations < 0 or self.batch_size < 1 or self.batches_per_task < 1:
            raise ValueError("need lr > 0, iterations >= 0, batch_size >= 1 and batches_per_task >= 1")


class AdaMerging(nn.Module):
    r"""A merged encoder $f_{\theta(\lambda)}$ with learnable merge coefficients and $K$ frozen task heads.

    Args:
        encoder: the architecture (its own weights are ignored; it must treat samples independently,
            e.g. GroupNorm or eval-mode BatchNorm, because all tasks share one forward pass).
        pretrained: $\theta_0$, a state dict of ``encoder``.
        task_vectors: $\tau_1, \dots, \tau_K$, state dicts with the floating keys of ``pretrained``.
        heads: one frozen classification head per task, applied to the encoder's output.
        config: granularity, initial value and clamp range of the coefficients.
    """

    def __init__(self, encoder: nn.Module, pretrained: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]],
                 heads: Sequence[nn.Module], config: AdaMergingConfig = AdaMergingConfig()) -> None:
        super().__init__()
        if not task_vectors or len(task_vectors) != len(heads):
            raise ValueError(f"need one head per task vector and at least one task, got {len(task_vectors)} task vectors and {len(heads)} heads")
        self.config = config
        self.encoder = copy.deepcopy(encoder).eval().requires_grad_(False)
        self.heads = nn.ModuleList(copy.deepcopy(h).eval().requires_grad_(False) for h in heads)
        # One "layer" per floating tensor of theta_0 (parameters and floating buffers), in state-dict order.
        self.layer_names = [k for k, v in pretrained.items() if torch.is_floating_point(v)]
        for i, tv in enumerate(task_vectors):
            if set(tv) != set(self.layer_names):
                raise ValueError(f"task vector {i} has keys {sorted(tv)}, expected {self.layer_names}")
        self.fixed_names = [k for k in pretrained if k not in self.layer_names]
        # Buffers (not parameters), so that `.to(device)` moves them and the optimizer never sees them.
        for i, name in enumerate(self.fixed_names):
            self.register_buffer(f"fixed_{i}", pretrained[name].detach().clone(), persistent=False)
        for i, name in enumerate(self.layer_names):
            self.register_buffer(f"theta0_{i}", pretrained[name].detach().clone(), persistent=False)
            self.register_buffer(f"tau_{i}", torch.stack([tv[name].detach() for tv in task_vectors]), persistent=False)  # [K, ...]
        rows = len(self.layer_names) if config.granularity == "layer" else 1
        cols = 1 if config.granularity == "global" else len(task_vectors)
        dtype = pretrained[self.layer_names[0]].dtype
        self.lambdas_raw = nn.Parameter(torch.full((rows, cols), config.init, dtype=dtype))

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def coefficients(self) -> Tensor:
        r"""$\operatorname{clamp}(\lambda_{\text{raw}}, 0, 1)$, shape ``[1, K]`` (task-wise; global: the one
        coefficient repeated for every task) or ``[L, K]`` (layer-wise)."""
        lam = self.lambdas_raw.clamp(self.config.clamp_min, self.config.clamp_max)
        return lam.expand(1, self.num_tasks) if self.config.granularity == "global" else lam

    def merged_parameters(self) -> dict[str, Tensor]:
        r"""$\theta^l = \theta_0^l + \sum_k \lambda_k^l \tau_k^l$ for every layer $l$, differentiable in $\lambda$."""
        lam = self.coefficients()
        merged = {name: getattr(self, f"fixed_{i}") for i, name in enumerate(self.fixed_names)}
        for l, name in enumerate(self.layer_names):
            row = lam[0] if lam.shape[0] == 1 else lam[l]
            merged[name] = getattr(self, f"theta0_{l}") + torch.tensordot(row, getattr(self, f"tau_{l}"), dims=1)
        return merged

    def features(self, x: Tensor) -> Tensor:
        """The merged encoder's output on ``x``."""
        return functional_call(self.encoder, self.merged_parameters(), (x,))

    def forward(self, x: Tensor, task: int) -> Tensor:
        """Task ``task``'s logits from the merged encoder and its own head."""
        return self.heads[task](self.features(x))

    def entropy_loss(self, batches: Sequence[Sequence[Tensor]]) -> Tensor:
        r"""$\sum_k \sum_b \operatorname{mean}_{x \in \mathcal B_{k,b}} H(\operatorname{softmax}(h_k(f_{\theta(\lambda)}(x))))$.

        ``batches[k]`` holds task $k$'s unlabelled batches; all of them go through the encoder in one
        forward pass, then each task's features through its own head (no softmax is shared across tasks).
        """
        if len(batches) != self.num_tasks:
            raise ValueError(f"need batches for each of the {self.num_tasks} tasks, got {len(batches)}")
        flat = [b for task in batches for b in task]
        feats = self.features(torch.cat(flat)).split([len(b) for b in flat])
        loss, i = feats[0].new_zeros(()), 0
        for k, task in enumerate(batches):
            for _ in task:
                loss = loss + entropy_from_logits(self.heads[k](feats[i]), reduction="mean")
                i += 1
        return loss

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, Tensor]:
        """The merged weights (detached), loadable into ``encoder``."""
        return {k: v.detach().clone() for k, v in self.merged_parameters().items()}

    @torch.no_grad()
    def merged_encoder(self) -> nn.Module:
        """A stand-alone copy of the encoder holding the current merged weights."""
        enc = copy.deepcopy(self.encoder)
        enc.load_state_dict(self.merged_state_dict())
        return enc.eval()


def sample_batches(inputs: Sequence[Tensor], config: AdaMergingConfig, generator: torch.Generator) -> list[list[Tensor]]:
    """For each task, the first ``batches_per_task`` batches of a fresh shuffle of its unlabelled test
    inputs (the official code rebuilds a shuffled loader every step and stops after two batches)."""
    out = []
    for x in inputs:
        perm = torch.randperm(len(x), generator=generator)
        n = config.batch_size
        out.append([x[perm[b * n:(b + 1) * n]] for b in range(config.batches_per_task) if b * n < len(x)])
    return out


def fit_adamerging(merger: AdaMerging, inputs: Sequence[Tensor], generator: torch.Generator,
                   on_step: Callable[[int, AdaMerging, float], None] | None = None,
                   iterations: Iterable[object] | None = None) -> list[float]:
    """Learn the merge coefficients: ``config.iterations`` Adam steps on :meth:`AdaMerging.entropy_loss`.

    Args:
        merger: the :class:`AdaMerging` module (only ``lambdas_raw`` trains).
        inputs: each task's unlabelled test images (labels are never seen).
        generator: the source of the batch shuffles.
        on_step: called as ``on_step(step, merger, loss)`` after each update (step counts from 1).
        iterations: an iterable over the steps, e.g. a progress bar; default ``range(config.iterations)``.

    Returns the loss at every step.
    """
    cfg = merger.config
    optimizer = torch.optim.Adam([merger.lambdas_raw], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    losses = []
    for step, _ in enumerate(iterations if iterations is not None else range(cfg.iterations), start=1):
        device = merger.lambdas_raw.device
        loss = merger.entropy_loss([[b.to(device) for b in task] for task in sample_batches(inputs, cfg, generator)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, merger, losses[-1])
    return losses
