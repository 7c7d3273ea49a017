"""Issue 18, library half: nothing silently wrong, every bad input a one-line error (exit 2), no lost data.

Each test feeds one kind of bad input (or fault) and checks the refusal, or the faithful result.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_synthetic_features
from promptcli.errors import InputError, RuntimeFailure
from promptcli.extraction.decode import DecodeError, decode_rgb, to_rgb
from promptcli.io.features import read_features
from promptcli.io.fileio import check_distinct, check_output_path, output_lock
from promptcli.io.image_sources import read_classnames, read_image_csv, read_image_folder
from promptcli.io.labels import read_labels
from promptcli.io.prompt_files import read_prompt, save_prompt
from promptcli.io.sidecar import read_noise_sidecar
from promptcli.models.loading import load_model, load_model_from_record

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["cat", "dog", "car"]
PER_CLASS = 6


@pytest.fixture(scope="module")
def syn(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """A separable 3-class features file made 'with' the tiny model, and its labels CSV."""
    folder = tmp_path_factory.mktemp("reliability")
    features = folder / "syn.h5"
    _, y, paths = write_synthetic_features(features, tiny_model, CLASSES, PER_CLASS, 0.3)
    labels = folder / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p},{CLASSES[c]}\n" for p, c in zip(paths, y)))
    return {"features": features, "labels": labels, "paths": paths, "y": y}


def one_line_error(code: int, err: str, expected_code: int = 2) -> str:
    """The CLI's error: the expected exit code and one 'Error:' line, no traceback."""
    lines = [line for line in err.strip().splitlines() if line.startswith("Error:")]
    assert code == expected_code, err
    assert len(lines) == 1 and "Traceback" not in err and "unexpected" not in err, err
    return lines[0]


# --- NaN / inf and out-of-range values in a features file ----------------------------------------


def test_non_finite_features_are_refused_naming_the_row(syn, tmp_path, run_cli):
    bad = tmp_path / "nan.h5"
    shutil.copy(syn["features"], bad)
    with h5py.File(bad, "a") as f:
        f["features"][4, 3] = np.nan
    with pytest.raises(InputError, match=r"row 4 \(img004.png\) are not finite"):
        read_features(bad)
    line = one_line_error(
        *run_cli("tune", bad, syn["labels"], "-o", tmp_path / "p.st", "--device", "cpu")[::2]
    )
    assert "nan.h5" in line and "img004.png" in line
    shutil.copy(syn["features"], bad)
    with h5py.File(bad, "a") as f:
        f["views"][2, 1, 0] = np.inf
    with pytest.raises(InputError, match=r"augmented views of row 2 \(img002.png\)"):
        read_features(bad)
    read_features(bad, load_views=False)  # commands that do not use the views still read the file


def test_out_of_range_label_index_is_refused(syn, tmp_path, run_cli):
    bad = tmp_path / "label.h5"
    shutil.copy(syn["features"], bad)
    with h5py.File(bad, "a") as f:
        f["labels"][5] = len(CLASSES)
    with pytest.raises(InputError, match=r"label index 3 of row 5 \(img005.png\) is out of range"):
        read_features(bad)
    one_line_error(*run_cli("eval", bad, "--zero-shot", "--device", "cpu")[::2])


# --- training: non-finite options and divergence -----------------------------------------------


@pytest.mark.parametrize("option", [("--lr", "inf"), ("--lr", "nan"), ("--init-std", "nan"), ("--q", "inf")])
def test_non_finite_options_are_refused_up_front(syn, tmp_path, run_cli, option):
    code, _, err = run_cli("tune", syn["features"], syn["labels"], "-o", tmp_path / "p.st", *option)
    assert one_line_error(code, err).startswith(f"Error: {option[0]}: must be a finite number")


def test_divergence_stops_training_and_saves_nothing(syn, tmp_path, run_cli):
    out = tmp_path / "p.safetensors"
    code, _, err = run_cli(
        "tune", syn["features"], syn["labels"], "-o", out, "--lr", "1e30", "--warmup-epochs", "0",
        "--epochs", "3", "--n-ctx", "2", "--device", "cpu",
    )  # fmt: skip
    line = one_line_error(code, err, expected_code=1)
    assert "training diverged at epoch 1" in line and "not finite" in line and "lower --lr" in line
    assert not out.exists()


@pytest.mark.parametrize(("loss", "what"), [("ce", "loss exploded"), ("gce", "largest logit exploded")])
def test_finite_divergence_stops_training_and_saves_nothing(syn, tmp_path, run_cli, loss, what):
    """A linear head at a huge learning rate: weights of 1e20+ stay finite, so only the size of the
    loss (cross-entropy) or of the logits (GCE, whose loss is bounded) tells the run diverged."""
    out = tmp_path / "p.safetensors"
    code, _, err = run_cli(
        "tune", syn["features"], syn["labels"], "-o", out, "--method", "classifier-zs", "--loss", loss,
        "--lr", "1e6", "--warmup-epochs", "0", "--epochs", "3", "--device", "cpu",
    )  # fmt: skip
    line = one_line_error(code, err, expected_code=1)
    assert "training diverged at epoch" in line and what in line and "lower --lr" in line
    assert not out.exists()


def test_divergence_limits_leave_ordinary_runs_alone():
    from promptcli.io.checks import DIVERGED_LOGIT, Suspect, check_step

    lr = [Suspect("--lr", "a lower --lr")]
    check_step(2.3 * 999, DIVERGED_LOGIT, 10, 1, 1, lr)  # just under both limits
    with pytest.raises(RuntimeFailure, match="the loss exploded"):
        check_step(2.31 * 1000, 1.0, 10, 1, 1, lr)
    with pytest.raises(RuntimeFailure, match="the largest logit is not finite"):
        check_step(1.0, float("nan"), 10, 1, 1, lr)


@pytest.mark.parametrize(
    ("args", "where", "fixes"),
    [
        # diverged in the warm-up: --lr was never used, --warmup-lr was
        (
            ["--lr", "1e-3", "--warmup-epochs", "1", "--warmup-lr", "1e6"],
            "--warmup-lr",
            ["a lower --warmup-lr (this run used 1e+06)"],
        ),
        # an ordinary --lr with a weight decay whose own step overshoots zero
        (
            ["--lr", "1", "--warmup-epochs", "0", "--weight-decay", "1e4"],
            "--lr, --weight-decay",
            ["a lower --lr (this run used 1)", "a lower --weight-decay (lr x weight decay = "],
        ),
    ],
    ids=["warmup-lr", "weight-decay"],
)
def test_divergence_names_the_options_that_can_cause_it(syn, tmp_path, run_cli, args, where, fixes):
    """The error blamed --lr alone, also for a run that diverged in its warm-up (at --warmup-lr: found at the
    first step after it) or through its weight decay."""
    out = tmp_path / "p.safetensors"
    code, _, err = run_cli(
        "tune", syn["features"], syn["labels"], "-o", out, "--method", "classifier-zs", "--epochs", "3",
        *args, "--device", "cpu",
    )  # fmt: skip
    line = one_line_error(code, err, expected_code=1)
    assert line.startswith(f"Error: {where}: training diverged at epoch "), line
    assert all(fix in line for fix in fixes), line
    assert not out.exists()


def test_a_huge_init_std_is_blamed_for_the_divergence(syn, tmp_path, run_cli):
    """A random context of std 1e30 overflows in the first text pass: the error blamed --warmup-lr."""
    out = tmp_path / "p.safetensors"
    code, _, err = run_cli(
        "tune", syn["features"], syn["labels"], "-o", out, "--init-std", "1e30", "--epochs", "2", "--n-ctx", "2",
        "--device", "cpu",
    )  # fmt: skip
    line = one_line_error(code, err, expected_code=1)
    assert line.startswith("Error: --init-std, --warmup-lr: training diverged at epoch 1"), line
    assert "a smaller --init-std (this run used 1e+30; CoOp uses 0.02)" in line, line
    assert not out.exists()


def test_divergence_suspects_apply_to_the_run():
    from promptcli.io.checks import divergence_error
    from promptcli.learning.divergence import divergence_suspects, fp16_suspect
    from promptcli.learning.losses import make_loss
    from promptcli.learning.options import OptimConfig

    config = OptimConfig(lr=0.002, warmup_epochs=1, weight_decay=5e-4)
    fp16 = fp16_suspect("--no-amp", "--no-amp")
    options = [s.option for s in divergence_suspects(config, 1, make_loss("gce", q=0.1), None, fp16)]
    assert options == ["--lr", "--no-amp"]  # GCE's q never scales a step past cross-entropy's
    assert [s.option for s in divergence_suspects(config, 0, make_loss("sce"))] == [
        "--warmup-lr",
        "--alpha/--beta",
    ]
    suspects = divergence_suspects(config, 1, make_loss("ce"), None, fp16)
    assert "--no-amp" in divergence_error(1, 2, suspects, "loss", float("nan")).where
    assert divergence_error(1, 2, suspects, "loss", 1e9).where == "--lr"  # fp16 does not explode finitely


def test_a_non_finite_prompt_is_never_written_nor_read(tmp_path):
    out = tmp_path / "p.safetensors"
    with pytest.raises(RuntimeFailure, match="'ctx' holds NaN or inf"):
        save_prompt(out, {"ctx": torch.tensor([1.0, float("nan")])}, {"method": "coop"})
    assert not out.exists() and not list(tmp_path.iterdir())
    from safetensors.torch import save_file

    from promptcli.io.prompt_files import encode_metadata

    save_file({"ctx": torch.tensor([float("inf")])}, str(out), metadata=encode_metadata({"method": "coop"}))
    with pytest.raises(InputError, match="'ctx' holds NaN or inf"):
        read_prompt(out)


def test_a_prompt_tensor_of_integer_type_is_refused(tmp_path):
    """An integer ``ctx`` (an edited or converted file) was copied into the float prompt as its truncated values
    and evaluated: a wrong result, exit 0."""
    from safetensors.torch import save_file

    from promptcli.io.prompt_files import encode_metadata

    meta = encode_metadata({"method": "coop", "classnames": ["a", "b"]})
    path = tmp_path / "p.safetensors"
    for dtype in (torch.int64, torch.bool):
        save_file({"ctx": torch.ones(2, 4, dtype=dtype)}, str(path), metadata=meta)
        with pytest.raises(InputError, match="tensor 'ctx' has type .*, not floating point"):
            read_prompt(path)
    save_file({"ctx": torch.ones(2, 4, dtype=torch.bfloat16)}, str(path), metadata=meta)
    assert read_prompt(path).tensors["ctx"].dtype == torch.bfloat16  # any float type reads
    save_file({"keys": torch.ones(2, 4), "cache_labels": torch.tensor([0, 1])}, str(path), metadata=meta)
    assert read_prompt(path).tensors["cache_labels"].dtype == torch.int64  # tip-adapter's labels are integers


def test_damaged_prompt_metadata_is_an_input_error(tmp_path):
    from safetensors.torch import save_file

    from promptcli.io.prompt_files import encode_metadata

    good = encode_metadata({"method": "coop", "classnames": ["a", "b"]})
    for key, value in (("classnames", "[broken"), ("format_version", "x"), ("json_keys", "{")):
        path = tmp_path / f"{key}.safetensors"
        save_file({"ctx": torch.zeros(2)}, str(path), metadata={**good, key: value})
        with pytest.raises(InputError, match=f"damaged metadata entry '{key}'"):
            read_prompt(path)


# --- image decoding: every PIL mode, faithfully, and decompression bombs ------------------------


def _img(mode: str, size=(2, 1), **kw) -> Image.Image:
    return Image.new(mode, size, **kw)


def _grey16(values: list[int], mode: str = "I;16") -> Image.Image:
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, (len(values), 1), np.array(values, dtype=dtype).tobytes())


def _palette(transparent: bool) -> Image.Image:
    img = Image.new("P", (2, 1))
    img.putpalette([200, 10, 20, 0, 0, 255])
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    if transparent:
        img.info["transparency"] = 1  # palette entry 1 is fully transparent
    return img


MODES = {
    "1": (Image.frombytes("1", (2, 1), bytes([0b01000000])), [(0, 0, 0), (255, 255, 255)]),
    "L": (_img("L", color=77), [(77, 77, 77)] * 2),
    "I;16": (_grey16([20000, 65535]), [(78, 78, 78), (255, 255, 255)]),  # 20000 / 257 = 77.8
    "I;16B": (_grey16([257 * 9, 0], "I;16B"), [(9, 9, 9), (0, 0, 0)]),
    "I": (Image.fromarray(np.array([[25700, 65535]], dtype=np.int32)), [(100, 100, 100), (255, 255, 255)]),
    "F in [0, 1]": (Image.fromarray(np.array([[0.25, 1.0]], dtype=np.float32)), [(64, 64, 64), (255,) * 3]),
    "F in [0, 255]": (Image.fromarray(np.array([[100.0, 2.0]], dtype=np.float32)), [(100,) * 3, (2,) * 3]),
    "P": (_palette(False), [(200, 10, 20), (0, 0, 255)]),
    "P + transparency": (_palette(True), [(200, 10, 20), (255, 255, 255)]),
    "LA": (
        Image.merge("LA", [_img("L", color=40), Image.frombytes("L", (2, 1), bytes([255, 0]))]),
        [(40, 40, 40), (255, 255, 255)],
    ),  # fmt: skip
    "RGBA half": (_img("RGBA", color=(255, 0, 0, 128)), [(255, 127, 127)] * 2),
    "CMYK": (_img("CMYK", color=(0, 255, 255, 0)), [(255, 0, 0)] * 2),
    "CMYK grey": (_img("CMYK", color=(0, 0, 0, 128)), [(127, 127, 127)] * 2),
    "RGB": (_img("RGB", color=(1, 2, 3)), [(1, 2, 3)] * 2),
}


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_decodes_to_the_expected_rgb(name):
    img, expected = MODES[name]
    rgb = to_rgb(img)
    assert rgb.mode == "RGB"
    got = [rgb.getpixel((x, 0)) for x in range(img.size[0])]
    assert np.abs(np.array(got, dtype=int) - np.array(expected)).max() <= 1, (got, expected)


@pytest.mark.parametrize(
    "img, why",
    [
        (Image.fromarray(np.array([[70000, 1]], dtype=np.int32)), "only 16-bit values"),
        (Image.fromarray(np.array([[-1.0, 0.5]], dtype=np.float32)), "neither"),
        (Image.fromarray(np.array([[300.0, 0.5]], dtype=np.float32)), "neither"),
        (Image.fromarray(np.array([[np.nan, 0.5]], dtype=np.float32)), "NaN"),
        (Image.new("LAB", (2, 1)), "mode LAB is not supported"),
    ],
)
def test_modes_without_a_faithful_rgb_are_refused(img, why):
    with pytest.raises(DecodeError, match=why):
        to_rgb(img)


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.full((3, 3), 20000, dtype=np.uint16)).save(path)
    assert Image.open(path).convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # what PIL alone gives
    assert decode_rgb(path).getpixel((0, 0)) == (78, 78, 78)


def _png(size: tuple[int, int], depth: int, colour_type: int, rows: list[bytes], trns: bytes) -> bytes:
    """A PNG file written by hand (PIL cannot write low-bit or 16-bit grey or RGB with a tRNS colour)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", *size, depth, colour_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\0" + row for row in rows))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"tRNS", trns)
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )


W = (255, 255, 255)  # the background transparent pixels become


@pytest.mark.parametrize(
    "depth, colour_type, row, trns, expected",
    [
        (1, 0, bytes([0b01000000]), b"\0\0", [W, (255,) * 3]),  # 1-bit grey, black transparent
        (2, 0, bytes([0b00011011]), b"\0\1", [(0,) * 3, W, (170,) * 3, (255,) * 3]),  # raw 1 is PIL's 85
        (16, 0, np.array([0, 300, 25700], ">u2").tobytes(), b"\0\0", [W, (1,) * 3, (100,) * 3]),
        (8, 2, bytes([0, 0, 0, 9, 9, 9]), b"\0\x09\0\x09\0\x09", [(0,) * 3, W]),
    ],
)
def test_a_png_transparent_colour_is_matched_at_the_files_bit_depth(
    tmp_path, depth, colour_type, row, trns, expected
):
    path = tmp_path / "t.png"
    path.write_bytes(_png((len(expected), 1), depth, colour_type, [row], trns))
    rgb = decode_rgb(path)
    assert [rgb.getpixel((x, 0)) for x in range(len(expected))] == expected


def test_a_16_bit_rgb_png_with_a_transparent_colour_is_refused(tmp_path):
    # PIL reads it at 8 bits with the key at 16: (0, 0, 200) read as (0, 0, 0) matched the key (0, 0, 0)
    path = tmp_path / "t.png"
    path.write_bytes(_png((2, 1), 16, 2, [np.array([0, 0, 0, 0, 0, 200], ">u2").tobytes()], bytes(6)))
    with pytest.raises(DecodeError, match="16-bit RGB PNG with a transparent colour"):
        decode_rgb(path)


def test_decompression_bombs_are_one_clear_error(tmp_path, monkeypatch, run_cli, cli_model_args):
    path = tmp_path / "big.png"
    Image.new("L", (100, 80)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL DecompressionBombWarning either way
        with pytest.raises(DecodeError, match="100x80 = 8000 pixels is over the 7999-pixel"):
            decode_rgb(path, max_pixels=7999)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone would raise (> 2x its limit)
        assert decode_rgb(path, max_pixels=8000).size == (100, 80)
        assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    folder = tmp_path / "imgs" / "cls"
    folder.mkdir(parents=True)
    shutil.copy(path, folder / "big.png")
    code, _, err = run_cli(
        "extract",
        tmp_path / "imgs",
        "-o",
        tmp_path / "f.h5",
        *cli_model_args,
        "--workers",
        "0",
        "--max-pixels",
        "5000",
    )
    line = one_line_error(code, err)
    assert "big.png" in line and "--max-pixels" in line


# --- duplicate paths, class-name collisions, encodings ------------------------------------------


def test_duplicate_label_rows_are_refused_naming_both_lines(tmp_path):
    conflict = tmp_path / "conflict.csv"
    conflict.write_text("path,label\na.png,cat\nb.png,dog\na.png,dog\n")
    with pytest.raises(
        InputError,
        match=r"'a.png' is listed twice with different labels \('cat' on line 2, 'dog' on line 4\)",
    ):
        read_labels(conflict)
    same = tmp_path / "same.csv"
    same.write_text("path,label\na.png,cat\na.png,cat\n")
    with pytest.raises(InputError, match=r"'a.png' is listed twice \(lines 2 and 3\)"):
        read_labels(same)


def test_duplicate_image_list_rows_are_refused(tmp_path):
    images = tmp_path / "list.csv"
    images.write_text("path,label\nx/a.png,cat\nx/./a.png,dog\n")
    with pytest.raises(InputError, match="listed twice with different labels"):
        read_image_csv(images)


@pytest.mark.parametrize(
    "folders, why",
    [(["x_y", "x y"], "both give the class name 'x y'"), (["_", "cat"], "'_' gives an empty class name")],
)
def test_colliding_or_empty_folder_class_names_are_refused(tmp_path, folders, why):
    for name in folders:
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / name / "a.png")
    with pytest.raises(InputError, match=why):
        read_image_folder(tmp_path)


def test_corrupt_refuses_an_empty_label_as_a_class(tmp_path, run_cli):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.png,cat\nb.png,\nc.png,dog\n")
    line = one_line_error(*run_cli("corrupt", labels, "-o", tmp_path / "n.csv", "--rate", "0.2")[::2])
    assert "labels.csv:3: empty label" in line


def test_class_lists_accept_a_bom_and_refuse_other_encodings(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffcat\ndog\n".encode())
    assert read_classnames(bom) == ["cat", "dog"]
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\ndog\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_classnames(latin)


def test_labels_on_stdin_may_start_with_a_bom(monkeypatch):
    data = "\ufeffpath,label\na.png,cat\n".encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    table = read_labels("-")
    assert table.columns == ["path", "label"] and table.rows == [{"path": "a.png", "label": "cat"}]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "path,label\na.png,cat\nb.png\n",
            ":3: row has 1 fields, the header 2",
        ),  # its label was read as none
        ("path,label,split\na.png,cat,train\nb.png,cat\n", ":3: row has 2 fields, the header 3"),
        ('path,label\n"a.png,cat\nb.png,cat\n', ":2: row has 1 fields, the header 2"),  # unterminated quote
        ("path,label\n\n\na.png,cat\nb\x00.png,cat\n", ":5: path 'b\\x00.png' holds a NUL character"),
    ],
)
def test_image_list_rows_that_do_not_fit_the_header_are_refused(tmp_path, text, message):
    images = tmp_path / "list.csv"
    images.write_text(text)
    with pytest.raises(InputError, match=re.escape(message)):
        read_image_csv(images)


def test_image_list_reads_as_a_labels_csv_does(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    images = tmp_path / "list.csv"
    images.write_text("path , label,,\n\na.png,cat,,\nb.png,dog\n")  # spaced names, unnamed empty cells
    source = read_image_csv(images)
    assert source.paths == ["a.png", "b.png"] and source.labels == [0, 1]
    images.write_text("path\na.png\n\n\n./a.png\n")
    with pytest.raises(InputError, match=re.escape("(lines 2 and 5)")):
        read_image_csv(images)


def test_label_rows_are_named_by_their_line(tmp_path, syn):
    """Blank lines and quoted newlines move the rows: messages name the line a row is on, not its index + 2."""
    fs = read_features(syn["features"], load_views=False)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        f'path,label,note\n\n{fs.paths[0]},{fs.classnames[0]},"two\nlines"\n\nnot-there.png,x,\n'
    )
    from promptcli.io.labels import join_labels

    with pytest.raises(InputError) as err:
        join_labels(fs, read_labels(labels))
    assert err.value.where == f"{labels}:6"
    labels.write_text(f"path,label\n\n{fs.paths[0]},{fs.classnames[0]}\n\n{fs.paths[0]},{fs.classnames[0]}\n")
    with pytest.raises(InputError, match=re.escape("(lines 3 and 5)")):
        read_labels(labels)


def test_a_csv_field_over_the_csv_limit_is_an_input_error(tmp_path):
    big = tmp_path / "big.csv"
    big.write_text("path,label\n" + "a" * 200_000 + ",cat\n")
    with pytest.raises(InputError, match="field larger than field limit"):
        read_labels(big)


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_out_of_range_seeds_are_refused(tmp_path, run_cli, seed):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.png,cat\nb.png,dog\n")
    line = one_line_error(
        *run_cli("corrupt", labels, "-o", tmp_path / "n.csv", "--rate", "0.5", "--seed", seed)[::2]
    )
    assert line.startswith("Error: --seed: must be in 0..4294967295")


def test_huge_counts_are_refused_not_overflowed(tmp_path, run_cli, image_folder, cli_model_args):
    huge = "99999999999999999999"
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.png,cat\nb.png,dog\n")
    line = one_line_error(
        *run_cli("corrupt", labels, "-o", tmp_path / "n.csv", "--rate", "0.5", "--shots", huge)[::2]
    )
    assert line.startswith("Error: --shots: must be <= 2147483647")
    for option in ("--views", "--chunk-size", "--batch-size"):
        code, _, err = run_cli(
            "extract", image_folder, "-o", tmp_path / "f.h5", *cli_model_args, option, huge
        )
        assert one_line_error(code, err).startswith(f"Error: {option}: must be <=")


# --- model weights: no silent random weights; bad checkpoints ----------------------------------


def test_a_model_without_weights_is_refused_unless_random_weights(tiny_model_files):
    config = tiny_model_files["config"]
    with pytest.raises(InputError, match="no weights given for tiny-clip"):
        load_model("tiny-clip", None, config, device="cpu")
    a = load_model("tiny-clip", None, config, device="cpu", random_weights=True, seed=3)
    b = load_model("tiny-clip", None, config, device="cpu", random_weights=True, seed=3)
    c = load_model("tiny-clip", None, config, device="cpu", random_weights=True, seed=4)
    assert a.checkpoint_sha256 == b.checkpoint_sha256 != c.checkpoint_sha256
    assert torch.equal(a.model.text_projection, b.model.text_projection)
    record = a.record()
    assert record["random_weights_seed"] == "3" and record["pretrained"] == ""
    again = load_model_from_record(record, source="f.h5", device="cpu")  # the same text weights later
    assert again.checkpoint_sha256 == a.checkpoint_sha256
    assert torch.equal(again.model.text_projection, a.model.text_projection)
    with pytest.raises(InputError, match="records no model weights"):
        load_model_from_record({**record, "random_weights_seed": ""}, source="f.h5", device="cpu")


def test_extract_records_random_weights_and_eval_rebuilds_them(
    tiny_model_files, image_folder, tmp_path, run_cli
):
    base = ["--model", "tiny-clip", "--model-config", tiny_model_files["config"], "--device", "cpu"]
    out = tmp_path / "f.h5"
    line = one_line_error(*run_cli("extract", image_folder, "-o", out, *base, "--workers", "0")[::2])
    assert "--random-weights" in line and not out.exists()
    code, _, err = run_cli(
        "extract", image_folder, "-o", out, *base, "--workers", "0", "--random-weights", "--seed", "5"
    )
    assert code == 0, err
    assert read_features(out).attrs["random_weights_seed"] == "5"
    code, _, err = run_cli("eval", out, "--zero-shot", "--device", "cpu", "-q")
    assert code == 0, err


def test_unreadable_checkpoints_are_input_errors(tiny_model_files, tmp_path):
    from safetensors.torch import load_file, save_file

    config, weights = tiny_model_files["config"], tiny_model_files["weights"]
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(InputError, match="not a readable checkpoint"):
        load_model("tiny-clip", str(truncated), config, device="cpu")
    state = load_file(str(weights))
    state["text_projection"] = torch.zeros(3, 3)
    wrong = tmp_path / "w.safetensors"
    save_file(state, str(wrong))
    with pytest.raises(InputError, match="does not fit the model architecture"):
        load_model("tiny-clip", str(wrong), config, device="cpu")
    pickled = tmp_path / "p.pt"
    torch.save({"state_dict": load_file(str(weights)), "extra": InputError("x")}, pickled)
    with pytest.raises(InputError, match="pickle checkpoint.*convert it"):
        load_model("tiny-clip", str(pickled), config, device="cpu")


# --- outputs: writable, distinct, never someone else's file ------------------------------------


def test_an_unwritable_output_folder_is_refused_before_work(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == tmp_path else real_access(p, m))
    with pytest.raises(InputError, match="output folder is not writable"):
        check_output_path(tmp_path / "out.csv", force=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(InputError, match="not writable"):
            check_output_path(folder / "out.csv", force=False)
    finally:
        folder.chmod(0o755)


def test_outputs_must_differ_from_inputs_and_each_other(syn, tmp_path, run_cli):
    with pytest.raises(InputError, match="-o and --log name the same file"):
        check_distinct({}, {"-o": tmp_path / "x", "--log": tmp_path / "." / "x"})
    with pytest.raises(InputError, match="output -o is the input LABELS"):
        check_distinct({"LABELS": syn["labels"]}, {"-o": syn["labels"]})
    check_distinct({"LABELS": "-"}, {"-o": "-", "--log": None})  # stdin in, stdout out: fine
    x = tmp_path / "x"
    line = one_line_error(*run_cli("tune", syn["features"], syn["labels"], "-o", x, "--log", x)[::2])
    assert "-o and --log name the same file" in line
    line = one_line_error(*run_cli("eval", syn["features"], "--zero-shot", "-o", x, "--predictions", x)[::2])
    assert "--predictions and -o name the same file" in line
    line = one_line_error(
        *run_cli("tune", syn["features"], syn["labels"], "-o", syn["labels"], "--force", "--device", "cpu")[
            ::2
        ]
    )
    assert "is the input LABELS" in line


def test_resume_never_overwrites_a_log_of_another_run(syn, tmp_path, run_cli):
    log = tmp_path / "notes.jsonl"
    log.write_text("my own notes\n")
    args = ["tune", syn["features"], syn["labels"], "-o", tmp_path / "p.st", "--epochs", "1", "--n-ctx", "2"]
    line = one_line_error(*run_cli(*args, "--device", "cpu", "--resume", "--log", log)[::2])
    assert "not the log of the run being resumed" in line
    assert log.read_text() == "my own notes\n"
    code, _, err = run_cli(*args, "--device", "cpu", "--resume", "--log", log, "--force")
    assert code == 0, err
    assert json.loads(log.read_text().splitlines()[0])["epoch"] == 1


def test_json_kinds_keep_bools_apart_from_numbers_and_refuse_huge_integers():
    from promptcli.io.checks import check_json_kind, is_json_kind

    assert is_json_kind(None, int) and is_json_kind(3, float) and is_json_kind(True, (bool, dict))
    assert not is_json_kind(True, int) and not is_json_kind(False, float) and not is_json_kind(1.5, int)
    assert not is_json_kind(float("nan"), float) and not is_json_kind(10**400, float)  # no OverflowError
    with pytest.raises(InputError, match=r"^f.json: a.b is 'x{36}\.\.\., not an integer or a list"):
        check_json_kind("x" * 100, (int, list), "b", "f.json", "fix it", context="a.")


def test_a_labels_sidecar_with_a_huge_integer_rate_is_refused_not_overflowed(tmp_path):
    """A rate of 400 digits (JSON reads it as a Python int) gave an OverflowError from math.isfinite."""
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n0.png,a\n")
    Path(f"{labels}.json").write_text('{"rate": 1' + "0" * 400 + "}")
    with pytest.raises(
        InputError, match="the labels' sidecar is damaged: rate is 10+\\.\\.\\., not a finite number"
    ):
        read_noise_sidecar(labels, lambda _: None)


def test_a_sidecar_of_another_csv_version_is_ignored_with_a_warning(tmp_path, run_cli):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{i}.png,{CLASSES[i % 3]}\n" for i in range(12)))
    noisy = tmp_path / "noisy.csv"
    code, _, err = run_cli("corrupt", labels, "-o", noisy, "--rate", "0.25", "-q")
    assert code == 0, err
    warnings_seen: list[str] = []
    assert read_noise_sidecar(noisy, warnings_seen.append)["rate"] == 0.25
    assert json.loads(Path(f"{noisy}.json").read_text())["csv_sha256"]
    noisy.write_text(noisy.read_text().replace(",1\n", ",0\n", 1))  # edited after corrupt wrote it
    assert read_noise_sidecar(noisy, warnings_seen.append) is None
    assert len(warnings_seen) == 1 and "describes another version" in warnings_seen[0]


def test_stdout_carries_only_data(syn, tmp_path, run_cli):
    code, out, err = run_cli("eval", syn["features"], "--zero-shot", "--predictions", "-", "--device", "cpu")
    assert code == 0, err
    assert (
        out.splitlines()[0] == "path,label,confidence,true_label"
        and len(out.splitlines()) == 1 + 3 * PER_CLASS
    )
    assert "Per-class accuracy" in err
    labels = tmp_path / "noisy.csv"
    code, _, err = run_cli("corrupt", syn["labels"], "-o", labels, "--rate", "0.2", "-q")
    assert code == 0, err
    code, out, err = run_cli(
        "gradstats", syn["features"], labels, "-o", "-", "--epochs", "1", "--n-ctx", "2", "--device", "cpu"
    )
    assert code == 0, err
    assert (
        out.splitlines()[0].startswith("epoch,step,method,")
        and "Gradient norms" in err
        and "Gradient" not in out
    )
    assert not Path("-.json").exists()


# --- concurrent writers and interruptions -------------------------------------------------------


def test_one_writer_per_output(tmp_path):
    out = tmp_path / "p.safetensors"
    started = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:").strip("[]")
    me = f"{os.getpid()} {socket.gethostname()} {started} - {namespace}"  # no Slurm job
    with output_lock(out) as lock:
        assert lock.read_text().strip() == me
        with pytest.raises(InputError, match=f"another promptcli \\(pid {os.getpid()}\\) is writing"):
            with output_lock(out):
                pass
    assert not lock.exists()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock.write_text(dead.stdout)  # a writer that was killed left its lock
    with output_lock(out):
        assert lock.read_text().strip() == me
    assert not lock.exists()
    # a writer on another host (shared filesystem) is never guessed dead
    lock.write_text(f"{dead.stdout.strip()} some-other-node\n")
    with pytest.raises(InputError, match="pid [0-9]+ on some-other-node\\) is writing"):
        with output_lock(out):
            pass
    assert lock.exists()
    lock.unlink()
    # a pid reused by another process after the writer died: that process started after the lock was taken
    other = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(f"{other.pid} {socket.gethostname()} 1\n")
        with output_lock(out):
            assert lock.read_text().strip() == me
        lock.write_text(f"{other.pid} {socket.gethostname()}\n")  # a lock without the start: still alive
        with pytest.raises(InputError, match=f"pid {other.pid}\\) is writing"):
            with output_lock(out):
                pass
    finally:
        other.kill()
        other.wait()
    # a writer in another container on this host (its own pids): never guessed dead from here
    lock.write_text(f"999999 {socket.gethostname()} 1 - 4026530000\n")
    with pytest.raises(InputError, match="pid 999999\\) is writing"):
        with output_lock(out):
            pass
    lock.write_text("")  # damaged (a lock is written whole, so an empty one is no live writer's)
    with output_lock(out):
        assert lock.read_text().strip() == me
    assert not list(tmp_path.iterdir())  # nothing left beside it


@pytest.mark.parametrize(
    "text",
    ["99999999999999999999\n", f"{2**31} some-other-node\n", "0\n", "-1\n", "garbage\n", "\xff\xfe\n"],
)
def test_a_lock_naming_no_possible_process_is_stale(tmp_path, text):
    """A huge pid overflowed os.kill (an unexpected OverflowError); 0 and -1 (a process group, every process)
    read as a live writer for good. None can be a process: the lock is damaged, so taken over."""
    out = tmp_path / "p.safetensors"
    lock = Path(f"{out}.lock")
    lock.write_bytes(text.encode("latin-1"))
    with output_lock(out):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_folder_or_fifo_in_the_way_of_the_lock_is_refused(syn, tmp_path, run_cli, kind):
    """A folder there crashed with IsADirectoryError (unlinking it as a stale lock); a FIFO hung the read."""
    out = tmp_path / "p.safetensors"
    lock = Path(f"{out}.lock")
    lock.mkdir() if kind == "folder" else os.mkfifo(lock)
    args = ("tune", syn["features"], syn["labels"], "-o", out, "--device", "cpu", "--epochs", "1")

    def hung(signum, frame):  # not an OSError, which the lock's reader takes for a damaged lock
        raise RuntimeError("the lock's reader hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        line = one_line_error(*run_cli(*args)[::2])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    what = "a folder" if kind == "folder" else "a FIFO"
    assert line.startswith(f"Error: {lock}: {what} is in the way of the output lock — move or delete it"), (
        line
    )
    assert lock.exists() and not out.exists()


def test_a_requeued_slurm_job_takes_over_the_lock_its_earlier_run_left_on_another_node(tmp_path, monkeypatch):
    """A node failure (or preemption without grace) kills a job with no cleanup; Slurm requeues it, on another
    node, under the same job id with SLURM_RESTART_COUNT one higher: the lock is its own earlier run's."""
    out = tmp_path / "p.safetensors"
    lock = Path(f"{out}.lock")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock.write_text("4242 node-a 123 slurm:77:0\n")
    with output_lock(out):
        assert lock.read_text().split()[3] == "slurm:77:1"  # pid host start job namespace
    for other in ("slurm:77:1", "slurm:78:0", "-"):  # this very run elsewhere, another job, no job: alive
        lock.write_text(f"4242 node-a 123 {other}\n")
        with pytest.raises(InputError, match="pid 4242 on node-a\\) is writing"):
            with output_lock(out):
                pass
    monkeypatch.delenv("SLURM_RESTART_COUNT")  # a first run (no restart yet) never takes over
    lock.write_text("4242 node-a 123 slurm:77:0\n")
    with pytest.raises(InputError, match="is writing"):
        with output_lock(out):
            pass


def test_finetune_holds_the_output_lock(tiny_features, noisy_labels, tmp_path):
    from promptcli.learning.finetune import FinetuneOptions, finetune
    from promptcli.learning.options import TuneOptions

    out = tmp_path / "ft.safetensors"
    with output_lock(out):
        with pytest.raises(InputError, match="is writing this output"):
            finetune(
                tiny_features,
                noisy_labels["labels"],
                out,
                TuneOptions(method="finetune", epochs=0),
                FinetuneOptions(workers=0),
                device="cpu",
            )


def test_a_second_tune_or_extract_on_one_output_is_refused(
    syn, tmp_path, run_cli, image_folder, cli_model_args
):
    out = tmp_path / "p.safetensors"
    with output_lock(out):
        line = one_line_error(
            *run_cli("tune", syn["features"], syn["labels"], "-o", out, "--device", "cpu")[::2]
        )
        assert "is writing this output" in line
    feats = tmp_path / "f.h5"
    with output_lock(feats):
        code, _, err = run_cli(
            "extract", image_folder, "-o", feats, *cli_model_args, "--workers", "0", "--resume"
        )
        assert "is writing this output" in one_line_error(code, err)
    assert not Path(f"{out}.lock").exists() and not Path(f"{feats}.lock").exists()
    log = tmp_path / "shared.jsonl"  # two runs of a sweep given one --log
    with output_lock(log, "--log"):
        args = [
            "tune",
            syn["features"],
            syn["labels"],
            "-o",
            tmp_path / "q.st",
            "--device",
            "cpu",
            "--log",
            log,
        ]
        line = one_line_error(*run_cli(*args)[::2])
        assert "is writing this --log file" in line and not log.exists()


def test_ctrl_c_says_what_was_kept_and_how_to_resume(syn, tmp_path, run_cli, monkeypatch):
    import promptcli.io.features as features

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as if Ctrl-C came while tune reads its inputs

    monkeypatch.setattr(features, "read_features", interrupted)
    code, _, err = run_cli("tune", syn["features"], syn["labels"], "-o", tmp_path / "p.st", "--device", "cpu")
    assert code == 130
    assert "no half-written output" in err and ".partial" in err and "--resume" in err
    assert not list(tmp_path.iterdir())  # nothing written, the output lock released


@pytest.mark.parametrize("debug", [False, True])
def test_an_eof_error_inside_a_command_is_no_interrupt(syn, tmp_path, run_cli, monkeypatch, debug):
    """click turns an EOFError raised in a command into Abort, as for Ctrl-C: a library's EOFError (a truncated
    pickle or npz) read "interrupted", exit 130, and a retry loop took it for a signal. It is a failure."""
    import promptcli.io.features as features

    def truncated(*args, **kwargs):
        raise EOFError("Ran out of input")  # as pickle says of a file cut short

    monkeypatch.setattr(features, "read_features", truncated)
    args = ["tune", syn["features"], syn["labels"], "-o", tmp_path / "p.st", "--device", "cpu"]
    code, _, err = run_cli(*args, *(["--debug"] if debug else []))
    assert code == 1 and "interrupted" not in err, err
    assert "Error: unexpected EOFError: Ran out of input — rerun with --debug" in err, err
    if debug:  # the traceback of the EOFError itself, down to where it was raised
        assert "Traceback" in err and "in truncated" in err and "Abort" not in err, err
    else:
        assert "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written, the output lock released


def test_a_head_with_overflowing_logits_is_neither_saved_nor_scored(syn, tmp_path, run_cli):
    """Tip-Adapter at --tip-alpha 1e38: zs + alpha x cache overflows to inf - inf = NaN."""
    out = tmp_path / "tip.safetensors"
    args = ["tune", syn["features"], syn["labels"], "-o", out, "--method", "tip-adapter", "--device", "cpu"]
    line = one_line_error(*run_cli(*args, "--tip-alpha", "1e38")[::2], expected_code=1)
    assert "non-finite logits" in line and "--tip-alpha" in line and not out.exists()
    # a file made elsewhere (or edited) that overflows is refused by eval and clean, naming it
    assert run_cli(*args)[0] == 0
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(out), framework="pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    meta["tip_alpha"] = "1e38"
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    for cmd in (["eval", syn["features"], "-p", bad], ["clean", syn["features"], syn["labels"], "-p", bad]):
        line = one_line_error(*run_cli(*cmd, "-o", tmp_path / f"{cmd[0]}.out", "--device", "cpu")[::2])
        assert "bad.safetensors" in line and "non-finite logits" in line


@pytest.mark.parametrize("seed", [1.5, "3", True, None])
def test_a_seed_that_is_not_an_integer_is_an_input_error(seed):
    from promptcli.io.checks import check_seed
    from promptcli.noise.noisy_labels import CorruptOptions, corrupt_file

    with pytest.raises(InputError, match="--seed: must be an integer"):
        check_seed(seed)
    with pytest.raises(InputError, match="--seed: must be an integer"):
        corrupt_file("never-read.h5", "never-written.csv", CorruptOptions(rate=0.2, seed=seed))
    assert check_seed(np.int64(7)) == 7  # as read back from a features file's attributes


def test_one_path_or_template_where_a_list_is_expected_counts_as_one():
    from promptcli.io.checks import one_or_many
    from promptcli.models.zeroshot import resolve_templates
    from promptcli.noise.cleaning import CleanOptions

    assert one_or_many("p.safetensors") == ["p.safetensors"] and one_or_many(Path("a")) == [Path("a")]
    assert one_or_many(None) == [] and one_or_many(("a", "b")) == ["a", "b"]
    assert resolve_templates("a photo of a {}.") == ["a photo of a {}."]  # not its characters
    options = CleanOptions(prompts="p.safetensors", templates="a {}.")
    assert options.prompts == ["p.safetensors"] and options.templates == ["a {}."]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path,label,label\na.png,cat,dog\n", "column 'label' appears twice in the header"),
        ("path,label,clean_label\na.png,cat\nb.png,dog,dog\n", ":2: row has 2 fields, the header 3"),
        ("path,label\na.png,cat\nb.png,dog,x\n", ":3: row has 3 fields, the header 2"),
        ('path,label\n"a,\nb.png",cat\nc.png,dog,x\n', ":4: row has 3 fields, the header 2"),  # physical line
    ],
)
def test_labels_csv_whose_rows_do_not_fit_the_header_is_refused(tmp_path, text, message):
    from promptcli.io.labels import read_labels

    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=re.escape(message)):
        read_labels(path)


def test_an_empty_output_name_or_device_is_an_input_error(tmp_path, run_cli):
    from promptcli.models.devices import resolve_device

    with pytest.raises(InputError, match="-o: empty file name"):
        check_output_path("", force=True)
    with pytest.raises(InputError, match="--device: unknown device ''"):
        resolve_device("")  # an unset shell variable, not "auto"
    assert str(resolve_device(None)) in ("cpu", "cuda")
    labels = tmp_path / "l.csv"
    labels.write_text("path,label,is_noisy\na.png,cat,maybe\n")
    code, _, err = run_cli("corrupt", labels, "--rate", "0.5", "-o", tmp_path / "o.csv")
    assert code == 2 and f"{labels}:2: is_noisy must be 0, 1 or blank (not known), got 'maybe'" in err


@pytest.mark.parametrize(
    "text",
    [
        "path,label\na.png,cat,\nb.png,dog,\n",  # trailing commas (spreadsheet exports)
        "path,label,,\na.png,cat,,\nb.png,dog\n",  # trailing unnamed header cells
    ],
)
def test_labels_csv_with_empty_trailing_fields_reads(tmp_path, text):
    from promptcli.io.labels import read_labels

    path = tmp_path / "labels.csv"
    path.write_text(text)
    table = read_labels(path)
    assert table.columns == ["path", "label"]
    assert table.rows == [{"path": "a.png", "label": "cat"}, {"path": "b.png", "label": "dog"}]


def test_labels_csv_with_a_value_under_no_column_name_is_refused(tmp_path):
    from promptcli.io.labels import read_labels

    path = tmp_path / "labels.csv"
    path.write_text("path,label,\na.png,cat,oops\n")
    with pytest.raises(
        InputError, match=r":2: row has 3 fields, the header 3 \(a field beyond the named columns"
    ):
        read_labels(path)
