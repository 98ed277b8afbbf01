"""The RLVR training loop shared by the RL chapters: sample a group per prompt, verify, update.

Each step draws ``prompts_per_step`` problems, samples ``group_size`` responses per problem with the
KV-cached engine, scores them with the task's exact verifier, and applies one GRPO/DAPO update
(:func:`shared.rl.grpo.grpo_step`, with the chapter's hooks). It records, per step: reward (the
training batch's pass@1), mean token entropy of the sampled responses, response length, the batch
covariance of log-probability and advantage, clip fraction; and every ``eval_every`` steps pass@1
and pass@k on a fixed held-out set. Everything is seeded: same config, same history.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from shared.book.progress import progress
from shared.cache import cache_dir, cache_key
from shared.evaluation.passk import mean_pass_at_k
from shared.lm.rollout import Rollout, decode_responses, generate
from shared.lm.tasks import Problem, sample_problem, verify
from shared.lm.tokenizer import CharTokenizer
from shared.models.transformer import TinyTransformer
from shared.rl.entropy_terms import batch_covariance
from shared.rl.grpo import GRPOConfig, GRPOHooks, group_advantages, grpo_step
from shared.sampling import SamplerConfig

RL_CODE: tuple[str, ...] = ("shared.rl", "shared.lm", "shared.models.transformer", "shared.sampling", "shared.entropy",
                            "shared.evaluation")
"""The code a cached RL run depends on: any change to it misses the cache (the hooks of every chapter live in shared.rl)."""


@dataclass(frozen=True)
class RLConfig:
    """One RL run on the tiny LM (the chapters' quick profiles shrink ``steps`` and the batch)."""

    task: str = "addition"
    difficulties: tuple[int, ...] = (3, 4)
    prompts_per_step: int = 8
    group_size: int = 8
    steps: int = 30
    lr: float = 1e-4  # Adam; measured on the base model: 1e-3 destroys it within 15 steps, 1e-4 and 2e-5 improve it
    max_new_tokens: int = 40
    temperature: float = 1.0
    eval_every: int = 10
    eval_problems: int = 64
    eval_k: int = 8
    seed: int = 0
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    use_reference: bool = False  # keep a frozen copy of the base model for the KL term
    rollout_batch_size: int | None = None  # rows sampled at once (bounds the KV cache); None = the whole batch


@dataclass
class RLRun:
    """A finished run: the trained model and its per-step history."""

    model: TinyTransformer
    history: pd.DataFrame
    evals: pd.DataFrame


class ProblemSource(Protocol):
    """Where an RL run's problems come from: sampling, the prompt text, and the verifiable reward."""

    def sample(self, rng: np.random.Generator, n: int) -> list[Any]: ...

    def prompt(self, problem: Any) -> str: ...

    def reward(self, problem: Any, response: str) -> float: ...


@dataclass(frozen=True)
class TaskSource:
    """The tiny LM's tasks (quick profile): ``task`` at a difficulty drawn uniformly from ``difficulties``."""

    task: str = "addition"
    difficulties: tuple[int, ...] = (3, 4)

    def sample(self, rng: np.random.Generator, n: int) -> list[Problem]:
        return [sample_problem(self.task, rng, int(rng.choice(self.difficulties))) for _ in range(n)]

    def prompt(self, problem: Problem) -> str:
        return problem.prompt

    def reward(self, problem: Problem, response: str) -> float:
        return verify(problem, response)


@dataclass(frozen=True)
class MathSource:
    """Real math problems (paper profile, e.g. GSM8K or MATH-500 from :mod:`shared.lm.math_data`),
    prompted with the tokenizer's chat template and rewarded by :func:`~shared.lm.math_data.math_verify`."""

    problems: tuple[Any, ...]
    tokenizer: Any = None

    def sample(self, rng: np.random.Generator, n: int) -> list[Any]:
        return [self.problems[int(i)] for i in rng.integers(0, len(self.problems), n)]

    def prompt(self, problem: Any) -> str:
        from shared.lm.math_data import chat_prompt

        return chat_prompt(problem, self.tokenizer)

    def reward(self, problem: Any, response: str) -> float:
        from shared.lm.math_data import math_verify

        return math_verify(problem, response)


def encode_prompts(source: ProblemSource, tokenizer: Any, problems: list[Any], repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt tokens and mask ``[len(problems) * repeat, P]`` (CPU): each problem's prompt
    ``repeat`` times in a row (a GRPO group, or ``k`` samples for pass@k)."""
    return tokenizer.pad_left([tokenizer.encode(source.prompt(p), bos=True) for p in problems for _ in range(repeat)])


@torch.no_grad()
def evaluate(model: TinyTransformer, problems: list[Any], k: int, temperature: float, max_new_tokens: int, seed: int,
             *, source: ProblemSource | None = None, tokenizer: Any = None, batch_size: int | None = None) -> dict[str, float]:
    """pass@1 and pass@k (``k`` samples per problem at ``temperature``) and the mean response entropy."""
    source = source or TaskSource()
    tok = tokenizer or CharTokenizer()
    device = next(model.parameters()).device
    pt, pm = encode_prompts(source, tok, problems, k)
    rollout = generate(model, pt.to(device), pm.to(device), max_new_tokens=max_new_tokens, sampler=SamplerConfig(temperature=temperature),
                       generator=torch.Generator(device=device).manual_seed(seed), batch_size=batch_size)
    texts = decode_responses(tok, rollout)
    correct = np.array([source.reward(problems[i // k], t) for i, t in enumerate(texts)]).reshape(len(problems), k)
    entropy = float((rollout.entropies * rollout.mask).sum() / rollout.mask.sum())
    return {"pass@1": float(correct.mean()), f"pass@{k}": mean_pass_at_k(correct, k), "entropy": entropy}


def train_rl(model: TinyTransformer, config: RLConfig, hooks: GRPOHooks = GRPOHooks(), *, desc: str = "GRPO",
             on_rollout: Callable[[int, Rollout, torch.Tensor], dict] | None = None, show_progress: bool = True,
             source: ProblemSource | None = None, tokenizer: Any = None, eval_source: ProblemSource | None = None) -> RLRun:
    """Train ``model`` in place with GRPO (+ the chapter's ``hooks``); return it with its history.

    ``on_rollout(step, rollout, rewards)`` may return extra per-step values to record (e.g. a
    chapter's own diagnostics computed on the sampled batch before the update). The quick profile
    uses the tiny LM's tasks (``source=None``: ``TaskSource(config.task, config.difficulties)`` and the
    char tokenizer); the paper profile passes an :class:`~shared.lm.hf_policy.HFPolicy` as ``model``,
    its ``HFTokenizerAdapter`` and a :class:`MathSource`: the loop is the same. The held-out set is
    drawn from ``eval_source`` (e.g. MATH-500 while training on DAPO-Math), by default from ``source``.
    """
    torch.manual_seed(config.seed)
    source = source or TaskSource(config.task, config.difficulties)
    tok = tokenizer or CharTokenizer()
    device = next(model.parameters()).device
    rng = np.random.default_rng([config.seed, 17])
    eval_from = eval_source or source
    eval_set = eval_from.sample(np.random.default_rng([config.seed, 99]), config.eval_problems)
    ref = copy.deepcopy(model).eval() if config.use_reference else None
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    groups = torch.arange(config.prompts_per_step, device=device).repeat_interleave(config.group_size)
    history, evals = [], []
    ev = dict(source=eval_from, tokenizer=tok, batch_size=config.rollout_batch_size)
    steps = progress(range(config.steps), desc=desc) if show_progress else range(config.steps)
    for step in steps:
        if step % config.eval_every == 0:
            evals.append({"step": step, **evaluate(model, eval_set, config.eval_k, config.temperature, config.max_new_tokens, config.seed + step, **ev)})
        problems = source.sample(rng, config.prompts_per_step)
        pt, pm = encode_prompts(source, tok, problems, config.group_size)
        rollout = generate(model, pt.to(device), pm.to(device), max_new_tokens=config.max_new_tokens,
                           sampler=SamplerConfig(temperature=config.temperature), generator=gen, batch_size=config.rollout_batch_size)
        rewards = torch.tensor([source.reward(problems[i // config.group_size], t) for i, t in enumerate(decode_responses(tok, rollout))], device=device)
        extra = on_rollout(step, rollout, rewards) if on_rollout is not None else {}
        adv = group_advantages(rewards, groups, config.grpo.std_normalize)
        cov = batch_covariance(rollout.logprobs, adv[:, None].expand_as(rollout.logprobs), rollout.mask)
        stats = grpo_step(model, opt, rollout, rewards, groups, config.grpo, hooks, ref)
        history.append({"step": step, **stats, "covariance": cov, **extra})
    evals.append({"step": config.steps, **evaluate(model, eval_set, config.eval_k, config.temperature, config.max_new_tokens, config.seed + config.steps, **ev)})
    return RLRun(model, pd.DataFrame(history).set_index("step"), pd.DataFrame(evals).set_index("step"))


def _cache_path(config: RLConfig, model: TinyTransformer, tag: str, source: TaskSource) -> Path:
    """Cache file of a run: keyed by the full config, the problem source, the starting weights, a tag naming
    the hooks, the code of :data:`RL_CODE` and the CPU kernels (see :func:`shared.cache.cache_key`)."""
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().numpy().tobytes())
    fields = dataclasses.asdict(config)
    if fields["rollout_batch_size"] is None:  # added later: the default keeps the historical key
        del fields["rollout_batch_size"]
    parts = [fields, tag, weights.hexdigest()]
    if source != TaskSource(config.task, config.difficulties):  # the default source keeps the historical key
        parts.append(repr(source))
    return cache_dir() / "rl-runs" / f"{tag}-{cache_key(parts, RL_CODE)}.pt"


def cached_train_rl(model: TinyTransformer, config: RLConfig, hooks: GRPOHooks = GRPOHooks(), *, tag: str = "grpo",
                    desc: str = "GRPO", show_progress: bool = True, source: ProblemSource | None = None,
                    tokenizer: Any = None, eval_source: ProblemSource | None = None) -> RLRun:
    """:func:`train_rl`, cached on disk by (config, source, starting weights, ``tag``): chapters that share a
    baseline run (plain GRPO on the same base model and settings) train it once. ``tag`` must name the
    hooks uniquely (``"grpo"`` for none); a cache hit returns the identical trained weights and history.

    Only tiny-LM runs on the book's tasks are cached (a few hundred kB each); any other policy or
    source (the paper profile's billion-parameter models) is trained afresh by :func:`train_rl`.
    """
    source = source or TaskSource(config.task, config.difficulties)
    if not (isinstance(model, TinyTransformer) and isinstance(source, TaskSource) and eval_source is None):
        return train_rl(model, config, hooks, desc=desc, show_progress=show_progress, source=source, tokenizer=tokenizer,
                        eval_source=eval_source)
    path = _cache_path(config, model, tag, source)
    if path.exists():
        blob = torch.load(path, weights_only=False)
        model.load_state_dict(blob["state_dict"])
        if show_progress:  # the same bar as a training run, so a notebook's output does not depend on the cache's state
            for _ in progress(range(config.steps), desc=desc):
                pass
        return RLRun(model, blob["history"], blob["evals"])
    run = train_rl(model, config, hooks, desc=desc, show_progress=show_progress, source=source, tokenizer=tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": run.model.state_dict(), "history": run.history, "evals": run.evals}, tmp)  # pickled: exact
    os.replace(tmp, path)
    return run


def tiny_lm_setting(task: str, difficulties: tuple[int, ...]) -> str:
    """The name of a tiny-LM setting, e.g. "tiny-LM countdown 3" (the panel of the part's overview)."""
    return f"tiny-LM {task} {'-'.join(map(str, difficulties))}"


def entropy_accuracy_record(config: RLConfig, runs: dict[str, RLRun], method: str, name: str | None = None) -> dict:
    """The ``metrics["entropy_accuracy"]`` entry of an RL chapter: eval entropy and pass@1 per arm.

    The setting's name is built from ``config`` ("tiny-LM countdown 3") unless ``name`` is given (the
    paper profile passes its :class:`~shared.rl.testbed.Testbed`'s), so the part's overview puts
    chapters that train on the same task in the same panel.
    """
    if method not in runs:
        raise ValueError(f"method {method!r} is not among the arms {sorted(runs)}")
    name = name or tiny_lm_setting(config.task, config.difficulties)
    return {"name": name, "method": method,
            "points": {arm: {"entropy": run.evals["entropy"].tolist(), "accuracy": run.evals["pass@1"].tolist()} for arm, run in runs.items()}}
