"""The one training loop shared by every method, its schedule, checkpoints and the linear-probe search.

A step is: pick a batch of cached image features (one augmented view per image and epoch when the
file has views), compute the head's class weights once (for prompt methods one text-encoder pass over
all class prompts), logits = scale x features @ weights.T (+ bias), loss, backward, optimiser step.
The learning rate follows CoOp: ``warmup_epochs`` at a constant ``warmup_lr``, then a cosine decay
(per epoch) over ``epochs`` (``--schedule``: from the epoch index, or from the full rate after the warm-up as
CoOp's code does; :meth:`~promptcli.learning.options.OptimConfig.lr_at`). Everything random comes from one seeded generator whose
state is checkpointed with the head, the optimiser and the epoch, so a resumed run ends bit-for-bit
where an uninterrupted one would (on CPU).

With a clean/noisy split (``--split ot``, NLPrompt), each epoch starts by judging every training
sample, without gradients and on the plain (non-augmented) features: an entropic optimal-transport
plan (Sinkhorn; uniform mass per sample, balanced mass per class) between the samples and the
head's current classes, at cost ``-logits``, sends each sample mostly to one class; the sample is
*clean* when that class is its given label (see :mod:`promptcli.learning.transport`). For prompt heads the
logits are ``logit_scale x`` cosine(image features, learner's class text features); for linear heads
they are the head's logits. In that epoch the loss of a batch of B samples is
``(sum over its clean samples of loss_i + sum over its noisy samples of MAE_i) / B`` with
MAE_i = 1 - p_y (``noisy_loss="mae"``), or the clean sum alone over B (``noisy_loss="none"``: noisy
samples give no gradient; the divisor stays B, so the clean samples' step size does not grow as
fewer are judged clean). The split depends only on the head at the epoch's start, so resuming from
a checkpoint recomputes it exactly.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptcli.errors import InputError, RuntimeFailure
from promptcli.io.checks import check_step, divergence_error
from promptcli.io.fileio import atomic_path
from promptcli.learning.divergence import divergence_suspects, fp16_suspect
from promptcli.learning.options import (
    CHECKPOINT_VERSION,
    HELD_OUT_FRACTION,
    WEIGHT_DECAY_GRID,
    OptimConfig,
    SplitConfig,
)
from promptcli.models.devices import amp_dtype
from promptcli.models.heads import Head, predict_logits


@dataclass
class TrainData:
    """Training examples: cached features, optional augmented views, labels (given and clean)."""

    features: torch.Tensor  # (N, D) float32
    labels: torch.Tensor  # (N,) int64, the given (possibly noisy) labels
    views: torch.Tensor | None = None  # (N, V, D)
    clean: torch.Tensor | None = None  # (N,) int64
    is_noisy: torch.Tensor | None = None  # (N,) bool; defaults to labels != clean when clean is known

    def noisy_flags(self) -> torch.Tensor | None:
        """Which given labels are wrong, when the data says (is_noisy, else labels != clean)."""
        if self.is_noisy is not None:
            return self.is_noisy.bool()
        return None if self.clean is None else self.labels != self.clean

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> TrainData:
        idx = torch.as_tensor(index, dtype=torch.long)
        return TrainData(
            self.features[idx],
            self.labels[idx],
            None if self.views is None else self.views[idx],
            None if self.clean is None else self.clean[idx],
            None if self.is_noisy is None else self.is_noisy[idx],
        )


@dataclass
class Step:
    """What ``train``'s ``on_step`` hook sees of a step: after the backward pass, before the update.

    ``index`` holds the batch's rows of the training data, ``x`` the features (or views) used and
    ``targets`` the given labels; the head still has the parameters ``loss`` was computed with.
    """

    epoch: int  # 1-based, as in the history
    step: int  # 1-based within the epoch
    head: Head
    index: torch.Tensor
    x: torch.Tensor
    targets: torch.Tensor
    loss: float


@torch.no_grad()
def ot_split(head: Head, features: torch.Tensor, labels: torch.Tensor, split: SplitConfig) -> torch.Tensor:
    """(N,) bool: the samples whose OT class under ``head`` is their given label (clean)."""
    from promptcli.learning.transport import ot_clean_mask, ot_clean_mask_from_logits

    if hasattr(head, "logits"):  # heads without fixed class weights (cocoop, the adapters)
        logits = predict_logits(head, features).double()
        return ot_clean_mask_from_logits(logits, labels, epsilon=split.epsilon, n_iter=split.n_iter)
    weight, bias, scale = head.classifier()
    if bias is None:  # prompt heads: image features vs the learner's class text features
        return ot_clean_mask(features, weight, labels, scale, epsilon=split.epsilon, n_iter=split.n_iter)
    logits = predict_logits(head, features).double()
    return ot_clean_mask_from_logits(logits, labels, epsilon=split.epsilon, n_iter=split.n_iter)


def split_loss(
    loss_fn: torch.nn.Module,
    logits: torch.Tensor,
    targets: torch.Tensor,
    clean: torch.Tensor,
    noisy_loss: str,
) -> torch.Tensor:
    """``(sum_clean loss_fn_i + sum_noisy MAE_i) / B`` (noisy term left out for ``noisy_loss="none"``).

    Every loss is the mean of per-row terms, so a group's sum is its mean times its size.
    """
    from promptcli.learning.losses import MeanAbsoluteError

    batch = logits.shape[0]
    total = logits.sum() * 0.0  # keeps the graph (zero gradient) when a group is empty
    n_clean = int(clean.sum())
    if n_clean:
        total = total + loss_fn(logits[clean], targets[clean]) * n_clean
    if noisy_loss == "mae" and n_clean < batch:
        total = total + MeanAbsoluteError()(logits[~clean], targets[~clean]) * (batch - n_clean)
    return total / batch


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    final: dict[str, Any]
    resumed_from: int = 0
    weight_decay_search: list[dict[str, float]] = field(default_factory=list)


def make_optimizer(groups: list[dict[str, Any]], config: OptimConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr, eps=config.adam_eps)


def autocast_dtype(device: torch.device | str, amp: bool) -> torch.dtype | None:
    """The dtype :func:`train` autocasts to on ``device`` with ``amp`` (CUDA only); None: no autocast (fp32)."""
    device = torch.device(device)
    return amp_dtype(device) if amp and device.type == "cuda" else None


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=amp_dtype(device))


class NonFiniteLogits(RuntimeFailure):
    """A head whose logits on the training images are NaN or inf (a training loop words it as divergence)."""


@torch.no_grad()
def accuracy(head: Head, features: torch.Tensor, labels: torch.Tensor, amp: bool = False) -> float:
    """Top-1 accuracy of ``head`` on ``features`` (class weights computed once)."""
    if len(labels) == 0:
        return float("nan")
    with _autocast(features.device, amp):
        logits = predict_logits(head, features)
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits(
            "the tuned head gives non-finite logits (NaN or inf) on the training images; no prompt was saved",
            hint="tune again with a lower --lr, or smaller scale options of the method (e.g. --tip-alpha)",
        )
    return float((logits.argmax(dim=1) == labels).float().mean().item())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write the checkpoint through a temporary file renamed into place (never half-written)."""
    with atomic_path(path, suffix=".tmp") as tmp:
        torch.save(state, tmp)


@dataclass
class LoopState:
    """What a training loop carries from epoch to epoch, besides the trained tensors."""

    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    scaler: Any  # torch.amp.GradScaler
    history: list[dict[str, Any]]

    def checkpoint(self, fingerprint: str, epoch: int, **trained: Any) -> dict[str, Any]:
        """The checkpoint after ``epoch`` (1-based): versioned, fingerprinted, with ``trained``."""
        return {
            "version": CHECKPOINT_VERSION,
            "fingerprint": fingerprint,
            "epoch": epoch,
            **trained,
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "history": self.history,
        }

    def restore(self, state: dict[str, Any]) -> int:
        """Take the loop's part of a checkpoint (optimiser, RNGs, scaler, history); return its epoch."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.history[:] = list(state["history"])
        return int(state["epoch"])


START_OVER = "rerun without --resume and with --force to start over"
# How the parts of a run's identity (see tune_run.fingerprint) are named when they differ
_IDENTITY_NAMES = {"features": "the features file", "labels": "the labels file", "rows": "the labelled rows"}


def identity_changes(recorded: str | None, identity: str | None) -> list[str]:
    """What differs between a checkpoint's recorded run identity and this run's (JSON texts): the inputs, and
    options by name; empty when either is unknown (checkpoints from before identities were recorded)."""
    if not recorded or not identity:
        return []
    try:
        old, new = json.loads(recorded), json.loads(identity)
    except ValueError:
        return []
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            changed += [f for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
        else:
            changed.append(_IDENTITY_NAMES.get(key, key))
    return changed


def load_checkpoint(path: Path, fingerprint: str, identity: str | None = None) -> dict[str, Any]:
    """A checkpoint to resume from; refused unless it was written by this very run (``fingerprint``), naming
    what differs when the checkpoint records its run's ``identity``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise InputError(
            f"unreadable checkpoint ({type(exc).__name__})", where=path, hint=f"delete it, or {START_OVER}"
        ) from exc
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise InputError("not a promptcli tune checkpoint", where=path, hint=f"delete it, or {START_OVER}")
    if state.get("fingerprint") != fingerprint:
        changed = identity_changes(state.get("identity"), identity)
        raise InputError(
            "the interrupted run used other inputs or options"
            + (f" ({', '.join(changed)})" if changed else ""),
            where=path,
            hint=f"resume with the same command line, or {START_OVER}",
        )
    return state


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    yield from torch.randperm(n, generator=generator).split(batch_size)


def train(
    head: Head,
    data: TrainData,
    loss_fn: torch.nn.Module,
    config: OptimConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    amp: bool = True,
    checkpoint: Path | None = None,
    resume: bool = False,
    fingerprint: str = "",
    identity: str | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[Step], None] | None = None,
    split: SplitConfig | None = None,
) -> TrainResult:
    """Train ``head`` in place on ``data``; return the per-epoch history and the final metrics.

    With ``checkpoint``, the state after each epoch is saved there; with ``resume`` too, training
    continues from it. ``amp`` turns on autocast (bf16, else fp16 with loss scaling) on CUDA only.
    ``on_step`` observes every step (see :class:`Step`); it must leave the head, its gradients and
    the random state alone, so that observed and unobserved runs follow the same trajectory.
    With ``split`` (method ot), each epoch first splits the samples into clean and noisy (see the
    module docstring) and the history rows gain ``n_judged_clean`` and, when the data knows which
    labels are noisy, ``clean_precision`` and ``clean_recall`` of that split.
    """
    config.validate()
    if split is not None and split.method == "none":
        split = None
    if split is not None:
        split.validate()
    device = torch.device(device)
    use_amp = autocast_dtype(device, amp) is not None
    head.to(device)
    head.eval()  # the frozen CLIP parts stay in eval mode; gradients still reach the learnable tensors
    feats = data.features.to(device).float()
    # the views (N x V x D, often the largest tensor by far) stay in host memory; each batch goes over alone
    views = None if data.views is None else data.views.float()
    labels = data.labels.to(device)
    clean = None if data.clean is None else data.clean.to(device)
    is_noisy = data.noisy_flags()
    n = len(data)

    optimizer = make_optimizer(head.param_groups(config.weight_decay), config)
    generator = torch.Generator().manual_seed(seed)
    fp16 = use_amp and amp_dtype(device) == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    loop = LoopState(optimizer, generator, scaler, history=[])
    history = loop.history
    start = 0
    if checkpoint is not None and resume and checkpoint.exists():
        state = load_checkpoint(checkpoint, fingerprint, identity)
        head.load_learnable_state({k: v.to(device) for k, v in state["head"].items()})
        start = loop.restore(state)

    for epoch in range(start, config.epochs):
        t0 = time.perf_counter()
        lr = config.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        suspects = divergence_suspects(
            config, epoch, loss_fn, head, fp16_suspect("--no-amp", "--no-amp") if fp16 else None
        )
        split_row: dict[str, Any] = {}
        judged_clean = None
        if split is not None:  # no randomness: a resumed run recomputes the same split
            judged_clean = ot_split(head, feats, labels, split)
            split_row = {"n_judged_clean": int(judged_clean.sum())}
            if is_noisy is not None:
                from promptcli.learning.transport import split_quality

                quality = split_quality(judged_clean, is_noisy)
                split_row.update(
                    clean_precision=quality["clean_precision"], clean_recall=quality["clean_recall"]
                )
        view_of = torch.randint(views.shape[1], (n,), generator=generator) if views is not None else None
        total = 0.0
        for step, batch in enumerate(_batches(n, config.batch_size, generator), start=1):
            x = feats[batch.to(device)] if views is None else views[batch, view_of[batch]].to(device)
            with _autocast(device, use_amp):
                logits = head(x)
            targets = labels[batch.to(device)]
            if judged_clean is None:
                loss = loss_fn(logits.float(), targets)
            else:
                loss = split_loss(
                    loss_fn, logits.float(), targets, judged_clean[batch.to(device)], split.noisy_loss
                )
            if hasattr(head, "regularizer"):  # kgcoop: a term of the head's own, once per batch
                loss = loss + head.regularizer().float()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            loss_value = float(loss.detach().item())
            largest = float(logits.detach().abs().max().item())
            check_step(loss_value, largest, logits.shape[-1], epoch + 1, step, suspects)
            if on_step is not None:
                on_step(Step(epoch + 1, step, head, batch, x, targets, loss_value))
            scaler.step(optimizer)
            scaler.update()
            total += loss_value * len(batch)
        if not all(bool(torch.isfinite(t).all()) for t in head.learnable_state().values()):
            raise divergence_error(
                epoch + 1, None, suspects, "learned tensor"
            )  # checked before it is checkpointed
        try:
            train_accuracy = accuracy(head, feats, labels, use_amp)
        except NonFiniteLogits:
            raise divergence_error(
                epoch + 1, None, suspects, "head's output on the training images"
            ) from None
        row = {
            "epoch": epoch + 1,
            "loss": total / n,
            "lr": lr,
            "accuracy": train_accuracy,
            "clean_accuracy": None if clean is None else accuracy(head, feats, clean, use_amp),
            **split_row,
            "time": time.perf_counter() - t0,
        }
        history.append(row)
        if checkpoint is not None:
            save_checkpoint(
                checkpoint,
                loop.checkpoint(
                    fingerprint,
                    epoch + 1,
                    head={k: v.cpu() for k, v in head.learnable_state().items()},
                    scheduler={"name": "warmup-cosine", "last_epoch": epoch},
                    **({"identity": identity} if identity else {}),
                ),
            )
        if on_epoch is not None:
            on_epoch(row)

    final = {
        "epochs": config.epochs,
        "n_train": n,
        "loss": history[-1]["loss"] if history else None,
        "train_accuracy": accuracy(head, feats, labels, use_amp),
        "train_clean_accuracy": None if clean is None else accuracy(head, feats, clean, use_amp),
    }
    return TrainResult(history, final, resumed_from=start)


def held_out_split(
    labels: np.ndarray, seed: int, fraction: float = HELD_OUT_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: from each class with >= 2 examples, hold out round(fraction x n) (>= 1)."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, int(round(fraction * len(idx)))) if len(idx) >= 2 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def select_weight_decay(
    make_head: Callable[[], Head],
    data: TrainData,
    loss_fn: torch.nn.Module,
    config: OptimConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    amp: bool = True,
    grid: tuple[float, ...] = WEIGHT_DECAY_GRID,
    split: SplitConfig | None = None,
) -> tuple[float | None, list[dict[str, float]]]:
    """Train on a seeded held-out split for each weight decay; return the best (ties: the larger).

    Returns ``(None, [])`` when no class has two examples to split.
    """
    train_idx, val_idx = held_out_split(data.labels.numpy(), seed)
    if len(val_idx) == 0 or len(train_idx) == 0:
        return None, []
    fit, val = data.subset(train_idx), data.subset(val_idx)
    results = []
    for wd in grid:
        head = make_head()
        train(
            head,
            fit,
            loss_fn,
            replace(config, weight_decay=wd),
            seed=seed,
            device=device,
            amp=amp,
            split=split,
        )
        acc = accuracy(
            head, val.features.to(device), val.labels.to(device), amp and torch.device(device).type == "cuda"
        )
        results.append({"weight_decay": wd, "held_out_accuracy": acc})
    best = max(results, key=lambda r: (r["held_out_accuracy"], r["weight_decay"]))
    return best["weight_decay"], results
