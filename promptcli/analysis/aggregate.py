"""Aggregation: runs grouped into series, mean and spread over seeds, training curves and gradient ratios.

Runs are grouped into series by everything in their :class:`SeriesKey` (method and its settings,
loss and its parameters, shots, model, how the labels were made, the test set, the prompt and
schedule settings), and by noise type and rate; the seed is what the mean and spread are taken over.
Labels name what tells series apart; if two keys would still read the same, the runs are pooled with
a warning naming the difference. A noise rate of 0 is "no noise" whatever its type; labels without a
noise sidecar are ``NOISE_UNKNOWN``, a column of their own. Numbers are aggregated over sorted values
so the result does not depend on the order files are read in.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from promptcli.analysis.results import (
    NO_NOISE,
    NOISE_UNKNOWN,
    PER_RUN_SETTINGS,
    SPLIT_SETTINGS,
    EvalRun,
    GradRun,
    LogRun,
    Results,
    SeriesKey,
    SourceFile,
)
from promptcli.errors import InputError
from promptcli.io.sidecar import REALISED_TOLERANCE

METRICS = {"top1": "top-1 accuracy", "top5": "top-5 accuracy", "macro": "macro accuracy"}
ZERO_SHOT_LABEL = "zero-shot CLIP"

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


def _setting_names(records: Iterable[dict[str, str]]) -> list[str]:
    """The settings named in ``records``, in the order SPLIT_SETTINGS gives them."""
    order = {name: i for i, name in enumerate(SPLIT_SETTINGS)}
    return sorted({n for r in records for n in r}, key=lambda n: (order.get(n, len(order)), n))


def _differing_settings(keys: Iterable[SeriesKey]) -> dict[str, list[str]]:
    """Per method: the settings whose recorded values differ between its series (keys that record no
    settings, such as logs written before tune recorded them, take no part)."""
    by_method: dict[str, list[dict[str, str]]] = defaultdict(list)
    for k in keys:
        if k.settings:
            by_method[k.method].append(dict(k.settings))
    differing = {}
    for method, records in by_method.items():
        # a setting one kind of record does not keep (gradstats' options lack ctx_init) tells nothing apart
        differing[method] = [n for n in _setting_names(records) if len({r[n] for r in records if n in r}) > 1]
    return differing


def _labeller(keys: Iterable[SeriesKey]) -> Callable[[SeriesKey], str]:
    """Labels "method + loss", with parameters, settings, shots, model or test set only where they tell
    series apart."""
    keys = set(keys)
    params_by_loss = defaultdict(set)
    settings_by_method = defaultdict(set)
    for k in keys:
        settings_by_method[k.method].add(k.method_params)
        if k.loss_params:
            params_by_loss[(k.method, k.loss)].add(k.loss_params)
    differing = _differing_settings(keys)
    many_shots = len({k.shots for k in keys if k.shots}) > 1
    many_models = len({k.model for k in keys if k.model}) > 1
    many_tests = len({k.test for k in keys if k.test}) > 1

    def label(k: SeriesKey) -> str:
        text = ZERO_SHOT_LABEL if k.method == "zero-shot" else k.method
        own = [k.method_params] if len(settings_by_method[k.method]) > 1 and k.method_params else []
        recorded = dict(k.settings)
        own += [f"{n}={recorded.get(n, '?')}" for n in differing.get(k.method, []) if k.settings]
        if own:
            text += f" ({', '.join(own)})"
        text += f" + {k.loss}" if k.loss else ""
        if len(params_by_loss[(k.method, k.loss)]) > 1:
            text += f" ({k.loss_params})"
        if many_shots and k.shots:
            text += f", {k.shots}-shot"
        if many_models and k.model:
            text += f" [{k.model}]"
        if k.variant:
            text += f", {k.variant}"
        if many_tests and k.test:
            text += f", on {k.test}"
        return text

    return label


def _pooled_warnings(label: Callable[[SeriesKey], str], keys: Iterable[SeriesKey]) -> list[str]:
    """A warning for each label that stands for runs of different keys, naming what differs."""
    by_label: dict[str, set[SeriesKey]] = defaultdict(set)
    for k in keys:
        by_label[label(k)].add(k)
    warnings = []
    for text, group in sorted(by_label.items()):
        if len(group) < 2:
            continue
        fields = [
            f
            for f in SeriesKey.__dataclass_fields__
            if f != "settings" and len({getattr(k, f) for k in group}) > 1
        ]
        records = [dict(k.settings) for k in group]
        fields += [n for n in _setting_names(records) if len({r.get(n, "not recorded") for r in records}) > 1]
        warnings.append(f"{text}: pools runs that differ in {', '.join(fields) or 'settings'}")
    return warnings


def _repeated_seed_warnings(
    series: str, cells: Sequence[tuple[float | None, Sequence[EvalRun]]]
) -> list[str]:
    """A warning for each mean that holds two runs of one seed (and one noise draw): they differ in something
    their files do not record, so the spread is not over seeds."""
    warnings = []
    for rate, runs in cells:
        by_seed: dict[tuple[str, str], list[str]] = defaultdict(list)
        for r in runs:
            if r.seed is not None:
                by_seed[(str(r.seed), str(r.noise_seed))].append(r.source)
        for (seed, _), sources in sorted(by_seed.items()):
            if len(sources) > 1:
                where = "unknown" if rate is None else f"{rate:g}"
                warnings.append(
                    f"{series}: {len(sources)} runs of seed {seed} pooled at noise rate {where} "
                    f"({', '.join(sources[:3])}{', ...' if len(sources) > 3 else ''}): they differ in something "
                    "their files do not record; report them from separate folders"
                )
    return warnings


def _realised_rate_warnings(runs: Sequence[EvalRun], most: int = 5) -> list[str]:
    """A warning for each run filed under a noise rate its labels do not have (corrupt rounds flips per class)."""
    off = [
        r
        for r in runs
        if r.noise_rate is not None
        and r.realised_rate is not None
        and abs(r.realised_rate - r.noise_rate) > REALISED_TOLERANCE
    ]
    warnings = [
        f"{r.source}: its labels' realised noise rate is {r.realised_rate:.1%}, filed under the rate asked "
        f"for, {r.noise_rate:g} (corrupt rounds the flips per class)"
        for r in off[:most]
    ]
    if len(off) > most:
        warnings.append(
            f"... and {len(off) - most} more runs whose realised noise rate is off their column's"
        )
    return warnings


def _per_run_warnings(series: str, cells: Sequence[tuple[float | None, Sequence[EvalRun]]]) -> list[str]:
    """A warning for each of PER_RUN_SETTINGS whose value differs between runs pooled into one mean."""
    warnings = []
    for name, reason in PER_RUN_SETTINGS.get(cells[0][1][0].key.method, {}).items():
        values: set[str] = set()
        rates = []
        for rate, runs in cells:
            found = {dict(r.per_run).get(name, "not recorded") for r in runs}
            if len(found) > 1:
                values |= found
                rates.append("unknown" if rate is None else f"{rate:g}")
        if rates:
            warnings.append(
                f"{series}: runs pooled at noise rate {', '.join(rates)} differ in {name} "
                f"({', '.join(sorted(values))}): {reason}"
            )
    return warnings


@dataclass
class Report:
    """The aggregated numbers a report shows (``to_dict`` is the ``--json`` output)."""

    metric: str
    accuracy: list[dict[str, Any]]  # series, test, noise_type, noise_rate, mean, std, min, max, n, seeds
    zero_shot: list[dict[str, Any]]  # model, test, label, mean, std, min, max, n
    curves: list[dict[str, Any]]  # series, noise_type, noise_rate, epochs, accuracy/clean_accuracy stats
    gradients: list[dict[str, Any]]  # series, noise_type, noise_rate, epochs, ratio stats
    files: list[SourceFile]
    skipped: list[str]
    warnings: list[str]
    models: list[str]

    def noise_types(self) -> list[str]:
        """Noise types with a nonzero rate among the accuracy results (sorted; not NOISE_UNKNOWN)."""
        return sorted(
            {c["noise_type"] for c in self.accuracy if c["noise_type"] not in (NO_NOISE, NOISE_UNKNOWN)}
        )

    def columns(self) -> list[tuple[str, float | None]]:
        """(noise type, rate) of the table's columns: no noise first, NOISE_UNKNOWN (rate None) last."""
        return sorted(
            {(c["noise_type"], c["noise_rate"]) for c in self.accuracy},
            key=lambda t: (t[1] is None, (t[1] or 0.0) > 0, t[0], t[1] or 0.0),
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


def _cell_order(cell: tuple[str, str, float | None]) -> tuple:
    series, noise_type, rate = cell
    return (series, noise_type, rate is None, rate or 0.0)


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

    kinds = [
        [r.key for r in results.evals if not r.zero_shot],
        [r.key for r in results.evals if r.zero_shot],
        [log.key for log in results.logs if log.key is not None],
        [g.key for g in results.grads],
    ]
    warnings += list(dict.fromkeys(w for kind in kinds for w in _pooled_warnings(label, kind)))
    tests = sorted({r.key.test for r in results.evals if r.key.test})
    if len(tests) > 1:
        warnings.append(
            f"results are on {len(tests)} test sets ({'; '.join(tests)}): labels name the test set"
        )
    unknown = sorted(r.source for r in results.evals if r.noise_type == NOISE_UNKNOWN)
    if unknown:
        warnings.append(
            f"{len(unknown)} eval result(s) ({unknown[0]}{', ...' if len(unknown) > 1 else ''}) were tuned on "
            f"labels without a noise rate on record (no noise sidecar): in the table's '{NOISE_UNKNOWN}' column, not in the figure"
        )

    warnings += _realised_rate_warnings(results.evals)
    groups: dict[tuple, list[EvalRun]] = defaultdict(list)
    zero: dict[str, list[EvalRun]] = defaultdict(list)
    for run in results.evals:
        if run.zero_shot:
            zero[label(run.key)].append(run)
        else:
            groups[(label(run.key), run.noise_type, run.noise_rate)].append(run)
    accuracy = []
    by_series: dict[str, list[tuple[float | None, list[EvalRun]]]] = defaultdict(list)
    for (series, _, rate), runs in sorted(groups.items(), key=lambda kv: _cell_order(kv[0])):
        by_series[series].append((rate, runs))
    for series, cells in sorted(by_series.items()):
        warnings += _per_run_warnings(series, cells)
        warnings += _repeated_seed_warnings(series, cells)
    for (series, noise_type, rate), runs in sorted(groups.items(), key=lambda kv: _cell_order(kv[0])):
        accuracy.append(
            {
                "series": series,
                "method": runs[0].key.method,
                "loss": runs[0].key.loss,
                "test": runs[0].key.test,
                "noise_type": noise_type,
                "noise_rate": rate,
                **stats(r.metrics[metric] for r in runs),
                "seeds": sorted((r.seed for r in runs), key=_seed_sort),
            }
        )
    zero_shot = [
        {
            "model": runs[0].key.model,
            "test": runs[0].key.test,
            "label": series,
            **stats(r.metrics[metric] for r in runs),
        }
        for series, runs in sorted(zero.items())
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
    for (series, noise_type, noise_rate), runs in sorted(
        grad_groups.items(), key=lambda kv: _cell_order(kv[0])
    ):
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
