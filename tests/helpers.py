"""Helpers shared by the notebook tests."""

from __future__ import annotations

import json
from pathlib import Path

from shared.book.results import VOLATILE_FIELDS

ROOT = Path(__file__).resolve().parents[1]
ENTROPY_PAGE = ROOT / "book" / "entropy-in-one-page.ipynb"
OFFLINE_GUARD = ROOT / "tests" / "offline"


def executable_notebooks() -> list[Path]:
    """Every notebook that make book executes and nbval checks."""
    from shared.book.execute import discover_notebooks

    return discover_notebooks(ROOT)


def comparable(results_file: Path) -> dict:
    """A results file without its volatile fields (what must be identical between runs)."""
    doc = json.loads(results_file.read_text())
    for key in VOLATILE_FIELDS:
        doc.pop(key)
    return doc


# ## A tiny Hugging Face policy and math data on disk: the paper profile's code path, offline


def save_tiny_hf_policy(folder: Path, seed: int = 0) -> Path:
    """Save a randomly initialised Qwen2-architecture causal LM (~30 k parameters) and a character-level
    tokenizer over printable ASCII to ``folder``, as ``save_pretrained`` would a hub model."""
    import string

    import tokenizers
    import torch
    import transformers

    specials = ["<pad>", "<bos>", "<eos>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(specials)
    tok.decoder = tokenizers.decoders.Fuse()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


def write_math_jsonl(path: Path, n: int = 8, style: str = "verl") -> Path:
    """``n`` one-line sums as a local data set: verl's format (DAPO-Math-17k) or GSM8K's or MATH's fields."""
    rows = []
    for i in range(n):
        a, b = i + 1, 2 * i + 3
        question = f"What is {a} + {b}?"
        if style == "verl":
            rows.append({"data_source": "fixture", "prompt": [{"role": "user", "content": question + "\nEnd with a line 'Answer: <n>'."}],
                         "reward_model": {"style": "rule", "ground_truth": str(a + b)}})
        elif style == "gsm8k":
            rows.append({"question": question, "answer": f"{a}+{b}={a + b}\n#### {a + b}"})
        elif style == "math":
            rows.append({"problem": question, "answer": str(a + b)})
        else:
            raise ValueError(f"unknown style {style!r}")
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path
