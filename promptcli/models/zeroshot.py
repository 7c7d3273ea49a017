"""Zero-shot CLIP classifiers: class text embeddings from prompt templates, and their logits."""

from __future__ import annotations

import math
import string
from collections.abc import Sequence

import torch

from promptcli.errors import InputError
from promptcli.models.loading import LoadedModel

DEFAULT_TEMPLATE = "a photo of a {}."
TEMPLATE_SETS = ("imagenet", "imagenet-simple")


def template_set(name: str) -> list[str]:
    """Named template ensembles: ``imagenet`` (CLIP's 80) and ``imagenet-simple`` (CLIP's 7)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    sets = {"imagenet": OPENAI_IMAGENET_TEMPLATES, "imagenet-simple": SIMPLE_IMAGENET_TEMPLATES}
    if name not in sets:
        raise InputError(
            f"unknown template set {name!r}", where="--templates", hint="use imagenet or imagenet-simple"
        )
    return [t("{}") for t in sets[name]]


def resolve_templates(templates: Sequence[str] | None, template_set_name: str | None = None) -> list[str]:
    """Templates from ``--template`` (repeatable) and/or ``--templates SET``; default one template."""
    out = [templates] if isinstance(templates, str) else list(templates or [])
    if template_set_name:
        out += template_set(template_set_name)
    if not out:
        out = [DEFAULT_TEMPLATE]
    for t in out:
        check_template(t)
    return out


def model_source(loaded: LoadedModel) -> str:
    """The checkpoint (or model name) that made ``loaded``: where to look when its weights are bad."""
    return loaded.spec.pretrained or loaded.spec.name


def _one_plain_field(template: str) -> bool:
    """Whether ``template.format(name)`` fills exactly one bare ``{}`` (no name, index, spec or conversion)."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError:  # a lone { or }
        return False
    return fields == [("", "", None)]


def check_template(template: str, where: str = "--template") -> str:
    """``template`` when it has exactly one bare ``{}`` (braces doubled elsewhere), else a one-line error."""
    if not _one_plain_field(template):
        raise InputError(
            f"template {template!r} must contain exactly one {{}} (and write a literal brace as {{{{ or }}}})",
            where=where,
            hint='e.g. "a photo of a {}."',
        )
    return template


def logit_scale(loaded: LoadedModel) -> float:
    """The model's learned temperature, exp(logit_scale); refused unless finite and positive in float32."""
    raw = float(loaded.model.logit_scale.detach().float().item())
    scale = float(loaded.model.logit_scale.detach().float().exp().item())
    if not (math.isfinite(scale) and scale > 0):
        raise InputError(
            f"the checkpoint's logit_scale is {raw:g}, so its temperature exp(logit_scale) is {scale:g}: "
            "logits would be NaN or inf",
            where=model_source(loaded),
            hint="logit_scale is stored as a log (CLIP's is ln 100 = 4.605); fix the checkpoint's conversion",
        )
    return scale


def check_finite_text(loaded: LoadedModel, weights: torch.Tensor, classnames: Sequence[str]) -> None:
    """Refuse class text embeddings with a NaN or inf, or all zero (bad weights in the text tower)."""
    bad = torch.nonzero(~torch.isfinite(weights).all(dim=1) | (weights == 0).all(dim=1)).flatten().tolist()
    if bad:
        names = ", ".join(_short(str(classnames[i])) for i in bad[:3]) + (", …" if len(bad) > 3 else "")
        raise InputError(
            f"the model's text embeddings are zero or not finite (NaN or inf) for {len(bad)} of {len(weights)} "
            f"classes ({names})",
            where=model_source(loaded),
            hint="check the checkpoint's text tower weights (text_projection, token_embedding) for NaN or inf",
        )


@torch.no_grad()
def encode_texts(loaded: LoadedModel, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings (float32, on the model's device)."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = loaded.tokenizer(list(texts[start : start + batch_size])).to(loaded.device)
        emb = loaded.model.encode_text(tokens).float()
        out.append(emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return torch.cat(out)


def _short(name: str, keep: int = 40) -> str:
    return name if len(name) <= keep else f"{name[: keep // 2]}…{name[-keep // 2 :]}"


def check_distinct_tokens(loaded: LoadedModel, classnames: Sequence[str], templates: Sequence[str]) -> None:
    """Refuse two classes whose prompts the tokenizer makes identical: they would get one embedding, and one of
    them would never be predicted. It happens when the prompt is cut at the context length (long names, or
    scripts the tokenizer spends a token per character on) or when the tokenizer normalises two names alike."""
    pad = getattr(
        getattr(loaded.tokenizer, "tokenizer", None), "pad_token_id", None
    )  # Hugging Face's; CLIP's: 0
    pad = 0 if pad is None else int(pad)
    seen: dict[bytes, str] = {}
    for name in classnames:
        tokens = loaded.tokenizer([t.format(name) for t in templates])
        key = tokens.cpu().numpy().tobytes()
        if key in seen:
            cut = bool((tokens[:, -1] != pad).any())  # the last position holds text, not padding
            why = (
                f"their prompts are cut at the model's {tokens.shape[1]}-token context"
                if cut
                else "this model's tokenizer reads the two names alike"
            )
            raise InputError(
                f"classes {_short(seen[key])!r} and {_short(name)!r} give the same text tokens ({why}), so the same text "
                "embedding: one of them could never be predicted",
                where="class names",
                hint="rename one of them (shorter, or in words the tokenizer tells apart)",
            )
        seen[key] = name


@torch.no_grad()
def class_text_embeddings(
    loaded: LoadedModel, classnames: Sequence[str], templates: Sequence[str] | None = None
) -> torch.Tensor:
    """(C, D) zero-shot weights: per class, the renormalised mean of its normalised template embeddings."""
    templates = list(templates or [DEFAULT_TEMPLATE])
    texts = [t.format(c) for c in classnames for t in templates]
    check_distinct_tokens(loaded, classnames, templates)
    emb = encode_texts(loaded, texts).reshape(len(classnames), len(templates), -1).mean(dim=1)
    emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    check_finite_text(loaded, emb, classnames)
    return emb


def zero_shot_logits(features: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """scale x cosine similarity between (normalised) image features and class weights."""
    feats = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return scale * feats @ weights.t()
