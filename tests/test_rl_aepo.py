"""AEPO's pieces against closed forms and hand-made batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.entropy import entropy_from_logits
from shared.lm.tasks import sample_problem, verify
from shared.lm.tokenizer import CharTokenizer
from shared.rl.aepo import (
    AEPO, AEPOConfig, problem_from_prompt, reinforce_count, reinforce_loss, select_positive, switch_temperature,
)
from shared.rl.grpo import TokenBatch


def test_temperature_switches_on_the_target_entropy():
    assert switch_temperature(0.2, 0.5) == 1.2  # below the target: sample hotter
    assert switch_temperature(0.5, 0.5) == 1.2  # at the target: the official code uses <=
    assert switch_temperature(0.7, 0.5) == 0.8  # above: sample colder
    assert switch_temperature(0.7, 0.5, t_high=2.0, t_low=0.5) == 0.5


def test_reinforce_count_caps_and_halves_above_the_target():
    assert reinforce_count(100, 60, below_target=True) == 60
    assert reinforce_count(100, 60, below_target=False) == 30
    assert reinforce_count(7, 60, below_target=True) == 7
    assert reinforce_count(7, 60, below_target=False) == 3  # floor(7 / 2)
    assert reinforce_count(0, 60, below_target=True) == 0


def test_only_correct_samples_of_mixed_groups_are_kept():
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    # group 0 is mixed: its correct samples have advantage +1 > 0.05; all-correct group 1 has advantage 0
    assert select_positive(rewards, groups).tolist() == [True, False, False, True, False, False, False, False]


def test_reinforce_loss_gradient_is_plain_reinforce_weighted_like_one_grpo_sequence():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.1], [0.8, 0.0, 0.0]]))  # second row: one token, then padding (-inf)
    logp.requires_grad_(True)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    loss = reinforce_loss(logp, mask, batch_size=4)
    loss.backward()
    # ratio 1 and advantage 1: loss = -(1/|B|) sum_j 1, gradient -1 / (|B| |o_j|) on valid tokens, 0 on padding
    assert loss.item() == pytest.approx(-2 / 4)
    expected = torch.tensor([[-1 / 12, -1 / 12, -1 / 12], [-1 / 4, 0.0, 0.0]])
    assert torch.allclose(logp.grad, expected) and torch.isfinite(logp.grad).all()
    assert reinforce_loss(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.bool), batch_size=4).item() == 0.0


@pytest.mark.parametrize("temperature, direction", [(1.2, 1), (0.8, -1)])
def test_reinforcing_tempered_samples_moves_entropy_with_the_temperature(temperature, direction):
    # For a softmax over logits z, E_{a ~ pi^T}[grad_z log pi(a)] = pi^T - pi (closed form): a small step
    # along it moves pi toward pi^T, whose entropy is higher for T > 1 and lower for T < 1.
    z = torch.tensor([2.0, 0.5, -1.0, 0.0])
    pi, pi_t = torch.softmax(z, -1), torch.softmax(z / temperature, -1)
    exact = sum(pi_t[a] * torch.autograd.functional.jacobian(lambda x: torch.log_softmax(x, -1)[a], z) for a in range(4))
    assert torch.allclose(exact, pi_t - pi, atol=1e-6)
    step = entropy_from_logits(z + 0.1 * exact) - entropy_from_logits(z)
    assert direction * step > 0


def test_problems_are_rebuilt_from_their_prompts():
    rng = np.random.default_rng(0)
    for task, difficulty in [("addition", 3), ("addition", 1), ("countdown", 3), ("countdown", 4)]:
        p = sample_problem(task, rng, difficulty)
        q = problem_from_prompt(p.prompt)
        assert (q.task, q.answer, q.numbers) == (p.task, p.answer, p.numbers)
        assert verify(q, p.trace) == 1.0 and verify(q, p.trace + "1") == 0.0
    with pytest.raises(ValueError, match="neither"):
        problem_from_prompt("hello")


def test_config_rejects_bad_values_and_keeps_the_official_defaults():
    cfg = AEPOConfig()
    assert (cfg.t_high, cfg.t_low, cfg.max_samples, cfg.adv_threshold, cfg.target_entropy, cfg.prompt_fraction) == (1.2, 0.8, 60, 0.05, 0.5, 0.25)
    with pytest.raises(ValueError, match="prompt_fraction"):
        AEPOConfig(prompt_fraction=0.0)
    with pytest.raises(ValueError, match="t_low"):
        AEPOConfig(t_low=1.5, t_high=1.2)
    with pytest.raises(ValueError, match="target_entropy"):
        AEPOConfig(target_entropy=-1.0)


def test_one_aepo_step_records_its_choice_and_adds_a_finite_loss():
    from shared.lm.pretrain import load_base_model
    from shared.lm.rollout import generate
    from shared.rl.grpo import GRPOConfig, grpo_step
    from shared.sampling import SamplerConfig

    torch.manual_seed(0)
    model = load_base_model()
    tok = CharTokenizer()
    problems = [sample_problem("addition", np.random.default_rng(i), 3) for i in range(2)]
    pt, pm = tok.pad_left([tok.encode(p.prompt, bos=True) for p in problems for _ in range(4)])
    rollout = generate(model, pt, pm, max_new_tokens=40, sampler=SamplerConfig(), generator=torch.Generator().manual_seed(0))
    rewards = torch.tensor([verify(problems[i // 4], tok.decode(r)) for i, r in enumerate(rollout.tokens)])
    aepo = AEPO(model, AEPOConfig(target_entropy=10.0, max_samples=3, prompt_fraction=0.5), group_size=4)  # far above: T_high
    stats = aepo.on_rollout(0, rollout, rewards)
    assert stats["aepo_kept"] <= 3  # tempered rollout on the first of the two prompts only: one group of 4, mixed
    assert stats["aepo_temperature"] == 1.2 and stats["aepo_m"] == min(3, stats["aepo_kept"])
    assert aepo.pending.tokens.shape[0] == stats["aepo_m"]
    assert aepo.reinforced == stats["aepo_m"] and aepo.reinforced_fraction == pytest.approx(stats["aepo_m"] / 8)
    out = grpo_step(model, torch.optim.Adam(model.parameters(), 1e-4), rollout, rewards, torch.arange(8) // 4,
                    GRPOConfig(), aepo.hooks())
    assert np.isfinite(out["loss"]) and aepo.pending is None


# ## The same method on any testbed: the source's reward, the tokenizer's ids, micro-batches


def test_the_source_path_reproduces_the_tiny_lm_prompt_path():
    from shared.lm.pretrain import load_base_model
    from shared.rl.trainer import RLConfig, TaskSource, train_rl

    config = RLConfig(prompts_per_step=4, group_size=4, steps=3, eval_every=10, eval_problems=4, eval_k=2)
    histories = []
    for source in (None, TaskSource(config.task, config.difficulties)):
        model = load_base_model()
        aepo = AEPO(model, AEPOConfig(target_entropy=10.0, max_samples=4, prompt_fraction=0.5), group_size=4, source=source)
        kwargs = {} if source is None else {"source": aepo.source}
        histories.append(train_rl(model, config, aepo.hooks(), on_rollout=aepo.on_rollout, show_progress=False, **kwargs).history)
    assert histories[0].equals(histories[1]) and histories[0]["aepo_kept"].sum() > 0
    # the activity is the run's reinforced samples over its batch samples: the mean of aepo_m / |B| at a fixed batch
    assert aepo.reinforced_fraction == pytest.approx(histories[1]["aepo_m"].mean() / 16)
    assert AEPO(model, AEPOConfig(), group_size=4).reinforced_fraction == 0.0


def test_aepo_runs_on_a_hugging_face_policy_with_its_tokenizer_and_reward(tmp_path):
    pytest.importorskip("transformers")
    from helpers import save_tiny_hf_policy, write_math_jsonl

    from shared.rl.testbed import load_testbed
    from shared.rl.trainer import RLConfig, train_rl

    bed = load_testbed(str(save_tiny_hf_policy(tmp_path / "tiny-qwen2")), str(write_math_jsonl(tmp_path / "train.jsonl", n=6)),
                       device="cpu", dtype="float32", gradient_checkpointing=True)  # the paper preset's memory settings
    model = bed.make_policy()
    config = RLConfig(prompts_per_step=2, group_size=3, steps=2, max_new_tokens=6, eval_every=10, eval_problems=2, eval_k=2)
    aepo = AEPO(model, AEPOConfig(target_entropy=0.0, max_samples=2, prompt_fraction=1.0), group_size=3, max_new_tokens=6,
                tokenizer=bed.tokenizer, source=bed.source, micro_batch_size=1, rollout_batch_size=4)
    rewards_seen = []
    original = aepo.source.reward  # watch every reward the run asks for
    aepo.source.reward = lambda p, r: rewards_seen.append((p, r)) or original(p, r)
    run = train_rl(model, config, aepo.hooks(), on_rollout=aepo.on_rollout, show_progress=False,
                   **(bed.train_kwargs | {"source": aepo.source}))
    assert run.history["aepo_temperature"].eq(0.8).all()  # a random model's entropy is far above a target of 0
    # per step 6 rewards of the trainer and 6 tempered ones (both prompts, prompt_fraction 1), plus 2 evaluations x 2 x 2
    scored = [p for p, _ in rewards_seen]
    assert len(scored) == 2 * (6 + 6) + 2 * 4 and all(p in bed.source.problems for p in scored)
    assert torch.isfinite(torch.tensor(run.history["loss"].to_numpy())).all()
    # a random model rarely answers right, so reinforce some of its samples by hand: the term back-propagates in chunks
    from shared.lm.rollout import generate

    _, pt, pm = bed.sample_prompts(np.random.default_rng(0), 3)
    aepo.pending = generate(model, pt, pm, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    aepo.batch_size = 6
    model.zero_grad(set_to_none=True)
    aepo.extra_loss(TokenBatch(*(torch.zeros(1, 1, requires_grad=True) if i == 0 else None for i in range(8)), None)).backward()
    assert aepo.last_loss == pytest.approx(-3 / 6) and all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in model.parameters())
    with pytest.raises(RuntimeError, match="aepo.source"):  # the testbed's own source records nothing
        fresh = AEPO(model, AEPOConfig(), group_size=3, max_new_tokens=6, tokenizer=bed.tokenizer, source=bed.source)
        train_rl(model, config, fresh.hooks(), on_rollout=fresh.on_rollout, show_progress=False, **bed.train_kwargs)


def test_micro_batched_reinforce_term_has_the_whole_terms_gradient():
    from shared.lm.pretrain import load_base_model
    from shared.lm.rollout import generate
    from shared.sampling import SamplerConfig

    model = load_base_model()
    tok = CharTokenizer()
    problems = [sample_problem("addition", np.random.default_rng(i), 3) for i in range(5)]
    pt, pm = tok.pad_left([tok.encode(p.prompt, bos=True) for p in problems])
    pending = generate(model, pt, pm, max_new_tokens=20, sampler=SamplerConfig(temperature=1.2), generator=torch.Generator().manual_seed(1))
    dummy = TokenBatch(*(torch.zeros(1, 1, requires_grad=True) if i == 0 else None for i in range(8)), None)
    grads = []
    for micro in (None, 2):
        model.zero_grad(set_to_none=True)
        aepo = AEPO(model, group_size=4, micro_batch_size=micro)
        aepo.pending, aepo.batch_size = pending, 16
        aepo.extra_loss(dummy).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        assert aepo.pending is None and aepo.last_loss == pytest.approx(-5 / 16)  # ratio 1: -(1/|B|) per sample
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
