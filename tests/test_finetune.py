"""tune --method finetune: the image tower trains on images; extract --adapter and eval use the result."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import make_image_folder
from promptcli.errors import InputError
from promptcli.io.features import read_features
from promptcli.io.fileio import sha256_file
from promptcli.io.prompt_files import read_prompt
from promptcli.learning.finetune import FinetuneOptions, finetune
from promptcli.learning.options import TuneOptions
from promptcli.models.image_adapter import trainable_names, wise_interpolate, wise_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def labels_csv(flipped_labels) -> Path:
    return flipped_labels


def _ft(features, labels, out, ft: dict | None = None, **options):
    opts = TuneOptions(**{"method": "finetune", "epochs": 2, "batch_size": 8, "seed": 0, **options})
    return finetune(
        features, labels, out, opts, FinetuneOptions(**{"workers": 0, **(ft or {})}), device="cpu", force=True
    )


def _extract(run_cli, images, out, model_args, *extra) -> Path:
    code, _, err = run_cli(
        "extract", images, "-o", out, *model_args, "--dtype", "float32", "-j", "0", "-q", *extra
    )
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def zero_epochs(tmp_path_factory, tiny_features, labels_csv) -> Path:
    out = tmp_path_factory.mktemp("ft0") / "ft0.safetensors"
    _ft(tiny_features, labels_csv, out, ft={"wise_alphas": [0.0]}, epochs=0)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_features, labels_csv) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ft") / "ft.safetensors"
    summary = _ft(
        tiny_features,
        labels_csv,
        out,
        ft={"wise_alphas": [0.0, 0.5, 1.0]},
        epochs=3,
        optimizer="adamw",
        lr=1e-3,
    )
    return out, summary


def test_training_fits_the_images_and_writes_only_tower_tensors_and_head(trained, tiny_model_files):
    out, summary = trained
    assert summary["metrics"]["train_accuracy"] >= 0.8  # 2 of 18 labels are wrong
    prompt = read_prompt(out)
    assert prompt.method == "finetune" and set(prompt.tensors) >= {"weight", "bias"}
    tower = sorted(k for k in prompt.tensors if k.startswith("visual."))
    assert tower == prompt.metadata["finetune"]["tensors"] and tower
    assert all(not k.startswith(("transformer.", "token_embedding", "logit_scale")) for k in prompt.tensors)
    from safetensors.torch import load_file

    base = load_file(str(tiny_model_files["weights"]))
    assert all(prompt.tensors[k].shape == base[k].shape for k in tower)
    assert any(not torch.equal(prompt.tensors[k], base[k]) for k in tower)  # it trained
    meta = prompt.metadata
    assert meta["loss"] == "ce" and meta["seed"] == 0 and meta["n_train"] == 18 and meta["command"]
    assert meta["runtime"]["device"] == "cpu" and meta["runtime"]["autocast"] is False
    assert meta["features_sha256"] and meta["labels_sha256"] and meta["finetune"]["train_layers"] == "all"


def test_zero_epochs_give_the_zero_shot_predictions(
    zero_epochs, tiny_features, image_folder, run_cli, cli_model_args, tmp_path
):
    from promptcli.analysis.evaluation import evaluate

    feats = _extract(run_cli, image_folder, tmp_path / "ft0.h5", cli_model_args, "--adapter", zero_epochs)
    tuned = evaluate(feats, [zero_epochs], device="cpu", keep_probs=True)
    zero = evaluate(tiny_features, zero_shot=True, device="cpu", keep_probs=True)
    assert np.array_equal(tuned.probs.argmax(1), zero.probs.argmax(1))
    np.testing.assert_allclose(tuned.probs, zero.probs, rtol=1e-4, atol=1e-6)
    optimizer = read_prompt(zero_epochs).metadata["optimizer"]
    assert optimizer["optimizer"] == "adamw" and optimizer["lr"] == 1e-5  # finetune's defaults, not CoOp's
    assert read_features(feats).attrs["adapter_sha256"] == sha256_file(zero_epochs)
    # the same images through the tuned tower: other features, one test set for report
    assert tuned.summary["features_sha256"] != zero.summary["features_sha256"]
    assert (
        tuned.summary["test_set"] == zero.summary["test_set"] and tuned.summary["test_set"]["images_digest"]
    )
    member = tuned.summary["prompts"][0]
    assert (member["train_layers"], member["lp_ft"], member["wise_alpha"]) == ("all", False, 1.0)


def test_lr_zero_leaves_adapter_features_equal_to_the_frozen_extraction(
    tmp_path, tiny_features, labels_csv, image_folder, run_cli, cli_model_args
):
    out = tmp_path / "lr0.safetensors"
    _ft(tiny_features, labels_csv, out, epochs=2, lr=0.0, warmup_epochs=0)
    frozen = _extract(run_cli, image_folder, tmp_path / "frozen.h5", cli_model_args)
    tuned = _extract(run_cli, image_folder, tmp_path / "lr0.h5", cli_model_args, "--adapter", out)
    assert np.array_equal(read_features(frozen).features, read_features(tuned).features)


def test_eval_refuses_features_not_made_with_the_adapter(
    trained, zero_epochs, tiny_features, run_cli, tmp_path
):
    out, _ = trained
    code, _, err = run_cli("eval", tiny_features, "--prompt", out)
    assert code == 2 and "--adapter" in err and len(err.strip().splitlines()) == 1
    wrong = tmp_path / "other.h5"
    shutil.copy(tiny_features, wrong)
    with h5py.File(wrong, "a") as f:
        f.attrs["adapter_sha256"] = "0" * 64
        del f.attrs["index_sha256"]  # an intended edit (docs/formats.md)
    code, _, err = run_cli("eval", wrong, "--prompt", out)
    assert code == 2 and "not extracted through this fine-tuned" in err


def test_wise_alpha_ends_are_zero_shot_and_fine_tuned(trained, zero_epochs):
    out, summary = trained
    tuned, zero = read_prompt(out).tensors, read_prompt(zero_epochs).tensors
    w0, wh, w1 = (read_prompt(wise_path(out, a)).tensors for a in (0.0, 0.5, 1.0))
    assert set(w0) == set(tuned) == set(w1) == set(zero)
    assert all(torch.equal(w0[k], zero[k]) for k in zero)  # alpha 0: pretrained tower + zero-shot head
    assert all(torch.equal(w1[k], tuned[k]) for k in tuned)
    assert all(torch.allclose(wh[k], 0.5 * (zero[k] + tuned[k])) for k in tuned)
    assert read_prompt(wise_path(out, 0.5)).metadata["wise"]["alpha"] == 0.5
    assert summary["wise_outputs"] == {f"{a:g}": str(wise_path(out, a)) for a in (0.0, 0.5, 1.0)}
    assert wise_path("ft.safetensors", 0.25).name == "ft.wise0.25.safetensors"
    with pytest.raises(ValueError):
        wise_interpolate({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 0.5)


def test_interrupted_and_resumed_training_ends_bit_exact(tmp_path, tiny_features, labels_csv):
    opts = {"epochs": 3, "optimizer": "sgd", "lr": 0.01, "split": "ot"}
    full = tmp_path / "full.safetensors"
    _ft(tiny_features, labels_csv, full, **opts)
    cut = tmp_path / "cut.safetensors"

    def stop(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    options = TuneOptions(method="finetune", batch_size=8, seed=0, **opts)
    with pytest.raises(KeyboardInterrupt):
        finetune(
            tiny_features, labels_csv, cut, options, FinetuneOptions(workers=0), device="cpu",
            on_epoch=stop, log_path=tmp_path / "log.jsonl",
        )  # fmt: skip
    assert not cut.exists() and Path(f"{cut}.partial").exists()
    with pytest.raises(InputError, match="--resume"):
        finetune(tiny_features, labels_csv, cut, options, FinetuneOptions(workers=0), device="cpu")
    summary = finetune(
        tiny_features, labels_csv, cut, options, FinetuneOptions(workers=0), device="cpu", resume=True,
        log_path=tmp_path / "log.jsonl",
    )  # fmt: skip
    assert summary["resumed_from_epoch"] == 2 and not Path(f"{cut}.partial").exists()
    a, b = read_prompt(full).tensors, read_prompt(cut).tensors
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(r["run"]["method"] == "finetune" for r in rows)
    assert all("n_judged_clean" in r and r["clean_precision"] is not None for r in rows)
    # a requeued job reruns its finished step: nothing to do; another run's output is refused
    before = cut.read_bytes()
    again = finetune(
        tiny_features, labels_csv, cut, options, FinetuneOptions(workers=0), device="cpu", resume=True
    )
    assert again["already_complete"] and again["metrics"] == summary["metrics"] and cut.read_bytes() == before
    with pytest.raises(InputError, match="written by another run \\(it differs in seed\\)"):
        finetune(
            tiny_features, labels_csv, cut, replace(options, seed=1), FinetuneOptions(workers=0), device="cpu",
            resume=True,
        )  # fmt: skip


def test_train_layers_last_k_trains_the_last_blocks_and_after(
    tiny_model, tmp_path, tiny_features, labels_csv
):
    visual = tiny_model.model.visual
    names, info = trainable_names(visual, "last-1")
    assert info == {"train_layers": "last-1", "tower": "vit", "n_blocks": 2, "n_tensors": len(names)}
    assert any(n.startswith("transformer.resblocks.1.") for n in names)
    assert not any(n.startswith(("transformer.resblocks.0.", "conv1", "positional_embedding")) for n in names)
    assert {"proj", "ln_post.weight"} <= set(names)
    last0, _ = trainable_names(visual, "last-0")
    assert set(last0) == {"proj", "ln_post.weight", "ln_post.bias"}
    out = tmp_path / "last1.safetensors"
    _ft(tiny_features, labels_csv, out, ft={"train_layers": "last-1"}, epochs=1)
    assert sorted(k[len("visual.") :] for k in read_prompt(out).tensors if k.startswith("visual.")) == sorted(
        names
    )


def test_lp_ft_starts_fine_tuning_from_the_linear_probe(tmp_path, tiny_features, labels_csv, zero_epochs):
    out = tmp_path / "lpft.safetensors"
    summary = _ft(
        tiny_features, labels_csv, out, ft={"lp_ft": True, "lp_epochs": 5}, epochs=0, weight_decay=0.1
    )
    meta = read_prompt(out).metadata
    probe, tower = meta["lp_ft"]["optimizer"], meta["optimizer"]
    assert probe["epochs"] == 5 and probe["lr"] == 1.0
    # the probe stage is tune's SGD loop with its own weight decay, though the tower trains with AdamW at 0.1
    assert probe["optimizer"] == "sgd" and probe["weight_decay"] == 5e-4
    assert tower["optimizer"] == "adamw" and tower["lr"] == 1e-5 and tower["weight_decay"] == 0.1
    assert summary["lp_ft"]["metrics"]["epochs"] == 5
    assert not torch.equal(read_prompt(out).tensors["weight"], read_prompt(zero_epochs).tensors["weight"])


def test_cli_run_log_and_bad_inputs_get_one_line_errors(
    tmp_path, tiny_features, labels_csv, image_folder, run_cli, tiny_model_files
):
    base = [
        tiny_features,
        labels_csv,
        "--method",
        "finetune",
        "--epochs",
        "1",
        "--warmup-epochs",  # else the warm-up covering the one epoch is warned about
        "0",
        "-b",
        "8",
        "-j",
        "0",
        "--device",
        "cpu",
    ]
    out = tmp_path / "cli.safetensors"
    code, stdout, err = run_cli("tune", *base, "-o", out, "--log", tmp_path / "l.jsonl", "--json", "-q")
    assert code == 0, err
    assert json.loads(stdout)["method"] == "finetune" and out.exists()
    code, _, err = run_cli("report", tmp_path / "l.jsonl", "-q")
    assert code == 0, err

    def one_line_error(*args: str, where: str) -> None:
        code, _, err = run_cli("tune", *base, "-o", tmp_path / "x.safetensors", *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and where in lines[0], err

    one_line_error("--train-layers", "top", where="--train-layers")
    one_line_error("--train-layers", "last-9", where="--train-layers")
    one_line_error("--precision", "bf16", where="--precision")
    one_line_error("--wise-alpha", "1.5", where="--wise-alpha")
    one_line_error("--lr", "-1", where="--lr")
    one_line_error("--images", tmp_path / "nowhere", where="--images")
    # moved images: missing files are named, with the way out
    moved = tmp_path / "moved"
    shutil.copytree(image_folder, moved)
    (moved / "blue_sky" / "img002.png").unlink()
    one_line_error("--images", moved, where="img002.png")
    code, _, err = run_cli(
        "tune", *base, "-o", tmp_path / "skip.safetensors", "--images", moved, "--skip-bad", "-q"
    )
    assert code == 0, err
    assert read_prompt(tmp_path / "skip.safetensors").metadata["skipped_images"] == [
        {"path": "blue_sky/img002.png", "error": "image not found"}
    ]
    (moved / "blue_sky" / "img003.png").write_bytes(b"not an image")
    code, _, err = run_cli("tune", *base, "-o", tmp_path / "skip.safetensors", "--images", moved, "--skip-bad",
                           "--force", "-q")  # fmt: skip
    assert code == 0, err
    skipped = read_prompt(tmp_path / "skip.safetensors").metadata["skipped_images"]
    assert [(s["path"], s["error"]) for s in skipped] == [
        ("blue_sky/img002.png", "image not found"), ("blue_sky/img003.png", "not a readable image")
    ]  # fmt: skip
    shutil.copy(image_folder / "blue_sky" / "img002.png", moved / "blue_sky" / "img002.png")
    one_line_error("--images", moved, where="img003.png")
    # images that are not the extracted ones
    other = make_image_folder(tmp_path / "other", seed=7)
    for f in other.rglob("*.png"):  # same names, other colours
        f.write_bytes((other / "green_grass" / "img000.png").read_bytes())
    one_line_error("--images", other, where="not the image that was extracted")
    # a fine-tuned tower's features are not training input; an adapter needs its base model
    code, _, err = run_cli("extract", image_folder, "-o", tmp_path / "a.h5", "--model", "tiny-clip",
                           "--model-config", tiny_model_files["config"], "--random-weights", "--seed", "3",
                           "--device", "cpu", "-j", "0", "--adapter", out)  # fmt: skip
    assert code == 2 and "fine-tuned from" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "ft", "flags"),
    [("finetune", {}, []), ("maple", {"maple_depth": 2}, ["--maple-depth", "2"])],
)
def test_torchrun_two_processes_equal_one_and_resume_a_one_process_partial(
    tmp_path, tiny_features, labels_csv, method, ft, flags
):
    """2 gloo ranks, same global batch: the same tensors as one process (float tolerance); a partial
    left by one process is completed by two. (maple: the engine's image-prompt path, with the text
    tower in every step.)"""
    import os
    import subprocess
    import sys

    opts = {"epochs": 2, "optimizer": "sgd", "lr": 0.01, "split": "ot", "batch_size": 6}
    one = tmp_path / "one.safetensors"
    _ft(tiny_features, labels_csv, one, ft, method=method, **opts)
    cut = tmp_path / "two.safetensors"

    def stop(row):
        raise KeyboardInterrupt

    options = TuneOptions(method=method, seed=0, **opts)
    with pytest.raises(KeyboardInterrupt):
        finetune(
            tiny_features,
            labels_csv,
            cut,
            options,
            FinetuneOptions(workers=0, **ft),
            device="cpu",
            on_epoch=stop,
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROMPTCLI_DIST_TIMEOUT": "120"}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "promptcli",
    ]
    cmd += [
        "tune",
        str(tiny_features),
        str(labels_csv),
        "-o",
        str(cut),
        "--method",
        method,
        "--epochs",
        "2",
        *flags,
    ]
    cmd += [
        "-b",
        "6",
        "--optimizer",
        "sgd",
        "--lr",
        "0.01",
        "--split",
        "ot",
        "-j",
        "0",
        "--device",
        "cpu",
        "-q",
    ]
    log = tmp_path / "two.jsonl"
    done = subprocess.run(
        [*cmd, "--resume", "--train-log", str(log)], capture_output=True, text=True, timeout=240, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]
    a, b = read_prompt(one).tensors, read_prompt(cut).tensors
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert read_prompt(cut).metadata[method]["world_size"] == 2


@pytest.mark.parametrize(
    ("vision_cfg", "kind", "n_blocks", "after"),
    [
        (
            {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False, "timm_pool": "avg",
             "timm_proj": "linear", "image_size": 32},
            "timm", 7, {"head.proj.weight"},
        ),
        ({"layers": [1, 1, 1, 1], "width": 8, "image_size": 64, "head_width": 8}, "resnet", 4, {"attnpool.c_proj.weight"}),
    ],
)  # fmt: skip
def test_train_layers_finds_the_blocks_of_timm_and_resnet_towers(vision_cfg, kind, n_blocks, after):
    import open_clip

    from promptcli.models.image_adapter import tower_groups

    cfg = {"embed_dim": 16, "vision_cfg": vision_cfg, "text_cfg": {"width": 16, "heads": 2, "layers": 1}}
    visual = open_clip.CLIP(**cfg).visual
    groups = tower_groups(visual)
    assert groups.kind == kind and len(groups.blocks) == n_blocks
    everything = groups.pre + [n for b in groups.blocks for n in b] + groups.post
    assert sorted(everything) == sorted(n for n, _ in visual.named_parameters())  # a partition
    last0, _ = trainable_names(visual, "last-0")
    assert set(last0) == set(groups.post) and after <= set(last0)
    last1, info = trainable_names(visual, "last-1")
    assert set(last1) == set(groups.blocks[-1]) | set(groups.post) and info["tower"] == kind
    with pytest.raises(InputError, match="--train-layers"):
        trainable_names(visual, f"last-{n_blocks + 1}")


def test_loader_workers_do_not_change_the_result(tmp_path, tiny_features, labels_csv):
    """Views are seeded by (seed, epoch, row): decoding in 2 worker processes trains the same tensors."""
    a, b = tmp_path / "w0.safetensors", tmp_path / "w2.safetensors"
    _ft(tiny_features, labels_csv, a, ft={"workers": 0}, epochs=1, lr=0.01, warmup_epochs=0)
    _ft(tiny_features, labels_csv, b, ft={"workers": 2}, epochs=1, lr=0.01, warmup_epochs=0)
    ta, tb = read_prompt(a).tensors, read_prompt(b).tensors
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_relative_source_is_found_beside_the_features_file(tmp_path, monkeypatch):
    from promptcli.io.image_dataset import image_files

    (tmp_path / "data" / "imgs" / "cat").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    attrs = {"source": "imgs", "source_kind": "folder"}
    files = image_files(attrs, ["cat/1.png"], tmp_path / "data" / "train.h5", None)
    assert files == [tmp_path / "data" / "imgs" / "cat" / "1.png"]


def test_outputs_may_not_be_inputs_or_each_other(tmp_path, tiny_features, labels_csv, run_cli):
    labels = tmp_path / "labels.csv"
    shutil.copy(labels_csv, labels)
    before = labels.read_bytes()
    base = [
        "tune",
        tiny_features,
        labels,
        "--method",
        "finetune",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--force",
    ]
    for args, message in (
        (["-o", labels], "output -o is the input LABELS"),
        (["-o", tmp_path / "p.safetensors", "--log", labels], "output --log is the input LABELS"),
        (
            ["-o", tmp_path / "p.safetensors", "--log", tmp_path / "p.safetensors"],
            "-o and --log name the same file",
        ),
    ):
        code, _, err = run_cli(*base, *args)
        assert code == 2 and message in err, err
    assert labels.read_bytes() == before and not (tmp_path / "p.safetensors").exists()


def test_finetune_defaults_resolve_in_the_python_api_as_in_the_cli():
    """AdamW at 1e-5 by default, SGD at 1e-4: the rates the tower needs, not CoOp's 0.002."""
    default = TuneOptions(method="finetune").optim_config()
    sgd = TuneOptions(method="finetune", optimizer="sgd").optim_config()
    assert (default.optimizer, default.lr) == ("adamw", 1e-5) and (sgd.optimizer, sgd.lr) == ("sgd", 1e-4)
    assert TuneOptions(method="finetune", lr=3e-5).optim_config().lr == 3e-5


def test_a_run_started_with_the_old_sgd_default_is_told_how_to_resume(tmp_path, tiny_features, labels_csv):
    """Runs interrupted before finetune's default became AdamW trained with SGD at 1e-4: resuming them with the same
    command line names the changed default instead of "other inputs or options"."""
    cut = tmp_path / "cut.safetensors"

    def stop(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    def run(optimizer, **kwargs):
        options = TuneOptions(method="finetune", epochs=2, batch_size=8, seed=0, optimizer=optimizer)
        return finetune(
            tiny_features, labels_csv, cut, options, FinetuneOptions(workers=0), device="cpu", **kwargs
        )

    with pytest.raises(KeyboardInterrupt):
        run("sgd", on_epoch=stop)  # what the old default resolved to: SGD, lr 1e-4
    with pytest.raises(InputError, match="trained with SGD.*--optimizer sgd"):
        run(None, resume=True)
    assert run("sgd", resume=True)["resumed_from_epoch"] == 1


@pytest.mark.parametrize("method", ["finetune", "vpt"])
def test_image_methods_get_the_option_checks_of_every_tune_method(tmp_path, method):
    """finetune, vpt and maple once skipped tune's shared checks: a negative seed, --lr 1e308 and --val-fraction
    ran, and --kg-lambda, --q with mae or --noisy-loss without --split were ignored without a word."""

    def run(**options):
        said: list[str] = []
        opts = TuneOptions(**{"method": method, "epochs": 2, **options})
        with pytest.raises(InputError) as refused:  # every case stops before reading a file
            finetune(tmp_path / "none.h5", tmp_path / "none.csv", tmp_path / "o.safetensors", opts,
                     FinetuneOptions(workers=0), device="cpu", warn=said.append)  # fmt: skip
        return refused.value, said

    for options, where in (
        ({"seed": -5}, "--seed"),
        ({"lr": 1e308}, "--lr"),
        ({"val_fraction": 0.5}, "--val-fraction"),
    ):
        error, said = run(**options)
        assert error.where == where and said == [], (options, error)
    for options, warning in (
        ({"kg_lambda": 3.0}, f"--kg-lambda applies to kgcoop; ignored for {method}"),
        ({"loss": "mae", "q": 0.3}, "--q applies to --loss gce; ignored for mae"),
        ({"noisy_loss": "none"}, "--noisy-loss and --ot-epsilon apply with --split ot; ignored"),
        ({"epochs": 1}, "the warm-up (--warmup-epochs 1) covers all 1 epochs"),
    ):
        error, said = run(**options)
        assert error.where == str(tmp_path / "none.h5") or "none" in str(error), error  # the missing file
        assert any(warning in s for s in said), (options, said)


@pytest.mark.parametrize(
    ("method", "lp_ft"), [("finetune", False), ("finetune", True), ("vpt", False), ("maple", False)]
)
def test_no_views_is_reported_where_no_cached_views_are_read(tmp_path, method, lp_ft):
    """--no-views was ignored without a word by vpt, maple and finetune without --lp-ft: they train on images,
    and only LP-FT's linear probe reads the cached views."""
    said: list[str] = []
    opts = TuneOptions(method=method, epochs=2, use_views=False)
    with pytest.raises(InputError):  # stops at the missing features file
        finetune(tmp_path / "none.h5", tmp_path / "none.csv", tmp_path / "o.safetensors", opts,
                 FinetuneOptions(workers=0, lp_ft=lp_ft), device="cpu", warn=said.append)  # fmt: skip
    warned = [s for s in said if "--no-views" in s]
    if lp_ft:
        assert warned == [], said
    else:
        assert len(warned) == 1 and f"ignored for {method}" in warned[0], said
