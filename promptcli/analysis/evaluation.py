"""Evaluate learned prompts (or zero-shot CLIP) on a features file: predictions and metrics.

Several prompt files form an ensemble by averaging their class probabilities. A prompt must have
been made with the features' model (checkpoint hash, else name and pretrained tag) and class list.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptcli.errors import InputError, warn_user
from promptcli.io.checks import one_or_many
from promptcli.io.features import FeatureIndex, FeatureSet
from promptcli.io.prompt_files import PromptFile
from promptcli.models.heads import (
    LinearHead,
    PromptHead,
    load_head,
    logits_predictor,
    method_needs_model,
    predict_logits,
    predict_step,
)
from promptcli.models.loading import LoadedModel, same_model

# What eval copies from a prompt's metadata into its summary (the report command reads these).
PROVENANCE_KEYS = (
    "method",
    "method_params",
    "loss",
    "loss_params",
    "seed",
    "shots",
    "noise",
    "split",
    "n_ctx",
    "class_position",
    "csc",
    "ctx_init",
    "template",
    "prompt_config",
    "use_views",
    "n_views",
    "class_chunk",
    "optimizer",
    "features_sha256",
    "labels_sha256",
    "labels_file",
    "n_train",
    "metrics",
    "promptcli_version",
    "git",
)


@dataclass
class Metrics:
    """Accuracy of predictions against ground truth (rows with truth >= 0)."""

    n: int
    top1: float
    top5: float
    top5_k: int  # 5, or the number of classes when there are fewer
    macro: float  # mean per-class accuracy over the classes present in the ground truth
    per_class: list[dict[str, Any]]  # class, n, correct, accuracy

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "top1": self.top1,
            "top5": self.top5,
            "top5_k": self.top5_k,
            "macro_accuracy": self.macro,
            "per_class": self.per_class,
        }


def compute_metrics(probs: np.ndarray, truth: np.ndarray, classnames: Sequence[str]) -> Metrics:
    """Top-1, top-5, macro and per-class accuracy of ``probs`` (N, C) on rows with ``truth >= 0``."""
    keep = truth >= 0
    probs, truth = probs[keep], truth[keep]
    check_some_truth(truth)
    return metrics_from_ranks(true_class_rank(probs, truth), truth, classnames, probs.shape[1])


def check_some_truth(truth: np.ndarray) -> None:
    if not (truth >= 0).any():
        raise InputError("no images with a ground-truth label", hint="pass --labels with the true labels")


def true_class_rank(probs: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N,) rank of each row's true class ``truth`` (all >= 0) among its ``probs`` (N, C): 0 when it is the
    argmax."""
    # counted rather than sorted (a full sort of N x C costs 25x more at 1,000 classes): the classes scoring
    # higher, plus those tied with it at a lower index (ties go to the lower index, as argmax and a stable
    # sort do)
    p_true = probs[np.arange(len(truth)), truth][:, None]
    lower = np.arange(probs.shape[1])[None, :] < truth[:, None]
    rank = (probs > p_true).sum(axis=1) + ((probs == p_true) & lower).sum(axis=1)
    # NaN compares false with everything, which would rank a NaN row's true class first: count it as missed
    return np.where(np.isfinite(probs).all(axis=1), rank, probs.shape[1])


def metrics_from_ranks(
    rank: np.ndarray, truth: np.ndarray, classnames: Sequence[str], n_classes: int
) -> Metrics:
    """The metrics of rows whose true class ``truth`` (all >= 0) ranked ``rank`` among ``n_classes``."""
    k = min(5, n_classes)
    top1 = rank == 0
    topk = rank < k
    per_class = []
    for c, name in enumerate(classnames):
        mask = truth == c
        n_c = int(mask.sum())
        if n_c:
            correct = int(top1[mask].sum())
            per_class.append({"class": name, "n": n_c, "correct": correct, "accuracy": correct / n_c})
    macro = float(np.mean([r["accuracy"] for r in per_class]))
    return Metrics(len(truth), float(top1.mean()), float(topk.mean()), k, macro, per_class)


def check_compatible(prompt: PromptFile, features: FeatureSet) -> None:
    """Refuse a prompt made for another model or another class list."""
    record = features.model_record()
    if not same_model(prompt.model_identity(), record):
        mine = prompt.model_identity()
        raise InputError(
            f"prompt was made for model {mine['model_name']} ({mine['pretrained'] or 'no weights'}, "
            f"sha256 {mine['checkpoint_sha256'][:12] or '?'}) but the features come from "
            f"{record['model_name']} ({record['pretrained'] or 'no weights'}, "
            f"sha256 {str(record['checkpoint_sha256'])[:12] or '?'})",
            where=prompt.path,
            hint="evaluate on features extracted with the prompt's model, or tune a prompt for this one",
        )
    if prompt.classnames != list(features.classnames):
        theirs, ours = prompt.classnames, list(features.classnames)
        diff = sorted(set(theirs) ^ set(ours))
        detail = f"differing: {', '.join(diff[:6])}" if diff else "same names in another order"
        raise InputError(
            f"prompt was made for {len(theirs)} classes, the features have {len(ours)} ({detail})",
            where=prompt.path,
            hint="use features whose class list matches the one the prompt was tuned on",
        )
    check_adapter(prompt, features)
    dim = int(prompt.metadata.get("embed_dim", features.dim))
    if dim != features.dim:
        raise InputError(
            f"prompt expects {dim}-dimensional features, the file has {features.dim}",
            where=prompt.path,
            hint="evaluate on features extracted with the prompt's model",
        )


def preprocess_shift(prompt: PromptFile, features: FeatureSet) -> str:
    """How the features' image preprocessing differs from the tuning features' ("" when alike or not recorded)."""
    try:
        tuned = json.loads(str(prompt.metadata.get("preprocess") or "{}"))
        here = json.loads(str(features.attrs.get("preprocess", "") or "{}"))
    except ValueError:
        return ""
    if not (isinstance(tuned, dict) and isinstance(here, dict) and tuned and here):
        return ""
    keys = sorted(k for k in set(tuned) | set(here) if tuned.get(k) != here.get(k))
    return ", ".join(f"{k} {tuned.get(k)} -> {here.get(k)}" for k in keys)


def check_adapter(prompt: PromptFile, features: FeatureSet) -> None:
    """A fine-tuned tower's head reads only features extracted through that tower, and only it does."""
    from promptcli.choices import IMAGE_METHODS
    from promptcli.io.fileio import sha256_file

    made_with = str(features.attrs.get("adapter_sha256", "") or "")
    if prompt.method in IMAGE_METHODS:  # finetune, vpt, maple: the features come through their tower
        if made_with != sha256_file(prompt.path):
            raise InputError(
                "the features were not extracted through this fine-tuned image tower",
                where=features.path,
                hint=f"run `promptcli extract IMAGES -o FEATURES.h5 --adapter {prompt.path}` and evaluate on that",
            )
    elif made_with:
        raise InputError(
            f"the features were extracted through a fine-tuned tower (adapter sha256 {made_with[:12]}); "
            f"the {prompt.method or '?'} prompt was tuned on the base model's features",
            where=prompt.path,
            hint="evaluate it on features extracted without --adapter",
        )


def head_from_prompt(prompt: PromptFile, loaded: LoadedModel | None) -> LinearHead | PromptHead:
    """Rebuild the trained head from a prompt file (prompt methods need the model)."""
    return load_head(prompt, loaded)


def prompt_logits(prompt: PromptFile, features: torch.Tensor, loaded: LoadedModel | None) -> torch.Tensor:
    """(N, C) logits of one prompt on (N, D) features."""
    head = head_from_prompt(prompt, loaded)
    head.to(features.device)
    head.eval()
    logits = predict_logits(head, features)
    bad = int((~torch.isfinite(logits).all(dim=1)).sum())
    if bad:
        raise InputError(
            f"the prompt gives non-finite logits (NaN or inf) on {bad} of {len(logits)} images",
            where=prompt.path,
            hint="tune it again with other options (its values overflow)",
        )
    return logits


def zero_shot_class_logits(
    loaded: LoadedModel, classnames: Sequence[str], templates: Sequence[str], features: torch.Tensor
) -> torch.Tensor:
    """Zero-shot CLIP logits (templates ensembled as in ``pseudolabel``)."""
    return zero_shot_member(loaded, classnames, templates, features.device).logits(features)


def ensemble_probabilities(logits: Sequence[torch.Tensor]) -> np.ndarray:
    """Mean of the members' softmax probabilities (float64)."""
    probs = [torch.softmax(x.double(), dim=-1).cpu().numpy() for x in logits]
    return np.mean(probs, axis=0)


def ground_truth_from_features(features: FeatureSet) -> np.ndarray:
    return features.labels.astype(np.int64)


def _differs_from_clean(row: dict[str, str]) -> bool:
    """Whether a labels row has a ``clean_label`` that differs from its ``label`` (a noisy file whose
    ``is_noisy`` column was dropped or left blank still says so)."""
    clean = (row.get("clean_label") or "").strip()
    return clean != "" and clean != (row.get("label") or "").strip()


def check_ground_truth(table: Any, labels_path: str | Path) -> None:
    """Refuse ``--labels`` that say they are not ground truth: rows marked ``is_noisy`` or whose ``clean_label``
    differs from ``label``, or a sidecar of ``corrupt`` (rate > 0), ``pseudolabel`` or ``clean``. Scored against
    them, the accuracy is silently wrong."""
    from promptcli.io.sidecar import noise_summary, read_noise_sidecar

    hint = (
        "score against clean labels: drop --labels to use the features' own, or give a file of true classes"
    )
    for reason, test in (
        ("are marked is_noisy", lambda row: row.get("is_noisy") == "1"),
        ("have a label that differs from their clean_label", _differs_from_clean),
    ):
        noisy = sum(test(row) for row in table.rows)
        if noisy:
            raise InputError(
                f"{noisy} of its {len(table.rows)} rows {reason}: noisy labels, not ground truth",
                where=labels_path,
                hint=hint,
            )
    if str(labels_path) == "-":
        return
    noise = noise_summary(read_noise_sidecar(labels_path, lambda _: None)) or {}
    made = {"pseudo": "pseudolabel", "transductive": "pseudolabel", "cleaned": "clean"}.get(
        noise.get("labels", "")
    )
    if made is None and float(noise.get("rate") or 0.0) > 0.0:
        made = f"corrupt (rate {noise['rate']})"
    if made is not None:
        raise InputError(f"written by `promptcli {made}`: not ground truth", where=labels_path, hint=hint)


def ground_truth_from_labels(
    features: FeatureSet, table: Any, skip_missing: bool = False
) -> tuple[np.ndarray, int]:
    """(N,) class index per feature row from a labels table's ``label`` column (-1 where absent)."""
    from promptcli.io.labels import join_labels

    joined = join_labels(features, table, skip_missing=skip_missing)
    truth = np.full(len(features), -1, dtype=np.int64)
    truth[joined.rows] = joined.labels
    return truth, joined.n_skipped


def prompt_provenance(prompt: PromptFile, sha256: str) -> dict[str, Any]:
    """What the summary records about one prompt file (method, loss, seed, noise, ...; ``weight_decay_searched``:
    whether the linear probe chose its weight decay by search, so that ``report`` pools the searched runs)."""
    meta = prompt.metadata
    record = {"path": str(prompt.path), "sha256": sha256, **{k: meta.get(k) for k in PROVENANCE_KEYS}}
    if meta.get("method") == "linear-probe":
        record["weight_decay_searched"] = bool(meta.get("weight_decay_search"))
    if meta.get("method") == "finetune":  # what else sets a fine-tuned tower's result apart
        tower = meta.get("finetune") if isinstance(meta.get("finetune"), dict) else {}
        wise = meta.get("wise") if isinstance(meta.get("wise"), dict) else {}
        record.update(
            train_layers=tower.get("train_layers"),
            lp_ft=bool(meta.get("lp_ft")),
            wise_alpha=wise.get("alpha", 1.0),  # 1: the fine-tuned weights themselves
        )
    return record


def prediction_rows(
    features: FeatureIndex | FeatureSet, pred: np.ndarray, confidence: np.ndarray, truth: np.ndarray
) -> Iterator[dict[str, object]]:
    """One row per image: path, label (predicted), confidence, true_label ('' when unknown)."""
    names = features.classnames
    for i, path in enumerate(features.paths):
        yield {
            "path": path,
            "label": names[pred[i]],
            "confidence": f"{confidence[i]:.6f}",
            "true_label": names[truth[i]] if truth[i] >= 0 else "",
        }


PREDICTION_COLUMNS = ["path", "label", "confidence", "true_label"]


def class_probabilities(
    fs: FeatureSet,
    prompts: Sequence[PromptFile],
    templates: Sequence[str] | None,
    pretrained: str | None,
    device: torch.device,
) -> tuple[np.ndarray, LoadedModel | None]:
    """(N, C) class probabilities of ``fs``: zero-shot CLIP with ``templates``, else the prompts' ensemble.

    Loads the features' model only when needed (zero-shot or a prompt method); returns it too (or None).
    The whole N x C in memory: :func:`predict_rows` streams them for eval.
    """
    loaded = load_model_for(fs, prompts, templates, pretrained, device)
    feats = features_tensor(fs, device)
    if templates is not None:
        logits = [zero_shot_class_logits(loaded, fs.classnames, list(templates), feats)]
    else:
        logits = [prompt_logits(p, feats, loaded) for p in prompts]
    return ensemble_probabilities(logits), loaded


def load_model_for(
    fs: FeatureIndex | FeatureSet,
    prompts: Sequence[PromptFile],
    templates: Sequence[str] | None,
    pretrained: str | None,
    device: torch.device,
) -> LoadedModel | None:
    """The features' model, when zero-shot (``templates``) or a prompt method needs it; else None."""
    if templates is None and not prompts_need_model(prompts):
        return None
    from promptcli.models.loading import load_model_from_record

    return load_model_from_record(
        fs.attrs, source=fs.path, pretrained=pretrained, device=str(device), dim=fs.dim
    )


# Rows per block of eval (the last block up to twice as many): a multiple of predict_logits' batch, so that
# each prompt's logits are computed in the chunks, hence to the bit, of one call on the whole file.
EVAL_BLOCK = 8192


@dataclass
class Member:
    """One ensemble member (a prompt, or zero-shot CLIP): its logits as a function of a block of features."""

    logits: Callable[[torch.Tensor], torch.Tensor]
    step: int  # its logits are computed in chunks of this many rows: a block must be a multiple of it
    prompt: PromptFile | None = None  # None: zero-shot
    n_bad: int = 0  # rows with a non-finite logit so far

    def block_logits(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.logits(features)
        self.n_bad += int((~torch.isfinite(logits).all(dim=1)).sum())
        return logits


def prompt_member(prompt: PromptFile, loaded: LoadedModel | None, device: torch.device) -> Member:
    """A prompt's head, built once, as an ensemble member (:func:`prompt_logits` a block at a time)."""
    head = head_from_prompt(prompt, loaded)
    head.to(device)
    head.eval()
    return Member(logits_predictor(head), predict_step(head), prompt)


def zero_shot_member(
    loaded: LoadedModel, classnames: Sequence[str], templates: Sequence[str], device: torch.device
) -> Member:
    """Zero-shot CLIP as an ensemble member: its logits as a function of a block of features, the text
    embedded once."""
    from promptcli.models.zeroshot import class_text_embeddings, logit_scale, zero_shot_logits

    weights = class_text_embeddings(loaded, list(classnames), list(templates)).to(device).float()
    scale = logit_scale(loaded)
    # blocks of EVAL_BLOCK rows or more give the bits of one product over all rows with MKL, which rounds a
    # product's rows otherwise only at a handful of rows (hence no short last block)
    return Member(lambda features: zero_shot_logits(features.float(), weights, scale), 1)


@dataclass
class RowPredictions:
    """What eval keeps per image, instead of its N x C probabilities."""

    pred: np.ndarray  # (N,) int64: the ensemble's most probable class
    confidence: np.ndarray  # (N,) float64: its probability
    rank: np.ndarray  # (N,) int64: the true class's rank (0: predicted), -1 where the truth is unknown
    probs: np.ndarray | None = None  # (N, C) float64, only when asked for (small files, tests)


@torch.no_grad()
def predict_rows(
    fs: FeatureIndex,
    members: Sequence[Member],
    truth: np.ndarray,
    device: torch.device,
    *,
    block: int = EVAL_BLOCK,
    keep_probs: bool = False,
) -> RowPredictions:
    """The ensemble's predictions on ``fs``, read and scored a block of rows at a time: the probabilities,
    prediction and true class's rank of each row are those of :func:`class_probabilities` on the whole file
    (``block`` x C at a time in memory, not N x C)."""
    from promptcli.io.features import iter_blocks, row_blocks

    n, n_classes = len(fs), len(fs.classnames)
    block = math.lcm(block, *(m.step for m in members))
    out = RowPredictions(
        np.zeros(n, dtype=np.int64),
        np.zeros(n),
        np.full(n, -1, dtype=np.int64),
        np.zeros((n, n_classes)) if keep_probs else None,
    )
    for start, rows in iter_blocks(fs.path, row_blocks(n, block), fs.stamp):
        here = slice(start, start + len(rows))
        feats = torch.from_numpy(rows).to(device)
        probs = ensemble_probabilities([m.block_logits(feats) for m in members])
        out.pred[here] = probs.argmax(axis=1)
        out.confidence[here] = probs[np.arange(len(probs)), out.pred[here]]
        known = np.flatnonzero(truth[here] >= 0)
        out.rank[start + known] = true_class_rank(probs[known], truth[here][known])
        if out.probs is not None:
            out.probs[here] = probs
    for m in members:
        if m.n_bad and m.prompt is not None:
            raise InputError(
                f"the prompt gives non-finite logits (NaN or inf) on {m.n_bad} of {n} images",
                where=m.prompt.path,
                hint="tune it again with other options (its values overflow)",
            )
        if m.n_bad:
            raise InputError(
                f"zero-shot CLIP gives non-finite logits (NaN or inf) on {m.n_bad} of {n} images",
                where=fs.path,
                hint="check the features' model checkpoint (logit_scale, text tower) for NaN, inf or huge values",
            )
    return out


def prompts_need_model(prompts: Sequence[PromptFile]) -> bool:
    return any(method_needs_model(p.method, where=p.path) for p in prompts)


def features_tensor(features: FeatureSet, device: torch.device | str) -> torch.Tensor:
    return torch.from_numpy(features.features).to(device)


@dataclass
class EvalResult:
    summary: dict[str, Any]
    metrics: Metrics
    rows: RowPredictions  # per feature row
    truth: np.ndarray  # (N,), -1 where unknown
    features: FeatureIndex

    @property
    def probs(self) -> np.ndarray:
        """(N, C) class probabilities, kept only by ``evaluate(..., keep_probs=True)``."""
        if self.rows.probs is None:
            raise ValueError("evaluate(..., keep_probs=True) keeps the probabilities")
        return self.rows.probs


SUMMARY_KEYS = ("method", "method_params", "loss", "loss_params", "seed", "shots", "split", "noise")


def _common(values: list[Any]) -> Any:
    return values[0] if values and all(v == values[0] for v in values) else None


# What differs between draws of one noise condition: an ensemble over noise seeds keeps the condition.
NOISE_DRAW_KEYS = ("seed", "n_noisy", "realised_rate")


def _common_noise(values: list[Any]) -> Any:
    """The members' shared noise condition: their fields that agree, if all but the draw's own agree."""
    if not values or not all(isinstance(v, dict) for v in values):
        return _common(values)
    condition = [{k: v for k, v in value.items() if k not in NOISE_DRAW_KEYS} for value in values]
    if _common(condition) is None:
        return None
    return {k: v for k, v in values[0].items() if all(k in value and value[k] == v for value in values)}


def evaluate(
    features_path: str | Path,
    prompt_paths: Sequence[str | Path] = (),
    *,
    zero_shot: bool = False,
    templates: Sequence[str] | None = None,
    template_set: str | None = None,
    labels_path: str | Path | None = None,
    skip_missing: bool = False,
    pretrained: str | None = None,
    device: str = "auto",
    warn: Callable[[str], None] = warn_user,
    keep_probs: bool = False,
) -> EvalResult:
    """Predict with prompt files (ensembled) or zero-shot CLIP; score against the ground truth.

    The features are read a block of rows at a time; ``keep_probs`` keeps all N x C probabilities too.
    """
    from promptcli.io import provenance
    from promptcli.io.features import read_feature_index
    from promptcli.io.fileio import sha256_file
    from promptcli.io.labels import labels_sha256, read_labels
    from promptcli.io.prompt_files import read_prompt
    from promptcli.models.devices import resolve_device, runtime_record

    prompt_paths, templates = one_or_many(prompt_paths), one_or_many(templates) or None
    if bool(prompt_paths) == bool(zero_shot):
        raise InputError(
            "give either --prompt (one or more) or --zero-shot",
            where="--prompt/--zero-shot",
            hint="e.g. --prompt prompt.safetensors, or --zero-shot --template 'a photo of a {}.'",
        )
    if (templates or template_set) and not zero_shot:
        raise InputError(
            "--template/--templates apply to --zero-shot",
            where="--template",
            hint="a prompt file has its own prompt",
        )
    torch_device = resolve_device(device)
    fs = read_feature_index(features_path)
    prompts = [read_prompt(p) for p in prompt_paths]
    for prompt in prompts:
        check_compatible(prompt, fs)
    template_list: list[str] = []
    if zero_shot:
        from promptcli.models.zeroshot import resolve_templates

        template_list = resolve_templates(templates, template_set)

    if labels_path is not None:
        table = read_labels(labels_path)
        check_ground_truth(table, labels_path)
        truth, n_skipped = ground_truth_from_labels(fs, table, skip_missing)
        labels_sha = labels_sha256(table, labels_path)
    else:
        truth, n_skipped, labels_sha = ground_truth_from_features(fs), 0, None
        if not (truth >= 0).any():
            raise InputError(
                "the features file has no ground-truth labels", where=fs.path, hint="pass --labels test.csv"
            )

    known = truth >= 0
    check_some_truth(truth)
    loaded = load_model_for(fs, prompts, template_list if zero_shot else None, pretrained, torch_device)
    if zero_shot:
        members = [zero_shot_member(loaded, fs.classnames, template_list, torch_device)]
    else:
        members = [prompt_member(p, loaded, torch_device) for p in prompts]
    rows = predict_rows(fs, members, truth, torch_device, keep_probs=keep_probs)
    metrics = metrics_from_ranks(rows.rank[known], truth[known], fs.classnames, len(fs.classnames))

    records = [prompt_provenance(p, sha256_file(p.path)) for p in prompts]
    features_sha = sha256_file(fs.path)
    for prompt, record in zip(prompts, records):
        record["tuned_on_test"] = prompt.metadata.get("features_sha256") == features_sha
        if record["tuned_on_test"]:
            warn(f"{prompt.path} was tuned on {fs.path}: this scores the training images, not held-out ones")
        shift = preprocess_shift(prompt, fs)
        if shift:
            warn(
                f"{fs.path} was extracted with other preprocessing than {prompt.path} was tuned on ({shift}): "
                "the score includes that input shift"
            )
    summary: dict[str, Any] = {
        "features": str(fs.path),
        "features_sha256": features_sha,
        # the images behind the features (the listing's digest, and the files' bytes' where the features record
        # it): one test set however often, and through whichever tower, it is re-extracted
        "test_set": {
            "source": str(fs.attrs.get("source", "")),
            "source_digest": str(fs.attrs.get("source_digest", "")),
            "images_digest": str(fs.attrs.get("images_digest", "")),
            "n_images": len(fs),
        },
        # a prompt scored on the features it was tuned on: not a held-out score (report keeps it apart)
        "tuned_on_test": any(r["tuned_on_test"] for r in records),
        "labels": None if labels_path is None else str(labels_path),
        "labels_sha256": labels_sha,
        "model": {k: fs.attrs.get(k, "") for k in ("model_name", "pretrained", "checkpoint_sha256")},
        "n_images": len(fs),
        "n_evaluated": metrics.n,
        "n_skipped": n_skipped,
        "zero_shot": bool(zero_shot),
        "templates": template_list,
        "ensemble": len(prompts) > 1,
        "prompts": records,
        "metrics": metrics.to_dict(),
        "runtime": runtime_record(torch_device),  # eval predicts in float32, without autocast
        **provenance.base_provenance(),
    }
    if zero_shot:
        summary.update(
            method="zero-shot",
            method_params=None,
            loss=None,
            loss_params=None,
            seed=None,
            shots=None,
            noise=None,
        )
    else:
        summary.update({k: _common([m[k] for m in records]) for k in SUMMARY_KEYS})
        summary["noise"] = _common_noise([m["noise"] for m in records])
    return EvalResult(summary, metrics, rows, truth, fs)


def evaluate_file(
    features_path: str | Path,
    prompt_paths: Sequence[str | Path],
    *,
    predictions: str | Path | None = None,
    output: str | Path | None = None,
    json_out: bool = False,
    force: bool = False,
    **evaluate_options: Any,
) -> EvalResult:
    """``promptcli eval`` as one step: check the outputs, :func:`evaluate`, write predictions and summary.

    ``predictions`` gets one CSV row per image, ``output`` the JSON summary (either may be ``-``).
    """
    from promptcli.io.fileio import STDIO, check_distinct, check_output_path, write_json
    from promptcli.io.labels import write_labels

    prompt_paths = one_or_many(prompt_paths)
    labels_path = evaluate_options.get("labels_path")
    outputs = {"--predictions": predictions, "-o": output, "--json": STDIO if json_out else None}
    inputs: dict[str, Any] = {"FEATURES": features_path, "--labels": labels_path}
    inputs.update({f"--prompt {p}": p for p in prompt_paths})
    check_distinct(inputs, outputs)
    for path, option in ((predictions, "--predictions"), (output, "-o")):
        if path is not None and str(path) != STDIO:
            check_output_path(path, force, option=option)
    result = evaluate(features_path, prompt_paths, **evaluate_options)
    if predictions is not None:
        rows = prediction_rows(result.features, result.rows.pred, result.rows.confidence, result.truth)
        write_labels(predictions, PREDICTION_COLUMNS, rows)
        result.summary["predictions"] = str(predictions)
    if output is not None:
        write_json(output, result.summary)
    return result
