"""Evaluate learned prompts, or zero-shot CLIP, on a features file.

Ground truth comes from --labels (a labels CSV joined by path; its `label` column; noisy labels, from
corrupt, pseudolabel or clean, are refused) or from the features file's own labels. Prints top-1, top-5 and macro accuracy and a per-class table. Several
--prompt files are an ensemble: their class probabilities are averaged. A prompt made for another
model or another class list is refused. --predictions writes `path,label,confidence,true_label`
(itself a labels CSV); -o writes the --json summary (with the prompts' method, loss, seed and noise).

Examples:

    promptcli eval test.h5 --prompt coop.safetensors
    promptcli eval test.h5 --prompt seed1.safetensors --prompt seed2.safetensors --json
    promptcli eval test.h5 --zero-shot --template "a photo of a {}." --labels test.csv
    promptcli eval test.h5 --zero-shot --templates imagenet --predictions preds.csv -o metrics.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from promptcli.choices import TemplateSet
from promptcli.cli._options import (
    DeviceOpt,
    FeaturesPretrainedOpt,
    ForceOpt,
    JsonOpt,
    QuietOpt,
    SkipMissingOpt,
    TemplateOpt,
    TemplatesOpt,
)
from promptcli.cli._output import Output, pct


def command(
    features: Annotated[Path, typer.Argument(help="Features file (.h5) to evaluate on.")],
    prompt: Annotated[
        list[Path] | None,
        typer.Option("--prompt", "-p", help="Prompt file from `promptcli tune` (repeat to ensemble)."),
    ] = None,
    zero_shot: Annotated[
        bool, typer.Option("--zero-shot", help="Zero-shot CLIP instead of a prompt.")
    ] = False,
    template: TemplateOpt = None,
    templates: TemplatesOpt = None,
    labels: Annotated[
        str | None, typer.Option("--labels", help="Ground-truth labels CSV (default: the features' labels).")
    ] = None,
    skip_missing: SkipMissingOpt = False,
    predictions: Annotated[
        Path | None, typer.Option("--predictions", help="Write path,label,confidence,true_label CSV here.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the JSON summary (metrics.json) here.")
    ] = None,
    pretrained: FeaturesPretrainedOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from promptcli.analysis.evaluation import evaluate_file

    to_stdout = "-" in (str(predictions), str(output))
    out = Output(quiet=quiet, json_mode=json_out, stdout_is_data=to_stdout)  # tables go to stderr
    result = evaluate_file(
        features,
        prompt or [],
        zero_shot=zero_shot,
        templates=template,
        template_set=TemplateSet.plain(templates),
        labels_path=labels,
        skip_missing=skip_missing,
        pretrained=pretrained,
        device=device,
        predictions=predictions,
        output=output,
        json_out=json_out,
        force=force,
        warn=out.warn,
    )
    summary, metrics = result.summary, result.metrics
    if summary["n_skipped"]:
        out.warn(f"skipped {summary['n_skipped']} label row(s) whose path or class the features lack")
    out.table(
        "Per-class accuracy",
        ["class", "n", "correct", "accuracy"],
        [[r["class"], r["n"], r["correct"], pct(r["accuracy"])] for r in metrics.per_class],
    )
    what = (
        "zero-shot"
        if summary["zero_shot"]
        else f"{len(summary['prompts'])} prompt(s), {summary['method'] or 'mixed'}"
    )
    out.info(
        f"{what} on {metrics.n} images: top-1 {pct(metrics.top1)}, top-{metrics.top5_k} {pct(metrics.top5)}, "
        f"macro {pct(metrics.macro)}"
    )
    out.result(summary)
