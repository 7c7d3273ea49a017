"""The CoOp benchmark datasets: ``split_zhou_<Name>.json`` split files, and FGVCAircraft's variant lists.

A CoOp split file is a JSON object with ``train``, ``val`` and ``test`` lists of
``[image path relative to the image folder, integer label, class name]``. The class names in it
were written by CoOp's dataset code with each dataset's own naming rules; CoOp's prompt learner
then writes ``_`` as a space. :func:`clean_name` applies the same rules, idempotently, so names
from a split file made elsewhere come out as CoOp would show them to the text encoder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from os.path import join
from pathlib import Path

from promptcli.datasets.base import (
    SPLITS,
    Listing,
    Row,
    bad_row,
    check_readable,
    need_dir,
    need_file,
    sha256_of,
    text_lines,
    underscores_to_spaces,
    unique_classes,
)
from promptcli.errors import InputError
from promptcli.io.fileio import check_input_file

# Caltech101's four folder names CoOp renames (the rest are used as they are).
CALTECH_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
# EuroSAT's folder names and the descriptive names CoOp gives them.
EUROSAT_RENAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}
_YEAR = re.compile(r"^(19|20)\d\d$")


def _caltech(name: str) -> str:
    return CALTECH_RENAMES.get(name, name)


def _pets(name: str) -> str:
    return name.lower()


def _cars(name: str) -> str:
    """Stanford Cars' meta names end with the year ("AM General Hummer SUV 2000"); CoOp puts it first."""
    words = name.split()
    if len(words) > 1 and _YEAR.match(words[-1]) and not _YEAR.match(words[0]):
        words = [words[-1], *words[:-1]]
    return " ".join(words)


def _eurosat(name: str) -> str:
    return EUROSAT_RENAMES.get(name, name)


def _ucf(name: str) -> str:
    """UCF101's action folders are CamelCase ("ApplyEyeMakeup"); CoOp splits them into words."""
    if "_" in name or " " in name:
        return name
    parts = re.findall(r"[A-Z][^A-Z]*", name)
    return "_".join(parts) if "".join(parts) == name else name


def _same(name: str) -> str:
    return name


@dataclass(frozen=True)
class CoopDataset:
    """Where a CoOp dataset keeps its images and split, and how it names classes."""

    name: str  # CoOp's dataset class name
    folder: str  # the dataset folder under CoOp's DATA root (DATASETS.md)
    image_dir: str  # image paths in the split file are relative to this folder ("" = the dataset folder)
    split_file: str  # "" for FGVCAircraft (variant lists instead)
    rename: Callable[[str], str]
    needs: tuple[str, ...] = ()  # what ROOT must hold, when not just the image folder and split file

    def required(self) -> tuple[str, ...]:
        return self.needs or (f"{self.image_dir}/", self.split_file)


COOP_DATASETS: dict[str, CoopDataset] = {
    "caltech101": CoopDataset(
        "Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", _caltech
    ),
    "oxford-pets": CoopDataset("OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json", _pets),
    "stanford-cars": CoopDataset(
        "StanfordCars",
        "stanford_cars",
        "",
        "split_zhou_StanfordCars.json",
        _cars,
        ("cars_train/", "cars_test/", "split_zhou_StanfordCars.json"),
    ),
    "oxford-flowers": CoopDataset(
        "OxfordFlowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", _same
    ),
    "food101": CoopDataset("Food101", "food-101", "images", "split_zhou_Food101.json", _same),
    "fgvc-aircraft": CoopDataset(
        "FGVCAircraft",
        "fgvc_aircraft",
        "images",
        "",
        _same,
        (
            "images/",
            "variants.txt",
            "images_variant_train.txt",
            "images_variant_val.txt",
            "images_variant_test.txt",
        ),
    ),
    "sun397": CoopDataset("SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", _same),
    "dtd": CoopDataset("DescribableTextures", "dtd", "images", "split_zhou_DescribableTextures.json", _same),
    "eurosat": CoopDataset("EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json", _eurosat),
    "ucf101": CoopDataset("UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", _ucf),
}


def clean_name(dataset: CoopDataset | None, raw: str) -> str:
    """The class name CoOp's text encoder sees: the dataset's renaming, then ``_`` as a space."""
    name = dataset.rename(raw.strip()) if dataset is not None else raw.strip()
    return underscores_to_spaces(name)


def resolve_root(root: Path, dataset: CoopDataset) -> Path:
    """ROOT may be the dataset folder itself or CoOp's DATA root holding it."""
    marker = dataset.split_file or "variants.txt"
    if not (root / marker).exists() and (root / dataset.folder / marker).exists():
        return root / dataset.folder
    return root


def read_coop(layout: str, root: Path, split_file: Path | None = None) -> Listing:
    """A CoOp dataset from its split file (or ``split_file`` instead), all three splits."""
    dataset = COOP_DATASETS[layout]
    root = resolve_root(root, dataset)
    if not dataset.split_file and split_file is None:
        return read_fgvc_aircraft(layout, root)
    path = split_file or need_file(
        root,
        dataset.split_file,
        layout,
        hint=f"download {dataset.split_file} from the link in CoOp's DATASETS.md, or give --split-file",
    )
    image_dir = need_dir(root, dataset.image_dir, layout)
    return read_split_json(layout, path, image_dir, dataset)


def read_split_json(layout: str, path: Path, image_dir: Path, dataset: CoopDataset | None) -> Listing:
    """A ``{"train": [[path, label, classname], ...], "val": ..., "test": ...}`` split file."""
    check_input_file(path, "split file", "give the split_zhou_<Name>.json file")
    check_readable(path)
    try:
        # a BOM is fine, as in CSVs; a key given twice is refused (json keeps the last: rows would vanish)
        data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_no_repeated_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"not a JSON split file ({exc})", where=path, hint="give a split_zhou_<Name>.json"
        ) from exc
    except RecursionError:
        raise InputError(
            "not a JSON split file (nested too deeply to read)",
            where=path,
            hint="give a split_zhou_<Name>.json",
        ) from None
    except _RepeatedKey as exc:
        raise InputError(
            f"key {exc.key!r} is given twice (JSON would keep only the last)",
            where=path,
            hint="give each split once",
        ) from None
    if not isinstance(data, dict) or not any(s in data for s in SPLITS):
        raise InputError(
            "a split file is a JSON object with train, val and test lists",
            where=path,
            hint="give a split_zhou_<Name>.json",
        )
    unknown = [key for key in data if key not in SPLITS]
    if unknown:  # "Test" or "testing" would otherwise be skipped, its rows silently left out
        raise InputError(
            f"unknown split {unknown[0]!r}",
            where=path,
            hint="a split file has only train, val and test lists (lower case)",
        )
    raw_names: dict[int, str] = {}
    items: list[tuple[str, str, int, str]] = []  # (split, image path, label, where)
    for split in SPLITS:
        entries = data.get(split, [])
        if not isinstance(entries, list):
            raise InputError(f"{split!r} is not a list", where=path, hint="each split is a list of rows")
        for i, entry in enumerate(entries):
            where = f"{path}:{split}[{i}]"
            if (
                not isinstance(entry, list)
                or len(entry) != 3
                or not isinstance(entry[0], str)
                or not entry[0].strip()
                or isinstance(entry[1], bool)
                or not isinstance(entry[1], int)
                or not isinstance(entry[2], str)
            ):
                raise InputError(
                    f"malformed row {json.dumps(entry)[:80]}",
                    where=where,
                    hint="each row is [relative image path, integer label, class name]",
                )
            label, name = entry[1], entry[2]
            if label < 0:
                raise InputError(f"negative label {label}", where=where, hint="labels are 0-based")
            if raw_names.setdefault(label, name) != name:
                raise InputError(
                    f"label {label} is named {name!r} here but {raw_names[label]!r} before",
                    where=where,
                    hint="each label has one class name: the split file is inconsistent",
                )
            items.append((split, entry[0], label, where))
    if not items:
        raise InputError("no rows in any split", where=path, hint="the split file lists no images")
    n_classes = check_label_range(items, raw_names)
    classes = unique_classes([clean_name(dataset, raw_names[c]) for c in range(n_classes)], path)
    rows = [Row(join(image_dir, rel), classes[label], split, where) for split, rel, label, where in items]
    return Listing(layout, image_dir, classes, rows, files_read={str(path): sha256_of(path)})


class _RepeatedKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _no_repeated_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _RepeatedKey(key)
        seen.add(key)
    return dict(pairs)


def check_label_range(items: list[tuple[str, str, int, str]], raw_names: dict[int, str]) -> int:
    """The number of classes, when the labels run 0..C-1 with none missing (no class name is unknown)."""
    n_classes = len(raw_names)
    if max(raw_names) < n_classes:  # distinct labels >= 0, as many as the largest + 1: no gap
        return n_classes
    label, where = next((label, where) for _, _, label, where in items if label >= n_classes)
    missing = next(c for c in range(n_classes) if c not in raw_names)  # there is a gap below n_classes
    raise InputError(
        f"label {label}, yet label {missing} never occurs in the file, so its class name is unknown",
        where=where,
        hint="labels must run 0..C-1 over the train, val and test lists",
    )


def read_fgvc_aircraft(layout: str, root: Path) -> Listing:
    """FGVCAircraft as CoOp reads it: ``variants.txt`` (class names in label order) and
    ``images_variant_{train,val,test}.txt`` (lines ``<image id> <variant name>``), images in ``images/``."""
    files: dict[str, str] = {}
    variants_file = need_file(root, "variants.txt", layout)
    classes = unique_classes([text for _, text in text_lines(variants_file, files)], variants_file)
    known = set(classes)
    image_dir = need_dir(root, "images", layout)
    rows: list[Row] = []
    for split in SPLITS:
        list_file = need_file(root, f"images_variant_{split}.txt", layout)
        for number, text in text_lines(list_file, files):
            parts = text.split(" ", 1)
            if len(parts) != 2 or not parts[1].strip():
                raise bad_row(
                    list_file, number, f"malformed line {text[:60]!r}", "lines are '<image id> <variant>'"
                )
            variant = parts[1].strip()
            if variant not in known:
                raise bad_row(
                    list_file,
                    number,
                    f"variant {variant!r} is not in variants.txt",
                    "the lists and variants.txt disagree",
                )
            rows.append(Row(join(image_dir, f"{parts[0]}.jpg"), variant, split, f"{list_file}:{number}"))
    return Listing(layout, image_dir, classes, rows, files_read=files)
