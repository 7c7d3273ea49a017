"""The training images of a features file: where they are, and decoded batches of them.

A features file records its source (an ImageFolder root or a CSV image list) and, per row, the
image path as written there (see docs/formats.md); ``--images DIR`` replaces the recorded root
when the images moved (for a CSV list: the folder its relative paths resolve against).

Decoding and augmentation are extraction's (``promptcli.extraction``): the centre crop is the
model's own preprocessing; a training view is ``extract --views``' random resized crop + flip, seeded
by (seed, epoch) and the image's row alone, so batches do not depend on workers, on how the data
is sharded across processes, or on interruption.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from promptcli.errors import InputError
from promptcli.extraction.decode import DECODE_ERRORS, decode_failure, decode_rgb
from promptcli.extraction.extract import leave_termination_to_main, view_seed
from promptcli.io.fileio import open_regular


def image_files(
    attrs: dict[str, Any], paths: list[str], where: str | Path, images: str | Path | None
) -> list[Path]:
    """The file of every row: ``paths`` resolved against the recorded source (or ``images``)."""
    kind = str(attrs.get("source_kind", ""))
    source = str(attrs.get("source", ""))
    if images is not None:
        root = Path(images)
        if not root.is_dir():
            raise InputError("not a folder", where="--images", hint="give the folder the images are in now")
    elif kind == "folder":
        root = Path(source)
    elif kind == "csv":
        root = Path(source).parent
    else:
        raise InputError(
            "the features file does not record where its images are",
            where=where,
            hint="pass --images DIR (the folder the recorded paths are relative to)",
        )
    if images is None and not root.is_absolute() and not root.exists():
        beside = Path(where).parent / root  # a relative source, recorded from the features file's folder
        if beside.exists():
            root = beside
    return [Path(p) if Path(p).is_absolute() else root / p for p in paths]


class TrainImages(Dataset):
    """Items are ``(row, epoch)``: epoch -1 gives the centre crop, else that epoch's augmented view.

    ``rows[i]`` is the features-file row of training image i; the view's seed depends on it, not on i.
    """

    def __init__(
        self,
        files: list[Path],
        rows: list[int],
        preprocess: Callable[[Image.Image], torch.Tensor],
        augment: Callable[[Image.Image], torch.Tensor],
        seed: int,
    ) -> None:
        self.files, self.rows = files, rows
        self.preprocess, self.augment, self.seed = preprocess, augment, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[int, torch.Tensor | str]:
        i, epoch = item
        try:
            with open_regular(self.files[i]) as handle:
                rgb = decode_rgb(handle)
        except DECODE_ERRORS as exc:
            # an error string, not an exception: the main process raises it (workers would garble it)
            return i, decode_failure(exc)
        if epoch < 0:
            return i, self.preprocess(rgb)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(view_seed(self.seed, epoch), self.rows[i]))
            return i, self.augment(rgb)


def collate(items: list[tuple[int, torch.Tensor | str]]) -> tuple[torch.Tensor, torch.Tensor | None, list]:
    """(indices, pixels, []) or, when some image failed, (indices, None, [(index, error), ...])."""
    index = torch.tensor([i for i, _ in items], dtype=torch.long)
    bad = [(i, x) for i, x in items if isinstance(x, str)]
    if bad:
        return index, None, bad
    return index, torch.stack([x for _, x in items]), []


def raise_bad(files: list[Path], bad: list[tuple[int, str]]) -> None:
    """The one-line error for the first unreadable image of a batch."""
    i, error = bad[0]
    raise InputError(
        f"cannot read image ({error})",
        where=files[i],
        hint="fix it, pass --images DIR if the images moved, or --skip-bad to leave unreadable images out",
    )


class EpochBatches(Sampler):
    """A batch sampler whose batches the training loop sets before each pass (workers persist)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def set(self, batches: list[list[int]], epoch: int) -> None:
        self.batches = [[(int(i), epoch) for i in b] for b in batches]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(dataset: TrainImages, sampler: EpochBatches, workers: int, pin: bool) -> DataLoader:
    """One loader for the whole run; its workers persist across passes."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        worker_init_fn=leave_termination_to_main,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers else None,
    )
