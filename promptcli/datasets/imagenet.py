"""ImageNet as CoOp lays it out: ``images/train/<wnid>/`` and ``images/val/<wnid>/`` folder trees and
``classnames.txt`` (lines ``<wnid> <class name>``). Labels follow the sorted wnid folders; the
``val`` folder is the test split (CoOp evaluates on it), so there is no separate val split."""

from __future__ import annotations

from pathlib import Path

from promptcli.datasets.base import Listing, Row, bad_row, need_dir, need_file, text_lines, unique_classes
from promptcli.errors import InputError
from promptcli.io.image_sources import IMAGE_SUFFIXES

FOLDER_SPLITS = (("train", "train"), ("val", "test"))  # (folder under images/, split it becomes)


def read_wnid_names(path: Path, files: dict[str, str]) -> dict[str, str]:
    """``classnames.txt``: ``<wnid> <name words>`` per line."""
    names: dict[str, str] = {}
    for number, text in text_lines(path, files):
        parts = text.split(" ", 1)
        if len(parts) != 2 or not parts[1].strip():
            raise bad_row(path, number, f"malformed line {text[:60]!r}", "lines are '<wnid> <class name>'")
        if parts[0] in names:
            raise bad_row(path, number, f"wnid {parts[0]} is listed twice", "list each class once")
        names[parts[0]] = " ".join(parts[1].split())
    return names


def _images(folder: Path) -> list[Path]:
    return sorted(
        f
        for f in folder.iterdir()
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES
    )


def read_imagenet(layout: str, root: Path) -> Listing:
    if not (root / "classnames.txt").exists() and (root / "imagenet" / "classnames.txt").exists():
        root = root / "imagenet"
    files: dict[str, str] = {}
    names_file = need_file(root, "classnames.txt", layout, hint="CoOp's DATASETS.md links classnames.txt")
    names = read_wnid_names(names_file, files)
    trees = {folder: need_dir(root, f"images/{folder}", layout) for folder, _ in FOLDER_SPLITS}
    wnids = sorted(d.name for d in trees["train"].iterdir() if d.is_dir() and not d.name.startswith("."))
    if not wnids:
        raise InputError("no class folders", where=trees["train"], hint="images/train/<wnid>/<image>")
    for wnid in wnids:
        if wnid not in names:
            raise InputError(
                f"class folder {wnid} is not in {names_file.name}",
                where=trees["train"] / wnid,
                hint="classnames.txt must name every wnid folder",
            )
    classes = unique_classes([names[w] for w in wnids], names_file)
    rows: list[Row] = []
    for folder, split in FOLDER_SPLITS:
        present = sorted(d.name for d in trees[folder].iterdir() if d.is_dir() and not d.name.startswith("."))
        extra = sorted(set(present) - set(wnids))
        if extra:
            raise InputError(
                f"class folder {extra[0]} is not among the train folders",
                where=trees[folder] / extra[0],
                hint="images/val/ needs the same wnid folders as images/train/",
            )
        for label, wnid in enumerate(wnids):
            if wnid not in present:
                continue
            for file in _images(trees[folder] / wnid):
                rows.append(Row(str(file), classes[label], split, str(trees[folder] / wnid)))
    return Listing(layout, root / "images", classes, rows, files_read=files)
