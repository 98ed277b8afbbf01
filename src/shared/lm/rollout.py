"""The batched rollout engine: sample responses from a :class:`TinyTransformer` with a KV cache.

For each prompt the engine feeds the (left-padded) prompts once, then one token per step for the
whole batch, reusing the cached keys and values, until every sequence has emitted ``<eos>`` or
reached ``max_new_tokens``. It returns the response tokens and, for each sampled token, its
log-probability and the entropy of the policy's distribution at temperature $T$ (before truncation:
the quantities RL objectives and entropy measurements use).

:func:`generate_naive` recomputes the whole sequence at every step (no cache): the reference the
benchmark in ``benchmarks/`` compares against; both give identical samples for the same generator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from shared.entropy import entropy_from_logits
from shared.lm.tokenizer import BOS, EOS, PAD
from shared.models.transformer import TinyTransformer
from shared.sampling import SamplerConfig, apply_temperature, sample_next


@dataclass
class Rollout:
    """Sampled responses for a batch of prompts (row ``i`` answers ``prompts[i]``)."""

    prompt_tokens: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P]
    tokens: Tensor  # [B, L] response tokens, PAD after <eos>
    mask: Tensor  # [B, L] True for response tokens up to and including <eos>
    logprobs: Tensor  # [B, L] log pi_T(token), 0 where masked
    entropies: Tensor  # [B, L] H(pi_T) at each step, 0 where masked

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(-1)

    def select(self, rows: Tensor | slice) -> Rollout:
        """The rollout restricted to some of its rows (a mini-batch, a micro-batch, the kept samples)."""
        return Rollout(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

    def chunks(self, size: int | None) -> Iterator[Rollout]:
        """Consecutive blocks of ``size`` rows (the last may be shorter), to bound the memory of a pass over
        ``[B, L, V]`` logits; ``None`` or 0 yields the whole rollout once."""
        if not size or size >= self.tokens.shape[0]:
            yield self
            return
        for start in range(0, self.tokens.shape[0], size):
            yield self.select(slice(start, start + size))


def never_sample_specials(logits: Tensor, ids: tuple[int, ...] = (PAD, BOS)) -> Tensor:
    r"""Tokens that are never part of a response (the char tokenizer's ``<pad>``, ``<bos>``) get logit $-\infty$."""
    if not ids:
        return logits
    return logits.index_fill(-1, torch.tensor(ids, device=logits.device), float("-inf"))


def special_ids(model) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """``(eos_ids, pad_id, banned_ids)`` of a policy: the char tokenizer's unless the model says otherwise
    (:class:`shared.lm.hf_policy.HFPolicy` carries its tokenizer's ids)."""
    return tuple(getattr(model, "eos_ids", (EOS,))), int(getattr(model, "pad_id", PAD)), tuple(getattr(model, "banned_ids", (PAD, BOS)))


def _step_stats(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    z = apply_temperature(logits, temperature) if temperature > 0 else logits
    logp = torch.log_softmax(z, -1).gather(-1, tokens[:, None]).squeeze(-1)
    return logp, entropy_from_logits(z)


@torch.no_grad()
def _sample(model: TinyTransformer, prompt_tokens: Tensor, prompt_mask: Tensor, max_new_tokens: int,
            sampler: SamplerConfig, generator: torch.Generator | None, use_cache: bool) -> Rollout:
    """The sampling loop; ``use_cache`` feeds one new token per step to the KV cache, else re-encodes all."""
    was_training = model.training
    model.eval()
    eos_ids, pad_id, banned = special_ids(model)
    b, dev = prompt_tokens.shape[0], prompt_tokens.device
    eos = torch.tensor(eos_ids, device=dev)
    tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    logprobs, entropies = torch.zeros(b, max_new_tokens, device=dev), torch.zeros(b, max_new_tokens, device=dev)
    mask = torch.zeros(b, max_new_tokens, dtype=torch.bool, device=dev)
    alive = torch.ones(b, dtype=torch.bool, device=dev)
    seq, seq_mask = prompt_tokens, prompt_mask
    out = model(seq, attention_mask=seq_mask, use_cache=use_cache)
    for t in range(max_new_tokens):
        logits = never_sample_specials(out.logits[:, -1], banned)
        nxt = sample_next(logits, sampler, generator)
        lp, ent = _step_stats(logits, nxt, sampler.temperature)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        tokens[:, t], mask[:, t] = nxt, alive
        logprobs[:, t], entropies[:, t] = torch.where(alive, lp, 0.0), torch.where(alive, ent, 0.0)
        alive = alive & ~torch.isin(nxt, eos)
        if not alive.any():
            break
        if use_cache:
            out = model(nxt[:, None], cache=out.cache, use_cache=True)
        else:
            seq = torch.cat([seq, nxt[:, None]], 1)
            seq_mask = torch.cat([seq_mask, torch.ones(b, 1, dtype=torch.bool, device=dev)], 1)
            out = model(seq, attention_mask=seq_mask)
    model.train(was_training)
    return Rollout(prompt_tokens, prompt_mask, tokens, mask, logprobs, entropies)


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """The rows of several rollouts of the same prompt width and ``max_new_tokens``, in order."""
    return Rollout(*(torch.cat([getattr(r, f) for r in parts], 0)
                     for f in ("prompt_tokens", "prompt_mask", "tokens", "mask", "logprobs", "entropies")))


def generate(model: TinyTransformer, prompt_tokens: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
             sampler: SamplerConfig = SamplerConfig(), generator: torch.Generator | None = None,
             batch_size: int | None = None) -> Rollout:
    """Sample up to ``max_new_tokens`` response tokens per prompt with a KV cache.

    ``batch_size`` bounds the rows sampled at once (the KV cache grows with rows × length: a 7B model
    sampling 8k tokens needs about 0.5 GB per row); ``None`` samples the whole batch together.
    Chunks draw from ``generator`` one after the other, so the samples depend on ``batch_size``.
    """
    if batch_size is None or batch_size >= len(prompt_tokens):
        return _sample(model, prompt_tokens, prompt_mask, max_new_tokens, sampler, generator, use_cache=True)
    parts = [_sample(model, prompt_tokens[i : i + batch_size], prompt_mask[i : i + batch_size], max_new_tokens, sampler,
                     generator, use_cache=True) for i in range(0, len(prompt_tokens), batch_size)]
    return concat_rollouts(parts)


def generate_naive(model: TinyTransformer, prompt_tokens: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
                   sampler: SamplerConfig = SamplerConfig(), generator: torch.Generator | None = None) -> Rollout:
    """The same sampling without a cache: the full sequence is re-encoded at every step."""
    return _sample(model, prompt_tokens, prompt_mask, max_new_tokens, sampler, generator, use_cache=False)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """The response texts (up to ``<eos>``)."""
    return [tokenizer.decode(row) for row in rollout.tokens]


def repeat_prompts(prompts: Sequence[Sequence[int]], n: int) -> list[Sequence[int]]:
    """Each prompt ``n`` times in a row (a GRPO group of ``n`` samples per prompt)."""
    return [p for p in prompts for _ in range(n)]
