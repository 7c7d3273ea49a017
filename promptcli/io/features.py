"""The HDF5 features file: layout, writing and reading (documented in docs/formats.md)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from promptcli.errors import InputError
from promptcli.io.checks import check_class_names, check_finite_rows, check_unique_keys

FORMAT = "promptcli-features"
FORMAT_VERSION = 1
STR = h5py.string_dtype("utf-8")
FEATURE_DTYPES = ("float16", "float32")
MODEL_KEYS = ("model_name", "pretrained", "model_config", "checkpoint_sha256", "random_weights_seed")


@dataclass
class FeatureSet:
    """A features file in memory: one row per image, optional augmented views."""

    path: Path
    features: np.ndarray  # (N, D) float32, L2-normalised
    paths: list[str]
    labels: np.ndarray  # (N,) int64, -1 where unknown
    splits: list[str]
    classnames: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    views: np.ndarray | None = None  # (N, V, D) float32

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def n_views(self) -> int:
        return 0 if self.views is None else int(self.views.shape[1])

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).any())

    def model_record(self) -> dict[str, Any]:
        """The recorded model identity (name, pretrained, config, checkpoint hash)."""
        return {k: self.attrs.get(k, "") for k in MODEL_KEYS}

    def index_by_path(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.paths)}


def _attr(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)  # str subclasses (torch's version string) have no HDF5 type
    return value


def write_features(
    path: Path,
    *,
    features: Iterable[np.ndarray],
    n_rows: int,
    dim: int,
    paths: list[str],
    labels: list[int] | np.ndarray,
    splits: list[str],
    classnames: list[str],
    attrs: dict[str, Any],
    n_views: int = 0,
    views: Iterable[np.ndarray] | None = None,
    dtype: str = "float16",
) -> None:
    """Write a complete features file, streaming feature blocks (and view blocks) row-wise."""
    if dtype not in FEATURE_DTYPES:
        raise InputError(f"unknown dtype {dtype!r}", where="--dtype", hint="use float16 or float32")
    chunk_rows = max(1, min(1024, n_rows))
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        for key, value in attrs.items():
            f.attrs[key] = _attr(value)
        feats = f.create_dataset("features", shape=(n_rows, dim), dtype=dtype, chunks=(chunk_rows, dim))
        _fill(feats, features, n_rows)
        if n_views:
            vds = f.create_dataset(
                "views", shape=(n_rows, n_views, dim), dtype=dtype, chunks=(chunk_rows, n_views, dim)
            )
            _fill(vds, views or [], n_rows)
        f.create_dataset("paths", data=np.array(paths, dtype=object), dtype=STR)
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        f.create_dataset("splits", data=np.array(splits, dtype=object), dtype=STR)
        f.create_dataset("classnames", data=np.array(classnames, dtype=object), dtype=STR)


def _fill(dataset: h5py.Dataset, blocks: Iterable[np.ndarray], n_rows: int) -> None:
    row = 0
    for block in blocks:
        dataset[row : row + len(block)] = block
        row += len(block)
    if row != n_rows:
        raise RuntimeError(f"wrote {row} rows into a dataset of {n_rows}")


def _decode(values: Iterable[Any]) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def read_attrs(path: str | Path) -> dict[str, Any]:
    """Only the attributes of a features file (cheap)."""
    with _open(path) as f:
        return _read_attrs(f)


def _read_attrs(f: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in f.attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def _open(path: str | Path) -> h5py.File:
    p = Path(path)
    if not p.is_file():
        hint = "make it with `promptcli extract`"
        if Path(f"{p}.partial").exists():
            hint = f"an interrupted extraction left {p}.partial: rerun extract with --resume"
        raise InputError("features file not found", where=p, hint=hint)
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise InputError(
            "not an HDF5 features file", where=p, hint="make it with `promptcli extract`"
        ) from exc
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise InputError("not a promptcli features file", where=p, hint="make it with `promptcli extract`")
    if int(f.attrs.get("format_version", 0)) > FORMAT_VERSION:
        f.close()
        raise InputError("features file from a newer promptcli", where=p, hint="upgrade promptcli")
    return f


def read_features(path: str | Path, load_views: bool = True) -> FeatureSet:
    """Read a features file; features and views come back as float32."""
    with _open(path) as f:
        for name in ("features", "paths", "labels", "classnames"):
            if name not in f:
                raise InputError(f"dataset '{name}' missing", where=path, hint="re-run `promptcli extract`")
        views = None
        if load_views and "views" in f:
            views = f["views"][...].astype(np.float32)
        fs = FeatureSet(
            path=Path(path),
            features=f["features"][...].astype(np.float32),
            paths=_decode(f["paths"][...]),
            labels=f["labels"][...].astype(np.int64),
            splits=_decode(f["splits"][...]) if "splits" in f else [""] * len(f["paths"]),
            classnames=_decode(f["classnames"][...]),
            attrs=_read_attrs(f),
            views=views,
        )
    check_feature_set(fs)
    return fs


def check_feature_set(fs: FeatureSet) -> None:
    """Refuse a features file whose rows disagree in number, hold NaN/inf or an out-of-range label."""
    n = len(fs.paths)
    sizes = {"features": fs.features.shape[0], "labels": fs.labels.shape[0], "splits": len(fs.splits)}
    if fs.views is not None:
        sizes["views"] = fs.views.shape[0]
    wrong = {k: v for k, v in sizes.items() if v != n}
    if wrong:
        raise InputError(
            f"{n} paths but " + ", ".join(f"{v} {k}" for k, v in wrong.items()),
            where=fs.path,
            hint="the file is damaged; re-run `promptcli extract`",
        )
    check_finite_rows(fs.features, fs.path, lambda i: fs.paths[i])
    if fs.views is not None:
        check_finite_rows(fs.views, fs.path, lambda i: fs.paths[i], what="augmented views")
    bad = np.flatnonzero((fs.labels < -1) | (fs.labels >= len(fs.classnames)))
    if bad.size:
        i = int(bad[0])
        raise InputError(
            f"label index {int(fs.labels[i])} of row {i} ({fs.paths[i]}) is out of range "
            f"for {len(fs.classnames)} classes",
            where=fs.path,
            hint="the file is damaged; re-run `promptcli extract`",
        )
    check_unique_keys(fs.paths, str(fs.path), first_line=0, key="image path", unit="row")
    check_class_names(((f"class {i}", n) for i, n in enumerate(fs.classnames)), fs.path, what="entry")


def iter_rows(path: str | Path, batch: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
    """Stream (start row, float32 block) from a features file without loading it all."""
    with _open(path) as f:
        ds = f["features"]
        paths = f["paths"]
        for start in range(0, ds.shape[0], batch):
            block = ds[start : start + batch].astype(np.float32)
            check_finite_rows(block, path, lambda i, s=start: _decode([paths[s + i]])[0])
            yield start, block
