"""Per-sample gradient norms of noisy and clean labels along the tune training trajectory.

LABELS must come from `promptcli corrupt` (columns clean_label and is_noisy; its sidecar
LABELS.json names the noise type and rate). Each --method is trained exactly as `promptcli tune`
trains it (the same options, and the same seed gives the same parameters), and at every step the
gradient of each sample's loss with respect to the learnable tensors is computed (exactly, batched:
one text-encoder pass and one vectorised backward pass per step). One CSV row per step and method:

    epoch,step,method,loss,noise_type,noise_rate,seed,n_noisy,n_clean,
    noisy_grad_norm,clean_grad_norm,ratio,noisy_sum_norm,clean_sum_norm

*_grad_norm: the mean per-sample gradient norm over the batch's noisy (clean) samples; ratio: noisy
over clean; *_sum_norm: the norm of the group's share (1/B) sum g_i of the step's gradient. Cells
are empty when the batch has no sample of a group. OUTPUT.json records the model, the inputs'
SHA-256, the options and the command. A per-epoch table is printed; `promptcli report` plots it.

Examples:

    promptcli gradstats train.h5 noisy.csv --method coop -o grads.csv
    promptcli gradstats train.h5 noisy.csv --method coop --method linear-probe -o grads.csv --epochs 20
    promptcli gradstats train.h5 noisy.csv --method coop --loss gce --shots 16 --seed 1 -o gce.csv --json
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from promptcli.choices import Method
from promptcli.cli._options import AmpOpt, DeviceOpt, FeaturesPretrainedOpt, ForceOpt, JsonOpt, QuietOpt
from promptcli.cli._output import Output
from promptcli.cli._tune_options import tune_options, with_training_options


@with_training_options
def command(
    features: Annotated[
        Path, typer.Argument(help="Features file (.h5) from `promptcli extract`.", metavar="FEATURES")
    ],
    labels: Annotated[
        Path,
        typer.Argument(
            help="Labels CSV from `promptcli corrupt` (with clean_label, is_noisy).", metavar="LABELS"
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV to write (one row per step).")],
    method: Annotated[
        list[Method] | None,
        typer.Option(
            "--method",
            help="Method to trace (repeatable): coop, kgcoop, cls-tuning, full-prompt, linear-probe or "
            "classifier-zs, whose logits share class weights over the batch [default: coop].",
        ),
    ] = None,
    grad_batch: Annotated[
        int,
        typer.Option("--grad-batch", help="Per-sample gradients computed this many at a time (memory)."),
    ] = 32,
    device: DeviceOpt = "auto",
    amp: AmpOpt = True,
    pretrained: FeaturesPretrainedOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    **training: Any,
) -> None:
    from promptcli.analysis.gradstats import SUMMARY_COLUMNS, gradstats, summary_table

    methods = [str(m) for m in method] if method else [Method.COOP.value]
    out = Output(quiet=quiet, json_mode=json_out, stdout_is_data=str(output) == "-")  # -o -: tables on stderr
    options = tune_options(methods[0], training)
    epochs = {m: replace(options, method=m).resolved().epochs for m in methods}  # each method's default
    with out.progress("gradstats", total=sum(epochs.values()), unit="epochs") as bar:

        def on_epoch(name: str, row: dict) -> None:
            bar.describe(f"{name} epoch {row['epoch']}/{epochs[name]} loss {row['loss']:.4f}")
            bar.advance(1)

        summary = gradstats(
            features,
            labels,
            output,
            methods,
            options,
            device=device,
            amp=amp,
            pretrained=pretrained,
            force=force,
            chunk_size=grad_batch,
            on_epoch=on_epoch,
            info=out.info,
            warn=out.warn,
        )
    out.table(
        "Gradient norms per epoch (mean per-sample |g|)", SUMMARY_COLUMNS, summary_table(summary["runs"])
    )
    if summary["sidecar"]:
        out.info(f"Wrote {summary['n_rows']} rows to {summary['output']} and {summary['sidecar']}")
    out.result(summary)
