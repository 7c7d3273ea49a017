"""Input checks shared by the readers and the commands: finite numbers, seeds, sizes, unique keys.

Each check raises :class:`~promptcli.errors.InputError` (one line naming the file, row or option,
exit code 2) instead of letting a bad value flow on into a silently wrong result.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import unicodedata
from collections.abc import Iterable, Sequence
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


# The largest float32: training runs in float32, and torch refuses to turn a larger option into one.
FLOAT32_MAX = 3.4028234663852886e38


def check_finite_option(value: float | None, option: str, hint: str = "give a finite number") -> None:
    """Refuse ``nan``, ``inf`` and values beyond float32's range for a float option (``None``, i.e. not
    given, passes)."""
    if value is not None and not math.isfinite(float(value)):
        raise InputError(f"must be a finite number, got {value}", where=option, hint=hint)
    if value is not None and abs(float(value)) > FLOAT32_MAX:
        raise InputError(
            f"{value} is beyond the largest float32 ({FLOAT32_MAX:.4g}), which training computes in",
            where=option,
            hint="give a smaller value",
        )


def check_finite_fields(options: Any, hint: str = "give a finite number") -> None:
    """Refuse NaN/inf in any float field of an options dataclass (field ``init_std`` is ``--init-std``)."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if isinstance(value, float):
            check_finite_option(value, "--" + f.name.replace("_", "-"), hint)


# Past these, a run has diverged while staying finite. A batch loss of 1000 x log(classes) (the
# cross-entropy of a uniform guess) needs logit gaps in the thousands, and a logit of 1e6 is far past
# where softmax saturates: no fit to any labels needs either. Bounded losses (GCE, MAE) never reach the
# first; their runs are caught by the second.
DIVERGED_LOSS_FACTOR = 1000.0
DIVERGED_LOGIT = 1e6


@dataclasses.dataclass(frozen=True)
class Suspect:
    """An option that can make a training run diverge, and the change to try ("a lower --lr (this run used 2)")."""

    option: str
    fix: str
    overflow_only: bool = False  # a cause of NaN/inf only (fp16's range), never of a finite explosion


def divergence_error(
    epoch: int, step: int | None, suspects: Sequence[Suspect], what: str, value: float | None = None
) -> RuntimeFailure:
    """The one-line error of a training run whose loss or parameters became NaN/inf, or exploded, naming the
    ``suspects`` (the options of that run that can cause it; the first is the likeliest)."""
    at = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
    finite = value is not None and math.isfinite(value)
    why = f"exploded to {value:.3g}" if finite else "is not finite (NaN or inf)"
    named = [s for s in suspects if not (finite and s.overflow_only)] or [Suspect("--lr", "a lower --lr")]
    return RuntimeFailure(
        f"training diverged at {at}: the {what} {why}; no prompt was saved",
        where=", ".join(dict.fromkeys(s.option for s in named)),
        hint="tune again with " + ", or ".join(s.fix for s in named),
    )


def check_step(
    loss: float,
    largest_logit: float,
    n_classes: int,
    epoch: int,
    step: int | None,
    suspects: Sequence[Suspect],
) -> None:
    """Stop a run whose batch loss or largest |logit| is NaN/inf or past the divergence limits above."""
    if not math.isfinite(loss) or loss > DIVERGED_LOSS_FACTOR * math.log(max(n_classes, 2)):
        raise divergence_error(epoch, step, suspects, "loss", loss)
    if not largest_logit <= DIVERGED_LOGIT:  # NaN fails too
        raise divergence_error(epoch, step, suspects, "largest logit", largest_logit)


# What each JSON type is called in an error ("rate is '30%', not a finite number"). float: any finite number.
JSON_KINDS: dict[type, str] = {
    int: "an integer",
    float: "a finite number",
    str: "a string",
    list: "a list",
    dict: "a JSON object",
    bool: "true or false",
}


def shown(value: Any, width: int = 40) -> str:
    """``repr(value)``, cut to ``width`` characters (a pasted table in a field must not flood the error)."""
    text = repr(value)
    return text if len(text) <= width else f"{text[: width - 3]}..."


def is_json_kind(value: Any, kinds: type | tuple[type, ...]) -> bool:
    """Whether a JSON value is None or one of ``kinds``; a bool is no number (``true`` is not ``1``), and a
    float is any finite number, an integer too (but not one too large for a float)."""
    if value is None:
        return True
    for kind in kinds if isinstance(kinds, tuple) else (kinds,):
        if kind in (int, float) and isinstance(value, bool):
            continue
        if kind is float and isinstance(value, (int, float)):
            try:
                if math.isfinite(value):
                    return True
            except OverflowError:  # an integer of hundreds of digits
                pass
        elif isinstance(value, kind):
            return True
    return False


def check_json_kind(
    value: Any,
    kinds: type | tuple[type, ...],
    name: str,
    where: str | Path,
    hint: str,
    *,
    context: str = "",
    expected: str | None = None,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """``value`` when it is None or one of ``kinds`` (see :func:`is_json_kind`), and a number in ``low..high``
    where those are given; else an error naming the field ``name``, what it holds and what it should be
    (``expected``, by default the name in ``JSON_KINDS``, and the range)."""
    if is_json_kind(value, kinds):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or ((low is None or value >= low) and (high is None or value <= high)):
            return value
    if expected is None:
        expected = " or ".join(JSON_KINDS[k] for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        if low is not None and high is not None:
            expected += f" in {_bound(low)}..{_bound(high)}"
        elif low is not None:
            expected += f" >= {_bound(low)}"
        elif high is not None:
            expected += f" <= {_bound(high)}"
    raise InputError(f"{context}{name} is {shown(value)}, not {expected}", where=where, hint=hint)


def _bound(x: float) -> str:
    """A range bound as written in a message: ``4294967295``, ``0.5``."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_seed(seed: int, option: str = "--seed") -> int:
    """A seed every random generator promptcli uses accepts: an integer, 0 <= seed < 2**32."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"must be an integer, got {seed!r}", where=option, hint="e.g. --seed 0")
    if not 0 <= int(seed) <= SEED_MAX:
        raise InputError(f"must be in 0..{SEED_MAX}, got {seed}", where=option, hint="e.g. --seed 0")
    return int(seed)


def csv_records(text: str, where: str | Path, delimiter: str = ",") -> list[tuple[int, list[str]]]:
    """The records of CSV ``text`` with the line each starts on, blank lines left out (they hold no row).

    Bad quoting or a field over the csv module's limit is refused, naming the line, rather than raised as a
    ``csv.Error``; line numbers count quoted newlines and blank lines, so every message names the real line."""
    records = []
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    line = 1
    try:
        for record in reader:
            if any(cell.strip() for cell in record):
                records.append((line, record))
            line = reader.line_num + 1
    except csv.Error as exc:
        raise InputError(
            f"malformed CSV (line {reader.line_num}: {exc})",
            where=where,
            hint="check quoting and field sizes",
        ) from exc
    return records


@dataclasses.dataclass
class CsvTable:
    """A CSV with a header: its named columns, and each row's values (stripped) with the line it starts on."""

    columns: list[str]
    rows: list[dict[str, str]]
    lines: list[int]


def read_csv_table(
    text: str,
    where: str | Path,
    *,
    delimiter: str = ",",
    check_header: Any = None,
) -> CsvTable:
    """Parse CSV ``text`` whose first record is a header: the one reader of labels CSVs, image lists and gradstats
    CSVs. Column names and values are stripped; header cells without a name (a spreadsheet's trailing commas)
    are ignored while their fields hold nothing. A column named twice, a row with fewer fields than the named
    columns, or a value beyond them is refused, naming the line: a dict of the row would keep one of two columns,
    or read a missing field as blank, silently. ``check_header(columns)`` runs before the rows are checked."""
    records = csv_records(text, where, delimiter)
    header = records[0][1] if records else []
    body = records[1:]
    named = [(i, c.strip()) for i, c in enumerate(header) if c.strip()]
    columns = [c for _, c in named]
    if check_header is not None:
        check_header(columns)
    check_unique_columns(columns, where)
    needed = named[-1][0] + 1 if named else 0  # fields up to the last named column
    kept = {i for i, _ in named}
    separator = "tab" if delimiter == "\t" else "comma"
    for line, record in body:
        stray = [v for i, v in enumerate(record) if i not in kept and v.strip()]
        if len(record) < needed or stray:
            raise InputError(
                f"row has {len(record)} fields, the header {len(header)}"
                + (f" (a field beyond the named columns holds {shown(stray[0])})" if stray else ""),
                where=f"{where}:{line}",
                hint=f"give every row one field per column (quote fields that hold a {separator})",
            )
    rows = [{c: record[i].strip() for i, c in named} for _, record in body]
    return CsvTable(columns, rows, [line for line, _ in body])


def check_unique_columns(columns: Sequence[str], where: str | Path) -> None:
    """Refuse a CSV header naming a column twice (a dict of each row would keep the last, silently)."""
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise InputError(
            f"column {repeated[0]!r} appears twice in the header",
            where=where,
            hint="keep one column of each name",
        )


def check_unique_keys(
    keys: Sequence[str],
    where: str,
    values: Sequence[str] | None = None,
    *,
    first_line: int = 2,
    key: str = "path",
    unit: str = "line",
    lines: Sequence[int] | None = None,
) -> None:
    """Refuse a key listed twice, naming both rows (``unit`` ``first_line + index``, or ``lines[index]``).

    With ``values`` (the label of each row) the message says when the two rows also conflict.
    Exact duplicates are refused too: a repeated row would silently weigh its image twice.
    """
    seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        j = seen.setdefault(k, i)
        if j == i:
            continue
        a, b = (lines[j], lines[i]) if lines is not None else (j + first_line, i + first_line)
        what = f"{key} {k!r} is listed twice ({unit}s {a} and {b})"
        if values is not None and values[i] != values[j]:
            what = (
                f"{key} {k!r} is listed twice with different labels "
                f"({values[j]!r} on {unit} {a}, {values[i]!r} on {unit} {b})"
            )
        raise InputError(what, where=where, hint=f"list each {key} once")


def prompt_key(name: str) -> str:
    """What a class name is in a prompt: CLIP's tokenizer ignores case, repeated spaces and Unicode form."""
    folded = unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())
    return " ".join(folded.split())


def check_class_names(names: Iterable[tuple[str, str]], where: str | Path, what: str = "folder") -> None:
    """Refuse sources (folder names, labels) whose class names are empty or read the same in a prompt.

    ``names`` holds (source, class name) pairs, e.g. ("x_y", "x y"). ``Dog``/``dog``, ``x  y``/``x y``
    and the NFC/NFD spellings of ``café`` give one prompt, so they collide too.
    """
    owner: dict[str, tuple[str, str]] = {}
    for source, name in names:
        if not name:
            raise InputError(
                f"{what} {source!r} gives an empty class name",
                where=where,
                hint=f"rename the {what} to a class name",
            )
        key = prompt_key(name)
        if key in owner:
            raise InputError(
                _collision(what, owner[key], (source, name)), where=where, hint=f"rename one of the {what}s"
            )
        owner[key] = (source, name)


def _collision(what: str, first: tuple[str, str], second: tuple[str, str]) -> str:
    """Why two (source, class name) pairs collide, naming both."""
    (a, name_a), (b, name_b) = first, second
    if name_a == name_b:
        return f"{what}s {a!r} and {b!r} both give the class name {name_a!r}"
    if unicodedata.normalize("NFC", name_a) == unicodedata.normalize("NFC", name_b):
        # the two spellings print alike: show their code points
        return f"{what}s {ascii(a)} and {ascii(b)} spell one class name in two Unicode forms (NFC and NFD)"
    names = "" if (a, b) == (name_a, name_b) else f" (class names {name_a!r} and {name_b!r})"
    return f"{what}s {a!r} and {b!r}{names} read the same in a prompt (case and repeated spaces are ignored)"


def one_or_many(values: object) -> list:
    """``values`` as a list, where one path or string counts as one item (not its characters)."""
    if values is None:
        return []
    if isinstance(values, (str, bytes, os.PathLike)):
        return [values]
    return list(values)
