"""The bundled demo dataset: a class-balanced Fashion-MNIST subset (MIT licence, Zalando SE).

``promptcli/data/fashion_mnist_subset.npz`` holds 200 training and 100 test images per class
(28x28 uint8 greyscale), made by ``scripts/make_fashion_subset.py``. :func:`write_demo_images`
turns it into an ImageFolder tree of PNG files that every subcommand reads like user data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from promptcli.errors import InputError
from promptcli.io.fileio import apply_default_mode, is_disk_full, kind_of_file

SUBSET_FILE = Path(__file__).resolve().parent.parent / "data" / "fashion_mnist_subset.npz"
SPLITS = ("train", "test")
MARKER = ".promptcli-demo-images.json"
# Images are written inverted by default (dark item on white, like a product photo): zero-shot
# accuracy of the demo model is several points higher that way (see docs/demo-model.md).
DEFAULT_INVERT = True


@lru_cache(maxsize=1)
def load_subset() -> dict[str, Any]:
    """The bundled subset: ``{split}_images`` (N,28,28 uint8), ``{split}_labels``, ``class_names``."""
    with np.load(SUBSET_FILE, allow_pickle=False) as data:
        out: dict[str, Any] = {k: data[k] for k in data.files}
    out["class_names"] = [str(c) for c in out["class_names"]]
    out["metadata"] = json.loads(str(out["metadata"]))
    return out


def class_folder(name: str) -> str:
    """Folder name of a class: its prompt name with spaces as underscores (``ankle boot`` -> ``ankle_boot``)."""
    return name.replace(" ", "_")


def to_pil(image: np.ndarray, invert: bool = DEFAULT_INVERT):
    """A 28x28 uint8 greyscale image as the RGB PIL image that is written to disk."""
    from PIL import Image

    pixels = 255 - image if invert else image
    return Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="L").convert("RGB")


def selected_indices(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Rows to write: all, or the first ``per_class`` of each class in file order."""
    if per_class is None:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:per_class]] = True
    return np.flatnonzero(keep)


def _expected_manifest(invert: bool, per_class: int | None = None) -> dict[str, Any]:
    subset = load_subset()
    return {
        "invert": bool(invert),
        "per_class": per_class,
        "counts": {
            split: int(len(selected_indices(subset[f"{split}_labels"], per_class))) for split in SPLITS
        },
        "class_names": subset["class_names"],
        "license": subset["metadata"].get("license", ""),
    }


def _os_junk(entry: Path) -> bool:
    return entry.is_file() and (
        entry.name in (".DS_Store", "Thumbs.db", "desktop.ini") or entry.name.startswith("._")
    )


def _foreign_entry(out_dir: Path, folders: set[str]) -> Path | None:
    """The first file or folder under ``out_dir`` that a demo tree does not hold (None: none); the files file
    browsers leave behind (``.DS_Store``, ``Thumbs.db``, ``._*``) do not count."""
    for entry in sorted(out_dir.iterdir()):
        if (entry.name == MARKER and entry.is_file()) or _os_junk(entry):
            continue
        if entry.name not in SPLITS or not entry.is_dir() or entry.is_symlink():
            return entry
        for folder in sorted(entry.iterdir()):
            if folder.name not in folders or not folder.is_dir() or folder.is_symlink():
                return folder
            for file in sorted(folder.iterdir()):
                if _os_junk(file):
                    continue
                if not (
                    file.is_file() and not file.is_symlink() and file.suffix == ".png" and file.stem.isdigit()
                ):
                    return file
    return None


def _check_out_dir(out_dir: Path) -> None:
    """``out_dir`` is absent or a folder (not a link, whose replacement would move it away), under folders."""
    hint = "choose another OUT_DIR (nothing was written or removed)"
    if out_dir.is_symlink():
        raise InputError(
            f"is a symbolic link (to {os.readlink(out_dir)}), not a folder",
            where=out_dir,
            hint="give the folder it points to, or " + hint.removeprefix("choose "),
        )
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise InputError(
            f"exists and is {kind_of_file(os.lstat(out_dir).st_mode)}, not a folder", where=out_dir, hint=hint
        )
    for above in out_dir.parents:
        if os.path.lexists(above):
            if not above.is_dir():
                raise InputError(
                    f"is {kind_of_file(os.stat(above).st_mode) if above.exists() else 'a broken link'}, "
                    "not a folder",
                    where=above,
                    hint=hint,
                )
            break


def _make_folder(make: Any, where: Path) -> Any:
    """``make()`` (a folder's creation); an OSError other than a full disk is a one-line error naming ``where``."""
    try:
        return make()
    except OSError as exc:
        if is_disk_full(exc):
            raise
        raise InputError(
            f"cannot create a folder here ({exc.strerror or type(exc).__name__})",
            where=where,
            hint="choose an OUT_DIR in a folder you can write to",
        ) from exc


def write_demo_images(
    out_dir: Path, invert: bool = DEFAULT_INVERT, per_class: int | None = None
) -> dict[str, Any]:
    """Write the subset as ``out_dir/{train,test}/<class_folder>/<index>.png`` (28x28 RGB PNG).

    Written into a temporary folder beside ``out_dir`` and renamed into place, so ``out_dir``
    is either absent or complete. If ``out_dir`` already holds the same images (same
    ``invert``), nothing is rewritten. An existing non-empty ``out_dir`` that is not such a
    tree is left alone and an error is raised. Returns a summary: paths, counts, class names.
    """
    out_dir = Path(out_dir)
    expected = _expected_manifest(invert, per_class)
    summary = {
        "root": str(out_dir),
        "train_dir": str(out_dir / "train"),
        "test_dir": str(out_dir / "test"),
        "class_names": expected["class_names"],
        "class_folders": [class_folder(c) for c in expected["class_names"]],
        "counts": expected["counts"],
        "invert": bool(invert),
        "license": expected["license"],
    }
    marker = out_dir / MARKER
    if marker.is_file():
        try:
            existing = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            existing = None
        if existing == expected:
            return {**summary, "written": False}
    _check_out_dir(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not marker.is_file():
        raise FileExistsError("folder exists and is not a promptcli demo image folder")
    if marker.is_file():  # a tree of ours with other settings: replaced below, unless the user added to it
        foreign = _foreign_entry(out_dir, set(summary["class_folders"]))
        if foreign is not None:
            raise FileExistsError(
                f"holds {foreign.relative_to(out_dir)}, which demo-images did not write "
                "(other settings replace the whole folder)"
            )

    _make_folder(lambda: out_dir.parent.mkdir(parents=True, exist_ok=True), out_dir.parent)
    subset = load_subset()
    folders = summary["class_folders"]
    tmp = Path(
        _make_folder(
            lambda: tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent), out_dir.parent
        )
    )
    apply_default_mode(tmp, directory=True)
    try:
        for split in SPLITS:
            images, labels = subset[f"{split}_images"], subset[f"{split}_labels"]
            for folder in folders:
                (tmp / split / folder).mkdir(parents=True)
            for i in selected_indices(labels, per_class):
                image, label = images[i], labels[i]
                to_pil(image, invert).save(tmp / split / folders[int(label)] / f"{i:04d}.png", optimize=False)
        (tmp / MARKER).write_text(json.dumps(expected, sort_keys=True), encoding="utf-8")
        if out_dir.exists():  # a stale tree of ours (other invert setting): replace it
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**summary, "written": True}
