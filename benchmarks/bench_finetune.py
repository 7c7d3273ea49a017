"""Benchmark `promptcli tune --method finetune`: training throughput against a bare loop, and memory.

    python benchmarks/bench_finetune.py                  # small CLIP, 128 images, 2 repeats, memory at 128 vs 512
    python benchmarks/bench_finetune.py --model promptcli-demo --images 64 --memory-sizes 64 256

* **Speed**: images/s of the training pass of one fine-tuning epoch of
  ``promptcli.learning.finetune.finetune`` (what ``tune --method finetune`` runs: JPEG decoding and
  the random-resized-crop + flip view in ``--workers`` processes, tower + head forward and backward,
  SGD step) against a bare loop of the same model, trainable tensors, batch size, optimiser and loss on
  centre crops pre-loaded into one tensor. Both exclude their first batch (loader start, allocator
  warm-up). The ratio is finetune / bare (1.0 = the input pipeline costs nothing). The epoch also ends
  with a pass over the plain centre crops (log accuracy, OT split); its time is reported separately.
  The two are run interleaved ``--repeats`` times and the best of each is kept.
* **Memory**: one fine-tuning epoch per dataset size, each in a fresh process, while a thread samples
  the summed PSS of the process and its loader workers (``bench_extract.TreeMemory``).

Images: JPEG quality 90, 256-500 px per side (``bench_extract.make_images``), 4 class folders.
Weights are random (speed does not depend on them); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_extract import SMALL_CONFIG, TreeMemory, _main_hwm, make_images  # noqa: E402

CLASSES = 4


def image_folder(root: Path, n: int) -> Path:
    folder = root / f"images-{n}"
    for c in range(CLASSES):
        make_images(folder / f"class{c}", n // CLASSES, seed=c)
    return folder


def load(model: str, workdir: Path):
    """The model, saved to / loaded from a checkpoint so that features files name their weights."""
    from safetensors.torch import save_file

    from promptcli.models.loading import load_model

    if model != "small":
        return load_model(model, None, device="cpu")
    cfg = workdir / "small-clip.json"
    cfg.write_text(json.dumps(SMALL_CONFIG))
    weights = workdir / "small-clip.safetensors"
    if not weights.exists():
        loaded = load_model("small-clip", None, cfg, device="cpu", random_weights=True, seed=0)
        save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(weights))
    return load_model("small-clip", str(weights), cfg, device="cpu")


def prepare(workdir: Path, model: str, n: int, workers: int) -> tuple[Path, Path]:
    """Features file (fp32) and clean labels CSV of ``n`` generated images."""
    from promptcli.extraction.extract import ExtractOptions, extract_features
    from promptcli.io.features import read_features
    from promptcli.io.image_sources import read_image_source

    folder = image_folder(workdir, n)
    feats = workdir / f"{model}-{n}.h5"
    if not feats.exists():
        loaded = load(model, workdir)
        extract_features(
            read_image_source(folder), loaded, feats, ExtractOptions(dtype="float32", workers=workers)
        )
    fs = read_features(feats, load_views=False)
    labels = workdir / f"labels-{n}.csv"
    labels.write_text(
        "path,label\n" + "".join(f"{p},{fs.classnames[y]}\n" for p, y in zip(fs.paths, fs.labels))
    )
    return feats, labels


def options(args: argparse.Namespace):
    from promptcli.learning.finetune import FinetuneOptions
    from promptcli.learning.options import TuneOptions

    tune = TuneOptions(method="finetune", epochs=1, warmup_epochs=0, lr=0.002, batch_size=args.batch_size)
    return tune, FinetuneOptions(workers=args.workers)


def finetune_speed(args: argparse.Namespace, feats: Path, labels: Path) -> dict:
    from promptcli.learning.finetune import finetune

    stamps: list[tuple[float, int]] = []
    tune, ft = options(args)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        start = time.perf_counter()
        summary = finetune(
            feats, labels, Path(tmp) / "ft.safetensors", tune, ft, device="cpu",
            on_images=lambda k: stamps.append((time.perf_counter(), k)),
        )  # fmt: skip
        total = time.perf_counter() - start
    images = sum(k for _, k in stamps[1:])
    train_s = stamps[-1][0] - stamps[0][0]
    epoch_s = summary["seconds_per_epoch"]
    return {
        "images_per_s": images / train_s,
        "train_pass_s": train_s,
        "epoch_s": epoch_s,
        "call_s": total,
    }


def bare_speed(args: argparse.Namespace, feats: Path) -> dict:
    """The same model and step on pre-loaded centre crops (no decoding, no augmentation)."""
    import torch

    from promptcli.extraction.decode import decode_rgb
    from promptcli.io.features import read_features
    from promptcli.io.image_dataset import image_files
    from promptcli.learning.finetune import TowerClassifier, zero_shot_head
    from promptcli.learning.losses import make_loss
    from promptcli.learning.training import make_optimizer
    from promptcli.models.image_adapter import set_trainable, trainable_names

    fs = read_features(feats, load_views=False)
    loaded = load(args.model, Path(args.workdir))
    pixels = torch.stack(
        [loaded.preprocess(decode_rgb(f)) for f in image_files(fs.attrs, fs.paths, feats, None)]
    )
    labels = torch.from_numpy(fs.labels)
    visual = loaded.model.visual
    head = zero_shot_head(loaded, list(fs.classnames), "a photo of a {}.")
    conv = sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules()) > 1
    if conv:
        visual.to(memory_format=torch.channels_last)
    model = TowerClassifier(visual, head, conv).eval()
    params = set_trainable(visual, trainable_names(visual, "all")[0])
    tune, _ = options(args)
    optim = tune.optim_config(5e-4)
    optimizer = make_optimizer([{"params": params, "weight_decay": 5e-4}, *head.param_groups(5e-4)], optim)
    loss_fn = make_loss("ce")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).split(args.batch_size)
    stamps = []
    for batch in order:
        loss = loss_fn(model(pixels[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stamps.append((time.perf_counter(), len(batch)))
    images = sum(k for _, k in stamps[1:])
    return {"images_per_s": images / (stamps[-1][0] - stamps[0][0])}


def memory_child(args: argparse.Namespace) -> None:
    import torch

    from promptcli.learning.finetune import finetune

    torch.set_num_threads(args.threads)
    feats, labels = prepare(Path(args.workdir), args.model, args.n, args.workers)
    tune, ft = options(args)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, TreeMemory() as mem:
        start = time.perf_counter()
        finetune(feats, labels, Path(tmp) / "m.safetensors", tune, ft, device="cpu")
        seconds = time.perf_counter() - start
    print(json.dumps({"n_images": args.n, "peak_tree_pss_mb": mem.peak_pss / 2**20,
                      "peak_tree_rss_mb": mem.peak_rss / 2**20, "main_hwm_mb": _main_hwm() / 2**20,
                      "seconds": seconds}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="small", help="small (random-weight CLIP, 224 px) or an open_clip name"
    )
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-sizes", type=int, nargs=2, default=[128, 512])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "promptcli-bench-finetune"))
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.memory_child:
        memory_child(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    feats, labels = prepare(Path(args.workdir), args.model, args.images, args.workers)
    runs: dict[str, list[dict]] = {"finetune": [], "bare": []}
    for _ in range(args.repeats):
        runs["finetune"].append(finetune_speed(args, feats, labels))
        runs["bare"].append(bare_speed(args, feats))
    best = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in runs.items()}
    memory = []
    for n in args.memory_sizes:
        cmd = [sys.executable, __file__, "--memory-child", "--n", str(n), "--model", args.model, "--workdir",
               args.workdir, "--workers", str(args.workers), "--threads", str(args.threads),
               "--batch-size", str(args.batch_size)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"memory run at {n} images failed:\n{done.stderr[-3000:]}")
        memory.append(json.loads(done.stdout.strip().splitlines()[-1]))
    report = {
        "model": args.model,
        "images": args.images,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "threads": args.threads,
        "finetune": best["finetune"],
        "bare": best["bare"],
        "ratio": best["finetune"]["images_per_s"] / best["bare"]["images_per_s"],
        "runs": runs,
        "memory": memory,
        "command": " ".join(sys.argv),
    }
    print(f"finetune training pass: {best['finetune']['images_per_s']:.1f} images/s "
          f"(epoch incl. plain pass {best['finetune']['epoch_s']:.1f} s)")  # fmt: skip
    print(
        f"bare forward+backward:  {best['bare']['images_per_s']:.1f} images/s   ratio {report['ratio']:.3f}"
    )
    for m in memory:
        print(f"memory at {m['n_images']} images: peak PSS {m['peak_tree_pss_mb']:.0f} MB, "
              f"main HWM {m['main_hwm_mb']:.0f} MB")  # fmt: skip
    out = HERE / "results" / f"finetune-{args.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
