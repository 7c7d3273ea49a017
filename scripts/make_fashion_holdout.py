"""Write Fashion-MNIST images *outside* the bundled demo subset as an ImageFolder tree.

For checking results on images nobody designed on: the same classes, sizes and look as the demo
(200 train / 100 test images per class, inverted greyscale PNGs, class folders as ``demo-images``
writes them), drawn with ``--seed`` from the official files of the Debian package
``dataset-fashion-mnist`` after removing every image the bundled subset holds (its
``{split}_source_index``).

    python scripts/make_fashion_holdout.py OUT [--source DIR] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from promptcli.io.demo_data import class_folder, load_subset, to_pil

SOURCE = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": "train", "test": "t10k"}
PER_CLASS = {"train": 200, "test": 100}


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file (the MNIST format) as a uint8 array."""
    import gzip

    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose a new folder")
    subset = load_subset()
    names = subset["class_names"]
    rng = np.random.default_rng(args.seed)
    record: dict[str, object] = {"seed": args.seed, "source": str(args.source), "excluded": "bundled subset"}
    tmp = args.out.with_name(args.out.name + ".partial")
    for split, stem in FILES.items():
        images = read_idx(args.source / f"{stem}-images-idx3-ubyte.gz")
        labels = read_idx(args.source / f"{stem}-labels-idx1-ubyte.gz")
        excluded = set(subset[f"{split}_source_index"].tolist())
        chosen = []
        for c, name in enumerate(names):
            pool = np.array([i for i in np.flatnonzero(labels == c) if i not in excluded])
            picks = np.sort(rng.choice(pool, size=PER_CLASS[split], replace=False))
            folder = tmp / split / class_folder(name)
            folder.mkdir(parents=True, exist_ok=True)
            for i in picks:
                to_pil(images[i]).save(folder / f"{stem}-{i:05d}.png")
            chosen.extend(int(i) for i in picks)
        assert not excluded & set(chosen), "a bundled image was drawn"
        record[f"{split}_source_index"] = chosen
    (tmp / "holdout.json").write_text(json.dumps(record) + "\n")
    tmp.rename(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
