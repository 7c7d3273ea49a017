"""``tune`` as a library step: files in, a prompt file out, around the training loop of :mod:`.training`.

:func:`check_options` validates a :class:`~promptcli.learning.options.TuneOptions` before any file is
read; :func:`prepare_run` reads the features and labels, samples the shots, loads the model and
settles the weight decay (shared with ``gradstats``); :func:`tune` trains with checkpoints, logs and
writes the prompt file with its provenance.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptcli.errors import InputError, warn_user
from promptcli.io.checks import check_finite_fields, check_seed
from promptcli.io.fileio import STDIO, OutputTaken, locks_output
from promptcli.io.sidecar import noise_summary, read_noise_sidecar
from promptcli.learning.options import (
    DEFAULT_EPSILON,
    HELD_OUT_FRACTION,
    OptimConfig,
    SplitConfig,
    TuneOptions,
)
from promptcli.learning.training import TrainData, load_checkpoint, select_weight_decay, train
from promptcli.models.heads import Head


def sample_shots(
    labels: np.ndarray, shots: int, seed: int, n_classes: int
) -> tuple[np.ndarray, dict[int, int]]:
    """K examples per class of the given labels (seeded); returns sorted indices and short classes' counts."""
    rng = np.random.default_rng(seed)
    chosen, short = [], {}
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots:
            short[c] = len(idx)
        chosen.append(rng.permutation(idx)[:shots])
    return np.sort(np.concatenate(chosen)), short


def fingerprint(parts: dict[str, Any]) -> str:
    """A stable digest of what a run depends on (to refuse resuming a different run)."""
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def run_identity_text(
    features_sha: str, labels_sha: str, options: TuneOptions, extra: dict[str, Any] | None = None
) -> str:
    """What makes two tune runs one (inputs, resolved options and ``extra``: the image methods' options), as the
    JSON a prompt file records, so that a rerun with ``--resume`` can tell its own finished output from another
    run's."""
    identity = {"features": features_sha, "labels": labels_sha, "options": asdict(options), **(extra or {})}
    return json.dumps(identity, sort_keys=True, default=str)


def finished_run(
    output: Path,
    features_path: str | Path,
    labels_path: str | Path,
    options: TuneOptions,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """With ``--resume`` and no checkpoint: the summary of ``output`` when this very run wrote it (a requeued
    job's step that had finished), else None (``output exists``, naming what differs when it can)."""
    from promptcli.io.fileio import sha256_file
    from promptcli.io.prompt_files import read_prompt
    from promptcli.learning.training import identity_changes

    if str(labels_path) == STDIO or str(features_path) == STDIO:
        return None
    try:
        meta = read_prompt(output).metadata
    except Exception:  # not a prompt file: refused below as any existing output
        return None
    recorded = meta.get("run_identity")
    if not isinstance(recorded, str):
        return None
    identity = run_identity_text(sha256_file(features_path), sha256_file(labels_path), options, extra)
    if recorded != identity:
        changed = identity_changes(recorded, identity)
        raise InputError(
            "output exists, written by another run"
            + (f" (it differs in {', '.join(changed)})" if changed else ""),
            where=output,
            hint="pass --force to overwrite it or choose another -o",
        )
    return {
        "output": str(output),
        "already_complete": True,
        "method": meta.get("method"),
        "loss": meta.get("loss_params"),
        "optimizer": meta.get("optimizer"),
        "weight_decay_search": meta.get("weight_decay_search") or [],
        "n_train": meta.get("n_train"),
        "n_skipped": meta.get("n_skipped") or 0,
        "skipped": [],
        "short_classes": {},
        "resumed_from_epoch": 0,
        "seconds_per_epoch": None,
        "metrics": meta.get("metrics") or {},
        "split": meta.get("split"),
        "noise": meta.get("noise"),
        "log": None,
    }


def remove_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def partial_path(output: str | Path) -> Path:
    """Where an interrupted tune keeps its per-epoch checkpoint."""
    return Path(f"{output}.partial")


@dataclass
class PreparedRun:
    """A tune run ready to train: data, loss, optimiser settings and a head factory (see :func:`prepare_run`)."""

    options: TuneOptions
    features: Any  # FeatureSet
    joined: Any  # JoinedLabels
    index: np.ndarray  # the joined label rows used (all, or the --shots sample)
    data: TrainData
    loss_fn: torch.nn.Module
    prompt_config: Any  # PromptConfig for prompt methods, else None
    optim: OptimConfig
    weight_decay_search: list[dict[str, float]]
    make_head: Callable[[], Head]
    device: torch.device
    features_sha: str
    labels_sha: str
    labels_source: str
    short: dict[int, int]
    loaded: Any  # LoadedModel, None for linear-probe
    val_data: TrainData | None = None  # --val-fraction: held-out rows (tip-adapter's search)

    def provenance(self, noise: dict[str, Any] | None) -> dict[str, Any]:
        """The ``run`` object of log lines: what ``report`` groups runs by."""
        from promptcli.learning.losses import loss_params

        record = self.features.model_record()
        run = {
            "method": self.options.method,
            "loss": self.options.loss,
            "loss_params": loss_params(self.loss_fn),
            "seed": self.options.seed,
            "shots": self.options.shots,
            "noise": noise_summary(noise),
            "model": {k: str(record[k]) for k in ("model_name", "pretrained", "checkpoint_sha256")},
        }
        from promptcli.learning.method_options import method_params

        params = method_params(self.options)
        if params:  # methods without settings of their own keep the provenance they always had
            run["method_params"] = params
        split = self.options.split_config()
        if split is not None:  # runs without a split keep the provenance they always had
            run["split"] = {"method": split.method, "noisy_loss": split.noisy_loss, "epsilon": split.epsilon}
        return run


def recorded_optimizer(optim: OptimConfig, method: str) -> dict[str, Any] | None:
    """The optimiser a prompt file records: None for a training-free method (tip-adapter), which uses none."""
    from promptcli.choices import Method

    return None if method == Method.TIP_ADAPTER.value else optim.to_dict()


def _log_settings(
    head: Any, optim: Any, method: str, search: list[dict[str, float]], n_views: int = 0
) -> dict[str, Any]:
    """The prompt's and the schedule's settings, as a prompt file records them, so ``report`` splits training
    curves by them as it splits evaluations (``n_views``: augmented views per image trained on)."""
    meta = head.file_metadata()
    settings: dict[str, Any] = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
    config = meta.get("prompt_config")
    if isinstance(config, dict) and "prompt.init_std" in config:
        settings["init_std"] = float(config["prompt.init_std"])
    settings.update(use_views=n_views > 0, n_views=n_views)
    settings["optimizer"] = recorded_optimizer(optim, method)
    if method == "linear-probe":
        settings["weight_decay_searched"] = bool(search)
    return settings


def check_shared_options(options: TuneOptions, *, split_ok: bool = False) -> list[str]:
    """The checks of every tune method, on cached features or on images (finetune, vpt, maple): numbers finite
    and in range, the split, the method's own options. Returns the warnings about options the run ignores, for
    the caller to give once its own checks have passed too (a refused run prints its one error line alone)."""
    from promptcli.choices import COOP_VARIANTS
    from promptcli.learning.losses import LOSSES, ignored_loss_options
    from promptcli.learning.method_options import check_method_options, check_unused_options
    from promptcli.models.heads import TEXT_METHODS

    warnings: list[str] = []
    warn = warnings.append
    check_finite_fields(options)
    check_seed(options.seed)
    split = SplitConfig(options.split, options.noisy_loss, options.ot_epsilon).validate()
    if split.method != "none" and not split_ok:
        raise InputError(
            f"--split {split.method} is only supported by `promptcli tune`",
            where="--split",
            hint="this command measures one loss for every sample: drop --split (or pass --split none)",
        )
    if split.method == "none" and (options.noisy_loss != "mae" or options.ot_epsilon != DEFAULT_EPSILON):
        warn("--noisy-loss and --ot-epsilon apply with --split ot; ignored")
    check_method_options(options, warn)
    check_unused_options(options, warn)
    changed = {f.name for f in fields(options) if getattr(options, f.name) != f.default}
    filled = options.resolved()  # a method's default warm-up can cover a short run too (--epochs 1)
    if filled.epochs and filled.warmup_epochs >= filled.epochs:
        warn(
            f"the warm-up (--warmup-epochs {filled.warmup_epochs}) covers all {filled.epochs} epochs: "
            f"the whole run trains at --warmup-lr {options.warmup_lr:g}; give more --epochs or fewer "
            "--warmup-epochs"
        )
    for option in ignored_loss_options(options.loss, changed):
        users = ", ".join(n for n, c in LOSSES.items() if option in c.takes)
        warn(f"--{option} applies to --loss {users}; ignored for {options.loss}")
    if options.method not in (*TEXT_METHODS, *COOP_VARIANTS) and (
        options.ctx_init or options.csc or options.class_position != "end"
    ):
        warn(f"--ctx-init, --csc and --class-position apply to prompt methods; ignored for {options.method}")
    if options.shots is not None and options.shots < 1:
        raise InputError("must be >= 1", where="--shots", hint="give the number of labelled images per class")
    return warnings


def check_options(
    options: TuneOptions, warn: Callable[[str], None], *, split_ok: bool = False
) -> tuple[Any, torch.nn.Module]:
    """Validate ``options`` before any file is read; return (prompt config or None, loss).

    A clean/noisy split (``options.split`` other than none) changes the loss per sample and epoch,
    which only a caller passing ``options.split_config()`` to :func:`train` honours: callers say so
    with ``split_ok`` (``tune`` does); others get a clear error rather than a silently ignored option.
    """
    from promptcli.choices import COOP_VARIANTS, IMAGE_METHODS, ZERO_SHOT_BASED
    from promptcli.learning.losses import make_loss
    from promptcli.learning.method_options import checked_prompt_config, coop_variant_config
    from promptcli.models.heads import TEXT_METHODS, check_method

    options = options.resolved()
    check_method(options.method)
    if options.method in IMAGE_METHODS:  # tune trains on cached features; these train on images
        raise InputError(
            f"{options.method} trains on images through the image tower, not on cached features",
            where="--method",
            hint="run it with `promptcli tune` or learning.finetune.finetune",
        )
    warnings = check_shared_options(options, split_ok=split_ok)
    prompt_config = None
    if options.method in TEXT_METHODS:
        prompt_config = checked_prompt_config(options)
    elif options.method in COOP_VARIANTS:
        prompt_config = coop_variant_config(options)
    # kgcoop formats --template for its zero-shot anchor
    if options.method in ("classifier-zs", "kgcoop", *ZERO_SHOT_BASED):
        from promptcli.models.zeroshot import check_template

        check_template(options.template)  # one {} or a clear --template error
    loss_fn = make_loss(
        options.loss,
        q=options.q,
        alpha=options.alpha,
        beta=options.beta,
        label_smoothing=options.label_smoothing,
    )
    options.optim_config(options.weight_decay).validate()
    for message in warnings:
        warn(message)
    return prompt_config, loss_fn


def prepare_run(
    features_path: str | Path,
    labels_path: str | Path,
    options: TuneOptions,
    *,
    device: str | torch.device = "auto",
    amp: bool = True,
    pretrained: str | None = None,
    info: Callable[[str], None] = lambda _: None,
    warn: Callable[[str], None] = warn_user,
    loaded: Any = None,
    split_ok: bool = False,
) -> PreparedRun:
    """Read the inputs, sample the shots, load the model and settle the weight decay, as ``tune`` does.

    ``loaded`` reuses a model already loaded for this features file (several runs on one file);
    ``split_ok`` as in :func:`check_options`.
    """
    from promptcli.io.features import read_features
    from promptcli.io.fileio import sha256_file
    from promptcli.io.labels import join_labels, labels_sha256, read_labels
    from promptcli.models.devices import resolve_device
    from promptcli.models.heads import build_head

    options = options.resolved()
    prompt_config, loss_fn = check_options(options, warn, split_ok=split_ok)
    torch_device = resolve_device(str(device))
    table = read_labels(labels_path)
    # only the labelled images are read: 16 shots of a million-image file are 16,000 rows
    fs = read_features(features_path, load_views=options.use_views, only_paths=table.column("path"))
    labels_sha = labels_sha256(table, labels_path)
    features_sha = sha256_file(features_path)
    joined = join_labels(fs, table, skip_missing=options.skip_missing)
    index = np.arange(len(joined.labels))
    short: dict[int, int] = {}
    if options.shots is not None:
        index, short = sample_shots(joined.labels, options.shots, options.seed, len(fs.classnames))
        for c, have in short.items():
            warn(
                f"class {fs.classnames[c]!r} has only {have} labelled image(s), fewer than --shots {options.shots}"
            )
    rows = joined.rows[index]
    present = len(np.unique(joined.labels[index]))
    if options.split != "none" and present < len(fs.classnames):
        warn(
            f"--split {options.split} gives every one of the features' {len(fs.classnames)} classes equal mass, "
            f"but the labels name only {present}: most labels will be judged noisy (tune on features of the "
            "labelled classes only, or drop --split)"
        )
    data: TrainData = TrainData(
        features=torch.from_numpy(fs.features[rows]),
        labels=torch.from_numpy(joined.labels[index]),
        views=torch.from_numpy(fs.views[rows]) if fs.views is not None and options.use_views else None,
        clean=None if joined.clean is None else torch.from_numpy(joined.clean[index]),
        is_noisy=None if joined.is_noisy is None else torch.from_numpy(joined.is_noisy[index]),
    )

    val_data = None
    if options.val_fraction is not None:  # tip-adapter(-f): rows held out for the (alpha, beta) search
        from promptcli.learning.method_options import hold_out_validation

        data, val_data = hold_out_validation(data, options)
    if options.method != "linear-probe" and loaded is None:
        from promptcli.models.loading import load_model_from_record

        loaded = load_model_from_record(
            fs.attrs, source=fs.path, pretrained=pretrained, device=str(torch_device), dim=fs.dim
        )
    elif loaded is not None:  # a caller's model (a sweep's, loaded once) must fit these features too
        from promptcli.models.loading import check_embed_dim

        check_embed_dim(loaded, fs.dim, where=fs.path)

    def make_head() -> Head:
        generator = torch.Generator().manual_seed(options.seed)
        return build_head(
            options.method,
            classnames=fs.classnames,
            dim=fs.dim,
            loaded=loaded,
            prompt_config=prompt_config if prompt_config is not None else options,
            generator=generator,
            options=options,
            data=data,
        )

    search: list[dict[str, float]] = []
    weight_decay = options.weight_decay
    if weight_decay is None and options.method == "linear-probe":
        info(f"Choosing the weight decay on a held-out {HELD_OUT_FRACTION:.0%} of the labels")
        weight_decay, search = select_weight_decay(
            make_head,
            data,
            loss_fn,
            options.optim_config(0.0),
            seed=options.seed,
            device=torch_device,
            amp=amp,
            split=options.split_config(),
        )
        if weight_decay is None:
            warn("too few labels to hold some out; using weight decay 5e-4")
    return PreparedRun(
        options=options,
        features=fs,
        joined=joined,
        index=index,
        data=data,
        loss_fn=loss_fn,
        prompt_config=prompt_config,
        optim=options.optim_config(weight_decay),
        weight_decay_search=search,
        make_head=make_head,
        device=torch_device,
        features_sha=features_sha,
        labels_sha=labels_sha,
        labels_source=table.source,
        short=short,
        loaded=loaded,
        val_data=val_data,
    )


@locks_output("output", "log_path")
def tune(
    features_path: str | Path,
    labels_path: str | Path,
    output: str | Path,
    options: TuneOptions,
    *,
    device: str = "auto",
    amp: bool = True,
    pretrained: str | None = None,
    resume: bool = False,
    force: bool = False,
    log_path: str | Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    info: Callable[[str], None] = lambda _: None,
    warn: Callable[[str], None] = warn_user,
) -> dict[str, Any]:
    """Learn a prompt (or head) from cached features and labels; write it to ``output``; return a summary."""
    from promptcli.io import provenance
    from promptcli.io.fileio import check_distinct, check_jsonl_prefix, check_output_path
    from promptcli.learning.losses import loss_params
    from promptcli.learning.method_options import CLASS_CHUNK_METHODS, method_params
    from promptcli.learning.training import autocast_dtype
    from promptcli.models.devices import runtime_record
    from promptcli.models.heads import save_head

    options = options.resolved()  # the method's defaults, recorded as used
    # errors before any file is touched; prepare_run checks again and warns
    check_options(options, lambda _: None, split_ok=True)
    check_distinct(
        {"FEATURES": features_path, "LABELS": labels_path},
        {"-o": output, "--log": log_path, "the checkpoint -o.partial": partial_path(output)},
    )
    if resume and not force and Path(output).exists() and not partial_path(output).exists():
        finished = finished_run(Path(output), features_path, labels_path, options)
        if finished is not None:
            return finished
    output = check_output_path(output, force)
    partial = partial_path(output)
    if partial.exists() and not resume:
        if not force:
            raise InputError(
                "an interrupted tune left a checkpoint",
                where=partial,
                hint="pass --resume to continue it, or --force to start over",
            )
        remove_file(partial)
    if log_path is not None:  # on resume the log is rewritten (checked below to be this run's)
        check_output_path(log_path, force or resume, option="--log")

    run = prepare_run(
        features_path,
        labels_path,
        options,
        device=device,
        amp=amp,
        pretrained=pretrained,
        info=info,
        warn=warn,
        split_ok=True,
    )
    split = options.split_config()
    fs, joined, data, loss_fn, optim = run.features, run.joined, run.data, run.loss_fn, run.optim
    search = run.weight_decay_search
    noise = read_noise_sidecar(labels_path, warn)

    identity = {
        "features": run.features_sha,
        "labels": run.labels_sha,
        "options": asdict(options),
        "weight_decay": optim.weight_decay,
    }
    run_id, identity_text = fingerprint(identity), json.dumps(identity, sort_keys=True, default=str)
    head = run.make_head()
    n_views = 0 if data.views is None else int(data.views.shape[1])
    runtime = runtime_record(run.device, autocast_dtype(run.device, amp))
    run_info = {
        **run.provenance(noise),
        "settings": _log_settings(head, optim, options.method, search, n_views),
        "runtime": runtime,
    }
    # Check a checkpoint to resume before touching the log: a refused resume must leave the log intact.
    history = (
        load_checkpoint(partial, run_id, identity_text)["history"] if resume and partial.exists() else []
    )
    log_handle = None
    if log_path is not None and resume:  # the log is rewritten: only if it is this run's
        # (where it ran may differ: a run resumed on another machine, a log written before runtime was recorded)
        check_jsonl_prefix(
            log_path, [{**row, "run": run_info} for row in history], force, ignore_run_keys=("runtime",)
        )
    if log_path is not None:
        log_handle = open(log_path, "w", encoding="utf-8")
        for row in history:  # the log restarts with the epochs the checkpoint already holds
            log_handle.write(json.dumps({**row, "run": run_info}, sort_keys=True) + "\n")

    def log_epoch(row: dict[str, Any]) -> None:
        if log_handle is not None:
            log_handle.write(json.dumps({**row, "run": run_info}, sort_keys=True) + "\n")
            log_handle.flush()
        if on_epoch is not None:
            on_epoch(row)

    try:
        if resume and partial.exists():
            info(f"Resuming from {partial}")
        result = train(
            head,
            data,
            loss_fn,
            optim,
            seed=options.seed,
            device=run.device,
            amp=amp,
            checkpoint=partial,
            resume=resume,
            fingerprint=run_id,
            identity=identity_text,
            on_epoch=log_epoch,
            split=split,
        )
    finally:
        if log_handle is not None:
            log_handle.close()

    search_result = None
    if run.val_data is not None and hasattr(head, "search"):
        search_result = head.search(run.val_data.features.to(run.device), run.val_data.labels.to(run.device))
        info(
            f"Chose alpha {search_result['alpha']:.3g}, beta {search_result['beta']:.3g} on {len(run.val_data)} held-out rows"
        )
    record = fs.model_record()
    metadata: dict[str, Any] = {
        "method": options.method,
        "classnames": list(fs.classnames),
        "model_name": str(record["model_name"]),
        "pretrained": str(record["pretrained"]),
        "checkpoint_sha256": str(record["checkpoint_sha256"]),
        "model_config": str(record["model_config"]),
        "preprocess": str(
            fs.attrs.get("preprocess", "")
        ),  # eval warns when test features were made otherwise
        "embed_dim": fs.dim,
        "loss": options.loss,
        "loss_params": loss_params(loss_fn),
        "optimizer": recorded_optimizer(optim, options.method),
        "seed": options.seed,
        "shots": options.shots,
        "use_views": data.views is not None,
        "n_views": 0 if data.views is None else int(data.views.shape[1]),
        "features_sha256": run.features_sha,
        "run_identity": run_identity_text(run.features_sha, run.labels_sha, options),
        "features_file": str(features_path),
        "labels_sha256": run.labels_sha,
        "labels_file": run.labels_source,
        "n_train": len(data),
        "n_skipped": joined.n_skipped,
        "metrics": result.final,
        "split": {"method": "none"} if split is None else split.to_dict(),
        "runtime": runtime,
        **provenance.base_provenance(),
    }
    if search:
        metadata["weight_decay_search"] = search
    if run.val_data is not None:
        metadata["n_val"] = len(run.val_data)
    params = method_params(options)
    if params:
        metadata["method_params"] = params
    # how the text pass was computed (the result is the same up to rounding); methods without one ignore it
    if options.class_chunk and options.method in CLASS_CHUNK_METHODS:
        metadata["class_chunk"] = options.class_chunk
    if noise is not None:
        metadata["noise"] = noise_summary(noise)
    try:
        save_head(output, head, metadata)
    except OutputTaken as taken:  # another command wrote -o meanwhile: the checkpoint keeps this run's work
        raise OutputTaken(output, kept=partial) from taken
    remove_file(partial)
    times = [r["time"] for r in result.history[result.resumed_from :]]
    extra = {} if search_result is None else {"tip_search": search_result}
    return {
        **extra,
        "output": str(output),
        "method": options.method,
        "loss": loss_params(loss_fn),
        "optimizer": recorded_optimizer(optim, options.method),
        "weight_decay_search": search,
        "n_train": len(data),
        "n_skipped": joined.n_skipped,
        "skipped": joined.skipped[:20],
        "short_classes": {fs.classnames[c]: n for c, n in run.short.items()},
        "resumed_from_epoch": result.resumed_from,
        "seconds_per_epoch": float(np.mean(times)) if times else None,
        "metrics": result.final,
        "split": None if split is None else split.to_dict(),
        "noise": noise_summary(noise),
        "log": str(log_path) if log_path is not None else None,
    }
