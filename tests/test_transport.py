"""Sinkhorn OT: marginals, convergence to the exact balanced assignment, the clean/noisy split."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from promptcli.learning.transport import (
    STAGE_ITERATIONS,
    ot_assign,
    ot_clean_mask,
    ot_clean_mask_from_logits,
    sinkhorn_log,
    split_quality,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(cost: np.ndarray, per_class: int) -> tuple[float, tuple[int, ...], float]:
    """Exact balanced OT by enumeration: (optimal cost, its assignment, gap to the second best).

    With n = C x k samples of mass 1/n and classes of mass 1/C, the LP's vertices are the
    assignments giving every class exactly k samples (Birkhoff), so enumerating them is exact.
    """
    n, c = cost.shape
    slots = [j for j in range(c) for _ in range(per_class)]
    values = sorted((cost[np.arange(n), list(a)].sum() / n, a) for a in set(itertools.permutations(slots)))
    return values[0][0], values[0][1], values[1][0] - values[0][0]


@pytest.mark.parametrize(
    ("n_classes", "per_class", "seed"), [(2, 3, 0), (3, 2, 1), (2, 4, 2), (4, 2, 3), (3, 3, 4)]
)
def test_small_epsilon_plan_is_the_exact_assignment(n_classes, per_class, seed):
    rng = np.random.default_rng(seed)
    n = n_classes * per_class
    cost = rng.uniform(0, 1, size=(n, n_classes))
    best, assignment, gap = brute_force(cost, per_class)
    assert gap > 1e-4  # a unique optimum, else "the" assignment is not defined
    epsilon = gap / 5
    result = sinkhorn_log(torch.from_numpy(cost), epsilon=epsilon, n_iter=2000, tol=1e-12)
    plan = result.plan.numpy()
    assert result.marginal_error < 1e-6
    np.testing.assert_allclose(plan.sum(axis=1), np.full(n, 1 / n), atol=result.marginal_error * 1.01)
    np.testing.assert_allclose(plan.sum(axis=0), np.full(n_classes, 1 / n_classes), atol=1e-12)
    assert tuple(plan.argmax(axis=1)) == assignment
    exact = np.zeros_like(plan)
    exact[np.arange(n), list(assignment)] = 1.0 / n
    assert np.abs(plan - exact).max() < 0.01 / n
    # entropic bound: OT <= <C, P_eps> <= OT + eps log C (the lower end loosened by how far the
    # rows are from feasible: costs lie in [0, 1])
    transport = float((plan * cost).sum())
    slack = n * result.marginal_error + 1e-12
    assert best - slack <= transport <= best + epsilon * math.log(n_classes) + slack
    labels, _ = ot_assign(-torch.from_numpy(cost), epsilon=epsilon, n_iter=2000)
    assert tuple(labels.tolist()) == assignment


@pytest.mark.parametrize("epsilon", [0.05, 0.5, 5.0])
def test_entropic_plan_respects_marginals_and_bound(epsilon):
    rng = np.random.default_rng(7)
    cost = rng.uniform(0, 1, size=(6, 3))
    best, _, _ = brute_force(cost, 2)
    plan = sinkhorn_log(torch.from_numpy(cost), epsilon=epsilon, n_iter=5000, tol=1e-12).plan.numpy()
    np.testing.assert_allclose(plan.sum(axis=1), np.full(6, 1 / 6), atol=1e-10)
    np.testing.assert_allclose(plan.sum(axis=0), np.full(3, 1 / 3), atol=1e-12)
    transport = float((plan * cost).sum())
    assert best - 1e-9 <= transport <= best + epsilon * math.log(3) + 1e-9


def test_custom_marginals_and_large_epsilon_limit():
    rng = np.random.default_rng(3)
    cost = torch.from_numpy(rng.normal(size=(5, 4)))
    a = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    b = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    plan = sinkhorn_log(cost, a, b, epsilon=0.3, n_iter=5000, tol=1e-12).plan
    torch.testing.assert_close(plan.sum(1), a, atol=1e-11, rtol=0)
    torch.testing.assert_close(plan.sum(0), b, atol=1e-12, rtol=0)
    # epsilon -> infinity: the entropy term wins, the plan is the independent coupling a b^T
    plan = sinkhorn_log(cost, a, b, epsilon=1e6, n_iter=100).plan
    torch.testing.assert_close(plan, a[:, None] * b[None, :], atol=1e-6, rtol=0)


def test_log_domain_is_stable_at_tiny_epsilon():
    """logit scale 100 on cosines, epsilon 1e-3: exp(-cost/eps) would overflow a plain Sinkhorn."""
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 16), dim=1)
    t = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    cost = -100 * x @ t.t()
    result = sinkhorn_log(cost, epsilon=1e-3, n_iter=500)
    assert torch.isfinite(result.log_plan.exp()).all()
    # the annealing schedule halves epsilon from the cost's spread, at most 100 iterations a stage
    stages = math.ceil(math.log2(float(cost.max() - cost.min()) / 1e-3))
    assert result.iterations <= stages * STAGE_ITERATIONS + 500
    torch.testing.assert_close(result.plan.sum(0), torch.full((4,), 0.25, dtype=torch.float64))
    counts = torch.bincount(result.log_plan.argmax(1), minlength=4)
    assert counts.tolist() == [10, 10, 10, 10]  # a near-hard plan: balanced hard assignment


def test_balance_overrides_a_shared_preference():
    """Every sample prefers class 0, but half must go to class 1: those that mind least."""
    logits = torch.tensor([[3.0, 0.0], [3.0, 2.9], [3.0, 0.1], [3.0, 2.8]])
    labels = torch.tensor([0, 1, 0, 1])
    assert (logits.argmax(1) == labels).tolist() == [True, False, True, False]
    assert ot_clean_mask_from_logits(logits, labels, epsilon=0.01).tolist() == [True, True, True, True]


def test_ot_clean_mask_finds_flipped_labels():
    torch.manual_seed(1)
    classes, per_class, dim = 4, 10, 32
    text = torch.nn.functional.normalize(torch.randn(classes, dim), dim=1)
    truth = torch.arange(classes).repeat_interleave(per_class)
    images = text[truth] + 0.3 * torch.randn(len(truth), dim) / math.sqrt(dim)
    labels = truth.clone()
    flipped = torch.tensor([0, 11, 12, 25, 39])
    labels[flipped] = (labels[flipped] + 1) % classes
    mask = ot_clean_mask(images, text, labels, logit_scale=50.0)
    assert mask.dtype == torch.bool and mask.shape == labels.shape
    assert torch.equal(mask, labels == truth)
    # features need not be normalised: the cost is cosine similarity
    assert torch.equal(ot_clean_mask(3 * images, 0.5 * text, labels, logit_scale=50.0), mask)
    quality = split_quality(mask, labels != truth)
    assert quality == {"n_judged_clean": 35, "n_truly_clean": 35, "clean_precision": 1.0, "clean_recall": 1.0}


def test_split_quality_by_hand():
    judged_clean = torch.tensor([1, 1, 1, 0, 0, 1], dtype=torch.bool)
    is_noisy = torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool)
    # judged clean: rows 0,1,2,5; truly clean: rows 0,2,3,5 -> 3 right of 4 judged, 3 found of 4
    assert split_quality(judged_clean, is_noisy) == {
        "n_judged_clean": 4,
        "n_truly_clean": 4,
        "clean_precision": 0.75,
        "clean_recall": 0.75,
    }
    none = split_quality(torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool))
    assert none["clean_precision"] is None and none["clean_recall"] is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_log(torch.zeros(2, 2), epsilon=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        sinkhorn_log(torch.zeros(0, 2))
    with pytest.raises(ValueError, match="different totals"):
        sinkhorn_log(torch.zeros(2, 2), torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="3 logit rows but 2 labels"):
        ot_clean_mask_from_logits(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
