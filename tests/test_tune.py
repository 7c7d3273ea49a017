"""promptcli tune: every method learns, linear-probe is logistic regression, runs are reproducible and resumable."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_synthetic_features
from promptcli.errors import InputError
from promptcli.io.fileio import sha256_bytes, sha256_file
from promptcli.io.prompt_files import decode_metadata, encode_metadata, read_prompt
from promptcli.learning.options import WEIGHT_DECAY_GRID, OptimConfig, TuneOptions
from promptcli.learning.training import TrainData, held_out_split, train
from promptcli.learning.tune_run import partial_path, sample_shots, tune

CLASSNAMES = ["cat", "dog", "car", "tree"]
PER_CLASS = 12
FLIPPED = (0, 12, 24, 36)  # one noisy label per class: class c -> c + 1


pytestmark = pytest.mark.usefixtures("one_thread")


def write_synthetic(folder: Path, loaded, seed: int = 0) -> dict[str, Path]:
    """A separable 4-class features file (2 views) made 'with' the tiny model, and noisy labels."""
    features = folder / "syn.h5"
    x, y, paths = write_synthetic_features(features, loaded, CLASSNAMES, PER_CLASS, 0.3, seed)
    labels = folder / "noisy.csv"
    lines = ["path,label,clean_label,is_noisy"]
    for i, (p, c) in enumerate(zip(paths, y)):
        given = (c + 1) % len(CLASSNAMES) if i in FLIPPED else c
        lines.append(f"{p},{CLASSNAMES[given]},{CLASSNAMES[c]},{int(i in FLIPPED)}")
    labels.write_text("\n".join(lines) + "\n")
    sidecar = folder / "noisy.csv.json"
    sidecar.write_text(json.dumps({"type": "symmetric", "rate": 4 / 48, "seed": 0}))
    return {"features": features, "labels": labels, "sidecar": sidecar}


@pytest.fixture(scope="module")
def syn(tmp_path_factory, tiny_model) -> dict[str, Path]:
    return write_synthetic(tmp_path_factory.mktemp("syn"), tiny_model)


def _tune(syn, out: Path, **kwargs):
    opts = {"epochs": 4, "seed": 0, **kwargs.pop("options", {})}
    return tune(syn["features"], syn["labels"], out, TuneOptions(**opts), device="cpu", **kwargs)


@pytest.mark.parametrize("method", ["coop", "cls-tuning", "full-prompt", "linear-probe", "classifier-zs"])
def test_every_method_drives_training_accuracy_up(syn, tmp_path, method):
    options = {"method": method}  # default settings (lr 0.002 for prompts, 1.0 for linear heads)
    start = _tune(syn, tmp_path / "init.safetensors", options={**options, "epochs": 0})["metrics"]
    end = _tune(syn, tmp_path / "end.safetensors", options={**options, "epochs": 20})["metrics"]
    assert start["epochs"] == 0 and start["loss"] is None and end["epochs"] == 20
    assert end["train_accuracy"] >= start["train_accuracy"] + 0.25, (start, end)
    assert end["train_accuracy"] >= 0.7
    # 4 of the 48 given labels are wrong: the clean-label accuracy is tracked separately
    assert end["train_clean_accuracy"] is not None and end["train_clean_accuracy"] >= 0.7


def _reference_logistic_regression(x, y, n_classes, weight_decay):
    """Full-batch L-BFGS on mean CE + wd/2 |W|^2 (bias not penalised)."""
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=2000,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )
    xd = x.double()

    def objective():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xd @ w.T + b, y) + weight_decay / 2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(objective)
    return w.detach(), b.detach(), objective().item()


def test_linear_probe_matches_reference_logistic_regression(syn):
    from promptcli.io.features import read_features
    from promptcli.learning.losses import CrossEntropy
    from promptcli.models.heads import LinearHead

    fs = read_features(syn["features"])
    x, y = torch.from_numpy(fs.features), torch.from_numpy(fs.labels)
    wd = 1e-2
    w_ref, b_ref, obj_ref = _reference_logistic_regression(x, y, 4, wd)
    head = LinearHead(x.shape[1], 4)
    config = OptimConfig(lr=2.0, weight_decay=wd, epochs=300, warmup_epochs=0, batch_size=len(y))
    train(head, TrainData(x, y), CrossEntropy(), config, seed=0)
    w, b = head.weight.detach().double(), head.bias.detach().double()
    obj = (torch.nn.functional.cross_entropy(x.double() @ w.T + b, y) + wd / 2 * (w**2).sum()).item()
    assert obj == pytest.approx(obj_ref, rel=1e-5)
    assert (w - w_ref).norm() / w_ref.norm() < 1e-2
    # the bias is defined up to a constant shift across classes
    assert torch.allclose(b - b.mean(), b_ref - b_ref.mean(), atol=2e-2)


def test_linear_probe_weight_decay_search(syn, tmp_path):
    out = tmp_path / "lp.safetensors"
    summary = _tune(syn, out, options={"method": "linear-probe", "epochs": 6})
    search = summary["weight_decay_search"]
    assert [r["weight_decay"] for r in search] == list(WEIGHT_DECAY_GRID)
    best = max(search, key=lambda r: (r["held_out_accuracy"], r["weight_decay"]))
    assert summary["optimizer"]["weight_decay"] == best["weight_decay"]
    meta = read_prompt(out).metadata
    assert meta["weight_decay_search"] == search and meta["optimizer"]["weight_decay"] == best["weight_decay"]
    given = _tune(syn, tmp_path / "lp2.safetensors", options={"method": "linear-probe", "weight_decay": 0.03})
    assert given["weight_decay_search"] == [] and given["optimizer"]["weight_decay"] == 0.03


def test_held_out_split_is_stratified_and_seeded():
    labels = np.array([0] * 10 + [1] * 5 + [2])
    fit, val = held_out_split(labels, seed=1)
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(16))
    assert np.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
    again = held_out_split(labels, seed=1)
    assert np.array_equal(again[1], val) and not np.array_equal(held_out_split(labels, seed=2)[1], val)


def test_sample_shots_exact_and_seeded():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 6)
    idx, short = sample_shots(labels, 4, seed=0, n_classes=3)
    assert np.bincount(labels[idx], minlength=3).tolist() == [4, 2, 4]
    assert short == {1: 2}
    assert np.array_equal(sample_shots(labels, 4, seed=0, n_classes=3)[0], idx)
    assert not np.array_equal(sample_shots(labels, 4, seed=1, n_classes=3)[0], idx)


def test_seeds_reproduce_bit_for_bit(syn, tmp_path, run_cli):
    base = [syn["features"], syn["labels"], "--epochs", "3", "--n-ctx", "4", "--device", "cpu", "-q"]
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        code, _, err = run_cli("tune", *base, "--seed", seed, "-o", tmp_path / f"{name}.safetensors")
        assert code == 0, err
    a, b, c = (read_prompt(tmp_path / f"{n}.safetensors") for n in "abc")
    assert a.tensors.keys() == {"ctx"} and torch.equal(a.tensors["ctx"], b.tensors["ctx"])
    assert a.metadata["metrics"] == b.metadata["metrics"]
    assert not torch.equal(a.tensors["ctx"], c.tensors["ctx"])


def test_metadata_round_trip(syn, tmp_path, run_cli):
    from promptcli.models.prompt_learner import PromptConfig

    out = tmp_path / "p.safetensors"
    code, stdout, err = run_cli(
        "tune", syn["features"], syn["labels"], "-o", out, "--epochs", "2", "--ctx-init", "a photo of a",
        "--class-position", "middle", "--loss", "sce", "--alpha", "0.5", "--beta", "2", "--seed", "7",
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    meta = read_prompt(out).metadata
    assert meta["method"] == "coop" and meta["classnames"] == CLASSNAMES
    assert meta["n_ctx"] == 4 and meta["class_position"] == "middle" and meta["csc"] is False
    assert meta["loss"] == "sce" and meta["loss_params"] == {
        "name": "sce", "alpha": 0.5, "beta": 2.0, "A": -4.0, "label_smoothing": 0.0,
    }  # fmt: skip
    assert meta["seed"] == 7 and meta["optimizer"]["lr"] == 0.002 and meta["optimizer"]["epochs"] == 2
    assert meta["features_sha256"] == sha256_file(syn["features"])
    assert meta["labels_sha256"] == sha256_file(syn["labels"])
    assert meta["noise"] == json.loads(syn["sidecar"].read_text())
    assert meta["metrics"] == summary["metrics"] and meta["n_train"] == 48
    assert meta["checkpoint_sha256"] and meta["model_name"] == "tiny-clip"
    assert meta["promptcli_version"] and "tune" in meta["command"]
    assert meta["cwd"] == str(Path.cwd()) and "git" in meta and meta["libraries"]["torch"] == version("torch")
    assert meta["runtime"] == {
        "device": "cpu",
        "autocast": False,  # --amp (the default) autocasts on CUDA only
        "autocast_dtype": None,
        "torch_threads": torch.get_num_threads(),
    }
    config = PromptConfig.from_metadata(meta["prompt_config"])
    # the n_ctx used: --ctx-init's 4 tokens, not --n-ctx's default 16
    assert config == PromptConfig(method="coop", n_ctx=4, ctx_init="a photo of a", class_position="middle")
    value = {"a": "text", "b": 1, "c": [1.5, None], "d": {"x": True}, "e": "1"}
    assert decode_metadata(encode_metadata(value)) == value


def test_log_lines_per_epoch(syn, tmp_path):
    log = tmp_path / "train.jsonl"
    _tune(syn, tmp_path / "p.safetensors", log_path=log, options={"epochs": 3, "n_ctx": 4})
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "loss", "lr", "accuracy", "clean_accuracy", "time", "run"}
    assert rows[0]["lr"] == 1e-5 and rows[1]["lr"] == pytest.approx(0.5 * 0.002 * (1 + np.cos(np.pi / 3)))
    assert all(isinstance(r["clean_accuracy"], float) for r in rows)


class _Stop(Exception):
    pass


def test_resume_gives_the_uninterrupted_result(syn, tmp_path, run_cli):
    options = {"epochs": 4, "n_ctx": 4, "lr": 0.005}
    whole = _tune(syn, tmp_path / "whole.safetensors", options=options)

    out = tmp_path / "cut.safetensors"

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        _tune(syn, out, options=options, on_epoch=stop_after_two, log_path=tmp_path / "cut.jsonl")
    assert partial_path(out).exists() and not out.exists()
    with pytest.raises(InputError, match="interrupted tune left a checkpoint"):
        _tune(syn, out, options=options)
    log_before = (tmp_path / "cut.jsonl").read_text()
    with pytest.raises(InputError, match=r"other inputs or options \(lr, seed\)") as refused:
        _tune(
            syn,
            out,
            options={**options, "seed": 1, "lr": 0.004},
            resume=True,
            log_path=tmp_path / "cut.jsonl",
        )
    assert "without --resume and with --force" in refused.value.hint  # --force alone resumes
    assert (tmp_path / "cut.jsonl").read_text() == log_before  # a refused resume keeps the log
    # a log without the run's runtime (written before it was recorded) is still this run's log
    rows = [json.loads(line) for line in log_before.splitlines()]
    assert all(r["run"]["runtime"]["device"] == "cpu" for r in rows)
    for r in rows:
        del r["run"]["runtime"]
    (tmp_path / "cut.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    args = [
        "tune",
        syn["features"],
        syn["labels"],
        "-o",
        out,
        "--epochs",
        "4",
        "--n-ctx",
        "4",
        "--lr",
        "0.005",
    ]
    code, stdout, err = run_cli(
        *args, "--device", "cpu", "--resume", "--json", "--log", tmp_path / "cut.jsonl"
    )
    assert code == 0, err
    assert json.loads(stdout)["resumed_from_epoch"] == 2
    assert not partial_path(out).exists()
    a, b = read_prompt(tmp_path / "whole.safetensors"), read_prompt(out)
    assert torch.equal(a.tensors["ctx"], b.tensors["ctx"])
    assert b.metadata["metrics"] == whole["metrics"]
    log = [json.loads(line) for line in (tmp_path / "cut.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert all(r["run"]["runtime"]["device"] == "cpu" for r in log)  # rewritten with this run's

    # a requeued job reruns its finished step: nothing to do, exit 0, the output and log untouched
    before = out.read_bytes(), (tmp_path / "cut.jsonl").read_bytes()
    code, stdout, err = run_cli(
        *args, "--device", "cpu", "--resume", "--json", "--log", tmp_path / "cut.jsonl"
    )
    assert code == 0, err
    done = json.loads(stdout)
    assert done["already_complete"] is True and done["metrics"] == whole["metrics"]
    assert (out.read_bytes(), (tmp_path / "cut.jsonl").read_bytes()) == before
    code, _, err = run_cli(*args[:-1], "0.004", "--device", "cpu", "--resume")  # another run's output
    assert code == 2 and "output exists, written by another run (it differs in lr)" in err, err
    assert out.read_bytes() == before[0]


def test_refuses_to_overwrite(syn, tmp_path, run_cli):
    out = tmp_path / "p.safetensors"
    out.write_text("keep me")
    args = ["tune", syn["features"], syn["labels"], "-o", out, "--method", "linear-probe", "--epochs", "1"]
    code, _, err = run_cli(*args, "--weight-decay", "0.001", "--device", "cpu")
    assert code == 2 and "output exists" in err and "--force" in err
    assert out.read_text() == "keep me"
    code, _, err = run_cli(*args, "--weight-decay", "0.001", "--device", "cpu", "--force")
    assert code == 0, err
    assert read_prompt(out).method == "linear-probe"


def test_labels_from_stdin_and_skip_missing(syn, tmp_path, run_cli, monkeypatch):
    kept = [line for line in syn["labels"].read_text().splitlines() if not line.startswith("img000.png,")]
    # each path once (duplicates are refused): img000.png comes back with an unknown class
    text = "\n".join(kept) + "\nelsewhere.png,cat,cat,0\nimg000.png,zebra,cat,1\n"
    args = ["tune", syn["features"], "-", "--method", "linear-probe", "--epochs", "1", "--weight-decay", "0"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code, _, err = run_cli(*args, "-o", tmp_path / "a.safetensors", "--device", "cpu")
    assert code == 2 and "<stdin>:49" in err and "elsewhere.png" in err and "--skip-missing" in err

    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    out = tmp_path / "b.safetensors"
    code, stdout, err = run_cli(*args, "-o", out, "--device", "cpu", "--skip-missing", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["n_skipped"] == 2 and summary["n_train"] == 47
    meta = read_prompt(out).metadata
    assert meta["labels_sha256"] == sha256_bytes(text.encode()) and meta["labels_file"] == "<stdin>"
    assert "noise" not in meta


def test_shots_option(syn, tmp_path, run_cli):
    out = tmp_path / "p.safetensors"
    args = ["tune", syn["features"], syn["labels"], "-o", out, "--method", "linear-probe", "--epochs", "1"]
    code, stdout, err = run_cli(*args, "--shots", "3", "--weight-decay", "0", "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(stdout)["n_train"] == 12 and read_prompt(out).metadata["shots"] == 3
    code, _, err = run_cli(*args, "--shots", "0", "--device", "cpu", "--force")
    assert code == 2 and "--shots" in err


def test_bad_options_are_clear_errors(syn, tmp_path, run_cli):
    base = ["tune", syn["features"], syn["labels"], "-o", tmp_path / "p.safetensors", "--device", "cpu"]
    for extra, where in (
        (["--method", "prompt-magic"], "--method"),
        (["--loss", "focal"], "--loss"),
        (["--optimizer", "lion"], "--optimizer"),
        (["--lr", "-1"], "--lr"),
        (["--loss", "gce", "--label-smoothing", "0.1"], "--label-smoothing"),
        (["--method", "classifier-zs", "--template", "no placeholder"], "--template"),
        (["--method", "classifier-zs", "--template", "a {}} photo"], "--template"),
        (["--method", "clip-adapter", "--template", "{{}"], "--template"),
        (["--method", "kgcoop", "--template", "a photo of {x}"], "--template"),
        (["--method", "kgcoop", "--template", "{}{}"], "--template"),
        (["--method", "cls-tuning", "--csc"], "--csc"),
        (["--class-position", "left"], "--class-position"),
    ):
        code, _, err = run_cli(*base, *extra)
        assert code == 2 and f"Error: {where}:" in err, (extra, err)


def test_only_learnable_tensors_change(syn, tiny_model):
    from promptcli.io.features import read_features
    from promptcli.learning.losses import CrossEntropy
    from promptcli.models.heads import build_head
    from promptcli.models.prompt_learner import PromptConfig

    fs = read_features(syn["features"])
    before = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    for method in ("coop", "full-prompt"):
        head = build_head(
            method,
            classnames=fs.classnames,
            dim=fs.dim,
            loaded=tiny_model,
            prompt_config=PromptConfig(method=method, n_ctx=4),
            generator=torch.Generator().manual_seed(0),
        )
        start = head.learnable_state()
        data = TrainData(torch.from_numpy(fs.features), torch.from_numpy(fs.labels))
        train(head, data, CrossEntropy(), OptimConfig(epochs=2, lr=0.05, warmup_epochs=0), seed=0)
        assert all(p.grad is None for p in tiny_model.model.parameters())
        assert all(not torch.equal(start[k], v) for k, v in head.learnable_state().items())
    after = tiny_model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_optim_config_schedule():
    config = OptimConfig(lr=0.1, epochs=10, warmup_epochs=2, warmup_lr=1e-4)
    lrs = [config.lr_at(e) for e in range(10)]
    assert lrs[:2] == [1e-4, 1e-4]
    assert lrs[2] == pytest.approx(0.05 * (1 + np.cos(np.pi * 0.2)))
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    with pytest.raises(InputError, match="must be >= 1"):
        replace(config, batch_size=0).validate()
    with pytest.raises(InputError, match="--schedule"):
        replace(config, schedule="linear").validate()


@pytest.mark.parametrize(("epochs", "warmup"), [(5, 1), (10, 1), (50, 1), (10, 2), (10, 0)])
def test_the_coop_schedule_is_dassls_warmup_then_cosine(epochs, warmup):
    """CoOp's code: a constant warm-up scheduler whose successor, a cosine over MAX_EPOCH epochs, starts counting
    when the warm-up ends; the scheduler steps after every epoch."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.002)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    reference = [1e-5] * warmup
    while len(reference) < epochs:
        reference.append(cosine.get_last_lr()[0])
        optimizer.step()
        cosine.step()
    config = OptimConfig(lr=0.002, epochs=epochs, warmup_epochs=warmup, warmup_lr=1e-5, schedule="coop")
    assert [config.lr_at(e) for e in range(epochs)] == pytest.approx(reference, rel=1e-12)
    plain = replace(config, schedule="cosine")  # the cosine counts the warm-up epochs as its first
    assert [plain.lr_at(e) for e in range(epochs)] == pytest.approx(
        [1e-5] * warmup + [0.001 * (1 + np.cos(np.pi * e / epochs)) for e in range(warmup, epochs)], rel=1e-12
    )


def test_short_paper_schedules_default_to_coops_and_files_record_the_schedule():
    from promptcli.choices import SCHEDULE_TEXT

    assert [TuneOptions(method=m).resolved().schedule for m in ("coop", "cocoop", "vpt", "maple")] == [
        "cosine", "coop", "coop", "coop",
    ]  # fmt: skip
    assert TuneOptions(method="vpt", schedule="cosine").resolved().schedule == "cosine"
    assert (
        OptimConfig().to_dict()["schedule"] == "constant warm-up then cosine (per epoch)"
    )  # as files before
    assert OptimConfig(schedule="coop").to_dict()["schedule"] == SCHEDULE_TEXT["coop"]


@pytest.mark.parametrize(
    ("options", "warning"),
    [
        (["--q", "0.5"], "--q applies to --loss gce; ignored for ce"),
        (["--loss", "gce", "--alpha", "0.5"], "--alpha applies to --loss sce; ignored for gce"),
        (
            ["--warmup-epochs", "3"],
            "the warm-up (--warmup-epochs 3) covers all 2 epochs: the whole run trains at --warmup-lr 1e-05",
        ),
        (
            ["--epochs", "1"],  # the default warm-up epoch is the whole of a 1-epoch run
            "the warm-up (--warmup-epochs 1) covers all 1 epochs: the whole run trains at --warmup-lr 1e-05",
        ),
        (["--kg-lambda", "4"], "--kg-lambda applies to kgcoop; ignored for coop"),
        (["--epochs", "0"], "--epochs 0: coop is saved untrained, with its initial weights"),  # the last wins
    ],
)
def test_options_that_do_nothing_warn_once(syn, tmp_path, run_cli, options, warning):
    code, _, err = run_cli(
        "tune", syn["features"], syn["labels"], "-o", tmp_path / "p.safetensors", "--epochs", "2", "--n-ctx", "2",
        "--device", "cpu", *options,
    )  # fmt: skip
    assert code == 0, err
    assert " ".join(err.split()).count(warning) == 1, err


def test_options_a_loss_takes_give_no_warning(syn, tmp_path, run_cli):
    code, _, err = run_cli(
        "tune", syn["features"], syn["labels"], "-o", tmp_path / "p.safetensors", "--epochs", "2", "--n-ctx", "2",
        "--device", "cpu", "--loss", "sce", "--alpha", "0.5", "--beta", "2",
    )  # fmt: skip
    assert code == 0, err
    assert "Warning" not in err, err


def test_library_calls_warn_through_pythons_warnings():
    from promptcli.errors import PromptcliWarning
    from promptcli.learning.method_options import check_method_options

    with pytest.warns(PromptcliWarning, match="--epochs 0: coop is saved untrained"):
        check_method_options(TuneOptions(method="coop", epochs=0))
    heard: list[str] = []
    check_method_options(TuneOptions(method="coop", epochs=0), heard.append)  # the CLI passes its own
    assert heard == ["--epochs 0: coop is saved untrained, with its initial weights"]


def test_library_warnings_point_at_the_callers_line():
    from promptcli.errors import PromptcliWarning
    from promptcli.learning.method_options import check_method_options

    with pytest.warns(PromptcliWarning) as caught:
        check_method_options(TuneOptions(method="coop", epochs=0))
    assert caught[0].filename == __file__


def test_library_errors_are_pythons_value_and_runtime_errors(syn, tmp_path):
    """A library user's ``except ValueError`` catches bad input, as it would from numpy or torch."""
    from promptcli.errors import InputError, RuntimeFailure

    with pytest.raises(ValueError, match="--n-ctx") as caught:
        tune(syn["features"], syn["labels"], tmp_path / "p.safetensors", TuneOptions(n_ctx=-1), device="cpu")
    assert isinstance(caught.value, InputError) and caught.value.exit_code == 2
    assert issubclass(RuntimeFailure, RuntimeError) and RuntimeFailure("x").exit_code == 1


def test_tip_adapter_f_trains_as_its_code_does():
    """AdamW with eps 1e-4 and weight decay 0.01, batch 256, no warm-up; explicit options still win."""
    from promptcli.learning.training import make_optimizer

    config = TuneOptions(method="tip-adapter-f").optim_config()
    assert (config.optimizer, config.lr, config.epochs, config.batch_size) == ("adamw", 0.001, 20, 256)
    assert (config.warmup_epochs, config.weight_decay, config.adam_eps) == (0, 0.01, 1e-4)
    weight = torch.nn.Parameter(torch.zeros(1))
    assert make_optimizer([{"params": [weight]}], config).defaults["eps"] == 1e-4
    given = TuneOptions(method="tip-adapter-f", warmup_epochs=2, batch_size=8).optim_config(0.0)
    assert (given.warmup_epochs, given.batch_size, given.weight_decay) == (2, 8, 0.0)
    assert TuneOptions().optim_config().adam_eps == 1e-8 and TuneOptions().optim_config().warmup_epochs == 1


@pytest.mark.parametrize("command", ["tune", "gradstats", "eval"])
def test_features_wider_than_the_model_are_refused(tiny_model, tmp_path, run_cli, command):
    """tune (prompt methods) and gradstats loaded the model without comparing its width with the features':
    'mat1 and mat2 shapes cannot be multiplied'. One check in load_model_from_record serves them all."""
    from conftest import CLASSES, unit_rows
    from promptcli.io.features import write_features

    n, dim = 6, 2 * tiny_model.embed_dim
    x = unit_rows(np.random.default_rng(0).normal(size=(n, dim)))
    paths, y = [f"img{i}.png" for i in range(n)], [i % 3 for i in range(n)]
    features = tmp_path / "wide.h5"
    write_features(
        features, features=[x], n_rows=n, dim=dim, paths=paths, labels=y, splits=["train"] * n,
        classnames=list(CLASSES), attrs={**tiny_model.record(), "embed_dim": dim}, dtype="float32",
    )  # fmt: skip
    labels = tmp_path / "labels.csv"
    rows = "".join(f"{p},{CLASSES[c]},{CLASSES[c]},0\n" for p, c in zip(paths, y))
    labels.write_text("path,label,clean_label,is_noisy\n" + rows)
    args = {
        "tune": [labels, "-o", tmp_path / "p.safetensors", "--epochs", "1"],
        "gradstats": [labels, "-o", tmp_path / "g.csv", "--epochs", "1"],
        "eval": ["--zero-shot"],
    }[command]
    code, _, err = run_cli(command, features, *args, "--device", "cpu", "-q")
    assert code == 2 and "features have dimension 64 but the model embeds text in 32" in err, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n-ctx", "2147483647"], "--n-ctx: 2147483647 context tokens do not fit"),  # was a MemoryError
        (["--n-ctx", "9223372036854775808"], "context tokens do not fit"),  # was an OverflowError
        (["--method", "linear-probe", "--optimizer", "sgd", "--lr", "1e308"], "--lr: 1e+308 is beyond"),
        (["--method", "linear-probe", "--optimizer", "sgd", "--warmup-lr", "1e308"], "--warmup-lr: 1e+308"),
        (["--method", "linear-probe", "--optimizer", "sgd", "--weight-decay", "1e308"], "--weight-decay: 1e"),
    ],
)
def test_options_too_large_to_train_with_are_refused(syn, tmp_path, run_cli, extra, message):
    """A huge --n-ctx ran out of memory making its token ids; a float option beyond float32 gave 'value
    cannot be converted to type float without overflow' (exit 1)."""
    out = tmp_path / "p.safetensors"
    code, _, err = run_cli("tune", syn["features"], syn["labels"], "-o", out, "--device", "cpu", *extra)
    assert code == 2 and message in err, err
    assert not out.exists()
