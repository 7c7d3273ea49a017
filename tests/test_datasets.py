"""`promptcli dataset`: every layout on a tiny fake release (list files written as each release's
documentation describes them), the CSVs it writes, class-name cleaning, splits and refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import read_csv_rows


def img(path: Path, value: int = 0, size: tuple[int, int] = (8, 8)) -> Path:
    """A tiny image in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value % 256, 40, 90)).save(path)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def resolved(csv_path: Path, rows: list[dict[str, str]]) -> list[Path]:
    return [(csv_path.parent / r["path"]).resolve() for r in rows]


# --- CoOp split files -------------------------------------------------------------------------------

PETS = {
    "train": ["Abyssinian", "American_Bulldog"],
    "val": ["Abyssinian", "American_Bulldog"],
    "test": ["Abyssinian", "American_Bulldog"],
}


def make_pets(data: Path, per_split: int = 2) -> Path:
    root = data / "oxford_pets"
    split: dict[str, list] = {}
    for name, labels in PETS.items():
        split[name] = []
        for label, raw in enumerate(labels):
            for i in range(per_split):
                rel = f"{raw}_{name}{i}.jpg"
                img(root / "images" / rel, i)
                split[name].append([rel, label, raw])
    (root / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return root


def test_registry_names_every_layout_once():
    from promptcli.datasets.coop import COOP_DATASETS
    from promptcli.datasets.registry import COOP_BENCHMARK, LAYOUTS

    assert all(type(k) is str and layout.name == k for k, layout in LAYOUTS.items())
    assert set(COOP_BENCHMARK) == set(COOP_DATASETS) and set(COOP_DATASETS) <= set(LAYOUTS)


def test_list_shows_names_files_and_sources(run_cli):
    from promptcli.datasets.registry import LAYOUTS

    code, out, _ = run_cli("dataset", "list")
    assert code == 0
    for name, layout in LAYOUTS.items():
        assert f"{name}: " in out and layout.needs[0] in out and layout.source in out
    code, out, _ = run_cli("dataset", "--list", "--json")
    assert code == 0 and {d["name"] for d in json.loads(out)} == set(LAYOUTS)


def test_coop_split_file_to_csv_that_extract_reads(tmp_path, run_cli):
    from promptcli.io.image_sources import read_image_csv

    make_pets(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    csv_path = out / "pets.csv"
    # ROOT may be CoOp's DATA folder: the dataset folder is found inside it
    code, _, err = run_cli(
        "dataset",
        "oxford-pets",
        tmp_path / "data",
        "-o",
        csv_path,
        "--classnames-out",
        out / "classes.txt",
        "-q",
    )
    assert code == 0, err
    rows = read_csv_rows(csv_path)
    assert list(rows[0]) == ["path", "label", "split"]
    assert [r["split"] for r in rows] == ["train"] * 4 + ["val"] * 4 + ["test"] * 4
    assert {r["label"] for r in rows} == {"abyssinian", "american bulldog"}  # lower case, _ as a space
    assert all(p.is_file() for p in resolved(csv_path, rows)) and not rows[0]["path"].startswith("/")
    assert (out / "classes.txt").read_text() == "abyssinian\namerican bulldog\n"
    side = json.loads((out / "pets.csv.json").read_text())
    assert (
        side["splits"]["train"]["n_images"] == 4
        and side["n_classes"] == 2
        and side["command"].startswith("promptcli dataset")
    )
    assert any(k.endswith("split_zhou_OxfordPets.json") for k in side["files_read"])
    source = read_image_csv(csv_path, classnames=["abyssinian", "american bulldog"])
    assert source.labels == [0, 0, 1, 1] * 3 and source.splits[-1] == "test"

    code, _, err = run_cli(
        "dataset",
        "oxford-pets",
        tmp_path / "data" / "oxford_pets",
        "--split",
        "test",
        "-o",
        out / "t.csv",
        "-q",
    )
    assert code == 0, err
    assert [r["split"] for r in read_csv_rows(out / "t.csv")] == ["test"] * 4

    # refuses to overwrite; --force does; -o - writes absolute paths to stdout
    code, _, err = run_cli("dataset", "oxford-pets", tmp_path / "data", "-o", csv_path, "-q")
    assert code == 2 and "output exists" in err and str(csv_path) in err
    assert run_cli("dataset", "oxford-pets", tmp_path / "data", "-o", csv_path, "--force", "-q")[0] == 0
    code, stdout, _ = run_cli("dataset", "oxford-pets", tmp_path / "data", "--split", "val", "-o", "-", "-q")
    assert code == 0 and stdout.splitlines()[0] == "path,label,split" and len(stdout.splitlines()) == 5
    assert all(Path(line.split(",")[0]).is_absolute() for line in stdout.splitlines()[1:])
    code, stdout, _ = run_cli("dataset", "oxford-pets", tmp_path / "data", "-o", out / "j.csv", "--json")
    assert code == 0 and json.loads(stdout)["splits"]["val"]["n_images"] == 4


def test_paths_resolve_from_a_symlinked_output_folder(tmp_path, run_cli):
    make_pets(tmp_path / "data")
    (tmp_path / "far" / "away" / "csvs").mkdir(parents=True)
    (tmp_path / "out").symlink_to(tmp_path / "far" / "away" / "csvs")
    csv_path = tmp_path / "out" / "pets.csv"
    code, _, err = run_cli("dataset", "oxford-pets", tmp_path / "data", "-o", csv_path, "-q")
    assert code == 0, err
    real_folder = (tmp_path / "far" / "away" / "csvs").resolve()
    # the kernel reads ".." after a symlink from its target: paths must resolve from the real folder
    rows = read_csv_rows(csv_path)
    assert all((real_folder / r["path"]).is_file() for r in rows) and rows[0]["path"].startswith("../")
    side = json.loads((tmp_path / "out" / "pets.csv.json").read_text())
    assert side["root"] == str((tmp_path / "data").resolve())
    assert side["image_root"] == str((tmp_path / "data" / "oxford_pets" / "images").resolve())
    assert all(os.path.isabs(k) for k in side["files_read"])


def test_dotdot_after_a_symlinked_image_folder_names_the_file_the_kernel_reads(tmp_path, run_cli):
    img(tmp_path / "real" / "images" / "a.png", 1)
    img(tmp_path / "real" / "more" / "b.png", 2)
    img(tmp_path / "data" / "more" / "b.png", 3)  # what "images/../more" would name, read by name
    (tmp_path / "data" / "images").symlink_to(tmp_path / "real" / "images")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [["a.png", 0, "a"], ["../more/b.png", 1, "b"]]}))
    for extra in ([], ["--absolute"]):
        out = tmp_path / f"s{len(extra)}.csv"
        code, _, err = run_cli(
            "dataset", "split-json", tmp_path / "data" / "images", "--split-file", split, "-o", out, *extra
        )
        assert code == 0, err
        paths = resolved(out, read_csv_rows(out))
        assert paths[1] == (tmp_path / "real" / "more" / "b.png").resolve()


def test_outputs_never_overwrite_each_other_or_inputs(tmp_path, run_cli):
    root = make_pets(tmp_path / "data")
    split = root / "split_zhou_OxfordPets.json"
    before = split.read_bytes()
    image = root / "images" / "Abyssinian_train0.jpg"
    image_bytes = image.read_bytes()
    cases = [
        (["-o", tmp_path / "same.csv", "--classnames-out", tmp_path / "same.csv"], "name the same file"),
        (["-o", tmp_path / "s2.csv", "--classnames-out", tmp_path / "s2.csv.json"], "name the same file"),
        (["-o", split, "--force"], "output -o is the input"),
        (["-o", tmp_path / "x.csv", "--classnames-out", split, "--force"], "--classnames-out is the input"),
        (["-o", tmp_path / "y.csv", "--split-file", split, "--classnames-out", split], "is the input"),
        (["-o", image, "--force"], "output -o is the image"),
    ]
    for args, expected in cases:
        code, _, err = run_cli("dataset", "oxford-pets", tmp_path / "data", *args)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (args, err)
    assert split.read_bytes() == before and image.read_bytes() == image_bytes
    assert not any(tmp_path.glob("*.csv*")) and not (root / "split_zhou_OxfordPets.json.json").exists()


def test_split_file_may_start_with_a_bom(tmp_path, run_cli):
    root = make_pets(tmp_path)
    path = root / "split_zhou_OxfordPets.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    code, _, err = run_cli("dataset", "oxford-pets", root, "-o", tmp_path / "b.csv", "-q")
    assert code == 0, err
    assert len(read_csv_rows(tmp_path / "b.csv")) == 12


def test_unreadable_list_file_is_an_input_error(tmp_path, run_cli, monkeypatch):
    import builtins

    root = make_pets(tmp_path)
    real_open = builtins.open

    def deny(file, *args, **kwargs):
        if str(file).endswith("split_zhou_OxfordPets.json"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    code, _, err = run_cli("dataset", "oxford-pets", root, "-o", tmp_path / "p.csv")
    assert code == 2 and "split_zhou_OxfordPets.json: cannot read (Permission denied)" in err, err


@pytest.mark.parametrize(
    ("layout", "raw", "clean"),
    [
        ("caltech101", "Faces", "face"),
        ("caltech101", "airplanes", "airplane"),
        ("caltech101", "ant", "ant"),
        ("oxford-pets", "Egyptian_Mau", "egyptian mau"),
        ("stanford-cars", "AM General Hummer SUV 2000", "2000 AM General Hummer SUV"),
        ("stanford-cars", "2012 Audi S4 Sedan", "2012 Audi S4 Sedan"),  # already as CoOp writes it
        ("eurosat", "AnnualCrop", "Annual Crop Land"),
        ("eurosat", "Annual Crop Land", "Annual Crop Land"),
        ("ucf101", "ApplyEyeMakeup", "Apply Eye Makeup"),
        ("ucf101", "Apply_Eye_Makeup", "Apply Eye Makeup"),
        ("food101", "apple_pie", "apple pie"),
        ("sun397", "outdoor apartment_building", "outdoor apartment building"),
        ("dtd", "banded", "banded"),
        ("fgvc-aircraft", "A300B4", "A300B4"),
    ],
)
def test_class_names_are_cleaned_as_coop_does(layout, raw, clean):
    from promptcli.datasets.coop import COOP_DATASETS, clean_name

    assert clean_name(COOP_DATASETS[layout], raw) == clean


def test_fgvc_aircraft_variant_lists(tmp_path, run_cli):
    root = tmp_path / "fgvc_aircraft"
    write_lines(root / "variants.txt", ["707-320", "A300B4"])
    for split, ids in (("train", ["1000", "1001"]), ("val", ["1002"]), ("test", ["1003", "1004"])):
        write_lines(
            root / f"images_variant_{split}.txt",
            [f"{i} {'A300B4' if int(i) % 2 else '707-320'}" for i in ids],
        )
        for i in ids:
            img(root / "images" / f"{i}.jpg")
    code, _, err = run_cli(
        "dataset",
        "fgvc-aircraft",
        tmp_path,
        "-o",
        tmp_path / "a.csv",
        "--classnames-out",
        tmp_path / "c.txt",
        "-q",
    )
    assert code == 0, err
    rows = read_csv_rows(tmp_path / "a.csv")
    assert [(r["label"], r["split"]) for r in rows][:3] == [
        ("707-320", "train"),
        ("A300B4", "train"),
        ("707-320", "val"),
    ]
    assert (tmp_path / "c.txt").read_text() == "707-320\nA300B4\n"
    write_lines(root / "images_variant_val.txt", ["1002 Boeing 999"])
    code, _, err = run_cli("dataset", "fgvc-aircraft", root, "-o", tmp_path / "b.csv", "-q")
    assert code == 2 and "images_variant_val.txt:1" in err and "Boeing 999" in err


def test_imagenet_folders_and_classnames(tmp_path, run_cli):
    root = tmp_path / "imagenet"
    write_lines(root / "classnames.txt", ["n01440764 tench", "n01443537 goldfish"])
    for split in ("train", "val"):
        for wnid in ("n01443537", "n01440764"):
            img(root / "images" / split / wnid / f"{wnid}_{split}.JPEG")
    (root / "images" / "train" / "n01440764" / "notes.txt").write_text("not an image")
    code, _, err = run_cli("dataset", "imagenet", tmp_path, "-o", tmp_path / "in.csv", "-q")
    assert code == 0, err
    rows = read_csv_rows(tmp_path / "in.csv")
    assert [(r["label"], r["split"]) for r in rows] == [
        ("tench", "train"),
        ("goldfish", "train"),
        ("tench", "test"),
        ("goldfish", "test"),
    ]
    code, _, err = run_cli("dataset", "imagenet", root, "--split", "val", "-o", tmp_path / "v.csv", "-q")
    assert code == 2 and "no val rows" in err and "train, test" in err
    img(root / "images" / "train" / "n07777777" / "x.JPEG")
    code, _, err = run_cli("dataset", "imagenet", root, "-o", tmp_path / "w.csv", "-q")
    assert code == 2 and "n07777777 is not in classnames.txt" in err


def test_names_that_are_not_utf8_are_refused(tmp_path, run_cli):
    """The image-list CSV and its sidecar are UTF-8 text: a non-UTF-8 image, root or output name crashed
    their writing ('unexpected UnicodeEncodeError'). Refused naming the path (invalid bytes as \\xNN)."""
    root = tmp_path / "inet"
    write_lines(root / "classnames.txt", ["n01440764 tench"])
    img(root / "images" / "train" / "n01440764" / "a.JPEG")
    img(root / "images" / "val" / "n01440764" / "b.JPEG")
    bad = os.path.join(os.fsencode(root / "images" / "train" / "n01440764"), b"c\xff.JPEG")
    try:
        os.rename(os.fsencode(root / "images" / "val" / "n01440764" / "b.JPEG"), bad)
    except OSError:
        pytest.skip("this file system takes UTF-8 names only")
    code, _, err = run_cli("dataset", "imagenet", root, "-o", tmp_path / "a.csv")
    assert code == 2 and "n01440764/c\\xff.JPEG: file or folder name is not valid UTF-8" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a.csv").exists()
    os.rename(bad, os.fsencode(root / "images" / "val" / "n01440764" / "b.JPEG"))
    code, _, err = run_cli("dataset", "imagenet", root, "-o", os.fsdecode(b"b\xff.csv"))
    assert code == 2 and "b\\xff.csv" in err and "give -o a name in UTF-8" in err, err
    renamed = os.fsdecode(os.fsencode(root) + b"\xff")
    os.rename(root, renamed)
    code, _, err = run_cli("dataset", "imagenet", renamed, "-o", tmp_path / "a.csv")
    assert code == 2 and "inet\\xff: file or folder name is not valid UTF-8" in err, err
    assert not (tmp_path / "a.csv").exists()


def test_imagenet_refuses_unsorted_val_images_and_classes_without_images(tmp_path, run_cli):
    root = tmp_path / "inet"
    write_lines(root / "classnames.txt", ["n01440764 tench", "n01443537 goldfish"])
    img(root / "images" / "train" / "n01440764" / "a.JPEG")
    img(root / "images" / "train" / "n01443537" / "b.JPEG")
    # the official ILSVRC2012 val archive: every image directly in val/, no wnid folders
    for i in (1, 2):
        img(root / "images" / "val" / f"ILSVRC2012_val_0000000{i}.JPEG")
    code, _, err = run_cli("dataset", "imagenet", root, "-o", tmp_path / "a.csv")
    assert code == 2 and "directly in val/" in err and "2 of them" in err and "DATASETS.md" in err, err
    assert not (tmp_path / "a.csv").exists()
    for i in (1, 2):
        (root / "images" / "val" / f"ILSVRC2012_val_0000000{i}.JPEG").unlink()
    img(root / "images" / "val" / "n01440764" / "v.JPEG")
    write_lines(
        root / "classnames.txt", ["n01440764 tench", "n01443537 goldfish", "n01484850 great white shark"]
    )
    code, _, err = run_cli("dataset", "imagenet", root, "-o", tmp_path / "a.csv")
    assert code == 2 and "classnames.txt" in err and "1 of its classes (n01484850)" in err, err
    (root / "images" / "train" / "n01484850").mkdir()  # an empty folder is no better
    code, _, err = run_cli("dataset", "imagenet", root, "-o", tmp_path / "a.csv")
    assert code == 2 and "n01484850" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["broken-link", "fifo", "folder"])
def test_imagenet_refuses_an_entry_named_like_an_image_that_is_no_file(tmp_path, run_cli, kind):
    # it was skipped: its row went missing from the CSV without a word
    root = tmp_path / "inet"
    write_lines(root / "classnames.txt", ["n01440764 tench"])
    img(root / "images" / "train" / "n01440764" / "a.JPEG")
    img(root / "images" / "val" / "n01440764" / "v.JPEG")
    entry = root / "images" / "val" / "n01440764" / "w.JPEG"
    if kind == "fifo":
        os.mkfifo(entry)
    elif kind == "folder":  # a sub-folder's images were left out too
        img(entry.parent / "sub" / "w.JPEG")
    else:
        entry.symlink_to(root / "gone.JPEG")
    code, _, err = run_cli("dataset", "imagenet", root, "-o", tmp_path / "a.csv")
    expected = (
        "sub: a folder inside a wnid folder" if kind == "folder" else "w.JPEG: named like an image, but not"
    )
    assert code == 2 and expected in err, err


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s, r: (r / "split_zhou_OxfordPets.json").unlink(), "needs split_zhou_OxfordPets.json"),
        (lambda s, r: s["train"].append(["x.jpg", 1]), "split_zhou_OxfordPets.json:train[4]: malformed row"),
        (
            lambda s, r: s["val"].append(["x.jpg", "1", "a"]),
            "split_zhou_OxfordPets.json:val[4]: malformed row",
        ),
        (lambda s, r: s["test"].append(["x.jpg", 1, "Sphynx"]), "label 1 is named 'Sphynx' here"),
        (lambda s, r: s["test"].append(["x.jpg", 3, "Sphynx"]), "test[4]: label 3, yet label 2 never occurs"),
        # a huge label: checked without building range(label + 1)
        (
            lambda s, r: s["train"].insert(1, ["x.jpg", 10**12, "cat"]),
            "train[1]: label 1000000000000, yet label 2 never",
        ),
        (lambda s, r: s["test"].append(["gone.jpg", 1, "American_Bulldog"]), "test[4]: image"),
        (
            lambda s, r: s["test"].append(["Abyssinian_train0.jpg", 0, "Abyssinian"]),
            "is in test and in train",
        ),
        (lambda s, r: s["test"].append(["Abyssinian_test0.jpg", 0, "Abyssinian"]), "is listed again"),
        (
            lambda s, r: (
                os.link(r / "images" / "Abyssinian_train0.jpg", r / "images" / "hard.jpg"),
                s["test"].append(["hard.jpg", 0, "Abyssinian"]),
            ),
            "is the same file as",  # a hard link: one file under two names
        ),
        (lambda s, r: s["test"].append(["x.jpg", 2, "american bulldog"]), "classes 1 and 2 are both named"),
        # was an unexpected ValueError from os.stat
        (
            lambda s, r: s["test"].append(["a\0.jpg", 0, "Abyssinian"]),
            "a\\x00.jpg' holds a NUL character",
        ),
    ],
)
def test_split_file_refusals_name_file_and_row(tmp_path, run_cli, mutate, expected):
    root = make_pets(tmp_path, per_split=2)
    path = root / "split_zhou_OxfordPets.json"
    split = json.loads(path.read_text())
    mutate(split, root)
    if path.exists() or "needs" not in expected:
        path.write_text(json.dumps(split))
    code, out, err = run_cli("dataset", "oxford-pets", root, "-o", tmp_path / "x.csv")
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_image_in_two_splits_is_refused_whichever_split_is_exported(tmp_path, run_cli, split):
    # exporting one split used to check only its own rows: a test image also listed for training went through
    root = make_pets(tmp_path)
    path = root / "split_zhou_OxfordPets.json"
    data = json.loads(path.read_text())
    data["test"].append(data["train"][0])
    path.write_text(json.dumps(data))
    code, _, err = run_cli("dataset", "oxford-pets", root, "--split", split, "-o", tmp_path / "x.csv")
    assert code == 2 and "test[4]: image" in err and "is in test and in train (first at" in err, err
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_image_linked_into_two_splits_is_refused_whichever_split_is_exported(tmp_path, run_cli, split):
    # only the exported rows' files were compared: a test image hard-linked as a training one went through
    root = make_pets(tmp_path)
    (root / "images" / "Abyssinian_test0.jpg").unlink()
    os.link(root / "images" / "Abyssinian_train0.jpg", root / "images" / "Abyssinian_test0.jpg")
    (root / "images" / "American_Bulldog_val1.jpg").unlink()  # images of other splits need not be there
    code, _, err = run_cli("dataset", "oxford-pets", root, "--split", split, "-o", tmp_path / "x.csv")
    assert code == 2 and "is the same file as" in err and "(train" in err and "(test" in err, err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # json keeps the last of two "train" keys: the first list's rows vanished without a word
        (
            '{"train": [["a.jpg", 0, "a"]], "test": [["b.jpg", 0, "a"]], "train": []}',
            "key 'train' is given twice",
        ),
        # "Test" is no split: its rows were left out without a word
        ('{"train": [["a.jpg", 0, "a"]], "Test": [["b.jpg", 0, "a"]]}', "unknown split 'Test'"),
        (
            "[" * 100000 + "]" * 100000,
            "not a JSON split file (nested too deeply",
        ),  # was an unexpected RecursionError
    ],
    ids=["repeated-key", "unknown-split", "deep-nesting"],
)
def test_split_file_that_json_reads_but_promptcli_must_not(tmp_path, run_cli, text, expected):
    root = make_pets(tmp_path)
    (root / "split_zhou_OxfordPets.json").write_text(text)
    code, _, err = run_cli("dataset", "oxford-pets", root, "-o", tmp_path / "x.csv")
    assert code == 2 and f"split_zhou_OxfordPets.json: {expected}" in err, err
    assert len(err.strip().splitlines()) == 1


def test_split_file_option_and_option_refusals(tmp_path, run_cli):
    root = make_pets(tmp_path)
    other = tmp_path / "mine.json"
    other.write_text(
        json.dumps(
            {"train": [["Abyssinian_train0.jpg", 0, "cat_a"]], "test": [["Abyssinian_test0.jpg", 0, "cat_a"]]}
        )
    )
    code, _, err = run_cli(
        "dataset", "split-json", root / "images", "--split-file", other, "-o", tmp_path / "s.csv", "-q"
    )
    assert code == 0, err
    assert [(r["label"], r["split"]) for r in read_csv_rows(tmp_path / "s.csv")] == [
        ("cat a", "train"),
        ("cat a", "test"),
    ]
    code, _, err = run_cli(
        "dataset", "oxford-pets", root, "--split-file", other, "-o", tmp_path / "o.csv", "-q"
    )
    assert code == 0 and len(read_csv_rows(tmp_path / "o.csv")) == 2
    code, _, err = run_cli("dataset", "split-json", root / "images", "-o", tmp_path / "n.csv")
    assert code == 2 and "--split-file" in err
    code, _, err = run_cli("dataset", "oxford-pets", root, "--test-root", root, "-o", tmp_path / "n.csv")
    assert code == 2 and "oxford-pets does not take --test-root" in err
    code, _, err = run_cli("dataset", "no-such", root, "-o", tmp_path / "n.csv")
    assert code == 2 and "NAME" in err and "oxford-pets" in err
    code, _, err = run_cli("dataset", "oxford-pets", root, "--known-noise", "-o", tmp_path / "n.csv")
    assert code == 2 and "--known-noise" in err


# --- real label noise -------------------------------------------------------------------------------


def make_food101n(tmp: Path) -> tuple[Path, Path]:
    root = tmp / "Food-101N_release"
    write_lines(root / "meta" / "classes.txt", ["class_name", "apple_pie", "baby_back_ribs"])
    keys = [f"{c}/{c[:2]}{i}.jpg" for c in ("apple_pie", "baby_back_ribs") for i in range(4)]
    for key in keys:
        img(root / "images" / key)
    write_lines(root / "meta" / "imagelist.tsv", ["class_name/key", *keys])
    # verification_label 1: the label is right, 0: it is wrong
    write_lines(
        root / "meta" / "verified_train.tsv",
        ["class_name/key\tverification_label", f"{keys[0]}\t1", f"{keys[1]}\t0", f"{keys[4]}\t0"],
    )
    write_lines(root / "meta" / "verified_val.tsv", ["class_name/key\tverification_label", f"{keys[7]}\t1"])
    food = tmp / "food-101"
    write_lines(food / "meta" / "test.txt", ["apple_pie/11", "baby_back_ribs/22"])
    img(food / "images" / "apple_pie" / "11.jpg")
    img(food / "images" / "baby_back_ribs" / "22.jpg")
    return root, food


@pytest.mark.parametrize("name", ["verified_train.tsv", "verified_val.tsv"])
def test_food101n_verified_rows_must_be_in_the_image_list(tmp_path, run_cli, name):
    # a verified val row outside imagelist.tsv used to become a val row all the same
    root, _ = make_food101n(tmp_path)
    img(root / "images" / "apple_pie" / "extra.jpg")
    with open(root / "meta" / name, "a") as handle:
        handle.write("apple_pie/extra.jpg\t1\n")
    code, _, err = run_cli("dataset", "food101n", root, "-o", tmp_path / "f.csv")
    assert (
        code == 2 and f"{name}: apple_pie/extra.jpg (and 0 more) is verified but not in imagelist" in err
    ), err


def test_food101n_verification_flags_and_test_root(tmp_path, run_cli):
    root, food = make_food101n(tmp_path)
    code, stdout, err = run_cli(
        "dataset", "food101n", tmp_path, "--test-root", food, "-o", tmp_path / "f.csv", "--json"
    )
    assert code == 0, err
    rows = read_csv_rows(tmp_path / "f.csv")
    assert list(rows[0]) == ["path", "label", "split", "is_noisy"]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 7 and [r["is_noisy"] for r in train] == ["0", "1", "", "", "1", "", ""]
    assert [r["is_noisy"] for r in rows if r["split"] == "val"] == ["0"]
    assert [(r["label"], r["is_noisy"]) for r in rows if r["split"] == "test"] == [
        ("apple pie", "0"),
        ("baby back ribs", "0"),
    ]
    summary = json.loads(stdout)
    assert summary["splits"]["train"]["n_noise_known"] == 3 and summary["splits"]["train"][
        "noisy_fraction"
    ] == pytest.approx(2 / 3)
    code, _, err = run_cli(
        "dataset", "food101n", root, "--split", "train", "--known-noise", "-o", tmp_path / "k.csv", "-q"
    )
    assert code == 0, err
    assert [r["is_noisy"] for r in read_csv_rows(tmp_path / "k.csv")] == ["0", "1", "1"]
    code, _, err = run_cli("dataset", "food101n", root, "--split", "test", "-o", tmp_path / "t.csv")
    assert code == 2 and "no test rows" in err
    write_lines(
        root / "meta" / "verified_train.tsv", ["class_name/key\tverification_label", "apple_pie/ap0.jpg\tyes"]
    )
    code, _, err = run_cli("dataset", "food101n", root, "-o", tmp_path / "b.csv")
    assert code == 2 and "verified_train.tsv:2: malformed line" in err


def make_clothing1m(root: Path) -> Path:
    write_lines(root / "category_names_eng.txt", ["T-Shirt", "Shirt", "Knitwear"])
    keys = [f"images/{i % 10}/{i:02d}/{i}.jpg" for i in range(9)]
    for key in keys:
        img(root / key)
    write_lines(root / "noisy_label_kv.txt", [f"{k} {i % 3}" for i, k in enumerate(keys[:6])])
    # images 0-2 also have clean labels (image 1 disagrees with its noisy label); 6-8 are the clean val/test
    write_lines(
        root / "clean_label_kv.txt",
        [f"{keys[0]} 0", f"{keys[1]} 2", f"{keys[2]} 2"] + [f"{k} {i % 3}" for i, k in enumerate(keys[6:])],
    )
    write_lines(root / "noisy_train_key_list.txt", keys[:6])
    write_lines(root / "clean_train_key_list.txt", keys[:3])
    write_lines(root / "clean_val_key_list.txt", keys[6:7])
    write_lines(root / "clean_test_key_list.txt", keys[7:])
    return root


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_layout_file_that_is_a_folder_or_fifo_is_named_so(tmp_path, run_cli, kind):
    """need_file said "food101n needs meta/classes.txt, which is not there" for a folder standing where the file
    belongs (and a FIFO): now it names what is there, as the other readers do."""
    root, _ = make_food101n(tmp_path)
    classes = root / "meta" / "classes.txt"
    classes.unlink()
    classes.mkdir() if kind == "folder" else os.mkfifo(classes)
    code, _, err = run_cli("dataset", "food101n", root, "-o", tmp_path / "f.csv")
    shown = "a folder" if kind == "folder" else "a FIFO"
    assert code == 2 and f"{classes}: meta/classes.txt of the food101n layout is {shown}" in err, err
    assert "not there" not in err and len(err.strip().splitlines()) == 1, err
    classes.rmdir() if kind == "folder" else classes.unlink()
    code, _, err = run_cli("dataset", "food101n", root, "-o", tmp_path / "f.csv")
    assert code == 2 and "food101n needs meta/classes.txt, which is not there" in err, err


def test_a_class_name_with_a_control_character_is_refused(tmp_path, run_cli):
    # "Shirt\0" went into the CSV and the class list as a class name
    root = make_clothing1m(tmp_path / "c1m")
    write_lines(root / "category_names_eng.txt", ["T-Shirt", "Shirt\0", "Knitwear"])
    code, _, err = run_cli("dataset", "clothing1m", root, "-o", tmp_path / "x.csv")
    assert code == 2 and "category_names_eng.txt: class 1's name 'Shirt\\x00' holds the control" in err, err


def test_clothing1m_noisy_and_clean_labels(tmp_path, run_cli):
    root = make_clothing1m(tmp_path / "clothing1m")
    code, _, err = run_cli("dataset", "clothing1m", root, "-o", tmp_path / "c.csv", "-q")
    assert code == 0, err
    rows = read_csv_rows(tmp_path / "c.csv")
    assert list(rows[0]) == ["path", "label", "split", "clean_label", "is_noisy"]
    assert [(r["label"], r["clean_label"], r["is_noisy"]) for r in rows[:4]] == [
        ("T-Shirt", "T-Shirt", "0"),
        ("Shirt", "Knitwear", "1"),
        ("Knitwear", "Knitwear", "0"),
        ("T-Shirt", "", ""),
    ]
    assert [(r["split"], r["is_noisy"]) for r in rows[6:]] == [("val", "0"), ("test", "0"), ("test", "0")]
    code, _, err = run_cli(
        "dataset", "clothing1m", root, "--split", "train", "--known-noise", "-o", tmp_path / "k.csv", "-q"
    )
    assert code == 0 and len(read_csv_rows(tmp_path / "k.csv")) == 3
    write_lines(root / "clean_label_kv.txt", ["images/0/00/0.jpg 14"])
    code, _, err = run_cli("dataset", "clothing1m", root, "-o", tmp_path / "b.csv")
    assert code == 2 and "clean_label_kv.txt:1" in err and "outside the class list" in err


def test_real_noise_csv_goes_through_extract_reader_and_few_shot_corrupt(tmp_path, run_cli):
    """A dataset CSV with clean_label/is_noisy is an image list for extract and, with `corrupt --shots K
    --rate 0`, a few-shot labels file that keeps the release's own truth."""
    from promptcli.io.image_sources import read_image_csv

    root = make_clothing1m(tmp_path / "clothing1m")
    csv_path = tmp_path / "c.csv"
    assert (
        run_cli("dataset", "clothing1m", root, "--split", "train", "--known-noise", "-o", csv_path, "-q")[0]
        == 0
    )
    source = read_image_csv(csv_path)
    assert source.classnames == ["Knitwear", "Shirt", "T-Shirt"] and len(source) == 3
    code, _, err = run_cli(
        "corrupt", csv_path, "--shots", "1", "--rate", "0", "--seed", "1", "-o", tmp_path / "k1.csv", "-q"
    )
    assert code == 0, err
    rows = read_csv_rows(tmp_path / "k1.csv")
    assert list(rows[0]) == ["path", "label", "split", "clean_label", "is_noisy"]
    assert sorted((r["label"], r["clean_label"], r["is_noisy"]) for r in rows) == [
        ("Knitwear", "Knitwear", "0"),
        ("Shirt", "Knitwear", "1"),
        ("T-Shirt", "T-Shirt", "0"),
    ]
    side = json.loads((tmp_path / "k1.csv.json").read_text())
    assert side["input_truth"] == {"kept": True, "n_noise_known": 3, "n_noisy": 1} and side["n_noisy"] == 0
    code, _, err = run_cli("corrupt", csv_path, "--rate", "0.5", "-o", tmp_path / "n.csv")
    assert code == 2 and "already noisy" in err


def test_join_labels_treats_blank_truth_as_unknown(tmp_path):
    from promptcli.io.features import FeatureSet
    from promptcli.io.labels import LabelTable, join_labels

    fs = FeatureSet(
        tmp_path / "f.h5",
        np.eye(3, dtype=np.float32),
        ["a", "b", "c"],
        np.array([0, 1, 0]),
        [""] * 3,
        ["x", "y"],
    )
    full = [
        {"path": p, "label": "x", "clean_label": c, "is_noisy": n}
        for p, c, n in (("a", "x", "0"), ("b", "y", "1"))
    ]
    joined = join_labels(fs, LabelTable("l.csv", ["path", "label", "clean_label", "is_noisy"], full))
    assert (
        joined.is_noisy.tolist() == [False, True]
        and joined.clean.tolist() == [0, 1]
        and joined.n_truth_unknown == 0
    )
    partial = full + [{"path": "c", "label": "y", "clean_label": "", "is_noisy": ""}]
    joined = join_labels(fs, LabelTable("l.csv", ["path", "label", "clean_label", "is_noisy"], partial))
    assert joined.is_noisy is None and joined.clean is None and joined.n_truth_unknown == 1
    assert joined.labels.tolist() == [0, 0, 1]


def make_webvision(root: Path) -> Path:
    synsets = [f"n{i:08d} class_{i}, other name" for i in range(52)]
    synsets[51] = "n00000051 class_50, twin"  # the same first synonym as class 50
    write_lines(root / "info" / "synsets.txt", synsets)
    google = [f"google/q{c:04d}/{c}.jpg {c}" for c in (0, 1, 49, 50)]
    flickr = [f"flickr/q{c:04d}/{c}.jpg {c}" for c in (2, 51)]
    val = [f"val{c:06d}.jpg {c}" for c in (0, 50)]
    for line in google + flickr:
        img(root / line.split()[0])
    for line in val:
        img(root / "val_images_256" / line.split()[0])
    write_lines(root / "info" / "train_filelist_google.txt", google)
    write_lines(root / "info" / "train_filelist_flickr.txt", flickr)
    write_lines(root / "info" / "val_filelist.txt", val)
    return root


@pytest.mark.parametrize("label", ["1_0", "\u0663", "+1"])
def test_a_label_int_reads_but_a_list_file_does_not_hold_is_refused(tmp_path, run_cli, label):
    # int() read "1_0" as 10 and "\u0663" (Arabic-Indic three) as 3: a damaged line gave another label
    root = make_webvision(tmp_path / "wv")
    write_lines(root / "info" / "train_filelist_google.txt", [f"google/q0000/0.jpg\t{label}"])
    code, _, err = run_cli("dataset", "webvision", root, "-o", tmp_path / "x.csv")
    assert code == 2 and "train_filelist_google.txt:1: label" in err and "is not an integer" in err, err


def test_class_names_one_prompt_reads_alike_are_refused_or_told_apart(tmp_path, run_cli):
    # "Fish"/"fish" and NFC/NFD "café" went into the CSV as two classes, which extract then refused
    root = tmp_path / "imagenet"
    for wnid in ("n01440764", "n01443537"):
        img(root / "images" / "train" / wnid / "a.jpg")
        (root / "images" / "val" / wnid).mkdir(parents=True)
    for names, expected in (
        (["Fish", "fish"], "classes 0 and 1 read the same in a prompt ('Fish' and 'fish'"),
        (["caf\u00e9", "cafe\u0301"], "classes 0 and 1 spell one name in two Unicode forms"),
    ):
        write_lines(root / "classnames.txt", [f"n01440764 {names[0]}", f"n01443537 {names[1]}"])
        code, _, err = run_cli("dataset", "imagenet", root, "-o", tmp_path / "x.csv")
        assert code == 2 and f"classnames.txt: {expected}" in err, err
    # WebVision's synsets hold ImageNet's "Cardigan" (the corgi) and "cardigan" (the sweater): both get their wnid
    wv = make_webvision(tmp_path / "wv")
    synsets = (wv / "info" / "synsets.txt").read_text().splitlines()
    synsets[0], synsets[1] = "n02113186 Cardigan, Cardigan Welsh corgi", "n02963159 cardigan"
    write_lines(wv / "info" / "synsets.txt", synsets)
    code, _, err = run_cli("dataset", "webvision", wv, "-o", tmp_path / "w.csv", "-q")
    assert code == 0, err
    labels = {r["label"] for r in read_csv_rows(tmp_path / "w.csv")}
    assert {"Cardigan (n02113186)", "cardigan (n02963159)"} <= labels


def test_webvision_and_mini_webvision(tmp_path, run_cli):
    root = make_webvision(tmp_path / "webvision")
    code, _, err = run_cli(
        "dataset", "webvision", root, "-o", tmp_path / "w.csv", "--classnames-out", tmp_path / "wc.txt", "-q"
    )
    assert code == 0, err
    rows = read_csv_rows(tmp_path / "w.csv")
    assert list(rows[0]) == ["path", "label", "split"] and len(rows) == 8
    names = (tmp_path / "wc.txt").read_text().splitlines()
    assert (
        len(names) == 52
        and names[0] == "class 0"
        and names[50:] == ["class 50 (n00000050)", "class 50 (n00000051)"]
    )
    code, _, err = run_cli(
        "dataset",
        "mini-webvision",
        root,
        "-o",
        tmp_path / "m.csv",
        "--classnames-out",
        tmp_path / "mc.txt",
        "-q",
    )
    assert code == 0, err
    rows = read_csv_rows(tmp_path / "m.csv")
    assert [(r["label"], r["split"]) for r in rows] == [
        ("class 0", "train"),
        ("class 1", "train"),
        ("class 49", "train"),
        ("class 0", "val"),
    ]
    assert len((tmp_path / "mc.txt").read_text().splitlines()) == 50
    write_lines(root / "info" / "val_filelist.txt", ["val000000.jpg 52"])
    code, _, err = run_cli("dataset", "webvision", root, "-o", tmp_path / "b.csv")
    assert code == 2 and "val_filelist.txt:1" in err and "outside the class list" in err


# --- CIFAR-N ----------------------------------------------------------------------------------------


def make_cifar(
    root: Path, hundred: bool, per_batch: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A CIFAR binary release with ``per_batch`` records per file; returns (train labels, train images, names)."""
    rng = np.random.default_rng(seed)
    n_classes = 4
    names = ["aquarium_fish", "bed", "bee", "cup"] if hundred else ["airplane", "automobile", "bird", "cat"]
    folder = root / ("cifar-100-binary" if hundred else "cifar-10-batches-bin")
    write_lines(folder / ("fine_label_names.txt" if hundred else "batches.meta.txt"), names)
    files = ["train.bin"] if hundred else [f"data_batch_{i}.bin" for i in range(1, 6)]
    n_per = per_batch * (5 if hundred else 1)
    labels, images = [], []
    for name in [*files, "test.bin" if hundred else "test_batch.bin"]:
        y = rng.integers(0, n_classes, n_per).astype(np.uint8)
        x = rng.integers(0, 256, (n_per, 3, 32, 32)).astype(np.uint8)
        head = np.stack([np.zeros_like(y), y], 1) if hundred else y[:, None]
        (np.concatenate([head, x.reshape(n_per, -1)], 1)).tofile(folder / name)
        labels.append(y)
        images.append(x.transpose(0, 2, 3, 1))
    # the last file is the test batch
    return np.concatenate(labels[:-1]).astype(np.int64), np.concatenate(images[:-1]), names


def test_cifar10n_writes_lossless_pngs_and_human_labels(tmp_path, run_cli):
    import torch

    clean, images, names = make_cifar(tmp_path, hundred=False)
    worse = (clean + np.arange(len(clean)) % 2) % 4  # every other label wrong
    torch.save(
        {"clean_label": clean, "worse_label": worse, "aggre_label": clean.copy()},
        tmp_path / "CIFAR-10_human.pt",
    )
    png = tmp_path / "png"
    code, stdout, err = run_cli(
        "dataset", "cifar10n", tmp_path, "--images-dir", png, "-o", tmp_path / "c.csv", "--json"
    )
    assert code == 0, err
    rows = read_csv_rows(tmp_path / "c.csv")
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 15 and len(rows) == 18
    assert [r["label"] for r in train] == [names[y] for y in worse]
    assert [r["clean_label"] for r in train] == [names[y] for y in clean]
    assert [r["is_noisy"] for r in train] == [str(int(a != b)) for a, b in zip(worse, clean)]
    for i in (0, 7, 14):  # lossless: the PNG decodes to the release's pixels
        assert np.array_equal(np.asarray(Image.open((tmp_path / train[i]["path"]).resolve())), images[i])
    assert json.loads(stdout)["splits"]["train"]["n_noisy"] == int((worse != clean).sum())
    mtime = os.stat(png / "train" / "00000.png").st_mtime_ns
    code, _, err = run_cli(
        "dataset",
        "cifar10n",
        tmp_path,
        "--images-dir",
        png,
        "--noise-label",
        "aggre",
        "-o",
        tmp_path / "a.csv",
        "-q",
    )
    assert code == 0, err
    assert os.stat(png / "train" / "00000.png").st_mtime_ns == mtime  # same pixels: kept
    assert all(r["is_noisy"] == "0" for r in read_csv_rows(tmp_path / "a.csv"))
    # a PNG with other pixels is not overwritten without --force
    Image.new("RGB", (32, 32)).save(png / "train" / "00003.png")
    code, _, err = run_cli("dataset", "cifar10n", tmp_path, "--images-dir", png, "-o", tmp_path / "b.csv")
    assert code == 2 and "00003.png: exists with other pixels" in err
    assert (
        run_cli(
            "dataset", "cifar10n", tmp_path, "--images-dir", png, "-o", tmp_path / "b.csv", "--force", "-q"
        )[0]
        == 0
    )
    code, _, err = run_cli("dataset", "cifar10n", tmp_path, "-o", tmp_path / "d.csv")
    assert code == 2 and "--images-dir" in err
    (tmp_path / "notadir").touch()
    for images_dir in ("notadir", "notadir/sub"):
        code, _, err = run_cli(
            "dataset", "cifar10n", tmp_path, "--images-dir", tmp_path / images_dir, "-o", tmp_path / "d.csv"
        )
        assert code == 2 and "--images-dir" in err and "is a file, not a folder" in err, err
    (tmp_path / "png2").mkdir()
    (tmp_path / "png2" / "test").touch()
    code, _, err = run_cli(
        "dataset", "cifar10n", tmp_path, "--images-dir", tmp_path / "png2", "-o", tmp_path / "d.csv"
    )
    assert code == 2 and "--images-dir" in err and "png2/test" in err, err
    assert not (tmp_path / "d.csv").exists()
    code, _, err = run_cli(
        "dataset",
        "cifar10n",
        tmp_path,
        "--images-dir",
        png,
        "--noise-label",
        "noisy",
        "-o",
        tmp_path / "d.csv",
    )
    assert code == 2 and "worst, aggre" in err


class Payload:
    """Unpickling this would run os.system: a label file must never be able to do that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_n_label_files_never_run_code(tmp_path, run_cli):
    import torch

    clean, _, _ = make_cifar(tmp_path, hundred=True)
    args = [
        "dataset",
        "cifar100n",
        tmp_path,
        "--images-dir",
        tmp_path / "png",
        "-o",
        tmp_path / "c.csv",
        "-q",
    ]
    marker = tmp_path / "pwned"
    torch.save(
        {"clean_label": clean, "noisy_label": clean, "x": Payload(marker)}, tmp_path / "CIFAR-100_human.pt"
    )
    code, _, err = run_cli(*args)
    assert code == 2 and "weights_only=True" in err and "np.savez" in err and "--noise-file" in err
    assert not marker.exists()
    assert len(err.strip().splitlines()) == 1
    np.savez(tmp_path / "labels.npz", clean_label=clean, noisy_label=(clean + 1) % 4)
    code, _, err = run_cli(*args, "--noise-file", tmp_path / "labels.npz")
    assert code == 0, err
    rows = read_csv_rows(tmp_path / "c.csv")
    assert rows[0]["label"] != rows[0]["clean_label"] and rows[0]["is_noisy"] == "1"
    assert {r["clean_label"] for r in rows} <= {"aquarium fish", "bed", "bee", "cup"}
    np.save(tmp_path / "labels.npy", np.array([{"clean_label": clean}], dtype=object))
    code, _, err = run_cli(*args, "--noise-file", tmp_path / "labels.npy", "--force")
    assert code == 2 and "np.savez" in err
    np.savez(tmp_path / "other.npz", clean_label=(clean + 1) % 4, noisy_label=clean)
    code, _, err = run_cli(*args, "--noise-file", tmp_path / "other.npz", "--force")
    assert code == 2 and "differs from the binary release" in err


@pytest.mark.parametrize(
    ("suffix", "damage"),
    [("npz", "empty"), ("npz", "half"), ("pt", "empty"), ("pt", "half"), ("pt", "garbage")],
)
def test_a_truncated_or_damaged_cifar_n_label_file_is_an_input_error(tmp_path, suffix, damage):
    """An empty .npz raised EOFError (which the CLI reported as Ctrl-C, exit 130), a truncated one BadZipFile,
    a pickle header on junk KeyError from torch.load, and a truncated .pt read as one needing conversion."""
    import torch

    from promptcli.datasets.cifar_n import load_label_arrays
    from promptcli.errors import InputError

    labels = np.arange(40) % 4
    path = tmp_path / f"labels.{suffix}"
    if suffix == "npz":
        np.savez(path, clean_label=labels, noisy_label=labels)
    else:
        torch.save({"clean_label": labels, "noisy_label": labels}, path)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "half": data[: len(data) // 2], "garbage": b"\x80\x04junk" * 10}[damage])
    with pytest.raises(InputError, match="unreadable label file, truncated or damaged .*download it again"):
        load_label_arrays(path)
