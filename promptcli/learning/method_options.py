"""The options of the CoOp variants and the adapters (kgcoop, cocoop, clip-adapter, tip-adapter[-f]).

Checked before any file is read, each bad value a one-line error naming its option.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from promptcli.choices import (
    COOP_VARIANTS,
    IMAGE_METHODS,
    PROMPT_METHODS,
    TIP_METHODS,
    ZERO_SHOT_BASED,
    Method,
    Optimizer,
)
from promptcli.errors import InputError, warn_user
from promptcli.learning.options import TuneOptions

# option -> (field, its default, the methods that use it): set for another method, it is ignored.
_OWN_OPTIONS = {
    "--kg-lambda": ("kg_lambda", TuneOptions.kg_lambda, (Method.KGCOOP.value,)),
    "--adapter-ratio": ("adapter_ratio", TuneOptions.adapter_ratio, (Method.CLIP_ADAPTER.value,)),
    "--tip-alpha": ("tip_alpha", TuneOptions.tip_alpha, TIP_METHODS),
    "--tip-beta": ("tip_beta", TuneOptions.tip_beta, TIP_METHODS),
}


def method_params(options: TuneOptions) -> dict[str, float]:
    """The method's own settings (``--kg-lambda``, ``--adapter-ratio``, ``--tip-alpha/--tip-beta``):
    recorded in the prompt file and its log, so that ``report`` keeps runs with different values apart.
    With ``--val-fraction`` tip-adapter's alpha and beta are searched, so the fraction is recorded instead."""
    method = options.method
    if method in TIP_METHODS and options.val_fraction is not None:
        return {"val_fraction": float(options.val_fraction)}
    return {
        name: float(getattr(options, name)) for name, _, methods in _OWN_OPTIONS.values() if method in methods
    }


def check_method_options(options: TuneOptions, warn: Callable[[str], None] = warn_user) -> None:
    """Refuse values out of range; warn about a method's option given to another method (ignored)."""
    method = options.method
    for option, (name, default, methods) in _OWN_OPTIONS.items():
        if method not in methods and getattr(options, name) != default:
            warn(f"{option} applies to {', '.join(methods)}; ignored for {method}")
    if not (math.isfinite(options.kg_lambda) and options.kg_lambda >= 0):
        raise InputError(
            f"must be a finite number >= 0 (got {options.kg_lambda})",
            where="--kg-lambda",
            hint="the paper uses 8.0",
        )
    if not (math.isfinite(options.adapter_ratio) and 0 <= options.adapter_ratio <= 1):
        raise InputError(
            f"must be in [0, 1] (got {options.adapter_ratio})",
            where="--adapter-ratio",
            hint="the paper uses 0.2",
        )
    for value, option in ((options.tip_alpha, "--tip-alpha"), (options.tip_beta, "--tip-beta")):
        if not (math.isfinite(value) and value >= 0):
            raise InputError(
                f"must be a finite number >= 0 (got {value})", where=option, hint="the paper uses 1.0"
            )
    if options.val_fraction is not None:
        if method not in TIP_METHODS:
            raise InputError(
                f"--val-fraction applies to tip-adapter and tip-adapter-f, not {method}",
                where="--val-fraction",
                hint="drop --val-fraction",
            )
        if not (math.isfinite(options.val_fraction) and 0 < options.val_fraction < 1):
            raise InputError(
                f"must be in (0, 1) (got {options.val_fraction})", where="--val-fraction", hint="e.g. 0.2"
            )
    if method == Method.TIP_ADAPTER.value and options.epochs:
        raise InputError(
            "tip-adapter is training-free",
            where="--epochs",
            hint="drop --epochs (or use --method tip-adapter-f, which fine-tunes the cache keys)",
        )
    if method != Method.TIP_ADAPTER.value and options.epochs == 0:  # kept: an untrained prompt is a check
        warn(f"--epochs 0: {method} is saved untrained, with its initial weights")
    if method == Method.COCOOP.value and (options.csc or options.class_position != "end"):
        raise InputError(
            "cocoop shifts one shared context placed before the class name",
            where="--csc" if options.csc else "--class-position",
            hint="drop --csc and --class-position for cocoop",
        )


# TuneOptions fields that set how a run trains: training-free tip-adapter reads none of them.
_TRAINING_FIELDS = (
    "loss", "q", "alpha", "beta", "label_smoothing", "optimizer", "lr", "momentum", "weight_decay",
    "warmup_epochs", "warmup_lr", "schedule", "batch_size", "split", "noisy_loss", "ot_epsilon",
)  # fmt: skip
# Methods whose prompt formats --template: the fixed words of cls-tuning / full-prompt, a zero-shot classifier or
# anchor (coop, cocoop and linear-probe have none).
_TEMPLATE_METHODS = (
    Method.CLS_TUNING.value, Method.FULL_PROMPT.value, Method.CLASSIFIER_ZS.value, Method.KGCOOP.value,
    *ZERO_SHOT_BASED, *IMAGE_METHODS,
)  # fmt: skip
# Methods whose text pass with gradient runs over the class prompts (cocoop's runs per image).
CLASS_CHUNK_METHODS = (*PROMPT_METHODS, Method.KGCOOP.value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_unused_options(options: TuneOptions, warn: Callable[[str], None] = warn_user) -> None:
    """Refuse the training options for training-free tip-adapter (its file would record a loss or split it never
    used), and warn about a shared option set away from its default that this method and setting do not read."""
    o = options.resolved()
    method = str(o.method)
    base = TuneOptions(method=method).resolved()
    changed = [f.name for f in fields(o) if getattr(o, f.name) != getattr(base, f.name)]
    if method == Method.TIP_ADAPTER.value:
        training = [name for name in _TRAINING_FIELDS if name in changed]
        if training:
            raise InputError(
                f"tip-adapter is training-free: {', '.join(map(_flag, training))} "
                f"set{'' if len(training) > 1 else 's'} how a run trains",
                where=_flag(training[0]),
                hint=f"drop {'them' if len(training) > 1 else 'it'} (or use --method tip-adapter-f, which trains the "
                "cache keys)",
            )
    random_ctx = (method == Method.COOP.value and o.ctx_init is None) or (
        method in COOP_VARIANTS and o.ctx_init == ""
    )
    for name in ("n_ctx", "init_std"):
        if name in changed and not random_ctx:
            if method in (Method.COOP.value, *COOP_VARIANTS):
                why = f"{method} starts its context from --ctx-init's words"
            elif method == Method.MAPLE.value:
                why = "maple learns the paper's 2 context tokens (the template's first words)"
            else:
                why = f"{method} learns no random context"
            warn(
                f'{_flag(name)} sets a random context (coop; kgcoop, cocoop with --ctx-init ""): {why}; ignored'
            )
    if "template" in changed and method not in _TEMPLATE_METHODS:
        warn(f"--template applies to {', '.join(_TEMPLATE_METHODS)}; ignored for {method}")
    if "class_chunk" in changed and method not in CLASS_CHUNK_METHODS:
        warn(
            f"--class-chunk applies to the class text pass of {', '.join(CLASS_CHUNK_METHODS)}; ignored for {method}"
        )
    if method != Method.TIP_ADAPTER.value:
        if "momentum" in changed and o.optimizer != Optimizer.SGD.value:
            warn(f"--momentum applies to --optimizer sgd; ignored for {o.optimizer}")
        if "warmup_lr" in changed and not (o.warmup_epochs and o.epochs):
            warn("--warmup-lr applies with --warmup-epochs above 0; ignored")


def coop_variant_config(options: TuneOptions) -> Any:
    """The CoOp prompt of kgcoop and cocoop: context from --ctx-init, default "a photo of a" (both
    papers' initialisation; --n-ctx applies only with --ctx-init "")."""
    from promptcli.models.cocoop import DEFAULT_CTX_INIT

    ctx_init = DEFAULT_CTX_INIT if options.ctx_init is None else (options.ctx_init or None)
    return checked_prompt_config(options, method="coop", ctx_init=ctx_init)


_OWN = object()  # checked_prompt_config: keep the options' own value


def checked_prompt_config(options: TuneOptions, *, method: str | None = None, ctx_init: Any = _OWN) -> Any:
    """The validated :class:`PromptConfig` of ``options`` (``method`` and ``ctx_init`` replace theirs)."""
    from promptcli.models.prompt_learner import PromptConfig

    config = PromptConfig(
        method=method or options.method,
        n_ctx=options.n_ctx,
        ctx_init=options.ctx_init if ctx_init is _OWN else ctx_init,
        class_position=options.class_position,
        csc=options.csc,
        template=options.template,
        init_std=options.init_std,
        class_chunk=options.class_chunk,
    )
    config.validate()
    return config


def hold_out_validation(data: Any, options: TuneOptions) -> tuple[Any, Any]:
    """(train, validation) TrainData: a seeded stratified ``--val-fraction`` of the rows held out."""
    from promptcli.learning.training import held_out_split

    train_idx, val_idx = held_out_split(data.labels.numpy(), options.seed, float(options.val_fraction))
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise InputError(
            "too few labelled rows to hold some out", where="--val-fraction", hint="drop --val-fraction"
        )
    return data.subset(train_idx), data.subset(val_idx)
