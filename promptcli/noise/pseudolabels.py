"""Zero-shot pseudo-labels: CLIP predictions on a features file and the rules that select among them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from promptcli.errors import InputError
from promptcli.models.loading import LoadedModel
from promptcli.models.zeroshot import class_text_embeddings, logit_scale, zero_shot_logits


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
    check_dim(loaded, features)
    weights = class_text_embeddings(loaded, classnames, templates)
    return predict(features, weights, logit_scale(loaded))


def check_dim(loaded: LoadedModel, features: np.ndarray, where: str | None = None) -> None:
    if features.shape[1] != loaded.embed_dim:
        raise InputError(
            f"features have dimension {features.shape[1]} but the model embeds text in {loaded.embed_dim}",
            where=where,
            hint="use the model the features were extracted with",
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
