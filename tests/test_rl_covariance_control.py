"""Clip-Cov and KL-Cov against hand-made batches (and the official loss formulas)."""

from __future__ import annotations

import pytest
import torch

from shared.rl.covariance_control import (
    ClipCovConfig, KLCovConfig, clip_cov_hooks, clip_cov_select, clip_cov_weights, kl_cov_hooks, kl_cov_penalty,
    kl_cov_select, masked_token_covariance, n_selected, ppo_clipped,
)
from shared.rl.grpo import GRPOConfig, TokenBatch, grpo_loss


def make_batch(logp, old_logp, adv, mask) -> TokenBatch:
    logp = torch.tensor(logp).requires_grad_(True)
    shape = logp.shape
    return TokenBatch(logp, torch.tensor(old_logp), torch.tensor(adv), torch.tensor(mask), torch.zeros(shape),
                      torch.zeros(*shape, 3), torch.zeros(shape[0]), torch.arange(shape[0]))


def test_covariance_is_centred_product_and_ignores_padding_with_minus_infinity():
    logp = torch.tensor([[-1.0, -3.0, float("-inf")], [-2.0, -2.0, float("-inf")]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    cov = masked_token_covariance(logp, adv, mask)
    # mean logp = -2, mean A = 0: cov = (logp + 2) * A
    assert torch.allclose(cov, torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_counts_follow_the_official_floor_with_at_least_one_and_k_percent_is_a_percentage():
    assert n_selected(2e-4, 3000) == 1 and n_selected(1e-2, 2050) == 20 and n_selected(0.5, 3) == 1
    assert KLCovConfig().ratio == pytest.approx(2e-3)  # 7b_kl_cov.sh: k_percent = 0.2 (%)
    with pytest.raises(ValueError, match="fraction"):
        KLCovConfig(ratio=20.0)


def test_kl_cov_selects_the_top_covariance_valid_tokens():
    cov = torch.tensor([[0.1, 5.0, 9.0], [3.0, -2.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    sel = kl_cov_select(cov, mask, 0.4)  # N = 5 -> 2 tokens; the masked 9.0 is never picked
    assert sel.tolist() == [[False, True, False], [True, False, False]]


def test_clip_cov_picks_only_in_band_unclipped_tokens_and_is_seeded():
    cov = torch.tensor([0.5, 2.0, 3.0, 4.0, 6.0, 2.5])
    eligible = torch.tensor([True, True, True, True, True, False])
    picks = [clip_cov_select(cov, eligible, 2, 1.0, 5.0, torch.Generator().manual_seed(s)) for s in range(20)]
    for p in picks:
        assert int(p.sum()) == 2 and not p[[0, 4, 5]].any()
    assert all(torch.equal(p, q) for p, q in zip(picks, [clip_cov_select(cov, eligible, 2, 1.0, 5.0, torch.Generator().manual_seed(s)) for s in range(20)]))
    assert len({tuple(p.tolist()) for p in picks}) == 3  # all three pairs of {1,2,3} appear
    assert clip_cov_select(cov, eligible, 10, 1.0, 5.0).sum() == 3  # no more than the band holds


def test_ppo_clipped_marks_tokens_where_the_clip_binds():
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.0]))
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    out = ppo_clipped(logp, torch.zeros(4), adv, torch.ones(4, dtype=torch.bool), 0.2, 0.2)
    assert out.tolist() == [True, False, True, False]


def test_clip_cov_detaches_exactly_the_picked_tokens_gradient():
    # token (0,0): logp far above the mean with A > 0 -> Cov = (0 - (-2)) * (1 - 0) = 2 in (1, 5)
    batch = make_batch([[0.0, -2.0], [-2.0, -4.0]], [[0.0, -2.0], [-2.0, -4.0]], [[1.0, 1.0], [-1.0, -1.0]],
                       [[True, True], [True, True]])
    cfg = ClipCovConfig(ratio=0.25, seed=3)
    weights, stats = clip_cov_weights(batch, cfg, torch.Generator().manual_seed(cfg.seed))  # the hook's first draw
    assert stats["n_in_band"] == 2 and stats["n_detached"] == 1  # (0,0): 2*1 = 2 and (1,1): (-2)(-1) = 2
    log: list = []
    loss, _ = grpo_loss(batch, GRPOConfig(aggregation="token-mean"), clip_cov_hooks(cfg, log))
    loss.backward()
    picked = weights == 0
    assert torch.all(batch.logp.grad[picked] == 0)
    # on-policy (ratio 1): every other token has gradient -A / N
    assert torch.allclose(batch.logp.grad[~picked], -batch.advantages[~picked] / 4)
    assert log[0]["n_detached"] == 1


def test_clip_cov_quantile_bounds_follow_the_batch():
    batch = make_batch([[0.0, -1.0, -2.0, -3.0]], [[0.0, -1.0, -2.0, -3.0]], [[1.0, 0.5, -0.5, -1.0]], [[True] * 4])
    w, stats = clip_cov_weights(batch, ClipCovConfig(ratio=1.0, omega_quantiles=(0.0, 1.0)))
    cov = masked_token_covariance(batch.logp, batch.advantages, batch.mask)
    assert stats["omega_low"] == pytest.approx(float(cov.min())) and stats["omega_high"] == pytest.approx(float(cov.max()))
    assert torch.equal(w == 0, (cov > cov.min()) & (cov < cov.max()))  # open interval


def test_kl_cov_loss_is_unclipped_surrogate_plus_abs_log_ratio_on_top_tokens():
    old = [[-1.0, -1.0], [-1.0, -1.0]]
    logp = [[-0.3, -1.5], [-0.9, -2.0]]  # ratio e^0.7 ~ 2.01 would be clipped by PPO; KL-Cov does not clip
    adv = [[1.0, 1.0], [-1.0, -1.0]]
    batch = make_batch(logp, old, adv, [[True, True], [True, True]])
    cfg = KLCovConfig(ratio=0.25, beta=0.5)
    loss, _ = grpo_loss(batch, GRPOConfig(aggregation="token-mean"), kl_cov_hooks(cfg))
    lp, a = torch.tensor(logp), torch.tensor(adv)
    ratio = torch.exp(lp + 1.0)
    cov = (lp - lp.mean()) * a  # mean A = 0
    top = cov == cov.max()
    expected = (-a * ratio + 0.5 * top * (lp + 1.0).abs()).mean()
    assert torch.isclose(loss, expected, atol=1e-6)


def test_kl_cov_penalty_is_zero_and_has_zero_gradient_exactly_on_policy():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    pen = kl_cov_penalty(logp, logp.detach(), torch.tensor([True, True]), 1.0)
    pen.sum().backward()
    assert torch.all(pen == 0) and torch.all(logp.grad == 0)  # d|x|/dx at 0 is taken as 0


def test_matches_the_official_loss_formulas_on_a_random_batch():
    # The official compute_policy_loss_kl_cov / clip_cov, transcribed (verl_F.masked_mean -> masked mean).
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g) * 3
    logp = old + 0.3 * torch.randn(4, 6, generator=g)
    adv = torch.randn(4, 1, generator=g).expand(4, 6).clone()
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 4:] = False
    m = mask.float()
    mmean = lambda x: (x * m).sum() / m.sum()  # noqa: E731
    ratio = torch.exp(logp - old)
    k_percent = 10.0  # percent, as in the official signature
    valid_idx = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    va, vl = adv[mask], logp[mask]
    cov_lst = (va - va.mean()) * (vl - vl.mean())
    idx = valid_idx[torch.topk(cov_lst, max(1, int(len(cov_lst) * k_percent / 100))).indices]
    pg = -adv * ratio
    pg_kl = pg + 1.0 * (logp - old).abs()
    off = pg.clone().reshape(-1)
    off[idx] = pg_kl.reshape(-1)[idx]
    official_kl = mmean(off.reshape(4, 6))
    batch = TokenBatch(logp.clone(), old, adv, mask, torch.zeros(4, 6), torch.zeros(4, 6, 3), torch.zeros(4), torch.arange(4))
    ours, _ = grpo_loss(batch, GRPOConfig(aggregation="token-mean"), kl_cov_hooks(KLCovConfig(ratio=k_percent / 100)))
    assert torch.isclose(ours, official_kl, atol=1e-6)
    # Clip-Cov with the band covering everything and r = 1: every unclipped token is zeroed.
    pg2 = -adv * ratio.clamp(0.8, 1.2)
    clip_by_origin = (pg2 > pg) & mask
    w, _ = clip_cov_weights(batch, ClipCovConfig(ratio=1.0, omega_low=-1e9, omega_high=1e9))
    assert torch.equal(w == 0, mask & ~clip_by_origin)


def test_batch_quantile_is_torch_quantile_and_numpy_beyond_its_limit():
    from shared.rl.covariance_control import batch_quantile

    x = torch.arange(11, dtype=torch.float32)
    assert batch_quantile(x, 0.5) == 5.0 and batch_quantile(x, 0.95) == pytest.approx(9.5)
    big = torch.linspace(0, 1, 2**24 + 3)  # torch.quantile refuses this many elements
    assert batch_quantile(big, 0.5) == pytest.approx(0.5, abs=1e-6)


def test_activity_measures_are_shares_of_the_logged_tokens():
    from shared.rl.covariance_control import detached_share, penalised_log_ratio

    clip_log = [{"n_valid": 300, "n_in_band": 4, "n_detached": 3}, {"n_valid": 100, "n_in_band": 0, "n_detached": 0}]
    assert detached_share(clip_log) == pytest.approx(3 / 400)
    kl_log = [{"n_valid": 300, "n_penalised": 3, "penalty": 0.6}, {"n_valid": 100, "n_penalised": 1, "penalty": 0.0}]
    assert penalised_log_ratio(kl_log, beta=2.0) == pytest.approx(0.6 / (2.0 * 4))
    with pytest.raises(ValueError, match="empty log"):
        detached_share([])
    with pytest.raises(ValueError, match="beta"):
        penalised_log_ratio(kl_log, beta=0.0)


def test_kl_cov_activity_is_zero_on_policy_and_the_mean_abs_log_ratio_off_policy():
    from shared.rl.covariance_control import penalised_log_ratio

    old = [[-1.0, -2.0, -0.5, -3.0]]
    adv = [[1.0, -1.0, 1.0, -1.0]]  # Cov = (log pi + 1.625) A = [0.625, 0.375, 1.125, 1.375]: the last token is the top one
    mask = [[True, True, True, True]]
    for logp, expected in ((old, 0.0), ([[-1.0, -2.0, -0.5, -2.8]], 0.2)):  # on-policy; then the top token moved by 0.2
        log: list = []
        kl_cov_hooks(KLCovConfig(ratio=0.25, beta=1.0), log).extra_loss(make_batch(logp, old, adv, mask))
        assert log[0]["n_penalised"] == 1
        assert penalised_log_ratio(log, beta=1.0) == pytest.approx(expected)
