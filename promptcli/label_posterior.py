"""Noise-aware posteriors over each labelled image's true class (``clean --score posterior``).

The model behind the score: image i has a true class k and a given label y_i that a symmetric
noise channel produced,

    P(y = k | k) = 1 - r,        P(y = j | k) = r / (C - 1)  for j != k,

so even at r = 0.75 with 10 classes the given label is 3x likelier to be the true class than any
other. The evidence for class k combines a prior classifier with the labelled set's own class
structure:

    evidence_i(k) = log p_prior(k | x_i) + s * cos(x_i - m, c_k)

where m is the mean feature of the labelled images, c_k the q-weighted mean of their centred,
normalised features (a class centroid built from the images currently believed to be class k) and
s the model's logit scale. EM alternates

    E:  q_i(k) = softmax_k(evidence_i(k) + log P(y_i | k))
    M:  c_k = sum_i q_i(k) (x_i - m)/|x_i - m| / sum_i q_i(k);  r = 1 - mean_i q_i(y_i)

starting from the prior alone (no centroid term) and r = 0.5 (0.25 with two classes; or a rate the
user gives, then kept fixed), for a fixed number of rounds. The score of a row is ``1 - q_i(y_i)``: the posterior
probability that its label is wrong; ``argmax_k q_i(k)`` is the class a relabel uses.

Why the centroids help: under symmetric noise the wrong labels of a class are spread over all other
classes, so the images labelled k still lean towards class k's region of feature space; weighting
them by q sharpens that lean round by round, while the prior (zero-shot text or a tuned prompt)
breaks ties the labels cannot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_ROUNDS = 10
INITIAL_RATE = 0.5
RATE_MARGIN = 1e-3  # keeps an estimated rate inside (0, (C-1)/C), where labels still carry signal


@dataclass
class LabelPosterior:
    """EM result: per-row posteriors over the true class and the noise rate used in the last E-step."""

    posterior: torch.Tensor  # (N, C) float64, rows sum to 1
    noise_rate: float
    rate_estimated: bool
    rounds: int


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


def centred_directions(features: torch.Tensor) -> torch.Tensor:
    """Features minus their mean, each row normalised (the space the class centroids live in)."""
    x = features.double()
    x = x - x.mean(dim=0, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def label_posterior(
    features: torch.Tensor,
    labels: torch.Tensor,
    prior_log_probs: torch.Tensor,
    scale: float,
    *,
    noise_rate: float | None = None,
    rounds: int = DEFAULT_ROUNDS,
) -> LabelPosterior:
    """EM over the true classes of labelled images (see the module docstring).

    ``features`` (N, D) image features, ``labels`` (N,) given class indices, ``prior_log_probs``
    (N, C) log-probabilities of a prior classifier, ``scale`` the weight of the centroid cosine
    (the model's logit scale). ``noise_rate`` fixes r; None estimates it.
    """
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
    labels = labels.long()
    prior = prior_log_probs.double()
    directions = centred_directions(features)
    # two classes: 0.5 is the rate at which labels say nothing, so start halfway to it
    start = INITIAL_RATE if INITIAL_RATE < limit - RATE_MARGIN else limit / 2
    rate = start if noise_rate is None else noise_rate
    evidence = prior
    for _ in range(rounds):
        q = torch.softmax(evidence + log_channel(labels, n_classes, rate), dim=1)
        if noise_rate is None:
            agree = q.gather(1, labels[:, None]).mean().item()
            rate = min(max(1.0 - agree, RATE_MARGIN), limit - RATE_MARGIN)
        mass = q.sum(dim=0)
        centroids = (q.t() @ directions) / mass.clamp_min(1e-12)[:, None]
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
        evidence = prior + scale * directions @ centroids.t()
    q = torch.softmax(evidence + log_channel(labels, n_classes, rate), dim=1)
    return LabelPosterior(q, rate, noise_rate is None, rounds)


def wrong_label_probability(result: LabelPosterior, labels: torch.Tensor) -> torch.Tensor:
    """(N,) the posterior probability that each given label is wrong: ``1 - q_i(y_i)``."""
    return 1.0 - result.posterior.gather(1, labels.long()[:, None])[:, 0]
