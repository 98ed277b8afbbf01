r"""AEPO: Arbitrary Entropy Policy Optimization (Wang et al., 2025, arXiv 2510.08141).

**AEPO = GRPO + a REINFORCE term on the correct samples of a second, tempered rollout, whose
temperature is switched by feedback on the policy's entropy.** No entropy bonus, no KL.

A REINFORCE step on samples of the tempered policy $\pi_\theta^{T}$ moves $\pi_\theta$ toward
$\pi_\theta^{T}$: for $T>1$ that distribution is flatter (entropy rises), for $T<1$ sharper (it
falls). Switching $T$ on the current entropy holds the entropy near a chosen target $\mathcal H^\star$:

$$\nabla_\theta J_\text{AEPO} = \nabla_\theta J_\text{GRPO}
 + \alpha\,\mathbb E_{q,\;o\sim\pi^{T}_\theta(\cdot\mid q)}\big[\nabla_\theta \log\pi_\theta(o\mid q)\,R(q,o)\big],
 \qquad T = \begin{cases} T_\text{high} & \mathcal H(\pi_{\theta_\text{old}}) \le \mathcal H^\star \\
                          T_\text{low}  & \text{otherwise.} \end{cases}$$

As the official code does it (EasyR1 ``ray_trainer.py``, ``alg == "AEPO"``), per step:

1. the usual rollout at $T=1$ and GRPO advantages on it (batch $B$);
2. $T$ from the rule above; a second rollout at $T$ of the first quarter of the step's prompts (the
   official ``gen_batch[:len // 4]``), GRPO advantages within its groups;
3. keep the tempered samples with advantage $> 0.05$ (correct answers in mixed groups) and give them
   advantage exactly 1 (:func:`select_positive`);
4. use $m = \min(m_\max, \#\text{kept})$ of them when the entropy is at or below the target, half that
   above it (:func:`reinforce_count`);
5. the same clipped loss on them, with old log-probs at $T=1$ (ratio 1 at the start: a plain
   $\nabla\log\pi$ on samples from another distribution) (:func:`reinforce_loss`).

Differences from the official code (checked against it on hand-made batches): it *replaces* the
first $m$ samples of $B$, here they are *added* to the loss with the same per-sequence weight $1/|B|$
as a GRPO sample, so the implicit $\alpha$ is $m/|B|$ in both; it averages the loss over the tokens of
each micro-batch (its 128-sample mini-batches are taken in order, so the $m$ samples land in the first
updates of the step), here each sample weighs one sequence; the switching entropy here is the mean
token entropy at $T=1$ of the step's own rollout (the policy $\pi_{\theta_\text{old}}$ before the
update), the official code reads the previous update's logged $-\overline{\log\pi}$ of the sampled
tokens (one step older, starting from 0, so its first step samples hot).

In the library: :class:`AEPO` holds the tempered rollout; its :meth:`AEPO.on_rollout` (passed to
:func:`shared.rl.trainer.train_rl`) draws it, and :meth:`AEPO.hooks` returns ``GRPOHooks(extra_loss=...)``.
:attr:`AEPO.reinforced_fraction` is the fraction of the batch the term touched over the run (its activity:
only the correct tempered samples of mixed groups are reinforced, so it can be far below the cap).
It runs on the tiny LM (prompts rebuilt from their text, the char tokenizer) or, given the run's
``source`` and ``tokenizer``, on any policy of the same interface (a Hugging Face
:class:`~shared.lm.hf_policy.HFPolicy` on real math problems): it then scores the tempered samples
with the source's own reward, on the step's problems as :attr:`AEPO.source` recorded them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from shared.lm.rollout import Rollout, decode_responses, generate
from shared.lm.tasks import Problem, verify
from shared.lm.tokenizer import CharTokenizer
from shared.rl.grpo import GRPOHooks, TokenBatch, clipped_surrogate, group_advantages, response_logits
from shared.sampling import SamplerConfig


@dataclass(frozen=True)
class AEPOConfig:
    """AEPO's knobs, defaults from the official code (``verl/trainer/config.py``, ``ray_trainer.py``)."""

    target_entropy: float = 0.5  # H* (``entropy_base``): config.py and the 7B script; the README headline uses 0.75
    t_high: float = 1.2  # temperature when entropy <= target: config.py
    t_low: float = 0.8  # temperature when entropy > target: config.py
    max_samples: int = 60  # ``reinforce_sample_num`` (of a 2560-sample batch): config.py; halved above the target
    adv_threshold: float = 0.05  # keep tempered samples with GRPO advantage > 0.05: ray_trainer.py
    prompt_fraction: float = 0.25  # tempered rollout on the first quarter of the prompts: ray_trainer.py (len // 4)
    clip: float = 0.2  # the GRPO clip range, shared with the main batch (EasyR1 default)

    def __post_init__(self) -> None:
        if self.target_entropy < 0:
            raise ValueError(f"target_entropy={self.target_entropy} is not allowed: entropy is >= 0")
        if not (0 < self.t_low <= self.t_high):
            raise ValueError(f"temperatures (t_low={self.t_low}, t_high={self.t_high}) are not allowed: 0 < t_low <= t_high")
        if not 0 < self.prompt_fraction <= 1:
            raise ValueError(f"prompt_fraction={self.prompt_fraction} is not allowed: 0 < prompt_fraction <= 1")
        if self.max_samples < 0:
            raise ValueError(f"max_samples={self.max_samples} is not allowed: use a count >= 0")


# ## Pure pieces


def switch_temperature(entropy: float, target: float, t_high: float = 1.2, t_low: float = 0.8) -> float:
    r"""The feedback rule: $T_\text{high}$ if $\mathcal H \le \mathcal H^\star$, else $T_\text{low}$."""
    return t_high if entropy <= target else t_low


def reinforce_count(n_kept: int, max_samples: int, below_target: bool) -> int:
    r"""$m = \min(m_\max, n_\text{kept})$ at or below the target, $\lfloor \min(m_\max, n_\text{kept}) / 2 \rfloor$ above it."""
    m = min(max_samples, n_kept)
    return m if below_target else m // 2


def select_positive(rewards: Tensor, group_ids: Tensor, threshold: float = 0.05) -> Tensor:
    r"""Tempered samples to reinforce: GRPO advantage $\hat A_i > $ ``threshold`` (correct answers in mixed groups)."""
    return group_advantages(rewards.float(), group_ids) > threshold


def reinforce_loss(logp: Tensor, mask: Tensor, batch_size: int, clip: float = 0.2) -> Tensor:
    r"""$\frac{1}{|B|}\sum_{j} \frac{1}{|o_j|}\sum_t \ell_{j,t}$ with the clipped loss at advantage 1 and $\log\pi_\text{old} = \log\pi_\theta$ (detached).

    With one update per batch the ratio is 1, so the gradient is
    $-\frac{1}{|B|}\sum_j \frac{1}{|o_j|}\sum_t \nabla\log\pi_\theta(o_{j,t})$: REINFORCE with reward 1 and no baseline,
    each sample weighted like one sequence of the GRPO batch ``B`` (``seq-mean-token-mean``).
    """
    if logp.shape[0] == 0:
        return logp.sum() * 0.0
    logp = torch.where(mask, logp, torch.zeros_like(logp))  # padding has log-prob -inf: keep it out of the ratio
    per_token = clipped_surrogate(logp, logp.detach(), torch.ones_like(logp), clip, clip)
    m = mask.float()
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / batch_size


def problem_from_prompt(prompt: str) -> Problem:
    """Rebuild a verifiable :class:`Problem` from its prompt text (``"47+85="`` or ``"3,5,7:22?"``)."""
    if m := re.fullmatch(r"(\d+)\+(\d+)=", prompt):
        a, b = int(m.group(1)), int(m.group(2))
        return Problem("addition", prompt, "", a + b, max(len(m.group(1)), len(m.group(2))), (a, b))
    if m := re.fullmatch(r"([\d,]+):(\d+)\?", prompt):
        numbers = tuple(int(v) for v in m.group(1).split(","))
        return Problem("countdown", prompt, "", int(m.group(2)), len(numbers), numbers)
    raise ValueError(f"prompt {prompt!r} is neither an addition ('a+b=') nor a countdown ('x,y,z:t?') prompt")


# ## The method as GRPO hooks


class RecordingSource:
    """A problem source that remembers the problems of its last ``sample`` call and otherwise is ``inner``.

    :func:`~shared.rl.trainer.train_rl` samples each step's problems just before its rollout (row ``i``
    answers problem ``i // group_size``), so in ``on_rollout`` :attr:`last` holds that step's problems.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.last: list[Any] = []

    def sample(self, rng: np.random.Generator, n: int) -> list[Any]:
        self.last = list(self.inner.sample(rng, n))
        return self.last

    def prompt(self, problem: Any) -> str:
        return self.inner.prompt(problem)

    def reward(self, problem: Any, response: str) -> float:
        return self.inner.reward(problem, response)

    def __repr__(self) -> str:
        return f"RecordingSource({self.inner!r})"


class AEPO:
    """The tempered rollout and its REINFORCE term, for :func:`shared.rl.trainer.train_rl`.

    ``train_rl(model, rl_config, aepo.hooks(), on_rollout=aepo.on_rollout)``: ``on_rollout`` sees the
    step's $T=1$ rollout, picks $T$ by its entropy, samples the same prompts at $T$ and keeps the
    correct samples of mixed groups (on the first ``prompt_fraction`` of the prompts); ``hooks().extra_loss`` adds their REINFORCE loss to GRPO's.

    Without ``source`` the policy is the tiny LM: prompts are decoded with the char tokenizer and
    rebuilt as problems (:func:`problem_from_prompt`). With the run's ``source`` and ``tokenizer`` (a
    :class:`~shared.rl.testbed.Testbed`'s), pass :attr:`source` to ``train_rl`` in place of the
    testbed's: it records each step's problems, and the tempered samples get ``source.reward``.
    Tensors live on the rollout's device (the sampling generator too).

    ``micro_batch_size`` (the run's GRPO micro-batch) bounds the memory of the REINFORCE term: its
    samples are then back-propagated in chunks of that many rows inside ``extra_loss`` (gradients
    accumulate exactly; the returned term is 0, so the step's reported ``loss`` leaves it out, see
    :attr:`last_loss`). ``None`` adds the whole term to the first micro-batch's loss (the only one
    when GRPO does not split the batch). ``rollout_batch_size`` (the run's) bounds the rows of the
    tempered rollout sampled at once, as :func:`~shared.lm.rollout.generate`'s ``batch_size``.
    """

    def __init__(self, model: nn.Module, config: AEPOConfig = AEPOConfig(), *, group_size: int,
                 max_new_tokens: int = 40, seed: int = 0, tokenizer: Any = None, source: Any = None,
                 micro_batch_size: int | None = None, rollout_batch_size: int | None = None) -> None:
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size}: must be >= 1 or None")
        self.model, self.config, self.group_size, self.max_new_tokens = model, config, group_size, max_new_tokens
        self.tokenizer = tokenizer or CharTokenizer()
        self.source = RecordingSource(source) if source is not None else None
        self.micro_batch_size, self.rollout_batch_size = micro_batch_size, rollout_batch_size
        self.seed = seed
        self.generator: torch.Generator | None = None  # made on the rollout's device at the first step
        self.pending: Rollout | None = None
        self.batch_size = 0
        self.last_loss = 0.0
        self.reinforced = 0  # tempered samples the term has reinforced, summed over the steps
        self.batch_samples = 0  # samples of the GRPO batches over the same steps

    @property
    def reinforced_fraction(self) -> float:
        r"""AEPO's activity: $\sum_\text{steps} m \,/ \sum_\text{steps} |B|$, the fraction of the batch its term touched
        (the implicit $\alpha$ averaged over the run; 0 before the first step)."""
        return self.reinforced / self.batch_samples if self.batch_samples else 0.0

    def _tempered_rewards(self, prompt_tokens: Tensor, texts: list[str]) -> Tensor:
        """The verifiable rewards of the tempered responses (row ``i`` answers the step's problem ``i // group_size``)."""
        if self.source is None:  # the tiny LM: rebuild each problem from its prompt text
            prompts = [self.tokenizer.decode(row) for row in prompt_tokens]
            return torch.tensor([verify(problem_from_prompt(p), t) for p, t in zip(prompts, texts)])
        problems = self.source.last
        if len(problems) * self.group_size < len(texts):
            raise RuntimeError(f"the source recorded {len(problems)} problems for {len(texts)} tempered rows: pass "
                               "aepo.source (not the testbed's source) to train_rl")
        return torch.tensor([float(self.source.reward(problems[i // self.group_size], t)) for i, t in enumerate(texts)])

    @torch.no_grad()
    def on_rollout(self, step: int, rollout: Rollout, rewards: Tensor) -> dict[str, float]:
        """Draw the tempered rollout for this step; return what to record (entropy, T, kept, m)."""
        cfg = self.config
        device = rollout.prompt_tokens.device
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed + 7919)
        entropy = float((rollout.entropies * rollout.mask).sum() / rollout.mask.sum())
        temperature = switch_temperature(entropy, cfg.target_entropy, cfg.t_high, cfg.t_low)
        n_prompts = max(1, int(rollout.tokens.shape[0] // self.group_size * cfg.prompt_fraction))
        rows = n_prompts * self.group_size  # the first prompts' groups (the rollout is grouped prompt by prompt)
        tempered = generate(self.model, rollout.prompt_tokens[:rows], rollout.prompt_mask[:rows], max_new_tokens=self.max_new_tokens,
                            sampler=SamplerConfig(temperature=temperature), generator=self.generator, batch_size=self.rollout_batch_size)
        texts = decode_responses(self.tokenizer, tempered)
        t_rewards = self._tempered_rewards(rollout.prompt_tokens[:rows], texts)
        groups = torch.arange(len(texts)) // self.group_size
        keep = select_positive(t_rewards, groups, cfg.adv_threshold).nonzero().squeeze(-1)
        m = reinforce_count(len(keep), cfg.max_samples, entropy <= cfg.target_entropy)
        idx = keep[:m].to(device)
        self.pending = tempered.select(idx)
        self.batch_size = rollout.tokens.shape[0]
        self.reinforced += m
        self.batch_samples += self.batch_size
        return {"aepo_entropy": entropy, "aepo_temperature": temperature, "aepo_kept": float(len(keep)),
                "aepo_m": float(m), "aepo_tempered_reward": float(t_rewards.float().mean())}

    def _reinforce(self, rows: Rollout) -> Tensor:
        """The REINFORCE loss of some kept tempered samples (log-probs at $T=1$, with gradient)."""
        logits = response_logits(self.model, rows, 1.0)
        logp = torch.log_softmax(logits, -1).gather(-1, rows.tokens[..., None]).squeeze(-1)
        return reinforce_loss(logp, rows.mask, self.batch_size, self.config.clip)

    def extra_loss(self, batch: TokenBatch) -> Tensor:
        """The REINFORCE term on this step's kept tempered samples (once per step: the first call after ``on_rollout``)."""
        if self.pending is None or self.pending.tokens.shape[0] == 0:
            self.pending, self.last_loss = None, 0.0
            return batch.logp.sum() * 0.0
        pending, self.pending = self.pending, None
        if self.micro_batch_size is None:
            loss = self._reinforce(pending)
            self.last_loss = float(loss.detach())
            return loss
        total = 0.0  # each chunk's loss is a sum over its samples / |B|: the chunks' gradients add up to the whole term's
        for chunk in pending.chunks(self.micro_batch_size):
            loss = self._reinforce(chunk)
            loss.backward()
            total += float(loss.detach())
        self.last_loss = total
        return batch.logp.sum() * 0.0

    def hooks(self) -> GRPOHooks:
        """GRPO with AEPO's REINFORCE term as ``extra_loss`` (everything else is GRPO's)."""
        return GRPOHooks(extra_loss=self.extra_loss)
