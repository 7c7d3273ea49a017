"""promptcli gradstats: exact per-sample gradients, tune's trajectory, the CSV contract; tune log provenance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import read_csv_table
from promptcli.analysis.gradstats import COLUMNS, group_stats, learnable_parameters, per_sample_gradients
from promptcli.io.fileio import sha256_file
from promptcli.io.prompt_files import read_prompt
from promptcli.learning.losses import make_loss
from promptcli.learning.options import TuneOptions
from promptcli.learning.tune_run import partial_path, prepare_run, tune

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def noisy(noisy_labels) -> dict[str, Path]:
    return noisy_labels


def _head(method: str, tiny_model, seed: int = 0):
    from promptcli.models.heads import build_head
    from promptcli.models.prompt_learner import PromptConfig

    head = build_head(
        method,
        classnames=["red apple", "blue sky", "green grass", "cat"],
        dim=tiny_model.embed_dim,
        loaded=tiny_model,
        prompt_config=PromptConfig(method=method, n_ctx=4) if method != "linear-probe" else None,
        generator=torch.Generator().manual_seed(seed),
    )
    if method == "linear-probe":  # away from the zero init, so that every class gets gradient
        with torch.no_grad():
            head.weight.normal_(0, 3, generator=torch.Generator().manual_seed(1))
    return head


def _batch(dim: int, n: int = 10):
    g = torch.Generator().manual_seed(2)
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    return x, torch.randint(4, (n,), generator=g)


def _one_at_a_time(head, x, y, loss_fn) -> list[torch.Tensor]:
    params = learnable_parameters(head)
    per_sample = []
    for i in range(len(y)):
        per_sample.append(torch.autograd.grad(loss_fn(head(x[i : i + 1]), y[i : i + 1]), params))
    return [torch.stack([g[k] for g in per_sample]) for k in range(len(params))]


@pytest.mark.parametrize(
    ("method", "loss"),
    [
        ("coop", "ce"),
        ("coop", "gce"),
        ("full-prompt", "sce"),
        ("linear-probe", "ce"),
        ("linear-probe", "mae"),
    ],
)
def test_per_sample_gradients_equal_one_sample_at_a_time(tiny_model, method, loss):
    head = _head(method, tiny_model)
    x, y = _batch(tiny_model.embed_dim)
    loss_fn = make_loss(loss)
    batched = per_sample_gradients(head, x, y, loss_fn, chunk_size=4)  # 3 chunks of 4, 4, 2
    reference = _one_at_a_time(head, x, y, loss_fn)
    assert [g.shape for g in batched] == [(10, *p.shape) for p in learnable_parameters(head)]
    for got, want in zip(batched, reference):
        scale = want.flatten(1).norm(dim=1).max()
        assert scale > 0
        assert (got - want).abs().max() <= 1e-5 * scale, (method, loss)
    # nothing accumulated into .grad: the training step's gradients are left alone
    assert all(p.grad is None for p in learnable_parameters(head))


@pytest.mark.parametrize("method", ["coop", "linear-probe"])
def test_group_shares_add_up_to_the_step_gradient(tiny_model, method):
    head = _head(method, tiny_model)
    x, y = _batch(tiny_model.embed_dim)
    loss_fn = make_loss("ce")
    grads = per_sample_gradients(head, x, y, loss_fn)
    loss_fn(head(x), y).backward()
    step = torch.cat([p.grad.flatten() for p in learnable_parameters(head)])
    noisy = torch.tensor([True, False] * 5)
    flat = torch.cat([g.flatten(1) for g in grads], dim=1)
    assert (flat.mean(0) - step).norm() <= 1e-5 * step.norm()
    stats = group_stats(grads, noisy)
    assert (stats.n_noisy, stats.n_clean) == (5, 5)
    assert stats.noisy_sum_norm == pytest.approx(float(flat[noisy].sum(0).norm() / 10), rel=1e-5)
    assert stats.clean_grad_norm == pytest.approx(float(flat[~noisy].norm(dim=1).mean()), rel=1e-5)
    assert stats.ratio == pytest.approx(stats.noisy_grad_norm / stats.clean_grad_norm)


def test_group_stats_by_hand():
    grads = [torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]]), torch.zeros(3, 1)]
    stats = group_stats(grads, torch.tensor([True, False, True]))
    assert (stats.n_noisy, stats.n_clean) == (2, 1)
    assert stats.noisy_grad_norm == pytest.approx(7.5) and stats.clean_grad_norm == pytest.approx(1.0)
    assert stats.ratio == pytest.approx(7.5)
    assert stats.noisy_sum_norm == pytest.approx(15 / 3) and stats.clean_sum_norm == pytest.approx(1 / 3)
    empty = group_stats(grads, torch.tensor([False, False, False]))
    assert empty.n_noisy == 0 and empty.noisy_grad_norm is None and empty.noisy_sum_norm is None
    assert empty.ratio is None


@pytest.mark.parametrize("method", ["coop", "linear-probe"])
def test_same_parameters_as_tune(noisy, tmp_path, method):
    from promptcli.analysis.gradstats import noisy_flags, record_gradients

    options = TuneOptions(method=method, epochs=3, n_ctx=4, batch_size=8, seed=5)
    out = tmp_path / "tuned.safetensors"
    tune(noisy["features"], noisy["labels"], out, options, device="cpu")
    tuned = read_prompt(out).tensors
    run = prepare_run(noisy["features"], noisy["labels"], options, device="cpu")
    head, result, recorder = record_gradients(run, noisy_flags(run, noisy["labels"]), chunk_size=3)
    state = head.learnable_state()
    assert state.keys() == tuned.keys()
    assert all(torch.equal(state[k], tuned[k]) for k in state)  # bit for bit
    assert result.final == read_prompt(out).metadata["metrics"]
    assert [(e, s) for e, s, _ in recorder.steps] == [(e, s) for e in (1, 2, 3) for s in (1, 2, 3)]


def test_cli_writes_the_csv_report_reads(noisy, tmp_path, run_cli):
    from promptcli.analysis.reporting import GRADSTATS_COLUMNS, read_results

    out = tmp_path / "grads.csv"
    args = [
        "gradstats", noisy["features"], noisy["labels"], "-o", out, "--method", "coop",
        "--method", "linear-probe", "--epochs", "2", "--n-ctx", "4", "--batch-size", "8",
        "--weight-decay", "0.001", "--seed", "3", "--device", "cpu",
    ]  # fmt: skip
    code, stdout, err = run_cli(*args, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    # the per-epoch table goes to stderr (stdout carries the JSON)
    assert "Gradient norms per epoch" in err and "linear-probe" in err
    header, rows = read_csv_table(out)
    assert tuple(header) == COLUMNS == GRADSTATS_COLUMNS
    sidecar_noise = json.loads(noisy["sidecar"].read_text())
    n_noisy = sidecar_noise["n_noisy"]
    assert len(rows) == summary["n_rows"] == 2 * 2 * 3  # methods x epochs x ceil(18 / 8) steps
    assert [r["method"] for r in rows] == ["coop"] * 6 + ["linear-probe"] * 6
    for r in rows:
        assert (r["loss"], r["noise_type"], r["seed"]) == ("ce", "symmetric", "3")
        assert float(r["noise_rate"]) == 0.34
        for group in ("noisy", "clean"):
            empty = int(r[f"n_{group}"]) == 0
            assert (r[f"{group}_grad_norm"] == "") == empty and (r[f"{group}_sum_norm"] == "") == empty
        if r["ratio"]:
            assert float(r["ratio"]) == pytest.approx(
                float(r["noisy_grad_norm"]) / float(r["clean_grad_norm"])
            )
    for method in ("coop", "linear-probe"):
        for epoch in ("1", "2"):
            steps = [r for r in rows if r["method"] == method and r["epoch"] == epoch]
            assert [int(r["n_noisy"]) + int(r["n_clean"]) for r in steps] == [8, 8, 2]
            assert sum(int(r["n_noisy"]) for r in steps) == n_noisy
    runs = {r["method"]: r for r in summary["runs"]}
    assert runs["coop"]["n_noisy"] == n_noisy and [e["epoch"] for e in runs["coop"]["epochs"]] == [1, 2]
    assert all(math.isfinite(e["ratio"]) for r in runs.values() for e in r["epochs"])

    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["features"]["sha256"] == sha256_file(noisy["features"])
    assert meta["labels"]["sha256"] == sha256_file(noisy["labels"])
    assert meta["model"]["model_name"] == "tiny-clip" and meta["model"]["checkpoint_sha256"]
    assert meta["methods"] == ["coop", "linear-probe"] and meta["options"]["epochs"] == 2
    assert meta["noise"]["type"] == "symmetric" and "transition_counts" not in meta["noise"]
    assert meta["promptcli_version"] and "gradstats" in meta["command"] and meta["cwd"]
    assert meta["runtime"]["device"] == "cpu" and meta["runtime"]["autocast"] is False

    grads = read_results([out]).grads
    assert sorted(g.key.method for g in grads) == ["coop", "linear-probe"]

    code, _, err = run_cli(*args)
    assert code == 2 and "output exists" in err and "--force" in err
    code, _, err = run_cli(*args, "--force", "-q")
    assert code == 0, err


def test_cli_errors(noisy, tmp_path, run_cli):
    plain = tmp_path / "plain.csv"
    plain.write_text(
        "\n".join(
            ["path,label"]
            + [",".join(r.split(",")[:2]) for r in noisy["labels"].read_text().splitlines()[1:]]
        )
    )
    base = ["gradstats", noisy["features"]]
    out = ["-o", tmp_path / "g.csv", "--device", "cpu", "--epochs", "1"]
    code, _, err = run_cli(*base, plain, *out)
    assert code == 2 and f"Error: {plain}: the labels have no clean_label and no is_noisy column" in err
    assert "promptcli corrupt" in err
    for extra, where in (
        (["--method", "magic"], "--method"),
        (["--method", "coop", "--method", "coop"], "--method"),
        (["--grad-batch", "0"], "--grad-batch"),
        (["--loss", "focal"], "--loss"),
    ):
        code, _, err = run_cli(*base, noisy["labels"], *out, *extra)
        assert code == 2 and f"Error: {where}:" in err, (extra, err)
    code, _, err = run_cli(*base, "-", *out)
    assert code == 2 and "from a file" in err
    assert not (tmp_path / "g.csv").exists()


class _Stop(Exception):
    pass


def test_tune_log_lines_carry_the_run(noisy, tmp_path):
    options = TuneOptions(method="linear-probe", epochs=3, weight_decay=0.01, loss="gce", shots=4, seed=2)
    out, log = tmp_path / "lp.safetensors", tmp_path / "lp.jsonl"

    def stop(row):
        if row["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        tune(noisy["features"], noisy["labels"], out, options, device="cpu", log_path=log, on_epoch=stop)
    assert partial_path(out).exists()
    tune(noisy["features"], noisy["labels"], out, options, device="cpu", log_path=log, resume=True)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]  # epochs 1-2 rewritten from the checkpoint
    sidecar = json.loads(noisy["sidecar"].read_text())
    small = {
        k: sidecar[k] for k in ("type", "rate", "seed", "shots", "per_class", "n_noisy", "realised_rate")
    }
    meta = read_prompt(out).metadata
    expected = {
        "method": "linear-probe",
        "loss": "gce",
        "loss_params": {"name": "gce", "q": 0.7},
        "seed": 2,
        "shots": 4,
        "noise": small,
        "model": {k: meta[k] for k in ("model_name", "pretrained", "checkpoint_sha256")},
        "settings": {
            "optimizer": meta["optimizer"],
            "weight_decay_searched": False,
            "use_views": meta["use_views"],  # the fixture's features hold 2 views per image
            "n_views": meta["n_views"],
            **({"template": meta["template"]} if "template" in meta else {}),
        },
        "runtime": meta["runtime"],
    }
    assert [r["run"] for r in lines] == [expected] * 3
    assert meta["runtime"]["device"] == "cpu" and meta["runtime"]["autocast"] is False
    assert meta["noise"] == small and "transition_counts" in sidecar


def test_cli_warns_once(noisy, tmp_path, run_cli):
    """Each warning about an option the run ignores is printed once, not once per check."""
    code, _, err = run_cli(
        "gradstats", noisy["features"], noisy["labels"], "-o", tmp_path / "g.csv", "--method", "linear-probe",
        "--epochs", "1", "--n-ctx", "4", "--device", "cpu", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert err.count("Warning:") == 2 and err.count("--n-ctx") == 1 and err.count("the warm-up") == 1, err
