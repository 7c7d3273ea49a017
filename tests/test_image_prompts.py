"""tune --method vpt | maple: prompts in a frozen ViT (and, for MaPLe, the text tower), trained on images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_prompt_learner import tiny_hf_model  # noqa: F401  (the fixture)

from conftest import CLASSES
from promptcli.errors import InputError
from promptcli.io.features import read_features
from promptcli.io.fileio import sha256_file
from promptcli.io.prompt_files import read_prompt
from promptcli.learning.finetune import FinetuneOptions, finetune
from promptcli.learning.options import TuneOptions
from promptcli.models.image_prompts import (
    VISION_PROMPTS,
    MaplePrompts,
    PromptedViT,
    VptPrompts,
    check_vit,
    prompted_forward,
)
from promptcli.models.zeroshot import class_text_embeddings, logit_scale

pytestmark = pytest.mark.usefixtures("one_thread")
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def labels_csv(flipped_labels) -> Path:
    return flipped_labels


def _train(features, labels, out, method: str, ft: dict | None = None, rows: list | None = None, **options):
    opts = TuneOptions(**{"method": method, "epochs": 2, "batch_size": 9, "seed": 0, **options})
    return finetune(
        features,
        labels,
        out,
        opts,
        FinetuneOptions(**{"workers": 0, "maple_depth": 2, **(ft or {})}),
        device="cpu",
        force=True,
        on_epoch=None if rows is None else rows.append,
    )


def _pixels(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _block_inputs(blocks) -> tuple[list[torch.Tensor], list]:
    """Capture the input of every block (batch first)."""
    seen: list[torch.Tensor] = []
    handles = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach())) for b in blocks]
    return seen, handles


# ----------------------------------------------------------------------------- identity settings


@torch.no_grad()
def test_no_prompt_tokens_give_the_native_tower_exactly(tiny_model):
    visual = tiny_model.model.visual
    x = _pixels()
    native = visual(x)
    width = visual.conv1.out_channels
    assert torch.equal(prompted_forward(visual, x, []), native)  # depth zero
    assert torch.equal(prompted_forward(visual, x, [torch.zeros(0, width)] * 2), native)  # zero tokens
    tokens = VptPrompts(visual, "deep", 0)
    assert torch.equal(PromptedViT(visual, tokens)(x), native)
    prompted = PromptedViT(visual, VptPrompts(visual, "deep", 4, torch.Generator().manual_seed(0)))
    assert not torch.allclose(prompted(x), native)
    with prompted.disabled():
        assert torch.equal(prompted(x), native)


@torch.no_grad()
def test_vpt_places_its_tokens_as_the_paper(tiny_model):
    """Shallow: inserted after the class token before ln_pre, carried on; deep: replaced before each block;
    initialised uniform(-v, v), v = sqrt(6 / (3 * patch^2 + width))."""
    visual = tiny_model.model.visual
    x = _pixels(1)
    for depth in ("shallow", "deep"):
        vpt = VptPrompts(visual, depth, 3, torch.Generator().manual_seed(1))
        assert vpt.tokens.shape == ((1 if depth == "shallow" else 2), 3, 64)
        v = (6.0 / (3 * 8 * 8 + 64)) ** 0.5
        assert vpt.init_bound == pytest.approx(v) and float(vpt.tokens.abs().max()) <= v
        seen, handles = _block_inputs(visual.transformer.resblocks)
        PromptedViT(visual, vpt)(x)
        for h in handles:
            h.remove()
        assert seen[0].shape[1] == 1 + 3 + 16  # class token, prompts, 4x4 patches
        torch.testing.assert_close(seen[0][:, 1:4], visual.ln_pre(vpt.tokens[0]).expand(3, -1, -1))
        if depth == "deep":
            assert torch.equal(seen[1][:, 1:4], vpt.tokens[1].expand(3, -1, -1))
        else:  # carried through block 0, so no longer the tokens (and differs per image)
            assert not torch.allclose(seen[1][:, 1:4], seen[0][:, 1:4])


def test_vpt_zero_tokens_zero_epochs_extract_and_eval_as_zero_shot(
    tmp_path, tiny_features, labels_csv, image_folder, run_cli, cli_model_args
):
    from promptcli.analysis.evaluation import evaluate

    out = tmp_path / "vpt0.safetensors"
    _train(tiny_features, labels_csv, out, "vpt", ft={"vpt_tokens": 0}, epochs=0)
    feats = tmp_path / "vpt0.h5"
    args = ["extract", image_folder, "-o", feats, *cli_model_args, "--dtype", "float32", "-j", "0", "-q"]
    code, _, err = run_cli(*args, "--adapter", out)
    assert code == 0, err
    frozen = tmp_path / "frozen.h5"
    code, _, err = run_cli(*args[:3], frozen, *args[4:])
    assert code == 0, err
    assert np.array_equal(read_features(feats).features, read_features(frozen).features)  # bit for bit
    tuned = evaluate(feats, [out], device="cpu", keep_probs=True)
    zero = evaluate(tiny_features, zero_shot=True, device="cpu", keep_probs=True)
    np.testing.assert_allclose(tuned.probs, zero.probs, rtol=1e-5, atol=1e-7)
    assert read_features(feats).attrs["adapter_sha256"] == sha256_file(out)


# ----------------------------------------------------------------------------- MaPLe's equations


@pytest.mark.parametrize("depth", [1, 2])
def test_maple_prompts_follow_the_papers_equations(tiny_model, depth):
    visual = tiny_model.model.visual
    maple = MaplePrompts(
        tiny_model, visual, list(CLASSES), TEMPLATE, depth, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        for p in maple.text[1:]:
            p.normal_(0, 0.5)
    n, s = maple.n_ctx, maple.start
    assert n == 2 and s == 1 and len(maple.text) == depth and maple.ctx_init == "a photo"
    # P_0 starts from the embeddings of "a photo", the first words of "a photo of a {}."
    ids = tiny_model.tokenizer([TEMPLATE.format(c) for c in CLASSES])
    words = tiny_model.model.token_embedding(ids[0, 1:3])
    assert torch.equal(maple.text[0].detach(), words)
    # vision prompt of layer i: F_i(P_i) = W_i P_i + b_i
    vision = maple.vision_prompts()
    assert len(vision) == depth
    for i, f in enumerate(maple.coupling):
        assert f.in_features == 64 and f.out_features == visual.conv1.out_channels
        torch.testing.assert_close(vision[i], maple.text[i] @ f.weight.t() + f.bias)
    text_blocks = tiny_model.model.transformer.resblocks
    with torch.no_grad():
        text_seen, handles = _block_inputs(text_blocks)
        outputs: list[torch.Tensor] = []
        handles.append(text_blocks[0].register_forward_hook(lambda _m, _a, out: outputs.append(out.detach())))
        feats = maple.text_features()
        for h in handles:
            h.remove()
    pos = tiny_model.model.positional_embedding
    torch.testing.assert_close(text_seen[0][:, s : s + n], (maple.text[0] + pos[s : s + n]).expand(3, -1, -1))
    if depth == 2:  # layer 1 < J: the context positions hold P_1
        assert torch.equal(text_seen[1][:, s : s + n], maple.text[1].detach().expand(3, -1, -1))
    else:  # layer 1 >= J: block 0's output carries on
        assert torch.equal(text_seen[1], outputs[0])
    if depth == 1:  # P_0 as initialised: the zero-shot class embeddings
        zero = class_text_embeddings(tiny_model, list(CLASSES), [TEMPLATE])
        torch.testing.assert_close(feats, zero, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        vis_seen, handles = _block_inputs(visual.transformer.resblocks)
        PromptedViT(visual, maple)(_pixels(2))
        for h in handles:
            h.remove()
    torch.testing.assert_close(vis_seen[0][:, 1 : 1 + n], visual.ln_pre(vision[0]).detach().expand(3, -1, -1))
    if depth == 2:
        assert torch.equal(vis_seen[1][:, 1 : 1 + n], vision[1].detach().expand(3, -1, -1))
    else:
        assert not torch.allclose(
            vis_seen[1][:, 1 : 1 + n], visual.ln_pre(vision[0]).detach().expand(3, -1, -1)
        )


# ----------------------------------------------------------------------------- training and files


@pytest.fixture(scope="module")
def vpt_run(tmp_path_factory, tiny_features, labels_csv) -> tuple[Path, dict, list]:
    out = tmp_path_factory.mktemp("vpt") / "vpt.safetensors"
    rows: list = []
    summary = _train(tiny_features, labels_csv, out, "vpt", rows=rows, epochs=4, lr=0.5, warmup_epochs=0)
    return out, summary, rows


@pytest.fixture(scope="module")
def maple_run(tmp_path_factory, tiny_features, labels_csv) -> tuple[Path, dict, list]:
    out = tmp_path_factory.mktemp("maple") / "maple.safetensors"
    rows: list = []
    summary = _train(tiny_features, labels_csv, out, "maple", rows=rows, epochs=4, lr=0.5, warmup_epochs=0)
    return out, summary, rows


def test_vpt_trains_only_its_tokens_under_the_zero_shot_head(vpt_run, tiny_model, tiny_features):
    out, summary, rows = vpt_run
    names = list(read_features(tiny_features).classnames)
    assert rows[-1]["loss"] < rows[0]["loss"]
    prompt = read_prompt(out)
    assert prompt.method == "vpt" and set(prompt.tensors) == {VISION_PROMPTS, "weight", "bias"}
    assert prompt.tensors[VISION_PROMPTS].shape == (2, 8, 64)  # deep: one set per block, 8 tokens
    zero = logit_scale(tiny_model) * class_text_embeddings(tiny_model, names, [TEMPLATE])
    assert torch.equal(prompt.tensors["weight"], zero.float())  # the frozen zero-shot classifier
    assert not prompt.tensors["bias"].any()
    meta = prompt.metadata
    assert meta["vpt"]["depth"] == "deep" and meta["vpt"]["tokens"] == 8 and meta["optimizer"]["lr"] == 0.5
    assert meta["features_sha256"] and meta["labels_sha256"] and meta["command"] and meta["seed"] == 0
    assert summary["trained"].startswith("deep VPT prompts")
    assert meta["method_params"] == {"vpt_depth": "deep", "vpt_tokens": 8}


def test_maple_trains_its_prompts_and_writes_the_final_classifier(maple_run, tiny_model, tiny_features):
    out, summary, rows = maple_run
    names = list(read_features(tiny_features).classnames)
    assert rows[-1]["loss"] < rows[0]["loss"]
    prompt = read_prompt(out)
    keys = {"maple.text.0", "maple.text.1", VISION_PROMPTS, "weight", "bias"}
    keys |= {f"maple.coupling.{i}.{w}" for i in (0, 1) for w in ("weight", "bias")}
    assert prompt.method == "maple" and set(prompt.tensors) == keys
    t = prompt.tensors
    for i in (0, 1):  # the stored vision prompts are the couplings of the stored text prompts
        torch.testing.assert_close(
            t[VISION_PROMPTS][i],
            t[f"maple.text.{i}"] @ t[f"maple.coupling.{i}.weight"].t() + t[f"maple.coupling.{i}.bias"],
        )
    init = MaplePrompts(tiny_model, tiny_model.model.visual, names, TEMPLATE, 2)
    assert not torch.equal(t["maple.text.0"], init.text[0].detach())  # it trained
    init.load_file_tensors(t, out)  # the final classifier is the text features of the stored prompts
    with torch.no_grad():
        weight = logit_scale(tiny_model) * init.text_features()
    torch.testing.assert_close(t["weight"], weight, atol=1e-5, rtol=1e-5)
    assert prompt.metadata["maple"]["depth"] == 2 and prompt.metadata["maple"]["n_ctx"] == 2


@pytest.mark.parametrize("which", ["vpt", "maple"])
def test_extract_through_the_prompts_and_eval_round_trip(
    which, vpt_run, maple_run, tmp_path, tiny_features, labels_csv, image_folder, run_cli, cli_model_args
):
    out, summary, _ = vpt_run if which == "vpt" else maple_run
    feats = tmp_path / f"{which}.h5"
    args = ["extract", image_folder, "-o", feats, *cli_model_args, "--dtype", "float32", "-j", "0", "-q"]
    code, _, err = run_cli(*args, "--adapter", out)
    assert code == 0, err
    code, stdout, err = run_cli("eval", feats, "--prompt", out, "--json")
    assert code == 0, err
    top1 = json.loads(stdout)["metrics"]["top1"]
    # the folder's labels are the clean ones: eval's accuracy is training's accuracy against them
    assert top1 == pytest.approx(summary["metrics"]["train_clean_accuracy"], abs=1e-6)
    code, _, err = run_cli("eval", tiny_features, "--prompt", out)  # base features: refused
    assert code == 2 and "--adapter" in err and len(err.strip().splitlines()) == 1
    results = tmp_path / "results"
    results.mkdir()
    code, _, err = run_cli("eval", feats, "-p", out, "-o", results / "r.json", "-q")
    assert code == 0, err
    code, _, err = run_cli("report", results, "-o", tmp_path / "report.md", "-q")
    assert code == 0 and which in (tmp_path / "report.md").read_text(), err
    code, _, err = run_cli("clean", feats, labels_csv, "--prompt", out, "-o", tmp_path / "c.csv", "-q")
    assert code == 0, err


def test_cli_runs_vpt_shallow_with_a_log_and_the_report_reads_it(
    tmp_path, tiny_features, labels_csv, run_cli
):
    out, log = tmp_path / "cli.safetensors", tmp_path / "l.jsonl"
    args = ["tune", tiny_features, labels_csv, "-o", out, "--method", "vpt", "--vpt-depth", "shallow"]
    args += [
        "--vpt-tokens",
        "2",
        "--epochs",
        "1",
        "-b",
        "9",
        "-j",
        "0",
        "--device",
        "cpu",
        "--log",
        log,
        "--json",
    ]
    code, stdout, err = run_cli(*args, "--maple-depth", "2")
    assert code == 0, err
    assert "--maple-depth applies to --method maple; ignored for vpt" in err
    summary = json.loads(stdout)
    assert summary["method"] == "vpt" and summary["trained"] == "shallow VPT prompts (2 tokens)"
    assert read_prompt(out).tensors[VISION_PROMPTS].shape == (1, 2, 64)
    assert json.loads(log.read_text().splitlines()[0])["run"]["method"] == "vpt"
    code, _, err = run_cli("report", log, "-q")
    assert code == 0, err


@pytest.mark.parametrize("method", ["vpt", "maple"])
def test_resume_with_the_ot_split_ends_bit_exact(method, tmp_path, tiny_features, labels_csv):
    opts = {"epochs": 3, "lr": 0.05, "split": "ot"}
    full = tmp_path / "full.safetensors"
    _train(tiny_features, labels_csv, full, method, **opts)
    cut = tmp_path / "cut.safetensors"

    def stop(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    options = TuneOptions(method=method, batch_size=9, seed=0, **opts)
    ft = FinetuneOptions(workers=0, maple_depth=2)
    log = tmp_path / "log.jsonl"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_features, labels_csv, cut, options, ft, device="cpu", on_epoch=stop, log_path=log)
    summary = finetune(tiny_features, labels_csv, cut, options, ft, device="cpu", resume=True, log_path=log)
    assert summary["resumed_from_epoch"] == 2
    a, b = read_prompt(full).tensors, read_prompt(cut).tensors
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(r["run"]["method"] == method for r in rows)
    assert all(r["clean_precision"] is not None for r in rows)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "vision_cfg",
    [
        {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False, "timm_pool": "avg",
         "timm_proj": "linear", "image_size": 32},
        {"layers": [1, 1, 1, 1], "width": 8, "image_size": 64, "head_width": 8},
    ],
)  # fmt: skip
def test_cnn_towers_are_refused_in_one_line(vision_cfg, tiny_model):
    from types import SimpleNamespace

    import open_clip

    from promptcli.models.image_prompts import install_prompts

    cfg = {"embed_dim": 16, "vision_cfg": vision_cfg, "text_cfg": {"width": 16, "heads": 2, "layers": 1}}
    model = open_clip.CLIP(**cfg)
    for method in ("vpt", "maple"):
        with pytest.raises(InputError, match=f"{method} inserts prompt tokens into a ViT") as info:
            check_vit(model.visual, method)
        assert "\n" not in str(info.value)
    prompt = SimpleNamespace(
        method="vpt", path="vpt.safetensors", tensors={VISION_PROMPTS: torch.zeros(1, 2, 8)}
    )
    with pytest.raises(InputError, match="ViT"):  # extract --adapter: refused alike
        install_prompts(SimpleNamespace(model=model), prompt)


def test_maple_refuses_a_hugging_face_text_tower_and_too_deep_prompts(tiny_hf_model, tiny_model):  # noqa: F811
    with pytest.raises(InputError, match="text transformer") as info:
        MaplePrompts(tiny_hf_model, tiny_hf_model.model.visual, ["red apple"], TEMPLATE, 1)
    assert info.value.where == "--method"
    with pytest.raises(InputError, match="1..2") as info:
        MaplePrompts(tiny_model, tiny_model.model.visual, list(CLASSES), TEMPLATE, 3)
    assert info.value.where == "--maple-depth"
    with pytest.raises(InputError, match="first 2 words"):
        MaplePrompts(tiny_model, tiny_model.model.visual, list(CLASSES), "a {}.", 1)


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        (["--method", "vpt", "--vpt-tokens", "-1"], "--vpt-tokens"),
        (["--method", "vpt", "--vpt-tokens", "1025"], "--vpt-tokens"),
        (["--method", "vpt", "--vpt-depth", "middle"], "--vpt-depth"),
        (["--method", "vpt", "--train-layers", "last-1"], "--train-layers"),
        (["--method", "vpt", "--wise-alpha", "0.5"], "--wise-alpha"),
        (["--method", "maple", "--lp-ft"], "--lp-ft"),
        (["--method", "maple", "--maple-depth", "0"], "--maple-depth"),
        (["--method", "maple", "--maple-depth", "3"], "--maple-depth"),
        (["--method", "maple", "--maple-depth", "2", "--template", "{} photo"], "--template"),
    ],
)
def test_bad_options_are_refused_in_one_line(extra, where, tmp_path, tiny_features, labels_csv, run_cli):
    out = tmp_path / "x.safetensors"
    code, _, err = run_cli("tune", tiny_features, labels_csv, "-o", out, "-j", "0", "--device", "cpu", *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and where in lines[0], err
    assert not out.exists()


@pytest.mark.parametrize("method", ["vpt", "maple"])
def test_gradstats_refuses_the_image_methods(method, tiny_features, labels_csv, tmp_path, run_cli):
    code, _, err = run_cli(
        "gradstats", tiny_features, labels_csv, "--method", method, "-o", tmp_path / "g.csv"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "image tower" in err
