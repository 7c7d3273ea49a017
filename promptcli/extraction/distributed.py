"""Extraction across processes, GPUs and nodes on PyTorch's own distributed engine.

Launch with ``torchrun`` (which sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``)::

    torchrun --nproc-per-node 8 -m promptcli extract data/train -o train.h5 --model ViT-B-32

Every rank encodes its share of the chunks of ``<output>.partial/`` (which must be on a filesystem
all ranks see), rank 0 assembles the HDF5 file. Chunk boundaries, batches and augmentation seeds
depend only on the row index, so the file holds the same datasets as a single-process run.

No feature ever travels through the process group: it carries only small control messages (the
work plan, and each rank's success or error), so an error on one rank stops all of them with
that error instead of leaving the others waiting.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from promptcli.errors import InputError, PromptcliError, RuntimeFailure
from promptcli.extraction import extract as ex
from promptcli.io.fileio import check_output_path, locks_output
from promptcli.io.image_sources import ImageSource
from promptcli.models.loading import LoadedModel

T = TypeVar("T")
ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
TIMEOUT_ENV = "PROMPTCLI_DIST_TIMEOUT"  # seconds a rank waits for the others at a sync point
DEFAULT_TIMEOUT_S = 4 * 3600
FAILED_PREFIX = "failed-rank"
WATCH_EVERY_S = 1.0  # how often a rank looks for a peer's failure (a directory listing)


class PeerFailed(Exception):
    """Another rank failed; this one stops early (the peer's error is raised after the sync)."""


@dataclass
class DistContext:
    """Where this process sits in the job: its rank, the world size, its GPU index on the node."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str = ""  # "" until the process group is initialised

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return bool(self.backend)

    def device_spec(self, device: str) -> str:
        """The device this rank uses: ``cuda:LOCAL_RANK`` for auto/cuda when CUDA is present."""
        spec = "auto" if device is None else device.strip().lower()
        if spec.startswith("cuda:"):
            raise InputError(
                f"{device} names one GPU, but each rank uses cuda:LOCAL_RANK",
                where="--device",
                hint="pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES",
            )
        if spec == "cuda" or (spec == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise InputError(
                    "cuda requested but CUDA is not available",
                    where="--device",
                    hint="use --device cpu (or auto)",
                )
            if self.local_rank >= torch.cuda.device_count():
                raise InputError(
                    f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} GPU(s) visible",
                    where="--nproc-per-node",
                    hint="start at most one process per visible GPU",
                )
            return f"cuda:{self.local_rank}"
        return "cpu" if spec == "auto" else spec  # no GPU: auto is the CPU (the callers need a real device)

    # -- process group ---------------------------------------------------------------------

    def init(self, device: str) -> None:
        """Join the process group: NCCL when this rank computes on a GPU, else Gloo."""
        import torch.distributed as dist

        spec = self.device_spec(device)
        kwargs: dict[str, Any] = {}
        if spec.startswith("cuda"):
            torch.cuda.set_device(self.local_rank)
            self.backend = "nccl"
            kwargs["device_id"] = torch.device("cuda", self.local_rank)
        else:
            self.backend = "gloo"
        dist.init_process_group(
            self.backend,
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=_timeout_s()),
            **kwargs,
        )

    def close(self) -> None:
        import torch.distributed as dist

        if self.active and dist.is_initialized():
            dist.destroy_process_group()
        self.backend = ""

    @contextlib.contextmanager
    def session(self, device: str) -> Iterator[None]:
        """The process group around one command: rank 0 reports a promptcli error, the others only
        exit with its code (no duplicate messages); the group is closed however the command ends."""
        from promptcli.errors import PromptcliError

        try:
            self.init(device)
            yield
        except PromptcliError as exc:
            if self.is_main:
                raise
            sys.exit(exc.exit_code)
        finally:
            self.close()

    # -- agreeing on outcomes --------------------------------------------------------------

    def collective(self, fn: Callable[[], T], abort_flag: Path | None = None) -> T:
        """Run ``fn`` on every rank and return this rank's result.

        If ``fn`` raised on any rank, every rank raises that error (the lowest failing rank's)
        after the sync, so no rank waits for one that gave up. With ``abort_flag`` (a folder on
        the shared filesystem) a failing rank also drops a file there right away, which
        :meth:`watch` turns into an early stop on the others.
        """
        value, _ = self._agree(fn, abort_flag, share=False)
        return value

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and return its result on every rank (errors reach all ranks)."""
        _, values = self._agree(fn if self.is_main else (lambda: None), None, share=True)
        return values[0]

    def _agree(self, fn: Callable[[], Any], abort_flag: Path | None, share: bool) -> tuple[Any, list[Any]]:
        status: dict[str, Any]
        value = None
        try:
            value = fn()
            status = {"ok": True, "value": value if share else None}
        except PeerFailed:
            status = {"ok": False, "peer": True}
        except Exception as exc:  # every failure must reach the other ranks
            status = {"ok": False, "peer": False, "error": _describe(exc)}
            if abort_flag is not None:
                _drop_flag(abort_flag, self.rank, status["error"])
            if not self.active:
                raise
        if not self.active:
            statuses = [status]
        else:
            import torch.distributed as dist

            statuses = [None] * self.world_size
            dist.all_gather_object(statuses, status)
        failed = [s for s in statuses if not s["ok"] and not s.get("peer")]
        if failed:
            raise _rebuild(failed[0]["error"])
        if any(not s["ok"] for s in statuses):
            raise RuntimeFailure(
                "a rank stopped because another failed, but no rank reported an error",
                where=abort_flag,
                hint=f"remove stale {FAILED_PREFIX}* files there and rerun with --resume",
            )
        return value, [s["value"] for s in statuses]

    def watch(self, flag_dir: Path, on_rows: Callable[[int], None] | None) -> Callable[[int], None]:
        """An ``on_rows`` callback that stops this rank once another rank has failed."""

        last = [time.monotonic()]

        def callback(n: int) -> None:
            if on_rows:
                on_rows(n)
            now = time.monotonic()
            if self.active and now - last[0] >= WATCH_EVERY_S:
                last[0] = now
                if any(flag_dir.glob(f"{FAILED_PREFIX}*")):
                    raise PeerFailed()

        return callback


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError as exc:
        raise InputError(f"not a number of seconds: {raw!r}", where=TIMEOUT_ENV, hint="e.g. 3600") from exc


def _describe(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, PromptcliError):
        return {
            "kind": type(exc).__name__,
            "what": exc.what,
            "where": exc.where,
            "hint": exc.hint,
            "exit_code": exc.exit_code,
        }
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return {
        "kind": "RuntimeFailure",
        "what": f"unexpected {type(exc).__name__}{': ' + first if first else ''}",
        "where": None,
        "hint": "rerun with --debug for the traceback and report it",
        "exit_code": 1,
    }


def _rebuild(desc: dict[str, Any]) -> PromptcliError:
    cls = InputError if desc["kind"] == "InputError" else RuntimeFailure
    err = cls(desc["what"], where=desc["where"], hint=desc["hint"])
    err.exit_code = desc["exit_code"]
    return err


def _drop_flag(flag_dir: Path, rank: int, error: dict[str, Any]) -> None:
    try:
        (flag_dir / f"{FAILED_PREFIX}{rank}").write_text(str(error.get("what", "")))
    except OSError:
        pass  # the sync after the failure still reports the error; this only stops peers sooner


def context_from_env(force: bool = False) -> DistContext | None:
    """The distributed context torchrun describes, or None for a plain single-process run.

    A job is distributed when ``WORLD_SIZE`` > 1, or when ``force`` (``--distributed``) asks for
    it; then ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and the rendezvous variables
    ``MASTER_ADDR``/``MASTER_PORT``) must all be set, as torchrun does.
    """
    world = os.environ.get("WORLD_SIZE", "")
    if not force and (not world or world == "1"):
        return None
    missing = [v for v in (*ENV_VARS, "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise InputError(
            f"distributed run without {', '.join(missing)} in the environment",
            where="--distributed",
            hint="launch with `torchrun --nproc-per-node N -m promptcli extract ...`",
        )
    try:
        ctx = DistContext(int(world), int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]))
    except ValueError as exc:
        raise InputError(
            f"non-integer {', '.join(ENV_VARS)}", where="environment", hint="launch with torchrun"
        ) from exc
    if not (0 <= ctx.rank < ctx.world_size) or ctx.local_rank < 0:
        raise InputError(
            f"RANK {ctx.rank} outside WORLD_SIZE {ctx.world_size}",
            where="environment",
            hint="launch with torchrun",
        )
    return ctx


def shard(items: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of ``items``: every ``world_size``-th one, starting at ``rank``."""
    return items[rank::world_size]


@locks_output("output", group="ctx")
def extract_distributed(
    source: ImageSource,
    loaded: LoadedModel,
    output: str | Path,
    options: ex.ExtractOptions,
    ctx: DistContext,
    *,
    resume: bool = False,
    force: bool = False,
    on_rows: Callable[[int], None] | None = None,
) -> ex.ExtractResult | None:
    """:func:`promptcli.extraction.extract.extract_features` split across the ranks of ``ctx``.

    Rank 0 prepares ``<output>.partial/`` and plans the chunks still to do; each rank encodes
    every ``world_size``-th of them; rank 0 assembles the file and returns the result, the other
    ranks return None once it is written. ``on_rows`` sees this rank's rows only.
    """
    options.validate()
    output = Path(output)
    manifest = ex.manifest_for(source, loaded, options)
    partial = ex.partial_of(output)
    n_chunks = len(ex.chunk_ranges(len(source), options.rows_per_chunk))

    def prepare() -> tuple[list[int], int, ex.ExtractResult | None]:
        if resume and not force and output.exists() and not partial.exists():
            finished = ex.finished_extraction(output, manifest, source.files_digest())
            if finished is not None:  # this same extraction had finished (a requeued job's step)
                return [], 0, finished
        check_output_path(output, force)
        _, n_done = ex.prepare_partial(output, manifest, resume, force)
        for stale in partial.glob(f"{FAILED_PREFIX}*"):
            stale.unlink()
        todo = [c for c in range(n_chunks) if not ex.chunk_path(partial, c).exists()]
        return todo, n_done, None

    todo, n_done, finished = ctx.from_main(prepare)
    if finished is not None:
        return finished if ctx.is_main else None

    def check_shared() -> None:
        # The same inputs on every rank, and rank 0's partial folder visible here.
        if not (partial / ex.MANIFEST).is_file():
            raise InputError(
                f"rank {ctx.rank} does not see {partial}",
                where=partial,
                hint="the output folder must be on a filesystem shared by all ranks",
            )
        theirs = json.loads((partial / ex.MANIFEST).read_text())
        differ = ex.manifest_changes(theirs, manifest)
        if differ:
            raise InputError(
                f"rank {ctx.rank} has different {', '.join(differ)} than rank 0",
                where=partial,
                hint="every rank must see the same images and model, with the same options",
            )

    ctx.collective(check_shared)
    mine = shard(todo, ctx.rank, ctx.world_size)
    ctx.collective(
        lambda: ex.encode_chunks(source, loaded, options, partial, mine, ctx.watch(partial, on_rows)),
        abort_flag=partial,
    )

    def assemble() -> ex.ExtractResult:
        result = ex.assemble(
            source,
            loaded,
            options,
            partial,
            output,
            extra_attrs={"distributed": {"world_size": ctx.world_size, "backend": ctx.backend}},
        )
        result.resumed_chunks = n_done
        return result

    result = ctx.collective(assemble if ctx.is_main else (lambda: None))
    return result if ctx.is_main else None
