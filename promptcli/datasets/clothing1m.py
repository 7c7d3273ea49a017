"""Clothing1M (Xiao et al., 2015): 1M clothing images from shopping sites, 14 classes, real label noise.

Files (the release's own names): ``category_names_eng.txt`` (14 class names, label order),
``noisy_label_kv.txt`` and ``clean_label_kv.txt`` (lines ``<image path> <label>``),
``noisy_train_key_list.txt``, ``clean_val_key_list.txt``, ``clean_test_key_list.txt`` (one image
path per line). Image paths (``images/0/00/....jpg``) are relative to ROOT. Splits: train = the
noisy training list with its noisy labels, and ``clean_label``/``is_noisy`` where the image also has
a clean label; val and test = the clean lists with their clean labels.
"""

from __future__ import annotations

from os.path import join
from pathlib import Path

from promptcli.datasets.base import (
    UNKNOWN,
    Listing,
    Row,
    bad_row,
    class_index,
    need_file,
    text_lines,
    unique_classes,
)

SPLIT_LISTS = (
    ("train", "noisy_train_key_list.txt"),
    ("val", "clean_val_key_list.txt"),
    ("test", "clean_test_key_list.txt"),
)


def _find(root: Path, name: str, layout: str) -> Path:
    """The release's text files sit in ROOT or ROOT/annotations."""
    if (root / "annotations" / name).is_file() and not (root / name).is_file():
        return root / "annotations" / name
    return need_file(root, name, layout)


def _read_kv(path: Path, files: dict[str, str], classes: list[str]) -> dict[str, int]:
    labels: dict[str, int] = {}
    for number, text in text_lines(path, files):
        parts = text.split()
        if len(parts) != 2:
            raise bad_row(path, number, f"malformed line {text[:60]!r}", "lines are '<image path> <label>'")
        if parts[0] in labels:
            raise bad_row(path, number, f"{parts[0]} is listed twice", "each image once")
        labels[parts[0]] = class_index(parts[1], classes, f"{path}:{number}")
    return labels


def read_clothing1m(layout: str, root: Path) -> Listing:
    files: dict[str, str] = {}
    names_file = _find(root, "category_names_eng.txt", layout)
    classes = unique_classes([" ".join(t.split()) for _, t in text_lines(names_file, files)], names_file)
    noisy = _read_kv(_find(root, "noisy_label_kv.txt", layout), files, classes)
    clean = _read_kv(_find(root, "clean_label_kv.txt", layout), files, classes)
    rows: list[Row] = []
    base = str(root)
    for split, list_name in SPLIT_LISTS:
        list_file = _find(root, list_name, layout)
        source, source_name = (
            (noisy, "noisy_label_kv.txt") if split == "train" else (clean, "clean_label_kv.txt")
        )
        for number, key in text_lines(list_file, files):
            if key not in source:
                raise bad_row(
                    list_file,
                    number,
                    f"{key} has no label in {source_name}",
                    "the key list and label file disagree",
                )
            where = f"{list_file}:{number}"
            label = classes[source[key]]
            if split == "train":
                truth = clean.get(key)
                if truth is None:
                    rows.append(Row(join(base, key), label, split, where, UNKNOWN, UNKNOWN))
                else:
                    rows.append(
                        Row(
                            join(base, key),
                            label,
                            split,
                            where,
                            classes[truth],
                            str(int(truth != source[key])),
                        )
                    )
            else:
                rows.append(Row(join(base, key), label, split, where, label, "0"))
    return Listing(layout, root, classes, rows, has_clean_label=True, has_is_noisy=True, files_read=files)
