"""The features file reader refuses content that is not what docs/formats.md says, in one line.

Each case edits a valid file with h5py, as a user or a script might, and checks that
:func:`read_features` raises an :class:`InputError` naming the file and what is wrong (before these
checks, most of them were read silently into a wrong result, or failed later with a raw error).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import unit_rows, write_synthetic_features
from promptcli.errors import InputError
from promptcli.io.features import (
    INDEX_DIGEST,
    NORM_TOLERANCE,
    iter_blocks,
    iter_rows,
    read_feature_index,
    read_features,
    row_blocks,
    write_features,
)
from promptcli.models.loading import load_model_from_record, read_model_config

CLASSES = ["cat", "dog", "car"]
N, DIM, VIEWS = 12, 16, 2


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A valid float16 features file with 2 views (no model needed: only the reader is under test)."""
    rng = np.random.default_rng(0)
    x = unit_rows(rng.normal(size=(N, DIM)))
    views = unit_rows(x[:, None, :] + 0.2 * rng.normal(size=(N, VIEWS, DIM)))
    path = tmp_path_factory.mktemp("features-file") / "base.h5"
    write_features(
        path, features=[x], n_rows=N, dim=DIM, paths=[f"{CLASSES[i % 3]}/{i:03d}.png" for i in range(N)],
        labels=[i % 3 for i in range(N)], splits=["train"] * N, classnames=CLASSES,
        attrs={"embed_dim": DIM}, n_views=VIEWS, views=[views], dtype="float16",
    )  # fmt: skip
    return path


def edited(base: Path, tmp_path: Path, edit, drop_digest: bool = False) -> Path:
    """A copy of ``base`` changed by ``edit(h5py.File)``; with ``drop_digest``, as docs/formats.md says to after an
    intended edit (without, an edit that no other check refuses is refused by the index checksum)."""
    path = tmp_path / "edited.h5"
    shutil.copy(base, path)
    with h5py.File(path, "a") as f:
        edit(f)
        if drop_digest:
            del f.attrs[INDEX_DIGEST]
    return path


def replace(name: str, make):
    """An edit replacing dataset ``name`` by ``make(its current values)``."""

    def edit(f: h5py.File) -> None:
        values = f[name][...]
        data = make(
            values.astype(object) if values.dtype.kind == "S" else values
        )  # as variable-length strings
        del f[name]
        if data.dtype == object:
            f.create_dataset(name, data=data, dtype=h5py.string_dtype())
        else:
            f.create_dataset(name, data=data)

    return edit


def set_rows(name: str, change):
    def edit(f: h5py.File) -> None:
        data = f[name][...].astype(np.float32)
        change(data)
        f[name][...] = data

    return edit


def _scale_row(i: int, factor: float):
    def change(x):
        x[i] *= factor

    return change


def _zero_row(i: int):
    def change(x):
        x[i] = 0

    return change


def _scale_view(i: int, j: int, factor: float):
    def change(v):
        v[i, j] *= factor

    return change


def _set_path(i: int, value: bytes):
    def change(p):
        p[i] = value
        return p

    return change


def _narrow_features(f: h5py.File) -> None:
    replace("features", lambda x: unit_rows(x[:, :15]))(f)
    del f["views"]


CASES = {
    # not L2-normalised: scaled, one row scaled, an all-zero row, one view scaled
    "scaled x10": (set_rows("features", lambda x: x.__imul__(10)), r"features of row 0 \(cat/000.png\) have L2 norm 10"),
    "one row x1.5": (set_rows("features", _scale_row(3, 1.5)), r"features of row 3 \(cat/003.png\) have L2 norm 1.5"),
    "one row x0.9": (set_rows("features", _scale_row(4, 0.9)), r"row 4 \(dog/004.png\) have L2 norm 0.9"),
    "zero row": (set_rows("features", _zero_row(7)), r"features of row 7 \(dog/007.png\) have L2 norm 0,"),
    "view scaled": (set_rows("views", _scale_view(2, 1, 3.0)), r"augmented view 1 of row 2 \(car/002.png\) has L2 norm 3"),
    # wrong dtypes
    "int8 features": (replace("features", lambda x: (x * 100).astype("i1")), r"'features' holds int8 values; expected shape \(N, D\)"),
    "float labels": (replace("labels", lambda y: y + 0.99), r"'labels' holds float64 values; expected shape \(N,\) of integers"),
    "string labels": (replace("labels", lambda y: np.array([str(v) for v in y], dtype=object)), r"'labels' holds string values"),
    "int classnames": (replace("classnames", lambda c: np.arange(len(c))), r"'classnames' holds int64 values"),
    "int paths": (replace("paths", lambda p: np.arange(len(p))), r"'paths' holds int64 values"),
    # wrong shapes
    "1-D features": (replace("features", lambda x: x[:, 0]), r"'features' has shape \(12,\); expected shape \(N, D\)"),
    "3-D features": (replace("features", lambda x: x[:, :, None]), r"'features' has shape \(12, 16, 1\); expected shape \(N, D\)"),
    "2-D labels": (replace("labels", lambda y: y[:, None]), r"'labels' has shape \(12, 1\); expected shape \(N,\)"),
    "2-D paths": (replace("paths", lambda p: np.stack([p, p], axis=1)), r"'paths' has shape \(12, 2\); expected shape \(N,\) of strings"),
    "narrow views": (replace("views", lambda v: v[:, :, :10]), r"'views' has shape \(12, 2, 10\) for features of shape \(12, 16\)"),
    "2-D views": (replace("views", lambda v: v[:, 0]), r"'views' has shape \(12, 16\)"),
    "no views per row": (replace("views", lambda v: v[:, :0]), r"'views' has shape \(12, 0, 16\)"),
    "views short of rows": (replace("views", lambda v: v[:-1]), r"12 paths but 11 views"),
    "narrow features": (_narrow_features, r"features are 15 wide but the file records embed_dim 16"),
    "group as features": (lambda f: (f.__delitem__("features"), f.create_group("features")), r"'features' is not a dataset"),
    # paths
    "empty path": (replace("paths", _set_path(3, b"")), r"image path of row 3 is empty"),
    "./ duplicate": (replace("paths", _set_path(5, b"./cat/000.png")), r"'cat/000.png' \(row 0\) and './cat/000.png' \(row 5\) name one image"),
    "// duplicate": (replace("paths", _set_path(5, b"cat//000.png")), r"\(row 0\) and 'cat//000.png' \(row 5\) name one image"),
    "exact duplicate": (replace("paths", _set_path(5, b"cat/000.png")), r"image path 'cat/000.png' is listed twice \(rows 0 and 5\)"),
    "path '.'": (replace("paths", _set_path(2, b".")), r"image path of row 2 \('\.'\) names no file"),
    "not UTF-8": (replace("paths", lambda p: np.array([b"\xff\xfe.png", *p[1:]], dtype="S12")), r"entry 0 of dataset 'paths' is not UTF-8"),
    # damaged or edited structure and attributes
    "external link": (lambda f: (f.__delitem__("features"), f.__setitem__("features", h5py.ExternalLink("/nowhere.h5", "/features"))), r"'features' is an HDF5 ExternalLink"),
    "format_version '1.0'": (lambda f: f.attrs.__setitem__("format_version", "1.0"), r"attribute format_version is '1.0', not an integer"),
    "format_version array": (lambda f: f.attrs.__setitem__("format_version", [1, 2]), r"attribute format_version is array"),
    "attribute not UTF-8": (lambda f: f.attrs.__setitem__("model_name", np.bytes_(b"tiny\xff")), r"attribute 'model_name' is not UTF-8"),
}  # fmt: skip


def _index_then_blocks(path: Path, block: int = 5) -> list[np.ndarray]:
    index = read_feature_index(path)
    return [rows for _, rows in iter_blocks(path, row_blocks(len(index), block))]


# read_features, and the index with its blocks (eval, corrupt, pseudolabel), which read no view values
READERS = [(case, "read_features") for case in CASES] + [
    (case, "index and blocks") for case in CASES if case != "view scaled"
]


@pytest.mark.parametrize(("case", "reader"), READERS)
def test_bad_content_is_one_input_error_naming_the_file(base, tmp_path, case, reader):
    edit, message = CASES[case]
    path = edited(base, tmp_path, edit)
    with pytest.raises(InputError, match=message) as info:
        read_features(path) if reader == "read_features" else _index_then_blocks(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["narrow views", "2-D views", "no views per row", "views short of rows"])
def test_views_of_the_wrong_shape_are_refused_even_when_not_loaded(base, tmp_path, case):
    edit, message = CASES[case]
    with pytest.raises(InputError, match=message):
        read_features(edited(base, tmp_path, edit), load_views=False)


def test_the_valid_file_reads_and_float16_rounding_is_far_inside_the_tolerance(base):
    fs = read_features(base)
    assert len(fs) == N and fs.dim == DIM and fs.n_views == VIEWS
    for rows in (fs.features, fs.views):
        off = np.abs(np.linalg.norm(rows, axis=-1) - 1).max()
        assert 0 < off < NORM_TOLERANCE / 10  # float16 moved the norms, by far less than the tolerance


def test_extract_float16_output_passes_the_norm_check(image_folder, tiny_model, tmp_path):
    from promptcli.extraction.extract import ExtractOptions, extract_features
    from promptcli.io.image_sources import read_image_folder

    out = tmp_path / "f16.h5"
    extract_features(
        read_image_folder(image_folder), tiny_model, out, ExtractOptions(views=2, dtype="float16", workers=0)
    )
    fs = read_features(out)
    assert np.abs(np.linalg.norm(fs.features, axis=1) - 1).max() < 1e-3
    assert np.abs(np.linalg.norm(fs.views, axis=-1) - 1).max() < 1e-3


def test_small_float_error_and_other_float_dtypes_pass(base, tmp_path):
    """Rows a little off unit norm (float rounding, float64 storage) are not refused."""

    def edit(f):
        x = f["features"][...].astype(np.float64) * (1 + NORM_TOLERANCE / 2)
        del f["features"]
        f.create_dataset("features", data=x)

    fs = read_features(edited(base, tmp_path, edit))
    assert fs.features.dtype == np.float32


def test_the_first_bad_row_is_named_whether_non_finite_or_off_unit_norm(base, tmp_path):
    def edit(inf_row: int):
        def change(x):
            x[inf_row, 1] = np.inf
            x[6] *= 2

        return set_rows("features", change)

    with pytest.raises(InputError, match=r"features of row 6 \(cat/006.png\) have L2 norm 2"):
        read_features(edited(base, tmp_path, edit(9)))
    with pytest.raises(InputError, match=r"features of row 4 \(dog/004.png\) are not finite"):
        read_features(edited(base, tmp_path, edit(4)))

    def nan_view(v):
        v[8, 1, 0] = np.nan

    with pytest.raises(InputError, match=r"augmented views of row 8 \(car/008.png\) are not finite"):
        read_features(edited(base, tmp_path, set_rows("views", nan_view)))


def test_paths_that_only_look_alike_are_kept(base, tmp_path):
    """``./x`` alone is fine; ``a/../b`` is not ``b`` (through a linked folder it need not be)."""
    paths = [b"./cat/000.png", b"cat/000.PNG", b"dog/../car/002.png", b"car/002.png"]

    def edit(f):
        p = f["paths"][...].astype(object)
        p[: len(paths)] = paths
        del f["paths"]
        f.create_dataset("paths", data=p, dtype=h5py.string_dtype())

    fs = read_features(edited(base, tmp_path, edit, drop_digest=True))
    assert fs.paths[:4] == [p.decode() for p in paths]


def test_labels_join_paths_as_the_features_file_compares_them(base, tmp_path):
    """A hand-written ``./cat/000.png`` was refused as not in a file whose own checks call it ``cat/000.png``: the
    join (and the rows ``only_paths`` reads) now compare paths the same way, lexically. Two spellings of one image
    in one labels file are refused, and ``x/../cat/000.png`` stays another path."""
    from promptcli.io.labels import join_labels, read_labels

    whole = read_features(base, load_views=False)
    first, second = whole.paths[:2]  # cat/000.png, dog/001.png
    labels = tmp_path / "l.csv"
    labels.write_text(f"path,label\n./{first},dog\n{second.replace('/', '//')},cat\n")
    table = read_labels(labels)
    fs = read_features(base, load_views=False, only_paths=table.column("path"))
    assert fs.paths == [first, second]
    joined = join_labels(fs, table)
    assert [fs.paths[r] for r in joined.rows] == [first, second] and joined.labels.tolist() == [1, 0]
    assert join_labels(whole, table).rows.tolist() == [0, 1]

    labels.write_text(f"path,label\n{first},cat\n./{first},cat\n")
    with pytest.raises(
        InputError, match=rf"paths '{first}' \(line 2\) and './{first}' \(line 3\) name one image"
    ):
        read_labels(labels)
    labels.write_text(f"path,label\nx/../{first},cat\n")
    with pytest.raises(InputError, match="is not in"):
        join_labels(whole, read_labels(labels))


def test_iter_rows_checks_layout_and_norms_block_by_block(base, tmp_path):
    assert sum(len(block) for _, block in iter_rows(base, batch=5)) == N
    with pytest.raises(InputError, match=r"features of row 11 \(car/011.png\) have L2 norm 2"):
        list(iter_rows(edited(base, tmp_path, set_rows("features", _scale_row(11, 2.0))), batch=5))
    with pytest.raises(InputError, match=r"'features' holds int8"):
        list(iter_rows(edited(base, tmp_path, CASES["int8 features"][0])))


def test_the_index_and_its_blocks_are_read_features_without_the_values(base):
    whole, index = read_features(base, load_views=False), read_feature_index(base)
    for name in ("path", "paths", "splits", "classnames", "attrs", "dim", "n_views"):
        assert getattr(index, name) == getattr(read_features(base), name), name
    assert np.array_equal(index.labels, whole.labels) and index.labels.dtype == whole.labels.dtype
    blocks = _index_then_blocks(base, block=5)
    assert [len(b) for b in blocks] == [5, 7]  # the last block takes the remainder
    assert np.array_equal(np.concatenate(blocks), whole.features)
    assert all(b.dtype == np.float32 for b in blocks)


def test_row_blocks_cover_the_rows_with_no_short_block():
    for n in range(40):
        for block in range(1, 10):
            bounds = row_blocks(n, block)
            assert [start for start, _ in bounds] == list(range(0, n, block))[: len(bounds)]
            assert [stop for _, stop in bounds[:-1]] == [start for start, _ in bounds[1:]]
            assert (bounds[-1][1] if bounds else 0) == n
            assert all(block <= stop - start < 2 * block for start, stop in bounds) or bounds == [(0, n)]


# --- through the CLI: one line, exit 2, where the bad file used to fail late with a raw error --------


@pytest.fixture(scope="module")
def syn(tmp_path_factory, tiny_model) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("features-file-cli")
    features = folder / "syn.h5"
    _, y, paths = write_synthetic_features(features, tiny_model, CLASSES, 4, 0.3)
    labels = folder / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p},{CLASSES[c]}\n" for p, c in zip(paths, y)))
    return {"features": features, "labels": labels}


def one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("Error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err and "unexpected" not in err, err
    return lines[0]


def test_tune_refuses_views_narrower_than_the_features(syn, tmp_path, run_cli):
    """Before, tune failed deep in training with torch's raw 'mat1 and mat2 shapes cannot be multiplied'."""
    bad = edited(syn["features"], tmp_path, replace("views", lambda v: v[:, :, :20]))
    code, _, err = run_cli("tune", bad, syn["labels"], "-o", tmp_path / "p.safetensors", "--device", "cpu")
    line = one_line_error(code, err)
    assert str(bad) in line and "'views' has shape" in line and "mat1" not in err


def test_eval_refuses_features_that_are_not_normalised(syn, tmp_path, run_cli):
    bad = edited(syn["features"], tmp_path, set_rows("features", lambda x: x.__imul__(10)))
    code, _, err = run_cli("eval", bad, "--zero-shot", "--device", "cpu")
    assert "L2 norm 10" in one_line_error(code, err)


# --- model configs: preprocessing values open_clip does not accept --------------------------------


def _config(tmp_path: Path, tiny_model_files, **preprocess) -> Path:
    config = json.loads(Path(tiny_model_files["config"]).read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}))
    return path


@pytest.mark.parametrize(
    ("preprocess", "message"),
    [
        (
            {"interpolation": "nearest"},
            r"preprocess_cfg interpolation 'nearest' is not one open_clip accepts",
        ),
        ({"interpolation": "Bicubic"}, r"interpolation 'Bicubic'"),
        ({"resize_mode": "crop"}, r"preprocess_cfg resize_mode 'crop' is not one open_clip accepts"),
    ],
)
def test_read_model_config_refuses_preprocessing_open_clip_rejects(
    tmp_path, tiny_model_files, preprocess, message
):
    with pytest.raises(InputError, match=message):
        read_model_config(_config(tmp_path, tiny_model_files, **preprocess))


def test_read_model_config_refuses_a_preprocess_cfg_that_is_not_an_object(tmp_path, tiny_model_files):
    path = tmp_path / "config.json"
    config = json.loads(Path(tiny_model_files["config"]).read_text())
    path.write_text(json.dumps({"model_cfg": config, "preprocess_cfg": ["bicubic"]}))
    with pytest.raises(InputError, match="preprocess_cfg must be a JSON object"):
        read_model_config(path)


def test_read_model_config_accepts_every_value_open_clip_accepts(tmp_path, tiny_model_files):
    for interpolation in ("bicubic", "bilinear", "random"):
        for resize_mode in ("shortest", "longest", "squash"):
            path = _config(tmp_path, tiny_model_files, interpolation=interpolation, resize_mode=resize_mode)
            assert read_model_config(path)["preprocess_cfg"]["resize_mode"] == resize_mode


@pytest.mark.parametrize(
    ("preprocess", "message"),
    [
        ({"mean": "0.5"}, "preprocess_cfg.mean is '0.5', not a number or a list of 3 numbers"),
        ({"std": [0.5, "0.5", 0.5]}, "preprocess_cfg.std is [0.5, '0.5', 0.5], not a number"),
        ({"mean": [0.5, True, 0.5]}, "preprocess_cfg.mean is [0.5, True, 0.5], not a number"),
        ({"std": [0.5, float("nan"), 0.5]}, "preprocess_cfg.std is [0.5, nan, 0.5], not a number"),
        ({"mean": []}, "preprocess_cfg.mean has 0 values, not 3"),
        ({"std": [0.5, 0.5]}, "preprocess_cfg.std has 2 values, not 3"),
        ({"std": [0.5, 0, 0.5]}, "preprocess_cfg.std is [0.5, 0, 0.5]: each must be above 0"),
        ({"std": -0.25}, "preprocess_cfg.std is -0.25: each must be above 0"),
    ],
)
def test_read_model_config_refuses_a_mean_or_std_images_cannot_be_normalised_with(
    tmp_path, tiny_model_files, preprocess, message
):
    """Text, a wrong length or a std of 0 reached the user as an unexpected ValueError (or RuntimeError,
    TypeError) from a DataLoader worker, mid-extraction; a negative std silently inverted the images."""
    with pytest.raises(InputError, match=re.escape(message)) as info:
        read_model_config(_config(tmp_path, tiny_model_files, **preprocess))
    assert info.value.where == str(tmp_path / "config.json")


def test_read_model_config_accepts_a_mean_and_std_open_clip_accepts(tmp_path, tiny_model_files):
    for preprocess in (
        {"mean": 0.5, "std": 0.25},
        {"mean": [0.5], "std": [1]},
        {"mean": [0, 0.5, 1], "std": [1, 2, 3]},
    ):
        assert (
            read_model_config(_config(tmp_path, tiny_model_files, **preprocess))["preprocess_cfg"]
            == preprocess
        )


@pytest.mark.parametrize(
    ("preprocess", "named"),
    [
        (
            {"interpolation": "nearest"},
            "'nearest'",
        ),  # open_clip's bare AssertionError was an unexpected error
        (
            {"mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]},
            "preprocess_cfg.std",
        ),  # a DataLoader worker's ValueError
    ],
    ids=["nearest", "zero-std"],
)
def test_extract_with_a_preprocess_open_clip_cannot_use_is_one_line(
    image_folder, tiny_model_files, tmp_path, run_cli, preprocess, named
):
    config = _config(tmp_path, tiny_model_files, **preprocess)
    code, _, err = run_cli(
        "extract", image_folder, "-o", tmp_path / "o.h5", "--model", "tiny-clip-edited", "--model-config", config,
        "--pretrained", tiny_model_files["weights"], "--device", "cpu", "--workers", "0",
    )  # fmt: skip
    line = one_line_error(code, err)
    assert str(config) in line and named in line and not (tmp_path / "o.h5").exists()


def test_a_recorded_config_with_a_zero_std_is_refused(tiny_model_files):
    config = json.loads(Path(tiny_model_files["config"]).read_text())
    record = {
        "model_name": "tiny-clip",
        "model_config": json.dumps({"model_cfg": config, "preprocess_cfg": {"std": [0, 1, 1]}}),
        "random_weights_seed": "0",
    }
    with pytest.raises(InputError, match=re.escape("model_config: preprocess_cfg.std is [0, 1, 1]")):
        load_model_from_record(record, "f.h5", device="cpu")


def test_only_paths_reads_those_rows_in_file_order_in_small_blocks(tiny_features, monkeypatch):
    import promptcli.io.features as features

    full = read_features(tiny_features)
    wanted = [full.paths[7], full.paths[2], "not/in/the/file.png", full.paths[11]]
    original = features._float_rows
    monkeypatch.setattr(features, "_float_rows", lambda ds, keep: original(ds, keep, block_bytes=1))
    part = read_features(tiny_features, only_paths=wanted)
    assert part.paths == [full.paths[i] for i in (2, 7, 11)]
    np.testing.assert_array_equal(part.features, full.features[[2, 7, 11]])
    np.testing.assert_array_equal(part.views, full.views[[2, 7, 11]])
    np.testing.assert_array_equal(part.labels, full.labels[[2, 7, 11]])
    assert part.classnames == full.classnames and part.attrs == full.attrs


def _replace_features(path: Path, edit: str) -> None:
    """Change ``path`` as another command would: a new file renamed over it (extract --force), or a write in place."""
    if edit == "renamed over":
        other = path.with_name("other.h5")
        shutil.copy(path, other)
        with h5py.File(other, "a") as f:
            f["features"][...] = f["features"][...][::-1]
        other.replace(path)
    else:  # bytes written back in place (h5py cannot reopen a file this process reads), a clock tick later
        time.sleep(0.05)
        with open(path, "r+b") as handle:
            start = handle.read(64)
            handle.seek(0)
            handle.write(start)


@pytest.mark.parametrize("edit", ["renamed over", "written in place"])
@pytest.mark.parametrize("when", ["before the blocks", "while they are read"])
def test_blocks_of_a_file_changed_since_its_index_are_refused(base, tmp_path, edit, when):
    """eval and zero-shot pseudolabel read the index, load the model, then the values: a file rewritten meanwhile
    (extract --force renames into place) would give one file's labels another's rows: a wrong metric, exit 0."""
    path = tmp_path / "f.h5"
    shutil.copy(base, path)
    index = read_feature_index(path)
    blocks = iter_blocks(path, row_blocks(len(index), 5), index.stamp)
    if when == "while they are read":
        next(blocks)
    _replace_features(path, edit)
    with pytest.raises(InputError, match="changed while it was read") as info:
        list(blocks)
    assert str(path) in str(info.value)
    fresh = read_feature_index(path)  # read again, it is a file like any other
    assert len(list(iter_blocks(path, row_blocks(len(fresh), 5), fresh.stamp))) == len(
        row_blocks(len(fresh), 5)
    )


def test_an_unreadable_chunk_is_one_input_error_naming_the_file(base, tmp_path):
    """A damaged compressed chunk raises OSError inside h5py; every reader turns it into a one-line error."""
    path = tmp_path / "gz.h5"
    shutil.copy(base, path)
    with h5py.File(path, "a") as f:
        values = f["features"][...]
        del f["features"]
        f.create_dataset("features", data=values, chunks=(4, values.shape[1]), compression="gzip")
    with h5py.File(path, "r") as f:
        offset = f["features"].id.get_chunk_info(1).byte_offset
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * 16)
    index = read_feature_index(path)
    for read in (
        lambda: read_features(path, load_views=False),
        lambda: list(iter_blocks(path, row_blocks(len(index), 5), index.stamp)),
        lambda: read_features(path, load_views=False, only_paths=index.paths[4:6]),
    ):
        with pytest.raises(InputError, match="cannot read dataset 'features'") as info:
            read()
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_bad_row_among_the_kept_ones_is_named_by_its_file_row(base, tmp_path):
    """tune, clean and corrupt --confusion-from read only their labels' rows: the error names the file's row 7, not
    the second kept row."""

    def nan_row_7(f):
        f["features"][7] = np.nan

    path = edited(base, tmp_path, nan_row_7)
    paths = read_feature_index(path).paths
    with pytest.raises(InputError, match=rf"row 7 \({paths[7]}\) are not finite"):
        read_features(path, only_paths=[paths[2], paths[7]])
    index = read_feature_index(path)
    with pytest.raises(InputError, match=rf"row 7 \({paths[7]}\) are not finite"):
        list(iter_blocks(path, row_blocks(len(index), 5), index.stamp))


# Damaged bytes. The reader runs in a child process: in a file of the old HDF5 format a damaged B-tree or heap could
# make libhdf5 loop forever, where nothing in Python can interrupt it, so a hang must fail the test, not stall it.
READ_DAMAGED = """
import json, sys
import numpy as np
from promptcli.errors import InputError
from promptcli.io.features import iter_blocks, read_feature_index, read_features, row_blocks

base = read_features(sys.argv[1])
for path in sys.argv[2:]:
    try:
        fs, index = read_features(path), read_feature_index(path)
        blocks = [rows for _, rows in iter_blocks(path, row_blocks(len(index), 5), index.stamp)]
        same = all(np.array_equal(getattr(fs, k), getattr(base, k)) for k in ("features", "views", "labels"))
        same = same and np.array_equal(np.concatenate(blocks), base.features) and all(
            getattr(fs, k) == getattr(base, k) == getattr(index, k) for k in ("paths", "splits", "classnames")
        )
        outcome = "read" if same and fs.attrs == base.attrs else "read, wrong"
    except InputError as exc:
        outcome = "error" if path in str(exc) and "\\n" not in str(exc) else f"error not one line naming it: {exc}"
    except Exception as exc:
        outcome = f"crashed: {type(exc).__name__}: {exc}"
    print(json.dumps([path, outcome]), flush=True)
"""


def _read_damaged(base: Path, damaged: dict[str, Path]) -> dict[str, str]:
    """How the reader ends on each damaged copy: 'error' (one line naming the file), 'read' (the same content as
    ``base``), or what went wrong; a reader that does not end fails the test."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", READ_DAMAGED, str(base), *map(str, damaged.values())],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired as exc:
        done = [json.loads(line)[0] for line in (exc.stdout or b"").decode().splitlines()]
        hung = next(name for name, path in damaged.items() if str(path) not in done)
        pytest.fail(f"the reader hung on {hung}")
    assert proc.returncode == 0, proc.stderr
    outcomes = dict(json.loads(line) for line in proc.stdout.splitlines())
    return {name: outcomes[str(path)] for name, path in damaged.items()}


def _flipped(base: Path, folder: Path, name: str, offset: int, xor: int = 0xFF) -> Path:
    data = bytearray(base.read_bytes())
    data[offset] ^= xor
    path = folder / f"{name}.h5"
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_metadata_byte_is_one_line_error_naming_the_file(base, tmp_path):
    """Superblock, root group (its attributes) and each dataset's object header: the file format the writer uses
    checksums them, so libhdf5 reports the damage instead of following it."""
    with h5py.File(base, "r") as f:
        headers = {name: h5py.h5o.get_info(f[name].id).addr for name in ("/", *f)}
    offsets = {f"superblock+{i}": i for i in range(9, 48, 3)}
    for name, addr in headers.items():
        offsets.update({f"{name} header+{i}": addr + i for i in range(4, 200, 13)})
    damaged = {
        name: _flipped(base, tmp_path, f"d{k}", offset) for k, (name, offset) in enumerate(offsets.items())
    }
    outcomes = _read_damaged(base, damaged)
    assert {name: o for name, o in outcomes.items() if o != "error"} == {}


def test_a_damaged_data_byte_is_one_line_error_naming_the_file(base, tmp_path):
    """A feature, view or path byte (Fletcher-32 checksum of each chunk, also when only some rows are read) and a
    label (the index checksum): read silently before, as a slightly different row, path or class."""
    with h5py.File(base, "r") as f:
        chunks = {name: f[name].id.get_chunk_info(0).byte_offset for name in ("features", "views")}
        chunks["paths"] = f["paths"].id.get_chunk_info(0).byte_offset
        labels = f["labels"].id.get_offset()
    damaged = {
        "a feature value": _flipped(base, tmp_path, "feature", chunks["features"] + 5, 0x01),
        "a view value": _flipped(base, tmp_path, "view", chunks["views"] + 40, 0x01),
        "a path's text": _flipped(base, tmp_path, "path", chunks["paths"] + 3, 0x01),
        "a label": _flipped(base, tmp_path, "label", labels + 8 * 4, 0x01),  # row 4: class 1 -> 0
    }
    assert _read_damaged(base, damaged) == dict.fromkeys(damaged, "error")
    with pytest.raises(InputError, match="cannot read dataset 'features'"):
        read_features(damaged["a feature value"], only_paths=["cat/000.png"])
    with pytest.raises(InputError, match=f"checksum recorded in attribute {INDEX_DIGEST} does not match"):
        read_feature_index(damaged["a label"])


def test_files_of_the_old_layout_still_read(base, tmp_path):
    """Files of format_version 1, as promptcli wrote them before the checksums: HDF5's default file format,
    variable-length strings (datasets and attributes), no Fletcher-32, no index checksum."""
    old = tmp_path / "old.h5"
    with h5py.File(base, "r") as f, h5py.File(old, "w") as g:
        for key, value in f.attrs.items():
            if key != INDEX_DIGEST:
                g.attrs[key] = value.decode() if isinstance(value, bytes) else value
        g.attrs["format_version"] = 1
        for name in f:
            ds = f[name]
            if ds.dtype.kind == "S":
                g.create_dataset(name, data=ds[...].astype(object), dtype=h5py.string_dtype())
            else:
                g.create_dataset(name, data=ds[...], dtype=ds.dtype, chunks=ds.chunks)
    with h5py.File(old, "r") as g:
        assert g.id.get_create_plist().get_version()[0] == 0 and not g["features"].fletcher32  # superblock v0
        assert h5py.check_vlen_dtype(g["paths"].dtype) is str and isinstance(g.attrs["format"], str)
    new, got = read_features(base), read_features(old)
    for name in ("features", "views", "labels"):
        np.testing.assert_array_equal(getattr(got, name), getattr(new, name))
    assert (got.paths, got.classnames) == (new.paths, new.classnames)
    assert got.attrs == {k: v for k, v in new.attrs.items() if k != INDEX_DIGEST} | {"format_version": 1}


@pytest.mark.parametrize("where", ["attribute", "dataset type"])
def test_h5py_type_and_value_errors_on_damaged_metadata_are_one_line(base, monkeypatch, where):
    """In the old file format (no checksums), a damaged attribute charset made h5py raise TypeError ('Unknown string
    encoding'), a damaged float type ValueError ('Insufficient precision'): they crashed every command."""

    def broken(*args, **kwargs):
        raise (
            TypeError("Unknown string encoding (value 14)")
            if where == "attribute"
            else ValueError("bad type")
        )

    if where == "attribute":
        monkeypatch.setattr(h5py.AttributeManager, "__getitem__", broken)
    else:
        monkeypatch.setattr(h5py.Dataset, "dtype", property(broken))
    for read in (read_features, read_feature_index):
        with pytest.raises(
            InputError, match=r"cannot read its attributes|dataset 'features' cannot be opened"
        ) as info:
            read(base)
        assert str(base) in str(info.value) and "\n" not in str(info.value)
