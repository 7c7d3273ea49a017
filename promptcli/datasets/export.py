"""From a :class:`Listing` to the image-list CSV rows ``promptcli extract`` reads, with the checks that
make it trustworthy: every image exists, no image is listed twice, the split asked for is there."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from promptcli.datasets.base import SPLITS, UNKNOWN, Listing, Row
from promptcli.errors import InputError


def select_rows(listing: Listing, split: str, known_noise: bool = False) -> list[Row]:
    """The rows of ``split`` (``all``: every split), optionally only those whose noise flag is known."""
    rows = listing.rows if split == "all" else [r for r in listing.rows if r.split == split]
    if not rows:
        present = ", ".join(s for s in SPLITS if any(r.split == s for r in listing.rows)) or "none"
        raise InputError(
            f"{listing.layout} has no {split} rows (splits present: {present})",
            where="--split",
            hint="choose one of the splits present, or all",
        )
    if known_noise:
        if not listing.has_is_noisy:
            raise InputError(
                f"{listing.layout}'s release says nothing about which labels are wrong",
                where="--known-noise",
                hint="use it with food101n, clothing1m, cifar10n or cifar100n",
            )
        rows = [r for r in rows if r.is_noisy != UNKNOWN]
        if not rows:
            raise InputError(
                f"no {split} row of {listing.layout} has a known noise flag",
                where="--known-noise",
                hint="drop --known-noise, or choose another split",
            )
    return rows


def check_rows(rows: list[Row]) -> None:
    """Every image file exists and is listed once (features join labels by path)."""
    seen: dict[str, str] = {}
    for row in rows:
        key = os.path.normpath(row.file)
        if key in seen:
            raise InputError(
                f"image {row.file} is listed again (first at {seen[key]})",
                where=row.where,
                hint="each image may appear once: the release's lists overlap",
            )
        seen[key] = row.where
        if not os.path.isfile(row.file):
            raise InputError(
                f"image {row.file} does not exist",
                where=row.where,
                hint="unpack the images where the layout expects them (see `promptcli dataset list`)",
            )


def csv_rows(listing: Listing, rows: list[Row], base: Path | None) -> list[dict[str, str]]:
    """CSV rows; paths relative to ``base`` (the CSV's folder, so extract resolves them), or absolute."""
    out = []
    folders: dict[str, str] = {}  # image folder -> as written (relpath is slow; there are few folders)
    # abspath, not resolve: no system call per image, and a symlinked data folder keeps its name
    for row in rows:
        folder, name = os.path.split(os.path.abspath(row.file))
        if folder not in folders:
            folders[folder] = os.path.relpath(folder, base) if base is not None else folder
        path = os.path.join(folders[folder], name)
        record = {"path": path.replace(os.sep, "/"), "label": row.label, "split": row.split}
        if listing.has_clean_label:
            record["clean_label"] = row.clean_label
        if listing.has_is_noisy:
            record["is_noisy"] = row.is_noisy
        out.append(record)
    return out


def summary(listing: Listing, rows: list[Row]) -> dict[str, Any]:
    """Counts per split, the classes, and the noisy fraction where the release knows it."""
    splits: dict[str, Any] = {}
    for split in SPLITS:
        chosen = [r for r in rows if r.split == split]
        if not chosen:
            continue
        entry: dict[str, Any] = {"n_images": len(chosen), "n_classes_present": len({r.label for r in chosen})}
        if listing.has_is_noisy:
            flags = Counter(r.is_noisy for r in chosen)
            known = flags["0"] + flags["1"]
            entry.update(
                n_noise_known=known,
                n_noisy=flags["1"],
                noisy_fraction=flags["1"] / known if known else None,
            )
        splits[split] = entry
    return {
        "layout": listing.layout,
        "image_root": str(listing.root),
        "n_images": len(rows),
        "n_classes": len(listing.classes),
        "classes": listing.classes,
        "splits": splits,
        "columns": listing.columns(),
        "files_read": listing.files_read,
        "notes": listing.notes,
    }
