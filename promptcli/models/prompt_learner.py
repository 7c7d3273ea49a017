"""Learnable text prompts for a frozen CLIP text tower (CoOp, Zhou et al. 2022, and two variants).

``coop``: the prompt of class c is ``[SOS] ctx_1..ctx_M [name tokens] [.] [EOS]`` with learnable
context vectors in the token-embedding space (shared, or per class with ``csc``); ``class_position``
``front`` gives ``[SOS] [name] ctx [.] [EOS]`` and ``middle`` ``[SOS] ctx[:M//2] [name] ctx[M//2:] [.] [EOS]``.
``cls-tuning``: the template's words stay fixed and the class-name token embeddings are learned.
``full-prompt``: the template's words (as context) and the class-name tokens are all learned.

Initialised from words (``ctx_init`` or the template), the learner reproduces the zero-shot text
embeddings exactly. :meth:`PromptLearner.forward` skips work that cannot change the result: each
class is computed only up to the last token that matters for it (classes grouped by that length),
and with a causal tower the part of the prompt shared by all classes (start token and shared
context) goes through each block once, the classes' own tokens packed without padding, and the
last block only as far as the pooled tokens need. With ``class_chunk`` (and always without
gradient) classes are computed in chunks so memory does not grow with their number (see
:mod:`promptcli.models.text_packing`). :meth:`PromptLearner.forward_plain` is the straightforward
full-length computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptcli.errors import InputError
from promptcli.models.text_packing import (
    LengthGroup,
    RowChunk,
    chunked_rows,
    encode_grouped,
    plan_chunks,
    restore_order,
)

TEXT_METHODS = ("coop", "cls-tuning", "full-prompt")
CLASS_POSITIONS = ("end", "middle", "front")
_META_PREFIX = "prompt."
_PLACEHOLDER = "X"  # token that stands for a randomly initialised vector in the id sequence (as in CoOp)
_COOP_TAIL = "."


@dataclass
class PromptConfig:
    """How prompts are built and initialised (see the module docstring for the methods)."""

    method: str = "coop"  # coop | cls-tuning | full-prompt
    n_ctx: int = 16  # ignored when ctx_init is given (n_ctx = its token count)
    ctx_init: str | None = None  # coop: context initialised from these words' token embeddings
    class_position: str = "end"  # end | middle | front (coop)
    csc: bool = False  # class-specific context
    template: str = "a photo of a {}."  # cls-tuning: fixed template words; full-prompt: the initial words
    init_std: float = 0.02  # random context ~ N(0, init_std)
    # How the text pass is computed, not what it gives (so not in the metadata): with gradient, in
    # chunks of this many classes (0: all at once); peak memory is then one chunk's.
    class_chunk: int = 0

    def validate(self) -> None:
        """Raise :class:`InputError` for an inconsistent configuration."""
        if self.class_chunk < 0:
            raise InputError(
                f"class chunk must be 0 (all classes at once) or positive (got {self.class_chunk})",
                where="--class-chunk",
                hint="e.g. --class-chunk 100 for a 1,000-class text pass",
            )
        if self.method not in TEXT_METHODS:
            raise InputError(
                f"unknown prompt method {self.method!r}",
                where="--method",
                hint=f"use {', '.join(TEXT_METHODS)}",
            )
        if self.class_position not in CLASS_POSITIONS:
            raise InputError(
                f"unknown class position {self.class_position!r}",
                where="--class-position",
                hint=f"use {', '.join(CLASS_POSITIONS)}",
            )
        if self.ctx_init is not None and not self.ctx_init.strip():
            raise InputError("empty context initialisation", where="--ctx-init", hint='e.g. "a photo of a"')
        if self.method == "coop":
            if self.ctx_init is None and self.n_ctx < 1:
                raise InputError(
                    f"n_ctx must be at least 1 (got {self.n_ctx})",
                    where="--n-ctx",
                    hint="CoOp uses 16 (4 with --ctx-init)",
                )
            if not (0 < self.init_std < math.inf) and self.ctx_init is None:  # NaN fails too
                raise InputError(
                    f"init_std must be positive and finite (got {self.init_std})",
                    where="--init-std",
                    hint="CoOp uses 0.02",
                )
            return
        from promptcli.models.zeroshot import check_template

        check_template(self.template)
        if self.ctx_init is not None:
            raise InputError(
                f"ctx_init applies to coop only; {self.method} starts from the template",
                where="--ctx-init",
                hint="set the initial words with --template",
            )
        if self.class_position != "end":
            raise InputError(
                f"class_position applies to coop only; {self.method} places the name where the template's {{}} is",
                where="--class-position",
                hint="move {} within --template instead",
            )
        if self.csc and self.method == "cls-tuning":
            raise InputError(
                "csc needs learnable context: cls-tuning learns only the class names",
                where="--csc",
                hint="use coop or full-prompt for class-specific context",
            )

    def to_metadata(self) -> dict[str, str]:
        """Flat string dict (for safetensors metadata); keys are prefixed with ``prompt.``."""
        return {
            f"{_META_PREFIX}method": self.method,
            f"{_META_PREFIX}n_ctx": str(self.n_ctx),
            f"{_META_PREFIX}ctx_init": "" if self.ctx_init is None else self.ctx_init,
            f"{_META_PREFIX}class_position": self.class_position,
            f"{_META_PREFIX}csc": "true" if self.csc else "false",
            f"{_META_PREFIX}template": self.template,
            f"{_META_PREFIX}init_std": repr(float(self.init_std)),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> PromptConfig:
        """Inverse of :meth:`to_metadata`; other keys in ``meta`` are ignored, missing ones take defaults."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "class_chunk":  # a computation setting, not part of the prompt
                continue
            key = _META_PREFIX + f.name
            if key not in meta:
                continue
            raw = meta[key]
            try:
                if f.name == "n_ctx":
                    values[f.name] = int(raw)
                elif f.name == "init_std":
                    values[f.name] = float(raw)
                elif f.name == "csc":
                    if raw not in ("true", "false"):
                        raise ValueError(raw)
                    values[f.name] = raw == "true"
                elif f.name == "ctx_init":
                    values[f.name] = raw or None
                else:
                    values[f.name] = raw
            except ValueError as exc:
                raise InputError(
                    f"bad value {raw!r} for {key}", where="prompt metadata", hint="the prompt file is damaged"
                ) from exc
        config = cls(**values)
        config.validate()
        return config


# --------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class _TokenScheme:
    """How the model's tokenizer frames text: ``head + content + tail``, right-padded with ``pad_id``."""

    encode: Callable[[str], list[int]]  # content ids of a piece of text, without special tokens
    head: list[int]
    tail: list[int]
    pad_id: int
    context_length: int


def _token_scheme(tokenizer: Any, context_length: int, pad_id: int | None = None) -> _TokenScheme:
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    length = int(getattr(tokenizer, "context_length", None) or context_length)
    if isinstance(tokenizer, SimpleTokenizer):
        return _TokenScheme(
            encode=tokenizer.encode,  # applies the tokenizer's own cleaning, as __call__ does
            head=[tokenizer.sot_token_id],
            tail=[tokenizer.eot_token_id],
            pad_id=0,
            context_length=length,
        )
    if isinstance(tokenizer, HFTokenizer) and not tokenizer.tokenizer_mode and not tokenizer.strip_sep_token:
        hf = tokenizer.tokenizer
        clean = tokenizer.clean_fn

        def encode(text: str) -> list[int]:
            return list(hf(clean(text), add_special_tokens=False)["input_ids"])

        # the special tokens around content: compare one text with and without them
        content = encode(_PLACEHOLDER)
        framed = list(hf(tokenizer.clean_fn(_PLACEHOLDER))["input_ids"])
        at = next((i for i in range(len(framed)) if framed[i : i + len(content)] == content), None)
        if not content or at is None:
            raise InputError(
                f"cannot tell the special tokens of this model's tokenizer ({type(hf).__name__})",
                where="--model",
                hint="use a model with the CLIP BPE tokenizer or a BERT/RoBERTa-style tokenizer",
            )
        return _TokenScheme(
            encode=encode,
            head=framed[:at],
            tail=framed[at + len(content) :],
            pad_id=int(hf.pad_token_id if pad_id is None else pad_id),
            context_length=length,
        )
    raise InputError(
        f"prompt tuning does not support this model's tokenizer ({type(tokenizer).__name__})",
        where="--model",
        hint="use a model with the CLIP BPE tokenizer or a plain Hugging Face tokenizer",
    )


# --------------------------------------------------------------------------- text towers


class _NativeTower:
    """open_clip's own text transformer (CLIP keeps it on the model, CustomTextCLIP under ``.text``).

    Deliberately not an ``nn.Module``: the learner must not register the frozen CLIP weights.
    """

    def __init__(self, model: nn.Module) -> None:
        from open_clip.transformer import TextTransformer

        text = getattr(model, "text", None)
        src = text if isinstance(text, TextTransformer) else model
        self.module = src
        self.token_embedding: nn.Embedding = src.token_embedding
        self.positional_embedding: torch.Tensor = src.positional_embedding
        self.transformer: nn.Module = src.transformer
        self.ln_final: nn.Module = src.ln_final
        self.text_projection = src.text_projection
        self.attn_mask: torch.Tensor | None = src.attn_mask
        if isinstance(text, TextTransformer):
            self.pool_type = text.pool_type
            self.eos_id = text.eos_id
            self.cls_emb = text.cls_emb
            self.use_pad_mask = bool(getattr(text, "use_pad_mask", False))
            self.pad_id = int(text.pad_id)
        else:
            self.pool_type = getattr(model, "text_pool_type", "argmax")
            self.eos_id = getattr(model, "text_eos_id", None)
            self.cls_emb = None
            self.use_pad_mask = False
            self.pad_id = 0
        self.context_length = self.positional_embedding.shape[0] - (1 if self.cls_emb is not None else 0)
        if self.pool_type not in ("first", "last", "argmax", "eos"):
            raise InputError(
                f"prompt tuning needs a pooled text feature (text pool type {self.pool_type!r})",
                where="--model",
                hint="use a model whose text tower pools one token",
            )

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    def cast_dtype(self) -> torch.dtype:
        return self.transformer.get_cast_dtype()

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids)

    def pool_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Index of the pooled token of each sequence, by open_clip's own convention."""
        from open_clip.transformer import text_global_pool

        if self.cls_emb is not None:  # CoCa-style appended class token: always the last one
            return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
        positions = torch.arange(ids.shape[1], device=ids.device, dtype=torch.float32)
        positions = positions.view(1, -1, 1).expand(ids.shape[0], -1, 1)
        return text_global_pool(positions, ids, self.pool_type, eos_token_id=self.eos_id)[:, 0].long()

    def can_truncate(self) -> bool:
        """Whether tokens after the last content token can be dropped without changing the output."""
        causal_or_masked = self.attn_mask is not None or self.use_pad_mask
        return causal_or_masked and self.cls_emb is None and self.pool_type != "last"

    def encode(self, x: torch.Tensor, ids: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
        """Mirror of ``TextTransformer.forward`` / ``CLIP.encode_text`` on token embeddings ``x`` (C, L, W)."""
        x = x.to(self.cast_dtype())
        seq_len = x.shape[1]
        if self.cls_emb is not None:
            x = torch.cat([x, self.cls_emb.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)], dim=1)
            seq_len += 1
        attn_mask = self.attn_mask
        if attn_mask is not None:
            attn_mask = attn_mask[:seq_len, :seq_len]
        if self.use_pad_mask or self.cls_emb is not None:
            add_mask = self.module._build_additive_mask(ids, seq_len, x.dtype)
            attn_mask = add_mask if attn_mask is None else attn_mask.unsqueeze(0) + add_mask
        x = x + self.positional_embedding[:seq_len].to(x.dtype)
        x = self.transformer(x, attn_mask=attn_mask)
        if self.cls_emb is not None:
            pooled = self.ln_final(x[:, -1])
        else:
            pooled = self.ln_final(x)[torch.arange(x.shape[0], device=x.device), pool_index]
        return self.project(pooled)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.text_projection is None:
            return pooled
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection

    # ---- shared-prefix fast path

    def prefix_sharing_supported(self) -> bool:
        """Whether every block can be run by :meth:`encode_shared_prefix` (else use :meth:`encode`)."""
        from open_clip.transformer import Attention, CustomResidualAttentionBlock, ResidualAttentionBlock

        if self.cls_emb is not None or self.use_pad_mask or self.attn_mask is None:
            return False
        size = self.attn_mask.shape[0]
        causal = torch.full((size, size), float("-inf"), device=self.attn_mask.device).triu_(1)
        if not torch.equal(self.attn_mask.float(), causal):
            return False
        blocks = getattr(self.transformer, "resblocks", None)
        if blocks is None or len(blocks) == 0:
            return False
        for blk in blocks:
            if type(blk) is ResidualAttentionBlock:
                attn = blk.attn
                if hasattr(blk, "ln_1_kv") or not isinstance(attn, nn.MultiheadAttention):
                    return False
                if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
                    return False
                if attn.dropout and attn.training:
                    return False
            elif type(blk) is CustomResidualAttentionBlock:
                attn = blk.attn
                if type(attn) is not Attention or attn.logit_scale is not None:
                    return False
                if attn.attn_drop.p and attn.training:
                    return False
            else:
                return False
        return True

    def encode_packed(
        self,
        prefix: torch.Tensor,
        suffix: torch.Tensor,
        groups: Sequence[LengthGroup],
        prefix_of: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, D) features of prompts made of a prefix (P tokens) and their own suffix tokens.

        ``prefix`` (B, P, W) token embeddings; ``suffix`` (N, S, W): row n continues prefix
        ``prefix_of[n]`` (the single prefix when None) and is pooled at the last of its group's
        ``length`` tokens (``groups`` from :func:`group_by_length` over the rows). Under the causal mask
        a prefix attends only to itself, so it is computed once per block; the suffix tokens of all
        rows are packed into one (T, W) matrix (no padding) for every per-token layer, and attend to
        their prefix and themselves group by group. The last block computes keys and values for all
        tokens but the rest only for the pooled ones.
        """
        dtype = self.cast_dtype()
        n_prefix = prefix.shape[1]
        pos = self.positional_embedding.to(dtype)
        xp = prefix.to(dtype) + pos[:n_prefix]
        xs = torch.cat(
            [
                (suffix[g.rows, : g.length].to(dtype) + pos[n_prefix : n_prefix + g.length]).flatten(0, 1)
                for g in groups
            ]
        )
        layout = _PackedLayout.build(groups, n_prefix, prefix_of, xs.device)
        blocks = list(self.transformer.resblocks)
        for blk in blocks[:-1]:
            xp, xs = _packed_block(blk, xp, xs, layout)
        pooled = _packed_last_block(blocks[-1], xp, xs, layout)
        return restore_order(self.project(self.ln_final(pooled)), layout.rows)


@dataclass(frozen=True)
class _PackedLayout:
    """Where each length group's tokens sit in the packed (T, W) suffix matrix."""

    groups: tuple[LengthGroup, ...]
    offsets: tuple[int, ...]  # first packed row of each group
    prefix_len: int
    prefix_of: tuple[torch.Tensor | None, ...]  # per group: prefix index of each row (None: the one prefix)
    masks: tuple[torch.Tensor, ...]  # per group (S, P + S): causal among its own tokens
    pooled: torch.Tensor  # packed row of each row's pooled (last) token, in group order
    rows: torch.Tensor  # the rows in group order

    @staticmethod
    def build(
        groups: Sequence[LengthGroup], prefix_len: int, prefix_of: torch.Tensor | None, device: torch.device
    ) -> _PackedLayout:
        offsets, pooled, masks, owners = [], [], [], []
        at = 0
        for g in groups:
            n, s = len(g.rows), g.length
            offsets.append(at)
            pooled.append(at + torch.arange(n, device=device) * s + s - 1)
            mask = torch.zeros(s, prefix_len + s, device=device)
            upper = torch.ones(s, s, dtype=torch.bool, device=device).triu(1)
            mask[:, prefix_len:] = mask[:, prefix_len:].masked_fill(upper, float("-inf"))
            masks.append(mask)
            owners.append(None if prefix_of is None else prefix_of[g.rows])
            at += n * s
        return _PackedLayout(
            groups=tuple(groups),
            offsets=tuple(offsets),
            prefix_len=prefix_len,
            prefix_of=tuple(owners),
            masks=tuple(masks),
            pooled=torch.cat(pooled),
            rows=torch.cat([g.rows for g in groups]),
        )

    def group_slices(self):
        for g, at, owner, mask in zip(self.groups, self.offsets, self.prefix_of, self.masks):
            yield g, slice(at, at + len(g.rows) * g.length), owner, mask


def _is_custom(blk: nn.Module) -> bool:
    return not isinstance(blk.attn, nn.MultiheadAttention)


def _project_heads(blk: nn.Module, h: torch.Tensor, part: slice) -> list[torch.Tensor]:
    """The query/key/value projections of ``h`` (..., W) selected by ``part`` (a slice of [q, k, v]),
    split into heads (..., H, d); custom blocks normalise queries and keys per head."""
    attn = blk.attn
    width = h.shape[-1]
    start, stop = part.start * width, part.stop * width
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[start:stop]
    out = F.linear(h, attn.in_proj_weight[start:stop], bias).chunk(part.stop - part.start, -1)
    out = [t.unflatten(-1, (attn.num_heads, width // attn.num_heads)) for t in out]
    if _is_custom(blk):
        names = ["ln_q", "ln_k", None][part.start : part.stop]
        out = [t if name is None else getattr(attn, name)(t) for t, name in zip(out, names)]
    return out


def _attend(
    blk: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    """Attention of (n, H, Lq, d) queries over (n, H, Lk, d) keys/values; returns (n, Lq, H, d)."""
    attn = blk.attn
    mask = None if mask is None else mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    if _is_custom(blk) and attn.head_scale is not None:
        out = out * attn.head_scale
    return out.transpose(1, 2)


def _attention_output(blk: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """(..., W) attention output after the block's inner norm, output projection and outer norm."""
    attn = blk.attn
    if _is_custom(blk):
        return blk.ln_attn(attn.out_proj(attn.ln_inner(out)))
    return attn.out_proj(out)


def _prefix_keys(kp: torch.Tensor, owner: torch.Tensor | None, n: int) -> torch.Tensor:
    """(n, H, P, d) prefix keys (or values) for n rows, from (B, P, H, d)."""
    kp = kp.transpose(1, 2)
    return kp.expand(n, -1, -1, -1) if owner is None else kp.index_select(0, owner)


def _suffix_attention(
    blk: nn.Module,
    qs: torch.Tensor,
    ks: torch.Tensor,
    vs: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    layout: _PackedLayout,
) -> torch.Tensor:
    """Attention of every packed suffix token over its prefix and the tokens of its own row up to itself."""
    outs = []
    for g, rows, owner, mask in layout.group_slices():
        n, s = len(g.rows), g.length

        def heads(t: torch.Tensor, n: int = n, s: int = s, rows: slice = rows) -> torch.Tensor:
            return t[rows].view(n, s, *t.shape[1:]).transpose(1, 2)

        k = torch.cat([_prefix_keys(kp, owner, n), heads(ks)], 2)
        v = torch.cat([_prefix_keys(vp, owner, n), heads(vs)], 2)
        outs.append(_attend(blk, heads(qs), k, v, mask, False).flatten(0, 1))
    return torch.cat(outs).flatten(1)


def _packed_block(
    blk: nn.Module, xp: torch.Tensor, xs: torch.Tensor, layout: _PackedLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """One open_clip residual block on prefixes (B, P, W) and packed suffix tokens (T, W)."""
    qp, kp, vp = _project_heads(blk, blk.ln_1(xp), slice(0, 3))
    qs, ks, vs = _project_heads(blk, blk.ln_1(xs), slice(0, 3))
    out_p = _attend(blk, qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), None, True).flatten(2)
    out_s = _suffix_attention(blk, qs, ks, vs, kp, vp, layout)
    xp = xp + blk.ls_1(_attention_output(blk, out_p))
    xs = xs + blk.ls_1(_attention_output(blk, out_s))
    xp = xp + blk.ls_2(blk.mlp(blk.ln_2(xp)))
    xs = xs + blk.ls_2(blk.mlp(blk.ln_2(xs)))
    return xp, xs


def _packed_last_block(
    blk: nn.Module, xp: torch.Tensor, xs: torch.Tensor, layout: _PackedLayout
) -> torch.Tensor:
    """The last block, computed only as far as the pooled tokens need: (N, W) in group order."""
    kp, vp = _project_heads(blk, blk.ln_1(xp), slice(1, 3))
    hs = blk.ln_1(xs)
    ks, vs = _project_heads(blk, hs, slice(1, 3))
    x = xs[layout.pooled]
    (q,) = _project_heads(blk, hs[layout.pooled], slice(0, 1))
    outs, at = [], 0
    for g, rows, owner, _ in layout.group_slices():
        n, s = len(g.rows), g.length
        k = torch.cat([_prefix_keys(kp, owner, n), ks[rows].view(n, s, *ks.shape[1:]).transpose(1, 2)], 2)
        v = torch.cat([_prefix_keys(vp, owner, n), vs[rows].view(n, s, *vs.shape[1:]).transpose(1, 2)], 2)
        outs.append(_attend(blk, q[at : at + n].unsqueeze(2), k, v, None, False).flatten(1))
        at += n
    x = x + blk.ls_1(_attention_output(blk, torch.cat(outs)))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


class _HFTower:
    """open_clip's Hugging Face text tower (``HFTextEncoder``): input embeddings, its pooler and projection."""

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder
        self.pad_id = int(encoder.config.pad_token_id)
        self.embedding: nn.Embedding = encoder.transformer.get_input_embeddings()

    @property
    def width(self) -> int:
        return int(self.embedding.weight.shape[1])

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def pool_index(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)  # unused: the pooler decides

    def can_truncate(self) -> bool:
        return True  # padding is masked out of attention and pooling

    def encode(self, x: torch.Tensor, ids: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).long()
        out = self.encoder.transformer(inputs_embeds=x.to(self.embedding.weight.dtype), attention_mask=mask)
        return self.encoder.proj(self.encoder.pooler(out, mask))


def _text_tower(model: nn.Module) -> _NativeTower | _HFTower:
    from open_clip.hf_model import HFTextEncoder

    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder):
        return _HFTower(text)
    if hasattr(model, "token_embedding") or hasattr(text, "token_embedding"):
        return _NativeTower(model)
    raise InputError(
        f"prompt tuning does not support this model's text tower ({type(text or model).__name__})",
        where="--model",
        hint="use an open_clip model with its own text transformer or a Hugging Face text tower",
    )


# --------------------------------------------------------------------------- the learner


@dataclass
class _Piece:
    """A run of prompt tokens: fixed ids, or rows of a learnable tensor (with the ids they start from)."""

    ids: list[int]
    param: str | None = None
    rows: list[int] | None = None


def _assemble(
    pieces: list[list[_Piece]],
    scheme: _TokenScheme,
    offsets: dict[str, int],
    random_params: set[str],
    placeholder: int,
    classnames: list[str],
) -> tuple[list[list[int]], list[list[tuple[str, int]]], tuple[list[int], list[int], list[int]]]:
    """Per class, the token ids (learnable positions hold the ids they start from, or the placeholder)
    and what each position is made of (a fixed id or a row of the concatenated learnable tensors);
    plus (class, position, row) of every learnable position."""
    rows_c, rows_p, rows_src = [], [], []
    sequences, sources = [], []
    for c, class_pieces in enumerate(pieces):
        seq = list(scheme.head)
        src = [("id", t) for t in scheme.head]
        for piece in class_pieces:
            if piece.param is None:
                seq += piece.ids
                src += [("id", t) for t in piece.ids]
                continue
            assert piece.rows is not None
            for tok, row in zip(piece.ids, piece.rows):
                bank_row = offsets[piece.param] + row
                rows_c.append(c)
                rows_p.append(len(seq))
                rows_src.append(bank_row)
                seq.append(placeholder if piece.param in random_params else tok)
                src.append(("row", bank_row))
        seq += scheme.tail
        src += [("id", t) for t in scheme.tail]
        if len(seq) > scheme.context_length:
            raise InputError(
                f"the prompt needs {len(seq)} tokens but the model's text context holds {scheme.context_length}",
                where=f"class {classnames[c]!r}",
                hint="use fewer context tokens (--n-ctx) or a shorter class name",
            )
        sequences.append(seq)
        sources.append(src)
    return sequences, sources, (rows_c, rows_p, rows_src)


def _class_name_ids(scheme: _TokenScheme, classnames: list[str]) -> list[list[int]]:
    names = [scheme.encode(n) for n in classnames]
    for name, tokens in zip(classnames, names):
        if not tokens:
            raise InputError(
                "class name has no tokens", where=f"class {name!r}", hint="use a word as class name"
            )
    return names


_Layout = tuple[dict[str, list[int]], set[str], list[list[_Piece]]]


def check_n_ctx(n_ctx: int, scheme: _TokenScheme) -> None:
    """Refuse more context tokens than the text context holds before making a list of that many ids (a huge
    ``--n-ctx`` ran out of memory there)."""
    room = scheme.context_length - len(scheme.head) - len(scheme.tail)
    if n_ctx > room:
        raise InputError(
            f"{n_ctx} context tokens do not fit the model's text context of {scheme.context_length} tokens "
            f"(at most {room} besides the start and end tokens, fewer with the class name)",
            where="--n-ctx",
            hint="use fewer context tokens (CoOp uses 16)",
        )


def _coop_layout(cfg: PromptConfig, scheme: _TokenScheme, names: list[list[int]]) -> _Layout:
    """coop: the learned context (from ctx_init or random) around each class name, then ``.``."""
    random: set[str] = set()
    if cfg.ctx_init is not None:
        ctx_ids = scheme.encode(cfg.ctx_init)
        if not ctx_ids:
            raise InputError("ctx_init has no tokens", where="--ctx-init", hint='e.g. "a photo of a"')
    else:
        check_n_ctx(cfg.n_ctx, scheme)
        ctx_ids = [(scheme.encode(_PLACEHOLDER) or [scheme.pad_id])[0]] * cfg.n_ctx
        random.add("ctx")
    m = len(ctx_ids)
    init = {"ctx": ctx_ids * len(names) if cfg.csc else list(ctx_ids)}
    tail = scheme.encode(_COOP_TAIL)
    half = m // 2
    pieces = []
    for c, name in enumerate(names):
        base = c * m if cfg.csc else 0
        rows = [base + i for i in range(m)]

        def ctx(lo: int, hi: int, rows: list[int] = rows) -> _Piece:
            return _Piece(ctx_ids[lo:hi], "ctx", rows[lo:hi])

        if cfg.class_position == "end":
            seq = [ctx(0, m), _Piece(name), _Piece(tail)]
        elif cfg.class_position == "front":
            seq = [_Piece(name), ctx(0, m), _Piece(tail)]
        else:
            seq = [ctx(0, half), _Piece(name), ctx(half, m), _Piece(tail)]
        pieces.append([p for p in seq if p.ids])
    return init, random, pieces


def _template_layout(cfg: PromptConfig, scheme: _TokenScheme, names: list[list[int]]) -> _Layout:
    """cls-tuning / full-prompt: the template's words around learned class-name tokens."""
    before, after = (scheme.encode(part) if part.strip() else [] for part in cfg.template.split("{}"))
    init: dict[str, list[int]] = {"class_tokens": [t for name in names for t in name]}
    starts = [0]
    for name in names:
        starts.append(starts[-1] + len(name))
    if cfg.method == "full-prompt":
        if before:
            init["ctx"] = before * len(names) if cfg.csc else list(before)
        if after:
            init["ctx_suffix"] = after * len(names) if cfg.csc else list(after)
    pieces = []
    for c, name in enumerate(names):
        cls_piece = _Piece(name, "class_tokens", list(range(starts[c], starts[c] + len(name))))
        if cfg.method == "cls-tuning":
            seq = [_Piece(before), cls_piece, _Piece(after)]
        else:
            b0 = c * len(before) if cfg.csc else 0
            a0 = c * len(after) if cfg.csc else 0
            seq = [
                _Piece(before, "ctx", list(range(b0, b0 + len(before)))),
                cls_piece,
                _Piece(after, "ctx_suffix", list(range(a0, a0 + len(after)))),
            ]
        pieces.append([p for p in seq if p.ids])
    return init, set(), pieces


def _padded_ids(sequences: list[list[int]], scheme: _TokenScheme, device: torch.device) -> torch.Tensor:
    """(C, context_length) token ids, right-padded."""
    ids = torch.full((len(sequences), scheme.context_length), scheme.pad_id, dtype=torch.long)
    for c, seq in enumerate(sequences):
        ids[c, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids.to(device)


def _common_prefix(sources: list[list[tuple[str, int]]]) -> int:
    """Number of leading positions made of the same thing (fixed id or learnable row) in every prompt."""
    common = 0
    while common < min(len(s) for s in sources) and all(s[common] == sources[0][common] for s in sources):
        common += 1
    return common


# With gradient the text pass runs in one piece unless --class-chunk asks otherwise (chunking then
# costs one extra forward); without gradient, chunking is free and always bounds memory.
NO_GRAD_CLASS_CHUNK = 256


class PromptLearner(nn.Module):
    """Learnable prompts for ``classnames``; ``forward()`` gives (C, D) L2-normalised class text features.

    Only the learnable tensors (``ctx``, ``ctx_suffix``, ``class_tokens`` as the method needs) are
    parameters of this module; the CLIP model is used but not registered, and stays frozen.
    """

    def __init__(
        self,
        loaded: Any,
        classnames: list[str],
        config: PromptConfig,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        if not classnames:
            raise InputError("no class names", where="classnames", hint="give at least one class")
        for name in classnames:
            if not name.strip():
                raise InputError("empty class name", where="classnames", hint="every class needs a name")
        self.config = config
        self.classnames = list(classnames)
        self.device = torch.device(loaded.device)
        model = loaded.model
        model.requires_grad_(False)
        self._tower = tower = _text_tower(model)
        self._scheme = scheme = _token_scheme(
            loaded.tokenizer,
            tower.context_length if isinstance(tower, _NativeTower) else int(model.text.context_length),
            pad_id=tower.pad_id,
        )

        names = _class_name_ids(scheme, self.classnames)
        layout = _coop_layout if config.method == "coop" else _template_layout
        init_ids, init_random, pieces = layout(config, scheme, names)
        # context tokens per class (0 for cls-tuning)
        self.n_ctx = len(init_ids.get("ctx", [])) // (len(classnames) if config.csc else 1)
        offsets = self._register_learnable(init_ids, init_random, generator)
        self._param_order = list(init_ids)

        placeholder = (scheme.encode(_PLACEHOLDER) or [scheme.pad_id])[0]
        sequences, sources, learnable_at = _assemble(
            pieces, scheme, offsets, init_random, placeholder, self.classnames
        )
        ids = _padded_ids(sequences, scheme, self.device)
        pool_index = tower.pool_index(ids)
        self._plan_computation(sequences, sources, pool_index)
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("pool_index", pool_index, persistent=False)
        for name, values in zip(("_rows_c", "_rows_p", "_rows_src"), learnable_at):
            self.register_buffer(
                name, torch.tensor(values, dtype=torch.long, device=self.device), persistent=False
            )
        self._plans: dict[tuple[int | None, str], tuple[tuple[RowChunk, tuple[torch.Tensor, ...]], ...]] = {}

    def _register_learnable(
        self, init_ids: dict[str, list[int]], init_random: set[str], generator: torch.Generator | None
    ) -> dict[str, int]:
        """Create the learnable tensors (from token embeddings or random); their row offsets in the bank."""
        tower, n_cls = self._tower, len(self.classnames)
        offsets, total = {}, 0
        for name, ids in init_ids.items():
            with torch.no_grad():
                if name in init_random:
                    value = torch.empty((len(ids), tower.width), dtype=torch.float32).normal_(
                        0.0, self.config.init_std, generator=generator
                    )
                else:
                    value = tower.embed_ids(torch.tensor(ids, dtype=torch.long, device=self.device)).float()
            if name in ("ctx", "ctx_suffix") and self.config.csc:
                value = value.reshape(n_cls, -1, tower.width)
            self.register_parameter(name, nn.Parameter(value.to(self.device).clone()))
            offsets[name] = total
            total += len(ids)
        return offsets

    def _plan_computation(
        self, sequences: list[list[int]], sources: list[list[tuple[str, int]]], pool_index: torch.Tensor
    ) -> None:
        """Which path forward() takes and how many tokens each class needs on it.

        Tokens after a class's last content token and its pooled token cannot change its feature
        when the tower can truncate; with a causal tower the prefix shared by all classes (start
        token and shared context) is computed once, and each class then needs only its own tokens
        up to the pooled one.
        """
        tower = self._tower
        length = self._scheme.context_length
        pooled = [int(p) for p in pool_index.tolist()]
        self.full_length = length
        if tower.can_truncate():
            needed = [max(len(s) - 1, p) + 1 for s, p in zip(sequences, pooled)]
        else:
            needed = [length] * len(sequences)
        self.seq_len = max(needed)
        common = min(_common_prefix(sources), min(pooled))
        shared = isinstance(tower, _NativeTower) and tower.prefix_sharing_supported() and common >= 2
        self.shared_prefix_len = common if shared else 0
        self.fast_path = "shared-prefix" if shared else ("truncated" if self.seq_len < length else "full")
        # per class, the tokens its group is computed to (after the shared prefix on that path)
        self.needed_tokens = [p - common + 1 for p in pooled] if shared else needed

    # ---- forward

    def _learnable_rows(self) -> torch.Tensor:
        return torch.cat([getattr(self, name).reshape(-1, self._tower.width) for name in self._param_order])

    def prompt_embeddings(self, length: int | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(C, length, W) token embeddings of the prompts (default: the length forward() computes);
        with ``rows``, of those classes only, in that order."""
        length = self.seq_len if length is None else length
        if rows is None:
            rows = torch.arange(len(self.classnames), device=self.token_ids.device)
            return self._embeddings(length, rows, (self._rows_c, self._rows_p, self._rows_src))
        return self._embeddings(length, rows, self._chunk_put(rows))

    def _chunk_put(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class within ``rows``, position, bank row) of the learnable positions of those classes."""
        local = torch.full((len(self.classnames),), -1, dtype=torch.long, device=rows.device)
        local[rows] = torch.arange(len(rows), device=rows.device)
        at = local[self._rows_c]
        keep = at >= 0
        return at[keep], self._rows_p[keep], self._rows_src[keep]

    def chunks(self, size: int | None) -> tuple[RowChunk, ...]:
        """The classes in chunks of at most ``size`` (None or 0: one chunk), each grouped by needed length."""
        return tuple(chunk for chunk, _ in self._plan(size))

    def _plan(self, size: int | None) -> tuple[tuple[RowChunk, tuple[torch.Tensor, ...]], ...]:
        if size is not None and (size <= 0 or size >= len(self.classnames)):
            size = None
        device = self.token_ids.device
        key = (size, str(device))
        if key not in self._plans:
            self._plans[key] = tuple(
                (chunk, self._chunk_put(chunk.rows))
                for chunk in plan_chunks(self.needed_tokens, size, device)
            )
        return self._plans[key]

    def forward(self) -> torch.Tensor:
        """(C, D) float32 L2-normalised class text features, skipping computation that cannot matter.

        Classes are grouped by the tokens they need; with ``class_chunk`` (and always without
        gradient) they are computed in chunks of classes so memory does not grow with their number.
        """
        params = [getattr(self, name) for name in self._param_order]
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        size = self.config.class_chunk if grad else (self.config.class_chunk or NO_GRAD_CLASS_CHUNK)
        plan = self._plan(size)
        puts = {id(chunk): put for chunk, put in plan}
        single = len(plan) == 1

        def compute(chunk: RowChunk) -> torch.Tensor:
            return self._features(chunk, puts[id(chunk)], single)

        return chunked_rows(compute, [chunk for chunk, _ in plan], len(self.classnames), params)

    def _features(self, chunk: RowChunk, put: tuple[torch.Tensor, ...], single: bool) -> torch.Tensor:
        """Normalised features of ``chunk.rows`` (in that order)."""
        if self.fast_path == "full":
            x = self._embeddings(self.full_length, chunk.rows, put)
            feats = self._tower.encode(x, self.token_ids[chunk.rows], self.pool_index[chunk.rows])
        else:
            x = self._embeddings(self.seq_len, chunk.rows, put)
            if self.fast_path == "shared-prefix":
                feats = self._forward_shared_prefix(x) if single else self._forward_shared_prefix(x, chunk)
            else:
                ids, pool = self.token_ids[chunk.rows, : self.seq_len], self.pool_index[chunk.rows]
                feats = encode_grouped(self._tower.encode, x, ids, pool, chunk.groups)
        return F.normalize(feats.float(), dim=-1)

    def _embeddings(self, length: int, rows: torch.Tensor, put: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(len(rows), length, W): the fixed tokens' embeddings with the learnable rows put in (``put``)."""
        with torch.no_grad():
            fixed = self._tower.embed_ids(self.token_ids[rows, :length])
        learned = self._learnable_rows().to(fixed.dtype)
        return fixed.index_put(put[:2], learned.index_select(0, put[2]))

    def _forward_shared_prefix(self, x: torch.Tensor, chunk: RowChunk | None = None) -> torch.Tensor:
        """Features of the rows of ``x`` (those of ``chunk``; default: the one chunk of all classes)."""
        assert isinstance(self._tower, _NativeTower)
        chunk = self._plan(None)[0][0] if chunk is None else chunk
        p = self.shared_prefix_len
        return self._tower.encode_packed(x[:1, :p], x[:, p:], chunk.groups)

    def forward_plain(self) -> torch.Tensor:
        """The same features computed the straightforward way: full context length, every class separately."""
        x = self.prompt_embeddings(self.full_length)
        return F.normalize(self._tower.encode(x, self.token_ids, self.pool_index).float(), dim=-1)

    # ---- state

    def used_config(self) -> PromptConfig:
        """The configuration as built: with ``ctx_init``, ``n_ctx`` is its token count (the option is ignored)."""
        if self.config.ctx_init is None:
            return self.config
        return replace(self.config, n_ctx=self.n_ctx)

    def learnable_state(self) -> dict[str, torch.Tensor]:
        """The learned tensors by stable name (``ctx``, ``ctx_suffix``, ``class_tokens``), float32 on CPU."""
        return {
            name: getattr(self, name).detach().float().cpu().contiguous().clone()
            for name in self._param_order
        }

    def load_learnable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`learnable_state`; names and shapes must match this learner."""
        expected = {name: tuple(getattr(self, name).shape) for name in self._param_order}
        got = {name: tuple(t.shape) for name, t in tensors.items()}
        if got != expected:
            raise InputError(
                f"prompt tensors {_describe(got)} do not fit this prompt learner ({_describe(expected)})",
                where="prompt state",
                hint="use the class list, model and prompt settings the prompts were trained with",
            )
        with torch.no_grad():
            for name in self._param_order:
                getattr(self, name).copy_(tensors[name].to(self.device, torch.float32))


def _describe(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {list(v)}" for k, v in sorted(shapes.items())) or "none"
