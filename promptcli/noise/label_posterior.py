"""Noise-aware posteriors over each labelled image's true class (``clean --score posterior``).

The model behind the score: image i has a true class k and a given label y_i that a symmetric
noise channel produced,

    P(y = k | k) = 1 - r,        P(y = j | k) = r / (C - 1)  for j != k,

so even at r = 0.75 with 10 classes the given label is 3x likelier to be the true class than any
other. The evidence for class k combines a prior classifier with the labelled set's own class
structure:

    evidence_i(k) = a * log p_prior(k | x_i) + s * cos(x_i - m, c_k^(-i))

where m is the mean feature of the labelled images and c_k^(-i) the q-weighted mean of the
*other* images' centred, normalised features (a class centroid built from the images currently
believed to be class k, leaving image i out so that its own label cannot vouch for itself). EM
alternates

    E:  q_i(k) = softmax_k(evidence_i(k) + log P(y_i | k))
    M:  c_k^(-i) from q;  r = 1 - mean_i q_i(y_i)

starting from the prior alone (no centroid term) and r = 0.5 (0.25 with two classes; or a rate the
user gives, then kept fixed), for a fixed number of rounds. The score of a row is ``1 - q_i(y_i)``:
the posterior probability that its label is wrong; ``argmax_k q_i(k)`` is the class a relabel uses.

The weights a (prior) and s (centroids) set how sharp each kind of evidence is. Fixed, they are
a = 1 and s = the model's logit scale. Fitted (:func:`fit_label_posterior`), they are the pair on a
grid that maximises the likelihood of the given labels under the model,

    L = sum_i log sum_k softmax_k(evidence_i)(k) P(y_i | k),

a leave-one-out likelihood (no row's evidence uses its own label), so it measures how well the
evidence predicts labels it has not seen. That holds only when the prior has not seen the labels
either: zero-shot CLIP, yes; a prompt tuned on these labels, no (it would vouch for the labels it
memorised, and L would reward trusting it).

Class-conditional noise (``noise_model="class"``): when wrong labels follow the classes' own
confusions, one rate r does not describe them. The M-step then also estimates the whole matrix
P(y = j | k) from the q-weighted counts of given labels per true class, with ``smoothing``
pseudo-rows per class of the symmetric channel at the current r, so that a class with little mass
stays near symmetric noise (:func:`class_transition`); the E-step uses it in place of the symmetric
channel. More parameters: it fits symmetric noise worse on small label sets, so it is not the
default.

Why the centroids help: under symmetric noise the wrong labels of a class are spread over all other
classes, so the images labelled k still lean towards class k's region of feature space; weighting
them by q sharpens that lean round by round, while the prior (zero-shot text or a tuned prompt)
breaks ties the labels cannot.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from promptcli.choices import NoiseModel

DEFAULT_ROUNDS = 10
INITIAL_RATE = 0.5
EMPTY_MASS = 1e-6  # a leave-one-out centroid with less posterior mass than this is empty
# Values per block of rows in an E-step: its temporaries are O(block x C), not O(N x C). 4M float64 values are
# 32 MB, 4,194 rows at 1,000 classes; a file that fits in one block (the demo's) is computed exactly as a
# whole-file step would be.
BLOCK_VALUES = 1 << 22


def em_blocks(n_rows: int, n_classes: int) -> list[slice]:
    """The blocks of rows an E-step over ``n_rows`` x ``n_classes`` works through (``BLOCK_VALUES`` each)."""
    block = max(1, BLOCK_VALUES // n_classes)
    return [slice(start, start + block) for start in range(0, n_rows, block)]


RATE_MARGIN = 1e-3  # keeps an estimated rate inside (0, (C-1)/C), where labels still carry signal
# The fitting grid: prior weights, and centroid weights as fractions of the logit scale.
FIT_PRIOR_WEIGHTS = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125)
FIT_CENTROID_FRACTIONS = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125)
FIT_GRID_SIZE = len(FIT_PRIOR_WEIGHTS) * len(FIT_CENTROID_FRACTIONS)
NOISE_MODELS = NoiseModel.values()
TRANSITION_SMOOTHING = 16.0  # pseudo-rows per true class pulling a class-conditional row to symmetric


@dataclass
class LabelPosterior:
    """EM result: per-row posteriors over the true class, the noise rate and evidence weights used."""

    posterior: torch.Tensor  # (N, C) float64, rows sum to 1
    noise_rate: float
    rate_estimated: bool
    rounds: int
    prior_weight: float
    centroid_scale: float
    log_likelihood: float  # of the given labels, see the module docstring
    fitted: bool = False
    grid: list[tuple[float, float, float]] = field(default_factory=list)  # (a, s, L) tried, when fitted
    noise_model: str = "symmetric"
    transition: torch.Tensor | None = None  # (C true, C given) P(y = j | k), the class-conditional model's


def max_noise_rate(n_classes: int) -> float:
    """Symmetric noise carries no label information at r = (C-1)/C; rates must stay below it."""
    return (n_classes - 1) / n_classes


def log_channel(labels: torch.Tensor, n_classes: int, rate: float) -> torch.Tensor:
    """(N, C) log P(y_i | true class k) of the symmetric noise channel with rate ``rate``."""
    off = math.log(max(rate, 1e-12) / (n_classes - 1))
    on = math.log(max(1.0 - rate, 1e-12))
    out = torch.full((len(labels), n_classes), off, dtype=torch.float64, device=labels.device)
    out[torch.arange(len(labels), device=labels.device), labels] = on
    return out


def class_transition(q: torch.Tensor, labels: torch.Tensor, rate: float, smoothing: float) -> torch.Tensor:
    """(C, C) class-conditional noise matrix P(y = j | true k) from posteriors q: the q-weighted
    counts of given labels per true class plus ``smoothing`` pseudo-rows of the symmetric channel at
    ``rate``, so a class with little posterior mass stays close to symmetric noise."""
    n_classes = q.shape[1]
    counts = torch.zeros(n_classes, n_classes, dtype=q.dtype, device=q.device)
    for rows in em_blocks(len(labels), n_classes):
        counts += q[rows].t() @ torch.nn.functional.one_hot(labels[rows], n_classes).to(q.dtype)
    symmetric = log_channel(torch.arange(n_classes, device=q.device), n_classes, rate).exp()
    return (counts + smoothing * symmetric) / (q.sum(dim=0)[:, None] + smoothing)


def centred_directions(features: torch.Tensor) -> torch.Tensor:
    """Features minus their mean, each row normalised (the space the class centroids live in)."""
    x = features.double()
    x = x - x.mean(dim=0, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class ClassSums:
    """What every row's leave-one-out centroids share: each class's q-weighted sum of all rows."""

    sums: torch.Tensor  # (C, D) S_k = sum_j q_jk d_j
    norm2: torch.Tensor  # (1, C) |S_k|^2
    mass: torch.Tensor  # (1, C) sum_j q_jk


def class_sums(directions: torch.Tensor, q: torch.Tensor) -> ClassSums:
    """Each class's q-weighted sum of the unit rows, its squared norm and its mass."""
    sums = q.t() @ directions
    return ClassSums(sums, (sums * sums).sum(dim=1)[None, :], q.sum(dim=0)[None, :])


def leave_one_out_cosine(
    directions: torch.Tensor, q: torch.Tensor, sums: ClassSums | None = None
) -> torch.Tensor:
    """(N, C) cosine between row i and class k's q-weighted centroid of all rows but i.

    With S_k = sum_j q_jk d_j and unit rows d_i, the centroid without row i is S_k - q_ik d_i, so
    cos = (d_i.S_k - q_ik) / |S_k - q_ik d_i| with |S_k - q_ik d_i|^2 = |S_k|^2 - 2 q_ik d_i.S_k + q_ik^2.
    A class with (almost) no mass besides row i has no centroid for it: cosine 0, no evidence
    (the expansion above would also lose all precision there). Given ``sums`` (:func:`class_sums`
    of the whole file), ``directions`` and ``q`` may be any block of its rows: memory is O(block x C).
    """
    if sums is None:
        sums = class_sums(directions, q)
    dot = directions @ sums.sums.t()  # (N, C)
    norm2 = sums.norm2 - 2 * q * dot + q * q
    rest = sums.mass - q  # each class's mass without row i
    cos = (dot - q) / norm2.clamp_min(1e-24).sqrt()
    return torch.where(rest > EMPTY_MASS, cos.clamp(-1.0, 1.0), torch.zeros_like(cos))


def label_posterior(
    features: torch.Tensor,
    labels: torch.Tensor,
    prior_log_probs: torch.Tensor,
    *,
    centroid_scale: float,
    prior_weight: float = 1.0,
    noise_rate: float | None = None,
    rounds: int = DEFAULT_ROUNDS,
    noise_model: str = "symmetric",
    smoothing: float = TRANSITION_SMOOTHING,
) -> LabelPosterior:
    """EM over the true classes of labelled images (see the module docstring).

    ``features`` (N, D) image features, ``labels`` (N,) given class indices, ``prior_log_probs``
    (N, C) log-probabilities of a prior classifier weighted by ``prior_weight``; ``centroid_scale``
    weights the centroid cosine (the model's logit scale, unfitted). ``noise_rate`` fixes r; None
    estimates it. ``noise_model="class"`` estimates a class-conditional noise matrix instead of
    using the symmetric one (``smoothing`` pseudo-rows per class of symmetric noise at r).
    """
    labels, prior, directions, limit = _checked(
        features, labels, prior_log_probs, noise_rate, noise_model, smoothing
    )
    return _em(
        directions,
        labels,
        prior,
        prior_weight,
        centroid_scale,
        noise_rate,
        rounds,
        limit,
        noise_model,
        smoothing,
    )


def fit_label_posterior(
    features: torch.Tensor,
    labels: torch.Tensor,
    prior_log_probs: torch.Tensor,
    scale: float,
    *,
    noise_rate: float | None = None,
    rounds: int = DEFAULT_ROUNDS,
    prior_weights: Sequence[float] = FIT_PRIOR_WEIGHTS,
    centroid_fractions: Sequence[float] = FIT_CENTROID_FRACTIONS,
    on_step: Callable[[], None] | None = None,
    noise_model: str = "symmetric",
    smoothing: float = TRANSITION_SMOOTHING,
) -> LabelPosterior:
    """:func:`label_posterior` at the (prior weight, centroid weight = fraction x ``scale``) pair of
    the grid whose result gives the given labels the highest likelihood (first of any ties).
    ``on_step()`` is called after each grid point (for progress bars)."""
    labels, prior, directions, limit = _checked(
        features, labels, prior_log_probs, noise_rate, noise_model, smoothing
    )
    best, grid = None, []
    for a, f in itertools.product(prior_weights, centroid_fractions):
        result = _em(
            directions, labels, prior, a, f * scale, noise_rate, rounds, limit, noise_model, smoothing
        )
        grid.append((a, f * scale, result.log_likelihood))
        if on_step is not None:
            on_step()
        if best is None or result.log_likelihood > best.log_likelihood:
            best = result
    if best is None:
        raise ValueError("the fitting grid is empty")
    best.fitted, best.grid = True, grid
    return best


def wrong_label_probability(result: LabelPosterior, labels: torch.Tensor) -> torch.Tensor:
    """(N,) the posterior probability that each given label is wrong: ``1 - q_i(y_i)``."""
    return 1.0 - result.posterior.gather(1, labels.long()[:, None])[:, 0]


def _checked(
    features: torch.Tensor,
    labels: torch.Tensor,
    prior_log_probs: torch.Tensor,
    noise_rate: float | None,
    noise_model: str,
    smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Validated labels (long), prior (float64), centred directions and the largest usable rate."""
    n, n_classes = prior_log_probs.shape
    if features.shape[0] != n or labels.shape[0] != n:
        raise ValueError(
            f"features {tuple(features.shape)}, labels {tuple(labels.shape)} and prior {(n, n_classes)} disagree"
        )
    if n_classes < 2:
        raise ValueError("need at least two classes")
    limit = max_noise_rate(n_classes)
    if noise_rate is not None and not 0.0 <= noise_rate < limit:
        raise ValueError(f"noise rate must be in [0, {limit:.4f}), got {noise_rate}")
    if noise_model not in NOISE_MODELS:
        raise ValueError(f"noise model must be one of {', '.join(NOISE_MODELS)}, got {noise_model!r}")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    return labels.long(), prior_log_probs.double(), centred_directions(features), limit


def _em(
    directions: torch.Tensor,
    labels: torch.Tensor,
    prior: torch.Tensor,
    prior_weight: float,
    scale: float,
    noise_rate: float | None,
    rounds: int,
    limit: float,
    noise_model: str = "symmetric",
    smoothing: float = TRANSITION_SMOOTHING,
) -> LabelPosterior:
    """One EM run at fixed evidence weights (the maths of the module docstring), a block of rows at a time:
    besides the prior it holds the posterior and the evidence as (N, C) arrays, and O(block x C) temporaries."""
    n, n_classes = prior.shape
    blocks = em_blocks(n, n_classes)
    prior = prior_weight * prior
    # two classes: 0.5 is the rate at which labels say nothing, so start halfway to it
    start = INITIAL_RATE if INITIAL_RATE < limit - RATE_MARGIN else limit / 2
    rate = start if noise_rate is None else noise_rate
    transition, log_transition = None, None  # the class-conditional model's, from the first M-step on

    def channel(rows: slice) -> torch.Tensor:
        if log_transition is None:
            return log_channel(labels[rows], n_classes, rate)
        return log_transition[:, labels[rows]].t()

    evidence, q = prior, torch.empty_like(prior)
    for _ in range(rounds):
        for rows in blocks:
            q[rows] = torch.softmax(evidence[rows] + channel(rows), dim=1)
        if noise_rate is None:
            agree = q.gather(1, labels[:, None]).mean().item()
            rate = min(max(1.0 - agree, RATE_MARGIN), limit - RATE_MARGIN)
        if noise_model == "class":
            transition = class_transition(q, labels, rate, smoothing)
            log_transition = transition.log()
        stats = class_sums(directions, q)
        if evidence is prior:
            evidence = torch.empty_like(prior)
        for rows in blocks:
            evidence[rows] = prior[rows] + scale * leave_one_out_cosine(directions[rows], q[rows], stats)
    per_row = torch.empty(n, dtype=evidence.dtype, device=evidence.device)
    for rows in blocks:
        log_p = channel(rows)
        per_row[rows] = torch.logsumexp(torch.log_softmax(evidence[rows], dim=1) + log_p, dim=1)
        q[rows] = torch.softmax(evidence[rows] + log_p, dim=1)
    log_likelihood = per_row.sum().item()
    return LabelPosterior(
        q,
        rate,
        noise_rate is None,
        rounds,
        prior_weight,
        scale,
        log_likelihood,
        noise_model=noise_model,
        transition=transition,
    )
