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

import inspect
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer

from promptcli.cli import tune as _tune
from promptcli.cli._output import Output

# gradstats takes every training option of `tune` (one definition: its options cannot drift apart);
# these are tune's own or replaced here.
_NOT_SHARED = {"features", "labels", "output", "method", "log", "resume"}


def _with_tune_options(func: Any) -> Any:
    """Give ``func(..., **training)`` a signature listing tune's training options, for typer."""
    own = [
        p for p in inspect.signature(func, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD
    ]
    tune_params = inspect.signature(_tune.command, eval_str=True).parameters
    shared = [p for name, p in tune_params.items() if name not in _NOT_SHARED]
    func.__signature__ = inspect.Signature(own + shared)
    func.__annotations__ = {p.name: p.annotation for p in own + shared}
    return func


@_with_tune_options
def command(
    features: Annotated[Path, typer.Argument(help="Features file (.h5) from `promptcli extract`.")],
    labels: Annotated[
        Path, typer.Argument(help="Labels CSV from `promptcli corrupt` (with clean_label, is_noisy).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV to write (one row per step).")],
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method", help="coop, cls-tuning, full-prompt, linear-probe or classifier-zs (repeatable)."
        ),
    ] = None,
    grad_batch: Annotated[
        int,
        typer.Option("--grad-batch", help="Per-sample gradients computed this many at a time (memory)."),
    ] = 32,
    **training: Any,
) -> None:
    from promptcli.analysis.gradstats import SUMMARY_COLUMNS, gradstats, summary_table
    from promptcli.learning.training import TuneOptions

    methods = method or ["coop"]
    out = Output(quiet=training.pop("quiet"), json_mode=training.pop("json_out"))
    device, amp, pretrained, force = (training.pop(k) for k in ("device", "amp", "pretrained", "force"))
    training["use_views"] = not training.pop("no_views")
    options = TuneOptions(**{f.name: training[f.name] for f in fields(TuneOptions) if f.name in training})
    epochs = options.epochs
    with out.progress("gradstats", total=epochs * len(methods), unit="epochs") as bar:

        def on_epoch(name: str, row: dict) -> None:
            bar.describe(f"{name} epoch {row['epoch']}/{epochs} loss {row['loss']:.4f}")
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
    out.info(f"Wrote {summary['n_rows']} rows to {summary['output']} and {summary['sidecar']}")
    out.result(summary)
