"""``tune --method finetune|vpt|maple``: the options training on images adds to tune, and running it
with progress and messages."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from promptcli.choices import IMAGE_METHODS, Precision, VptDepth
from promptcli.cli._output import Output, epoch_progress, pct

# The options only fine-tuning reads (tune passes them through; other methods ignore them).
ImagesOpt = Annotated[
    Path | None,
    typer.Option(
        "--images", help="finetune, vpt, maple: where the features file's images are now, if they moved."
    ),
]
SkipBadOpt = Annotated[
    bool, typer.Option("--skip-bad", help="finetune: leave unreadable training images out (listed).")
]
# (tune's --lr default for finetune: AdamW 1e-5, SGD 1e-4; see learning/options.py FINETUNE_LR)
FtWorkersOpt = Annotated[
    int, typer.Option("--workers", "-j", help="finetune, vpt, maple: image-decoding worker processes.")
]
FtPrecisionOpt = Annotated[
    Precision | None,
    typer.Option(
        "--precision",
        help="finetune, vpt, maple: autocast fp16/bf16 on GPU, or fp32 [default: bf16 on GPU with --amp].",
    ),
]
TrainLayersOpt = Annotated[
    str, typer.Option("--train-layers", help="finetune: all, or last-K blocks/stages of the image tower.")
]
LpFtOpt = Annotated[
    bool, typer.Option("--lp-ft", help="finetune: linear probe on the frozen features first (LP-FT).")
]
LpEpochsOpt = Annotated[
    int, typer.Option("--lp-epochs", help="finetune --lp-ft: epochs of the linear probe.")
]
WiseAlphaOpt = Annotated[
    list[float] | None,
    typer.Option(
        "--wise-alpha",
        help="finetune: also write ft.wiseA.safetensors for -o ft.safetensors (WiSE-FT weight interpolation; repeatable).",
    ),
]


VptDepthOpt = Annotated[
    VptDepth,
    typer.Option(
        "--vpt-depth", help="vpt: tokens at the input only (shallow) or a fresh set before every block."
    ),
]
VptTokensOpt = Annotated[int, typer.Option("--vpt-tokens", help="vpt: prompt tokens per layer.")]
MapleDepthOpt = Annotated[
    int,
    typer.Option("--maple-depth", help="maple: layers J with text and coupled vision prompts (paper: 9)."),
]


def run(
    features: Path,
    labels: str,
    output: Path,
    options: Any,
    finetune_options: Any,
    *,
    device: str,
    amp: bool,
    pretrained: str | None,
    log: Path | None,
    resume: bool,
    force: bool,
    out: Output,
) -> None:
    """Fine-tune (one process, or one rank under torchrun) and report like tune does."""
    from promptcli.extraction.distributed import context_from_env
    from promptcli.learning.shards import DistShard

    kwargs = dict(device=device, amp=amp, pretrained=pretrained, log=log, resume=resume, force=force)
    ctx = context_from_env()
    if ctx is None:
        _run_one(features, labels, output, options, finetune_options, out=out, shard=None, **kwargs)
        return
    with ctx.session(device):
        kwargs["device"] = ctx.device_spec(device)
        if not ctx.is_main:
            out = Output(quiet=True)
        _run_one(features, labels, output, options, finetune_options, out=out, shard=DistShard(ctx), **kwargs)


def _run_one(
    features: Path,
    labels: str,
    output: Path,
    options: Any,
    finetune_options: Any,
    *,
    device: str,
    amp: bool,
    pretrained: str | None,
    log: Path | None,
    resume: bool,
    force: bool,
    out: Output,
    shard: Any,
) -> None:
    from promptcli.learning.finetune import finetune

    main = shard is None or shard.is_main
    epochs = options.resolved().epochs
    with epoch_progress(out, str(options.method), epochs) as on_epoch:
        summary = finetune(
            features,
            labels,
            output,
            options,
            finetune_options,
            device=device,
            amp=amp,
            pretrained=pretrained,
            resume=resume,
            force=force,
            log_path=log,
            on_epoch=on_epoch,
            info=out.info,
            warn=out.warn,
            shard=shard,
        )
    if not main:
        return
    if summary.get("already_complete"):  # --resume on a run that had finished (a requeued job)
        out.info(f"{summary['output']} is complete: this run wrote it earlier; nothing to do")
        out.result(summary)
        sys.stdout.flush()
        return
    metrics = summary["metrics"]
    if summary["n_skipped"]:
        out.warn(f"skipped {summary['n_skipped']} label row(s) whose path or class the features lack")
    clean = metrics.get("train_clean_accuracy")
    out.info(
        f"Trained {summary['trained']} on {summary['n_train']} images "
        f"for {epochs} epoch{'' if epochs == 1 else 's'}"
        + (f" (resumed at epoch {summary['resumed_from_epoch']})" if summary["resumed_from_epoch"] else "")
        + f": train accuracy {pct(metrics['train_accuracy'])}"
        + (f", against clean labels {pct(clean)}" if clean is not None else "")
        + f"; wrote {summary['output']}"
        + "".join(f", {p}" for p in summary["wise_outputs"].values())
    )
    out.result(summary)
    sys.stdout.flush()


FINETUNE_PARAMS = (
    "images",
    "skip_bad",
    "workers",
    "precision",
    "train_layers",
    "lp_ft",
    "lp_epochs",
    "wise_alpha",
    "vpt_depth",
    "vpt_tokens",
    "maple_depth",
)
# The options of one image method (the others warn that they are ignored for it).
_OWN = {"vpt_depth": "vpt", "vpt_tokens": "vpt", "maple_depth": "maple"}


def finetune_options(method: str, values: dict[str, Any], out: Output) -> Any:
    """The :class:`FinetuneOptions` for the image methods (finetune, vpt, maple); for other methods
    None. An option changed from its default that the method does not read is reported as ignored
    (the finetune-only ones given to vpt/maple are refused by ``FinetuneOptions.validate``)."""
    from promptcli.learning.finetune import FinetuneOptions

    method = str(method)
    given = {k: values[k] for k in FINETUNE_PARAMS}
    defaults = FinetuneOptions()
    changed = [
        k
        for k, v in given.items()
        if v not in (None, [], getattr(defaults, k if k != "wise_alpha" else "wise_alphas", None))
    ]
    if method not in IMAGE_METHODS:
        if changed:
            names = ", ".join("--" + k.replace("_", "-") for k in changed)
            out.warn(f"{names} apply to --method {', '.join(IMAGE_METHODS)}; ignored for {method}")
        return None
    for k in changed:
        if k in _OWN and _OWN[k] != method:
            out.warn(f"--{k.replace('_', '-')} applies to --method {_OWN[k]}; ignored for {method}")
    return FinetuneOptions(
        train_layers=given["train_layers"],
        images=None if given["images"] is None else str(given["images"]),
        skip_bad=given["skip_bad"],
        workers=given["workers"],
        precision=None if given["precision"] is None else str(given["precision"]),
        lp_ft=given["lp_ft"],
        lp_epochs=given["lp_epochs"],
        wise_alphas=list(given["wise_alpha"] or []),
        vpt_depth=str(given["vpt_depth"]),
        vpt_tokens=given["vpt_tokens"],
        maple_depth=given["maple_depth"],
    ).validate(method)
