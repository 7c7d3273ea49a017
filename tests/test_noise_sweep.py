"""examples/noise_sweep.sh runs end to end on the tiny model (reduced grid) and skips work already done.

Starting Python with torch and open_clip for each of the script's ~20 commands would dominate the
test (seconds each, more on a busy machine), so the script's PROMPTCLI is a thin client that hands
each command line to this test process, which runs it through the real CLI entry point in-process.
Everything else (the script's flow, file names, skipping, exit codes) is the script's own.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import run_served_script

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "noise_sweep.sh"


pytestmark = pytest.mark.usefixtures("one_thread")


def _sweep(env: dict[str, str], run_cli, folder: Path) -> tuple[int, str, list[list[str]]]:
    return run_served_script(SCRIPT, env, run_cli, folder)


def test_noise_sweep_end_to_end_and_rerun_skips(tmp_path, tiny_model_files, image_folder, run_cli):
    out = tmp_path / "sweep"
    env = {
        **os.environ,
        "OUT": str(out),
        "TRAIN_DIR": str(image_folder),
        "TEST_DIR": str(image_folder),
        "MODEL": "tiny-clip",
        "PRETRAINED": str(tiny_model_files["weights"]),
        "MODEL_ARGS": f"--model-config {tiny_model_files['config']}",
        "DEVICE": "cpu",
        "RATES": "0 0.5",
        "SEEDS": "1",
        "EPOCHS": "2",
        "SHOTS": "4",
        "GRADSTATS": "coop+ce",
        "TUNE_ARGS": "--n-ctx 4",
    }
    code, log, commands = _sweep(env, run_cli, tmp_path)
    assert code == 0, log
    assert [c[0] for c in commands] == (
        ["extract", "extract", "eval"] + (["corrupt"] + ["tune", "eval"] * 3) * 2 + ["gradstats", "report"]
    )
    pairs = ("coop_ce", "coop_gce", "linear-probe_ce")
    results = out / "results"
    assert {p.name for p in results.iterdir()} == {
        "zero-shot.json",
        *(f"{m}_r{r}_s1.{ext}" for m in pairs for r in ("0", "0.5") for ext in ("json", "jsonl")),
        "grads_coop_ce_r0.5_s1.csv",
        "grads_coop_ce_r0.5_s1.csv.json",
    }
    tune_line = next(c for c in commands if c[0] == "tune" and "gce" in c)
    assert tune_line[tune_line.index("--epochs") + 1] == "2" and "--n-ctx" in tune_line
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<html" in (out / "report.html").read_text().lower()
    table = (out / "report.md").read_text()
    assert all(s in table for s in ("coop + ce", "coop + gce", "linear-probe + ce"))

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    code, log, commands = _sweep(env, run_cli, tmp_path)
    assert code == 0, log
    assert commands == [] and "run: " not in log and "skip: the report is up to date" in log
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes


def test_noise_sweep_stops_at_the_first_failure(tmp_path):
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake.sh"  # a promptcli that records its command line and fails
    fake.write_text(f'echo "$*" >> {calls}\nexit 3\n')
    env = {**os.environ, "OUT": str(tmp_path / "s"), "PROMPTCLI": f"bash {fake}"}
    env.update(TRAIN_DIR=str(tmp_path), TEST_DIR=str(tmp_path))
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert (
        calls.read_text().splitlines()[0].startswith(f"extract {tmp_path} -o {tmp_path}/s/features/train.h5")
    )
    assert len(calls.read_text().splitlines()) == 1 and proc.stdout.count("run: ") == 1


def test_gradstats_seeds_limits_gradient_statistics_to_those_seeds(tmp_path):
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake.sh"  # a promptcli that records its command line and creates its -o files
    fake.write_text(
        f'echo "$*" >> {calls}\n'
        'prev=""\nfor a in "$@"; do\n'
        '  if [[ "$prev" == "-o" ]]; then mkdir -p "$(dirname "$a")"; touch "$a" "$a.json"; fi\n'
        "  prev=$a\ndone\n"
    )
    env = {**os.environ, "OUT": str(tmp_path / "s"), "PROMPTCLI": f"bash {fake}"}
    env.update(TRAIN_DIR=str(tmp_path), TEST_DIR=str(tmp_path), RATES="0 0.5", SEEDS="1 2 3")
    env.update(GRADSTATS="coop+ce linear-probe+ce", GRADSTATS_SEEDS="2")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = calls.read_text().splitlines()
    grads = [line.split(" -o ")[1].split()[0] for line in lines if line.startswith("gradstats")]
    assert [Path(g).name for g in grads] == ["grads_coop_ce_r0.5_s2.csv", "grads_linear-probe_ce_r0.5_s2.csv"]
    assert sum(line.startswith("tune") for line in lines) == 2 * 3 * 3  # every rate, seed and method


def test_methods_chooses_rows_and_a_finetune_row_evaluates_on_its_own_features(tmp_path):
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake.sh"  # a promptcli that records its command line and creates its -o files
    fake.write_text(
        f'echo "$*" >> {calls}\n'
        'prev=""\nfor a in "$@"; do\n'
        '  if [[ "$prev" == "-o" ]]; then mkdir -p "$(dirname "$a")"; touch "$a" "$a.json"; fi\n'
        "  prev=$a\ndone\n"
    )
    env = {**os.environ, "OUT": str(tmp_path / "s"), "PROMPTCLI": f"bash {fake}"}
    env.update(TRAIN_DIR=str(tmp_path), TEST_DIR=str(tmp_path / "test"), RATES="0.5", SEEDS="1", GRADSTATS="")
    env.update(METHODS="coop+gce finetune+ce", FINETUNE_ARGS="--train-layers last-2 --workers 3")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = calls.read_text().splitlines()
    tunes = [line for line in lines if line.startswith("tune")]
    assert len(tunes) == 2 and "--method coop --loss gce" in tunes[0] and "--train-layers" not in tunes[0]
    assert "--method finetune --loss ce" in tunes[1] and "--train-layers last-2 --workers 3" in tunes[1]
    prompt = f"{tmp_path}/s/prompts/finetune_ce_r0.5_s1.safetensors"
    adapter_h5 = f"{tmp_path}/s/features/test_finetune_ce_r0.5_s1.h5"
    assert any(line.startswith(f"extract {tmp_path}/test -o {adapter_h5}") and f"--adapter {prompt}" in line
               for line in lines)  # fmt: skip
    evals = [line for line in lines if line.startswith("eval") and "--prompt" in line]
    assert evals[0].startswith(f"eval {tmp_path}/s/features/test.h5 --prompt")
    assert evals[1].startswith(f"eval {adapter_h5} --prompt {prompt}")

    # vpt and maple also train on the images: their own test features, their papers' epochs
    calls.unlink()
    env.update(METHODS="vpt+ce", FINETUNE_ARGS="--workers 3")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = calls.read_text().splitlines()
    (tune,) = [line for line in lines if line.startswith("tune")]
    assert "--method vpt --loss ce" in tune and "--epochs" not in tune and "--workers 3" in tune
    vpt_h5 = f"{tmp_path}/s/features/test_vpt_ce_r0.5_s1.h5"
    assert any(
        line.startswith(f"extract {tmp_path}/test -o {vpt_h5}") and "--adapter" in line for line in lines
    )
    assert any(line.startswith(f"eval {vpt_h5} --prompt") for line in lines)
