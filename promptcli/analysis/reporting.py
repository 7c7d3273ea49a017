"""Experiment reports: read results, aggregate over seeds, draw one figure, render tables.

Three kinds of result files are told apart by their content, never by their names:

- ``eval``: an ``eval --json`` / ``eval -o`` summary (a JSON object with ``zero_shot`` and
  ``metrics.top1``); its method, loss, seed, shots and noise come from the prompt's metadata;
- ``tune-log``: a ``tune --log`` file, one JSON object per epoch (``epoch``, ``accuracy``,
  ``clean_accuracy``, ...); provenance, when present, is an object under ``run`` on a line;
- ``gradstats``: a CSV with the columns in ``GRADSTATS_COLUMNS``, one row per training step.

Runs are grouped into series by method, loss (with its parameters), shots and model, and by noise
type and rate; everything else (the seed above all) is what the mean and spread are taken over.
A noise rate of 0 is "no noise" whatever its type. Numbers are aggregated over sorted values so the
result does not depend on the order files are read in.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptcli.analysis.gradstats import COLUMNS as GRADSTATS_COLUMNS
from promptcli.errors import InputError

_GRAD_INTS = ("epoch", "step", "n_noisy", "n_clean")
_GRAD_FLOATS = (
    "noise_rate",
    "noisy_grad_norm",
    "clean_grad_norm",
    "ratio",
    "noisy_sum_norm",
    "clean_sum_norm",
)
RESULT_SUFFIXES = (".json", ".jsonl", ".csv")
METRICS = {"top1": "top-1 accuracy", "top5": "top-5 accuracy", "macro": "macro accuracy"}
_METRIC_KEYS = {"top1": "top1", "top5": "top5", "macro": "macro_accuracy"}
NO_NOISE = "none"
OUTPUT_FORMATS = {".html": "html", ".htm": "html", ".png": "png", ".md": "md"}


# --- what a series is -----------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class SeriesKey:
    """What distinguishes one experimental condition from another (noise and seed aside)."""

    method: str
    loss: str = ""
    loss_params: str = ""  # "q=0.7", "" when unknown or none
    shots: str = ""  # "16", "" when all data or unknown
    model: str = ""  # "ViT-B-32/openai", "" when unknown
    variant: str = ""  # "OT split", "pseudo-labels", "cleaned": what else set the run apart


def _variant(noise: Any, split: Any) -> str:
    """How the training labels or the training itself differed from plain tuning on given labels."""
    parts = []
    if isinstance(split, dict) and split.get("method") not in (None, "", "none"):
        parts.append(f"{str(split['method']).upper()} split")
    labels = noise.get("labels") if isinstance(noise, dict) else None
    if labels == "pseudo":
        parts.append("pseudo-labels")
    elif labels == "cleaned":
        parts.append("cleaned")
    return ", ".join(parts)


@dataclass
class EvalRun:
    key: SeriesKey
    noise_type: str
    noise_rate: float
    seed: Any
    zero_shot: bool
    metrics: dict[str, float]  # top1, top5, macro
    source: str


@dataclass
class LogRun:
    key: SeriesKey | None  # None: the log carries no provenance
    noise_type: str
    noise_rate: float | None
    seed: Any
    epochs: list[dict[str, Any]]  # epoch, accuracy, clean_accuracy, loss
    source: str
    sha256: str


@dataclass
class GradRun:
    key: SeriesKey
    noise_type: str
    noise_rate: float
    seed: Any
    rows: list[dict[str, Any]]
    source: str


@dataclass
class SourceFile:
    path: str
    kind: str
    sha256: str
    records: int


@dataclass
class Results:
    """Everything read from the result files."""

    evals: list[EvalRun] = field(default_factory=list)
    logs: list[LogRun] = field(default_factory=list)
    grads: list[GradRun] = field(default_factory=list)
    files: list[SourceFile] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # files in folders that are not results
    warnings: list[str] = field(default_factory=list)


# --- finding and classifying files ----------------------------------------------------------------


def find_result_files(paths: Sequence[str | Path]) -> list[tuple[Path, bool]]:
    """Expand folders (recursively: *.json, *.jsonl, *.csv); return (file, named explicitly)."""
    if not paths:
        raise InputError("no results given", where="RESULTS", hint="give result files or folders")
    found: dict[Path, bool] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in RESULT_SUFFIXES:
                    found.setdefault(child, False)
        elif path.is_file():
            found[path] = True
        else:
            raise InputError("no such file or folder", where=path, hint="check the path")
    return sorted(found.items())


def _json_error(exc: json.JSONDecodeError) -> str:
    return f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"


def _parse_jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"not valid JSON ({exc.msg})", where=f"{path}:{number}", hint="fix or remove the line"
            ) from exc
        if not isinstance(obj, dict):
            raise InputError("a log line must be a JSON object", where=f"{path}:{number}")
        rows.append(obj)
    return rows


def _is_eval(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and "zero_shot" in obj
        and isinstance(obj.get("metrics"), dict)
        and "top1" in obj["metrics"]
    )


def _is_log(rows: list[Any]) -> bool:
    return bool(rows) and all(isinstance(r, dict) for r in rows) and any("epoch" in r for r in rows)


def classify(text: str, path: Path) -> tuple[str | None, Any]:
    """(kind, parsed content) of a file's text; kind None when it is not a promptcli result.

    Raises InputError for JSON that cannot be parsed and for a gradstats CSV missing columns.
    """
    stripped = text.lstrip()
    if not stripped:
        return None, None
    if stripped[0] in "{[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            lines = [line for line in text.splitlines() if line.strip()]
            first_is_object = False
            if len(lines) > 1:
                try:
                    first_is_object = isinstance(json.loads(lines[0]), dict)
                except json.JSONDecodeError:
                    pass
            if not first_is_object:
                raise InputError(_json_error(exc), where=path, hint="is the file complete?") from exc
            rows = _parse_jsonl(text, path)
            return ("tune-log", rows) if _is_log(rows) else (None, None)
        if _is_eval(obj):
            return "eval", obj
        if isinstance(obj, dict) and _is_log([obj]):
            return "tune-log", [obj]
        return None, None
    header = next(csv.reader(io.StringIO(stripped)), [])
    header = [h.strip() for h in header]
    if "noisy_grad_norm" in header and "clean_grad_norm" in header:
        missing = [c for c in GRADSTATS_COLUMNS if c not in header]
        if missing:
            raise InputError(
                f"gradstats CSV lacks column(s) {', '.join(missing)}",
                where=path,
                hint="write it with `promptcli gradstats`",
            )
        return "gradstats", list(csv.DictReader(io.StringIO(stripped)))
    return None, None


# --- provenance of each kind ------------------------------------------------------------------------


def _model_label(model: Any) -> str:
    if not isinstance(model, dict):
        return ""
    name = str(model.get("model_name") or "")
    pretrained = str(model.get("pretrained") or "")
    if "/" in pretrained or pretrained.endswith((".safetensors", ".pt", ".bin")):
        pretrained = Path(pretrained).name
    sha = str(model.get("checkpoint_sha256") or "")
    label = f"{name}/{pretrained}" if pretrained else name
    return f"{label} ({sha[:8]})" if sha and label else label


def _params_label(params: Any) -> str:
    if not isinstance(params, dict):
        return ""
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()) if k != "name"
    )


def _noise(noise: Any) -> tuple[str, float | None]:
    """(type, rate) from a corrupt sidecar; rate 0 is 'none'; (none, 0) without a sidecar."""
    if noise is None:
        return NO_NOISE, 0.0
    if not isinstance(noise, dict):
        return "", None
    if noise.get("labels") == "pseudo":  # unsupervised: no injected noise (the series says pseudo-labels)
        return NO_NOISE, 0.0
    rate = noise.get("rate")
    if rate is None:
        rate = noise.get("realised_rate")
    if not isinstance(rate, (int, float)) or isinstance(rate, bool):
        return str(noise.get("type") or ""), None
    rate = round(float(rate), 6)
    return (NO_NOISE if rate == 0 else str(noise.get("type") or "unknown")), rate


def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{what} is not a number ({value!r})", where=where, hint="is the file complete?")
    return float(value)


def eval_run(obj: dict[str, Any], path: Path) -> EvalRun | None:
    """One eval summary as a run; None (with the reason in the caller's warning) if its noise is unknown."""
    metrics = obj["metrics"]
    values = {
        name: _number(metrics.get(key), str(path), f"metrics.{key}") for name, key in _METRIC_KEYS.items()
    }
    zero_shot = bool(obj.get("zero_shot"))
    noise_type, rate = (NO_NOISE, 0.0) if zero_shot else _noise(obj.get("noise"))
    members = [m.get("noise") for m in obj.get("prompts") or [] if isinstance(m, dict)]
    if not zero_shot and obj.get("noise") is None and any(n is not None for n in members):
        return None  # an ensemble of prompts tuned on differently noisy labels: no one noise rate
    if rate is None:
        return None
    key = SeriesKey(
        method="zero-shot" if zero_shot else str(obj.get("method") or "mixed"),
        loss="" if zero_shot else str(obj.get("loss") or ""),
        loss_params="" if zero_shot else _params_label(obj.get("loss_params")),
        shots="" if zero_shot or obj.get("shots") is None else str(obj.get("shots")),
        model=_model_label(obj.get("model")),
        variant="" if zero_shot else _variant(obj.get("noise"), obj.get("split")),
    )
    return EvalRun(key, noise_type, rate, obj.get("seed"), zero_shot, values, str(path))


def _log_provenance(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    for row in rows:
        if isinstance(row.get("run"), dict):
            return row["run"]
    return None


def log_run(rows: list[dict[str, Any]], path: Path, sha256: str) -> LogRun:
    """A tune log as a run; provenance from the ``run`` object its lines carry (if any)."""
    epochs = []
    for number, row in enumerate(rows, start=1):
        if "epoch" not in row:
            continue  # a header line (provenance only)
        where = f"{path}: epoch line {number}"
        clean = row.get("clean_accuracy")
        epochs.append(
            {
                "epoch": int(_number(row.get("epoch"), where, "epoch")),
                "accuracy": _number(row.get("accuracy"), where, "accuracy"),
                "clean_accuracy": None if clean is None else _number(clean, where, "clean_accuracy"),
                "loss": row.get("loss"),
            }
        )
    run = _log_provenance(rows)
    if run is None:
        return LogRun(None, "", None, None, epochs, str(path), sha256)
    loss = run.get("loss")
    loss_params = run.get("loss_params")
    if isinstance(loss, dict):  # {"name": ..., params} as loss_params() gives
        loss_params, loss = loss, loss.get("name")
    noise_type, rate = _noise(run.get("noise"))
    key = SeriesKey(
        method=str(run.get("method") or "unknown"),
        loss=str(loss or ""),
        loss_params=_params_label(loss_params),
        shots="" if run.get("shots") is None else str(run.get("shots")),
        model=_model_label(run.get("model")),
        variant=_variant(run.get("noise"), run.get("split")),
    )
    return LogRun(key, noise_type, rate, run.get("seed"), epochs, str(path), sha256)


def _grad_value(row: dict[str, str], column: str, where: str) -> Any:
    cell = (row.get(column) or "").strip()
    if column in _GRAD_INTS:
        try:
            return int(float(cell))
        except ValueError:
            raise InputError(f"column {column} is not a number ({cell!r})", where=where) from None
    if column in _GRAD_FLOATS:
        if cell == "" or cell.lower() == "nan":
            return math.nan
        try:
            return float(cell)
        except ValueError:
            raise InputError(f"column {column} is not a number ({cell!r})", where=where) from None
    return cell


def grad_runs(rows: list[dict[str, str]], path: Path) -> list[GradRun]:
    """The runs of a gradstats CSV (one per method, loss, noise and seed in it)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for number, raw in enumerate(rows, start=2):
        row = {c: _grad_value(raw, c, f"{path}:{number}") for c in GRADSTATS_COLUMNS}
        rate = round(row["noise_rate"], 6) if math.isfinite(row["noise_rate"]) else 0.0
        noise_type = NO_NOISE if rate == 0 else (row["noise_type"] or "unknown")
        groups[(row["method"], row["loss"], noise_type, rate, row["seed"])].append(row)
    return [
        GradRun(SeriesKey(method, loss), noise_type, rate, seed, group, str(path))
        for (method, loss, noise_type, rate, seed), group in sorted(groups.items(), key=lambda kv: str(kv[0]))
    ]


def read_results(paths: Sequence[str | Path]) -> Results:
    """Read every result file under ``paths``; files in folders that are not results are skipped."""
    from promptcli.io.fileio import sha256_bytes

    results = Results()
    seen: dict[str, str] = {}
    for path, explicit in find_result_files(paths):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            if explicit:
                raise InputError(
                    "not a UTF-8 text file", where=path, hint="give eval/tune/gradstats results"
                ) from None
            results.skipped.append(str(path))
            continue
        kind, content = classify(text, path)
        if kind is None:
            if explicit:
                raise InputError(
                    "not a promptcli result (eval summary, tune log or gradstats CSV)",
                    where=path,
                    hint="give `eval --json` output, a `tune --log` file or a `gradstats` CSV",
                )
            results.skipped.append(str(path))
            continue
        digest = sha256_bytes(data)
        if digest in seen:
            results.warnings.append(f"{path} has the same content as {seen[digest]}; read once")
            continue
        seen[digest] = str(path)
        if kind == "eval":
            run = eval_run(content, path)
            if run is None:
                results.warnings.append(
                    f"{path}: no single noise rate (ensemble of different noise?); not plotted"
                )
                continue
            results.evals.append(run)
            n = 1
        elif kind == "tune-log":
            log = log_run(content, path, digest)
            results.logs.append(log)
            n = len(log.epochs)
        else:
            runs = grad_runs(content, path)
            results.grads.extend(runs)
            n = len(content)
        results.files.append(SourceFile(str(path), kind, digest, n))
    if not results.files:
        where = ", ".join(str(p) for p in paths)
        raise InputError(
            "no results found"
            + (f" ({len(results.skipped)} other file(s) skipped)" if results.skipped else ""),
            where=where,
            hint="give `eval --json` summaries, `tune --log` files or `gradstats` CSVs",
        )
    unlabelled = sum(1 for log in results.logs if log.key is None)
    if unlabelled:
        results.warnings.append(
            f"{unlabelled} tune log(s) carry no provenance (method, loss, noise, seed): each is drawn as "
            "its own unlabelled run"
        )
    return results


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
    for k in keys:
        if k.loss_params:
            params_by_loss[(k.method, k.loss)].add(k.loss_params)
    many_shots = len({k.shots for k in keys if k.shots}) > 1
    many_models = len({k.model for k in keys if k.model}) > 1

    def label(k: SeriesKey) -> str:
        text = k.method + (f" + {k.loss}" if k.loss else "")
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


# --- tables ------------------------------------------------------------------------------------------


def format_cell(cell: dict[str, Any] | None) -> str:
    """ "71.2 ± 1.3 (3)" in percent; no ± for a single run; "—" when absent."""
    if cell is None:
        return "—"
    text = f"{100 * cell['mean']:.1f}"
    if cell["std"] is not None:
        text += f" ± {100 * cell['std']:.1f}"
    return f"{text} ({cell['n']})"


def _column_name(noise_type: str, rate: float, several_types: bool) -> str:
    if noise_type == NO_NOISE:
        return "0"
    return f"{noise_type} {rate:g}" if several_types else f"{rate:g}"


def table(report: Report, noise_type: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the results table: rows method + loss, columns noise rates.

    With ``noise_type``, only that type's columns (and the noise-free one), and only rows with a number.
    """
    columns = [c for c in report.columns() if noise_type is None or c[0] in (noise_type, NO_NOISE)]
    several = noise_type is None and len(report.noise_types()) > 1
    by_cell = {(c["series"], c["noise_type"], c["noise_rate"]): c for c in report.accuracy}
    series = sorted({s for s, t, r in by_cell if (t, r) in columns})
    header = ["method + loss"] + [_column_name(t, r, several) for t, r in columns]
    rows = [[s] + [format_cell(by_cell.get((s, t, r))) for t, r in columns] for s in series]
    for z in report.zero_shot:
        rows.append([z["label"]] + [format_cell(z)] * max(1, len(columns)))
    if not columns and report.zero_shot:
        header.append("no noise")
    return header, rows


def caption(report: Report, noise_type: str | None = None) -> str:
    types = report.noise_types() if noise_type is None else [noise_type]
    noise = f"{' / '.join(types)} label noise" if types else "no label noise"
    return (
        f"Test {METRICS[report.metric]} (%) by label-noise rate ({noise}): mean ± sample std over seeds "
        "(number of runs)."
    )


def markdown_table(report: Report) -> str:
    header, rows = table(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(report: Report) -> str:
    header, rows = table(report)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>"


# --- the figure ----------------------------------------------------------------------------------------

_MARKERS = "osD^vPX*<>"


def _colours(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(labels)}


def _band(ax, xs, st: list[dict[str, Any]], colour, scale: float = 1.0) -> None:
    std = np.array([s["std"] if s["std"] is not None else 0.0 for s in st])
    if len(xs) > 1 and std.any():
        mean = np.array([s["mean"] for s in st])
        ax.fill_between(xs, scale * (mean - std), scale * (mean + std), color=colour, alpha=0.18, linewidth=0)


def _legend(ax, handles: list | None = None) -> None:
    """Inside the axes for a few entries; below them, in two columns, when there are many."""
    if handles is None:
        handles = ax.get_legend_handles_labels()[0]
    if len(handles) <= 6:
        ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.85)
    else:
        ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)


def has_figure(report: Report) -> bool:
    return bool(report.accuracy or report.zero_shot or report.curves or report.gradients)


def _rate_text(noise_type: str, rate: float | None) -> str:
    if rate is None:
        return "noise rate unknown"
    return "no label noise" if noise_type == NO_NOISE or rate == 0 else f"{noise_type} noise, rate {rate:g}"


@dataclass
class _Style:
    colour: dict[str, Any]
    marker: dict[str, str]


def _accuracy_panel(ax, report: Report, noise_type: str, style: _Style, letter: str) -> None:
    """Accuracy against noise rate: mean line, ± std band (error bar for a lone point), zero-shot line."""
    rates: set[float] = set()
    for series in sorted({c["series"] for c in report.accuracy}):
        cells = sorted(
            (
                c
                for c in report.accuracy
                if c["series"] == series and c["noise_type"] in (noise_type, NO_NOISE)
            ),
            key=lambda c: c["noise_rate"],
        )
        if not cells:
            continue
        xs = [c["noise_rate"] for c in cells]
        rates.update(xs)
        ax.errorbar(
            xs,
            [100 * c["mean"] for c in cells],
            yerr=[100 * (c["std"] or 0.0) for c in cells] if len(xs) == 1 else None,
            color=style.colour[series],
            marker=style.marker[series],
            markersize=5,
            linewidth=1.8,
            capsize=3,
            label=series,
        )
        _band(ax, xs, cells, style.colour[series], 100)
    for i, z in enumerate(report.zero_shot):
        ax.axhline(
            100 * z["mean"],
            color=str(0.25 + 0.2 * i),
            linestyle="--",
            linewidth=1.4,
            label=f"{z['label']} ({100 * z['mean']:.1f})",
        )
    if rates:
        ax.set_xticks(sorted(rates))
        ax.set_xticklabels([f"{r:g}" for r in sorted(rates)])
    metric = METRICS[report.metric]
    kind = "" if noise_type == NO_NOISE else f"{noise_type} "
    ax.set_xlabel(f"{kind}label-noise rate")
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title(f"{letter}{metric.capitalize()} vs. {kind}noise rate", loc="left")
    _legend(ax)


def _curves_panel(ax, report: Report, style: _Style, letter: str) -> None:
    """Training accuracy per epoch against the given labels (solid) and the clean labels (dashed)."""
    from matplotlib.lines import Line2D

    for c in report.curves:
        col = style.colour[c["series"]]
        ax.plot(c["epochs"], [100 * s["mean"] for s in c["accuracy"]], color=col, linewidth=1.8)
        _band(ax, c["epochs"], c["accuracy"], col, 100)
        if c["clean_epochs"]:
            clean = [100 * s["mean"] for s in c["clean_accuracy"]]
            ax.plot(c["clean_epochs"], clean, color=col, linewidth=1.8, linestyle="--")
            _band(ax, c["clean_epochs"], c["clean_accuracy"], col, 100)
    handles = [
        Line2D([], [], color=style.colour[c["series"]], linewidth=2, label=c["series"]) for c in report.curves
    ]
    handles += [
        Line2D([], [], color="0.3", linewidth=1.5, label="vs. given (noisy) labels"),
        Line2D([], [], color="0.3", linewidth=1.5, linestyle="--", label="vs. clean labels"),
    ]
    _legend(ax, handles)
    ax.set_ylabel("training-set accuracy (%)")
    focus = next((c for c in report.curves if c["noise_rate"] is not None), None)
    where = _rate_text(focus["noise_type"], focus["noise_rate"]) if focus else "noise unknown"
    ax.set_title(f"{letter}Training curves ({where})", loc="left")


def _gradient_panel(ax, report: Report, style: _Style, letter: str) -> None:
    """Noisy-to-clean per-sample gradient-norm ratio per epoch (log scale when it spans > 20x)."""
    ratios = []
    for g in report.gradients:
        col = style.colour[g["series"]]
        means = [s["mean"] for s in g["ratio"]]
        ratios += means
        ax.plot(
            g["epochs"], means, color=col, marker=style.marker[g["series"]], markersize=3.5, linewidth=1.8,
            label=g["series"],
        )  # fmt: skip
        _band(ax, g["epochs"], g["ratio"], col)
    ax.axhline(1.0, color="0.4", linestyle=":", linewidth=1.2, label="equal norms")
    positive = [r for r in ratios if r > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    ax.set_ylabel("noisy / clean per-sample gradient norm")
    first = report.gradients[0]
    ax.set_title(
        f"{letter}Gradient-norm ratio ({_rate_text(first['noise_type'], first['noise_rate'])})", loc="left"
    )
    _legend(ax)


def figure_png(report: Report, title: str | None = None, dpi: int = 150) -> bytes:
    """The report's figure as PNG bytes (Agg canvas, no pyplot state): one panel per kind of data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels: list[tuple[str, str]] = []
    if report.accuracy or report.zero_shot:
        panels += [("accuracy", t) for t in (report.noise_types() or [NO_NOISE])]
    if report.curves:
        panels.append(("curves", ""))
    if report.gradients:
        panels.append(("gradients", ""))
    if not panels:
        raise InputError("nothing to draw", hint="give eval summaries, tune logs or gradstats CSVs")
    ncols = 2 if len(panels) == 4 else min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.6 * ncols, 4.4 * nrows + (0.4 if title else 0)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    all_series = sorted(
        {c["series"] for c in report.accuracy}
        | {c["series"] for c in report.curves}
        | {g["series"] for g in report.gradients}
    )
    # One colour and marker per series across all panels.
    style = _Style(_colours(all_series), {s: _MARKERS[i % len(_MARKERS)] for i, s in enumerate(all_series)})
    for index, (ax, (kind, noise_type)) in enumerate(zip(axes, panels)):
        letter = f"({chr(ord('a') + index)}) "
        if kind == "accuracy":
            _accuracy_panel(ax, report, noise_type, style, letter)
        else:
            (_curves_panel if kind == "curves" else _gradient_panel)(ax, report, style, letter)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=13)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# --- documents ------------------------------------------------------------------------------------------


def _provenance_lines(report: Report, provenance: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("promptcli", str(provenance.get("promptcli_version", ""))),
        ("created", str(provenance.get("created", ""))),
        ("command", str(provenance.get("command", ""))),
        ("models", "; ".join(report.models) or "not recorded"),
    ]


def render_markdown(report: Report, provenance: dict[str, Any], title: str, image: str | None = None) -> str:
    parts = [f"# {title}", "", caption(report), "", markdown_table(report), ""]
    if image:
        parts += [f"![{title}]({image})", ""]
    if report.warnings:
        parts += ["**Warnings**", ""] + [f"- {w}" for w in report.warnings] + [""]
    parts += ["## Provenance", ""] + [
        f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in _provenance_lines(report, provenance)
    ]
    parts += ["", "| kind | file | records | sha256 |", "|---|---|---:|---|"]
    parts += [f"| {f.kind} | {f.path} | {f.records} | `{f.sha256[:16]}` |" for f in report.files]
    return "\n".join(parts) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}
thead th{background:#f2f2f2}
img{max-width:100%;height:auto}
.caption{color:#555}
.warn{color:#8a5300}
code{font-size:12px}
"""


def render_html(report: Report, provenance: dict[str, Any], title: str, png: bytes | None) -> str:
    """A self-contained HTML page: the figure (PNG inlined as base64), the table, warnings, provenance."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<img alt="{esc(title)}" src="data:image/png;base64,{data}">')
    parts += [f'<p class="caption">{esc(caption(report))}</p>', html_table(report)]
    if report.warnings:
        parts.append('<ul class="warn">' + "".join(f"<li>{esc(w)}</li>" for w in report.warnings) + "</ul>")
    parts.append("<h2>Provenance</h2><ul>")
    parts += [f"<li>{esc(k)}: <code>{esc(v)}</code></li>" for k, v in _provenance_lines(report, provenance)]
    parts.append(
        "</ul><table><thead><tr><th>kind</th><th>file</th><th>records</th><th>sha256</th></tr></thead><tbody>"
    )
    parts += [
        f"<tr><td>{esc(f.kind)}</td><td>{esc(f.path)}</td><td>{f.records}</td><td><code>{f.sha256}</code></td></tr>"
        for f in report.files
    ]
    parts.append("</tbody></table></body></html>")
    return "\n".join(parts) + "\n"


def output_format(path: str | Path) -> str:
    """html, png or md, from the output's suffix."""
    fmt = OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise InputError(
            f"unknown report format {Path(path).suffix or '(no suffix)'!r}",
            where=path,
            hint="name the output .html, .png or .md",
        )
    return fmt


def write_report(
    report: Report, outputs: Sequence[Path], provenance: dict[str, Any], title: str = "promptcli report"
) -> list[Path]:
    """Write each output (format from its suffix) through a temporary file renamed into place."""
    from promptcli.io.fileio import atomic_path, write_text_atomic

    formats = [output_format(p) for p in outputs]
    png = (
        figure_png(report, title) if has_figure(report) and ("png" in formats or "html" in formats) else None
    )
    png_paths = [p for p, f in zip(outputs, formats) if f == "png"]
    for path, fmt in zip(outputs, formats):
        if fmt == "png":
            if png is None:
                raise InputError("nothing to draw", where=path, hint="give results with numbers to plot")
            with atomic_path(path, suffix=".png") as tmp:
                tmp.write_bytes(png)
        elif fmt == "html":
            write_text_atomic(path, render_html(report, provenance, title, png))
        else:
            image = next((p for p in png_paths if p.resolve().parent == path.resolve().parent), None)
            write_text_atomic(path, render_markdown(report, provenance, title, image.name if image else None))
    return list(outputs)
