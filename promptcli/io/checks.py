"""Input checks shared by the readers and the commands: finite numbers, seeds, sizes, unique keys.

Each check raises :class:`~promptcli.errors.InputError` (one line naming the file, row or option,
exit code 2) instead of letting a bad value flow on into a silently wrong result.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from promptcli.errors import InputError, RuntimeFailure

# Counts (batch sizes, chunk sizes, workers) beyond a C int overflow inside torch and numpy.
INT_MAX = 2**31 - 1
MAX_VIEWS = 1024  # augmented views per image: far above any recipe, below an allocation that cannot succeed


def check_at_most(value: int, high: int, option: str, hint: str = "give a smaller number") -> None:
    """Refuse an integer option above ``high`` (one line, instead of an overflow deep inside torch)."""
    if value > high:
        raise InputError(f"must be <= {high}, got {value}", where=option, hint=hint)


# numpy's seeding accepts 0 .. 2**32 - 1 (per word) and torch.manual_seed 64-bit values; one range for both.
SEED_MAX = 2**32 - 1


def check_finite_option(value: float | None, option: str, hint: str = "give a finite number") -> None:
    """Refuse ``nan`` and ``inf`` for a float option (``None``, i.e. not given, passes)."""
    if value is not None and not math.isfinite(float(value)):
        raise InputError(f"must be a finite number, got {value}", where=option, hint=hint)


def check_finite_fields(options: Any, hint: str = "give a finite number") -> None:
    """Refuse NaN/inf in any float field of an options dataclass (field ``init_std`` is ``--init-std``)."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if isinstance(value, float):
            check_finite_option(value, "--" + f.name.replace("_", "-"), hint)


def divergence_error(epoch: int, step: int | None, lr: float, what: str) -> RuntimeFailure:
    """The one-line error of a training run whose loss or parameters became NaN/inf (exit 1)."""
    at = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
    return RuntimeFailure(
        f"training diverged at {at}: the {what} is not finite (NaN or inf); no prompt was saved",
        where="--lr",
        hint=f"tune again with a lower --lr (this run used {lr:g})",
    )


def check_seed(seed: int, option: str = "--seed") -> int:
    """A seed every random generator promptcli uses accepts: 0 <= seed < 2**32."""
    if not 0 <= int(seed) <= SEED_MAX:
        raise InputError(f"must be in 0..{SEED_MAX}, got {seed}", where=option, hint="e.g. --seed 0")
    return int(seed)


def first_non_finite(array: np.ndarray) -> int | None:
    """Index (along axis 0) of the first row holding a NaN or inf, else None."""
    if array.size == 0:
        return None
    bad = ~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def check_finite_rows(
    array: np.ndarray, where: str | Path, name_of: Callable[[int], str], what: str = "features"
) -> None:
    """Refuse an array with NaN/inf, naming the first bad row (``name_of(row)``, e.g. its image path)."""
    row = first_non_finite(array)
    if row is not None:
        raise InputError(
            f"{what} of row {row} ({name_of(row)}) are not finite (NaN or inf)",
            where=where,
            hint="the file is damaged or was made from bad input; re-extract it",
        )


def check_unique_keys(
    keys: Sequence[str],
    where: str,
    values: Sequence[str] | None = None,
    *,
    first_line: int = 2,
    key: str = "path",
    unit: str = "line",
) -> None:
    """Refuse a key listed twice, naming both rows (``unit`` ``first_line + index``).

    With ``values`` (the label of each row) the message says when the two rows also conflict.
    Exact duplicates are refused too: a repeated row would silently weigh its image twice.
    """
    seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        j = seen.setdefault(k, i)
        if j == i:
            continue
        a, b = j + first_line, i + first_line
        what = f"{key} {k!r} is listed twice ({unit}s {a} and {b})"
        if values is not None and values[i] != values[j]:
            what = (
                f"{key} {k!r} is listed twice with different labels "
                f"({values[j]!r} on {unit} {a}, {values[i]!r} on {unit} {b})"
            )
        raise InputError(what, where=where, hint=f"list each {key} once")


def check_class_names(names: Iterable[tuple[str, str]], where: str | Path, what: str = "folder") -> None:
    """Refuse sources (folder names, labels) whose class names are empty or collide.

    ``names`` holds (source, class name) pairs, e.g. ("x_y", "x y").
    """
    owner: dict[str, str] = {}
    for source, name in names:
        if not name:
            raise InputError(
                f"{what} {source!r} gives an empty class name",
                where=where,
                hint=f"rename the {what} to a class name",
            )
        if name in owner:
            raise InputError(
                f"{what}s {owner[name]!r} and {source!r} both give the class name {name!r}",
                where=where,
                hint=f"rename one of the {what}s",
            )
        owner[name] = source
