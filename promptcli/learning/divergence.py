"""What a diverged training run is blamed on: the options of that run that can make its steps too large.

The learning rate always can (``--lr``, or ``--warmup-lr`` where the warm-up's rate was the larger). Others are named only
where they apply to the run and are large enough to: a decay or penalty whose own step overshoots zero
(``lr x weight`` >= 1) at a weight above any promptcli uses by default (below that, it is the learning rate
that made the product large), SCE's term weights, tip-adapter-f's cache scale, and fp16 autocast, whose range
(65504) overflows to inf (so it is named for NaN/inf only). GCE's q and MAE are not: their gradient is at
most cross-entropy's (GCE's is CE's times p_y^q <= 1).
"""

from __future__ import annotations

from typing import Any

from promptcli.io.checks import Suspect
from promptcli.learning.options import WEIGHT_DECAY_GRID, OptimConfig, TuneOptions

FP16_MAX = 65504.0  # the largest float16
# A random context this many times CoOp's 0.02 dwarfs the token embeddings it stands among.
INIT_STD_SUSPECT = 1.0


def fp16_suspect(option: str, fix: str) -> Suspect:
    """fp16 autocast as a suspect: ``option`` and ``fix`` say how this command leaves it."""
    return Suspect(option, f"{fix} (fp16 autocast overflows past {FP16_MAX:g})", overflow_only=True)


def rate_suspect(config: OptimConfig, epoch: int) -> tuple[Suspect, float]:
    """The learning-rate option of the largest rate applied up to ``epoch`` (0-based), and that rate: the weights
    carry every earlier step, so a run diverging after its warm-up may have diverged at ``--warmup-lr``."""
    warm = config.warmup_lr if config.warmup_epochs > 0 else 0.0
    main = config.lr_at(config.warmup_epochs) if epoch >= config.warmup_epochs else 0.0  # the cosine's top
    if warm > main:
        return Suspect("--warmup-lr", f"a lower --warmup-lr (this run used {config.warmup_lr:g})"), warm
    return Suspect("--lr", f"a lower --lr (this run used {config.lr:g})"), main


def divergence_suspects(
    config: OptimConfig, epoch: int, loss_fn: Any, head: Any = None, fp16: Suspect | None = None
) -> list[Suspect]:
    """The options of a run in ``epoch`` (0-based) that can make it diverge, likeliest first; ``fp16`` when the
    run computes in fp16 autocast."""
    rate, lr = rate_suspect(config, epoch)
    suspects = [rate]
    init_std = random_init_std(head)
    if init_std is not None and init_std > INIT_STD_SUSPECT:  # broken from the start: blamed first
        suspects.insert(
            0, Suspect("--init-std", f"a smaller --init-std (this run used {init_std:g}; CoOp uses 0.02)")
        )
    if fp16 is not None:
        suspects.append(fp16)
    wd = config.weight_decay
    if wd > max(WEIGHT_DECAY_GRID) and lr * wd >= 1:
        suspects.append(
            Suspect(
                "--weight-decay",
                f"a lower --weight-decay (lr x weight decay = {lr * wd:g} >= 1: "
                "each step's decay overshoots zero)",
            )
        )
    if getattr(loss_fn, "name", None) == "sce":
        weight = loss_fn.alpha + abs(loss_fn.A) * loss_fn.beta
        if weight > 1:
            suspects.append(
                Suspect(
                    "--alpha/--beta",
                    f"smaller --alpha/--beta (SCE weighs its terms alpha + 4 x beta = {weight:g})",
                )
            )
    kg_lambda = getattr(head, "kg_lambda", None)
    if (
        kg_lambda is not None and kg_lambda > TuneOptions.kg_lambda and lr * kg_lambda >= 1
    ):  # kgcoop's penalty overshoots like a weight decay
        suspects.append(
            Suspect("--kg-lambda", f"a lower --kg-lambda (lr x kg-lambda = {lr * kg_lambda:g} >= 1)")
        )
    if getattr(head, "learn_keys", False) and head.alpha * head.beta > 1:  # tip-adapter-f
        suspects.append(
            Suspect(
                "--tip-alpha/--tip-beta",
                f"smaller --tip-alpha/--tip-beta (the cache keys' gradient scales with alpha x beta = "
                f"{head.alpha * head.beta:g})",
            )
        )
    return suspects


def random_init_std(head: Any) -> float | None:
    """The ``--init-std`` of the randomly initialised prompt vectors in ``head``; None when it has none."""
    modules = head.modules() if hasattr(head, "modules") else ()
    for module in modules:
        config = getattr(module, "config", None)
        init_std = getattr(config, "init_std", None)
        if getattr(config, "ctx_init", "") is None and isinstance(init_std, (int, float)):
            return float(init_std)
    return None
