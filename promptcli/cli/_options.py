"""Option aliases shared by the subcommands (one definition, one help text)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from promptcli.choices import Precision, TemplateSet

ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Overwrite existing outputs (tune: also the --log file and, without --resume, the checkpoint).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages on stderr.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.", show_default=True)
]
PrecisionOpt = Annotated[
    Precision,
    typer.Option("--precision", help="Model precision: fp32, or fp16/bf16 on a GPU.", show_default=True),
]
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="open_clip model name, e.g. ViT-B-32 or promptcli-demo.")
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        help="open_clip pretrained tag (e.g. openai) or a local checkpoint (.safetensors/.pt).",
    ),
]
ModelConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--model-config", help="Custom open_clip model config JSON for models open_clip does not list."
    ),
]
AmpOpt = Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on GPU.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Batch size.")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-j", help="Data-loading worker processes.")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Output file.")]
TemplateOpt = Annotated[
    list[str] | None,
    typer.Option("--template", help='Prompt template with one {} (repeatable); default "a photo of a {}."'),
]
TemplatesOpt = Annotated[
    TemplateSet | None,
    typer.Option("--templates", help="Template set: imagenet (CLIP's 80) or imagenet-simple (7)."),
]
SkipMissingOpt = Annotated[
    bool, typer.Option("--skip-missing", help="Skip label rows whose path or class the features lack.")
]
FeaturesPretrainedOpt = Annotated[
    str | None, typer.Option("--pretrained", help="Where the features' checkpoint is now, if it moved.")
]
