"""Unit tests for `shared.entropy` against closed forms (deterministic, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from shared.entropy import (
    cross_entropy,
    cross_entropy_from_logits,
    entropy_from_logits,
    entropy_from_probs,
    expected_entropy,
    js_divergence,
    kl_divergence,
    kl_from_logits,
    masked_mean,
    max_entropy,
    mutual_information,
    normalized_entropy,
    predictive_entropy,
    renyi_entropy,
    token_entropy,
    tsallis_entropy,
)

F64 = torch.float64
LOG2 = math.log(2.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_probs(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.softmax(2.0 * torch.randn(*shape, generator=_gen(seed), dtype=dtype), dim=-1)


# ## Shannon entropy


@pytest.mark.parametrize("num_classes", [1, 2, 3, 10, 1000, 50257])
def test_uniform_logits_give_log_c(num_classes: int) -> None:
    logits = torch.full((4, num_classes), 3.7, dtype=F64)
    h = entropy_from_logits(logits)
    assert h.shape == (4,)
    torch.testing.assert_close(h, torch.full((4,), math.log(num_classes), dtype=F64))
    assert max_entropy(num_classes) == pytest.approx(math.log(num_classes))
    probs = torch.full((num_classes,), 1.0 / num_classes, dtype=F64)
    assert entropy_from_probs(probs).item() == pytest.approx(math.log(num_classes))


def test_one_hot_probs_give_zero() -> None:
    probs = torch.eye(5, dtype=F64)
    h = entropy_from_probs(probs)
    assert not torch.isnan(h).any()
    torch.testing.assert_close(h, torch.zeros(5, dtype=F64))


def test_minus_inf_logits_give_zero_without_nan() -> None:
    logits = torch.tensor([[0.0, -math.inf, -math.inf], [-math.inf, 2.0, -math.inf]], requires_grad=True)
    h = entropy_from_logits(logits)
    torch.testing.assert_close(h, torch.zeros(2), rtol=0, atol=0)
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # Partially masked: two equal survivors -> log 2.
    part = torch.tensor([1.0, 1.0, -math.inf, -math.inf], dtype=F64)
    assert entropy_from_logits(part).item() == pytest.approx(LOG2)


def test_logits_match_probs() -> None:
    logits = 3.0 * torch.randn(6, 7, 11, generator=_gen(1), dtype=F64)
    h_logits = entropy_from_logits(logits)
    h_probs = entropy_from_probs(torch.softmax(logits, dim=-1))
    torch.testing.assert_close(h_logits, h_probs)
    # Another class axis.
    torch.testing.assert_close(
        entropy_from_logits(logits, dim=1), entropy_from_probs(torch.softmax(logits, dim=1), dim=1)
    )


def test_extreme_logits_are_stable() -> None:
    logits = torch.tensor([1e4, 0.0, -1e4], dtype=torch.float32)
    h = entropy_from_logits(logits)
    assert torch.isfinite(h) and h.item() == pytest.approx(0.0, abs=1e-6)


def test_temperature_limits() -> None:
    logits = torch.tensor([0.3, -1.2, 2.0, 0.9, -0.1], dtype=F64)  # distinct values
    assert entropy_from_logits(logits, temperature=1e-3).item() == pytest.approx(0.0, abs=1e-12)
    assert entropy_from_logits(logits, temperature=1e6).item() == pytest.approx(math.log(5), abs=1e-9)
    torch.testing.assert_close(
        entropy_from_logits(logits, temperature=2.5), entropy_from_probs(torch.softmax(logits / 2.5, dim=-1))
    )


def test_entropy_non_decreasing_in_temperature() -> None:
    logits = 2.0 * torch.randn(3, 8, generator=_gen(2), dtype=F64)
    temps = torch.logspace(-2, 3, 200, dtype=F64).tolist()
    hs = torch.stack([entropy_from_logits(logits, temperature=t) for t in temps])  # [200, 3]
    assert (hs.diff(dim=0) >= -1e-12).all()
    assert (hs <= math.log(8) + 1e-12).all()


def test_gradient_matches_closed_form() -> None:
    # dH/dz_i = -p_i (log p_i + H)
    logits = torch.randn(4, 9, generator=_gen(3), dtype=F64, requires_grad=True)
    h = entropy_from_logits(logits)
    (grad,) = torch.autograd.grad(h.sum(), logits)
    p = torch.softmax(logits.detach(), dim=-1)
    expected = -p * (torch.log(p) + h.detach().unsqueeze(-1))
    torch.testing.assert_close(grad, expected)


def test_gradient_with_temperature() -> None:
    # H(softmax(z / T)): dH/dz_i = -(1/T) p_i (log p_i + H)
    t = 0.7
    logits = torch.randn(9, generator=_gen(4), dtype=F64, requires_grad=True)
    h = entropy_from_logits(logits, temperature=t)
    (grad,) = torch.autograd.grad(h, logits)
    p = torch.softmax(logits.detach() / t, dim=-1)
    torch.testing.assert_close(grad, -p * (torch.log(p) + h.detach()) / t)


def test_entropy_reductions() -> None:
    logits = torch.randn(3, 4, 6, generator=_gen(5), dtype=F64)
    h = entropy_from_logits(logits)
    torch.testing.assert_close(entropy_from_logits(logits, reduction="mean"), h.mean())
    torch.testing.assert_close(entropy_from_logits(logits, reduction="sum"), h.sum())
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(entropy_from_probs(probs, reduction="mean"), h.mean())
    torch.testing.assert_close(entropy_from_probs(probs, reduction="sum"), h.sum())


# ## Masks


def test_masked_mean_matches_hand_computation() -> None:
    logits = torch.randn(2, 5, 7, generator=_gen(6), dtype=F64)
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    # Garbage at masked positions must not leak (not even NaN or inf).
    logits[0, 2] = float("nan")
    logits[1, 0] = -math.inf
    h_none = entropy_from_logits(logits, mask=mask)
    assert h_none.shape == (2, 5)
    assert (h_none[~mask] == 0).all()
    by_hand = [entropy_from_probs(torch.softmax(logits[b, t], dim=-1)) for b in range(2) for t in range(5) if mask[b, t]]
    expected_mean = torch.stack(by_hand).mean()
    torch.testing.assert_close(entropy_from_logits(logits, mask=mask, reduction="mean"), expected_mean)
    torch.testing.assert_close(entropy_from_logits(logits, mask=mask, reduction="sum"), torch.stack(by_hand).sum())
    torch.testing.assert_close(masked_mean(h_none, mask), expected_mean)
    # token_entropy is the reduction="none" case.
    torch.testing.assert_close(token_entropy(logits, mask), h_none)


def test_masked_mean_along_dim() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, math.inf, 6.0]], dtype=F64)
    mask = torch.tensor([[True, False, True], [True, False, True]])
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([2.0, 5.0], dtype=F64))
    torch.testing.assert_close(masked_mean(values, mask), torch.tensor(3.5, dtype=F64))


def test_fully_masked() -> None:
    # Convention: "none" gives zeros, "sum" gives 0 (empty sum), "mean" raises ValueError (0/0).
    logits = torch.randn(2, 3, 4, generator=_gen(7))
    mask = torch.zeros(2, 3, dtype=torch.bool)
    torch.testing.assert_close(entropy_from_logits(logits, mask=mask), torch.zeros(2, 3))
    assert entropy_from_logits(logits, mask=mask, reduction="sum").item() == 0.0
    with pytest.raises(ValueError, match="no True entries"):
        entropy_from_logits(logits, mask=mask, reduction="mean")
    with pytest.raises(ValueError, match="no True entries"):
        masked_mean(torch.ones(3), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="fully masked"):
        masked_mean(torch.ones(2, 3), torch.tensor([[True, False, False], [False, False, False]]), dim=1)


def test_mask_validation() -> None:
    logits = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="boolean"):
        entropy_from_logits(logits, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape"):
        entropy_from_logits(logits, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        token_entropy(torch.randn(2, 4))


# ## Cross-entropy, KL, JS


def test_kl_self_is_zero_and_nonnegative() -> None:
    p = _random_probs(50, 6, seed=8)
    q = _random_probs(50, 6, seed=9)
    torch.testing.assert_close(kl_divergence(p, p), torch.zeros(50, dtype=F64))
    assert (kl_divergence(p, q) >= 0).all()
    assert (kl_divergence(p, q) > 0).all()


def test_kl_with_zeros() -> None:
    p = torch.tensor([0.5, 0.5, 0.0], dtype=F64)
    q = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    assert kl_divergence(p, q).item() == math.inf
    # p = 0 where q = 0 contributes nothing: KL(q || p) = log(1 / 0.5).
    assert kl_divergence(q, p).item() == pytest.approx(LOG2)
    assert kl_from_logits(torch.log(q), torch.log(p)).item() == pytest.approx(LOG2)
    assert kl_from_logits(torch.log(p), torch.log(q)).item() == math.inf


def test_kl_bernoulli_closed_form() -> None:
    a, b = 0.3, 0.8
    expected = a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
    p = torch.tensor([a, 1 - a], dtype=F64)
    q = torch.tensor([b, 1 - b], dtype=F64)
    assert kl_divergence(p, q).item() == pytest.approx(expected, rel=1e-12)
    assert kl_from_logits(torch.log(p) + 3.0, torch.log(q) - 1.0).item() == pytest.approx(expected, rel=1e-12)


def test_kl_from_logits_matches_probs_and_grad_is_finite() -> None:
    zp = torch.randn(5, 7, generator=_gen(10), dtype=F64)
    zq = torch.randn(5, 7, generator=_gen(11), dtype=F64)
    torch.testing.assert_close(
        kl_from_logits(zp, zq), kl_divergence(torch.softmax(zp, -1), torch.softmax(zq, -1))
    )
    zp = torch.tensor([1.0, -math.inf, 0.0], requires_grad=True)
    zq = torch.tensor([0.0, -math.inf, 0.5], requires_grad=True)
    kl = kl_from_logits(zp, zq)
    assert torch.isfinite(kl)
    kl.backward()
    assert torch.isfinite(zp.grad).all() and torch.isfinite(zq.grad).all()


def test_js_properties() -> None:
    p = _random_probs(100, 5, seed=12)
    q = _random_probs(100, 5, seed=13)
    js = js_divergence(p, q)
    torch.testing.assert_close(js, js_divergence(q, p))
    assert (js >= 0).all() and (js <= LOG2).all()
    torch.testing.assert_close(js_divergence(p, p), torch.zeros(100, dtype=F64))
    disjoint_p = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=F64)
    disjoint_q = torch.tensor([0.0, 0.0, 0.3, 0.7], dtype=F64)
    assert js_divergence(disjoint_p, disjoint_q).item() == pytest.approx(LOG2, rel=1e-14)
    assert js_divergence(torch.eye(2, dtype=F64)[0], torch.eye(2, dtype=F64)[1]).item() == pytest.approx(LOG2, rel=1e-14)


def test_cross_entropy_is_entropy_plus_kl() -> None:
    p = _random_probs(20, 6, seed=14)
    q = _random_probs(20, 6, seed=15)
    torch.testing.assert_close(cross_entropy(p, q), entropy_from_probs(p) + kl_divergence(p, q))
    logits = torch.log(q) + 1.5
    # H(target, softmax(logits)) = H(target) + KL(target || softmax(logits))
    torch.testing.assert_close(cross_entropy_from_logits(logits, p), entropy_from_probs(p) + kl_divergence(p, q))
    torch.testing.assert_close(cross_entropy(p, p), entropy_from_probs(p))


def test_cross_entropy_one_hot_target_matches_torch() -> None:
    logits = torch.randn(8, 10, generator=_gen(16), dtype=F64)
    labels = torch.arange(8)
    targets = torch.nn.functional.one_hot(labels, 10).to(F64)
    torch.testing.assert_close(
        cross_entropy_from_logits(logits, targets),
        torch.nn.functional.cross_entropy(logits, labels, reduction="none"),
    )
    # -inf logit where the target is 0: finite; where the target is 1: inf.
    z = torch.tensor([0.0, -math.inf], dtype=F64)
    assert cross_entropy_from_logits(z, torch.tensor([1.0, 0.0], dtype=F64)).item() == pytest.approx(0.0)
    assert cross_entropy_from_logits(z, torch.tensor([0.0, 1.0], dtype=F64)).item() == math.inf


# ## Rényi and Tsallis


def test_renyi_limits_and_special_orders() -> None:
    p = torch.tensor([[0.5, 0.25, 0.125, 0.125, 0.0], [0.7, 0.1, 0.1, 0.05, 0.05]], dtype=F64)
    shannon = entropy_from_probs(p)
    torch.testing.assert_close(renyi_entropy(p, 1.0), shannon)
    for alpha in (1 - 1e-6, 1 + 1e-6):
        torch.testing.assert_close(renyi_entropy(p, alpha), shannon, rtol=0, atol=1e-5)
    torch.testing.assert_close(renyi_entropy(p, 0.0), torch.log(torch.tensor([4.0, 5.0], dtype=F64)))
    torch.testing.assert_close(renyi_entropy(p, math.inf), -torch.log(torch.tensor([0.5, 0.7], dtype=F64)))
    # alpha = 2: collision entropy.
    torch.testing.assert_close(renyi_entropy(p, 2.0), -torch.log((p**2).sum(-1)))


def test_renyi_near_one_in_float32() -> None:
    p = _random_probs(4, 30, seed=17, dtype=torch.float32)
    shannon = entropy_from_probs(p)
    for alpha in (1 - 1e-6, 1 + 1e-6):
        torch.testing.assert_close(renyi_entropy(p, alpha), shannon, rtol=1e-4, atol=1e-5)


def test_renyi_non_increasing_and_uniform() -> None:
    p = _random_probs(10, 8, seed=18)
    alphas = [0.0, 0.1, 0.5, 0.9, 0.999, 1.0, 1.001, 1.5, 2.0, 5.0, 50.0, 1000.0, math.inf]
    hs = torch.stack([renyi_entropy(p, a) for a in alphas])
    assert (hs.diff(dim=0) <= 1e-10).all()
    uniform = torch.full((6,), 1 / 6, dtype=F64)
    for a in alphas:
        assert renyi_entropy(uniform, a).item() == pytest.approx(math.log(6), rel=1e-10)


def test_tsallis() -> None:
    p = _random_probs(7, 9, seed=19)
    torch.testing.assert_close(tsallis_entropy(p, 2.0), 1 - (p**2).sum(-1))
    shannon = entropy_from_probs(p)
    torch.testing.assert_close(tsallis_entropy(p, 1.0), shannon)
    for q in (1 - 1e-6, 1 + 1e-6):
        torch.testing.assert_close(tsallis_entropy(p, q), shannon, rtol=0, atol=1e-5)
    torch.testing.assert_close(tsallis_entropy(p, 3.0), (1 - (p**3).sum(-1)) / 2)
    # q = 0: support size minus one.
    one_zero = torch.tensor([0.5, 0.5, 0.0], dtype=F64)
    assert tsallis_entropy(one_zero, 0.0).item() == pytest.approx(1.0)
    assert tsallis_entropy(one_zero, 0.5).item() == pytest.approx((1 - 2 * math.sqrt(0.5)) / -0.5)


# ## Mutual information (BALD)


def test_mi_identical_members_is_zero() -> None:
    p = _random_probs(3, 6, seed=20)
    members = p.unsqueeze(0).expand(5, 3, 6)
    mi = mutual_information(members)
    assert mi.shape == (3,)
    torch.testing.assert_close(mi, torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)
    assert (mi >= 0).all()


def test_mi_disjoint_one_hots_is_log2() -> None:
    members = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)  # [M=2, C=3]
    assert mutual_information(members).item() == pytest.approx(LOG2, rel=1e-14)
    assert predictive_entropy(members).item() == pytest.approx(LOG2, rel=1e-14)
    assert expected_entropy(members).item() == pytest.approx(0.0, abs=0)


def test_mi_decomposition_and_nonnegative() -> None:
    members = _random_probs(8, 4, 5, 10, seed=21)  # [M, B, T, C]
    pred = predictive_entropy(members)
    exp = expected_entropy(members)
    mi = mutual_information(members)
    assert mi.shape == pred.shape == exp.shape == (4, 5)
    torch.testing.assert_close(mi, pred - exp)
    assert (mi >= 0).all()
    torch.testing.assert_close(pred, entropy_from_probs(members.mean(0)))
    torch.testing.assert_close(exp, entropy_from_probs(members).mean(0))
    # Members along another axis give the same answer.
    moved = members.movedim(0, 2)  # [B, T, M, C]
    torch.testing.assert_close(mutual_information(moved, member_dim=2), mi)
    # Classes first, members last.
    classes_first = members.movedim(-1, 0).movedim(1, -1)  # [C, B, T, M]
    torch.testing.assert_close(mutual_information(classes_first, dim=0, member_dim=-1), mi)


# ## Normalisation


def test_normalized_entropy() -> None:
    logits = torch.randn(20, 12, generator=_gen(22), dtype=F64)
    n = normalized_entropy(logits)
    assert ((n >= 0) & (n <= 1)).all()
    torch.testing.assert_close(n, entropy_from_logits(logits) / math.log(12))
    torch.testing.assert_close(normalized_entropy(torch.zeros(3, 12, dtype=F64)), torch.ones(3, dtype=F64))
    assert normalized_entropy(torch.tensor([5.0, -math.inf, -math.inf])).item() == 0.0


# ## Errors


def test_bad_reduction() -> None:
    with pytest.raises(ValueError, match="reduction must be one of"):
        entropy_from_logits(torch.randn(3), reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        entropy_from_probs(torch.full((3,), 1 / 3), reduction="batchmean")


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_bad_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be"):
        entropy_from_logits(torch.randn(4), temperature=temperature)


def test_bad_probabilities() -> None:
    bad = torch.tensor([1.2, -0.2], dtype=F64)
    for fn in (entropy_from_probs, lambda p: renyi_entropy(p, 2.0), lambda p: tsallis_entropy(p, 2.0)):
        with pytest.raises(ValueError, match="negative"):
            fn(bad)
    ok = torch.tensor([0.5, 0.5], dtype=F64)
    with pytest.raises(ValueError, match="negative"):
        kl_divergence(ok, bad)
    with pytest.raises(ValueError, match="sum to 1"):
        entropy_from_probs(torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="NaN"):
        entropy_from_probs(torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ValueError, match="floating-point"):
        entropy_from_logits(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="negative"):
        mutual_information(torch.tensor([[1.2, -0.2], [0.5, 0.5]]))


def test_bad_orders_and_shapes() -> None:
    p = torch.tensor([0.5, 0.5], dtype=F64)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        renyi_entropy(p, -0.5)
    with pytest.raises(ValueError, match="q must be >= 0"):
        tsallis_entropy(p, -1.0)
    with pytest.raises(ValueError, match="q must be finite"):
        tsallis_entropy(p, math.inf)
    three = torch.full((3,), 1 / 3, dtype=F64)
    for fn in (kl_divergence, js_divergence, cross_entropy):
        with pytest.raises(ValueError, match="same shape"):
            fn(p, three)
    with pytest.raises(ValueError, match="same shape"):
        kl_from_logits(torch.randn(2), torch.randn(3))
    with pytest.raises(ValueError, match="same shape"):
        cross_entropy_from_logits(torch.randn(2), three)
    with pytest.raises(ValueError, match="different axes"):
        mutual_information(torch.full((2, 2), 0.5), dim=0, member_dim=0)
    with pytest.raises(ValueError, match="num_classes"):
        max_entropy(0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        normalized_entropy(torch.randn(4, 1))
    with pytest.raises(ValueError, match="out of range"):
        entropy_from_logits(torch.randn(4), dim=1)


def test_top_p_entropy_is_the_entropy_of_the_renormalised_nucleus():
    from shared.entropy import top_p_entropy

    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1]])  # cumulative 0.5, 0.75, 0.9: at p = 0.8 the nucleus is {0.5, 0.25}
    nucleus = torch.tensor([2 / 3, 1 / 3])
    expected = -(nucleus * nucleus.log()).sum()
    assert torch.isclose(top_p_entropy(probs.log(), p=0.8)[0], expected, atol=1e-6)
    assert top_p_entropy(probs.log(), p=0.4)[0] == 0  # an empty nucleus (the top token alone crosses p)
