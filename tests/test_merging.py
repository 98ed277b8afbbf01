"""Task vectors, training-free merges, TIES and AdaMerging against closed forms and hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.entropy import entropy_from_logits
from shared.merging import (
    AdaMerging,
    AdaMergingConfig,
    apply_task_vectors,
    fit_adamerging,
    task_arithmetic,
    task_vector,
    ties_disjoint,
    ties_elect_sign,
    ties_merging,
    ties_task_vectors,
    ties_trim,
    weight_averaging,
)
from shared.merging.task_vectors import flatten


def _states(k=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (2, 3), "b": (2,)}
    theta0 = {n: torch.randn(s, generator=g, dtype=dtype) for n, s in shapes.items()}
    thetas = [{n: theta0[n] + 0.1 * torch.randn(s, generator=g, dtype=dtype) for n, s in shapes.items()} for _ in range(k)]
    return theta0, thetas


# ## Task vectors and the training-free merges


def test_lambda_zero_gives_the_pretrained_weights():
    theta0, thetas = _states()
    taus = [task_vector(theta0, t) for t in thetas]
    for merged in (task_arithmetic(theta0, taus, 0.0), apply_task_vectors(theta0, taus, [0.0, 0.0, 0.0])):
        for n in theta0:
            assert torch.equal(merged[n], theta0[n])


def test_one_task_with_lambda_one_gives_the_finetuned_model():
    theta0, thetas = _states(k=1)
    merged = task_arithmetic(theta0, [task_vector(theta0, thetas[0])], 1.0)
    for n in theta0:
        torch.testing.assert_close(merged[n], thetas[0][n], rtol=0, atol=1e-7)


def test_weight_averaging_is_the_mean_of_the_finetuned_models():
    theta0, thetas = _states(k=4)
    merged = weight_averaging(theta0, [task_vector(theta0, t) for t in thetas])
    for n in theta0:
        torch.testing.assert_close(merged[n], torch.stack([t[n] for t in thetas]).mean(0), rtol=0, atol=1e-6)


def test_layer_wise_coefficients_act_per_tensor_and_integer_buffers_are_kept():
    theta0, thetas = _states(k=2)
    theta0 = {**theta0, "steps": torch.tensor(7)}
    taus = [task_vector(theta0, {**t, "steps": torch.tensor(9)}) for t in thetas]
    assert set(taus[0]) == {"w", "b"}  # integer buffers are not part of a task vector
    lam = torch.tensor([[1.0, 0.0], [0.0, 0.5]])  # rows in the order of theta0's floating keys: w, b
    merged = apply_task_vectors(theta0, taus, lam)
    torch.testing.assert_close(merged["w"], thetas[0]["w"])
    torch.testing.assert_close(merged["b"], theta0["b"] + 0.5 * taus[1]["b"])
    assert merged["steps"] == 7
    with pytest.raises(ValueError, match="shape"):
        apply_task_vectors(theta0, taus, torch.ones(3, 2))


# ## TIES-Merging on hand-made vectors


def test_trim_keeps_entries_at_or_above_the_official_threshold():
    row = torch.tensor([0.1, -0.5, 0.3, -0.05, 0.9, 0.2, -0.7, 0.01, 0.4, -0.6])
    # D = 10, keep 20 %: k = 2, threshold = 8th smallest magnitude = 0.6 -> keeps 0.9, -0.7, -0.6 (k + 1 entries)
    expected = torch.tensor([0, 0, 0, 0, 0.9, 0, -0.7, 0, 0, -0.6])
    assert torch.equal(ties_trim(row, 0.2), expected)
    assert torch.equal(ties_trim(row.unsqueeze(0), 0.2), expected.unsqueeze(0))  # trimmed per row
    assert torch.equal(ties_trim(row, 1.0), row)
    with pytest.raises(ValueError, match="keep"):
        ties_trim(row, 0.0)


def test_sign_election_is_by_mass_and_zero_sums_take_the_majority_sign():
    trimmed = torch.tensor([
        [-5.0, 1.0, -2.0, 0.0, 1.0],
        [1.0, 2.0, 1.0, 0.0, -1.0],
        [1.0, -1.0, 3.0, 0.0, 0.0],
    ])
    # column sums: -3 (two positives outvoted by mass), 2, 2, 0, 0 -> signs -1, +1, +1, then the majority (+1)
    sign = ties_elect_sign(trimmed)
    assert torch.equal(sign, torch.tensor([-1.0, 1.0, 1.0, 1.0, 1.0]))
    selected = ties_disjoint(trimmed, sign)
    assert torch.equal(selected, torch.tensor([
        [-5.0, 1.0, 0.0, 0.0, 1.0],
        [0.0, 2.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 3.0, 0.0, 0.0],
    ]))


def test_ties_merging_sum_and_mean_on_a_hand_made_example():
    theta0 = {"w": torch.zeros(4)}
    taus = [{"w": torch.tensor(v)} for v in ([1.0, -2.0, 0.0, 1.0], [2.0, 1.0, 0.0, -1.0], [-1.0, 3.0, 0.0, 0.0])]
    # no trimming (keep = 1); signs (+, +, 0 -> majority +, 0 -> +); kept: [1,0,0,1], [2,1,0,0], [0,3,0,0]
    assert torch.equal(ties_merging(theta0, taus, keep=1.0, scaling=1.0, merge="sum")["w"], torch.tensor([3.0, 4.0, 0.0, 1.0]))
    assert torch.equal(ties_merging(theta0, taus, keep=1.0, scaling=1.0, merge="mean")["w"], torch.tensor([1.5, 2.0, 0.0, 1.0]))
    assert torch.equal(ties_merging(theta0, taus, keep=1.0, scaling=0.5)["w"], torch.tensor([1.5, 2.0, 0.0, 0.5]))
    selected = ties_task_vectors(taus, keep=1.0)  # AdaMerging++'s per-task vectors, before the sum
    assert torch.equal(selected[1]["w"], torch.tensor([2.0, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="merge"):
        ties_merging(theta0, taus, merge="max")


def test_trimming_is_global_over_all_tensors_of_a_task_vector():
    tv = {"a": torch.tensor([0.1, 5.0]), "b": torch.tensor([[4.0, -0.2], [0.3, 0.05]])}
    flat, keys = flatten([tv])
    assert keys == ["a", "b"] and flat.shape == (1, 6)
    out = ties_task_vectors([tv], keep=0.2)[0]  # D = 6, k = 1: keeps magnitudes >= 5th smallest (4.0)
    assert torch.equal(out["a"], torch.tensor([0.0, 5.0])) and torch.equal(out["b"], torch.tensor([[4.0, 0.0], [0.0, 0.0]]))


# ## AdaMerging


class _Tiny(nn.Module):
    """A two-layer encoder without batch statistics."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _merger(granularity="layer", init=0.3, k=2, seed=0):
    torch.manual_seed(seed)
    enc = _Tiny().double()
    theta0 = {n: v.detach().clone() for n, v in enc.state_dict().items()}
    taus = [{n: 0.5 * torch.randn_like(v) for n, v in theta0.items()} for _ in range(k)]
    heads = [nn.Linear(2, c).double() for c in (3, 2, 4)[:k]]
    cfg = AdaMergingConfig(granularity=granularity, init=init)
    return AdaMerging(enc, theta0, taus, heads, cfg), theta0, taus, heads


def _batches(k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2)] for _ in range(k)]


def test_merged_parameters_are_task_arithmetic_at_the_initial_coefficients():
    merger, theta0, taus, _ = _merger("task", init=0.3)
    expected = task_arithmetic(theta0, taus, 0.3)
    for n, v in merger.merged_parameters().items():
        torch.testing.assert_close(v, expected[n])
    zero, theta0, _, _ = _merger("layer", init=0.0)
    for n, v in zero.merged_parameters().items():
        assert torch.equal(v, theta0[n])  # lambda = 0 gives theta_0


def test_entropy_loss_is_the_sum_over_tasks_and_batches_of_mean_entropies():
    merger, theta0, taus, heads = _merger("layer")
    batches = _batches()
    enc = _Tiny().double()
    enc.load_state_dict(task_arithmetic(theta0, taus, 0.3))
    expected = sum(entropy_from_logits(heads[k](enc(b)), reduction="mean") for k, task in enumerate(batches) for b in task)
    torch.testing.assert_close(merger.entropy_loss(batches), expected)


def test_global_coefficient_is_task_arithmetic_with_one_learnable_lambda():
    merger, theta0, taus, _ = _merger("global", k=2)
    assert merger.lambdas_raw.shape == (1, 1)
    with torch.no_grad():
        merger.lambdas_raw.fill_(0.45)
    torch.testing.assert_close(merger.coefficients(), torch.full((1, 2), 0.45, dtype=torch.float64))
    expected = task_arithmetic(theta0, taus, 0.45)
    for n, v in merger.merged_parameters().items():
        torch.testing.assert_close(v, expected[n])
    inputs = [torch.randn(40, 3, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in range(2)]
    fit_adamerging(merger, inputs, torch.Generator().manual_seed(0), iterations=range(1))
    # one Adam step moves the single coefficient by lr, and every task keeps the same coefficient
    torch.testing.assert_close((merger.lambdas_raw.detach() - 0.45).abs(), torch.full((1, 1), 1e-3, dtype=torch.float64), rtol=0, atol=1e-7)
    lam = merger.coefficients()
    assert torch.equal(lam[0, 0].expand(2), lam[0])


@pytest.mark.parametrize("granularity", ["global", "task", "layer"])
def test_gradient_wrt_lambda_equals_a_finite_difference(granularity):
    merger, _, _, _ = _merger(granularity)
    with torch.no_grad():  # distinct coefficients strictly inside (0, 1)
        merger.lambdas_raw.copy_(torch.linspace(0.2, 0.8, merger.lambdas_raw.numel(), dtype=torch.float64).view_as(merger.lambdas_raw))
    batches = _batches()
    merger.lambdas_raw.grad = None
    merger.entropy_loss(batches).backward()
    analytic = merger.lambdas_raw.grad.clone()
    numeric = torch.zeros_like(analytic)
    eps = 1e-6
    for idx in range(analytic.numel()):
        with torch.no_grad():
            flat = merger.lambdas_raw.view(-1)
            flat[idx] += eps
            up = merger.entropy_loss(batches)
            flat[idx] -= 2 * eps
            down = merger.entropy_loss(batches)
            flat[idx] += eps
        numeric.view(-1)[idx] = (up - down) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)
    assert analytic.abs().min() > 0


def test_clamped_coefficients_get_no_gradient():
    merger, _, _, _ = _merger("task")
    with torch.no_grad():
        merger.lambdas_raw.copy_(torch.tensor([[1.4, -0.2]], dtype=torch.float64))
    merger.entropy_loss(_batches()).backward()
    assert torch.equal(merger.lambdas_raw.grad, torch.zeros(1, 2, dtype=torch.float64))
    assert torch.equal(merger.coefficients(), torch.tensor([[1.0, 0.0]], dtype=torch.float64))


def test_first_adam_step_moves_every_coefficient_by_lr_against_its_gradient_sign():
    merger, _, _, _ = _merger("layer")
    inputs = [torch.randn(40, 3, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in range(2)]
    losses = fit_adamerging(merger, inputs, torch.Generator().manual_seed(0), iterations=range(1))
    assert len(losses) == 1
    step = merger.lambdas_raw.detach() - 0.3
    # Adam's first update is -lr * g / (|g| + eps): every coefficient moves by (almost exactly) lr = 1e-3
    torch.testing.assert_close(step.abs(), torch.full_like(step, 1e-3), rtol=0, atol=1e-7)


def test_config_and_shapes_are_validated():
    with pytest.raises(ValueError, match="granularity"):
        AdaMergingConfig(granularity="block")
    with pytest.raises(ValueError, match="init"):
        AdaMergingConfig(init=1.5)
    merger, theta0, taus, heads = _merger("layer", k=2)
    assert merger.coefficients().shape == (len(theta0), 2)
    with pytest.raises(ValueError, match="head"):
        AdaMerging(_Tiny().double(), theta0, taus, heads[:1])
    with pytest.raises(ValueError, match="tasks"):
        merger.entropy_loss(_batches(k=1))


def test_finetuned_encoder_is_finetune_encoder_under_the_linear_probe_head():
    from shared.merging.digits_tasks import (
        TASKS,
        FinetuneConfig,
        encoder_of,
        finetune_encoder,
        finetuned_encoder,
        linear_probe_head,
        task_data,
    )
    from shared.models.training import SourceConfig, source_model

    config = FinetuneConfig(task="parity", width=8, epochs=1, seed=2)
    encoder0 = encoder_of(source_model(SourceConfig(norm="gn", width=8)))
    data = task_data(TASKS[1])
    head = linear_probe_head(encoder0, data.clean_train_x, data.train_y, 2)
    by_hand = finetune_encoder(encoder0, head, data.train_x, data.train_y, epochs=1, seed=2)
    cached = finetuned_encoder(config, use_cache=False)
    assert set(cached.state_dict()) == set(by_hand.state_dict())
    for name, value in by_hand.state_dict().items():
        assert torch.equal(cached.state_dict()[name], value), name
    with pytest.raises(ValueError, match="unknown task"):
        finetuned_encoder(FinetuneConfig(task="colour"), use_cache=False)
