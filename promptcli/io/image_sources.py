"""Image lists: an ImageFolder tree or a CSV with ``path[,label][,split]`` columns."""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from promptcli.errors import InputError
from promptcli.io.checks import check_class_names, check_unique_keys

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


def folder_class_name(folder: str) -> str:
    """Class name of an ImageFolder sub-folder: underscores become spaces."""
    return folder.replace("_", " ").strip()


def read_image_folder(root: Path, split: str = "") -> ImageSource:
    """One sub-folder per class; class names come from sorted folder names."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise InputError(
            "no class sub-folders",
            where=root,
            hint="use ImageFolder layout (ROOT/<class>/<image>) or a CSV with a path column",
        )
    classnames = [folder_class_name(d.name) for d in class_dirs]
    check_class_names(zip((d.name for d in class_dirs), classnames), root)
    paths, files, labels = [], [], []
    for label, class_dir in enumerate(class_dirs):
        for f in sorted(class_dir.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                paths.append(f.relative_to(root).as_posix())
                files.append(f)
                labels.append(label)
    if not paths:
        raise InputError(
            f"no images found in {len(class_dirs)} class folders",
            where=root,
            hint=f"images need one of the suffixes {', '.join(IMAGE_SUFFIXES)}",
        )
    return ImageSource(root, "folder", paths, files, labels, [split] * len(paths), classnames)


def read_image_csv(csv_path: Path, classnames: list[str] | None = None) -> ImageSource:
    """A CSV with a ``path`` column (relative paths resolve against the CSV's folder)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise InputError("not a UTF-8 text CSV", where=csv_path, hint="save it as UTF-8 CSV") from exc
    except csv.Error as exc:
        raise InputError(f"malformed CSV ({exc})", where=csv_path, hint="check quoting") from exc
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
    if not rows:
        raise InputError("no rows", where=csv_path, hint="list at least one image")
    has_label = "label" in columns
    names = list(classnames or [])
    if has_label and not names:
        names = sorted({(r.get("label") or "").strip() for r in rows} - {""})
    index = {n: i for i, n in enumerate(names)}
    base = csv_path.parent
    paths, files, labels, splits = [], [], [], []
    for line, row in enumerate(rows, start=2):
        path = (row.get("path") or "").strip()
        if not path:
            raise InputError("empty path", where=f"{csv_path}:{line}", hint="every row needs a path")
        label_name = (row.get("label") or "").strip() if has_label else ""
        if label_name and label_name not in index:
            raise InputError(
                f"label {label_name!r} is not in the class list",
                where=f"{csv_path}:{line}",
                hint="use one of: " + ", ".join(names[:10]) + ("…" if len(names) > 10 else ""),
            )
        file = Path(path) if Path(path).is_absolute() else base / path
        paths.append(path)
        files.append(file)
        labels.append(index[label_name] if label_name else -1)
        splits.append((row.get("split") or "").strip())
    given = [names[y] if y >= 0 else "" for y in labels]
    check_unique_keys([os.path.normpath(p) for p in paths], str(csv_path), given if has_label else None)
    return ImageSource(csv_path, "csv", paths, files, labels, splits, names)


def read_image_source(
    source: str | Path, split: str = "", classnames: list[str] | None = None
) -> ImageSource:
    """Read an ImageFolder tree or a CSV image list."""
    path = Path(source)
    if not path.exists():
        raise InputError("not found", where=path, hint="give an image folder or a CSV with a path column")
    if path.is_dir():
        return read_image_folder(path, split=split)
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return read_image_csv(path, classnames=classnames)
    raise InputError(
        "neither a folder nor a CSV", where=path, hint="give an image folder or a .csv with a path column"
    )


def read_classnames(path: str | Path) -> list[str]:
    """Class names, one per line (blank lines ignored)."""
    p = Path(path)
    if not p.is_file():
        raise InputError("class-name file not found", where=p, hint="one class name per line")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a leading BOM is not part of the first name
    except UnicodeDecodeError as exc:
        raise InputError(
            f"not UTF-8 text (byte {exc.start})", where=p, hint="save the class list as UTF-8"
        ) from exc
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise InputError("duplicate class names", where=p, hint="list each class once")
    if not names:
        raise InputError("no class names", where=p, hint="one class name per line")
    return names
