"""From a :class:`Listing` to the image-list CSV rows ``promptcli extract`` reads, with the checks that
make it trustworthy: every image exists, no image is listed twice, the split asked for is there."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
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


@dataclass
class ExportOptions:
    """What ``promptcli dataset`` takes besides the layout, its folder and the output."""

    split: str = "all"
    split_file: Path | None = None
    test_root: Path | None = None
    images_dir: Path | None = None
    noise_label: str | None = None
    noise_file: Path | None = None
    known_noise: bool = False
    absolute: bool = False
    classnames_out: Path | None = None


def export_dataset(
    name: str | None,
    root: Path | None,
    output: str | None,
    options: ExportOptions,
    *,
    force: bool = False,
    json_out: bool = False,
) -> tuple[dict[str, Any], Listing]:
    """``promptcli dataset`` as one step: read layout ``name`` under ``root``, write the image-list CSV
    ``output`` (``-``: stdout) with its sidecar (and the class list); return the summary and the listing."""
    from promptcli.choices import DatasetSplit
    from promptcli.datasets.registry import LAYOUTS, ReadOptions
    from promptcli.io.fileio import STDIO, check_output_path, write_text_atomic
    from promptcli.io.labels import write_labels
    from promptcli.io.provenance import base_provenance
    from promptcli.io.sidecar import write_sidecar

    if name is None:
        raise InputError(
            "no dataset layout", where="NAME", hint="see `promptcli dataset list` for the known ones"
        )
    if name not in LAYOUTS:
        raise InputError(
            f"unknown dataset layout {name!r}", where="NAME", hint="use one of: " + ", ".join(LAYOUTS)
        )
    split_file, test_root, images_dir = options.split_file, options.test_root, options.images_dir
    noise_label, noise_file, classnames_out = options.noise_label, options.noise_file, options.classnames_out
    layout = LAYOUTS[name]
    if root is None:
        raise InputError("no ROOT folder", where="ROOT", hint=f"promptcli dataset {name} ROOT -o images.csv")
    if not root.is_dir():
        raise InputError("not a folder", where=root, hint="give the folder holding the release")
    if output is None:
        raise InputError("no output", where="-o", hint="give -o images.csv (or -o - for stdout)")
    to_stdout = output == STDIO
    if to_stdout and json_out:
        raise InputError(
            "-o - and --json both write to stdout", where="--json", hint="write the CSV to a file"
        )
    given = {
        "--split-file": split_file,
        "--test-root": test_root,
        "--images-dir": images_dir,
        "--noise-label": noise_label,
        "--noise-file": noise_file,
    }
    for option, value in given.items():
        if value is not None and option not in layout.options:
            takes = ", ".join(layout.options) or "none of the layout options"
            raise InputError(f"{name} does not take {option}", where=option, hint=f"{name} takes {takes}")
    sidecar = None if to_stdout else Path(f"{output}.json")
    if not to_stdout:
        check_output_path(output, force)
        check_output_path(sidecar, force)
    if classnames_out is not None:
        check_output_path(classnames_out, force, "--classnames-out")

    listing = layout.read(
        root, ReadOptions(split_file, test_root, images_dir, noise_label, noise_file, force)
    )
    split_name = DatasetSplit.check(options.split, "--split")
    rows = select_rows(listing, split_name, options.known_noise)
    check_rows(rows)
    base = None if (to_stdout or options.absolute) else Path(os.path.abspath(output)).parent
    result = {
        **base_provenance(),
        "format": "promptcli-image-list",
        "root": str(root),
        "split": split_name,
        "known_noise": options.known_noise,
        "paths": "absolute" if base is None else "relative to the CSV's folder",
        "options": {k.lstrip("-"): str(v) for k, v in given.items() if v is not None},
        "output": output,
        **summary(listing, rows),
    }
    write_labels(output, listing.columns(), csv_rows(listing, rows, base))
    if sidecar is not None:
        result = write_sidecar(output, result, indent=1)
    if classnames_out is not None:
        write_text_atomic(classnames_out, "".join(f"{c}\n" for c in listing.classes))
    return {**result, "n_rows": len(rows)}, listing
