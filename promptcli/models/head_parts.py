"""Small pieces shared by the heads of the CoOp variants and the adapters (kgcoop, cocoop, clip-adapter, tip-adapter)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from promptcli.errors import InputError


def seeded_linear(n_in: int, n_out: int, bias: bool, generator: torch.Generator | None) -> nn.Linear:
    """``nn.Linear`` with PyTorch's default initialisation drawn from ``generator`` (reproducible per seed)."""
    layer = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        if layer.bias is not None:
            bound = 1.0 / math.sqrt(n_in) if n_in > 0 else 0.0
            layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


def zero_shot_text(loaded: Any, classnames: Sequence[str], template: str) -> torch.Tensor:
    """(C, D) float32 normalised zero-shot class text features of one template, on the CPU."""
    from promptcli.models.zeroshot import class_text_embeddings

    return class_text_embeddings(loaded, list(classnames), [template]).float().cpu()


def check_state(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """One-line error unless ``tensors`` holds exactly the ``expected`` names with those shapes."""
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if got != expected:

        def describe(shapes: dict[str, tuple[int, ...]]) -> str:
            return ", ".join(f"{k} {list(v)}" for k, v in sorted(shapes.items())) or "none"

        raise InputError(
            f"tensors {describe(got)} do not fit this {what} head ({describe(expected)})",
            where="prompt state",
            hint="use the class list, model and settings the prompt was trained with",
        )


def metadata_float(metadata: dict[str, Any], key: str) -> float:
    """A finite float the head stored in its file's metadata (one-line error when missing or damaged)."""
    try:
        value = float(metadata[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"metadata {key!r} missing or not a number", hint="the prompt file is damaged"
        ) from exc
    if not math.isfinite(value):
        raise InputError(f"metadata {key!r} is {value}", hint="the prompt file is damaged")
    return value
