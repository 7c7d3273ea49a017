"""Turn eval summaries, tune logs and gradstats CSVs into a figure and a results table.

RESULTS are files or folders (searched recursively for *.json, *.jsonl and *.csv). Each file's kind
is told from its content: an `eval --json` / `eval -o` summary, a `tune --log` file or a `gradstats`
CSV; other files in folders are skipped. Runs are grouped by the method, loss, shots, model and
noise recorded inside the files (never by file names) and averaged over seeds.

The figure has a panel per noise type with accuracy against noise rate (mean line, shaded ± std over
seeds, zero-shot CLIP as a dashed line), training curves (accuracy against the given and the clean
labels per epoch) and the noisy-to-clean gradient-norm ratio; panels without data are left out.
The table has rows method + loss and columns noise rates, cells "mean ± std (n)" in percent.
Each -o is written by its suffix: .png, .svg or .pdf (the figure), .html (self-contained: figure, table and
provenance), .md (table and provenance, linking a .png written beside it). Without -o the table is
printed; --json prints the aggregated numbers.

Examples:

    promptcli report results/
    promptcli report results/ -o report.html -o report.png -o report.md
    promptcli report evals/ logs/coop.jsonl grads.csv --metric macro --curve-rate 0.5 -o fig.png
    promptcli report results/ --json > numbers.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from promptcli.choices import Metric
from promptcli.cli._options import ForceOpt, JsonOpt, QuietOpt
from promptcli.cli._output import Output


def command(
    results: Annotated[
        list[Path],
        typer.Argument(help="Result files or folders (eval summaries, tune logs, gradstats CSVs)."),
    ],
    output: Annotated[
        list[Path] | None,
        typer.Option(
            "--output", "-o", help="Write the report here: .html, .png, .svg, .pdf or .md (repeatable)."
        ),
    ] = None,
    metric: Annotated[Metric, typer.Option("--metric", help="Accuracy to report.")] = Metric.TOP1,
    curve_rate: Annotated[
        float | None,
        typer.Option(
            "--curve-rate",
            help="Noise rate of the training-curve and gradient panels [default: the highest].",
        ),
    ] = None,
    title: Annotated[str, typer.Option("--title", help="Title of the figure and the documents.")] = (
        "promptcli report"
    ),
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from promptcli.analysis.reporting import caption, make_report, table

    out = Output(quiet=quiet, json_mode=json_out)
    outputs = list(output or [])
    report = make_report(
        results, outputs, metric=str(metric), curve_rate=curve_rate, title=title, force=force
    )
    for message in report.warnings:
        out.warn(message)
    if report.skipped:
        out.info(f"skipped {len(report.skipped)} file(s) that are not promptcli results")
    kinds = {
        kind: sum(1 for f in report.files if f.kind == kind) for kind in ("eval", "tune-log", "gradstats")
    }
    out.info(
        f"read {kinds['eval']} eval summaries, {kinds['tune-log']} tune logs, {kinds['gradstats']} gradstats CSVs"
    )
    if not outputs:  # one terminal table per noise type keeps each narrow enough to read
        for noise_type in report.noise_types() or ([None] if report.accuracy or report.zero_shot else []):
            out.table(caption(report, noise_type), *table(report, noise_type))
    if outputs:
        out.info("wrote " + ", ".join(str(p) for p in outputs))
    out.result({**report.to_dict(), "outputs": [str(p) for p in outputs]})
