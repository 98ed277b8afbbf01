"""Cache keys cover the code and the CPU kernels: a change to either misses the cache."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from shared.cache import cache_key, code_fingerprint, module_files


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_book_code"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "loss.py").write_text("def loss(x):\n    return x ** 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    sys.modules.pop("fake_book_code", None)


def test_fingerprint_follows_the_source_text(fake_module):
    assert [p.name for p in module_files(["fake_book_code"])] == ["__init__.py", "loss.py"]
    before = code_fingerprint(["fake_book_code"])
    assert code_fingerprint(["fake_book_code"]) == before
    (fake_module / "loss.py").write_text("def loss(x):\n    return 2 * x ** 2\n")
    assert code_fingerprint(["fake_book_code"]) != before
    with pytest.raises(ValueError, match="no module"):
        code_fingerprint(["no_such_module_here"])


def test_key_depends_on_the_kernels(monkeypatch):
    pinned = cache_key({"a": 1}, ["shared.entropy"])
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # an unpinned environment
    assert cache_key({"a": 1}, ["shared.entropy"]) != pinned


def test_rl_cache_misses_when_the_code_changes(tmp_path, monkeypatch, fake_module):
    from shared.lm.tokenizer import CharTokenizer
    from shared.models.transformer import TinyTransformer, TransformerConfig
    from shared.rl import trainer
    from shared.rl.trainer import RLConfig, TaskSource, cached_train_rl

    monkeypatch.setenv("ENTROPY_BOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(trainer, "RL_CODE", (*trainer.RL_CODE, "fake_book_code"))
    torch.manual_seed(0)
    base = TinyTransformer(TransformerConfig(CharTokenizer().vocab_size, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    cfg = RLConfig(difficulties=(1,), prompts_per_step=2, group_size=2, steps=1, max_new_tokens=4, eval_every=1, eval_problems=2, eval_k=2)
    source = TaskSource(cfg.task, cfg.difficulties)
    path = trainer._cache_path(cfg, base, "grpo", source)
    cached_train_rl(copy.deepcopy(base), cfg, show_progress=False)
    assert path.exists()
    assert trainer._cache_path(cfg, base, "grpo", source) == path  # same code: a hit
    (fake_module / "loss.py").write_text("def loss(x):\n    return x ** 3\n")  # the code a run depends on changes
    assert trainer._cache_path(cfg, base, "grpo", source) != path  # a miss: the stale run is not served
