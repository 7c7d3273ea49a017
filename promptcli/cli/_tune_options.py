"""The training options of ``tune``, defined once and shared by every command that trains (``gradstats``).

A command declares its own arguments plus ``**training`` and is decorated with
:func:`with_training_options`, which gives typer the parameters below. :func:`tune_options` turns the
parsed values into :class:`~promptcli.learning.options.TuneOptions` by an explicit, checked mapping:
every field must be supplied and every parameter used, so a renamed option fails loudly (and a test
checks the two definitions against each other) instead of silently falling back to a default.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import fields
from typing import Annotated, Any

import typer

from promptcli.choices import ClassPosition, Loss, NoisyLoss, Optimizer, Schedule, Split
from promptcli.learning.options import DEFAULT_EPSILON, TuneOptions

_P = inspect.Parameter


def _opt(annotation: Any, default: Any) -> tuple[Any, Any]:
    return annotation, default


# name -> (annotation, default): the options every training command takes (besides --method).
TRAINING_OPTIONS: dict[str, tuple[Any, Any]] = {
    "n_ctx": _opt(
        Annotated[int, typer.Option("--n-ctx", help="Number of learned context tokens (coop).")], 16
    ),
    "ctx_init": _opt(
        Annotated[
            str | None,
            typer.Option(
                "--ctx-init",
                help='Initialise the context from these words, e.g. "a photo of a" [default: random; kgcoop '
                'and cocoop: "a photo of a"; "" for random].',
            ),
        ],
        None,
    ),
    "class_position": _opt(
        Annotated[
            ClassPosition,
            typer.Option("--class-position", help="Where the class name goes in the prompt (coop)."),
        ],
        ClassPosition.END,
    ),
    "csc": _opt(
        Annotated[bool, typer.Option("--csc", help="Class-specific context (one context per class).")], False
    ),
    "template": _opt(
        Annotated[
            str,
            typer.Option(
                "--template",
                help="Template with one {} for the class: the prompt of cls-tuning / full-prompt, the zero-shot "
                "classifier of classifier-zs, clip-adapter, tip-adapter(-f), finetune, vpt and maple, and "
                "kgcoop's anchor.",
            ),
        ],
        "a photo of a {}.",
    ),
    "init_std": _opt(
        Annotated[float, typer.Option("--init-std", help="Std of the random context init.")], 0.02
    ),
    "class_chunk": _opt(
        Annotated[
            int,
            typer.Option(
                "--class-chunk",
                help="Prompt methods: compute the text pass and its backward N classes at a time, so "
                "memory stays bounded with many classes (one extra text forward per step); 0: all at once.",
            ),
        ],
        0,
    ),
    "loss": _opt(Annotated[Loss, typer.Option("--loss", help="Training loss.")], Loss.CE),
    "q": _opt(Annotated[float, typer.Option("--q", help="GCE exponent q in (0, 1].")], 0.7),
    "alpha": _opt(Annotated[float, typer.Option("--alpha", help="SCE weight of the cross-entropy.")], 0.1),
    "beta": _opt(
        Annotated[float, typer.Option("--beta", help="SCE weight of the reverse cross-entropy.")], 1.0
    ),
    "label_smoothing": _opt(
        Annotated[float, typer.Option("--label-smoothing", help="Label smoothing epsilon (ce, sce).")], 0.0
    ),
    "epochs": _opt(
        Annotated[
            int | None,
            typer.Option(
                "--epochs",
                help="Training epochs [default: 50; cocoop: 10; tip-adapter-f: 20; vpt and maple: 5; tip-adapter: 0].",
            ),
        ],
        None,
    ),
    "lr": _opt(
        Annotated[
            float | None,
            typer.Option(
                "--lr",
                help="Learning rate [default: 0.002; linear-probe and classifier-zs: 1.0; tip-adapter-f: "
                "0.001; vpt: 0.0025; maple: 0.0035; finetune: 1e-5 with adamw, 1e-4 with sgd].",
            ),
        ],
        None,
    ),
    "momentum": _opt(Annotated[float, typer.Option("--momentum", help="SGD momentum.")], 0.9),
    "weight_decay": _opt(
        Annotated[
            float | None,
            typer.Option(
                "--weight-decay",
                help="Weight decay [default: 5e-4; tip-adapter-f: 0.01; linear-probe: chosen on held-out labels].",
            ),
        ],
        None,
    ),
    "warmup_epochs": _opt(
        Annotated[
            int | None,
            typer.Option("--warmup-epochs", help="Epochs at the warm-up lr [default: 1; tip-adapter-f: 0]."),
        ],
        None,
    ),
    "warmup_lr": _opt(
        Annotated[float, typer.Option("--warmup-lr", help="Constant warm-up learning rate.")], 1e-5
    ),
    "schedule": _opt(
        Annotated[
            Schedule | None,
            typer.Option(
                "--schedule",
                help="Cosine after the warm-up: on the epoch index from 0 (cosine), or from the full rate "
                "once the warm-up ends, as CoOp's code (coop) [default: cosine; cocoop, vpt, maple: coop].",
            ),
        ],
        None,
    ),
    "batch_size": _opt(
        Annotated[
            int | None,
            typer.Option(
                "--batch-size",
                "-b",
                help="Batch size [default: 32; cocoop 1, vpt and maple 4, tip-adapter-f 256: their papers'].",
            ),
        ],
        None,
    ),
    "optimizer": _opt(
        Annotated[
            Optimizer | None,
            typer.Option("--optimizer", help="Optimiser [default: sgd; tip-adapter-f, finetune: adamw]."),
        ],
        None,
    ),
    "shots": _opt(
        Annotated[
            int | None, typer.Option("--shots", help="Use K labelled images per class (seeded sample).")
        ],
        None,
    ),
    "split": _opt(
        Annotated[
            Split,
            typer.Option("--split", help="Split clean from noisy labels each epoch (ot: optimal transport)."),
        ],
        Split.NONE,
    ),
    "noisy_loss": _opt(
        Annotated[
            NoisyLoss,
            typer.Option("--noisy-loss", help="With --split ot, the loss of noisy samples (none: dropped)."),
        ],
        NoisyLoss.MAE,
    ),
    "ot_epsilon": _opt(
        Annotated[
            float, typer.Option("--ot-epsilon", help="With --split ot, the Sinkhorn entropic regularisation.")
        ],
        DEFAULT_EPSILON,
    ),
    "kg_lambda": _opt(
        Annotated[
            float,
            typer.Option(
                "--kg-lambda", help="kgcoop: weight of the distance to the zero-shot class text features."
            ),
        ],
        8.0,
    ),
    "adapter_ratio": _opt(
        Annotated[
            float,
            typer.Option(
                "--adapter-ratio", help="clip-adapter: residual ratio alpha in [0, 1] (0: zero-shot)."
            ),
        ],
        0.2,
    ),
    "tip_alpha": _opt(
        Annotated[float, typer.Option("--tip-alpha", help="tip-adapter(-f): weight of the cache logits.")],
        1.0,
    ),
    "tip_beta": _opt(
        Annotated[
            float, typer.Option("--tip-beta", help="tip-adapter(-f): sharpness of the cache affinities.")
        ],
        1.0,
    ),
    "val_fraction": _opt(
        Annotated[
            float | None,
            typer.Option(
                "--val-fraction",
                help="tip-adapter(-f): hold out this fraction of the labels and choose --tip-alpha/--tip-beta "
                "on it by the paper's grid search.",
            ),
        ],
        None,
    ),
    "no_views": _opt(
        Annotated[bool, typer.Option("--no-views", help="Train on the plain features even if views exist.")],
        False,
    ),
    "seed": _opt(Annotated[int, typer.Option("--seed", help="Random seed.")], 0),
    "skip_missing": _opt(
        Annotated[
            bool,
            typer.Option("--skip-missing", help="Skip label rows whose path or class the features lack."),
        ],
        False,
    ),
}

# CLI parameter -> (TuneOptions field, conversion); every other parameter maps onto the field of its name.
_RENAMED: dict[str, tuple[str, Callable[[Any], Any]]] = {"no_views": ("use_views", lambda v: not v)}


def with_training_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``func(own..., **training)`` a signature that lists :data:`TRAINING_OPTIONS`, for typer."""
    own = [
        p for p in inspect.signature(func, eval_str=True).parameters.values() if p.kind is not _P.VAR_KEYWORD
    ]
    taken = {p.name for p in own}
    shared = [
        _P(name, _P.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, (annotation, default) in TRAINING_OPTIONS.items()
        if name not in taken
    ]
    own = [p.replace(kind=_P.KEYWORD_ONLY) if p.default is not _P.empty else p for p in own]
    positional = [p for p in own if p.kind is not _P.KEYWORD_ONLY]
    keyword = [p for p in own if p.kind is _P.KEYWORD_ONLY]
    params = positional + keyword + shared
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {p.name: p.annotation for p in params}  # evaluated: typer reads them
    return func


def tune_options(method: str, values: dict[str, Any], **own: Any) -> TuneOptions:
    """The :class:`TuneOptions` of ``method`` from parsed CLI ``values`` (exactly the training options).

    ``own`` sets the fields a command supplies from options of its own.
    """
    unknown = set(values) - set(TRAINING_OPTIONS)
    missing = set(TRAINING_OPTIONS) - set(values)
    if unknown or missing:
        raise TypeError(f"training options out of step: unknown {sorted(unknown)}, missing {sorted(missing)}")
    kwargs: dict[str, Any] = {"method": str(method), **own}
    for name, value in values.items():
        field_name, convert = _RENAMED.get(name, (name, lambda v: v))
        kwargs[field_name] = str(value) if hasattr(value, "value") else convert(value)
    expected = {f.name for f in fields(TuneOptions)}
    if set(kwargs) != expected:
        raise TypeError(f"TuneOptions fields without a CLI option: {sorted(expected - set(kwargs))}")
    return TuneOptions(**kwargs)
