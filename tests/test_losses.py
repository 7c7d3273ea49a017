"""The robust losses against their closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from promptcli.errors import InputError
from promptcli.learning.losses import (
    CrossEntropy,
    GeneralizedCrossEntropy,
    MeanAbsoluteError,
    SymmetricCrossEntropy,
    make_loss,
)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 5, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 5, (12,), generator=g)
    p_y = torch.softmax(logits, dim=-1)[torch.arange(12), targets]
    return logits, targets, p_y


def test_gce_closed_form(batch):
    logits, targets, p_y = batch
    for q in (0.1, 0.5, 0.7):
        got = GeneralizedCrossEntropy(q)(logits, targets)
        assert got.item() == pytest.approx(((1 - p_y**q) / q).mean().item(), rel=1e-6)


def test_gce_tends_to_ce_as_q_goes_to_zero(batch):
    logits, targets, _ = batch
    ce = F.cross_entropy(logits, targets).item()
    gaps = [abs(GeneralizedCrossEntropy(q)(logits, targets).item() - ce) for q in (1e-1, 1e-2, 1e-3)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-2 * ce


def test_gce_at_q_one_is_mae(batch):
    logits, targets, p_y = batch
    gce = GeneralizedCrossEntropy(1.0)(logits, targets).item()
    mae = MeanAbsoluteError()(logits, targets).item()
    assert gce == pytest.approx(mae, rel=1e-6)
    assert mae == pytest.approx((1 - p_y).mean().item(), rel=1e-6)
    # MAE is half the L1 distance between p and the one-hot label
    p = torch.softmax(logits, dim=-1)
    l1 = (p - F.one_hot(targets, 5)).abs().sum(dim=-1).mean().item()
    assert mae == pytest.approx(l1 / 2, rel=1e-5)


def test_ce_matches_torch_with_and_without_smoothing(batch):
    logits, targets, _ = batch
    for eps in (0.0, 0.1, 0.3):
        got = CrossEntropy(eps)(logits, targets).item()
        assert got == pytest.approx(F.cross_entropy(logits, targets, label_smoothing=eps).item(), rel=1e-6)


def test_label_smoothing_closed_form(batch):
    logits, targets, _ = batch
    eps, c = 0.2, logits.shape[1]
    log_p = torch.log_softmax(logits, dim=-1)
    nll = -log_p[torch.arange(len(targets)), targets]
    expected = ((1 - eps) * nll - eps / c * log_p.sum(dim=-1)).mean()
    assert CrossEntropy(eps)(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_sce_closed_form(batch):
    logits, targets, p_y = batch
    alpha, beta = 0.3, 1.7
    ce = F.cross_entropy(logits, targets)
    expected = alpha * ce + beta * 4.0 * (1 - p_y).mean()
    got = SymmetricCrossEntropy(alpha, beta)(logits, targets)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # the reverse term alone, from its definition -sum_k p_k log(clip(onehot, e^-4))
    p = torch.softmax(logits, dim=-1)
    clipped = F.one_hot(targets, 5).double().clamp_min(math.exp(-4))
    rce = -(p * clipped.log()).sum(dim=-1).mean()
    assert SymmetricCrossEntropy(0.0, 1.0)(logits, targets).item() == pytest.approx(rce.item(), rel=1e-6)


def test_losses_compute_in_float32_from_half_logits(batch):
    logits, targets, _ = batch
    for loss in (CrossEntropy(), GeneralizedCrossEntropy(), MeanAbsoluteError(), SymmetricCrossEntropy()):
        assert loss(logits.half(), targets).dtype == torch.float32


def test_gce_gradient_is_ce_gradient_weighted_by_p_y_to_the_q(batch):
    logits, targets, p_y = batch
    q = 0.7
    a = logits.clone().requires_grad_(True)
    GeneralizedCrossEntropy(q)(a, targets).backward()
    b = logits.clone().requires_grad_(True)
    (F.cross_entropy(b, targets, reduction="none") * p_y.pow(q)).mean().backward()
    assert torch.allclose(a.grad.double(), b.grad, atol=1e-6)


def test_make_loss_validation():
    assert isinstance(make_loss("gce", q=0.5), GeneralizedCrossEntropy)
    assert make_loss("sce", alpha=0.2, beta=0.5, label_smoothing=0.1).params() == {
        "alpha": 0.2,
        "beta": 0.5,
        "A": -4.0,
        "label_smoothing": 0.1,
    }
    with pytest.raises(InputError, match="unknown loss"):
        make_loss("focal")
    with pytest.raises(InputError, match="q must be in"):
        make_loss("gce", q=0.0)
    with pytest.raises(InputError, match="applies to ce and sce"):
        make_loss("mae", label_smoothing=0.1)
    with pytest.raises(InputError, match="label smoothing must be"):
        make_loss("ce", label_smoothing=1.0)


def test_the_loss_registry_and_the_loss_choices_agree():
    from promptcli.choices import Loss
    from promptcli.learning.losses import LOSSES

    assert set(LOSSES) == set(Loss.values())
    assert all(cls.name == name for name, cls in LOSSES.items())
