"""STEER (Hao, Wang et al., 2026): the entropy-change estimate Omega, the weights, the hook, the bandit."""

import math

import pytest
import torch

from shared.rl.entropy_change import (
    STEER_GRPO,
    STEERConfig,
    WeightLog,
    bandit_entropy_change,
    bandit_first_order_change,
    bandit_step,
    entropy_change_estimate,
    softmax_entropy,
    steer_batch_weights,
    steer_hooks,
    steer_weights,
    weight_activity,
)
from shared.rl.grpo import TokenBatch, grpo_loss


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_omega_hand_computed():
    p, h, a = 0.25, 1.5, 2.0
    lp = torch.log(_t(p))
    omega = entropy_change_estimate(lp, lp, _t(h), _t(a))
    expected = -a / p * p * (1 - p) * (math.log(p) + h)
    assert omega.item() == pytest.approx(expected, rel=1e-12)


def test_omega_quadrants():
    # rare token (log p + H < 0): positive advantage raises entropy, negative lowers it; common token: the reverse
    rare, common = math.log(0.05), math.log(0.9)
    h = 1.0  # log 0.05 + 1 < 0 < log 0.9 + 1
    lp = _t(rare, rare, common, common)
    omega = entropy_change_estimate(lp, lp, _t(h, h, h, h), _t(1.0, -1.0, 1.0, -1.0))
    assert (omega.sign() == _t(1, -1, -1, 1)).all()


def test_omega_zero_at_typical_token_and_certainty():
    # log p + H = 0 (uniform distribution) and p = 1 give no entropy change
    k = 7
    lp = _t(-math.log(k), 0.0)
    omega = entropy_change_estimate(lp, lp, _t(math.log(k), 0.0), _t(1.0, 1.0))
    assert omega.abs().max() < 1e-6


def test_omega_clip_indicator():
    lp_old = torch.log(_t(0.2, 0.2, 0.2, 0.2))
    lp = torch.log(_t(0.3, 0.3, 0.1, 0.1))  # ratios 1.5, 1.5, 0.5, 0.5
    adv = _t(1.0, -1.0, -1.0, 1.0)
    h = _t(2.0, 2.0, 2.0, 2.0)
    full = entropy_change_estimate(lp, lp_old, h, adv)
    clipped = entropy_change_estimate(lp, lp_old, h, adv, clip_low=0.2, clip_high=0.28)
    # A>0 above 1+eps_h and A<0 below 1-eps_l lose their gradient; the other two keep it
    assert clipped[0] == 0 and clipped[2] == 0
    assert torch.equal(clipped[[1, 3]], full[[1, 3]]) and (full != 0).all()


def test_exponential_weights_largest_gets_lambda_min():
    omega = _t(0.0, 0.05, -0.1, 0.2)
    w = steer_weights(omega, torch.ones(4, dtype=torch.bool), STEERConfig(lambda_min=0.8))
    kappa = -math.log(0.8) / 0.2
    assert w[0] == pytest.approx(1.0)
    assert w[3] == pytest.approx(0.8, abs=1e-6)
    assert w[2] == pytest.approx(math.exp(-kappa * 0.1), abs=1e-6)  # |Omega|: symmetric in the sign
    assert w[1] > w[2] > w[3]


def test_exponential_weights_floor_and_mask():
    omega = _t(0.001, 0.01, 5.0)
    mask = torch.tensor([True, True, False])
    w = steer_weights(omega, mask, STEERConfig(lambda_min=0.5))
    kappa = -math.log(0.5) / 0.02  # max |Omega| over valid tokens (0.01) is below the floor 0.02
    assert w[1] == pytest.approx(math.exp(-kappa * 0.01), abs=1e-6) and w[1] > 0.5
    assert w[2] == 0.0


def test_linear_weights_endpoints():
    omega = _t(0.0, 0.5, 1.0)
    w = steer_weights(omega, torch.ones(3, dtype=torch.bool), STEERConfig(lambda_min=0.8, lambda_max=1.2, linear=True))
    assert torch.allclose(w, torch.tensor([1.2, 1.0, 0.8]), atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="lambda"):
        STEERConfig(lambda_min=0.0)
    with pytest.raises(ValueError, match="exponential"):
        STEERConfig(lambda_min=1.1, lambda_max=1.2)
    assert STEER_GRPO.clip_high == 0.28 and STEER_GRPO.aggregation == "token-mean"


def test_hook_reweights_the_surrogate():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    tokens = torch.tensor([[0, 1, 2], [3, 4, 0]])
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    batch = TokenBatch(logp, logp.detach(), adv, mask, entropy, logits, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    loss, _ = grpo_loss(batch, STEER_GRPO, steer_hooks())
    w = steer_batch_weights(batch)
    assert not w.requires_grad and (w[mask] >= 0.8 - 1e-6).all() and w[1, 2] == 0
    expected = (-(adv) * w * mask).sum() / mask.sum()  # ratio 1 on-policy: the loss is -lambda A token-mean
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bandit_first_order_matches_exact_step():
    torch.manual_seed(1)
    z = torch.randn(20, dtype=torch.float64) * 2
    for a, adv in [(0, 1.0), (3, -0.7), (11, 2.0)]:
        exact = bandit_entropy_change(z, a, adv, 1e-5)
        assert exact == pytest.approx(bandit_first_order_change(z, a, adv, 1e-5), rel=1e-3)


def test_bandit_step_is_the_gradient_of_rho_a():
    z = torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    a, adv, lr = 1, 1.7, 0.1
    rho = torch.softmax(z, -1)[a] / torch.softmax(old, -1)[a]
    (rho * adv).backward()
    assert torch.allclose(bandit_step(z.detach(), a, adv, lr, old), z.detach() + lr * z.grad)


def test_uniform_bandit_entropy_is_maximal_and_cannot_rise():
    z = torch.zeros(8, dtype=torch.float64)
    assert softmax_entropy(z).item() == pytest.approx(math.log(8))
    assert bandit_entropy_change(z, 2, 1.0, 0.1) < 0 and bandit_entropy_change(z, 2, -1.0, 0.1) < 0


def test_weight_activity_hand_computed():
    w = torch.tensor([[1.0, 0.8, 0.995], [0.9, 0.5, 1.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])  # 0.5 and the last 1.0 are padding
    mean, moved = weight_activity(w, mask, tolerance=0.01)
    assert mean == pytest.approx((0 + 0.2 + 0.005 + 0.1) / 4, rel=1e-6)
    assert moved == pytest.approx(2 / 4)  # 0.8 and 0.9 move by more than 0.01; 0.995 does not
    assert weight_activity(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)) == (0.0, 0.0)  # plain GRPO: inert
    assert weight_activity(w, torch.zeros(2, 3, dtype=torch.bool)) == (0.0, 0.0)


def test_weight_log_pools_batches_by_tokens():
    log = WeightLog(tolerance=0.01)
    log.record(torch.tensor([0.8, 1.0]), torch.tensor([True, True]))
    log.record(torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([True, True, True, False]))
    assert (log.tokens, log.batches) == (5, 2)
    assert log.mean_deviation == pytest.approx(0.2 / 5) and log.fraction_moved == pytest.approx(1 / 5)
    assert WeightLog().mean_deviation == 0.0 and WeightLog().fraction_moved == 0.0


def test_hook_logs_the_weights_it_applies():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    tokens = torch.randint(0, 6, (2, 4))
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    batch = TokenBatch(logp, logp, torch.tensor([[1.0] * 4, [-1.0] * 4]), mask, entropy, logits, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    log = WeightLog()
    applied = steer_hooks(STEERConfig(lambda_min=0.8), log).token_weights(batch)
    assert torch.equal(applied, steer_batch_weights(batch, STEERConfig(lambda_min=0.8)))
    assert log.tokens == 6 and log.mean_deviation == pytest.approx(weight_activity(applied, mask)[0], rel=1e-9)
    assert 0 < log.mean_deviation <= 0.2 + 1e-6  # at most 1 - lambda_min; the largest |Omega| gets exactly 0.8
