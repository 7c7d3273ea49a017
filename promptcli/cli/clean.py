"""Find likely mislabelled rows of a labels CSV with a tuned prompt or zero-shot; drop or relabel them.

Class probabilities come from --prompt files (several average their probabilities, as in eval) or
from the model's zero-shot classifier (--zero-shot, --template/--templates). Each row of LABELS
(joined to FEATURES by path) then gets a score of how likely its label is wrong:

--score margin (default): max_{c != label} p(c) - p(label), in [-1, 1] (above 0: the top class is
not the label); default --threshold 0.

--score posterior: the probability that the label is wrong under a symmetric label-noise model
fitted by EM to all the rows: the classifier's probabilities are the prior, class centroids of the
labelled images' own features (weighted by the current posterior) add evidence, and the noise rate
is estimated (or fixed with --noise-rate; --noise-model class estimates a noise matrix per class
instead, for errors that follow class confusions). A row's own label never counts as evidence for itself
(its centroids leave it out). How much each kind of evidence weighs is fitted to the labels'
likelihood with --fit-weights (the default with --zero-shot) or fixed at 1 x the prior and the
model's logit scale x the centroid cosine with --fixed-weights (the default with --prompt: a prompt
tuned on these labels has seen them, so their likelihood would flatter it). In [0, 1]; default
--threshold 0.5; the predicted class is the posterior's top class. At high noise it is the better
detector and relabeller (measured in docs/cleaning.md).

Rows scoring above --threshold are suspect; or give --keep-fraction f to keep the ceil(f x rows)
lowest-scoring rows. -o writes every row with its score, predicted class and action
(kept, relabelled, dropped, skipped); --clean-out writes the kept rows, a labels CSV with all the
original columns. --relabel keeps a suspect row under its predicted class when that class has
probability >= --relabel-confidence (is_noisy is recomputed from clean_label). Each output file
gets a provenance sidecar FILE.json; the --clean-out one carries the labels' noise sidecar
forward. With is_noisy in the labels: detection AUROC, precision, recall and the noise rate
before and after.

Examples:

    promptcli clean train.h5 noisy.csv -p gce.safetensors -o scores.csv
    promptcli clean train.h5 noisy.csv -p gce.safetensors --clean-out kept.csv
    promptcli clean train.h5 noisy.csv -p gce.safetensors --keep-fraction 0.6 --clean-out kept.csv
    promptcli clean train.h5 noisy.csv -p s1.safetensors -p s2.safetensors --relabel --json
    promptcli clean train.h5 noisy.csv --zero-shot --score posterior --relabel --clean-out fixed.csv
    promptcli tune train.h5 kept.csv -o retuned.safetensors --loss gce
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer

from promptcli.choices import NoiseModel, Score
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
from promptcli.cli._output import Output
from promptcli.io.fileio import json_text


def command(
    features: Annotated[Path, typer.Argument(help="Features file (.h5) the labels' images are in.")],
    labels: Annotated[
        str, typer.Argument(help="Labels CSV (path,label[,clean_label,is_noisy,...]); - reads stdin.")
    ],
    prompt: Annotated[
        list[Path] | None,
        typer.Option("--prompt", "-p", help="Prompt file from `promptcli tune` (repeat to ensemble)."),
    ] = None,
    zero_shot: Annotated[
        bool, typer.Option("--zero-shot", help="Class probabilities from zero-shot CLIP instead of a prompt.")
    ] = False,
    template: TemplateOpt = None,
    templates: TemplatesOpt = None,
    score: Annotated[
        Score, typer.Option("--score", help="margin, or posterior (EM under a noise model, see above).")
    ] = Score.MARGIN,
    noise_rate: Annotated[
        float | None,
        typer.Option("--noise-rate", help="Symmetric noise rate for --score posterior [default: estimated]."),
    ] = None,
    noise_model: Annotated[
        NoiseModel,
        typer.Option(
            "--noise-model",
            help="--score posterior: symmetric (one noise rate, default) or class (a noise matrix "
            "estimated per class, for errors that follow class confusions).",
        ),
    ] = NoiseModel.SYMMETRIC,
    fit_weights: Annotated[
        bool | None,
        typer.Option(
            "--fit-weights/--fixed-weights",
            help="--score posterior: fit the prior and centroid weights to the labels' likelihood, or "
            "fix them [default: fit with --zero-shot, fixed with --prompt].",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="Write every row with score, predicted class and action (- = stdout)."
        ),
    ] = None,
    clean_out: Annotated[
        str | None, typer.Option("--clean-out", help="Write the kept rows (a labels CSV) here (- = stdout).")
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", help="Rows scoring above this are suspect [default: 0; posterior 0.5]."),
    ] = None,
    keep_fraction: Annotated[
        float | None,
        typer.Option(
            "--keep-fraction", help="Keep this share of rows (lowest scores); the rest are suspect."
        ),
    ] = None,
    relabel: Annotated[
        bool, typer.Option("--relabel", help="Relabel a suspect row to its predicted class when confident.")
    ] = False,
    relabel_confidence: Annotated[
        float | None,
        typer.Option(
            "--relabel-confidence", help="Probability the predicted class needs to relabel [default: 0.5]."
        ),
    ] = None,
    skip_missing: SkipMissingOpt = False,
    pretrained: FeaturesPretrainedOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from promptcli.errors import InputError
    from promptcli.io.fileio import STDIO, check_distinct, check_output_path
    from promptcli.noise.cleaning import (
        DEFAULT_RELABEL_CONFIDENCE,
        check_selection,
        clean_labels,
        require_prior,
    )
    from promptcli.noise.label_posterior import FIT_GRID_SIZE

    check_selection(threshold, keep_fraction, score)
    require_prior(prompt or [], zero_shot)
    if (template or templates) and not zero_shot:
        raise InputError(
            "applies only with --zero-shot",
            where="--template" if template else "--templates",
            hint="a prompt file brings its own prompt; add --zero-shot to score with zero-shot templates",
        )
    if relabel_confidence is not None and not relabel:
        raise InputError(
            "--relabel-confidence applies with --relabel", where="--relabel-confidence", hint="add --relabel"
        )
    to_stdout = [o for o, v in (("-o", output), ("--clean-out", clean_out)) if v == STDIO]
    if len(to_stdout) > 1 or (to_stdout and json_out):
        raise InputError(
            "only one of -o -, --clean-out - and --json can use stdout",
            where="/".join(to_stdout + (["--json"] if json_out else [])),
            hint="write the others to files",
        )
    for path, option in ((output, "-o"), (clean_out, "--clean-out")):
        if path is not None and path != STDIO:
            check_output_path(path, force, option=option)
            check_output_path(f"{path}.json", force, option=option)
    if output is not None and output == clean_out:
        raise InputError("-o and --clean-out name the same file", where=output, hint="give two file names")
    sides = {f"{o} sidecar": f"{v}.json" for o, v in (("-o", output), ("--clean-out", clean_out)) if v}
    sides = {k: v for k, v in sides.items() if v != f"{STDIO}.json"}
    check_distinct({"FEATURES": features, "LABELS": labels}, {"-o": output, "--clean-out": clean_out, **sides})
    out = Output(quiet=quiet, json_mode=json_out, stdout_is_data=bool(to_stdout))

    with ExitStack() as stack:
        bars: list = []

        def fit_step() -> None:  # the bar starts with the fit, not while the model loads
            if not bars:
                bars.append(stack.enter_context(out.progress("fit evidence weights", FIT_GRID_SIZE, "fits")))
            bars[0].advance()

        result = clean_labels(
            features,
            labels,
            prompt or [],
            zero_shot=zero_shot,
            templates=template,
            template_set=templates,
            score=score,
            noise_rate=noise_rate,
            fit_weights=fit_weights,
            noise_model=noise_model,
            threshold=threshold,
            keep_fraction=keep_fraction,
            relabel=relabel,
            relabel_confidence=DEFAULT_RELABEL_CONFIDENCE
            if relabel_confidence is None
            else relabel_confidence,
            skip_missing=skip_missing,
            pretrained=pretrained,
            device=device,
            on_fit_step=fit_step,
        )
    summary = result.summary
    summary["output"] = output
    summary["clean_out"] = clean_out
    write_outputs(result, output, clean_out, labels)

    counts, detection = summary["counts"], summary["detection"]
    if counts["skipped"]:
        out.warn(f"skipped {counts['skipped']} label row(s) whose path or class the features lack")
    out.table(
        "Cleaning",
        ["rows in", "scored", "suspect", "kept", "relabelled", "dropped", "skipped"],
        [[counts[k] for k in ("rows_in", "scored", "suspect", "kept", "relabelled", "dropped", "skipped")]],
    )
    if detection and "n_noisy" in detection:
        out.info(
            f"Detection of noisy labels: AUROC {_num(detection['auroc'])}, precision "
            f"{_num(detection['precision'])}, recall {_num(detection['recall'])}; noise rate "
            f"{_num(detection['noise_rate_before'])} -> {_num(detection['noise_rate_after'])}"
        )
    model = summary["noise_model"]
    if model:
        how = "estimated" if model["rate_estimated"] else "given"
        out.info(
            f"Noise model: {model['kind']}, rate {model['noise_rate']:.4f} ({how}), {model['rounds']} EM rounds; "
            f"evidence weights ({model['weights']}): prior {model['prior_weight']:g}, "
            f"centroids {model['centroid_scale']:g}"
        )
    if model and model.get("top_confusions"):
        pairs = ", ".join(f"{c['true']} -> {c['given']} {c['p']:.2f}" for c in model["top_confusions"][:3])
        out.info(f"Likeliest label errors (true -> given, P): {pairs}")
    if detection and "relabel_accuracy" in detection:
        out.info(f"Relabelled rows now matching clean_label: {detection['relabel_accuracy']:.4f}")
    written = [p for p in (output, clean_out) if p is not None and p != STDIO]
    out.info(
        f"{counts['rows_in']} rows in: kept {counts['kept']} ({counts['relabelled']} relabelled), "
        f"dropped {counts['dropped']}, skipped {counts['skipped']}"
        + (f"; wrote {', '.join(written)} (+ .json sidecars)" if written else "")
    )
    out.result(summary)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_outputs(result, output: str | None, clean_out: str | None, labels_path: str) -> None:
    """The scores CSV, the cleaned labels CSV and their provenance sidecars."""
    from promptcli.io.fileio import STDIO
    from promptcli.io.labels import write_labels
    from promptcli.io.sidecar import write_sidecar
    from promptcli.noise.cleaning import clean_sidecar

    if output is not None:
        write_labels(output, result.score_columns, result.score_rows)
        if output != STDIO:
            write_sidecar(output, result.summary)
    if clean_out is not None:
        write_labels(clean_out, result.clean_columns, result.clean_rows)
        if clean_out != STDIO:
            write_sidecar(clean_out, clean_sidecar(result.summary, labels_path))


def _json(data: dict) -> str:
    return json_text(data)
