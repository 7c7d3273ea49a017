"""The labels CSV contract: ``path,label[,clean_label,is_noisy,confidence,...]`` joined to features by path."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from promptcli.errors import InputError
from promptcli.io.checks import check_unique_keys, read_csv_table
from promptcli.io.features import FeatureIndex, FeatureSet, path_key
from promptcli.io.fileio import STDIO, check_input_file, open_output_text, sha256_bytes, sha256_file

REQUIRED = ("path", "label")


@dataclass
class LabelTable:
    """Rows of a labels CSV, in file order, with all their columns (extra columns pass through)."""

    source: str
    columns: list[str]
    rows: list[dict[str, str]]
    text: str = field(default="", repr=False)  # the raw text, for hashing stdin
    lines: list[int] | None = field(default=None, repr=False)  # the line each row starts on (None: row i + 2)

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[str]:
        return [r.get(name, "") for r in self.rows]

    def has(self, name: str) -> bool:
        return name in self.columns

    def line(self, i: int) -> int:
        """The line row ``i`` starts on (quoted newlines and blank lines counted)."""
        return self.lines[i] if self.lines is not None else i + 2

    def where(self, i: int) -> str:
        """``FILE:LINE`` of row ``i``, for messages."""
        return f"{self.source}:{self.line(i)}"


def read_labels(path: str | Path, required: tuple[str, ...] = REQUIRED) -> LabelTable:
    """Read a labels CSV from a file or stdin (``-``)."""
    source = str(path)
    if source == STDIO:
        try:
            stdin = getattr(sys.stdin, "buffer", None)
            text = stdin.read().decode("utf-8-sig") if stdin is not None else sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise InputError("not UTF-8 text", where="<stdin>", hint="pipe in a UTF-8 CSV") from exc
        text = text.removeprefix("\ufeff")  # a BOM, when stdin was opened as text
        where = "<stdin>"
    else:
        p = check_input_file(path, "labels file", "give a CSV with path,label columns")
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InputError("not a UTF-8 text CSV", where=p, hint="save it as UTF-8 CSV") from exc
        where = source
    if text.lstrip().startswith("\x89HDF") or "\x00" in text[:1024]:
        raise InputError("not a CSV (binary file)", where=where, hint="give a CSV with path,label columns")

    def check_header(columns: list[str]) -> None:
        missing = [c for c in required if c not in columns]
        if missing:
            raise InputError(
                f"missing column(s) {', '.join(missing)} (columns: {', '.join(columns) or 'none'})",
                where=where,
                hint="a labels CSV needs a header with " + ",".join(required),
            )

    parsed = read_csv_table(text, where, check_header=check_header)
    columns, rows, lines = parsed.columns, parsed.rows, parsed.lines
    if "is_noisy" in columns:
        for line, row in zip(lines, rows):
            if row["is_noisy"] not in ("", "0", "1"):
                raise InputError(
                    f"is_noisy must be 0, 1 or blank (not known), got {row['is_noisy']!r}",
                    where=f"{where}:{line}",
                    hint="fix the is_noisy column",
                )
    if not rows:
        raise InputError("no rows", where=where, hint="the labels CSV is empty")
    labels = [r.get("label", "") for r in rows] if "label" in columns else None
    paths = [r.get("path", "") for r in rows]
    check_unique_keys(paths, where, labels, lines=lines)
    check_one_spelling(paths, where, lines)
    return LabelTable(where, columns, rows, text, lines)


def check_one_spelling(paths: list[str], where: str, lines: list[int]) -> None:
    """Refuse two spellings of one image path (``x/a.png`` and ``./x/a.png``): labels join features as the features
    file's own checks compare paths (:func:`~promptcli.io.features.path_key`), so both would label one row."""
    seen: dict[str, int] = {}
    for i, p in enumerate(paths):
        j = seen.setdefault(path_key(p), i)
        if j != i:
            raise InputError(
                f"paths {paths[j]!r} (line {lines[j]}) and {p!r} (line {lines[i]}) name one image",
                where=where,
                hint="list each image path once",
            )


def labels_sha256(table: LabelTable, path: str | Path) -> str:
    """The SHA-256 that provenance records for labels read from ``path``: the file's bytes, or stdin's text."""
    return sha256_bytes(table.text.encode("utf-8")) if str(path) == STDIO else sha256_file(path)


def write_labels(path: str | Path, columns: list[str], rows: Iterable[dict[str, object]]) -> None:
    """Write a labels CSV to a file (atomically) or stdout (``-``)."""
    with open_output_text(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def labels_from_features(features: FeatureIndex | FeatureSet) -> LabelTable:
    """The ground-truth labels a features file carries, as a labels table (rows with a label only)."""
    rows = [
        {"path": p, "label": features.classnames[y]}
        for p, y in zip(features.paths, features.labels)
        if y >= 0
    ]
    return LabelTable(str(features.path), ["path", "label"], rows)


@dataclass
class JoinedLabels:
    """Labels aligned to feature rows."""

    rows: np.ndarray  # feature row of each kept label row
    labels: np.ndarray  # class index (the given, possibly noisy, label)
    clean: np.ndarray | None  # class index of clean_label, when present
    is_noisy: np.ndarray | None  # bool, when present
    n_skipped: int = 0
    skipped: list[str] = field(default_factory=list)
    n_truth_unknown: int = 0  # rows with a blank clean_label / is_noisy cell (then clean / is_noisy are None)


def class_index(
    name: str, index: dict[str, int], where: str, classnames: list[str], column: str = "label"
) -> int:
    if name not in index:
        shown = ", ".join(classnames[:8]) + ("…" if len(classnames) > 8 else "")
        raise InputError(
            f"{column} {name!r} is not a class of the features file",
            where=where,
            hint=f"use one of: {shown} (or --skip-missing)",
        )
    return index[name]


def join_labels(
    features: FeatureIndex | FeatureSet, table: LabelTable, skip_missing: bool = False
) -> JoinedLabels:
    """Join labels to feature rows by ``path``; unknown paths or classes are errors unless skipped."""
    by_path = features.index_by_path()
    names = {c: i for i, c in enumerate(features.classnames)}
    # A blank clean_label / is_noisy cell means "not known" (real-noise releases verify only some images,
    # see `promptcli dataset`); a column with blank cells gives no truth for the set rather than a partial one.
    unknown = [
        r for r in table.rows if any(table.has(c) and not r.get(c) for c in ("clean_label", "is_noisy"))
    ]
    has_clean = table.has("clean_label") and not any(not r.get("clean_label") for r in table.rows)
    has_noisy = table.has("is_noisy") and not any(not r.get("is_noisy") for r in table.rows)
    rows, labels, clean, noisy, skipped = [], [], [], [], []
    for i, row in enumerate(table.rows):
        where = table.where(i)
        path = row.get("path", "")
        if (
            path not in by_path
            or row.get("label", "") not in names
            or (has_clean and row.get("clean_label", "") not in names)
        ):
            if skip_missing:
                skipped.append(path)
                continue
            if path not in by_path:
                raise InputError(
                    f"path {path!r} is not in {features.path}",
                    where=where,
                    hint="labels join features by path; check both came from the same images (or --skip-missing)",
                )
            class_index(row.get("label", ""), names, where, features.classnames)
            class_index(row.get("clean_label", ""), names, where, features.classnames, "clean_label")
        rows.append(by_path[path])
        labels.append(names[row["label"]])
        if has_clean:
            clean.append(names[row["clean_label"]])
        if has_noisy:
            flag = row["is_noisy"]  # "0" or "1": read_labels refuses other values, has_noisy blank ones
            noisy.append(flag == "1")
            if has_clean and (labels[-1] != clean[-1]) != noisy[-1]:
                relation = "differs from" if labels[-1] != clean[-1] else "equals"
                raise InputError(
                    f"is_noisy is {flag} but label {row['label']!r} {relation} clean_label {row['clean_label']!r}",
                    where=where,
                    hint="is_noisy must be 1 exactly where label differs from clean_label: fix the row",
                )
    if not rows:
        raise InputError(
            "no label rows match the features", where=table.source, hint="check paths and class names"
        )
    return JoinedLabels(
        rows=np.asarray(rows, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        clean=np.asarray(clean, dtype=np.int64) if has_clean else None,
        is_noisy=np.asarray(noisy, dtype=bool) if has_noisy else None,
        n_skipped=len(skipped),
        skipped=skipped,
        n_truth_unknown=len(unknown),
    )
