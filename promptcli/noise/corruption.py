"""Controlled label noise: exact-count label corruption and the few-shot noisy training set.

Labels are class indices ``0..C-1``. A transition matrix ``T`` is (C, C), rows the true class and
columns the noisy label; corruption uses only its off-diagonal part, normalised per row, to decide
where a flipped label goes (``flip_targets``). How many labels flip is set by the rate, exactly:
``round(rate * n)`` (half up), never an expectation. All randomness comes from one numpy Generator
seeded by the caller, so a seed fixes the result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from promptcli.choices import NoiseType
from promptcli.errors import InputError
from promptcli.io.checks import csv_records
from promptcli.io.fileio import check_input_file

NOISE_TYPES = NoiseType.values()
ROW_SUM_TOLERANCE = 1e-6


def exact_round(x: float) -> int:
    """round(x) half up, robust to float error (0.35 * 10 = 3.4999... rounds to 4)."""
    return int(math.floor(x + 0.5 + 1e-9))


def check_rate(rate: float, where: str = "--rate") -> float:
    """A noise rate in [0, 1)."""
    if not (math.isfinite(rate) and 0.0 <= rate < 1.0):
        raise InputError(
            f"rate must be in [0, 1), got {rate:g}",
            where=where,
            hint="e.g. --rate 0.3 flips 30% of the labels",
        )
    return float(rate)


def _name(c: int, classnames: Sequence[str] | None) -> str:
    return repr(classnames[c]) if classnames is not None and c < len(classnames) else f"class {c}"


def check_labels(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Labels as int64 in [0, C); at least two classes."""
    if n_classes < 2:
        raise InputError(
            f"label noise needs at least 2 classes, got {n_classes}",
            hint="give the full class list (--features or --classnames)",
        )
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1:
        raise ValueError("labels must be one-dimensional")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise InputError(f"labels must be class indices in [0, {n_classes})", hint="check the class list")
    return labels


# --- transition matrices ---------------------------------------------------------------------------


def symmetric_transition(n_classes: int) -> np.ndarray:
    """Uniform over the other classes."""
    t = np.full((n_classes, n_classes), 1.0 / (n_classes - 1))
    np.fill_diagonal(t, 0.0)
    return t


def pair_transition(n_classes: int, mapping: Mapping[int, int] | None = None) -> np.ndarray:
    """Class i flips to ``mapping[i]`` (default i+1 mod C); classes left out of a mapping never flip."""
    if mapping is None:
        mapping = {i: (i + 1) % n_classes for i in range(n_classes)}
    t = np.zeros((n_classes, n_classes))
    for src, dst in mapping.items():
        if src == dst:
            raise ValueError(f"class {src} maps to itself")
        t[src, dst] = 1.0
    return t


def _offdiag_argmax(score: np.ndarray) -> np.ndarray:
    s = np.array(score, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] < 2:
        raise ValueError("a score matrix must be square with at least 2 classes")
    np.fill_diagonal(s, -np.inf)
    return s.argmax(axis=1)  # ties: the lowest class index


def confusion_transition(score: np.ndarray) -> np.ndarray:
    """Each class flips to the other class with the highest ``score[true, other]`` (e.g. similarity)."""
    n = score.shape[0]
    t = np.zeros((n, n))
    t[np.arange(n), _offdiag_argmax(score)] = 1.0
    return t


def confusion_sources(score: np.ndarray) -> np.ndarray:
    """Few-shot sources for ``confusion``: slot j takes images of the class i != j maximising ``score[i, j]``.

    Row j of the result weights the source classes of slot j (see :func:`few_shot_noisy`).
    For a symmetric score (text similarity) this is the same pairing as :func:`confusion_transition`.
    """
    return confusion_transition(np.asarray(score).T)


def flip_targets(transition: np.ndarray) -> np.ndarray:
    """Where a flipped label goes: the off-diagonal part of ``transition``, each row summing to 1 (or 0)."""
    t = np.array(transition, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError("a transition matrix must be square")
    if (t < 0).any():
        raise ValueError("a transition matrix must be non-negative")
    np.fill_diagonal(t, 0.0)
    sums = t.sum(axis=1, keepdims=True)
    return np.divide(t, sums, out=np.zeros_like(t), where=sums > 0)


def default_transition(kind: str, n_classes: int) -> np.ndarray:
    if kind == "symmetric":
        return symmetric_transition(n_classes)
    if kind == "pair":
        return pair_transition(n_classes)
    if kind in NOISE_TYPES:
        raise ValueError(f"noise type {kind!r} needs an explicit transition matrix")
    raise InputError(f"unknown noise type {kind!r}", where="--type", hint="use " + ", ".join(NOISE_TYPES))


# --- exact allocation ------------------------------------------------------------------------------


def allocate(total: int, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder, ties at random)."""
    w = np.asarray(weights, dtype=np.float64)
    out = np.zeros(len(w), dtype=np.int64)
    if total <= 0:
        return out
    if w.sum() <= 0:
        raise ValueError("cannot allocate over zero weights")
    quota = total * w / w.sum()
    out[:] = np.floor(quota + 1e-9)
    left = total - int(out.sum())
    if left > 0:
        frac = np.where(w > 0, quota - out, -np.inf)
        order = np.lexsort((rng.random(len(w)), -frac))
        out[order[:left]] += 1
    return out


# --- corruption ------------------------------------------------------------------------------------


def corrupt_labels(
    labels: np.ndarray,
    n_classes: int,
    rate: float | Sequence[float] | np.ndarray,
    kind: str = "symmetric",
    seed: int = 0,
    per_class: bool = False,
    transition: np.ndarray | None = None,
) -> np.ndarray:
    """Noisy copy of ``labels`` with an exact number of flipped labels.

    Without ``per_class``, exactly ``round(rate * n)`` labels flip, spread over the classes in
    proportion to their sizes (largest remainder); with it, exactly ``round(rate * n_c)`` flip in
    every class c. ``rate`` may be one value per class (then per class). Only classes whose
    transition row has off-diagonal mass can flip; the rate applies to those (a partial pair
    mapping leaves the other classes clean). Each class's flips go to the other classes in
    proportion to its ``flip_targets`` row, again exactly. A flipped label never equals the clean one.
    """
    labels = check_labels(labels, n_classes)
    targets = flip_targets(transition if transition is not None else default_transition(kind, n_classes))
    if targets.shape != (n_classes, n_classes):
        raise ValueError(f"transition must be {n_classes} x {n_classes}")
    rate_arr = np.asarray(rate, dtype=np.float64)
    rates = np.broadcast_to(rate_arr, (n_classes,))
    for r in np.unique(rates):
        check_rate(float(r))
    flippable = targets.sum(axis=1) > 0
    counts = np.bincount(labels, minlength=n_classes)
    rng = np.random.default_rng(seed)
    if per_class or rate_arr.ndim > 0:
        k = np.array(
            [exact_round(rates[c] * counts[c]) if flippable[c] else 0 for c in range(n_classes)],
            dtype=np.int64,
        )
    else:
        pool = counts * flippable
        k = allocate(exact_round(float(rate_arr) * int(pool.sum())), pool, rng)
    noisy = labels.copy()
    members = _members(labels, counts)
    for c in np.flatnonzero(k):
        chosen = rng.choice(members[c], size=int(k[c]), replace=False)  # random order
        noisy[chosen] = np.repeat(np.arange(n_classes), allocate(int(k[c]), targets[c], rng))
    return noisy


def transition_counts(clean: np.ndarray, noisy: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts of (clean label, noisy label) pairs."""
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (np.asarray(clean, dtype=np.int64), np.asarray(noisy, dtype=np.int64)), 1)
    return out


def _members(labels: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Row indices of every class, ascending (one sort instead of C scans)."""
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.cumsum(counts)[:-1])


# --- few-shot noisy training set -------------------------------------------------------------------


@dataclass
class FewShotSet:
    """A few-shot training set: rows of the source, their (noisy) slot label and their true label."""

    indices: np.ndarray  # rows of the input labels, grouped by slot class
    labels: np.ndarray  # the class each row is labelled with (its slot)
    clean: np.ndarray  # the row's true class

    @property
    def is_noisy(self) -> np.ndarray:
        return self.labels != self.clean


def _is_uniform(sources: np.ndarray) -> bool:
    s = flip_targets(sources)
    return bool(np.allclose(s, symmetric_transition(len(s))))


def few_shot_noisy(
    labels: np.ndarray,
    n_classes: int,
    shots: int,
    rate: float,
    kind: str = "symmetric",
    seed: int = 0,
    transition: np.ndarray | None = None,
    sources: np.ndarray | None = None,
    classnames: Sequence[str] | None = None,
) -> FewShotSet:
    """The K-shot noisy training set of the prompt-tuning-under-noise literature (PTNL protocol).

    For every class j, exactly ``shots`` rows labelled j: ``shots - m`` images of class j and
    ``m = round(rate * shots)`` images of other classes relabelled j. No image is used twice.
    ``sources[j, i]`` weights class i as a source of slot j's noisy images (diagonal ignored); by
    default it is column j of the flip targets, so with ``pair`` the source is the class that
    maps to j and with ``symmetric`` the sources are spread evenly over the other classes (each
    class then gives exactly ``shots`` images in all). Raises InputError when a class has too few.
    """
    labels = check_labels(labels, n_classes)
    if shots < 1:
        raise InputError(f"--shots must be at least 1, got {shots}", where="--shots", hint="e.g. --shots 16")
    rate = check_rate(rate)
    m = exact_round(rate * shots)
    if sources is None:
        t = transition if transition is not None else default_transition(kind, n_classes)
        sources = flip_targets(t).T
    weights = np.array(sources, dtype=np.float64)
    np.fill_diagonal(weights, 0.0)
    rng = np.random.default_rng(seed)
    alloc = np.zeros((n_classes, n_classes), dtype=np.int64)  # alloc[slot, source]
    if m > 0:
        if _is_uniform(weights):
            # Even spread with the remainders rotated along a random cycle of the classes, so that
            # every class is the source of exactly m noisy images: each class gives `shots` in all.
            base, extra = divmod(m, n_classes - 1)
            alloc[:] = base
            np.fill_diagonal(alloc, 0)
            cycle = rng.permutation(n_classes)
            ahead = cycle[(np.arange(n_classes)[:, None] + np.arange(1, extra + 1)) % n_classes]
            np.add.at(alloc, (np.repeat(cycle, extra), ahead.ravel()), 1)
        else:
            for j in range(n_classes):
                if weights[j].sum() <= 0:
                    raise InputError(
                        f"no class flips into {_name(j, classnames)}, so its noisy shots have no source",
                        where="--type",
                        hint="use --type symmetric, or a pair mapping / matrix where every class has a source",
                    )
                alloc[j] = allocate(m, weights[j], rng)
    counts = np.bincount(labels, minlength=n_classes)
    demand = (shots - m) + alloc.sum(axis=0)
    short = np.flatnonzero(demand > counts)
    if short.size:
        detail = "; ".join(f"{_name(c, classnames)} has {counts[c]}, needs {demand[c]}" for c in short[:5])
        more = f" (and {short.size - 5} more)" if short.size > 5 else ""
        raise InputError(
            f"too few images for {shots} shots at rate {rate:g}: {detail}{more}",
            where="--shots",
            hint="lower --shots or add images of those classes",
        )
    picked: list[list[np.ndarray]] = [[] for _ in range(n_classes)]
    for i, rows in enumerate(_members(labels, counts)):
        pool = rng.permutation(rows)[: demand[i]]
        picked[i].append(pool[: shots - m])
        start = shots - m
        for j in np.flatnonzero(alloc[:, i]):
            picked[j].append(pool[start : start + alloc[j, i]])
            start += alloc[j, i]
    indices = np.concatenate([np.sort(np.concatenate(rows)) for rows in picked]).astype(np.int64)
    return FewShotSet(indices=indices, labels=np.repeat(np.arange(n_classes), shots), clean=labels[indices])


# --- reading mappings and matrices -----------------------------------------------------------------


def _read_csv_rows(path: str | Path, what: str) -> list[tuple[int, list[str]]]:
    """The non-blank records of a pairs or matrix CSV, cells stripped, each with the line it starts on."""
    p = check_input_file(path, what)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError("not a UTF-8 text CSV", where=p, hint="save it as UTF-8 CSV") from exc
    return [(line, [cell.strip() for cell in row]) for line, row in csv_records(text, path)]


def read_pairs(path: str | Path, classnames: Sequence[str]) -> dict[int, int]:
    """A pair mapping CSV with header ``from,to`` (class names); each class at most once as ``from``."""
    rows = _read_csv_rows(path, "pairs file")
    if not rows or [c.lower() for c in rows[0][1][:2]] != ["from", "to"]:
        raise InputError(
            "expected a header row from,to", where=path, hint="one row per flip: from,to (class names)"
        )
    n_named = max(i + 1 for i, c in enumerate(rows[0][1]) if c)  # further named columns: notes, ignored
    index = {n: i for i, n in enumerate(classnames)}
    mapping: dict[int, int] = {}
    for line, row in rows[1:]:
        where = f"{path}:{line}"
        if len(row) < 2:
            raise InputError("expected two columns from,to", where=where, hint="one row per flip")
        stray = [c for c in row[n_named:] if c]
        if stray:  # a third class name ("a,b,c") would otherwise be dropped unread
            raise InputError(
                f"row has {len(row)} fields, the header {n_named} (a field beyond the named columns holds "
                f"{stray[0]!r})",
                where=where,
                hint="one row per flip: from,to (quote class names that hold a comma)",
            )
        for name in row[:2]:
            if name not in index:
                shown = ", ".join(classnames[:8]) + ("…" if len(classnames) > 8 else "")
                raise InputError(f"unknown class {name!r}", where=where, hint=f"use one of: {shown}")
        src, dst = index[row[0]], index[row[1]]
        if src == dst:
            raise InputError(f"class {row[0]!r} maps to itself", where=where, hint="map it to another class")
        if src in mapping:
            raise InputError(
                f"class {row[0]!r} is mapped twice", where=where, hint="give one target per class"
            )
        mapping[src] = dst
    if not mapping:
        raise InputError("no pairs", where=path, hint="one row per flip: from,to")
    return mapping


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def read_transition_matrix(path: str | Path, classnames: Sequence[str]) -> np.ndarray:
    """A C x C transition matrix CSV (rows: true class, columns: noisy label; rows sum to 1).

    Either bare numbers in class-list order, or with a header row and a first column of class
    names (any order; reordered to the class list).
    """
    rows = _read_csv_rows(path, "matrix file")
    n = len(classnames)
    if not rows:
        raise InputError("empty matrix file", where=path, hint=f"give {n} rows of {n} numbers")
    lines = [line for line, _ in rows]
    rows = [row for _, row in rows]
    labelled = any(_number(c) is None for c in rows[0][1:]) or _number(rows[0][0]) is None
    index = {name: i for i, name in enumerate(classnames)}
    order = list(range(n))
    body = rows
    if labelled:
        header, body = rows[0][1:], rows[1:]
        for name in header:
            if name not in index:
                raise InputError(
                    f"unknown class {name!r} in the header",
                    where=f"{path}:{lines[0]}",
                    hint="use class names",
                )
        if sorted(index[h] for h in header) != order:
            raise InputError(
                "the header must name every class once",
                where=f"{path}:{lines[0]}",
                hint=f"{n} classes expected",
            )
        order = [index[h] for h in header]
    matrix = np.full((n, n), np.nan)
    seen = set()
    if len(body) != n:
        raise InputError(f"expected {n} rows, got {len(body)}", where=path, hint=f"one row per class ({n})")
    for r, (line, row) in enumerate(zip(lines[1:] if labelled else lines, body)):
        where = f"{path}:{line}"
        cells = row
        if labelled:
            if row[0] not in index:
                raise InputError(
                    f"unknown class {row[0]!r}", where=where, hint="rows start with a class name"
                )
            r, cells = index[row[0]], row[1:]
            if r in seen:
                raise InputError(f"class {row[0]!r} has two rows", where=where, hint="one row per class")
            seen.add(r)
        values = [_number(c) for c in cells]
        # a probability is at most 1: larger values (1e308) could only overflow the row's sum
        if len(values) != n or any(v is None or not 0 <= v <= 1 for v in values):
            raise InputError(f"expected {n} numbers in [0, 1]", where=where, hint="one probability per class")
        total = math.fsum(values)  # type: ignore[arg-type]
        if abs(total - 1.0) > ROW_SUM_TOLERANCE:
            raise InputError(
                f"row sums to {total:.6g}, not 1", where=where, hint="each row is a probability distribution"
            )
        matrix[r, order] = values
    return matrix
