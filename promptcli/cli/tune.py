"""Learn a prompt (CoOp and ablations) from cached image features and (possibly noisy) labels.

FEATURES is a features file from `promptcli extract`; LABELS a labels CSV (`path,label[,clean_label,
is_noisy]`, `-` reads stdin) joined to it by path. Only the text side runs: a step is one text-encoder
pass over the class prompts plus a matrix product. With augmented views in the features file, each
epoch draws one view per image. The output safetensors file holds the learned tensors and, in its
metadata, the model, class names, method, loss, optimiser settings, seed, input hashes and metrics.

Methods: coop (learned context, default), cls-tuning (learned class-name tokens), full-prompt (both),
linear-probe (logistic regression on the features; weight decay picked on held-out labels unless
given), classifier-zs (linear head started from the zero-shot classifier).
Losses: ce, gce (--q), mae, sce (--alpha, --beta); --label-smoothing for ce and sce.
Defaults follow CoOp: SGD lr 0.002 (linear heads: 1.0), momentum 0.9, weight decay 5e-4, cosine
schedule after one warm-up epoch at lr 1e-5, batch 32, 50 epochs.

--split ot (NLPrompt) separates clean from noisy labels as training goes: at the start of every
epoch an optimal-transport assignment (Sinkhorn, uniform mass per image, balanced mass per class,
cost -logits of the current head on the plain features, entropic regularisation --ot-epsilon in
logit units) sends each image to a class; images sent to their given label train with --loss, the
others with MAE (--noisy-loss mae) or not at all (--noisy-loss none). A batch's loss is
(sum of its clean images' losses + sum of its noisy images' MAE) / batch size. The --log lines
then carry n_judged_clean and, when the labels have is_noisy, the split's clean_precision and
clean_recall (precision and recall of the images judged clean).

Examples:

    promptcli tune train.h5 noisy.csv -o coop.safetensors
    promptcli tune train.h5 noisy.csv -o gce.safetensors --loss gce --q 0.7 --shots 16 --seed 1
    promptcli tune train.h5 noisy.csv -o csc.safetensors --n-ctx 16 --csc --class-position middle
    promptcli tune train.h5 noisy.csv -o lp.safetensors --method linear-probe --log lp.jsonl --json
    promptcli tune train.h5 noisy.csv -o ot.safetensors --split ot --shots 16 --log ot.jsonl
    promptcli tune train.h5 noisy.csv -o coop.safetensors --resume   # continue an interrupted run
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from promptcli.cli._options import DeviceOpt, ForceOpt, JsonOpt, QuietOpt, SeedOpt
from promptcli.cli._output import Output
from promptcli.learning.transport import DEFAULT_EPSILON


def command(
    features: Annotated[Path, typer.Argument(help="Features file (.h5) from `promptcli extract`.")],
    labels: Annotated[str, typer.Argument(help="Labels CSV (path,label[,clean_label,...]); - reads stdin.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Prompt file to write (.safetensors).")],
    method: Annotated[
        str,
        typer.Option("--method", help="coop, cls-tuning, full-prompt, linear-probe or classifier-zs."),
    ] = "coop",
    n_ctx: Annotated[int, typer.Option("--n-ctx", help="Number of learned context tokens (coop).")] = 16,
    ctx_init: Annotated[
        str | None,
        typer.Option("--ctx-init", help='Initialise the context from these words, e.g. "a photo of a".'),
    ] = None,
    class_position: Annotated[
        str, typer.Option("--class-position", help="Where the class name goes: end, middle or front (coop).")
    ] = "end",
    csc: Annotated[
        bool, typer.Option("--csc", help="Class-specific context (one context per class).")
    ] = False,
    template: Annotated[
        str,
        typer.Option(
            "--template",
            help="Template words for cls-tuning / full-prompt / classifier-zs (one {} for the class).",
        ),
    ] = "a photo of a {}.",
    init_std: Annotated[float, typer.Option("--init-std", help="Std of the random context init.")] = 0.02,
    loss: Annotated[str, typer.Option("--loss", help="ce, gce, mae or sce.")] = "ce",
    q: Annotated[float, typer.Option("--q", help="GCE exponent q in (0, 1].")] = 0.7,
    alpha: Annotated[float, typer.Option("--alpha", help="SCE weight of the cross-entropy.")] = 0.1,
    beta: Annotated[float, typer.Option("--beta", help="SCE weight of the reverse cross-entropy.")] = 1.0,
    label_smoothing: Annotated[
        float, typer.Option("--label-smoothing", help="Label smoothing epsilon (ce, sce).")
    ] = 0.0,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs.")] = 50,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Learning rate [default: 0.002; linear-probe and classifier-zs: 1.0]."),
    ] = None,
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[
        float | None,
        typer.Option(
            "--weight-decay", help="Weight decay [default: 5e-4; linear-probe: chosen on held-out labels]."
        ),
    ] = None,
    warmup_epochs: Annotated[int, typer.Option("--warmup-epochs", help="Epochs at the warm-up lr.")] = 1,
    warmup_lr: Annotated[float, typer.Option("--warmup-lr", help="Constant warm-up learning rate.")] = 1e-5,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch size.")] = 32,
    optimizer: Annotated[str, typer.Option("--optimizer", help="sgd or adamw.")] = "sgd",
    shots: Annotated[
        int | None, typer.Option("--shots", help="Use K labelled images per class (seeded sample).")
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            "--split", help="Split clean from noisy labels each epoch: none or ot (optimal transport)."
        ),
    ] = "none",
    noisy_loss: Annotated[
        str,
        typer.Option(
            "--noisy-loss", help="With --split ot, the loss of noisy samples: mae or none (dropped)."
        ),
    ] = "mae",
    ot_epsilon: Annotated[
        float, typer.Option("--ot-epsilon", help="With --split ot, the Sinkhorn entropic regularisation.")
    ] = DEFAULT_EPSILON,
    no_views: Annotated[
        bool, typer.Option("--no-views", help="Train on the plain features even if views exist.")
    ] = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on GPU.")] = True,
    pretrained: Annotated[
        str | None,
        typer.Option("--pretrained", help="Where the features' checkpoint is now, if it moved."),
    ] = None,
    log: Annotated[
        Path | None, typer.Option("--log", help="Write one JSON line per epoch to this file.")
    ] = None,
    skip_missing: Annotated[
        bool,
        typer.Option("--skip-missing", help="Skip label rows whose path or class the features lack."),
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from OUTPUT.partial left by an interrupted run.")
    ] = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from promptcli.learning.training import TuneOptions, tune

    out = Output(quiet=quiet, json_mode=json_out)
    options = TuneOptions(
        method=method,
        n_ctx=n_ctx,
        ctx_init=ctx_init,
        class_position=class_position,
        csc=csc,
        template=template,
        init_std=init_std,
        loss=loss,
        q=q,
        alpha=alpha,
        beta=beta,
        label_smoothing=label_smoothing,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        epochs=epochs,
        warmup_epochs=warmup_epochs,
        warmup_lr=warmup_lr,
        batch_size=batch_size,
        shots=shots,
        seed=seed,
        use_views=not no_views,
        skip_missing=skip_missing,
        split=split,
        noisy_loss=noisy_loss,
        ot_epsilon=ot_epsilon,
    )
    with out.progress(f"tune {method}", total=epochs, unit="epochs") as bar:
        done = [0]  # epochs shown so far (a resumed run jumps to its checkpoint's epoch)

        def on_epoch(row: dict) -> None:
            clean = row.get("clean_accuracy")
            judged = row.get("n_judged_clean")
            bar.describe(
                f"epoch {row['epoch']}/{epochs} loss {row['loss']:.4f} acc {row['accuracy']:.3f}"
                + (f" clean {clean:.3f}" if clean is not None else "")
                + (f" judged clean {judged}" if judged is not None else "")
            )
            bar.advance(row["epoch"] - done[0])
            done[0] = row["epoch"]

        summary = tune(
            features,
            labels,
            output,
            options,
            device=device,
            amp=amp,
            pretrained=pretrained,
            resume=resume,
            force=force,
            log_path=log,
            on_epoch=on_epoch,
            info=out.info,
            warn=out.warn,
        )
    metrics = summary["metrics"]
    if summary["n_skipped"]:
        out.warn(f"skipped {summary['n_skipped']} label row(s) whose path or class the features lack")
    for row in summary["weight_decay_search"]:
        out.info(f"  weight decay {row['weight_decay']:g}: held-out accuracy {row['held_out_accuracy']:.4f}")
    clean = metrics.get("train_clean_accuracy")
    out.info(
        f"Trained {method} on {summary['n_train']} images for {epochs} epochs"
        + (f" (resumed at epoch {summary['resumed_from_epoch']})" if summary["resumed_from_epoch"] else "")
        + f": train accuracy {metrics['train_accuracy']:.4f}"
        + (f", against clean labels {clean:.4f}" if clean is not None else "")
        + f"; wrote {summary['output']}"
    )
    out.result(summary)
