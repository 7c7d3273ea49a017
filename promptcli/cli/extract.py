"""Encode images into an HDF5 features file.

IMAGES is an image folder in ImageFolder layout (one sub-folder per class; `_` in folder names
becomes a space) or a CSV with a `path` column and optional `label` and `split` columns.

Examples:

    promptcli extract data/train -o train.h5 --model ViT-B-32 --pretrained openai
    promptcli extract images.csv -o feats.h5 --pretrained weights.safetensors --views 4 --dtype float32
    promptcli extract data/train -o train.h5 --model ViT-B-32 --pretrained openai --resume
    torchrun --nproc-per-node 8 -m promptcli extract data/train -o train.h5 --model ViT-B-32 --pretrained openai

--resume completes an interrupted run; give it the options of that run.

Under torchrun (or with --distributed) each rank encodes its share of the chunks into the shared
OUTPUT.partial/ folder and rank 0 writes the file, identical to a single-process run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from promptcli.choices import FeatureDtype
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

if TYPE_CHECKING:
    from promptcli.extraction.distributed import DistContext


def command(
    images: Annotated[
        Path, typer.Argument(help="Image folder (ImageFolder layout) or CSV with a path column.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Features file to write (.h5).")],
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    random_weights: Annotated[
        bool,
        typer.Option(
            "--random-weights",
            help="Use random weights seeded by --seed (tests, benchmarks) instead of --pretrained.",
        ),
    ] = False,
    adapter: Annotated[
        Path | None,
        typer.Option(
            "--adapter",
            help="Encode through a fine-tuned or prompted image tower (`tune --method finetune/vpt/maple` output).",
        ),
    ] = None,
    views: Annotated[
        int, typer.Option("--views", help="Extra augmented views per image (CoOp augmentation).")
    ] = 0,
    dtype: Annotated[FeatureDtype, typer.Option("--dtype", help="Stored dtype.")] = FeatureDtype.FLOAT16,
    classnames: Annotated[
        Path | None,
        typer.Option(
            "--classnames",
            help="Class names in label order, one per line (CSV labels and class folders' names must be among them).",
        ),
    ] = None,
    split: Annotated[
        str,
        typer.Option("--split", help="Split name recorded for a folder's images (a CSV has a split column)."),
    ] = "",
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = 2,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Skip unreadable images (listed in the output).")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Complete an interrupted extraction; with none, start afresh; an OUTPUT this same extraction finished is left as it is (exit 0).",
        ),
    ] = False,
    max_pixels: Annotated[
        int,
        typer.Option("--max-pixels", help="Refuse images with more pixels than this (decompression bombs)."),
    ] = 89_478_485,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", help="Images per resumable chunk (the unit of work per rank).")
    ] = 1024,
    distributed: Annotated[
        bool,
        typer.Option(
            "--distributed",
            help="Run as one rank of a torchrun job (automatic when WORLD_SIZE > 1).",
        ),
    ] = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from promptcli.extraction.distributed import context_from_env

    dtype, precision = str(dtype), str(precision)  # plain strings into the file's attributes
    ctx = context_from_env(force=distributed)
    if ctx is None:
        _run(**locals())  # every option, by name
        return
    with ctx.session(device):
        _run(**locals())


def _run(
    images: Path,
    output: Path,
    model: str,
    pretrained: str | None,
    model_config: Path | None,
    random_weights: bool,
    adapter: Path | None,
    views: int,
    dtype: str,
    classnames: Path | None,
    split: str,
    batch_size: int,
    workers: int,
    seed: int,
    device: str,
    precision: str,
    skip_bad: bool,
    resume: bool,
    chunk_size: int,
    max_pixels: int,
    force: bool,
    quiet: bool,
    json_out: bool,
    ctx: DistContext | None,
    **_: object,
) -> None:
    from promptcli.extraction.distributed import DistContext, extract_distributed
    from promptcli.extraction.extract import ExtractOptions, extract_features, open_extraction

    main = ctx is None or ctx.is_main
    single = ctx or DistContext()
    out = Output(quiet=quiet or not main, json_mode=json_out and main)
    options = ExtractOptions(
        views=views,
        seed=seed,
        batch_size=batch_size,
        workers=workers,
        dtype=dtype,
        skip_bad=skip_bad,
        chunk_size=chunk_size,
        max_pixels=max_pixels,
    )

    def setup():
        return open_extraction(
            images,
            output,
            options,
            model=model,
            pretrained=pretrained,
            model_config=model_config,
            random_weights=random_weights,
            adapter=adapter,
            classnames=classnames,
            split=split,
            device=single.device_spec(device) if ctx else device,
            precision=precision,
            force=force,
            resume=resume,
        )

    # every rank sets up; if one cannot (missing file, bad weights), all stop with its error
    source, loaded = single.collective(setup)
    where = f"{loaded.device}" + (f" x {ctx.world_size} ranks ({ctx.backend})" if ctx else "")
    out.info(
        f"Encoding {len(source)} images ({len(source.classnames)} classes) with {model} on {where}"
        + (f", {views} augmented views each" if views else "")
    )
    share = len(source) if ctx is None else -(-len(source) // ctx.world_size)  # rank 0 shows its own
    with out.progress("extract" + (" (rank 0)" if ctx else ""), total=share) as bar:
        if ctx is None:
            result = extract_features(
                source, loaded, output, options, resume=resume, force=force, on_rows=bar.advance
            )
        else:
            result = extract_distributed(
                source, loaded, output, options, ctx, resume=resume, force=force, on_rows=bar.advance
            )
    if result is None:  # a rank other than 0: rank 0 wrote the file and reports
        return
    if result.already_complete:  # --resume on an extraction that had finished (a requeued job)
        out.info(f"{result.output} is complete: this extraction wrote it earlier; nothing to do")
    else:
        for item in result.skipped:
            out.warn(f"skipped {item['path']}: {item['error']}")
        resumed = (
            f"; {result.resumed_chunks} chunks came from the interrupted run" if result.resumed_chunks else ""
        )
        out.info(f"Wrote {result.n_images} embeddings (dim {result.dim}) to {result.output}{resumed}")
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
            "already_complete": result.already_complete,
        }
    )
