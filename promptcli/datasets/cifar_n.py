"""CIFAR-10N / CIFAR-100N (Wei et al., 2022): human re-annotations of the CIFAR training images.

The images come from the CIFAR *binary* release (``cifar-10-batches-bin/``: ``data_batch_1..5.bin``,
``test_batch.bin``, ``batches.meta.txt``; ``cifar-100-binary/``: ``train.bin``, ``test.bin``,
``fine_label_names.txt``), each record being the label byte(s) then 3072 bytes of red, green and blue
32 x 32 planes. They are written out losslessly as PNG files under ``--images-dir``
(``train/00000.png`` is training image 0, the index CIFAR-N's label arrays use).

The human labels (``CIFAR-10_human.pt`` / ``CIFAR-100_human.pt`` from the CIFAR-N repository) are
loaded with ``torch.load(weights_only=True)``, allowing only numpy's array reconstruction, so the
file cannot run code; an ``.npz`` with the same keys is read with ``allow_pickle=False``. Their
``clean_label`` must equal the binary release's labels, which checks that both use the same order.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from promptcli.datasets.base import (
    Listing,
    Row,
    check_readable,
    need_dir,
    need_file,
    sha256_of,
    text_lines,
    underscores_to_spaces,
    unique_classes,
)
from promptcli.errors import InputError
from promptcli.io.fileio import atomic_path, check_input_file

SIDE, PIXELS = 32, 3 * 32 * 32


@dataclass(frozen=True)
class CifarRelease:
    folder: str
    names_file: str
    train_files: tuple[str, ...]
    test_file: str
    label_bytes: int  # CIFAR-100 records hold the coarse label, then the fine one
    noise_file: str
    label_keys: dict[str, str]  # --noise-label value -> key in the noise file
    default_label: str


RELEASES = {
    "cifar10n": CifarRelease(
        "cifar-10-batches-bin",
        "batches.meta.txt",
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        "test_batch.bin",
        1,
        "CIFAR-10_human.pt",
        {
            "worst": "worse_label",
            "aggre": "aggre_label",
            "random1": "random_label1",
            "random2": "random_label2",
            "random3": "random_label3",
        },
        "worst",
    ),
    "cifar100n": CifarRelease(
        "cifar-100-binary",
        "fine_label_names.txt",
        ("train.bin",),
        "test.bin",
        2,
        "CIFAR-100_human.pt",
        {"noisy": "noisy_label"},
        "noisy",
    ),
}


def read_records(path: Path, label_bytes: int, files: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, images as N x 32 x 32 x 3 uint8) of one binary batch file; the last label byte is the
    (fine) label."""
    data = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + PIXELS
    if data.size == 0 or data.size % record:
        raise InputError(
            f"{data.size} bytes is not a whole number of {record}-byte records",
            where=path,
            hint="give the CIFAR binary release (not the python or matlab one)",
        )
    files[str(path)] = sha256_of(path)
    records = data.reshape(-1, record)
    images = records[:, label_bytes:].reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    return records[:, label_bytes - 1].astype(np.int64), np.ascontiguousarray(images)


def _conversion_hint(path: Path) -> str:
    return (
        f'convert it once, only if you trust it: python -c "import numpy as np, torch; '
        f"d = torch.load('{path.name}', weights_only=False); "
        f"np.savez('{path.stem}.npz', **{{k: np.asarray(v) for k, v in d.items()}})\" and give --noise-file {path.stem}.npz"
    )


def _damaged(path: Path, exc: BaseException) -> InputError:
    """The error for a label file cut short or damaged (a download stopped early, a full disk)."""
    text = str(exc).strip()
    first = f"{type(exc).__name__}: {text.splitlines()[0][:120]}" if text else type(exc).__name__
    return InputError(
        f"unreadable label file, truncated or damaged ({first})",
        where=path,
        hint="download it again from the CIFAR-N repository, or give another --noise-file",
    )


def load_label_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a CIFAR-N label file, without running any code from it."""
    check_input_file(path, "label file", "download it from the CIFAR-N repository, or give --noise-file")
    check_readable(path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: np.asarray(data[k]) for k in data.files}
        except ValueError as exc:
            if "pickled" not in str(exc):  # numpy's "EOF: reading array data" and others: a damaged file
                raise _damaged(path, exc) from exc
            raise InputError(
                f"cannot read without unpickling ({exc})", where=path, hint="save plain integer arrays"
            ) from exc
        except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
            # an empty .npz: EOFError (which click took for Ctrl-C); a truncated one: BadZipFile
            raise _damaged(path, exc) from exc
    if path.suffix != ".pt":
        raise InputError("expected a .pt or .npz label file", where=path, hint=_conversion_hint(path))
    import pickle

    import torch

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]

    # A torch.save of numpy arrays names these three globals; they rebuild arrays and call nothing else.
    allowed = [
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
    ]
    allowed += [
        type(np.dtype(t))
        for t in (np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16, np.uint32, np.uint64)
    ]
    try:
        with torch.serialization.safe_globals(allowed):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, KeyError) as exc:  # an empty file (EOFError), or bytes of no torch format (KeyError)
        raise _damaged(path, exc) from exc
    except (pickle.UnpicklingError, RuntimeError, ValueError) as exc:
        if "central directory" in str(exc):  # torch's zip reader on a truncated file
            raise _damaged(path, exc) from exc
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(exc))
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        first = f"it references {unsafe.group(1)}, which is not array data" if unsafe else first
        raise InputError(
            f"cannot load with weights_only=True ({first})", where=path, hint=_conversion_hint(path)
        ) from None
    if not isinstance(data, dict):
        raise InputError(
            f"holds a {type(data).__name__}, not a dict of label arrays",
            where=path,
            hint=_conversion_hint(path),
        )
    out = {}
    for key, value in data.items():
        array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        out[str(key)] = array
    return out


def _labels(arrays: dict[str, np.ndarray], key: str, n_classes: int, n: int, path: Path) -> np.ndarray:
    if key not in arrays:
        raise InputError(
            f"no {key!r} array (has: {', '.join(sorted(arrays))})",
            where=path,
            hint="give the CIFAR-N human label file",
        )
    array = arrays[key]
    if array.dtype.kind not in "iu" or array.shape != (n,):
        raise InputError(
            f"{key} is {array.dtype} of shape {array.shape}, expected {n} integers",
            where=path,
            hint="give the CIFAR-N label file of this CIFAR release",
        )
    bad = np.flatnonzero((array < 0) | (array >= n_classes))
    if bad.size:
        raise InputError(
            f"{key}[{bad[0]}] = {array[bad[0]]} is outside the class list (0..{n_classes - 1})",
            where=path,
            hint="the label file belongs to the other CIFAR",
        )
    return array.astype(np.int64)


def write_png(path: Path, pixels: np.ndarray, force: bool) -> bool:
    """Write ``pixels`` as a PNG (lossless). An existing file with the same pixels is kept; one with other
    pixels is an error unless ``force``. Returns whether a file was written."""
    from PIL import Image

    if path.exists():
        try:
            with Image.open(path) as image:
                same = np.array_equal(np.asarray(image.convert("RGB")), pixels)
        except OSError:
            same = False
        if same:
            return False
        if not force:
            raise InputError(
                "exists with other pixels",
                where=path,
                hint="pass --force to overwrite, or choose another --images-dir",
            )
    try:
        with atomic_path(path, suffix=".png") as tmp:
            Image.fromarray(pixels, mode="RGB").save(tmp, format="PNG")
    except (PermissionError, IsADirectoryError) as exc:
        raise InputError(
            f"cannot write ({exc.strerror})", where=path, hint="choose an --images-dir you can write to"
        ) from exc
    return True


def check_images_dir(images_dir: Path) -> None:
    """Refuse, before any work, an --images-dir that is a file or that this process cannot create."""
    existing = next((p for p in (images_dir, *images_dir.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise InputError(
            f"{existing} is a file, not a folder",
            where="--images-dir",
            hint="give --images-dir a folder to write the PNG files into (new or existing)",
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(
            f"cannot {'write to' if existing == images_dir else 'create a folder in'} {existing}",
            where="--images-dir",
            hint="give --images-dir a folder you can write to",
        )


def make_images_dir(images_dir: Path, split: str) -> Path:
    """``images_dir/split``, created if need be."""
    folder = images_dir / split
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # FileExistsError: a file named like the folder
        raise InputError(
            f"cannot create the folder {folder} ({exc.strerror or type(exc).__name__})",
            where="--images-dir",
            hint="give --images-dir a folder you can write to, with no file named train or test in it",
        ) from exc
    return folder


def read_cifar_n(
    layout: str,
    root: Path,
    images_dir: Path | None,
    noise_label: str | None,
    noise_file: Path | None,
    force: bool,
) -> Listing:
    release = RELEASES[layout]
    if images_dir is None:
        raise InputError(
            f"{layout} writes the CIFAR images out as PNG files and needs a folder for them",
            where="--images-dir",
            hint="e.g. --images-dir cifar-png",
        )
    check_images_dir(images_dir)
    choice = noise_label or release.default_label
    if choice not in release.label_keys:
        raise InputError(
            f"{layout} has no label set {choice!r}",
            where="--noise-label",
            hint="use one of: " + ", ".join(release.label_keys),
        )
    files: dict[str, str] = {}
    folder = need_dir(root, release.folder, layout)
    names_file = need_file(folder, release.names_file, layout)
    classes = unique_classes([underscores_to_spaces(t) for _, t in text_lines(names_file, files)], names_file)
    train = [
        read_records(need_file(folder, f, layout), release.label_bytes, files) for f in release.train_files
    ]
    train_y = np.concatenate([y for y, _ in train])
    train_x = np.concatenate([x for _, x in train])
    test_y, test_x = read_records(need_file(folder, release.test_file, layout), release.label_bytes, files)
    for y, where in ((train_y, folder / release.train_files[0]), (test_y, folder / release.test_file)):
        if y.max() >= len(classes):
            raise InputError(
                f"label {y.max()} is outside the class list ({len(classes)} names)",
                where=where,
                hint=f"check {release.names_file}",
            )
    label_path = noise_file or need_file(
        root, release.noise_file, layout, hint="download it from the CIFAR-N repository, or give --noise-file"
    )
    arrays = load_label_arrays(label_path)
    files[str(label_path)] = sha256_of(label_path)
    clean = _labels(arrays, "clean_label", len(classes), len(train_y), label_path)
    mismatch = np.flatnonzero(clean != train_y)
    if mismatch.size:
        raise InputError(
            f"clean_label differs from the binary release's label at {mismatch.size} images (first: {mismatch[0]})",
            where=label_path,
            hint="the label file and the CIFAR release do not match (other dataset or order)",
        )
    given = _labels(arrays, release.label_keys[choice], len(classes), len(train_y), label_path)
    rows: list[Row] = []
    written = 0
    for split, x, y_given, y_clean in (("train", train_x, given, clean), ("test", test_x, test_y, test_y)):
        folder = make_images_dir(images_dir, split)
        for i in range(len(x)):
            file = folder / f"{i:05d}.png"
            written += write_png(file, x[i], force)
            rows.append(
                Row(
                    str(file),
                    classes[y_given[i]],
                    split,
                    f"{layout} {split} image {i}",
                    classes[y_clean[i]],
                    str(int(y_given[i] != y_clean[i])),
                )
            )
    listing = Listing(
        layout, images_dir, classes, rows, has_clean_label=True, has_is_noisy=True, files_read=files
    )
    listing.notes.append(
        f"label set: {choice} ({release.label_keys[choice]}); {written} PNG files written to {images_dir}"
    )
    return listing
