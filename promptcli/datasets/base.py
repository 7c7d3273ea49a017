"""What every dataset layout produces: image rows with their labels, and the helpers that read list files.

A layout reader turns a known on-disk release into a :class:`Listing`: the class names (in the
release's label order), and one :class:`Row` per image with its absolute file, its given label (the
possibly noisy one), its split and, where the release knows them, its true label and noise flag.
Every problem names the file and row at fault (:class:`InputError`, exit code 2).
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from promptcli.errors import InputError

SPLITS = ("train", "val", "test")
UNKNOWN = ""  # a clean_label / is_noisy cell the release does not know


class Row(NamedTuple):
    """One image: its file, given label, split, and (when known) true label and noise flag."""

    file: str  # a str, not a Path: a release lists millions of images, and Path objects cost time
    label: str
    split: str
    where: str  # the list file and line this row came from, for error messages
    clean_label: str = UNKNOWN
    is_noisy: str = UNKNOWN  # "0", "1" or UNKNOWN


@dataclass
class Listing:
    """A dataset as rows, plus what was read to make it (for provenance)."""

    layout: str
    root: Path
    classes: list[str]
    rows: list[Row]
    has_clean_label: bool = False  # the release knows true labels for (some) rows
    has_is_noisy: bool = False  # the release knows noise flags for (some) rows
    files_read: dict[str, str] = field(default_factory=dict)  # file -> SHA-256
    notes: list[str] = field(default_factory=list)

    def columns(self) -> list[str]:
        """The CSV columns: path,label,split then clean_label/is_noisy where the release knows them."""
        extra = (["clean_label"] if self.has_clean_label else []) + (
            ["is_noisy"] if self.has_is_noisy else []
        )
        return ["path", "label", "split", *extra]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_readable(path: Path) -> Path:
    """``path``, when this process can open it for reading (else a one-line error, not a traceback)."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputError(
            f"cannot read ({exc.strerror or type(exc).__name__})",
            where=path,
            hint="check the file's permissions",
        ) from exc
    return path


def need_file(root: Path, relative: str, layout: str, hint: str | None = None) -> Path:
    """``root/relative`` when it is a readable regular file, else a one-line error: what the layout needs when
    nothing is there, what is there instead (a folder, a FIFO) when something else is."""
    from promptcli.io.fileio import check_input_file

    path = root / relative
    hint = hint or f"see `promptcli dataset list` for the {layout} layout"
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{layout} needs {relative}, which is not there", where=path, hint=hint) from None
    except OSError:
        pass  # check_input_file says why it cannot be looked at
    return check_readable(check_input_file(path, f"{relative} of the {layout} layout", hint))


def need_dir(root: Path, relative: str, layout: str) -> Path:
    path = root / relative
    if not path.is_dir():
        raise InputError(
            f"{layout} needs the folder {relative or '.'}, which is not there",
            where=path,
            hint=f"see `promptcli dataset list` for the {layout} layout",
        )
    return path


def text_lines(
    path: Path, files_read: dict[str, str], skip_header: str | None = None
) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) of each non-blank line; ``skip_header``: a first line starting with
    it is a header. The file's SHA-256 goes into ``files_read``."""
    files_read[str(path)] = sha256_of(path)
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                text = line.strip()
                if not text:
                    continue
                if number == 1 and skip_header is not None and text.startswith(skip_header):
                    continue
                yield number, text
    except UnicodeDecodeError as exc:
        raise InputError(
            "not a UTF-8 text file", where=path, hint="is this the file the release ships?"
        ) from exc


def bad_row(path: Path, number: int, what: str, hint: str) -> InputError:
    return InputError(what, where=f"{path}:{number}", hint=hint)


def class_index(label: str, classes: list[str], where: str) -> int:
    """An integer label as written in a list file, checked against the class list."""
    # int() also takes "1_0" (10), "+1" and other scripts' digits ("٣"): a damaged file would read as other labels
    digits = label[1:] if label.startswith("-") else label
    if not (digits.isascii() and digits.isdigit()):
        raise InputError(
            f"label {label!r} is not an integer", where=where, hint="labels are class indices here"
        )
    value = int(label)
    if not 0 <= value < len(classes):
        raise InputError(
            f"label {value} is outside the class list (0..{len(classes) - 1})",
            where=where,
            hint="the list file and the class-name file do not belong together",
        )
    return value


def unique_classes(names: list[str], where: str | Path) -> list[str]:
    """Class names must be distinct after cleaning (two folders can map to one name), and read differently
    in a prompt (CLIP's tokenizer ignores case, runs of spaces and the Unicode form), as every class list
    promptcli reads must: ``extract`` would refuse the image list written with them."""
    from promptcli.io.checks import prompt_key

    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name:
            raise InputError(f"class {i} has an empty name", where=where, hint="fix the class-name list")
        control = next((c for c in name if unicodedata.category(c) == "Cc"), None)
        if control is not None:  # a NUL or escape byte left in a damaged file would become part of the prompt
            raise InputError(
                f"class {i}'s name {name!r} holds the control character {control!r}",
                where=where,
                hint="the class-name list is damaged: fix or replace it",
            )
        key = prompt_key(name)
        if key in seen:
            first = names[seen[key]]
            if first == name:
                what = f"are both named {name!r}"
            elif unicodedata.normalize("NFC", first) == unicodedata.normalize("NFC", name):
                what = f"spell one name in two Unicode forms ({ascii(first)} and {ascii(name)})"
            else:
                what = f"read the same in a prompt ({first!r} and {name!r}: case and spaces do not count)"
            raise InputError(
                f"classes {seen[key]} and {i} {what}",
                where=where,
                hint="class names must be distinct: fix the class-name list",
            )
        seen[key] = i
    return names


def underscores_to_spaces(name: str) -> str:
    """CoOp's prompt learner writes every class name with ``_`` as a space."""
    return " ".join(name.replace("_", " ").split())
