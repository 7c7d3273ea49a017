"""Model creation: one explicit function that turns a model spec into a ready open_clip model.

A spec is an open_clip model name (``ViT-B-32``), a pretrained source (an open_clip tag such
as ``openai`` or a local checkpoint file), and optionally a custom model config (JSON) for
architectures open_clip does not list. The same spec, recorded in every output file, rebuilds
the same model later (see :func:`spec_from_record`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from promptcli.errors import InputError, RuntimeFailure
from promptcli.io.checks import shown
from promptcli.io.fileio import check_input_file, sha256_file
from promptcli.models.devices import resolve_device, resolve_precision

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

# Models promptcli can build itself, offline, from packages (name -> builder returning
# (model config dict, checkpoint path)). They are then loaded exactly like a custom config.
LOCAL_BUILDERS: dict[str, Callable[[], tuple[dict[str, Any], Path]]] = {}


def _register_builtin_builders() -> None:
    try:
        from promptcli.models.demo_model import DEMO_MODEL_NAME, build_demo_model
    except ImportError:  # the demo module is optional
        return
    LOCAL_BUILDERS.setdefault(DEMO_MODEL_NAME, build_demo_model)


@dataclass(frozen=True)
class ModelSpec:
    """What identifies a model: open_clip name, pretrained tag or checkpoint path, custom config."""

    name: str
    pretrained: str | None = None
    config: dict[str, Any] | None = None
    random_seed: int | None = None  # seeded random weights (--random-weights), instead of pretrained

    def to_record(self) -> dict[str, str]:
        return {
            "model_name": self.name,
            "pretrained": self.pretrained or "",
            "model_config": json.dumps(self.config, sort_keys=True) if self.config else "",
            "random_weights_seed": "" if self.random_seed is None else str(self.random_seed),
        }


@dataclass
class LoadedModel:
    """An open_clip model with its tokenizer and preprocessing, plus what identifies it."""

    spec: ModelSpec
    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]
    preprocess_cfg: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    checkpoint_sha256: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return int(self.info["embed_dim"])

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.preprocess_cfg.get("size", 224)
        return (size, size) if isinstance(size, int) else tuple(size)

    def identity(self) -> dict[str, str]:
        """The fields that must agree between files made with 'the same model'."""
        return {
            "model_name": self.spec.name,
            "pretrained": self.spec.pretrained or "",
            "checkpoint_sha256": self.checkpoint_sha256,
        }

    def record(self) -> dict[str, Any]:
        """Everything about the model an output file should carry."""
        return {
            **self.spec.to_record(),
            "checkpoint_sha256": self.checkpoint_sha256,
            "embed_dim": self.embed_dim,
            "image_size": list(self.image_size),
            "preprocess": json.dumps(self.preprocess_cfg, sort_keys=True, default=str),
        }


# Sizes open_clip builds layers from: a positive integer each (layers, image_size, patch_size: or a list of them).
_CONFIG_SIZES = (
    "width",
    "layers",
    "heads",
    "head_width",
    "image_size",
    "patch_size",
    "context_length",
    "vocab_size",
)
_SIZE_LISTS = ("layers", "image_size", "patch_size")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# Sizes far beyond any CLIP model's (ViT-bigG-14: width 1664, 48 layers, 2.5 billion parameters): a config past
# them is a typo (1e9 for 1024?) whose model would exhaust memory, or take hours to build, before any error.
_SIZE_LIMITS = {
    "embed_dim": 32_768,
    "width": 32_768,
    "layers": 1_024,
    "image_size": 16_384,
    "context_length": 8_192,  # the text tower holds a context_length x context_length attention mask
    "vocab_size": 10_000_000,
}
MAX_PARAMETERS = 20_000_000_000  # about 80 GB of fp32 weights; the largest CLIP models have 5 billion
# open_clip's defaults for sizes a tower config leaves out
_VISION_DEFAULTS = {"width": 768, "layers": 12, "patch_size": 16, "image_size": 224, "mlp_ratio": 4.0}
_TEXT_DEFAULTS = {"width": 512, "layers": 12, "context_length": 77, "vocab_size": 49408, "mlp_ratio": 4.0}


def _total(value: int | list[int]) -> int:
    return sum(value) if isinstance(value, list) else value


def _tower_parameters(tower: dict[str, Any], defaults: dict[str, Any], embed_dim: int, text: bool) -> float:
    """A rough count (within a small factor) of the parameters open_clip builds for a tower of these sizes."""
    sizes = {**defaults, **{k: v for k, v in tower.items() if v is not None}}
    width, layers, ratio = sizes["width"], sizes["layers"], sizes["mlp_ratio"]
    if text:
        extra = (sizes["vocab_size"] + sizes["context_length"]) * width + sizes["context_length"] ** 2
    elif isinstance(layers, list):  # a ModifiedResNet: stage i has bottlenecks of width * 2**i channels
        return sum(17.0 * n * (width * 2**i) ** 2 for i, n in enumerate(layers)) + 4.0 * (32 * width) ** 2
    else:
        image, patch = sizes["image_size"], sizes["patch_size"]
        image = image if isinstance(image, list) else [image, image]
        patch = patch if isinstance(patch, list) else [patch, patch]
        grid = max(image[0] // patch[0], 1) * max(image[1] // patch[1], 1)
        extra = 3.0 * patch[0] * patch[1] * width + grid * width
    return (4.0 + 2.0 * ratio) * width * width * _total(layers) + extra + width * embed_dim


def _size_problem(model_cfg: dict[str, Any]) -> str | None:
    """A size past :data:`_SIZE_LIMITS`, or sizes giving more than :data:`MAX_PARAMETERS` parameters."""
    for part, tower in (
        ("", model_cfg),
        ("vision_cfg.", model_cfg["vision_cfg"]),
        ("text_cfg.", model_cfg["text_cfg"]),
    ):
        for key, limit in _SIZE_LIMITS.items():
            value = tower.get(key)
            if isinstance(value, (int, list)) and not isinstance(value, bool) and value:
                largest = (
                    _total(value) if key == "layers" else max(value) if isinstance(value, list) else value
                )
                if largest > limit:
                    return f"{part}{key} is {value!r}, more than the {limit:,} promptcli builds (a typo?)"
    embed_dim = model_cfg["embed_dim"]
    towers = {
        "vision_cfg": _tower_parameters(model_cfg["vision_cfg"], _VISION_DEFAULTS, embed_dim, text=False),
        "text_cfg": _tower_parameters(model_cfg["text_cfg"], _TEXT_DEFAULTS, embed_dim, text=True),
    }
    if sum(towers.values()) > MAX_PARAMETERS:
        part = max(towers, key=towers.__getitem__)
        shown = ", ".join(f"{k} {model_cfg[part][k]!r}" for k in ("width", "layers") if k in model_cfg[part])
        return (
            f"{part} ({shown or 'open_clip defaults'}) makes a model of about {sum(towers.values()) / 1e9:,.0f} "
            f"billion parameters, more than the {MAX_PARAMETERS / 1e9:,.0f} billion promptcli builds (a typo?)"
        )
    return None


def model_config_problem(model_cfg: Any) -> str | None:
    """What in an open_clip model config (``{embed_dim, vision_cfg, text_cfg}``) open_clip could not build a model
    from: a part that is not an object, a size that is not a positive integer, or sizes too large to build (see
    :func:`_size_problem`); None when there is nothing."""
    if not isinstance(model_cfg, dict):
        return f"the model config is {type(model_cfg).__name__}, not a JSON object"
    if not _positive_int(model_cfg.get("embed_dim")):
        return f"embed_dim is {model_cfg.get('embed_dim')!r}, not a positive integer"
    for part in ("vision_cfg", "text_cfg"):
        tower = model_cfg.get(part)
        if not isinstance(tower, dict):
            return f"{part} is {tower!r}, not a JSON object"
        for key in _CONFIG_SIZES:
            value = tower.get(key)
            if value is None or _positive_int(value):
                continue
            if key in _SIZE_LISTS and isinstance(value, list) and value and all(map(_positive_int, value)):
                continue
            return f"{part}.{key} is {shown(value)}, not a positive integer"
        ratio = tower.get("mlp_ratio")
        if ratio is not None and not (
            isinstance(ratio, (int, float))
            and not isinstance(ratio, bool)
            and math.isfinite(ratio)
            and ratio > 0
        ):
            return f"{part}.mlp_ratio is {ratio!r}, not a positive number"
    return _size_problem(model_cfg)


def _config_keys() -> dict[str, set[str]]:
    """The settings open_clip's model classes take: at the top of a model config (CLIP, CustomTextCLIP, CoCa and
    create_model's ``custom_text``), and in its ``vision_cfg``, ``text_cfg`` and ``multimodal_cfg``."""
    import dataclasses
    import inspect

    import open_clip
    from open_clip.coca_model import MultimodalCfg
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    top = {"custom_text"}
    for cls in (open_clip.CLIP, open_clip.CustomTextCLIP, open_clip.CoCa):
        top |= set(inspect.signature(cls.__init__).parameters) - {"self", "cast_dtype", "args", "kwargs"}
    fields = {
        name: {f.name for f in dataclasses.fields(cfg)}
        for name, cfg in (
            ("vision_cfg", CLIPVisionCfg),
            ("text_cfg", CLIPTextCfg),
            ("multimodal_cfg", MultimodalCfg),
        )
    }
    return {"": top, **fields}


def unknown_config_key(model_cfg: dict[str, Any]) -> tuple[str, str] | None:
    """(what, hint) for a key of a model config that open_clip has no setting of (a typo, or a config of another
    open_clip version): open_clip would fail on it building the model, read as a checkpoint that does not fit."""
    import difflib

    import open_clip

    known = _config_keys()
    for part, names in known.items():
        tower = model_cfg if not part else model_cfg.get(part)
        if not isinstance(tower, dict):
            continue
        for key in tower:
            if key not in names:
                close = difflib.get_close_matches(str(key), sorted(names), n=1)
                where = f"{part}.{key}" if part else str(key)
                return (
                    f"unknown key {where!r} in the model config (open_clip {open_clip.__version__} has no such "
                    "setting)",
                    f"remove it or fix its name{f' (did you mean {close[0]!r}?)' if close else ''}",
                )
    return None


def _real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def preprocess_config_problem(preprocess: dict[str, Any]) -> str | None:
    """What in a ``preprocess_cfg`` open_clip could not normalise images with: a mean or std that is not a finite
    number or a list of 1 or 3 of them (one per colour channel), or a std that is not above 0 (pixels are divided
    by it: 0 gives inf/NaN features); None when there is nothing."""
    for key in ("mean", "std"):
        value = preprocess.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not all(map(_real_number, values)):
            return f"preprocess_cfg.{key} is {shown(value)}, not a number or a list of 3 numbers (one per colour channel)"
        if len(values) not in (1, 3):
            return f"preprocess_cfg.{key} has {len(values)} values, not 3 (one per colour channel)"
        if key == "std" and min(values) <= 0:
            return f"preprocess_cfg.std is {shown(value)}: each must be above 0 (pixels are divided by it)"
    return None


def read_model_config(path: str | Path) -> dict[str, Any]:
    """Read a custom open_clip model config (``{embed_dim, vision_cfg, text_cfg}``) from JSON.

    Also accepts the ``open_clip_config.json`` layout ``{"model_cfg": ..., "preprocess_cfg": ...}``.
    """
    path = check_input_file(path, "model config", "check the --model-config path")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is fine, as in every text input
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"not valid JSON ({exc})", where=path, hint="fix the model config file") from exc
    if not isinstance(cfg, dict):
        raise InputError("model config must be a JSON object", where=path, hint="see docs/formats.md")
    model_cfg = cfg.get("model_cfg", cfg)
    if not isinstance(model_cfg, dict):
        raise InputError("model_cfg must be a JSON object", where=path, hint="see docs/formats.md")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise InputError(
            f"model config lacks {', '.join(missing)}",
            where=path,
            hint="an open_clip model config needs embed_dim, vision_cfg and text_cfg",
        )
    problem = model_config_problem(model_cfg)
    if problem:
        raise InputError(problem, where=path, hint="fix the model config (see docs/formats.md)")
    unknown = unknown_config_key(model_cfg)
    if unknown:
        raise InputError(unknown[0], where=path, hint=unknown[1])
    # open_clip's image_transform asserts these (an AssertionError at model creation otherwise)
    accepted = {
        "interpolation": ("bicubic", "bilinear", "random"),
        "resize_mode": ("shortest", "longest", "squash"),
    }
    preprocess = cfg.get("preprocess_cfg", {})
    if not isinstance(preprocess, dict):
        raise InputError(
            f"preprocess_cfg must be a JSON object, got {type(preprocess).__name__}",
            where=path,
            hint='e.g. "preprocess_cfg": {"mean": [...], "std": [...], "interpolation": "bicubic"}',
        )
    problem = preprocess_config_problem(preprocess)
    if problem:
        raise InputError(
            problem,
            where=path,
            hint='e.g. "preprocess_cfg": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}',
        )
    for key, values in accepted.items():
        value = preprocess.get(key)
        if value is not None and value not in values:
            raise InputError(
                f"preprocess_cfg {key} {value!r} is not one open_clip accepts ({', '.join(values)})",
                where=path,
                hint=f"set {key} to one of them, or leave it out for open_clip's default ({values[0]})",
            )
    return cfg


def _register_config(name: str, config: dict[str, Any]) -> None:
    """Make a custom config known to open_clip under ``name``."""
    import open_clip

    model_cfg = config.get("model_cfg", config)
    existing = open_clip.get_model_config(name)
    if existing is not None and existing == model_cfg:
        return
    # open_clip registers configs from files; it reads the file at once, so the folder can go right after
    folder = Path(tempfile.mkdtemp(prefix="promptcli-config-"))
    try:
        (folder / f"{name}.json").write_text(json.dumps(model_cfg), encoding="utf-8")
        open_clip.add_model_config(folder / f"{name}.json")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if open_clip.get_model_config(name) != json.loads(json.dumps(model_cfg)):
        raise InputError(
            f"open_clip did not accept the config of model {name!r}",
            where="--model-config",
            hint="give it embed_dim, vision_cfg and text_cfg (as open_clip's model configs have)",
        )


def _is_checkpoint_path(pretrained: str) -> bool:
    return pretrained.endswith(CHECKPOINT_SUFFIXES) or os.sep in pretrained or os.path.exists(pretrained)


def _offline_hint(spec: ModelSpec) -> str:
    return (
        f"no network or hub access? download the weights where you have it (e.g. "
        f"open_clip.create_model('{spec.name}', pretrained='{spec.pretrained}') then save the state dict) "
        f"and pass --pretrained path/to/weights.safetensors"
    )


def _resolve_checkpoint(spec: ModelSpec) -> tuple[str | None, str]:
    """Return (what to pass to open_clip as ``pretrained``, checkpoint SHA-256)."""
    import open_clip

    if not spec.pretrained:
        return None, ""
    if _is_checkpoint_path(spec.pretrained):
        path = check_input_file(spec.pretrained, "checkpoint file", "check the --pretrained path")
        with open(path, "rb") as handle:
            head = handle.read(16)
        if path.suffix == ".safetensors" or head[8:9] == b"{":  # safetensors: u64 header size, JSON
            check_safetensors(path)
        return str(path), sha256_file(path)
    tags = open_clip.list_pretrained_tags_by_model(spec.name)
    if spec.pretrained not in tags:
        known = ", ".join(tags) if tags else "none"
        raise InputError(
            f"unknown pretrained tag {spec.pretrained!r} for {spec.name} (known tags: {known})",
            where="--pretrained",
            hint="use a listed tag or a local checkpoint file (.safetensors/.pt)",
        )
    cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained)
    try:
        with _quiet_hub(), _offline_unless_reachable(cfg):
            local = open_clip.download_pretrained(cfg)
    except Exception as exc:  # network errors come in many types; all mean the same here
        raise RuntimeFailure(
            f"could not fetch pretrained weights {spec.name}/{spec.pretrained} ({type(exc).__name__})",
            where="--pretrained",
            hint=_offline_hint(spec),
        ) from exc
    if not local:
        raise RuntimeFailure(
            f"no weights available for {spec.name}/{spec.pretrained}",
            where="--pretrained",
            hint=_offline_hint(spec),
        )
    return spec.pretrained, sha256_file(local)


def _unreadable_checkpoint(path: str, exc: Exception) -> InputError:
    """The one-line error for a checkpoint file torch or safetensors cannot read."""
    if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc).lower().replace(" ", "_"):
        return InputError(
            "a pickle checkpoint holding objects torch's safe loader refuses (weights_only)",
            where=path,
            hint='where you trust the file, convert it: python -c "import torch; from safetensors.torch '
            "import save_file; sd = torch.load('IN.pt', weights_only=False); sd = sd.get('state_dict', sd); "
            "save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\" "
            "and pass --pretrained OUT.safetensors",
        )
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return InputError(
        f"not a readable checkpoint ({type(exc).__name__}{': ' + first if first else ''})",
        where=path,
        hint="the file is truncated or not a model checkpoint: download or save it again",
    )


def check_safetensors(path: str | Path) -> None:
    """Read a safetensors file's header (cheap): a truncated or foreign file is an InputError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            list(handle.keys())
    except Exception as exc:  # safetensors raises SafetensorError, and OSError for unreadable files
        raise _unreadable_checkpoint(str(path), exc) from exc


def _checkpoint_tensors(path: Path) -> dict[str, tuple[bool, tuple[int, ...]]]:
    """Each checkpoint tensor's (integer or bool type, shape) by name (``module.`` prefixes dropped), read without
    their data; empty when the file cannot be read so (a legacy pickle: open_clip has read it already)."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    try:
        if path.suffix == ".safetensors" or head[8:9] == b"{":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as st:
                slices = {k: st.get_slice(k) for k in st.keys()}
                found = {
                    k: (s.get_dtype().startswith(("I", "U", "BOOL")), tuple(s.get_shape()))
                    for k, s in slices.items()
                }
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            items = state.items() if isinstance(state, dict) else ()
            found = {
                k: (not v.is_floating_point(), tuple(v.shape))
                for k, v in items
                if isinstance(v, torch.Tensor)
            }
    except Exception:  # noqa: BLE001 - a best-effort look; the model loaded from it
        return {}
    return {k.removeprefix("module."): v for k, v in found.items()}


# Where a CLIP keeps its text position embeddings (one row per token of the context): CLIP, CustomTextCLIP.
TEXT_POSITIONS = ("positional_embedding", "text.positional_embedding")


def check_checkpoint_fits(path: Path, model: torch.nn.Module, config: str | Path = "--model-config") -> None:
    """Refuse a checkpoint holding an integer tensor where the model has floating-point weights: loading copies
    it in as its (truncated) values, a wrong model rather than an error. And refuse a model config whose text
    ``context_length`` is not the checkpoint's (``config``: the file or option that gave it): open_clip resamples
    the text position embeddings to it, which gives every token position another embedding than the trained one,
    text features of no trained model."""
    tensors = _checkpoint_tensors(path)
    state = model.state_dict()
    for name, tensor in state.items():
        if name in tensors and tensors[name][0] and tensor.is_floating_point():
            raise InputError(
                f"checkpoint tensor {name!r} has an integer type, where the model's weights are floating point",
                where=path,
                hint="the file is damaged or converted: save the model's weights again",
            )
    for name in TEXT_POSITIONS:
        if name in tensors and name in state and len(tensors[name][1]) == 2:
            trained, built = tensors[name][1][0], state[name].shape[0]
            if trained != built:
                raise InputError(
                    f"the model config's text_cfg.context_length is {built}, the checkpoint's text position "
                    f"embeddings are for {trained} tokens (open_clip would resample them: text features of no "
                    "trained model)",
                    where=config,
                    hint=f"set text_cfg.context_length to {trained}, the checkpoint's",
                )


@contextlib.contextmanager
def _offline_unless_reachable(cfg: dict[str, Any]):
    """Fetch through the Hugging Face hub in offline mode (its cache only) when the hub cannot be reached.

    Without it, an unreachable hub costs ~60 s of retries before the same error; one connection
    attempt (a few seconds at most) decides instead. Weights already in the cache still load.
    """
    if not cfg.get("hf_hub"):
        yield  # plain URL downloads check their cache first and do not retry
        return
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if constants.HF_HUB_OFFLINE or _reachable(host):
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _reachable(host: str, port: int = 443, timeout: float = 5.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _quiet_hub():
    """Silence open_clip/hub logging and stray prints while fetching (errors are re-raised)."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over a model's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\t{t.dtype}\t{tuple(tensor.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _no_weights_error(model: str) -> InputError:
    return InputError(
        f"no weights given for {model}: it would be randomly initialised",
        where="--pretrained",
        hint="pass --pretrained TAG or a checkpoint file, or --random-weights for a seeded random model",
    )


def load_model(
    model: str,
    pretrained: str | None = None,
    model_config: str | Path | dict[str, Any] | None = None,
    device: str = "auto",
    precision: str = "fp32",
    *,
    random_weights: bool = False,
    seed: int = 0,
) -> LoadedModel:
    """Create an open_clip model, frozen and in eval mode, from a name, weights and optional config.

    ``pretrained`` is an open_clip tag (``openai``) or a local checkpoint file; ``model_config``
    a custom config (path or dict) registered under ``model``. Models promptcli can build
    itself offline (``promptcli-demo``) are built on first use and loaded the same way.
    A model without weights is refused unless ``random_weights``: then it is initialised from
    ``seed`` (recorded, so :func:`load_model_from_record` rebuilds the same weights) and its
    ``checkpoint_sha256`` is the :func:`weights_digest` of the fp32 weights.
    """
    import open_clip

    from promptcli.io.checks import check_seed

    torch_device = resolve_device(device)
    dtype = resolve_precision(precision, torch_device)
    precision = precision.lower()  # open_clip takes the lower-case names only
    if random_weights:
        check_seed(seed)
        if pretrained:
            raise InputError(
                "--random-weights and --pretrained exclude each other",
                where="--random-weights",
                hint="drop one of them",
            )

    _register_builtin_builders()
    config: dict[str, Any] | None
    if isinstance(model_config, (str, Path)):
        config = read_model_config(model_config)
    else:
        config = model_config
    if config is None and model in LOCAL_BUILDERS:
        config, built_checkpoint = LOCAL_BUILDERS[model]()
        if not random_weights:  # --random-weights keeps the architecture, not the built weights
            pretrained = pretrained or str(built_checkpoint)
    spec = ModelSpec(
        name=model, pretrained=pretrained, config=config, random_seed=seed if random_weights else None
    )

    if config is not None:
        _register_config(model, config)
    elif open_clip.get_model_config(model) is None:
        raise InputError(
            f"unknown model {model!r}",
            where="--model",
            hint="use a name from `python -c 'import open_clip; print(open_clip.list_models())'` "
            "or describe it with --model-config my_model.json",
        )
    if not pretrained and not random_weights:
        raise _no_weights_error(model)

    open_clip_pretrained, checkpoint_sha = _resolve_checkpoint(spec)
    preprocess_overrides = {}
    if config is not None:
        pp = config.get("preprocess_cfg", {})
        preprocess_overrides = {
            "image_mean": pp.get("mean"),
            "image_std": pp.get("std"),
            "image_interpolation": pp.get("interpolation"),
            "image_resize_mode": pp.get("resize_mode"),
        }

    def create(on: torch.device, precision: str):
        with _quiet_hub():
            return open_clip.create_model_and_transforms(
                model,
                pretrained=open_clip_pretrained,
                device=on,
                precision=precision,
                pretrained_text=False,
                **preprocess_overrides,
            )

    try:
        if random_weights:
            # The init runs on CPU in fp32 whatever the target, so the digest names the weights the
            # seed gives; another device or precision rebuilds them from the same seed.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                clip_model, _, preprocess = create(torch.device("cpu"), "fp32")
            checkpoint_sha = weights_digest(clip_model)
            if torch_device.type != "cpu" or precision != "fp32":
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    clip_model, _, preprocess = create(torch_device, precision)
        else:
            # the random init before the weights load must not advance the caller's random streams
            cuda = [torch_device.index or 0] if torch_device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                clip_model, _, preprocess = create(torch_device, precision)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        if spec.pretrained and _is_checkpoint_path(spec.pretrained):
            raise _unreadable_checkpoint(spec.pretrained, exc) from exc
        if (
            type(exc) is ValueError and spec.config is not None
        ):  # open_clip's own checks of the config's values
            raise _does_not_fit(spec, model, random_weights, exc) from exc
        raise
    except (
        TypeError,
        AssertionError,
        AttributeError,
    ) as exc:  # open_clip's checks of what it builds and loads
        raise _does_not_fit(spec, model, random_weights, exc) from exc
    except RuntimeError as exc:
        text = str(exc)
        if "Error(s) in loading state_dict" in text or "size mismatch" in text:
            raise InputError(
                "checkpoint does not fit the model architecture",
                where=spec.pretrained,
                hint=f"pass weights saved from a {model} model (or the matching --model-config)",
            ) from exc
        if "PytorchStreamReader" in text and spec.pretrained:  # a truncated or foreign .pt zip archive
            raise _unreadable_checkpoint(spec.pretrained, exc) from exc
        raise RuntimeFailure(
            f"could not create model {model} ({text.splitlines()[0][:200]})",
            where="--model",
            hint=_offline_hint(spec)
            if spec.pretrained and not _is_checkpoint_path(spec.pretrained)
            else "check --model, --pretrained and --model-config",
        ) from exc
    except OSError as exc:  # HF text towers that cannot be fetched offline land here
        raise RuntimeFailure(
            f"could not load parts of {model} ({str(exc).splitlines()[0][:200]})",
            where="--model",
            hint="make the model's files available locally (hf_model_name may be a local folder)",
        ) from exc

    if spec.pretrained and _is_checkpoint_path(spec.pretrained) and not random_weights:
        check_checkpoint_fits(
            Path(spec.pretrained),
            clip_model,
            model_config if isinstance(model_config, (str, Path)) else "--model-config",
        )
    clip_model.eval()
    clip_model.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(clip_model))
    embed_dim = (config.get("model_cfg", config) if config else open_clip.get_model_config(model))[
        "embed_dim"
    ]
    return LoadedModel(
        spec=spec,
        model=clip_model,
        tokenizer=tokenizer,
        preprocess=preprocess,
        preprocess_cfg=preprocess_cfg,
        device=torch_device,
        dtype=dtype,
        checkpoint_sha256=checkpoint_sha,
        info={"embed_dim": embed_dim},
    )


def _does_not_fit(spec: ModelSpec, model: str, random_weights: bool, exc: Exception) -> InputError:
    """The one error for a model open_clip cannot build from its config, or whose checkpoint does not fit it."""
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
    if spec.pretrained and _is_checkpoint_path(spec.pretrained) and not random_weights:
        return InputError(
            f"checkpoint does not fit the model architecture ({detail})",
            where=spec.pretrained,
            hint=f"pass weights saved from a {model} model (or the matching --model-config)",
        )
    return InputError(
        f"open_clip cannot build model {model} from its config ({detail})",
        where="--model-config" if spec.config is not None else "--model",
        hint="check the config's sizes (e.g. width a multiple of heads)",
    )


def spec_from_record(record: dict[str, Any]) -> ModelSpec:
    """Rebuild a :class:`ModelSpec` from the attributes an output file recorded."""
    config_text = record.get("model_config") or ""
    seed_text = str(record.get("random_weights_seed") or "")
    config = json.loads(config_text) if config_text else None
    problem = (
        None
        if config is None
        else model_config_problem(config.get("model_cfg", config) if isinstance(config, dict) else config)
    )
    if problem:
        raise ValueError(f"model_config: {problem}")
    if isinstance(config, dict) and not isinstance(config.get("preprocess_cfg", {}), dict):
        raise ValueError("model_config: preprocess_cfg is not a JSON object")
    problem = (
        preprocess_config_problem(config.get("preprocess_cfg", {})) if isinstance(config, dict) else None
    )
    if problem:
        raise ValueError(f"model_config: {problem}")
    return ModelSpec(
        name=str(record["model_name"]),
        pretrained=str(record.get("pretrained") or "") or None,
        config=config,
        random_seed=int(seed_text) if seed_text else None,
    )


def load_model_from_record(
    record: dict[str, Any],
    source: str | Path,
    pretrained: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    *,
    dim: int | None = None,
) -> LoadedModel:
    """Load the model a file was made with, checking its checkpoint hash, and (``dim``: the width of the
    file's features) that it embeds in that width.

    ``pretrained`` overrides the recorded checkpoint location (e.g. the file moved); the hash
    must still match so that text and image embeddings come from the same weights.
    """
    loaded = _load_recorded_model(record, source, pretrained, device, precision)
    if dim is not None:
        check_embed_dim(loaded, dim, where=source)
    return loaded


def check_embed_dim(loaded: LoadedModel, dim: int, where: str | Path | None = None) -> None:
    """Refuse features of width ``dim`` for a model that embeds in another width."""
    if dim != loaded.embed_dim:
        raise InputError(
            f"features have dimension {dim} but the model embeds text in {loaded.embed_dim}",
            where=where,
            hint="use the model the features were extracted with",
        )


def _load_recorded_model(
    record: dict[str, Any], source: str | Path, pretrained: str | None, device: str, precision: str
) -> LoadedModel:
    try:
        spec = spec_from_record(record)
    except (KeyError, ValueError) as exc:  # json errors are ValueErrors
        raise InputError(
            f"unreadable model record ({type(exc).__name__}: {exc})",
            where=source,
            hint="the file is damaged; make it again",
        ) from exc
    _register_builtin_builders()
    if spec.random_seed is not None and not pretrained:
        loaded = load_model(
            spec.name, None, spec.config, device, precision, random_weights=True, seed=spec.random_seed
        )
        _check_digest(record, loaded, source)
        return loaded
    if spec.name in LOCAL_BUILDERS and not pretrained:
        config, built = LOCAL_BUILDERS[spec.name]()
        spec = ModelSpec(spec.name, str(built), config)
    chosen = pretrained or spec.pretrained
    if not chosen:
        raise InputError(
            "the file records no model weights (made with random weights that were not recorded?)",
            where=source,
            hint="pass the checkpoint with --pretrained PATH, or re-extract with --pretrained or --random-weights",
        )
    if chosen and _is_checkpoint_path(chosen) and not Path(chosen).is_file():
        raise InputError(
            f"the checkpoint this file was made with is not at {chosen}",
            where=source,
            hint="pass its current location with --pretrained PATH",
        )
    loaded = load_model(spec.name, chosen, spec.config, device=device, precision=precision)
    _check_digest(record, loaded, source)
    return loaded


def _check_digest(record: dict[str, Any], loaded: LoadedModel, source: str | Path) -> None:
    expected = str(record.get("checkpoint_sha256") or "")
    if expected and loaded.checkpoint_sha256 and expected != loaded.checkpoint_sha256:
        raise InputError(
            f"checkpoint differs from the one the file was made with "
            f"(sha256 {loaded.checkpoint_sha256[:12]} vs {expected[:12]})",
            where=source,
            hint="use the same weights the features were extracted with"
            if loaded.spec.random_seed is None
            else "its seeded random weights do not rebuild here (another torch version?)",
        )


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two recorded model identities name the same weights."""
    if a.get("checkpoint_sha256") and b.get("checkpoint_sha256"):
        return a["checkpoint_sha256"] == b["checkpoint_sha256"] and a.get("model_name") == b.get("model_name")
    return (a.get("model_name"), a.get("pretrained")) == (b.get("model_name"), b.get("pretrained"))


def config_digest(config: dict[str, Any] | None) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest() if config else ""
