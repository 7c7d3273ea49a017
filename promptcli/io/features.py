"""The HDF5 features file: layout, writing and reading (documented in docs/formats.md)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from promptcli.errors import InputError
from promptcli.io.checks import check_class_names
from promptcli.io.fileio import check_input_file

FORMAT = "promptcli-features"
# 2: the checksummed layout of write_features (HDF5 1.10 format, Fletcher-32, fixed-width strings, index_sha256).
# 1: earlier promptcli's (variable-length strings, HDF5's default format): still read, unchecked. promptcli before
# version 2 cannot read version 2 files: it took the fixed-width `format` attribute for another format.
FORMAT_VERSION = 2
STR = h5py.string_dtype("utf-8")
FEATURE_DTYPES = ("float16", "float32")
# Rows are L2-normalised in float32, then stored: float16 rounding moves a norm by < 1e-3 (about
# 5e-4 at worst, ~5e-5 typically), so 1e-2 passes every extracted row and refuses edited ones.
NORM_TOLERANCE = 1e-2
MODEL_KEYS = ("model_name", "pretrained", "model_config", "checkpoint_sha256", "random_weights_seed")
# The HDF5 file format a features file is written in: the 1.10 format checksums every piece of metadata (superblock,
# object headers, chunk indexes, attribute heaps), so a damaged byte there is an error from libhdf5 rather than
# followed (in the 1.6-era default format a damaged B-tree or heap could make libhdf5 loop forever). Read by HDF5
# 1.10 or newer, as every h5py 3 wheel carries.
LIBVER = ("v110", "v110")
# The attribute holding the SHA-256 of everything a features file holds besides its feature and view values (paths,
# labels, splits, class names, attributes): labels and attribute values are stored without a checksum of libhdf5's
# own. The values (and the strings) are checked chunk by chunk by HDF5's Fletcher-32 filter, so that reading some
# rows checks those rows.
INDEX_DIGEST = "index_sha256"


class _Rows:
    """What a features file says about its rows, shared by :class:`FeatureSet` and :class:`FeatureIndex`."""

    path: Path
    paths: list[str]
    labels: np.ndarray  # (N,) int64, -1 where unknown
    classnames: list[str]
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).any())

    def model_record(self) -> dict[str, Any]:
        """The recorded model identity (name, pretrained, config, checkpoint hash)."""
        return {k: self.attrs.get(k, "") for k in MODEL_KEYS}

    def index_by_path(self) -> PathIndex:
        """Row of each path, however spelled (O(N): build it once per join, not per row)."""
        return PathIndex(self.paths)


class PathIndex:
    """The row of each image path, looked up as the file's own path checks compare paths (:func:`path_key`,
    lexically: ``./x/a.png`` and ``x//a.png`` find ``x/a.png``; no link is resolved, ``..`` is kept)."""

    def __init__(self, paths: Iterable[str]) -> None:
        self._rows = {path_key(p): i for i, p in enumerate(paths)}

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and path_key(path) in self._rows

    def __getitem__(self, path: str) -> int:
        return self._rows[path_key(path)]

    def __len__(self) -> int:
        return len(self._rows)


@dataclass
class FeatureSet(_Rows):
    """A features file in memory: one row per image, optional augmented views."""

    path: Path
    features: np.ndarray  # (N, D) float32, L2-normalised
    paths: list[str]
    labels: np.ndarray  # (N,) int64, -1 where unknown
    splits: list[str]
    classnames: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    views: np.ndarray | None = None  # (N, V, D) float32

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def n_views(self) -> int:
        return 0 if self.views is None else int(self.views.shape[1])


@dataclass
class FeatureIndex(_Rows):
    """A features file without its feature values: paths, labels, class list, attributes and shape
    (:func:`iter_blocks` streams the values)."""

    path: Path
    paths: list[str]
    labels: np.ndarray  # (N,) int64, -1 where unknown
    splits: list[str]
    classnames: list[str]
    attrs: dict[str, Any]
    dim: int
    n_views: int = 0
    stamp: tuple[int, ...] = ()  # the file's identity when read (file_stamp): its blocks must come from it


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
    """Write a complete features file, streaming feature blocks (and view blocks) row-wise.

    Damage to the file is detectable: its metadata is checksummed (:data:`LIBVER`), its feature, view and string
    chunks too (Fletcher-32), and the rest of its content (labels, attribute values) by the :data:`INDEX_DIGEST`
    attribute. Nothing goes to HDF5's global heap (no variable-length strings), whose damage libhdf5 can loop on."""
    if dtype not in FEATURE_DTYPES:
        raise InputError(f"unknown dtype {dtype!r}", where="--dtype", hint="use float16 or float32")
    chunk_rows = max(1, min(1024, n_rows))
    with h5py.File(path, "w", libver=LIBVER) as f:
        _write_attr(f, "format", FORMAT)
        f.attrs["format_version"] = FORMAT_VERSION
        for key, value in attrs.items():
            if key != INDEX_DIGEST:
                _write_attr(f, key, _attr(value))
        feats = f.create_dataset(
            "features", shape=(n_rows, dim), dtype=dtype, chunks=(chunk_rows, dim), fletcher32=True
        )
        _fill(feats, features, n_rows)
        if n_views:
            vds = f.create_dataset(
                "views",
                shape=(n_rows, n_views, dim),
                dtype=dtype,
                chunks=(chunk_rows, n_views, dim),
                fletcher32=True,
            )
            _fill(vds, views or [], n_rows)
        _write_strings(f, "paths", paths)
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        _write_strings(f, "splits", splits)
        _write_strings(f, "classnames", classnames)
        # as the reader will see them (attribute types as stored), so that it computes the same digest
        rows = {
            "paths": _decode(f["paths"][...]),
            "labels": f["labels"][...],
            "splits": _decode(f["splits"][...]),
            "classnames": _decode(f["classnames"][...]),
            "attrs": _read_attrs(f),
        }
        _write_attr(f, INDEX_DIGEST, index_digest(rows))


def _write_attr(f: h5py.File, key: str, value: Any) -> None:
    """An attribute; text as fixed-width UTF-8, kept in the (checksummed) object header, not in the global heap as
    h5py's variable-length strings are (see :func:`_write_strings`)."""
    if isinstance(value, str):
        encoded = value.encode("utf-8")
        dtype = h5py.string_dtype("utf-8", max(1, len(encoded)))
        f.attrs.create(key, np.array(encoded, dtype=dtype), dtype=dtype)
    else:
        f.attrs[key] = value


def _write_strings(f: h5py.File, name: str, values: Sequence[str]) -> None:
    """Strings as fixed-width UTF-8 in a compressed, Fletcher-32-checked chunked dataset. Not variable-length strings:
    those live in HDF5's global heap, which has no checksum, and a damaged heap object or reference to one can make
    libhdf5 loop forever (the 1.10 format does not change that)."""
    encoded = [v.encode("utf-8") for v in values]
    width = max(1, max(map(len, encoded), default=1))
    dtype = h5py.string_dtype("utf-8", width)
    f.create_dataset(
        name,
        data=np.array(encoded, dtype=dtype),
        dtype=dtype,
        chunks=(max(1, min(len(encoded), (1 << 20) // width)),),
        compression="gzip",
        compression_opts=1,
        fletcher32=True,
    )


def _fill(dataset: h5py.Dataset, blocks: Iterable[np.ndarray], n_rows: int) -> None:
    row = 0
    for block in blocks:
        dataset[row : row + len(block)] = block
        row += len(block)
    if row != n_rows:
        raise RuntimeError(f"wrote {row} rows into a dataset of {n_rows}")


def index_digest(rows: dict[str, Any]) -> str:
    """SHA-256 (hex) of a features file's paths, labels, splits, class names and attributes but
    :data:`INDEX_DIGEST` (``rows``: as :func:`_row_fields` reads them), what the writer records in that attribute."""
    h = hashlib.sha256(b"promptcli-features index 1\0")
    for name in ("paths", "splits", "classnames"):
        values = rows[name]
        h.update(f"{name} {len(values)}\0".encode())
        h.update("\0".join(values).encode("utf-8", "surrogatepass"))  # HDF5 strings hold no NUL
    labels = np.ascontiguousarray(rows["labels"], dtype="<i8")
    h.update(f"labels {labels.size}\0".encode())
    h.update(labels.tobytes())
    attrs = {k: v for k, v in rows["attrs"].items() if k != INDEX_DIGEST}
    h.update(json.dumps(attrs, sort_keys=True, default=_json_value).encode())
    return h.hexdigest()


def _json_value(value: Any) -> Any:
    """A JSON form of an attribute value json cannot write (arrays, numpy scalars, bytes), with its type."""
    if isinstance(value, np.ndarray):
        return {"array": str(value.dtype), "shape": list(value.shape), "values": value.tolist()}
    if isinstance(value, np.generic):
        return {str(value.dtype): value.item() if value.dtype.kind in "biuf" else repr(value)}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    return {type(value).__name__: repr(value)}


def _index_matches(rows: dict[str, Any]) -> bool:
    """Whether ``rows`` (as :func:`_row_fields` read them) are what the writer recorded in :data:`INDEX_DIGEST`
    (files from before it was recorded have none: nothing to check)."""
    recorded = rows["attrs"].get(INDEX_DIGEST)
    return recorded is None or (isinstance(recorded, str) and recorded == index_digest(rows))


def _check_index(matches: bool, path: str | Path) -> None:
    """Refuse a file whose :func:`_index_matches` was False: called once every other check has passed, so that a
    file edited into a specific error is told that error."""
    if not matches:
        raise InputError(
            "its paths, labels, class names or attributes differ from what was written (the checksum recorded in "
            f"attribute {INDEX_DIGEST} does not match)",
            where=path,
            hint=_DAMAGED + " (after an intended edit, delete that attribute)",
        )


def _decode(values: Iterable[Any]) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def read_attrs(path: str | Path) -> dict[str, Any]:
    """Only the attributes of a features file (cheap)."""
    with _open(path) as f:
        return _read_attrs(f)


def _read_attrs(f: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in _attr_items(f):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"attribute {key!r} is not UTF-8 text ({exc.reason})", where=f.filename, hint=_DAMAGED
                ) from exc
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


# What h5py raises, besides KeyError/OSError/RuntimeError, on metadata it decodes itself (an attribute's or a dataset's
# type) when a file is damaged: a string charset byte out of range (TypeError), a float type no numpy type holds
# (ValueError). Caught only around those reads, not around what callers do with an open file.
_H5_DECODE_ERRORS = (KeyError, OSError, RuntimeError, TypeError, ValueError)


def _attr_items(f: h5py.File, names: Sequence[str] | None = None) -> list[tuple[str, Any]]:
    """The file's attributes (those of ``names`` that it has, when given); damaged ones are a one-line error."""
    try:
        if names is None:
            return list(f.attrs.items())
        return [(name, f.attrs[name]) for name in names if name in f.attrs]
    except _H5_DECODE_ERRORS as exc:
        raise InputError(
            f"cannot read its attributes ({_h5_message(exc)})", where=f.filename, hint=_DAMAGED
        ) from exc


@contextlib.contextmanager
def _open(path: str | Path) -> Iterator[h5py.File]:
    """The features file, open for reading once checked to be one this promptcli reads. While it is open, h5py's
    errors for a damaged file (a bad object header, unreadable metadata: KeyError, OSError, RuntimeError) are
    one-line errors naming it."""
    p = Path(path)
    hint = "make it with `promptcli extract`"
    if not p.exists() and Path(f"{p}.partial").exists():
        hint = f"an interrupted extraction left {p}.partial: rerun extract with --resume"
    check_input_file(p, "features file", hint)
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise InputError(
            "not an HDF5 features file", where=p, hint="make it with `promptcli extract`"
        ) from exc
    try:
        with f:
            _check_format(f, p)
            yield f
    except (KeyError, OSError, RuntimeError) as exc:
        raise InputError(f"cannot read the file ({_h5_message(exc)})", where=p, hint=_DAMAGED) from exc


def _check_format(f: h5py.File, path: Path) -> None:
    """A promptcli features file of a format version this promptcli reads."""
    attrs = dict(_attr_items(f, ("format", "format_version")))
    fmt = attrs.get("format")
    if isinstance(fmt, bytes) and not isinstance(fmt, np.ndarray):  # fixed-width text (format_version 2)
        fmt = fmt.decode("utf-8", "replace")
    if not _is_str(fmt, FORMAT):
        raise InputError("not a promptcli features file", where=path, hint="make it with `promptcli extract`")
    version = attrs.get("format_version", 0)
    if not isinstance(version, (int, np.integer)) or isinstance(version, (bool, np.bool_)):
        raise InputError(
            f"attribute format_version is {repr(version)[:60]}, not an integer", where=path, hint=_DAMAGED
        )
    if int(version) > FORMAT_VERSION:
        raise InputError("features file from a newer promptcli", where=path, hint="upgrade promptcli")


def _is_str(value: Any, expected: str) -> bool:
    """Whether an attribute is the string ``expected`` (an array attribute is not: ``==`` on it is elementwise)."""
    return isinstance(value, str) and value == expected


def read_features(
    path: str | Path, load_views: bool = True, only_paths: Iterable[str] | None = None
) -> FeatureSet:
    """Read a features file; features and views come back as float32.

    The datasets' shapes and dtypes are checked before anything is loaded (a view array is checked
    even when ``load_views`` is False), then :func:`check_feature_set` checks the values. ``only_paths``
    keeps just the rows of those image paths, in file order (what a labels file names: 16 shots of a
    million-image file are 16,000 rows, read without converting the rest).
    """
    with _open(path) as f:
        n, _ = _check_layout(f, path)
        rows = _row_fields(f, path, n)
        matches = _index_matches(rows)  # of all rows, before only_paths keeps some
        keep = None
        if only_paths is not None:
            wanted = {path_key(p) for p in only_paths}  # as labels join: ./x/a.png is x/a.png
            keep = np.flatnonzero(
                np.fromiter((path_key(p) in wanted for p in rows["paths"]), dtype=bool, count=n)
            )
            rows["paths"] = [rows["paths"][i] for i in keep]
            rows["labels"] = rows["labels"][keep]
            rows["splits"] = [rows["splits"][i] for i in keep]
        fs = FeatureSet(
            path=Path(path),
            features=_float_rows(f["features"], keep),
            views=_float_rows(f["views"], keep) if load_views and "views" in f else None,
            **rows,
        )
    check_feature_set(fs, rows=keep)  # errors name the file's rows, not the kept ones'
    _check_index(matches, path)
    return fs


def _row_fields(f: h5py.File, path: str | Path, n: int) -> dict[str, Any]:
    """What a features file says about its rows besides their values: paths, labels, splits, classes, attributes."""
    return {
        "paths": _strings(f, "paths", path),
        "labels": _labels(f, path),
        "splits": _strings(f, "splits", path) if "splits" in f else [""] * n,
        "classnames": _strings(f, "classnames", path),
        "attrs": _read_attrs(f),
    }


def file_stamp(path: str | Path) -> tuple[int, ...]:
    """The file's device, inode, size and modification time (ns): any rename over it or write to it changes it."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _check_unchanged(path: str | Path, stamp: tuple[int, ...]) -> None:
    if stamp and file_stamp(path) != stamp:
        raise InputError(
            "the features file changed while it was read (rewritten or replaced by another command?)",
            where=path,
            hint="run the command again once the file is written",
        )


def read_feature_index(path: str | Path) -> FeatureIndex:
    """Everything in a features file but its feature and view values, checked as :func:`read_features` checks
    it except for the rows' values (:func:`iter_blocks` checks those as it reads them, from the same file:
    ``stamp``)."""
    stamp = file_stamp(path) if Path(path).is_file() else ()
    with _open(path) as f:
        n, dim = _check_layout(f, path)
        rows = _row_fields(f, path, n)
        index = FeatureIndex(
            path=Path(path),
            **rows,
            dim=dim,
            n_views=int(f["views"].shape[1]) if "views" in f else 0,
            stamp=stamp,
        )
    _check_unchanged(path, stamp)
    check_rows(index)
    _check_index(_index_matches(rows), path)
    return index


def _float_rows(ds: h5py.Dataset, keep: np.ndarray | None, block_bytes: int = 64 << 20) -> np.ndarray:
    """Rows ``keep`` (sorted; all when None) of a stored array, as float32, reading ~64 MB blocks."""
    path = ds.file.filename
    if keep is None:
        return _read_rows(ds, Ellipsis, path).astype(np.float32)
    out = np.empty((len(keep), *ds.shape[1:]), dtype=np.float32)
    block = max(1, block_bytes // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:]))))
    done = 0
    for start in range(0, ds.shape[0], block):
        here = keep[(keep >= start) & (keep < start + block)]
        if here.size:
            out[done : done + here.size] = _read_rows(ds, slice(start, start + block), path)[here - start]
            done += here.size
    return out


_DAMAGED = "the file is damaged or was edited; re-run `promptcli extract`"
_LAYOUT = {  # dataset: what it must be
    "features": "shape (N, D) of float16 or float32 numbers",
    "views": "shape (N, V, D) of float16 or float32 numbers, D as in 'features'",
    "paths": "shape (N,) of strings",
    "labels": "shape (N,) of integers (class index, -1 for unknown)",
    "splits": "shape (N,) of strings",
    "classnames": "shape (C,) of strings",
}


def _layout_error(name: str, found: str, path: str | Path) -> InputError:
    return InputError(f"dataset '{name}' {found}; expected {_LAYOUT[name]}", where=path, hint=_DAMAGED)


def _check_counts(n: int, sizes: dict[str, int], path: str | Path) -> None:
    wrong = {k: v for k, v in sizes.items() if v != n}
    if wrong:
        raise InputError(
            f"{n} paths but " + ", ".join(f"{v} {k}" for k, v in wrong.items()),
            where=path,
            hint="the file is damaged; re-run `promptcli extract`",
        )


def _dataset(f: h5py.File, name: str, path: str | Path) -> h5py.Dataset | None:
    """Dataset ``name`` (None when absent), refused when a link (to another file or name), a group, or damaged."""
    try:
        link = f.get(name, getlink=True)
        if link is None:
            return None
        if not isinstance(link, h5py.HardLink):  # an extracted file has none: its data would be elsewhere
            raise _layout_error(name, f"is an HDF5 {type(link).__name__}, not a dataset", path)
        ds = f[name]
        if isinstance(ds, h5py.Dataset):
            _ = (ds.dtype, ds.shape)  # decoded here: a damaged type or shape is this dataset's error
    except _H5_DECODE_ERRORS as exc:
        raise InputError(
            f"dataset '{name}' cannot be opened ({_h5_message(exc)})", where=path, hint=_DAMAGED
        ) from exc
    if not isinstance(ds, h5py.Dataset):
        raise _layout_error(name, "is not a dataset (an HDF5 group)", path)
    return ds


def _h5_message(exc: BaseException) -> str:
    """The first line of an h5py error (a KeyError's message is its first argument, not its quoted repr)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _check_layout(f: h5py.File, path: str | Path) -> tuple[int, int]:
    """Check every dataset's kind, rank and dtype from its metadata (nothing is read); return (N, D)."""
    kinds = {
        "features": (2, "float"),
        "views": (3, "float"),
        "paths": (1, "str"),
        "labels": (1, "int"),
        "splits": (1, "str"),
        "classnames": (1, "str"),
    }
    found = {name: _dataset(f, name, path) for name in kinds}
    for name in ("features", "paths", "labels", "classnames"):
        if found[name] is None:
            raise InputError(f"dataset '{name}' missing", where=path, hint="re-run `promptcli extract`")
    for name, (ndim, kind) in kinds.items():
        ds = found[name]
        if ds is None:
            continue
        if ds.ndim != ndim:
            raise _layout_error(name, f"has shape {ds.shape}", path)
        if kind == "str":
            ok = h5py.check_string_dtype(ds.dtype) is not None
        elif kind == "int":
            ok = ds.dtype.kind in "iu"
        else:
            ok = ds.dtype.kind == "f"
        if not ok:
            raise _layout_error(name, f"holds {_dtype_name(ds.dtype)} values", path)
    n, dim = found["features"].shape
    counted = ("features", "labels", "splits", "views")
    _check_counts(len(found["paths"]), {k: len(found[k]) for k in counted if found[k] is not None}, path)
    if dim == 0:
        raise _layout_error("features", f"has shape {(n, dim)}", path)
    if found["views"] is not None:
        shape = found["views"].shape
        if shape[1] == 0 or shape[2] != dim:
            raise _layout_error("views", f"has shape {shape} for features of shape {(n, dim)}", path)
    recorded = dict(_attr_items(f, ("embed_dim",))).get("embed_dim")
    if isinstance(recorded, (int, np.integer)) and int(recorded) != dim:
        raise InputError(
            f"features are {dim} wide but the file records embed_dim {int(recorded)}",
            where=path,
            hint=_DAMAGED,
        )
    return n, dim


def _dtype_name(dtype: np.dtype) -> str:
    if h5py.check_string_dtype(dtype) is not None:
        return "string"
    return "compound" if dtype.names else str(dtype)


def _strings(f: h5py.File, name: str, path: str | Path, block: int = 1 << 16) -> list[str]:
    """A string dataset's entries, read in blocks (a fixed-width one is N x its widest entry in memory)."""
    ds, out = f[name], []
    for start in range(0, len(ds), block):
        values = _read_rows(ds, slice(start, start + block), path)
        try:
            out.extend(_decode(values))
        except UnicodeDecodeError as exc:
            row = start + next(i for i, v in enumerate(values) if isinstance(v, bytes) and not _is_utf8(v))
            raise InputError(
                f"entry {row} of dataset '{name}' is not UTF-8 text ({exc.reason})", where=path, hint=_DAMAGED
            ) from exc
    return out


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _labels(f: h5py.File, path: str | Path) -> np.ndarray:
    raw = f["labels"][...]
    if raw.dtype.kind == "u" and raw.size and raw.max() > np.iinfo(np.int64).max:
        row = int(np.argmax(raw > np.iinfo(np.int64).max))
        raise InputError(f"label index {raw[row]} of row {row} is out of range", where=path, hint=_DAMAGED)
    return raw.astype(np.int64)


def check_feature_set(fs: FeatureSet, rows: Sequence[int] | None = None) -> None:
    """Refuse a features file whose datasets disagree in rows or width, with NaN/inf or rows that are not
    L2-normalised (features, and views when loaded), an out-of-range label, or an empty or repeated
    image path (``x`` and ``./x`` are one path). ``rows``: the file row of each of ``fs``'s rows, for the
    errors (default: they are the file's rows, in order)."""
    n = len(fs.paths)
    if fs.features.ndim != 2 or fs.labels.ndim != 1:
        raise InputError(
            f"features of shape {fs.features.shape} and labels of shape {fs.labels.shape}; "
            "expected (N, D) and (N,)",
            where=fs.path,
            hint=_DAMAGED,
        )
    sizes = {"features": fs.features.shape[0], "labels": fs.labels.shape[0], "splits": len(fs.splits)}
    if fs.views is not None:
        sizes["views"] = fs.views.shape[0]
    _check_counts(n, sizes, fs.path)
    if fs.views is not None and (fs.views.ndim != 3 or fs.views.shape[2] != fs.features.shape[1]):
        raise _layout_error(
            "views", f"has shape {fs.views.shape} for features of shape {fs.features.shape}", fs.path
        )
    check_unit_rows(fs.features, fs.path, lambda i: fs.paths[i], rows=rows)
    if fs.views is not None:
        check_unit_rows(fs.views, fs.path, lambda i: fs.paths[i], what="augmented views", rows=rows)
    check_rows(fs)


def check_rows(fs: _Rows) -> None:
    """Refuse an out-of-range label, an empty or repeated image path, or a bad class name."""
    bad = np.flatnonzero((fs.labels < -1) | (fs.labels >= len(fs.classnames)))
    if bad.size:
        i = int(bad[0])
        raise InputError(
            f"label index {int(fs.labels[i])} of row {i} ({fs.paths[i]}) is out of range "
            f"for {len(fs.classnames)} classes",
            where=fs.path,
            hint="the file is damaged; re-run `promptcli extract`",
        )
    check_paths(fs.paths, fs.path)
    check_class_names(((f"class {i}", n) for i, n in enumerate(fs.classnames)), fs.path, what="entry")


def check_unit_rows(
    array: np.ndarray,
    where: str | Path,
    name_of: Callable[[int], str],
    what: str = "features",
    rows: Sequence[int] | None = None,
) -> None:
    """Refuse rows (``(N, D)``, or ``(N, V, D)`` views) with NaN/inf or an L2 norm off 1 by more than
    :data:`NORM_TOLERANCE`, naming the first bad row: its file row (``rows[i]``, default i) and ``name_of(i)``.

    One vectorised pass of squared norms (NaN/inf rows give NaN/inf); values are looked at only in the
    first bad row, to say whether it is non-finite or off unit norm.
    """
    if array.size == 0:
        return
    squared = np.einsum("...d,...d->...", array, array)  # (N,) or (N, V)
    low, high = (1 - NORM_TOLERANCE) ** 2, (1 + NORM_TOLERANCE) ** 2
    bad = ~((squared >= low) & (squared <= high))  # NaN fails both comparisons
    bad_rows = bad.reshape(len(array), -1).any(axis=1)
    if not bad_rows.any():
        return
    i = int(np.argmax(bad_rows))
    row = int(rows[i]) if rows is not None else i
    if not np.isfinite(array[i]).all():
        raise InputError(
            f"{what} of row {row} ({name_of(i)}) are not finite (NaN or inf)",
            where=where,
            hint="the file is damaged or was made from bad input; re-extract it",
        )
    norms = np.sqrt(squared[i].astype(np.float64)).reshape(-1)
    j = int(np.argmax(bad[i].reshape(-1)))
    if array.ndim == 3:
        which = f"augmented view {j} of row {row} ({name_of(i)}) has"
    else:
        which = f"{what} of row {row} ({name_of(i)}) have"
    raise InputError(
        f"{which} L2 norm {norms[j]:.4g}, not 1 (features files hold L2-normalised embeddings)",
        where=where,
        hint="the file was edited or not made by `promptcli extract`; re-extract it",
    )


def path_key(path: str) -> str:
    """``path`` without ``.`` components and repeated or trailing slashes (``./a//b`` is ``a/b``).

    ``..`` is kept: through a linked folder ``a/../b`` need not be ``b``.
    """
    if "//" not in path and "./" not in path and not path.endswith(("/", "/.")) and path != ".":
        return path
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return ("/" if path.startswith("/") else "") + "/".join(parts)


def check_paths(paths: list[str], where: str | Path) -> None:
    """Refuse an empty image path and one image listed twice, however spelled (``x``, ``./x``)."""
    seen: dict[str, int] = {}
    for i, p in enumerate(paths):
        key = path_key(p)
        if key in ("", "/"):
            what = "is empty" if not p else f"({p!r}) names no file"
            raise InputError(f"image path of row {i} {what}", where=where, hint=_DAMAGED)
        j = seen.setdefault(key, i)
        if j == i:
            continue
        if paths[j] == p:
            what = f"image path {p!r} is listed twice (rows {j} and {i})"
        else:
            what = f"image paths {paths[j]!r} (row {j}) and {p!r} (row {i}) name one image"
        raise InputError(what, where=where, hint="list each image path once")


def iter_rows(path: str | Path, batch: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
    """Stream (start row, float32 block) from a features file without loading it all."""
    with _open(path) as f:
        n, _ = _check_layout(f, path)
    yield from iter_blocks(path, [(start, min(start + batch, n)) for start in range(0, n, batch)])


def row_blocks(n: int, block: int) -> list[tuple[int, int]]:
    """(start, stop) of blocks of ``block`` rows covering ``n`` rows, the last taking the remainder, so that no
    block is shorter than ``block`` unless all ``n`` rows are (a matrix product's rows can depend on how many
    rows it is given, at a handful of rows)."""
    starts = list(range(0, n, block))
    if len(starts) > 1 and n - starts[-1] < block:
        starts.pop()
    return list(zip(starts, starts[1:] + [n])) if n else []


def iter_blocks(
    path: str | Path, blocks: Iterable[tuple[int, int]], stamp: tuple[int, ...] = ()
) -> Iterator[tuple[int, np.ndarray]]:
    """Stream (start row, float32 rows) of a features file's ``(start, stop)`` blocks, each checked as
    :func:`read_features` checks the whole (NaN/inf, unit norm). With ``stamp`` (its index's), a file
    replaced or written since the index was read is an error, not rows of another file."""
    with _open(path) as f:
        _check_unchanged(path, stamp)
        _check_layout(f, path)
        ds, paths = f["features"], f["paths"]
        for start, stop in blocks:
            rows = _read_rows(ds, slice(start, stop), path).astype(np.float32)
            check_unit_rows(
                rows,
                Path(path),
                lambda i, first=start: _decode([paths[first + i]])[0],
                rows=range(start, stop),
            )
            yield start, rows
    _check_unchanged(path, stamp)  # not written in place while it was read


def _read_rows(ds: h5py.Dataset, rows: Any, path: str | Path) -> np.ndarray:
    """``ds[rows]``; an unreadable chunk (a damaged file) is a one-line error naming the file."""
    try:
        return ds[rows]
    except OSError as exc:
        raise InputError(
            f"cannot read dataset {ds.name.lstrip('/')!r}: {str(exc).splitlines()[0]}",
            where=path,
            hint=_DAMAGED,
        ) from exc
