"""Turn a known dataset release on disk into the image-list CSV `promptcli extract` reads.

NAME is a layout (`promptcli dataset list` shows them all, the files each needs and where to get
them), ROOT the folder holding the release. The CSV has `path,label,split`, plus `clean_label` and
`is_noisy` where the release knows which labels are wrong (blank cells: not known). Class names
are written as CoOp shows them to the text encoder (`_` as a space, each dataset's renaming).
Paths are relative to the CSV's real folder (absolute with `-o -` or --absolute); every image must
exist at the path written, once. An output may not be another output, one of the release's files or
an image. A sidecar OUTPUT.json records how the file was made (absolute paths).

Examples:

    promptcli dataset oxford-pets $DATA/oxford_pets -o pets.csv
    promptcli dataset dtd $DATA/dtd --split test -o dtd-test.csv --classnames-out dtd-classes.txt
    promptcli dataset clothing1m $DATA/clothing1m --split train --known-noise -o c1m-verified.csv
    promptcli dataset cifar10n $DATA/cifar --images-dir cifar10-png --noise-label aggre -o c10n.csv
    promptcli dataset list
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from promptcli.choices import DatasetSplit
from promptcli.cli._options import ForceOpt, JsonOpt, QuietOpt
from promptcli.cli._output import Output
from promptcli.io.fileio import STDIO

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
    from promptcli.datasets.export import ExportOptions, export_dataset

    if list_layouts or name == LIST:
        _show_layouts(json_out)
        return
    to_stdout = output == STDIO
    out = Output(quiet=quiet, json_mode=json_out, stdout_is_data=to_stdout)
    options = ExportOptions(
        split=str(split),
        split_file=split_file,
        test_root=test_root,
        images_dir=images_dir,
        noise_label=noise_label,
        noise_file=noise_file,
        known_noise=known_noise,
        absolute=absolute,
        classnames_out=classnames_out,
    )
    result, listing = export_dataset(name, root, output, options, force=force, json_out=json_out)
    rows = result["n_rows"]
    sidecar = f"{output}.json"
    for note in listing.notes:
        out.info(note)
    table_rows = [
        [s, v["n_images"], v["n_classes_present"], _fraction(v)] for s, v in result["splits"].items()
    ]
    out.table(
        f"{name}: {len(listing.classes)} classes", ["split", "images", "classes", "noisy (known)"], table_rows
    )
    out.info(f"{rows} images" + ("" if to_stdout else f"; wrote {output} and {sidecar}"))
    out.result(result)


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
