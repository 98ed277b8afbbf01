"""EATA / ETA: the two filters, the weight, the moving average, the Fisher anchor, and one full step by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from shared.entropy import entropy_from_logits
from shared.models.cnn import SmallCNN
from shared.tta import collect_norm_params, configure_norm_adaptation
from shared.tta.eata import (
    EATA,
    ETA,
    EATAConfig,
    FisherAnchor,
    compute_fisher,
    entropy_margin,
    entropy_weights,
    redundancy_mask,
    reliable_mask,
    update_moving_probs,
    weighted_entropy_loss,
)


def _model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=4, width=4, norm="bn").eval()


def _x(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_margin_is_0_4_ln_c():
    assert entropy_margin(1000) == pytest.approx(0.4 * math.log(1000)) == pytest.approx(2.7631, abs=1e-4)
    assert entropy_margin(10) == pytest.approx(0.92103, abs=1e-5)
    assert EATAConfig().margin(10) == pytest.approx(0.4 * math.log(10))
    assert EATAConfig(e_margin=0.5).margin(10) == 0.5
    with pytest.raises(ValueError, match="num_classes"):
        entropy_margin(1)


def test_reliable_mask_keeps_exactly_the_samples_strictly_below_the_margin():
    e = torch.tensor([0.1, 0.5, 0.92, 0.93, 2.0])
    assert reliable_mask(e, 0.92).tolist() == [True, True, False, False, False]


def test_redundancy_mask_uses_the_absolute_cosine_to_the_moving_average():
    m = torch.tensor([1.0, 0.0, 0.0])
    probs = torch.tensor([[1.0, 0.0, 0.0],  # cos 1
                          [0.0, 1.0, 0.0],  # cos 0
                          [0.5, 0.5, 0.0]])  # cos 1/sqrt(2) ~ 0.707
    assert redundancy_mask(probs, m, 0.4).tolist() == [False, True, False]
    assert redundancy_mask(probs, m, 0.8).tolist() == [False, True, True]
    assert redundancy_mask(probs, None, 0.05).tolist() == [True, True, True]  # nothing used yet


def test_moving_average_is_plain_mean_first_then_0_9_ema_and_frozen_on_empty():
    p1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m1 = update_moving_probs(None, p1)
    assert torch.allclose(m1, torch.tensor([0.5, 0.5]))
    m2 = update_moving_probs(m1, torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(m2, torch.tensor([0.9 * 0.5 + 0.1, 0.9 * 0.5]))
    assert update_moving_probs(m2, torch.zeros(0, 2)) is m2
    assert update_moving_probs(None, torch.zeros(0, 2)) is None


def test_weight_is_exp_of_margin_minus_entropy_and_detached():
    e = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
    w = entropy_weights(e, 1.0)
    assert torch.allclose(w, torch.tensor([math.e, math.exp(0.5), 1.0]))
    assert not w.requires_grad
    loss = weighted_entropy_loss(e, torch.tensor([True, False, True]), 1.0)
    assert loss.item() == pytest.approx((0.0 * math.e + 1.0 * 1.0) / 2)  # mean over the kept samples only
    loss.backward()  # gradient is w(x)/|S| on kept samples, 0 elsewhere
    assert torch.allclose(e.grad, torch.tensor([math.e / 2, 0.0, 0.5]))
    assert weighted_entropy_loss(e, torch.zeros(3, dtype=torch.bool), 1.0) is None
    assert weighted_entropy_loss(e, torch.tensor([True, True, False]), 1.0, reweight=False).item() == pytest.approx(0.25)


def test_fisher_is_the_batch_mean_gradient_squared_averaged_over_batches():
    m = configure_norm_adaptation(_model())
    x = _x(10)
    fisher = compute_fisher(m, x, batch_size=4)  # batches of 4, 4, 2
    params, names = collect_norm_params(m)
    expected = {n: torch.zeros_like(p) for n, p in zip(names, params)}
    for s in (slice(0, 4), slice(4, 8), slice(8, 10)):
        logits = m(x[s])
        loss = F.cross_entropy(logits, logits.argmax(-1))
        for n, g in zip(names, torch.autograd.grad(loss, params)):
            expected[n] += g ** 2
    assert set(fisher.fisher) == set(names)
    for n in names:
        assert torch.allclose(fisher.fisher[n], expected[n] / 3, atol=1e-7)
        assert torch.equal(fisher.anchor[n], dict(m.named_parameters())[n].detach())
        assert dict(m.named_parameters())[n].grad is None  # no gradient left behind


def test_fisher_penalty_is_beta_sum_f_times_squared_displacement():
    anchor = FisherAnchor({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])},
                          {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0])})
    named = [("a", torch.tensor([1.0, 1.0])), ("b", torch.tensor([3.0])), ("c", torch.tensor([9.0]))]
    # 1*1 + 2*1 + 3*(2)^2 = 15, times beta
    assert anchor.penalty(named, beta=2.0).item() == pytest.approx(30.0)
    assert anchor.total() == pytest.approx(6.0)
    with pytest.raises(ValueError, match="no parameter"):
        anchor.penalty([("z", torch.zeros(1))], 1.0)


def test_eta_first_batch_takes_one_weighted_step_on_the_reliable_samples_by_hand():
    x = _x(8)
    cfg = EATAConfig(e_margin=1.33, d_margin=0.4, lr=0.1)
    eta = ETA(_model(), cfg)
    ref = copy.deepcopy(eta.model)
    params, _ = collect_norm_params(ref)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    logits_ref = ref(x)
    ent = entropy_from_logits(logits_ref)
    keep = ent < 1.33
    assert 0 < int(keep.sum()) < 8  # the case is non-trivial
    (ent[keep] * torch.exp(1.33 - ent[keep].detach())).mean().backward()
    opt.step()
    logits = eta(x)
    assert torch.allclose(logits, logits_ref.detach(), atol=1e-6)  # pre-update predictions
    for a, b in zip(collect_norm_params(eta.model)[0], params):
        assert torch.allclose(a, b, atol=1e-6)
    assert eta.n_backward == eta.n_reliable == int(keep.sum()) and eta.n_updates == 1
    assert torch.allclose(eta.moving_probs, logits_ref.softmax(-1)[keep].mean(0).detach(), atol=1e-6)


def test_second_batch_filters_redundant_samples_against_the_previous_average():
    x = _x(8)
    eta = ETA(_model(), EATAConfig(e_margin=10.0, d_margin=0.999, lr=1e-9))
    eta(x)  # every sample reliable; m = mean prediction
    m_before = eta.moving_probs.clone()
    logits = eta.model(x).detach()
    eta(x)
    cos = F.cosine_similarity(m_before.unsqueeze(0), logits.softmax(-1), dim=1)
    assert eta.last_mask.tolist() == (cos.abs() < 0.999).tolist()


def test_no_selected_sample_means_no_step_and_no_count():
    eta = ETA(_model(), EATAConfig(e_margin=1e-6, lr=1.0))
    before = [p.detach().clone() for p in eta.params]
    eta(_x())
    assert eta.n_backward == 0 and eta.n_updates == 0 and eta.moving_probs is None
    assert all(torch.equal(a, b) for a, b in zip(before, eta.params))


def test_eata_loss_adds_the_fisher_penalty_and_pulls_towards_the_anchor():
    m = configure_norm_adaptation(_model())
    fisher = compute_fisher(m, _x(16, seed=3), batch_size=8)
    x = _x(8)
    cfg = EATAConfig(e_margin=10.0, d_margin=1.5, lr=0.05, fisher_alpha=0.0)
    eta = EATA(copy.deepcopy(m), cfg, fisher=fisher)
    eata = EATA(copy.deepcopy(m), EATAConfig(e_margin=10.0, d_margin=1.5, lr=0.05, fisher_alpha=1e4), fisher=fisher)
    for p in list(eta.params) + list(eata.params):  # move away from the anchor, identically
        with torch.no_grad():
            p.add_(0.3)
    reg = eata.regularizer()
    expected = 1e4 * sum((fisher.fisher[n] * 0.3 ** 2).sum() for n in fisher.fisher)
    assert reg.item() == pytest.approx(expected.item(), rel=1e-5)
    eta(x)
    eata(x)
    dist = lambda a: sum(((p - fisher.anchor[n]) ** 2).sum() for n, p in zip(a.param_names, a.params)).item()
    assert dist(eata) < dist(eta)  # the anchor pulls back


def test_eata_argument_errors():
    with pytest.raises(ValueError, match="exactly one"):
        EATA(_model(), EATAConfig())
    with pytest.raises(ValueError, match="d_margin"):
        EATAConfig(d_margin=0.0)
    with pytest.raises(ValueError, match="optimizer"):
        EATAConfig(optimizer="rmsprop")


def test_reset_clears_the_moving_average_and_restores_the_weights():
    eta = ETA(_model(), EATAConfig(e_margin=10.0, lr=0.5))
    before = [p.detach().clone() for p in eta.params]
    eta(_x())
    assert eta.moving_probs is not None and not all(torch.equal(a, b) for a, b in zip(before, eta.params))
    eta.reset()
    assert eta.moving_probs is None and all(torch.equal(a, b) for a, b in zip(before, eta.params))


def test_penalty_share_adds_up_the_two_terms_of_the_loss_by_hand():
    m = configure_norm_adaptation(_model())
    fisher = compute_fisher(m, _x(16, seed=3), batch_size=8)
    cfg = EATAConfig(e_margin=10.0, d_margin=1.5, lr=0.05, fisher_alpha=1e3)
    eata = EATA(copy.deepcopy(m), cfg, fisher=fisher)
    eta = ETA(copy.deepcopy(m), cfg)
    assert eata.penalty_share == 0.0  # no update yet
    x1, x2 = _x(8, seed=1), _x(8, seed=2)
    eata(x1)  # at the anchor: the penalty is exactly zero
    assert eata.penalty_sum == 0.0 and eata.entropy_loss_sum > 0
    ent1 = eata.entropy_loss_sum
    with torch.no_grad():  # the two terms of the second update, by hand, at the weights before it
        logits = eata.model(x2)
        ent = entropy_from_logits(logits)
        e_ent = float((ent * torch.exp(10.0 - ent)).mean())
        e_pen = 1e3 * float(sum((fisher.fisher[n] * (p - fisher.anchor[n]) ** 2).sum()
                                for n, p in zip(eata.param_names, eata.params)))
    eata(x2)
    assert eata.penalty_sum == pytest.approx(e_pen, rel=1e-5) and e_pen > 0
    assert eata.entropy_loss_sum == pytest.approx(ent1 + e_ent, rel=1e-5)
    assert eata.penalty_share == pytest.approx(e_pen / (ent1 + e_ent + e_pen), rel=1e-5)
    eta(x1)
    assert eta.penalty_sum == 0.0 and eta.penalty_share == 0.0  # ETA has no anti-forgetting term
