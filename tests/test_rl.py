"""GRPO/DAPO pieces against closed forms and hand-made batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.evaluation.passk import mean_pass_at_k, pass_at_k
from shared.rl.entropy_terms import batch_covariance, fit_entropy_law, token_covariance
from shared.rl.grpo import (
    GRPOConfig, aggregate, clipped_surrogate, group_advantages, informative_groups, kl_k3, overlong_penalty,
)


def test_equal_rewards_give_zero_advantage_and_groups_are_normalised():
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0]), groups)
    assert torch.all(adv[:3] == 0)
    assert torch.isclose(adv[3:].mean(), torch.tensor(0.0), atol=1e-6) and torch.isclose(adv[3:].std(unbiased=False), torch.tensor(1.0), atol=1e-4)
    dr = group_advantages(torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), std_normalize=False)
    assert dr.tolist() == [-0.5, 0.5]
    assert informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1])).tolist() == [False, False, True, True]


def test_clipped_objective_has_zero_gradient_outside_the_trust_region():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.9])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    clipped_surrogate(logp, old, adv, 0.2, 0.2).sum().backward()
    # ratio 1.5 with A>0 and ratio 0.5 with A<0 are clipped: no gradient; inside the region: -A * ratio.
    assert logp.grad[0] == 0 and logp.grad[1] == 0
    assert torch.allclose(logp.grad[2:], torch.tensor([-1.1, 0.9]))
    # clip-higher: with eps_high = 0.6, ratio 1.5 is inside again
    logp.grad = None
    clipped_surrogate(logp, old, adv, 0.2, 0.6).sum().backward()
    assert torch.isclose(logp.grad[0], torch.tensor(-1.5))


def test_token_level_and_sequence_level_aggregation_differ_as_expected():
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    assert aggregate(values, mask, "token-mean") == pytest.approx(8 / 5)  # every token weighs the same
    assert aggregate(values, mask, "seq-mean-token-mean") == pytest.approx((1 + 4) / 2)  # every sequence weighs the same
    assert aggregate(values, mask, "seq-mean-token-sum-norm") == pytest.approx((4 / 4 + 4 / 4) / 2)
    with pytest.raises(ValueError, match="aggregation"):
        GRPOConfig(aggregation="mean")


def test_k3_kl_is_zero_at_equality_and_non_negative():
    x = torch.randn(100)
    assert torch.all(kl_k3(x, x) == 0) and torch.all(kl_k3(x, torch.randn(100)) >= 0)


def test_overlong_penalty_is_a_linear_ramp_to_minus_one():
    pen = overlong_penalty(torch.tensor([10, 16, 18, 20, 25]), max_len=20, buffer=4)
    assert pen.tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_token_covariance_and_entropy_law():
    logp = torch.tensor([[-0.1, -2.0], [-0.5, -1.0]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    cov = token_covariance(logp, adv, mask)
    lp_c = logp - logp.mean()
    assert torch.allclose(cov, lp_c * adv) and batch_covariance(logp, adv, mask) == pytest.approx(float((lp_c * adv).mean()))
    h = np.linspace(0.1, 1.5, 20)
    a, b, r2 = fit_entropy_law(h, -0.3 * np.exp(h) + 1.2)
    assert a == pytest.approx(0.3) and b == pytest.approx(1.2) and r2 == pytest.approx(1.0)


def test_pass_at_k_closed_forms():
    assert pass_at_k(8, 0, 4) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - (3 * 2) / (4 * 3))  # 1 - C(3,2)/C(4,2)
    assert mean_pass_at_k(np.array([[1, 0], [0, 0]]), 2) == pytest.approx(0.5)


def _tiny_rollout(seed=0):
    from shared.lm.rollout import generate
    from shared.lm.tokenizer import CharTokenizer
    from shared.models.transformer import TinyTransformer, TransformerConfig

    tok = CharTokenizer()
    torch.manual_seed(seed)
    model = TinyTransformer(TransformerConfig(tok.vocab_size, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    pt, pm = tok.pad_left([tok.encode("12+3=", bos=True)] * 4 + [tok.encode("7+8=", bos=True)] * 4)
    rollout = generate(model, pt, pm, max_new_tokens=6, generator=torch.Generator().manual_seed(seed))
    return model, rollout, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def test_on_policy_ratio_is_one_and_equal_rewards_leave_the_policy_unchanged():
    from shared.rl.grpo import grpo_step, response_logits

    model, rollout, groups = _tiny_rollout()
    logp = torch.log_softmax(response_logits(model, rollout), -1).gather(-1, rollout.tokens[..., None]).squeeze(-1)
    assert torch.allclose(logp[rollout.mask], rollout.logprobs[rollout.mask], atol=1e-5)  # rho = 1 on-policy
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = grpo_step(model, opt, rollout, torch.ones(8), groups)
    assert stats["loss"] == 0.0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_default_hooks_equal_the_baseline_and_a_weight_hook_scales_the_loss():
    from shared.rl.grpo import GRPOHooks, TokenBatch, grpo_loss

    torch.manual_seed(0)
    logp = torch.randn(2, 3)
    batch = TokenBatch(logp, logp.detach() + 0.1, torch.tensor([[1.0] * 3, [-1.0] * 3]), torch.ones(2, 3, dtype=torch.bool),
                       torch.rand(2, 3), torch.randn(2, 3, 5), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    base, _ = grpo_loss(batch, GRPOConfig())
    same, _ = grpo_loss(batch, GRPOConfig(), GRPOHooks())
    half, _ = grpo_loss(batch, GRPOConfig(), GRPOHooks(token_weights=lambda b: torch.full_like(b.logp, 0.5)))
    assert torch.equal(base, same) and torch.isclose(half, base / 2)


def test_cached_rl_run_equals_a_fresh_run(tmp_path, monkeypatch):
    import copy

    from shared.lm.tokenizer import CharTokenizer
    from shared.models.transformer import TinyTransformer, TransformerConfig
    from shared.rl.trainer import RLConfig, cached_train_rl, train_rl

    monkeypatch.setenv("ENTROPY_BOOK_CACHE", str(tmp_path))
    torch.manual_seed(0)
    base = TinyTransformer(TransformerConfig(CharTokenizer().vocab_size, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    cfg = RLConfig(difficulties=(1,), prompts_per_step=2, group_size=2, steps=2, max_new_tokens=6, eval_every=1, eval_problems=2, eval_k=2)
    first = cached_train_rl(copy.deepcopy(base), cfg, show_progress=False)
    hit = cached_train_rl(copy.deepcopy(base), cfg, show_progress=False)
    fresh = train_rl(copy.deepcopy(base), cfg, show_progress=False)
    assert len(list(tmp_path.rglob("*.pt"))) == 1
    assert first.history.equals(hit.history) and first.history.equals(fresh.history) and first.evals.equals(hit.evals)
    for a, b in zip(hit.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)


def test_token_covariance_ignores_minus_infinity_in_padding():
    logp = torch.tensor([[-0.5, float("-inf")], [-1.5, -1.0]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    mask = torch.tensor([[True, False], [True, True]])
    cov = token_covariance(logp, adv, mask)
    assert torch.isfinite(cov).all() and cov[0, 1] == 0
    lp, a = torch.tensor([-0.5, -1.5, -1.0]), torch.tensor([1.0, -1.0, -1.0])
    assert batch_covariance(logp, adv, mask) == pytest.approx(float(((lp - lp.mean()) * (a - a.mean())).mean()))


def test_several_updates_per_rollout_move_the_ratio_off_one_so_clipping_can_bind():
    from shared.rl.grpo import grpo_step

    model, rollout, groups = _tiny_rollout()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    one = grpo_step(model, torch.optim.SGD(model.parameters(), lr=50.0), rollout, rewards, groups, GRPOConfig())
    assert one["clip_fraction"] == 0.0  # a single on-policy step: ratio = 1 everywhere
    model, rollout, groups = _tiny_rollout()
    many = grpo_step(model, torch.optim.SGD(model.parameters(), lr=50.0), rollout, rewards, groups,
                     GRPOConfig(ppo_epochs=2, minibatches=2))
    assert many["clip_fraction"] > 0.0
    assert many["entropy"] == pytest.approx(one["entropy"], rel=1e-4)  # the sampling policy's entropy either way
    with pytest.raises(ValueError, match="ppo_epochs"):
        GRPOConfig(ppo_epochs=0)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_accumulate_the_gradient_of_the_whole_batch(aggregation):
    from shared.rl.grpo import grpo_step

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    grads = []
    for micro in (None, 3):  # 8 rows in micro-batches of 3, 3, 2: unequal shares of rows and tokens
        model, rollout, groups = _tiny_rollout()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # a zero step keeps the gradient to compare
        stats = grpo_step(model, opt, rollout, rewards, groups, GRPOConfig(aggregation=aggregation, micro_batch_size=micro))
        grads.append(([p.grad.clone() for p in model.parameters() if p.grad is not None], stats))
    (whole, s_whole), (micro, s_micro) = grads
    assert len(whole) == len(micro) > 0
    for a, b in zip(whole, micro):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert s_micro["loss"] == pytest.approx(s_whole["loss"], abs=1e-6)
    assert s_micro["entropy"] == pytest.approx(s_whole["entropy"], rel=1e-5)
    with pytest.raises(ValueError, match="micro_batch_size"):
        GRPOConfig(micro_batch_size=0)


def test_chunked_rollouts_keep_shapes_and_the_whole_batch_default():
    from shared.lm.rollout import generate

    model, rollout, _ = _tiny_rollout()
    again = generate(model, rollout.prompt_tokens, rollout.prompt_mask, max_new_tokens=6, generator=torch.Generator().manual_seed(0),
                     batch_size=100)  # one chunk: the same draws as the whole batch
    assert torch.equal(again.tokens, rollout.tokens) and torch.equal(again.logprobs, rollout.logprobs)
    chunked = generate(model, rollout.prompt_tokens, rollout.prompt_mask, max_new_tokens=6, generator=torch.Generator().manual_seed(0),
                       batch_size=3)
    assert chunked.tokens.shape == rollout.tokens.shape and torch.equal(chunked.prompt_tokens, rollout.prompt_tokens)
    first = generate(model, rollout.prompt_tokens[:3], rollout.prompt_mask[:3], max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(chunked.tokens[:3], first.tokens)  # the first chunk draws first
    assert ((chunked.logprobs != 0) == chunked.mask).all()


def test_dual_clip_caps_the_loss_of_negative_advantage_tokens():
    from shared.rl.grpo import clipped_surrogate

    old = torch.zeros(4)
    logp = torch.log(torch.tensor([0.5, 2.0, 5.0, 5.0])).requires_grad_()  # ratios 0.5, 2, 5, 5
    adv = torch.tensor([-1.0, -1.0, -1.0, 1.0])
    plain = clipped_surrogate(logp, old, adv, 0.2, 0.2)
    torch.testing.assert_close(plain, torch.tensor([0.8, 2.0, 5.0, -1.2]))  # A<0: max(-A rho, -A clip(rho)); A>0: clipped at 1.2
    dual = clipped_surrogate(logp, old, adv, 0.2, 0.2, dual_clip=3.0)
    torch.testing.assert_close(dual, torch.tensor([0.8, 2.0, 3.0, -1.2]))  # only the ratio-5 negative token is capped at c|A| = 3
    dual.sum().backward()
    assert logp.grad[2] == 0 and logp.grad[1] != 0
    with pytest.raises(ValueError, match="dual_clip"):
        GRPOConfig(dual_clip=1.0)


def test_rollout_chunks_cover_the_rows_in_order():
    _, rollout, _ = _tiny_rollout()
    parts = list(rollout.chunks(3))
    assert [p.tokens.shape[0] for p in parts] == [3, 3, 2]
    assert torch.equal(torch.cat([p.tokens for p in parts]), rollout.tokens)
    assert [p is rollout for p in rollout.chunks(None)] == [True] and [p is rollout for p in rollout.chunks(0)] == [True]
