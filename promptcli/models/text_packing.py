"""Exact, cheaper text passes over many prompts: grouping by length and chunking with bounded memory.

Both work on a batch of N prompt rows (the C class prompts of CoOp; the B x C image-conditioned prompts
of a CoCoOp-style learner equally), and neither changes a result beyond float rounding:

- :func:`group_by_length` puts rows that need the same number of tokens together, so each group is
  computed to its own length instead of every row to the longest one (tokens after a row's pooled
  token cannot change it under a causal or padding mask).
- :func:`chunked_rows` computes the (N, D) features chunk by chunk without keeping any chunk's
  activations, and in the backward recomputes each chunk with gradient and pulls back its slice of
  dL/dfeatures: peak memory is that of one chunk plus the (N, D) matrix, for one extra forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LengthGroup:
    """Rows (indices into the batch given to :func:`group_by_length`) that all need ``length`` tokens."""

    length: int
    rows: torch.Tensor  # (n,) long


@dataclass(frozen=True)
class RowChunk:
    """A chunk of rows (indices into the full batch) and its length groups (indices into the chunk)."""

    rows: torch.Tensor  # (n,) long
    groups: tuple[LengthGroup, ...]


def group_by_length(lengths: Sequence[int], device: torch.device | str = "cpu") -> tuple[LengthGroup, ...]:
    """Rows grouped by equal needed length, shortest first; every row appears exactly once."""
    by_length: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"row {row} needs {length} tokens; every row needs at least one")
        by_length.setdefault(int(length), []).append(row)
    return tuple(
        LengthGroup(length, torch.tensor(rows, dtype=torch.long, device=device))
        for length, rows in sorted(by_length.items())
    )


def plan_chunks(
    lengths: Sequence[int], size: int | None, device: torch.device | str = "cpu"
) -> tuple[RowChunk, ...]:
    """Split rows into chunks of about ``size`` rows each (all in one when ``size`` is None or covers them).

    Rows are taken in order of length (so a chunk spans few length groups) and a chunk is closed
    before its tokens would pass ``size`` x the mean length: every chunk holds about the same number
    of tokens, so the peak memory of a chunk depends on ``size`` and the mean length only, not on
    the number of rows (or on how long the longest rows are).
    """
    order = sorted(range(len(lengths)), key=lambda r: (lengths[r], r))
    if size is None or size <= 0 or size >= len(order):
        parts = [order]
    else:
        budget = size * sum(lengths) / len(lengths)
        parts, current, tokens = [], [], 0
        for row in order:
            if current and tokens + lengths[row] > budget:
                parts.append(current)
                current, tokens = [], 0
            current.append(row)
            tokens += lengths[row]
        parts.append(current)
    return tuple(
        RowChunk(
            rows=torch.tensor(part, dtype=torch.long, device=device),
            groups=group_by_length([lengths[r] for r in part], device),
        )
        for part in parts
    )


def encode_grouped(
    encode: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    ids: torch.Tensor,
    pool_index: torch.Tensor,
    groups: Sequence[LengthGroup],
) -> torch.Tensor:
    """``encode(x, ids, pool_index)`` run per group on its rows cut to its length; results in row order.

    ``x`` (N, L, W) token embeddings, ``ids`` (N, L) token ids, ``pool_index`` (N,) pooled positions.
    """
    outs, rows = [], []
    for g in groups:
        outs.append(encode(x[g.rows, : g.length], ids[g.rows, : g.length], pool_index[g.rows]))
        rows.append(g.rows)
    return restore_order(torch.cat(outs), torch.cat(rows))


def restore_order(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``values[i]`` belongs to row ``rows[i]``: the values in row order (``rows`` is a permutation)."""
    if len(rows) == 1 or bool((rows[1:] > rows[:-1]).all()):
        return values
    return values[torch.argsort(rows)]


class _ChunkedRows(torch.autograd.Function):
    """Features of all rows without keeping activations; the backward recomputes chunk by chunk."""

    @staticmethod
    def forward(
        ctx: Any, compute: Callable, chunks: tuple[RowChunk, ...], n_rows: int, *params: torch.Tensor
    ):
        ctx.compute, ctx.chunks = compute, chunks
        ctx.autocast = _autocast_state(params[0].device.type)
        ctx.save_for_backward(*params)  # the learnable leaves themselves, not activations
        with torch.no_grad():
            return _assemble(compute, chunks, n_rows)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        params = ctx.saved_tensors
        need = list(ctx.needs_input_grad[3:])
        wanted = [p for p, n in zip(params, need) if n]
        total: list[torch.Tensor | None] = [None] * len(wanted)
        device_type, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, enabled=enabled, dtype=dtype):
            for chunk in ctx.chunks:
                out = ctx.compute(chunk)
                got = torch.autograd.grad(out, wanted, grad_out[chunk.rows].to(out.dtype), allow_unused=True)
                total = [t if g is None else (g if t is None else t + g) for t, g in zip(total, got)]
        it = iter(total)
        return (None, None, None, *(next(it) if n else None for n in need))


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    if device_type not in ("cuda", "cpu"):
        return device_type, False, torch.float32
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _assemble(compute: Callable[[RowChunk], torch.Tensor], chunks: Sequence[RowChunk], n_rows: int):
    outs = [compute(chunk) for chunk in chunks]
    rows = torch.cat([c.rows for c in chunks])
    if len(rows) != n_rows:
        raise ValueError(f"chunks cover {len(rows)} rows, expected {n_rows}")
    return restore_order(torch.cat(outs), rows)


def chunked_rows(
    compute: Callable[[RowChunk], torch.Tensor],
    chunks: Sequence[RowChunk],
    n_rows: int,
    params: Sequence[torch.Tensor],
) -> torch.Tensor:
    """(N, D): ``compute(chunk)`` gives the features of ``chunk.rows`` from ``params``; assembled in row order.

    With gradient enabled and more than one chunk, only the output is kept: the backward recomputes
    each chunk with gradient (same autocast state) and accumulates the parameters' gradients, exact
    up to float summation order. ``compute`` must be deterministic (no dropout).
    """
    chunks = tuple(chunks)
    needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    if len(chunks) == 1 or not needs_grad:
        return _assemble(compute, chunks, n_rows)
    return _ChunkedRows.apply(compute, chunks, n_rows, *params)
