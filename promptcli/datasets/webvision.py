"""WebVision 1.0 (Li et al., 2017): 2.4M web images of ImageNet's 1000 classes, labelled by their search
query; and mini-WebVision (Jiang et al., 2018): its Google images of the first 50 classes.

Files under ROOT (the release's names): ``info/synsets.txt`` (1000 lines ``<wnid> <synonyms, ...>``,
label order), ``info/train_filelist_google.txt`` and ``info/train_filelist_flickr.txt`` (lines
``<path under ROOT> <label>``), ``info/val_filelist.txt`` (lines ``<file> <label>``, images in
``val_images_256/`` of the resized release or ``val_images/``). Splits: train and val. The train
labels are noisy but the release says nothing per image, so there is no ``is_noisy``. Class names are
each synset's first synonym (``_`` as a space); synsets whose first synonyms coincide (ImageNet has a
few, e.g. two "crane"s) get their wnid in brackets. ``--classnames`` replaces them.
"""

from __future__ import annotations

from collections import Counter
from os.path import join
from pathlib import Path

from promptcli.datasets.base import (
    Listing,
    Row,
    bad_row,
    class_index,
    need_file,
    text_lines,
    underscores_to_spaces,
    unique_classes,
)
from promptcli.errors import InputError
from promptcli.io.checks import prompt_key

MINI_CLASSES = 50


def read_synsets(path: Path, files: dict[str, str]) -> list[str]:
    entries = []
    for number, text in text_lines(path, files):
        parts = text.split(" ", 1)
        if len(parts) != 2 or not parts[1].strip():
            raise bad_row(path, number, f"malformed line {text[:60]!r}", "lines are '<wnid> <synonyms>'")
        entries.append((parts[0], underscores_to_spaces(parts[1].split(",")[0])))
    # names one prompt reads alike (ImageNet's "Cardigan" the corgi and "cardigan" the sweater) get their wnid too
    counts = Counter(prompt_key(name) for _, name in entries)
    names = [name if counts[prompt_key(name)] == 1 else f"{name} ({wnid})" for wnid, name in entries]
    return unique_classes(names, path)


def _val_dir(root: Path) -> Path:
    for name in ("val_images_256", "val_images"):
        if (root / name).is_dir():
            return root / name
    raise InputError(
        "no validation image folder (val_images_256/ or val_images/)",
        where=root,
        hint="unpack the WebVision validation images into ROOT",
    )


def read_webvision(layout: str, root: Path) -> Listing:
    mini = layout == "mini-webvision"
    files: dict[str, str] = {}
    classes = read_synsets(need_file(root, "info/synsets.txt", layout), files)
    n_classes = MINI_CLASSES if mini else len(classes)
    if mini and len(classes) < MINI_CLASSES:
        raise InputError(
            f"mini-WebVision needs the first {MINI_CLASSES} of WebVision's classes, synsets.txt has {len(classes)}",
            where=root / "info" / "synsets.txt",
            hint="give the full info/synsets.txt",
        )
    lists = ["info/train_filelist_google.txt"] + ([] if mini else ["info/train_filelist_flickr.txt"])
    rows: list[Row] = []
    for relative, split, base in [(name, "train", root) for name in lists] + [
        ("info/val_filelist.txt", "val", None)
    ]:
        list_file = need_file(root, relative, layout)
        folder = base if base is not None else _val_dir(root)
        for number, text in text_lines(list_file, files):
            parts = text.split()
            if len(parts) != 2:
                raise bad_row(
                    list_file, number, f"malformed line {text[:60]!r}", "lines are '<image path> <label>'"
                )
            where = f"{list_file}:{number}"
            label = class_index(parts[1], classes, where)
            if label < n_classes:
                rows.append(Row(join(folder, parts[0]), classes[label], split, where))
    return Listing(layout, root, classes[:n_classes], rows, files_read=files)
