"""Model loading through the real open_clip path, with a tiny model saved by the test itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from promptcli.errors import InputError, RuntimeFailure
from promptcli.models.loading import load_model, load_model_from_record, spec_from_record


def test_checkpoint_round_trip(tiny_model_files, tiny_model):
    fresh = load_model(
        "tiny-clip", None, tiny_model_files["config"], device="cpu", random_weights=True, seed=1
    )
    reloaded = load_model(
        "tiny-clip", str(tiny_model_files["weights"]), tiny_model_files["config"], device="cpu"
    )
    for (name, a), (_, b) in zip(tiny_model.model.state_dict().items(), reloaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    # a model built without the checkpoint has other (random) weights: loading really happened
    assert not torch.equal(fresh.model.text_projection, reloaded.model.text_projection)
    assert len(reloaded.checkpoint_sha256) == 64
    assert reloaded.embed_dim == 32 and reloaded.image_size == (32, 32)
    assert all(not p.requires_grad for p in reloaded.model.parameters())
    assert not reloaded.model.training


def test_pt_checkpoint(tiny_model_files, tiny_model, tmp_path):
    pt = tmp_path / "weights.pt"
    torch.save(tiny_model.model.state_dict(), pt)
    loaded = load_model("tiny-clip", str(pt), tiny_model_files["config"], device="cpu")
    assert torch.equal(loaded.model.text_projection, tiny_model.model.text_projection)


def test_record_rebuilds_the_same_model(tiny_model, tmp_path):
    record = tiny_model.record()
    assert spec_from_record(record) == tiny_model.spec
    again = load_model_from_record(record, source="x.h5", device="cpu")
    assert again.checkpoint_sha256 == tiny_model.checkpoint_sha256
    assert torch.equal(again.model.logit_scale, tiny_model.model.logit_scale)


def test_record_checks_checkpoint_hash(tiny_model, tiny_model_files, tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    state = {k: v.clone().contiguous() for k, v in tiny_model.model.state_dict().items()}
    state["logit_scale"] += 1
    save_file(state, str(other))
    with pytest.raises(InputError, match="checkpoint differs"):
        load_model_from_record(tiny_model.record(), source="f.h5", pretrained=str(other), device="cpu")
    moved = dict(tiny_model.record(), pretrained=str(tmp_path / "gone.safetensors"))
    with pytest.raises(InputError, match="--pretrained PATH"):
        load_model_from_record(moved, source="f.h5", device="cpu")


def test_unknown_model_and_tag():
    with pytest.raises(InputError, match="unknown model"):
        load_model("no-such-model", device="cpu")
    with pytest.raises(InputError, match="unknown pretrained tag"):
        load_model("ViT-B-32", "no-such-tag", device="cpu")


def test_offline_tag_says_how_to_pass_a_checkpoint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeFailure) as info:
        load_model("ViT-B-32", "openai", device="cpu")
    assert "--pretrained path/to/weights.safetensors" in info.value.message


def test_bad_config_and_checkpoint(tmp_path, tiny_model_files):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(InputError, match="lacks vision_cfg, text_cfg"):
        load_model("bad", None, bad, device="cpu")
    other_cfg = tmp_path / "other.json"
    cfg = json.loads(tiny_model_files["config"].read_text())
    cfg["embed_dim"] = 16
    other_cfg.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="does not fit the model architecture"):
        load_model("other", str(tiny_model_files["weights"]), other_cfg, device="cpu")
    with pytest.raises(InputError, match="checkpoint file not found"):
        load_model(
            "tiny-clip", str(tmp_path / "missing.safetensors"), tiny_model_files["config"], device="cpu"
        )


def test_devices_and_precision():
    from promptcli.models.devices import resolve_device, resolve_precision

    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(InputError, match="--device"):
        resolve_device("tpu")
    with pytest.raises(InputError, match="needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_an_unreachable_hub_is_not_retried(monkeypatch):
    """With the hub unreachable, weights are looked up in the local cache only (offline mode): no retries."""
    import open_clip
    from huggingface_hub import constants

    from promptcli.errors import PromptcliError
    from promptcli.models import loading

    seen = []

    def fake_download(cfg, *args, **kwargs):
        seen.append(constants.HF_HUB_OFFLINE)
        raise FileNotFoundError("not in the cache")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "_reachable", lambda host, **_: False)
    monkeypatch.setattr(open_clip, "download_pretrained", fake_download)
    with pytest.raises(PromptcliError, match="could not fetch pretrained weights"):
        loading.load_model("ViT-B-32", "openai", device="cpu")
    assert seen == [True] and constants.HF_HUB_OFFLINE is False


def test_loading_leaves_no_temporary_files_and_the_callers_random_stream(
    tiny_model_files, tmp_path, monkeypatch
):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    # a name open_clip does not know yet, so that its config is registered through a temporary file
    load_model("tiny-clip-unseen", str(tiny_model_files["weights"]), tiny_model_files["config"], device="cpu")
    assert torch.equal(torch.rand(3), want)  # a notebook's seeded stream goes on where it was
    assert list(tmp_path.iterdir()) == []  # the config's temporary folder is gone


@pytest.mark.parametrize(
    ("names", "why"),
    [
        (["very " * 80 + "cat", "very " * 80 + "dog"], "cut at the model's 77-token context"),
        (["t-shirt", "t - shirt"], "reads the two names alike"),
    ],
)
def test_zero_shot_refuses_classes_whose_prompts_tokenise_alike(tiny_model, names, why):
    """One embedding for two classes would leave one of them never predicted, silently."""
    from promptcli.models.zeroshot import class_text_embeddings

    with pytest.raises(InputError, match=why):
        class_text_embeddings(tiny_model, names)
    assert class_text_embeddings(tiny_model, ["t-shirt", "dress"]).shape[0] == 2


def _edited_config(tmp_path, tiny_model_files, change) -> Path:
    """The tiny model's config, changed in place by ``change``, written to ``tmp_path/cfg.json``."""
    cfg = json.loads(tiny_model_files["config"].read_text())
    change(cfg)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["vision_cfg"].update(layers="2"), "vision_cfg.layers is '2', not a positive integer"),
        (lambda c: c["text_cfg"].update(width=0), "text_cfg.width is 0, not a positive integer"),
        (lambda c: c["text_cfg"].update(heads={}), "text_cfg.heads is {}, not a positive integer"),
        (
            lambda c: c["vision_cfg"].update(patch_size=-8),
            "vision_cfg.patch_size is -8, not a positive integer",
        ),
        (lambda c: c.update(text_cfg=[1]), "text_cfg is [1], not a JSON object"),
    ],
)
def test_a_config_open_clip_cannot_build_from_is_refused_by_field(
    tmp_path, tiny_model_files, change, message
):
    path = _edited_config(tmp_path, tiny_model_files, change)
    with pytest.raises(InputError, match=re.escape(message)) as info:
        load_model("tiny-clip", None, path, device="cpu", random_weights=True)
    assert info.value.where == str(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["vision_cfg"].update(width=10**9),
            "vision_cfg.width is 1000000000, more than the 32,768",
        ),
        (lambda c: c["text_cfg"].update(layers=10**9), "text_cfg.layers is 1000000000, more than the 1,024"),
        (lambda c: c["vision_cfg"].update(layers=[2, 2000]), "vision_cfg.layers is [2, 2000], more than"),
        (lambda c: c.update(embed_dim=10**9), "embed_dim is 1000000000, more than the 32,768"),
        (
            lambda c: c["text_cfg"].update(vocab_size=10**12),
            "text_cfg.vocab_size is 1000000000000, more than",
        ),
        (
            lambda c: c["text_cfg"].update(context_length=10**6),
            "text_cfg.context_length is 1000000, more than",
        ),
        (
            lambda c: c["vision_cfg"].update(image_size=[32, 10**6]),
            "vision_cfg.image_size is [32, 1000000], more",
        ),
        (
            lambda c: c["vision_cfg"].update(width=30000, layers=1000, head_width=30),
            "vision_cfg (width 30000, layers 1000) makes a model of about 10,800 billion parameters, more than the 20",
        ),
        (
            lambda c: c["text_cfg"].update(width=20000, mlp_ratio=1e6),
            "text_cfg (width 20000, layers 2) makes a model of about",
        ),
    ],
)
def test_a_config_too_large_to_build_is_refused_by_field_before_building(
    tmp_path, tiny_model_files, change, message
):
    """Sizes in the billions (a typo) exhausted memory, or took hours building layers, before any error."""
    from promptcli.models.loading import read_model_config

    path = _edited_config(tmp_path, tiny_model_files, change)
    with pytest.raises(InputError, match=re.escape(message)) as info:
        read_model_config(path)
    assert info.value.where == str(path) and "a typo?" in info.value.what


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(embed_dimm=64), "unknown key 'embed_dimm' in the model config"),
        (lambda c: c["vision_cfg"].update(widht=64), "unknown key 'vision_cfg.widht' in the model config"),
        (lambda c: c["text_cfg"].update(foo=1), "unknown key 'text_cfg.foo' in the model config"),
    ],
)
def test_an_unknown_key_of_a_model_config_is_named_not_blamed_on_the_checkpoint(
    tmp_path, tiny_model_files, change, message
):
    from promptcli.models.loading import load_model

    path = _edited_config(tmp_path, tiny_model_files, change)
    with pytest.raises(InputError, match=re.escape(message)) as info:
        load_model("tiny-clip", str(tiny_model_files["weights"]), path, device="cpu")
    assert info.value.where == str(path) and "checkpoint" not in info.value.message


@pytest.mark.parametrize("length", [32, 100])
def test_a_config_context_length_other_than_the_checkpoints_is_refused(tmp_path, tiny_model_files, length):
    """open_clip resampled the checkpoint's 77 text position embeddings to the config's length, silently."""
    from promptcli.models.loading import load_model

    path = _edited_config(tmp_path, tiny_model_files, lambda c: c["text_cfg"].update(context_length=length))
    with pytest.raises(
        InputError, match=f"context_length is {length}, the checkpoint's .* for 77 tokens"
    ) as info:
        load_model("tiny-clip", str(tiny_model_files["weights"]), path, device="cpu")
    assert info.value.where == str(path)
    load_model(
        "tiny-clip", None, path, device="cpu", random_weights=True
    )  # no checkpoint: nothing to resample


def test_a_model_config_may_start_with_a_byte_order_mark(tmp_path, tiny_model_files):
    from promptcli.models.loading import read_model_config

    path = tmp_path / "cfg.json"
    path.write_bytes(b"\xef\xbb\xbf" + tiny_model_files["config"].read_bytes())
    assert read_model_config(path) == json.loads(tiny_model_files["config"].read_text())


def test_every_open_clip_model_config_has_only_keys_open_clip_knows():
    import open_clip

    from promptcli.models.loading import unknown_config_key

    assert [n for n in open_clip.list_models() if unknown_config_key(open_clip.get_model_config(n))] == []


def test_every_open_clip_model_config_is_within_the_size_limits():
    import open_clip

    from promptcli.models.loading import model_config_problem

    assert [n for n in open_clip.list_models() if model_config_problem(open_clip.get_model_config(n))] == []


def test_configs_and_checkpoints_that_do_not_fit_are_input_errors(tmp_path, tiny_model_files):
    from promptcli.models.loading import load_model_from_record

    cfg = json.loads(tiny_model_files["config"].read_text())
    heads = tmp_path / "heads.json"  # a width no multiple of the heads: open_clip asserts
    heads.write_text(json.dumps({**cfg, "text_cfg": {**cfg["text_cfg"], "heads": 3}}))
    with pytest.raises(InputError, match="open_clip cannot build model tiny-clip from its config"):
        load_model("tiny-clip", None, heads, device="cpu", random_weights=True)
    narrow = tmp_path / "narrow.json"  # the checkpoint's text tower is wider
    narrow.write_text(json.dumps({**cfg, "text_cfg": {**cfg["text_cfg"], "width": 32}}))
    with pytest.raises(InputError, match="does not fit the model architecture"):
        load_model("tiny-clip", str(tiny_model_files["weights"]), narrow, device="cpu")
    tensor = tmp_path / "tensor.pt"  # a .pt holding a bare tensor, not a state dict
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(InputError, match="does not fit the model architecture") as info:
        load_model("tiny-clip", str(tensor), tiny_model_files["config"], device="cpu")
    assert info.value.where == str(tensor)
    record = {
        "model_name": "tiny-clip",
        "pretrained": "",
        "model_config": "[1, 2]",
        "random_weights_seed": "0",
    }
    with pytest.raises(InputError, match="model_config: the model config is list, not a JSON object"):
        load_model_from_record(record, "f.h5", device="cpu")
    record["model_config"] = json.dumps({**cfg, "preprocess_cfg": [1]})
    with pytest.raises(InputError, match="model_config: preprocess_cfg is not a JSON object"):
        load_model_from_record(record, "f.h5", device="cpu")
    null = tmp_path / "null.json"
    null.write_text(json.dumps({"model_cfg": None}))
    with pytest.raises(InputError, match="model_cfg must be a JSON object"):
        load_model("tiny-clip", None, null, device="cpu", random_weights=True)
    no_heads = tmp_path / "no_heads.json"  # head_width above the width: open_clip's ValueError (0 heads)
    no_heads.write_text(json.dumps({**cfg, "vision_cfg": {**cfg["vision_cfg"], "head_width": 10**6}}))
    with pytest.raises(InputError, match="open_clip cannot build model tiny-clip from its config"):
        load_model("tiny-clip", None, no_heads, device="cpu", random_weights=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_checkpoint_tensor_of_integer_type_is_refused(tiny_model_files, tmp_path, suffix):
    """An integer weight was copied into the float model as its truncated values: features from a wrong model."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_model_files["weights"]))
    state["visual.conv1.weight"] = state["visual.conv1.weight"].long()
    path = tmp_path / f"int{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    with pytest.raises(InputError, match="tensor 'visual.conv1.weight' has an integer type") as err:
        load_model("tiny-clip", str(path), tiny_model_files["config"], device="cpu")
    assert err.value.where == str(path)
