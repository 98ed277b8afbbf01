"""A ``transformers`` causal LM behind the interface of :class:`~shared.models.transformer.TinyTransformer`.

The ``paper`` profile runs the same rollout engine (:func:`shared.lm.rollout.generate`) and the same
GRPO update (:func:`shared.rl.grpo.response_logits`) as the quick profile, on real models (the
Qwen2.5 family). :class:`HFPolicy` makes a Hugging Face causal LM answer the calls those functions
make:

``policy(tokens, attention_mask=mask, use_cache=True)`` → ``.logits [B, T, V]`` and ``.cache``;
``policy(next_tokens[:, None], cache=cache, use_cache=True)`` continues from the cache.

Padding works as in the tiny transformer: batches are **left**-padded, ``attention_mask`` marks real
tokens, and positions count real tokens only (``position_ids = cumsum(mask) - 1``), so a padded
prompt gives the logits of the unpadded one. The cache carries the model's ``past_key_values``, the
attention mask of everything seen so far and the next position of each row; incremental decoding
therefore reproduces the logits of one full forward pass over the whole sequence.

:class:`HFTokenizerAdapter` gives a Hugging Face tokenizer the part of the
:class:`~shared.lm.tokenizer.CharTokenizer` interface the RL loop uses. ``transformers`` is imported
lazily: this module can be imported without it, only building a model or loading one needs it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class HFCache:
    """State of an incremental forward pass: the model's ``past_key_values``, the mask ``[B, S]`` of all
    tokens seen so far (``True`` = real) and the next position ``[B]`` of each row.

    Hugging Face ``Cache`` objects are updated **in place** by the next forward call: a cache is meant
    to be continued once (as :func:`shared.lm.rollout.generate` does), not branched.
    """

    past_key_values: Any
    key_mask: Tensor
    next_pos: Tensor

    @property
    def length(self) -> int:
        return int(self.key_mask.shape[1])

    def select(self, index: Tensor) -> HFCache:
        """Keep only the batch rows in ``index`` (in place for the HF cache, as ``Cache.batch_select_indices``)."""
        pkv = self.past_key_values
        if hasattr(pkv, "batch_select_indices"):
            pkv.batch_select_indices(index)
        else:  # legacy tuple-of-tuples format
            pkv = tuple(tuple(t[index] for t in layer) for layer in pkv)
        return HFCache(pkv, self.key_mask[index], self.next_pos[index])


@dataclass
class HFOutput:
    logits: Tensor  # [B, T, V]
    cache: HFCache | None
    attentions: list[Tensor] | None  # per layer [B, H, T, S] (eager attention only)


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability: ``nn.Dropout`` modules and the functional attention dropout rates."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


class HFPolicy(nn.Module):
    """Wraps a ``transformers`` causal LM so that the rollout engine and the GRPO update can drive it.

    ``eos_ids`` / ``pad_id`` are the tokenizer's end-of-sequence and padding ids (taken from the model's
    generation config / config when not given); ``banned_ids`` are ids never to be sampled. They are
    recorded here so that a rollout engine that reads them from the policy ends responses at the
    model's own end-of-sequence token. ``float_logits`` returns float32 logits whatever the model's
    dtype (log-probabilities and entropies need them). ``disable_dropout`` (the default) sets every
    dropout probability of the model to 0, as RL trainers do: otherwise the log-probabilities of the
    update (computed in training mode) would differ from those of the rollout even on-policy.
    """

    def __init__(self, model: nn.Module, *, eos_ids: int | Sequence[int] | None = None, pad_id: int | None = None,
                 banned_ids: Sequence[int] = (), float_logits: bool = True, disable_dropout: bool = True) -> None:
        super().__init__()
        self.model = model
        if disable_dropout:
            _disable_dropout(model)
        self.train(model.training)
        cfg = getattr(model, "config", None)
        if eos_ids is None:
            gen_cfg = getattr(model, "generation_config", None)
            eos_ids = getattr(gen_cfg, "eos_token_id", None)
            if eos_ids is None:
                eos_ids = getattr(cfg, "eos_token_id", None)
        self.eos_ids: tuple[int, ...] = () if eos_ids is None else ((int(eos_ids),) if isinstance(eos_ids, int) else tuple(int(i) for i in eos_ids))
        if pad_id is None:
            pad_id = getattr(cfg, "pad_token_id", None)
        self.pad_id: int = int(pad_id) if pad_id is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.banned_ids: tuple[int, ...] = tuple(int(i) for i in banned_ids)
        self.float_logits = float_logits
        # transformers 5 renamed the `past_key_values` argument and output to `cache`.
        self._cache_arg = "cache" if _accepts(model.forward, "cache") else "past_key_values"

    @property
    def eos_id(self) -> int:
        """The first end-of-sequence id (the one written after a response)."""
        return self.eos_ids[0]

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None, cache: HFCache | None = None,
                use_cache: bool = False, return_attention: bool = False) -> HFOutput:
        """Logits for every position of ``tokens`` ``[B, T]``; continue from ``cache`` if given."""
        b, t = tokens.shape
        mask = torch.ones(b, t, dtype=torch.bool, device=tokens.device) if attention_mask is None else attention_mask.bool()
        start = torch.zeros(b, dtype=torch.long, device=tokens.device) if cache is None else cache.next_pos
        pos = (start.view(b, 1) + mask.long().cumsum(1) - 1).clamp(min=0)
        key_mask = mask if cache is None else torch.cat([cache.key_mask, mask], 1)
        kwargs: dict[str, Any] = {"input_ids": tokens, "attention_mask": key_mask.long(), "position_ids": pos,
                                  "use_cache": use_cache}
        if cache is not None:
            kwargs[self._cache_arg] = cache.past_key_values
        if return_attention:
            kwargs["output_attentions"] = True
        out = self.model(**kwargs)
        logits = out.logits.float() if self.float_logits else out.logits
        new_cache = None
        if use_cache:
            pkv = out.get("cache") if "cache" in out else out.get("past_key_values")
            new_cache = HFCache(pkv, key_mask, pos[:, -1] + 1)
        attentions = list(out.attentions) if return_attention and getattr(out, "attentions", None) is not None else None
        return HFOutput(logits, new_cache, attentions)


class HFTokenizerAdapter:
    """The subset of :class:`~shared.lm.tokenizer.CharTokenizer` the RL loop uses, for a Hugging Face tokenizer.

    ``encode(text, bos=True)`` prepends the tokenizer's BOS id when it has one (Qwen2.5 has none, so
    it adds nothing); ``eos=True`` appends :attr:`eos_id`. ``decode`` stops at the first end-of-sequence
    id and drops special tokens. ``pad_left`` pads with :attr:`pad_id` (the tokenizer's pad token, else
    its EOS token).
    """

    def __init__(self, tokenizer: Any, eos_ids: int | Sequence[int] | None = None) -> None:
        self.tokenizer = tokenizer
        if eos_ids is None:
            eos_ids = tokenizer.eos_token_id
        if eos_ids is None:
            raise ValueError("the tokenizer has no eos_token_id: pass eos_ids")
        self.eos_ids: tuple[int, ...] = (int(eos_ids),) if isinstance(eos_ids, int) else tuple(int(i) for i in eos_ids)
        pad = tokenizer.pad_token_id
        self.pad_id: int = int(pad) if pad is not None else self.eos_ids[0]
        self.bos_id: int | None = tokenizer.bos_token_id

    @property
    def eos_id(self) -> int:
        return self.eos_ids[0]

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (the model's embedding matrix may be larger)."""
        return len(self.tokenizer)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        head = [self.bos_id] if bos and self.bos_id is not None else []
        return head + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int] | Tensor, stop_at_eos: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if stop_at_eos:
            for i, token in enumerate(ids):
                if token in self.eos_ids:
                    ids = ids[:i]
                    break
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def pad_left(self, sequences: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Left-pad to a batch: ``tokens [B, T]`` and ``attention_mask [B, T]`` (``True`` = real token)."""
        width = max(len(s) for s in sequences)
        tokens = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.bool)
        for i, s in enumerate(sequences):
            if len(s):
                tokens[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
                mask[i, width - len(s):] = True
        return tokens, mask


def _version_at_least(version: str, minimum: tuple[int, ...]) -> bool:
    parts = [int(m.group()) if (m := re.match(r"\d+", piece)) else 0 for piece in version.split(".")[: len(minimum)]]
    return tuple(parts) >= minimum


def load_hf_tokenizer(name: str) -> HFTokenizerAdapter:
    """The tokenizer of ``name`` (hub name or local directory), ending at the model's own end-of-sequence ids.

    Those come from the model's generation config when it has one (for Qwen2.5-Instruct both
    ``<|im_end|>`` and ``<|endoftext|>``), else from the tokenizer.
    """
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(name)
    try:
        eos = GenerationConfig.from_pretrained(name).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    return HFTokenizerAdapter(tokenizer, eos_ids=eos if eos is not None else tokenizer.eos_token_id)


def load_hf_model(name: str, tokenizer: HFTokenizerAdapter, dtype: torch.dtype | str = torch.bfloat16,
                  device: str | torch.device = "cpu", *, attn_implementation: str | None = None,
                  gradient_checkpointing: bool = False, **model_kwargs: Any) -> HFPolicy:
    """A pretrained causal LM as an :class:`HFPolicy` that stops at ``tokenizer``'s end-of-sequence ids.

    ``gradient_checkpointing`` recomputes activations in the backward pass (less memory, ~30 % slower):
    what a 7B policy needs on one GPU with long responses.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = dict(model_kwargs)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    # transformers >= 4.56 calls the argument `dtype`; older versions `torch_dtype` (and ignore unknown ones).
    kwargs["dtype" if _version_at_least(transformers.__version__, (4, 56)) else "torch_dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    model.to(device)
    if gradient_checkpointing:  # transformers >= 5.x renamed it; older versions only have the gradient_ name
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return HFPolicy(model, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)


def load_hf_policy(name: str, dtype: torch.dtype | str = torch.bfloat16, device: str | torch.device = "cpu", *,
                   attn_implementation: str | None = None, gradient_checkpointing: bool = False,
                   **model_kwargs: Any) -> tuple[HFPolicy, HFTokenizerAdapter]:
    """Load a pretrained causal LM (e.g. ``"Qwen/Qwen2.5-0.5B-Instruct"``) and its tokenizer:
    :func:`load_hf_tokenizer` then :func:`load_hf_model`, so the policy and the tokenizer stop at the same tokens."""
    adapter = load_hf_tokenizer(name)
    policy = load_hf_model(name, adapter, dtype, device, attn_implementation=attn_implementation,
                           gradient_checkpointing=gradient_checkpointing, **model_kwargs)
    return policy, adapter
