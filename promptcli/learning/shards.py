"""How one fine-tuning step is shared among processes: alone, or as one rank of a torchrun job.

A rank takes a contiguous share of every global batch, scales its rows' loss by (its rows / global
batch), and the ranks' gradients are summed (one all-reduce of the flattened gradients per step), so
a step equals one process's step on the global batch up to float rounding. The centre-crop pass is
split the same way and its rows summed back (each row comes from exactly one rank). Scalars (the
step's loss, counts of unreadable images) are summed, so every rank takes the same decisions.
"""

from __future__ import annotations

from typing import Any

import torch


class Shard:
    """This process's part of a step: one process, or one rank of a torchrun job (see :class:`DistShard`)."""

    world_size = 1
    rank = 0

    def part(self, index: torch.Tensor) -> torch.Tensor:
        return index

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        pass

    def gather_rows(self, index: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
        out = torch.zeros(n, rows.shape[1], dtype=rows.dtype)
        out[index] = rows
        return out

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        pass

    def merge(self, found: dict[int, str]) -> dict[int, str]:
        return found

    def total(self, values: list[float]) -> list[float]:
        """The sums over processes (the global batch's loss from the scaled shares)."""
        return values

    def maximum(self, value: float) -> float:
        """The largest of the processes' values."""
        return value

    def broadcast(self, params: list[torch.Tensor]) -> None:
        pass

    def from_main(self, fn: Any) -> Any:
        """``fn()`` on the main process, its result (and error) on every process."""
        return fn()


class DistShard(Shard):
    """One rank of a torchrun job: a contiguous share of every global batch, gradients summed.

    Each rank computes its rows' loss scaled by (its rows / global batch) and the ranks' gradients
    are summed, so a step equals one process's step on the global batch (up to float rounding).
    """

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.world_size, self.rank = ctx.world_size, ctx.rank

    def part(self, index: torch.Tensor) -> torch.Tensor:
        return index.tensor_split(self.world_size)[self.rank]

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def gather_rows(self, index: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
        import torch.distributed as dist

        out = torch.zeros(n, rows.shape[1], dtype=rows.dtype)
        out[index] = rows
        if self.ctx.backend == "nccl":
            out = out.cuda()
        dist.all_reduce(out)  # each row comes from exactly one rank; the others add zeros
        return out.cpu()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def total(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device="cuda" if self.ctx.backend == "nccl" else "cpu")
        dist.all_reduce(t)
        return t.cpu().tolist()

    def maximum(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device="cuda" if self.ctx.backend == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def merge(self, found: dict[int, str]) -> dict[int, str]:
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, found)
        return {k: v for part in parts for k, v in part.items()}

    def broadcast(self, params: list[torch.Tensor]) -> None:
        """Rank 0's values everywhere (the linear probe's head, in case GPUs differ in rounding)."""
        import torch.distributed as dist

        for t in params:
            dist.broadcast(t.data, src=0)

    def from_main(self, fn: Any) -> Any:
        return self.ctx.from_main(fn)
