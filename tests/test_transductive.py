"""promptcli.noise.transductive and `pseudolabel --method transductive`: the mixture over all images,
cluster naming by the given labels, provenance and errors."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from promptcli.errors import InputError
from promptcli.io.fileio import sha256_file
from promptcli.io.sidecar import noise_summary
from promptcli.noise.transductive import (
    given_labels,
    knn_graph,
    name_clusters,
    spread_labels,
    transductive_posterior,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _clusters(n_per_class=60, n_classes=10, dim=32, spread=0.35, seed=0):
    """Well-separated unit-norm clusters: (features, true class)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=g), dim=1)
    truth = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centres[truth] + spread * torch.randn(len(truth), dim, generator=g) / dim**0.5
    return torch.nn.functional.normalize(x, dim=1), truth


def _swapped_prior(truth, n_classes, swap=(0, 1), strength=1.0):
    """A zero-shot prior that is right except that it calls class swap[0] swap[1] and vice versa."""
    named = truth.clone()
    named[truth == swap[0]], named[truth == swap[1]] = swap[1], swap[0]
    logits = strength * torch.nn.functional.one_hot(named, n_classes).double()
    return torch.log_softmax(logits, dim=1)


def _symmetric_noise(truth, n_classes, labelled, rate, seed=0):
    """Given labels on ``labelled`` rows from `corrupt`'s exact symmetric noise (per class); -1 elsewhere."""
    from promptcli.noise.corruption import corrupt_labels

    y = corrupt_labels(truth[labelled].numpy(), n_classes, rate, "symmetric", seed, True, None)
    labels = torch.full((len(truth),), -1, dtype=torch.long)
    labels[torch.as_tensor(labelled)] = torch.as_tensor(y)
    return labels


def test_name_clusters_renames_by_plurality_and_keeps_ties():
    q = torch.eye(3, dtype=torch.float64).repeat_interleave(4, dim=0)  # 3 pure clusters of 4 rows
    labels = torch.tensor([1, 1, 0, 2, 0, 0, 2, 1, 2, 2, 0, -1])  # cluster 0 says 1, cluster 1 says 0
    assert name_clusters(q, labels) == [1, 0, 2]
    assert name_clusters(q, torch.full((12,), -1)) == [0, 1, 2]  # no labels: the prior's names stay


def test_labels_fix_a_cluster_the_prior_misnames_even_at_75_percent_noise():
    x, truth = _clusters()
    prior = _swapped_prior(truth, 10)
    unsupervised = transductive_posterior(x, prior, centroid_scale=10.0, neighbour_scale=4.0)
    pred = unsupervised.posterior.argmax(dim=1)
    assert (pred[truth == 0] == 1).float().mean() > 0.9  # without labels the swap stays
    assert unsupervised.noise_rate is None and unsupervised.renamed == []
    labelled = np.arange(0, len(truth), 3)  # a third of the images labelled, 3 in 4 labels wrong
    labels = _symmetric_noise(truth, 10, labelled, 0.75, seed=3)
    # the given labels are right on a quarter of the rows only ...
    assert (labels[labelled] == truth[labelled]).float().mean() == pytest.approx(0.25, abs=0.01)
    result = transductive_posterior(x, prior, centroid_scale=10.0, neighbour_scale=4.0, labels=labels)
    accuracy = (result.posterior.argmax(dim=1) == truth).float().mean()
    assert accuracy > 0.95  # ... and still name the swapped clusters
    assert sorted(result.renamed) == [(0, 1), (1, 0)]
    assert result.spread == {
        "neighbours": 10,
        "alpha": 0.8,
        "rounds": 30,
        "graph_rows": len(truth),
        "held_out_folds": 10,
        "local_weight": 1.0,
    }
    assert result.noise_rate == pytest.approx(0.75, abs=0.02)  # estimated from the labelled rows
    torch.testing.assert_close(result.posterior.sum(dim=1), torch.ones(len(truth), dtype=torch.float64))


def test_without_naming_the_labels_do_not_rename_whole_clusters():
    x, truth = _clusters(seed=1)
    prior = _swapped_prior(truth, 10, strength=3.0)
    labels = _symmetric_noise(truth, 10, np.arange(0, len(truth), 3), 0.75, seed=3)
    plain = transductive_posterior(
        x, prior, centroid_scale=10.0, neighbour_scale=4.0, labels=labels, name_by_labels=False
    )
    named = transductive_posterior(x, prior, centroid_scale=10.0, neighbour_scale=4.0, labels=labels)
    accuracy = [(r.posterior.argmax(dim=1) == truth).float().mean().item() for r in (plain, named)]
    assert accuracy[0] < 0.85 and accuracy[1] > 0.95  # the prior's swapped pair stays wrong without naming


def test_knn_graph_matches_a_dense_reference_in_any_chunk_size():
    g = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(37, 8, generator=g, dtype=torch.float64), dim=1)
    sim = d @ d.t()
    sim.fill_diagonal_(-torch.inf)
    near = sim.topk(4, dim=1).indices
    a = torch.zeros(37, 37, dtype=torch.float64).scatter_(1, near, 1.0)
    a = ((a + a.t()) > 0).double()  # symmetric, an edge found from both ends counted once
    degree = a.sum(dim=1).rsqrt()
    dense = degree[:, None] * a * degree[None, :]
    eye = torch.eye(37, dtype=torch.float64)
    for chunk in (5, 37, 1024):
        torch.testing.assert_close(knn_graph(d, 4, chunk=chunk) @ eye, dense)
    with pytest.raises(ValueError, match="two rows"):
        knn_graph(d[:1], 4)


def test_spread_labels_keeps_the_mass_and_spreads_it_to_neighbours():
    x, truth = _clusters(n_per_class=20, n_classes=3, spread=0.2)
    labels = torch.full((60,), -1)
    labels[[0, 1, 25]] = torch.tensor([0, 0, 1])
    spread = spread_labels(x.double(), labels, 3)
    rows, mass = spread.rows, spread.mass
    assert rows.tolist() == list(range(60))
    assert mass.sum().item() == pytest.approx(3.0)
    by_cluster = torch.stack([mass[truth == c].sum(dim=0) for c in range(3)])
    # each label's mass stays in its own row's cluster; the unlabelled cluster 2 gets none
    assert by_cluster[0, 0] > 0.99 * 2 and by_cluster[1, 1] > 0.99 and by_cluster[2].sum() < 1e-3
    assert (mass[truth == 0, 0] > 0).sum() > 10  # spread over the cluster, not left on two rows
    mass0 = spread_labels(x.double(), labels, 3, alpha=0.0).mass
    torch.testing.assert_close(mass0[[0, 1, 25]], torch.eye(3, dtype=torch.float64)[[0, 0, 1]])
    with pytest.raises(ValueError, match="alpha"):
        spread_labels(x.double(), labels, 3, alpha=1.0)


def test_spread_labels_samples_a_big_file_reproducibly():
    x, _ = _clusters(n_per_class=10, n_classes=6)
    labels = torch.full((60,), -1)
    labels[::6] = torch.arange(10) % 6
    spread = spread_labels(x.double(), labels, 6, max_rows=25)
    rows = spread.rows
    assert len(rows) == 25 and set(range(0, 60, 6)) <= set(rows.tolist())
    assert rows.tolist() == sorted(rows.tolist()) and spread.mass.shape == (25, 6)
    assert torch.equal(rows, spread_labels(x.double(), labels, 6, max_rows=25).rows)


def test_a_labelled_image_hears_its_neighbours_labels_not_its_own():
    """held_out: a labelled row's mass without its own fold's labels (one fold per label here: the
    spreading of the other labels), rescaled as the full mass is; an unlabelled row keeps the full mass."""
    x, truth = _clusters(n_per_class=20, n_classes=3, spread=0.2)
    labels = torch.full((60,), -1)
    labels[[0, 1, 2, 25]] = torch.tensor([0, 2, 0, 1])  # row 1: a class-0 image labelled 2
    spread = spread_labels(x.double(), labels, 3, folds=4)
    w = knn_graph(x.double(), 10) @ torch.eye(60, dtype=torch.float64)  # dense reference

    def spread_dense(y: torch.Tensor) -> torch.Tensor:
        seeds = torch.nn.functional.one_hot(y.clamp_min(0), 3).double() * (y >= 0)[:, None]
        f = seeds.clone()
        for _ in range(30):
            f = 0.8 * w @ f + 0.2 * seeds
        return f

    full = spread_dense(labels)
    scale = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64) / full.sum(dim=0)
    torch.testing.assert_close(spread.mass, full * scale)
    for row in (0, 1, 2, 25):
        others = labels.clone()
        others[row] = -1
        torch.testing.assert_close(spread.held_out[row], spread_dense(others)[row] * scale)
    assert spread.held_out[1].argmax() == 0 and spread.mass[1].argmax() == 2  # its own label spoke loudest
    torch.testing.assert_close(spread.held_out[truth == 2], spread.mass[truth == 2])
    assert spread.held_out[25].sum() < 1e-3  # the one label of its cluster: nothing else speaks there
    with pytest.raises(ValueError, match="folds"):
        spread_labels(x.double(), labels, 3, folds=0)


def test_spreading_names_a_cluster_whose_right_labels_the_prior_pulls_away():
    """Right labels on images the prior pulls into the neighbouring cluster: counted row by row
    they name that cluster; spread over their neighbours they name their own."""
    x, truth = _clusters(n_per_class=40, n_classes=3, spread=0.3, seed=2)
    logits = 4.0 * torch.nn.functional.one_hot(truth, 3).double()
    labels = torch.full((120,), -1)
    pulled = torch.tensor([0, 1, 2, 3])  # class 0 images labelled 0, which the prior calls class 1
    logits[pulled] = 40.0 * torch.nn.functional.one_hot(torch.ones(4, dtype=torch.long), 3).double()
    labels[pulled] = 0
    labels[[40, 41]] = 1  # class 1, labelled right
    labels[[4]] = 1  # class 0, labelled wrong
    labels[[80, 81, 82]] = 2
    prior = torch.log_softmax(logits, dim=1)
    raw = transductive_posterior(
        x, prior, centroid_scale=10.0, neighbour_scale=4.0, labels=labels, spread=False
    )
    spread = transductive_posterior(x, prior, centroid_scale=10.0, neighbour_scale=4.0, labels=labels)
    assert sorted(raw.renamed) == [(0, 1), (1, 0)] and raw.spread is None
    assert spread.renamed == []
    # the 36 class-0 images the prior does not pull away: all called 1 by the raw naming, 0 by spreading
    assert (raw.posterior.argmax(dim=1)[4:40] == 1).all()
    assert (spread.posterior.argmax(dim=1)[4:40] == 0).all()


def test_spread_labels_outvote_a_wrong_prior_on_the_images_around_them():
    """Images the prior (wrongly) calls class 1, in a cluster whose labels say 0: the spread labels'
    local evidence moves them, the cluster counts alone do not."""
    x, truth = _clusters(n_per_class=40, n_classes=3, spread=0.3, seed=0)
    logits = 3.0 * torch.nn.functional.one_hot(truth, 3).double()
    logits[30:40] = 3.0 * torch.nn.functional.one_hot(torch.ones(10, dtype=torch.long), 3).double()
    prior = torch.log_softmax(logits, dim=1)
    labels = torch.full((120,), -1)
    labels[[0, 1, 30, 31, 32, 40, 41, 80, 81]] = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 2])
    without = transductive_posterior(
        x, prior, centroid_scale=2.0, neighbour_scale=0.0, labels=labels, local_weight=0.0
    )
    with_local = transductive_posterior(x, prior, centroid_scale=2.0, neighbour_scale=0.0, labels=labels)
    assert (without.posterior.argmax(dim=1)[33:40] == 1).all()  # the unlabelled ones keep the prior's class
    assert (with_local.posterior.argmax(dim=1) == truth).all()
    assert without.spread["local_weight"] == 0.0 and with_local.spread["local_weight"] == 1.0


def test_neighbours_outvote_a_wrong_prior_without_labels():
    """Images the prior (wrongly) calls class 1, amid class 0: their neighbours' posteriors move them
    back, in the second half of the rounds; without the neighbour term the cluster alone does not."""
    x, truth = _clusters(n_per_class=40, n_classes=3, spread=0.3, seed=0)
    logits = 3.0 * torch.nn.functional.one_hot(truth, 3).double()
    logits[30:40] = 3.0 * torch.nn.functional.one_hot(torch.ones(10, dtype=torch.long), 3).double()
    prior = torch.log_softmax(logits, dim=1)
    without = transductive_posterior(x, prior, centroid_scale=2.0, neighbour_scale=0.0)
    with_neighbours = transductive_posterior(x, prior, centroid_scale=2.0, neighbour_scale=5.0)
    assert (without.posterior.argmax(dim=1)[30:40] == 1).all()
    assert (with_neighbours.posterior.argmax(dim=1) == truth).all()
    assert with_neighbours.neighbour_scale == 5.0 and with_neighbours.noise_rate is None
    with pytest.raises(ValueError, match="neighbour_scale"):
        transductive_posterior(x, prior, centroid_scale=2.0, neighbour_scale=float("nan"))


def test_bad_inputs_are_errors():
    x, truth = _clusters(n_per_class=2)
    prior = _swapped_prior(truth, 10)
    bad = x.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        transductive_posterior(bad, prior, centroid_scale=1.0, neighbour_scale=0.4)
    with pytest.raises(ValueError, match="NaN"):
        transductive_posterior(
            x, prior.masked_fill(prior < -0.5, float("nan")), centroid_scale=1.0, neighbour_scale=0.4
        )
    with pytest.raises(ValueError, match="class indices"):
        transductive_posterior(
            x, prior, centroid_scale=1.0, neighbour_scale=0.4, labels=torch.full((20,), 10)
        )
    with pytest.raises(ValueError, match="disagree"):
        transductive_posterior(x[:5], prior, centroid_scale=1.0, neighbour_scale=0.4)
    with pytest.raises(InputError, match="more than once"):
        given_labels(20, np.array([1, 2, 1]), np.array([0, 1, 2]), where="noisy.csv")


def test_trusted_votes_outweigh_given_ones_in_the_naming_and_the_spreading():
    q = torch.eye(2, dtype=torch.float64).repeat_interleave(3, dim=0)  # 2 pure clusters of 3 rows
    labels = torch.tensor([1, 1, 0, 0, 0, 1])  # each cluster's plurality names the other
    assert name_clusters(q, labels) == [1, 0]
    weights = torch.tensor([1.0, 1.0, 3.0, 1.0, 1.0, 3.0])  # the minority rows verified, 3 votes each
    assert name_clusters(q, labels, weights=weights) == [0, 1]
    x, _ = _clusters(n_per_class=20, n_classes=3, spread=0.2)
    given = torch.full((60,), -1)
    given[[0, 1, 25]] = torch.tensor([0, 0, 1])
    spread = spread_labels(x.double(), given, 3, weights=torch.full((60,), 2.0))
    torch.testing.assert_close(spread.mass.sum(dim=0), torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64))


def test_trusted_labels_alone_name_the_clusters_the_prior_swaps():
    x, truth = _clusters()
    prior = _swapped_prior(truth, 10)
    trusted = torch.full_like(truth, -1)
    trusted[[0, 1, 60, 61]] = truth[[0, 1, 60, 61]]  # two verified images of each swapped class
    result = transductive_posterior(x, prior, centroid_scale=10.0, neighbour_scale=4.0, trusted=trusted)
    assert sorted(result.renamed) == [(0, 1), (1, 0)] and result.noise_rate is None
    assert (result.posterior.argmax(dim=1) == truth).float().mean() > 0.95
    assert result.spread["trusted_votes"] == 2.0


def test_trusted_labels_replace_the_given_ones_and_keep_their_class():
    x, truth = _clusters()
    prior = _swapped_prior(truth, 10, swap=(2, 3))
    labelled = np.arange(0, len(truth), 3)
    labels = _symmetric_noise(truth, 10, labelled, 0.5, seed=3)
    trusted = torch.full_like(truth, -1)
    checked = labelled[:100]  # a third of the given labels verified ...
    trusted[checked] = truth[checked]
    odd = int(labelled[-1])  # ... and one image "verified" as a class its cluster is not
    trusted[odd] = (truth[odd] + 5) % 10
    kwargs = {"centroid_scale": 10.0, "neighbour_scale": 0.0}
    result = transductive_posterior(x, prior, labels=labels, trusted=trusted, **kwargs)
    pred = result.posterior.argmax(dim=1)
    assert pred[odd] == trusted[odd] and result.posterior[odd].max() == 1.0  # it keeps its class
    assert (pred[checked] == truth[checked]).all()
    assert sorted(result.renamed) == [(2, 3), (3, 2)]
    # the noise rate is the remaining given labels' (about half wrong), not diluted by the verified rows
    remaining = labelled[100:-1]
    wrong = (labels[remaining] != truth[remaining]).float().mean().item()
    assert result.noise_rate == pytest.approx(wrong, abs=0.05)
    with pytest.raises(ValueError, match="trusted_votes"):
        transductive_posterior(x, prior, labels=labels, trusted=trusted, trusted_votes=0.0, **kwargs)
    with pytest.raises(ValueError, match="trusted .* disagree"):
        transductive_posterior(x, prior, labels=labels, trusted=trusted[:5], **kwargs)


@pytest.mark.parametrize("case", ["labels", "trusted", "neighbours"])
def test_the_fit_in_blocks_of_rows_equals_the_whole_file_fit(monkeypatch, case):
    """The E-step runs a block of rows at a time (memory O(block x C)); blocks of 7 rows, not dividing the
    file, give the whole-file fit: the same renaming, noise rate and posterior to rounding."""
    import promptcli.noise.label_posterior as label_posterior

    x, truth = _clusters(n_per_class=30)
    prior = _swapped_prior(truth, 10)
    labelled = np.arange(0, len(truth), 3)
    kwargs = {"centroid_scale": 10.0, "neighbour_scale": 4.0}
    if case != "neighbours":
        kwargs["labels"] = _symmetric_noise(truth, 10, labelled, 0.75, seed=3)
    if case == "trusted":
        trusted = torch.full_like(truth, -1)
        trusted[labelled[:20]] = truth[labelled[:20]]
        kwargs["trusted"] = trusted
    whole = transductive_posterior(x, prior, **kwargs)
    monkeypatch.setattr(label_posterior, "BLOCK_VALUES", 70)  # 7 rows of 10 classes
    blocks = transductive_posterior(x, prior, **kwargs)
    assert blocks.renamed == whole.renamed
    assert bool(whole.renamed) == (case != "neighbours")  # the labels rename the swapped pair
    if case == "neighbours":
        assert blocks.noise_rate is None and whole.noise_rate is None
    else:
        assert blocks.noise_rate == pytest.approx(whole.noise_rate, abs=1e-12)
    torch.testing.assert_close(blocks.posterior, whole.posterior, rtol=0, atol=1e-10)


def test_the_fit_announces_each_of_its_steps():
    """``on_step`` drives pseudolabel's progress bar: each of fit_steps() stages as it starts, then "done"."""
    from promptcli.noise.transductive import fit_steps

    x, truth = _clusters(n_per_class=20)
    prior = _swapped_prior(truth, 10)
    labels = _symmetric_noise(truth, 10, np.arange(0, len(truth), 2), 0.5, seed=1)
    for given in (None, labels):
        steps: list[str] = []
        transductive_posterior(
            x, prior, centroid_scale=10.0, neighbour_scale=1.0, labels=given, on_step=steps.append
        )
        assert len(steps) == fit_steps() + 1 == 13 and steps[-1] == "done"
        assert steps[4:7] == ["clustering, round 5", "neighbour graph", "label spreading"]
        assert steps[-2] == ("labelled round 10" if given is not None else "round 10")
    short: list[str] = []
    transductive_posterior(x, prior, centroid_scale=10.0, neighbour_scale=0.0, rounds=3, on_step=short.append)
    assert len(short) == fit_steps(3) + 1 == 6


def _csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_transductive_with_and_without_labels(run_cli, noisy_labels, tmp_path):
    features, labels = noisy_labels["features"], noisy_labels["labels"]
    out = tmp_path / "t.csv"
    code, stdout, stderr = run_cli("pseudolabel", features, "--method", "transductive", "-o", out, "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    rows = _csv(out)
    assert len(rows) == summary["n_images"] == summary["n_kept"]  # every image labelled
    assert summary["method"] == "transductive" and summary["transductive"]["n_labelled"] == 0
    truth_acc = np.mean([r["label"] == r["clean_label"] for r in rows])
    assert summary["transductive_accuracy"] == pytest.approx(truth_acc)
    assert 0 <= summary["zero_shot_accuracy"] <= 1  # the zero-shot accuracy, measured separately
    record = noise_summary(json.loads(out.with_name("t.csv.json").read_text()))
    assert record["labels"] == "pseudo" and record["method"] == "transductive"
    assert "No given labels: the zero-shot prior named the clusters" in stderr
    fit = summary["transductive"]
    assert fit["neighbour_scale"] == pytest.approx(0.1 * fit["logit_scale"])  # on without labels

    named = tmp_path / "named.csv"
    code, stdout, stderr = run_cli(
        "pseudolabel",
        features,
        "--method",
        "transductive",
        "--labels",
        labels,
        "--top-k",
        "2",
        "-o",
        named,
        "--json",
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    given = summary["transductive"]["labels"]
    assert given["path"] == str(labels) and given["rows"] == len(_csv(labels))
    assert given["noise"]["type"] == "symmetric" and given["noise"]["rate"] == pytest.approx(0.34)
    assert 0 < summary["transductive"]["noise_rate"] < 0.9
    assert summary["transductive"]["label_spreading"]["neighbours"] == 10
    assert summary["transductive"]["neighbour_scale"] == 0.0  # off with labels
    assert f"{summary['transductive']['n_labelled']} given labels, estimated noise rate" in stderr
    assert len(_csv(named)) <= 2 * len(summary["classes"])
    record = noise_summary(json.loads(named.with_name("named.csv.json").read_text()))
    assert record["labels"] == "transductive" and record["rate"] == pytest.approx(0.34)


def test_cli_skip_missing_leaves_out_label_rows_the_features_lack(run_cli, noisy_labels, tmp_path):
    rows = _csv(noisy_labels["labels"])
    rows[0]["path"] = "elsewhere/0.png"
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    args = ["pseudolabel", noisy_labels["features"], "--method", "transductive", "--labels", bad]
    code, _, stderr = run_cli(*args, "-o", tmp_path / "a.csv")
    assert code == 2 and "elsewhere/0.png" in stderr and "--skip-missing" in stderr
    assert not (tmp_path / "a.csv").exists()
    code, stdout, stderr = run_cli(*args, "--skip-missing", "-o", tmp_path / "b.csv", "--json")
    assert code == 0, stderr
    given = json.loads(stdout)["transductive"]["labels"]
    assert given["skipped"] == 1 and given["rows"] == len(rows) - 1
    assert "skipped 1 --labels row(s)" in stderr
    code, _, stderr = run_cli(
        "pseudolabel", noisy_labels["features"], "--skip-missing", "-o", tmp_path / "c.csv"
    )
    assert code == 2 and "--skip-missing applies only to --labels and --trusted rows" in stderr


def test_cli_trusted_labels_replace_given_ones_and_are_recorded(run_cli, noisy_labels, tmp_path):
    features, labels = noisy_labels["features"], noisy_labels["labels"]
    given = _csv(labels)
    checked = [r for r in given if r["is_noisy"] == "1"][:2] + [r for r in given if r["is_noisy"] == "0"][:1]
    trusted = tmp_path / "checked.csv"
    trusted.write_text("path,label\n" + "".join(f"{r['path']},{r['clean_label']}\n" for r in checked))
    out = tmp_path / "named.csv"
    args = ["pseudolabel", features, "--method", "transductive", "--labels", labels]
    code, stdout, stderr = run_cli(*args, "--trusted", trusted, "-o", out, "--json")
    assert code == 0, stderr
    fit = json.loads(stdout)["transductive"]
    assert fit["n_trusted"] == 3 and fit["n_labelled"] == len(given) - 3
    record = fit["trusted"]
    assert record["path"] == str(trusted)
    assert (record["rows"], record["replaced"], record["changed"]) == (3, 3, 2)
    assert len(record["sha256"]) == 64
    assert f"{len(given) - 3} given labels" in stderr and ", 3 trusted;" in stderr
    written = {r["path"]: r["label"] for r in _csv(out)}
    assert all(written[r["path"]] == r["clean_label"] for r in checked)  # verified images keep their class
    record = noise_summary(json.loads(out.with_name("named.csv.json").read_text()))
    assert record["labels"] == "transductive" and record["trusted"] == 3  # what tune and report will see

    code, _, stderr = run_cli(*args, "--trusted", labels, "-o", tmp_path / "same.csv")
    assert code == 2 and "--labels and --trusted name the same file" in stderr
    copy = tmp_path / "copy.csv"
    copy.write_bytes(Path(labels).read_bytes())
    code, _, stderr = run_cli(*args, "--trusted", copy, "-o", tmp_path / "copy_out.csv")
    assert code == 2 and f"--trusted repeats all {len(given)} given labels unchanged" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "copy_out.csv").exists()
    code, _, stderr = run_cli("pseudolabel", features, "--trusted", trusted, "-o", tmp_path / "zs.csv")
    assert code == 2 and "--trusted applies only with --method transductive" in stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nnowhere/1.png," + checked[0]["clean_label"] + "\n")
    code, _, stderr = run_cli(*args, "--trusted", bad, "-o", tmp_path / "bad_out.csv")
    assert code == 2 and f"{bad}:2" in stderr and "nowhere/1.png" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "bad_out.csv").exists()


@pytest.mark.parametrize("option", ["--labels", "--trusted"])
def test_cli_labels_from_stdin_record_the_file_runs_hash(
    run_cli, noisy_labels, tmp_path, monkeypatch, option
):
    """``--labels -`` (and ``--trusted -``) crashed with FileNotFoundError '-': the path was hashed, not the table
    read from stdin. The record now holds the hash of what was read, the same as for the file itself."""
    features, labels = noisy_labels["features"], noisy_labels["labels"]
    given = _csv(labels)
    trusted = tmp_path / "checked.csv"  # a few verified labels, for --trusted
    trusted.write_text("path,label\n" + "".join(f"{r['path']},{r['clean_label']}\n" for r in given[:3]))
    piped = labels if option == "--labels" else trusted
    key = option.lstrip("-")
    records = {}
    for name in ("file", "stdin"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(Path(piped).read_text()))
        sources = {"--labels": labels, "--trusted": trusted, option: "-" if name == "stdin" else piped}
        out = tmp_path / f"{name}.csv"
        code, stdout, stderr = run_cli(
            "pseudolabel", features, "--method", "transductive", "-o", out, "--json",
            *(part for pair in sources.items() for part in pair),
        )  # fmt: skip
        assert code == 0 and "Traceback" not in stderr, stderr
        summary = json.loads(stdout)["transductive"][key]
        sidecar = json.loads(out.with_name(f"{name}.csv.json").read_text())["transductive"][key]
        assert summary["path"] == str(sources[option]) and summary["sha256"] == sidecar["sha256"]
        records[name] = sidecar["sha256"]
    assert records["stdin"] == records["file"] == sha256_file(piped)


def test_cli_labels_need_the_transductive_method(run_cli, noisy_labels, tmp_path):
    code, _, stderr = run_cli(
        "pseudolabel", noisy_labels["features"], "--labels", noisy_labels["labels"], "-o", tmp_path / "p.csv"
    )
    assert code == 2 and "--labels applies only with --method transductive" in stderr
    assert not (tmp_path / "p.csv").exists()


def test_report_draws_transductive_runs_as_their_own_series():
    from promptcli.analysis.results import _noise, _variant

    pseudo = {"labels": "pseudo", "method": "transductive", "realised_rate": 0.42}
    assert _variant(pseudo, None) == "transductive pseudo-labels" and _noise(pseudo) == ("none", 0.0)
    assert _variant({"labels": "pseudo"}, None) == "pseudo-labels"
    named = {"labels": "transductive", "type": "symmetric", "rate": 0.75}
    assert _variant(named, None) == "transductive" and _noise(named) == ("symmetric", 0.75)
    # with verified labels it is another pipeline: its own series, not averaged into the plain one
    assert _variant({**named, "trusted": 20}, None) == "transductive, 20 verified"
    fit = {"labels": {"noise": {"type": "symmetric", "rate": 0.75}}, "trusted": {"rows": 20}}
    assert noise_summary({"transductive": fit}) == {
        "type": "symmetric",
        "rate": 0.75,
        "labels": "transductive",
        "trusted": 20,
    }


def test_the_fit_line_names_the_renamed_clusters():
    from promptcli.cli.pseudolabel import transductive_line

    fit = {"n_labelled": 160, "noise_rate": 0.7712, "renamed_clusters": [[2, 6], [6, 2]]}
    line = transductive_line(fit, ["a", "b", "coat", "d", "e", "f", "shirt"])
    assert line.startswith("160 given labels, estimated noise rate 77.1% (it tends to read high)")
    assert "coat -> shirt, shirt -> coat" in line
    assert "kept the prior's name" in transductive_line({**fit, "renamed_clusters": []}, ["a", "b"])


def test_checks_are_advised_only_at_high_noise_without_checked_labels():
    from promptcli.cli.pseudolabel import checks_advice

    fit = {"n_labelled": 160, "n_trusted": 0, "noise_rate": 0.77}
    assert "check 20 random given labels" in checks_advice(fit) and "--trusted" in checks_advice(fit)
    assert "check 13 random" in checks_advice({**fit, "n_labelled": 97})  # one in eight, rounded up
    assert checks_advice({**fit, "noise_rate": 0.56}) is None  # the 50% fits read 0.52-0.60
    assert checks_advice({**fit, "n_trusted": 20}) is None  # already checked
    assert (
        checks_advice({"n_labelled": 0, "n_trusted": 0, "noise_rate": None, "renamed_clusters": []}) is None
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_fit_on_cuda_matches_cpu():
    """The fit runs on the features' device (graph, sparse spreading, neighbour term): CUDA against CPU."""
    from promptcli.noise.transductive import transductive_predict

    x, truth = _clusters(seed=1)
    prior = _swapped_prior(truth, 10).numpy()
    labels = _symmetric_noise(truth, 10, np.arange(0, len(truth), 3), 0.75, seed=3)
    for given in (None, labels):
        cpu = transductive_predict(x.numpy(), prior, 40.0, given, device="cpu")
        cuda = transductive_predict(x.numpy(), prior, 40.0, given, device="cuda")
        assert (cpu[0] == cuda[0]).mean() >= 0.99
        assert cpu[2]["renamed_clusters"] == cuda[2]["renamed_clusters"]
        np.testing.assert_allclose(cpu[1], cuda[1], atol=1e-6)


def test_trusted_labels_all_equal_to_noisy_given_ones_are_warned_about():
    from promptcli.noise.transductive import unchecked_warning

    def fit(replaced: int, changed: int, rate: float | None) -> dict:
        return {"noise_rate": rate, "trusted": {"replaced": replaced, "changed": changed}}

    message = unchecked_warning(fit(20, 0, 0.75))
    assert message and "none of the 20 --trusted labels" in message and "75%" in message
    assert unchecked_warning(fit(20, 1, 0.75)) is None  # one correction: they were checked
    assert unchecked_warning(fit(20, 0, 0.10)) is None  # 0.9^20 = 12%: plausible by chance
    assert unchecked_warning(fit(4, 0, 0.75)) is None  # too few to tell
    assert unchecked_warning(fit(0, 0, None)) is None and unchecked_warning({"noise_rate": 0.7}) is None


def test_cli_refuses_a_fully_labelled_file_with_a_one_image_class(run_cli, tiny_model, tmp_path):
    """Every image labelled, one per class: the fit renamed every cluster (0% right, exit 0); now refused."""
    from conftest import write_synthetic_features

    names = ["red apple", "blue sky", "green grass"]
    _, y, paths = write_synthetic_features(tmp_path / "one.h5", tiny_model, names, 1, 0.1)
    labels = tmp_path / "l.csv"
    labels.write_text("path,label\n" + "".join(f"{p},{names[c]}\n" for p, c in zip(paths, y)))
    code, _, err = run_cli(
        "pseudolabel",
        tmp_path / "one.h5",
        "--method",
        "transductive",
        "--labels",
        labels,
        "-o",
        tmp_path / "o.csv",
    )
    assert code == 2 and "has only one" in err and not (tmp_path / "o.csv").exists(), err
