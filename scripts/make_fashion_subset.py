"""Make the bundled Fashion-MNIST subset ``promptcli/data/fashion_mnist_subset.npz``.

Source: the Debian package ``dataset-fashion-mnist`` (files in /usr/share/datasets/fashion-mnist),
Fashion-MNIST by Zalando SE, MIT (Expat) licence. The subset is seeded and class-balanced:
200 training and 100 test images per class, drawn from the official train and test files.

    python scripts/make_fashion_subset.py [--source DIR] [--out FILE] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np

SOURCE = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parents[1] / "promptcli" / "data" / "fashion_mnist_subset.npz"
# Readable names for prompts, in label order (0..9) of the official
# T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot.
CLASS_NAMES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
PER_CLASS = {"train": 200, "test": 100}
FILES = {"train": "train", "test": "t10k"}
LICENSE = (
    "Fashion-MNIST, Copyright 2017 Zalando SE (https://github.com/zalandoresearch/fashion-mnist), "
    "MIT (Expat) licence. Subset taken from the Debian package dataset-fashion-mnist."
)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) into a uint8 array."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` indices of each class, drawn without replacement, class by class, sorted within."""
    picks = []
    for c in range(len(CLASS_NAMES)):
        pool = np.flatnonzero(labels == c)
        picks.append(np.sort(rng.choice(pool, size=per_class, replace=False)))
    return np.concatenate(picks)


def make_subset(source: Path, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    sources = {}
    for split, stem in FILES.items():
        images_file = source / f"{stem}-images-idx3-ubyte.gz"
        labels_file = source / f"{stem}-labels-idx1-ubyte.gz"
        images, labels = read_idx(images_file), read_idx(labels_file)
        idx = balanced_indices(labels, PER_CLASS[split], rng)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[idx])
        arrays[f"{split}_labels"] = labels[idx].astype(np.int64)
        arrays[f"{split}_source_index"] = idx.astype(np.int64)
        sources[split] = {
            f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (images_file, labels_file)
        }
    arrays["class_names"] = np.array(CLASS_NAMES)
    meta = {"license": LICENSE, "seed": seed, "per_class": PER_CLASS, "source_sha256": sources}
    arrays["metadata"] = np.array(json.dumps(meta, sort_keys=True))
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="folder with the Fashion-MNIST .gz files")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    arrays = make_subset(args.source, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
