"""Image-feature extraction: decode, preprocess, encode, stream to a resumable partial folder, assemble.

An extraction writes fixed chunks of source rows into ``<output>.partial/`` (one ``.npz`` per chunk,
each renamed into place when complete) and assembles the HDF5 file only when every chunk exists.
Because chunk boundaries, batch boundaries and the augmentation seeds depend only on the row index,
an interrupted run completed with ``resume=True`` (or a run split across processes) gives the same
content as one uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from promptcli.errors import InputError, RuntimeFailure
from promptcli.extraction.decode import BOMB, DECODE_ERRORS, DEFAULT_MAX_PIXELS, decode_failure, decode_rgb
from promptcli.io.checks import INT_MAX, MAX_VIEWS, check_at_most, check_seed
from promptcli.io.features import FEATURE_DTYPES, check_unit_rows, write_features
from promptcli.io.fileio import (
    check_distinct,
    check_output_path,
    disk_full_guard,
    locks_output,
    open_regular,
    place_output,
)
from promptcli.io.image_sources import ImageSource, file_stamp
from promptcli.io.provenance import base_provenance
from promptcli.models.devices import runtime_record
from promptcli.models.loading import LoadedModel

PARTIAL_SUFFIX = ".partial"
MANIFEST = "manifest.json"


@dataclass
class ExtractOptions:
    views: int = 0
    seed: int = 0
    batch_size: int = 64
    workers: int = 2
    dtype: str = "float16"
    skip_bad: bool = False
    chunk_size: int = 1024  # rows per resumable chunk (rounded up to whole batches)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused (decompression-bomb guard)

    def validate(self) -> None:
        if self.views < 0:
            raise InputError(
                "must be >= 0", where="--views", hint="number of extra augmented views per image"
            )
        if self.batch_size < 1:
            raise InputError("must be >= 1", where="--batch-size", hint="e.g. 64")
        if self.workers < 0:
            raise InputError("must be >= 0", where="--workers", hint="0 decodes in the main process")
        if self.dtype not in FEATURE_DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r}", where="--dtype", hint="use float16 or float32")
        if self.max_pixels < 1:
            raise InputError("must be >= 1", where="--max-pixels", hint=f"default {DEFAULT_MAX_PIXELS}")
        check_seed(self.seed)
        check_at_most(self.views, MAX_VIEWS, "--views")
        for value, option in ((self.batch_size, "--batch-size"), (self.workers, "--workers")):
            check_at_most(value, INT_MAX, option)
        if self.chunk_size < 1:
            raise InputError("must be >= 1", where="--chunk-size", hint="e.g. 1024")
        check_at_most(self.chunk_size, INT_MAX, "--chunk-size")

    @property
    def rows_per_chunk(self) -> int:
        return max(1, -(-self.chunk_size // self.batch_size)) * self.batch_size


@dataclass
class ExtractResult:
    output: Path
    n_images: int
    n_skipped: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    dim: int = 0
    views: int = 0
    resumed_chunks: int = 0
    already_complete: bool = False  # --resume on an output this same extraction had finished


def finished_extraction(output: Path, manifest: dict[str, Any], files_digest: str) -> ExtractResult | None:
    """With ``--resume`` and no partial result: ``output``'s result when this same extraction (its recorded
    manifest) wrote it (a requeued job's finished step), else None (refused as any existing output); another
    extraction's output is refused naming what differs."""
    from promptcli.io.features import read_attrs

    try:
        attrs = read_attrs(output)
        recorded = {**json.loads(attrs["manifest"]), "files_digest": attrs["files_digest"]}
    except (InputError, OSError, KeyError, TypeError, ValueError):  # not a features file, or from before
        return None
    # and the files themselves: images rewritten under their names since are not this extraction's
    changed = manifest_changes(recorded, {**manifest, "files_digest": files_digest})
    if changed:
        raise InputError(
            f"output exists, written by another extraction (it differs in {', '.join(changed)})",
            where=output,
            hint="pass --force to overwrite it or choose another -o",
        )
    skipped = json.loads(attrs["skipped"]) if isinstance(attrs.get("skipped"), str) else []
    return ExtractResult(
        output,
        int(attrs.get("n_images", 0)),
        int(attrs.get("n_skipped", 0)),
        skipped if isinstance(skipped, list) else [],
        int(attrs.get("embed_dim", 0) or 0),
        int(attrs.get("views", 0) or 0),
        already_complete=True,
    )


def augmentation(preprocess_cfg: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """CoOp's training augmentation: random resized crop + horizontal flip, then normalise."""
    size = preprocess_cfg.get("size", 224)
    size = size if isinstance(size, int) else tuple(size)
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean=preprocess_cfg["mean"], std=preprocess_cfg["std"]),
        ]
    )


def view_seed(seed: int, index: int) -> int:
    """The seed of one image's augmented views: a function of the run seed and the row alone."""
    return (seed * 1_000_003 + index * 7_919 + 17) % (2**63 - 1)


class ImageDataset(Dataset):
    """Decodes one image into its centre-crop tensor and ``views`` augmented tensors."""

    def __init__(
        self,
        files: list[Path],
        preprocess,
        augment,
        views: int,
        seed: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.files, self.preprocess, self.augment = files, preprocess, augment
        self.views, self.seed, self.max_pixels = views, seed, max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        st = None
        try:
            with open_regular(path) as handle:
                st = os.fstat(handle.fileno())  # before reading: a file rewritten while read then differs
                digest = file_digest(handle)
                handle.seek(0)
                rgb = decode_rgb(handle, self.max_pixels)
        except DECODE_ERRORS as exc:
            # the file skipped, as it was: --resume notices it fixed (or broken otherwise) since
            stamp = (st.st_size, st.st_mtime_ns) if st is not None else file_stamp(path)
            return {"index": index, "error": decode_failure(exc), "stamp": stamp or MISSING_STAMP}
        item: dict[str, Any] = {
            "index": index,
            "error": "",
            "image": self.preprocess(rgb),
            "digest": digest,
            "stamp": (st.st_size, st.st_mtime_ns),
        }
        if self.views:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(self.seed, index))
                item["views"] = torch.stack([self.augment(rgb) for _ in range(self.views)])
        return item


def file_digest(handle: Any) -> bytes:
    """SHA-256 (32 bytes) of an open binary file's bytes, read in blocks from where it stands."""
    h = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        h.update(block)
    return h.digest()


def images_digest(row_digests: Iterator[np.ndarray]) -> str:
    """SHA-256 over the encoded rows' file digests (blocks of (n, 32) uint8, in row order): the images'
    content, whatever their paths, the same however the rows were split into chunks, runs or ranks."""
    h = hashlib.sha256()
    for block in row_digests:
        h.update(np.ascontiguousarray(block, dtype=np.uint8).tobytes())
    return h.hexdigest()


def leave_termination_to_main(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: SIGTERM and SIGHUP sent to the whole job (as a scheduler
    does) are left to the main process, whose cleanup shuts the workers down; killed by them, the workers
    made the main process print a DataLoader traceback on its way out. While the main process stops, a
    worker's thread handing it a batch may lose its connection: nothing to report either."""
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    threading.excepthook = _quiet_lost_thread  # torch's and multiprocessing's helper threads report
    sys.excepthook = _quiet_lost_connection  # through one or the other


def _lost_connection(exc_type: type[BaseException] | None) -> bool:
    return exc_type is not None and issubclass(exc_type, (ConnectionError, EOFError))


def _quiet_lost_thread(args: threading.ExceptHookArgs) -> None:
    if not _lost_connection(args.exc_type):
        threading.__excepthook__(args)


def _quiet_lost_connection(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    if not _lost_connection(exc_type):
        sys.__excepthook__(exc_type, exc, tb)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [it for it in items if not it["error"]]
    batch: dict[str, Any] = {
        "index": [it["index"] for it in good],
        "digest": [it["digest"] for it in good],
        "stamp": [it["stamp"] for it in good],
        "bad": [(it["index"], it["error"]) for it in items if it["error"]],
        "bad_stamp": [it["stamp"] for it in items if it["error"]],
    }
    if good:
        batch["image"] = torch.stack([it["image"] for it in good])
        if "views" in good[0]:
            batch["views"] = torch.stack([it["views"] for it in good])
    return batch


def is_convolutional(module: torch.nn.Module) -> bool:
    """Whether an image tower is a CNN (more than a ViT's single patch-embedding convolution)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in module.modules()) > 1


def use_channels_last(loaded: LoadedModel) -> bool:
    """Put a convolutional image tower in channels-last layout: about 2x faster on CPU for CNNs."""
    visual = getattr(loaded.model, "visual", None)
    if visual is None or not is_convolutional(visual):
        return False
    visual.to(memory_format=torch.channels_last)
    return True


@torch.inference_mode()
def encode_images(
    loaded: LoadedModel, pixels: torch.Tensor, name_of: Callable[[int], str] = str
) -> np.ndarray:
    """L2-normalised image embeddings as float32 numpy, computed in the model's precision; refused when an
    embedding is not finite or zero (``name_of(i)`` names row i's image)."""
    x = pixels.to(loaded.device, dtype=loaded.dtype, non_blocking=True)
    if loaded.info.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    emb = loaded.model.encode_image(x).float()
    norm = emb.norm(dim=-1, keepdim=True)
    # a norm can overflow to inf from finite values, or be 0: neither normalises to a unit row
    bad = ~torch.isfinite(norm[:, 0]) | (norm[:, 0] == 0)
    if bool(bad.any()):
        raise bad_embeddings(loaded, int(bad.sum()), len(emb), name_of(int(torch.nonzero(bad)[0, 0])))
    return (emb / norm).cpu().numpy()


def bad_embeddings(loaded: LoadedModel, n_bad: int, n: int, first: str) -> InputError:
    """The error for image embeddings that are NaN, inf or zero: the model or its preprocessing is at fault."""
    return InputError(
        f"the model gives non-finite (NaN or inf) or all-zero embeddings for {n_bad} of {n} images in a batch, "
        f"the first {first}; no features file was written",
        where=loaded.spec.pretrained or loaded.spec.name,
        hint="check the checkpoint's image tower weights (NaN, inf, huge or zero values, e.g. visual.proj) and "
        "--model-config's preprocess_cfg mean and std (finite, std not near 0)",
    )


def chunk_path(partial: Path, chunk: int) -> Path:
    return partial / f"chunk-{chunk:06d}.npz"


def _write_chunk(partial: Path, chunk: int, payload: dict[str, np.ndarray]) -> None:
    tmp = partial / f".chunk-{chunk:06d}.{os.getpid()}.tmp.npz"
    try:
        with disk_full_guard(partial):
            np.savez(tmp, **payload)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written chunk is of no use and may fill the disk further
        raise
    os.replace(tmp, chunk_path(partial, chunk))


# How differing manifest entries are named in messages (the others by their key).
MANIFEST_NAMES = {
    "source_digest": "the image listing",
    "files_digest": "the image files (sizes or modification times)",
}


def manifest_changes(recorded: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """What differs between a recorded extraction manifest and this run's, by name."""
    keys = sorted(set(manifest) | set(recorded))
    return [MANIFEST_NAMES.get(k, k) for k in keys if recorded.get(k) != manifest.get(k)]


def manifest_for(source: ImageSource, loaded: LoadedModel, options: ExtractOptions) -> dict[str, Any]:
    """What must match for a partial extraction to be resumed."""
    return {
        "source_digest": source.digest(),
        "n_rows": len(source),
        "model": loaded.identity(),
        "model_config": loaded.spec.to_record()["model_config"],
        "precision": str(loaded.dtype).replace("torch.", ""),
        "views": options.views,
        "seed": options.seed,
        "dtype": options.dtype,
        "rows_per_chunk": options.rows_per_chunk,
        "batch_size": options.batch_size,
        **adapter_record(loaded),
    }


def adapter_record(loaded: LoadedModel) -> dict[str, str]:
    """``{adapter_sha256}`` when a fine-tuned tower was loaded (``--adapter``), else nothing."""
    sha = loaded.info.get("adapter_sha256", "")
    return {"adapter_sha256": sha} if sha else {}


def partial_of(output: Path) -> Path:
    """The folder of an extraction's finished chunks while it runs (``<output>.partial``)."""
    return output.with_name(output.name + PARTIAL_SUFFIX)


def prepare_partial(output: Path, manifest: dict[str, Any], resume: bool, force: bool) -> tuple[Path, int]:
    """Create or check ``<output>.partial``; return it and how many chunks it already holds."""
    partial = partial_of(output)
    if partial.exists() and not resume:
        if not force:
            raise InputError(
                "an interrupted extraction left a partial result",
                where=partial,
                hint="pass --resume to complete it, or --force to start over",
            )
        shutil.rmtree(partial)
    if resume and partial.exists():
        try:
            previous = json.loads((partial / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(
                "partial result has no readable manifest",
                where=partial,
                hint="rerun without --resume and with --force to start over",
            ) from exc
        changed = manifest_changes(previous, manifest)
        if changed:
            raise InputError(
                f"cannot resume: {', '.join(changed)} differ from the interrupted run",
                where=partial,
                hint="rerun with the same inputs and options, or without --resume and with --force to start over",
            )
        done = sorted(partial.glob("chunk-*.npz"))
        for chunk in done:  # a damaged chunk is named now, not once every other chunk is encoded
            check_chunk_members(chunk, manifest.get("views", 0))
        return partial, len(done)
    tmp = partial / f".{MANIFEST}.tmp"
    with disk_full_guard(output.parent):
        partial.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, partial / MANIFEST)
    return partial, 0


def chunk_ranges(n_rows: int, rows_per_chunk: int) -> list[range]:
    return [range(s, min(s + rows_per_chunk, n_rows)) for s in range(0, n_rows, rows_per_chunk)]


class _ChunkBatches(torch.utils.data.Sampler):
    """Batches that never straddle a chunk, so batch composition depends on row indices alone."""

    def __init__(self, chunks: list[range], batch_size: int) -> None:
        self.batches = [list(c[i : i + batch_size]) for c in chunks for i in range(0, len(c), batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def encode_chunks(
    source: ImageSource,
    loaded: LoadedModel,
    options: ExtractOptions,
    partial: Path,
    chunk_ids: list[int],
    on_rows: Callable[[int], None] | None = None,
) -> None:
    """Encode the given chunks of ``source`` and write each as it completes."""
    chunks = chunk_ranges(len(source), options.rows_per_chunk)
    todo = [c for c in chunk_ids if not chunk_path(partial, c).exists()]
    for c in chunk_ids:
        if c not in todo:
            check_chunk_files(source, chunk_path(partial, c), chunks[c], loaded.embed_dim, options.views)
    if not todo:
        return
    loaded.info["channels_last"] = use_channels_last(loaded)
    dataset = ImageDataset(
        source.files,
        loaded.preprocess,
        augmentation(loaded.preprocess_cfg),
        options.views,
        options.seed,
        options.max_pixels,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=_ChunkBatches([chunks[c] for c in todo], options.batch_size),
        num_workers=options.workers,
        collate_fn=collate,
        pin_memory=loaded.device.type == "cuda",
        worker_init_fn=leave_termination_to_main,
        persistent_workers=False,
        prefetch_factor=2 if options.workers else None,  # enough to hide decoding; bounds memory
    )
    todo_iter = iter(todo)
    current = next(todo_iter)
    buf: dict[str, list] = {
        "index": [],
        "digest": [],
        "stamp": [],
        "features": [],
        "views": [],
        "bad_index": [],
        "bad_error": [],
        "bad_stamp": [],
    }
    done_rows = 0
    for batch in loader:
        for idx, err in batch["bad"]:
            if not options.skip_bad:
                raise InputError(
                    f"cannot read image ({err})",
                    where=source.files[idx],
                    hint="raise the limit with --max-pixels N if you trust the file, or pass --skip-bad"
                    if BOMB in err
                    else "fix or remove it, or pass --skip-bad to skip unreadable images",
                )
            buf["bad_index"].append(idx)
            buf["bad_error"].append(err)
        buf["bad_stamp"].extend(batch["bad_stamp"])
        if batch["index"]:
            buf["index"].extend(batch["index"])
            buf["digest"].extend(batch["digest"])
            buf["stamp"].extend(batch["stamp"])
            names = [source.paths[i] for i in batch["index"]]
            buf["features"].append(encode_images(loaded, batch["image"], names.__getitem__))
            if options.views:
                v = batch["views"]
                view_names = [f"{name} (an augmented view)" for name in names for _ in range(v.shape[1])]
                flat = encode_images(loaded, v.flatten(0, 1), view_names.__getitem__)
                buf["views"].append(flat.reshape(v.shape[0], v.shape[1], -1))
        n = len(batch["index"]) + len(batch["bad"])
        done_rows += n
        if on_rows:
            on_rows(n)
        if done_rows == len(chunks[current]):
            _write_chunk(partial, current, _payload(buf, loaded.embed_dim, options))
            buf = {k: [] for k in buf}
            done_rows = 0
            current = next(todo_iter, -1)


def _payload(buf: dict[str, list], dim: int, options: ExtractOptions) -> dict[str, np.ndarray]:
    dtype = np.dtype(options.dtype)
    feats = np.concatenate(buf["features"]) if buf["features"] else np.zeros((0, dim))
    out = {
        "index": np.asarray(buf["index"], dtype=np.int64),
        # each encoded row's file SHA-256: assemble combines them into the images' digest
        "digest": np.frombuffer(b"".join(buf["digest"]), dtype=np.uint8).reshape(-1, 32),
        # each encoded row's file (size, modification time in ns) when read: --resume and the finished file's
        # files_digest compare them with the files, so an image rewritten after it was encoded is noticed
        "stamp": np.asarray(buf["stamp"], dtype=np.int64).reshape(-1, 2),
        "features": feats.astype(dtype),
        "bad_index": np.asarray(buf["bad_index"], dtype=np.int64),
        "bad_error": np.asarray(buf["bad_error"], dtype=str),
        # each skipped row's file as it was when it failed (MISSING_STAMP: none there), for the same check
        "bad_stamp": np.asarray(buf["bad_stamp"], dtype=np.int64).reshape(-1, 2),
    }
    if options.views:
        views = np.concatenate(buf["views"]) if buf["views"] else np.zeros((0, options.views, dim))
        out["views"] = views.astype(dtype)
    return out


DAMAGED_CHUNK_HINT = "delete the chunk (or rerun with --force instead of --resume) to encode its images again"
CHUNK_KEYS = (
    "index",
    "features",
    "bad_index",
    "bad_error",
)  # and views with --views; digest, stamp since recorded
OPTIONAL_CHUNK_KEYS = ("digest", "stamp", "bad_stamp")  # chunks written before they were recorded lack them
MISSING_STAMP = (-1, -1)  # the (size, time) recorded for a skipped row whose file was not there


def damaged_chunk(path: Path, what: str) -> InputError:
    """The error for a finished chunk ``--resume`` found that cannot be this extraction's."""
    return InputError(what, where=path, hint=DAMAGED_CHUNK_HINT)


def check_chunk_members(path: Path, views: int) -> None:
    """Refuse a chunk file whose zip directory cannot be read or lacks an array (empty, truncated or foreign):
    a cheap look (no array is read), so that ``--resume`` names a damaged chunk before encoding the rest."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise damaged_chunk(path, f"unreadable chunk ({_first_line(exc)})") from exc
    wanted = CHUNK_KEYS + (("views",) if views else ())
    missing = [key for key in wanted if f"{key}.npy" not in names]
    if missing:
        raise damaged_chunk(path, f"chunk lacks {', '.join(missing)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:120]}" if text else type(exc).__name__


def read_chunk(path: Path, rows: range, dim: int, views: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (and ``index``) of the finished chunk of source rows ``rows``, refused naming the chunk
    unless readable and shaped as extraction writes them: its rows split between ``index`` (encoded) and
    ``bad_index`` (unreadable) exactly, ``features`` (n, dim), ``views`` (n, views, dim), ``digest`` (n, 32),
    ``stamp`` (n, 2).

    A chunk --resume found may be empty or truncated (a crash, a full disk, a copy), or another extraction's;
    numpy then raises EOFError, zipfile.BadZipFile, ValueError, KeyError or zlib.error, all refused here."""
    wanted = ["index", *(k for k in keys if k != "index")]
    if "bad_index" in wanted and "bad_error" not in wanted:
        wanted.append("bad_error")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in wanted if k not in z.files and k not in OPTIONAL_CHUNK_KEYS]
            if missing:
                raise damaged_chunk(path, f"chunk lacks {', '.join(missing)}")
            data = {k: z[k] for k in wanted if k in z.files}
    except (InputError, MemoryError):
        raise
    except Exception as exc:  # whatever numpy, zipfile or zlib raise for a damaged file
        raise damaged_chunk(path, f"unreadable chunk ({_first_line(exc)})") from exc
    index = data["index"]
    if index.ndim != 1 or index.dtype.kind not in "iu":
        raise damaged_chunk(
            path, f"chunk index has shape {index.shape} and type {index.dtype}, not a list of rows"
        )
    n = len(index)
    shapes = {"features": (n, dim), "views": (n, views, dim), "digest": (n, 32), "stamp": (n, 2)}
    kinds = {"digest": "u", "stamp": "i"}
    for key, shape in shapes.items():
        if key in data and (data[key].shape != shape or data[key].dtype.kind not in kinds.get(key, "f")):
            raise damaged_chunk(
                path, f"chunk {key} has shape {data[key].shape} and type {data[key].dtype}, expected {shape}"
            )
    if "bad_index" in data:
        bad, errors = data["bad_index"], data["bad_error"]
        if (
            bad.ndim != 1
            or bad.dtype.kind not in "iu"
            or errors.shape != bad.shape
            or errors.dtype.kind != "U"
        ):
            raise damaged_chunk(path, "chunk bad_index and bad_error are not matching lists")
        stamps = data.get("bad_stamp")
        if stamps is not None and (stamps.shape != (len(bad), 2) or stamps.dtype.kind != "i"):
            raise damaged_chunk(
                path,
                f"chunk bad_stamp has shape {stamps.shape} and type {stamps.dtype}, expected {(len(bad), 2)}",
            )
        if sorted(index.tolist() + bad.tolist()) != list(rows):
            raise damaged_chunk(
                path,
                f"chunk does not hold rows {rows.start}..{rows.stop - 1} once each (damaged, or another extraction's)",
            )
    return data


def check_chunk_files(source: ImageSource, path: Path, rows: range, dim: int, views: int) -> None:
    """Refuse resuming with a finished chunk whose images were rewritten (or removed) since it encoded them, or
    whose skipped images (--skip-bad) were changed since: fixed, they would stay skipped."""
    chunk = read_chunk(path, rows, dim, views, ["stamp", "bad_index", "bad_stamp"])
    hint = f"delete {path} to encode its images again, or rerun with --force to start over"
    for i, stamp in zip(chunk["index"].tolist(), chunk.get("stamp", np.zeros((0, 2))).tolist()):
        if file_stamp(source.files[i]) != tuple(stamp):
            raise InputError(
                "image changed or removed since the interrupted run encoded it (its size or modification time "
                "differs)",
                where=source.files[i],
                hint=hint,
            )
    for i, stamp in zip(chunk["bad_index"].tolist(), chunk.get("bad_stamp", np.zeros((0, 2))).tolist()):
        if (file_stamp(source.files[i]) or MISSING_STAMP) != tuple(stamp):
            raise InputError(
                "image skipped as unreadable by the interrupted run has changed since (its size or modification "
                "time differs): resumed, it would stay skipped",
                where=source.files[i],
                hint=hint,
            )


def checked_chunk(path: Path, chunk: Any, key: str, paths: Sequence[str]) -> np.ndarray:
    """A chunk's ``features`` or ``views``, refused unless unit rows (a chunk --resume found may hold NaN)."""
    values = chunk[key]
    if key in ("features", "views"):
        index = chunk["index"]
        try:
            check_unit_rows(values, path, lambda i: paths[int(index[i])], rows=index.tolist())
        except InputError as exc:
            raise damaged_chunk(path, exc.what) from exc
    return values


def assemble(
    source: ImageSource,
    loaded: LoadedModel,
    options: ExtractOptions,
    partial: Path,
    output: Path,
    extra_attrs: dict[str, Any] | None = None,
) -> ExtractResult:
    """Join the chunks, in row order, into the HDF5 file; rename it into place; drop the partial."""
    chunks = chunk_ranges(len(source), options.rows_per_chunk)
    missing = [c for c in range(len(chunks)) if not chunk_path(partial, c).exists()]
    if missing:
        raise RuntimeFailure(f"{len(missing)} chunk(s) missing", where=partial, hint="rerun with --resume")
    kept: list[int] = []
    skipped: list[dict[str, str]] = []
    stamps: dict[int, tuple[int, int] | None] = {}  # rows' files as they were read (or failed)
    with_digests = True  # chunks written before extraction recorded the files' digests have none
    dim, views = loaded.embed_dim, options.views

    def chunk(c: int, key: str) -> dict[str, np.ndarray]:
        return read_chunk(
            chunk_path(partial, c),
            chunks[c],
            dim,
            views,
            [key, *OPTIONAL_CHUNK_KEYS] if key == "bad_index" else [key],
        )

    for c in range(len(chunks)):
        z = chunk(c, "bad_index")
        with_digests = with_digests and "digest" in z
        kept.extend(z["index"].tolist())
        if "stamp" in z:
            stamps.update(zip(z["index"].tolist(), map(tuple, z["stamp"].tolist())))
        if "bad_stamp" in z:  # skipped rows' files as they failed (None: not there)
            stamps.update(
                (i, None if tuple(st) == MISSING_STAMP else tuple(st))
                for i, st in zip(z["bad_index"].tolist(), z["bad_stamp"].tolist())
            )
        skipped.extend(
            {"path": source.paths[i], "error": str(e)} for i, e in zip(z["bad_index"], z["bad_error"])
        )
    if not kept:
        raise InputError("no readable images", where=source.origin, hint="check the image files")

    def blocks(key: str) -> Iterator[np.ndarray]:
        for c in range(len(chunks)):
            yield checked_chunk(chunk_path(partial, c), chunk(c, key), key, source.paths)

    attrs = {
        **base_provenance(),
        **loaded.record(),
        "precision": str(loaded.dtype).replace("torch.", ""),
        "runtime": runtime_record(loaded.device),  # the model runs in "precision", without autocast
        "source": str(source.origin),
        "source_kind": source.kind,
        "source_digest": source.digest(),
        **({"images_digest": images_digest(blocks("digest"))} if with_digests else {}),
        # what --resume compares, so a rerun of this same extraction knows the file as its own
        "manifest": json.dumps(manifest_for(source, loaded, options), sort_keys=True),
        # the files' sizes and times when read (a file rewritten since then is noticed), for the same check
        "files_digest": source.files_digest(stamps),
        "n_images": len(kept),
        "n_skipped": len(skipped),
        "skipped": skipped,
        "options": asdict(options),
        "views": options.views,
        "seed": options.seed,
        "dtype": options.dtype,
        "augmentation": "RandomResizedCrop(scale=(0.08, 1), bicubic) + RandomHorizontalFlip + Normalize",
        **adapter_record(loaded),
        **(extra_attrs or {}),
    }
    tmp = partial / "assembled.h5.tmp"
    try:
        with disk_full_guard(output.parent):
            write_features(
                tmp,
                features=blocks("features"),
                n_rows=len(kept),
                dim=loaded.embed_dim,
                paths=[source.paths[i] for i in kept],
                labels=[source.labels[i] for i in kept],
                splits=[source.splits[i] for i in kept],
                classnames=source.classnames,
                attrs=attrs,
                n_views=options.views,
                views=blocks("views") if options.views else None,
                dtype=options.dtype,
            )
    except BaseException:
        tmp.unlink(missing_ok=True)  # the chunks stay for --resume; a half-assembled file is of no use
        raise
    try:
        place_output(tmp, output, kept=partial)
    finally:
        tmp.unlink(missing_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    return ExtractResult(output, len(kept), len(skipped), skipped, loaded.embed_dim, options.views)


@locks_output("output")
def extract_features(
    source: ImageSource,
    loaded: LoadedModel,
    output: str | Path,
    options: ExtractOptions | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    on_rows: Callable[[int], None] | None = None,
) -> ExtractResult:
    """Encode every image of ``source`` with ``loaded`` into the features file ``output``.

    ``on_rows(n)`` is called as rows complete (for progress bars). Existing output is refused
    unless ``force``; an interrupted run is completed with ``resume``.
    """
    options = options or ExtractOptions()
    options.validate()
    check_distinct({"IMAGES": source.origin}, {"-o": output})
    manifest = manifest_for(source, loaded, options)
    if resume and not force and Path(output).exists() and not partial_of(Path(output)).exists():
        finished = finished_extraction(Path(output), manifest, source.files_digest())
        if finished is not None:
            return finished
    output = check_output_path(output, force)
    partial, n_done = prepare_partial(output, manifest, resume, force)
    n_chunks = len(chunk_ranges(len(source), options.rows_per_chunk))
    if on_rows and n_done:
        on_rows(
            sum(
                len(r)
                for c, r in enumerate(chunk_ranges(len(source), options.rows_per_chunk))
                if chunk_path(partial, c).exists()
            )
        )
    encode_chunks(source, loaded, options, partial, list(range(n_chunks)), on_rows)
    result = assemble(source, loaded, options, partial, output)
    result.resumed_chunks = n_done
    return result


def open_extraction(
    images: str | Path,
    output: str | Path,
    options: ExtractOptions,
    *,
    model: str,
    pretrained: str | None = None,
    model_config: str | Path | None = None,
    random_weights: bool = False,
    adapter: str | Path | None = None,
    classnames: str | Path | None = None,
    split: str = "",
    device: str = "auto",
    precision: str = "fp32",
    force: bool = False,
    resume: bool = False,
) -> tuple[ImageSource, LoadedModel]:
    """Check an extraction's options and paths, read its image source and load its model: (source, model).

    Everything is checked before the model loads; ``extract`` runs this on every rank of a distributed job."""
    from promptcli.io.image_sources import read_classnames, read_image_source
    from promptcli.models.loading import load_model

    options.validate()
    inputs = {
        "IMAGES": images,
        "--classnames": classnames,
        "--adapter": adapter,
        "--model-config": model_config,
        "--pretrained": pretrained,  # a tag names no file, so it never matches
    }
    check_distinct(inputs, {"-o": output})
    # with --resume an existing output may be this very extraction's, finished: told once the model is loaded
    check_output_path(output, force or (resume and Path(output).exists()))
    names = read_classnames(classnames) if classnames else None
    source = read_image_source(Path(images), split=split, classnames=names)
    loaded = load_model(
        model,
        pretrained,
        model_config,
        device=device,
        precision=precision,
        random_weights=random_weights,
        seed=options.seed,
    )
    if adapter is not None:
        from promptcli.models.image_adapter import apply_adapter

        apply_adapter(loaded, adapter)
    return source, loaded


def extract_file(
    images: str | Path,
    output: str | Path,
    options: ExtractOptions | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    on_rows: Callable[[int], None] | None = None,
    **inputs: Any,
) -> ExtractResult:
    """``promptcli extract`` in one call: encode the image folder or CSV list ``images`` into ``output``.

    ``inputs`` are :func:`open_extraction`'s (``model=`` required; ``pretrained``, ``model_config``,
    ``random_weights``, ``adapter``, ``classnames``, ``split``, ``device``, ``precision``), the command's options
    of those names. With a model already loaded, or an :class:`ImageSource` built in code, call
    :func:`extract_features` instead."""
    options = options or ExtractOptions()
    source, loaded = open_extraction(images, output, options, force=force, resume=resume, **inputs)
    return extract_features(source, loaded, output, options, resume=resume, force=force, on_rows=on_rows)
