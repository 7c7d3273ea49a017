"""Write the bundled demo dataset (a Fashion-MNIST subset) as an ImageFolder tree of PNG files.

The subset ships inside promptcli: 200 training and 100 test images per class, 10 classes,
chosen with a fixed seed (scripts/make_fashion_subset.py). It is written as
OUT_DIR/train/CLASS/NNNN.png and OUT_DIR/test/CLASS/NNNN.png, ready for `promptcli extract`.
Fashion-MNIST is by Zalando Research, MIT licence.

Examples:

    promptcli demo-images demo/images
    promptcli extract demo/images/train -o demo/train.h5 --model promptcli-demo
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from promptcli.cli._options import JsonOpt, QuietOpt
from promptcli.cli._output import Output
from promptcli.errors import InputError


def command(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write train/ and test/ into.")],
    plain: Annotated[
        bool, typer.Option("--plain", help="Light items on black, as in Fashion-MNIST (default: inverted).")
    ] = False,
    per_class: Annotated[
        int | None, typer.Option("--per-class", help="Write only the first N images per class of each split.")
    ] = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from promptcli.io.demo_data import write_demo_images

    out = Output(quiet=quiet, json_mode=json_out)
    if per_class is not None and per_class < 1:
        raise InputError("must be >= 1", where="--per-class", hint="or leave it out to write every image")
    try:
        summary = write_demo_images(out_dir, invert=not plain, per_class=per_class)
    except FileExistsError as exc:
        raise InputError(
            str(exc),
            where=out_dir,
            hint="choose another folder, or move your files out of it (nothing was written or removed)",
        ) from exc
    counts = summary["counts"]
    verb = "Wrote" if summary["written"] else "Already complete:"
    out.info(
        f"{verb} {counts['train']} training and {counts['test']} test images of "
        f"{len(summary['class_names'])} classes under {out_dir}"
    )
    out.result(summary)
