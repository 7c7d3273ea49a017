"""Image lists: an ImageFolder tree or a CSV with ``path[,label][,split]`` columns."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

# datasets.base imports only promptcli.errors: the one rule for turning folder names into class names
from promptcli.datasets.base import underscores_to_spaces
from promptcli.errors import InputError
from promptcli.io.checks import check_class_names, check_unique_columns, read_csv_table, shown
from promptcli.io.fileio import check_input_file, check_utf8_path, kind_of_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CSV_COLUMNS = ("path", "label", "split")
# Accepted and not encoded: `promptcli dataset` writes them where a release knows the true labels.
TRUTH_COLUMNS = ("clean_label", "is_noisy")


@dataclass
class ImageSource:
    """Images to encode: paths as recorded, files to read, integer labels (-1: none), splits."""

    origin: Path
    kind: str  # "folder" or "csv"
    paths: list[str]
    files: list[Path]
    labels: list[int]
    splits: list[str]
    classnames: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def digest(self) -> str:
        """SHA-256 over the listing (paths, labels, splits, class names), not the pixels."""
        h = hashlib.sha256()
        for name in self.classnames:
            h.update(f"c\t{name}\n".encode())
        for p, y, s in zip(self.paths, self.labels, self.splits):
            h.update(f"{p}\t{y}\t{s}\n".encode())
        return h.hexdigest()

    def files_digest(self, stamps: Mapping[int, tuple[int, int] | None] | None = None) -> str:
        """SHA-256 over each file's size and modification time (ns), in row order: images rewritten under the
        same names change it, without reading them (a stat per file). ``stamps``: rows' (size, time) as they
        were when the images were read (None: not there then), used instead of the files' stat now."""
        h = hashlib.sha256()
        for i, f in enumerate(self.files):
            stamp = stamps[i] if stamps and i in stamps else file_stamp(f)
            h.update(b"missing\n" if stamp is None else f"{stamp[0]}\t{stamp[1]}\n".encode())
        return h.hexdigest()


def file_stamp(path: str | Path) -> tuple[int, int] | None:
    """A file's (size, modification time in ns), or None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def folder_class_name(folder: str) -> str:
    """Class name of an ImageFolder sub-folder: underscores become spaces, runs of spaces one space."""
    return underscores_to_spaces(folder)


def is_skipped_folder(name: str) -> bool:
    """Hidden folders (``.ipynb_checkpoints``, ``.git``) and macOS archive debris (``__MACOSX``)."""
    return name.startswith(".") or name == "__MACOSX"


def _is_image_entry(name: str) -> bool:
    """A folder entry (no sub-folder) named like an image. A broken link, FIFO or device so named is kept:
    extraction reports it as unreadable (an error, or skipped with --skip-bad), never reading a FIFO."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def folder_images(class_dir: Path) -> list[Path]:
    """Sorted image files under ``class_dir``, following linked sub-folders, each real folder once."""
    found: list[Path] = []
    visited: set[str] = set()
    for folder, subfolders, names in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # a link cycle, or a second link to a folder already read
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders[:] = [d for d in subfolders if not is_skipped_folder(d)]
        found.extend(Path(folder, n) for n in names if _is_image_entry(n))
    return sorted(found)


def _class_dirs(root: Path) -> list[Path]:
    """Sorted class folders of ``root``; a dangling link where a class folder may be is refused."""
    dirs = []
    for entry in sorted(root.iterdir()):
        if is_skipped_folder(entry.name):
            continue
        if entry.is_symlink() and not entry.exists():
            raise InputError(
                "broken symbolic link in the image folder",
                where=entry,
                hint="point it at the class folder it stands for, or remove it",
            )
        if entry.is_dir():
            dirs.append(entry)
    return dirs


def _folder_labels(
    class_dirs: list[Path], classnames: list[str], given: list[str] | None
) -> tuple[list[str], list[int]]:
    """Class list and each folder's label: sorted folder order, or the order of ``given``."""
    if given is None:
        return classnames, list(range(len(class_dirs)))
    index = {name: i for i, name in enumerate(given)}
    for class_dir, name in zip(class_dirs, classnames):
        if name not in index:
            raise InputError(
                f"class folder gives the class name {name!r}, which is not in the --classnames list",
                where=class_dir,
                hint="rename the folder to a listed class name (_ for a space) or add the name to the list",
            )
    return list(given), [index[name] for name in classnames]


def read_image_folder(root: Path, split: str = "", classnames: list[str] | None = None) -> ImageSource:
    """One sub-folder per class; class names come from sorted folder names, or ``classnames``.

    With ``classnames`` the list sets the classes and their order; every folder's class name must
    be in it, and listed classes without a folder are allowed (as for a CSV list).
    """
    check_utf8_path(root)  # recorded as the features file's source
    class_dirs = _class_dirs(root)
    if not class_dirs:
        raise InputError(
            "no class sub-folders",
            where=root,
            hint="use ImageFolder layout (ROOT/<class>/<image>) or a CSV with a path column",
        )
    for class_dir in class_dirs:
        check_utf8_path(class_dir)
    folder_names = [folder_class_name(d.name) for d in class_dirs]
    check_class_names(zip((d.name for d in class_dirs), folder_names), root)
    names, folder_labels = _folder_labels(class_dirs, folder_names, classnames)
    paths, files, labels = [], [], []
    for label, class_dir in zip(folder_labels, class_dirs):
        images = folder_images(class_dir)
        if not images:
            raise InputError(
                "class folder holds no images",
                where=class_dir,
                hint=f"add images (suffixes {', '.join(IMAGE_SUFFIXES)}) or remove the folder",
            )
        for image in images:  # each image's path is its key in the features and label files
            check_utf8_path(image)
            paths.append(image.relative_to(root).as_posix())
        files.extend(images)
        labels.extend([label] * len(images))
    _check_folder_files(root, paths, files)
    return ImageSource(root, "folder", paths, files, labels, [split] * len(paths), names)


def _check_folder_files(root: Path, paths: Sequence[str], files: Sequence[Path]) -> None:
    """Refuse one image file reached twice through links (it would count twice, or in two classes)."""
    identities = _FileIdentities()
    for i, file in enumerate(files):
        j = identities.first(i, file, _stat(file))
        if j != i:
            raise InputError(
                f"{paths[j]!r} and {paths[i]!r} are the same image file (reached through a link)",
                where=root,
                hint="keep one of them: an image belongs to one class, once",
            )


def _read_rows(csv_path: Path) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """Header, rows and each row's line of an image list: tab-separated for ``.tsv``, else comma-separated."""
    check_utf8_path(csv_path)  # recorded as the features file's source (its rows are UTF-8 text)
    delimiter = "\t" if csv_path.suffix.lower() == ".tsv" else ","
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise InputError("not a UTF-8 text CSV", where=csv_path, hint="save it as UTF-8 CSV") from exc
    table = read_csv_table(
        text, csv_path, delimiter=delimiter, check_header=lambda columns: _check_columns(csv_path, columns)
    )
    return table.columns, table.rows, table.lines


def _check_columns(csv_path: Path, columns: list[str]) -> None:
    """An image list's header: a path column, known columns, each once."""
    if "path" not in columns:
        raise InputError(
            f"no 'path' column (columns: {', '.join(columns) or 'none'})",
            where=csv_path,
            hint="add a header row with a path column (and optionally label, split)",
        )
    unknown = [c for c in columns if c not in CSV_COLUMNS + TRUTH_COLUMNS]
    if unknown:
        raise InputError(
            f"unknown column(s) {', '.join(unknown)}",
            where=csv_path,
            hint=f"image lists take only {', '.join(CSV_COLUMNS + TRUTH_COLUMNS)}",
        )
    check_unique_columns(columns, csv_path)


def _real_file(file: Path, real_folders: dict[str, str]) -> str:
    """``os.path.realpath(file)``, resolving each folder once (image lists run to millions of rows)."""
    folder, name = os.path.split(file)
    if name in ("", ".", ".."):
        return os.path.realpath(file)
    real_folder = real_folders.get(folder)
    if real_folder is None:
        real_folder = real_folders[folder] = os.path.realpath(folder or ".")
    joined = os.path.join(real_folder, name)
    return os.path.realpath(joined) if os.path.islink(joined) else joined


def _stat(file: Path) -> os.stat_result | None:
    """``os.stat(file)``; None for an entry that opens no file (missing, a dangling link)."""
    try:
        return os.stat(file)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None


class _FileIdentities:
    """Which earlier entry opens the same file as a later one, however spelled or linked: by (device, inode),
    so hard links match too; by resolved path for an entry that opens no file."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int] | str, int] = {}
        self.real_folders: dict[str, str] = {}

    def first(self, i: int, file: Path, st: os.stat_result | None) -> int:
        """The first entry (``i`` itself if none earlier) that opens what entry ``i``, ``file``, opens."""
        key = (st.st_dev, st.st_ino) if st is not None else _real_file(file, self.real_folders)
        return self.seen.setdefault(key, i)


def _same_file_rows(
    paths: Sequence[str], given: Sequence[str] | None, j: int, i: int, lines: Sequence[int]
) -> str:
    """The message for rows ``j`` < ``i`` (on ``lines[j]``, ``lines[i]``) that open one file."""
    a, b = lines[j], lines[i]
    conflict = given is not None and given[i] != given[j]
    if os.path.normpath(paths[i]) == os.path.normpath(paths[j]):
        if conflict:
            return (
                f"path {paths[j]!r} is listed twice with different labels "
                f"({given[j]!r} on line {a}, {given[i]!r} on line {b})"
            )
        return f"path {paths[j]!r} is listed twice (lines {a} and {b})"
    what = f"lines {a} ({paths[j]!r}) and {b} ({paths[i]!r}) name the same image file"
    return what + (f", with different labels ({given[j]!r} and {given[i]!r})" if conflict else "")


def read_image_csv(csv_path: Path, classnames: list[str] | None = None) -> ImageSource:
    """A CSV with a ``path`` column (relative paths resolve against the CSV's folder); ``.tsv``: tabs."""
    columns, rows, lines = _read_rows(csv_path)
    if not rows:
        raise InputError("no rows", where=csv_path, hint="list at least one image")
    has_label = "label" in columns
    names = list(classnames or [])
    if has_label and not names:
        names = sorted({(r.get("label") or "").strip() for r in rows} - {""})
        check_class_names(((n, n) for n in names), csv_path, what="label")
    index = {n: i for i, n in enumerate(names)}
    base = csv_path.parent
    paths, files, labels, splits = [], [], [], []
    identities = _FileIdentities()
    for line, row in zip(lines, rows):
        path = (row.get("path") or "").strip()
        if not path:
            raise InputError("empty path", where=f"{csv_path}:{line}", hint="every row needs a path")
        if "\x00" in path:  # no file name holds a NUL: it could not be opened, nor stat'ed, nor skipped
            raise InputError(
                f"path {shown(path)} holds a NUL character", where=f"{csv_path}:{line}", hint="fix the path"
            )
        label_name = (row.get("label") or "").strip() if has_label else ""
        if label_name and label_name not in index:
            raise InputError(
                f"label {label_name!r} is not in the class list",
                where=f"{csv_path}:{line}",
                hint="use one of: " + ", ".join(names[:10]) + ("…" if len(names) > 10 else ""),
            )
        file = Path(path) if Path(path).is_absolute() else base / path
        st = _stat(file)
        _check_regular(st, path, f"{csv_path}:{line}")
        paths.append(path)
        files.append(file)
        labels.append(index[label_name] if label_name else -1)
        splits.append((row.get("split") or "").strip())
        j = identities.first(len(files) - 1, file, st)
        if j != len(files) - 1:  # the same file as an earlier row: refused naming both rows
            given = [names[y] if y >= 0 else "" for y in labels] if has_label else None
            message = _same_file_rows(paths, given, j, len(files) - 1, lines)
            raise InputError(message, where=csv_path, hint="list each image once")
    return ImageSource(csv_path, "csv", paths, files, labels, splits, names)


def _check_regular(st: os.stat_result | None, path: str, where: str) -> None:
    """Refuse a list row naming a folder, FIFO or device: its read would fail, block or never end. (A missing
    file is extraction's to report: an error, or skipped with --skip-bad.)"""
    if st is not None and not S_ISREG(st.st_mode):
        raise InputError(
            f"{path!r} is not a regular file ({kind_of_file(st.st_mode)})",
            where=where,
            hint="list image files only",
        )


def read_image_source(
    source: str | Path, split: str = "", classnames: list[str] | None = None
) -> ImageSource:
    """Read an ImageFolder tree or a CSV image list (``split`` names a folder's split only)."""
    path = Path(source)
    if not path.exists():
        raise InputError("not found", where=path, hint="give an image folder or a CSV with a path column")
    if path.is_dir():
        return read_image_folder(path, split=split, classnames=classnames)
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        if split:
            raise InputError(
                "applies to an image folder only; an image list gives each row's split in its split column",
                where="--split",
                hint="drop --split, or add a split column to the list",
            )
        return read_image_csv(path, classnames=classnames)
    raise InputError(
        "neither a folder nor a CSV", where=path, hint="give an image folder or a .csv with a path column"
    )


def read_classnames(path: str | Path) -> list[str]:
    """Class names, one per line (blank lines ignored)."""
    p = check_input_file(path, "class-name file", "one class name per line")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a leading BOM is not part of the first name
    except UnicodeDecodeError as exc:
        raise InputError(
            f"not UTF-8 text (byte {exc.start})", where=p, hint="save the class list as UTF-8"
        ) from exc
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise InputError("no class names", where=p, hint="one class name per line")
    check_class_names(((n, n) for n in names), p, what="class name")
    return names
