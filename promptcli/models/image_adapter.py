"""The fine-tuned image tower as a file: which tensors train, saving them, and loading them back.

A fine-tuning output (``tune --method finetune``) is a prompt file (see ``io/prompt_files.py``) with
``method = finetune`` whose tensors are the linear head (``weight``, ``bias``, as a linear probe's)
plus the image-tower tensors that training changed, named by their key in the open_clip model's
state dict (``visual.…``). The frozen rest of the model is rebuilt from its checkpoint, as for every
other promptcli file; ``extract --adapter FILE`` loads these tensors over it.

``--train-layers`` chooses the trained tensors over the three image towers open_clip builds:

* ``VisionTransformer``: blocks are ``transformer.resblocks``; before them the patch embedding,
  class and position embeddings and ``ln_pre``; after them ``ln_post``, ``proj`` (and attention pooling).
* ``TimmModel``: blocks are timm's own coarse groups of the trunk (``group_matcher(coarse=True)``:
  EfficientNet/ResNet/ConvNeXt stages, ViT blocks), the first group (the stem) before them; after
  them the pooling/projection ``head``.
* ``ModifiedResNet``: blocks are ``layer1``..``layer4``; the stem before; ``attnpool`` after.

``all`` trains every tensor of the tower; ``last-K`` the last K blocks and everything after them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptcli.errors import InputError

PREFIX = "visual."
HEAD_KEYS = ("weight", "bias")
FINETUNE_METHOD = "finetune"


@dataclass
class TowerGroups:
    """An image tower's parameters (names relative to the tower) split into before / blocks / after."""

    kind: str
    pre: list[str]
    blocks: list[list[str]]
    post: list[str]


def _names_under(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}{n}" for n, _ in module.named_parameters()]


def tower_groups(visual: nn.Module) -> TowerGroups | None:
    """The block structure of an open_clip image tower, or None for a tower of another kind."""
    names = [n for n, _ in visual.named_parameters()]
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "group_matcher"):
        from timm.models import group_parameters

        groups = group_parameters(trunk, trunk.group_matcher(coarse=True))
        ordered = [[f"trunk.{n}" for n in groups[k]] for k in sorted(groups)]
        in_trunk = {n for g in ordered for n in g}
        post = [n for n in names if n not in in_trunk]
        return TowerGroups("timm", ordered[0], ordered[1:], post)
    resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if isinstance(resblocks, nn.ModuleList) and len(resblocks):
        blocks = [_names_under(b, f"transformer.resblocks.{i}.") for i, b in enumerate(resblocks)]
        in_blocks = {n for b in blocks for n in b}
        pre_roots = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "patchnorm_pre_ln.")
        pre = [n for n in names if n.startswith(pre_roots)]
        post = [n for n in names if n not in in_blocks and n not in pre]
        return TowerGroups("vit", pre, blocks, post)
    layers = [getattr(visual, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(m, nn.Module) for m in layers) and hasattr(visual, "attnpool"):
        blocks = [_names_under(m, f"layer{i}.") for i, m in enumerate(layers, start=1)]
        post = _names_under(visual.attnpool, "attnpool.")
        taken = {n for b in blocks for n in b} | set(post)
        return TowerGroups("resnet", [n for n in names if n not in taken], blocks, post)
    return None


def parse_train_layers(spec: str) -> int | None:
    """``all`` -> None, ``last-K`` -> K (>= 0); anything else is a one-line error."""
    text = (spec or "").strip().lower()
    if text == "all":
        return None
    match = re.fullmatch(r"last-(\d+)", text)
    if not match:
        raise InputError(
            f"unknown value {spec!r}", where="--train-layers", hint="use all, or last-K (e.g. last-2)"
        )
    return int(match.group(1))


def trainable_names(visual: nn.Module, spec: str) -> tuple[list[str], dict[str, Any]]:
    """The tower's parameter names ``--train-layers spec`` trains, and a description for metadata."""
    last = parse_train_layers(spec)
    names = [n for n, _ in visual.named_parameters()]
    if last is None:
        return names, {"train_layers": "all", "n_tensors": len(names)}
    groups = tower_groups(visual)
    if groups is None:
        raise InputError(
            f"cannot find the blocks of this image tower ({type(visual).__name__})",
            where="--train-layers",
            hint="use --train-layers all",
        )
    if last > len(groups.blocks):
        raise InputError(
            f"the image tower has {len(groups.blocks)} blocks, fewer than {last}",
            where="--train-layers",
            hint=f"use last-0 .. last-{len(groups.blocks)}, or all",
        )
    chosen = {n for b in groups.blocks[len(groups.blocks) - last :] for n in b} | set(groups.post)
    kept = [n for n in names if n in chosen]
    return kept, {
        "train_layers": f"last-{last}",
        "tower": groups.kind,
        "n_blocks": len(groups.blocks),
        "n_tensors": len(kept),
    }


def set_trainable(visual: nn.Module, names: Iterable[str]) -> list[nn.Parameter]:
    """Freeze the tower except ``names``; return those parameters in tower order."""
    wanted = set(names)
    params = []
    for name, param in visual.named_parameters():
        param.requires_grad_(name in wanted)
        if name in wanted:
            params.append(param)
    return params


def tower_state(visual: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """CPU float32 copies of the named tower tensors, keyed as in the model's state dict."""
    params = dict(visual.named_parameters())
    return {PREFIX + n: params[n].detach().float().cpu().clone() for n in names}


def load_tower_state(visual: nn.Module, tensors: dict[str, torch.Tensor], where: str | Path) -> int:
    """Copy ``visual.*`` tensors into the tower (names and shapes must match); return how many."""
    params = dict(visual.named_parameters())
    count = 0
    with torch.no_grad():
        for key, value in tensors.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX) :]
            if name not in params or params[name].shape != value.shape:
                raise InputError(
                    f"tensor {key} does not fit the model's image tower",
                    where=where,
                    hint="use the adapter with the model it was fine-tuned from",
                )
            if not torch.isfinite(value).all():
                raise InputError(f"tensor {key} holds NaN or inf", where=where, hint="re-run the fine-tuning")
            params[name].copy_(value.to(params[name].dtype))
            count += 1
    return count


def wise_interpolate(
    zero: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """WiSE-FT: ``(1 - alpha) x zero + alpha x tuned`` per tensor (alpha 0 and 1 give the ends exactly)."""
    if set(zero) != set(tuned):
        raise ValueError("zero-shot and fine-tuned tensors differ in names")
    if alpha == 0:
        return {k: v.clone() for k, v in zero.items()}
    if alpha == 1:
        return {k: v.clone() for k, v in tuned.items()}
    return {k: (1.0 - alpha) * zero[k] + alpha * tuned[k] for k in zero}


def wise_path(output: str | Path, alpha: float) -> Path:
    """``ft.safetensors`` -> ``ft.wise0.5.safetensors`` (alpha in its shortest exact decimal form)."""
    output = Path(output)
    return output.with_name(f"{output.stem}.wise{alpha:g}{output.suffix}")


def apply_adapter(loaded: Any, adapter_path: str | Path) -> dict[str, Any]:
    """Load a fine-tuning output's tower tensors into ``loaded``'s image tower (in place), or, for a
    ``vpt`` / ``maple`` output, wrap the tower so that it encodes with the file's vision prompts.

    The adapter must come from the same base model (checkpoint SHA-256, else name and tag). Returns
    what the features file records: the adapter path and SHA-256. ``loaded.info["adapter_sha256"]``
    is set so that extraction manifests and outputs carry it.
    """
    from promptcli.choices import IMAGE_METHODS
    from promptcli.io.fileio import sha256_file
    from promptcli.io.prompt_files import read_prompt
    from promptcli.models.loading import same_model

    prompt = read_prompt(adapter_path)
    if prompt.method not in IMAGE_METHODS:
        raise InputError(
            f"not a fine-tuned or prompted image tower (method {prompt.method or '?'})",
            where=adapter_path,
            hint="make one with `promptcli tune ... --method finetune` (or vpt, maple)",
        )
    if not same_model(prompt.model_identity(), loaded.identity()):
        mine = prompt.model_identity()
        raise InputError(
            f"adapter was fine-tuned from {mine['model_name']} (sha256 {mine['checkpoint_sha256'][:12] or '?'}), "
            f"not from {loaded.spec.name} (sha256 {loaded.checkpoint_sha256[:12] or '?'})",
            where=adapter_path,
            hint="extract with the model the adapter was fine-tuned from (--model/--pretrained)",
        )
    if prompt.method == FINETUNE_METHOD:
        n = load_tower_state(loaded.model.visual, prompt.tensors, adapter_path)
    else:
        from promptcli.models.image_prompts import install_prompts

        n = install_prompts(loaded, prompt)
    if n == 0 and prompt.method == FINETUNE_METHOD:
        raise InputError("no image-tower tensors", where=adapter_path, hint="is this a fine-tuning output?")
    sha = sha256_file(adapter_path)
    loaded.info["adapter_sha256"] = sha
    return {"adapter": str(adapter_path), "adapter_sha256": sha}
