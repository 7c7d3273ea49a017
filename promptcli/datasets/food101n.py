"""Food-101N (Lee et al., CleanNet, 2018): 310k web images of Food-101's classes with noisy labels.

``meta/classes.txt`` (header ``class_name``) lists the classes; ``meta/imagelist.tsv`` (header
``class_name/key``) every image as ``<class>/<key>.jpg`` under ``images/``, its folder being its
(noisy) label; ``meta/verified_train.tsv`` and ``meta/verified_val.tsv`` (header
``class_name/key<TAB>verification_label``) say for a verified subset whether that label is right (1)
or wrong (0). So ``is_noisy`` is known for verified rows only, and the true class of a wrong label
is not known (no ``clean_label``). Splits: train = the image list less the verified val rows,
val = the verified val rows, test = Food-101's own test split (``--test-root`` the food-101 folder,
``meta/test.txt``), whose labels are clean.
"""

from __future__ import annotations

from os.path import join
from pathlib import Path

from promptcli.datasets.base import (
    UNKNOWN,
    Listing,
    Row,
    bad_row,
    need_dir,
    need_file,
    text_lines,
    underscores_to_spaces,
    unique_classes,
)
from promptcli.errors import InputError


def _read_verified(path: Path, files: dict[str, str], known: set[str]) -> dict[str, str]:
    """key -> is_noisy ("0" when verified correct, "1" when verified wrong)."""
    flags: dict[str, str] = {}
    for number, text in text_lines(path, files, skip_header="class_name"):
        parts = text.split("\t")
        if len(parts) != 2 or parts[1].strip() not in ("0", "1"):
            raise bad_row(
                path, number, f"malformed line {text[:60]!r}", "lines are '<class>/<key>.jpg<TAB>0|1'"
            )
        key = parts[0].strip()
        _check_key(key, known, path, number)
        if key in flags:
            raise bad_row(path, number, f"{key} is listed twice", "each image once")
        flags[key] = "0" if parts[1].strip() == "1" else "1"
    return flags


def _check_key(key: str, known: set[str], path: Path, number: int) -> str:
    folder = key.split("/", 1)[0]
    if "/" not in key or folder not in known:
        raise bad_row(
            path, number, f"class folder {folder!r} is not in classes.txt", "keys are '<class>/<file>'"
        )
    return folder


def read_food101n(layout: str, root: Path, test_root: Path | None = None) -> Listing:
    if not (root / "meta").is_dir() and (root / "Food-101N_release" / "meta").is_dir():
        root = root / "Food-101N_release"
    files: dict[str, str] = {}
    classes_file = need_file(root, "meta/classes.txt", layout)
    folders = [text for _, text in text_lines(classes_file, files, skip_header="class_name")]
    known = set(folders)
    names = dict(zip(folders, unique_classes([underscores_to_spaces(f) for f in folders], classes_file)))
    image_dir = need_dir(root, "images", layout)
    val_flags = _read_verified(need_file(root, "meta/verified_val.tsv", layout), files, known)
    train_flags = _read_verified(need_file(root, "meta/verified_train.tsv", layout), files, known)
    both = sorted(set(val_flags) & set(train_flags))
    if both:
        raise InputError(
            f"{both[0]} is in both verified_train.tsv and verified_val.tsv",
            where=root / "meta",
            hint="the verified lists must be disjoint",
        )
    rows: list[Row] = []
    listed: set[str] = set()
    image_list = need_file(root, "meta/imagelist.tsv", layout)
    for number, key in text_lines(image_list, files, skip_header="class_name"):
        folder = _check_key(key, known, image_list, number)
        if key in listed:
            raise bad_row(image_list, number, f"{key} is listed twice", "each image once")
        listed.add(key)
        if key in val_flags:
            continue  # a val row
        rows.append(
            Row(
                join(image_dir, key),
                names[folder],
                "train",
                f"{image_list}:{number}",
                is_noisy=train_flags.get(key, UNKNOWN),
            )
        )
    for name, flags in (("verified_train.tsv", train_flags), ("verified_val.tsv", val_flags)):
        unlisted = sorted(set(flags) - listed)
        if unlisted:  # a val row outside the list would be an image of no release list, its label unchecked
            raise InputError(
                f"{unlisted[0]} (and {len(unlisted) - 1} more) is verified but not in imagelist.tsv",
                where=root / "meta" / name,
                hint="the verified rows must be images of the list",
            )
    for key, flag in val_flags.items():
        folder = key.split("/", 1)[0]
        rows.append(
            Row(
                join(image_dir, key),
                names[folder],
                "val",
                str(root / "meta" / "verified_val.tsv"),
                is_noisy=flag,
            )
        )
    listing = Listing(layout, image_dir, list(names.values()), rows, has_is_noisy=True, files_read=files)
    if test_root is None:
        listing.notes.append("no test split: give --test-root FOOD101_DIR (Food-101's meta/test.txt) for it")
    else:
        rows.extend(read_food101_test(test_root, names, files))
    return listing


def read_food101_test(root: Path, names: dict[str, str], files: dict[str, str]) -> list[Row]:
    """Food-101's official test split (``meta/test.txt``: ``<class>/<id>`` per line, images under
    ``images/<class>/<id>.jpg``); its labels are the clean ones."""
    if not (root / "meta").is_dir() and (root / "food-101" / "meta").is_dir():
        root = root / "food-101"
    test_list = need_file(
        root, "meta/test.txt", "food101n --test-root", hint="--test-root is the food-101 folder"
    )
    image_dir = need_dir(root, "images", "food101n --test-root")
    rows = []
    for number, key in text_lines(test_list, files):
        folder = _check_key(key, set(names), test_list, number)
        label = names[folder]
        rows.append(Row(join(image_dir, f"{key}.jpg"), label, "test", f"{test_list}:{number}", is_noisy="0"))
    return rows
