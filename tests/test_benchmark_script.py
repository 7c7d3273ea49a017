"""examples/benchmark.sh over a tiny fake CoOp DATA folder with the tiny model (reduced grid), and its
bookkeeping (absent datasets skipped, finished steps skipped, first failure stops) with a fake CLI.

As in test_noise_sweep.py, the script's PROMPTCLI is a thin client that hands each command line to
this test process, which runs it through the real CLI entry point in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CLASSES, COLORS, run_served_script

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "benchmark.sh"


def make_dtd(data: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """DATA/dtd as CoOp lays it out: images/<class>/ and split_zhou_DescribableTextures.json."""
    rng = np.random.default_rng(seed)
    root = data / "dtd"
    split: dict[str, list] = {s: [] for s in per_split}
    for label, name in enumerate(CLASSES):
        folder = name.replace(" ", "_")
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        for s, n in per_split.items():
            for i in range(n):
                pixels = np.clip(np.array(COLORS[name]) + rng.integers(-40, 40, (40, 48, 3)), 0, 255)
                rel = f"{folder}/{s}{i:02d}.png"
                Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / rel)
                split[s].append([rel, label, folder])
    (root / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    return root


def run_script(env: dict[str, str], run_cli, folder: Path) -> tuple[int, str, list[list[str]]]:
    return run_served_script(SCRIPT, env, run_cli, folder, {"PYTHON": sys.executable})


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_benchmark_reduced_on_a_fake_coop_tree_and_rerun_skips(tmp_path, tiny_model_files, run_cli):
    data = tmp_path / "data"
    make_dtd(data, {"train": 4, "val": 1, "test": 3})
    out = tmp_path / "bench"
    env = {
        **os.environ,
        "DATA": str(data),
        "OUT": str(out),
        "DATASETS": "dtd eurosat",  # eurosat is absent: skipped
        "MODEL": "tiny-clip",
        "PRETRAINED": str(tiny_model_files["weights"]),
        "MODEL_ARGS": f"--model-config {tiny_model_files['config']}",
        "DEVICE": "cpu",
        "RATES": "0 0.5",
        "SEEDS": "1",
        "EPOCHS": "2",
        "SHOTS": "2",
        "TUNE_ARGS": "--n-ctx 4",
    }
    code, log, commands = run_script(env, run_cli, tmp_path)
    assert code == 0, log
    assert f"absent: {data}/eurosat (skipping eurosat)" in log
    assert [c[0] for c in commands] == (
        ["dataset", "dataset", "extract", "extract", "eval"]
        + (["corrupt"] + ["tune", "eval"] * 3) * 2
        + ["report"]
    )
    dtd = out / "dtd"
    assert (dtd / "classes.txt").read_text().splitlines() == list(CLASSES)
    assert len((dtd / "train.csv").read_text().splitlines()) == 1 + 4 * 3
    results = {p.name for p in (dtd / "results").iterdir()}
    pairs = ("coop_ce", "coop_gce", "linear-probe_ce")
    assert results == {"zero-shot.json", *(f"{m}_r{r}_s1.json" for m in pairs for r in ("0", "0.5"))}
    for name in results:
        summary = json.loads((dtd / "results" / name).read_text())
        assert summary["metrics"]["n"] == 9  # the test split's images
    report = json.loads((dtd / "report.json").read_text())
    assert {c["series"] for c in report["accuracy"]} >= {"coop + ce", "coop + gce", "linear-probe + ce"}
    table = (out / "summary.md").read_text()
    assert "| dataset | method + loss | 0 | 0.5 |" in table
    for series in ("coop + ce", "coop + gce", "linear-probe + ce"):
        row = next(line for line in table.splitlines() if line.startswith(f"| dtd | {series} |"))
        cell = next(
            c for c in report["accuracy"] if c["series"] == series and c["noise_rate"] in (0, 0.0, None)
        )
        assert f"{100 * cell['mean']:.1f} (1)" in row.split("|")[3]
    assert any(line.startswith("| dtd | zero-shot") for line in table.splitlines())
    assert json.loads((out / "summary.json").read_text())["datasets"] == ["dtd"]

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    code, log, commands = run_script(env, run_cli, tmp_path)
    assert code == 0, log
    assert commands == [] and "run: " not in log and "skip: the summary is up to date" in log
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes


def _fake_cli(tmp_path: Path, fail_on: str = "") -> tuple[Path, Path]:
    """A promptcli that records its command line and creates its -o / --classnames-out files."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake.sh"
    fake.write_text(
        f'echo "$*" >> {calls}\n'
        + (f'if [[ "$1" == "{fail_on}" ]]; then exit 3; fi\n' if fail_on else "")
        + 'prev=""\nfor a in "$@"; do\n'
        '  if [[ "$prev" == "-o" || "$prev" == "--classnames-out" ]]; then mkdir -p "$(dirname "$a")"; touch "$a" "$a.json"; fi\n'
        "  prev=$a\ndone\n"
    )
    return fake, calls


def test_benchmark_runs_every_present_dataset_and_stops_at_a_failure(tmp_path):
    for folder in ("dtd", "eurosat"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    fake, calls = _fake_cli(tmp_path)
    env = {
        **os.environ,
        "DATA": str(tmp_path / "data"),
        "OUT": str(tmp_path / "b"),
        "PROMPTCLI": f"bash {fake}",
    }
    fake_python = tmp_path / "python"  # stands in for the summary writer
    fake_python.write_text('#!/usr/bin/env bash\ntouch "$2/summary.md" "$2/summary.json"\n')
    fake_python.chmod(0o755)
    env.update(RATES="0 0.5", SEEDS="1 2", PYTHON=str(fake_python))
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = calls.read_text().splitlines()
    per_dataset = 2 + 2 + 1 + 2 * 2 * (1 + 3 * 2) + 1
    assert len(lines) == 2 * per_dataset
    assert lines[0].startswith(f"dataset dtd {tmp_path}/data/dtd --split train")
    assert lines[per_dataset].startswith(f"dataset eurosat {tmp_path}/data/eurosat --split train")
    assert "extract" in lines[2] and "--model RN50 --pretrained openai" in lines[2]
    tune = next(line for line in lines if line.startswith("tune"))
    assert "--epochs 200" in tune and "--loss ce" in tune
    assert "absent" in proc.stdout and "caltech-101" in proc.stdout

    calls.unlink()  # a rerun finds every output and runs nothing
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not calls.exists() and "run: " not in proc.stdout

    fake, calls = _fake_cli(tmp_path, fail_on="extract")
    env.update(OUT=str(tmp_path / "c"), PROMPTCLI=f"bash {fake}")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert [line.split()[0] for line in calls.read_text().splitlines()] == ["dataset", "dataset", "extract"]

    env.update(DATASETS="dtd nope")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown dataset 'nope'" in proc.stderr


REAL_NOISE = SCRIPT.parent / "real_noise.sh"


def test_real_noise_script_steps_and_refusals(tmp_path):
    fake, calls = _fake_cli(tmp_path)
    env = {
        **os.environ,
        "ROOT": str(tmp_path / "c1m"),
        "OUT": str(tmp_path / "r"),
        "PROMPTCLI": f"bash {fake}",
    }
    env.update(SEEDS="1 2")
    proc = subprocess.run(["bash", str(REAL_NOISE)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = calls.read_text().splitlines()
    per_seed = ["corrupt", "tune", "eval", "clean", "tune", "eval"]
    assert [line.split()[0] for line in lines] == [
        "dataset",
        "dataset",
        "extract",
        "extract",
        "eval",
    ] + per_seed * 2 + ["report"]
    assert "--split train --known-noise" in lines[0]
    corrupt = lines[5]
    assert "--shots 16 --rate 0 " in corrupt and corrupt.split()[1].endswith("train.csv")
    assert "--relabel" in lines[8] and "kept_s1.csv" in lines[9]

    proc = subprocess.run(
        ["bash", str(REAL_NOISE)],
        env={**env, "DATASET": "food101n"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "TEST_ROOT" in proc.stderr
    env.update(DATASET="food101n", TEST_ROOT=str(tmp_path / "food-101"), OUT=str(tmp_path / "f"))
    calls.unlink()
    proc = subprocess.run(["bash", str(REAL_NOISE)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = calls.read_text().splitlines()
    assert f"--test-root {tmp_path}/food-101" in lines[0] and not any("--relabel" in line for line in lines)
    proc = subprocess.run(
        ["bash", str(REAL_NOISE)],
        env={**env, "DATASET": "webvision"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "clothing1m or food101n" in proc.stderr


def test_benchmark_folders_are_the_registry_s():
    """The script's dataset -> folder map (bash cannot ask the registry) agrees with the registry."""
    import re

    from promptcli.datasets.coop import COOP_DATASETS
    from promptcli.datasets.registry import COOP_BENCHMARK

    text = SCRIPT.read_text()
    block = text[text.index("declare -A FOLDER=(") : text.index(")", text.index("declare -A FOLDER=(") + 20)]
    folders = dict(re.findall(r"\[([\w-]+)\]=([\w-]+)", block))
    assert {k: v for k, v in folders.items() if k in COOP_DATASETS} == {
        k: d.folder for k, d in COOP_DATASETS.items()
    }
    default = re.search(r"DATASETS=\$\{DATASETS:-([^}]*)\}", text).group(1).split()
    assert default == list(COOP_BENCHMARK)
