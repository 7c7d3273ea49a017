"""Device and precision selection (``--device auto|cpu|cuda|cuda:N``, ``--precision fp32|fp16|bf16``)."""

from __future__ import annotations

import re

import torch

from promptcli.errors import InputError

PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a device option into a ``torch.device``; ``auto`` picks CUDA when present."""
    spec = "auto" if spec is None else spec.strip().lower()  # "" is no device (an unset shell variable?)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not match:
        raise InputError(f"unknown device {spec!r}", where="--device", hint="use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(
            f"{spec} requested but CUDA is not available",
            where="--device",
            hint="use --device cpu (or auto)",
        )
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise InputError(
            f"{spec} requested but only {torch.cuda.device_count()} GPU(s) are visible",
            where="--device",
            hint="pick an index below the GPU count",
        )
    return torch.device("cuda", index)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for ``precision`` on ``device``; half precision is GPU-only."""
    precision = precision.lower()
    if precision not in _DTYPES:
        raise InputError(
            f"unknown precision {precision!r}", where="--precision", hint="use fp32, fp16 or bf16"
        )
    if precision != "fp32" and device.type != "cuda":
        raise InputError(
            f"{precision} needs a GPU, running on {device}",
            where="--precision",
            hint="use --precision fp32 on CPU",
        )
    return _DTYPES[precision]
