"""Pseudo-label a features file with zero-shot CLIP and select the labels to train on.

Text embeddings come from the model the features were extracted with (rebuilt from the file's
attributes; --pretrained gives its checkpoint's new location). Several --template options average
their normalised embeddings; --templates imagenet is CLIP's 80-prompt ensemble. The output is a
labels CSV (`path,label,confidence`, plus `clean_label,is_noisy` when the features carry ground
truth) with a sidecar OUTPUT.json recording the model, features hash, templates and selection.

Selection per predicted class: --top-k K (the K most confident, UPL), --random-k K (K at
random), and/or --min-confidence P; none of them keeps every image.

Examples:

    promptcli pseudolabel train.h5 -o pseudo.csv
    promptcli pseudolabel train.h5 --top-k 16 --templates imagenet -o pseudo16.csv --json
    promptcli pseudolabel unlabelled.h5 --classnames classes.txt --min-confidence 0.5 -o - | head
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from promptcli.cli._options import (
    DeviceOpt,
    FeaturesPretrainedOpt,
    ForceOpt,
    JsonOpt,
    QuietOpt,
    SeedOpt,
    TemplateOpt,
    TemplatesOpt,
)
from promptcli.cli._output import Output
from promptcli.errors import InputError
from promptcli.io.fileio import STDIO, check_output_path, sha256_file, write_text_atomic


def command(
    features: Annotated[Path, typer.Argument(help="Features file (.h5) from `promptcli extract`.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Pseudo-labels CSV to write (- for stdout).")],
    template: TemplateOpt = None,
    templates: TemplatesOpt = None,
    classnames: Annotated[
        Path | None,
        typer.Option(
            "--classnames", help="Class names for the prompts, one per line, in the features' class order."
        ),
    ] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Keep the K most confident per class.")] = None,
    random_k: Annotated[
        int | None, typer.Option("--random-k", help="Keep K random images per class.")
    ] = None,
    min_confidence: Annotated[
        float | None, typer.Option("--min-confidence", help="Keep images whose confidence is at least P.")
    ] = None,
    seed: SeedOpt = 0,
    pretrained: FeaturesPretrainedOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from promptcli.io.features import read_features
    from promptcli.io.image_sources import read_classnames
    from promptcli.io.labels import write_labels
    from promptcli.io.provenance import base_provenance
    from promptcli.models.loading import load_model_from_record
    from promptcli.models.zeroshot import resolve_templates
    from promptcli.noise import pseudolabels

    to_stdout = output == STDIO
    out = Output(quiet=quiet, json_mode=json_out, stdout_is_data=True)
    if to_stdout and json_out:
        raise InputError(
            "-o - and --json both write to stdout",
            where="--json",
            hint="write the CSV to a file, or drop --json",
        )
    # Validate the selection options before loading anything.
    pseudolabels.select(np.zeros(0, dtype=np.int64), np.zeros(0), 0, top_k, random_k, min_confidence, seed)
    prompts = resolve_templates(template, templates)
    sidecar = None if to_stdout else Path(f"{output}.json")
    if sidecar is not None:
        check_output_path(output, force)
        check_output_path(sidecar, force)

    fs = read_features(features, load_views=False)
    label_names = list(fs.classnames)
    prompt_names = read_classnames(classnames) if classnames else label_names
    if not label_names:
        label_names = prompt_names
    if len(prompt_names) != len(label_names):
        raise InputError(
            f"{len(prompt_names)} class names for the {len(label_names)} classes of {features}",
            where=classnames,
            hint="give one name per class, in the features file's class order",
        )
    if len(label_names) < 2:
        raise InputError(
            f"zero-shot classification needs at least 2 classes, got {len(label_names)}",
            where=classnames or features,
            hint="give the class names with --classnames",
        )

    loaded = load_model_from_record(fs.attrs, source=features, pretrained=pretrained, device=device)
    pseudolabels.check_dim(loaded, fs.features, where=features)
    out.info(f"Zero-shot {len(fs)} images over {len(label_names)} classes, {len(prompts)} template(s)")
    pred = pseudolabels.zero_shot_predict(loaded, fs.features, prompt_names, prompts)
    kept = pseudolabels.select(
        pred.labels, pred.confidence, len(label_names), top_k, random_k, min_confidence, seed
    )
    truth = fs.labels
    stats = pseudolabels.summary(pred.labels, truth, kept, label_names)

    # clean_label/is_noisy only when every kept row has ground truth: `tune` joins them by class name.
    has_truth = bool(len(kept)) and bool((truth[kept] >= 0).all())
    if fs.has_labels and not has_truth and len(kept):
        out.warn(
            "some kept images have no ground-truth label: the output has no clean_label/is_noisy columns"
        )
    columns = ["path", "label", "confidence"] + (["clean_label", "is_noisy"] if has_truth else [])
    rows = []
    for i in kept:
        row: dict[str, object] = {
            "path": fs.paths[i],
            "label": label_names[pred.labels[i]],
            "confidence": f"{pred.confidence[i]:.6f}",
        }
        if has_truth:
            row["clean_label"] = label_names[truth[i]]
            row["is_noisy"] = int(pred.labels[i] != truth[i])
        rows.append(row)

    result = {
        **base_provenance(),
        "features": {"path": str(features), "sha256": sha256_file(features)},
        "output": output,
        "model": loaded.identity(),
        "templates": prompts,
        "classes": label_names,
        "prompt_classnames": prompt_names,
        "selection": {"top_k": top_k, "random_k": random_k, "min_confidence": min_confidence, "seed": seed},
        **stats,
    }
    write_labels(output, columns, rows)
    if sidecar is not None:
        write_text_atomic(sidecar, json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    out.table(
        "Pseudo-labels per predicted class",
        ["class", "predicted", "kept", "kept accuracy"],
        [[n, v["predicted"], v["kept"], pct(v["kept_accuracy"])] for n, v in stats["per_class"].items()],
    )
    if fs.has_labels:
        out.info(
            f"Zero-shot accuracy {pct(stats['zero_shot_accuracy'])} on {stats['n_with_truth']} labelled images; "
            f"pseudo-label accuracy after selection {pct(stats['pseudo_label_accuracy'])}"
        )
    out.info(
        f"Kept {len(kept)} of {len(fs)} images" + ("" if to_stdout else f"; wrote {output} and {sidecar}")
    )
    out.result(result)
