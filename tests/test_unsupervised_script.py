"""examples/unsupervised.sh: its commands, skipping, the printed comparison; end to end on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import run_example

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "unsupervised.sh"

# A promptcli that records its command line and creates its -o outputs (eval summaries with a top-1).
FAKE = """echo "$*" >> {calls}
prev=""
for a in "$@"; do
  if [[ "$prev" == "-o" ]]; then
    mkdir -p "$(dirname "$a")"
    case "$a" in
      *zero-shot.json) echo '{{"metrics": {{"top1": 0.479}}}}' > "$a" ;;
      *.json) echo '{{"metrics": {{"top1": 0.581}}}}' > "$a" ;;
      *) touch "$a" "$a.json" ;;
    esac
  fi
  prev=$a
done
"""


def _run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    fake = tmp_path / "fake.sh"
    fake.write_text(FAKE.format(calls=calls))
    full = {**os.environ, "OUT": str(tmp_path / "u"), "PROMPTCLI": f"bash {fake}", **env}
    proc = subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=60)
    return proc, calls.read_text().splitlines() if calls.exists() else []


def test_commands_and_the_printed_comparison_then_a_rerun_skips(tmp_path):
    env = {"TRAIN_DIR": str(tmp_path / "train"), "TEST_DIR": str(tmp_path / "test"), "SEEDS": "1 2"}
    env.update(MODEL="ViT-B-32", PRETRAINED="openai", DEVICE="cpu")
    proc, lines = _run(tmp_path, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split()[0] for line in lines] == ["extract", "extract", "eval", "pseudolabel"] + [
        "tune",
        "eval",
    ] * 2
    assert "--model ViT-B-32 --pretrained openai" in lines[0] and lines[0].startswith(
        f"extract {tmp_path}/train"
    )
    assert "--zero-shot" in lines[2]
    assert "--method transductive" in lines[3] and "--labels" not in lines[3] and "--top-k" not in lines[3]
    assert "--method linear-probe --loss ce" in lines[4] and "--seed 1" in lines[4] and "--seed 2" in lines[6]
    out = proc.stdout.splitlines()
    assert "test top-1: zero-shot 47.9%, unsupervised linear-probe + ce (seed 1) 58.1%" in out
    assert "test top-1: zero-shot 47.9%, unsupervised linear-probe + ce (seed 2) 58.1%" in out

    proc, lines = _run(tmp_path, **env)  # everything exists: nothing runs, the comparison prints again
    assert proc.returncode == 0 and lines == [] and "run: " not in proc.stdout
    assert proc.stdout.count("test top-1:") == 2


def test_method_top_k_and_failures(tmp_path):
    proc, lines = _run(tmp_path, METHOD="coop", LOSS="gce", TOP_K="16", TUNE_ARGS="--n-ctx 4")
    assert proc.returncode == 0, proc.stderr
    assert lines[0].startswith(f"demo-images {tmp_path}/u/images")  # no data given: the bundled demo
    pseudo = next(line for line in lines if line.startswith("pseudolabel"))
    assert "--top-k 16" in pseudo and "transductive-top16.csv" in pseudo
    tune = next(line for line in lines if line.startswith("tune"))
    assert "--method coop --loss gce" in tune and "--n-ctx 4" in tune and "transductive-top16.csv" in tune

    fake = tmp_path / "fail.sh"
    fake.write_text("exit 3\n")
    env = {**os.environ, "OUT": str(tmp_path / "f"), "PROMPTCLI": f"bash {fake}"}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "test top-1" not in proc.stdout


@pytest.mark.slow
def test_unsupervised_end_to_end_on_the_tiny_model(tmp_path, tiny_model_files, image_folder):
    out = tmp_path / "unsup"
    run = run_example(
        "unsupervised.sh",
        OUT=str(out),
        TRAIN_DIR=str(image_folder),
        TEST_DIR=str(image_folder),
        MODEL="tiny-clip",
        PRETRAINED=str(tiny_model_files["weights"]),
        MODEL_ARGS=f"--model-config {tiny_model_files['config']}",
        DEVICE="cpu",
        EPOCHS="2",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    zero_shot = json.loads((out / "results" / "zero-shot.json").read_text())["metrics"]["top1"]
    tuned = json.loads((out / "results" / "linear-probe_ce_transductive_s1.json").read_text())["metrics"][
        "top1"
    ]
    line = f"test top-1: zero-shot {100 * zero_shot:.1f}%, unsupervised linear-probe + ce (seed 1) {100 * tuned:.1f}%"
    assert line in run.stdout.splitlines()
    sidecar = json.loads((out / "labels" / "transductive.csv.json").read_text())
    assert sidecar["method"] == "transductive" and sidecar["transductive"]["n_labelled"] == 0
