"""Turn a known dataset release on disk into the image-list CSV `promptcli extract` reads.

NAME is a layout (`promptcli dataset list` shows them all, the files each needs and where to get
them), ROOT the folder holding the release. The CSV has `path,label,split`, plus `clean_label` and
`is_noisy` where the release knows which labels are wrong (blank cells: not known). Class names
are written as CoOp shows them to the text encoder (`_` as a space, each dataset's renaming).
Paths are relative to the CSV's folder (absolute with `-o -` or --absolute). A sidecar OUTPUT.json
records how the file was made.

Examples:

    promptcli dataset oxford-pets $DATA/oxford_pets -o pets.csv
    promptcli dataset dtd $DATA/dtd --split test -o dtd-test.csv --classnames-out dtd-classes.txt
    promptcli dataset clothing1m $DATA/clothing1m --split train --known-noise -o c1m-verified.csv
    promptcli dataset cifar10n $DATA/cifar --images-dir cifar10-png --noise-label aggre -o c10n.csv
    promptcli dataset list
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from promptcli.choices import DatasetSplit
from promptcli.cli._options import ForceOpt, JsonOpt, QuietOpt
from promptcli.cli._output import Output
from promptcli.errors import InputError
from promptcli.io.fileio import STDIO, check_output_path, write_text_atomic

LIST = "list"


def command(
    name: Annotated[
        str | None, typer.Argument(help="Dataset layout (see `promptcli dataset list`), or list.")
    ] = None,
    root: Annotated[Path | None, typer.Argument(help="Folder holding the release.")] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Image-list CSV to write (- for stdout).")
    ] = None,
    split: Annotated[
        DatasetSplit, typer.Option("--split", help="Which split's images to write.")
    ] = DatasetSplit.ALL,
    split_file: Annotated[
        Path | None,
        typer.Option("--split-file", help="A CoOp-style split JSON to use instead of the layout's."),
    ] = None,
    test_root: Annotated[
        Path | None,
        typer.Option("--test-root", help="food101n: the food-101 folder, for Food-101's test split."),
    ] = None,
    images_dir: Annotated[
        Path | None,
        typer.Option("--images-dir", help="cifar10n/cifar100n: folder to write the PNG images into."),
    ] = None,
    noise_label: Annotated[
        str | None,
        typer.Option("--noise-label", help="cifar10n: worst (default), aggre, random1..3; cifar100n: noisy."),
    ] = None,
    noise_file: Annotated[
        Path | None,
        typer.Option("--noise-file", help="cifar10n/cifar100n: the human label file (.pt or .npz)."),
    ] = None,
    known_noise: Annotated[
        bool,
        typer.Option("--known-noise", help="Only rows whose is_noisy the release knows (real-noise sets)."),
    ] = False,
    absolute: Annotated[bool, typer.Option("--absolute", help="Write absolute image paths.")] = False,
    classnames_out: Annotated[
        Path | None,
        typer.Option("--classnames-out", help="Also write the class list, one per line, in label order."),
    ] = None,
    list_layouts: Annotated[bool, typer.Option("--list", help="List the known layouts and exit.")] = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from promptcli.datasets.registry import LAYOUTS

    if list_layouts or name == LIST:
        _show_layouts(json_out)
        return
    if name is None:
        raise InputError(
            "no dataset layout", where="NAME", hint="see `promptcli dataset list` for the known ones"
        )
    if name not in LAYOUTS:
        raise InputError(
            f"unknown dataset layout {name!r}", where="NAME", hint="use one of: " + ", ".join(LAYOUTS)
        )
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
    out = Output(quiet=quiet, json_mode=json_out, stdout_is_data=to_stdout)
    sidecar = None if to_stdout else Path(f"{output}.json")
    if not to_stdout:
        check_output_path(output, force)
        check_output_path(sidecar, force)
    if classnames_out is not None:
        check_output_path(classnames_out, force, "--classnames-out")

    from promptcli.datasets.export import check_rows, csv_rows, select_rows, summary
    from promptcli.datasets.registry import ReadOptions
    from promptcli.io.labels import write_labels
    from promptcli.io.sidecar import write_sidecar

    options = ReadOptions(split_file, test_root, images_dir, noise_label, noise_file, force)
    listing = layout.read(root, options)
    split_name = DatasetSplit.check(split, "--split")
    rows = select_rows(listing, split_name, known_noise)
    check_rows(rows)
    base = None if (to_stdout or absolute) else Path(os.path.abspath(output)).parent
    result = {
        **_provenance(),
        "format": "promptcli-image-list",
        "root": str(root),
        "split": split_name,
        "known_noise": known_noise,
        "paths": "absolute" if base is None else "relative to the CSV's folder",
        "options": {k.lstrip("-"): str(v) for k, v in given.items() if v is not None},
        "output": output,
        **summary(listing, rows),
    }
    write_labels(output, listing.columns(), csv_rows(listing, rows, base))
    if sidecar is not None:
        write_sidecar(output, result, indent=1)
    if classnames_out is not None:
        write_text_atomic(classnames_out, "".join(f"{c}\n" for c in listing.classes))
    for note in listing.notes:
        out.info(note)
    table_rows = [
        [s, v["n_images"], v["n_classes_present"], _fraction(v)] for s, v in result["splits"].items()
    ]
    out.table(
        f"{name}: {len(listing.classes)} classes", ["split", "images", "classes", "noisy (known)"], table_rows
    )
    out.info(f"{len(rows)} images" + ("" if to_stdout else f"; wrote {output} and {sidecar}"))
    out.result(result)


def _provenance() -> dict[str, str]:
    """What base_provenance records, with versions read from package metadata: importing open_clip and
    torch only to name their versions would double the run time of a command that needs neither."""
    import datetime as dt
    from importlib.metadata import PackageNotFoundError, version

    import promptcli
    from promptcli.io.provenance import command_line

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "unknown"

    return {
        "promptcli_version": promptcli.__version__,
        "open_clip_version": installed("open_clip_torch"),
        "torch_version": installed("torch"),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
    }


def _fraction(entry: dict) -> str:
    if entry.get("n_noise_known") is None:
        return "-"
    if not entry["n_noise_known"]:
        return "unknown"
    return f"{entry['noisy_fraction']:.1%} of {entry['n_noise_known']}"


def _show_layouts(json_out: bool) -> None:
    from promptcli.datasets.registry import LAYOUTS

    if json_out:
        data = [
            {
                "name": k,
                "title": v.title,
                "needs": list(v.needs),
                "source": v.source,
                "options": list(v.options),
            }
            for k, v in LAYOUTS.items()
        ]
        typer.echo(json.dumps(data, indent=2))
        return
    for key, layout in LAYOUTS.items():
        typer.echo(f"{key}: {layout.title}")
        typer.echo(f"    needs:   {', '.join(layout.needs)}")
        typer.echo(f"    get:     {layout.source}")
        if layout.options:
            typer.echo(f"    options: {', '.join(layout.options)}")
