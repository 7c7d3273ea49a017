"""`promptcli pseudolabel` and promptcli.noise.pseudolabels: zero-shot numbers against a manual computation,
selection counts, provenance, pipes and errors."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch

from promptcli.errors import InputError
from promptcli.io.features import read_features
from promptcli.io.labels import join_labels, read_labels
from promptcli.noise import pseudolabels

TEMPLATES = ("a photo of a {}.", "a blurry picture of the {}.")


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _manual_probs(model, fs, templates) -> np.ndarray:
    """Zero-shot by hand: per template normalised text embeddings, averaged, renormalised; softmax."""
    with torch.no_grad():
        per_template = []
        for t in templates:
            tokens = model.tokenizer([t.format(c) for c in fs.classnames])
            e = model.model.encode_text(tokens).float()
            per_template.append(e / e.norm(dim=-1, keepdim=True))
        w = torch.stack(per_template).mean(dim=0)
        w = w / w.norm(dim=-1, keepdim=True)
        scale = model.model.logit_scale.exp().item()
        logits = scale * torch.from_numpy(fs.features) @ w.T
    return torch.softmax(logits.double(), dim=-1).numpy()


def test_cli_template_average_equals_manual(run_cli, tiny_features, tiny_model, tmp_path):
    out = tmp_path / "pseudo.csv"
    args = ["pseudolabel", tiny_features, "-o", out, "--device", "cpu", "--json"]
    code, stdout, stderr = run_cli(*args, "--template", TEMPLATES[0], "--template", TEMPLATES[1])
    assert code == 0, stderr
    fs = read_features(tiny_features, load_views=False)
    probs = _manual_probs(tiny_model, fs, TEMPLATES)
    rows = _rows(out.read_text())
    assert [r["path"] for r in rows] == fs.paths  # no selection keeps every image
    pred = probs.argmax(axis=1)
    assert [r["label"] for r in rows] == [fs.classnames[p] for p in pred]
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], probs.max(axis=1), atol=2e-6)
    assert [r["clean_label"] for r in rows] == [fs.classnames[y] for y in fs.labels]
    assert [int(r["is_noisy"]) for r in rows] == (pred != fs.labels).astype(int).tolist()
    joined = join_labels(fs, read_labels(out))  # joinable by tune/eval, truth carried along
    assert np.array_equal(joined.labels, pred) and np.array_equal(joined.clean, fs.labels)
    summary = json.loads(stdout)
    assert summary == json.loads((tmp_path / "pseudo.csv.json").read_text())
    assert summary["zero_shot_accuracy"] == pytest.approx(float((pred == fs.labels).mean()))
    assert summary["templates"] == list(TEMPLATES) and summary["n_kept"] == 18
    assert summary["model"]["checkpoint_sha256"] == tiny_model.checkpoint_sha256
    assert len(summary["features"]["sha256"]) == 64 and summary["promptcli_version"]
    # a single template is not the average: the two runs must differ
    single = _manual_probs(tiny_model, fs, TEMPLATES[:1])
    assert not np.allclose(single, probs)


def test_cli_top_k_and_random_k(run_cli, tiny_features, tiny_model, tmp_path):
    fs = read_features(tiny_features, load_views=False)
    probs = _manual_probs(tiny_model, fs, TEMPLATES[:1])
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    base = ["pseudolabel", tiny_features, "--device", "cpu"]
    code, stdout, stderr = run_cli(*base, "--top-k", "2", "-o", "-")
    assert code == 0, stderr
    rows = _rows(stdout)
    for c, name in enumerate(fs.classnames):
        predicted = np.flatnonzero(pred == c)
        expected = predicted[np.argsort(-conf[predicted], kind="stable")][:2]
        assert sorted(r["path"] for r in rows if r["label"] == name) == sorted(fs.paths[i] for i in expected)
    assert "Kept" in stderr and not list(tmp_path.glob("*.json"))

    out = tmp_path / "r.csv"
    code, stdout, stderr = run_cli(*base, "--random-k", "3", "--seed", "5", "-o", out, "--json")
    assert code == 0, stderr
    per_class = json.loads(stdout)["per_class"]
    for c, name in enumerate(fs.classnames):
        assert per_class[name]["kept"] == min(3, int((pred == c).sum()))
    again = tmp_path / "r2.csv"
    assert run_cli(*base, "--random-k", "3", "--seed", "5", "-o", again)[0] == 0
    assert again.read_text() == out.read_text()
    assert json.loads((tmp_path / "r.csv.json").read_text())["selection"]["seed"] == 5
    # the seed draws --random-k's images and nothing else: without --random-k none is recorded
    assert run_cli(*base, "--top-k", "2", "--seed", "5", "-o", tmp_path / "t.csv")[0] == 0
    assert json.loads((tmp_path / "t.csv.json").read_text())["selection"]["seed"] is None
    code, stdout, _ = run_cli("pseudolabel", "--help")
    assert code == 0 and "deterministic" in " ".join(stdout.split())

    threshold = float(np.median(conf))
    code, stdout, _ = run_cli(*base, "--min-confidence", str(threshold), "-o", "-")
    assert code == 0
    kept = _rows(stdout)
    assert 0 < len(kept) == int((conf >= threshold).sum()) < len(conf)
    assert min(float(r["confidence"]) for r in kept) >= threshold - 1e-6


def test_select_counts_and_order():
    pred = np.array([0, 0, 0, 1, 1, 2, 0, 1])
    conf = np.array([0.9, 0.5, 0.7, 0.6, 0.8, 0.4, 0.7, 0.3])
    assert pseudolabels.select(pred, conf, 3, top_k=2).tolist() == [0, 2, 3, 4, 5]  # tie 0.7: row 2 first
    assert pseudolabels.select(pred, conf, 3).tolist() == list(range(8))
    assert pseudolabels.select(pred, conf, 3, min_confidence=0.6).tolist() == [0, 2, 3, 4, 6]
    assert pseudolabels.select(pred, conf, 3, top_k=1, min_confidence=0.85).tolist() == [0]
    kept = pseudolabels.select(pred, conf, 3, random_k=2, seed=1)
    assert np.bincount(pred[kept], minlength=3).tolist() == [2, 2, 1]
    for _ in range(3):
        assert np.array_equal(kept, pseudolabels.select(pred, conf, 3, random_k=2, seed=1))
    with pytest.raises(InputError, match="exclude each other"):
        pseudolabels.select(pred, conf, 3, top_k=1, random_k=1)


def test_summary_accuracy_ignores_unknown_truth():
    pred = np.array([0, 1, 1, 0])
    truth = np.array([0, 0, -1, 0])
    s = pseudolabels.summary(pred, truth, np.array([0, 2]), ["a", "b"])
    assert s["zero_shot_accuracy"] == pytest.approx(2 / 3) and s["pseudo_label_accuracy"] == 1.0
    assert s["per_class"]["b"] == {"predicted": 2, "kept": 1, "kept_accuracy": None}


def test_cli_classnames_rename_prompts(run_cli, tiny_features, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("sky\ngrass\napple\n")
    code, stdout, stderr = run_cli(
        "pseudolabel", tiny_features, "--classnames", names, "--device", "cpu", "-o", "-"
    )
    assert code == 0, stderr
    assert {r["label"] for r in _rows(stdout)} <= {
        "blue sky",
        "green grass",
        "red apple",
    }  # labels stay joinable


def test_cli_classnames_of_the_features_in_another_order_are_refused(run_cli, tiny_features, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text(
        "red apple\nGreen  Grass\nblue sky\n"
    )  # the features' classes: blue sky, green grass, red apple
    out = tmp_path / "p.csv"
    code, _, stderr = run_cli(
        "pseudolabel", tiny_features, "--classnames", names, "--device", "cpu", "-o", out
    )
    assert code == 2 and "line 1 names 'red apple', class 3 of the features" in " ".join(stderr.split())
    assert not out.exists()


def test_cli_refuses_other_checkpoint(run_cli, tiny_features, tiny_model, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.clone().contiguous() for k, v in tiny_model.model.state_dict().items()}
    state["logit_scale"] += 1.0
    other = tmp_path / "other.safetensors"
    save_file(state, str(other))
    code, _, stderr = run_cli(
        "pseudolabel", tiny_features, "--pretrained", other, "--device", "cpu", "-o", tmp_path / "p.csv"
    )
    assert code == 2 and "checkpoint differs from the one the file was made with" in stderr
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-k", "2", "--random-k", "2"], "--random-k: --top-k and --random-k exclude each other"),
        (["--top-k", "0"], "--top-k: --top-k must be at least 1"),
        (["--min-confidence", "1.5"], "--min-confidence: --min-confidence must be in [0, 1]"),
        (["--template", "a photo"], "--template: template 'a photo' must contain exactly one {}"),
        (["--template", "a {}} photo"], "--template: template 'a {}} photo' must contain exactly one {}"),
        (["--template", "{:d}"], "--template: template '{:d}' must contain exactly one {}"),
        (["--json", "-o", "-"], "-o - and --json both write to stdout"),
    ],
)
def test_cli_errors(run_cli, tiny_features, tmp_path, args, message):
    argv = ["pseudolabel", tiny_features, "--device", "cpu", *args]
    if "-o" not in args:
        argv += ["-o", tmp_path / "p.csv"]
    code, _, stderr = run_cli(*argv)
    assert code == 2 and stderr.startswith("Error: ") and message in stderr, stderr


def test_cli_class_count_mismatch_and_overwrite(run_cli, tiny_features, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("sky\ngrass\n")
    out = tmp_path / "p.csv"
    code, _, stderr = run_cli(
        "pseudolabel", tiny_features, "--classnames", names, "--device", "cpu", "-o", out
    )
    assert code == 2 and "2 class names for the 3 classes" in stderr
    out.write_text("keep me\n")
    code, _, stderr = run_cli("pseudolabel", tiny_features, "--device", "cpu", "-o", out)
    assert code == 2 and "output exists" in stderr and out.read_text() == "keep me\n"


def test_a_selection_that_keeps_no_image_is_an_error(run_cli, tiny_features, tmp_path):
    out = tmp_path / "none.csv"
    code, _, err = run_cli(
        "pseudolabel", tiny_features, "--min-confidence", "1", "-o", out, "--device", "cpu"
    )
    assert code == 2 and "--min-confidence: no image has a confidence of 1 or more" in err, err
    assert "the highest confidence is" in err and not out.exists()


def test_zero_shot_read_in_blocks_equals_the_whole_file(tiny_features, tiny_model):
    """pseudolabel reads the features a block at a time; its predictions are those of the whole matrix at
    once, to the bit, at any batch size (the blocks are multiples of it, so predict sees the same batches)."""
    from promptcli.io.features import read_feature_index
    from promptcli.models.zeroshot import class_text_embeddings, logit_scale

    fs = read_features(tiny_features, load_views=False)
    index = read_feature_index(tiny_features)
    weights = class_text_embeddings(tiny_model, fs.classnames, list(TEMPLATES))
    assert len(fs) > 10
    for batch in (1, 2, 5, 7, len(fs), 8192):
        want = pseudolabels.predict(fs.features, weights, logit_scale(tiny_model), batch)
        got = pseudolabels.zero_shot_predict_file(
            tiny_model, index, fs.classnames, TEMPLATES, batch_size=batch
        )
        assert np.array_equal(got.labels, want.labels) and np.array_equal(got.confidence, want.confidence)
        assert got.labels.dtype == want.labels.dtype and got.confidence.dtype == want.confidence.dtype


@pytest.mark.parametrize("method", ["zero-shot", "transductive"])
def test_a_features_file_without_images_is_one_input_error(tiny_features, tmp_path, run_cli, method):
    """It reached the unexpected-error handler (formatting a missing --min-confidence, or max() of no rows)."""
    import shutil

    import h5py

    empty = tmp_path / "empty.h5"
    shutil.copy(tiny_features, empty)
    with h5py.File(empty, "a") as f:
        for name in ("features", "views", "paths", "labels", "splits"):
            values = f[name][:0]
            del f[name]
            f.create_dataset(
                name, data=values, dtype=values.dtype if values.dtype.kind != "O" else h5py.string_dtype()
            )
        del f.attrs["index_sha256"]  # an intended edit (docs/formats.md)
    out = tmp_path / "pseudo.csv"
    code, _, stderr = run_cli("pseudolabel", str(empty), "--method", method, "-o", str(out))
    assert code == 2 and "has no images" in stderr and str(empty) in stderr and "Traceback" not in stderr
    assert not out.exists()
