"""kgcoop, cocoop, clip-adapter, tip-adapter(-f): identity settings, the papers' equations, files, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_prompt_learner import NAMES as HF_NAMES
from test_prompt_learner import tiny_hf_model  # noqa: F401  (the fixture)
from test_tune import CLASSNAMES, write_synthetic

from promptcli.analysis.evaluation import evaluate_file
from promptcli.errors import InputError
from promptcli.io.features import read_features
from promptcli.io.prompt_files import read_prompt
from promptcli.learning.options import TuneOptions
from promptcli.learning.training import TrainData
from promptcli.learning.tune_run import partial_path, tune
from promptcli.models.heads import build_head, load_head, predict_logits, save_head
from promptcli.models.prompt_learner import PromptConfig, PromptLearner
from promptcli.models.zeroshot import class_text_embeddings, logit_scale

pytestmark = pytest.mark.usefixtures("one_thread")
NEW_METHODS = ["kgcoop", "cocoop", "clip-adapter", "tip-adapter", "tip-adapter-f"]


@pytest.fixture(scope="module")
def syn(tmp_path_factory, tiny_model) -> dict[str, Path]:
    return write_synthetic(tmp_path_factory.mktemp("syn-methods"), tiny_model)


@pytest.fixture(scope="module")
def feats(syn) -> torch.Tensor:
    return torch.from_numpy(read_features(syn["features"]).features).float()


def _head(method: str, loaded, data: TrainData | None = None, **options):
    opts = TuneOptions(method=method, **options)
    config = PromptConfig(method="coop", ctx_init=opts.ctx_init or "a photo of a")
    return build_head(
        method,
        classnames=CLASSNAMES,
        dim=loaded.embed_dim,
        loaded=loaded,
        prompt_config=config,
        generator=torch.Generator().manual_seed(0),
        options=opts,
        data=data,
    )


def _coop(loaded, learner_state=None):
    head = build_head(
        "coop",
        classnames=CLASSNAMES,
        dim=loaded.embed_dim,
        loaded=loaded,
        prompt_config=PromptConfig(method="coop", ctx_init="a photo of a"),
    )
    if learner_state is not None:
        head.load_learnable_state(learner_state)
    return head


def _zero_shot(loaded, feats: torch.Tensor) -> torch.Tensor:
    text = class_text_embeddings(loaded, CLASSNAMES, ["a photo of a {}."]).float()
    return logit_scale(loaded) * feats @ text.t()


# ----------------------------------------------------------------------------- identity settings


def test_cocoop_with_zero_shift_is_coop_with_the_same_context(tiny_model, feats):
    head = _head("cocoop", tiny_model)
    with torch.no_grad():
        head.meta_net.linear1.weight.normal_()  # the hidden layer may be anything:
        head.meta_net.linear2.weight.zero_()  # the shift is zero
        head.meta_net.linear2.bias.zero_()
        head.learner.ctx.add_(0.05 * torch.randn_like(head.learner.ctx))
    coop = _coop(tiny_model, head.learner.learnable_state())
    ours, theirs = predict_logits(head, feats), predict_logits(coop, feats)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))


def test_cocoop_prompts_follow_the_paper(tiny_model, feats):
    """v_m(x) = v_m + pi(x): the packed per-image pass equals a CoOp learner whose context is v + pi."""
    head = _head("cocoop", tiny_model)
    with torch.no_grad():
        head.meta_net.linear2.weight.normal_(0, 0.2)
    x = feats[:3]
    shift = head.shift(x)
    assert shift.shape == (3, head.learner.ctx.shape[-1])
    fast = head.text_features(shift)
    torch.testing.assert_close(fast, head.text_features_plain(shift), atol=2e-5, rtol=1e-5)
    assert head.shared  # the tiny tower is causal: the shared-prefix path is the one tested
    for b in range(3):
        learner = PromptLearner(tiny_model, CLASSNAMES, PromptConfig(method="coop", ctx_init="a photo of a"))
        learner.load_learnable_state({"ctx": head.learner.ctx.detach() + shift[b].detach()})
        torch.testing.assert_close(fast[b], learner.forward_plain().detach(), atol=2e-5, rtol=1e-5)
    logits = head.logits(x)
    torch.testing.assert_close(logits, logit_scale(tiny_model) * torch.einsum("bd,bcd->bc", x, fast))


def test_cocoop_gradients_of_the_packed_pass_match_the_plain_one(tiny_model, feats):
    head = _head("cocoop", tiny_model)
    params = [p for g in head.param_groups(0.0) for p in g["params"]]
    x = feats[:4]
    target = torch.arange(4) % len(CLASSNAMES)

    def grads(text_fn):
        text = text_fn(head.shift(x))
        loss = F.cross_entropy(10 * torch.einsum("bd,bcd->bc", x, text), target)
        return torch.autograd.grad(loss, params)

    for a, b in zip(grads(head.text_features), grads(head.text_features_plain)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_clip_adapter_at_ratio_zero_is_zero_shot(tiny_model, feats):
    head = _head("clip-adapter", tiny_model, adapter_ratio=0.0)
    logits = predict_logits(head, feats)
    torch.testing.assert_close(logits, _zero_shot(tiny_model, feats), atol=1e-5, rtol=1e-5)
    assert torch.equal(logits.argmax(1), _zero_shot(tiny_model, feats).argmax(1))
    hidden = head.adapter[0].weight.shape
    assert hidden == (tiny_model.embed_dim // 4, tiny_model.embed_dim)


def test_clip_adapter_mixes_the_residual(tiny_model, feats):
    head = _head("clip-adapter", tiny_model, adapter_ratio=0.2)
    x = feats[:5]
    mlp = torch.relu(torch.relu(x @ head.adapter[0].weight.t()) @ head.adapter[2].weight.t())
    expected = F.normalize(0.2 * mlp + 0.8 * x, dim=-1)
    torch.testing.assert_close(head.adapted(x), expected)


def _cache(feats: torch.Tensor, n: int) -> TrainData:
    labels = torch.arange(n) % len(CLASSNAMES)
    return TrainData(features=feats[:n], labels=labels)


def test_tip_adapter_matches_the_paper_and_alpha_zero_is_zero_shot(tiny_model, feats):
    data = _cache(feats, 20)
    head = _head("tip-adapter", tiny_model, data=data, tip_alpha=1.3, tip_beta=2.5)
    values = F.one_hot(data.labels, len(CLASSNAMES)).float()
    paper = _zero_shot(tiny_model, feats) + 1.3 * torch.exp(-2.5 * (1 - feats @ data.features.t())) @ values
    torch.testing.assert_close(predict_logits(head, feats), paper, atol=1e-4, rtol=1e-5)
    zero = _head("tip-adapter", tiny_model, data=data, tip_alpha=0.0)
    assert torch.equal(predict_logits(zero, feats).argmax(1), _zero_shot(tiny_model, feats).argmax(1))
    empty = _head("tip-adapter", tiny_model, data=_cache(feats, 0))
    torch.testing.assert_close(
        predict_logits(empty, feats), _zero_shot(tiny_model, feats), atol=1e-5, rtol=1e-5
    )


def test_tip_adapter_f_learns_only_the_keys(tiny_model, feats):
    head = _head("tip-adapter-f", tiny_model, data=_cache(feats, 12))
    (group,) = head.param_groups(0.0)
    assert group["params"] == [head.keys] and head.keys.requires_grad
    frozen = _head("tip-adapter", tiny_model, data=_cache(feats, 12))
    assert frozen.param_groups(0.0)[0]["params"] == [] and not frozen.keys.requires_grad


def test_tip_search_picks_the_best_grid_point(tiny_model, feats):
    head = _head("tip-adapter", tiny_model, data=_cache(feats, 24))
    labels = torch.arange(len(feats)) % len(CLASSNAMES)
    result = head.search(feats, labels)
    best = float((predict_logits(head, feats).argmax(1) == labels).float().mean())
    assert result["val_accuracy"] == pytest.approx(best)
    assert best >= result["val_accuracy_before"]
    assert (head.alpha, head.beta) == (result["alpha"], result["beta"])


def test_kgcoop_logits_are_coops_and_its_regulariser_the_papers(tiny_model, feats):
    head = _head("kgcoop", tiny_model, kg_lambda=8.0)
    # initialised from the template's words, the learned features are the zero-shot ones
    assert float(head.regularizer().detach()) == pytest.approx(0.0, abs=1e-8)
    with torch.no_grad():
        head.learner.ctx.add_(0.1 * torch.randn_like(head.learner.ctx))
    coop = _coop(tiny_model, head.learner.learnable_state())
    assert torch.equal(predict_logits(head, feats), predict_logits(coop, feats))
    text = head.learner().detach()
    zs = class_text_embeddings(tiny_model, CLASSNAMES, ["a photo of a {}."]).float()
    expected = 8.0 * ((text - zs) ** 2).sum(-1).mean()
    head(feats[:2])  # the step's forward: its class features are reused, once
    torch.testing.assert_close(head.regularizer().detach(), expected)
    assert head._step_weight is None


def test_kgcoop_lambda_only_changes_the_loss(syn, tmp_path):
    base = {"epochs": 3, "seed": 0}
    coop = TuneOptions(method="coop", ctx_init="a photo of a", **base)  # kgcoop's default initialisation
    tune(syn["features"], syn["labels"], tmp_path / "coop.st", coop, device="cpu")
    for lam in (0.0, 8.0):
        out = tmp_path / f"kg{lam}.st"
        tune(
            syn["features"],
            syn["labels"],
            out,
            TuneOptions(method="kgcoop", kg_lambda=lam, **base),
            device="cpu",
        )
    coop = read_prompt(tmp_path / "coop.st").tensors["ctx"]
    assert torch.equal(read_prompt(tmp_path / "kg0.0.st").tensors["ctx"], coop)
    assert not torch.equal(read_prompt(tmp_path / "kg8.0.st").tensors["ctx"], coop)
    assert read_prompt(tmp_path / "kg8.0.st").metadata["kg_lambda"] == 8.0
    # the n_ctx recorded is the one used: "a photo of a"'s 4 tokens (not --n-ctx's default 16, ignored)
    meta = read_prompt(tmp_path / "kg8.0.st").metadata
    assert meta["n_ctx"] == 4 and meta["prompt_config"]["prompt.n_ctx"] == "4"
    # recorded as the method's settings, which eval copies and report keeps apart
    assert read_prompt(tmp_path / "kg8.0.st").metadata["method_params"] == {"kg_lambda": 8.0}
    assert "method_params" not in read_prompt(tmp_path / "coop.st").metadata
    summary = evaluate_file(syn["features"], [tmp_path / "kg0.0.st"], device="cpu").summary
    assert summary["method_params"] == {"kg_lambda": 0.0}


# ----------------------------------------------------------------------------- files, tune, eval


@pytest.mark.parametrize("method", NEW_METHODS)
def test_save_and_load_give_the_same_logits(method, tiny_model, feats, tmp_path):
    head = _head(method, tiny_model, data=_cache(feats, 16))
    with torch.no_grad():
        for group in head.param_groups(0.0):
            for p in group["params"]:
                p.add_(0.01 * torch.randn_like(p))
    path = save_head(tmp_path / "p.safetensors", head, {"method": method, "classnames": CLASSNAMES})
    loaded_head = load_head(read_prompt(path), tiny_model if head.needs_model else None)
    assert torch.equal(predict_logits(loaded_head, feats), predict_logits(head, feats))


@pytest.mark.parametrize("method", NEW_METHODS)
def test_tune_eval_ensemble_and_clean(method, syn, tmp_path, run_cli):
    out = tmp_path / f"{method}.safetensors"
    args = ["tune", syn["features"], syn["labels"], "-o", out, "--method", method, "--device", "cpu", "-q"]
    if method != "tip-adapter":  # training-free: it refuses a split (there is no training to split)
        args += ["--epochs", "2", "--n-ctx", "4", "--split", "ot"]
    code, stdout, stderr = run_cli(*args, "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["method"] == method
    assert (summary["split"] or {}).get("method") == (None if method == "tip-adapter" else "ot")
    meta = read_prompt(out).metadata
    assert meta["method"] == method and meta["features_sha256"] and meta["labels_sha256"]
    code, stdout, stderr = run_cli("eval", syn["features"], "-p", out, "-p", out, "--device", "cpu", "--json")
    assert code == 0, stderr
    results = tmp_path / "results"
    results.mkdir()
    code, _, stderr = run_cli(
        "eval", syn["features"], "-p", out, "--device", "cpu", "-o", results / "r.json", "-q"
    )
    assert code == 0, stderr
    code, stdout, stderr = run_cli("report", results, "-o", tmp_path / "report.md", "-q")
    assert code == 0 and method in (tmp_path / "report.md").read_text(), stderr
    code, _, stderr = run_cli(
        "clean", syn["features"], syn["labels"], "--prompt", out, "-o", tmp_path / "c.csv", "--device", "cpu"
    )
    assert code == 0, stderr


def test_tip_adapter_val_search_is_recorded(syn, tmp_path):
    out = tmp_path / "tip.st"
    summary = tune(
        syn["features"],
        syn["labels"],
        out,
        TuneOptions(method="tip-adapter", val_fraction=0.25),
        device="cpu",
    )
    meta = read_prompt(out).metadata
    assert meta["n_val"] == summary["tip_search"]["n_val"] == 12 and meta["n_train"] == 36
    assert meta["tip_alpha"] == summary["tip_search"]["alpha"] and meta["cache_size"] == 36
    assert meta["optimizer"] is None and summary["optimizer"] is None  # training-free: no optimiser ran


def test_cocoop_resume_gives_the_uninterrupted_result(syn, tmp_path):
    options = TuneOptions(method="cocoop", epochs=3, seed=1)
    tune(syn["features"], syn["labels"], tmp_path / "whole.st", options, device="cpu")
    out = tmp_path / "cut.st"

    def stop(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(syn["features"], syn["labels"], out, options, device="cpu", on_epoch=stop)
    assert partial_path(out).exists()
    tune(syn["features"], syn["labels"], out, options, device="cpu", resume=True)
    whole, cut = read_prompt(tmp_path / "whole.st").tensors, read_prompt(out).tensors
    assert set(whole) == set(cut) and all(torch.equal(whole[k], cut[k]) for k in whole)
    meta = read_prompt(out).metadata
    assert meta["n_ctx"] == 4 and meta["prompt_config"]["prompt.n_ctx"] == "4"  # the ctx_init's, as used


@pytest.mark.parametrize(
    "extra, where",
    [
        (["--method", "tip-adapter", "--epochs", "3"], "--epochs"),
        (["--method", "coop", "--val-fraction", "0.2"], "--val-fraction"),
        (["--method", "tip-adapter-f", "--val-fraction", "1.5"], "--val-fraction"),
        (["--method", "clip-adapter", "--adapter-ratio", "2"], "--adapter-ratio"),
        (["--method", "kgcoop", "--kg-lambda", "-1"], "--kg-lambda"),
        (["--method", "cocoop", "--csc"], "--csc"),
        (["--method", "cocoop", "--class-position", "front"], "--class-position"),
        (["--method", "tip-adapter", "--tip-beta", "nan"], "--tip-beta"),
    ],
)
def test_bad_options_are_refused_in_one_line(extra, where, syn, tmp_path, run_cli):
    code, _, stderr = run_cli("tune", syn["features"], syn["labels"], "-o", tmp_path / "x.st", *extra, "-q")
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and where in stderr
    assert not (tmp_path / "x.st").exists()


@pytest.mark.parametrize("method", ["cocoop", "clip-adapter", "tip-adapter-f"])
def test_gradstats_refuses_heads_without_class_weights(method, syn, tmp_path, run_cli):
    code, _, stderr = run_cli(
        "gradstats", syn["features"], syn["labels"], "--method", method, "-o", tmp_path / "g.csv"
    )
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "gradstats does not apply" in stderr


def test_cocoop_checks_its_prompt(tiny_model):
    learner = PromptLearner(tiny_model, CLASSNAMES, PromptConfig(method="coop", n_ctx=4, csc=True))
    from promptcli.models.cocoop import CoCoOpHead

    with pytest.raises(InputError, match="cocoop"):
        CoCoOpHead(learner, 1.0, tiny_model.embed_dim)


def test_gradstats_traces_kgcoop(syn, tmp_path, run_cli):
    out = tmp_path / "g.csv"
    args = ["gradstats", syn["features"], syn["labels"], "--method", "kgcoop", "-o", out, "--epochs", "1"]
    code, _, stderr = run_cli(*args, "--n-ctx", "4", "--device", "cpu", "-q")
    assert code == 0, stderr
    assert "kgcoop" in out.read_text()


def test_another_methods_option_is_reported_as_ignored():
    from promptcli.learning.method_options import check_method_options

    said: list[str] = []
    check_method_options(TuneOptions(method="coop", kg_lambda=2.0, tip_beta=3.0), said.append)
    assert len(said) == 2 and "--kg-lambda" in said[0] and "--tip-beta" in said[1]


@pytest.mark.parametrize(
    ("method", "options", "warning"),
    [
        ("linear-probe", {"n_ctx": 4}, "--n-ctx sets a random context"),
        ("coop", {"ctx_init": "a photo of a", "init_std": 0.5}, "--init-std sets a random context"),
        ("maple", {"n_ctx": 4}, "maple learns the paper's 2 context tokens"),
        ("coop", {"template": "x {}"}, "--template applies to cls-tuning"),
        ("cocoop", {"template": "x {}"}, "--template applies to"),
        ("clip-adapter", {"class_chunk": 2}, "--class-chunk applies to the class text pass"),
        (
            "coop",
            {"optimizer": "adamw", "momentum": 0.5},
            "--momentum applies to --optimizer sgd; ignored for adamw",
        ),
        ("coop", {"warmup_epochs": 0, "warmup_lr": 0.1}, "--warmup-lr applies with --warmup-epochs above 0"),
    ],
)
def test_options_the_method_does_not_read_are_reported_as_ignored(method, options, warning):
    from promptcli.learning.method_options import check_unused_options

    said: list[str] = []
    check_unused_options(TuneOptions(method=method, **options), said.append)
    assert len(said) == 1 and warning in said[0], said
    quiet: list[str] = []  # the same options where they are read: no warning
    check_unused_options(
        TuneOptions(method="kgcoop", ctx_init="", n_ctx=4, init_std=0.5, class_chunk=2), quiet.append
    )
    check_unused_options(
        TuneOptions(method="full-prompt", template="x {}", momentum=0.5, warmup_lr=0.1), quiet.append
    )
    assert quiet == []


def test_tip_adapter_refuses_training_options_its_file_would_record(syn, tmp_path, run_cli):
    """tip-adapter trains nothing: --loss gce or --split ot ran as plain tip-adapter but the prompt file recorded
    them (and report grouped it as a gce or ot run)."""
    for extra in (["--loss", "gce"], ["--split", "ot"], ["--lr", "5", "--batch-size", "3"]):
        out = tmp_path / "tip.st"
        code, _, stderr = run_cli("tune", syn["features"], syn["labels"], "-o", out, "--method", "tip-adapter",
                                  "--device", "cpu", "-q", *extra)  # fmt: skip
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert f"{extra[0]}: tip-adapter is training-free" in stderr and not out.exists()
    # a computation setting the method has no use for is not recorded as if it had been used
    out = tmp_path / "lp.st"
    code, _, stderr = run_cli("tune", syn["features"], syn["labels"], "-o", out, "--method", "linear-probe",
                              "--epochs", "1", "--weight-decay", "0", "--class-chunk", "2", "--device", "cpu")  # fmt: skip
    assert code == 0 and "--class-chunk applies to" in stderr, stderr
    assert "class_chunk" not in read_prompt(out).metadata


def test_cocoop_on_a_hugging_face_tower_matches_the_plain_pass(tiny_hf_model):  # noqa: F811
    """Non-causal towers take the general path (each row cut to its needed tokens): same features."""
    from promptcli.models.cocoop import CoCoOpHead

    learner = PromptLearner(tiny_hf_model, HF_NAMES, PromptConfig(method="coop", ctx_init="a photo of a"))
    head = CoCoOpHead(learner, 1.0, tiny_hf_model.embed_dim, generator=torch.Generator().manual_seed(0))
    assert not head.shared
    shift = 0.3 * torch.randn(3, learner.ctx.shape[-1], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        head.text_features(shift), head.text_features_plain(shift), atol=2e-5, rtol=1e-5
    )
    zero = head.text_features(torch.zeros(2, learner.ctx.shape[-1]))
    torch.testing.assert_close(zero[1], learner().detach(), atol=2e-5, rtol=1e-5)


def test_methods_take_their_papers_defaults_unless_given():
    def epochs(method: str) -> int:
        return TuneOptions(method=method).resolved().epochs

    assert epochs("coop") == 50 and epochs("cocoop") == 10 and epochs("tip-adapter") == 0
    tip_f = TuneOptions(method="tip-adapter-f")
    optim = tip_f.optim_config(5e-4)
    assert (optim.epochs, optim.lr, optim.optimizer) == (20, 0.001, "adamw")
    given = TuneOptions(method="tip-adapter-f", epochs=3, lr=0.01, optimizer="sgd").optim_config(0.0)
    assert (given.epochs, given.lr, given.optimizer) == (3, 0.01, "sgd")
    assert TuneOptions(method="coop").optim_config(0.0).optimizer == "sgd"


def test_another_method_through_replace_takes_its_own_defaults():
    base = TuneOptions(seed=1, epochs=None)
    cocoop = replace(base, method="cocoop").resolved()
    assert (cocoop.epochs, cocoop.batch_size) == (10, 1)  # not coop's 50 and 32, filled when built
    assert replace(base, method="tip-adapter").resolved().epochs == 0
    assert replace(TuneOptions(epochs=3), method="cocoop").resolved().epochs == 3  # given: kept


def test_methods_default_to_their_papers_batch_size_unless_given():
    def batch(method: str) -> int:
        return TuneOptions(method=method).resolved().batch_size

    assert batch("cocoop") == 1  # CoCoOp: one image per step
    assert batch("maple") == batch("vpt") == 4
    assert batch("coop") == batch("kgcoop") == 32
    assert TuneOptions(method="cocoop", batch_size=8).optim_config(0.0).batch_size == 8
