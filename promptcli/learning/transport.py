"""Entropic optimal transport (Sinkhorn, log domain) and the clean/noisy split it gives.

The split follows NLPrompt: transport the N training images (uniform mass 1/N each) onto the C
classes (balanced mass 1/C each) at cost ``-logits`` (``logit_scale x`` cosine similarity between
image and class text features). A sample is *clean* when the class it sends most of its mass to
is its given label. ``-logits`` and ``-log softmax(logits)`` differ by a per-row constant, which the
row potentials absorb, so both costs give the same plan.

``epsilon`` is the entropic regularisation in logit units: as it goes to 0 the plan approaches the
exact balanced assignment (each class gets N/C samples); at 1 each row of the plan is the softmax
of the logits with a per-class bias that balances the classes. Iterations run in the log domain
(float64), so small ``epsilon`` neither underflows nor overflows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from promptcli.learning.options import DEFAULT_EPSILON, DEFAULT_ITERATIONS

DEFAULT_TOLERANCE = 1e-9
STAGE_ITERATIONS = 100  # at most, per intermediate epsilon of the annealing schedule
STAGE_TOLERANCE = 1e-6


@dataclass
class SinkhornResult:
    """A transport plan and how well it meets its marginals."""

    log_plan: torch.Tensor  # (N, C) float64, log of the plan
    iterations: int  # iterations run, all epsilon stages together
    marginal_error: float  # max |row sum - a| (column sums are exact after the last update)

    @property
    def plan(self) -> torch.Tensor:
        return self.log_plan.exp()


def sinkhorn_log(
    cost: torch.Tensor,
    row_marginal: torch.Tensor | None = None,
    col_marginal: torch.Tensor | None = None,
    *,
    epsilon: float = DEFAULT_EPSILON,
    n_iter: int = DEFAULT_ITERATIONS,
    tol: float = DEFAULT_TOLERANCE,
) -> SinkhornResult:
    """Entropic OT ``min <P, cost> - epsilon H(P)`` s.t. ``P 1 = a``, ``P^T 1 = b``, in the log domain.

    ``a`` defaults to uniform 1/N, ``b`` to uniform 1/C; both must sum to the same total (1).
    Epsilon anneals from the cost's spread, halving, to ``epsilon`` (at most 100 iterations per
    intermediate stage); at ``epsilon`` it stops once every row sum is within ``tol`` of ``a``, or
    after ``n_iter`` iterations.
    """
    if cost.dim() != 2 or cost.shape[0] == 0 or cost.shape[1] == 0:
        raise ValueError(f"cost must be a non-empty (N, C) matrix, got shape {tuple(cost.shape)}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    n, c = cost.shape
    cost = cost.detach().double()
    a = _marginal(row_marginal, n, cost.device, "row")
    b = _marginal(col_marginal, c, cost.device, "column")
    if not math.isclose(float(a.sum()), float(b.sum()), rel_tol=1e-6):
        raise ValueError(f"marginals have different totals ({float(a.sum())} vs {float(b.sum())})")
    log_a, log_b = a.log(), b.log()
    # Potentials f, g (in cost units) do not depend on epsilon at convergence, so they carry over as
    # epsilon anneals from the cost's spread down to its target (epsilon scaling): at small epsilon,
    # plain Sinkhorn from zero potentials needs orders of magnitude more iterations.
    f = torch.zeros(n, dtype=torch.float64, device=cost.device)
    g = torch.zeros(c, dtype=torch.float64, device=cost.device)
    schedule = []
    eps = float(cost.max() - cost.min())
    while eps > epsilon:
        schedule.append(eps)
        eps /= 2
    schedule.append(epsilon)
    iterations, error = 0, float("inf")
    for stage, eps in enumerate(schedule):
        final = stage == len(schedule) - 1
        stage_iterations = 0
        while True:
            # s gives both the row update (f = -eps s) and the current plan's row sums a exp(f/eps + s)
            s = torch.logsumexp(log_b[None, :] + (g[None, :] - cost) / eps, dim=1)
            if stage_iterations:  # columns match b exactly after a column update; rows may be off
                error = float((log_a + f / eps + s).exp().sub(a).abs().max())
                if final and (error <= tol or stage_iterations >= n_iter):
                    break
                if not final and (error <= STAGE_TOLERANCE or stage_iterations >= STAGE_ITERATIONS):
                    break
            f = -eps * s
            g = -eps * torch.logsumexp(log_a[:, None] + (f[:, None] - cost) / eps, dim=0)
            iterations += 1
            stage_iterations += 1
    log_plan = log_a[:, None] + log_b[None, :] + (f[:, None] + g[None, :] - cost) / epsilon
    return SinkhornResult(log_plan, iterations, error)


def _marginal(m: torch.Tensor | None, size: int, device: torch.device, what: str) -> torch.Tensor:
    if m is None:
        return torch.full((size,), 1.0 / size, dtype=torch.float64, device=device)
    m = torch.as_tensor(m, dtype=torch.float64, device=device)
    if m.shape != (size,) or not bool((m > 0).all()):
        raise ValueError(f"{what} marginal must be {size} positive numbers")
    return m


def ot_assign(
    logits: torch.Tensor,
    *,
    epsilon: float = DEFAULT_EPSILON,
    n_iter: int = DEFAULT_ITERATIONS,
    class_marginal: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SinkhornResult]:
    """Class of each sample under the OT plan from (N, C) ``logits`` (uniform samples, balanced classes).

    Returns the (N,) int64 assignment (argmax of each plan row) and the Sinkhorn result.
    """
    result = sinkhorn_log(-logits, None, class_marginal, epsilon=epsilon, n_iter=n_iter)
    return result.log_plan.argmax(dim=1).to(logits.device), result


def ot_clean_mask_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    epsilon: float = DEFAULT_EPSILON,
    n_iter: int = DEFAULT_ITERATIONS,
) -> torch.Tensor:
    """(N,) bool: True where the OT assignment of ``logits`` agrees with ``labels``."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows but {labels.shape[0]} labels")
    assignment, _ = ot_assign(logits, epsilon=epsilon, n_iter=n_iter)
    return assignment == labels.to(assignment.device)


@torch.no_grad()
def ot_clean_mask(
    image_features: torch.Tensor,
    class_text_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
    epsilon: float = DEFAULT_EPSILON,
    n_iter: int = DEFAULT_ITERATIONS,
) -> torch.Tensor:
    """(N,) bool on ``labels``' device: samples whose OT class (features -> class texts) is their label.

    ``image_features`` (N, D) and ``class_text_features`` (C, D) are L2-normalised here, so the cost
    is ``-logit_scale x`` cosine similarity; sample mass is uniform, class mass balanced (1/C).
    """
    x = image_features.detach().double()
    t = class_text_features.detach().double().to(x.device)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    t = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    logits = float(logit_scale) * x @ t.t()
    mask = ot_clean_mask_from_logits(logits, labels.to(x.device), epsilon=epsilon, n_iter=n_iter)
    return mask.to(labels.device)


def split_quality(clean_mask: torch.Tensor, is_noisy: torch.Tensor) -> dict[str, float | int | None]:
    """How well a clean/noisy split matches the truth: precision and recall of the *clean* side.

    precision = truly clean among those judged clean; recall = judged clean among the truly clean
    (None when undefined). Also the counts, for a per-epoch log row.
    """
    clean_mask = clean_mask.bool().cpu()
    truly_clean = ~is_noisy.bool().cpu()
    judged = int(clean_mask.sum())
    tp = int((clean_mask & truly_clean).sum())
    n_clean = int(truly_clean.sum())
    return {
        "n_judged_clean": judged,
        "n_truly_clean": n_clean,
        "clean_precision": tp / judged if judged else None,
        "clean_recall": tp / n_clean if n_clean else None,
    }
