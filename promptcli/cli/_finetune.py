"""``tune --method finetune``: the options fine-tuning adds to tune, and running it with progress and messages."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from promptcli.choices import Precision
from promptcli.cli._output import Output, epoch_progress, pct

# The options only fine-tuning reads (tune passes them through; other methods ignore them).
ImagesOpt = Annotated[
    Path | None,
    typer.Option("--images", help="finetune: where the features file's images are now, if they moved."),
]
SkipBadOpt = Annotated[
    bool, typer.Option("--skip-bad", help="finetune: leave unreadable training images out (listed).")
]
# (tune's --lr default for finetune: AdamW 1e-5, SGD 1e-4; see learning/finetune.py FINETUNE_LR)
FtWorkersOpt = Annotated[
    int, typer.Option("--workers", "-j", help="finetune: image-decoding worker processes.")
]
FtPrecisionOpt = Annotated[
    Precision | None,
    typer.Option(
        "--precision", help="finetune: autocast fp16/bf16 on GPU, or fp32 [default: bf16 on GPU with --amp]."
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
        "--wise-alpha", help="finetune: also write OUTPUT.wiseA (WiSE-FT weight interpolation; repeatable)."
    ),
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
    epochs = options.epochs
    with epoch_progress(out, "finetune", epochs) as on_epoch:
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
    metrics = summary["metrics"]
    if summary["n_skipped"]:
        out.warn(f"skipped {summary['n_skipped']} label row(s) whose path or class the features lack")
    clean = metrics.get("train_clean_accuracy")
    out.info(
        f"Fine-tuned the image tower ({summary['train_layers']['train_layers']}) on {summary['n_train']} images "
        f"for {epochs} epochs"
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
)


def finetune_options(method: str, values: dict[str, Any], out: Output) -> Any:
    """The :class:`FinetuneOptions` for ``--method finetune``; for other methods None (and a warning
    when a fine-tuning option was changed from its default)."""
    from promptcli.learning.finetune import FinetuneOptions

    given = {k: values[k] for k in FINETUNE_PARAMS}
    if str(method) != "finetune":
        defaults = FinetuneOptions()
        changed = [
            "--" + k.replace("_", "-")
            for k, v in given.items()
            if v not in (None, [], getattr(defaults, k if k != "wise_alpha" else "wise_alphas", None))
        ]
        if changed:
            out.warn(f"{', '.join(changed)} apply to --method finetune; ignored for {method}")
        return None
    return FinetuneOptions(
        train_layers=given["train_layers"],
        images=None if given["images"] is None else str(given["images"]),
        skip_bad=given["skip_bad"],
        workers=given["workers"],
        precision=None if given["precision"] is None else str(given["precision"]),
        lp_ft=given["lp_ft"],
        lp_epochs=given["lp_epochs"],
        wise_alphas=list(given["wise_alpha"] or []),
    ).validate()
