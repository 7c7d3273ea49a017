"""Corrupt labels with an exact amount of controlled noise (or build a few-shot noisy training set).

LABELS is a labels CSV (`path,label`, extra columns pass through; `-` reads stdin) or a features
file (.h5), whose paths and ground-truth labels become the clean labels. The output adds
`clean_label` and `is_noisy`; a sidecar OUTPUT.json records seed, type, rate and the realised
transition counts. Exactly round(rate x n) labels flip (--per-class: in every class). Without -o
the CSV goes to stdout (no sidecar), so corrupt chains in pipes.

Noise types: symmetric (uniform over the other classes), pair (class i -> i+1, or --pairs
from,to CSV), confusion (the class zero-shot CLIP finds most similar; needs --features), matrix
(--matrix C x C CSV, rows sum to 1; without --rate its diagonal sets per-class keep rates).

Examples:

    promptcli corrupt labels.csv --rate 0.3 --type symmetric --seed 0 -o noisy.csv
    promptcli corrupt train.h5 --shots 16 --rate 0.5 -o noisy16.csv     # PTNL few-shot noisy set
    promptcli corrupt labels.csv --rate 0.4 --type confusion --features train.h5 -o noisy.csv
    promptcli corrupt labels.csv --type matrix --matrix T.csv --per-class -o - | head
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from promptcli.choices import ConfusionFrom, NoiseType, TemplateSet
from promptcli.cli._options import (
    DeviceOpt,
    FeaturesPretrainedOpt,
    ForceOpt,
    JsonOpt,
    QuietOpt,
    SeedOpt,
    TemplatesOpt,
)
from promptcli.cli._output import Output


def command(
    labels: Annotated[
        str,
        typer.Argument(
            help="Labels CSV (path,label), a features .h5 file, or - for stdin.", metavar="LABELS"
        ),
    ],
    output: Annotated[
        str, typer.Option("--output", "-o", help="Noisy labels CSV to write; - (default) for stdout.")
    ] = "-",
    rate: Annotated[
        float | None, typer.Option("--rate", help="Fraction of labels to flip, in [0, 1).")
    ] = None,
    noise_type: Annotated[
        NoiseType, typer.Option("--type", help="How wrong labels are drawn.")
    ] = NoiseType.SYMMETRIC,
    seed: SeedOpt = 0,
    per_class: Annotated[
        bool, typer.Option("--per-class", help="Flip exactly round(rate x n_c) in every class.")
    ] = False,
    shots: Annotated[
        int | None,
        typer.Option("--shots", help="Few-shot noisy set: K rows per class, round(rate x K) of them noisy."),
    ] = None,
    pairs: Annotated[
        Path | None, typer.Option("--pairs", help="Pair mapping CSV with header from,to (--type pair).")
    ] = None,
    matrix: Annotated[
        Path | None, typer.Option("--matrix", help="C x C transition matrix CSV (--type matrix).")
    ] = None,
    features: Annotated[
        Path | None,
        typer.Option("--features", help="Features file: the class list, and the model for --type confusion."),
    ] = None,
    classnames: Annotated[
        Path | None, typer.Option("--classnames", help="Class list, one per line (when no --features).")
    ] = None,
    confusion_from: Annotated[
        ConfusionFrom | None,
        typer.Option("--confusion-from", help="Confusion source: text (prompt similarity) or predictions."),
    ] = None,
    template: Annotated[
        list[str] | None,
        typer.Option("--template", help="Prompt template for --type confusion (repeatable)."),
    ] = None,
    templates: TemplatesOpt = None,
    pretrained: FeaturesPretrainedOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from promptcli.noise.noisy_labels import CorruptOptions, corrupt_file

    # Tables are diagnostics: stdout is kept for data (the CSV with -o -, or the --json summary).
    out = Output(quiet=quiet, json_mode=json_out, stdout_is_data=True)
    options = CorruptOptions(
        rate=rate,
        noise_type=str(noise_type),
        seed=seed,
        per_class=per_class,
        shots=shots,
        pairs=pairs,
        matrix=matrix,
        features=features,
        classnames=classnames,
        confusion_from=ConfusionFrom.plain(confusion_from),
        template=template,
        templates=TemplateSet.plain(templates),
        pretrained=pretrained,
        device=device,
    )
    result = corrupt_file(
        labels, output, options, force=force, json_out=json_out, info=out.info, warn=out.warn
    )
    out.table(
        f"Label noise: {result['type']}, seed {result['seed']}",
        ["class", "rows (true class)", "flipped from", "flipped to"],
        [[n, v["rows"], v["flipped_from"], v["flipped_to"]] for n, v in result["per_class_counts"].items()],
    )
    if "input_truth" in result:
        kept = result["input_truth"]
        out.info(
            f"no noise added; the input's own truth kept: {kept['n_noisy']} of "
            f"{kept['n_noise_known']} rows with a known is_noisy are noisy"
        )
    out.info(
        f"{result['n_noisy']} of {result['n_rows']} labels noisy ({result['realised_rate']:.1%})"
        + ("" if output == "-" else f"; wrote {output} and {output}.json")
    )
    out.result(result)
