"""Encode images into an HDF5 features file.

IMAGES is an image folder in ImageFolder layout (one sub-folder per class; `_` in folder names
becomes a space) or a CSV with a `path` column and optional `label` and `split` columns.

Examples:

    promptcli extract data/train -o train.h5 --model ViT-B-32 --pretrained openai
    promptcli extract images.csv -o feats.h5 --pretrained weights.safetensors --views 4 --dtype float32
    promptcli extract data/train -o train.h5 --resume      # complete an interrupted run
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from promptcli.cli._options import (
    BatchSizeOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    ModelConfigOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    QuietOpt,
    SeedOpt,
    WorkersOpt,
)
from promptcli.cli._output import Output
from promptcli.errors import InputError


def command(
    images: Annotated[
        Path, typer.Argument(help="Image folder (ImageFolder layout) or CSV with a path column.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Features file to write (.h5).")],
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    views: Annotated[
        int, typer.Option("--views", help="Extra augmented views per image (CoOp augmentation).")
    ] = 0,
    dtype: Annotated[str, typer.Option("--dtype", help="Stored dtype: float16 or float32.")] = "float16",
    classnames: Annotated[
        Path | None,
        typer.Option("--classnames", help="Class names, one per line (CSV labels must be among them)."),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Split name recorded for a folder's images.")] = "",
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = 2,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Skip unreadable images (listed in the output).")
    ] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Complete an interrupted extraction.")] = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from promptcli.extraction import ExtractOptions, extract_features
    from promptcli.image_sources import read_classnames, read_image_source
    from promptcli.models import load_model

    out = Output(quiet=quiet, json_mode=json_out)
    options = ExtractOptions(
        views=views, seed=seed, batch_size=batch_size, workers=workers, dtype=dtype, skip_bad=skip_bad
    )
    options.validate()
    if output.exists() and not force:
        raise InputError(
            "output exists", where=output, hint="pass --force to overwrite it or choose another -o"
        )
    if not output.parent.exists():
        raise InputError("output folder does not exist", where=output.parent, hint="create it first")
    names = read_classnames(classnames) if classnames else None
    source = read_image_source(images, split=split, classnames=names)
    loaded = load_model(model, pretrained, model_config, device=device, precision=precision)
    out.info(
        f"Encoding {len(source)} images ({len(source.classnames)} classes) with {model} on {loaded.device}"
        + (f", {views} augmented views each" if views else "")
    )
    with out.progress("extract", total=len(source)) as bar:
        result = extract_features(
            source, loaded, output, options, resume=resume, force=force, on_rows=bar.advance
        )
    for item in result.skipped:
        out.warn(f"skipped {item['path']}: {item['error']}")
    out.info(f"Wrote {result.n_images} embeddings (dim {result.dim}) to {result.output}")
    out.result(
        {
            "output": str(result.output),
            "n_images": result.n_images,
            "n_skipped": result.n_skipped,
            "skipped": result.skipped,
            "dim": result.dim,
            "views": result.views,
            "classes": len(source.classnames),
            "resumed_chunks": result.resumed_chunks,
        }
    )
