"""WoC (Lee et al., ICCV 2023): the confidence-drop mask, the masked entropy step, the diversity term, the wrapper."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from shared.entropy import entropy_from_logits
from shared.models.cnn import SmallCNN
from shared.tta import Tent, TentConfig, TTAMethod, collect_norm_params
from shared.tta.woc import (
    WoC,
    WoCConfig,
    confidence_delta,
    confidence_drop_mask,
    diversity_loss,
    fpr_at_95_tpr,
    marginal_entropy,
    open_set_auroc,
    tent_woc,
)


def _model(seed=0, classes=4):
    torch.manual_seed(seed)
    m = SmallCNN(num_classes=classes, width=4, norm="bn")
    with torch.no_grad():
        for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m.eval()


def _x(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16, 16, generator=g)
    x[: n // 2] *= torch.linspace(0, 1, 16).view(1, 1, 1, 16)  # two kinds of image, so that the crowd disagrees
    return x


# ## The pure functions


def test_confidence_drop_mask_on_a_hand_computed_batch():
    original = torch.tensor([[0.6, 0.3, 0.1],    # c_o = 0
                             [0.2, 0.5, 0.3],    # c_o = 1
                             [0.1, 0.2, 0.7],    # c_o = 2
                             [0.25, 0.5, 0.25]])  # c_o = 1
    adapted = torch.tensor([[0.7, 0.2, 0.1],     # 0.7 >= 0.6: keep
                            [0.4, 0.45, 0.15],   # 0.45 < 0.5: drop
                            [0.1, 0.2, 0.7],     # tie 0.7 = 0.7: keep
                            [0.05, 0.45, 0.5]])  # adapted argmax moved to 2, p(c_o) 0.45 < 0.5: drop
    assert confidence_drop_mask(adapted, original).tolist() == [True, False, True, False]
    assert torch.allclose(confidence_delta(adapted, original), torch.tensor([0.1, -0.05, 0.0, -0.05]), atol=1e-7)


def test_the_class_is_the_original_models_not_the_adapted_models():
    original = torch.tensor([[0.5, 0.4, 0.1]])  # c_o = 0
    adapted = torch.tensor([[0.3, 0.6, 0.1]])   # adapted predicts 1 (its confidence rose), but p(c_o) fell
    assert confidence_drop_mask(adapted, original).tolist() == [False]
    adapted = torch.tensor([[0.55, 0.0, 0.45]])  # p(c_o) rose although the adapted distribution changed a lot
    assert confidence_drop_mask(adapted, original).tolist() == [True]


def test_identical_models_select_everything():
    p = torch.softmax(torch.randn(10, 6, generator=torch.Generator().manual_seed(0)), -1)
    assert confidence_drop_mask(p, p).all()
    assert torch.equal(confidence_delta(p, p), torch.zeros(10))


def test_marginal_entropy_and_diversity_loss_closed_forms():
    one_hots = torch.eye(4)  # each sample certain, but the batch covers all classes: H(mean) = log 4
    assert math.isclose(float(marginal_entropy(one_hots)), math.log(4), rel_tol=1e-6)
    same = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3)  # collapsed batch: H(mean) = 0
    assert float(marginal_entropy(same)) == 0.0
    assert math.isclose(float(diversity_loss(one_hots, 0.5)), -0.5 * math.log(4), rel_tol=1e-6)


@pytest.mark.parametrize("shapes", [((3, 4), (3, 5)), ((4,), (4,)), ((2, 3), (3, 3))])
def test_shape_errors(shapes):
    a, b = torch.full(shapes[0], 0.25), torch.full(shapes[1], 0.25)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        confidence_drop_mask(a, b)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        confidence_delta(a, b)


def test_config_and_wrapper_errors():
    with pytest.raises(ValueError, match="diversity_weight"):
        WoCConfig(diversity_weight=-0.1)
    with pytest.raises(ValueError, match="TTAMethod"):
        WoC(_model())

    class TwoPass(Tent):
        def forward_and_adapt(self, x):
            return super().forward_and_adapt(x)

    with pytest.raises(ValueError, match="overrides forward_and_adapt"):
        WoC(TwoPass(_model()))


# ## The adapter


def test_first_batch_selects_all_and_equals_a_tent_step():
    x = _x()
    woc, tent = tent_woc(_model(), TentConfig(lr=1e-2)), Tent(_model(), TentConfig(lr=1e-2))
    assert torch.allclose(woc(x), tent(x), atol=1e-6)
    assert bool(woc.last_mask.all()) and woc.n_selected == len(x) and woc.n_updates == 1
    for a, b in zip(woc.adapter.params, tent.params):
        assert torch.allclose(a, b, atol=1e-7)


def test_second_step_is_adam_on_the_mean_entropy_of_the_selected_samples_only():
    x1, x2 = _x(seed=1), _x(seed=2)
    woc = tent_woc(_model(), TentConfig(lr=5e-2))
    woc(x1)
    # By hand: the frozen source (batch-statistics BN) and a copy of the adapted model with its optimizer.
    source = Tent(_model(), TentConfig(lr=5e-2)).model.requires_grad_(False)
    by_hand = copy.deepcopy(woc.adapter.model)
    params, _ = collect_norm_params(by_hand)
    opt = torch.optim.Adam(params, lr=5e-2)
    opt.load_state_dict(copy.deepcopy(woc.adapter.optimizer.state_dict()))  # Adam's step counter must not be shared
    logits = by_hand(x2)
    p_a, p_o = logits.softmax(-1), source(x2).softmax(-1)
    c_o = p_o.argmax(-1)
    keep = p_a[torch.arange(len(x2)), c_o] >= p_o[torch.arange(len(x2)), c_o]
    assert 0 < int(keep.sum()) < len(x2), "the test batch must split the crowd"
    loss = entropy_from_logits(logits[keep]).sum() / keep.sum()
    loss.backward()
    opt.step()
    out = woc(x2)
    assert torch.equal(woc.last_mask, keep)
    assert woc.selected_share == pytest.approx((len(x1) + int(keep.sum())) / (2 * len(x2)))  # all of batch 1, part of batch 2
    assert torch.allclose(out, logits.detach(), atol=1e-6)
    for a, b in zip(woc.adapter.params, params):
        assert torch.allclose(a, b, atol=1e-6)


def test_loss_with_diversity_term_is_selected_entropy_minus_alpha_marginal_entropy():
    woc = tent_woc(_model(), woc=WoCConfig(diversity_weight=0.5))
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    original = torch.tensor([[0.5, 0.2, 0.2, 0.1],   # c_o = 0, p_a(0) = e^2/(e^2+3) ~ 0.711 >= 0.5: keep
                             [0.1, 0.8, 0.05, 0.05],  # c_o = 1, p_a(1) ~ 0.475 < 0.8: drop
                             [0.2, 0.2, 0.2, 0.4]])  # c_o = 3, p_a(3) ~ 0.870 >= 0.4: keep
    loss = woc.loss(logits, torch.zeros(3, 1, 16, 16), original)
    h = entropy_from_logits(logits)
    p_bar = logits.softmax(-1).mean(0)
    expected = (h[0] + h[2]) / 2 + 0.5 * float((p_bar * p_bar.log()).sum())
    assert woc.last_mask.tolist() == [True, False, True]
    assert math.isclose(float(loss), float(expected), rel_tol=1e-6)


def test_no_selected_sample_means_no_step_unless_the_diversity_term_is_on():
    x = _x()
    for alpha, moves in ((0.0, False), (0.5, True)):
        woc = tent_woc(_model(), TentConfig(lr=1e-2), WoCConfig(diversity_weight=alpha))
        before = [p.detach().clone() for p in woc.adapter.params]
        with torch.no_grad():  # make the reference far more confident than the adapted model can be
            woc.reference.head.weight.mul_(100.0)
            woc.reference.head.bias.mul_(100.0)
        woc(x)
        assert not bool(woc.last_mask.any())
        assert woc.n_updates == int(moves)
        changed = any(not torch.equal(a, b) for a, b in zip(before, woc.adapter.params))
        assert changed == moves


def test_select_false_and_no_diversity_is_exactly_tent():
    woc = WoC(Tent(_model(), TentConfig(lr=1e-2)), WoCConfig(select=False))
    tent = Tent(_model(), TentConfig(lr=1e-2))
    for seed in (1, 2, 3):
        assert torch.allclose(woc(_x(seed=seed)), tent(_x(seed=seed)), atol=1e-6)
    for a, b in zip(woc.adapter.params, tent.params):
        assert torch.allclose(a, b, atol=1e-6)
    assert woc.name == "tent" and tent_woc(_model()).name == "tent+woc"
    assert woc.selected_share == 1.0 and tent_woc(_model()).selected_share == 1.0  # nothing rejected (nor seen)
    assert tent_woc(_model(), woc=WoCConfig(diversity_weight=0.5)).name == "tent+woc+div"


def test_reference_stays_frozen_and_reset_restores_the_source():
    woc = tent_woc(_model(), TentConfig(lr=1e-1))
    ref_state = copy.deepcopy(woc.reference.state_dict())
    source_state = copy.deepcopy(woc.model.state_dict())
    for seed in range(4):
        woc(_x(seed=seed))
    assert all(torch.equal(v, ref_state[k]) for k, v in woc.reference.state_dict().items())
    assert not all(torch.equal(v, source_state[k]) for k, v in woc.model.state_dict().items())
    woc.reset()
    assert all(torch.equal(v, source_state[k]) for k, v in woc.model.state_dict().items())
    assert not any(p.requires_grad for p in woc.reference.parameters())


def test_wraps_any_adapter_with_a_batch_mean_loss():
    class SquaredLogits(TTAMethod):  # a toy "entropy adapter": the loss sees only the selected rows
        seen: list[int] = []

        def loss(self, logits, x):
            self.seen.append(len(x))
            return (logits ** 2).mean()

    woc = WoC(SquaredLogits(_model()), WoCConfig())
    woc(_x(seed=1))
    woc(_x(seed=2))
    assert SquaredLogits.seen == [16, int(woc.last_mask.sum())]


# ## Open-set metrics


def test_open_set_auroc_and_fpr95_hand_cases():
    known = np.array([True, True, True, False, False])
    assert open_set_auroc(np.array([0.9, 0.8, 0.7, 0.2, 0.1]), known) == 1.0
    assert open_set_auroc(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), known) == 0.0
    assert open_set_auroc(np.array([0.5, 0.5, 0.5, 0.5, 0.5]), known) == 0.5
    # 1 of the 6 (known, unknown) pairs is ordered wrongly (0.3 < 0.5): AUROC = 5/6
    assert math.isclose(open_set_auroc(np.array([0.9, 0.3, 0.6, 0.5, 0.1]), known), 5 / 6)
    scores = np.concatenate([np.arange(100.0), [50.0, 4.0, 3.0]])  # threshold = 5th known score = 4
    is_known = np.r_[np.ones(100, bool), np.zeros(3, bool)]
    assert math.isclose(fpr_at_95_tpr(scores, is_known), 2 / 3)
    with pytest.raises(ValueError, match="both known and open-set"):
        open_set_auroc(np.ones(3), np.ones(3, bool))
