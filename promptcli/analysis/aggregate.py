"""Aggregation: runs grouped into series, mean and spread over seeds, training curves and gradient ratios.

Runs are grouped into series by method, loss (with its parameters), shots and model, and by noise
type and rate; everything else (the seed above all) is what the mean and spread are taken over.
A noise rate of 0 is "no noise" whatever its type. Numbers are aggregated over sorted values so the
result does not depend on the order files are read in.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from promptcli.analysis.results import NO_NOISE, EvalRun, GradRun, LogRun, Results, SeriesKey, SourceFile
from promptcli.errors import InputError

METRICS = {"top1": "top-1 accuracy", "top5": "top-5 accuracy", "macro": "macro accuracy"}

# --- aggregation -------------------------------------------------------------------------------------


def stats(values: Iterable[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value), min, max and n, of sorted values."""
    arr = np.sort(np.asarray(list(values), dtype=np.float64))
    n = int(arr.size)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if n > 1 else None,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": n,
    }


def _labeller(keys: Iterable[SeriesKey]) -> Callable[[SeriesKey], str]:
    """Labels "method + loss", with parameters, shots or model only where they tell series apart."""
    keys = set(keys)
    params_by_loss = defaultdict(set)
    settings_by_method = defaultdict(set)
    for k in keys:
        settings_by_method[k.method].add(k.method_params)
        if k.loss_params:
            params_by_loss[(k.method, k.loss)].add(k.loss_params)
    many_shots = len({k.shots for k in keys if k.shots}) > 1
    many_models = len({k.model for k in keys if k.model}) > 1

    def label(k: SeriesKey) -> str:
        text = k.method
        if len(settings_by_method[k.method]) > 1 and k.method_params:
            text += f" ({k.method_params})"
        text += f" + {k.loss}" if k.loss else ""
        if len(params_by_loss[(k.method, k.loss)]) > 1:
            text += f" ({k.loss_params})"
        if many_shots and k.shots:
            text += f", {k.shots}-shot"
        if many_models and k.model:
            text += f" [{k.model}]"
        if k.variant:
            text += f", {k.variant}"
        return text

    return label


@dataclass
class Report:
    """The aggregated numbers a report shows (``to_dict`` is the ``--json`` output)."""

    metric: str
    accuracy: list[dict[str, Any]]  # series, noise_type, noise_rate, mean, std, min, max, n, seeds
    zero_shot: list[dict[str, Any]]  # model, label, mean, std, min, max, n
    curves: list[dict[str, Any]]  # series, noise_type, noise_rate, epochs, accuracy/clean_accuracy stats
    gradients: list[dict[str, Any]]  # series, noise_type, noise_rate, epochs, ratio stats
    files: list[SourceFile]
    skipped: list[str]
    warnings: list[str]
    models: list[str]

    def noise_types(self) -> list[str]:
        """Noise types with a nonzero rate among the accuracy results (sorted)."""
        return sorted({c["noise_type"] for c in self.accuracy if c["noise_type"] != NO_NOISE})

    def columns(self) -> list[tuple[str, float]]:
        return sorted(
            {(c["noise_type"], c["noise_rate"]) for c in self.accuracy}, key=lambda t: (t[1] > 0, t[0], t[1])
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "accuracy": self.accuracy,
            "zero_shot": self.zero_shot,
            "training_curves": self.curves,
            "gradient_ratio": self.gradients,
            "models": self.models,
            "files": [vars(f) for f in self.files],
            "skipped": self.skipped,
            "warnings": self.warnings,
        }


def _seed_sort(seed: Any) -> tuple:
    return (seed is None, str(type(seed)), seed if isinstance(seed, (int, float)) else str(seed))


def _per_epoch(runs: Sequence[dict[int, float]]) -> tuple[list[int], list[dict[str, Any]]]:
    epochs = sorted({e for run in runs for e in run})
    return epochs, [stats(run[e] for run in runs if e in run) for e in epochs]


def _focus_rate(rates: Iterable[float | None], wanted: float | None) -> float | None:
    """The noise rate training curves are drawn at: ``wanted``, else the highest one present."""
    present = {r for r in rates}
    if wanted is not None:
        return round(wanted, 6)
    known = [r for r in present if r is not None]
    return max(known) if known else None


def _grad_epoch_ratio(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Per epoch: mean per-sample gradient norm of the noisy samples over that of the clean ones."""
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for row in rows:
        acc = sums[row["epoch"]]
        if row["n_noisy"] > 0 and math.isfinite(row["noisy_grad_norm"]):
            acc[0] += row["n_noisy"] * row["noisy_grad_norm"]
            acc[1] += row["n_noisy"]
        if row["n_clean"] > 0 and math.isfinite(row["clean_grad_norm"]):
            acc[2] += row["n_clean"] * row["clean_grad_norm"]
            acc[3] += row["n_clean"]
    return {
        epoch: (a[0] / a[1]) / (a[2] / a[3])
        for epoch, a in sums.items()
        if a[1] > 0 and a[3] > 0 and a[2] > 0
    }


def aggregate(results: Results, metric: str = "top1", curve_rate: float | None = None) -> Report:
    """Mean and spread over seeds of every series at every noise rate; curves at one noise rate."""
    if metric not in METRICS:
        raise InputError(
            f"unknown metric {metric!r}", where="--metric", hint=f"use one of {', '.join(METRICS)}"
        )
    warnings = list(results.warnings)
    keys = [r.key for r in results.evals] + [g.key for g in results.grads]
    keys += [log.key for log in results.logs if log.key is not None]
    label = _labeller(keys)
    models = sorted({k.model for k in keys if k.model})
    if len(models) > 1:
        warnings.append(
            f"results come from {len(models)} models ({'; '.join(models)}): labels name the model"
        )

    groups: dict[tuple, list[EvalRun]] = defaultdict(list)
    zero: dict[str, list[EvalRun]] = defaultdict(list)
    for run in results.evals:
        if run.zero_shot:
            zero[run.key.model].append(run)
        else:
            groups[(label(run.key), run.noise_type, run.noise_rate)].append(run)
    accuracy = []
    for (series, noise_type, rate), runs in sorted(groups.items()):
        accuracy.append(
            {
                "series": series,
                "method": runs[0].key.method,
                "loss": runs[0].key.loss,
                "noise_type": noise_type,
                "noise_rate": rate,
                **stats(r.metrics[metric] for r in runs),
                "seeds": sorted((r.seed for r in runs), key=_seed_sort),
            }
        )
    zero_shot = [
        {
            "model": model,
            "label": "zero-shot CLIP" + (f" [{model}]" if len(models) > 1 and model else ""),
            **stats(r.metrics[metric] for r in runs),
        }
        for model, runs in sorted(zero.items())
    ]

    curves = []
    logs = results.logs
    unlabelled = sorted((log for log in logs if log.key is None), key=lambda log: log.sha256)
    names = {id(log): f"unlabelled run {i}" for i, log in enumerate(unlabelled, start=1)}
    rate = _focus_rate((log.noise_rate for log in logs if log.key is not None), curve_rate)
    log_groups: dict[tuple, list[LogRun]] = defaultdict(list)
    for log in logs:
        if log.key is None:
            log_groups[(names[id(log)], "", None)].append(log)
        elif log.noise_rate == rate:
            log_groups[(label(log.key), log.noise_type, log.noise_rate)].append(log)
    for (series, noise_type, noise_rate), runs in sorted(log_groups.items(), key=lambda kv: str(kv[0])):
        epochs, acc = _per_epoch([{e["epoch"]: e["accuracy"] for e in run.epochs} for run in runs])
        clean_runs = [
            {e["epoch"]: e["clean_accuracy"] for e in run.epochs if e["clean_accuracy"] is not None}
            for run in runs
        ]
        clean_epochs, clean = _per_epoch([c for c in clean_runs if c])
        curves.append(
            {
                "series": series,
                "noise_type": noise_type,
                "noise_rate": noise_rate,
                "n_runs": len(runs),
                "epochs": epochs,
                "accuracy": acc,
                "clean_epochs": clean_epochs,
                "clean_accuracy": clean,
            }
        )

    if curve_rate is not None and logs and not any(c["noise_rate"] == rate for c in curves):
        warnings.append(f"no tune log at noise rate {curve_rate:g}: no labelled training curves")
    gradients = []
    grate = _focus_rate((g.noise_rate for g in results.grads), curve_rate)
    grad_groups: dict[tuple, list[GradRun]] = defaultdict(list)
    for run in results.grads:
        if run.noise_rate == grate:
            grad_groups[(label(run.key), run.noise_type, run.noise_rate)].append(run)
    for (series, noise_type, noise_rate), runs in sorted(grad_groups.items()):
        per_run = [r for r in (_grad_epoch_ratio(run.rows) for run in runs) if r]
        if not per_run:
            warnings.append(f"{series}: no step has both noisy and clean samples; no gradient ratio")
            continue
        epochs, ratio = _per_epoch(per_run)
        gradients.append(
            {
                "series": series,
                "noise_type": noise_type,
                "noise_rate": noise_rate,
                "n_runs": len(per_run),
                "epochs": epochs,
                "ratio": ratio,
            }
        )
    return Report(
        metric, accuracy, zero_shot, curves, gradients, results.files, results.skipped, warnings, models
    )
