"""`promptcli extract`: content, views, resume, bad input, overwrite protection."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import unicodedata
import zlib

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder
from promptcli.errors import InputError
from promptcli.extraction.extract import ExtractOptions, extract_features
from promptcli.io.features import read_features
from promptcli.io.image_sources import read_classnames, read_image_csv, read_image_folder, read_image_source


def _datasets(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name][...] for name in f}


def test_cli_extract_folder(run_cli, cli_model_args, image_folder, tiny_model, tmp_path):
    out = tmp_path / "f.h5"
    code, stdout, stderr = run_cli(
        "extract", image_folder, "-o", out, *cli_model_args, "--dtype", "float32", "--workers", "0", "--json"
    )
    assert code == 0, stderr
    fs = read_features(out)
    assert fs.classnames == ["blue sky", "green grass", "red apple"]
    assert len(fs) == 18 and fs.dim == 32 and fs.views is None
    assert fs.paths[0] == "blue_sky/img000.png"  # relative to the folder root
    assert fs.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert (
        fs.attrs["model_name"] == "tiny-clip"
        and fs.attrs["checkpoint_sha256"] == tiny_model.checkpoint_sha256
    )
    for key in (
        "promptcli_version",
        "open_clip_version",
        "created",
        "command",
        "preprocess",
        "image_size",
        "precision",
        "embed_dim",
    ):
        assert fs.attrs[key] != "", key
    assert json.loads(fs.attrs["runtime"])["device"] == "cpu" and fs.attrs["cwd"]
    assert '"n_images": 18' in stdout

    # stored embeddings equal model.encode_image on the same preprocessed input
    img = Image.open(image_folder / "green_grass" / "img002.png").convert("RGB")
    with torch.no_grad():
        ref = tiny_model.model.encode_image(tiny_model.preprocess(img)[None]).float()
    ref = torch.nn.functional.normalize(ref, dim=-1)[0].numpy()
    np.testing.assert_allclose(fs.features[fs.paths.index("green_grass/img002.png")], ref, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(fs.features, axis=1), 1.0, atol=1e-5)


def test_cli_extract_csv(run_cli, cli_model_args, image_folder, tiny_model, tiny_model_files, tmp_path):
    csv = tmp_path / "list.csv"
    rows = ["path,label,split", f"{image_folder}/red_apple/img000.png,red apple,train"]
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.open(image_folder / "blue_sky" / f"img00{i}.png").save(tmp_path / "imgs" / f"b{i}.png")
        rows.append(f"imgs/b{i}.png,blue sky,test")
    (tmp_path / "imgs" / "u0.png").write_bytes((tmp_path / "imgs" / "b0.png").read_bytes())
    rows.append("imgs/u0.png,,test")  # an unlabelled row (each path once: duplicates are refused)
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "c.h5"
    code, _, stderr = run_cli("extract", csv, "-o", out, *cli_model_args, "--workers", "0", "-q")
    assert code == 0, stderr
    fs = read_features(out)
    assert fs.classnames == ["blue sky", "red apple"]
    assert fs.paths[1] == "imgs/b0.png"  # as given in the CSV
    assert fs.labels.tolist() == [1, 0, 0, 0, -1]
    assert fs.splits == ["train", "test", "test", "test", "test"]
    assert fs.attrs["dtype"] == "float16" and _datasets(out)["features"].dtype == np.float16

    # the same from Python, in one call; the library step also refuses to write over its input
    from promptcli.extraction.extract import extract_file

    model = {"model": "tiny-clip", "model_config": tiny_model_files["config"], "device": "cpu"}
    again = tmp_path / "again.h5"
    extract_file(csv, again, ExtractOptions(workers=0), pretrained=str(tiny_model_files["weights"]), **model)
    assert all(np.array_equal(a, b) for a, b in zip(_datasets(out).values(), _datasets(again).values()))
    with pytest.raises(InputError, match="-o is the input IMAGES"):
        extract_features(read_image_source(csv), tiny_model, csv, ExtractOptions(workers=0), force=True)
    assert csv.read_text().startswith("path,label,split")


def test_views_are_seeded(tiny_model, image_folder, tmp_path):
    source = read_image_source(image_folder)
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        extract_features(
            source,
            tiny_model,
            tmp_path / f"{name}.h5",
            ExtractOptions(views=2, seed=seed, dtype="float32", workers=0, batch_size=5),
        )
        runs[name] = read_features(tmp_path / f"{name}.h5")
    assert runs["a"].views.shape == (18, 2, 32)
    np.testing.assert_array_equal(runs["a"].views, runs["b"].views)
    assert not np.allclose(runs["a"].views, runs["c"].views)
    assert not np.allclose(runs["a"].views[:, 0], runs["a"].views[:, 1])
    assert not np.allclose(runs["a"].views[:, 0], runs["a"].features)
    np.testing.assert_array_equal(
        runs["a"].features, runs["c"].features
    )  # centre crops do not depend on the seed


def test_views_do_not_depend_on_workers(tiny_model, image_folder, tmp_path):
    source = read_image_source(image_folder)
    for workers in (0, 2):
        extract_features(
            source,
            tiny_model,
            tmp_path / f"w{workers}.h5",
            ExtractOptions(views=1, seed=1, dtype="float32", workers=workers, batch_size=4),
        )
    a, b = _datasets(tmp_path / "w0.h5"), _datasets(tmp_path / "w2.h5")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_resume_after_interruption_is_identical(tiny_model, image_folder, tmp_path):
    source = read_image_source(image_folder)
    options = ExtractOptions(views=2, seed=0, dtype="float32", workers=0, batch_size=2, chunk_size=4)
    extract_features(source, tiny_model, tmp_path / "full.h5", options)

    out = tmp_path / "cut.h5"
    seen = []

    def interrupt(n: int) -> None:
        seen.append(n)
        if sum(seen) >= 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(source, tiny_model, out, options, on_rows=interrupt)
    assert not out.exists()  # the final name appears only when complete
    partial = tmp_path / "cut.h5.partial"
    assert len(list(partial.glob("chunk-*.npz"))) == 2

    from promptcli.errors import InputError

    with pytest.raises(InputError, match="--resume"):
        extract_features(source, tiny_model, out, options)
    with pytest.raises(InputError, match="seed differ"):
        extract_features(
            source, tiny_model, out, ExtractOptions(**{**options.__dict__, "seed": 9}), resume=True
        )

    result = extract_features(source, tiny_model, out, options, resume=True)
    assert result.resumed_chunks == 2 and not partial.exists()
    full, cut = _datasets(tmp_path / "full.h5"), _datasets(out)
    assert (
        read_features(out).attrs["images_digest"]
        == read_features(tmp_path / "full.h5").attrs["images_digest"]
    )
    assert full.keys() == cut.keys()
    for name in full:
        np.testing.assert_array_equal(full[name], cut[name])

    # a requeued job reruns its finished step: nothing to do; another extraction's file is refused
    before = out.stat().st_mtime_ns, out.read_bytes()
    again = extract_features(source, tiny_model, out, options, resume=True)
    assert again.already_complete and (again.n_images, again.dim) == (result.n_images, result.dim)
    assert (out.stat().st_mtime_ns, out.read_bytes()) == before
    with pytest.raises(InputError, match="written by another extraction \\(it differs in seed\\)"):
        extract_features(
            source, tiny_model, out, ExtractOptions(**{**options.__dict__, "seed": 9}), resume=True
        )
    with pytest.raises(InputError, match="output exists"):
        extract_features(source, tiny_model, out, options)  # without --resume: as ever
    # an image rewritten under its name since (its modification time moves): not this extraction's file
    st = os.stat(source.files[3])
    os.utime(source.files[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(InputError, match="differs in the image files \\(sizes or modification times\\)"):
        extract_features(source, tiny_model, out, options, resume=True)


def test_an_image_rewritten_after_it_was_encoded_is_noticed(tiny_model, tmp_path):
    """Chunks record each encoded file's size and time as read: a rewrite between an interrupted run and its
    --resume was assembled into the output with the old image's features, and a rewrite during a run was
    recorded in files_digest as if encoded, so a later --resume on the finished file took it as complete."""
    root = make_image_folder(tmp_path / "imgs", per_class=2)
    source = read_image_source(root)
    options = ExtractOptions(dtype="float32", workers=0, batch_size=2, chunk_size=2)

    def rewrite(i: int) -> None:
        st = os.stat(source.files[i])
        os.utime(source.files[i], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    out = tmp_path / "cut.h5"

    calls = []

    def interrupt(n: int) -> None:
        calls.append(n)
        if len(calls) == 2:  # chunk 0 (rows 0-1) is written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(source, tiny_model, out, options, on_rows=interrupt)
    rewrite(1)  # in the finished chunk 0
    with pytest.raises(
        InputError, match="image changed or removed since the interrupted run encoded it"
    ) as err:
        extract_features(source, tiny_model, out, options, resume=True)
    assert err.value.where == str(source.files[1]) and "chunk-000000.npz" in err.value.hint
    (tmp_path / "cut.h5.partial" / "chunk-000000.npz").unlink()  # as the hint says: encoded again
    assert extract_features(source, tiny_model, out, options, resume=True).n_images == 6

    done = []
    whole = tmp_path / "whole.h5"
    extract_features(source, tiny_model, whole, options, on_rows=lambda n: done or done.append(rewrite(0)))
    with pytest.raises(InputError, match="differs in the image files"):
        extract_features(source, tiny_model, whole, options, resume=True)


def test_a_skipped_image_fixed_before_resume_is_noticed(tiny_model, tmp_path):
    """Chunks record the size and time of the files --skip-bad skipped too: a broken image fixed between an
    interrupted run and its --resume stayed skipped, and one fixed during a run was recorded in files_digest as
    its fixed self, so a later --resume on the finished file took it as complete."""
    root = make_image_folder(tmp_path / "imgs", per_class=2)
    broken = root / "red_apple" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    source = read_image_source(root)
    options = ExtractOptions(dtype="float32", workers=0, batch_size=2, chunk_size=2, skip_bad=True)
    row = [str(f) for f in source.files].index(str(broken))
    assert row < len(source) - 2  # its chunk is not the last

    def fix() -> None:
        broken.write_bytes((root / "red_apple" / "img000.png").read_bytes())
        st = os.stat(broken)
        os.utime(broken, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    out, done = tmp_path / "cut.h5", []

    def interrupt(n: int) -> None:
        done.append(n)
        if sum(done) > (row // 2 + 1) * 2:  # the broken image's chunk is written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(source, tiny_model, out, options, on_rows=interrupt)
    fix()
    chunk = f"chunk-{row // 2:06d}.npz"
    with pytest.raises(
        InputError, match="image skipped as unreadable by the interrupted run has changed"
    ) as err:
        extract_features(source, tiny_model, out, options, resume=True)
    assert err.value.where == str(broken) and chunk in err.value.hint
    (tmp_path / "cut.h5.partial" / chunk).unlink()  # as the hint says: encoded again, now readable
    result = extract_features(source, tiny_model, out, options, resume=True)
    assert (result.n_images, result.n_skipped) == (len(source), 0)

    broken.write_bytes(b"\xff\xd8\xff\xe0 broken again")
    whole, seen = tmp_path / "whole.h5", []

    def fix_when_done(n: int) -> None:
        seen.append(n)
        if sum(seen) == len(source):  # after the broken image was skipped, before assembly
            fix()

    assert extract_features(source, tiny_model, whole, options, on_rows=fix_when_done).n_skipped == 1
    with pytest.raises(InputError, match="differs in the image files"):
        extract_features(source, tiny_model, whole, options, resume=True)


def test_existing_output_needs_force(run_cli, cli_model_args, image_folder, tmp_path):
    out = tmp_path / "f.h5"
    out.write_text("precious")
    code, _, stderr = run_cli("extract", image_folder, "-o", out, *cli_model_args, "--workers", "0")
    assert code == 2 and "output exists" in stderr and "--force" in stderr
    assert out.read_text() == "precious"
    code, _, stderr = run_cli(
        "extract", image_folder, "-o", out, *cli_model_args, "--workers", "0", "--force", "-q"
    )
    assert code == 0, stderr and len(read_features(out)) == 18


@pytest.fixture
def bad_folder(tmp_path):
    root = make_image_folder(tmp_path / "bad", per_class=2)
    (root / "red_apple" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "blue_sky" / "notes.txt").write_text("not an image, ignored by suffix")
    return root


def test_corrupt_image_is_named(run_cli, cli_model_args, bad_folder, tmp_path):
    code, _, stderr = run_cli(
        "extract", bad_folder, "-o", tmp_path / "o.h5", *cli_model_args, "--workers", "0"
    )
    assert code == 2
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ") and "broken.jpg" in line and "--skip-bad" in line
    assert "Traceback" not in stderr


def test_skip_bad_lists_skipped(run_cli, cli_model_args, bad_folder, tmp_path):
    out = tmp_path / "o.h5"
    code, stdout, stderr = run_cli(
        "extract", bad_folder, "-o", out, *cli_model_args, "--workers", "0", "--skip-bad", "--json"
    )
    assert code == 0, stderr
    assert "broken.jpg" in stderr
    fs = read_features(out)
    assert len(fs) == 6 and "red_apple/broken.jpg" not in fs.paths
    assert fs.attrs["n_skipped"] == 1 and "broken.jpg" in fs.attrs["skipped"]
    assert '"n_skipped": 1' in stdout


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "not found"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no class sub-folders"),
        (lambda p: (p / "e2" / "cls").mkdir(parents=True) or p / "e2", "class folder holds no images"),
        (
            lambda p: (p / "nopath.csv").write_text("file,label\na.png,x\n") and p / "nopath.csv",
            "no 'path' column",
        ),
        (
            lambda p: (p / "extra.csv").write_text("path,label,colour\na.png,x,red\n") and p / "extra.csv",
            "unknown column(s) colour",
        ),
        (lambda p: (p / "x.json").write_text("{}") and p / "x.json", "neither a folder nor a CSV"),
    ],
)
def test_bad_inputs(run_cli, cli_model_args, tmp_path, make, message):
    code, _, stderr = run_cli("extract", make(tmp_path), "-o", tmp_path / "o.h5", *cli_model_args)
    assert code == 2
    assert message in stderr and stderr.startswith("Error: ") and "Traceback" not in stderr


def test_non_image_with_image_suffix(run_cli, cli_model_args, tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=1)
    (root / "blue_sky" / "fake.png").write_text("hello")
    code, _, stderr = run_cli("extract", root, "-o", tmp_path / "o.h5", *cli_model_args, "--workers", "0")
    assert code == 2 and "fake.png" in stderr and "not a readable image" in stderr


def _broken_png(path):
    """A PNG whose second IDAT chunk has a broken type: PIL raises SyntaxError while loading the pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    data = buffer.getvalue()
    start = data.index(b"IDAT") - 4
    (n,) = struct.unpack(">I", data[start : start + 4])
    pixels = data[start + 8 : start + 8 + n]
    broken = chunk(b"IDAT", pixels[: n // 2]) + chunk(b"17\x00\x00", pixels[n // 2 :])
    path.write_bytes(data[:start] + broken + data[start + 12 + n :])


def test_a_png_with_a_broken_chunk_is_an_unreadable_image(run_cli, cli_model_args, tmp_path):
    """PIL's SyntaxError from a damaged file is a decode error like any other, for extract and tune alike."""
    from promptcli.io.image_dataset import TrainImages

    root = make_image_folder(tmp_path / "imgs", per_class=1)
    _broken_png(root / "blue_sky" / "broken.png")
    code, _, stderr = run_cli("extract", root, "-o", tmp_path / "o.h5", *cli_model_args, "--workers", "0")
    assert code == 2 and "broken.png: cannot read image (broken PNG file" in stderr, stderr
    out = tmp_path / "s.h5"
    code, _, stderr = run_cli(
        "extract", root, "-o", out, *cli_model_args, "--workers", "0", "--skip-bad", "-q"
    )
    assert code == 0, stderr
    assert read_features(out).attrs["n_skipped"] == 1
    images = TrainImages([root / "blue_sky" / "broken.png"], [0], lambda x: x, lambda x: x, seed=0)
    assert images[0, -1] == (0, "broken PNG file (chunk b'17\\x00\\x00')")


def test_a_damaged_avif_is_an_unreadable_image(run_cli, cli_model_args, tmp_path):
    """PIL's AVIF plugin reports a damaged file with RuntimeError, which reached the "unexpected" handler."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "AVIF")
    data = bytearray(buffer.getvalue())
    data[data.index(b"iloc") + 12] ^= 0xFF  # the item locations: "Missing or empty image item"
    root = make_image_folder(tmp_path / "imgs", per_class=1)
    (root / "blue_sky" / "photo.png").write_bytes(bytes(data))  # an AVIF named .png (extensions may lie)
    code, _, stderr = run_cli("extract", root, "-o", tmp_path / "o.h5", *cli_model_args, "--workers", "0")
    assert code == 2 and "photo.png: cannot read image (Failed to decode image" in stderr, stderr


def test_bad_options(run_cli, cli_model_args, image_folder, tmp_path):
    code, _, stderr = run_cli(
        "extract", image_folder, "-o", tmp_path / "o.h5", *cli_model_args, "--dtype", "int8"
    )
    assert code == 2 and "--dtype" in stderr
    code, _, stderr = run_cli(
        "extract", image_folder, "-o", tmp_path / "o.h5", *cli_model_args, "--precision", "fp16"
    )
    assert code == 2 and "needs a GPU" in stderr
    code, _, stderr = run_cli("extract", image_folder, "-o", tmp_path / "no" / "o.h5", *cli_model_args)
    assert code == 2 and "does not exist" in stderr


def test_debug_shows_traceback(run_cli, cli_model_args, tmp_path):
    code, _, stderr = run_cli(
        "extract", tmp_path / "missing", "-o", tmp_path / "o.h5", *cli_model_args, "--debug"
    )
    assert code == 2 and "Traceback" in stderr and "Error: " in stderr


# --- image folders: hidden and linked sub-folders, broken links, empty classes ----------------------


def _png(path, shade: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 100, 200)).save(path)
    return path


@pytest.fixture
def linked_folder(tmp_path):
    """cat/ with a notebook checkpoint and a broken link; dog/ with a linked sub-folder and a cycle."""
    root = tmp_path / "f"
    _png(root / "cat" / "a.png")
    _png(root / "cat" / ".ipynb_checkpoints" / "a-checkpoint.png")
    _png(root / "cat" / "sub" / ".hidden" / "h.png")
    _png(root / "dog" / "b.png")
    _png(tmp_path / "shared" / "c.png")
    _png(root / "__MACOSX" / "cat" / "._a.png")
    _png(root / "dog" / "__MACOSX" / "._b.png")
    (root / "cat" / "broken.png").symlink_to(tmp_path / "nowhere" / "img.png")
    (root / "dog" / "more").symlink_to(tmp_path / "shared", target_is_directory=True)
    (root / "dog" / "loop").symlink_to(root / "dog", target_is_directory=True)
    return root


def test_folder_skips_hidden_and_macos_folders_and_follows_linked_folders(linked_folder):
    source = read_image_folder(linked_folder)
    assert source.classnames == ["cat", "dog"]
    assert source.paths == ["cat/a.png", "cat/broken.png", "dog/b.png", "dog/more/c.png"]
    assert source.labels == [0, 0, 1, 1]


def test_broken_link_is_an_unreadable_image(run_cli, cli_model_args, linked_folder, tmp_path):
    code, _, stderr = run_cli(
        "extract", linked_folder, "-o", tmp_path / "bad.h5", *cli_model_args, "--workers", "0"
    )
    assert code == 2 and "broken.png" in stderr and "--skip-bad" in stderr and "Traceback" not in stderr
    out = tmp_path / "o.h5"
    code, _, stderr = run_cli(
        "extract", linked_folder, "-o", out, *cli_model_args, "--workers", "0", "--skip-bad", "-q"
    )
    assert code == 0, stderr
    fs = read_features(out)
    assert fs.paths == ["cat/a.png", "dog/b.png", "dog/more/c.png"] and fs.attrs["n_skipped"] == 1


@pytest.mark.parametrize("hard", [False, True], ids=["symlink", "hardlink"])
@pytest.mark.parametrize("second", ["dog/a-again.png", "cat/a-again.png"])
def test_one_image_reached_twice_through_links_is_refused(tmp_path, second, hard):
    """In two classes it would carry two labels; in one it would weigh twice."""
    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "dog" / "b.png")
    if hard:
        os.link(tmp_path / "cat" / "a.png", tmp_path / second)
    else:
        (tmp_path / second).symlink_to(tmp_path / "cat" / "a.png")
    with pytest.raises(InputError, match="are the same image file") as err:
        read_image_folder(tmp_path)
    assert (
        err.value.where == str(tmp_path)
        and "'cat/a.png'" in str(err.value)
        and f"'{second}'" in str(err.value)
    )


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_named_like_an_image_is_an_unreadable_image(run_cli, cli_model_args, tmp_path):
    """Not silently dropped; and extraction never reads it (its open or read would block)."""
    root = make_image_folder(tmp_path / "imgs", per_class=1)
    os.mkfifo(root / "blue_sky" / "pipe.png")
    code, _, stderr = run_cli("extract", root, "-o", tmp_path / "o.h5", *cli_model_args, "--workers", "0")
    assert code == 2 and "pipe.png: cannot read image (not a regular file (a FIFO))" in stderr, stderr
    out = tmp_path / "s.h5"
    code, _, stderr = run_cli(
        "extract", root, "-o", out, *cli_model_args, "--workers", "0", "--skip-bad", "-q"
    )
    assert code == 0, stderr
    fs = read_features(out)
    assert len(fs) == 3 and fs.attrs["n_skipped"] == 1 and "blue_sky/pipe.png" in fs.attrs["skipped"]


def test_image_list_row_naming_a_device_fifo_or_folder_is_refused(tmp_path):
    """Its read would never end (/dev/zero), block (a FIFO) or fail: refused naming the row."""
    _png(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    rows = ["/dev/zero", "sub"]
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.png")
        rows.append("pipe.png")
    images = tmp_path / "list.csv"
    for row, kind in zip(rows, ("a device", "a folder", "a FIFO")):
        images.write_text(f"path\na.png\n{row}\n")
        with pytest.raises(InputError, match=rf"'{row}' is not a regular file \({kind}\)") as err:
            read_image_csv(images)
        assert err.value.where == f"{images}:3"


def test_broken_link_in_place_of_a_class_folder_is_refused(tmp_path):
    _png(tmp_path / "cat" / "a.png")
    (tmp_path / "dog").symlink_to(tmp_path / "gone", target_is_directory=True)
    with pytest.raises(InputError, match="broken symbolic link") as err:
        read_image_folder(tmp_path)
    assert err.value.where == str(tmp_path / "dog")


def test_class_folder_without_images_is_refused(tmp_path):
    _png(tmp_path / "cat" / "a.png")
    (tmp_path / "dog" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="class folder holds no images") as err:
        read_image_folder(tmp_path)
    assert err.value.where == str(tmp_path / "dog") and "remove the folder" in err.value.hint


# --- names that are not UTF-8 (POSIX names are bytes) ----------------------------------------------


def _rename_to_bytes(path, name: bytes):
    """``path`` renamed to the raw bytes ``name`` (in its folder); skipped where the file system refuses."""
    target = os.path.join(os.fsencode(path.parent), name)
    try:
        os.rename(os.fsencode(path), target)
    except OSError:
        pytest.skip("this file system takes UTF-8 names only")
    return os.fsdecode(target)


@pytest.mark.parametrize(
    "entry, name, shown",
    [
        ("blue_sky/img000.png", b"img\xff.png", "blue_sky/img\\xff.png"),
        ("blue_sky", b"blue\xffsky", "blue\\xffsky"),
        ("red_apple/img000.png", b"\xed\xb3\xbf.png", "\\xed\\xb3\\xbf.png"),  # an encoded surrogate
    ],
    ids=["file", "class-folder", "encoded-surrogate"],
)
def test_image_folder_names_that_are_not_utf8_are_refused(
    run_cli, cli_model_args, tmp_path, entry, name, shown
):
    """Image paths are keys in the features file and label CSVs (UTF-8): such a name crashed their writing
    (an 'unexpected UnicodeEncodeError'). Refused before encoding, naming the path (invalid bytes as \\xNN)."""
    root = make_image_folder(tmp_path / "imgs", per_class=1)
    _rename_to_bytes(root / entry, name)
    with pytest.raises(InputError, match="not valid UTF-8") as err:
        read_image_source(root)
    assert err.value.where.endswith(shown) and "rename it" in err.value.hint
    out = tmp_path / "o.h5"
    code, _, stderr = run_cli("extract", root, "-o", out, *cli_model_args, "--workers", "0")
    assert code == 2 and shown in stderr and "not valid UTF-8" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and not out.exists()


def test_image_source_whose_own_path_is_not_utf8_is_refused(tmp_path):
    """The folder or list is recorded as the features file's source, to find the images again."""
    root = make_image_folder(tmp_path / "imgs", per_class=1)
    listed = tmp_path / "list.csv"
    listed.write_text("path\nimgs/blue_sky/img000.png\n")
    for source in (root, listed):
        renamed = _rename_to_bytes(source, os.fsencode(source.stem) + b"\xff" + os.fsencode(source.suffix))
        with pytest.raises(InputError, match="not valid UTF-8") as err:
            read_image_source(renamed)
        assert err.value.where.endswith(f"{source.stem}\\xff{source.suffix}")


# --- class names that read the same in a prompt ---------------------------------------------------


def test_folder_class_names_collapse_repeated_spaces(tmp_path):
    _png(tmp_path / "red__apple" / "a.png")
    _png(tmp_path / "sky_" / "a.png")
    assert read_image_folder(tmp_path).classnames == ["red apple", "sky"]


@pytest.mark.parametrize(
    ("folders", "why"),
    [
        (["Dog", "dog"], r"folders 'Dog' and 'dog' read the same in a prompt"),
        (["x_y", "x__y"], r"folders 'x__y' and 'x_y' both give the class name 'x y'"),
        (["Red_Apple", "red apple"], r"class names 'Red Apple' and 'red apple'"),
        (
            [unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")],
            r"two Unicode forms",
        ),
    ],
)
def test_folders_giving_one_prompt_are_refused(tmp_path, folders, why):
    for name in folders:
        _png(tmp_path / name / "a.png")
    if len({p.name for p in tmp_path.iterdir()}) < 2:
        pytest.skip("the file system folds these names into one folder")
    with pytest.raises(InputError, match=why) as err:
        read_image_folder(tmp_path)
    assert err.value.where == str(tmp_path)


def test_labels_and_class_lists_giving_one_prompt_are_refused(tmp_path):
    images = tmp_path / "list.csv"
    images.write_text("path,label\na.png,Dog\nb.png,dog\n")
    with pytest.raises(InputError, match="labels 'Dog' and 'dog' read the same"):
        read_image_csv(images)
    names = tmp_path / "classes.txt"
    names.write_text("ice cream\nIce  Cream\n")
    with pytest.raises(InputError, match="class names 'ice cream' and 'Ice  Cream'"):
        read_classnames(names)


# --- --classnames and --split with either kind of source ------------------------------------------


def test_classnames_order_the_classes_of_a_folder(tmp_path):
    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "red_apple" / "b.png")
    source = read_image_source(tmp_path, classnames=["red apple", "bird", "cat"])
    assert source.classnames == ["red apple", "bird", "cat"]  # a listed class may have no folder
    assert source.paths == ["cat/a.png", "red_apple/b.png"] and source.labels == [2, 0]


def test_folder_not_in_classnames_is_refused(tmp_path):
    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "Dog" / "b.png")
    with pytest.raises(InputError, match="'Dog', which is not in the --classnames list") as err:
        read_image_source(tmp_path, classnames=["cat", "dog"])
    assert err.value.where == str(tmp_path / "Dog")


def test_cli_classnames_apply_to_a_folder(run_cli, cli_model_args, image_folder, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("red apple\nblue sky\nyellow sun\ngreen grass\n")
    out = tmp_path / "o.h5"
    code, _, stderr = run_cli(
        "extract", image_folder, "-o", out, *cli_model_args, "--workers", "0", "--classnames", names, "-q"
    )
    assert code == 0, stderr
    fs = read_features(out)
    assert fs.classnames == ["red apple", "blue sky", "yellow sun", "green grass"]
    assert fs.labels.tolist() == [1] * 6 + [3] * 6 + [0] * 6  # rows: sorted folders


def test_cli_split_is_refused_for_an_image_list(run_cli, cli_model_args, tmp_path):
    _png(tmp_path / "a.png")
    images = tmp_path / "list.csv"
    images.write_text("path\na.png\n")
    code, _, stderr = run_cli("extract", images, "-o", tmp_path / "o.h5", *cli_model_args, "--split", "test")
    assert code == 2 and stderr.startswith("Error: --split:") and "split column" in stderr


# --- image lists: one file twice, bad headers and rows, TSV ---------------------------------------


def test_image_list_refuses_one_file_under_two_spellings(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    (tmp_path / "link").symlink_to(tmp_path / "imgs", target_is_directory=True)
    images = tmp_path / "list.csv"
    for second in (f"{tmp_path}/imgs/a.png", "link/a.png", "link/../link/a.png"):
        images.write_text(f"path,label\nimgs/a.png,cat\n{second},dog\n")
        with pytest.raises(InputError, match=r"lines 2 \('imgs/a.png'\) and 3 .* name the same image file"):
            read_image_csv(images)
    images.write_text(f"path\nimgs/a.png\n{tmp_path}/imgs/a.png\n")
    with pytest.raises(InputError, match="name the same image file —"):
        read_image_csv(images)
    os.link(tmp_path / "imgs" / "a.png", tmp_path / "imgs" / "hard.png")
    images.write_text("path,label\nimgs/a.png,cat\nimgs/hard.png,dog\n")
    with pytest.raises(InputError, match=r"lines 2 .* and 3 \('imgs/hard.png'\) name the same image file"):
        read_image_csv(images)
    # a link's `..` leaves the folder it points to: lexically alike, these are two files
    _png(tmp_path / "deep" / "inner" / "a.png")
    _png(tmp_path / "deep" / "b.png")
    (tmp_path / "imgs" / "in").symlink_to(tmp_path / "deep" / "inner", target_is_directory=True)
    images.write_text("path\nimgs/in/../b.png\nimgs/b.png\n")
    assert read_image_csv(images).paths == ["imgs/in/../b.png", "imgs/b.png"]


def test_image_list_refuses_a_repeated_column_and_overlong_rows(tmp_path):
    images = tmp_path / "list.csv"
    images.write_text("path,label,label\na.png,cat,dog\n")
    with pytest.raises(InputError, match="column 'label' appears twice"):
        read_image_csv(images)
    images.write_text("path,label\na.png,cat\nb,c.png,dog\n")
    with pytest.raises(InputError, match="row has 3 fields, the header 2") as err:
        read_image_csv(images)
    assert err.value.where == f"{images}:3"


def test_tsv_image_list_is_tab_separated(tmp_path):
    images = tmp_path / "list.tsv"
    images.write_text("path\tlabel\tsplit\na, b.png\tred apple\ttrain\nc.png\tsky\ttest\n")
    source = read_image_csv(images)
    assert source.paths == ["a, b.png", "c.png"] and source.classnames == ["red apple", "sky"]
    assert source.splits == ["train", "test"]


# --- an output that is one of the inputs ----------------------------------------------------------


@pytest.mark.parametrize("which", ["IMAGES", "--classnames"])
def test_output_may_not_be_an_input(run_cli, cli_model_args, tmp_path, which):
    _png(tmp_path / "a.png")
    images = tmp_path / "list.csv"
    images.write_text("path,label\na.png,cat\n")
    names = tmp_path / "classes.txt"
    names.write_text("cat\n")
    target = images if which == "IMAGES" else names
    before = target.read_bytes()
    code, _, stderr = run_cli(
        "extract", images, "-o", target, "--classnames", names, *cli_model_args, "--force"
    )
    assert code == 2 and f"output -o is the input {which}" in stderr and "Traceback" not in stderr
    assert target.read_bytes() == before
    assert not os.path.exists(f"{target}.lock")


def test_features_record_a_digest_of_the_image_files_bytes(tiny_model, image_folder, tmp_path):
    """Other images under the same names (one listing) give another images_digest; chunking does not."""
    import hashlib

    from promptcli.extraction.extract import images_digest

    source = read_image_source(image_folder)
    extract_features(source, tiny_model, tmp_path / "a.h5", ExtractOptions(workers=0))
    small = ExtractOptions(workers=0, batch_size=2, chunk_size=4)
    extract_features(source, tiny_model, tmp_path / "b.h5", small)
    a, b = read_features(tmp_path / "a.h5").attrs, read_features(tmp_path / "b.h5").attrs
    rows = np.array([list(hashlib.sha256(f.read_bytes()).digest()) for f in source.files], dtype=np.uint8)
    assert a["images_digest"] == b["images_digest"] == images_digest(iter([rows]))

    other = read_image_source(make_image_folder(tmp_path / "other", seed=5))  # same names, other pixels
    assert other.paths == source.paths and other.digest() == source.digest()
    extract_features(other, tiny_model, tmp_path / "c.h5", ExtractOptions(workers=0))
    c = read_features(tmp_path / "c.h5").attrs
    assert c["source_digest"] == a["source_digest"] and c["images_digest"] != a["images_digest"]


@pytest.mark.parametrize("change", ["std_nan", "std_tiny", "mean_nan", "proj_zero", "proj_huge", "proj_nan"])
def test_a_model_giving_nan_or_zero_embeddings_is_refused(
    run_cli, tiny_model_files, image_folder, tmp_path, change
):
    """Such a config or checkpoint wrote NaN (or zero) features with exit 0, which every reader refused."""
    from safetensors.torch import load_file, save_file

    config = json.loads(tiny_model_files["config"].read_text())
    weights = load_file(str(tiny_model_files["weights"]))
    if change.startswith(("std", "mean")):
        key, value = change.split("_")
        fill = {"nan": float("nan"), "tiny": 1e-45}[value]
        config = {"model_cfg": config, "preprocess_cfg": {key: [fill] * 3}}
    else:
        fill = {"proj_zero": 0.0, "proj_huge": 1e38, "proj_nan": float("nan")}[change]
        weights["visual.proj"] = torch.full_like(weights["visual.proj"], fill)
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    save_file(weights, str(tmp_path / "bad.safetensors"))
    out = tmp_path / "f.h5"
    model = ["--model", "tiny-clip", "--model-config", tmp_path / "cfg.json"]
    code, _, err = run_cli(
        "extract", image_folder, "-o", out, *model, "--pretrained", tmp_path / "bad.safetensors",
        "--device", "cpu", "-q", "-j", "0",
    )  # fmt: skip
    assert not out.exists()
    if change.endswith("_nan") and change != "proj_nan":  # refused as the config is read, naming the field
        assert code == 2 and f"cfg.json: preprocess_cfg.{key} is [nan, nan, nan], not a number" in err, err
        return
    assert (
        code == 2 and "non-finite (NaN or inf) or all-zero embeddings" in err and "bad.safetensors" in err
    ), err
    assert "preprocess_cfg mean and std" in err and "blue_sky/img000.png" in err


def test_resume_refuses_a_chunk_holding_nan(tiny_model, image_folder, tmp_path):
    source = read_image_source(image_folder)
    options = ExtractOptions(views=1, seed=0, dtype="float32", workers=0, batch_size=2, chunk_size=4)
    out = tmp_path / "cut.h5"
    seen = []

    def stop_after_a_chunk(n: int) -> None:
        seen.append(n)
        if sum(seen) >= 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(source, tiny_model, out, options, on_rows=stop_after_a_chunk)
    chunk = tmp_path / "cut.h5.partial" / "chunk-000000.npz"
    with np.load(chunk) as z:
        payload = {k: z[k] for k in z.files}
    payload["views"][1, 0, 0] = np.nan
    np.savez(chunk, **payload)
    with pytest.raises(
        InputError, match=r"chunk-000000.npz: features of row 1 \(.*\) are not finite.*--force"
    ):
        extract_features(source, tiny_model, out, options, resume=True)
    assert not out.exists()


def _flip_last_byte_of(chunk, member: str) -> None:
    """Damage ``member``'s data inside the .npz ``chunk`` (its zip directory stays readable)."""
    import zipfile

    with zipfile.ZipFile(chunk) as archive:
        info = archive.getinfo(member)
    data = bytearray(chunk.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.compress_size - 1] ^= 0xFF
    chunk.write_bytes(bytes(data))


def _rewrite(chunk, change) -> None:
    with np.load(chunk) as z:
        payload = {k: z[k] for k in z.files}
    change(payload)
    np.savez(chunk, **payload)


DAMAGED_CHUNKS = {
    # a crash, a full disk or a copy left the chunk empty or cut short; numpy raised EOFError or BadZipFile
    "empty": (lambda c: c.write_bytes(b""), "unreadable chunk"),
    "truncated": (lambda c: c.write_bytes(c.read_bytes()[:200]), "unreadable chunk"),
    "garbage": (lambda c: c.write_bytes(b"\x80\x04not a zip" * 20), "unreadable chunk"),
    "damaged array": (lambda c: _flip_last_byte_of(c, "features.npy"), "Bad CRC-32 for file 'features.npy'"),
    "array missing": (lambda c: _rewrite(c, lambda p: p.pop("bad_error")), "chunk lacks bad_error"),
    "row missing": (
        lambda c: _rewrite(c, lambda p: p.update(features=p["features"][:-1])),
        r"chunk features has shape \(3, 32\)",
    ),
    "another chunk's rows": (
        lambda c: c.write_bytes(c.with_name("chunk-000001.npz").read_bytes()),
        r"chunk does not hold rows 0\.\.3 once each",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGED_CHUNKS))
def test_resume_refuses_a_damaged_chunk_naming_it(
    run_cli, cli_model_args, tiny_model, image_folder, tmp_path, damage
):
    """A damaged chunk of OUTPUT.partial raised EOFError (exit 130, "interrupted": a retry loop reran it forever),
    BadZipFile or KeyError (an unexpected error), or was assembled as it was. It is refused naming the chunk."""
    source = read_image_source(image_folder)
    options = ExtractOptions(workers=0, batch_size=2, chunk_size=4)  # the CLI's defaults otherwise
    out = tmp_path / "cut.h5"
    seen = []

    def stop_after_two_chunks(n: int) -> None:
        seen.append(n)
        if sum(seen) >= 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(source, tiny_model, out, options, on_rows=stop_after_two_chunks)
    chunk = tmp_path / "cut.h5.partial" / "chunk-000000.npz"
    make, message = DAMAGED_CHUNKS[damage]
    make(chunk)
    args = ["extract", image_folder, "-o", out, *cli_model_args, "--workers", "0", "--batch-size", "2"]
    code, _, err = run_cli(*args, "--chunk-size", "4", "--resume")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith(f"Error: {chunk}: "), err
    assert re.search(message, lines[-1]) and "delete the chunk" in lines[-1] and "--force" in lines[-1], err
    assert "interrupted" not in err and "unexpected" not in err and not out.exists()
    if damage == "empty":
        chunk.unlink()  # as the message says: its images are encoded again
        code, _, err = run_cli(*args, "--chunk-size", "4", "--resume")
        assert code == 0 and out.exists(), err
