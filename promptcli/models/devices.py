"""Device and precision selection (``--device auto|cpu|cuda|cuda:N``, ``--precision fp32|fp16|bf16``)."""

from __future__ import annotations

import re
from typing import Any

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
    if match.group(1) is not None:
        # what is not told its device uses the current one: DataLoaders pin memory through it (else GPU 0 gets a
        # CUDA context of its own, and fails when another job holds it exclusively)
        torch.cuda.set_device(index)
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
    if precision == "bf16" and not bf16_ok(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise InputError(
            f"bf16 needs an Ampere or newer GPU (compute capability 8.0+); {device} has {major}.{minor}",
            where="--precision",
            hint="use --precision fp16 (or fp32)",
        )
    return _DTYPES[precision]


def bf16_ok(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CUDA GPU of compute capability 8.0 or more.

    (``torch.cuda.is_bf16_supported()`` also says yes for older GPUs, which only emulate it, asks about the
    current GPU rather than ``device``, and cuDNN has no bf16 convolutions there.)"""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def amp_dtype(device: torch.device) -> torch.dtype:
    """The half-precision dtype of mixed precision on a CUDA ``device``: bf16 where native, else fp16 (which
    needs loss scaling)."""
    return torch.bfloat16 if bf16_ok(device) else torch.float16


def runtime_record(device: torch.device | str, autocast: torch.dtype | None = None) -> dict[str, Any]:
    """Where and how a command computed, for its output's provenance: the device (``cuda:N`` and the GPU's name
    on CUDA, with the CUDA and cuDNN versions), whether autocast ran and in which dtype, torch's CPU threads."""
    device = torch.device(device)
    record: dict[str, Any] = {
        "device": str(device),
        "autocast": autocast is not None,
        "autocast_dtype": None if autocast is None else str(autocast).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        record.update(
            device=f"cuda:{index}",
            device_name=torch.cuda.get_device_name(index),
            cuda_version=torch.version.cuda,
            cudnn_version=None if cudnn is None else str(cudnn),
        )
    return record
