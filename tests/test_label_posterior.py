"""The noise-aware label posterior (clean --score posterior): EM maths by hand, recovery, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_csv_rows, unit_rows
from promptcli.analysis.evaluation import evaluate
from promptcli.io.features import read_features
from promptcli.noise.label_posterior import (
    centred_directions,
    class_transition,
    fit_label_posterior,
    label_posterior,
    leave_one_out_cosine,
    log_channel,
    max_noise_rate,
    wrong_label_probability,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _symmetric_noise(y: np.ndarray, n_classes: int, rate: float, rng) -> np.ndarray:
    """Exactly round(rate x N) labels moved to a uniformly chosen other class."""
    noisy = y.copy()
    flip = rng.choice(len(y), size=round(rate * len(y)), replace=False)
    noisy[flip] = (y[flip] + rng.integers(1, n_classes, size=len(flip))) % n_classes
    return noisy


def test_log_channel_is_the_symmetric_noise_matrix():
    labels = torch.tensor([0, 2, 1])
    out = log_channel(labels, 4, 0.3)
    expected = np.full((3, 4), math.log(0.1))
    expected[[0, 1, 2], [0, 2, 1]] = math.log(0.7)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(np.exp(out.numpy()).sum(axis=1), 1.0, rtol=1e-12)  # a distribution over y
    assert max_noise_rate(10) == pytest.approx(0.9)


def test_zero_rounds_is_bayes_rule_on_prior_and_channel():
    prior = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64), dim=1)
    labels = torch.tensor([1, 1])
    result = label_posterior(torch.randn(2, 5), labels, prior, centroid_scale=10.0, noise_rate=0.5, rounds=0)
    p = np.exp(prior.numpy())
    like = np.array([[0.25, 0.5, 0.25], [0.25, 0.5, 0.25]])  # P(y=1 | k) at r = 0.5, C = 3
    expected = p * like / (p * like).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(result.posterior.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(
        wrong_label_probability(result, labels).numpy(), 1 - expected[:, 1], rtol=1e-12
    )
    assert not result.rate_estimated and result.noise_rate == 0.5


def _loo_centroid_cosine_brute_force(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    out = np.zeros_like(q)
    for i in range(len(d)):
        others = np.arange(len(d)) != i
        c = q[others].T @ d[others]
        out[i] = c @ d[i] / np.linalg.norm(c, axis=1)
    return out


def test_leave_one_out_cosine_matches_recomputing_each_centroid():
    rng = np.random.default_rng(3)
    d = centred_directions(torch.from_numpy(rng.normal(size=(9, 6)))).numpy()
    q = rng.dirichlet(np.ones(4), size=9)
    got = leave_one_out_cosine(torch.from_numpy(d), torch.from_numpy(q)).numpy()
    np.testing.assert_allclose(got, _loo_centroid_cosine_brute_force(d, q), rtol=1e-10, atol=1e-12)


def test_one_round_by_hand_with_the_rate_estimated():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(7, 4)))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    prior = torch.log_softmax(torch.from_numpy(rng.normal(size=(7, 3))), dim=1)
    a, s = 0.5, 5.0
    result = label_posterior(x, y, prior, prior_weight=a, centroid_scale=s, rounds=1)
    # by hand: E-step at r = 0.5, r <- 1 - mean q(y), leave-one-out centroids, final E-step
    d = (x - x.mean(0)).numpy()
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    ch = np.full((7, 3), 0.25)
    ch[np.arange(7), y.numpy()] = 0.5
    p = np.exp(a * prior.numpy())
    q = p * ch / (p * ch).sum(axis=1, keepdims=True)
    r = 1 - q[np.arange(7), y.numpy()].mean()
    evidence = a * prior.numpy() + s * _loo_centroid_cosine_brute_force(d, q)
    ch = np.full((7, 3), r / 2)
    ch[np.arange(7), y.numpy()] = 1 - r
    q = np.exp(evidence) * ch
    q /= q.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(result.posterior.numpy(), q, rtol=1e-10)
    assert result.noise_rate == pytest.approx(r, rel=1e-12) and result.rate_estimated
    softmax = np.exp(evidence) / np.exp(evidence).sum(axis=1, keepdims=True)
    assert result.log_likelihood == pytest.approx(np.log((softmax * ch).sum(axis=1)).sum(), rel=1e-12)
    assert (result.prior_weight, result.centroid_scale, result.fitted) == (a, s, False)
    np.testing.assert_allclose(centred_directions(x).numpy(), d, rtol=1e-12)


def test_a_row_is_not_its_own_evidence():
    """A lone image far from the rest, labelled with a class nobody else has: no centroid backs it."""
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.9, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1])
    flat = torch.full((4, 2), -math.log(2), dtype=torch.float64)
    result = label_posterior(x, y, flat, centroid_scale=20.0, noise_rate=0.2)
    # its class-1 centroid is empty without it (cosine 0); class 0's points the other way
    loo = leave_one_out_cosine(centred_directions(x), result.posterior)
    assert loo[3, 1] == pytest.approx(0.0, abs=1e-9) and loo[3, 0] < -0.9
    assert result.posterior[3, 1] > 0.99  # so the label and the centroid of class 0 decide


def _noisy_clusters(rng, n_classes: int, per_class: int, dim: int, spread: float, rate: float = 0.5):
    """(true classes, unit features around one centre per class, labels with symmetric noise at ``rate``)."""
    centers = unit_rows(rng.normal(size=(n_classes, dim)))
    y = np.repeat(np.arange(n_classes), per_class)
    x = torch.from_numpy(unit_rows(centers[y] + spread * rng.normal(size=(len(y), dim))))
    return y, x, torch.from_numpy(_symmetric_noise(y, n_classes, rate, rng))


def test_fitting_picks_the_grid_point_with_the_highest_label_likelihood():
    rng = np.random.default_rng(1)
    n_classes, per_class = 4, 15
    y, x, noisy = _noisy_clusters(rng, n_classes, per_class, dim=16, spread=0.5)
    prior = torch.log_softmax(
        torch.from_numpy(3 * rng.normal(size=(len(y), n_classes))), dim=1
    )  # a poor prior
    weights, fractions = (1.0, 0.25), (1.0, 0.5, 0.25)
    steps = []
    fitted = fit_label_posterior(
        x,
        noisy,
        prior,
        20.0,
        prior_weights=weights,
        centroid_fractions=fractions,
        on_step=lambda: steps.append(1),
    )
    assert len(steps) == len(weights) * len(fractions)  # one progress step per grid point
    each = {
        (a, f * 20.0): label_posterior(x, noisy, prior, prior_weight=a, centroid_scale=f * 20.0)
        for a in weights
        for f in fractions
    }
    assert [(a, s) for a, s, _ in fitted.grid] == list(each)
    for a, s, ll in fitted.grid:
        assert ll == pytest.approx(each[(a, s)].log_likelihood, rel=1e-12)
    best = max(each, key=lambda k: each[k].log_likelihood)
    assert (fitted.prior_weight, fitted.centroid_scale) == best and fitted.fitted
    torch.testing.assert_close(fitted.posterior, each[best].posterior)
    # the random prior is worth little: the fit turns it down
    assert fitted.prior_weight == 0.25


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_true_classes_and_rate_of_separable_data_with_an_uninformative_prior(seed):
    """Clusters in feature space + 40% symmetric noise, flat prior: the labels alone must be corrected."""
    rng = np.random.default_rng(seed)
    n_classes, per_class, rate = 5, 40, 0.4
    centers = unit_rows(rng.normal(size=(n_classes, 32)))
    y = np.repeat(np.arange(n_classes), per_class)
    x = unit_rows(centers[y] + 0.3 * rng.normal(size=(len(y), 32)))
    noisy = _symmetric_noise(y, n_classes, rate, rng)
    flat = torch.full((len(y), n_classes), -math.log(n_classes), dtype=torch.float64)
    result = label_posterior(torch.from_numpy(x), torch.from_numpy(noisy), flat, centroid_scale=20.0)
    predicted = result.posterior.argmax(dim=1).numpy()
    assert (predicted == y).mean() >= 0.94  # 0.95-0.985 over these seeds; the labels alone: 0.6
    assert result.noise_rate == pytest.approx(rate, abs=0.03)
    np.testing.assert_allclose(result.posterior.sum(dim=1).numpy(), 1.0, rtol=1e-12)
    # the score flags the wrong labels
    wrong = wrong_label_probability(result, torch.from_numpy(noisy)).numpy()
    assert ((wrong > 0.5) == (noisy != y)).mean() >= 0.94


def test_class_transition_is_smoothed_counts():
    q = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    t = class_transition(q, labels, rate=0.3, smoothing=2.0).numpy()
    counts = np.array([[0.9 + 0.2, 0.5], [0.1 + 0.8, 0.5]])  # rows: true class, columns: given label
    symmetric = np.array([[0.7, 0.3], [0.3, 0.7]])
    expected = (counts + 2.0 * symmetric) / (np.array([[1.6], [1.4]]) + 2.0)
    np.testing.assert_allclose(t, expected, rtol=1e-12)
    np.testing.assert_allclose(t.sum(axis=1), 1.0, rtol=1e-12)


def test_class_model_recovers_pair_noise():
    """Each class's wrong labels all go to the next class: the class-conditional model finds the pairs."""
    rng = np.random.default_rng(5)
    n_classes, per_class, rate = 5, 40, 0.4
    centers = unit_rows(rng.normal(size=(n_classes, 32)))
    y = np.repeat(np.arange(n_classes), per_class)
    x = torch.from_numpy(unit_rows(centers[y] + 0.3 * rng.normal(size=(len(y), 32))))
    noisy = y.copy()
    for k in range(n_classes):
        moved = rng.choice(np.flatnonzero(y == k), size=round(rate * per_class), replace=False)
        noisy[moved] = (k + 1) % n_classes
    flat = torch.full((len(y), n_classes), -math.log(n_classes), dtype=torch.float64)
    result = label_posterior(x, torch.from_numpy(noisy), flat, centroid_scale=20.0, noise_model="class")
    assert result.noise_model == "class" and result.transition is not None
    assert (result.posterior.argmax(dim=1).numpy() == y).mean() >= 0.95
    t = result.transition.numpy()
    off = t - np.diag(np.diag(t))
    assert (off.argmax(axis=1) == (np.arange(n_classes) + 1) % n_classes).all()  # each row's error goes next
    assert result.noise_rate == pytest.approx(rate, abs=0.05)


@pytest.mark.parametrize("noise_model", ["symmetric", "class"])
def test_the_fit_in_blocks_of_rows_equals_the_whole_fit(monkeypatch, noise_model):
    """The E-step runs a block of rows at a time (memory O(block x C)): blocks of 7 rows, not dividing the 200
    labelled rows, give the one-block fit's posterior, rate, transition and likelihood to rounding."""
    import promptcli.noise.label_posterior as label_posterior_module

    rng = np.random.default_rng(6)
    n_classes, per_class = 5, 40
    y, x, noisy = _noisy_clusters(rng, n_classes, per_class, dim=32, spread=0.4)
    prior = torch.log_softmax(torch.from_numpy(rng.normal(size=(len(y), n_classes))), dim=1)
    kwargs = {"centroid_scale": 20.0, "noise_model": noise_model}
    whole = label_posterior(x, noisy, prior, **kwargs)
    monkeypatch.setattr(label_posterior_module, "BLOCK_VALUES", 35)  # 7 rows of 5 classes
    blocks = label_posterior(x, noisy, prior, **kwargs)
    torch.testing.assert_close(blocks.posterior, whole.posterior, rtol=0, atol=1e-10)
    assert blocks.noise_rate == pytest.approx(whole.noise_rate, abs=1e-12)
    assert blocks.log_likelihood == pytest.approx(whole.log_likelihood, rel=1e-12)
    if noise_model == "class":
        torch.testing.assert_close(blocks.transition, whole.transition, rtol=0, atol=1e-12)
    assert (whole.posterior.argmax(dim=1).numpy() == y).mean() > 0.8  # a fit, not noise


def test_bad_shapes_and_rates_are_refused():
    with pytest.raises(ValueError, match="disagree"):
        label_posterior(torch.zeros(3, 2), torch.zeros(3), torch.zeros(4, 2), centroid_scale=1.0)
    with pytest.raises(ValueError, match="noise rate must be in"):
        label_posterior(
            torch.zeros(3, 2), torch.zeros(3), torch.zeros(3, 2), centroid_scale=1.0, noise_rate=0.5
        )
    with pytest.raises(ValueError, match="noise rate must be in"):
        fit_label_posterior(torch.zeros(3, 2), torch.zeros(3), torch.zeros(3, 2), 1.0, noise_rate=0.5)
    with pytest.raises(ValueError, match="noise model must be one of symmetric, class"):
        label_posterior(
            torch.zeros(3, 2), torch.zeros(3), torch.zeros(3, 2), centroid_scale=1.0, noise_model="pair"
        )


# --- through the CLI ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_labels(tmp_path_factory, tiny_features) -> Path:
    """The tiny features' labels with a third of them moved to the next class."""
    fs = read_features(tiny_features)
    names = fs.classnames
    lines = ["path,label,clean_label,is_noisy"]
    for i, (p, y) in enumerate(zip(fs.paths, fs.labels)):
        given = (y + 1) % len(names) if i % 3 == 0 else y
        lines.append(f"{p},{names[given]},{names[y]},{int(given != y)}")
    path = tmp_path_factory.mktemp("posterior") / "noisy.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_zero_shot_margin_matches_eval_zero_shot(tiny_features, noisy_labels, tmp_path, run_cli):
    result = evaluate(tiny_features, [], zero_shot=True, device="cpu", keep_probs=True)
    fs = result.features
    rows = read_csv_rows(noisy_labels)
    labels = np.array([fs.classnames.index(r["label"]) for r in rows])
    probs = result.probs[[fs.paths.index(r["path"]) for r in rows]]
    other = probs.copy()
    other[np.arange(len(rows)), labels] = -1
    margin = other.max(axis=1) - probs[np.arange(len(rows)), labels]
    scores = tmp_path / "scores.csv"
    code, stdout, err = run_cli("clean", tiny_features, noisy_labels, "--zero-shot", "-o", scores, "--json")
    assert code == 0, err
    np.testing.assert_allclose([float(r["score"]) for r in read_csv_rows(scores)], margin, atol=2e-6)
    summary = json.loads(stdout)
    assert summary["zero_shot"] == {"templates": ["a photo of a {}."]} and summary["prompts"] == []
    assert summary["score"] == "margin" and summary["noise_model"] is None


def test_posterior_scores_relabel_and_record_the_noise_model(tiny_features, noisy_labels, tmp_path, run_cli):
    scores, fixed = tmp_path / "scores.csv", tmp_path / "fixed.csv"
    code, stdout, err = run_cli(
        "clean", tiny_features, noisy_labels, "--zero-shot", "--score", "posterior", "--fixed-weights",
        "--relabel", "-o", scores, "--clean-out", fixed, "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    model = summary["noise_model"]
    assert summary["score"] == "posterior" and summary["options"]["threshold"] == 0.5
    assert model["kind"] == "symmetric" and model["rate_estimated"] and model["rounds"] == 10
    assert 0 < model["noise_rate"] < max_noise_rate(len(read_features(tiny_features).classnames))
    assert model["weights"] == "fixed" and model["prior_weight"] == 1.0
    assert model["centroid_scale"] == model["logit_scale"] and summary["options"]["fit_weights"] is False
    rows = read_csv_rows(scores)
    score = np.array([float(r["score"]) for r in rows])
    p_label = np.array([float(r["p_label"]) for r in rows])
    np.testing.assert_allclose(score, 1 - p_label, atol=2e-6)  # the score is 1 - q(label)
    assert ((score > 0.5) == np.array([r["suspect"] == "1" for r in rows])).all()
    counts = summary["counts"]
    assert counts["kept"] + counts["dropped"] == len(rows) == counts["rows_in"]
    assert len(read_csv_rows(fixed)) == counts["kept"]
    # the tiny classes are colour blobs: the image evidence fixes most of the moved labels
    detection = summary["detection"]
    assert detection["auroc"] > 0.8
    assert detection["noise_rate_after"] < detection["noise_rate_before"]
    side = json.loads(Path(f"{scores}.json").read_text())
    assert side["noise_model"] == model and side["options"]["noise_rate"] is None
    said = " ".join(err.split())  # rich wraps long lines
    assert "Noise model: symmetric" in said and "evidence weights (fixed): prior 1," in said

    # with --zero-shot the weights are fitted by default; the fixed pair is on the grid, so the fit
    # gives the labels at least its likelihood
    code, stdout, err = run_cli(
        "clean", tiny_features, noisy_labels, "--zero-shot", "--score", "posterior", "--json", "-q"
    )
    assert code == 0, err
    fitted = json.loads(stdout)["noise_model"]
    assert fitted["weights"] == "fitted" and summary["options"]["fit_weights"] is False
    assert fitted["log_likelihood"] >= model["log_likelihood"] - 1e-9
    from promptcli.noise.label_posterior import FIT_CENTROID_FRACTIONS, FIT_PRIOR_WEIGHTS

    assert fitted["prior_weight"] in FIT_PRIOR_WEIGHTS
    assert any(
        fitted["centroid_scale"] == pytest.approx(f * fitted["logit_scale"]) for f in FIT_CENTROID_FRACTIONS
    )

    # the class-conditional model records its kind and the likeliest errors, by class name
    code, stdout, err = run_cli(
        "clean", tiny_features, noisy_labels, "--zero-shot", "--score", "posterior", "--noise-model", "class",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    model, names = summary["noise_model"], read_features(tiny_features).classnames
    assert model["kind"] == "class" and summary["options"]["noise_model"] == "class"
    assert model["transition_smoothing"] > 0 and model["top_confusions"]
    top = model["top_confusions"]
    assert all(c["true"] in names and c["given"] in names and c["true"] != c["given"] for c in top)
    assert [c["p"] for c in top] == sorted((c["p"] for c in top), reverse=True)
    assert "Likeliest label errors (true -> given, P):" in " ".join(err.split())

    # a given rate is used as is, and recorded
    code, stdout, err = run_cli(
        "clean", tiny_features, noisy_labels, "--zero-shot", "--score", "posterior", "--noise-rate", "0.3",
        "--json", "-q",
    )  # fmt: skip
    assert code == 0, err
    model = json.loads(stdout)["noise_model"]
    assert model["noise_rate"] == 0.3 and not model["rate_estimated"]


def test_posterior_with_a_prompt_prior(noisy_labels, tiny_features, tmp_path, run_cli):
    from promptcli.learning.options import TuneOptions
    from promptcli.learning.tune_run import tune

    prompt = tmp_path / "coop.safetensors"
    tune(
        tiny_features,
        noisy_labels,
        prompt,
        TuneOptions(method="coop", epochs=1, lr=0.05, seed=1),
        device="cpu",
    )
    code, stdout, err = run_cli(
        "clean", tiny_features, noisy_labels, "-p", prompt, "--score", "posterior", "--json", "-q"
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["prompts"][0]["method"] == "coop" and summary["zero_shot"] is None
    # the centroid evidence is weighted by the model's logit scale, which the prompt file records
    from promptcli.io.prompt_files import read_prompt

    recorded = float(read_prompt(prompt).metadata["logit_scale"])
    assert summary["noise_model"]["centroid_scale"] == pytest.approx(recorded)
    # a prompt has seen the labels, so its weights stay fixed unless asked
    assert summary["noise_model"]["weights"] == "fixed" and summary["noise_model"]["prior_weight"] == 1.0
    code, stdout, err = run_cli(
        "clean",
        tiny_features,
        noisy_labels,
        "-p",
        prompt,
        "--score",
        "posterior",
        "--fit-weights",
        "--json",
        "-q",
    )
    assert code == 0, err
    assert json.loads(stdout)["noise_model"]["weights"] == "fitted"


def test_bad_invocations(tiny_features, noisy_labels, tmp_path, run_cli):
    f, labels = tiny_features, noisy_labels
    n_classes = len(read_features(f).classnames)
    code, _, err = run_cli("clean", f, labels, "--zero-shot", "-p", tmp_path / "x.safetensors")
    assert code == 2 and "give --prompt or --zero-shot, not both" in err
    code, _, err = run_cli("clean", f, labels, "--zero-shot", "--score", "median")
    assert code == 2 and "--score: unknown value 'median'" in err
    code, _, err = run_cli("clean", f, labels, "--zero-shot", "--score", "posterior", "--threshold", "-0.2")
    assert code == 2 and "--threshold: must be in [0, 1]" in err
    code, _, err = run_cli("clean", f, labels, "--zero-shot", "--noise-rate", "0.2")
    assert code == 2 and "--noise-rate: applies only with --score posterior" in err
    code, _, err = run_cli("clean", f, labels, "--zero-shot", "--fit-weights")
    assert code == 2 and "--fit-weights/--fixed-weights: applies only with --score posterior" in err
    code, _, err = run_cli("clean", f, labels, "--zero-shot", "--noise-model", "class")
    assert code == 2 and "--noise-model: applies only with --score posterior" in err
    code, _, err = run_cli("clean", f, labels, "--zero-shot", "--score", "posterior", "--noise-model", "pair")
    assert code == 2 and "--noise-model: unknown value 'pair'" in err and "symmetric, class" in err
    code, _, err = run_cli("clean", f, labels, "--template", "a {}.", "-p", tmp_path / "x.safetensors")
    assert code == 2 and "--template: applies only with --zero-shot" in err
    limit = (n_classes - 1) / n_classes
    code, _, err = run_cli(
        "clean", f, labels, "--zero-shot", "--score", "posterior", "--noise-rate", str(limit)
    )
    assert code == 2 and "--noise-rate: must be in [0, " in err and "Traceback" not in err


def test_two_classes_start_below_the_uninformative_rate():
    """With 2 classes r = 0.5 makes labels meaningless; the first E-step must still use them."""
    prior = torch.zeros(4, 2, dtype=torch.float64)  # flat
    labels = torch.tensor([0, 0, 1, 1])
    result = label_posterior(
        torch.randn(4, 3, dtype=torch.float64), labels, prior, centroid_scale=1.0, rounds=0
    )
    np.testing.assert_allclose(result.posterior[torch.arange(4), labels].numpy(), 0.75, rtol=1e-12)
