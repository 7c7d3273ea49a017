"""The known dataset layouts, as data: name, what it is, the files it needs, where to get them, its reader.

``LAYOUTS`` is the one definition of the layout names: ``promptcli dataset NAME`` accepts its keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from promptcli.datasets.base import Listing
from promptcli.datasets.coop import COOP_DATASETS

COOP_GUIDE = "CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md)"


@dataclass(frozen=True)
class ReadOptions:
    """Options some layouts take (the others ignore them; the CLI refuses them there)."""

    split_file: Path | None = None
    test_root: Path | None = None
    images_dir: Path | None = None
    noise_label: str | None = None
    noise_file: Path | None = None
    force: bool = False


@dataclass(frozen=True)
class Layout:
    name: str
    title: str
    needs: tuple[str, ...]  # files and folders under ROOT
    source: str  # where the dataset's official README says to get them
    options: tuple[str, ...]  # the layout-specific CLI options it takes
    read: Callable[[Path, ReadOptions], Listing]


def _coop(name: str) -> Callable[[Path, ReadOptions], Listing]:
    def read(root: Path, opts: ReadOptions) -> Listing:
        from promptcli.datasets.coop import read_coop

        return read_coop(name, root, opts.split_file)

    return read


def _split_json(root: Path, opts: ReadOptions) -> Listing:
    from promptcli.datasets.coop import read_split_json
    from promptcli.errors import InputError

    if opts.split_file is None:
        raise InputError(
            "split-json needs the split file", where="--split-file", hint="give --split-file split.json"
        )
    return read_split_json("split-json", opts.split_file, root, None)


def _imagenet(root: Path, opts: ReadOptions) -> Listing:
    from promptcli.datasets.imagenet import read_imagenet

    return read_imagenet("imagenet", root)


def _food101n(root: Path, opts: ReadOptions) -> Listing:
    from promptcli.datasets.food101n import read_food101n

    return read_food101n("food101n", root, opts.test_root)


def _clothing1m(root: Path, opts: ReadOptions) -> Listing:
    from promptcli.datasets.clothing1m import read_clothing1m

    return read_clothing1m("clothing1m", root)


def _webvision(name: str) -> Callable[[Path, ReadOptions], Listing]:
    def read(root: Path, opts: ReadOptions) -> Listing:
        from promptcli.datasets.webvision import read_webvision

        return read_webvision(name, root)

    return read


def _cifar_n(name: str) -> Callable[[Path, ReadOptions], Listing]:
    def read(root: Path, opts: ReadOptions) -> Listing:
        from promptcli.datasets.cifar_n import read_cifar_n

        return read_cifar_n(name, root, opts.images_dir, opts.noise_label, opts.noise_file, opts.force)

    return read


def _coop_layout(key: str) -> Layout:
    d = COOP_DATASETS[key]
    what = "CoOp split file" if d.split_file else "the release's variant lists, as CoOp reads them"
    return Layout(
        key,
        f"{d.name} ({what}; ROOT is {d.folder}/ or the DATA folder holding it)",
        d.required(),
        f"the {d.name} section of {COOP_GUIDE}: the images' link"
        + (" and the split file" if d.split_file else ""),
        ("--split-file",),
        _coop(key),
    )


def _layouts() -> dict[str, Layout]:
    others = (
        Layout(
            "imagenet",
            "ImageNet as CoOp lays it out (val/ is the test split)",
            ("images/train/<wnid>/", "images/val/<wnid>/", "classnames.txt"),
            f"images: image-net.org (ILSVRC2012); classnames.txt: {COOP_GUIDE}, section ImageNet",
            (),
            _imagenet,
        ),
        Layout(
            "split-json",
            "any CoOp-style split JSON ([path, label, class name] rows); ROOT is the image folder",
            ("--split-file JSON",),
            "write it yourself, or any split_zhou_*.json",
            ("--split-file",),
            _split_json,
        ),
        Layout(
            "food101n",
            "Food-101N: real noise; is_noisy for the verified rows; test = Food-101's test (--test-root)",
            (
                "images/<class>/",
                "meta/classes.txt",
                "meta/imagelist.tsv",
                "meta/verified_train.tsv",
                "meta/verified_val.tsv",
            ),
            "kuanghuei.github.io/Food-101N (Food-101N_release.zip); Food-101: data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
            ("--test-root",),
            _food101n,
        ),
        Layout(
            "clothing1m",
            "Clothing1M: real noise; clean_label/is_noisy where an image has both labels",
            (
                "images/",
                "category_names_eng.txt",
                "noisy_label_kv.txt",
                "clean_label_kv.txt",
                "noisy_train_key_list.txt",
                "clean_val_key_list.txt",
                "clean_test_key_list.txt",
            ),
            "github.com/Cysu/noisy_label: its README says to ask the authors by email for access",
            (),
            _clothing1m,
        ),
        Layout(
            "webvision",
            "WebVision 1.0: Google and Flickr training images, 1000 classes; train and val",
            (
                "info/synsets.txt",
                "info/train_filelist_google.txt",
                "info/train_filelist_flickr.txt",
                "info/val_filelist.txt",
                "google/",
                "flickr/",
                "val_images_256/",
            ),
            "data.vision.ee.ethz.ch/cvl/webvision/download.html (WebVision 1.0, resized images)",
            (),
            _webvision("webvision"),
        ),
        Layout(
            "mini-webvision",
            "mini-WebVision: WebVision's Google images of the first 50 classes; train and val",
            (
                "info/synsets.txt",
                "info/train_filelist_google.txt",
                "info/val_filelist.txt",
                "google/",
                "val_images_256/",
            ),
            "data.vision.ee.ethz.ch/cvl/webvision/download.html (WebVision 1.0, resized images)",
            (),
            _webvision("mini-webvision"),
        ),
        Layout(
            "cifar10n",
            "CIFAR-10N: human labels (--noise-label worst|aggre|random1..3); images written as PNG to --images-dir",
            ("cifar-10-batches-bin/", "CIFAR-10_human.pt (or --noise-file)"),
            "labels: github.com/UCSC-REAL/cifar-10-100n (data/); images: www.cs.toronto.edu/~kriz/cifar.html (binary version)",
            ("--images-dir", "--noise-label", "--noise-file"),
            _cifar_n("cifar10n"),
        ),
        Layout(
            "cifar100n",
            "CIFAR-100N: human fine labels (--noise-label noisy); images written as PNG to --images-dir",
            ("cifar-100-binary/", "CIFAR-100_human.pt (or --noise-file)"),
            "labels: github.com/UCSC-REAL/cifar-10-100n (data/); images: www.cs.toronto.edu/~kriz/cifar.html (binary version)",
            ("--images-dir", "--noise-label", "--noise-file"),
            _cifar_n("cifar100n"),
        ),
    )
    return {key: _coop_layout(key) for key in COOP_DATASETS} | {layout.name: layout for layout in others}


LAYOUTS: dict[str, Layout] = _layouts()

# The CoOp benchmark (the paper's datasets), in the order examples/benchmark.sh runs them.
COOP_BENCHMARK: tuple[str, ...] = tuple(COOP_DATASETS)
