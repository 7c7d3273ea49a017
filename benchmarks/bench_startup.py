"""Start-up cost of commands that need no model, against the interpreter alone and ``import torch``.

Each command runs in a fresh ``python -m promptcli`` process (the console script adds only its
launcher); reported per command are the median wall time and the median CPU time (user + sys, from
``getrusage`` of the child), over ``--repeats`` interleaved runs, and the ratio to ``import torch``
measured in the same run. CPU time is what a busy shared machine does not inflate; wall time is what a
user waits on an idle one.

    python benchmarks/bench_startup.py               # 7 repeats, writes benchmarks/results/startup.json
    python benchmarks/bench_startup.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(args: list[str], cwd: Path) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {proc.stderr.strip()[:300]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "startup.json")
    args = parser.parse_args()

    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="promptcli-startup-"))
    (work / "labels.csv").write_text(
        "path,label\n" + "".join(f"img{i}.png,{('cat', 'dog', 'bird')[i % 3]}\n" for i in range(300))
    )
    (work / "m.json").write_text(
        json.dumps({"zero_shot": True, "metrics": {"top1": 0.5, "top5": 0.9, "macro_accuracy": 0.5}})
    )
    cases = {
        "python -c pass": [py, "-c", "pass"],
        "import torch": [py, "-c", "import torch"],
        "promptcli --version": [py, "-m", "promptcli", "--version"],
        "promptcli --help": [py, "-m", "promptcli", "--help"],
        "promptcli tune --help": [py, "-m", "promptcli", "tune", "--help"],
        "promptcli corrupt (300-row CSV)": [
            py,
            "-m",
            "promptcli",
            "corrupt",
            "labels.csv",
            "--rate",
            "0.3",
            "-q",
        ],
        "promptcli report (1 summary)": [py, "-m", "promptcli", "report", "m.json", "-q"],
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved: load changes hit every case alike
        for name, cmd in cases.items():
            samples[name].append(_run(cmd, work))
    torch_cpu = statistics.median(c for _, c in samples["import torch"])
    rows = {}
    print(f"{'command':34s} {'wall s':>8s} {'CPU s':>8s} {'CPU / import torch':>19s}")
    for name, values in samples.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        rows[name] = {
            "wall_s": round(wall, 4),
            "cpu_s": round(cpu, 4),
            "cpu_vs_import_torch": round(cpu / torch_cpu, 4),
        }
        print(f"{name:34s} {wall:8.3f} {cpu:8.3f} {cpu / torch_cpu:19.3f}")
    result = {
        "repeats": args.repeats,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
