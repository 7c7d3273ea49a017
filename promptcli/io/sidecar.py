"""Provenance sidecars ``<csv>.json``: written with the SHA-256 of the CSV they describe, read only while
that CSV is unchanged (a sidecar of an edited or replaced CSV would describe labels that are not there)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from promptcli.io.checks import check_json_kind
from promptcli.io.fileio import STDIO, sha256_file, write_json

CSV_SHA256 = "csv_sha256"

# How far a sidecar's realised noise rate may be from its rate before corrupt (and report) say so.
REALISED_TOLERANCE = 0.01


def sidecar_path(csv_path: str | Path) -> Path:
    return Path(f"{csv_path}.json")


def write_sidecar(csv_path: str | Path, record: dict[str, Any], indent: int | None = 2) -> dict[str, Any]:
    """Write ``record`` plus the SHA-256 of the (already written) CSV to ``<csv>.json``; return what was written."""
    data = {**record, CSV_SHA256: sha256_file(csv_path)}
    write_json(sidecar_path(csv_path), data, indent)
    return data


def read_sidecar(
    csv_path: str | Path, warn: Callable[[str], None] = lambda _: None
) -> tuple[Path | None, dict[str, Any] | None]:
    """(sidecar path, its record) of a CSV; (None, None) without one, (path, None) when ignored.

    A sidecar is ignored, with a warning, when it is not JSON or when it records a CSV SHA-256
    that the CSV no longer has. Sidecars from before the hash was recorded are read as they are.
    """
    if str(csv_path) == STDIO:
        return None, None
    path = sidecar_path(csv_path)
    if not path.is_file() or not Path(csv_path).is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        warn(f"{path} is not valid JSON (or is nested too deeply to read); ignored")
        return path, None
    if not isinstance(data, dict):
        return path, {"value": data}
    recorded = data.get(CSV_SHA256)
    if recorded and recorded != sha256_file(csv_path):
        warn(f"{path} describes another version of {csv_path} (its SHA-256 differs); ignored")
        return path, None
    return path, data


def read_noise_sidecar(labels_path: str | Path, warn: Callable[[str], None]) -> dict[str, Any] | None:
    """The labels' sidecar record; None without one, or (with a warning) when it is not JSON or was
    written for another version of the CSV. A record whose noise fields have the wrong types is refused."""
    path, record = read_sidecar(labels_path, warn)
    if path is not None and record is not None:
        check_noise_record(record, path)
    return record


# What prompt metadata and logs keep of a corrupt sidecar (not its C x C transition counts).
NOISE_KEYS = ("type", "rate", "seed", "shots", "per_class", "n_noisy", "realised_rate")

# The type each noise field and cleaning option has as promptcli writes it (None is allowed for all).
_FIELD_KINDS: dict[str, type | tuple[type, ...]] = {
    "type": str,
    "rate": float,
    "realised_rate": float,
    "seed": int,
    "shots": int,
    "n_noisy": int,
    "per_class": (bool, dict),  # corrupt writes a flag, pseudolabel its counts
    "keep_fraction": float,
    "threshold": float,
}
_EXPECTED = {"per_class": "true, false or per-class statistics"}


def _checked_fields(record: Any, prefix: str, keys: tuple[str, ...], path: Path) -> None:
    if not isinstance(record, dict):
        return
    for key in keys:
        check_json_kind(
            record.get(key),
            _FIELD_KINDS[key],
            prefix + key,
            path,
            "delete it (the labels are then read without their noise record) or make the labels "
            "again with promptcli corrupt, pseudolabel or clean",
            context="the labels' sidecar is damaged: ",
            expected=_EXPECTED.get(key),
        )


def check_noise_record(record: dict[str, Any], path: Path) -> None:
    """Refuse a labels sidecar whose noise fields (or cleaning options) do not have the types promptcli writes:
    they are read as numbers and formatted, so a hand-edited ``"rate": "30%"`` would crash later."""
    _checked_fields(record, "", NOISE_KEYS, path)
    fit = record.get("transductive")
    given = fit.get("labels") if isinstance(fit, dict) else None
    if isinstance(given, dict):
        _checked_fields(given.get("noise"), "transductive.labels.noise.", NOISE_KEYS, path)
    cleaning = record.get("cleaning")
    if isinstance(cleaning, dict):
        _checked_fields(cleaning.get("options"), "cleaning.options.", ("keep_fraction", "threshold"), path)


def cleaning_recipe(record: Any) -> str:
    """How ``clean --clean-out`` chose the kept rows, in a few words ("posterior, zero-shot, relabel, keep 0.8");
    "" when the record is not a cleaning's."""
    if not isinstance(record, dict) or not isinstance(record.get("options"), dict):
        return ""
    options = record["options"]
    parts = [str(record.get("score") or "?"), "zero-shot" if record.get("zero_shot") else "prompt"]
    parts.append("relabel" if options.get("relabel") else "drop")
    if options.get("noise_model") not in (None, "symmetric"):
        parts.append(f"{options['noise_model']} noise model")
    if options.get("keep_fraction") is not None:
        parts.append(f"keep {options['keep_fraction']:g}")
    elif options.get("threshold") is not None:
        parts.append(f"threshold {options['threshold']:g}")
    return ", ".join(parts)


def noise_summary(sidecar: dict[str, Any] | None) -> dict[str, Any] | None:
    """The few fields of a labels sidecar that identify the noise (those it has).

    Besides corrupt's sidecar, the labels may come from ``pseudolabel`` (``labels: pseudo``, with the
    pseudo-labels' error rate when ground truth was known and ``method`` unless zero-shot; or
    ``labels: transductive`` with the noise of the given labels ``--labels`` when they had a sidecar; ``trusted``:
    how many verified labels ``--trusted`` added), or from ``clean --clean-out`` (``labels: cleaned``, keeping the
    noise of the labels that were cleaned).
    """
    if sidecar is None:
        return None
    summary = {k: sidecar[k] for k in NOISE_KEYS if k in sidecar}
    fit = sidecar.get("transductive")
    given = fit.get("labels") if isinstance(fit, dict) else None
    if isinstance(given, dict) and isinstance(given.get("noise"), dict):
        # `pseudolabel --method transductive --labels L`: trained on the noise condition of L
        summary = {k: given["noise"][k] for k in NOISE_KEYS if k in given["noise"]}
        summary["labels"] = "transductive"
    elif "selection" in sidecar and "templates" in sidecar:  # written by `pseudolabel`
        accuracy = sidecar.get("pseudo_label_accuracy")
        summary = {"labels": "pseudo", "selection": sidecar["selection"]}
        if sidecar.get("method") not in (None, "zero-shot"):
            summary["method"] = sidecar["method"]
        if isinstance(accuracy, (int, float)):
            summary["realised_rate"] = round(1.0 - float(accuracy), 6)
    elif "cleaning" in sidecar:
        summary["labels"] = "cleaned"
        recipe = cleaning_recipe(sidecar["cleaning"])
        if recipe:
            summary["cleaning"] = recipe  # report keeps runs on differently cleaned labels apart
    trusted = fit.get("trusted") if isinstance(fit, dict) else None
    if isinstance(trusted, dict) and isinstance(trusted.get("rows"), int):
        summary["trusted"] = trusted["rows"]  # `--trusted`: verified labels joined the fit
    return summary
