"""The RL testbed: one code path for the tiny LM (quick) and a Hugging Face model on real math data (paper)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.lm.math_data import load_math_dataset, load_verl_math, math_verify
from shared.rl.testbed import load_testbed
from shared.rl.trainer import MathSource, RLConfig, TaskSource, cached_train_rl, entropy_accuracy_record, train_rl

from helpers import save_tiny_hf_policy, write_math_jsonl


def test_the_tiny_lm_testbed_is_the_quick_profiles_setting():
    bed = load_testbed("tiny-lm", "addition", difficulties=(3, 4))
    assert bed.is_tiny and bed.name == "tiny-LM addition 3-4" and bed.source == TaskSource("addition", (3, 4))
    a, b = bed.make_policy(), bed.make_policy()
    assert a is not b and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    problems, tokens, mask = bed.sample_prompts(np.random.default_rng(0), 3)
    assert len(problems) == 3 and tokens.shape == mask.shape and mask[:, -1].all()  # left-padded
    with pytest.raises(ValueError, match="its own tasks"):
        load_testbed("tiny-lm", "BytedTsinghua-SIA/DAPO-Math-17k")


def test_verl_format_data_keeps_its_own_instruction_and_dedupes(tmp_path):
    path = write_math_jsonl(tmp_path / "dapo.jsonl", n=4)
    path.write_text(path.read_text() + path.read_text().splitlines()[0] + "\n")  # a repeated row, as in the hub file
    problems = load_verl_math("fixture", path=path)
    assert len(problems) == 4 and problems[0].instruction == "" and "Answer: <n>" in problems[0].prompt
    assert problems[0].answer == "4"
    assert math_verify(problems[0], "1 + 3 is four.\nAnswer: 4") == 1.0
    assert math_verify(problems[0], "Answer: 5") == 0.0
    assert len(load_verl_math("fixture", path=path, dedupe=False)) == 5


@pytest.mark.parametrize("style, source", [("verl", "dapo"), ("gsm8k", "gsm8k"), ("math", "math500")])
def test_load_math_dataset_reads_a_local_file_by_its_fields(tmp_path, style, source):
    problems = load_math_dataset(str(write_math_jsonl(tmp_path / f"{source}.jsonl", n=5, style=style)), n=3)
    assert len(problems) == 3 and problems[1].answer == "7" and problems[0].source == source
    with pytest.raises(ValueError, match="neither a known data set"):
        load_math_dataset(str(tmp_path / "missing.jsonl"))


def test_a_hugging_face_testbed_runs_the_same_loop_offline(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("ENTROPY_BOOK_CACHE", str(tmp_path / "cache"))
    model_dir = save_tiny_hf_policy(tmp_path / "tiny-qwen2")
    data = write_math_jsonl(tmp_path / "train.jsonl", n=6)
    bench = write_math_jsonl(tmp_path / "bench.jsonl", n=4, style="math")
    bed = load_testbed(str(model_dir), str(data), eval_data=str(bench), device="cpu", dtype="float32")
    assert not bed.is_tiny and bed.name == "tiny-qwen2 on train.jsonl" and isinstance(bed.source, MathSource)
    assert "Question: What is 1 + 3?" in bed.source.prompt(bed.source.problems[0])  # no chat template: a plain frame
    config = RLConfig(prompts_per_step=2, group_size=2, steps=2, max_new_tokens=6, eval_every=1, eval_problems=2, eval_k=2)
    run = cached_train_rl(bed.make_policy(), config, tag="grpo", show_progress=False, **bed.train_kwargs)  # not cached: trained
    assert list(run.history.index) == [0, 1] and run.evals["pass@1"].between(0, 1).all()
    assert not (tmp_path / "cache").exists()
    again = train_rl(bed.make_policy(), config, show_progress=False, **bed.train_kwargs)
    assert again.history.equals(run.history)  # seeded: the same run twice
    record = entropy_accuracy_record(config, {"GRPO": run}, "GRPO", name=bed.name)
    assert record["name"] == bed.name and len(record["points"]["GRPO"]["entropy"]) == 3


def test_rl_settings_build_the_testbed_and_the_run_config():
    import dataclasses

    from shared.book.profiles import resolve_settings, setting
    from shared.rl.grpo import GRPOConfig
    from shared.rl.testbed import RLSettings, rl_config, testbed_from

    @dataclass_frozen
    class Settings(RLSettings):
        beta: float = setting(low=0.0, high=1.0, doc="a chapter's own knob")

    presets = {"quick": Settings(model="tiny-lm", data="countdown", difficulties=(3,), steps=30, prompts_per_step=8, group_size=8, beta=0.1)}
    s = resolve_settings("quick", presets, steps=5)
    assert s.steps == 5 and s.lr == 1e-4 and s.micro_batch_size == 0
    assert testbed_from(s).name == "tiny-LM countdown 3"
    config = rl_config(s, GRPOConfig(entropy_coef=0.01), seed=3)
    default = RLConfig(task="countdown", difficulties=(3,), steps=5, seed=3, grpo=GRPOConfig(entropy_coef=0.01))
    assert config == default  # the quick defaults are RLConfig's own
    assert rl_config(dataclasses.replace(s, micro_batch_size=2)).grpo.micro_batch_size == 2
    with pytest.raises(ValueError, match="group_size"):
        resolve_settings("quick", presets, group_size=1)


def dataclass_frozen(cls):
    import dataclasses

    return dataclasses.dataclass(frozen=True)(cls)


def test_mini_batch_prompts_set_the_updates_per_rollout():
    from shared.rl.grpo import GRPOConfig
    from shared.rl.testbed import RLSettings, rl_config, updates_per_rollout

    assert updates_per_rollout(512, 32) == 16 and updates_per_rollout(8, 0) == 1 and updates_per_rollout(2, 32) == 1
    s = RLSettings(model="tiny-lm", data="addition", difficulties=(3,), steps=2, prompts_per_step=8, group_size=2)
    assert rl_config(s).grpo.minibatches == 1
    assert rl_config(s, GRPOConfig(minibatches=4)).grpo.minibatches == 4  # a chapter's own choice stands when the setting is 0
    import dataclasses

    assert rl_config(dataclasses.replace(s, mini_batch_prompts=2), GRPOConfig(clip_high=0.28)).grpo == GRPOConfig(clip_high=0.28, minibatches=4)
