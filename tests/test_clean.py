"""promptcli clean: scores, selection, detection metrics by hand, row accounting, relabel, provenance, errors."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import read_csv_rows
from promptcli.analysis.evaluation import evaluate
from promptcli.errors import InputError
from promptcli.io.features import read_features
from promptcli.io.fileio import sha256_file
from promptcli.io.labels import join_labels, read_labels
from promptcli.io.prompt_files import read_prompt, save_prompt
from promptcli.learning.options import TuneOptions
from promptcli.learning.tune_run import tune
from promptcli.noise.cleaning import auroc, detection_metrics, label_scores, select_suspects

FLIPPED = (0, 7, 13)  # rows whose label moves to the next class


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, tiny_features) -> dict[str, Path]:
    """Labels of the tiny features with 3 flipped rows, an extra column, a corrupt-style sidecar, prompts."""
    folder = tmp_path_factory.mktemp("clean")
    fs = read_features(tiny_features)
    names = fs.classnames
    lines = ["path,label,clean_label,is_noisy,note"]
    for i, (p, y) in enumerate(zip(fs.paths, fs.labels)):
        given = (y + 1) % len(names) if i in FLIPPED else y
        lines.append(f"{p},{names[given]},{names[y]},{int(i in FLIPPED)},n{i}")
    labels = folder / "noisy.csv"
    labels.write_text("\n".join(lines) + "\n")
    (folder / "noisy.csv.json").write_text(json.dumps({"type": "symmetric", "rate": 0.17, "seed": 3}))
    coop = folder / "coop.safetensors"
    tune(tiny_features, labels, coop, TuneOptions(method="coop", epochs=1, lr=0.05, seed=1), device="cpu")
    probe = folder / "lp.safetensors"
    tune(
        tiny_features,
        labels,
        probe,
        TuneOptions(method="linear-probe", epochs=1, weight_decay=0.0, seed=1),
        device="cpu",
    )
    return {"features": tiny_features, "labels": labels, "coop": coop, "lp": probe, "dir": folder}


def _expected(noisy, prompts) -> dict[str, np.ndarray]:
    """Margins computed by hand from eval's probabilities (an independent route to the same numbers)."""
    result = evaluate(noisy["features"], prompts, device="cpu", keep_probs=True)
    fs = result.features
    table = read_labels(noisy["labels"])
    rows = np.array([fs.paths.index(r["path"]) for r in table.rows])
    labels = np.array([fs.classnames.index(r["label"]) for r in table.rows])
    probs = result.probs[rows]
    margin = np.array(
        [
            max(p for c, p in enumerate(probs[i]) if c != labels[i]) - probs[i, labels[i]]
            for i in range(len(rows))
        ]
    )
    return {
        "probs": probs,
        "labels": labels,
        "margin": margin,
        "noisy": np.isin(np.arange(len(rows)), FLIPPED),
    }


# --- the numbers, by hand ---------------------------------------------------------------------


def test_label_scores_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.4, 0.4, 0.2]])
    s = label_scores(probs, np.array([0, 1, 2]))
    np.testing.assert_allclose(s.score, [0.2 - 0.7, 0.6 - 0.3, 0.4 - 0.2])
    np.testing.assert_allclose(s.p_label, [0.7, 0.3, 0.2])
    assert s.predicted.tolist() == [0, 2, 0]  # a tie goes to the lower class, as in eval
    np.testing.assert_allclose(s.p_predicted, [0.7, 0.6, 0.4])


def test_auroc_by_hand_with_ties():
    # positives score 0.9 and 0.5; negatives 0.5, 0.1, 0.5. Pairs: 0.9 beats all three (3);
    # 0.5 ties two negatives (2 x 1/2) and beats 0.1 (1): (3 + 2) / 6
    assert auroc(np.array([0.9, 0.5, 0.5, 0.1, 0.5]), np.array([1, 1, 0, 0, 0], bool)) == pytest.approx(5 / 6)
    assert auroc(np.array([1.0, 1.0]), np.array([1, 0], bool)) == 0.5
    assert auroc(np.array([0.0, 1.0]), np.array([1, 0], bool)) == 0.0
    assert auroc(np.array([0.3, 0.4]), np.array([1, 1], bool)) is None
    rng = np.random.default_rng(0)
    score, positive = rng.integers(0, 4, size=40).astype(float), rng.random(40) < 0.4  # many ties
    pairs = [
        1.0 if a > b else 0.5 if a == b else 0.0
        for a, b in itertools.product(score[positive], score[~positive])
    ]
    assert auroc(score, positive) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_detection_metrics_by_hand():
    score = np.array([0.8, 0.6, 0.4, -0.2, -0.5, 0.1])
    suspect = score > 0.3  # rows 0, 1, 2
    is_noisy = np.array([1, 0, 1, 1, 0, 0], bool)  # rows 0, 2, 3
    m = detection_metrics(score, suspect, is_noisy)
    assert (m["precision"], m["recall"]) == (2 / 3, 2 / 3)
    assert (m["n_flagged"], m["n_noisy"], m["n_flagged_noisy"]) == (3, 3, 2)
    # noisy scores 0.8, 0.4, -0.2 vs clean 0.6, -0.5, 0.1: wins 2+1 + 2 + 1 = 6 of 9
    assert m["auroc"] == pytest.approx(6 / 9)
    empty = detection_metrics(score, np.zeros(6, bool), is_noisy)
    assert empty["precision"] is None and empty["recall"] == 0.0


def test_select_suspects_threshold_and_keep_fraction():
    score = np.array([0.2, -0.5, 0.2, 0.2, -0.1])
    assert select_suspects(score).tolist() == [True, False, True, True, False]  # default: above 0
    assert select_suspects(score, threshold=-0.2).tolist() == [True, False, True, True, True]
    # keep ceil(0.6 x 5) = 3 lowest: -0.5, -0.1, then the first of the tied 0.2s
    assert select_suspects(score, keep_fraction=0.6).tolist() == [False, False, True, True, False]
    assert select_suspects(score, keep_fraction=0.5).tolist() == [
        False,
        False,
        True,
        True,
        False,
    ]  # ceil(2.5)
    assert not select_suspects(score, keep_fraction=1.0).any()
    with pytest.raises(InputError, match="not both"):
        select_suspects(score, threshold=0.1, keep_fraction=0.5)
    with pytest.raises(InputError, match=r"in \(0, 1\]"):
        select_suspects(score, keep_fraction=0.0)


# --- the command --------------------------------------------------------------------------------


def test_clean_keep_fraction_and_relabel_account_for_every_row(noisy, tmp_path, run_cli):
    exp = _expected(noisy, [noisy["coop"]])
    n = len(exp["labels"])
    keep = np.argsort(exp["margin"], kind="stable")[: int(np.ceil(0.5 * n))]
    suspect = ~np.isin(np.arange(n), keep)
    pred = exp["probs"].argmax(axis=1)
    p_pred = exp["probs"].max(axis=1)
    candidates = suspect & (pred != exp["labels"])
    confidence = float(np.median(p_pred[candidates]))  # some relabelled, some not
    relabel = candidates & (p_pred >= confidence)
    assert 0 < relabel.sum() < suspect.sum()

    scores, kept = tmp_path / "scores.csv", tmp_path / "kept.csv"
    code, stdout, err = run_cli(
        "clean", noisy["features"], noisy["labels"], "--prompt", noisy["coop"], "-o", scores,
        "--clean-out", kept, "--keep-fraction", "0.5", "--relabel", "--relabel-confidence", confidence,
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    counts = summary["counts"]
    assert counts == {
        "rows_in": n,
        "scored": n,
        "skipped": 0,
        "suspect": int(suspect.sum()),
        "kept": n - int(suspect.sum()) + int(relabel.sum()),
        "kept_unchanged": n - int(suspect.sum()),
        "relabelled": int(relabel.sum()),
        "dropped": int((suspect & ~relabel).sum()),
    }

    original = read_csv_rows(noisy["labels"])
    rows = read_csv_rows(scores)
    assert [r["path"] for r in rows] == [r["path"] for r in original]  # every row, in order
    assert all(r["note"] == o["note"] and r["label"] == o["label"] for r, o in zip(rows, original))
    np.testing.assert_allclose([float(r["score"]) for r in rows], exp["margin"], atol=2e-6)
    assert [r["suspect"] == "1" for r in rows] == suspect.tolist()
    actions = np.array([r["action"] for r in rows])
    assert (actions == "relabelled").tolist() == relabel.tolist()
    assert (actions == "dropped").tolist() == (suspect & ~relabel).tolist()

    out = read_csv_rows(kept)
    assert list(out[0].keys()) == ["path", "label", "clean_label", "is_noisy", "note"]
    kept_paths = {r["path"] for r in out}
    dropped_paths = {r["path"] for r in rows if r["action"] == "dropped"}
    assert kept_paths | dropped_paths == {r["path"] for r in original} and not kept_paths & dropped_paths
    by_path = {r["path"]: r for r in rows}
    for r in out:
        src = by_path[r["path"]]
        if src["action"] == "relabelled":
            assert r["label"] == src["predicted"] != src["label"]
        else:
            assert r["label"] == src["label"]
        assert r["is_noisy"] == ("1" if r["label"] != r["clean_label"] else "0")
    fs = read_features(noisy["features"])
    assert len(join_labels(fs, read_labels(kept)).rows) == len(out)  # a valid labels CSV

    det = summary["detection"]
    assert det["n_noisy"] == len(FLIPPED) and det["noise_rate_before"] == pytest.approx(len(FLIPPED) / n)
    assert det["auroc"] == pytest.approx(auroc(exp["margin"], exp["noisy"]), abs=1e-6)
    hits = int((suspect & exp["noisy"]).sum())
    assert det["precision"] == pytest.approx(hits / suspect.sum())
    assert det["recall"] == pytest.approx(hits / len(FLIPPED))
    assert det["noise_rate_after"] == pytest.approx(np.mean([r["is_noisy"] == "1" for r in out]))
    clean = np.array([fs.classnames.index(o["clean_label"]) for o in original])
    assert det["relabel_accuracy"] == pytest.approx(float((pred[relabel] == clean[relabel]).mean()))


def test_default_threshold_flags_disagreement_and_outputs_carry_provenance(noisy, tmp_path, run_cli):
    exp = _expected(noisy, [noisy["coop"]])
    scores, kept = tmp_path / "scores.csv", tmp_path / "kept.csv"
    code, _, err = run_cli(
        "clean", noisy["features"], noisy["labels"], "-p", noisy["coop"], "-o", scores, "--clean-out", kept,
        "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    disagree = exp["probs"].argmax(axis=1) != exp["labels"]
    assert [r["suspect"] == "1" for r in read_csv_rows(scores)] == disagree.tolist()
    assert len(read_csv_rows(kept)) == int((~disagree).sum())
    assert f"kept {int((~disagree).sum())} (0 relabelled), dropped {int(disagree.sum())}" in " ".join(
        err.split()
    )

    side = json.loads(Path(f"{scores}.json").read_text())
    assert side["features_sha256"] == sha256_file(noisy["features"])
    assert side["labels_sha256"] == sha256_file(noisy["labels"])
    assert side["prompts"][0]["sha256"] == sha256_file(noisy["coop"])
    assert side["prompts"][0]["method"] == "coop"
    assert side["model"]["model_name"] == "tiny-clip"
    assert side["score"] == "margin" and side["options"]["threshold"] == 0.0
    assert side["command"].startswith("promptcli") and side["promptcli_version"]
    kept_side = json.loads(Path(f"{kept}.json").read_text())
    # the source labels' noise record is carried forward; the cleaning is recorded under it
    assert {k: kept_side[k] for k in ("type", "rate", "seed")} == {
        "type": "symmetric",
        "rate": 0.17,
        "seed": 3,
    }
    assert kept_side["cleaning"]["counts"] == side["counts"]
    assert kept_side["cleaning"]["noise_sidecar"] == f"{noisy['labels']}.json"

    # cleaning the cleaned file nests the earlier record
    again = tmp_path / "again.csv"
    code, _, err = run_cli("clean", noisy["features"], kept, "-p", noisy["coop"], "--clean-out", again)
    assert code == 0, err
    nested = json.loads(Path(f"{again}.json").read_text())
    assert nested["rate"] == 0.17 and nested["cleaning"]["previous"]["counts"] == side["counts"]
    # outputs exist: refused without --force, replaced with it
    code, _, err = run_cli("clean", noisy["features"], noisy["labels"], "-p", noisy["coop"], "-o", scores)
    assert code == 2 and "output exists" in err
    code, _, err = run_cli(
        "clean", noisy["features"], noisy["labels"], "-p", noisy["coop"], "-o", scores, "--force", "-q"
    )
    assert code == 0, err


def test_ensemble_averages_probabilities(noisy, tmp_path, run_cli):
    exp = _expected(noisy, [noisy["coop"], noisy["lp"]])
    singles = [_expected(noisy, [noisy[k]])["probs"] for k in ("coop", "lp")]
    np.testing.assert_allclose(exp["probs"], (singles[0] + singles[1]) / 2, atol=1e-12)
    scores = tmp_path / "scores.csv"
    code, stdout, err = run_cli(
        "clean",
        noisy["features"],
        noisy["labels"],
        "-p",
        noisy["coop"],
        "-p",
        noisy["lp"],
        "-o",
        scores,
        "--json",
    )
    assert code == 0, err
    rows = read_csv_rows(scores)
    np.testing.assert_allclose([float(r["score"]) for r in rows], exp["margin"], atol=2e-6)
    summary = json.loads(stdout)
    assert summary["ensemble"] and [p["method"] for p in summary["prompts"]] == ["coop", "linear-probe"]


def test_skip_missing_counts_skipped_rows_and_stdout(noisy, tmp_path, run_cli, monkeypatch):
    text = noisy["labels"].read_text().splitlines()
    text.insert(3, "nowhere/x.png,red apple,red apple,0,extra")
    labels = tmp_path / "extra.csv"
    labels.write_text("\n".join(text) + "\n")
    code, _, err = run_cli("clean", noisy["features"], labels, "-p", noisy["coop"])
    assert code == 2 and f"{labels}:4" in err and "'nowhere/x.png' is not in" in err
    scores = tmp_path / "scores.csv"
    code, stdout, err = run_cli(
        "clean", noisy["features"], labels, "-p", noisy["coop"], "-o", scores, "--skip-missing", "--json"
    )
    assert code == 0, err
    counts = json.loads(stdout)["counts"]
    assert counts["rows_in"] == len(text) - 1 == counts["kept"] + counts["dropped"] + counts["skipped"]
    assert counts["skipped"] == 1
    rows = read_csv_rows(scores)
    assert rows[2]["path"] == "nowhere/x.png" and rows[2]["action"] == "skipped" and rows[2]["score"] == ""
    # labels from stdin, the kept rows to stdout
    monkeypatch.setattr("sys.stdin", io.StringIO(noisy["labels"].read_text()))
    code, stdout, err = run_cli(
        "clean", noisy["features"], "-", "-p", noisy["coop"], "--clean-out", "-", "-q"
    )
    assert code == 0, err
    assert stdout.splitlines()[0] == "path,label,clean_label,is_noisy,note" and len(stdout.splitlines()) > 1


def test_bad_invocations(noisy, tmp_path, run_cli):
    f, labels, coop = noisy["features"], noisy["labels"], noisy["coop"]
    code, _, err = run_cli("clean", f, labels)
    assert code == 2 and "--prompt: no prompt given" in err
    code, _, err = run_cli("clean", f, labels, "-p", coop, "--threshold", "0.1", "--keep-fraction", "0.5")
    assert code == 2 and "give --threshold or --keep-fraction, not both" in err
    code, _, err = run_cli("clean", f, labels, "-p", coop, "--keep-fraction", "1.5")
    assert code == 2 and "--keep-fraction: must be in (0, 1]" in err
    code, _, err = run_cli("clean", f, labels, "-p", coop, "--threshold", "2")
    assert code == 2 and "--threshold: must be in [-1, 1]" in err
    code, _, err = run_cli("clean", f, labels, "-p", coop, "--relabel-confidence", "0.9")
    assert code == 2 and "applies with --relabel" in err
    code, _, err = run_cli("clean", f, labels, "-p", coop, "--relabel", "--relabel-confidence", "0")
    assert code == 2 and "--relabel-confidence: must be in (0, 1]" in err

    prompt = read_prompt(coop)
    other = tmp_path / "other.safetensors"
    save_prompt(other, prompt.tensors, {**prompt.metadata, "classnames": prompt.classnames[::-1]})
    code, _, err = run_cli("clean", f, labels, "-p", other, "-o", tmp_path / "s.csv")
    assert code == 2 and "same names in another order" in err
    assert not (tmp_path / "s.csv").exists()

    no_clean = tmp_path / "noisy-only.csv"
    no_clean.write_text(
        "\n".join(",".join(r[k] for k in ("path", "label", "is_noisy")) for r in [
            {"path": "path", "label": "label", "is_noisy": "is_noisy"}, *read_csv_rows(labels)
        ]) + "\n"
    )  # fmt: skip
    code, _, err = run_cli("clean", f, no_clean, "-p", coop, "--relabel")
    assert code == 2 and "is_noisy but no clean_label" in err
    code, _, err = run_cli("clean", f, labels, "-p", coop, "-o", "-", "--clean-out", "-")
    assert code == 2 and "can use stdout" in err


def test_outputs_never_overwrite_the_prompt_or_the_labels_sidecar(noisy, tmp_path, run_cli):
    import shutil

    f, labels = noisy["features"], noisy["labels"]
    prompt = tmp_path / "p.safetensors"
    shutil.copy(noisy["coop"], prompt)
    before = prompt.read_bytes(), labels.with_name("noisy.csv.json").read_bytes()
    code, _, err = run_cli("clean", f, labels, "-p", prompt, "-o", prompt, "--force")
    assert code == 2 and "output -o is the input --prompt" in err
    code, _, err = run_cli("clean", f, labels, "-p", prompt, "--clean-out", f"{labels}.json", "--force")
    assert code == 2 and "is the input the labels' sidecar LABELS.json" in err
    assert (prompt.read_bytes(), labels.with_name("noisy.csv.json").read_bytes()) == before


def test_the_cleaned_sidecar_does_not_describe_the_source_file_as_its_own(noisy, tmp_path, run_cli):
    import shutil

    labels = tmp_path / "noisy.csv"
    shutil.copy(noisy["labels"], labels)
    source = {"type": "symmetric", "rate": 0.17, "seed": 3, "n_rows": 99, "n_noisy": 17, "output": "x.csv"}
    Path(f"{labels}.json").write_text(json.dumps(source))
    kept = tmp_path / "kept.csv"
    code, _, err = run_cli("clean", noisy["features"], labels, "-p", noisy["coop"], "--clean-out", kept, "-q")
    assert code == 0, err
    side = json.loads(Path(f"{kept}.json").read_text())
    assert {k: side[k] for k in ("type", "rate", "seed")} == {"type": "symmetric", "rate": 0.17, "seed": 3}
    assert not {"n_rows", "n_noisy", "output"} & side.keys()
    assert side["cleaning"]["source"] == {"n_rows": 99, "n_noisy": 17, "output": "x.csv"}
    assert side["csv_sha256"] == sha256_file(kept)


def test_dropping_every_row_writes_nothing(noisy, tmp_path, run_cli):
    kept, scores = tmp_path / "kept.csv", tmp_path / "scores.csv"
    code, _, err = run_cli(
        "clean", noisy["features"], noisy["labels"], "-p", noisy["coop"], "--threshold", "-1",
        "-o", scores, "--clean-out", kept,
    )  # fmt: skip
    assert code == 2 and "every row was dropped" in err, err
    assert not kept.exists() and not scores.exists()


def test_clean_refuses_a_single_class_file(tiny_features, tmp_path, run_cli):
    import shutil

    import h5py

    one = tmp_path / "one.h5"
    shutil.copy(tiny_features, one)
    with h5py.File(one, "a") as f:
        del f["classnames"]
        f["classnames"] = np.array([b"red apple"])
        f["labels"][...] = 0
        del f.attrs["index_sha256"]  # an intended edit (docs/formats.md)
    fs = read_features(one)
    labels = tmp_path / "l.csv"
    labels.write_text("path,label\n" + "".join(f"{p},red apple\n" for p in fs.paths))
    code, _, err = run_cli("clean", one, labels, "--zero-shot", "-o", tmp_path / "s.csv")
    assert code == 2 and "needs at least 2 classes" in err and "unexpected" not in err.lower(), err
