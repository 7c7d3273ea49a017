"""Training on images through the image tower: fine-tuning (``tune --method finetune``, LP-FT, WiSE-FT),
VPT and MaPLe (``--method vpt|maple``, models/image_prompts.py).

The model is the features file's image tower followed by a linear head on its L2-normalised
embeddings, started from the zero-shot classifier (``logit_scale.exp() x`` the class-name prompt
embeddings, bias 0, as ``classifier-zs``), as in WiSE-FT and FLYP. A step decodes a batch of
training images, draws one augmented view per image (extraction's random resized crop + flip,
seeded by seed, epoch and image row), runs tower + head, and takes an optimiser step on the trained
tower tensors (``--train-layers``) and the head. The schedule, optimiser, losses, clean/noisy split
and checkpoints are tune's (``learning/training.py``), so every tune option means the same here.

The tower runs in eval mode while it trains: BatchNorm statistics and dropout stay as pretrained
(few-shot batches are too small for batch statistics; and a step then does not depend on how a
batch is split across processes). Each epoch ends with one pass over the plain centre crops of the
training images through the current tower: the log's accuracy, and the next epoch's OT split.

One engine (:func:`finetune`) runs every image method; an :class:`ImageMethod` says what differs:
which tensors train, how pixels become an embedding and logits (``model``), the classifier on plain
embeddings (``model.head``: the log's accuracy, the OT split), what a checkpoint and the output file
hold, and what the metadata records. ``extract --adapter`` installs the output for extraction
(``models/image_adapter.apply_adapter``). VPT and MaPLe keep every CLIP weight frozen: VPT trains
prompt tokens under the frozen zero-shot classifier; MaPLe trains text prompts and their coupling to
vision prompts, and its classifier is the class text features of its prompts.

``--lp-ft`` first trains the head alone on the cached (frozen) features, tune's linear-probe loop
(``--lp-epochs``, lr 1.0), then fine-tunes from it (Kumar et al. 2022). ``--wise-alpha A`` also
writes ``(1 - A) x zero-shot + A x fine-tuned`` for every trained tensor (Wortsman et al. 2022).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptcli.choices import Optimizer
from promptcli.errors import InputError, warn_user
from promptcli.io.checks import check_step
from promptcli.io.fileio import OutputTaken, locks_output
from promptcli.learning.divergence import divergence_suspects, fp16_suspect
from promptcli.learning.options import (
    DEFAULT_WEIGHT_DECAY,
    FINETUNE_LR,
    LINEAR_LR,
    OptimConfig,
    TuneOptions,
)
from promptcli.learning.shards import Shard

# The centre-crop embeddings the tower computes for the training images must match the features
# file's rows: a lower cosine means the images are not the ones that were extracted.
MATCH_COSINE = 0.98
MATCH_COSINE_HALF = 0.95  # when the features were extracted in fp16/bf16
MAX_VPT_TOKENS = 1024  # the VPT paper goes up to 200; far beyond, training only stalls
# Default learning rates without --lr. The head scales logits by the model's logit scale (~50 in
# CLIP), so tower gradients are ~50x a unit-scale head's; CoOp's 0.002 wrecks the demo's tower within
# an epoch (train clean accuracy 0.43 -> 0.16; AdamW 1e-5 and SGD 1e-4 do not, measured on the demo at
# 16 shots, 50% noise). AdamW 1e-5 is WiSE-FT's order of magnitude (3e-5 at batch 512).


@dataclass
class FinetuneOptions:
    """What training on images adds to tune's options (finetune, vpt, maple)."""

    train_layers: str = "all"
    images: str | None = None
    skip_bad: bool = False
    workers: int = 2
    precision: str | None = None  # None: bf16 (else fp16) autocast on GPU with amp, fp32 on CPU
    lp_ft: bool = False
    lp_epochs: int = 50
    wise_alphas: list[float] = field(default_factory=list)
    vpt_depth: str = "deep"  # vpt: shallow (input only) or deep (a fresh set before every block)
    vpt_tokens: int = 8  # vpt: prompt tokens per layer (0: none, the zero-shot tower)
    maple_depth: int = 9  # maple: J, the layers with prompts (the paper's 9 of ViT-B/16's 12)

    def validate(self, method: str = "finetune") -> FinetuneOptions:
        from promptcli.choices import IMAGE_METHODS, VptDepth
        from promptcli.models.image_adapter import parse_train_layers

        if method not in IMAGE_METHODS:
            raise ValueError(f"{method} does not train on images")
        parse_train_layers(self.train_layers)
        VptDepth.check(self.vpt_depth, "--vpt-depth")
        if self.vpt_tokens < 0:
            raise InputError("must be >= 0", where="--vpt-tokens", hint="VPT's CLIP baselines use 8")
        if self.vpt_tokens > MAX_VPT_TOKENS:  # each token lengthens every image's sequence in every layer
            raise InputError(
                f"{self.vpt_tokens} prompt tokens per layer is more than the {MAX_VPT_TOKENS} promptcli allows",
                where="--vpt-tokens",
                hint="VPT's CLIP baselines use 8, its largest setting 200",
            )
        if self.maple_depth < 1:
            raise InputError("must be >= 1", where="--maple-depth", hint="the paper uses 9")
        if method != "finetune":
            given = [
                ("--train-layers", self.train_layers.strip().lower() != "all"),
                ("--lp-ft", self.lp_ft),
                ("--wise-alpha", bool(self.wise_alphas)),
            ]
            for option, is_given in given:
                if is_given:
                    raise InputError(
                        f"{option} applies to --method finetune; {method} keeps the CLIP weights frozen",
                        where=option,
                        hint=f"drop {option}",
                    )
        if self.workers < 0:
            raise InputError("must be >= 0", where="--workers", hint="0 decodes in the main process")
        if self.lp_epochs < 0:
            raise InputError("must be >= 0", where="--lp-epochs", hint="epochs of the linear probe")
        for a in self.wise_alphas:
            if not (0.0 <= a <= 1.0 and math.isfinite(a)):
                raise InputError(f"{a} is not in [0, 1]", where="--wise-alpha", hint="e.g. --wise-alpha 0.5")
        if len(set(self.wise_alphas)) != len(self.wise_alphas):
            raise InputError("an alpha is given twice", where="--wise-alpha", hint="give each alpha once")
        if self.precision is not None and self.precision not in ("fp32", "fp16", "bf16"):
            raise InputError(
                f"unknown precision {self.precision!r}", where="--precision", hint="use fp32, fp16 or bf16"
            )
        return self


def check_optim(optim: OptimConfig) -> None:
    """tune's checks, except that fine-tuning accepts --lr 0 (a run that changes nothing)."""
    if not (optim.lr >= 0 and math.isfinite(optim.lr)):
        raise InputError("must be >= 0", where="--lr", hint="see `promptcli tune --help`")
    replace(optim, lr=max(optim.lr, 1.0)).validate()


def _autocast_dtype(precision: str | None, device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype of training (None: fp32)."""
    from promptcli.models.devices import amp_dtype, resolve_precision

    if precision is None:
        if not (amp and device.type == "cuda"):
            return None
        return amp_dtype(device)
    dtype = resolve_precision(precision, device)  # half precision on CPU is refused here
    return None if dtype == torch.float32 else dtype


class TowerClassifier(torch.nn.Module):
    """The image tower, L2 normalisation and a linear head: pixels -> logits."""

    def __init__(self, visual: torch.nn.Module, head: torch.nn.Module, channels_last: bool) -> None:
        super().__init__()
        self.visual, self.head, self.channels_last = visual, head, channels_last

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        emb = self.visual(pixels).float()
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(pixels))


@dataclass
class ImageRun:
    """Everything a fine-tuning run reads, resolved and checked."""

    fs: Any
    joined: Any
    index: np.ndarray
    rows: np.ndarray  # features-file row of each training image
    files: list[Path]
    labels: torch.Tensor
    clean: torch.Tensor | None
    is_noisy: torch.Tensor | None
    features_sha: str
    labels_sha: str
    labels_source: str
    skipped_images: list[dict[str, str]] = field(default_factory=list)


def read_inputs(
    features_path: str | Path,
    labels_path: str | Path,
    options: TuneOptions,
    ft: FinetuneOptions,
    warn: Callable[[str], None],
) -> ImageRun:
    """Features file, labels (joined, --shots sampled) and the training images' files."""
    from promptcli.io.features import read_features
    from promptcli.io.fileio import sha256_bytes, sha256_file
    from promptcli.io.image_dataset import image_files
    from promptcli.io.labels import join_labels, read_labels
    from promptcli.learning.tune_run import sample_shots

    fs = read_features(features_path, load_views=ft.lp_ft and options.use_views)
    if fs.attrs.get("adapter_sha256"):
        raise InputError(
            "these features were extracted through a fine-tuned tower (--adapter)",
            where=features_path,
            hint="fine-tune from features of the base model (extract without --adapter)",
        )
    table = read_labels(labels_path)
    labels_sha = (
        sha256_bytes(table.text.encode("utf-8")) if str(labels_path) == "-" else sha256_file(labels_path)
    )
    joined = join_labels(fs, table, skip_missing=options.skip_missing)
    index = np.arange(len(joined.labels))
    if options.shots is not None:
        index, short = sample_shots(joined.labels, options.shots, options.seed, len(fs.classnames))
        for c, have in short.items():
            warn(
                f"class {fs.classnames[c]!r} has only {have} labelled image(s), fewer than --shots {options.shots}"
            )
    rows = joined.rows[index]
    files = image_files(fs.attrs, [fs.paths[r] for r in rows], features_path, ft.images)
    run = ImageRun(
        fs=fs,
        joined=joined,
        index=index,
        rows=rows,
        files=files,
        labels=torch.from_numpy(joined.labels[index]),
        clean=None if joined.clean is None else torch.from_numpy(joined.clean[index]),
        is_noisy=None if joined.is_noisy is None else torch.from_numpy(joined.is_noisy[index]),
        features_sha=sha256_file(features_path),
        labels_sha=labels_sha,
        labels_source=table.source,
    )
    missing = [i for i, f in enumerate(files) if not f.is_file()]
    if missing and not ft.skip_bad:
        raise InputError(
            "image not found" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            where=files[missing[0]],
            hint="pass --images DIR (the folder the features' paths are relative to now), or --skip-bad",
        )
    for i in missing:
        warn(f"skipped {files[i]}: image not found")
    drop(run, {i: "image not found" for i in missing})
    return run


def drop(run: ImageRun, bad: dict[int, str]) -> None:
    """Leave the training images ``bad`` (position -> error) out, recording them."""
    if not bad:
        return
    keep = np.array([i for i in range(len(run.files)) if i not in bad], dtype=np.int64)
    if len(keep) == 0:
        raise InputError("no readable training image", where=run.files[min(bad)], hint="check --images")
    run.skipped_images += [{"path": run.fs.paths[run.rows[i]], "error": e} for i, e in sorted(bad.items())]
    sel = torch.from_numpy(keep)
    run.index, run.rows = run.index[keep], run.rows[keep]
    run.files = [run.files[i] for i in keep]
    run.labels = run.labels[sel]
    run.clean = None if run.clean is None else run.clean[sel]
    run.is_noisy = None if run.is_noisy is None else run.is_noisy[sel]


class PlainEncoder:
    """Centre-crop embeddings of all training images through the current tower (no gradients)."""

    def __init__(
        self, loader, sampler, model: TowerClassifier, device, dtype, shard: Shard, batch: int, dim: int
    ):
        self.loader, self.sampler, self.model = loader, sampler, model
        self.device, self.dtype, self.shard, self.batch, self.dim = device, dtype, shard, batch, dim

    @torch.no_grad()
    def __call__(self, n: int, bad: dict[int, str] | None = None) -> torch.Tensor:
        """(n, D) float32 on CPU. An unreadable image stops every process with its name, or, given a
        ``bad`` dict, is recorded there (position -> error; its row stays zero)."""
        from promptcli.io.image_dataset import raise_bad

        mine = self.shard.part(torch.arange(n))
        self.sampler.set([b.tolist() for b in mine.split(self.batch) if len(b)], -1)
        found: dict[int, str] = {}
        index_parts, emb_parts = [], []
        for index, pixels, errors in self.loader:
            if errors:  # decode the rest of the batch one by one
                found.update({int(i): e for i, e in errors})
                index = index[torch.tensor([int(i) not in found for i in index], dtype=torch.bool)]
                if not len(index):
                    continue
                pixels = self._reload(index)
            with _autocast(self.device, self.dtype):
                emb = self.model.embed(pixels.to(self.device, non_blocking=True))
            index_parts.append(index)
            emb_parts.append(emb.float().cpu())
        index = torch.cat(index_parts) if index_parts else torch.zeros(0, dtype=torch.long)
        emb = torch.cat(emb_parts) if emb_parts else torch.zeros(0, self.dim)
        out = self.shard.gather_rows(index, emb, n)
        found = self.shard.merge(found)  # every process learns of every unreadable image
        if found and bad is None:
            raise_bad(self.loader.dataset.files, sorted(found.items()))
        if bad is not None:
            bad.update(found)
        return out

    def _reload(self, index: torch.Tensor) -> torch.Tensor:
        dataset = self.loader.dataset
        return torch.stack([dataset[(int(i), -1)][1] for i in index])


def _autocast(device: torch.device, dtype: torch.dtype | None):
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _accuracy(head: torch.nn.Module, feats: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    from promptcli.models.heads import predict_logits

    if labels is None or len(labels) == 0:
        return None
    return float((predict_logits(head, feats).argmax(dim=1) == labels).float().mean().item())


def check_match(plain: torch.Tensor, run: ImageRun) -> None:
    """Refuse images whose pretrained embedding differs from the features file's row (wrong images)."""
    stored = torch.from_numpy(run.fs.features[run.rows]).float()
    stored = stored / stored.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (plain * stored).sum(dim=1)
    half = str(run.fs.attrs.get("precision", "float32")) not in ("float32", "fp32")
    limit = MATCH_COSINE_HALF if half else MATCH_COSINE
    worst = int(cos.argmin())
    if len(cos) and float(cos[worst]) < limit:
        raise InputError(
            f"the image's embedding differs from the features file's row {int(run.rows[worst])} "
            f"(cosine {float(cos[worst]):.3f} < {limit}): not the image that was extracted",
            where=run.files[worst],
            hint="pass --images DIR pointing at the images the features were extracted from",
        )


def zero_shot_head(
    loaded: Any, classnames: list[str], template: str, method: str = "finetune"
) -> torch.nn.Module:
    """The classifier-zs head: ``logit_scale.exp() x`` class-name prompt embeddings, bias 0."""
    from promptcli.models.heads import LinearHead, model_logit_scale
    from promptcli.models.zeroshot import class_text_embeddings, resolve_templates

    resolve_templates([template])
    text = class_text_embeddings(loaded, classnames, [template]).float().cpu()
    return LinearHead(text.shape[1], len(classnames), method, weight=model_logit_scale(loaded) * text)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in tensors.items()}


class ImageMethod:
    """What an image method trains and writes; :func:`finetune` runs every one alike.

    ``model`` maps pixels to logits (``model.embed``: the normalised embedding; ``model.head``: the
    classifier on embeddings). :meth:`state` holds every trained tensor (checkpoints; CPU float32),
    :meth:`file_tensors` what the output file holds, :meth:`describe` its metadata block.
    """

    name: str
    model: TowerClassifier

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        raise NotImplementedError

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups(0.0) for p in g["params"]]

    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state(self, tensors: dict[str, torch.Tensor], where: Any) -> None:
        raise NotImplementedError

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return self.state()

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def trained_text(self) -> str:
        """What trained, for the closing message."""
        raise NotImplementedError

    def method_params(self) -> dict[str, Any]:
        """The method's own settings, recorded as ``method_params`` (``report`` keeps them apart)."""
        return {}

    def base_tower(self):
        """A context in which ``model.embed`` is the pretrained tower's (for the images' match check)."""
        import contextlib

        return contextlib.nullcontext()


class TowerFinetune(ImageMethod):
    """``finetune``: the image tower's tensors (``--train-layers``) and a zero-shot-initialised linear head."""

    name = "finetune"

    def __init__(self, loaded: Any, classnames: list[str], options: TuneOptions, ft: FinetuneOptions) -> None:
        from promptcli.extraction.extract import is_convolutional
        from promptcli.models.image_adapter import set_trainable, tower_state, trainable_names

        visual = loaded.model.visual
        self.names, self.layers_info = trainable_names(visual, ft.train_layers)
        head = zero_shot_head(loaded, classnames, options.template)
        self.zero_state = {**tower_state(visual, self.names), **head.learnable_state()}
        channels_last = is_convolutional(visual)
        if channels_last:
            visual.to(memory_format=torch.channels_last)
        self.visual, self.head = visual, head
        self.model = TowerClassifier(visual, head, channels_last)
        self.tower_params = set_trainable(visual, self.names)
        head.requires_grad_(True)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return [
            {"params": self.tower_params, "weight_decay": weight_decay},
            *self.head.param_groups(weight_decay),
        ]

    def state(self) -> dict[str, torch.Tensor]:
        from promptcli.models.image_adapter import tower_state

        return {**tower_state(self.visual, self.names), **_cpu(self.head.learnable_state())}

    def load_state(self, tensors: dict[str, torch.Tensor], where: Any) -> None:
        from promptcli.models.image_adapter import load_tower_state

        load_tower_state(self.visual, tensors, where)
        device = self.head.weight.device
        self.head.load_learnable_state(
            {k: v.to(device) for k, v in tensors.items() if k in ("weight", "bias")}
        )

    def describe(self) -> dict[str, Any]:
        return {
            **self.layers_info,
            "tensors": sorted(k for k in self.state() if k.startswith("visual.")),
            "head_init": "logit_scale.exp() x zero-shot text embeddings of --template, bias 0",
        }

    def trained_text(self) -> str:
        return f"the image tower ({self.layers_info['train_layers']})"


class VptMethod(ImageMethod):
    """``vpt``: prompt tokens in the frozen ViT under the frozen zero-shot classifier."""

    name = "vpt"

    def __init__(
        self, loaded: Any, classnames: list[str], options: TuneOptions, ft: FinetuneOptions, generator
    ) -> None:
        from promptcli.models.image_prompts import PromptedViT, VptPrompts, check_vit

        visual = loaded.model.visual
        check_vit(visual, self.name)
        loaded.model.requires_grad_(False)
        self.prompts = VptPrompts(visual, ft.vpt_depth, ft.vpt_tokens, generator).to(
            visual.conv1.weight.device
        )
        self.head = zero_shot_head(loaded, classnames, options.template, method=self.name)
        self.head.requires_grad_(False)
        self.tower = PromptedViT(visual, self.prompts)
        self.model = TowerClassifier(self.tower, self.head, False)
        self.template = options.template

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": [self.prompts.tokens], "weight_decay": weight_decay}]

    def state(self) -> dict[str, torch.Tensor]:
        from promptcli.models.image_prompts import VISION_PROMPTS

        return _cpu({VISION_PROMPTS: self.prompts.tokens})

    def load_state(self, tensors: dict[str, torch.Tensor], where: Any) -> None:
        from promptcli.models.image_prompts import VISION_PROMPTS

        with torch.no_grad():
            self.prompts.tokens.copy_(tensors[VISION_PROMPTS].to(self.prompts.tokens.device))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.state(), **_cpu(self.head.learnable_state())}

    def describe(self) -> dict[str, Any]:
        tokens = self.prompts.tokens
        return {
            "depth": self.prompts.depth,
            "tokens": int(tokens.shape[1]),
            "layers": int(tokens.shape[0]),
            "init": f"uniform(-v, v), v = sqrt(6 / (3 * patch^2 + width)) = {self.prompts.init_bound:.6g} (VPT's)",
            "position": "after the class token, no position embedding; inserted before ln_pre, "
            "deep: replaced before every block; dropped before pooling",
            "head": "frozen: logit_scale.exp() x zero-shot text embeddings of --template, bias 0",
            "template": self.template,
        }

    def trained_text(self) -> str:
        return f"{self.prompts.depth} VPT prompts ({int(self.prompts.tokens.shape[1])} tokens)"

    def method_params(self) -> dict[str, Any]:
        return {"vpt_depth": self.prompts.depth, "vpt_tokens": int(self.prompts.tokens.shape[1])}

    def base_tower(self):
        return self.tower.disabled()


class MapleMethod(ImageMethod):
    """``maple``: text prompts and their linear coupling to vision prompts, both towers frozen."""

    name = "maple"

    def __init__(
        self, loaded: Any, classnames: list[str], options: TuneOptions, ft: FinetuneOptions, generator
    ) -> None:
        from promptcli.models.heads import model_logit_scale
        from promptcli.models.image_prompts import MapleHead, MaplePrompts, PromptedViT, check_vit
        from promptcli.models.zeroshot import resolve_templates

        visual = loaded.model.visual
        check_vit(visual, self.name)
        resolve_templates([options.template])
        loaded.model.requires_grad_(False)
        self.prompts = MaplePrompts(
            loaded, visual, classnames, options.template, ft.maple_depth, generator=generator
        )
        self.head = MapleHead(self.prompts, model_logit_scale(loaded))
        self.tower = PromptedViT(visual, self.prompts)
        self.model = TowerClassifier(self.tower, self.head, False)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": list(self.prompts.parameters()), "weight_decay": weight_decay}]

    def state(self) -> dict[str, torch.Tensor]:
        return self.prompts.file_tensors()

    def load_state(self, tensors: dict[str, torch.Tensor], where: Any) -> None:
        self.prompts.load_file_tensors(tensors, where)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        from promptcli.models.image_prompts import VISION_PROMPTS

        with torch.no_grad():
            vision = torch.stack(self.prompts.vision_prompts()).float().cpu()
        return {**self.state(), VISION_PROMPTS: vision, **self.head.linear_state()}

    def describe(self) -> dict[str, Any]:
        p = self.prompts
        return {
            "depth": p.depth,
            "n_ctx": p.n_ctx,
            "ctx_init": p.ctx_init,
            "template": p.template,
            "text_init": f"P_0 from the template's first {p.n_ctx} words; P_1..P_J-1 ~ N(0, 0.02)",
            "coupling": "F_i(P_i) = W_i P_i + b_i, Linear(text width -> vision width), nn.Linear's init",
            "position": "text: after the start token (P_i replaces them before text block i < J); vision: "
            "after the class token, no position embedding (F_i(P_i) before block i < J; F_0(P_0) before ln_pre)",
            "head": "logit_scale.exp() x the normalised class text features with the learned prompts",
        }

    def trained_text(self) -> str:
        return f"MaPLe prompts (depth {self.prompts.depth}, {self.prompts.n_ctx} tokens)"

    def method_params(self) -> dict[str, Any]:
        return {"maple_depth": self.prompts.depth}

    def base_tower(self):
        return self.tower.disabled()


def _fingerprint_of(checkpoint: Path) -> str | None:
    """The fingerprint a readable checkpoint records, else None."""
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True).get("fingerprint")
    except Exception:  # unreadable: load_checkpoint has said so
        return None


def linear_probe_stage(
    head: torch.nn.Module,
    run: ImageRun,
    options: TuneOptions,
    ft: FinetuneOptions,
    loss_fn: torch.nn.Module,
    optim: OptimConfig,
    device: torch.device,
) -> dict[str, Any]:
    """LP of LP-FT: tune's loop on the cached features trains ``head`` in place; returns its record."""
    from promptcli.learning.training import TrainData, train

    fs = run.fs
    data = TrainData(
        features=torch.from_numpy(fs.features[run.rows]),
        labels=run.labels,
        views=None if fs.views is None or not options.use_views else torch.from_numpy(fs.views[run.rows]),
        clean=run.clean,
        is_noisy=run.is_noisy,
    )
    # tune's linear-probe loop with its own settings: SGD at lr 1.0, weight decay 5e-4 (the tower's AdamW, or an
    # AdamW-sized weight decay such as 0.1, at that rate throws the head away)
    config = replace(
        optim,
        optimizer=Optimizer.SGD.value,
        lr=LINEAR_LR,
        weight_decay=DEFAULT_WEIGHT_DECAY,
        epochs=ft.lp_epochs,
    )
    result = train(
        head, data, loss_fn, config, seed=options.seed, device=device, amp=False, split=options.split_config()
    )
    return {"optimizer": config.to_dict(), "metrics": result.final, "history": result.history}


@locks_output("output", "log_path", group="shard")
def finetune(
    features_path: str | Path,
    labels_path: str | Path,
    output: str | Path,
    options: TuneOptions,
    ft: FinetuneOptions,
    *,
    device: str = "auto",
    amp: bool = True,
    pretrained: str | None = None,
    resume: bool = False,
    force: bool = False,
    log_path: str | Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_images: Callable[[int], None] | None = None,
    info: Callable[[str], None] = lambda _: None,
    warn: Callable[[str], None] = warn_user,
    shard: Shard | None = None,
) -> dict[str, Any]:
    """Train ``options.method`` (finetune, vpt or maple) on images; write ``output`` (and WiSE files)."""
    from promptcli.choices import IMAGE_METHODS
    from promptcli.extraction.extract import augmentation
    from promptcli.io import provenance
    from promptcli.io.fileio import check_distinct, check_output_path, sha256_file
    from promptcli.io.image_dataset import EpochBatches, TrainImages, make_loader, raise_bad
    from promptcli.io.prompt_files import save_prompt
    from promptcli.io.sidecar import noise_summary, read_noise_sidecar
    from promptcli.learning.losses import loss_params, make_loss
    from promptcli.learning.training import (
        LoopState,
        load_checkpoint,
        make_optimizer,
        ot_split,
        save_checkpoint,
        split_loss,
    )
    from promptcli.learning.tune_run import (
        check_shared_options,
        finished_run,
        partial_path,
        remove_file,
        run_identity_text,
    )
    from promptcli.learning.tune_run import fingerprint as digest
    from promptcli.models.devices import resolve_device, runtime_record
    from promptcli.models.image_adapter import FINETUNE_METHOD, wise_interpolate, wise_path
    from promptcli.models.loading import load_model_from_record

    shard = shard or Shard()
    optimizer_given = options.optimizer is not None
    options = options.resolved()
    method_name = str(options.method)
    if method_name not in IMAGE_METHODS:
        raise ValueError(f"finetune() trains {', '.join(IMAGE_METHODS)}, not {method_name}")
    ft.validate(method_name)
    # the checks tune gives every method (seed, finite numbers, the method's and the loss's options)
    warnings = check_shared_options(options, split_ok=True)
    if not options.use_views and not (method_name == FINETUNE_METHOD and ft.lp_ft):
        # the cached views feed only the linear probe of LP-FT; the image tower sees augmented images
        warnings.append(
            "--no-views applies to training on cached features (tune's feature methods, finetune --lp-ft); "
            f"ignored for {method_name}{' without --lp-ft' if method_name == FINETUNE_METHOD else ''}, "
            "which trains on images"
        )
    split = options.split_config()
    loss_fn = make_loss(
        options.loss,
        q=options.q,
        alpha=options.alpha,
        beta=options.beta,
        label_smoothing=options.label_smoothing,
    )
    lr_given = options.lr is not None
    if method_name == FINETUNE_METHOD and options.lr is None and options.optimizer in FINETUNE_LR:
        options = replace(options, lr=FINETUNE_LR[options.optimizer])
    optim = options.optim_config(options.weight_decay)
    check_optim(optim)
    from promptcli.models.zeroshot import resolve_templates

    resolve_templates([options.template])  # one {} (checked before any file is read)
    for message in warnings:  # given once every check has passed
        warn(message)
    torch_device = resolve_device(device) if shard.world_size == 1 else torch.device(device)
    amp_dtype = _autocast_dtype(ft.precision, torch_device, amp)
    fp16 = fp16_suspect("--precision", "--precision bf16 or fp32") if amp_dtype == torch.float16 else None
    output = Path(output)
    wise_outputs = {a: wise_path(output, a) for a in ft.wise_alphas}
    partial = partial_path(output)
    # Every process checks (and so fails alike, none waiting for another); only rank 0 deletes.
    check_distinct(
        {"FEATURES": features_path, "LABELS": labels_path},
        {
            "-o": output,
            "--log": log_path,
            "the checkpoint -o.partial": partial,
            **{f"--wise-alpha {a:g}": path for a, path in wise_outputs.items()},
        },
    )
    # what a finished run recorded of its image-method options (workers and the images' folder change nothing)
    identity_extra = {"finetune": {**asdict(ft), "workers": None, "images": None}}
    if resume and not force and output.exists() and not partial.exists():
        if all(path.exists() for path in wise_outputs.values()):
            finished = finished_run(output, features_path, labels_path, options, identity_extra)
            if finished is not None:  # this same run had finished (a requeued job's step)
                return {**finished, "wise_outputs": {f"{a:g}": str(p) for a, p in wise_outputs.items()}}
    check_output_path(output, force)
    for path in wise_outputs.values():
        check_output_path(path, force, option="--wise-alpha")
    if partial.exists() and not resume and not force:
        raise InputError(
            "an interrupted tune left a checkpoint",
            where=partial,
            hint="pass --resume to continue it, or --force to start over",
        )
    if log_path is not None:  # on resume the log is rewritten (checked below to be this run's)
        check_output_path(log_path, force or resume, option="--log")
    shard.barrier()
    if partial.exists() and not resume and shard.is_main:
        remove_file(partial)
    shard.barrier()

    run = read_inputs(features_path, labels_path, options, ft, warn)
    fs = run.fs
    loaded = load_model_from_record(
        fs.attrs, source=fs.path, pretrained=pretrained, device=str(torch_device), dim=fs.dim
    )
    classnames = list(fs.classnames)
    init_generator = torch.Generator().manual_seed(options.seed)  # prompt initialisation
    method: ImageMethod
    if method_name == FINETUNE_METHOD:
        method = TowerFinetune(loaded, classnames, options, ft)
    elif method_name == "vpt":
        method = VptMethod(loaded, classnames, options, ft, init_generator)
    else:
        method = MapleMethod(loaded, classnames, options, ft, init_generator)
    head = method.model.head
    model = method.model.to(torch_device)
    model.eval()  # see the module docstring: BatchNorm statistics and dropout stay as pretrained

    def make_encoder() -> PlainEncoder:
        dataset = TrainImages(
            run.files,
            [int(r) for r in run.rows],
            loaded.preprocess,
            augmentation(loaded.preprocess_cfg),
            options.seed,
        )
        sampler = EpochBatches()
        loader = make_loader(dataset, sampler, ft.workers, torch_device.type == "cuda")
        return PlainEncoder(loader, sampler, model, torch_device, amp_dtype, shard, optim.batch_size, fs.dim)

    encode = make_encoder()

    # The pretrained tower's centre crops: finds unreadable images, checks they are the extracted ones.
    bad: dict[int, str] = {}
    with method.base_tower():
        plain: torch.Tensor | None = encode(len(run.files), bad)
    if bad and not ft.skip_bad:
        raise_bad(run.files, sorted(bad.items()))
    if bad:
        for i, e in sorted(bad.items()):
            warn(f"skipped {run.files[i]}: {e}")
        keep = torch.tensor([i for i in range(len(run.files)) if i not in bad], dtype=torch.long)
        drop(run, bad)
        plain = plain[keep]
        encode = make_encoder()  # a fresh loader: persistent workers hold the old file list
    loader, sampler = encode.loader, encode.sampler
    check_match(plain, run)
    if method_name != FINETUNE_METHOD:
        plain = None  # the prompted tower's embeddings differ: computed when needed
    n = len(run.files)
    labels, clean = run.labels, run.clean
    noise = read_noise_sidecar(labels_path, warn)
    record = fs.model_record()
    run_info: dict[str, Any] = {
        "method": method_name,
        "loss": options.loss,
        "loss_params": loss_params(loss_fn),
        "seed": options.seed,
        "shots": options.shots,
        "noise": noise_summary(noise),
        "model": {k: str(record[k]) for k in ("model_name", "pretrained", "checkpoint_sha256")},
        "runtime": runtime_record(torch_device, amp_dtype),
    }
    if method.method_params():
        run_info["method_params"] = method.method_params()
    if split is not None:
        run_info["split"] = {"method": split.method, "noisy_loss": split.noisy_loss, "epsilon": split.epsilon}
    if ft.lp_ft:
        run_info["lp_ft"] = True

    def run_identity(opts: TuneOptions) -> dict[str, Any]:
        return {
            "features": run.features_sha,
            "labels": run.labels_sha,
            "options": asdict(opts),
            "finetune": {**asdict(ft), "wise_alphas": None, "workers": None, "images": None}
            if method_name == FINETUNE_METHOD
            else {**asdict(ft), "workers": None, "images": None},
            "rows": run.rows.tolist(),
            "weight_decay": optim.weight_decay,
        }

    def run_fingerprint(opts: TuneOptions) -> str:
        return digest(run_identity(opts))

    run_id = run_fingerprint(options)
    # recorded in the checkpoint (without the rows: a list of every labelled row) to name what a refused
    # resume changed
    identity_text = json.dumps({**run_identity(options), "rows": None}, sort_keys=True, default=str)
    state = None
    if resume and partial.exists():
        try:
            state = load_checkpoint(partial, run_id, identity_text)
        except InputError:
            if method_name == FINETUNE_METHOD and not optimizer_given:
                # started before finetune's default optimiser became AdamW? Then name the option that changed
                sgd = replace(options, optimizer="sgd", lr=options.lr if lr_given else FINETUNE_LR["sgd"])
                if _fingerprint_of(partial) == run_fingerprint(sgd):
                    raise InputError(
                        "the interrupted run trained with SGD, finetune's default optimiser before it became AdamW",
                        where=partial,
                        hint="resume with --optimizer sgd added to the same command line",
                    ) from None
            raise
    lp_record: dict[str, Any] | None = None
    if state is None and ft.lp_ft:
        info(f"Linear probe on the frozen features ({ft.lp_epochs} epochs), then fine-tuning")
        lp_record = linear_probe_stage(head, run, options, ft, loss_fn, optim, torch_device)
        head.to(torch_device)
        assert plain is not None
        plain_head_acc = _accuracy(head, plain.to(torch_device), labels.to(torch_device))
        lp_record["plain_accuracy_before_ft"] = plain_head_acc
        shard.broadcast(list(head.parameters()))

    optimizer = make_optimizer(method.param_groups(optim.weight_decay), optim)
    generator = torch.Generator().manual_seed(options.seed)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    loop = LoopState(optimizer, generator, scaler, history=[])
    history = loop.history
    start = 0
    if state is not None:
        trained = state["trained"] if "trained" in state else {**state["tower"], **state["head"]}
        method.load_state(trained, partial)
        start = loop.restore(state)
        lp_record = state.get("lp") or None
        plain = None  # the tower changed: recomputed when needed
        info(f"Resuming from {partial} after epoch {start}")

    log_handle = None
    if log_path is not None and shard.is_main:
        log_handle = open(log_path, "w", encoding="utf-8")
        for row in history:
            log_handle.write(json.dumps({**row, "run": run_info}, sort_keys=True) + "\n")
        log_handle.flush()

    is_noisy = run.is_noisy if run.is_noisy is not None else (None if clean is None else labels != clean)
    params = method.parameters()
    try:
        for epoch in range(start, optim.epochs):
            t0 = time.perf_counter()
            lr = optim.lr_at(epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            suspects = divergence_suspects(optim, epoch, loss_fn, fp16=fp16)
            split_row: dict[str, Any] = {}
            judged = None
            if split is not None:  # the split of plain features under the model at the epoch's start
                if plain is None:
                    plain = encode(n)
                judged = ot_split(head, plain.to(torch_device), labels.to(torch_device), split).cpu()
                split_row = {"n_judged_clean": int(judged.sum())}
                if is_noisy is not None:
                    from promptcli.learning.transport import split_quality

                    q = split_quality(judged, is_noisy.bool())
                    split_row.update(clean_precision=q["clean_precision"], clean_recall=q["clean_recall"])
            batches = torch.randperm(n, generator=generator).split(optim.batch_size)
            parts = [shard.part(b) for b in batches]
            sampler.set([p.tolist() for p in parts if len(p)], epoch)
            feed = iter(loader)
            total = 0.0
            for step, (batch, mine) in enumerate(zip(batches, parts), start=1):
                optimizer.zero_grad(set_to_none=True)
                value, largest, errors = 0.0, 0.0, []
                if len(mine):  # a rank whose share of a small last batch is empty adds zero gradients
                    index, pixels, errors = next(feed)
                if shard.total([float(len(errors))])[0]:  # an image became unreadable: every process stops
                    raise_bad(run.files, sorted(shard.merge(dict(errors)).items()))
                if len(mine):
                    targets = labels[index].to(torch_device)
                    with _autocast(torch_device, amp_dtype):
                        logits = model(pixels.to(torch_device, non_blocking=True))
                    # every loss is a mean over rows: scaled to this process's share of the global batch
                    share = len(index) / len(batch)
                    if judged is None:
                        loss = loss_fn(logits.float(), targets) * share
                    else:
                        mask = judged[index].to(torch_device)
                        loss = split_loss(loss_fn, logits.float(), targets, mask, split.noisy_loss) * share
                    scaler.scale(loss).backward()
                    value = float(loss.detach().item())
                    largest = float(logits.detach().abs().max().item())
                shard.reduce_grads(params)
                # over processes (the loss summed, the logit the largest): every one sees the same and stops together
                [value], largest = shard.total([value]), shard.maximum(largest)
                check_step(value, largest, len(run.fs.classnames), epoch + 1, step, suspects)
                scaler.step(optimizer)
                scaler.update()
                total += value * len(batch)
                if on_images is not None:
                    on_images(len(batch))
            plain = encode(n)
            row = {
                "epoch": epoch + 1,
                "loss": total / n,
                "lr": lr,
                "accuracy": _accuracy(head, plain.to(torch_device), labels.to(torch_device)),
                "clean_accuracy": _accuracy(
                    head, plain.to(torch_device), None if clean is None else clean.to(torch_device)
                ),
                **split_row,
                "time": time.perf_counter() - t0,
            }
            history.append(row)
            if shard.is_main:
                save_checkpoint(
                    partial,
                    loop.checkpoint(
                        run_id, epoch + 1, trained=method.state(), lp=lp_record or {}, identity=identity_text
                    ),
                )
            if log_handle is not None:
                log_handle.write(json.dumps({**row, "run": run_info}, sort_keys=True) + "\n")
                log_handle.flush()
            if on_epoch is not None:
                on_epoch(row)
    finally:
        if log_handle is not None:
            log_handle.close()

    if plain is None:
        plain = encode(n)
    final = {
        "epochs": optim.epochs,
        "n_train": n,
        "loss": history[-1]["loss"] if history else None,
        "train_accuracy": _accuracy(head, plain.to(torch_device), labels.to(torch_device)),
        "train_clean_accuracy": _accuracy(
            head, plain.to(torch_device), None if clean is None else clean.to(torch_device)
        ),
    }
    tuned_state = method.file_tensors()
    image_run = {
        "precision": "fp32" if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
        "mode": "tower in eval mode (BatchNorm statistics and dropout as pretrained)",
        "augmentation": "RandomResizedCrop(scale=(0.08, 1), bicubic) + RandomHorizontalFlip, seeded by (seed, epoch, row)",
        "images": str(ft.images) if ft.images else str(fs.attrs.get("source", "")),
        "world_size": shard.world_size,
    }
    metadata: dict[str, Any] = {
        "method": method_name,
        "classnames": list(fs.classnames),
        "model_name": str(record["model_name"]),
        "pretrained": str(record["pretrained"]),
        "checkpoint_sha256": str(record["checkpoint_sha256"]),
        "model_config": str(record["model_config"]),
        "embed_dim": fs.dim,
        "template": options.template,
        "loss": options.loss,
        "loss_params": loss_params(loss_fn),
        "optimizer": optim.to_dict(),
        "seed": options.seed,
        "shots": options.shots,
        method_name: {**method.describe(), **image_run},
        "lp_ft": None if lp_record is None else {k: v for k, v in lp_record.items() if k != "history"},
        "skipped_images": run.skipped_images,
        "features_sha256": run.features_sha,
        "run_identity": run_identity_text(run.features_sha, run.labels_sha, options, identity_extra),
        "features_file": str(features_path),
        "labels_sha256": run.labels_sha,
        "labels_file": run.labels_source,
        "n_train": n,
        "n_skipped": run.joined.n_skipped,
        "metrics": final,
        "split": {"method": "none"} if split is None else split.to_dict(),
        "wise": None,
        "runtime": run_info["runtime"],
        **provenance.base_provenance(),
    }
    if method.method_params():
        metadata["method_params"] = method.method_params()
    if noise is not None:
        metadata["noise"] = noise_summary(noise)
    written: dict[str, str] = {}
    if shard.is_main:
        try:
            save_prompt(output, tuned_state, metadata)
        except (
            OutputTaken
        ) as taken:  # another command wrote -o meanwhile: the checkpoint keeps this run's work
            raise OutputTaken(output, kept=partial) from taken
        written[""] = str(output)
        tuned_sha = sha256_file(output)
        for alpha, path in wise_outputs.items():
            assert isinstance(method, TowerFinetune)
            tensors = wise_interpolate(method.zero_state, tuned_state, alpha)
            wise_meta = {
                **metadata,
                "metrics": None,
                "wise": {
                    "alpha": alpha,
                    "fine_tuned": str(output),
                    "fine_tuned_sha256": tuned_sha,
                    "formula": "(1 - alpha) x zero-shot + alpha x fine-tuned, per tensor",
                },
            }
            save_prompt(path, tensors, wise_meta)
            written[f"{alpha:g}"] = str(path)
        remove_file(partial)
    shard.barrier()
    times = [r["time"] for r in history[start:]]
    return {
        "output": str(output),
        "wise_outputs": {k: v for k, v in written.items() if k},
        "method": method_name,
        "loss": loss_params(loss_fn),
        "optimizer": optim.to_dict(),
        "train_layers": method.layers_info if isinstance(method, TowerFinetune) else None,
        "trained": method.trained_text(),
        "lp_ft": metadata["lp_ft"],
        "weight_decay_search": [],
        "n_train": n,
        "n_skipped": run.joined.n_skipped,
        "skipped": run.joined.skipped[:20],
        "skipped_images": run.skipped_images,
        "resumed_from_epoch": start,
        "seconds_per_epoch": float(np.mean(times)) if times else None,
        "metrics": final,
        "split": None if split is None else split.to_dict(),
        "noise": noise_summary(noise),
        "log": str(log_path) if log_path is not None else None,
    }
