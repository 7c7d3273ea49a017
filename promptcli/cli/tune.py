"""Learn a prompt (CoOp and ablations) from cached image features and (possibly noisy) labels.

FEATURES is a features file from `promptcli extract`; LABELS a labels CSV (`path,label[,clean_label,
is_noisy]`, `-` reads stdin) joined to it by path. Only the text side runs: a step is one text-encoder
pass over the class prompts plus a matrix product. With augmented views in the features file, each
epoch draws one view per image. The output safetensors file holds the learned tensors and, in its
metadata, the model, class names, method, loss, optimiser settings, seed, input hashes and metrics.

Methods: coop (learned context, default), cls-tuning (learned class-name tokens), full-prompt (both),
linear-probe (logistic regression on the features; weight decay picked on held-out labels unless
given), classifier-zs (linear head started from the zero-shot classifier), kgcoop (coop held near the
zero-shot class text features, --kg-lambda), cocoop (coop context shifted per image by a meta-net),
clip-adapter (residual MLP on the image features, --adapter-ratio), tip-adapter (training-free cache of
the training features, --tip-alpha, --tip-beta) and tip-adapter-f (its cache keys trained); finetune, vpt
and maple train on images (below).
Losses: ce, gce (--q), mae, sce (--alpha, --beta); --label-smoothing for ce and sce.
Defaults follow CoOp: SGD lr 0.002 (linear heads: 1.0), momentum 0.9, weight decay 5e-4, cosine
schedule after one warm-up epoch at lr 1e-5, batch 32, 50 epochs (CoOp's ImageNet schedule; its code
trains 200 at 16 shots). Methods from other papers take theirs where they differ (see each option).

--split ot (NLPrompt) separates clean from noisy labels as training goes: at the start of every
epoch an optimal-transport assignment (Sinkhorn, uniform mass per image, balanced mass per class,
cost -logits of the current head on the plain features, entropic regularisation --ot-epsilon in
logit units) sends each image to a class; images sent to their given label train with --loss, the
others with MAE (--noisy-loss mae) or not at all (--noisy-loss none). A batch's loss is
(sum of its clean images' losses + sum of its noisy images' MAE) / batch size. The --log lines
then carry n_judged_clean and, when the labels have is_noisy, the split's clean_precision and
clean_recall (precision and recall of the images judged clean).

--method finetune trains the image tower itself on the images the features file records (--images
when they moved), end to end, with a linear head started from the zero-shot classifier; --train-layers
last-K trains only the last K blocks, --lp-ft fits the head on the cached features first, --wise-alpha
A also writes OUTPUT with .wiseA before its suffix (ft.wise0.5.safetensors; WiSE-FT). Default optimiser AdamW, lr 1e-5 (--optimizer sgd: lr 1e-4).
Evaluate it on features extracted through the tuned tower: `promptcli extract ... --adapter OUTPUT`.

--method vpt and --method maple also train on images (same options: --images, --workers, --precision,
every loss, --split ot, --resume), with every CLIP weight frozen and a ViT image tower (a CNN tower is
refused). vpt (Jia et al. 2022) learns --vpt-tokens prompt tokens (default 8) after the class token,
--vpt-depth deep (a fresh set before every block, default) or shallow (input only), under the frozen
zero-shot classifier of --template. maple (Khattak et al. 2023) learns 2 text context tokens (from the
template's first words, "a photo") and deep text prompts in the first --maple-depth J layers (paper: 9),
with vision prompts W_i P_i + b_i coupled from them; its classifier is the class text features of the
learned prompts. Both default to the schedules of MaPLe's code (SGD, 5 epochs, batch 4, lr 0.0035 for maple
and 0.0025 for vpt, --schedule coop); evaluate through
`extract --adapter OUTPUT` as for finetune.

Examples:

    promptcli tune train.h5 noisy.csv -o coop.safetensors
    promptcli tune train.h5 noisy.csv -o gce.safetensors --loss gce --q 0.7 --shots 16 --seed 1
    promptcli tune train.h5 noisy.csv -o csc.safetensors --n-ctx 16 --csc --class-position middle
    promptcli tune train.h5 noisy.csv -o lp.safetensors --method linear-probe --log lp.jsonl --json
    promptcli tune train.h5 noisy.csv -o ot.safetensors --split ot --shots 16 --log ot.jsonl
    promptcli tune train.h5 noisy.csv -o coop.safetensors --resume   # continue an interrupted run
    promptcli tune train.h5 noisy.csv -o ft.safetensors --method finetune --optimizer adamw --wise-alpha 0.5
    promptcli tune train.h5 noisy.csv -o vpt.safetensors --method vpt --vpt-depth shallow --shots 16
    promptcli tune train.h5 noisy.csv -o maple.safetensors --method maple --split ot
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from promptcli.choices import Method, VptDepth
from promptcli.cli._finetune import (
    FtPrecisionOpt,
    FtWorkersOpt,
    ImagesOpt,
    LpEpochsOpt,
    LpFtOpt,
    MapleDepthOpt,
    SkipBadOpt,
    TrainLayersOpt,
    VptDepthOpt,
    VptTokensOpt,
    WiseAlphaOpt,
)
from promptcli.cli._options import AmpOpt, DeviceOpt, FeaturesPretrainedOpt, ForceOpt, JsonOpt, QuietOpt
from promptcli.cli._output import Output, epoch_progress, pct
from promptcli.cli._tune_options import tune_options, with_training_options


@with_training_options
def command(
    features: Annotated[
        Path, typer.Argument(help="Features file (.h5) from `promptcli extract`.", metavar="FEATURES")
    ],
    labels: Annotated[
        str,
        typer.Argument(help="Labels CSV (path,label[,clean_label,...]); - reads stdin.", metavar="LABELS"),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Prompt file to write (.safetensors).")],
    method: Annotated[Method, typer.Option("--method", help="What to learn (see above).")] = Method.COOP,
    device: DeviceOpt = "auto",
    amp: AmpOpt = True,
    pretrained: FeaturesPretrainedOpt = None,
    log: Annotated[
        Path | None,
        typer.Option(
            "--log",
            "--train-log",
            help="Write one JSON line per epoch to this file (--train-log: the same, for torchrun).",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from OUTPUT.partial left by an interrupted run; with none, start afresh; an OUTPUT this same run finished is left as it is (exit 0).",
        ),
    ] = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    images: ImagesOpt = None,
    skip_bad: SkipBadOpt = False,
    workers: FtWorkersOpt = 2,
    precision: FtPrecisionOpt = None,
    train_layers: TrainLayersOpt = "all",
    lp_ft: LpFtOpt = False,
    lp_epochs: LpEpochsOpt = 50,
    wise_alpha: WiseAlphaOpt = None,
    vpt_depth: VptDepthOpt = VptDepth.DEEP,
    vpt_tokens: VptTokensOpt = 8,
    maple_depth: MapleDepthOpt = 9,
    **training: Any,
) -> None:
    from promptcli.cli import _finetune
    from promptcli.learning.tune_run import tune

    out = Output(quiet=quiet, json_mode=json_out)
    options = tune_options(method, training)
    ft = _finetune.finetune_options(method, locals(), out)
    if ft is not None:
        _finetune.run(
            features, labels, output, options, ft, device=device, amp=amp, pretrained=pretrained,
            log=log, resume=resume, force=force, out=out,
        )  # fmt: skip
        return
    epochs = options.resolved().epochs
    with epoch_progress(out, f"tune {method}", epochs) as on_epoch:
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
    if summary.get("already_complete"):  # --resume on a run that had finished (a requeued job)
        out.info(f"{summary['output']} is complete: this run wrote it earlier; nothing to do")
        out.result(summary)
        return
    metrics = summary["metrics"]
    if summary["n_skipped"]:
        out.warn(f"skipped {summary['n_skipped']} label row(s) whose path or class the features lack")
    for row in summary["weight_decay_search"]:
        out.info(f"  weight decay {row['weight_decay']:g}: held-out accuracy {pct(row['held_out_accuracy'])}")
    clean = metrics.get("train_clean_accuracy")
    out.info(
        f"Trained {method} on {summary['n_train']} images for {epochs} epoch{'' if epochs == 1 else 's'}"
        + (f" (resumed at epoch {summary['resumed_from_epoch']})" if summary["resumed_from_epoch"] else "")
        + f": train accuracy {pct(metrics['train_accuracy'])}"
        + (f", against clean labels {pct(clean)}" if clean is not None else "")
        + f"; wrote {summary['output']}"
    )
    out.result(summary)
