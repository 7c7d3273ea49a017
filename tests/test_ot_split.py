"""tune --split ot: each epoch's clean/noisy split is the OT assignment of the current head, noisy
samples train with MAE (or not at all), the split is logged, recorded and survives a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import write_synthetic_features
from promptcli.errors import InputError
from promptcli.io.prompt_files import read_prompt
from promptcli.learning.losses import CrossEntropy, GeneralizedCrossEntropy
from promptcli.learning.options import OptimConfig, SplitConfig, TuneOptions
from promptcli.learning.training import TrainData, ot_split, split_loss, train
from promptcli.learning.transport import (
    DEFAULT_EPSILON,
    ot_clean_mask,
    ot_clean_mask_from_logits,
    split_quality,
)
from promptcli.learning.tune_run import partial_path, tune
from promptcli.models.heads import LinearHead, build_head
from promptcli.models.prompt_learner import PromptConfig

CLASSNAMES = ["cat", "dog", "car", "tree"]
PER_CLASS = 8
NOISY = (0, 1, 8, 16, 24, 25)  # class c -> c + 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def syn(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """A 4-class features file (2 views) 'made with' the tiny model; labels with and without is_noisy."""
    folder = tmp_path_factory.mktemp("otsyn")
    features = folder / "syn.h5"
    x, y, paths = write_synthetic_features(features, tiny_model, CLASSNAMES, PER_CLASS, 0.4, 3)
    noisy, plain = folder / "noisy.csv", folder / "plain.csv"
    rows, bare = ["path,label,clean_label,is_noisy"], ["path,label"]
    for i, (p, c) in enumerate(zip(paths, y)):
        given = (c + 1) % len(CLASSNAMES) if i in NOISY else c
        rows.append(f"{p},{CLASSNAMES[given]},{CLASSNAMES[c]},{int(i in NOISY)}")
        bare.append(f"{p},{CLASSNAMES[given]}")
    noisy.write_text("\n".join(rows) + "\n")
    plain.write_text("\n".join(bare) + "\n")
    return {"features": features, "labels": noisy, "plain": plain, "x": torch.from_numpy(x), "y": y}


def _given(syn) -> torch.Tensor:
    y = torch.from_numpy(syn["y"]).clone()
    idx = torch.tensor(NOISY)
    y[idx] = (y[idx] + 1) % len(CLASSNAMES)
    return y


def _coop_head(tiny_model, seed: int = 0):
    return build_head(
        "coop",
        classnames=CLASSNAMES,
        dim=tiny_model.embed_dim,
        loaded=tiny_model,
        prompt_config=PromptConfig(method="coop", n_ctx=4),
        generator=torch.Generator().manual_seed(seed),
    )


def test_balanced_marginals_override_the_argmax():
    """4 samples all closer to class 0: balanced classes send the two least-class-0 ones to class 1."""
    head = LinearHead(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    x = torch.tensor([[5.0, 0.0], [4.0, 0.0], [1.0, 0.0], [0.5, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert head(x).argmax(1).tolist() == [0, 0, 0, 0]
    assert ot_split(head, x, labels, SplitConfig()).tolist() == [True, True, True, True]
    assert ot_split(head, x, torch.tensor([1, 0, 0, 1]), SplitConfig()).tolist() == [False, True, False, True]


def test_each_epoch_splits_with_the_head_at_its_start(syn, tiny_model):
    """Full batch, plain features: epoch 2's split and loss follow by hand from the head after epoch 1."""
    x, given = syn["x"], _given(syn)
    is_noisy = torch.zeros(len(given), dtype=torch.bool)
    is_noisy[list(NOISY)] = True
    head = _coop_head(tiny_model)
    states = [head.learnable_state()]
    config = OptimConfig(epochs=2, lr=0.05, warmup_epochs=0, batch_size=len(given))
    split = SplitConfig(epsilon=0.5)
    result = train(
        head,
        TrainData(x, given, is_noisy=is_noisy),
        GeneralizedCrossEntropy(0.7),
        config,
        split=split,
        on_epoch=lambda _: states.append(head.learnable_state()),
    )
    check = _coop_head(tiny_model)
    for epoch, row in enumerate(result.history):
        check.load_learnable_state(states[epoch])
        with torch.no_grad():
            text = check.learner()
            mask = ot_clean_mask(x, text, given, check.logit_scale, epsilon=0.5)
            assert torch.equal(ot_split(check, x, given, split), mask)
            quality = split_quality(mask, is_noisy)
            assert row["n_judged_clean"] == int(mask.sum()) == quality["n_judged_clean"]
            assert row["clean_precision"] == quality["clean_precision"]
            assert row["clean_recall"] == quality["clean_recall"]
            # the logged loss is the split loss at the epoch start: GCE on clean, 1 - p_y on noisy, / N
            p_y = F.softmax(check.logit_scale * x @ text.T, dim=1).gather(1, given[:, None]).squeeze(1)
            per_row = torch.where(mask, (1 - p_y**0.7) / 0.7, 1 - p_y)
            assert row["loss"] == pytest.approx(float(per_row.mean()), rel=1e-5)
    assert 0 < result.history[0]["n_judged_clean"] < len(given)


def test_linear_heads_split_on_their_logits(syn):
    x, given = syn["x"], _given(syn)
    head = LinearHead(x.shape[1], 4)
    with torch.no_grad():
        head.weight.copy_(torch.randn(4, x.shape[1], generator=torch.Generator().manual_seed(1)) * 5)
        head.bias.copy_(torch.tensor([0.5, -0.5, 0.0, 1.0]))
    expected = ot_clean_mask_from_logits(head(x).detach().double(), given, epsilon=0.2)
    assert torch.equal(ot_split(head, x, given, SplitConfig(epsilon=0.2)), expected)


def test_split_loss_closed_form_and_dropped_noisy_gradients():
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, 4, generator=gen)).requires_grad_(True)
    targets = torch.tensor([0, 1, 2, 3, 1, 0])
    clean = torch.tensor([True, False, True, True, False, False])
    p = F.softmax(logits.detach(), dim=1)
    p_y = p.gather(1, targets[:, None]).squeeze(1)
    ce = -p_y.log()
    one_hot = F.one_hot(targets, 4).float()

    loss = split_loss(CrossEntropy(), logits, targets, clean, "mae")
    assert float(loss.detach()) == pytest.approx(
        float((ce[clean].sum() + (1 - p_y[~clean]).sum()) / 6), rel=1e-6
    )
    (grad,) = torch.autograd.grad(loss, logits)
    # d(1 - p_y)/dlogits = -p_y (e_y - p); d CE/dlogits = p - e_y; each over the batch size
    mae_grad = -(p_y[:, None] * (one_hot - p)) / 6
    ce_grad = (p - one_hot) / 6
    assert torch.allclose(grad[~clean], mae_grad[~clean], atol=1e-7)
    assert torch.allclose(grad[clean], ce_grad[clean], atol=1e-7)

    dropped = split_loss(CrossEntropy(), logits, targets, clean, "none")
    assert float(dropped.detach()) == pytest.approx(float(ce[clean].sum() / 6), rel=1e-6)
    (grad,) = torch.autograd.grad(dropped, logits)
    assert torch.equal(grad[~clean], torch.zeros(3, 4))
    assert torch.allclose(grad[clean], ce_grad[clean], atol=1e-7)
    nothing = split_loss(CrossEntropy(), logits, targets, torch.zeros(6, dtype=torch.bool), "none")
    assert float(nothing.detach()) == 0.0 and torch.equal(
        torch.autograd.grad(nothing, logits)[0], torch.zeros(6, 4)
    )


def test_noisy_loss_none_trains_as_if_the_noisy_samples_were_absent(syn):
    """The trajectory equals SGD on sum over judged-clean samples of CE / N, the split redone each epoch."""
    x, given = syn["x"], _given(syn)
    head = LinearHead(x.shape[1], 4)
    split = SplitConfig(noisy_loss="none")
    config = OptimConfig(epochs=3, lr=1.0, warmup_epochs=0, batch_size=len(given))
    mask = ot_split(head, x, given, split)
    assert 0 < int(mask.sum()) < len(given)
    train(head, TrainData(x, given), CrossEntropy(), config, split=split)
    # reference: plain full-batch gradient descent on sum_clean CE / N, clean set recomputed per epoch
    ref = LinearHead(x.shape[1], 4)
    opt = torch.optim.SGD(ref.param_groups(config.weight_decay), lr=1.0, momentum=0.9)
    for epoch in range(3):
        for group in opt.param_groups:
            group["lr"] = config.lr_at(epoch)  # the cosine schedule
        keep = ot_split(ref, x, given, split)
        loss = F.cross_entropy(ref(x)[keep], given[keep], reduction="sum") / len(given)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(head.weight, ref.weight, atol=1e-6) and torch.allclose(
        head.bias, ref.bias, atol=1e-6
    )


def _tune(syn, out: Path, labels: str = "labels", **kwargs):
    opts = {"epochs": 3, "n_ctx": 4, "lr": 0.01, "split": "ot", "seed": 0, **kwargs.pop("options", {})}
    return tune(syn["features"], syn[labels], out, TuneOptions(**opts), device="cpu", **kwargs)


def test_log_fields(syn, tmp_path):
    log = tmp_path / "ot.jsonl"
    _tune(syn, tmp_path / "ot.safetensors", log_path=log)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {
        "epoch", "loss", "lr", "accuracy", "clean_accuracy", "n_judged_clean", "clean_precision",
        "clean_recall", "time", "run",
    }  # fmt: skip
    for r in rows:
        assert isinstance(r["n_judged_clean"], int) and 0 <= r["n_judged_clean"] <= 32
        assert r["clean_recall"] is not None and 0 <= r["clean_recall"] <= 1
        assert r["run"]["split"] == {"method": "ot", "noisy_loss": "mae", "epsilon": DEFAULT_EPSILON}
    plain_log = tmp_path / "plain.jsonl"
    _tune(syn, tmp_path / "plain.safetensors", labels="plain", log_path=plain_log)
    rows = [json.loads(line) for line in plain_log.read_text().splitlines()]
    assert "n_judged_clean" in rows[0] and "clean_precision" not in rows[0] and "clean_recall" not in rows[0]


class _Stop(Exception):
    pass


def test_resume_is_bit_exact(syn, tmp_path, run_cli):
    options = {"epochs": 4, "noisy_loss": "none", "ot_epsilon": 0.3}
    whole_log = tmp_path / "whole.jsonl"
    whole = _tune(syn, tmp_path / "whole.safetensors", options=options, log_path=whole_log)
    out, cut_log = tmp_path / "cut.safetensors", tmp_path / "cut.jsonl"

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        _tune(syn, out, options=options, on_epoch=stop_after_two, log_path=cut_log)
    assert partial_path(out).exists()
    code, stdout, err = run_cli(
        "tune", syn["features"], syn["labels"], "-o", out, "--epochs", "4", "--n-ctx", "4", "--lr", "0.01",
        "--split", "ot", "--noisy-loss", "none", "--ot-epsilon", "0.3", "--device", "cpu", "--resume",
        "--json", "--log", cut_log,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["resumed_from_epoch"] == 2
    a, b = read_prompt(tmp_path / "whole.safetensors"), read_prompt(out)
    assert torch.equal(a.tensors["ctx"], b.tensors["ctx"])
    assert b.metadata["metrics"] == whole["metrics"]

    def strip(path):
        return [
            {k: v for k, v in json.loads(line).items() if k != "time"}
            for line in path.read_text().splitlines()
        ]

    assert strip(cut_log) == strip(whole_log)


def test_metadata_round_trip(syn, tmp_path, run_cli):
    out = tmp_path / "p.safetensors"
    code, stdout, err = run_cli(
        "tune", syn["features"], syn["labels"], "-o", out, "--epochs", "1", "--n-ctx", "4", "--split", "ot",
        "--noisy-loss", "none", "--ot-epsilon", "0.05", "--loss", "gce", "--device", "cpu", "--json",
    )  # fmt: skip
    assert code == 0, err
    meta = read_prompt(out).metadata
    expected = SplitConfig(method="ot", noisy_loss="none", epsilon=0.05).to_dict()
    assert meta["split"] == expected == json.loads(stdout)["split"]
    assert meta["split"]["n_iter"] > 0 and meta["split"]["class_marginal"] == "balanced"
    code, stdout, err = run_cli(
        "tune", syn["features"], syn["labels"], "-o", tmp_path / "n.safetensors", "--epochs", "1",
        "--n-ctx", "4", "--device", "cpu", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert read_prompt(tmp_path / "n.safetensors").metadata["split"] == {"method": "none"}
    assert json.loads(stdout)["split"] is None


def test_bad_split_options_and_gradstats_refuses(syn, tmp_path, run_cli):
    base = ["tune", syn["features"], syn["labels"], "-o", tmp_path / "p.safetensors", "--device", "cpu"]
    for extra, where in (
        (["--split", "dbscan"], "--split"),
        (["--split", "ot", "--noisy-loss", "rce"], "--noisy-loss"),
        (["--split", "ot", "--ot-epsilon", "0"], "--ot-epsilon"),
    ):
        code, _, err = run_cli(*base, *extra)
        assert code == 2 and f"Error: {where}:" in err, (extra, err)
    assert not (tmp_path / "p.safetensors").exists()
    code, _, err = run_cli(
        "gradstats", syn["features"], syn["labels"], "-o", tmp_path / "g.csv", "--split", "ot",
        "--epochs", "1", "--device", "cpu",
    )  # fmt: skip
    assert code == 2 and "Error: --split:" in err and "only supported by `promptcli tune`" in err
    assert not (tmp_path / "g.csv").exists()
    with pytest.raises(InputError, match="only supported"):
        from promptcli.learning.tune_run import check_options

        check_options(TuneOptions(split="ot"), lambda _: None)


def test_split_warns_when_the_labels_name_only_some_classes(syn, tmp_path, run_cli):
    rows = syn["plain"].read_text().splitlines()
    two = [rows[0]] + [r for r in rows[1:] if r.rsplit(",", 1)[1] in CLASSNAMES[:2]]
    labels = tmp_path / "two.csv"
    labels.write_text("\n".join(two) + "\n")
    code, _, err = run_cli(
        "tune", syn["features"], labels, "-o", tmp_path / "p.safetensors", "--epochs", "1", "--n-ctx", "4",
        "--split", "ot", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert "equal mass, but the labels name only 2: most labels will be judged noisy" in " ".join(err.split())
