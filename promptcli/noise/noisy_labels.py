"""``corrupt`` as a library step: a labels file (or features file) in, a noisy labels CSV and its sidecar out.

:func:`corrupt_file` reads the clean labels, builds the transition matrix of the chosen noise type,
flips exactly the asked number of labels (or draws a few-shot noisy set), and writes the CSV with
``clean_label``/``is_noisy`` plus ``OUTPUT.json`` recording how it was made. The maths lives in
:mod:`promptcli.noise.corruption`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from promptcli.choices import ConfusionFrom, NoiseType
from promptcli.errors import InputError, warn_user
from promptcli.io.checks import INT_MAX, check_at_most, check_class_names, check_seed
from promptcli.io.fileio import (
    STDIO,
    check_distinct,
    check_output_path,
    require_file,
    sha256_file,
)
from promptcli.io.labels import LabelTable, labels_sha256
from promptcli.io.sidecar import REALISED_TOLERANCE, write_sidecar

if TYPE_CHECKING:
    from promptcli.io.features import FeatureIndex

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ADDED = ("clean_label", "is_noisy")


@dataclass
class CorruptOptions:
    """What ``promptcli corrupt`` takes besides its input and output."""

    rate: float | None = None
    noise_type: str = NoiseType.SYMMETRIC.value
    seed: int = 0
    per_class: bool = False
    shots: int | None = None
    pairs: Path | None = None
    matrix: Path | None = None
    features: Path | None = None
    classnames: Path | None = None
    confusion_from: str | None = None
    template: list[str] | None = None
    templates: str | None = None
    pretrained: str | None = None
    device: str = "auto"


def corrupt_file(
    labels: str,
    output: str,
    options: CorruptOptions,
    *,
    force: bool = False,
    json_out: bool = False,
    info: Callable[[str], None] = lambda _: None,
    warn: Callable[[str], None] = warn_user,
) -> dict[str, Any]:
    """Write noisy labels for ``labels`` to ``output`` (``-``: stdout) and its sidecar; return the summary."""
    from promptcli.io.provenance import base_provenance
    from promptcli.noise import corruption as noise

    o = options
    noise_type = NoiseType.check(o.noise_type, "--type")
    rate, seed, per_class, shots, pairs, matrix = o.rate, o.seed, o.per_class, o.shots, o.pairs, o.matrix
    features, classnames, template, templates = o.features, o.classnames, o.template, o.templates
    confusion_from = (
        None if o.confusion_from is None else ConfusionFrom.check(o.confusion_from, "--confusion-from")
    )
    to_stdout = output == STDIO
    _check_options(
        noise_type, rate, shots, pairs, matrix, confusion_from, template, templates, to_stdout, json_out
    )
    if rate is not None:
        noise.check_rate(rate)
    check_seed(seed)
    if shots is not None:
        check_at_most(shots, INT_MAX, "--shots")
    sidecar = None if to_stdout else Path(f"{output}.json")
    inputs = {"LABELS": labels, "--features": features, "--classnames": classnames}
    check_distinct({**inputs, "--pairs": pairs, "--matrix": matrix}, {"-o": output, "the sidecar": sidecar})
    if not to_stdout:
        check_output_path(output, force)
        check_output_path(sidecar, force)

    table, fs, input_sha = _read_input(labels, features, warn, allow_noisy=rate == 0)
    # --rate 0 adds no noise: a real-noise input's own clean_label/is_noisy (e.g. from `promptcli dataset`)
    # pass through unchanged, so --shots K --rate 0 draws K rows per given label and keeps their truth.
    keep_truth = rate == 0 and any(table.has(c) for c in ADDED)
    if features is not None:
        from promptcli.io.features import read_feature_index

        fs = read_feature_index(features)
    names = _class_list(table, fs, classnames)
    if len(names) < 2:
        raise InputError(
            f"label noise needs at least 2 classes, got {len(names)}",
            where=features or classnames or table.source,
            hint="give the full class list with --features or --classnames",
        )
    clean = _label_indices(table, names)
    n_classes = len(names)

    built = TRANSITIONS[noise_type](_Inputs(o, table, fs, clean, names, info))
    transition, sources, record = built.transition, built.sources, built.record

    effective_rate: float | np.ndarray = rate if rate is not None else 1.0 - np.diag(transition)
    if shots is not None:
        fewshot = noise.few_shot_noisy(
            clean,
            n_classes,
            shots,
            float(effective_rate),
            noise_type,
            seed,
            transition=transition,
            sources=sources,
            classnames=names,
        )
        src_rows = fewshot.indices
        noisy, truth = fewshot.labels, fewshot.clean
    else:
        if isinstance(effective_rate, np.ndarray):
            for c, r in enumerate(effective_rate):
                noise.check_rate(float(r), where=f"{matrix}: row {names[c]!r} (1 - diagonal)")
        noisy = noise.corrupt_labels(
            clean, n_classes, effective_rate, noise_type, seed, per_class, transition
        )
        src_rows, truth = np.arange(len(clean)), clean

    columns = list(table.columns) + ([] if keep_truth else [c for c in ADDED if c not in table.columns])
    rows = []
    for r, y, t in zip(src_rows, noisy, truth):
        row = dict(table.rows[int(r)])
        if keep_truth:
            row.update(label=names[y])
        else:
            row.update(label=names[y], clean_label=names[t], is_noisy=int(y != t))
        rows.append(row)

    counts = noise.transition_counts(truth, noisy, n_classes)
    n_noisy = int(counts.sum() - np.trace(counts))
    result = {
        **base_provenance(),
        "input": table.source,
        "input_sha256": input_sha,
        "output": output,
        "type": noise_type,
        "rate": rate,
        "seed": seed,
        "per_class": per_class,
        "shots": shots,
        "classes": names,
        "n_rows": len(rows),
        "n_noisy": n_noisy,
        "realised_rate": n_noisy / len(rows) if rows else 0.0,
        "transition_counts": counts.tolist(),
        "per_class_counts": {
            name: {
                "rows": int(counts[c].sum()),
                "flipped_from": int(counts[c].sum() - counts[c, c]),
                "flipped_to": int(counts[:, c].sum() - counts[c, c]),
            }
            for c, name in enumerate(names)
        },
        **record,
    }
    if rate is not None and rows and abs(result["realised_rate"] - rate) > REALISED_TOLERANCE:
        per = f"{shots} shots" if shots else "its images"
        warn(
            f"realised noise rate {result['realised_rate']:.1%} is not --rate {rate:g}: each class flips "
            f"round({rate:g} x {per}) labels; `report` files runs under the rate asked for, so choose a rate "
            "that is a whole number of each class's labels"
        )
    if keep_truth:
        flags = [row.get("is_noisy", "") for row in rows]
        result["input_truth"] = {
            "kept": True,
            "n_noise_known": sum(f in ("0", "1") for f in flags),
            "n_noisy": flags.count("1"),
        }
    if fs is not None:
        result["features"] = {"path": str(fs.path), "sha256": sha256_file(fs.path)}

    from promptcli.io.labels import write_labels

    write_labels(output, columns, rows)
    if sidecar is not None:
        # A C x C count matrix: one number per line is unreadable past a few dozen classes.
        indent = 2 if n_classes <= 50 else None
        result = write_sidecar(output, result, indent=indent)  # + the CSV's SHA-256: readers check it
    return result


def _check_options(
    noise_type: str,
    rate: float | None,
    shots: int | None,
    pairs: Path | None,
    matrix: Path | None,
    confusion_from: str | None,
    template: list[str] | None,
    templates: str | None,
    to_stdout: bool,
    json_out: bool,
) -> None:
    if to_stdout and json_out:
        raise InputError(
            "-o - and --json both write to stdout",
            where="--json",
            hint="write the CSV to a file, or drop --json",
        )
    if rate is None and (noise_type != "matrix" or shots is not None):
        raise InputError("no noise rate", where="--rate", hint="e.g. --rate 0.3 (0 keeps every label)")
    for given, needs, option in (
        (pairs, "pair", "--pairs"),
        (matrix, "matrix", "--matrix"),
        (confusion_from, "confusion", "--confusion-from"),
        (template, "confusion", "--template"),
        (templates, "confusion", "--templates"),
    ):
        if given and noise_type != needs:
            raise InputError(
                f"{option} applies to --type {needs} only", where=option, hint=f"add --type {needs}"
            )
    if noise_type == "matrix" and matrix is None:
        raise InputError(
            "--type matrix needs --matrix FILE", where="--matrix", hint="a C x C CSV, rows sum to 1"
        )


def _is_hdf5(source: str) -> bool:
    if source == STDIO:
        return False
    path = require_file(source, "labels file")
    with open(path, "rb") as handle:
        return handle.read(8) == HDF5_MAGIC


def _read_input(source: str, features: Path | None, warn: Callable[[str], None], allow_noisy: bool = False):
    """The clean labels: a labels CSV (or stdin), or a features file's paths and ground truth (not its feature
    values: :func:`_confusion_score` reads those it needs)."""
    from promptcli.io.features import read_feature_index
    from promptcli.io.labels import labels_from_features, read_labels

    if _is_hdf5(source):
        fs = read_feature_index(source)
        table = labels_from_features(fs)
        if not table.rows:
            raise InputError(
                "the features file carries no ground-truth labels",
                where=source,
                hint="extract from an ImageFolder tree or a CSV with a label column, or give a labels CSV",
            )
        if len(table) < len(fs):
            warn(f"{len(fs) - len(table)} images without a label in {source} are left out")
        return table, fs, sha256_file(source)
    table = read_labels(source)
    if table.has("clean_label") and not allow_noisy:
        # Corrupting noisy labels again would lose the truth; a file whose labels are all clean is fine.
        for i, row in enumerate(table.rows):
            if row.get("clean_label", "") != row.get("label", ""):
                raise InputError(
                    "these labels are already noisy (label differs from clean_label)",
                    where=table.where(i),
                    hint="corrupt the clean labels: keep path and clean_label, renamed to label",
                )
    return table, None, labels_sha256(table, source)


def _class_list(table: LabelTable, fs, classnames: Path | None) -> list[str]:
    """--features' class list, else --classnames, else the sorted labels."""
    from promptcli.io.image_sources import read_classnames

    if fs is not None and fs.classnames:
        if classnames is not None and read_classnames(classnames) != list(fs.classnames):
            raise InputError(
                "does not list the features file's classes in its order",
                where=classnames,
                hint="drop --classnames: the features file gives the class list",
            )
        return list(fs.classnames)
    if classnames is not None:
        return read_classnames(classnames)
    for i, row in enumerate(table.rows):
        if not row["label"]:  # a blank cell would otherwise become a class named ''
            raise InputError(
                "empty label",
                where=table.where(i),
                hint="give every row a label, or the class list with --features or --classnames",
            )
    names = sorted({row["label"] for row in table.rows})
    # 'Cat' and 'cat' would be two classes, and a flip between them no noise at all in a prompt
    check_class_names(((n, n) for n in names), table.source, what="label")
    return names


def _label_indices(table: LabelTable, names: list[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    out = np.empty(len(table), dtype=np.int64)
    for i, row in enumerate(table.rows):
        label = row.get("label", "")
        if label not in index:
            shown = ", ".join(names[:8]) + ("…" if len(names) > 8 else "")
            raise InputError(
                f"label {label!r} is not in the class list",
                where=table.where(i),
                hint=f"use one of: {shown}",
            )
        out[i] = index[label]
    return out


def _confusion_score(fs, table, clean, names, source, template, templates, pretrained, device, info):
    """Class-to-class score whose off-diagonal argmax is the confusion: prompt similarity, or the zero-shot
    confusion counts on the features (prompt similarity breaking ties)."""
    from promptcli.models.loading import load_model_from_record
    from promptcli.models.zeroshot import resolve_templates
    from promptcli.noise import pseudolabels

    prompts = resolve_templates(template, templates)
    loaded = load_model_from_record(
        fs.attrs, source=fs.path, pretrained=pretrained, device=device, dim=fs.dim
    )
    similarity = pseudolabels.text_similarity(loaded, names, prompts)
    record: dict[str, Any] = {"confusion_from": source, "templates": prompts, "model": loaded.identity()}
    if source == "text":
        return similarity, record
    by_path = fs.index_by_path()
    pairs = [(by_path[row["path"]], y) for row, y in zip(table.rows, clean) if row["path"] in by_path]
    if not pairs:
        raise InputError(
            "no label paths are in the features file",
            where=fs.path,
            hint="--confusion-from predictions needs features of the labelled images",
        )
    rows, truth = (np.array(v, dtype=np.int64) for v in zip(*pairs))
    pred = pseudolabels.zero_shot_predict(loaded, _feature_rows(fs, rows), names, prompts).labels
    confusion = pseudolabels.confusion_matrix(truth, pred, len(names))
    info(f"Zero-shot accuracy on {len(rows)} labelled images: {np.trace(confusion) / len(rows):.1%}")
    record["zero_shot_confusion"] = confusion.tolist()
    # Similarity lies in [-1, 1], so 0.25 x similarity only breaks ties between equal counts.
    return confusion + 0.25 * similarity, record


def _feature_rows(fs: FeatureIndex, rows: np.ndarray) -> np.ndarray:
    """The features of ``fs``'s ``rows`` (in that order, repeats kept), reading only those rows."""
    from promptcli.io.features import read_features

    wanted = read_features(fs.path, load_views=False, only_paths=[fs.paths[r] for r in rows])
    position = wanted.index_by_path()
    return wanted.features[[position[fs.paths[r]] for r in rows]]


@dataclass
class _Inputs:
    """What a noise type's transition builder may use."""

    options: CorruptOptions
    table: LabelTable
    fs: FeatureIndex | None  # the features file's rows, without their feature values
    clean: np.ndarray  # true class index per row
    names: list[str]
    info: Callable[[str], None]


@dataclass
class _Built:
    transition: np.ndarray  # (C, C): rows the true class, where its flips go
    sources: np.ndarray | None = None  # which classes flip (confusion noise), None: as the rate says
    record: dict[str, Any] = field(default_factory=dict)  # what the sidecar records about it


def _symmetric(x: _Inputs) -> _Built:
    from promptcli.noise import corruption as noise

    return _Built(noise.symmetric_transition(len(x.names)))


def _pair(x: _Inputs) -> _Built:
    from promptcli.noise import corruption as noise

    pairs, names = x.options.pairs, x.names
    transition = noise.pair_transition(len(names), noise.read_pairs(pairs, names) if pairs else None)
    record: dict[str, Any] = {
        "pairs": {
            names[i]: names[int(transition[i].argmax())] for i in range(len(names)) if transition[i].any()
        }
    }
    if pairs:
        record["pairs_file"] = {"path": str(pairs), "sha256": sha256_file(pairs)}
    return _Built(transition, None, record)


def _confusion(x: _Inputs) -> _Built:
    from promptcli.noise import corruption as noise

    o, names = x.options, x.names
    if x.fs is None:
        raise InputError(
            "--type confusion needs the features file and its model",
            where="--features",
            hint="pass --features features.h5 (or give the .h5 as input)",
        )
    score, record = _confusion_score(
        x.fs,
        x.table,
        x.clean,
        names,
        o.confusion_from or "text",
        o.template,
        o.templates,
        o.pretrained,
        o.device,
        x.info,
    )
    transition = noise.confusion_transition(score)
    record["confusion"] = {names[i]: names[int(transition[i].argmax())] for i in range(len(names))}
    return _Built(transition, noise.confusion_sources(score), record)


def _matrix(x: _Inputs) -> _Built:
    from promptcli.noise import corruption as noise

    matrix, rate = x.options.matrix, x.options.rate
    transition = noise.read_transition_matrix(require_file(matrix, "matrix file"), x.names)
    record: dict[str, Any] = {"matrix_file": {"path": str(matrix), "sha256": sha256_file(matrix)}}
    if rate is None:
        record["rate_from_matrix_diagonal"] = True
    elif np.any(np.diag(transition) > 0):
        raise InputError(
            "with --rate the matrix only says where flips go, so its diagonal must be 0",
            where=matrix,
            hint="drop --rate to use 1 - diagonal as each class's noise rate, or zero the diagonal",
        )
    return _Built(transition, None, record)


# --type NAME -> how its transition matrix is built. Adding a noise type: a builder here, one line
# below and its value in promptcli.choices.NoiseType (a test checks the two agree).
TRANSITIONS: dict[str, Callable[[_Inputs], _Built]] = {
    "symmetric": _symmetric,
    "pair": _pair,
    "confusion": _confusion,
    "matrix": _matrix,
}
