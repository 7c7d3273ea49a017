"""Find mislabelled samples: per-row scores, suspect selection, relabelling, metrics.

Class probabilities come from tuned prompts (ensembled as in eval) or from zero-shot CLIP. Two
scores turn them into how likely each given label is wrong.

``margin`` (default): the margin by which the classifier prefers another class:

    score = max_{c != y} p(c | x) - p(y | x)        in [-1, 1]

Positive means the prompt's top class is not the given label; 0 is the natural threshold. Unlike
``1 - p(y)``, the margin stays low for an ambiguous image whose probability is spread over many
classes with no single rival, and high only when one specific class beats the label, which is what
a wrong label looks like (and the class a relabel would use). Rows are suspect when their score is
above ``--threshold`` (default 0), or when they fall outside the ``--keep-fraction`` lowest scores.

``posterior``: the probability that the label is wrong, ``1 - q(y | x, given label)``, under a
label-noise model (symmetric, or class-conditional with ``--noise-model class``) fitted by EM to
the whole label set, with the classifier's
probabilities as prior and leave-one-out class centroids of the labelled images themselves as
extra evidence (see :mod:`promptcli.noise.label_posterior`). The two kinds of evidence are weighted by
fitting the labels' likelihood (default for a zero-shot prior) or at fixed weights (default for a
prompt, which has seen the labels). In [0, 1]; default threshold 0.5. It uses what the margin
ignores: that under symmetric noise most images given a label still share a class, and how noisy
the labels are overall (estimated, or ``--noise-rate``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from promptcli.choices import NoiseModel
from promptcli.errors import InputError, RuntimeFailure
from promptcli.io.checks import one_or_many
from promptcli.io.features import FeatureSet
from promptcli.io.labels import LabelTable

SCORES = ("margin", "posterior")
SCORE_DEFINITIONS = {
    "margin": "max over other classes of p(class) minus p(given label), in [-1, 1]; higher = more suspect",
    "posterior": (
        "posterior probability that the given label is wrong, 1 - q(label), under a label-noise model "
        "(noise_model.kind) fitted by EM (prior: the classifier's probabilities; evidence: leave-one-out class centroids of the "
        "labelled images), in [0, 1]"
    ),
}
SCORE_RANGES = {"margin": (-1.0, 1.0), "posterior": (0.0, 1.0)}
DEFAULT_THRESHOLDS = {"margin": 0.0, "posterior": 0.5}
DEFAULT_THRESHOLD = DEFAULT_THRESHOLDS["margin"]
DEFAULT_RELABEL_CONFIDENCE = 0.5
# Columns clean adds to the scores file (after the labels file's own columns).
SCORE_COLUMNS = ["score", "p_label", "predicted", "p_predicted", "suspect", "action"]
ACTIONS = ("kept", "relabelled", "dropped", "skipped")


@dataclass
class Scores:
    """Per-row scores from (N, C) class probabilities and the given labels."""

    score: np.ndarray  # (N,) margin, see the module docstring
    p_label: np.ndarray  # (N,) probability of the given label
    predicted: np.ndarray  # (N,) argmax class
    p_predicted: np.ndarray  # (N,) its probability


def label_scores(probs: np.ndarray, labels: np.ndarray) -> Scores:
    """The margin score of each row (see the module docstring); needs at least two classes."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or probs.shape[1] < 2 or len(probs) != len(labels):
        raise ValueError(f"need (N, C>=2) probabilities for N labels, got {probs.shape} and {labels.shape}")
    rows = np.arange(len(labels))
    p_label = probs[rows, labels]
    others = probs.copy()
    others[rows, labels] = -np.inf
    predicted = probs.argmax(axis=1)
    return Scores(others.max(axis=1) - p_label, p_label, predicted, probs[rows, predicted])


def check_score(score: str) -> None:
    if score not in SCORES:
        raise InputError(f"unknown score {score!r}", where="--score", hint="use margin or posterior")


def check_selection(threshold: float | None, keep_fraction: float | None, score: str = "margin") -> None:
    """At most one of threshold / keep_fraction, each in range (the threshold in the score's range)."""
    check_score(score)
    low, high = SCORE_RANGES[score]
    if threshold is not None and keep_fraction is not None:
        raise InputError(
            "give --threshold or --keep-fraction, not both",
            where="--threshold/--keep-fraction",
            hint="--threshold flags rows scoring above it; --keep-fraction keeps that share of rows",
        )
    if threshold is not None and not low <= threshold <= high:
        raise InputError(
            f"must be in [{low:g}, {high:g}], got {threshold}",
            where="--threshold",
            hint=f"the {score} score lies in [{low:g}, {high:g}]",
        )
    if keep_fraction is not None and not 0.0 < keep_fraction <= 1.0:
        raise InputError(
            f"must be in (0, 1], got {keep_fraction}",
            where="--keep-fraction",
            hint="e.g. 0.7 keeps the 70% of rows whose labels look most plausible",
        )


def select_suspects(
    score: np.ndarray,
    *,
    threshold: float | None = None,
    keep_fraction: float | None = None,
    kind: str = "margin",
) -> np.ndarray:
    """(N,) bool: suspect rows.

    With ``keep_fraction`` f the ceil(f N) lowest-scoring rows are kept (ties: earlier rows first),
    so no more than the asked share is flagged; otherwise rows scoring above ``threshold``
    (default: 0 for the margin, 0.5 for the posterior) are suspect.
    """
    check_selection(threshold, keep_fraction, kind)
    score = np.asarray(score, dtype=np.float64)
    if keep_fraction is None:
        return score > (DEFAULT_THRESHOLDS[kind] if threshold is None else threshold)
    n_keep = min(len(score), math.ceil(keep_fraction * len(score) - 1e-9))
    order = np.argsort(score, kind="stable")
    suspect = np.ones(len(score), dtype=bool)
    suspect[order[:n_keep]] = False
    return suspect


def auroc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` for ``positive`` rows; ties count one half.

    Mann-Whitney: the probability that a random positive scores above a random negative, via
    average ranks. None when there are no positives or no negatives.
    """
    score = np.asarray(score, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(len(score), dtype=np.float64)
    # average rank (1-based) over each run of tied scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(score)]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + 1 + end) / 2.0
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def detection_metrics(score: np.ndarray, suspect: np.ndarray, is_noisy: np.ndarray) -> dict[str, Any]:
    """AUROC of the score, precision and recall of the suspect flags, for the truly noisy rows."""
    suspect = np.asarray(suspect, dtype=bool)
    is_noisy = np.asarray(is_noisy, dtype=bool)
    flagged = int(suspect.sum())
    noisy = int(is_noisy.sum())
    hits = int((suspect & is_noisy).sum())
    return {
        "auroc": auroc(score, is_noisy),
        "precision": hits / flagged if flagged else None,
        "recall": hits / noisy if noisy else None,
        "n_flagged": flagged,
        "n_noisy": noisy,
        "n_flagged_noisy": hits,
    }


def relabel_mask(
    suspect: np.ndarray, predicted: np.ndarray, p_predicted: np.ndarray, labels: np.ndarray, confidence: float
) -> np.ndarray:
    """Suspect rows whose predicted class differs from the label with probability >= ``confidence``."""
    return (
        np.asarray(suspect, dtype=bool)
        & (np.asarray(predicted) != np.asarray(labels))
        & (np.asarray(p_predicted) >= confidence)
    )


def joined_table_rows(features: FeatureSet, table: LabelTable) -> np.ndarray:
    """Indices of the table rows ``join_labels(..., skip_missing=True)`` keeps, in order."""
    by_path = features.index_by_path()
    names = set(features.classnames)
    has_clean = table.has("clean_label")
    keep = [
        i
        for i, row in enumerate(table.rows)
        if row.get("path", "") in by_path
        and row.get("label", "") in names
        and (not has_clean or row.get("clean_label", "") in names)
    ]
    return np.asarray(keep, dtype=np.int64)


def require_prior(prompt_paths: Sequence[str | Path], zero_shot: bool) -> None:
    """Exactly one source of class probabilities: prompt files or zero-shot."""
    if prompt_paths and zero_shot:
        raise InputError(
            "give --prompt or --zero-shot, not both",
            where="--prompt/--zero-shot",
            hint="--zero-shot scores labels with the model's zero-shot classifier instead of a tuned prompt",
        )
    if not prompt_paths and not zero_shot:
        raise InputError(
            "no prompt given",
            where="--prompt",
            hint="scores come from a tuned prompt (promptcli tune train.h5 noisy.csv -o p.safetensors "
            "--loss gce) or from --zero-shot",
        )


@dataclass
class Prior:
    """Class probabilities of every row of the features it was given, and where they came from."""

    probs: np.ndarray  # (N, C) float64, one row per feature row given
    prompts: list[Any]  # prompt files read (empty for zero-shot)
    templates: list[str] | None  # zero-shot templates (None for prompts)
    logit_scale: float | None  # the model's, when known without extra work


def prior_probabilities(
    fs: FeatureSet,
    prompt_paths: Sequence[str | Path],
    *,
    zero_shot: bool = False,
    templates: Sequence[str] | None = None,
    template_set: str | None = None,
    pretrained: str | None = None,
    device: str = "auto",
) -> Prior:
    """(N, C) class probabilities: prompt files (ensembled as in eval) or zero-shot CLIP."""
    from promptcli.analysis.evaluation import check_compatible, class_probabilities
    from promptcli.io.prompt_files import read_prompt
    from promptcli.models.devices import resolve_device
    from promptcli.models.zeroshot import logit_scale, resolve_templates

    require_prior(prompt_paths, zero_shot)
    chosen = resolve_templates(templates, template_set) if zero_shot else None
    prompts = [read_prompt(p) for p in prompt_paths]
    for prompt in prompts:
        check_compatible(prompt, fs)
    probs, loaded = class_probabilities(fs, prompts, chosen, pretrained, resolve_device(device))
    scale = logit_scale(loaded) if loaded is not None else None
    return Prior(probs, prompts, chosen, scale)


def model_logit_scale(fs: FeatureSet, prior: Prior, pretrained: str | None, device: str) -> float:
    """The features' model's logit scale (the weight of the posterior's centroid evidence)."""
    if prior.logit_scale is not None:
        return prior.logit_scale
    for prompt in prior.prompts:  # prompt files record it
        value = prompt.metadata.get("logit_scale")
        if value not in (None, ""):
            return float(value)
    from promptcli.models.loading import load_model_from_record
    from promptcli.models.zeroshot import logit_scale

    loaded = load_model_from_record(
        fs.attrs, source=fs.path, pretrained=pretrained, device=device, dim=fs.dim
    )
    return logit_scale(loaded)


def posterior_scores(
    fs: FeatureSet,
    rows: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    scale: float,
    noise_rate: float | None,
    fit_weights: bool,
    device: str = "cpu",
    on_fit_step: Callable[[], None] | None = None,
    noise_model: str = "symmetric",
) -> tuple[Scores, dict[str, Any]]:
    """The ``posterior`` score of each labelled row, and what the noise model found (EM on ``device``)."""
    import torch

    from promptcli.models.devices import resolve_device
    from promptcli.noise.label_posterior import (
        TRANSITION_SMOOTHING,
        fit_label_posterior,
        label_posterior,
        max_noise_rate,
        wrong_label_probability,
    )

    limit = max_noise_rate(len(fs.classnames))
    if noise_rate is not None and not 0.0 <= noise_rate < limit:
        raise InputError(
            f"must be in [0, {limit:.4f}) for {len(fs.classnames)} classes, got {noise_rate}",
            where="--noise-rate",
            hint="at (C-1)/C symmetric noise the labels say nothing; leave it out to estimate the rate",
        )
    torch_device = resolve_device(device)
    y_cpu = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    y = y_cpu.to(torch_device)
    prior = torch.from_numpy(np.log(np.clip(probs, 1e-300, None))).to(torch_device)
    x = torch.from_numpy(fs.features[rows]).to(torch_device)
    if fit_weights:
        result = fit_label_posterior(
            x, y, prior, scale, noise_rate=noise_rate, on_step=on_fit_step, noise_model=noise_model
        )
    else:
        result = label_posterior(
            x, y, prior, centroid_scale=scale, noise_rate=noise_rate, noise_model=noise_model
        )
    result.posterior = result.posterior.cpu()
    q = result.posterior.numpy()
    index = np.arange(len(y))
    predicted = q.argmax(axis=1)
    scores = Scores(
        wrong_label_probability(result, y_cpu).numpy(), q[index, labels], predicted, q[index, predicted]
    )
    model = {
        "kind": result.noise_model,
        "noise_rate": result.noise_rate,
        "rate_estimated": result.rate_estimated,
        "rounds": result.rounds,
        "weights": "fitted" if result.fitted else "fixed",
        "prior_weight": result.prior_weight,
        "centroid_scale": result.centroid_scale,
        "logit_scale": scale,
        "log_likelihood": result.log_likelihood,
    }
    if result.transition is not None:
        model["transition_smoothing"] = TRANSITION_SMOOTHING
        model["top_confusions"] = top_confusions(result.transition.cpu().numpy(), fs.classnames)
    return scores, model


def top_confusions(transition: np.ndarray, classnames: Sequence[str], most: int = 10) -> list[dict[str, Any]]:
    """The largest off-diagonal entries P(given | true) of a noise matrix, largest first."""
    off = transition.copy()
    np.fill_diagonal(off, -1.0)
    order = np.argsort(-off, axis=None, kind="stable")[:most]
    return [
        {"true": classnames[k], "given": classnames[j], "p": float(transition[k, j])}
        for k, j in zip(*np.unravel_index(order, off.shape))
        if k != j
    ]


@dataclass
class CleanResult:
    """What clean computed: the scores table, the cleaned table and a summary (counts, metrics, provenance)."""

    summary: dict[str, Any]
    score_columns: list[str]
    score_rows: list[dict[str, str]]
    clean_columns: list[str]
    clean_rows: list[dict[str, str]]


@dataclass
class CleanOptions:
    """What ``promptcli clean`` takes besides its files; each field is the option of the same name
    (``promptcli clean --help`` says what it does, docs/cleaning.md how the scores work)."""

    prompts: list[str | Path]  # --prompt: the prompt file(s) whose predictions score the labels
    zero_shot: bool = False  # --zero-shot: score with zero-shot CLIP instead of a prompt
    templates: list[str] | None = None  # --template (with --zero-shot)
    template_set: str | None = None  # --templates (with --zero-shot)
    score: str = "margin"  # --score: margin or posterior
    noise_rate: float | None = None  # --noise-rate: the posterior's noise rate (None: estimated)
    fit_weights: bool | None = None  # --fit-weights / --fixed-weights (None: the score's default)
    noise_model: str = "symmetric"  # --noise-model: symmetric or class
    threshold: float | None = None  # --threshold: flag rows scoring below it
    keep_fraction: float | None = None  # --keep-fraction: keep this share of the rows
    relabel: bool = False  # --relabel: give suspects the predicted class instead of dropping them
    relabel_confidence: float | None = None  # --relabel-confidence (None: DEFAULT_RELABEL_CONFIDENCE)
    skip_missing: bool = False  # --skip-missing: drop label rows the features lack
    pretrained: str | None = None  # --pretrained: the features' checkpoint, when moved
    device: str = "auto"  # --device

    def __post_init__(self) -> None:
        self.prompts = one_or_many(self.prompts)  # one prompt file given as a path, not a list
        self.templates = one_or_many(self.templates) or None

    def validate(self) -> CleanOptions:
        check_selection(self.threshold, self.keep_fraction, self.score)
        require_prior(self.prompts, self.zero_shot)
        if (self.templates or self.template_set) and not self.zero_shot:
            raise InputError(
                "applies only with --zero-shot",
                where="--template" if self.templates else "--templates",
                hint="a prompt file brings its own prompt; add --zero-shot to score with zero-shot templates",
            )
        if self.relabel_confidence is not None and not self.relabel:
            raise InputError(
                "--relabel-confidence applies with --relabel",
                where="--relabel-confidence",
                hint="add --relabel",
            )
        if not 0.0 < self.confidence <= 1.0:
            raise InputError(
                f"must be in (0, 1], got {self.confidence}",
                where="--relabel-confidence",
                hint="the predicted class's probability a relabel needs, e.g. 0.5",
            )
        NoiseModel.check(self.noise_model, "--noise-model")
        given_model = None if self.noise_model == NoiseModel.SYMMETRIC.value else self.noise_model
        for value, option in (
            (self.noise_rate, "--noise-rate"),
            (self.fit_weights, "--fit-weights/--fixed-weights"),
            (given_model, "--noise-model"),
        ):
            if value is not None and self.score != "posterior":
                raise InputError(
                    "applies only with --score posterior", where=option, hint="add --score posterior"
                )
        return self

    @property
    def confidence(self) -> float:
        """The relabel confidence in force (the default when not given)."""
        return DEFAULT_RELABEL_CONFIDENCE if self.relabel_confidence is None else self.relabel_confidence


def clean_labels(
    features_path: str | Path,
    labels_path: str | Path,
    options: CleanOptions,
    on_fit_step: Callable[[], None] | None = None,
) -> CleanResult:
    """Score every label row, flag suspects, drop or relabel them; count everything.

    ``on_fit_step()`` is called after each grid point when the posterior's weights are fitted."""
    from promptcli.analysis.evaluation import prompt_provenance
    from promptcli.io import provenance
    from promptcli.io.features import read_features
    from promptcli.io.fileio import sha256_file
    from promptcli.io.labels import labels_sha256, read_labels

    o = options.validate()
    table = read_labels(labels_path)
    # only the labelled images are read and scored: the file may hold a million beside a 16-shot label set
    fs = read_features(features_path, load_views=False, only_paths=table.column("path"))
    if len(fs.classnames) < 2:
        raise InputError(
            f"finding wrong labels needs at least 2 classes, the features have {len(fs.classnames)}",
            where=fs.path,
            hint="extract features of a dataset with two or more classes",
        )
    labels_sha = labels_sha256(table, labels_path)
    has_noisy = table.has("is_noisy")
    if o.relabel and has_noisy and not table.has("clean_label"):
        raise InputError(
            "the labels have is_noisy but no clean_label, so a relabelled row's is_noisy is unknown",
            where=table.source,
            hint="add the clean_label column, or clean without --relabel",
        )
    joined, table_rows = _join(fs, table, o.skip_missing)
    prior = prior_probabilities(
        fs,
        o.prompts,
        zero_shot=o.zero_shot,
        templates=o.templates,
        template_set=o.template_set,
        pretrained=o.pretrained,
        device=o.device,
    )
    scores, fitted_model = _scores(fs, joined, prior, o, on_fit_step)
    suspect = select_suspects(
        scores.score, threshold=o.threshold, keep_fraction=o.keep_fraction, kind=o.score
    )
    relabelled = (
        relabel_mask(suspect, scores.predicted, scores.p_predicted, joined.labels, o.confidence)
        if o.relabel
        else np.zeros(len(suspect), dtype=bool)
    )
    action, score_rows, clean_rows = _apply(
        table, table_rows, fs.classnames, scores, suspect, relabelled, has_noisy
    )
    counts = _counts(action, len(table_rows), suspect, clean_rows)
    summary: dict[str, Any] = {
        "features": str(fs.path),
        "features_sha256": sha256_file(fs.path),
        "labels": table.source,
        "labels_sha256": labels_sha,
        "model": {k: fs.attrs.get(k, "") for k in ("model_name", "pretrained", "checkpoint_sha256")},
        "prompts": [prompt_provenance(p, sha256_file(p.path)) for p in prior.prompts],
        "ensemble": len(prior.prompts) > 1,
        "zero_shot": {"templates": prior.templates} if o.zero_shot else None,
        "score": o.score,
        "score_definition": SCORE_DEFINITIONS[o.score],
        "noise_model": fitted_model,
        "options": {
            "threshold": DEFAULT_THRESHOLDS[o.score]
            if o.threshold is None and o.keep_fraction is None
            else o.threshold,
            "noise_rate": o.noise_rate,
            "fit_weights": o.fit_weights,
            "noise_model": o.noise_model if o.score == "posterior" else None,
            "keep_fraction": o.keep_fraction,
            "relabel": o.relabel,
            "relabel_confidence": o.confidence if o.relabel else None,
            "skip_missing": o.skip_missing,
        },
        "counts": counts,
        "detection": _detection(joined, scores, suspect, relabelled, clean_rows, o.relabel),
        "skipped_paths": [table.rows[t].get("path", "") for t in range(len(table)) if action[t] == "skipped"][
            :20
        ],
        **provenance.base_provenance(),
    }
    passthrough = [c for c in table.columns if c not in SCORE_COLUMNS]
    return CleanResult(summary, passthrough + SCORE_COLUMNS, score_rows, list(table.columns), clean_rows)


def _join(fs: FeatureSet, table: LabelTable, skip_missing: bool) -> tuple[Any, np.ndarray]:
    """The label rows joined to the features, and which table row each joined row is."""
    from promptcli.io.labels import join_labels

    joined = join_labels(fs, table, skip_missing=skip_missing)
    table_rows = joined_table_rows(fs, table) if skip_missing else np.arange(len(table))
    by_path = fs.index_by_path()
    if len(table_rows) != len(joined.rows) or any(
        by_path[table.rows[t]["path"]] != r for t, r in zip(table_rows, joined.rows)
    ):
        raise RuntimeFailure("label rows and feature rows fell out of step", hint="report this as a bug")
    return joined, table_rows


def _scores(
    fs: FeatureSet, joined: Any, prior: Prior, o: CleanOptions, on_fit_step: Callable[[], None] | None
) -> tuple[Scores, dict[str, Any] | None]:
    """Each joined row's score (margin, or the posterior with the noise model it fitted)."""
    probs = prior.probs[joined.rows]
    if o.score != "posterior":
        return label_scores(probs, joined.labels), None
    return posterior_scores(
        fs,
        joined.rows,
        joined.labels,
        probs,
        model_logit_scale(fs, prior, o.pretrained, o.device),
        o.noise_rate,
        o.zero_shot if o.fit_weights is None else o.fit_weights,
        device=o.device,
        on_fit_step=on_fit_step,
        noise_model=o.noise_model,
    )


def _apply(
    table: LabelTable,
    table_rows: np.ndarray,
    names: Sequence[str],
    scores: Scores,
    suspect: np.ndarray,
    relabelled: np.ndarray,
    has_noisy: bool,
) -> tuple[list[str], list[dict[str, str]], list[dict[str, str]]]:
    """Each table row's action, the scored rows (every row) and the cleaned rows (kept or relabelled)."""
    dropped = suspect & ~relabelled
    action = ["skipped"] * len(table)
    per_row: list[dict[str, str] | None] = [None] * len(table)
    for j, t in enumerate(table_rows):
        action[t] = "relabelled" if relabelled[j] else ("dropped" if dropped[j] else "kept")
        per_row[t] = {
            "score": f"{scores.score[j]:.6f}",
            "p_label": f"{scores.p_label[j]:.6f}",
            "predicted": names[scores.predicted[j]],
            "p_predicted": f"{scores.p_predicted[j]:.6f}",
            "suspect": "1" if suspect[j] else "0",
        }
    score_rows: list[dict[str, str]] = []
    clean_rows: list[dict[str, str]] = []
    for t, row in enumerate(table.rows):
        extra = per_row[t] or dict.fromkeys(SCORE_COLUMNS[:-1], "")
        score_rows.append({**row, **extra, "action": action[t]})
        if action[t] == "kept":
            clean_rows.append(dict(row))
        elif action[t] == "relabelled":
            new = dict(row, label=extra["predicted"])
            if has_noisy:
                new["is_noisy"] = "1" if new["label"] != new["clean_label"] else "0"
            clean_rows.append(new)
    return action, score_rows, clean_rows


def _counts(action: list[str], n_scored: int, suspect: np.ndarray, clean_rows: list) -> dict[str, int]:
    """How many rows went each way; they must add up to the rows read."""
    by = {a: action.count(a) for a in ACTIONS}
    counts = {
        "rows_in": len(action),
        "scored": n_scored,
        "skipped": by["skipped"],
        "suspect": int(suspect.sum()),
        "kept": by["kept"] + by["relabelled"],
        "kept_unchanged": by["kept"],
        "relabelled": by["relabelled"],
        "dropped": by["dropped"],
    }
    if (
        counts["kept"] + counts["dropped"] + counts["skipped"] != len(action)
        or len(clean_rows) != counts["kept"]
    ):
        raise RuntimeFailure("cleaning counts do not add up", hint="report this as a bug")
    return counts


def _detection(
    joined: Any, scores: Scores, suspect: np.ndarray, relabelled: np.ndarray, clean_rows: list, relabel: bool
) -> dict[str, Any] | None:
    """Detection metrics against the labels' own is_noisy, and relabel accuracy against clean_label."""
    detection = None
    if joined.is_noisy is not None:
        detection = detection_metrics(scores.score, suspect, joined.is_noisy)
        after = [r["is_noisy"] == "1" for r in clean_rows]
        detection["noise_rate_before"] = float(joined.is_noisy.mean())
        detection["noise_rate_after"] = float(np.mean(after)) if after else None
        detection["n_noisy_after"] = int(sum(after))
    if relabel and joined.clean is not None and relabelled.any():
        correct = scores.predicted[relabelled] == joined.clean[relabelled]
        detection = detection or {}
        detection["relabel_accuracy"] = float(correct.mean())
    return detection


# Keys of a labels sidecar that describe that one file, not the noise condition it was drawn under.
SOURCE_FILE_KEYS = (
    "n_rows",
    "n_noisy",
    "output",
    "command",
    "created",
    "cwd",
    "git",
    "libraries",
    "input",
    "input_sha256",
    "csv_sha256",
    "transition_counts",
    "per_class_counts",
)


def clean_sidecar(summary: dict[str, Any], labels_path: str | Path) -> dict[str, Any]:
    """The cleaned labels' sidecar: the source labels' noise record carried forward, plus ``cleaning``.

    The top-level keys (type, rate, seed, ...) keep describing the noise injected into the source
    labels, so a prompt tuned on the cleaned file is reported under the same noise condition;
    ``cleaning`` says how this file was made from it (an earlier one moves to ``cleaning.previous``)
    and holds the source file's own record (``SOURCE_FILE_KEYS``) under ``cleaning.source``.
    """
    from promptcli.io.sidecar import read_sidecar

    source, noise = read_sidecar(labels_path)
    record = dict(summary, noise_sidecar=None if source is None else str(source))
    out = dict(noise or {})
    if "cleaning" in out:
        record["previous"] = out.pop("cleaning")
    # what described the source file itself (its rows, its noisy count, how it was written) would
    # misdescribe this one: kept under cleaning.source
    own = {k: out.pop(k) for k in SOURCE_FILE_KEYS if k in out}
    if own:
        record["source"] = own
    out["cleaning"] = record
    return out


def clean_file(
    features_path: str | Path,
    labels_path: str | Path,
    options: CleanOptions,
    *,
    output: str | None = None,
    clean_out: str | None = None,
    json_out: bool = False,
    force: bool = False,
    on_fit_step: Callable[[], None] | None = None,
) -> CleanResult:
    """``promptcli clean`` as one step: check the outputs, :func:`clean_labels`, write CSVs and sidecars.

    ``output`` gets every row with its score and action, ``clean_out`` the kept rows (a labels CSV);
    each file gets a ``.json`` sidecar (not on stdout, ``-``).
    """
    from promptcli.io.fileio import STDIO, check_distinct, check_output_path
    from promptcli.io.labels import write_labels
    from promptcli.io.sidecar import write_sidecar

    o = options.validate()
    to_stdout = [name for name, v in (("-o", output), ("--clean-out", clean_out)) if v == STDIO]
    if len(to_stdout) > 1 or (to_stdout and json_out):
        raise InputError(
            "only one of -o -, --clean-out - and --json can use stdout",
            where="/".join(to_stdout + (["--json"] if json_out else [])),
            hint="write the others to files",
        )
    for path, option in ((output, "-o"), (clean_out, "--clean-out")):
        if path is not None and path != STDIO:
            check_output_path(path, force, option=option)
            check_output_path(f"{path}.json", force, option=option)
    if output is not None and output == clean_out:
        raise InputError("-o and --clean-out name the same file", where=output, hint="give two file names")
    sides = {f"{name} sidecar": f"{v}.json" for name, v in (("-o", output), ("--clean-out", clean_out)) if v}
    sides = {k: v for k, v in sides.items() if v != f"{STDIO}.json"}
    inputs: dict[str, str | Path | None] = {"FEATURES": features_path, "LABELS": labels_path}
    if str(labels_path) != STDIO:  # its noise record is carried into the outputs' sidecars
        inputs["the labels' sidecar LABELS.json"] = f"{labels_path}.json"
    for i, prompt in enumerate(o.prompts, start=1):
        inputs["--prompt" if len(o.prompts) == 1 else f"--prompt #{i}"] = prompt
    check_distinct(inputs, {"-o": output, "--clean-out": clean_out, **sides})
    result = clean_labels(features_path, labels_path, o, on_fit_step)
    if clean_out is not None and not result.clean_rows:  # an empty file would only fail later, in tune
        raise InputError(
            "every row was dropped: --clean-out would hold no labels (nothing was written)",
            where="--threshold" if o.threshold is not None else "--clean-out",
            hint="raise --threshold, use --keep-fraction, or --relabel the suspects instead of dropping them",
        )
    result.summary["output"] = output
    result.summary["clean_out"] = clean_out
    if output is not None:
        write_labels(output, result.score_columns, result.score_rows)
        if output != STDIO:
            write_sidecar(output, result.summary)
    if clean_out is not None:
        write_labels(clean_out, result.clean_columns, result.clean_rows)
        if clean_out != STDIO:
            write_sidecar(clean_out, clean_sidecar(result.summary, labels_path))
    return result
