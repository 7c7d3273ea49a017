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

from promptcli.choices import NoiseModel, Score, TemplateSet
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
    from promptcli.noise.cleaning import CleanOptions, clean_file
    from promptcli.noise.label_posterior import FIT_GRID_SIZE

    options = CleanOptions(
        prompts=list(prompt or []),
        zero_shot=zero_shot,
        templates=template,
        template_set=TemplateSet.plain(templates),
        score=str(score),
        noise_rate=noise_rate,
        fit_weights=fit_weights,
        noise_model=str(noise_model),
        threshold=threshold,
        keep_fraction=keep_fraction,
        relabel=relabel,
        relabel_confidence=relabel_confidence,
        skip_missing=skip_missing,
        pretrained=pretrained,
        device=device,
    )
    to_stdout = "-" in (output, clean_out)
    out = Output(quiet=quiet, json_mode=json_out, stdout_is_data=to_stdout)

    with ExitStack() as stack:
        bars: list = []

        def fit_step() -> None:  # the bar starts with the fit, not while the model loads
            if not bars:
                bars.append(stack.enter_context(out.progress("fit evidence weights", FIT_GRID_SIZE, "fits")))
            bars[0].advance()

        result = clean_file(
            features,
            labels,
            options,
            output=output,
            clean_out=clean_out,
            json_out=json_out,
            force=force,
            on_fit_step=fit_step,
        )
    summary = result.summary

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
        out.info(f"Relabelled rows now matching clean_label: {pct(detection['relabel_accuracy'])}")
    written = [p for p in (output, clean_out) if p is not None and p != "-"]
    out.info(
        f"{counts['rows_in']} rows in: kept {counts['kept']} ({counts['relabelled']} relabelled), "
        f"dropped {counts['dropped']}, skipped {counts['skipped']}"
        + (f"; wrote {', '.join(written)} (+ .json sidecars)" if written else "")
    )
    out.result(summary)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
