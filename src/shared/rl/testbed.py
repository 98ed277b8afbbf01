"""What an RL chapter trains on, for either profile: a policy, its tokenizer, and verifiable problems.

The RL chapters run one code path. The ``quick`` profile trains the book's tiny LM on its own tasks;
the ``paper`` profile trains a Hugging Face causal LM (the Qwen2.5 family in most papers) on a real
RLVR data set. Both are a :class:`Testbed`:

* ``make_policy()`` returns a fresh copy of the starting policy (each arm of a chapter starts from it);
* ``tokenizer`` encodes prompts and decodes responses;
* ``source`` samples training problems, builds their prompts and scores responses;
* ``eval_source`` (optional) is the held-out benchmark, e.g. MATH-500 while training on DAPO-Math-17k.

A chapter calls ``train_rl(bed.make_policy(), config, hooks, **bed.train_kwargs)``, and nothing in its
experiment depends on which testbed it got. :class:`RLSettings` holds the settings every RL chapter
shares (a chapter's ``Settings`` subclasses it and adds its method's knobs); :func:`testbed_from` and
:func:`rl_config` turn them into the testbed and the :class:`~shared.rl.trainer.RLConfig` of a run.

>>> bed = load_testbed("tiny-lm", "countdown", difficulties=(3,))
>>> bed.name
'tiny-LM countdown 3'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shared.book.profiles import setting
from shared.lm.tasks import TASKS
from shared.rl.grpo import GRPOConfig
from shared.rl.trainer import MathSource, ProblemSource, RLConfig, TaskSource, encode_prompts, tiny_lm_setting

TINY_LM = "tiny-lm"


@dataclass(frozen=True)
class Testbed:
    """A policy factory, its tokenizer and the problem sources of one RL setting."""

    name: str  # the setting's label, e.g. "tiny-LM countdown 3" or "Qwen2.5-Math-7B on DAPO-Math-17k"
    make_policy: Callable[[], nn.Module]
    tokenizer: Any
    source: ProblemSource
    eval_source: ProblemSource | None = None

    @property
    def is_tiny(self) -> bool:
        """Whether the policy is the book's tiny LM (the quick profile's testbed)."""
        return isinstance(self.source, TaskSource)

    @property
    def train_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~shared.rl.trainer.train_rl` (and ``cached_train_rl``) for this testbed."""
        return {"source": self.source, "tokenizer": self.tokenizer, "eval_source": self.eval_source}

    def sample_prompts(self, rng: Any, n: int) -> tuple[list[Any], torch.Tensor, torch.Tensor]:
        """``n`` problems from ``source`` and their left-padded prompt tokens and mask (on the CPU)."""
        problems = self.source.sample(rng, n)
        tokens, mask = encode_prompts(self.source, self.tokenizer, problems)
        return problems, tokens, mask


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_testbed(model: str, data: str, *, difficulties: tuple[int, ...] = (3, 4), eval_data: str | None = None,
                 max_problems: int | None = None, device: str | None = None, dtype: str = "float32",
                 gradient_checkpointing: bool = False) -> Testbed:
    """The testbed of a chapter's settings.

    Args:
        model: ``"tiny-lm"`` (the committed base model of :mod:`shared.lm.pretrain`) or a Hugging Face
            causal LM, by hub name or local directory (e.g. ``"Qwen/Qwen2.5-Math-7B"``).
        data: for the tiny LM a task of :mod:`shared.lm.tasks` (``"addition"``, ``"countdown"``) at
            ``difficulties``; otherwise a data set of :func:`~shared.lm.math_data.load_math_dataset`
            (hub name or local ``.jsonl`` / ``.parquet``).
        eval_data: the held-out benchmark for a Hugging Face model (default: held-out draws from ``data``).
        max_problems: keep only the first problems of ``data`` / ``eval_data`` (smoke runs).
        device, dtype, gradient_checkpointing: where and how a Hugging Face model is loaded.

    Raises:
        ValueError: a tiny-LM task that does not exist, or a data set the tiny LM cannot read.
    """
    if model == TINY_LM:
        if data not in TASKS:
            raise ValueError(f"the tiny LM trains on its own tasks ({', '.join(TASKS)}), not {data!r}")
        if eval_data is not None:
            raise ValueError("eval_data is for Hugging Face models; the tiny LM evaluates on held-out draws of its task")
        from shared.lm.pretrain import load_base_model
        from shared.lm.tokenizer import CharTokenizer

        return Testbed(tiny_lm_setting(data, tuple(difficulties)), load_base_model, CharTokenizer(), TaskSource(data, tuple(difficulties)))

    from shared.lm.hf_policy import load_hf_model, load_hf_tokenizer
    from shared.lm.math_data import load_math_dataset

    tokenizer = load_hf_tokenizer(model)
    source = MathSource(tuple(load_math_dataset(data, max_problems)), tokenizer)
    eval_source = MathSource(tuple(load_math_dataset(eval_data, max_problems)), tokenizer) if eval_data else None
    target = device or default_device()

    def make_policy() -> nn.Module:
        return load_hf_model(model, tokenizer, dtype, target, gradient_checkpointing=gradient_checkpointing)

    label = f"{model.rstrip('/').rsplit('/', 1)[-1]} on {data.rstrip('/').rsplit('/', 1)[-1]}"
    return Testbed(label, make_policy, tokenizer, source, eval_source)


@dataclass(frozen=True, kw_only=True)
class RLSettings:
    """The settings every RL chapter shares: what is trained, on what, and how big a run is.

    The quick presets use the tiny LM, its tasks and the RLConfig defaults (40 new tokens, 64 held-out
    problems, pass@8); the paper presets name the paper's model, data, batch and learning rate. The
    last five fields matter only for a Hugging Face model on a GPU. ``mini_batch_prompts`` splits each
    rollout into several optimiser steps (off-policy after the first: the ratio leaves 1, so clipping
    and ratio-based terms act), as the papers' verl scripts do. Full fine-tuning with Adam in
    float32 takes 16 bytes per parameter (weights, gradients, two moments) before activations: a
    1.5B model fits one 80 GB GPU, a 7B model (~112 GB) a 141 GB one at best; the papers' 7B runs
    use 8+ GPUs with sharding (verl/FSDP), which this single-device loop does not do.
    """

    model: str = setting(doc="'tiny-lm', or a Hugging Face causal LM (hub name or local folder)")
    data: str = setting(doc="tiny LM: 'addition' or 'countdown'; otherwise a math data set (hub name or local .jsonl/.parquet)")
    difficulties: tuple = setting(low=1, high=5, doc="task difficulties (tiny LM only)")
    eval_data: str | None = setting(None, doc="held-out benchmark of a Hugging Face model (None: held-out draws of data)")
    steps: int = setting(low=1, high=100_000, doc="RL steps per run")
    prompts_per_step: int = setting(low=1, high=4096, doc="prompts per step")
    group_size: int = setting(low=2, high=64, doc="responses per prompt (the GRPO group)")
    lr: float = setting(1e-4, low=0.0, high=1.0, low_inclusive=False, doc="Adam learning rate")
    max_new_tokens: int = setting(40, low=1, high=65_536, doc="response length limit (tokens)")
    eval_every: int = setting(10, low=1, high=100_000, doc="steps between held-out evaluations")
    eval_problems: int = setting(64, low=1, high=100_000, doc="held-out problems per evaluation")
    eval_k: int = setting(8, low=1, high=1024, doc="samples per held-out problem (pass@k)")
    mini_batch_prompts: int = setting(0, low=0, high=4096, doc="prompts per optimiser step (verl's ppo_mini_batch_size); "
                                      "0 = the whole batch: one on-policy step per rollout")
    micro_batch_size: int = setting(0, low=0, high=4096, doc="rows per forward/backward (gradient accumulation); 0 = the whole batch")
    rollout_batch_size: int = setting(0, low=0, high=100_000, doc="rows sampled at once (bounds the KV cache); 0 = the whole batch")
    dtype: str = setting("float32", choices=("float32", "bfloat16", "float16"),
                         doc="weights of a Hugging Face model; Adam steps of ~1e-6 vanish in bfloat16 weights")
    gradient_checkpointing: bool = setting(False, choices=(False, True), doc="recompute activations in the backward pass (HF model)")


def testbed_from(settings: RLSettings, device: str | None = None) -> Testbed:
    """The :class:`Testbed` of a chapter's settings (see :func:`load_testbed`)."""
    return load_testbed(settings.model, settings.data, difficulties=tuple(settings.difficulties), eval_data=settings.eval_data,
                        device=device, dtype=settings.dtype, gradient_checkpointing=settings.gradient_checkpointing)


def updates_per_rollout(prompts_per_step: int, mini_batch_prompts: int) -> int:
    """Optimiser steps per rollout: ``prompts_per_step // mini_batch_prompts`` (at least 1); 1 when ``mini_batch_prompts`` is 0."""
    return max(1, prompts_per_step // mini_batch_prompts) if mini_batch_prompts else 1


def rl_config(settings: RLSettings, grpo: GRPOConfig | None = None, **overrides: Any) -> RLConfig:
    """The :class:`~shared.rl.trainer.RLConfig` of a chapter's settings; ``grpo`` (default plain GRPO) gets the
    settings' ``micro_batch_size`` and, when ``mini_batch_prompts`` is set, their
    :func:`updates_per_rollout` as ``minibatches``; ``overrides`` replace any other field (e.g. ``seed``)."""
    grpo = grpo or GRPOConfig()
    minibatches = updates_per_rollout(settings.prompts_per_step, settings.mini_batch_prompts) if settings.mini_batch_prompts else grpo.minibatches
    grpo = dataclasses.replace(grpo, micro_batch_size=settings.micro_batch_size or None, minibatches=minibatches)
    fields = dict(task=settings.data, difficulties=tuple(settings.difficulties), prompts_per_step=settings.prompts_per_step,
                  group_size=settings.group_size, steps=settings.steps, lr=settings.lr, max_new_tokens=settings.max_new_tokens,
                  eval_every=settings.eval_every, eval_problems=settings.eval_problems, eval_k=settings.eval_k, grpo=grpo,
                  rollout_batch_size=settings.rollout_batch_size or None)
    return RLConfig(**(fields | overrides))
