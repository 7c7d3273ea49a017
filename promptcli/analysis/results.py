"""Result files: find them, tell their kinds apart by content, and read each run's provenance.

Three kinds of result files are told apart by their content, never by their names:

- ``eval``: an ``eval --json`` / ``eval -o`` summary (a JSON object with ``zero_shot`` and
  ``metrics.top1``); its method, loss, seed, shots, noise and training settings come from the prompt's
  metadata, the test set from the evaluated features (and labels) file's SHA-256;
- ``tune-log``: a ``tune --log`` file, one JSON object per epoch (``epoch``, ``accuracy``,
  ``clean_accuracy``, ...); provenance, when present, is an object under ``run`` on a line;
- ``gradstats``: a CSV with the columns in ``GRADSTATS_COLUMNS``, one row per training step; its model
  and settings come from the sidecar ``<csv>.json`` that ``gradstats`` writes next to it.

Training labels without a noise sidecar have an unknown noise rate: ``NOISE_UNKNOWN``, rate None.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from promptcli.choices import COOP_VARIANTS, IMAGE_METHODS, PROMPT_METHODS, SCHEDULE_TEXT, Method
from promptcli.errors import InputError
from promptcli.io.checks import SEED_MAX, check_json_kind, is_json_kind, read_csv_table, shown
from promptcli.io.fileio import check_input_file

# The columns of a gradstats CSV (written by analysis/gradstats.py, read here).
GRADSTATS_COLUMNS = (
    "epoch",
    "step",
    "method",
    "loss",
    "noise_type",
    "noise_rate",
    "seed",
    "n_noisy",
    "n_clean",
    "noisy_grad_norm",
    "clean_grad_norm",
    "ratio",
    "noisy_sum_norm",
    "clean_sum_norm",
)
_GRAD_INTS = ("epoch", "step", "n_noisy", "n_clean", "seed")  # each >= 0; a seed <= SEED_MAX
_GRAD_FLOATS = (
    "noise_rate",
    "noisy_grad_norm",
    "clean_grad_norm",
    "ratio",
    "noisy_sum_norm",
    "clean_sum_norm",
)
RESULT_SUFFIXES = (".json", ".jsonl", ".csv")
NO_NOISE = "none"
NOISE_UNKNOWN = "noise unknown"  # the training labels had no noise sidecar: the rate is None, never 0
# Training settings a series is split by: the prompt's (metadata keys) and the schedule's (``optimizer`` keys).
PROMPT_SETTINGS = ("n_ctx", "class_position", "csc", "ctx_init", "template")
# Further settings that change what tune learns, read from a prompt's record by ``_run_settings`` (records from
# before they were kept: init_std takes its default for prompts with a context, the others are not on record).
# ``class_chunk`` is not one: it changes how the text pass is computed (memory), not what it gives.
RUN_SETTINGS = ("init_std", "views", "train_layers", "lp_ft", "wise_alpha")
DEFAULT_INIT_STD = 0.02  # PromptConfig's and tune's --init-std default
SCHEDULE_SETTINGS = (
    "optimizer",
    "lr",
    "epochs",
    "batch_size",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "warmup_lr",
    "schedule",
)
SPLIT_SETTINGS = PROMPT_SETTINGS + RUN_SETTINGS + SCHEDULE_SETTINGS  # the order labels name them in
SCHEDULE_NAMES = {text: name for name, text in SCHEDULE_TEXT.items()}
# The variant of a run whose prompt was tuned on the features it is scored on (not a held-out score).
TUNED_ON_TEST = "tuned on the test features"
# Settings a method may choose per run (not split on; runs that differ in them are pooled with a warning). Eval
# summaries that record ``weight_decay_searched`` split the probe by it instead ("searched" or the fixed value).
PER_RUN_SETTINGS = {
    Method.LINEAR_PROBE.value: {
        "weight_decay": "the probe's search picks it per run unless --weight-decay is given"
    },
}
# The metrics an eval summary carries: report name -> key under "metrics".
METRIC_KEYS = {"top1": "top1", "top5": "top5", "macro": "macro_accuracy"}


# --- what a series is -----------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class SeriesKey:
    """What distinguishes one experimental condition from another (noise and seed aside)."""

    method: str
    loss: str = ""
    method_params: str = ""  # "kg_lambda=8": the method's own settings, "" when it has none
    loss_params: str = ""  # "q=0.7", "" when unknown or none
    shots: str = ""  # "16", "" when all data or unknown
    model: str = ""  # "ViT-B-32/openai", "" when unknown
    variant: str = ""  # "OT split", "pseudo-labels", "cleaned": what else set the run apart
    test: str = ""  # "test.h5 (4c202af5)": the evaluated features (and labels); "" for training runs
    settings: tuple[tuple[str, str], ...] = ()  # (name, value): prompt, schedule; zero-shot's templates


def _variant(noise: Any, split: Any) -> str:
    """How the training labels or the training itself differed from plain tuning on given labels."""
    parts = []
    if isinstance(split, dict) and split.get("method") not in (None, "", "none"):
        parts.append(f"{str(split['method']).upper()} split")
    labels = noise.get("labels") if isinstance(noise, dict) else None
    recipe = noise.get("cleaning") if isinstance(noise, dict) else None
    if labels == "pseudo":
        method = noise.get("method")
        parts.append(f"{method} pseudo-labels" if method else "pseudo-labels")
    elif labels == "transductive":
        parts.append("transductive")
    elif labels == "cleaned":
        parts.append(f"cleaned ({recipe})" if isinstance(recipe, str) and recipe else "cleaned")
    trusted = noise.get("trusted") if isinstance(noise, dict) else None
    if isinstance(trusted, int) and trusted > 0:
        parts.append(f"{trusted} verified")
    return ", ".join(parts)


@dataclass
class EvalRun:
    key: SeriesKey
    noise_type: str
    noise_rate: float | None  # None: NOISE_UNKNOWN
    seed: Any
    zero_shot: bool
    metrics: dict[str, float]  # top1, top5, macro
    source: str
    per_run: tuple[tuple[str, str], ...] = ()  # PER_RUN_SETTINGS of the run (name, value)
    noise_seed: Any = None  # the seed of the noise draw (corrupt --seed), when on record
    realised_rate: float | None = None  # the share of labels corrupt actually flipped, when on record
    features_sha256: str = ""  # the evaluated features file's SHA-256
    images_known: bool = False  # the test set is told apart by its images' bytes (not only their listing)
    image_method: bool = False  # its features come through a tuned tower (finetune, vpt, maple)
    listing: str = ""  # the digest of the test images' listing, when on record


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
    noise_rate: float | None  # None: NOISE_UNKNOWN
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
        elif path.exists():  # a FIFO or a device is named as what it is, never "no such file"
            found[check_input_file(path, "result file", "give eval/tune/gradstats results")] = True
        else:
            raise InputError("no such file or folder", where=path, hint="check the path")
    return sorted(found.items())


def _json_loads(text: str, where: Any) -> Any:
    """``json.loads``, with JSON nested too deeply for Python's parser refused as not a result, and so is a
    ``NaN`` or ``Infinity``: promptcli writes none, and one would reach the report's means and JSON."""

    def constant(name: str) -> Any:
        raise InputError(
            f"holds {name}, which promptcli never writes", where=where, hint="is the file damaged or edited?"
        )

    try:
        return json.loads(text, parse_constant=constant)
    except RecursionError:
        raise InputError(
            "JSON nested too deeply to read", where=where, hint="give eval/tune/gradstats results"
        ) from None


def _typed(
    record: dict[str, Any],
    key: str,
    kind: type,
    where: Any,
    prefix: str = "",
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """``record[key]`` as report reads it: None when absent or null, else a ``kind`` (float: any finite number,
    int: not a bool; numbers may be written as text, as prompt metadata stores them) in ``low..high`` where given;
    a result file whose field has another type or value is refused, naming the file and the field."""
    value = record.get(key)
    if kind in (int, float) and isinstance(value, str):
        try:
            value = kind(value)
        except ValueError:
            pass
    return check_json_kind(
        value,
        kind,
        prefix + key,
        where,
        "is the file complete? promptcli does not write this",
        low=low,
        high=high,
    )


def _seed(record: Any, where: Any, prefix: str = "") -> int | None:
    """A record's ``seed``: None, or an integer every generator promptcli seeds accepts (0..2**32-1)."""
    return (
        _typed(record, "seed", int, where, prefix, low=0, high=SEED_MAX) if isinstance(record, dict) else None
    )


def _shots(record: dict[str, Any], where: Any) -> str:
    """A record's ``shots`` as its series says it: "" for all data or unknown, else a positive integer."""
    shots = _typed(record, "shots", int, where, low=1)
    return "" if shots is None else str(shots)


def _json_error(exc: json.JSONDecodeError) -> str:
    return f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"


def _parse_jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = _json_loads(line, f"{path}:{number}")
        except json.JSONDecodeError as exc:
            raise InputError(
                f"not valid JSON ({exc.msg})", where=f"{path}:{number}", hint="fix or remove the line"
            ) from exc
        if not isinstance(obj, dict):
            raise InputError(
                "a log line must be a JSON object", where=f"{path}:{number}", hint="fix or remove the line"
            )
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
            obj = _json_loads(text, path)
        except json.JSONDecodeError as exc:
            lines = [line for line in text.splitlines() if line.strip()]
            first_is_object = False
            if len(lines) > 1:
                try:
                    first_is_object = isinstance(_json_loads(lines[0], path), dict)
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
    try:
        header = next(csv.reader(io.StringIO(stripped, newline="")), [])
    except csv.Error:  # a first field over the csv module's limit: no CSV promptcli writes
        return None, None
    header = [h.strip() for h in header]
    if "noisy_grad_norm" in header and "clean_grad_norm" in header:

        def check_header(columns: list[str]) -> None:
            missing = [c for c in GRADSTATS_COLUMNS if c not in columns]
            if missing:
                raise InputError(
                    f"gradstats CSV lacks column(s) {', '.join(missing)}",
                    where=path,
                    hint="write it with `promptcli gradstats`",
                )

        # the labels' reader: a repeated column, a short row or a stray value is refused, not read as blank
        return "gradstats", read_csv_table(text, path, check_header=check_header)
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


def _noise(noise: Any, where: Any = None) -> tuple[str, float | None]:
    """(type, rate) from a corrupt sidecar; rate 0 is 'none'; (NOISE_UNKNOWN, None) without a sidecar or a rate."""
    if noise is None:
        return NOISE_UNKNOWN, None
    if not isinstance(noise, dict):
        return "", None
    if noise.get("labels") == "pseudo":  # unsupervised: no injected noise (the series says pseudo-labels)
        return NO_NOISE, 0.0
    rate = noise.get("rate")
    if rate is None:
        rate = noise.get("realised_rate")
    if not isinstance(rate, (int, float)) or isinstance(rate, bool):
        # a sidecar without a rate (a real-noise dataset's list, a transductive or cleaned file of such labels)
        return NOISE_UNKNOWN, None
    if not (
        is_json_kind(rate, float) and 0 <= rate <= 1
    ):  # 1e400 would overflow float(), 1.5 no share of labels
        raise InputError(
            f"noise rate {shown(rate)} is not a fraction in [0, 1]",
            where=where,
            hint="is the file damaged or edited?",
        )
    rate = round(float(rate), 6)
    return (NO_NOISE if rate == 0 else str(noise.get("type") or "unknown")), rate


def _number(value: Any, where: str, what: str, fraction: bool = False) -> float:
    """``value`` as a float: a finite number (an integer too large for a float is none), and with ``fraction`` one
    in [0, 1] (an accuracy)."""
    if value is None or not is_json_kind(value, float):
        raise InputError(
            f"{what} is not a number ({shown(value)})", where=where, hint="is the file complete?"
        )
    if fraction and not 0 <= value <= 1:
        raise InputError(
            f"{what} is {shown(value)}, not a fraction in [0, 1]",
            where=where,
            hint="is the file damaged or edited?",
        )
    return float(value)


def _file_label(path: Any, sha256: Any) -> str:
    """ "test.h5 (4c202af5)": a file's name and the start of its SHA-256 (what is known of them)."""
    name = Path(str(path)).name if path else ""
    sha = sha256[:8] if isinstance(sha256, str) else ""
    return f"{name} ({sha})" if name and sha else name or sha


def _test_set_digest(obj: dict[str, Any], key: str) -> str:
    """A digest an eval summary records of its test images: ``source_digest`` (the listing) or ``images_digest``
    (the files' bytes; "" for features extracted before it was recorded)."""
    test_set = obj.get("test_set")
    digest = test_set.get(key) if isinstance(test_set, dict) else None
    return digest if isinstance(digest, str) else ""


def _listing_digest(obj: dict[str, Any]) -> str:
    return _test_set_digest(obj, "source_digest")


def _images_digest(obj: dict[str, Any]) -> str:
    return _test_set_digest(obj, "images_digest")


def _test_label(obj: dict[str, Any]) -> str:
    """The test set an eval summary is on: the images the features were extracted from ("test (bd6dbb2b, 1000
    images)": the source's name and a digest of its listing and, where recorded, of the image files' bytes; the
    same for every extraction of them, through any tower), or for summaries that do not record them the features
    file; and the labels file when one was given."""
    digest = _listing_digest(obj)
    if digest:
        test_set = obj["test_set"]
        name = Path(str(test_set.get("source") or "")).name
        images = _images_digest(obj)
        if images:  # listing and pixels: two folders of other images under the same names are two test sets
            digest = hashlib.sha256(f"{digest}\n{images}".encode()).hexdigest()
        label = f"{name} ({digest[:8]}, {test_set.get('n_images')} images)"
    else:
        label = _file_label(obj.get("features"), obj.get("features_sha256"))
    if obj.get("labels"):
        label += f" + {_file_label(obj.get('labels'), obj.get('labels_sha256'))}"
    return label


def _templates_label(templates: Any) -> str:
    """Zero-shot's templates: the one template, or their number and a digest of the list."""
    if not isinstance(templates, list) or not templates:
        return ""
    if len(templates) == 1:
        return str(templates[0])
    digest = hashlib.sha256(json.dumps(templates).encode("utf-8")).hexdigest()[:8]
    return f"{len(templates)} ({digest})"


def _setting_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _run_settings(record: dict[str, Any], where: Any) -> dict[str, Any]:
    """RUN_SETTINGS of one prompt's record (None: not on record or not applicable)."""
    config = record.get("prompt_config") if isinstance(record.get("prompt_config"), dict) else {}
    if "init_std" in record:
        init_std = _typed(record, "init_std", float, where)
    else:
        init_std = _typed(config, "prompt.init_std", float, where, "prompt_config.")
    if init_std is None and "n_ctx" in record:  # a prompt with a context, recorded before init_std was
        init_std = DEFAULT_INIT_STD
    views = None
    if "n_views" in record or "use_views" in record:  # augmented views per image trained on (0: none)
        views = int(_typed(record, "n_views", int, where) or 0) if record.get("use_views", True) else 0
    return {
        "init_std": None if init_std is None else float(init_std),
        "views": views,
        "train_layers": record.get("train_layers"),
        "lp_ft": record.get("lp_ft") if isinstance(record.get("lp_ft"), bool) else None,
        "wise_alpha": record.get("wise_alpha"),
    }


def _settings(
    records: Sequence[Any], method: str, where: Any
) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """(settings to split by, PER_RUN_SETTINGS) recorded by prompts: their common value, "mixed" where they differ."""
    values: dict[str, set[str]] = defaultdict(set)
    searched_known = True  # every record says whether its weight decay was searched (newer eval summaries)
    for record in records:
        if not isinstance(record, dict):
            continue
        optimizer = record.get("optimizer") if isinstance(record.get("optimizer"), dict) else {}
        if method == Method.TIP_ADAPTER.value:  # training-free: older files record an optimiser it never used
            optimizer = {}
        found = {
            **{k: record.get(k) for k in PROMPT_SETTINGS},
            **_run_settings(record, where),
            **{k: optimizer.get(k) for k in SCHEDULE_SETTINGS},
        }
        if "weight_decay_searched" in record:
            if record["weight_decay_searched"]:  # the search's pick is part of the method: "searched" pools
                found["weight_decay"] = "searched"
        else:
            searched_known = False
        if isinstance(found.get("schedule"), str):  # files record the schedule in words: report its name
            found["schedule"] = SCHEDULE_NAMES.get(found["schedule"], found["schedule"])
        for name, value in found.items():
            if value is not None:
                values[name].add(_setting_text(value))
    pairs = [
        (name, next(iter(values[name])) if len(values[name]) == 1 else "mixed")
        for name in SPLIT_SETTINGS
        if values.get(name)
    ]
    per_run = PER_RUN_SETTINGS.get(method, {})
    if searched_known:  # searched or fixed is on record: the weight decay splits series like any setting
        per_run = {k: v for k, v in per_run.items() if k != "weight_decay"}
    return tuple(p for p in pairs if p[0] not in per_run), tuple(p for p in pairs if p[0] in per_run)


def eval_identity(obj: dict[str, Any]) -> tuple | None:
    """What makes two eval summaries one evaluation: the prompts' (zero-shot: the model's and templates')
    and the test images (by their bytes where the summary records them, else also by the features file's
    SHA-256: the same listing may hold other images); None when the summary does not record them."""
    features = obj.get("features_sha256")
    if not isinstance(features, str) or not features:
        return None
    # the test images, by their bytes where recorded (two extractions of them are one test set); summaries
    # from before: the features file too (one listing may hold other images)
    test = ("" if _images_digest(obj) else features, _test_label(obj), obj.get("labels_sha256"))
    if obj.get("zero_shot"):
        return ("zero-shot", _model_label(obj.get("model")), json.dumps(obj.get("templates")), *test)
    shas = [m.get("sha256") if isinstance(m, dict) else None for m in obj.get("prompts") or []]
    if not shas or not all(isinstance(sha, str) and sha for sha in shas):
        return None
    return ("prompts", tuple(sorted(shas)), *test)


def eval_run(obj: dict[str, Any], path: Path) -> EvalRun | None:
    """One eval summary as a run; None (with the reason in the caller's warning) if it has no one noise rate.

    Labels without a noise sidecar give ``NOISE_UNKNOWN`` (rate None), never noise rate 0.
    """
    metrics = obj["metrics"]
    values = {
        name: _number(metrics.get(key), str(path), f"metrics.{key}", fraction=True)
        for name, key in METRIC_KEYS.items()
    }
    model, test = _model_label(obj.get("model")), _test_label(obj)
    if obj.get("zero_shot"):
        templates = _templates_label(obj.get("templates"))
        settings = (("templates", templates),) if templates else ()
        key = SeriesKey("zero-shot", model=model, test=test, settings=settings)
        features = str(obj.get("features_sha256") or "")
        return EvalRun(
            key,
            NO_NOISE,
            0.0,
            None,
            True,
            values,
            str(path),
            features_sha256=features,
            images_known=bool(_images_digest(obj)),
            listing=_listing_digest(obj),
        )
    members = [m for m in obj.get("prompts") or [] if isinstance(m, dict)]
    if obj.get("noise") is None and any(m.get("noise") is not None for m in members):
        return None  # an ensemble of prompts tuned on differently noisy labels: no one noise rate
    noise_type, rate = _noise(obj.get("noise"), path)
    if rate is None and noise_type != NOISE_UNKNOWN:
        return None
    method = str(obj.get("method") or "mixed")
    settings, per_run = _settings(members, method, path)
    variant = _variant(obj.get("noise"), split_of(obj, members))
    if tuned_on_test(obj):
        variant = f"{variant}, {TUNED_ON_TEST}" if variant else TUNED_ON_TEST
    key = SeriesKey(
        method=method,
        loss=str(obj.get("loss") or ""),
        method_params=_params_label(obj.get("method_params")),
        loss_params=_params_label(obj.get("loss_params")),
        shots=_shots(obj, path),
        model=model,
        variant=variant,
        test=test,
        settings=settings,
    )
    noise = obj.get("noise")
    noise_seed = _seed(noise, path, "noise.")
    realised = noise.get("realised_rate") if isinstance(noise, dict) else None
    realised = float(realised) if realised is not None and is_json_kind(realised, float) else None
    if realised is not None and not 0 <= realised <= 1:
        raise InputError(
            f"noise.realised_rate is {shown(realised)}, not a fraction in [0, 1]",
            where=path,
            hint="is the file damaged or edited?",
        )
    return EvalRun(
        key,
        noise_type,
        rate,
        _seed(obj, path),
        False,
        values,
        str(path),
        per_run,
        noise_seed,
        realised,
        str(obj.get("features_sha256") or ""),
        bool(_images_digest(obj)),
        any(m.get("method") in IMAGE_METHODS for m in members) or method in IMAGE_METHODS,
        _listing_digest(obj),
    )


def split_of(obj: dict[str, Any], members: Sequence[dict[str, Any]]) -> Any:
    """The clean/noisy split an eval summary records (summaries from before: their prompts' common one)."""
    if "split" in obj:
        return obj.get("split")
    splits = [m.get("split") for m in members]
    return splits[0] if splits and all(s == splits[0] for s in splits) else None


def tuned_on_test(obj: dict[str, Any]) -> bool:
    """Whether a prompt of an eval summary was tuned on the features it is scored on (``tuned_on_test``;
    summaries from before it was recorded: a prompt's ``features_sha256`` is the summary's)."""
    if "tuned_on_test" in obj:
        return bool(obj["tuned_on_test"])
    features = obj.get("features_sha256")
    members = [m for m in obj.get("prompts") or [] if isinstance(m, dict)]
    return bool(features) and any(m.get("features_sha256") == features for m in members)


def _log_provenance(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    for row in rows:
        if isinstance(row.get("run"), dict):
            return row["run"]
    return None


def _planned_epochs(rows: list[dict[str, Any]]) -> int | None:
    """The epochs a tune log's run was set to train (None when the log does not record them)."""
    settings = (_log_provenance(rows) or {}).get("settings")
    optimizer = settings.get("optimizer") if isinstance(settings, dict) else None
    epochs = optimizer.get("epochs") if isinstance(optimizer, dict) else None
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None


def log_run(rows: list[dict[str, Any]], path: Path, sha256: str) -> LogRun:
    """A tune log as a run; provenance from the ``run`` object its lines carry (if any)."""
    epochs = []
    for number, row in enumerate(rows, start=1):
        if "epoch" not in row:
            continue  # a header line (provenance only)
        where = f"{path}: epoch line {number}"
        clean = row.get("clean_accuracy")
        epoch = _typed(row, "epoch", int, where, low=0)
        if epoch is None:
            raise InputError("epoch is not a number (None)", where=where, hint="is the file complete?")
        epochs.append(
            {
                "epoch": epoch,
                "accuracy": _number(row.get("accuracy"), where, "accuracy", fraction=True),
                "clean_accuracy": None
                if clean is None
                else _number(clean, where, "clean_accuracy", fraction=True),
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
    noise_type, rate = _noise(run.get("noise"), path)
    key = SeriesKey(
        method=str(run.get("method") or "unknown"),
        loss=str(loss or ""),
        method_params=_params_label(run.get("method_params")),
        loss_params=_params_label(loss_params),
        shots=_shots(run, f"{path}: run"),
        model=_model_label(run.get("model")),
        variant=_variant(run.get("noise"), run.get("split")),
        settings=_settings(
            [run.get("settings")], str(run.get("method") or "unknown"), f"{path}: run.settings"
        )[0],
    )
    return LogRun(key, noise_type, rate, _seed(run, f"{path}: run"), epochs, str(path), sha256)


def _grad_value(row: dict[str, str], column: str, where: str) -> Any:
    """A gradstats cell as report reads it: the integers (counts, epoch, step, seed) whole numbers >= 0, the
    noise rate a fraction in [0, 1] and the norms finite and >= 0 (an empty cell: no noise sidecar, or no sample
    of that group in the step, read as NaN); anything else is refused naming the row and the column."""
    cell = (row.get(column) or "").strip()
    if column in _GRAD_INTS:
        high = SEED_MAX if column == "seed" else None
        try:
            value = int(cell)  # "1.5" and "1e3" are no integer gradstats writes
        except ValueError:
            try:
                number = float(cell)
            except ValueError:
                number = math.nan
            what = "not a number" if not math.isfinite(number) else "not a whole number"
            raise InputError(
                f"column {column} is {what} ({shown(cell)})",
                where=where,
                hint="gradstats writes whole numbers here: fix the cell",
            ) from None
        if value < 0 or (high is not None and value > high):
            raise InputError(
                f"column {column} is {value}, not in 0..{high}"
                if high
                else f"column {column} is {value}, not >= 0",
                where=where,
                hint="is the file damaged or edited? fix the cell",
            )
        return value
    if column in _GRAD_FLOATS:
        if cell == "" or cell.lower() == "nan":
            return math.nan
        try:
            value = float(cell)
        except ValueError:
            raise InputError(
                f"column {column} is not a number ({shown(cell)})",
                where=where,
                hint="gradstats writes numbers: fix the cell",
            ) from None
        if column == "noise_rate" and not 0 <= value <= 1:  # inf too: never "noise unknown" (an empty cell)
            raise InputError(
                f"column noise_rate is {shown(cell)}, not a fraction in [0, 1]",
                where=where,
                hint="is the file damaged or edited? fix the cell (empty: noise unknown)",
            )
        if not (math.isfinite(value) and value >= 0):
            raise InputError(
                f"column {column} is {shown(cell)}, not a finite number >= 0",
                where=where,
                hint="is the file damaged or edited? fix the cell (empty: no sample of that group)",
            )
        return value
    return cell


def _grad_sidecar(path: Path, methods: set[str], warn: Callable[[str], None]) -> dict[str, Any] | None:
    """The ``<csv>.json`` that ``gradstats`` writes (model, noise, options, runs); None, with a warning, without."""
    sidecar = Path(f"{path}.json")
    try:
        check_input_file(
            sidecar, "sidecar"
        )  # a folder or FIFO is no missing sidecar (nor a read that blocks)
    except InputError as exc:
        if exc.what.endswith("not found"):
            warn(f"{path}: no sidecar {sidecar.name} (`gradstats` writes it): model and settings unknown")
        else:
            warn(f"{sidecar}: {exc.what}; ignored: model and settings of {path.name} unknown")
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except OSError as exc:
        warn(
            f"{sidecar}: cannot read ({exc.strerror or exc}); ignored: model and settings of {path.name} unknown"
        )
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        warn(f"{sidecar} is not valid JSON; ignored: model and settings of {path.name} unknown")
        return None
    runs = meta.get("runs") if isinstance(meta, dict) else None
    try:
        recorded = (
            {_typed(r, "method", str, sidecar, "runs[].") for r in runs if isinstance(r, dict)}
            if isinstance(runs, list)
            else set()
        )
        if methods <= recorded:
            for method in methods:  # the settings report reads, checked here: a damaged sidecar is ignored
                _grad_key(method, "", meta, sidecar)
    except InputError as exc:
        warn(f"{sidecar}: {exc.what}; ignored: model and settings of {path.name} unknown")
        return None
    if not methods <= recorded:
        warn(f"{sidecar} describes other runs than {path.name}; ignored: model and settings unknown")
        return None
    return meta


def _grad_key(method: str, loss: str, meta: dict[str, Any] | None, where: Any) -> SeriesKey:
    """A gradstats run's series: method and loss from the CSV, model and settings from its sidecar."""
    if meta is None:
        return SeriesKey(method, loss)
    options = meta.get("options") if isinstance(meta.get("options"), dict) else {}
    run = next(
        (
            r
            for r in meta.get("runs") or []
            if isinstance(r, dict) and (r.get("method"), r.get("loss")) == (method, loss)
        ),
        {},
    )
    record = {"optimizer": run.get("optimizer")}
    if method in PROMPT_METHODS + COOP_VARIANTS:  # the methods whose prompts record these settings
        record.update({k: options.get(k) for k in PROMPT_SETTINGS + ("init_std",)})
    return SeriesKey(
        method,
        loss,
        model=_model_label(meta.get("model")),
        variant=_variant(meta.get("noise"), {"method": options.get("split")}),
        settings=_settings([record], method, where)[0],
    )


def grad_runs(
    rows: list[dict[str, str]],
    path: Path,
    warn: Callable[[str], None] = lambda _: None,
    lines: Sequence[int] | None = None,
) -> list[GradRun]:
    """The runs of a gradstats CSV (one per method, loss, noise and seed in it; ``lines``: the line of each row);
    an empty noise rate (labels without a noise sidecar) is ``NOISE_UNKNOWN``."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    steps: dict[tuple, int] = {}  # (run, epoch, step) -> the line that gave it
    for number, raw in zip(lines if lines is not None else range(2, len(rows) + 2), rows):
        row = {c: _grad_value(raw, c, f"{path}:{number}") for c in GRADSTATS_COLUMNS}
        if math.isfinite(row["noise_rate"]):
            rate: float | None = round(row["noise_rate"], 6)
            noise_type = NO_NOISE if rate == 0 else (row["noise_type"] or "unknown")
        else:
            rate, noise_type = None, NOISE_UNKNOWN
        run = (row["method"], row["loss"], noise_type, rate, row["seed"])
        first = steps.setdefault((*run, row["epoch"], row["step"]), number)
        if first != number:  # counted twice, it would weigh that step double in the epoch's mean norms
            raise InputError(
                f"epoch {row['epoch']}, step {row['step']} of run {row['method']}/{row['loss']} seed {row['seed']} "
                f"is listed twice (lines {first} and {number})",
                where=f"{path}:{number}",
                hint="keep one row per step (were two gradstats CSVs joined?)",
            )
        groups[run].append(row)
    meta = _grad_sidecar(path, {k[0] for k in groups}, warn) if groups else None
    return [
        GradRun(_grad_key(method, loss, meta, f"{path}.json"), noise_type, rate, seed, group, str(path))
        for (method, loss, noise_type, rate, seed), group in sorted(groups.items(), key=lambda kv: str(kv[0]))
    ]


def split_unrecorded_test_sets(runs: list[EvalRun]) -> tuple[list[EvalRun], list[str]]:
    """Tell apart test sets whose eval summaries do not record the images' digest (features extracted before
    it was), where their features show that one listing held other images: runs of one listing and model,
    none through a tuned tower, on different features files are on different test sets (the label names the
    features file). Runs through a tuned tower (finetune, vpt, maple: each seed re-extracts the test images)
    stay on the listing. Returns the runs, relabelled where needed, and warnings."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, run in enumerate(runs):
        if run.key.test and not run.images_known and not run.image_method and run.features_sha256:
            groups[(run.key.test, run.key.model)].append(i)
    out, warnings = list(runs), []
    for (test, _), members in sorted(groups.items()):
        shas = sorted({runs[i].features_sha256 for i in members})
        if len(shas) < 2:
            continue
        for i in members:
            run = runs[i]
            label = f"{test}, features {run.features_sha256[:8]}"
            out[i] = replace(run, key=replace(run.key, test=label))
        warnings.append(
            f"test set {test}: {len(shas)} different features files of one image listing and model "
            f"({', '.join(s[:8] for s in shas)}) and no record of the images' content: counted as "
            f"{len(shas)} test sets; re-extract the test images and evaluate again to tell them apart by content"
        )
    known: dict[str, set[bool]] = defaultdict(set)
    for run in out:
        if run.listing:
            known[run.listing].add(run.images_known)
    mixed = sum(1 for seen in known.values() if len(seen) > 1)
    if mixed:
        warnings.append(
            f"{mixed} test image listing(s) are evaluated both on features that record the images' content and on "
            "older ones that do not: counted as different test sets; re-extract the older test features and "
            "evaluate again to pool them"
        )
    return out, warnings


def rewritten_prompts(summary: dict[str, Any], path: Path) -> list[str]:
    """Warnings for the prompt files an eval summary scored that have been rewritten since (their SHA-256 is no
    longer the recorded one, e.g. retuned on regenerated labels): the score belongs to the older prompt. Files
    moved away, and relative paths of summaries that do not record their working folder, are not checked."""
    from promptcli.io.fileio import sha256_file

    warnings = []
    for member in summary.get("prompts") or []:
        recorded, name = (
            (member.get("sha256"), member.get("path")) if isinstance(member, dict) else (None, None)
        )
        if not (isinstance(recorded, str) and isinstance(name, str) and name):
            continue
        where = Path(name)
        if not where.is_absolute():
            if not isinstance(summary.get("cwd"), str):
                continue
            where = Path(summary["cwd"]) / where
        try:
            if not where.is_file() or sha256_file(where) == recorded:
                continue
        except OSError:
            continue
        warnings.append(
            f"{path}: its prompt {where} was rewritten after this evaluation (SHA-256 {recorded[:8]} then, "
            "another now): the score is the earlier prompt's; evaluate the current one again"
        )
    return warnings


def read_results(paths: Sequence[str | Path]) -> Results:
    """Read every result file under ``paths``; files in folders that are not results are skipped."""
    from promptcli.io.fileio import sha256_bytes

    results = Results()
    seen: dict[str, str] = {}
    evaluations: dict[tuple, str] = {}
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
        if kind == "eval":  # fields read below before their summary's run is (prompts, the labels' digest)
            _typed(content, "prompts", list, path)
            _typed(content, "labels_sha256", str, path)
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
            results.warnings += rewritten_prompts(content, path)
            identity = eval_identity(content)
            if identity in evaluations:
                results.warnings.append(
                    f"{path} repeats the evaluation in {evaluations[identity]} (same prompt and test "
                    "features); counted once"
                )
                continue
            run = eval_run(content, path)
            if run is None:
                results.warnings.append(
                    f"{path}: no single noise rate (ensemble of different noise?); not plotted"
                )
                continue
            if identity is not None:
                evaluations[identity] = str(path)
            if TUNED_ON_TEST in run.key.variant:
                results.warnings.append(
                    f"{path}: its prompt was tuned on the features it is scored on ({content.get('features')}): "
                    f"a series of its own ('{TUNED_ON_TEST}'), kept out of the held-out means"
                )
            results.evals.append(run)
            n = 1
        elif kind == "tune-log":
            log = log_run(content, path, digest)
            results.logs.append(log)
            n = len(log.epochs)
            planned = _planned_epochs(content)
            if planned and log.epochs and log.epochs[-1]["epoch"] < planned:
                results.warnings.append(
                    f"{path}: holds {log.epochs[-1]['epoch']} of its {planned} epochs (a run still going, or "
                    "stopped): its curve ends early"
                )
        else:
            runs = grad_runs(content.rows, path, results.warnings.append, content.lines)
            results.grads.extend(runs)
            n = len(content.rows)
        results.files.append(SourceFile(str(path), kind, digest, n))
    results.evals, split_warnings = split_unrecorded_test_sets(results.evals)
    results.warnings += split_warnings
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
