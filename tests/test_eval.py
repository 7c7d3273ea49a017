"""promptcli eval: metrics, ensembles, zero-shot equivalence of untrained prompts, refusals, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_csv_rows
from promptcli.analysis.evaluation import compute_metrics, evaluate, prompt_logits, zero_shot_class_logits
from promptcli.errors import InputError, PromptcliWarning
from promptcli.io.features import read_features
from promptcli.io.fileio import sha256_file
from promptcli.io.prompt_files import read_prompt, save_prompt
from promptcli.learning.options import TuneOptions
from promptcli.learning.tune_run import tune

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_features) -> dict[str, Path]:
    """The tiny features' true labels as a CSV, with a corrupt-style sidecar."""
    folder = tmp_path_factory.mktemp("eval")
    fs = read_features(tiny_features)
    labels = folder / "labels.csv"
    labels.write_text(
        "path,label\n" + "".join(f"{p},{fs.classnames[y]}\n" for p, y in zip(fs.paths, fs.labels))
    )
    (folder / "labels.csv.json").write_text(json.dumps({"type": "pair", "rate": 0.0, "seed": 5}))
    return {"features": tiny_features, "labels": labels, "dir": folder}


def _prompt(labelled, name: str, **options) -> Path:
    out = labelled["dir"] / f"{name}.safetensors"
    if not out.exists():
        tune(labelled["features"], labelled["labels"], out, TuneOptions(**options), device="cpu")
    return out


@pytest.mark.parametrize(
    "options",
    [
        {"method": "coop", "ctx_init": "a photo of a"},
        {"method": "cls-tuning", "template": "a photo of a {}."},
        {"method": "full-prompt", "template": "a photo of a {}."},
    ],
    ids=["coop", "cls-tuning", "full-prompt"],
)
def test_untrained_prompt_equals_zero_shot(labelled, tiny_model, options):
    path = _prompt(labelled, f"zero-{options['method']}", epochs=0, **options)
    fs = read_features(labelled["features"])
    feats = torch.from_numpy(fs.features)
    got = prompt_logits(read_prompt(path), feats, tiny_model)
    want = zero_shot_class_logits(tiny_model, fs.classnames, ["a photo of a {}."], feats)
    assert got.shape == (18, 3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_untrained_coop_equals_zero_shot_through_the_cli(labelled, tmp_path, run_cli):
    path = _prompt(labelled, "zero-coop", method="coop", ctx_init="a photo of a", epochs=0)
    prompt_csv, zs_csv = tmp_path / "prompt.csv", tmp_path / "zs.csv"
    code, _, err = run_cli("eval", labelled["features"], "--prompt", path, "--predictions", prompt_csv, "-q")
    assert code == 0, err
    code, _, err = run_cli(
        "eval",
        labelled["features"],
        "--zero-shot",
        "--template",
        "a photo of a {}.",
        "--predictions",
        zs_csv,
        "-q",
    )
    assert code == 0, err
    a, b = read_csv_rows(prompt_csv), read_csv_rows(zs_csv)
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert np.allclose([float(r["confidence"]) for r in a], [float(r["confidence"]) for r in b], atol=2e-6)


def test_compute_metrics_by_hand():
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # true 0, right
            [0.5, 0.3, 0.2],  # true 1, wrong (second)
            [0.1, 0.1, 0.8],  # true 2, right
            [0.6, 0.1, 0.3],  # true 1, wrong (third)
            [0.2, 0.2, 0.6],  # unknown truth: ignored
        ]
    )
    truth = np.array([0, 1, 2, 1, -1])
    m = compute_metrics(probs, truth, ["a", "b", "c"])
    assert (m.n, m.top1, m.top5_k, m.top5) == (4, 0.5, 3, 1.0)
    assert m.macro == pytest.approx((1 + 0 + 1) / 3)
    assert m.per_class == [
        {"class": "a", "n": 1, "correct": 1, "accuracy": 1.0},
        {"class": "b", "n": 2, "correct": 0, "accuracy": 0.0},
        {"class": "c", "n": 1, "correct": 1, "accuracy": 1.0},
    ]
    wide = np.eye(7)[[0, 1, 2, 3, 4, 5, 6]] * 0.5 + np.arange(7)[::-1] / 100  # class 6 ranks 7th for row 6
    m7 = compute_metrics(wide, np.array([0, 1, 2, 3, 4, 5, 6]), list("abcdefg"))
    assert m7.top1 == 1.0 and m7.top5_k == 5
    flat = np.tile(np.arange(7)[::-1] / 100, (7, 1))  # always ranks 0 > 1 > ... > 6
    assert compute_metrics(flat, np.arange(7), list("abcdefg")).top5 == pytest.approx(5 / 7)


def test_ensemble_averages_probabilities(labelled, tiny_model):
    a = _prompt(labelled, "seed1", epochs=2, seed=1, n_ctx=4)
    b = _prompt(labelled, "seed2", epochs=2, seed=2, n_ctx=4)
    result = evaluate(labelled["features"], [a, b], device="cpu", keep_probs=True)
    feats = torch.from_numpy(read_features(labelled["features"]).features)
    pa = torch.softmax(prompt_logits(read_prompt(a), feats, tiny_model).double(), -1).numpy()
    pb = torch.softmax(prompt_logits(read_prompt(b), feats, tiny_model).double(), -1).numpy()
    assert np.allclose(result.probs, (pa + pb) / 2, atol=1e-7)
    assert result.summary["ensemble"] is True and result.summary["method"] == "coop"
    assert result.summary["seed"] is None  # members differ
    assert [m["seed"] for m in result.summary["prompts"]] == [1, 2]


def test_eval_matches_tune_training_accuracy(labelled):
    for name, options in (("lp", {"method": "linear-probe", "weight_decay": 1e-3}), ("coop3", {"n_ctx": 4})):
        path = _prompt(labelled, name, epochs=3, **options)
        tuned = read_prompt(path).metadata["metrics"]["train_accuracy"]
        with pytest.warns(PromptcliWarning, match="scores the training images, not held-out ones"):
            result = evaluate(labelled["features"], [path], labels_path=labelled["labels"], device="cpu")
        assert result.metrics.top1 == pytest.approx(tuned, abs=1e-6)


def test_outputs_and_provenance(labelled, tmp_path, run_cli):
    path = _prompt(labelled, "prov", epochs=1, n_ctx=4, seed=3, loss="gce", q=0.5)
    preds, metrics = tmp_path / "preds.csv", tmp_path / "metrics.json"
    code, stdout, err = run_cli(
        "eval",
        labelled["features"],
        "--prompt",
        path,
        "--predictions",
        preds,
        "-o",
        metrics,
        "--json",
        "--device",
        "cpu",
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert json.loads(metrics.read_text()) == summary
    assert summary["method"] == "coop" and summary["loss"] == "gce" and summary["seed"] == 3
    assert summary["loss_params"] == {"name": "gce", "q": 0.5}
    assert summary["noise"] == {"type": "pair", "rate": 0.0, "seed": 5}
    assert summary["features_sha256"] == sha256_file(labelled["features"])
    assert summary["prompts"][0]["sha256"] == sha256_file(path)
    assert summary["model"]["model_name"] == "tiny-clip" and summary["n_evaluated"] == 18
    assert summary["runtime"]["device"] == "cpu" and summary["runtime"]["autocast"] is False
    assert "git" in summary["prompts"][0]  # the code that tuned the prompt (None outside a checkout)
    m = summary["metrics"]
    assert set(m) == {"n", "top1", "top5", "top5_k", "macro_accuracy", "per_class"} and m["top5_k"] == 3
    rows = read_csv_rows(preds)
    assert list(rows[0]) == ["path", "label", "confidence", "true_label"] and len(rows) == 18
    correct = sum(r["label"] == r["true_label"] for r in rows)
    assert correct / 18 == pytest.approx(m["top1"])
    code, _, err = run_cli("eval", labelled["features"], "--prompt", path, "-o", metrics)
    assert code == 2 and "output exists" in err


def test_labels_option_sets_ground_truth(labelled, tmp_path):
    fs = read_features(labelled["features"])
    subset = tmp_path / "six.csv"
    # six images, all claimed to be the first class
    subset.write_text("path,label\n" + "".join(f"{p},{fs.classnames[0]}\n" for p in fs.paths[:12:2]))
    result = evaluate(labelled["features"], zero_shot=True, labels_path=subset, device="cpu", keep_probs=True)
    assert result.metrics.n == 6 and [r["class"] for r in result.metrics.per_class] == [fs.classnames[0]]
    pred = result.probs.argmax(axis=1)[:12:2]
    assert result.metrics.top1 == pytest.approx(float(np.mean(pred == 0)))
    assert result.summary["labels_sha256"] == sha256_file(subset)


def test_refuses_prompt_for_another_model_or_class_list(labelled, tmp_path, run_cli):
    path = _prompt(labelled, "lp-ref", method="linear-probe", epochs=1, weight_decay=0.0)
    prompt = read_prompt(path)
    other_model = tmp_path / "other-model.safetensors"
    save_prompt(other_model, prompt.tensors, {**prompt.metadata, "checkpoint_sha256": "f" * 64})
    code, _, err = run_cli("eval", labelled["features"], "--prompt", other_model)
    assert code == 2 and "prompt was made for model tiny-clip" in err and "ffffffffffff" in err

    names = prompt.classnames
    for variant, expected in (
        (names[::-1], "same names in another order"),
        ([*names[:2], "purple rain"], "differing: purple rain"),
    ):
        bad = tmp_path / "classes.safetensors"
        save_prompt(bad, prompt.tensors, {**prompt.metadata, "classnames": variant})
        code, _, err = run_cli("eval", labelled["features"], "--prompt", bad)
        assert code == 2 and expected in err, err


def test_bad_invocations(labelled, tmp_path, run_cli):
    path = _prompt(labelled, "lp-ref", method="linear-probe", epochs=1, weight_decay=0.0)
    code, _, err = run_cli("eval", labelled["features"], "--prompt", path, "--zero-shot")
    assert code == 2 and "either --prompt" in err
    code, _, err = run_cli("eval", labelled["features"])
    assert code == 2 and "either --prompt" in err
    code, _, err = run_cli("eval", labelled["features"], "--zero-shot", "--template", "no placeholder")
    assert code == 2 and "--template" in err
    not_prompt = tmp_path / "x.safetensors"
    not_prompt.write_bytes(b"garbage")
    code, _, err = run_cli("eval", labelled["features"], "--prompt", not_prompt)
    assert code == 2 and "not a safetensors prompt file" in err

    from promptcli.io.features import write_features

    fs = read_features(labelled["features"])
    unlabeled = tmp_path / "unlabeled.h5"
    write_features(
        unlabeled, features=[fs.features], n_rows=len(fs), dim=fs.dim, paths=fs.paths,
        labels=[-1] * len(fs), splits=fs.splits, classnames=fs.classnames, attrs=fs.attrs, dtype="float32",
    )  # fmt: skip
    code, _, err = run_cli("eval", unlabeled, "--prompt", path)
    assert code == 2 and "no ground-truth labels" in err and "--labels" in err
    code, stdout, err = run_cli("eval", unlabeled, "--prompt", path, "--labels", labelled["labels"], "--json")
    assert code == 0 and json.loads(stdout)["n_evaluated"] == 18


def test_every_method_has_a_head_that_saves_and_rebuilds_itself():
    """One registry decides how each method's head is saved and rebuilt: eval, clean and tune never branch."""
    from promptcli.choices import Method
    from promptcli.models.heads import HEAD_OF_METHOD

    assert set(HEAD_OF_METHOD) == set(Method.values())
    for cls in set(HEAD_OF_METHOD.values()):
        assert (
            callable(cls.from_tensors) and callable(cls.file_metadata) and isinstance(cls.needs_model, bool)
        )


def test_an_ensemble_over_noise_seeds_keeps_its_noise_condition():
    from promptcli.analysis.evaluation import _common_noise
    from promptcli.analysis.results import eval_run

    draws = [
        {"type": "symmetric", "rate": 0.75, "seed": s, "shots": 16, "n_noisy": 120 + s, "realised_rate": 0.75}
        for s in (1, 2)
    ]
    common = _common_noise(draws)
    assert common == {"type": "symmetric", "rate": 0.75, "shots": 16, "realised_rate": 0.75}
    summary = {
        "metrics": {"top1": 0.5, "top5": 0.9, "macro_accuracy": 0.5},
        "noise": common,
        "method": "coop",
    }
    summary["prompts"] = [{"noise": d} for d in draws]
    run = eval_run(summary, Path("ens.json"))
    assert run is not None and run.noise_rate == 0.75 and run.noise_type == "symmetric"
    # different conditions have no common one: rate, type, or how the labels were made
    assert _common_noise([draws[0], {**draws[1], "rate": 0.5}]) is None
    assert _common_noise([draws[0], {**draws[1], "labels": "transductive"}]) is None
    assert _common_noise([draws[0], None]) is None
    assert _common_noise([None, None]) is None


def test_eval_refuses_labels_that_say_they_are_not_ground_truth(labelled, tmp_path, run_cli):
    path = _prompt(labelled, "lp-ref", method="linear-probe", epochs=1, weight_decay=0.0)
    noisy = tmp_path / "noisy.csv"
    code, _, err = run_cli("corrupt", labelled["features"], "--rate", "0.5", "--seed", "1", "-o", noisy, "-q")
    assert code == 0, err
    code, _, err = run_cli("eval", labelled["features"], "--prompt", path, "--labels", noisy)
    assert code == 2 and "rows are marked is_noisy: noisy labels, not ground truth" in " ".join(err.split())
    plain = tmp_path / "plain.csv"  # the noisy labels without their truth columns, the sidecar beside them
    plain.write_text("".join(",".join(line.split(",")[:2]) + "\n" for line in noisy.read_text().splitlines()))
    record = json.loads(noisy.with_name("noisy.csv.json").read_text())
    record.pop("csv_sha256", None)  # as a hand-made sidecar, or one from before the hash was recorded
    (tmp_path / "plain.csv.json").write_text(json.dumps(record))
    code, _, err = run_cli("eval", labelled["features"], "--prompt", path, "--labels", plain)
    assert code == 2 and "written by `promptcli corrupt (rate 0.5)`: not ground truth" in " ".join(
        err.split()
    )
    # clean_label differing from label says so too, with no is_noisy column (or a blank one) and no sidecar
    rows = [line.split(",") for line in noisy.read_text().splitlines()]
    col = {name: i for i, name in enumerate(rows[0])}
    for name, blank in (("no_isnoisy.csv", None), ("blank_isnoisy.csv", "")):
        keep = ["path", "label", "clean_label"] + (["is_noisy"] if blank is not None else [])
        text = "".join(
            ",".join(k if n == 0 else (blank if k == "is_noisy" else r[col[k]]) for k in keep) + "\n"
            for n, r in enumerate(rows)
        )
        (tmp_path / name).write_text(text)
        code, _, err = run_cli("eval", labelled["features"], "--prompt", path, "--labels", tmp_path / name)
        assert code == 2 and "differs from their clean_label: noisy labels, not ground truth" in " ".join(
            err.split()
        ), err


def test_eval_records_whether_the_probe_searched_its_weight_decay(labelled):
    fixed = _prompt(labelled, "lp-ref", method="linear-probe", epochs=1, weight_decay=0.0)
    searched = _prompt(labelled, "lp-search", method="linear-probe", epochs=1)
    for path, want in ((fixed, False), (searched, True)):
        with pytest.warns(PromptcliWarning):  # scored on its training features
            result = evaluate(labelled["features"], [path], device="cpu")
        assert result.summary["prompts"][0]["weight_decay_searched"] is want


def test_evaluate_file_never_writes_over_its_one_prompt(labelled, tmp_path):
    from promptcli.analysis.evaluation import evaluate_file

    prompt = tmp_path / "victim.safetensors"
    prompt.write_bytes(
        _prompt(labelled, "lp-ref", method="linear-probe", epochs=1, weight_decay=0.0).read_bytes()
    )
    before = prompt.read_bytes()
    with pytest.raises(InputError, match="is the input --prompt"):
        evaluate_file(labelled["features"], str(prompt), output=str(prompt), force=True, device="cpu")
    assert prompt.read_bytes() == before


def test_eval_warns_when_the_test_features_were_preprocessed_otherwise(labelled, tmp_path):
    import shutil
    import warnings

    import h5py

    prompt = _prompt(labelled, "lp-ref", method="linear-probe", epochs=1, weight_decay=0.0)
    assert json.loads(read_prompt(prompt).metadata["preprocess"])["size"]  # tune records the preprocessing
    other = tmp_path / "other.h5"
    shutil.copy(labelled["features"], other)
    with h5py.File(other, "a") as f:
        cfg = json.loads(f.attrs["preprocess"])
        f.attrs["preprocess"] = json.dumps({**cfg, "interpolation": "bilinear"}, sort_keys=True)
        del f.attrs["index_sha256"]  # an intended edit (docs/formats.md)
    with pytest.warns(PromptcliWarning, match="other preprocessing .*interpolation bicubic -> bilinear"):
        evaluate(other, [prompt], device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(labelled["features"], [prompt], device="cpu")
    assert not [w for w in caught if "preprocessing" in str(w.message)]


def test_counted_ranks_equal_a_stable_sort_with_ties():
    """compute_metrics counts the true class's rank; a stable sort (ties to the lower index) must agree."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        n, c = int(rng.integers(1, 40)), int(rng.integers(1, 12))
        probs = rng.integers(0, 4, size=(n, c)).astype(float)  # many ties
        truth = rng.integers(0, c, size=n)
        metrics = compute_metrics(probs, truth, [str(i) for i in range(c)])
        ranked = np.argsort(-probs, axis=1, kind="stable")
        assert metrics.top1 == float((ranked[:, 0] == truth).mean())
        assert metrics.top5 == float((ranked[:, : min(5, c)] == truth[:, None]).any(axis=1).mean())


# --- eval streams the features a block of rows at a time: the same numbers as the whole file at once -------


def _rounded_logits(first: int, n_classes: int, scale: float):
    """Coarsely rounded logits (so that classes tie, at the true class too), computed row by row: the same
    bits whatever the rows around them (a matrix product's need not be, at a handful of rows)."""
    return lambda feats: torch.round(feats[:, first : first + n_classes] * 2) * scale


def test_blocked_predictions_equal_the_whole_file_with_ties_and_an_ensemble(tmp_path):
    from promptcli.analysis.evaluation import (
        Member,
        ensemble_probabilities,
        metrics_from_ranks,
        predict_rows,
        true_class_rank,
    )
    from promptcli.io.features import read_feature_index, write_features

    n, dim, names = 61, 8, list("abcdef")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = rng.integers(-1, len(names), size=n)  # about one in seven unknown
    path = tmp_path / "f.h5"
    write_features(
        path, features=[x], n_rows=n, dim=dim, paths=[f"{i}.png" for i in range(n)], labels=truth,
        splits=[""] * n, classnames=names, attrs={}, dtype="float32",
    )  # fmt: skip
    members = [
        Member(_rounded_logits(0, len(names), 1.0), 1),
        Member(_rounded_logits(2, len(names), 2.0), 1),
    ]
    whole = ensemble_probabilities([m.logits(torch.from_numpy(x)) for m in members])
    pred = whole.argmax(axis=1)
    known = truth >= 0
    tied = (whole == whole.max(axis=1, keepdims=True)).sum(axis=1) > 1
    true_tied = (whole[known] == whole[known, truth[known]][:, None]).sum(axis=1) > 1
    assert tied.sum() >= 5 and true_tied.sum() >= 5  # the case has ties, at the maximum and at the true class
    want = compute_metrics(whole, truth, names)
    index = read_feature_index(path)
    for block in (1, 2, 3, 7, 60, 61, 100):
        rows = predict_rows(index, members, truth, torch.device("cpu"), block=block, keep_probs=True)
        assert np.array_equal(rows.probs, whole), block
        assert np.array_equal(rows.pred, pred) and np.array_equal(rows.confidence, whole[np.arange(n), pred])
        assert np.array_equal(rows.rank[~known], np.full((~known).sum(), -1))
        assert np.array_equal(rows.rank[known], true_class_rank(whole[known], truth[known]))
        assert metrics_from_ranks(rows.rank[known], truth[known], names, len(names)) == want, block


def test_logits_in_aligned_blocks_equal_one_call(tiny_model):
    """eval's blocks are multiples of predict_logits' chunk, so a prompt's logits are computed chunk for chunk
    as in one call on the whole file: to the bit."""
    from promptcli.io.features import row_blocks
    from promptcli.models.heads import LinearHead, logits_predictor, predict_logits, predict_step

    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(43, 16, generator=gen)
    head = LinearHead(16, 9, weight=torch.randn(9, 16, generator=gen))
    assert predict_step(head, batch=4) == 4
    whole = predict_logits(head, feats, batch=4)
    predictor = logits_predictor(head, batch=4)
    for block in (4, 8, 12):
        blocks = [predictor(feats[start:stop]) for start, stop in row_blocks(len(feats), block)]
        assert torch.equal(torch.cat(blocks), whole)


def test_non_finite_logits_are_counted_over_every_block(tmp_path):
    from promptcli.analysis.evaluation import Member, predict_rows
    from promptcli.io.features import read_feature_index, write_features
    from promptcli.io.prompt_files import PromptFile

    n = 20
    x = np.tile(np.eye(4, dtype=np.float32), (5, 1))
    path = tmp_path / "f.h5"
    write_features(
        path, features=[x], n_rows=n, dim=4, paths=[f"{i}.png" for i in range(n)], labels=[0] * n,
        splits=[""] * n, classnames=list("abcd"), attrs={}, dtype="float32",
    )  # fmt: skip
    prompt = PromptFile(tmp_path / "p.safetensors", {}, {})
    # every fourth row (5 in all, spread over the blocks) divides by zero
    member = Member(lambda feats: feats / (feats[:, :1] - 1), 1, prompt)
    with pytest.raises(InputError, match=r"non-finite logits \(NaN or inf\) on 5 of 20 images"):
        predict_rows(
            read_feature_index(path), [member], np.zeros(n, dtype=np.int64), torch.device("cpu"), block=3
        )


@pytest.mark.parametrize("command", ["eval", "pseudolabel"])
def test_a_features_file_replaced_while_the_model_loads_is_an_error(labelled, tmp_path, monkeypatch, command):
    """Both read the paths and labels, load the model, then stream the values: a file renamed over the input
    meanwhile (extract --force) scored one file's rows against another's labels, exit 0."""
    import shutil

    import h5py

    import promptcli.noise.pseudolabels as pseudolabels
    from promptcli.models import loading

    path = tmp_path / "test.h5"
    shutil.copy(labelled["features"], path)

    def renamed_over() -> None:
        other = tmp_path / "other.h5"
        shutil.copy(path, other)
        with h5py.File(other, "a") as f:
            f["features"][...] = f["features"][...][::-1]
        other.replace(path)

    real_load = loading.load_model_from_record

    def load_then_rename(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        renamed_over()
        return loaded

    monkeypatch.setattr(loading, "load_model_from_record", load_then_rename)
    with pytest.raises(InputError, match="changed while it was read"):
        if command == "eval":
            evaluate(path, zero_shot=True, device="cpu")
        else:
            pseudolabels.pseudolabel_file(
                path, str(tmp_path / "pseudo.csv"), pseudolabels.PseudolabelOptions()
            )
    assert not (tmp_path / "pseudo.csv").exists()


def test_a_nan_row_never_counts_as_correct(tmp_path):
    """NaN compares false with everything: the true class of a NaN row had rank 0, i.e. predicted."""
    from promptcli.analysis.evaluation import Member, predict_rows, true_class_rank
    from promptcli.io.features import read_feature_index, write_features

    probs = np.array([[np.nan, np.nan], [0.9, 0.1]])
    assert list(true_class_rank(probs, np.array([0, 0]))) == [2, 0]
    n, path = 4, tmp_path / "f.h5"
    x = np.tile(np.eye(2, dtype=np.float32), (2, 1))
    write_features(
        path, features=[x], n_rows=n, dim=2, paths=[f"{i}.png" for i in range(n)], labels=[0] * n,
        splits=[""] * n, classnames=["a", "b"], attrs={}, dtype="float32",
    )  # fmt: skip
    zero_shot = Member(lambda feats: feats * float("inf"), 1)  # a zero-shot member: no prompt
    with pytest.raises(InputError, match=r"zero-shot CLIP gives non-finite logits .* on 4 of 4 images"):
        predict_rows(read_feature_index(path), [zero_shot], np.zeros(n, dtype=np.int64), "cpu")


def _bad_checkpoint(tiny_model_files, tmp_path: Path, name: str, value: float) -> Path:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tiny_model_files["weights"]))
    weights[name] = torch.full_like(weights[name], value)
    out = tmp_path / f"{name}.safetensors"
    save_file(weights, str(out))
    return out


@pytest.mark.parametrize(
    ("tensor", "value", "message"),
    [
        ("logit_scale", 100.0, "logit_scale is 100, so its temperature exp"),  # 100 stored, not ln 100
        ("text_projection", float("inf"), "text embeddings are zero or not finite"),
        ("text_projection", 0.0, "text embeddings are zero or not finite"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "pseudolabel"])
def test_zero_shot_refuses_a_checkpoint_with_non_finite_logits(
    tiny_model_files, tmp_path, run_cli, tensor, value, message, command
):
    """Such a checkpoint gave NaN logits: eval reported top-1 100% with NaN confidences, exit 0."""
    from conftest import CLASSES, write_synthetic_features
    from promptcli.models.loading import load_model

    bad = _bad_checkpoint(tiny_model_files, tmp_path, tensor, value)
    loaded = load_model("tiny-clip", str(bad), tiny_model_files["config"], device="cpu")
    features = tmp_path / "f.h5"
    write_synthetic_features(features, loaded, list(CLASSES), per_class=3, spread=0.1)
    args = ["--zero-shot"] if command == "eval" else []
    code, _, err = run_cli(command, features, *args, "--device", "cpu", "-q", "-o", tmp_path / "out")
    assert code == 2 and message in err and bad.name in err, err
    assert not (tmp_path / "out").exists()


def _edited_prompt(source: Path, out: Path, metadata: dict | None = None, **tensors: torch.Tensor) -> Path:
    """A copy of the prompt ``source`` with some metadata entries and tensors replaced."""
    prompt = read_prompt(source)
    metadata = dict(metadata or {})
    config = {**prompt.metadata.get("prompt_config", {}), **metadata.pop("prompt_config", {})}
    metadata = {**prompt.metadata, **metadata, **({"prompt_config": config} if config else {})}
    save_prompt(out, {**prompt.tensors, **tensors}, metadata)
    return out


@pytest.mark.parametrize(
    ("method", "metadata", "tensors", "message"),
    [
        ("linear-probe", {"classnames": None}, {}, "metadata 'classnames' is null, not a list"),
        ("linear-probe", {"classnames": 5}, {}, "metadata 'classnames' is 5, not a list"),
        ("linear-probe", {"classnames": [1, 2, 3]}, {}, "not a list of class names"),
        (
            "linear-probe",
            {"embed_dim": "32.0"},
            {},
            "metadata 'embed_dim' is \"32.0\", not a positive integer",
        ),
        (
            "coop",
            {"prompt_config": {"prompt.init_std": "nan"}},
            {},
            "init_std must be positive and finite (got nan)",
        ),
        ("linear-probe", {}, {"weight": torch.zeros(4, 32)}, "weight [4, 32] do not fit this 3-class linear"),
        ("linear-probe", {}, {"weight": torch.zeros(3, 16)}, "weight [3, 16] do not fit this 3-class linear"),
        ("linear-probe", {}, {"bias": torch.zeros(4)}, "bias [4], weight [3, 32] do not fit"),
        ("linear-probe", {}, {"bias": torch.zeros(1)}, "bias [1], weight [3, 32] do not fit"),  # broadcast
    ],
)
@pytest.mark.parametrize("command", ["eval", "clean"])
def test_a_prompt_file_with_damaged_metadata_or_tensor_shapes_is_refused(
    labelled, tmp_path, run_cli, method, metadata, tensors, message, command
):
    """Such files gave a TypeError, ValueError or RuntimeError (exit 1), or a bias silently broadcast."""
    source = _prompt(labelled, f"zero-{method}-plain", method=method, epochs=0)
    bad = _edited_prompt(source, tmp_path / "bad.safetensors", metadata, **tensors)
    if command == "eval":
        args = ["eval", labelled["features"], "--prompt", bad]
    else:
        args = ["clean", labelled["features"], labelled["labels"], "--prompt", bad, "-o", tmp_path / "c.csv"]
    code, _, err = run_cli(*args, "--device", "cpu", "-q")
    assert code == 2 and message in err and "bad.safetensors" in err, err


@pytest.mark.parametrize(
    ("sidecar", "field"),
    [
        ({"type": "symmetric", "rate": "30%"}, "rate is '30%', not a finite number"),
        ({"cleaning": {"options": {"keep_fraction": "0.8"}}}, "cleaning.options.keep_fraction is '0.8'"),
        ({"seed": 1.5}, "seed is 1.5, not an integer"),
    ],
)
def test_a_damaged_labels_sidecar_is_refused_by_name(labelled, tmp_path, run_cli, sidecar, field):
    labels = tmp_path / "labels.csv"  # with the clean_label and is_noisy that gradstats needs
    lines = labelled["labels"].read_text().splitlines()
    rows = [f"{line},{line.split(',')[1]},0" for line in lines[1:]]
    labels.write_text("\n".join(["path,label,clean_label,is_noisy", *rows]) + "\n")
    (tmp_path / "labels.csv.json").write_text(json.dumps(sidecar))
    for command in (
        ["eval", labelled["features"], "--zero-shot", "--labels", labels],
        ["tune", labelled["features"], labels, "-o", tmp_path / "p.safetensors", "--method", "linear-probe"],
        ["gradstats", labelled["features"], labels, "-o", tmp_path / "g.csv", "--epochs", "1"],
    ):
        code, _, err = run_cli(*command, "--device", "cpu")
        err = " ".join(err.split())
        assert code == 2 and f"labels.csv.json: the labels' sidecar is damaged: {field}" in err, (
            command,
            err,
        )


def test_a_too_deeply_nested_labels_sidecar_is_ignored_with_a_warning(labelled, tmp_path, run_cli):
    labels = tmp_path / "labels.csv"
    labels.write_text(labelled["labels"].read_text())
    (tmp_path / "labels.csv.json").write_text("[" * 100_000 + "]" * 100_000)
    out = tmp_path / "p.safetensors"
    code, _, err = run_cli(
        "tune", labelled["features"], labels, "-o", out, "--method", "linear-probe", "--device", "cpu"
    )
    assert code == 0 and "nestedtoodeeplytoread);ignored" in "".join(err.split()), err


def test_a_pseudolabel_sidecars_per_class_statistics_are_a_valid_noise_record(tmp_path):
    from promptcli.io.sidecar import check_noise_record

    stats = {"blue sky": {"predicted": 6, "kept": 6, "kept_accuracy": 1.0}}
    check_noise_record({"per_class": stats}, tmp_path / "l.csv.json")  # pseudolabel writes its counts
    check_noise_record({"per_class": True}, tmp_path / "l.csv.json")  # corrupt writes a flag
    with pytest.raises(InputError, match="per_class is 'yes'"):
        check_noise_record({"per_class": "yes"}, tmp_path / "l.csv.json")
