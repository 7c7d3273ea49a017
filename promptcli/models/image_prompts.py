"""Prompts inside a frozen open_clip ViT image tower: VPT and MaPLe (``tune --method vpt|maple``).

Both run on images through the fine-tuning engine (``learning/finetune.py``); the CLIP weights stay
frozen and only prompt tensors train.

**The prompted tower** (:func:`prompted_forward`). ``prompts[0]`` (n, width) is inserted right after
the class token, after the position embeddings (the prompts get none) and before ``ln_pre``; for
``i >= 1`` with ``i < len(prompts)`` the n prompt positions are replaced by ``prompts[i]`` before block
``i``; later blocks carry the tokens on. The prompt positions are dropped before pooling, so every
pool type (class token, mean, attention pool) reads only the tokens it was trained on. With n = 0
this is the native forward, operation for operation.

**VPT** (Jia et al., ECCV 2022): learned tokens, ``shallow`` (one set at the input, carried through
every block) or ``deep`` (a fresh set before every block), ``--vpt-tokens`` of them (default 8),
initialised as VPT's code does: uniform(-v, v), v = sqrt(6 / (3 * patch^2 + width)) (Xavier-uniform
over the patch embedding's fan-in). The head is the frozen zero-shot text classifier
(``logit_scale.exp() x`` the class-name embeddings of ``--template``).

**MaPLe** (Khattak et al., CVPR 2023): text prompts P_0..P_{J-1} (n_ctx = 2 tokens each) and coupling
functions F_i(P) = W_i P + b_i (Linear text width -> vision width), J = ``--maple-depth`` (paper: 9).
The class prompt is ``--template`` with the class name (default "a photo of a {}."); its first n_ctx
words' embeddings (``"a photo"``) start P_0 and sit at the positions after the start token, as in
MaPLe's code; P_1..P_{J-1} start from N(0, 0.02) and replace those positions before text blocks 1..J-1.
The vision prompts are F_i(P_i), placed at layer i as above (J of them). Each step runs the text tower
over the C class prompts and the image tower over the images. A MaPLe file stores the learned tensors,
the derived vision prompts (so extraction needs no text side) and, as a linear head, the final class
text classifier ``logit_scale.exp() x`` the normalised text features.

A prompt file of either method stores ``vision_prompts`` (depth, n, width): ``extract --adapter`` wraps
the image tower in :class:`PromptedViT` with those tokens (:func:`install_prompts`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptcli.errors import InputError

VPT_METHOD = "vpt"
MAPLE_METHOD = "maple"
PROMPT_METHODS = (VPT_METHOD, MAPLE_METHOD)
VISION_PROMPTS = "vision_prompts"  # (depth, n, width): what extraction inserts
VPT_TOKENS = 8
MAPLE_DEPTH = 9  # the paper's J for ViT-B/16
MAPLE_N_CTX = 2  # the paper's context length
MAPLE_DEEP_STD = 0.02  # MaPLe's init of the deeper text prompts


# --------------------------------------------------------------------------- the prompted ViT


def check_vit(visual: nn.Module, method: str, where: Any = "--method") -> None:
    """One-line error unless ``visual`` is open_clip's VisionTransformer (prompts go between its tokens)."""
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, PromptedViT):
        visual = visual.visual
    if not isinstance(visual, VisionTransformer):
        raise InputError(
            f"{method} inserts prompt tokens into a ViT image tower; this model's is {type(visual).__name__}",
            where=where,
            hint="use a ViT CLIP model (e.g. ViT-B-16), or --method finetune",
        )


def vit_layers(visual: nn.Module) -> int:
    return len(visual.transformer.resblocks)


def _with_prompts(x: torch.Tensor, p: torch.Tensor, replace: bool, batch_first: bool) -> torch.Tensor:
    """Tokens ``x`` with ``p`` (n, W) after the class token: inserted, or replacing the n after it."""
    n = p.shape[0]
    if batch_first:
        rest = x[:, 1 + n :] if replace else x[:, 1:]
        return torch.cat([x[:, :1], p.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1), rest], dim=1)
    rest = x[1 + n :] if replace else x[1:]
    return torch.cat([x[:1], p.to(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1), rest], dim=0)


def prompted_forward(
    visual: nn.Module, pixels: torch.Tensor, prompts: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The pooled (projected) embedding of ``pixels`` with prompt tokens (see the module docstring).

    Mirrors open_clip's ``VisionTransformer.forward`` (``_embeds``, the blocks, ``_pool``, ``proj``).
    """
    from open_clip.transformer import _expand_token

    n = int(prompts[0].shape[0]) if len(prompts) else 0
    x = visual.conv1(pixels)
    x = x.reshape(x.shape[0], x.shape[1], -1)
    x = x.permute(0, 2, 1)
    x = torch.cat([_expand_token(visual.class_embedding, x.shape[0]).to(x.dtype), x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    if len(prompts):
        x = _with_prompts(x, prompts[0], False, True)
    x = visual.ln_pre(x)
    transformer = visual.transformer
    if not transformer.batch_first:
        x = x.transpose(0, 1).contiguous()
    for i, block in enumerate(transformer.resblocks):
        if 0 < i < len(prompts):
            x = _with_prompts(x, prompts[i], True, transformer.batch_first)
        x = block(x, attn_mask=None)
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    if n:
        x = torch.cat([x[:, :1], x[:, 1 + n :]], dim=1)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


class FixedPrompts(nn.Module):
    """Prompts read from a file: ``vision_prompts()`` gives them per layer."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("tokens", tokens.detach().float().clone())

    def vision_prompts(self) -> list[torch.Tensor]:
        return list(self.tokens.unbind(0))


class PromptedViT(nn.Module):
    """An open_clip ViT with prompt tokens from ``source.vision_prompts()``: pixels -> pooled embedding."""

    def __init__(self, visual: nn.Module, source: nn.Module) -> None:
        super().__init__()
        self.visual, self.source = visual, source
        self.enabled = True

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Within: the plain pretrained tower (training checks the images against the features file)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.visual(pixels)
        return prompted_forward(self.visual, pixels, self.source.vision_prompts())


# --------------------------------------------------------------------------- VPT


class VptPrompts(nn.Module):
    """VPT's learned tokens: (1, n, width) shallow, (layers, n, width) deep."""

    def __init__(
        self, visual: nn.Module, depth: str, tokens: int, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        width = int(visual.conv1.out_channels)
        patch = visual.conv1.kernel_size
        layers = 1 if depth == "shallow" else vit_layers(visual)
        bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + width))
        init = torch.empty(layers, tokens, width).uniform_(-bound, bound, generator=generator)
        self.depth, self.init_bound = depth, bound
        self.tokens = nn.Parameter(init)

    def vision_prompts(self) -> list[torch.Tensor]:
        return list(self.tokens.unbind(0))


# --------------------------------------------------------------------------- MaPLe


class _DeepBlocks:
    """A text transformer whose context positions are replaced by ``prompts[i]`` before block i >= 1."""

    def __init__(self, transformer: nn.Module, prompts: Sequence[torch.Tensor], start: int) -> None:
        self.transformer, self.prompts, self.start = transformer, prompts, start
        self.resblocks = transformer.resblocks

    def get_cast_dtype(self) -> torch.dtype:
        return self.transformer.get_cast_dtype()

    def __call__(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        first = self.transformer.batch_first
        if not first:
            x = x.transpose(0, 1).contiguous()
        s = self.start
        for i, block in enumerate(self.resblocks):
            if 0 < i < len(self.prompts):
                p = self.prompts[i]
                n = p.shape[0]
                if first:
                    fill = p.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                    x = torch.cat([x[:, :s], fill, x[:, s + n :]], dim=1)
                else:
                    fill = p.to(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)
                    x = torch.cat([x[:s], fill, x[s + n :]], dim=0)
            x = block(x, attn_mask=attn_mask)
        if not first:
            x = x.transpose(0, 1)
        return x


def _linear_init(layer: nn.Linear, generator: torch.Generator | None) -> None:
    """nn.Linear's default init (U(-1/sqrt(in), 1/sqrt(in)) for weight and bias), drawn from ``generator``."""
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)


def maple_text_tower(model: nn.Module) -> Any:
    """The native text tower MaPLe injects into (one-line error for a Hugging Face tower)."""
    from promptcli.models.prompt_learner import _NativeTower, _text_tower

    tower = _text_tower(model)
    if not isinstance(tower, _NativeTower) or tower.cls_emb is not None:
        raise InputError(
            "maple inserts deep prompts into open_clip's own text transformer; "
            f"this model's text tower is {type(getattr(model, 'text', model)).__name__}",
            where="--method",
            hint="use a CLIP model with open_clip's text transformer (e.g. ViT-B-16), or --method vpt",
        )
    return tower


def check_maple_depth(depth: int, text_layers: int, vision_layers: int) -> None:
    if depth < 1 or depth > min(text_layers, vision_layers):
        raise InputError(
            f"must be in 1..{min(text_layers, vision_layers)} (the model has {text_layers} text and "
            f"{vision_layers} image layers; got {depth})",
            where="--maple-depth",
            hint="the paper uses 9 of ViT-B/16's 12",
        )


class MaplePrompts(nn.Module):
    """MaPLe's text prompts P_0..P_{J-1} and couplings F_0..F_{J-1} (see the module docstring)."""

    def __init__(
        self,
        loaded: Any,
        visual: nn.Module,
        classnames: Sequence[str],
        template: str,
        depth: int,
        n_ctx: int = MAPLE_N_CTX,
        generator: torch.Generator | None = None,
    ) -> None:
        from promptcli.models.prompt_learner import _token_scheme

        super().__init__()
        model = loaded.model
        tower = maple_text_tower(model)
        check_maple_depth(depth, len(tower.transformer.resblocks), vit_layers(visual))
        scheme = _token_scheme(loaded.tokenizer, tower.context_length, pad_id=tower.pad_id)
        before = template.split("{}")[0]
        words = scheme.encode(before) if before.strip() else []
        if len(words) < n_ctx:
            raise InputError(
                f"maple learns the first {n_ctx} words of the template, which has {len(words)} before {{}}",
                where="--template",
                hint='use a template such as "a photo of a {}."',
            )
        device = torch.device(loaded.device)
        ids = loaded.tokenizer([template.format(c) for c in classnames]).to(device)
        start = len(scheme.head)
        ctx_ids = ids[:, start : start + n_ctx]
        if not bool((ctx_ids == torch.tensor(words[:n_ctx], device=device)).all()):
            raise InputError(
                "the template's first words are not tokenised alike for every class",
                where="--template",
                hint="put a space between the template's words and {}",
            )
        pool_index = tower.pool_index(ids)
        if tower.can_truncate():  # tokens after the pooled one cannot change it
            ids = ids[:, : int(pool_index.max()) + 1]
        self._tower, self.start, self.n_ctx, self.depth = tower, start, n_ctx, depth
        self.template, self.classnames = template, list(classnames)
        self.ctx_init = " ".join(before.split()[:n_ctx])  # the words P_0 starts from (for the record)
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("pool_index", pool_index, persistent=False)
        with torch.no_grad():
            first = tower.embed_ids(ctx_ids[0]).float().cpu()
        deeper = [
            torch.empty(n_ctx, tower.width).normal_(0.0, MAPLE_DEEP_STD, generator=generator)
            for _ in range(depth - 1)
        ]
        self.text = nn.ParameterList([nn.Parameter(p.to(device)) for p in [first, *deeper]])
        vision_width = int(visual.conv1.out_channels)
        self.coupling = nn.ModuleList([nn.Linear(tower.width, vision_width) for _ in range(depth)])
        for layer in self.coupling:
            _linear_init(layer, generator)
        self.coupling.to(device)

    def vision_prompts(self) -> list[torch.Tensor]:
        """[F_i(P_i)]: the vision prompts of layers 0..J-1."""
        return [f(p) for f, p in zip(self.coupling, self.text)]

    def prompt_embeddings(self) -> torch.Tensor:
        """(C, L, W) token embeddings of the class prompts with P_0 at the context positions."""
        with torch.no_grad():
            fixed = self._tower.embed_ids(self.token_ids)
        p = self.text[0].to(fixed.dtype).unsqueeze(0).expand(fixed.shape[0], -1, -1)
        s, n = self.start, self.n_ctx
        return torch.cat([fixed[:, :s], p, fixed[:, s + n :]], dim=1)

    def text_features(self) -> torch.Tensor:
        """(C, D) float32 L2-normalised class text features through the deep-prompted text tower."""
        tower = copy.copy(self._tower)
        tower.transformer = _DeepBlocks(self._tower.transformer, list(self.text), self.start)
        feats = tower.encode(self.prompt_embeddings(), self.token_ids, self.pool_index)
        return F.normalize(feats.float(), dim=-1)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"maple.text.{i}": p.detach().float().cpu().clone() for i, p in enumerate(self.text)}
        for i, f in enumerate(self.coupling):
            out[f"maple.coupling.{i}.weight"] = f.weight.detach().float().cpu().clone()
            out[f"maple.coupling.{i}.bias"] = f.bias.detach().float().cpu().clone()
        return out

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], where: Any) -> None:
        mine = self.file_tensors()
        if set(mine) - set(tensors) or any(tensors[k].shape != v.shape for k, v in mine.items()):
            raise InputError("maple tensors do not fit this model", where=where, hint="is this a maple run?")
        params = dict(self.named_parameters())
        names = {f"maple.text.{i}": f"text.{i}" for i in range(self.depth)}
        for i in range(self.depth):
            names.update({f"maple.coupling.{i}.{w}": f"coupling.{i}.{w}" for w in ("weight", "bias")})
        with torch.no_grad():
            for key, name in names.items():
                params[name].copy_(tensors[key].to(params[name].device, params[name].dtype))


class MapleHead(nn.Module):
    """The class text classifier of the current MaPLe prompts: ``logit_scale.exp() x`` text features."""

    def __init__(self, prompts: MaplePrompts, scale: float) -> None:
        super().__init__()
        self.prompts, self.scale = prompts, float(scale)
        self.classnames = prompts.classnames

    def classifier(self) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        return self.prompts.text_features(), None, self.scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        from promptcli.models.head_base import apply_classifier

        return apply_classifier(features, *self.classifier())

    def linear_state(self) -> dict[str, torch.Tensor]:
        """The final classifier as a linear head's tensors (``weight``, ``bias``)."""
        with torch.no_grad():
            weight = self.scale * self.prompts.text_features().float().cpu()
        return {"weight": weight, "bias": torch.zeros(weight.shape[0])}


# --------------------------------------------------------------------------- extraction


def install_prompts(loaded: Any, prompt: Any) -> int:
    """Wrap ``loaded``'s image tower in a :class:`PromptedViT` with the file's vision prompts; their depth."""
    visual = loaded.model.visual
    check_vit(visual, prompt.method, where=prompt.path)
    if isinstance(visual, PromptedViT):
        raise InputError("the image tower already has prompts", where=prompt.path, hint="give one --adapter")
    tokens = prompt.tensors.get(VISION_PROMPTS)
    width = int(visual.conv1.out_channels)
    if tokens is None or tokens.ndim != 3 or tokens.shape[2] != width or tokens.shape[0] > vit_layers(visual):
        raise InputError(
            f"tensor {VISION_PROMPTS} missing or not (depth <= {vit_layers(visual)}, n, {width})",
            where=prompt.path,
            hint=f"use the adapter with the model its {prompt.method} prompts were trained on",
        )
    if not torch.isfinite(tokens).all():
        raise InputError(f"tensor {VISION_PROMPTS} holds NaN or inf", where=prompt.path, hint="re-run tune")
    device = next(visual.parameters()).device
    loaded.model.visual = PromptedViT(visual, FixedPrompts(tokens).to(device))
    return int(tokens.shape[0])
