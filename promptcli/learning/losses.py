"""Training losses for (possibly noisy) labels, each a small module with its maths in view.

Notation: ``logits`` (B, C), integer ``targets`` (B,), ``p = softmax(logits)``, ``p_y`` the probability
of the given label. Every loss returns the batch mean and computes in float32 (also under autocast).

- ``ce``   cross-entropy  -sum_k t_k log p_k, t = one-hot smoothed by ``label_smoothing`` (eps):
           t = (1 - eps) e_y + eps / C.
- ``gce``  generalized cross-entropy (Zhang & Sabuncu 2018)  (1 - p_y^q) / q, q in (0, 1];
           q -> 0 gives CE (-log p_y), q = 1 gives the MAE below.
- ``mae``  mean absolute error  1/2 ||p - e_y||_1 = 1 - p_y (as in the robust-loss literature's code).
- ``sce``  symmetric cross-entropy (Wang et al. 2019)  alpha * CE + beta * RCE with the reverse CE
           RCE = -sum_k p_k log e_y[k], log 0 clipped to A = -4, i.e. RCE = -A (1 - p_y) = 4 (1 - p_y).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptcli.errors import InputError


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits.float(), dim=-1)


def _p_y(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _probs(logits).gather(1, targets.view(-1, 1)).squeeze(1)


def soft_targets(targets: torch.Tensor, n_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets mixed with the uniform distribution: (1 - eps) e_y + eps / C."""
    one_hot = F.one_hot(targets, n_classes).float()
    return one_hot * (1.0 - label_smoothing) + label_smoothing / n_classes


class CrossEntropy(nn.Module):
    """-sum_k t_k log p_k with label-smoothed targets t."""

    name = "ce"
    smooths = True  # takes --label-smoothing
    takes: tuple[str, ...] = ()  # its own options besides --label-smoothing (TuneOptions fields)

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    @classmethod
    def from_options(cls, *, label_smoothing: float, **_: float) -> CrossEntropy:
        return cls(label_smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1)
        t = soft_targets(targets, logits.shape[-1], self.label_smoothing)
        return -(t * log_p).sum(dim=-1).mean()

    def params(self) -> dict[str, float]:
        return {"label_smoothing": self.label_smoothing}


class GeneralizedCrossEntropy(nn.Module):
    """(1 - p_y^q) / q: CE's gradient weighted by p_y^q, so confidently-wrong (noisy) labels pull less."""

    name = "gce"
    smooths = False
    takes = ("q",)

    def __init__(self, q: float = 0.7) -> None:
        super().__init__()
        self.q = q

    @classmethod
    def from_options(cls, *, q: float, **_: float) -> GeneralizedCrossEntropy:
        if not 0.0 < q <= 1.0:
            raise InputError(f"q must be in (0, 1], got {q}", where="--q", hint="the usual value is 0.7")
        return cls(q)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p_y = _p_y(logits, targets).clamp_min(1e-12)
        return ((1.0 - p_y.pow(self.q)) / self.q).mean()

    def params(self) -> dict[str, float]:
        return {"q": self.q}


class MeanAbsoluteError(nn.Module):
    """1/2 ||p - e_y||_1 = 1 - p_y: bounded, symmetric, hence noise-tolerant but slow to fit."""

    name = "mae"
    smooths = False
    takes: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, **_: float) -> MeanAbsoluteError:
        return cls()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (1.0 - _p_y(logits, targets)).mean()

    def params(self) -> dict[str, float]:
        return {}


class SymmetricCrossEntropy(nn.Module):
    """alpha * CE + beta * RCE, RCE = -sum_k p_k log(e_y[k]) with log 0 := A (= -4), i.e. -A (1 - p_y)."""

    name = "sce"
    smooths = True
    takes = ("alpha", "beta")
    A = -4.0  # the paper's; its authors' code clamps the one-hot target at 1e-4: A = ln(1e-4), beta x 2.3

    def __init__(self, alpha: float = 0.1, beta: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.ce = CrossEntropy(label_smoothing)

    @classmethod
    def from_options(
        cls, *, alpha: float, beta: float, label_smoothing: float, **_: float
    ) -> SymmetricCrossEntropy:
        if alpha < 0 or beta < 0 or alpha + beta == 0:
            raise InputError(
                f"alpha and beta must be >= 0 and not both 0 (got {alpha}, {beta})",
                where="--alpha/--beta",
                hint="SCE's paper uses --alpha 0.1 --beta 1",
            )
        return cls(alpha, beta, label_smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p = _probs(logits)
        log_label = torch.full_like(p, self.A).scatter(1, targets.view(-1, 1), 0.0)  # log e_y, clipped
        rce = -(p * log_label).sum(dim=-1).mean()
        return self.alpha * self.ce(logits, targets) + self.beta * rce

    def params(self) -> dict[str, float]:
        return {"alpha": self.alpha, "beta": self.beta, "A": self.A, **self.ce.params()}


# --loss NAME -> its class. Adding a loss: a class above (name, smooths, takes, from_options, forward, params),
# one line here and its value in promptcli.choices.Loss (a test checks the two agree).
LOSSES: dict[str, type[nn.Module]] = {
    "ce": CrossEntropy,
    "gce": GeneralizedCrossEntropy,
    "mae": MeanAbsoluteError,
    "sce": SymmetricCrossEntropy,
}


def make_loss(
    name: str = "ce", *, q: float = 0.7, alpha: float = 0.1, beta: float = 1.0, label_smoothing: float = 0.0
) -> nn.Module:
    """The loss named by ``--loss``, validating its parameters."""
    if name not in LOSSES:
        raise InputError(f"unknown loss {name!r}", where="--loss", hint="use one of: " + ", ".join(LOSSES))
    if not 0.0 <= label_smoothing < 1.0:
        raise InputError(
            f"label smoothing must be in [0, 1), got {label_smoothing}",
            where="--label-smoothing",
            hint="e.g. 0.1, or 0 for none",
        )
    loss = LOSSES[name]
    if label_smoothing and not loss.smooths:
        smoothing = ", ".join(n for n, c in LOSSES.items() if c.smooths)
        raise InputError(
            f"--label-smoothing applies to {smoothing.replace(', ', ' and ')}, not {name}",
            where="--label-smoothing",
            hint=f"drop it, or use --loss {smoothing.replace(', ', '/')}",
        )
    return loss.from_options(q=q, alpha=alpha, beta=beta, label_smoothing=label_smoothing)


LOSS_OPTIONS = ("q", "alpha", "beta")  # the options some loss takes (besides --label-smoothing)


def ignored_loss_options(name: str, given: set[str]) -> list[str]:
    """The loss options in ``given`` (those changed from their defaults) that loss ``name`` does not take."""
    takes = getattr(LOSSES.get(name), "takes", ())
    return [option for option in LOSS_OPTIONS if option in given and option not in takes]


def loss_params(loss: nn.Module) -> dict[str, Any]:
    """The loss name and parameters, for metadata."""
    return {"name": loss.name, **loss.params()}
