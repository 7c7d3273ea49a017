"""Per-sample gradient norms of noisy and clean labels along the training trajectory of ``tune``.

Every head computes ``logits = scale * x @ W.T (+ b)`` with class weights ``W`` (the learned text
features of prompt methods, the weight matrix of linear heads). The loss of sample i depends on the
learnable parameters theta only through ``W`` and ``b``, so its gradient is exact in two stages:

1. in classifier space, closed form: with ``delta_i = d loss_i / d logits_i`` (row i of B times the
   gradient of the batch-mean loss, as every loss is a mean of per-row terms),
   ``d loss_i / dW = scale * delta_i x_i^T`` and ``d loss_i / db = delta_i``;
2. pulled back to theta by one vector-Jacobian product of ``head.classifier()`` batched over the
   samples (``torch.autograd.grad(..., is_grads_batched=True)``): one text-encoder forward and one
   vmapped backward per step instead of B forward and backward passes.

A "per-sample gradient" is that of the sample's own loss (not divided by B). A group's "sum" is its
share of the step's gradient, ``(1/B) sum_{i in group} g_i``; the noisy and clean shares add up to
the gradient the optimiser applies (before weight decay).

Where it applies: every head with ``classifier()`` (coop, cls-tuning, full-prompt, linear-probe,
classifier-zs, kgcoop). For kgcoop the per-sample gradients are those of the data loss; its
regulariser belongs to no sample, so the two shares add up to the step's gradient minus the
regulariser's. Heads without fixed class weights (cocoop, clip-adapter, tip-adapter[-f]) are refused.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from promptcli.analysis.results import GRADSTATS_COLUMNS
from promptcli.errors import InputError, warn_user
from promptcli.learning.options import TuneOptions
from promptcli.learning.training import Step, TrainResult, train
from promptcli.learning.tune_run import PreparedRun
from promptcli.models.heads import Head, apply_classifier

COLUMNS = GRADSTATS_COLUMNS
DEFAULT_CHUNK = 32


def check_gradient_definition(method: str) -> None:
    """One-line error for a method whose logits are not ``scale * x @ W.T + b`` (see the module docstring)."""
    from promptcli.choices import IMAGE_METHODS
    from promptcli.models.heads import head_class

    if method in IMAGE_METHODS:
        raise InputError(
            f"gradstats does not apply to {method}: it trains through the image tower on images, and "
            "per-sample gradients over the tower are not supported",
            where="--method",
            hint="trace coop, kgcoop, cls-tuning, full-prompt, linear-probe or classifier-zs",
        )
    if not hasattr(head_class(method), "classifier"):
        raise InputError(
            f"gradstats does not apply to {method}: its logits have no class weights shared by the batch",
            where="--method",
            hint="trace coop, kgcoop, cls-tuning, full-prompt, linear-probe or classifier-zs",
        )


def learnable_parameters(head: Head) -> list[torch.nn.Parameter]:
    """The tensors the optimiser updates, in the optimiser's order."""
    return [p for group in head.param_groups(0.0) for p in group["params"]]


def per_sample_gradients(
    head: Head,
    x: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: torch.nn.Module,
    chunk_size: int = DEFAULT_CHUNK,
) -> list[torch.Tensor]:
    """Gradient of each sample's loss w.r.t. each learnable tensor: a list of (B, *param.shape), float32.

    Exact (see the module docstring); ``chunk_size`` samples are pulled back at a time, which bounds
    the memory of the batched backward pass (B x classes x sequence x width for prompt methods).
    """
    params = learnable_parameters(head)
    x = x.float()
    batch = x.shape[0]
    with torch.enable_grad():
        weight, bias, scale = head.classifier()
        weight = weight.float()
        with torch.no_grad():
            logits = apply_classifier(x, weight, None if bias is None else bias.float(), scale)
        logits.requires_grad_(True)
        (delta,) = torch.autograd.grad(loss_fn(logits, targets), logits)
        delta = delta * batch  # row i: d loss_i / d logits_i
        outputs: list[torch.Tensor] = [weight]
        if bias is not None and bias.requires_grad:
            outputs.append(bias)
        grads: list[list[torch.Tensor]] = [[] for _ in params]
        for lo in range(0, batch, max(1, chunk_size)):
            d = delta[lo : lo + chunk_size]
            cotangents = [scale * d[:, :, None] * x[lo : lo + chunk_size, None, :]]
            if len(outputs) == 2:
                cotangents.append(d)
            pulled = torch.autograd.grad(
                outputs,
                params,
                grad_outputs=cotangents,
                is_grads_batched=True,
                retain_graph=lo + chunk_size < batch,
                allow_unused=True,
            )
            for acc, g, p in zip(grads, pulled, params):
                acc.append(g.float() if g is not None else torch.zeros(len(d), *p.shape, device=p.device))
    return [torch.cat(parts) for parts in grads]


@dataclass
class GroupStats:
    """Gradient statistics of one step's batch, split by the clean/noisy flag."""

    n_noisy: int
    n_clean: int
    noisy_grad_norm: float | None  # mean over the noisy samples of |g_i|
    clean_grad_norm: float | None
    noisy_sum_norm: float | None  # |(1/B) sum over the noisy samples of g_i|
    clean_sum_norm: float | None

    @property
    def ratio(self) -> float | None:
        if self.noisy_grad_norm is None or not self.clean_grad_norm:
            return None
        return self.noisy_grad_norm / self.clean_grad_norm


def group_stats(grads: Sequence[torch.Tensor], noisy: torch.Tensor) -> GroupStats:
    """Per-group mean per-sample norm and norm of the group's share of the batch gradient."""
    batch = int(noisy.shape[0])
    flat = torch.cat([g.reshape(batch, -1).double() for g in grads], dim=1)
    norms = flat.norm(dim=1)
    out: dict[str, Any] = {}
    for name, mask in (("noisy", noisy), ("clean", ~noisy)):
        n = int(mask.sum())
        out[f"n_{name}"] = n
        out[f"{name}_grad_norm"] = float(norms[mask].mean()) if n else None
        out[f"{name}_sum_norm"] = float(flat[mask].sum(dim=0).norm() / batch) if n else None
    return GroupStats(**out)


@dataclass
class GradientRecorder:
    """A ``train`` step hook: records :class:`GroupStats` of every step (``is_noisy`` per training row)."""

    loss_fn: torch.nn.Module
    is_noisy: torch.Tensor  # (N,) bool, aligned with the training data
    chunk_size: int = DEFAULT_CHUNK
    steps: list[tuple[int, int, GroupStats]] = field(default_factory=list)

    def __call__(self, step: Step) -> None:
        grads = per_sample_gradients(step.head, step.x, step.targets, self.loss_fn, self.chunk_size)
        noisy = self.is_noisy[step.index.cpu()].to(grads[0].device)
        self.steps.append((step.epoch, step.step, group_stats(grads, noisy)))


def epoch_summary(steps: Sequence[tuple[int, int, GroupStats]]) -> dict[int, dict[str, float | None]]:
    """Per epoch: the mean per-sample norm over all noisy (clean) samples seen, and their ratio."""
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0, 0.0, 0])
    for epoch, _, s in steps:
        acc = sums[epoch]
        if s.n_noisy:
            acc[0] += s.n_noisy * s.noisy_grad_norm
            acc[1] += s.n_noisy
        if s.n_clean:
            acc[2] += s.n_clean * s.clean_grad_norm
            acc[3] += s.n_clean
    out = {}
    for epoch, (noisy, n_noisy, clean, n_clean) in sorted(sums.items()):
        noisy_mean = noisy / n_noisy if n_noisy else None
        clean_mean = clean / n_clean if n_clean else None
        out[epoch] = {
            "noisy_grad_norm": noisy_mean,
            "clean_grad_norm": clean_mean,
            "ratio": noisy_mean / clean_mean if noisy_mean is not None and clean_mean else None,
        }
    return out


def noisy_flags(run: PreparedRun, labels_path: str | Path) -> torch.Tensor:
    """The is_noisy flag of every training row of ``run``; a clear error when the labels lack it."""
    if run.joined.is_noisy is None or run.joined.clean is None:
        raise InputError(
            "the labels carry no clean_label and is_noisy columns",
            where=labels_path,
            hint="gradstats compares noisy with clean labels: make them with `promptcli corrupt`",
        )
    return torch.from_numpy(run.joined.is_noisy[run.index])


def record_gradients(
    run: PreparedRun,
    is_noisy: torch.Tensor,
    *,
    amp: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Head, TrainResult, GradientRecorder]:
    """Train a fresh head exactly as ``tune`` would, recording gradient statistics at every step."""
    recorder = GradientRecorder(run.loss_fn, is_noisy, chunk_size)
    head = run.make_head()
    result = train(
        head,
        run.data,
        run.loss_fn,
        run.optim,
        seed=run.options.seed,
        device=run.device,
        amp=amp,
        on_epoch=on_epoch,
        on_step=recorder,
    )
    return head, result, recorder


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def csv_rows(
    steps: Sequence[tuple[int, int, GroupStats]], options: TuneOptions, noise: dict[str, Any] | None
) -> list[dict[str, str]]:
    """The CSV rows of one method's run (empty cells: no sample of the group, no noise sidecar)."""
    noise = noise or {}
    rate = noise.get("rate", noise.get("realised_rate"))
    fixed = {
        "method": options.method,
        "loss": options.loss,
        "noise_type": noise.get("type") or "",
        "noise_rate": _cell(None if rate is None else float(rate)),
        "seed": str(options.seed),
    }
    rows = []
    for epoch, step, s in steps:
        rows.append(
            {
                "epoch": str(epoch),
                "step": str(step),
                **fixed,
                "n_noisy": str(s.n_noisy),
                "n_clean": str(s.n_clean),
                "noisy_grad_norm": _cell(s.noisy_grad_norm),
                "clean_grad_norm": _cell(s.clean_grad_norm),
                "ratio": _cell(s.ratio),
                "noisy_sum_norm": _cell(s.noisy_sum_norm),
                "clean_sum_norm": _cell(s.clean_sum_norm),
            }
        )
    return rows


def sidecar_path(output: str | Path) -> Path:
    return Path(f"{output}.json")


def gradstats(
    features_path: str | Path,
    labels_path: str | Path,
    output: str | Path,
    methods: Sequence[str],
    options: TuneOptions,
    *,
    device: str = "auto",
    amp: bool = True,
    pretrained: str | None = None,
    force: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    on_epoch: Callable[[str, dict[str, Any]], None] | None = None,
    info: Callable[[str], None] = lambda _: None,
    warn: Callable[[str], None] = warn_user,
) -> dict[str, Any]:
    """Train each method as ``tune`` would and write per-step gradient statistics to ``output`` (CSV).

    A sidecar ``output.json`` records the model, the inputs' SHA-256, the options and the command.
    Returns a summary with the per-epoch statistics of every method.
    """
    from promptcli.io import provenance
    from promptcli.io.fileio import (
        STDIO,
        check_distinct,
        check_output_path,
        open_output_text,
        require_file,
        write_json,
    )
    from promptcli.io.labels import read_labels
    from promptcli.io.sidecar import noise_summary, read_noise_sidecar
    from promptcli.learning.training import autocast_dtype
    from promptcli.learning.tune_run import check_options, prepare_run
    from promptcli.models.devices import runtime_record

    if not methods:
        raise InputError("no method given", where="--method", hint="e.g. --method coop")
    if len(set(methods)) != len(methods):
        raise InputError("a method is given twice", where="--method", hint="give each method once")
    if chunk_size < 1:
        raise InputError("must be >= 1", where="--grad-batch", hint="e.g. 32; lower it if memory runs out")
    per_method = [replace(options, method=m).resolved() for m in methods]  # each method's own defaults
    # errors before any file is touched; prepare_run checks again and gives the warnings (once)
    for opts in per_method:
        check_options(opts, lambda _: None)
        check_gradient_definition(opts.method)
    to_stdout = str(output) == STDIO  # the CSV on stdout, no sidecar
    check_distinct({"FEATURES": features_path, "LABELS": labels_path}, {"-o": output})
    if not to_stdout:
        output = check_output_path(output, force)
    sidecar = None if to_stdout else check_output_path(sidecar_path(output), force)
    if str(labels_path) == "-":
        raise InputError(
            "gradstats reads the labels from a file",
            where="LABELS",
            hint="save them to a file (its corrupt sidecar labels.csv.json names the noise)",
        )
    table = read_labels(require_file(labels_path, "labels file"))
    missing = [c for c in ("clean_label", "is_noisy") if not table.has(c)]
    if missing:
        raise InputError(
            f"the labels have no {' and no '.join(missing)} column",
            where=labels_path,
            hint="gradstats compares noisy with clean labels: make them with `promptcli corrupt`",
        )
    noise = noise_summary(read_noise_sidecar(labels_path, warn))

    rows: list[dict[str, str]] = []
    runs: list[dict[str, Any]] = []
    loaded = None
    first: PreparedRun | None = None
    for opts in per_method:
        run = prepare_run(
            features_path,
            labels_path,
            opts,
            device=device,
            amp=amp,
            pretrained=pretrained,
            info=info,
            warn=warn,
            loaded=loaded,
        )
        loaded = run.loaded or loaded
        first = first or run
        is_noisy = noisy_flags(run, labels_path)
        info(
            f"{opts.method}: {len(run.data)} images ({int(is_noisy.sum())} noisy), "
            f"{opts.epochs} epochs of batch {opts.batch_size}"
        )
        callback = None if on_epoch is None else (lambda row, m=opts.method: on_epoch(m, row))
        _, result, recorder = record_gradients(
            run, is_noisy, amp=amp, chunk_size=chunk_size, on_epoch=callback
        )
        rows += csv_rows(recorder.steps, opts, noise)
        grads = epoch_summary(recorder.steps)
        runs.append(
            {
                "method": opts.method,
                "loss": opts.loss,
                "optimizer": run.optim.to_dict(),
                "weight_decay_search": run.weight_decay_search,
                "n_train": len(run.data),
                "n_noisy": int(is_noisy.sum()),
                "n_steps": len(recorder.steps),
                "epochs": [{**row, **grads.get(row["epoch"], {})} for row in result.history],
                "metrics": result.final,
            }
        )

    assert first is not None
    record = first.features.model_record()
    meta = {
        **provenance.base_provenance(),
        "output": str(output),
        "columns": list(COLUMNS),
        "model": {k: str(v) for k, v in record.items()},
        "runtime": runtime_record(first.device, autocast_dtype(first.device, amp)),
        "features": {"path": str(features_path), "sha256": first.features_sha},
        "labels": {"path": str(labels_path), "sha256": first.labels_sha},
        "noise": noise,
        "methods": list(methods),
        "options": {k: v for k, v in asdict(per_method[0]).items() if k != "method"},
        "runs": [{k: v for k, v in r.items() if k != "epochs"} for r in runs],
        "definitions": {
            "grad_norm": "mean over the group's samples in the batch of |d loss_i / d theta|",
            "sum_norm": "|(1/B) sum over the group's samples of d loss_i / d theta| (its share of the step)",
            "ratio": "noisy_grad_norm / clean_grad_norm",
            "theta": "the learnable tensors of the method, concatenated",
        },
    }
    with open_output_text(output) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    if sidecar is not None:
        write_json(sidecar, meta)
    return {
        "output": str(output),
        "sidecar": None if sidecar is None else str(sidecar),
        "noise": noise,
        "n_rows": len(rows),
        "runs": runs,
    }


def summary_table(runs: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Rows (method, epoch, loss, accuracy, clean accuracy, noisy |g|, clean |g|, ratio) of the summary."""
    table = []
    for run in runs:
        for row in run["epochs"]:
            table.append(
                [
                    f"{run['method']}+{run['loss']}",
                    row["epoch"],
                    row["loss"],
                    row["accuracy"],
                    "" if row.get("clean_accuracy") is None else row["clean_accuracy"],
                    *(
                        "" if row.get(k) is None else row[k]
                        for k in ("noisy_grad_norm", "clean_grad_norm", "ratio")
                    ),
                ]
            )
    return table


SUMMARY_COLUMNS = ["method", "epoch", "loss", "acc", "clean acc", "noisy |g|", "clean |g|", "ratio"]
