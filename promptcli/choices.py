"""Every fixed set of choices, defined once, as data.

Each set is a :class:`Choice` enum. The same definition drives the library's validation
(``Loss.check(value, "--loss")``), typer's ``[a|b|c]`` in ``--help`` (commands annotate options with
the enum) and the generated shell completions (which read the click choices). Adding a value here
adds it everywhere; what it *does* is registered next to its implementation (a loss in
``learning/losses.py``, a head in ``models/heads.py``...), and a test fails when the two disagree.

Importing this module is cheap: no torch.
"""

from __future__ import annotations

from enum import Enum

from promptcli.errors import InputError


class Choice(str, Enum):
    """A string-valued choice: prints, formats and compares as its value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def plain(cls, value: str | None) -> str | None:
        """``value`` as a plain ``str`` (or None): what the library and output files store."""
        return None if value is None else str(value.value if isinstance(value, Choice) else value)

    @classmethod
    def check(cls, value: str, option: str) -> str:
        """``value`` as a plain string when it is one of the choices, else a one-line error naming ``option``."""
        value = value.value if isinstance(value, Choice) else value
        if value not in cls.values():
            raise InputError(
                f"unknown value {value!r}", where=option, hint=f"use one of: {', '.join(cls.values())}"
            )
        return value


class Method(Choice):
    """``tune --method``: what is learned."""

    COOP = "coop"
    CLS_TUNING = "cls-tuning"
    FULL_PROMPT = "full-prompt"
    LINEAR_PROBE = "linear-probe"
    CLASSIFIER_ZS = "classifier-zs"
    FINETUNE = "finetune"  # trains the image tower on images (learning/finetune.py)
    KGCOOP = "kgcoop"  # CoOp + knowledge-guided regulariser (models/kgcoop.py)
    COCOOP = "cocoop"  # CoOp context shifted per image by a meta-net (models/cocoop.py)
    CLIP_ADAPTER = "clip-adapter"  # residual MLP on image features (models/clip_adapter.py)
    TIP_ADAPTER = "tip-adapter"  # training-free cache model (models/tip_adapter.py)
    TIP_ADAPTER_F = "tip-adapter-f"  # cache keys fine-tuned
    VPT = "vpt"  # visual prompt tokens in a frozen ViT image tower, on images (models/image_prompts.py)
    MAPLE = "maple"  # coupled text and vision prompts, on images (models/image_prompts.py)


# Methods that learn text prompts through the frozen text tower (the others are linear heads).
PROMPT_METHODS: tuple[str, ...] = (Method.COOP.value, Method.CLS_TUNING.value, Method.FULL_PROMPT.value)
LINEAR_METHODS: tuple[str, ...] = (Method.LINEAR_PROBE.value, Method.CLASSIFIER_ZS.value)
# CoOp variants: learn a CoOp context (and more), so they take the prompt options (--n-ctx, --ctx-init...).
COOP_VARIANTS: tuple[str, ...] = (Method.KGCOOP.value, Method.COCOOP.value)
# Heads on the zero-shot classifier (--template) and the cached image features; no text pass in training.
ZERO_SHOT_BASED: tuple[str, ...] = (
    Method.CLIP_ADAPTER.value,
    Method.TIP_ADAPTER.value,
    Method.TIP_ADAPTER_F.value,
)
TIP_METHODS: tuple[str, ...] = (Method.TIP_ADAPTER.value, Method.TIP_ADAPTER_F.value)
# Methods that train on images through the image tower (learning/finetune.py runs them all).
IMAGE_METHODS: tuple[str, ...] = (Method.FINETUNE.value, Method.VPT.value, Method.MAPLE.value)


class VptDepth(Choice):
    """``tune --method vpt --vpt-depth``: prompt tokens at the input only, or a fresh set before every block."""

    SHALLOW = "shallow"
    DEEP = "deep"


class Loss(Choice):
    """``--loss``: the training loss (see ``learning/losses.py``)."""

    CE = "ce"
    GCE = "gce"
    MAE = "mae"
    SCE = "sce"


class Optimizer(Choice):
    SGD = "sgd"
    ADAMW = "adamw"


class Schedule(Choice):
    """``tune --schedule``: the learning rate once the constant warm-up epochs are over (set per epoch)."""

    # cosine over the epoch index from epoch 0: the warm-up epochs stand in for its first ones
    COSINE = "cosine"
    # CoOp's code (Dassl's warm-up scheduler): the cosine starts at the full rate after the warm-up
    COOP = "coop"


# What an output file records as its schedule (the cosine's text is what files recorded before --schedule).
SCHEDULE_TEXT: dict[str, str] = {
    Schedule.COSINE.value: "constant warm-up then cosine (per epoch)",
    Schedule.COOP.value: "constant warm-up then cosine from the full rate (per epoch; CoOp's code)",
}


class ClassPosition(Choice):
    """Where the class name goes in a CoOp prompt."""

    END = "end"
    MIDDLE = "middle"
    FRONT = "front"


class Split(Choice):
    """``tune --split``: the per-epoch clean/noisy split."""

    NONE = "none"
    OT = "ot"


class NoisyLoss(Choice):
    """With ``--split ot``: the loss of samples judged noisy (``none`` drops them)."""

    MAE = "mae"
    NONE = "none"


class NoiseType(Choice):
    """``corrupt --type``: how wrong labels are drawn."""

    SYMMETRIC = "symmetric"
    PAIR = "pair"
    CONFUSION = "confusion"
    MATRIX = "matrix"


class ConfusionFrom(Choice):
    """``corrupt --type confusion``: where the class confusions come from."""

    TEXT = "text"
    PREDICTIONS = "predictions"


class Score(Choice):
    """``clean --score``: the per-row noise score."""

    MARGIN = "margin"
    POSTERIOR = "posterior"


class NoiseModel(Choice):
    """``clean --noise-model``: the noise channel of the posterior."""

    SYMMETRIC = "symmetric"
    CLASS = "class"


class PseudoLabelMethod(Choice):
    """``pseudolabel --method``: zero-shot predictions, or the transductive mixture over all images."""

    ZERO_SHOT = "zero-shot"
    TRANSDUCTIVE = "transductive"


class Precision(Choice):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class FeatureDtype(Choice):
    """``extract --dtype``: how features are stored."""

    FLOAT16 = "float16"
    FLOAT32 = "float32"


class TemplateSet(Choice):
    """``--templates``: a named set of prompt templates."""

    IMAGENET = "imagenet"
    IMAGENET_SIMPLE = "imagenet-simple"


class Metric(Choice):
    """``report --metric``."""

    TOP1 = "top1"
    TOP5 = "top5"
    MACRO = "macro"


class DatasetSplit(Choice):
    """``dataset --split``: which split's rows to write."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"
    ALL = "all"


# --device takes cuda:N too, so it is a free string; these are the values worth completing.
DEVICE_SUGGESTIONS: tuple[str, ...] = ("auto", "cpu", "cuda")
