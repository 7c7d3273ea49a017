"""Tune's settings as plain data: optimiser and schedule, the clean/noisy split, and all options.

Light on purpose (no torch): the CLI builds these objects before anything heavy is imported, and
:class:`TuneOptions` is the one definition that ``tune``, ``gradstats`` and the Python API share.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from promptcli.choices import LINEAR_METHODS, SCHEDULE_TEXT, Method, NoisyLoss, Optimizer, Schedule, Split
from promptcli.errors import InputError

DEFAULT_EPSILON = 0.1  # Sinkhorn entropic regularisation, in logit units
DEFAULT_ITERATIONS = 300

OPTIMIZERS = Optimizer.values()
# Weight decays tried for linear-probe when --weight-decay is not given (chosen on held-out labels).
WEIGHT_DECAY_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
HELD_OUT_FRACTION = 0.2
CHECKPOINT_VERSION = 1
SPLITS = Split.values()
NOISY_LOSSES = NoisyLoss.values()


DEFAULT_LR = 0.002  # CoOp
# The linear heads act on unit-norm features with weights of norm ~logit_scale: CoOp's 0.002 would
# leave them (nearly) where they start, so they default to a larger step (stable: the loss's curvature
# in the weights is at most ~1 for unit-norm inputs).
LINEAR_LR = 1.0
DEFAULT_EPOCHS = 50
# Methods whose paper sets other defaults (used when --epochs / --lr / --optimizer are not given).
# tip-adapter is training-free; cocoop's text pass is per image (its paper trains 10 epochs).
# vpt and maple: the schedules of MaPLe's code (5 epochs; SGD lr 0.0035 for MaPLe, 0.0025 for its VPT baseline).
METHOD_EPOCHS = {
    Method.TIP_ADAPTER.value: 0,
    Method.TIP_ADAPTER_F.value: 20,
    Method.COCOOP.value: 10,
    Method.VPT.value: 5,
    Method.MAPLE.value: 5,
}
# Batch sizes of the papers' configs: CoCoOp trains one image per step (its text pass is per image),
# MaPLe (and the VPT baseline of its code) four.
DEFAULT_BATCH = 32
METHOD_BATCH = {
    Method.COCOOP.value: 1,
    Method.VPT.value: 4,
    Method.MAPLE.value: 4,
    Method.TIP_ADAPTER_F.value: 256,
}
METHOD_LR = {Method.TIP_ADAPTER_F.value: 0.001, Method.VPT.value: 0.0025, Method.MAPLE.value: 0.0035}
# A whole tower's rate depends on the optimiser: the head's logit scale (~50) makes its gradients large, and CoOp's
# 0.002 wrecks a tower in an epoch.
FINETUNE_LR = {Optimizer.ADAMW.value: 1e-5, Optimizer.SGD.value: 1e-4}
# Fine-tuning a whole tower: AdamW at 1e-5, as every documented finetune run (SGD needs its own lr search).
METHOD_OPTIMIZER = {
    Method.TIP_ADAPTER_F.value: Optimizer.ADAMW.value,
    Method.FINETUNE.value: Optimizer.ADAMW.value,
}
# Tip-Adapter-F's code: AdamW with eps 1e-4 and its default weight decay 0.01, batch 256, no warm-up.
DEFAULT_WARMUP_EPOCHS = 1
METHOD_WARMUP_EPOCHS = {Method.TIP_ADAPTER_F.value: 0}
DEFAULT_WEIGHT_DECAY = 5e-4
METHOD_WEIGHT_DECAY = {Method.TIP_ADAPTER_F.value: 0.01}
DEFAULT_ADAM_EPS = 1e-8
METHOD_ADAM_EPS = {Method.TIP_ADAPTER_F.value: 1e-4}
# The short schedules taken from Dassl-based configs run as that code does: after the warm-up epoch the cosine
# starts at the full rate. promptcli's cosine counts the warm-up epoch as its first, which gives 31% less summed
# learning rate over 5 epochs and 18% over 10 (4% over the default 50, 1% over CoOp's 200).
METHOD_SCHEDULE = {
    Method.COCOOP.value: Schedule.COOP.value,
    Method.VPT.value: Schedule.COOP.value,
    Method.MAPLE.value: Schedule.COOP.value,
}


@dataclass
class OptimConfig:
    """Optimiser and schedule settings (CoOp's defaults)."""

    optimizer: str = "sgd"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    epochs: int = 50
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    batch_size: int = 32
    schedule: str = Schedule.COSINE.value
    adam_eps: float = DEFAULT_ADAM_EPS  # AdamW's epsilon (sgd ignores it)

    def validate(self) -> OptimConfig:
        if self.optimizer not in OPTIMIZERS:
            raise InputError(
                f"unknown optimizer {self.optimizer!r}", where="--optimizer", hint="use sgd or adamw"
            )
        Schedule.check(self.schedule, "--schedule")
        checks = [
            (self.lr > 0, "--lr", "must be > 0"),
            (0 <= self.momentum < 1, "--momentum", "must be in [0, 1)"),
            (self.weight_decay >= 0, "--weight-decay", "must be >= 0"),
            (self.epochs >= 0, "--epochs", "must be >= 0"),
            (self.warmup_epochs >= 0, "--warmup-epochs", "must be >= 0"),
            (self.warmup_lr > 0, "--warmup-lr", "must be > 0"),
            (self.batch_size >= 1, "--batch-size", "must be >= 1"),
            (self.adam_eps > 0, "adam_eps", "must be > 0"),
            (self.batch_size <= 2**31 - 1, "--batch-size", "must be <= 2147483647"),
        ]
        for ok, option, what in checks:
            if not ok:
                raise InputError(f"{what}", where=option, hint="see `promptcli tune --help`")
        return self

    def lr_at(self, epoch: int) -> float:
        """Learning rate of epoch ``epoch`` (0-based): constant warm-up, then a cosine over ``epochs`` steps,
        at step ``epoch`` (``cosine``) or ``epoch - warmup_epochs`` (``coop``: CoOp's code, where it starts at
        the full rate)."""
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        step = epoch - self.warmup_epochs if self.schedule == Schedule.COOP.value else epoch
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * step / max(1, self.epochs)))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "schedule": SCHEDULE_TEXT[self.schedule]}


@dataclass
class SplitConfig:
    """The per-epoch clean/noisy split: ``method`` ot (or none), the loss of noisy samples, OT settings."""

    method: str = "ot"
    noisy_loss: str = "mae"
    epsilon: float = DEFAULT_EPSILON
    n_iter: int = DEFAULT_ITERATIONS

    def validate(self) -> SplitConfig:
        if self.method not in SPLITS:
            raise InputError(f"unknown split {self.method!r}", where="--split", hint="use none or ot")
        if self.noisy_loss not in NOISY_LOSSES:
            raise InputError(
                f"unknown noisy loss {self.noisy_loss!r}", where="--noisy-loss", hint="use mae or none"
            )
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise InputError(
                "must be > 0",
                where="--ot-epsilon",
                hint="the entropic regularisation in logit units, e.g. 0.1",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "sample_marginal": "uniform",
            "class_marginal": "balanced",
            "cost": "-logits of the head at the epoch start, plain features",
            "batch_loss": "(sum clean loss_i + sum noisy MAE_i) / B"
            if self.noisy_loss == "mae"
            else "(sum clean loss_i) / B",
        }


@dataclass
class TuneOptions:
    """Everything ``promptcli tune`` takes besides its files (``None`` means the method's default)."""

    method: str = "coop"
    n_ctx: int = 16
    ctx_init: str | None = None
    class_position: str = "end"
    csc: bool = False
    template: str = "a photo of a {}."
    init_std: float = 0.02
    class_chunk: int = 0  # prompt methods: text pass with gradient in chunks of this many classes (0: one)
    loss: str = "ce"
    q: float = 0.7
    alpha: float = 0.1
    beta: float = 1.0
    label_smoothing: float = 0.0
    optimizer: str | None = None  # None: the method's default (sgd; tip-adapter-f, finetune: adamw)
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    epochs: int | None = None  # None: the method's default (see METHOD_EPOCHS)
    warmup_epochs: int | None = None  # None: the method's default (see METHOD_WARMUP_EPOCHS)
    warmup_lr: float = 1e-5
    schedule: str | None = None  # None: the method's default (see METHOD_SCHEDULE)
    batch_size: int | None = None  # None: the method's default (see METHOD_BATCH)
    shots: int | None = None
    seed: int = 0
    use_views: bool = True
    skip_missing: bool = False
    split: str = "none"
    noisy_loss: str = "mae"
    ot_epsilon: float = DEFAULT_EPSILON
    kg_lambda: float = 8.0  # kgcoop: weight of the knowledge-guided regulariser
    adapter_ratio: float = 0.2  # clip-adapter: residual ratio alpha
    tip_alpha: float = 1.0  # tip-adapter(-f): weight of the cache logits
    tip_beta: float = 1.0  # tip-adapter(-f): sharpness of the cache affinities
    val_fraction: float | None = None  # tip-adapter(-f): hold out this fraction to search (alpha, beta)

    def resolved(self) -> TuneOptions:
        """These options with the method's defaults filled in where a setting is None (epochs, batch size,
        optimizer, schedule, warm-up epochs). Filled when used, not when built, so ``dataclasses.replace(options, method=...)`` gets the
        new method's defaults."""
        method = str(self.method)
        filled = {
            "epochs": METHOD_EPOCHS.get(method, DEFAULT_EPOCHS),
            "batch_size": METHOD_BATCH.get(method, DEFAULT_BATCH),
            "optimizer": METHOD_OPTIMIZER.get(method, Optimizer.SGD.value),
            "schedule": METHOD_SCHEDULE.get(method, Schedule.COSINE.value),
            "warmup_epochs": METHOD_WARMUP_EPOCHS.get(method, DEFAULT_WARMUP_EPOCHS),
        }
        missing = {name: value for name, value in filled.items() if getattr(self, name) is None}
        return replace(self, **missing) if missing else self

    def split_config(self) -> SplitConfig | None:
        """The clean/noisy split these options ask for (None for ``split="none"``)."""
        if self.split == "none":
            return None
        return SplitConfig(method=self.split, noisy_loss=self.noisy_loss, epsilon=self.ot_epsilon).validate()

    def optim_config(self, weight_decay: float | None = None) -> OptimConfig:
        """The optimiser and schedule, with the method's defaults where these options leave them open
        (``weight_decay`` None: the method's default weight decay)."""
        o = self.resolved()
        lr = o.lr
        if lr is None and o.method == Method.FINETUNE.value:
            lr = FINETUNE_LR[str(o.optimizer)]
        if lr is None:
            lr = METHOD_LR.get(o.method, LINEAR_LR if o.method in LINEAR_METHODS else DEFAULT_LR)
        if weight_decay is None:
            weight_decay = METHOD_WEIGHT_DECAY.get(o.method, DEFAULT_WEIGHT_DECAY)
        return OptimConfig(
            optimizer=str(o.optimizer),
            lr=lr,
            momentum=o.momentum,
            weight_decay=weight_decay,
            epochs=int(o.epochs),
            warmup_epochs=int(o.warmup_epochs),
            warmup_lr=o.warmup_lr,
            batch_size=int(o.batch_size),
            schedule=str(o.schedule),
            adam_eps=METHOD_ADAM_EPS.get(o.method, DEFAULT_ADAM_EPS),
        )
