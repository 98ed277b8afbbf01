"""CoTTA: the threshold decision, the soft cross-entropy step, the teacher EMA, the restore, the output, reset,
the no-gradient control and the displacement measure."""

from __future__ import annotations

import copy

import pytest
import torch

from shared.models.cnn import SmallCNN
from shared.tta.cotta import CoTTA, CoTTAConfig, weight_displacement
from shared.tta.teacher import augment_digits, configure_all_parameters


def _model(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(num_classes=4, width=4).eval()


def _x(n=8, seed=1):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_defaults_are_the_official_cifar10_settings():
    c = CoTTAConfig()
    assert (c.lr, c.optimizer, c.alpha, c.restore_prob, c.threshold, c.n_augmentations, c.steps) == \
        (1e-3, "adam", 0.999, 0.01, 0.92, 32, 1)
    for bad in ({"alpha": 1.5}, {"restore_prob": -0.1}, {"threshold": 2.0}, {"n_augmentations": 0},
                {"steps": 0}, {"optimizer": "lamb"}, {"lr": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CoTTAConfig(**bad)


def test_every_weight_trains_and_the_teacher_and_anchor_are_frozen():
    cotta = CoTTA(_model())
    assert len(cotta.params) == len(list(cotta.model.parameters())) == 11
    assert not any(p.requires_grad for p in cotta.teacher.parameters())
    assert not any(p.requires_grad for p in cotta.anchor.parameters())
    assert all(m.running_mean is None for m in cotta.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_augmentation_average_is_used_exactly_when_the_anchor_is_unsure():
    x = _x()
    source = configure_all_parameters(_model())
    with torch.no_grad():
        confidence = float(torch.softmax(source(x), -1).max(-1).values.mean())
        plain = source(x)
        g = torch.Generator().manual_seed(5)
        averaged = torch.stack([source(augment_digits(x, g)) for _ in range(3)]).mean(0)
    # Above the anchor's confidence: the N-view average of the (still source) teacher is the output.
    above = CoTTA(_model(), CoTTAConfig(threshold=confidence + 1e-4, n_augmentations=3, seed=5))
    assert torch.allclose(above(x), averaged, atol=1e-5)
    assert above.last["triggered"] and above.last["anchor_confidence"] == pytest.approx(confidence, abs=1e-6)
    # Below it, or with the switch off: the teacher on the plain batch.
    below = CoTTA(_model(), CoTTAConfig(threshold=confidence - 1e-4, n_augmentations=3, seed=5))
    assert torch.allclose(below(x), plain, atol=1e-5) and not below.last["triggered"]
    off = CoTTA(_model(), CoTTAConfig(threshold=1.0, augment_average=False))
    assert torch.allclose(off(x), plain, atol=1e-5) and not off.last["triggered"]


def test_one_step_is_adam_on_the_soft_cross_entropy_then_the_teacher_ema():
    x, alpha, lr = _x(), 0.9, 1e-2
    cotta = CoTTA(_model(), CoTTAConfig(lr=lr, alpha=alpha, threshold=0.0, restore=False))
    student = configure_all_parameters(_model())
    theta0 = copy.deepcopy(student.state_dict())
    with torch.no_grad():
        target = torch.softmax(student(x), -1)  # teacher = source at the first batch
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    logits = student(x)
    loss = -(target * torch.log_softmax(logits, -1)).sum(-1).mean()
    loss.backward()
    opt.step()
    cotta(x)
    assert torch.allclose(cotta.last["student_logits"], logits.detach(), atol=1e-6)
    for (name, p), q in zip(cotta.model.named_parameters(), student.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
        t = dict(cotta.teacher.named_parameters())[name]
        assert torch.allclose(t, alpha * theta0[name] + (1 - alpha) * q, atol=1e-6), name


def test_restore_with_probability_one_returns_the_student_to_the_source():
    x = _x()
    cotta = CoTTA(_model(), CoTTAConfig(lr=1e-2, alpha=0.5, restore_prob=1.0, threshold=0.0))
    source = copy.deepcopy(cotta.model.state_dict())
    cotta(x)
    assert all(torch.equal(p, source[n]) for n, p in cotta.model.named_parameters())
    assert not torch.equal(cotta.teacher.head.weight, source["head.weight"])  # the teacher saw the moved student


def test_output_is_the_teacher_prediction_not_the_student():
    x = _x()
    cotta = CoTTA(_model(), CoTTAConfig(lr=5e-2, alpha=0.99, threshold=0.0, restore=False))
    for _ in range(3):
        cotta(x)
    with torch.no_grad():
        teacher = cotta.teacher(x)
    out = cotta(x)
    assert torch.allclose(out, teacher, atol=1e-6)
    assert not torch.allclose(out, cotta.last["student_logits"], atol=1e-3)


def test_reset_restores_student_teacher_and_optimizer():
    x = _x()
    cotta = CoTTA(_model(), CoTTAConfig(lr=1e-2, alpha=0.5))
    source = copy.deepcopy(cotta.model.state_dict())
    for _ in range(3):
        cotta(x)
    cotta.reset()
    for name, p in cotta.model.named_parameters():
        assert torch.equal(p, source[name]) and torch.equal(dict(cotta.teacher.named_parameters())[name], source[name])
    assert cotta.optimizer.state_dict()["state"] == {}


def test_without_adaptation_the_output_is_the_augmented_source_and_nothing_moves():
    x = _x()
    source = configure_all_parameters(_model())
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        averaged = [torch.stack([source(augment_digits(x, g)) for _ in range(3)]).mean(0) for _ in range(2)]
    control = CoTTA(_model(), CoTTAConfig(lr=5e-2, threshold=1.0, n_augmentations=3, seed=5, adapt=False))
    weights = copy.deepcopy(control.model.state_dict())
    for k in range(2):  # the second batch sees the next views of the same generator, and the same weights
        assert torch.allclose(control(x), averaged[k], atol=1e-5)
        assert control.last["triggered"] and control.last["student_logits"] is None and control.last["restored"] == 0
    assert all(torch.equal(p, weights[n]) for n, p in control.model.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in control.teacher.named_parameters())
    assert control.teacher_displacement() == 0.0 and control.student_displacement() == 0.0


def test_weight_displacement_is_the_relative_l2_distance():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0]]))
        model.bias.copy_(torch.tensor([4.0]))
    reference = {"weight": torch.zeros(1, 2), "bias": torch.tensor([4.0])}
    assert weight_displacement(model, reference) == pytest.approx(3.0 / 4.0)  # |(3, 0, 0)| / |(0, 0, 4)|
    assert weight_displacement(model, dict(model.state_dict())) == 0.0
    with pytest.raises(ValueError, match="no value"):
        weight_displacement(model, {"weight": torch.zeros(1, 2)})


def test_restore_records_what_it_reset():
    x = _x()
    cotta = CoTTA(_model(), CoTTAConfig(lr=1e-2, alpha=0.5, restore_prob=1.0, threshold=0.0))
    source = copy.deepcopy(cotta.model.state_dict())
    student = configure_all_parameters(_model())
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    with torch.no_grad():
        target = torch.softmax(student(x), -1)
    (-(target * torch.log_softmax(student(x), -1)).sum(-1).mean()).backward()
    opt.step()
    moved = sum(float((p.detach() - source[n]).pow(2).sum()) for n, p in student.named_parameters()) ** 0.5
    cotta(x)
    assert cotta.last["restored"] == cotta.n_weights == sum(p.numel() for p in student.parameters())
    assert cotta.last["restore_shift"] == pytest.approx(moved, rel=1e-4)  # p = 1 takes back the whole step
    assert cotta.student_displacement() == 0.0 and cotta.teacher_displacement() > 0.0
    off = CoTTA(_model(), CoTTAConfig(lr=1e-2, threshold=0.0, restore=False))
    off(x)
    assert off.last["restored"] == 0 and off.last["restore_shift"] == 0.0 and off.student_displacement() > 0.0


def test_teacher_changed_counts_the_plain_input_classes_that_differ_from_the_anchor():
    x = _x(n=16)
    cotta = CoTTA(_model(), CoTTAConfig(lr=5e-2, alpha=0.0, threshold=1.0, n_augmentations=2, restore=False))
    cotta(x)  # first batch: the teacher is still the source
    assert cotta.last["teacher_changed"] == 0.0
    cotta(x)  # alpha = 0: the teacher is now the stepped student
    with torch.no_grad():
        expected = float((cotta.teacher(x).argmax(-1) != cotta.anchor(x).argmax(-1)).double().mean())
    for _ in range(3):  # the value recorded on a batch describes the teacher before that batch's step
        before = expected
        cotta(x)
        assert cotta.last["teacher_changed"] == pytest.approx(before)
        with torch.no_grad():
            expected = float((cotta.teacher(x).argmax(-1) != cotta.anchor(x).argmax(-1)).double().mean())
    assert max(before, expected) > 0.0  # lr 5e-2 on a 4-class toy moves some classes
