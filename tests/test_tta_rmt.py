"""RMT: symmetric cross-entropy, the label-free SupCon loss, prototypes, one adaptation step, warm-up, reset."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from shared.entropy import entropy_from_logits
from shared.models.cnn import SmallCNN
from shared.tta.rmt import (RMT, RMTConfig, SourceBatches, class_prototypes, clear_warmup_cache, nearest_prototype,
                            relative_change, supcon_loss, symmetric_cross_entropy, weight_distance)
from shared.tta.teacher import augment_digits, configure_all_parameters, ema_update


def _model(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(num_classes=3, width=4).eval()


def _source(n=24, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g), torch.arange(n) % 3


def _x(n=8, seed=1):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


SMALL = RMTConfig(lr=1e-2, momentum=0.9, warmup_samples=0, source_batch_size=6, projection_dim=8)


def test_defaults_are_the_official_ones():
    c = RMTConfig()
    assert (c.lr, c.momentum, c.lambda_src, c.lambda_trg, c.lambda_cont) == (1e-3, 0.999, 1.0, 1.0, 1.0)
    assert (c.warmup_samples, c.temperature, c.projection_dim, c.consistency) == (50_000, 0.1, 128, "sce")
    assert c.warmup_steps == 250  # 50,000 samples / source batch 200
    for bad in ({"consistency": "kl"}, {"temperature": 0.0}, {"lambda_src": -1.0}, {"momentum": 2.0}, {"steps": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RMTConfig(**bad)


def test_symmetric_cross_entropy_hand_case_symmetry_and_entropy():
    s, t = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[math.log(3.0), 0.0]])  # p = (1/4, 3/4), q = (3/4, 1/4)
    ce_qp = -(0.75 * math.log(0.25) + 0.25 * math.log(0.75))
    ce_pq = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    assert symmetric_cross_entropy(s, t).item() == pytest.approx(0.5 * ce_qp + 0.5 * ce_pq, abs=1e-6)
    assert symmetric_cross_entropy(s, t, alpha=0.0).item() == pytest.approx(ce_qp, abs=1e-6)  # plain CE to the teacher
    z1, z2 = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(symmetric_cross_entropy(z1, z2), symmetric_cross_entropy(z2, z1), atol=1e-6)
    assert torch.allclose(symmetric_cross_entropy(z1, z1), entropy_from_logits(z1), atol=1e-6)  # SCE(p, p) = H(p)


def test_supcon_closed_form_for_aligned_orthogonal_views():
    b, v, temperature = 3, 3, 0.5
    views = torch.eye(b).unsqueeze(1).repeat(1, v, 1)  # all views of sample i equal e_i: cos 1 within, 0 across
    # Each anchor: 2 positives at logit 1/T, 3(B-1) negatives at logit 0 (after the max shift: 0 and -1/T).
    expected = -(1 / temperature - math.log(2 * math.exp(1 / temperature) + v * (b - 1)))
    assert supcon_loss(views, temperature).item() == pytest.approx(expected, abs=1e-5)
    scaled = supcon_loss(views, temperature, base_temperature=2 * temperature)
    assert scaled.item() == pytest.approx(expected / 2, abs=1e-5)


def test_nearest_prototype_uses_cosine_not_distance():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    features = torch.tensor([[10.0, 1.0], [0.1, 0.2], [-1.0, 3.0]])
    assert nearest_prototype(features, prototypes).tolist() == [0, 1, 1]


def test_prototypes_are_class_means_and_source_batches_cycle():
    x = torch.tensor([[1.0], [3.0], [10.0], [20.0]])
    y = torch.tensor([0, 0, 1, 1])
    protos = class_prototypes(lambda v: v * 2, x, y, num_classes=2, batch_size=3)
    assert protos.squeeze(1).tolist() == [4.0, 30.0]
    with pytest.raises(ValueError, match="classes \\[2\\]"):
        class_prototypes(lambda v: v, x, y, num_classes=3, batch_size=2)
    batches = SourceBatches(x, y, batch_size=2, seed=0)
    seen = torch.cat([batches.next()[1] for _ in range(2)])  # one epoch = every image once
    assert sorted(seen.tolist()) == [0, 0, 1, 1]


def test_one_step_matches_a_hand_written_rmt_step():
    x, (xs, ys) = _x(), _source()
    rmt = RMT(_model(), SMALL, source=(xs, ys))
    # By hand, from the same start: student, teacher, prototypes, projector, generators.
    student = configure_all_parameters(_model())
    teacher = copy.deepcopy(student)
    projector = copy.deepcopy(rmt.projector)
    opt = torch.optim.Adam(list(student.parameters()), lr=1e-2)
    opt.add_param_group({"params": list(projector.parameters()), "lr": 1e-2})
    with torch.no_grad():
        feats_src = torch.cat([student.features(xs[i:i + 6]) for i in range(0, 24, 6)])  # BN statistics per source batch
        protos = torch.stack([feats_src[ys == k].mean(0) for k in range(3)])
    g = torch.Generator().manual_seed(0)
    batches = SourceBatches(xs, ys, 6, seed=1)
    feats = student.features(x)
    logits = student.head(feats)
    feats_aug = student.features(augment_digits(x, g))
    with torch.no_grad():
        t_logits = teacher(x)
    sce = lambda a, b: (-0.5 * (b.softmax(1) * a.log_softmax(1)).sum(1) - 0.5 * (a.softmax(1) * b.log_softmax(1)).sum(1))  # noqa: E731
    l_trg = (0.5 * sce(logits, t_logits) + 0.5 * sce(student.head(feats_aug), t_logits)).mean()
    nearest = F.cosine_similarity(protos.unsqueeze(1), feats.detach().unsqueeze(0), dim=-1).argmax(0)
    l_cont = supcon_loss(torch.stack([protos[nearest], feats, feats_aug], 1), 0.1, projector)
    x_src, y_src = batches.next()
    l_src = F.cross_entropy(student(x_src), y_src)
    (l_trg + l_cont + l_src).backward()
    opt.step()
    prediction = rmt(x)
    assert torch.allclose(prediction, (logits + t_logits).detach(), atol=1e-5)  # student + teacher, before the step
    assert rmt.last["self_training"] == pytest.approx(l_trg.item(), abs=1e-5)
    assert rmt.last["contrastive"] == pytest.approx(l_cont.item(), abs=1e-5)
    assert rmt.last["source_ce"] == pytest.approx(l_src.item(), abs=1e-5)
    for (name, p), q, p0 in zip(rmt.model.named_parameters(), student.parameters(), teacher.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
        assert torch.allclose(dict(rmt.teacher.named_parameters())[name], 0.9 * p0 + 0.1 * q, atol=1e-5), name
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(rmt.projector.parameters(), projector.parameters()))


def test_ablations_switch_their_terms_off():
    x, source = _x(), _source()
    ce = RMT(_model(), replace(SMALL, consistency="ce"), source=source)
    ce(x)
    free = RMT(_model(), replace(SMALL, lambda_src=0.0, lambda_cont=0.0), source=source)
    free(x)
    assert set(free.last) == {"self_training"} and set(ce.last) == {"self_training", "contrastive", "source_ce"}
    # Source-free and without contrast, the labels of the source set play no role at all.
    flipped = RMT(_model(), replace(SMALL, lambda_src=0.0, lambda_cont=0.0), source=(source[0], 2 - source[1]))
    assert torch.equal(flipped(x), RMT(_model(), replace(SMALL, lambda_src=0.0, lambda_cont=0.0), source=source)(x))
    with pytest.raises(ValueError, match="needs source"):
        RMT(_model(), SMALL)


def test_warmup_ramps_the_learning_rate_moves_the_teacher_and_is_cached():
    clear_warmup_cache()
    source = _source()
    config = replace(SMALL, warmup_samples=24)  # 4 steps of 6 source images
    rmt = RMT(_model(), config, source=source)
    assert all(group["lr"] == 1e-2 for group in rmt.optimizer.param_groups)  # back to the final lr
    assert not torch.equal(rmt.teacher.head.weight, _model().head.weight)  # the EMA followed the student
    again = RMT(_model(), config, source=source)  # cache hit: identical state, sampler at the same place
    for a, b in zip(list(rmt.model.parameters()) + list(rmt.teacher.parameters()),
                    list(again.model.parameters()) + list(again.teacher.parameters())):
        assert torch.equal(a, b)
    assert torch.equal(rmt.source.next()[0], again.source.next()[0])
    assert rmt.warmup_change > 0 and again.warmup_change == rmt.warmup_change
    assert RMT(_model(), SMALL, source=source).warmup_change == 0.0  # no warm-up, no change
    clear_warmup_cache()
    fresh = RMT(_model(), config, source=source)  # recomputed: the cache changes nothing
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), again.model.parameters()))


def test_reset_returns_to_the_warmed_up_state():
    x, source = _x(), _source()
    rmt = RMT(_model(), replace(SMALL, warmup_samples=12), source=source)
    start = copy.deepcopy((rmt.model.state_dict(), rmt.teacher.state_dict(), rmt.projector.state_dict()))
    for _ in range(2):
        rmt(x)
    rmt.reset()
    for state, module in zip(start, (rmt.model, rmt.teacher, rmt.projector)):
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())


def test_weight_distance_and_relative_change_by_hand():
    before = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0]), "steps": torch.tensor(7)}
    after = {"w": torch.tensor([3.0, 1.0]), "b": torch.tensor([4.0]), "steps": torch.tensor(9)}  # integers are skipped
    assert weight_distance(before, after) == pytest.approx(1.0)
    assert relative_change(before, after) == pytest.approx(1.0 / 5.0)  # |(3, 0, 4)| = 5
    with pytest.raises(ValueError, match="same tensors"):
        weight_distance(before, {"w": after["w"]})


def test_teacher_movement_is_one_minus_m_to_the_t_for_a_student_that_jumps():
    m, steps = 0.9, 5
    rmt = RMT(_model(), replace(SMALL, momentum=m), source=_source())
    assert rmt.teacher_movement() == 0.0  # nothing moved yet
    with torch.no_grad():
        for p in rmt.model.parameters():
            p.add_(0.3)  # the student jumps once, then stays
    for _ in range(steps):
        ema_update(rmt.teacher, rmt.model, m)
    assert rmt.teacher_movement() == pytest.approx(1 - m**steps, rel=1e-5)


def test_loss_shares_are_the_mean_weighted_shares_of_each_step():
    rmt = RMT(_model(), replace(SMALL, lambda_src=2.0), source=_source())
    for seed in (1, 2):
        rmt(_x(seed=seed))
    by_hand = {}
    for step in rmt.history:
        weighted = {"self_training": step["self_training"], "contrastive": step["contrastive"], "source_ce": 2.0 * step["source_ce"]}
        for k, v in weighted.items():
            by_hand.setdefault(k, []).append(v / sum(weighted.values()))
    shares = rmt.loss_shares()
    assert len(rmt.history) == 2 and sum(shares.values()) == pytest.approx(1.0)
    assert all(shares[k] == pytest.approx(sum(v) / 2) for k, v in by_hand.items())
    rmt.reset()
    assert rmt.history == [] and rmt.loss_shares() == {}
