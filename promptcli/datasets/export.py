"""From a :class:`Listing` to the image-list CSV rows ``promptcli extract`` reads, with the checks that
make it trustworthy: every image exists, no image is listed twice, the split asked for is there."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any

from promptcli.datasets.base import SPLITS, UNKNOWN, Listing, Row
from promptcli.errors import InputError
from promptcli.io.fileio import STDIO, check_distinct, check_output_path, check_utf8_path


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


def check_unique(rows: list[Row]) -> None:
    """No image is listed twice (features join labels by path), in one split or in two: checked over every
    split of the release, not only the one exported, so that a test image is never also a training one."""
    seen: dict[str, Row] = {}
    for row in rows:
        if "\0" in row.file:  # no file system path holds one (os.stat would raise ValueError)
            raise InputError(
                f"image path {row.file!r} holds a NUL character",
                where=row.where,
                hint="the list file is damaged: fix or replace it",
            )
        key = os.path.normpath(row.file)
        first = seen.setdefault(key, row)
        if first is not row:
            what = "listed again" if first.split == row.split else f"in {row.split} and in {first.split}"
            raise InputError(
                f"image {row.file} is {what} (first at {first.where})",
                where=row.where,
                hint="each image may appear once: the release's lists overlap",
            )


def folder_as_written(folder: str, base: str | None) -> str:
    """Image folder ``folder`` as the CSV names it: relative to ``base`` (a resolved folder), or absolute.

    A folder reached through a symlink keeps its name, unless collapsing ``..`` in it by name would
    reach another folder than the kernel does (``link/..`` is the link target's parent)."""
    named = os.path.abspath(folder)
    real = os.path.realpath(folder)
    if os.path.realpath(named) != real:
        named = real
    # from a resolved base each ".." goes up a real folder, so the path resolves as it reads
    return os.path.relpath(named, base) if base is not None else named


def csv_rows(listing: Listing, rows: list[Row], base: str | None) -> list[dict[str, str]]:
    """CSV rows; paths relative to ``base`` (the CSV's resolved folder, so extract finds them), or
    absolute."""
    out = []
    folders: dict[str, str] = {}  # image folder -> as written (realpath is slow; there are few folders)
    for row in rows:
        folder, name = os.path.split(row.file)
        if folder not in folders:
            folders[folder] = folder_as_written(folder or ".", base)
        path = os.path.join(folders[folder], name)
        check_utf8_path(path, row.file)  # the CSV is UTF-8 text, read by extract
        record = {"path": path.replace(os.sep, "/"), "label": row.label, "split": row.split}
        if listing.has_clean_label:
            record["clean_label"] = row.clean_label
        if listing.has_is_noisy:
            record["is_noisy"] = row.is_noisy
        out.append(record)
    return out


def file_ids(paths: dict[str, str | Path | None]) -> dict[tuple[int, int], str]:
    """(device, inode) -> option, of the given paths that exist as files."""
    ids = {}
    for option, path in paths.items():
        if path is not None and str(path) != STDIO and os.path.isfile(path):
            stat = os.stat(path)
            ids[(stat.st_dev, stat.st_ino)] = option
    return ids


def check_images(
    rows: list[Row], records: list[dict[str, str]], base: str | None, outputs: dict[tuple[int, int], str]
) -> dict[tuple[int, int], Row]:
    """Every image exists at the path written, as read from the CSV's folder, is none of the outputs, and is
    no other row's file (a hard or symbolic link to it: the image would count twice, or carry two labels)."""
    first: dict[tuple[int, int], Row] = {}
    for row, record in zip(rows, records):
        written = record["path"] if base is None else os.path.join(base, record["path"])
        try:
            stat = os.stat(written)
        except OSError:
            stat = None
        if stat is None or not S_ISREG(stat.st_mode):
            if os.path.isfile(row.file):
                raise InputError(
                    f"image {row.file} exists, but the path written for it ({record['path']}) "
                    f"does not reach it from {base}",
                    where=row.where,
                    hint="write absolute paths with --absolute, and report this",
                )
            raise InputError(
                f"image {row.file} does not exist",
                where=row.where,
                hint="unpack the images where the layout expects them (see `promptcli dataset list`)",
            )
        option = outputs.get((stat.st_dev, stat.st_ino))
        if option is not None:
            raise InputError(
                f"output {option} is the image {row.file}",
                where=row.where,
                hint="write the output to another file (the images must stay intact)",
            )
        other = first.setdefault((stat.st_dev, stat.st_ino), row)
        if other is not row:
            raise InputError(
                f"image {row.file} is the same file as {other.file} (first at {other.where})",
                where=row.where,
                hint="each image may appear once: remove the link or one of the rows",
            )
    return first


def check_other_splits(listing: Listing, rows: list[Row], files: dict[tuple[int, int], Row]) -> None:
    """No row of a split not exported is, through a link, the file of an exported row (``files``: (device,
    inode) -> exported row): a test image linked into train would leak into whichever split is exported.
    Images of the other splits need not be there."""
    if len(rows) == len(listing.rows):
        return
    exported = {id(row) for row in rows}
    for row in listing.rows:
        if id(row) in exported:
            continue
        try:
            stat = os.stat(row.file)
        except (OSError, ValueError):
            continue
        other = files.get((stat.st_dev, stat.st_ino))
        if other is not None:
            raise InputError(
                f"image {other.file} ({other.split}) is the same file as {row.file} ({row.split}, at {row.where})",
                where=other.where,
                hint="each image may appear once in the release: remove the link or one of the rows",
            )


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
        "image_root": os.path.realpath(listing.root),  # absolute: the sidecar may be read from anywhere
        "n_images": len(rows),
        "n_classes": len(listing.classes),
        "classes": listing.classes,
        "splits": splits,
        "columns": listing.columns(),
        "files_read": {os.path.realpath(k): v for k, v in listing.files_read.items()},
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

    def layout_options(self) -> dict[str, Any]:
        """The layout-specific options by their CLI names."""
        return {
            "--split-file": self.split_file,
            "--test-root": self.test_root,
            "--images-dir": self.images_dir,
            "--noise-label": self.noise_label,
            "--noise-file": self.noise_file,
        }


def check_arguments(
    name: str | None, root: Path | None, output: str | None, options: ExportOptions
) -> tuple[str, Path, str]:
    """(name, root, output) when the layout exists, ROOT is a folder, there is an output, and the
    layout takes the options given."""
    from promptcli.datasets.registry import LAYOUTS

    if name is None:
        raise InputError(
            "no dataset layout", where="NAME", hint="see `promptcli dataset list` for the known ones"
        )
    if name not in LAYOUTS:
        raise InputError(
            f"unknown dataset layout {name!r}", where="NAME", hint="use one of: " + ", ".join(LAYOUTS)
        )
    if root is None:
        raise InputError("no ROOT folder", where="ROOT", hint=f"promptcli dataset {name} ROOT -o images.csv")
    if not root.is_dir():
        raise InputError("not a folder", where=root, hint="give the folder holding the release")
    if output is None:
        raise InputError("no output", where="-o", hint="give -o images.csv (or -o - for stdout)")
    takes = LAYOUTS[name].options
    for option, value in options.layout_options().items():
        if value is not None and option not in takes:
            listed = ", ".join(takes) or "none of the layout options"
            raise InputError(f"{name} does not take {option}", where=option, hint=f"{name} takes {listed}")
    return name, root, output


def check_outputs(
    outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None], force: bool
) -> None:
    """Each output is no other output or input, is new (or ``force``), and is in a writable folder."""
    check_distinct(inputs, outputs)
    for option, path in outputs.items():
        if path is not None and str(path) != STDIO:
            check_output_path(path, force, "-o" if option == "the sidecar" else option)


def csv_base(output: str, absolute: bool) -> str | None:
    """The resolved folder of the CSV (relative paths start there), or None for absolute paths.

    Resolved, because the kernel reads ``..`` after a symlinked folder from the link's target."""
    if output == STDIO or absolute:
        return None
    return os.path.realpath(os.path.dirname(output) or ".")


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
    from promptcli.io.fileio import write_text_atomic
    from promptcli.io.labels import write_labels
    from promptcli.io.provenance import base_provenance
    from promptcli.io.sidecar import write_sidecar

    name, root, output = check_arguments(name, root, output, options)
    for path in (root, os.path.realpath(root)):  # recorded in the sidecar, as UTF-8 text
        check_utf8_path(path)
    check_utf8_path(output, hint="give -o a name in UTF-8 characters (extract reads the list by it)")
    to_stdout = output == STDIO
    if to_stdout and json_out:
        raise InputError(
            "-o - and --json both write to stdout", where="--json", hint="write the CSV to a file"
        )
    sidecar = None if to_stdout else f"{output}.json"
    outputs = {"-o": output, "the sidecar": sidecar, "--classnames-out": options.classnames_out}
    given = options.layout_options()
    check_outputs(outputs, {"--split-file": options.split_file, "--noise-file": options.noise_file}, force)

    listing = LAYOUTS[name].read(
        root,
        ReadOptions(
            options.split_file,
            options.test_root,
            options.images_dir,
            options.noise_label,
            options.noise_file,
            force,
        ),
    )
    # --force may overwrite outputs, never what the reader read (split files, list files)
    check_distinct({f"file {path}": path for path in listing.files_read}, outputs)
    split_name = DatasetSplit.check(options.split, "--split")
    check_unique(listing.rows)  # all splits: an image in two splits would leak whichever one is exported
    rows = select_rows(listing, split_name, options.known_noise)
    base = csv_base(output, options.absolute)
    records = csv_rows(listing, rows, base)
    check_other_splits(listing, rows, check_images(rows, records, base, file_ids(outputs)))
    result = {
        **base_provenance(),
        "format": "promptcli-image-list",
        "root": os.path.realpath(root),
        "split": split_name,
        "known_noise": options.known_noise,
        "paths": "absolute" if base is None else "relative to the CSV's folder",
        "options": {k.lstrip("-"): str(v) for k, v in given.items() if v is not None},
        "output": output,
        **summary(listing, rows),
    }
    write_labels(output, listing.columns(), records)
    if sidecar is not None:
        result = write_sidecar(output, result, indent=1)
    if options.classnames_out is not None:
        write_text_atomic(options.classnames_out, "".join(f"{c}\n" for c in listing.classes))
    return {**result, "n_rows": len(rows)}, listing
