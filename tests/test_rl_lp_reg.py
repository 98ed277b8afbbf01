"""Lp-Reg (arXiv 2510.03222): the min-p proxy, token selection, the k3 penalty and the mass bands."""

import dataclasses
import math

import pytest
import torch

from shared.rl.grpo import GRPOConfig, TokenBatch, grpo_loss
from shared.rl.lp_reg import (LpRegConfig, k3_penalty, lp_reg_hooks, lp_reg_loss, lp_reg_terms, noise_filter, noise_mass,
                              proxy_log_probs, select_tokens, spark_mass, token_proxy_log_prob)

PROBS = torch.tensor([0.5, 0.3, 0.14, 0.05, 0.009, 0.001])  # kappa * p_max = 0.01: the last two are noise


def test_proxy_renormalises_survivors_and_removes_noise():
    logits = PROBS.log()
    proxy = proxy_log_probs(logits, 0.02).exp()
    kept = 0.99
    assert torch.allclose(proxy[:4], PROBS[:4] / kept, atol=1e-6)
    assert proxy[4:].max() < 1e-30 and math.isclose(float(proxy.sum()), 1.0, rel_tol=1e-6)
    assert noise_filter(logits, 0.02).tolist() == [False, False, False, False, True, True]


def test_token_proxy_matches_full_vocabulary_proxy():
    logits = torch.randn(3, 5, 7) * 3
    logp_all = torch.log_softmax(logits, -1)
    tokens = torch.randint(0, 7, (3, 5))
    token_logp = logp_all.gather(-1, tokens[..., None]).squeeze(-1)
    expected = proxy_log_probs(logits, 0.05).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(token_proxy_log_prob(logits, token_logp, 0.05), expected, atol=1e-3)


def test_mass_bands_closed_form():
    assert math.isclose(float(noise_mass(PROBS, 0.02)), 0.01, rel_tol=1e-5)
    assert math.isclose(float(spark_mass(PROBS, 0.02, 0.1)), 0.05, rel_tol=1e-5)  # 0.14 is above the 0.1 tail
    uniform = torch.full((10,), 0.1)
    assert float(noise_mass(uniform)) == 0.0 and float(spark_mass(uniform, tail=0.11)) == pytest.approx(1.0)


def test_k3_is_zero_at_target_and_matches_formula():
    lp = torch.tensor([-1.0, -2.0, -3.0])
    assert torch.allclose(k3_penalty(lp, lp), torch.zeros(3))
    d = torch.tensor(0.5)
    assert math.isclose(float(k3_penalty(torch.tensor(-2.0), torch.tensor(-1.5))), float(d.exp() - d - 1), rel_tol=1e-6)
    assert float(k3_penalty(torch.tensor(-20.0), torch.tensor(-1.0))) == 10.0  # verl clamps at 10


def test_selection_lowest_negative_tokens_below_proxy():
    logp = torch.tensor([[-0.1, -5.0, -4.0, -3.0, -2.0, -6.0, -7.0, -8.0, -9.0, -1.0]])
    adv = torch.tensor([[-1.0] * 9 + [1.0]])
    adv[0, 7] = 1.0  # a positive token is never selected, however unlikely
    mask = torch.ones(1, 10, dtype=torch.bool)
    proxy = logp + 0.1
    proxy[0, 8] = -1e4  # the lowest negative token is filtered noise: dropped by the log pi < log proxy test
    sel = select_tokens(logp, proxy, adv, mask, rho=0.3)  # 8 negative tokens -> k = 2: tokens 8 and 6
    assert sel.nonzero()[:, 1].tolist() == [6]
    assert not select_tokens(logp, proxy, adv, mask, rho=0.2).any()  # k = 1: the official code does nothing


def _batch(logits, tokens, adv, mask):
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    return TokenBatch(logp, torch.where(mask, logp.detach(), 0.0), adv, mask, torch.zeros_like(logp), logits, adv[:, 0], torch.zeros(len(adv)))


def test_penalty_gradient_raises_selected_token_by_noise_deficit():
    # one position, token 1 sampled with p=0.3; noise mass 0.01 -> proxy p = 0.3 / 0.99
    logits = PROBS.log().repeat(1, 4, 1).clone().requires_grad_(True)
    tokens = torch.tensor([[1, 1, 0, 0]])
    adv = torch.full((1, 4), -1.0)
    mask = torch.ones(1, 4, dtype=torch.bool)
    batch = _batch(logits, tokens, adv, mask)
    penalty, sel = lp_reg_terms(batch, LpRegConfig(rho=0.5))  # 4 negative tokens -> k = 2: the two p = 0.3 ones
    assert sel.tolist() == [[True, True, False, False]]
    delta = -math.log(0.99)
    assert torch.allclose(penalty[0, :2], torch.full((2,), math.exp(delta) - delta - 1), atol=1e-7)
    (grad,) = torch.autograd.grad(penalty.sum(), batch.logp)
    assert torch.allclose(grad[0, :2], torch.full((2,), 1 - 1 / 0.99), atol=1e-6) and grad[0, 2:].abs().max() == 0


def test_extra_loss_aggregates_like_surrogate_and_is_finite_with_padding():
    logits = torch.randn(2, 6, 8, requires_grad=True)
    logits_masked = logits.index_fill(-1, torch.tensor([0]), float("-inf"))  # token 0 is never sampled (like <pad>)
    tokens = torch.randint(1, 8, (2, 6))
    tokens[1, 4:] = 0  # padding: log pi = -inf there
    mask = tokens != 0
    adv = torch.tensor([[-1.0] * 6, [-0.5] * 6])
    batch = _batch(logits_masked, tokens, adv, mask)
    penalty, _ = lp_reg_terms(batch, LpRegConfig(rho=0.5, kappa=0.3))
    extra = lp_reg_loss(LpRegConfig(rho=0.5, kappa=0.3), "token-mean")(batch)
    assert torch.isclose(extra, penalty[mask].sum() / mask.sum())
    loss, _ = grpo_loss(batch, GRPOConfig(aggregation="token-mean"), lp_reg_hooks(LpRegConfig(rho=0.5, kappa=0.3)))
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="kappa"):
        LpRegConfig(kappa=0.0)
    with pytest.raises(ValueError, match="rho"):
        LpRegConfig(rho=1.5)


def test_teacher_forced_bands_partition_probability():
    from shared.lm.pretrain import load_base_model
    from shared.lm.rollout import generate
    from shared.lm.tokenizer import CharTokenizer
    from shared.rl.lp_reg import teacher_forced_bands

    tok = CharTokenizer()
    pt, pm = tok.pad_left([tok.encode(p, bos=True) for p in ("3,5,7:22?", "47+85=", "1,2:3?")])
    model = load_base_model()
    rollout = generate(model, pt, pm, max_new_tokens=12, generator=torch.Generator().manual_seed(0))
    wide = teacher_forced_bands(model, rollout, kappa=0.3, tail=1.01)  # every token is spark or noise, none contested
    assert wide["spark"] + wide["noise"] == pytest.approx(1.0, abs=1e-5) and wide["contested"] == 0.0
    default = teacher_forced_bands(model, rollout)
    assert 0.0 <= default["noise"] <= wide["noise"] and default["entropy"] > 0  # kappa 0.02 < 0.3: less noise
    by_row = teacher_forced_bands(model, rollout, rows=1)  # the paper profile's memory bound: one response at a time
    assert by_row == pytest.approx(default, rel=1e-5, abs=1e-7)


def test_pull_to_push_is_the_share_of_the_advantage_push_the_penalty_cancels():
    from shared.rl.lp_reg import pull_to_push

    # token 1 (p = 0.3) at positions where the noise mass is 0.01: on-policy pull = beta * 0.01 / 0.99, push = |A| = 2
    logits = PROBS.log().repeat(1, 4, 1).clone()
    tokens = torch.tensor([[1, 1, 0, 0]])
    adv = torch.full((1, 4), -2.0)
    batch = _batch(logits, tokens, adv, torch.ones(1, 4, dtype=torch.bool))
    log: list = []
    lp_reg_loss(LpRegConfig(rho=0.5, beta=3.0), "token-mean", log)(batch)
    assert log[0]["n_touched"] == 2
    assert log[0]["pull"] == pytest.approx(2 * 3.0 * (1 / 0.99 - 1), rel=1e-5) and log[0]["push"] == pytest.approx(4.0)
    assert pull_to_push(log) == pytest.approx(3.0 * (1 / 0.99 - 1) / 2.0, rel=1e-5)
    assert pull_to_push([{"n_touched": 0, "pull": 0.0, "push": 0.0}]) == 0.0
    # the gradient agrees: the penalty's d/d log pi on a touched token is -pull per token
    logp = batch.logp.clone().requires_grad_(True)
    penalty, _ = lp_reg_terms(dataclasses.replace(batch, logp=logp), LpRegConfig(rho=0.5, beta=3.0))
    (grad,) = torch.autograd.grad(penalty.sum(), logp)
    assert grad[0, :2].neg().sum().item() == pytest.approx(log[0]["pull"], rel=1e-5)
