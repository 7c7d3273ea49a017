"""Transductive class posteriors over every image of a features file, labelled or not.

A mixture model in the spirit of TransCLIP (NeurIPS 2024): each image i of the whole file
(labelled or not) has a true class k, and its evidence for k combines the zero-shot prior with the
file's own cluster structure,

    evidence_i(k) = a * log p_prior(k | x_i) + s * cos(x_i - m, c_k^(-i))

with m the mean feature of all images and c_k^(-i) class k's q-weighted centroid of the other
images' centred, normalised features (the leave-one-out centroids of
:mod:`promptcli.noise.label_posterior`, now over thousands of unlabelled images rather than the
labelled few). Rows that carry a given label (``labels[i] >= 0``) add the symmetric noise channel
``log P(y_i | k)`` (rate r estimated from them, as in ``label_posterior``). Balancing the classes in
the E-step (entropic transport, equal mass per class) was measured and labelled the demo worse
(docs/cleaning.md), so the proportions are left to the evidence.

Naming clusters by the labels (``name_by_labels``): the prior names every cluster, and where it
confuses two classes it can hand a whole cluster the wrong name, which the few noisy labels in the
cluster cannot undo row by row. Under symmetric noise the given labels still name each true class
by plurality (at 75% noise and 10 classes, 25% against 8.3% for each wrong class), so after the
unlabelled clustering (half the rounds) the clusters are renamed by the assignment (Hungarian)
that maximises the posterior mass of labelled rows whose label equals their cluster's name, plus a
little of the prior's votes (:func:`name_clusters`); posterior and prior are permuted with the names
(the prior's evidence for its own name of a cluster now speaks for the new name) and the EM
continues with the labels' channel.

The labels vote through their neighbourhoods (:func:`spread_labels`): with 4 right labels per class
at 75% noise, whether a class's right labels happen to sit in its own cluster or in a neighbour's is
luck of the draw, and a cluster named from three unlucky rows takes the wrong name. Each label is
spread over a k-nearest-neighbour graph of the images (label spreading, Zhou et al., NIPS 2003) before
the clusters count their votes, so a right label at a cluster's edge still votes, through its
neighbours, for the cluster its class mostly lives in.

The spread labels then also speak for every image in the labelled rounds: its evidence for class k
gains ``LOCAL_WEIGHT x log((1 - e) share_k + e / C)``, with ``share`` its share of the spread label
mass (e = ``LOCAL_SMOOTHING``). Where the labels around an image disagree with its cluster they can
move it, so the clusters (and the prior that shaped them) no longer cap what the labels can say. A
labelled image hears its neighbours' labels, not its own (which already speaks through the noise
channel): its share leaves its own fold of the labels out (``HELD_OUT_FOLDS``).

Without labels, neighbours also speak for each other once the clusters have formed: in the second
half of the rounds an image's evidence for k gains ``neighbour_scale x (W q)_k``, its k-NN graph
neighbours' posterior mass for k (W the normalised graph the labels spread over; the Laplacian term of
TransCLIP). It raised the unlabelled fit's accuracy on every image set measured. With labels
:func:`transductive_predict` leaves it off: the spread labels' local evidence already speaks for each
neighbourhood, and adding it lost points on the held-out images with the weakest clusters
(docs/cleaning.md).

Verified labels (``trusted``, ``pseudolabel --trusted``) add what the noisy labels cannot: a user who
checked a few images. Each replaces its image's given label, casts ``TRUSTED_VOTES`` votes (not one)
in the naming and the spread labels, and fixes its image's class in the labelled rounds; the noise rate
is estimated from the given labels alone. Their weight is kept low because one image's class says
little about its cluster's: on this demo model a verified shirt often lies among the t-shirts.

The result gives every image of the file a class posterior, which ``pseudolabel --method
transductive`` (optionally ``--labels``) turns into a labels file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from promptcli.noise.label_posterior import (
    INITIAL_RATE,
    RATE_MARGIN,
    centred_directions,
    class_sums,
    em_blocks,
    leave_one_out_cosine,
    log_channel,
    max_noise_rate,
)

DEFAULT_ROUNDS = 10
DEFAULT_PRIOR_WEIGHT = 1.0
DEFAULT_CENTROID_FRACTION = 0.25  # of the logit scale
# Weight of the prior's votes when the labels name clusters, relative to one labelled row; chosen
# on the demo's seeds 1-3 (docs/cleaning.md): 0.1 never lost there, 0.25 and more let the prior's
# systematic confusions win again.
PRIOR_VOTES = 0.1
# Label spreading before naming (spread_labels): chosen on the demo's seeds 1-9 and the first held-out
# images' seeds 1-12 at 75% noise (docs/cleaning.md); 5 or 20 neighbours and alpha 0.9 named the same
# clusters on all but one or two of those seeds.
SPREAD_NEIGHBOURS = 10
SPREAD_ALPHA = 0.8
SPREAD_ROUNDS = 30  # alpha^30 < 0.002: the series has converged
# The graph is built over at most this many images (all labelled rows plus a fixed random sample of
# the rest): the k-NN search costs O(rows^2 x D), and cluster-level votes need no more.
SPREAD_MAX_ROWS = 20_000
# Weight of the spread labels' local evidence in the labelled rounds (log of each image's smoothed share of
# the spread label mass): chosen on the demo's and the first held-out images' seeds 1-6 at 50% noise.
LOCAL_WEIGHT = 1.0
LOCAL_SMOOTHING = 0.1  # mixed with the uniform distribution, so no image's evidence is -inf
# A labelled image's local evidence leaves its own label out (else, at 75% noise, its own mostly wrong
# label speaks twice: through the channel and through its neighbourhood, and the noise rate reads low);
# the labels are dealt into this many folds and each fold's rows hear only the other folds' labels.
HELD_OUT_FOLDS = 10
# Weight of the neighbours' posterior mass in the second half of the rounds, as a fraction of the
# logit scale, for fits without labels: +1.6 to +2.6 points of label accuracy on all six image sets
# (0.1 to 0.5 gave within 0.7 points of each other on the demo and the first held-out images). With
# labels it is 0 (see the module docstring): at 75% it added 0.1-2.8 points on the design seeds it was
# first chosen on, but on the fresh held-out draws it lost up to 5.5.
UNLABELLED_NEIGHBOUR_FRACTION = 0.1
# Votes of one trusted (verified) label, in units of one given label's, in the naming and the spread labels.
# Chosen on the demo's seeds 1-9 and the first held-out images' seeds 1-12 at 75% noise with 10 or 20 of
# the 160 given labels verified (docs/cleaning.md): 1.5 and 2 were alike; 3 and 10 renamed clusters wrongly
# (a verified shirt lying among the t-shirts outvoted the t-shirt cluster's labels) and lost up to 12 points.
TRUSTED_VOTES = 2.0
# From this estimated noise rate of the given labels on, the labels named a cluster wrongly on a few seeds, and
# checking one given label in eight (``--trusted``) prevented that on every run measured (docs/cleaning.md); the
# 87 fits at 75% noise measured there read 0.73-0.82, the 48 at 50% 0.52-0.60.
CHECKS_ADVISED_RATE = 0.65
CHECKS_ADVISED_SHARE = 8  # one given label in this many
# A warning when at least this many verified labels all agree with their given labels though that would
# happen by chance less often than this, at the fit's estimated noise rate (``unchecked_warning``).
UNCHANGED_CHECKS_MIN = 5
UNCHANGED_CHECKS_CHANCE = 0.01


def fit_steps(rounds: int = DEFAULT_ROUNDS) -> int:
    """Steps of a fit, as ``on_step`` announces them: every round, the neighbour graph and the label spreading
    (each announced, needed or not); then it says "done"."""
    return rounds + 2


@dataclass
class TransductiveResult:
    """Per-image class posteriors of the whole file and what the fit found."""

    posterior: torch.Tensor  # (N, C) float64, rows sum to 1
    noise_rate: float | None  # estimated from the labelled rows; None without labels
    naming: list[int]  # naming[k] = the class the k-th prior-named cluster was given by the labels
    spread: dict[str, float | int] | None  # the label spreading used for naming (None: raw labels)
    prior_weight: float
    centroid_scale: float
    rounds: int
    neighbour_scale: float = 0.0

    @property
    def renamed(self) -> list[tuple[int, int]]:
        """(prior's name, new name) of every cluster the labels renamed."""
        return [(k, j) for k, j in enumerate(self.naming) if k != j]


@dataclass
class Graph:
    """A weighted undirected graph as edge lists: ``weight`` of every (``source``, ``target``) pair.

    Edges are sorted by source (then target), as :func:`knn_graph` makes them."""

    source: torch.Tensor  # (E,) long
    target: torch.Tensor  # (E,) long
    weight: torch.Tensor  # (E,) float64
    n_rows: int

    def __post_init__(self) -> None:
        # a CSR matrix: its product with (N, C) values is ~15x faster on CPU than gathering every edge's row
        crow = torch.zeros(self.n_rows + 1, dtype=torch.long, device=self.source.device)
        crow[1:] = torch.cumsum(torch.bincount(self.source, minlength=self.n_rows), dim=0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            self._matrix = torch.sparse_csr_tensor(
                crow, self.target, self.weight, size=(self.n_rows, self.n_rows), check_invariants=True
            )

    def __matmul__(self, values: torch.Tensor) -> torch.Tensor:
        """W @ values for (N, C) values."""
        return self._matrix @ values.to(self.weight.dtype)

    def mm(self, values: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        """W @ values written into ``out`` (both (N, C), in the graph's dtype)."""
        return torch.mm(self._matrix, values, out=out)


def knn_graph(directions: torch.Tensor, k: int, chunk: int = 1024) -> Graph:
    """Symmetric k-nearest-neighbour graph (cosine) of the rows, normalised as D^-1/2 A D^-1/2.

    Neighbours are searched ``chunk`` rows at a time, so memory stays O(chunk x N); a row is never
    its own neighbour, and an edge found from both ends counts once."""
    n = directions.shape[0]
    k = min(k, n - 1)
    if k < 1:
        raise ValueError("a neighbour graph needs at least two rows")
    found = []
    for start in range(0, n, chunk):
        sim = directions[start : start + chunk] @ directions.t()
        rows = torch.arange(start, min(start + chunk, n), device=directions.device)
        sim[torch.arange(len(rows)), rows] = -torch.inf
        found.append(sim.topk(k, dim=1).indices)
    near = torch.cat(found).reshape(-1)
    rows = torch.arange(n, device=directions.device).repeat_interleave(k)
    pairs = torch.unique(torch.cat([rows * n + near, near * n + rows]))
    source, target = pairs // n, pairs % n
    degree = torch.bincount(source, minlength=n).double()
    return Graph(source, target, (degree[source] * degree[target]).rsqrt(), n)


@dataclass
class Neighbours:
    """The k-NN graph over ``rows`` of a file: all of them, or every labelled row and a fixed sample of the rest."""

    rows: torch.Tensor  # (R,) long, sorted
    graph: Graph | None  # None when the file has fewer than two rows

    def smooth(self, q: torch.Tensor) -> torch.Tensor | None:
        """(R, C): each graph row's neighbours' mass ``(W q[rows])``; None without a graph."""
        return None if self.graph is None else (self.graph @ q[self.rows]).to(q.dtype)

    def positions(self, n_rows: int) -> torch.Tensor:
        """(N,) each row's index in ``rows``, -1 off the graph."""
        out = torch.full((n_rows,), -1, dtype=torch.long, device=self.rows.device)
        out[self.rows] = torch.arange(len(self.rows), device=self.rows.device)
        return out


def neighbours(
    directions: torch.Tensor,
    labels: torch.Tensor | None,
    k: int = SPREAD_NEIGHBOURS,
    max_rows: int = SPREAD_MAX_ROWS,
) -> Neighbours:
    """The graph :func:`spread_labels` and the neighbour term share.

    Its rows are every row, or, when there are more than ``max_rows``, every labelled row plus a
    fixed random sample of the others (generator seed 0, so the result is reproducible): the search
    costs O(rows^2 x D)."""
    n = directions.shape[0]
    rows = torch.arange(n, device=directions.device)
    if n > max_rows:
        known = labels >= 0 if labels is not None else torch.zeros(n, dtype=torch.bool, device=rows.device)
        others = rows[~known]
        room = max(max_rows - int(known.sum()), 0)
        pick = torch.randperm(len(others), generator=torch.Generator().manual_seed(0))[:room]
        rows = torch.sort(torch.cat([rows[known], others[pick.to(others.device)]])).values
    return Neighbours(rows, knn_graph(directions[rows], k) if len(rows) >= 2 else None)


@dataclass
class LabelMass:
    """Given labels spread over a neighbour graph (:func:`spread_labels`)."""

    rows: torch.Tensor  # (R,) long: the images of the graph
    mass: torch.Tensor  # (R, C) float64: every label's spread mass, each class's column summing to its count
    held_out: torch.Tensor  # (R, C) the same, but on a labelled row without its own fold's labels


def _spread(graph: Graph, seeds: torch.Tensor, alpha: float, rounds: int) -> torch.Tensor:
    # two buffers, every product written in place: fresh (R, C) arrays each round cost more in page faults
    # than the sparse products themselves once C is in the hundreds
    mass, spare = seeds.clone(), torch.empty_like(seeds)
    kept = (1.0 - alpha) * seeds
    for _ in range(rounds):
        graph.mm(mass, out=spare)
        mass, spare = spare.mul_(alpha).add_(kept), mass
    return mass


def spread_labels(
    directions: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    *,
    k: int = SPREAD_NEIGHBOURS,
    alpha: float = SPREAD_ALPHA,
    rounds: int = SPREAD_ROUNDS,
    max_rows: int = SPREAD_MAX_ROWS,
    folds: int = HELD_OUT_FOLDS,
    near: Neighbours | None = None,
    weights: torch.Tensor | None = None,
) -> LabelMass:
    """Each given label spread over a k-NN graph of the images (label spreading).

    ``F <- alpha W F + (1 - alpha) Y`` for ``rounds`` rounds, with Y the one-hot given labels (zero
    rows for unlabelled images) and W the normalised graph of :func:`knn_graph`, then each class's
    column rescaled to that label's count, so every given label still casts one vote (``weights``
    (N,): row i's label casts ``weights[i]`` votes instead). The graph is ``near``'s, or that of
    :func:`neighbours` of the rows (``k``, ``max_rows``).

    ``held_out`` leaves a labelled row's own label out of what its neighbours say: the labelled rows
    are dealt into ``folds`` folds (in row order), each fold's labels are spread alone, and a row of
    fold f gets the full mass minus fold f's (spreading is linear), with the same rescaling."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    if folds < 1:
        raise ValueError(f"folds must be at least 1, got {folds}")
    if near is None:
        near = neighbours(directions, labels, k, max_rows)
    rows = near.rows
    sub_labels = labels[rows]
    seeds = torch.zeros(len(rows), n_classes, dtype=torch.float64, device=directions.device)
    have = sub_labels >= 0
    seeds[have] = torch.nn.functional.one_hot(sub_labels[have], n_classes).double()
    if weights is not None:
        seeds = seeds * weights[rows].to(seeds)[:, None]
    if near.graph is None or alpha == 0.0:
        return LabelMass(rows, seeds, torch.zeros_like(seeds))
    mass = _spread(near.graph, seeds, alpha, rounds)
    held_out = mass.clone()
    labelled = torch.nonzero(have).squeeze(1)
    for fold in range(min(folds, len(labelled))):
        members = labelled[fold::folds]
        fold_seeds = torch.zeros_like(seeds)
        fold_seeds[members] = seeds[members]
        held_out[members] -= _spread(near.graph, fold_seeds, alpha, rounds)[members]
    scale = seeds.sum(dim=0) / mass.sum(dim=0).clamp_min(1e-300)
    return LabelMass(rows, mass * scale, held_out.clamp_min(0.0) * scale)


def local_evidence(spread: LabelMass, weight: float) -> torch.Tensor:
    """(R, C) ``weight x log((1 - e) share + e / C)`` for the graph's rows (``spread.rows``): what the spread
    labels around each image say.

    ``share`` is each graph row's share of the spread label mass, its own label held out
    (:func:`spread_labels`); images off the graph get no evidence, those with no mass a constant row."""
    n_classes = spread.mass.shape[1]
    share = spread.held_out / spread.held_out.sum(dim=1, keepdim=True).clamp_min(1e-300)
    return weight * torch.log((1.0 - LOCAL_SMOOTHING) * share + LOCAL_SMOOTHING / n_classes)


def prior_votes(q: torch.Tensor, prior_log_probs: torch.Tensor) -> torch.Tensor:
    """(C, C) each cluster's expected zero-shot votes: ``q^T exp(prior_log_probs)``, a block of rows at a time."""
    n_classes = q.shape[1]
    out = torch.zeros(n_classes, prior_log_probs.shape[1], dtype=q.dtype, device=q.device)
    for rows in em_blocks(q.shape[0], n_classes):
        out += q[rows].t() @ prior_log_probs[rows].to(q.dtype).exp()
    return out


def name_clusters(
    q: torch.Tensor,
    labels: torch.Tensor,
    prior_counts: torch.Tensor | None = None,
    prior_weight: float = PRIOR_VOTES,
    label_mass: LabelMass | None = None,
    weights: torch.Tensor | None = None,
) -> list[int]:
    """The cluster -> class permutation that the given labels (and, a little, the prior) agree with most.

    ``labels`` (N,) with -1 for unlabelled rows; ``weights`` (N,) the votes each row's label casts
    (None: one each). The score of naming cluster k as class j is the q-weighted votes of rows
    labelled j in cluster k, plus ``prior_weight`` x the cluster's expected zero-shot votes for j
    (``prior_counts``, (C, C) from :func:`prior_votes` over all rows) scaled to the labels' total votes. ``label_mass`` from
    :func:`spread_labels` replaces the labelled rows' one-hot votes by the spread ones. Solved
    exactly (Hungarian, scipy); where renaming gains nothing the prior's names stay.
    """
    from scipy.optimize import linear_sum_assignment

    n_classes = q.shape[1]
    known = labels >= 0
    votes_per_row = known.to(q.dtype) if weights is None else known.to(q.dtype) * weights.to(q.dtype)
    if label_mass is None:
        one_hot = torch.nn.functional.one_hot(labels[known], n_classes).to(q.dtype)
        score = q[known].t() @ (one_hot * votes_per_row[known][:, None])
    else:
        score = q[label_mass.rows].t() @ label_mass.mass.to(q.dtype)
    if prior_counts is not None and prior_weight > 0:
        score = score + prior_weight * prior_counts.to(q.dtype) * (votes_per_row.sum() / len(labels))
    votes = score.cpu().numpy()
    rows, cols = linear_sum_assignment(votes, maximize=True)
    naming = [0] * n_classes
    for k, j in zip(rows.tolist(), cols.tolist()):
        naming[k] = j
    base = float(np.trace(votes))
    best = float(votes[rows, cols].sum())
    return naming if best > base + 1e-9 else list(range(n_classes))


def transductive_posterior(
    features: torch.Tensor,
    prior_log_probs: torch.Tensor,
    *,
    centroid_scale: float,
    neighbour_scale: float,
    labels: torch.Tensor | None = None,
    trusted: torch.Tensor | None = None,
    trusted_votes: float = TRUSTED_VOTES,
    prior_weight: float = DEFAULT_PRIOR_WEIGHT,
    rounds: int = DEFAULT_ROUNDS,
    name_by_labels: bool = True,
    spread: bool = True,
    local_weight: float = LOCAL_WEIGHT,
    noise_rate: float | None = None,
    on_step: Callable[[str], None] | None = None,
) -> TransductiveResult:
    """EM over the true classes of every image (see the module docstring).

    ``features`` (N, D), ``prior_log_probs`` (N, C) zero-shot log-probabilities; ``labels`` (N,)
    given class indices, -1 where a row has none (None: no labels at all). ``trusted`` (N,) likewise:
    verified labels, which replace a row's given label, cast ``trusted_votes`` votes each in the naming
    and the spread labels, and fix their own rows' class after the naming. ``noise_rate`` fixes r;
    ``spread=False`` names the clusters from the raw labels, without label spreading; ``local_weight``
    weighs the spread labels' evidence for every image in the labelled rounds (0: none);
    ``neighbour_scale`` the neighbours' posterior mass in the second half of the rounds (0: none).
    ``on_step(stage)`` is called as each of the :func:`fit_steps` steps starts, then with "done" (progress bars).
    """
    n, n_classes = prior_log_probs.shape
    prior_log_probs = prior_log_probs.to(features.device)
    if features.shape[0] != n:
        raise ValueError(f"features {tuple(features.shape)} and prior {(n, n_classes)} disagree")
    if n_classes < 2:
        raise ValueError("need at least two classes")
    if not torch.isfinite(features).all():
        raise ValueError("features must be finite")
    if torch.isnan(prior_log_probs).any() or (prior_log_probs > 1e-6).any():
        raise ValueError("prior log-probabilities must be <= 0 (-inf allowed), not NaN")
    labels = _class_indices(labels, "labels", n, n_classes, features.device)
    trusted = _class_indices(trusted, "trusted", n, n_classes, features.device)
    if not (trusted_votes > 0.0 and np.isfinite(trusted_votes)):
        raise ValueError(f"trusted_votes must be a finite number > 0, got {trusted_votes}")
    sure = None if trusted is None else trusted >= 0
    labels = unverified(labels, trusted)
    # every label that names the clusters: the given ones (one vote each) and the trusted ones
    voters, votes = None, None
    if labels is not None or sure is not None:
        voters = labels.clone() if labels is not None else torch.full_like(trusted, -1)
        votes = torch.ones(n, dtype=torch.float64, device=features.device)
        if sure is not None:
            voters[sure], votes[sure] = trusted[sure], trusted_votes
    limit = max_noise_rate(n_classes)
    if noise_rate is not None and not 0.0 <= noise_rate < limit:
        raise ValueError(f"noise rate must be in [0, {limit:.4f}), got {noise_rate}")
    if not (neighbour_scale >= 0.0 and np.isfinite(neighbour_scale)):
        raise ValueError(f"neighbour_scale must be a finite number >= 0, got {neighbour_scale}")
    directions = centred_directions(features)
    known = None if labels is None else labels >= 0
    rate = (INITIAL_RATE if noise_rate is None else noise_rate) if labels is not None else None
    near, positions = None, None
    blocks = em_blocks(n, n_classes)
    inverse = None  # the prior's columns in the labels' names of the clusters, once they rename one
    local = None  # (R, C) the spread labels' evidence for the graph's rows, in the labelled rounds

    def prior(rows: slice) -> torch.Tensor:
        """The prior's evidence for a block of rows: weighted, in the clusters' names, plus the spread labels'
        local evidence; made a block at a time, not held as another (N, C) array."""
        out = prior_log_probs[rows].double().clamp_min(-1e4).mul_(prior_weight)
        if inverse is not None:  # the prior's evidence for its own name of a cluster speaks for the new name
            out = out[:, inverse]
        if local is not None:
            on, at = on_graph(rows)
            out[on] = out[on] + local[at]
        return out

    def on_graph(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of the block's rows the neighbour graph holds, and their places in it."""
        at = positions[rows]
        on = at >= 0
        return on, at[on]

    def e_step(second_half: bool) -> None:
        """One EM round, in place, a block of rows at a time; centroids and neighbours' mass come from the
        posterior before the round. The labels' channel and the neighbour term belong to the second half."""
        stats = class_sums(directions, q)
        mass = near.smooth(q) if second_half and near is not None and neighbour_scale > 0 else None
        for rows in blocks:
            evidence = prior(rows) + centroid_scale * leave_one_out_cosine(directions[rows], q[rows], stats)
            if mass is not None:
                on, at = on_graph(rows)
                evidence[on] = evidence[on] + neighbour_scale * mass[at]
            if second_half and labels is not None:
                mine = known[rows]
                evidence[mine] = evidence[mine] + log_channel(labels[rows][mine], n_classes, rate)
            q[rows] = torch.softmax(evidence, dim=1)
            if second_half and sure is not None:  # the verified rows' class, fixed in every labelled round
                rows_q, fixed = q[rows], sure[rows]
                rows_q[fixed] = torch.nn.functional.one_hot(trusted[rows][fixed], n_classes).to(q.dtype)

    step = on_step or (lambda _: None)
    # Clusters first, from the prior and the features alone: half the rounds.
    naming = list(range(n_classes))
    spread_record = None
    q = torch.empty(n, n_classes, dtype=torch.float64, device=features.device)
    for rows in blocks:
        q[rows] = torch.softmax(prior(rows), dim=1)
    cluster_rounds = rounds // 2
    for round_ in range(cluster_rounds):
        step(f"clustering, round {round_ + 1}")
        e_step(second_half=False)
    step("neighbour graph")
    if neighbour_scale > 0 or (voters is not None and spread):
        near = neighbours(directions, voters)
        positions = near.positions(n)
    step("label spreading")
    label_mass = None
    if voters is not None:
        if spread:
            label_mass = spread_labels(directions, voters, n_classes, near=near, weights=votes)
            spread_record = {
                "neighbours": SPREAD_NEIGHBOURS,
                "alpha": SPREAD_ALPHA,
                "rounds": SPREAD_ROUNDS,
                "graph_rows": len(label_mass.rows),
                "held_out_folds": HELD_OUT_FOLDS,
                "local_weight": local_weight,
            }
            if sure is not None:
                spread_record["trusted_votes"] = trusted_votes
        if name_by_labels:
            naming = name_clusters(
                q, voters, prior_votes(q, prior_log_probs), label_mass=label_mass, weights=votes
            )
            if naming != list(range(n_classes)):
                inverse = torch.argsort(torch.tensor(naming, device=q.device))
                for rows in blocks:
                    q[rows] = q[rows][:, inverse]
        # then the labels' channel (and the spread labels' local evidence, in class space: after the renaming)
        if label_mass is not None and local_weight > 0:
            local = local_evidence(label_mass, local_weight)
    for round_ in range(cluster_rounds, rounds):
        step(f"{'labelled ' if labels is not None else ''}round {round_ + 1}")
        e_step(second_half=True)
        if labels is not None and noise_rate is None:
            agree = q[known].gather(1, labels[known][:, None]).mean().item()
            rate = min(max(1.0 - agree, RATE_MARGIN), limit - RATE_MARGIN)
    step("done")
    if not all(torch.isfinite(q[rows]).all() for rows in blocks):
        raise ValueError("the transductive posterior is not finite (non-finite features or prior?)")
    return TransductiveResult(
        q, rate, naming, spread_record, prior_weight, centroid_scale, rounds, neighbour_scale
    )


def advised_checks(record: dict[str, object]) -> int:
    """How many given labels to check (``--trusted``): one in eight when they are noisy enough that checks were
    measured to matter, else 0.

    ``record`` is :func:`transductive_predict`'s; a fit that already has checked labels needs no advice."""
    rate, n_given = record.get("noise_rate"), int(record.get("n_labelled") or 0)
    if not n_given or record.get("n_trusted") or rate is None or rate < CHECKS_ADVISED_RATE:
        return 0
    return -(-n_given // CHECKS_ADVISED_SHARE)


def unchecked_warning(record: dict[str, object]) -> str | None:
    """A warning when many verified labels all equal their given labels although the fit finds those labels
    noisy: most likely the checked rows were copied from the labels file and never corrected."""
    trusted, rate = record.get("trusted") or {}, record.get("noise_rate")
    replaced, changed = int(trusted.get("replaced", 0)), int(trusted.get("changed", 0))
    if changed or replaced < UNCHANGED_CHECKS_MIN or rate is None:  # also: no --trusted at all
        return None
    if (1.0 - rate) ** replaced >= UNCHANGED_CHECKS_CHANCE:
        return None
    return (
        f"none of the {replaced} --trusted labels differs from its given label, though the fit estimates "
        f"{rate:.0%} of the given labels wrong: were their label columns corrected?"
    )


def unverified(labels: torch.Tensor | None, trusted: torch.Tensor | None) -> torch.Tensor | None:
    """The given labels that still count: -1 where a verified label replaces one; None if none is left."""
    if labels is None or trusted is None:
        return labels
    labels = torch.where(trusted.to(labels.device) >= 0, -1, labels)
    return labels if (labels >= 0).any() else None


def _class_indices(
    values: torch.Tensor | None, name: str, n: int, n_classes: int, device: torch.device
) -> torch.Tensor | None:
    """``values`` as a long tensor on ``device``, checked: (n,) class indices or -1; None if none is >= 0."""
    if values is None:
        return None
    values = values.long().to(device)
    if values.shape != (n,):
        raise ValueError(f"{name} {tuple(values.shape)} and features ({n}, ...) disagree")
    if values.max().item() >= n_classes or values.min().item() < -1:
        raise ValueError(f"{name} must be class indices, or -1 for unlabelled rows")
    return values if (values >= 0).any() else None


def given_labels(n_rows: int, rows: np.ndarray, labels: np.ndarray, where: str) -> torch.Tensor:
    """(N,) class index per feature row from joined label rows, -1 where a row has no label.

    A feature row labelled twice is an error (which label would count is otherwise arbitrary)."""
    from promptcli.errors import InputError

    out = torch.full((n_rows,), -1, dtype=torch.long)
    seen, counts = np.unique(rows, return_counts=True)
    if len(seen) < len(rows):
        raise InputError(
            f"{int((counts > 1).sum())} image(s) are labelled more than once",
            where=where,
            hint="give each path one row",
        )
    out[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(labels, dtype=torch.long)
    return out


def transductive_predict(
    features: np.ndarray | torch.Tensor,
    prior_log_probs: np.ndarray | torch.Tensor,
    scale: float,
    labels: torch.Tensor | None = None,
    *,
    trusted: torch.Tensor | None = None,
    prior_weight: float = DEFAULT_PRIOR_WEIGHT,
    centroid_fraction: float = DEFAULT_CENTROID_FRACTION,
    neighbour_fraction: float | None = None,
    rounds: int = DEFAULT_ROUNDS,
    device: str | torch.device = "cpu",
    on_step: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """Labels, confidences and a record of the fit for every row (``pseudolabel --method transductive``).

    ``prior_log_probs`` are zero-shot log-probabilities, ``scale`` the model's logit scale (the
    centroid weight is ``centroid_fraction x scale``, the neighbours' ``neighbour_fraction x scale``;
    None: ``UNLABELLED_NEIGHBOUR_FRACTION`` without given labels, 0 with them), ``labels`` and
    ``trusted`` and ``on_step`` as in :func:`transductive_posterior`. The fit runs on ``device``.
    """
    given = unverified(labels, trusted)
    n_given = 0 if given is None else int((given >= 0).sum())
    if neighbour_fraction is None:
        neighbour_fraction = UNLABELLED_NEIGHBOUR_FRACTION if n_given == 0 else 0.0
    result = transductive_posterior(
        torch.as_tensor(features, dtype=torch.float32, device=device),
        torch.as_tensor(prior_log_probs, device=device),
        centroid_scale=centroid_fraction * scale,
        neighbour_scale=neighbour_fraction * scale,
        labels=labels,
        trusted=trusted,
        prior_weight=prior_weight,
        rounds=rounds,
        on_step=on_step,
    )
    q = result.posterior.cpu().numpy()
    record: dict[str, object] = {
        "method": "transductive",
        "prior_weight": prior_weight,
        "centroid_scale": result.centroid_scale,
        "neighbour_scale": result.neighbour_scale,
        "logit_scale": scale,
        "rounds": rounds,
        "n_labelled": n_given,
        "n_trusted": 0 if trusted is None else int((trusted >= 0).sum()),
        "noise_rate": result.noise_rate,
        "renamed_clusters": [list(pair) for pair in result.renamed],
        "label_spreading": result.spread,
    }
    return q.argmax(axis=1).astype(np.int64), q.max(axis=1), record


def transductive_fit(
    loaded: object,
    fs: object,
    prompt_names: list[str],
    templates: list[str],
    labels_path: Path | None,
    *,
    trusted_path: Path | None = None,
    skip_missing: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> tuple[object, np.ndarray, dict[str, object]]:
    """``pseudolabel --method transductive``: (predictions, the zero-shot argmax, the fit's record).

    ``loaded`` is the features' model, ``fs`` the features file, ``labels_path`` an optional labels
    CSV (joined by path) whose labels join the fit, ``trusted_path`` one of verified labels (their
    ``label`` column), which replace the given label of the images they name; ``on_step`` is told each of the
    fit's :func:`fit_steps` steps as it starts, then "done"."""
    from promptcli.analysis.evaluation import EVAL_BLOCK, zero_shot_member
    from promptcli.errors import InputError
    from promptcli.io.features import row_blocks
    from promptcli.io.sidecar import noise_summary, read_noise_sidecar
    from promptcli.models.zeroshot import logit_scale
    from promptcli.noise.pseudolabels import Predictions

    feats = torch.as_tensor(np.asarray(fs.features, dtype=np.float32), device=loaded.device)
    if not torch.isfinite(feats).all():
        bad = int((~torch.isfinite(feats).all(dim=1)).sum())
        raise InputError(
            f"{bad} feature row(s) are not finite (NaN or inf)",
            where=str(fs.path),
            hint="extract the features again",
        )
    # the log-probabilities a block of rows at a time: no (N, C) logits beside them (10 GB each at ImageNet scale)
    zero_shot = zero_shot_member(loaded, prompt_names, templates, feats.device)
    log_probs = torch.empty(len(feats), len(prompt_names), dtype=torch.float64, device=feats.device)
    for start, stop in row_blocks(len(feats), EVAL_BLOCK):
        log_probs[start:stop] = torch.log_softmax(zero_shot.logits(feats[start:stop]).double(), dim=1)
    given, labels_record, trusted, trusted_record = None, None, None, None
    if labels_path is not None:
        given, labels_record = _joined_labels(fs, labels_path, skip_missing)
        labels_record["noise"] = noise_summary(read_noise_sidecar(labels_path, lambda _: None))
        counts = torch.bincount(given[given >= 0].cpu(), minlength=len(fs.classnames))
        if bool((given >= 0).all()) and bool((counts == 1).any()):
            # every image labelled, a class with one: each image hears only the other images' labels, so that
            # class has no voice of its own and its cluster is named after its neighbours (0% right, measured)
            name = fs.classnames[int(torch.nonzero(counts == 1)[0])]
            raise InputError(
                f"every image is labelled and class {name!r} has only one: the fit names clusters by the "
                "labels around each image, and a class with one image has none",
                where=str(labels_path),
                hint="fit on a features file with the unlabelled images too, or tune on these labels directly",
            )
    if trusted_path is not None:
        trusted, trusted_record = _joined_labels(fs, trusted_path, skip_missing)
        both = None if given is None else (given >= 0) & (trusted >= 0)  # verified images with a given label
        trusted_record["replaced"] = 0 if both is None else int(both.sum())
        trusted_record["changed"] = 0 if both is None else int((both & (given != trusted)).sum())
        if both is not None and bool(both.eq(given >= 0).all()) and trusted_record["changed"] == 0:
            # every given label "verified" unchanged: the labels file (or a copy) passed as --trusted
            raise InputError(
                f"--trusted repeats all {trusted_record['replaced']} given labels unchanged",
                where=str(trusted_path),
                hint="pass only the rows you checked, with their label column corrected (a copy of --labels "
                "checks nothing)",
            )
    # the features and the prior are already on the model's device: the fit runs there on them
    pred, confidence, record = transductive_predict(
        feats, log_probs, logit_scale(loaded), given, trusted=trusted, device=loaded.device, on_step=on_step
    )
    if labels_record is not None:
        record["labels"] = labels_record
    if trusted_record is not None:
        record["trusted"] = trusted_record
    return Predictions(pred, confidence), log_probs.argmax(dim=1).cpu().numpy(), record


def _joined_labels(fs: object, path: Path, skip_missing: bool) -> tuple[torch.Tensor, dict[str, object]]:
    """A labels CSV joined to the features' rows by path: (N,) class indices (-1: none) and its record."""
    from promptcli.io.labels import join_labels, labels_sha256, read_labels

    table = read_labels(path)
    joined = join_labels(fs, table, skip_missing=skip_missing)
    labels = given_labels(len(fs), joined.rows, joined.labels, where=str(path))
    record = {
        "path": str(path),
        "sha256": labels_sha256(table, path),
        "rows": len(joined.rows),
        "skipped": joined.n_skipped,
    }
    return labels, record
