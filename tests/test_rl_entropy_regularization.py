"""SIREN (selective, anchored entropy regularisation) against closed forms and hand-made batches."""

from __future__ import annotations

import math

import pytest
import torch

from shared.entropy import top_p_entropy
from shared.rl.entropy_regularization import (
    SIREN,
    SIRENConfig,
    anchored_penalty,
    peak_mask,
    selective_entropy,
    selective_entropy_rows,
    touched_fraction,
)
from shared.rl.grpo import GRPOConfig, TokenBatch, grpo_loss


def _h(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def test_top_p_entropy_keeps_the_tokens_strictly_before_the_crossing():
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1],  # cumsum .5 .7 .9: nucleus {0.5, 0.2} -> (5/7, 2/7)
                          [0.05, 0.3, 0.05, 0.6],  # permuted: sorted .6 .3 .05 .05, cumsum .6 .9: {0.6} alone -> 0
                          [0.25, 0.25, 0.25, 0.25],  # cumsum .25 .5 .75 1: three tokens -> log 3
                          [0.85, 0.05, 0.05, 0.05]])  # top-1 >= p: empty nucleus -> 0
    h = top_p_entropy(probs.log(), p=0.8)
    expected = torch.tensor([_h([5 / 7, 2 / 7]), 0.0, math.log(3), 0.0])
    assert torch.allclose(h, expected, atol=1e-6)
    # top-k caps the candidates before the cut: k = 2 on the uniform row leaves two tokens
    assert torch.isclose(top_p_entropy(probs[2:3].log(), p=0.8, k=2), torch.tensor([math.log(2)]), atol=1e-6).all()
    # p = 1 keeps every token before the cumulative sum reaches 1: the last one is dropped
    assert torch.isclose(top_p_entropy(probs[2:3].log(), p=1.0), torch.tensor([math.log(3)]), atol=1e-5).all()


def test_top_p_entropy_ignores_minus_inf_and_logit_shifts_and_its_gradient_is_the_nucleus_entropys():
    logits = torch.tensor([[2.0, 1.0, 0.5, float("-inf"), -1.0]])
    assert torch.allclose(top_p_entropy(logits), top_p_entropy(logits + 3.0), atol=1e-6)
    z = torch.tensor([[1.0, 0.3, 0.2, -2.0]], requires_grad=True)  # probs ~ .51 .25 .23 .02 -> nucleus {0, 1}
    top_p_entropy(z, p=0.8).sum().backward()
    z2 = z.detach()[:, :2].clone().requires_grad_(True)
    q = torch.softmax(z2, -1)
    (-(q * q.log()).sum()).backward()
    assert torch.allclose(z.grad[:, :2], z2.grad, atol=1e-6) and torch.all(z.grad[:, 2:] == 0)
    # an empty nucleus has entropy 0 and a zero (not NaN) gradient
    c = torch.tensor([[5.0, 0.0, 0.0]], requires_grad=True)
    top_p_entropy(c).sum().backward()
    assert torch.all(c.grad == 0)


def test_peak_mask_keeps_values_strictly_above_the_per_row_quantile_of_valid_positions():
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0, 9.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 5, [True, True, True, True, False], [True] * 5])
    keep = peak_mask(values, mask, 0.8)
    # row 0: q_.8 = 3.2 -> {4}; row 1: over four valid values q_.8 = 2.4 -> {3}, the masked 9 never kept;
    # row 2: all ties at 0 -> nothing strictly above
    assert keep.tolist() == [[False, False, False, False, True], [False, False, False, True, False], [False] * 5]
    # quantile 0 keeps everything above the row minimum
    assert peak_mask(values[:1], mask[:1], 0.0).tolist() == [[False, True, True, True, True]]


def test_selective_entropy_is_seq_mean_token_mean_with_empty_rows_counted_as_zero():
    h = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [4.0, 0.0, 0.0]])
    keep = torch.tensor([[True, False, True], [False, False, False], [True, False, False]])
    assert torch.isclose(selective_entropy(h, keep), torch.tensor((2.0 + 0.0 + 4.0) / 3))


def test_selective_entropy_rows_averaged_over_chunks_equals_the_whole_batch():
    h = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [4.0, 0.0, 0.0]])
    keep = torch.tensor([[True, False, True], [False, False, False], [True, False, False]])
    assert torch.equal(selective_entropy_rows(h, keep), torch.tensor([2.0, 0.0, 4.0]))
    chunks = torch.cat([selective_entropy_rows(h[:2], keep[:2]), selective_entropy_rows(h[2:, :1], keep[2:, :1])])
    assert torch.equal(chunks.mean(), selective_entropy(h, keep))


def test_touched_fraction_counts_kept_positions_with_a_non_empty_nucleus_over_valid_positions():
    h = torch.tensor([[0.0, 0.7, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]])
    keep = torch.tensor([[True, True, False, False], [False, False, False, False]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    # row 0: position 1 is kept with H^p > 0; position 0 is kept but its nucleus is empty (no gradient): 1 of 6 valid
    assert touched_fraction(h, keep, mask) == pytest.approx(1 / 6)
    # a kept position outside the mask never counts
    assert touched_fraction(h, keep, torch.tensor([[True, False, True, True], [True, True, False, False]])) == 0.0


def test_anchored_penalty_is_zero_at_the_anchor_and_its_gradient_points_back():
    h = torch.tensor(0.3, requires_grad=True)
    loss = anchored_penalty(h, 0.5, 0.005)
    loss.backward()
    assert torch.isclose(loss, torch.tensor(0.005 * 0.04)) and torch.isclose(h.grad, torch.tensor(2 * 0.005 * -0.2))
    assert anchored_penalty(torch.tensor(0.5), 0.5, 0.005) == 0


def _batch(logits: torch.Tensor) -> TokenBatch:
    b, l, _ = logits.shape
    z = torch.zeros(b, l)
    from shared.entropy import entropy_from_logits
    return TokenBatch(z.clone().requires_grad_(True), z, torch.ones(b, l), torch.ones(b, l, dtype=torch.bool),
                      entropy_from_logits(logits), logits, torch.zeros(b), torch.zeros(b, dtype=torch.long))


def test_siren_hook_sets_the_anchor_on_the_first_call_then_penalises_the_squared_drift():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, 6, generator=g)
    siren = SIREN(SIRENConfig(coef=0.1))
    first = siren(_batch(logits))
    assert first == 0 and siren.anchor == pytest.approx(siren.trace[0]) and siren.anchor > 0
    sharper = logits * 3
    h_new = siren.selective(_batch(sharper))
    assert siren(_batch(sharper)) == pytest.approx(0.1 * (float(h_new) - siren.anchor) ** 2, rel=1e-5)
    assert siren.anchor == pytest.approx(siren.trace[0])  # fixed after the first call
    # the activity is recorded at every update: the share of positions the peak mask keeps with H^p > 0
    h, keep = siren.masked(_batch(sharper))
    assert len(siren.touched) == 2 and siren.touched[-1] == pytest.approx(float((keep & (h > 0)).float().mean()))
    assert siren.touched[0] == pytest.approx(0.2)  # 10 positions per row: the 0.8 quantile keeps the top 2 (20 %) of each row
    # in the GRPO loss the hook adds exactly its value
    cfg = GRPOConfig()
    base, _ = grpo_loss(_batch(sharper), cfg)
    total, _ = grpo_loss(_batch(sharper), cfg, siren.hooks())
    assert float((total - base).detach()) == pytest.approx(0.1 * (float(h_new) - siren.anchor) ** 2, rel=1e-5)
    # ablation without anchor: the plain selective bonus -beta * H_sel
    no_anchor = SIREN(SIRENConfig(coef=0.1, use_anchor=False))
    assert float(no_anchor(_batch(logits))) == pytest.approx(-0.1 * siren.trace[0], rel=1e-5)
    # ablations of the masks: full entropy over all positions is the seq-mean-token-mean of batch.entropy
    full = SIREN(SIRENConfig(use_top_p=False, use_peak_mask=False))
    assert float(full.selective(_batch(logits))) == pytest.approx(float(_batch(logits).entropy.mean()), rel=1e-5)


def test_a_zero_anchor_is_refused_and_bad_configs_name_the_allowed_values():
    confident = torch.zeros(2, 3, 5)
    confident[..., 0] = 10.0  # top-1 probability > 0.8 everywhere: every nucleus is empty
    with pytest.raises(ValueError, match="anchor"):
        SIREN()(_batch(confident))
    with pytest.raises(ValueError, match="top_p"):
        SIRENConfig(top_p=0.0)
    with pytest.raises(ValueError, match="quantile"):
        SIRENConfig(quantile=1.0)
