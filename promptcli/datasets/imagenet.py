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


def _images(folder: Path, wnid_folder: bool = True) -> list[Path]:
    """The images in ``folder``; one named like an image that is no readable file (a broken link, a FIFO) is
    refused, as ImageFolder refuses it: skipped, its row would silently go missing. So is a folder inside a
    wnid folder (its images would be left out: CoOp reads the files of a wnid folder, not below it)."""
    images = []
    for f in folder.iterdir():
        if f.name.startswith("."):
            continue
        if wnid_folder and f.is_dir():
            raise InputError(
                "a folder inside a wnid folder: its images would be left out",
                where=f,
                hint="move its images up into the wnid folder, or remove it",
            )
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if f.is_file():
            images.append(f)
        elif not f.is_dir():
            raise InputError(
                "named like an image, but not a readable file (a broken link, FIFO or device)",
                where=f,
                hint="restore the image or remove the entry",
            )
    return sorted(images)


def _folders(tree: Path) -> list[str]:
    return sorted(d.name for d in tree.iterdir() if d.is_dir() and not d.name.startswith("."))


def check_no_loose_images(tree: Path) -> None:
    """Images directly in ``tree`` have no wnid folder, hence no label: refuse rather than drop them
    (the official ILSVRC2012 val archive unpacks this way)."""
    loose = _images(tree, wnid_folder=False)
    if loose:
        raise InputError(
            f"images lie directly in {tree.name}/, not in wnid folders: {len(loose)} of them (e.g. {loose[0].name})",
            where=tree,
            hint=f"sort them into {tree.name}/<wnid>/ folders, the layout CoOp's DATASETS.md shows for ImageNet",
        )


def check_classes_have_images(names: dict[str, str], images: dict[str, list[Path]], names_file: Path) -> None:
    """Every class of ``classnames.txt`` has training images (a class without them would vanish)."""
    empty = [wnid for wnid in names if not images.get(wnid)]
    if empty:
        shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise InputError(
            f"no images in images/train/ for {len(empty)} of its classes ({shown})",
            where=names_file,
            hint=f"add images/train/<wnid>/ images for them, or remove their lines from {names_file.name}",
        )


def read_imagenet(layout: str, root: Path) -> Listing:
    """ImageNet's train and val wnid folders (val is the test split), labelled in sorted wnid order."""
    if not (root / "classnames.txt").exists() and (root / "imagenet" / "classnames.txt").exists():
        root = root / "imagenet"
    files: dict[str, str] = {}
    names_file = need_file(root, "classnames.txt", layout, hint="CoOp's DATASETS.md links classnames.txt")
    names = read_wnid_names(names_file, files)
    trees = {folder: need_dir(root, f"images/{folder}", layout) for folder, _ in FOLDER_SPLITS}
    wnids = _folders(trees["train"])
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
        check_no_loose_images(trees[folder])
        present = _folders(trees[folder])
        extra = sorted(set(present) - set(wnids))
        if extra:
            raise InputError(
                f"class folder {extra[0]} is not among the train folders",
                where=trees[folder] / extra[0],
                hint="images/val/ needs the same wnid folders as images/train/",
            )
        images = {wnid: _images(trees[folder] / wnid) for wnid in present}
        if folder == "train":
            check_classes_have_images(names, images, names_file)
        for label, wnid in enumerate(wnids):
            for file in images.get(wnid, []):
                rows.append(Row(str(file), classes[label], split, str(trees[folder] / wnid)))
    return Listing(layout, root / "images", classes, rows, files_read=files)
