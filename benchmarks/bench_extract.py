"""Benchmark `promptcli extract`: end-to-end speed against bare encoding, and peak memory vs image count.

    python benchmarks/bench_extract.py            # full run (ViT-B-32 random weights, 1k vs 10k memory)
    python benchmarks/bench_extract.py --quick    # a few minutes less: fewer images everywhere

Speed: images/s of ``extract_features`` (decode, preprocess, encode, write the HDF5 file; the same
function the CLI calls) against a bare ``encode_image`` loop over the same images already
preprocessed into one tensor, with the same model, batch size and torch threads.

Memory: each size runs in a fresh process; a sampler thread reads ``/proc`` every 50 ms and keeps
the peak of the summed PSS (proportional set size: shared pages split between the processes that
map them, so forked workers are not double counted) and of the summed RSS over the process and
its data-loading workers.

Nothing is downloaded: the models are built from open_clip configs with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# A small CLIP for memory runs: the real 224 px input pipeline and 512-d features, a cheap encoder.
SMALL_CONFIG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "patch_size": 32, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


# -- images ------------------------------------------------------------------------------------


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs of 256-500 px per side: smooth colour fields plus noise (realistic decode cost)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"img{i:06d}.jpg" for i in range(n)]
    todo = [i for i, f in enumerate(files) if not f.exists()]
    rng = np.random.default_rng(seed)
    for i in todo:
        w, h = (int(v) for v in rng.integers(256, 501, size=2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = rng.uniform(0, 6.3, size=3)
        freq = rng.uniform(0.005, 0.05, size=3)
        base = np.stack([127 + 100 * np.sin(freq[c] * (xx + yy * (c + 1)) + phase[c]) for c in range(3)], -1)
        pixels = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(files[i], quality=90)
    return files


def image_list(folder: Path, files: list[Path], name: str) -> Path:
    """A CSV image list (path column) over ``files``."""
    csv = folder / f"{name}.csv"
    csv.write_text("path\n" + "".join(f"{f.name}\n" for f in files))
    return csv


# -- memory ------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as handle:
                out += [int(c) for c in handle.read().split()]
    except OSError:
        pass
    return out


def _rollup(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in bytes."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, rss


class TreeMemory:
    """Peak summed PSS and RSS of this process and its descendants, sampled in a thread."""

    def __init__(self, every_s: float = 0.05) -> None:
        self.every_s, self.peak_pss, self.peak_rss = every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids, frontier = [], [os.getpid()]
            while frontier:
                pid = frontier.pop()
                pids.append(pid)
                frontier += _children(pid)
            sizes = [_rollup(p) for p in pids]
            self.peak_pss = max(self.peak_pss, sum(s[0] for s in sizes))
            self.peak_rss = max(self.peak_rss, sum(s[1] for s in sizes))
            self._stop.wait(self.every_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _main_hwm() -> int:
    """Peak RSS of this process (VmHWM; ru_maxrss would include the parent's RSS at fork)."""
    with open("/proc/self/status") as handle:
        line = next(x for x in handle if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def memory_child(args: argparse.Namespace) -> None:
    """One memory measurement, in its own process: extract ``args.n`` images, print JSON."""
    import torch

    from promptcli.extraction.extract import extract_features
    from promptcli.io.image_sources import read_image_source

    torch.set_num_threads(args.threads)
    loaded = _load(args.memory_model, Path(args.workdir))
    source = read_image_source(Path(args.csv))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, TreeMemory() as mem:
        start = time.perf_counter()
        extract_features(source, loaded, Path(tmp) / "m.h5", _options(args))
        seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "n_images": len(source),
                "peak_tree_pss_mb": mem.peak_pss / 2**20,
                "peak_tree_rss_mb": mem.peak_rss / 2**20,
                "main_hwm_mb": _main_hwm() / 2**20,
                "seconds": seconds,
            }
        )
    )


# -- speed -------------------------------------------------------------------------------------


def _load(model: str, workdir: Path):
    from promptcli.models.loading import load_model

    if model == "small":
        cfg = workdir / "small-clip.json"
        cfg.write_text(json.dumps(SMALL_CONFIG))
        return load_model("small-clip", None, cfg, device="cpu")
    return load_model(model, None, device="cpu")  # no --pretrained: random weights, nothing fetched


def _options(args: argparse.Namespace):
    from promptcli.extraction.extract import ExtractOptions

    return ExtractOptions(batch_size=args.batch_size, workers=args.workers, dtype="float16")


def measure_speed(args: argparse.Namespace, csv: Path) -> dict:
    import torch

    from promptcli.extraction.extract import encode_images, extract_features
    from promptcli.io.image_sources import read_image_source

    torch.set_num_threads(args.threads)
    loaded = _load(args.model, Path(args.workdir))
    source = read_image_source(csv)
    from PIL import Image

    pixels = torch.stack([loaded.preprocess(Image.open(f).convert("RGB")) for f in source.files])
    encode_images(loaded, pixels[: args.batch_size])  # warm-up (allocator, kernels)

    def bare() -> float:
        start = time.perf_counter()
        for i in range(0, len(pixels), args.batch_size):
            encode_images(loaded, pixels[i : i + args.batch_size])
        return time.perf_counter() - start

    def extract() -> float:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            start = time.perf_counter()
            extract_features(source, loaded, Path(tmp) / "s.h5", _options(args))
            return time.perf_counter() - start

    # interleaved repeats, best of each: other load on the machine hits both alike
    bare_s, extract_s = [], []
    for _ in range(args.repeats):
        bare_s.append(bare())
        extract_s.append(extract())
    n = len(source)
    return {
        "model": args.model,
        "n_images": n,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch_threads": args.threads,
        "bare_images_per_s": n / min(bare_s),
        "extract_images_per_s": n / min(extract_s),
        "ratio": min(bare_s) / min(extract_s),
        "bare_seconds": bare_s,
        "extract_seconds": extract_s,
    }


def measure_memory(args: argparse.Namespace, folder: Path, files: list[Path]) -> list[dict]:
    rows = []
    for n in args.memory_sizes:
        csv = image_list(folder, files[:n], f"mem-{n}")
        cmd = [sys.executable, __file__, "--memory-child", "--csv", str(csv), "--workdir", args.workdir]
        cmd += ["--memory-model", args.memory_model, "--threads", str(args.threads)]
        cmd += ["--workers", str(args.workers), "--batch-size", str(args.batch_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="256 images for speed, 200 vs 2000 for memory")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model for the speed run, or 'small'")
    parser.add_argument(
        "--memory-model", default="small", help="model for the memory runs ('small' or a name)"
    )
    parser.add_argument("--speed-images", type=int, default=1024)
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (main process)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "promptcli-bench"))
    parser.add_argument("--json", type=Path, default=HERE / "results" / "extract.json")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--csv", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_child:
        memory_child(args)
        return
    if args.quick:
        args.speed_images, args.memory_sizes, args.repeats = 256, [200, 2000], 1
    folder = Path(args.workdir) / "images"
    files = make_images(folder, max(args.speed_images, *args.memory_sizes))
    speed = measure_speed(args, image_list(folder, files[: args.speed_images], "speed"))
    memory = measure_memory(args, folder, files)
    growth = memory[-1]["peak_tree_pss_mb"] / memory[0]["peak_tree_pss_mb"] - 1
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": __import__("torch").__version__,
            "load_average_at_end": os.getloadavg(),
        },
        "speed": speed,
        "memory": memory,
        "memory_model": args.memory_model,
        "memory_growth": growth,
        "targets": {"ratio>=0.85": speed["ratio"] >= 0.85, "memory_growth<0.10": growth < 0.10},
    }
    print_tables(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")


def print_tables(report: dict) -> None:
    s = report["speed"]
    print(f"\nextract speed: {s['model']}, {s['n_images']} images, batch {s['batch_size']}, ", end="")
    print(f"{s['workers']} workers, {s['torch_threads']} torch threads, {report['machine']['cpus']} CPUs")
    print(f"{'':28}{'images/s':>10}")
    print(f"{'bare encode_image loop':28}{s['bare_images_per_s']:>10.1f}")
    print(f"{'extract (end to end)':28}{s['extract_images_per_s']:>10.1f}")
    print(f"{'ratio extract / bare':28}{s['ratio']:>10.3f}   (target >= 0.85)")
    print(f"\nextract peak memory: model {report['memory_model']}, process + workers")
    print(f"{'images':>8}{'PSS MB':>10}{'RSS MB':>10}{'main HWM':>10}{'seconds':>10}")
    for m in report["memory"]:
        print(
            f"{m['n_images']:>8}{m['peak_tree_pss_mb']:>10.0f}{m['peak_tree_rss_mb']:>10.0f}"
            f"{m['main_hwm_mb']:>10.0f}{m['seconds']:>10.1f}"
        )
    print(f"growth of peak PSS: {100 * report['memory_growth']:+.1f}%   (target < 10%)")


if __name__ == "__main__":
    main()
