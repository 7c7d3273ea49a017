"""Zero-shot pseudo-labels: CLIP predictions on a features file and the rules that select among them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from promptcli.choices import PseudoLabelMethod
from promptcli.errors import InputError, warn_user
from promptcli.io.checks import check_seed
from promptcli.models.loading import LoadedModel, check_embed_dim
from promptcli.models.zeroshot import class_text_embeddings, logit_scale, zero_shot_logits

if TYPE_CHECKING:
    from promptcli.io.features import FeatureIndex


@dataclass
class Predictions:
    """Zero-shot predictions, one per image."""

    labels: np.ndarray  # (N,) int64 argmax class
    confidence: np.ndarray  # (N,) float64 softmax probability of that class


@torch.no_grad()
def predict(features: np.ndarray, weights: torch.Tensor, scale: float, batch_size: int = 8192) -> Predictions:
    """Softmax over ``scale`` x cosine similarity to the class weights (in batches, keeping only the argmax)."""
    labels, confidence = [], []
    for start in range(0, len(features), batch_size):
        block = np.asarray(features[start : start + batch_size], dtype=np.float32)
        feats = torch.as_tensor(block, device=weights.device)
        probs = torch.softmax(zero_shot_logits(feats, weights.float(), scale).double(), dim=-1)
        conf, label = probs.max(dim=-1)
        labels.append(label.cpu().numpy().astype(np.int64))
        confidence.append(conf.cpu().numpy())
    if not labels:
        return Predictions(np.zeros(0, dtype=np.int64), np.zeros(0))
    return Predictions(np.concatenate(labels), np.concatenate(confidence))


def zero_shot_predict(
    loaded: LoadedModel,
    features: np.ndarray,
    classnames: Sequence[str],
    templates: Sequence[str] | None = None,
) -> Predictions:
    """Zero-shot CLIP on image features: prompt ensembles averaged, logits scaled by the model's scale."""
    check_embed_dim(loaded, features.shape[1])
    weights = class_text_embeddings(loaded, classnames, templates)
    return predict(features, weights, logit_scale(loaded))


def zero_shot_predict_file(
    loaded: LoadedModel,
    index: FeatureIndex,
    classnames: Sequence[str],
    templates: Sequence[str] | None = None,
    batch_size: int = 8192,
) -> Predictions:
    """:func:`zero_shot_predict` on a features file's rows, read a block at a time: the blocks are multiples of
    ``batch_size`` (the last up to twice it), so :func:`predict` sees the same batches as on the whole file."""
    from promptcli.io.features import iter_blocks, row_blocks

    check_embed_dim(loaded, index.dim)
    weights = class_text_embeddings(loaded, classnames, templates)
    scale = logit_scale(loaded)
    parts = [
        predict(rows, weights, scale, batch_size)
        for _, rows in iter_blocks(index.path, row_blocks(len(index), batch_size), index.stamp)
    ]
    if not parts:
        return predict(np.zeros((0, index.dim), dtype=np.float32), weights, scale, batch_size)
    return Predictions(
        np.concatenate([p.labels for p in parts]), np.concatenate([p.confidence for p in parts])
    )


def text_similarity(
    loaded: LoadedModel, classnames: Sequence[str], templates: Sequence[str] | None = None
) -> np.ndarray:
    """(C, C) cosine similarity between the class prompt embeddings."""
    weights = class_text_embeddings(loaded, classnames, templates)
    return (weights @ weights.t()).double().cpu().numpy()


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts: rows the true class, columns the predicted one (rows with truth < 0 ignored)."""
    keep = truth >= 0
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (truth[keep], pred[keep]), 1)
    return out


def select(
    pred: np.ndarray,
    confidence: np.ndarray,
    n_classes: int,
    top_k: int | None = None,
    random_k: int | None = None,
    min_confidence: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Rows to keep, ascending. ``min_confidence`` filters first; then per predicted class either the
    ``top_k`` most confident (UPL; ties by row order) or ``random_k`` at random (seeded); a class with
    fewer candidates keeps them all. No rule keeps every row."""
    check_seed(seed)
    if top_k is not None and random_k is not None:
        raise InputError("--top-k and --random-k exclude each other", where="--random-k", hint="choose one")
    for name, k in (("--top-k", top_k), ("--random-k", random_k)):
        if k is not None and k < 1:
            raise InputError(f"{name} must be at least 1, got {k}", where=name, hint="e.g. 16")
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise InputError(
            f"--min-confidence must be in [0, 1], got {min_confidence:g}",
            where="--min-confidence",
            hint="e.g. 0.5",
        )
    pred = np.asarray(pred, dtype=np.int64)
    confidence = np.asarray(confidence, dtype=np.float64)
    candidates = np.arange(len(pred))
    if min_confidence is not None:
        candidates = candidates[confidence >= min_confidence]
    if top_k is None and random_k is None:
        return candidates
    rng = np.random.default_rng(seed)
    kept = []
    for c in range(n_classes):
        rows = candidates[pred[candidates] == c]
        if top_k is not None:
            rows = rows[np.argsort(-confidence[rows], kind="stable")][:top_k]
        elif len(rows) > random_k:
            rows = rng.choice(rows, size=random_k, replace=False)
        kept.append(rows)
    return np.sort(np.concatenate(kept)) if kept else candidates[:0]


def summary(
    pred: np.ndarray, truth: np.ndarray, kept: np.ndarray, classnames: Sequence[str]
) -> dict[str, object]:
    """Counts and accuracies before and after selection (accuracy only over rows with truth >= 0)."""
    known = truth >= 0

    def accuracy(rows: np.ndarray) -> float | None:
        rows = rows[known[rows]]
        return float((pred[rows] == truth[rows]).mean()) if len(rows) else None

    every = np.arange(len(pred))
    per_class = {}
    for c, name in enumerate(classnames):
        rows = kept[pred[kept] == c]
        per_class[name] = {
            "predicted": int((pred == c).sum()),
            "kept": int(len(rows)),
            "kept_accuracy": accuracy(rows),
        }
    return {
        "n_images": int(len(pred)),
        "n_with_truth": int(known.sum()),
        "n_kept": int(len(kept)),
        "zero_shot_accuracy": accuracy(every),
        "pseudo_label_accuracy": accuracy(kept),
        "per_class": per_class,
    }


@dataclass
class PseudolabelOptions:
    """What ``promptcli pseudolabel`` takes besides its input and output."""

    template: list[str] | None = None
    templates: str | None = None
    classnames: Path | None = None
    top_k: int | None = None
    random_k: int | None = None
    min_confidence: float | None = None
    seed: int = 0
    pretrained: str | None = None
    device: str = "auto"
    method: str = "zero-shot"  # or "transductive" (promptcli.noise.transductive)
    labels: Path | None = None  # transductive only: given (possibly noisy) labels for some images
    trusted: Path | None = None  # transductive only: verified labels, which outvote and replace given ones
    skip_missing: bool = False  # --labels rows whose path or class the features lack are skipped


def _output_rows(
    paths: list[str], pred: Predictions, truth: np.ndarray | None, kept: np.ndarray, names: list[str]
) -> Iterator[dict[str, object]]:
    """The output CSV's rows, one per kept image (made as they are written: a million dicts take 1 GB)."""
    for i in kept:
        row: dict[str, object] = {
            "path": paths[i],
            "label": names[pred.labels[i]],
            "confidence": f"{pred.confidence[i]:.6f}",
        }
        if truth is not None:
            row["clean_label"] = names[truth[i]]
            row["is_noisy"] = int(pred.labels[i] != truth[i])
        yield row


def check_prompt_order(prompt_names: list[str], label_names: list[str], where: str | Path) -> None:
    """Refuse ``--classnames`` that name a class of the features at another position: the names are taken by
    position, so a list in another order would label every image with the wrong class."""
    from promptcli.errors import InputError
    from promptcli.io.checks import prompt_key

    position = {prompt_key(name): j for j, name in enumerate(label_names)}
    for i, name in enumerate(prompt_names):
        j = position.get(prompt_key(name), i)
        if j != i:
            raise InputError(
                f"line {i + 1} names {name!r}, class {j + 1} of the features; line {i + 1} stands for class "
                f"{i + 1}, {label_names[i]!r}",
                where=where,
                hint="list the names in the features file's class order (its classes are: "
                + ", ".join(label_names[:10])
                + (", ..." if len(label_names) > 10 else "")
                + ")",
            )


def pseudolabel_file(
    features: Path,
    output: str,
    options: PseudolabelOptions,
    *,
    force: bool = False,
    json_out: bool = False,
    info: Callable[[str], None] = lambda _: None,
    warn: Callable[[str], None] = warn_user,
    on_fit_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Pseudo-labels of a features file (zero-shot, or ``--method transductive``), selected, written as a
    labels CSV (+ sidecar). ``on_fit_step(stage)`` is told each step of the transductive fit as it starts,
    then "done" (:func:`promptcli.noise.transductive.fit_steps`).

    Returns the summary (the sidecar's record) with ``n_images`` and ``n_kept`` added.
    """
    from promptcli.errors import InputError
    from promptcli.io.features import read_feature_index, read_features
    from promptcli.io.fileio import (
        STDIO,
        check_distinct,
        check_input_file,
        check_output_path,
        same_file,
        sha256_file,
    )
    from promptcli.io.image_sources import read_classnames
    from promptcli.io.labels import write_labels
    from promptcli.io.provenance import base_provenance
    from promptcli.io.sidecar import write_sidecar
    from promptcli.models.loading import load_model_from_record
    from promptcli.models.zeroshot import resolve_templates

    o = options
    template, templates, classnames = o.template, o.templates, o.classnames
    top_k, random_k, min_confidence, seed = o.top_k, o.random_k, o.min_confidence, o.seed
    pretrained, device = o.pretrained, o.device
    to_stdout = output == STDIO
    if to_stdout and json_out:
        raise InputError(
            "-o - and --json both write to stdout",
            where="--json",
            hint="write the CSV to a file, or drop --json",
        )
    # Validate the selection options before loading anything.
    select(np.zeros(0, dtype=np.int64), np.zeros(0), 0, top_k, random_k, min_confidence, seed)
    method = PseudoLabelMethod.check(o.method, "--method")
    if o.labels is not None and method != PseudoLabelMethod.TRANSDUCTIVE.value:
        raise InputError(
            "--labels applies only with --method transductive",
            where="--labels",
            hint="add --method transductive, or drop --labels",
        )
    if o.trusted is not None and method != PseudoLabelMethod.TRANSDUCTIVE.value:
        raise InputError(
            "--trusted applies only with --method transductive",
            where="--trusted",
            hint="add --method transductive, or drop --trusted",
        )
    if o.skip_missing and o.labels is None and o.trusted is None:
        raise InputError(
            "--skip-missing applies only to --labels and --trusted rows",
            where="--skip-missing",
            hint="add --method transductive --labels FILE, or drop --skip-missing",
        )
    if o.labels is not None and o.trusted is not None and same_file(o.labels, o.trusted):
        raise InputError(
            "--labels and --trusted name the same file",
            where="--trusted",
            hint="give the verified labels their own file (a few rows you checked)",
        )
    prompts = resolve_templates(template, templates)
    sidecar = None if to_stdout else Path(f"{output}.json")
    check_distinct(
        {"FEATURES": features, "--classnames": classnames, "--labels": o.labels, "--trusted": o.trusted},
        {"-o": output, "the sidecar": sidecar},
    )
    if sidecar is not None:
        check_output_path(output, force)
        check_output_path(sidecar, force)

    for option, path in (("--labels", o.labels), ("--trusted", o.trusted)):
        if path is not None and str(path) != STDIO:  # before the model loads
            check_input_file(path, "labels file", f"check the {option} path")
    transductive = method == PseudoLabelMethod.TRANSDUCTIVE.value
    # zero-shot reads the feature values a block at a time, as it predicts; the transductive fit needs them all
    fs = read_features(features, load_views=False) if transductive else read_feature_index(features)
    if not len(fs):  # before the model loads; there is nothing to label
        raise InputError("the features file has no images", where=features, hint="extract a folder of images")
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
    if classnames:
        check_prompt_order(prompt_names, label_names, classnames)
    if len(label_names) < 2:
        raise InputError(
            f"zero-shot classification needs at least 2 classes, got {len(label_names)}",
            where=classnames or features,
            hint="give the class names with --classnames",
        )

    loaded = load_model_from_record(
        fs.attrs, source=features, pretrained=pretrained, device=device, dim=fs.dim
    )
    info(
        f"{'Transductive fit over' if transductive else 'Zero-shot'} {len(fs)} images, {len(label_names)} classes, "
        f"{len(prompts)} template(s)"
    )
    fit = None
    if transductive:
        from promptcli.noise.transductive import transductive_fit, unchecked_warning

        pred, zero_shot, fit = transductive_fit(
            loaded,
            fs,
            prompt_names,
            prompts,
            o.labels,
            trusted_path=o.trusted,
            skip_missing=o.skip_missing,
            on_step=on_fit_step,
        )
        for key in ("labels", "trusted"):
            if fit.get(key, {}).get("skipped"):
                warn(f"skipped {fit[key]['skipped']} --{key} row(s) whose path or class the features lack")
        unchecked = unchecked_warning(fit)
        if unchecked:
            warn(unchecked)
    else:
        pred = zero_shot_predict_file(loaded, fs, prompt_names, prompts)
    kept = select(pred.labels, pred.confidence, len(label_names), top_k, random_k, min_confidence, seed)
    if not len(kept):  # an empty labels file would only fail later, in tune
        raise InputError(
            f"no image has a confidence of {min_confidence:.10g} or more",
            where="--min-confidence",
            hint=f"lower it (the highest confidence is {float(pred.confidence.max()):.4f})",
        )
    truth = fs.labels
    stats = summary(pred.labels, truth, kept, label_names)
    if fit is not None:  # summary's zero_shot_accuracy measured the transductive labels: say so
        stats["transductive_accuracy"] = stats["zero_shot_accuracy"]
        stats["zero_shot_accuracy"] = summary(zero_shot, truth, kept[:0], label_names)["zero_shot_accuracy"]

    # clean_label/is_noisy only when every kept row has ground truth: `tune` joins them by class name.
    has_truth = bool(len(kept)) and bool((truth[kept] >= 0).all())
    if fs.has_labels and not has_truth and len(kept):
        warn("some kept images have no ground-truth label: the output has no clean_label/is_noisy columns")
    columns = ["path", "label", "confidence"] + (["clean_label", "is_noisy"] if has_truth else [])
    rows = _output_rows(fs.paths, pred, truth if has_truth else None, kept, label_names)

    result = {
        **base_provenance(),
        "features": {"path": str(features), "sha256": sha256_file(features)},
        "output": output,
        "model": loaded.identity(),
        "templates": prompts,
        "classes": label_names,
        "prompt_classnames": prompt_names,
        # the seed draws --random-k's images and nothing else (the transductive fit is deterministic): None without
        "selection": {
            "top_k": top_k,
            "random_k": random_k,
            "min_confidence": min_confidence,
            "seed": seed if random_k is not None else None,
        },
        "method": method,
        **({"transductive": fit} if fit is not None else {}),
        **stats,
    }
    write_labels(output, columns, rows)
    if sidecar is not None:
        result = write_sidecar(output, result)  # + the CSV's SHA-256: readers check it

    return {**result, "n_images": len(fs), "n_kept": int(len(kept))}
