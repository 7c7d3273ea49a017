"""The learned-prompt file: a safetensors file of the learned tensors plus string metadata.

safetensors metadata is ``dict[str, str]``: string values are stored as they are, every other value
as JSON, and the ``json_keys`` entry lists which keys are JSON so that reading gives back exactly the
dict that was written. The layout is documented in docs/formats.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from promptcli.errors import InputError, PromptcliError, RuntimeFailure
from promptcli.io.fileio import atomic_path, check_input_file

FORMAT = "promptcli-prompt"
FORMAT_VERSION = 1
RESERVED = ("format", "format_version", "json_keys")


@dataclass
class PromptFile:
    """A prompt file in memory: learned tensors and decoded metadata."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.metadata.get("method", ""))

    @property
    def classnames(self) -> list[str]:
        return list(self.metadata.get("classnames", []))

    def model_identity(self) -> dict[str, str]:
        return {k: str(self.metadata.get(k, "")) for k in ("model_name", "pretrained", "checkpoint_sha256")}


def encode_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    """Strings as-is, everything else as JSON, plus ``format``, ``format_version`` and ``json_keys``."""
    clash = [k for k in RESERVED if k in metadata]
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved")
    out: dict[str, str] = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    json_keys = []
    for key, value in metadata.items():
        if isinstance(value, str):
            out[key] = value
        else:
            out[key] = json.dumps(value, sort_keys=True)
            json_keys.append(key)
    out["json_keys"] = json.dumps(sorted(json_keys))
    return out


def decode_metadata(raw: dict[str, str], where: str | Path = "") -> dict[str, Any]:
    """The metadata dict :func:`encode_metadata` was given; a damaged entry is an InputError naming it."""
    if raw.get("format") != FORMAT:
        raise InputError("not a promptcli prompt file", where=where, hint="make it with `promptcli tune`")
    key = "format_version"
    try:
        if int(raw.get("format_version", "0") or 0) > FORMAT_VERSION:
            raise InputError("prompt file from a newer promptcli", where=where, hint="upgrade promptcli")
        key = "json_keys"
        json_keys = json.loads(raw.get("json_keys", "[]"))
        if not isinstance(json_keys, list):
            raise ValueError("not a list")
        out = {}
        for key, value in raw.items():
            if key not in RESERVED:
                out[key] = json.loads(value) if key in json_keys else value
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise InputError(
            f"damaged metadata entry {key!r} ({exc})",
            where=where,
            hint="make the prompt file again with tune",
        ) from exc
    return out


def check_finite_tensors(
    tensors: dict[str, torch.Tensor], where: str | Path, error: type[PromptcliError] = InputError
) -> None:
    """Refuse tensors holding NaN or inf (a diverged training must never be saved or used)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise error(
                f"tensor {name!r} holds NaN or inf values",
                where=where,
                hint="training diverged: tune again with a lower --lr",
            )


def save_prompt(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write tensors (CPU, contiguous) and metadata atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    check_finite_tensors(tensors, path, RuntimeFailure)  # a bug or a divergence, not the user's input
    encoded = encode_metadata(metadata)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=encoded)
    return path


def read_prompt(path: str | Path) -> PromptFile:
    """Read a prompt file; a clear error when it is missing or not one of ours."""
    from safetensors import safe_open

    path = check_input_file(path, "prompt file", "make it with `promptcli tune`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for foreign files
        raise InputError(
            "not a safetensors prompt file", where=path, hint="make it with `promptcli tune`"
        ) from exc
    metadata = decode_metadata(raw, path)
    check_metadata_types(metadata, path)
    check_tensor_types(tensors, path)
    check_finite_tensors(tensors, path)
    return PromptFile(path, tensors, metadata)


# Tensors tune writes with integer values (tip-adapter's cache labels); every other tensor is floating point.
INTEGER_TENSORS = ("cache_labels",)


def check_tensor_types(tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """Refuse a learned tensor that is not floating point: copied into a float parameter, an integer tensor
    (an edited or converted file) read as its truncated values, a wrong result rather than an error."""
    for name, tensor in tensors.items():
        if name not in INTEGER_TENSORS and not tensor.is_floating_point():
            raise InputError(
                f"tensor {name!r} has type {str(tensor.dtype).replace('torch.', '')}, not floating point",
                where=where,
                hint="the prompt file is damaged or converted; make it again with tune",
            )


def check_metadata_types(metadata: dict[str, Any], where: str | Path) -> None:
    """Refuse a class list that is not a list of strings, or a feature width that is not a positive int
    (``tune`` writes both as JSON; an edited file may hold anything)."""
    classnames = metadata.get("classnames", [])
    if not (isinstance(classnames, list) and all(isinstance(c, str) for c in classnames)):
        raise InputError(
            f"metadata 'classnames' is {json.dumps(classnames)[:60]}, not a list of class names",
            where=where,
            hint="the prompt file is damaged; make it again with tune",
        )
    dim = metadata.get("embed_dim", 1)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise InputError(
            f"metadata 'embed_dim' is {json.dumps(dim)[:60]}, not a positive integer",
            where=where,
            hint="the prompt file is damaged; make it again with tune",
        )
