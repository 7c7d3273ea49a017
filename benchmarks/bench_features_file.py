"""Write and read time of a features file, for this checkout and (optionally) other promptcli source trees.

Each step runs in a fresh process (``PYTHONPATH`` set to the tree), the trees interleaved ``--repeats`` times
with the first one rotating (the process after a large one pays for the memory it freed: a full read of the same
file took 5 to 11 s here), so load on the machine affects them alike; reported per tree and step are the best wall
time, the peak RSS and, with ``--against``, the ratio to the first tree. Steps: ``write`` (``write_features``,
streamed blocks of L2-normalised random float16 rows, ImageNet-like paths), ``index`` (``read_feature_index``:
paths, labels, class list; what ``corrupt`` reads), ``only`` (``read_features(only_paths=...)`` of 16 rows per
class: what ``tune`` reads of a 16-shot labels file), ``full`` (``read_features`` of every row).

    python benchmarks/bench_features_file.py                                # 1,280,000 rows, this checkout
    python benchmarks/bench_features_file.py --against /tmp/old   # git worktree add /tmp/old <commit>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = ("write", "index", "only", "full")

# The child: one step on one file, printing {"seconds", "peak_rss_gb"} as JSON.
CHILD = r"""
import json, resource, sys, time
import numpy as np
from pathlib import Path
from promptcli.io.features import read_feature_index, read_features, write_features

step, out, n, dim, classes = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
paths = [f"train/n{c:08d}/n{c:08d}_{i}.JPEG" for i, c in enumerate(np.arange(n) % classes)]

def blocks():
    rng = np.random.default_rng(0)
    for start in range(0, n, 65536):
        x = rng.standard_normal((min(65536, n - start), dim))
        yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)

t = time.perf_counter()
if step == "write":
    write_features(
        out, features=blocks(), n_rows=n, dim=dim, paths=paths, labels=np.arange(n) % classes,
        splits=["train"] * n, classnames=[f"class {c}" for c in range(classes)], attrs={"model": "bench"},
    )
elif step == "index":
    read_feature_index(out)
elif step == "only":
    read_features(out, only_paths=paths[: 16 * classes])
else:
    read_features(out)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "promptcli": str(Path(__import__("promptcli").__file__).parent.parent), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def _step(tree: Path, step: str, out: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-c", CHILD, step, str(out), str(args.rows), str(args.dim), str(args.classes)]
    # cwd: `python -c` puts the working folder first on sys.path, ahead of PYTHONPATH
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=args.workdir)
    if proc.returncode != 0:
        raise SystemExit(f"{tree} {step} failed: {proc.stderr.strip()[-500:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(result.pop("promptcli")).resolve() != tree:
        raise SystemExit(f"the child did not import promptcli from {tree}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_280_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--against", type=Path, action="append", default=[], help="another source tree")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "promptcli-bench")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "features-file.json")
    args = parser.parse_args()
    trees = [HERE.parent, *(t.resolve() for t in args.against)]
    args.workdir.mkdir(parents=True, exist_ok=True)
    best: dict[tuple[int, str], dict[str, float]] = {}
    for repeat in range(args.repeats):
        order = [(i + repeat) % len(trees) for i in range(len(trees))]  # who goes first rotates: it pays more
        for step in STEPS:
            for i in order:
                tree = trees[i]
                out = args.workdir / f"features-{i}.h5"
                if step == "write":
                    out.unlink(missing_ok=True)
                result = _step(tree, step, out, args)
                if (i, step) not in best or result["seconds"] < best[i, step]["seconds"]:
                    best[i, step] = result
    sizes = [(args.workdir / f"features-{i}.h5").stat().st_size / 1e6 for i in range(len(trees))]
    print(f"{args.rows:,} rows x {args.dim}, float16, best of {args.repeats}")
    print(f"{'tree':<40} {'step':<6} {'seconds':>8} {'peak RSS GB':>12} {'ratio':>6}")
    rows = []
    for i, tree in enumerate(trees):
        for step in STEPS:
            r = best[i, step]
            ratio = r["seconds"] / best[0, step]["seconds"]
            print(f"{str(tree):<40} {step:<6} {r['seconds']:>8.2f} {r['peak_rss_gb']:>12.2f} {ratio:>6.2f}")
            rows.append({"tree": str(tree), "step": step, **r, "ratio_to_first": ratio, "file_mb": sizes[i]})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"rows": args.rows, "dim": args.dim, "repeats": args.repeats, "results": rows}, indent=1)
    )
    for i in range(len(trees)):
        (args.workdir / f"features-{i}.h5").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
