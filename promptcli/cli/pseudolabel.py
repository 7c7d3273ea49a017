"""Pseudo-label a features file with zero-shot CLIP and select the labels to train on.

Text embeddings come from the model the features were extracted with (rebuilt from the file's
attributes; --pretrained gives its checkpoint's new location). Several --template options average
their normalised embeddings; --templates imagenet is CLIP's 80-prompt ensemble. The output is a
labels CSV (`path,label,confidence`, plus `clean_label,is_noisy` when the features carry ground
truth) with a sidecar OUTPUT.json recording the model, features hash, templates and selection.

Selection per predicted class: --top-k K (the K most confident, UPL), --random-k K (K at
random), and/or --min-confidence P; none of them keeps every image. --seed seeds --random-k's draw
only (the sidecar records it only then).

--method transductive labels every image by a mixture model over the whole file (the zero-shot
prior plus the images' own class clusters; docs/cleaning.md). --labels NOISY.csv adds given,
possibly noisy, labels for some of the images: they name the clusters (on the demo this beats
`clean` and tuning on the few labelled rows at 50% and 75% noise). --trusted VERIFIED.csv adds
labels you checked (a few images, any classes): each counts as two given labels when the
clusters are named, replaces the given label of its image, and keeps its own class. Without it, a fit
that estimates a noise rate of 0.65 or more suggests checking one given label in eight.

Examples:

    promptcli pseudolabel train.h5 -o pseudo.csv
    promptcli pseudolabel train.h5 --top-k 16 --templates imagenet -o pseudo16.csv --json
    promptcli pseudolabel unlabelled.h5 --classnames classes.txt --min-confidence 0.5 -o - | head
    promptcli pseudolabel train.h5 --method transductive -o transductive.csv
    promptcli pseudolabel train.h5 --method transductive --labels noisy16.csv -o named.csv
    promptcli pseudolabel train.h5 --method transductive --labels noisy16.csv --trusted checked.csv -o named.csv
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer

from promptcli.choices import PseudoLabelMethod, TemplateSet
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
    features: Annotated[
        Path, typer.Argument(help="Features file (.h5) from `promptcli extract`.", metavar="FEATURES")
    ],
    output: Annotated[
        str, typer.Option("--output", "-o", help="Pseudo-labels CSV to write; - (default) for stdout.")
    ] = "-",
    template: TemplateOpt = None,
    templates: TemplatesOpt = None,
    classnames: Annotated[
        Path | None,
        typer.Option(
            "--classnames",
            help="Class names for the prompts, one per line, in the features' class order (a features class named at another position is refused).",
        ),
    ] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Keep the K most confident per class.")] = None,
    random_k: Annotated[
        int | None, typer.Option("--random-k", help="Keep K random images per class.")
    ] = None,
    min_confidence: Annotated[
        float | None, typer.Option("--min-confidence", help="Keep images whose confidence is at least P.")
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            help="Seed of --random-k's draw (its only use: the transductive fit is deterministic).",
        ),
    ] = 0,
    method: Annotated[
        PseudoLabelMethod,
        typer.Option(
            "--method",
            help="zero-shot (each image's own prediction) or transductive (a mixture model over all images).",
        ),
    ] = PseudoLabelMethod.ZERO_SHOT,
    labels: Annotated[
        Path | None,
        typer.Option("--labels", help="--method transductive: labels (possibly noisy) for some images."),
    ] = None,
    trusted: Annotated[
        Path | None,
        typer.Option(
            "--trusted", help="--method transductive: labels you verified (path,label), for a few images."
        ),
    ] = None,
    skip_missing: SkipMissingOpt = False,
    pretrained: FeaturesPretrainedOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from promptcli.noise.pseudolabels import PseudolabelOptions, pseudolabel_file
    from promptcli.noise.transductive import fit_steps

    out = Output(quiet=quiet, json_mode=json_out, stdout_is_data=True)
    options = PseudolabelOptions(
        template=template,
        templates=TemplateSet.plain(templates),
        classnames=classnames,
        top_k=top_k,
        random_k=random_k,
        min_confidence=min_confidence,
        seed=seed,
        pretrained=pretrained,
        device=device,
        method=str(method),
        labels=labels,
        trusted=trusted,
        skip_missing=skip_missing,
    )
    with ExitStack() as stack:
        bars: list = []

        def fit_step(stage: str) -> None:  # the bar starts with the fit, not while the model loads
            if bars:
                bars[0].advance()  # the previous step is done
            else:
                bars.append(stack.enter_context(out.progress("transductive fit", fit_steps(), "steps")))
            if stage != "done":
                bars[0].describe(f"transductive fit: {stage}")

        result = pseudolabel_file(
            features,
            output,
            options,
            force=force,
            json_out=json_out,
            info=out.info,
            warn=out.warn,
            on_fit_step=fit_step,
        )
    stats = result

    out.table(
        "Pseudo-labels per predicted class",
        ["class", "predicted", "kept", "kept accuracy"],
        [[n, v["predicted"], v["kept"], pct(v["kept_accuracy"])] for n, v in stats["per_class"].items()],
    )
    if stats["n_with_truth"]:
        out.info(
            f"Zero-shot accuracy {pct(stats['zero_shot_accuracy'])} on {stats['n_with_truth']} labelled images; "
            f"pseudo-label accuracy after selection {pct(stats['pseudo_label_accuracy'])}"
        )
    if "transductive" in result:
        out.info(transductive_line(result["transductive"], result["classes"]))
        advice = checks_advice(result["transductive"])
        if advice:
            out.info(advice)
    out.info(
        f"Kept {result['n_kept']} of {result['n_images']} images"
        + ("" if output == "-" else f"; wrote {output} and {output}.json")
    )
    out.result(result)


def checks_advice(fit: dict) -> str | None:
    """A hint to check a few labels (``--trusted``) when the given labels are very noisy; None otherwise."""
    from promptcli.noise.transductive import advised_checks

    n_checks = advised_checks(fit)
    if not n_checks:
        return None
    return (
        "Hint: at this noise rate the labels named a whole cluster wrongly on a few seeds measured "
        f"(docs/cleaning.md); check {n_checks} random given labels (one in eight) and pass them with --trusted"
    )


def transductive_line(fit: dict, classes: list[str]) -> str:
    """One line on what the transductive fit did with the given labels."""
    trusted = fit.get("n_trusted", 0)
    if not fit["n_labelled"] and not trusted:
        return "No given labels: the zero-shot prior named the clusters"
    renamed = fit["renamed_clusters"]
    names = (
        "the labels renamed "
        + ", ".join(f"{classes[old]} -> {classes[new]}" for old, new in renamed)
        + " (the prior's name -> the labels')"
        if renamed
        else "the labels kept the prior's name for every cluster"
    )
    given = (
        f"{fit['n_labelled']} given labels, estimated noise rate {pct(fit['noise_rate'])} (it tends to read high)"
        if fit["n_labelled"]
        else "no given labels"
    )
    return given + (f", {trusted} trusted" if trusted else "") + f"; {names}"
