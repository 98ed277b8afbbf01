"""SFDA's loss (Bateson et al., 2022): closed forms and hand-computed cases for each term, and Dice."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from shared.losses.segmentation_priors import (
    SFDAConfig,
    class_ratio,
    dice_score,
    pooled_dice,
    ratio_kl,
    sfda_adapt,
    sfda_loss,
    tagged_prior,
    weighted_entropy,
)
from shared.models.unet import PixelLogits, TinyUNet


def one_hot_probs(mask: torch.Tensor) -> torch.Tensor:
    """[B, H, W] 0/1 mask → [B, 2, H, W] one-hot probabilities."""
    return torch.stack([1 - mask, mask], dim=1).float()


# -- the class ratio ------------------------------------------------------------------------------
def test_mean_class_ratio_is_the_mean_softmax_per_class():
    probs = torch.tensor([[[[0.8, 0.4]], [[0.2, 0.6]]]])  # [1, 2, 1, 2]: two pixels
    assert torch.allclose(class_ratio(probs), torch.tensor([[0.6, 0.4]]))


def test_max_normalised_ratio_matches_the_released_code_by_hand():
    # pixel 1: (0.8, 0.2) / 0.8 = (1, 0.25); pixel 2: (0.4, 0.6) / 0.6 = (2/3, 1); sums (5/3, 5/4) → normalise
    probs = torch.tensor([[[[0.8, 0.4]], [[0.2, 0.6]]]])
    expected = torch.tensor([[5 / 3, 5 / 4]]) / (5 / 3 + 5 / 4)
    assert torch.allclose(class_ratio(probs, "max-normalised"), expected, atol=1e-6)


def test_both_ratios_give_exact_proportions_on_one_hot_predictions():
    mask = torch.zeros(2, 4, 4, dtype=torch.long)
    mask[0, :2, :2] = 1  # 4 of 16 pixels
    probs = one_hot_probs(mask)
    for kind in ("mean", "max-normalised"):
        assert torch.allclose(class_ratio(probs, kind), torch.tensor([[0.75, 0.25], [1.0, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        class_ratio(probs, "median")
    with pytest.raises(ValueError, match=r"\[B, K, H, W\]"):
        class_ratio(probs[0])


# -- the prior --------------------------------------------------------------------------------------
def test_tagged_prior_zeroes_the_organ_where_the_tag_says_absent():
    prior = tagged_prior(0.1, torch.tensor([True, False, True]))
    assert torch.allclose(prior, torch.tensor([[0.9, 0.1], [1.0, 0.0], [0.9, 0.1]]))
    assert torch.allclose(tagged_prior(0.1, None, n=2), torch.tensor([[0.9, 0.1], [0.9, 0.1]]))
    with pytest.raises(ValueError, match="n"):
        tagged_prior(0.1, None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tagged_prior(1.5, torch.tensor([True]))


# -- the KL term ------------------------------------------------------------------------------------
def test_kl_of_equal_ratios_is_zero():
    tau = torch.tensor([[0.93, 0.07], [0.5, 0.5], [1.0, 0.0]])
    assert float(ratio_kl(tau, tau)) == pytest.approx(0.0, abs=1e-12)


def test_kl_matches_the_closed_form_and_averages_over_the_batch():
    pred = torch.tensor([[0.5, 0.5], [0.75, 0.25]])
    prior = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    # slice 1: 0.5 log(0.5/0.75) + 0.5 log(0.5/0.25) = 0.5 log(4/3); slice 2: 0; divided by B = 2
    assert float(ratio_kl(pred, prior)) == pytest.approx(0.25 * math.log(4 / 3), rel=1e-6)
    # a slice mask drops a slice from the sum, the normaliser stays B
    assert float(ratio_kl(pred, prior, torch.tensor([False, True]))) == pytest.approx(0.0, abs=1e-9)


def test_kl_to_a_zero_prior_uses_the_official_epsilon():
    pred, prior = torch.tensor([[0.9, 0.1]]), torch.tensor([[1.0, 0.0]])
    expected = 0.9 * (math.log(0.9 + 1e-10) - math.log(1.0 + 1e-10)) + 0.1 * (math.log(0.1 + 1e-10) - math.log(1e-10))
    assert float(ratio_kl(pred, prior)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("prior_organ", [0.1, 0.6])
def test_gradient_of_the_prior_term_moves_the_ratio_toward_the_prior(prior_organ):
    # free logits on a 1×1×2×2 slice; the organ covers 0.3 of the soft mass at the start
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = math.log(0.3 / 0.7)
    logits.requires_grad_(True)
    prior = torch.tensor([[1 - prior_organ, prior_organ]])
    before = float(torch.softmax(logits.detach(), 1)[:, 1].mean())
    ratio_kl(class_ratio(torch.softmax(logits, 1)), prior).backward()
    with torch.no_grad():
        after = float(torch.softmax(logits - 1.0 * logits.grad, 1)[:, 1].mean())
    assert abs(after - prior_organ) < abs(before - prior_organ)
    assert (after - before) * (prior_organ - before) > 0  # moved in the prior's direction


# -- the entropy term -------------------------------------------------------------------------------
def test_weighted_entropy_of_one_hot_predictions_is_zero():
    mask = torch.randint(0, 2, (3, 5, 5))
    assert float(weighted_entropy(one_hot_probs(mask), (0.1, 0.9))) == pytest.approx(0.0, abs=1e-8)


def test_weighted_entropy_of_a_uniform_prediction_by_hand():
    probs = torch.full((2, 2, 3, 3), 0.5)
    # -(0.1 · 0.5 log 0.5 + 0.9 · 0.5 log 0.5) = 0.5 log 2 per pixel; the mean over pixels is the same
    assert float(weighted_entropy(probs, (0.1, 0.9))) == pytest.approx(0.5 * math.log(2), rel=1e-6)
    assert float(weighted_entropy(probs, (1.0, 1.0))) == pytest.approx(math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="one weight per class"):
        weighted_entropy(probs, (1.0,))


def test_sfda_loss_is_entropy_plus_lambda_kl_and_lambda_zero_is_entropy_only():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 4, 4)
    prior = tagged_prior(0.2, torch.tensor([True, False, True]))
    probs = torch.softmax(logits, 1)
    out = sfda_loss(logits, prior, lambda_kl=2.0)
    assert torch.allclose(out.total, weighted_entropy(probs, (0.1, 0.9)) + 2.0 * ratio_kl(class_ratio(probs), prior))
    assert torch.allclose(sfda_loss(logits, prior, lambda_kl=0.0).total, weighted_entropy(probs, (0.1, 0.9)))
    skip = sfda_loss(logits, prior, absent="skip")  # the organ-free slice 2 drops out of the KL
    assert torch.allclose(skip.kl, ratio_kl(class_ratio(probs), prior, torch.tensor([True, False, True])))
    with pytest.raises(ValueError, match="absent"):
        sfda_loss(logits, prior, absent="ignore")


def test_sfda_loss_equals_the_official_einsum_form():
    # EntKLProp (losses.py): -Σ ν s log(s + 1e-10) / Σ s  +  (Σ τ log(τ + 1e-10) - Σ τ log(τ_e + 1e-10)) / B,
    # with τ from utils.norm_soft_size (ratio="max-normalised")
    torch.manual_seed(1)
    logits, prior = torch.randn(4, 2, 6, 6), tagged_prior(0.15, torch.tensor([True, True, False, True]))
    p = torch.softmax(logits, 1)
    w = torch.tensor([0.1, 0.9])
    ent = -torch.einsum("bcwh,bcwh->", p * w.view(1, 2, 1, 1), (p + 1e-10).log()) / (p.sum() + 1e-10)
    resp = p / (p.max(1, keepdim=True).values + 1e-10)
    tau = resp.sum((2, 3)) / (resp.sum((2, 3)).sum(1, keepdim=True) + 1e-10)
    kl = (torch.einsum("bc,bc->", tau, (tau + 1e-10).log()) - torch.einsum("bc,bc->", tau, (prior + 1e-10).log())) / 4
    out = sfda_loss(logits, prior, ratio="max-normalised")
    assert torch.allclose(out.total, ent + kl, atol=1e-6)


# -- Dice -------------------------------------------------------------------------------------------
def test_dice_of_identical_masks_is_one_and_of_disjoint_masks_zero():
    a = torch.zeros(1, 4, 4, dtype=torch.long)
    a[0, :2, :2] = 1
    b = torch.zeros_like(a)
    b[0, 2:, 2:] = 1
    assert float(dice_score(a, a)) == 1.0
    assert float(dice_score(a, b)) == 0.0
    assert float(dice_score(torch.zeros_like(a), torch.zeros_like(a))) == 1.0  # nothing to find, nothing found
    assert float(dice_score(torch.zeros_like(a), torch.zeros_like(a), empty=0.0)) == 0.0


def test_dice_by_hand_and_pooled_over_slices():
    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    true = torch.zeros(2, 4, 4, dtype=torch.long)
    pred[0, :2, :2] = 1  # 4 pixels
    true[0, :1, :2] = 1  # 2 pixels, both inside the prediction
    pred[1, 3, 3] = 1  # a false positive on an organ-free slice
    assert torch.allclose(dice_score(pred, true), torch.tensor([4 / 6, 0.0], dtype=torch.float64))
    assert pooled_dice(pred, true) == pytest.approx(2 * 2 / (5 + 2))
    with pytest.raises(ValueError, match="same shape"):
        dice_score(pred, true[:1])


# -- the adaptation loop and the model ------------------------------------------------------------
def test_config_defaults_are_the_official_recipe_and_bad_values_raise():
    c = SFDAConfig()
    assert (c.lambda_entropy, c.lambda_kl, c.class_weights, c.lr, c.weight_decay, c.batch_size, c.epochs) == (
        1.0, 1.0, (0.1, 0.9), 1e-6, 1e-4, 24, 100)
    for bad in ({"ratio": "soft"}, {"absent": "x"}, {"norm_stats": "test"}, {"lr": 0.0}, {"lambda_kl": -1.0}):
        with pytest.raises(ValueError):
            SFDAConfig(**bad)


def _tiny_setup():
    torch.manual_seed(0)
    model = TinyUNet(width=2)
    images = torch.rand(10, 1, 8, 8)
    prior = tagged_prior(0.2, torch.tensor([True] * 8 + [False] * 2))
    return model, images, prior


def test_adaptation_is_deterministic_and_moves_all_parameters():
    model, images, prior = _tiny_setup()
    config = SFDAConfig(lr=1e-2, epochs=2, batch_size=4)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    history = sfda_adapt(a, images, prior, config, seed=3)
    sfda_adapt(b, images, prior, config, seed=3)
    assert len(history) == 2 and set(history[0]) == {"loss", "entropy", "kl"}
    for (name, p0), p1, p2 in zip(model.named_parameters(), a.parameters(), b.parameters()):
        assert torch.equal(p1, p2)
        assert not torch.equal(p0, p1), f"{name} did not move"
    assert not a.training


def test_batch_norm_statistics_move_in_train_mode_and_stay_when_frozen():
    model, images, prior = _tiny_setup()
    source_mean = model.enc0[1].running_mean.clone()
    moving, frozen = copy.deepcopy(model), copy.deepcopy(model)
    sfda_adapt(moving, images, prior, SFDAConfig(lr=1e-3, epochs=1, batch_size=5), seed=0)
    sfda_adapt(frozen, images, prior, SFDAConfig(lr=1e-3, epochs=1, batch_size=5, norm_stats="source"), seed=0)
    assert not torch.equal(moving.enc0[1].running_mean, source_mean)
    assert torch.equal(frozen.enc0[1].running_mean, source_mean)


def test_on_epoch_sees_the_source_model_first_then_every_epoch():
    model, images, prior = _tiny_setup()
    seen = []
    sfda_adapt(model, images, prior, SFDAConfig(lr=1e-3, epochs=3, batch_size=5), on_epoch=lambda e, m: seen.append((e, m.training)))
    assert seen == [(-1, False), (0, False), (1, False), (2, False)]


def test_tiny_unet_shapes_and_pixel_logits_view():
    model = TinyUNet(width=4).eval()
    x = torch.rand(3, 1, 12, 16)
    logits = model(x)
    assert logits.shape == (3, 2, 12, 16)
    rows = PixelLogits(model)(x)
    assert rows.shape == (3 * 12 * 16, 2)
    assert torch.allclose(rows[12 * 16 + 5 * 16 + 7], logits[1, :, 5, 7])  # slice 1, pixel (5, 7)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.rand(1, 1, 10, 10))


def test_source_unet_is_the_seeded_cross_entropy_fit_and_the_cache_returns_the_same_weights(tmp_path, monkeypatch):
    from shared.data.synthetic_segmentation import source_and_target
    from shared.models.unet import (
        UNetSourceConfig,
        fit_cross_entropy,
        source_unet,
        train_source_unet,
    )

    monkeypatch.setenv("ENTROPY_BOOK_CACHE", str(tmp_path))
    config = UNetSourceConfig(n_source=24, seed=3, width=2, epochs=1, batch_size=8)
    source = source_and_target(n_source=24, n_target=30, n_test=20, shift=0.45, seed=3).source
    torch.manual_seed(3)
    by_hand = fit_cross_entropy(TinyUNet(width=2), source.images, source.masks, epochs=1, lr=1e-2, batch_size=8, seed=3)
    trained, first, second = train_source_unet(config), source_unet(config), source_unet(config)  # second: a cache hit
    assert len(list(tmp_path.rglob("tinyunet-*.pt"))) == 1
    for name, value in by_hand.state_dict().items():
        for model in (trained, first, second):
            assert torch.equal(model.state_dict()[name], value), name
    assert not second.training
