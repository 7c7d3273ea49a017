"""Benchmark `promptcli tune`: time per epoch of CoOp's computation against promptcli's, and FLOP efficiency.

    python benchmarks/bench_tune.py            # 10 and 100 classes, 3 interleaved repeats (~20 min on 2 cores)
    python benchmarks/bench_tune.py --quick    # 10 classes, 1 repeat (~3 min)

Setting (CoOp's): open_clip ViT-B-32 with random weights on CPU, 16 shots per class, batch 32, 16
learned context vectors shared by all classes, class name at the end, SGD (lr 0.002 with CoOp's
warm-up epoch at 1e-5, momentum 0.9, weight decay 5e-4), cross-entropy. One epoch is ceil(16 C / 32)
steps. Three computations of the same training step:

(a) CoOp's original: every step encodes the batch's 224x224 images with the (frozen) image encoder and
    runs the text transformer with gradient over every class prompt padded to 77 tokens.
(b) cached image features (as promptcli trains), text pass still the plain 77-token one
    (``PromptLearner.forward_plain``).
(c) promptcli as shipped: one epoch of ``promptcli.learning.training.train`` (the loop ``promptcli tune`` runs)
    with the ``coop`` head, whose text pass is ``PromptLearner.forward``: the sequence cut after the
    longest end-of-text token, the shared [SOS]+context prefix computed once per block. Its epoch time
    is the one ``train`` reports, which also includes the end-of-epoch training-accuracy pass.

(a) and (b) run the same step by hand (same optimiser, loss, batch order). They are slow (ViT-B-32
on 1,600 images per epoch at 100 classes), so by default each repeat times ``--ab-steps`` (1) steps
and the epoch time is extrapolated as steps per epoch x step time (every step has the same shapes);
``--full-epoch-steps N`` times whole epochs of (a) and (b) when an epoch has at most N steps. The
table marks extrapolated times. The three are run interleaved ``--repeats`` times and the median of each is kept, so
load from other processes on the machine hits all three alike.

FLOPs: the warm-up run of each computation runs under ``torch.utils.flop_counter.FlopCounterMode``
(matmul-type work: linear layers, attention, convolutions; forward and backward as executed). The
minimal computation of an epoch is derived analytically (``minimal_step_flops``): the shared prefix
once, each class's own tokens up to its end-of-text token attending causally to the prefix and to
themselves, in the last block only what the end-of-text tokens need, the text projection and the
logits; forward plus the backward that the learned context needs (input gradients only: the CLIP
weights are frozen, so there are no weight gradients and the backward costs about 1x the forward,
not the 2x of full training). The per-token accounting is checked against the counted FLOPs of one
shipped text pass (``text_forward_formula_shipped_layout`` vs ``text_forward_counted``).
Peak: the best GFLOP/s of a 2048x2048 float32 matmul with the same threads.

Nothing is downloaded: the model is built from open_clip's ViT-B-32 config with random weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHOTS, BATCH, N_CTX, FEATURE_SEED = 16, 32, 16, 0

CIFAR10 = "airplane automobile bird cat deer dog frog horse ship truck".split()
CIFAR100 = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
    "worm"
).split()


def classnames(n: int) -> list[str]:
    """CIFAR-10's names for 10 classes, else the first ``n`` of CIFAR-100's (realistic token counts)."""
    names = CIFAR10 if n == 10 else CIFAR100
    if n > len(names):
        raise SystemExit(f"--classes: at most {len(CIFAR100)} classes")
    return [name.replace("_", " ") for name in names[:n]]


# -- FLOPs -------------------------------------------------------------------------------------


def flop_counter():
    """A FlopCounterMode that also counts the CPU flash-attention kernels SDPA dispatches to on CPU."""
    import torch
    from torch.utils import flop_counter as fc

    def forward(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    ops = torch.ops.aten
    mapping = {
        ops._scaled_dot_product_flash_attention_for_cpu: forward,
        ops._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


def text_layer_flops(width: int, keys: list[int], backward: bool) -> int:
    """Matmul FLOPs of one pre-LN transformer block for query tokens attending to ``keys[i]`` keys each.

    Per token: QKV 6W^2, output projection 2W^2, MLP (4x) 16W^2, scores and weighted sum 4 k W.
    The input-gradient backward costs the same for the linear layers and 8 k W for attention.
    """
    per_token = 24 * width * width
    return sum(per_token + (8 if backward else 4) * k * width for k in keys)


def text_pass_flops(
    width: int, layers: int, embed: int, prefix: int, suffixes: list[int], *, causal: bool, backward: bool
) -> int:
    """FLOPs of a text pass over a prefix computed once and per-class suffixes attending to it.

    ``causal``: each token attends to the tokens up to itself (the minimal work); otherwise to the
    whole prefix / prefix + suffix, as a dense masked kernel computes (the shipped layout).
    """
    if causal:
        keys = list(range(1, prefix + 1)) + [prefix + j for s in suffixes for j in range(1, s + 1)]
    else:
        keys = [prefix] * prefix + [prefix + s for s in suffixes for _ in range(s)]
    projection = 2 * len(suffixes) * width * embed
    return layers * text_layer_flops(width, keys, backward) + projection


def minimal_step_flops(
    width: int, layers: int, embed: int, prefix: int, suffixes: list[int], batch: int
) -> int:
    """Forward + input-gradient backward of one training step on cached features, only the work that matters.

    Tokens: the prefix once (causal), each class's own tokens up to its end-of-text token attending to
    the prefix and to themselves. In the last block only the keys/values of all tokens and the rest of
    the block for the end-of-text tokens are needed; the start token (fixed, attends only to itself)
    needs no backward.
    """
    w2 = width * width
    keys = list(range(1, prefix + 1)) + [prefix + j for s in suffixes for j in range(1, s + 1)]
    eot_keys = [prefix + s for s in suffixes]
    n_classes = len(suffixes)
    forward = (layers - 1) * text_layer_flops(width, keys, backward=False)
    forward += 4 * w2 * len(keys) + sum(20 * w2 + 4 * k * width for k in eot_keys)  # last block
    back = (layers - 1) * text_layer_flops(width, keys[1:], backward=True)
    back += 4 * w2 * (len(keys) - 1) + sum(20 * w2 + 8 * k * width for k in eot_keys)
    projection = 2 * n_classes * width * embed
    logits = 2 * batch * n_classes * embed  # the backward to the text features costs the same
    return forward + back + 2 * (projection + logits)


def matmul_peak(seconds: float = 3.0, size: int = 2048) -> float:
    """Best GFLOP/s of a float32 square matmul over ~``seconds`` (the same torch threads)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


# -- the three computations ------------------------------------------------------------------


def setup(loaded: Any, n_classes: int, seed: int) -> dict[str, Any]:
    """The coop head as ``tune`` builds it, 16-shot cached features, the loss and CoOp's optimiser settings."""
    import torch
    import torch.nn.functional as F

    from promptcli.learning.losses import make_loss
    from promptcli.learning.training import OptimConfig, TrainData
    from promptcli.models.heads import build_head
    from promptcli.models.prompt_learner import PromptConfig

    names = classnames(n_classes)
    config = PromptConfig(method="coop", n_ctx=N_CTX, class_position="end", csc=False)
    head = build_head(
        "coop",
        classnames=names,
        dim=loaded.embed_dim,
        loaded=loaded,
        prompt_config=config,
        generator=torch.Generator().manual_seed(seed),
    )
    gen = torch.Generator().manual_seed(FEATURE_SEED)
    n = SHOTS * n_classes
    data = TrainData(
        features=F.normalize(torch.randn(n, loaded.embed_dim, generator=gen), dim=-1),
        labels=torch.arange(n_classes).repeat_interleave(SHOTS),
    )
    optim = OptimConfig(optimizer="sgd", epochs=1, batch_size=BATCH)  # CoOp: lr 0.002, warm-up 1e-5
    images = torch.randn(BATCH, 3, *loaded.image_size, generator=gen)
    return {
        "names": names,
        "head": head,
        "data": data,
        "loss": make_loss("ce"),
        "optim": optim,
        "images": images,
    }


def coop_steps(s: dict[str, Any], loaded: Any, n_steps: int, *, encode_images: bool, seed: int) -> float:
    """(a) / (b): ``n_steps`` training steps with the plain text pass; returns seconds per step."""
    import torch
    import torch.nn.functional as F

    from promptcli.learning.training import make_optimizer

    head, data, optim = s["head"], s["data"], s["optim"]
    head.eval()
    optimizer = make_optimizer(head.param_groups(optim.weight_decay), optim)
    for group in optimizer.param_groups:
        group["lr"] = optim.lr_at(0)
    batches = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).split(optim.batch_size)
    batches = batches[:n_steps]
    start = time.perf_counter()
    for batch in batches:
        if encode_images:  # CoOp: the frozen image encoder on the batch's pixels, every step
            x = F.normalize(loaded.model.encode_image(s["images"][: len(batch)]), dim=-1)
        else:
            x = data.features[batch]
        logits = head.logit_scale * x @ head.learner.forward_plain().t()
        loss = s["loss"](logits, data.labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(batches)


def shipped_epoch(s: dict[str, Any], seed: int) -> float:
    """(c): one epoch of ``promptcli.learning.training.train``; the epoch time it reports."""
    from promptcli.learning.training import train

    result = train(s["head"], s["data"], s["loss"], s["optim"], seed=seed, device="cpu", amp=False)
    return float(result.history[0]["time"])


def count_flops(fn) -> tuple[float, int]:
    """(seconds, FLOPs) of ``fn()`` run under the FLOP counter."""
    with flop_counter() as counter:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, int(counter.get_total_flops())


def layout(loaded: Any, head: Any) -> dict[str, Any]:
    """The text tower's sizes and the token layout the learner computes."""
    learner = head.learner
    tower = learner._tower
    prefix = learner.shared_prefix_len
    own = [int(p) - prefix + 1 for p in learner.pool_index.tolist()]  # tokens up to each class's EOT
    return {
        "width": tower.width,
        "layers": len(tower.transformer.resblocks),
        "embed": loaded.embed_dim,
        "fast_path": learner.fast_path,
        "prefix": prefix,
        "computed_length": learner.seq_len,
        "full_length": learner.full_length,
        "suffix_own": own,
        "suffix_computed": learner.seq_len - prefix,
    }


def bench_classes(loaded: Any, n_classes: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    s = setup(loaded, n_classes, args.seed)
    lay = layout(loaded, s["head"])
    if lay["fast_path"] != "shared-prefix":
        raise SystemExit(f"expected the shared-prefix fast path, got {lay['fast_path']}")
    steps_per_epoch = math.ceil(len(s["data"]) / BATCH)
    full = steps_per_epoch <= args.full_epoch_steps
    ab_steps = steps_per_epoch if full else min(args.ab_steps, steps_per_epoch)
    print(f"\n{n_classes} classes: {len(s['data'])} samples, {steps_per_epoch} steps/epoch", flush=True)

    # warm-up runs (allocator, kernels) double as the FLOP counts
    _, flops_a_step = count_flops(lambda: coop_steps(s, loaded, 1, encode_images=True, seed=0))
    _, flops_b_step = count_flops(lambda: coop_steps(s, loaded, 1, encode_images=False, seed=0))
    _, flops_c_epoch = count_flops(lambda: shipped_epoch(s, 0))
    with torch.no_grad():  # train() also runs one accuracy pass after the epoch: not part of its epoch time
        _, flops_final_accuracy = count_flops(lambda: s["head"](s["data"].features))
    flops_c_epoch -= flops_final_accuracy
    _, text_forward_counted = count_flops(lambda: s["head"].learner())
    print("  warm-up and FLOP counts done", flush=True)

    times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    for rep in range(args.repeats):
        times["a"].append(steps_per_epoch * coop_steps(s, loaded, ab_steps, encode_images=True, seed=rep))
        times["b"].append(steps_per_epoch * coop_steps(s, loaded, ab_steps, encode_images=False, seed=rep))
        times["c"].append(shipped_epoch(s, rep))
        print(
            f"  repeat {rep + 1}/{args.repeats}: (a) {times['a'][-1]:.1f} s  (b) {times['b'][-1]:.1f} s  "
            f"(c) {times['c'][-1]:.2f} s per epoch",
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in times.items()}

    w, layers, embed, prefix = lay["width"], lay["layers"], lay["embed"], lay["prefix"]
    minimal_epoch = steps_per_epoch * minimal_step_flops(w, layers, embed, prefix, lay["suffix_own"], BATCH)
    shipped_formula = text_pass_flops(
        w, layers, embed, prefix, [lay["suffix_computed"]] * n_classes, causal=False, backward=False
    )
    return {
        "classes": n_classes,
        "classnames": s["names"],
        "n_train": len(s["data"]),
        "steps_per_epoch": steps_per_epoch,
        "ab_steps_timed_per_repeat": ab_steps,
        "ab_extrapolated": not full,
        "layout": lay,
        "seconds_per_epoch": times,
        "median_seconds_per_epoch": med,
        "ratio_a_over_c": med["a"] / med["c"],
        "ratio_b_over_c": med["b"] / med["c"],
        "flops": {
            "a_per_epoch": flops_a_step * steps_per_epoch,
            "b_per_epoch": flops_b_step * steps_per_epoch,
            "c_per_epoch_counted": flops_c_epoch,
            "c_final_accuracy_pass_excluded": flops_final_accuracy,
            "minimal_per_epoch": minimal_epoch,
            "text_forward_counted": text_forward_counted,
            "text_forward_formula_shipped_layout": shipped_formula,
        },
    }


# -- report ------------------------------------------------------------------------------------


def efficiency(row: dict[str, Any], peak: float) -> dict[str, float]:
    f, t = row["flops"], row["median_seconds_per_epoch"]
    achieved = f["c_per_epoch_counted"] / t["c"] / 1e9
    return {
        "c_achieved_gflops": achieved,
        "c_achieved_over_peak": achieved / peak,
        "minimal_over_c_counted": f["minimal_per_epoch"] / f["c_per_epoch_counted"],
        "minimal_at_peak_over_c_time": f["minimal_per_epoch"] / 1e9 / peak / t["c"],
        "a_achieved_gflops": f["a_per_epoch"] / t["a"] / 1e9,
        "b_achieved_gflops": f["b_per_epoch"] / t["b"] / 1e9,
    }


def print_tables(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(
        f"\ntune: ViT-B-32 (random weights), CPU, {m['torch_threads']} torch threads on {m['cpus']} CPUs; "
        f"16 shots, batch {BATCH}, n_ctx {N_CTX}, class position end, shared context, SGD"
    )
    print(f"load average at start {m['load_average_start']}, at end {m['load_average_end']}")
    head = f"{'classes':>8}{'steps':>7}{'(a) CoOp orig.':>16}{'(b) cached+plain':>18}"
    print(head + f"{'(c) promptcli':>15}{'(a)/(c)':>9}{'(b)/(c)':>9}")
    for r in report["results"]:
        t = r["median_seconds_per_epoch"]
        mark = "*" if r["ab_extrapolated"] else " "
        print(
            f"{r['classes']:>8}{r['steps_per_epoch']:>7}{t['a']:>14.1f}s{mark}{t['b']:>16.1f}s{mark}"
            f"{t['c']:>14.2f}s{r['ratio_a_over_c']:>9.1f}{r['ratio_b_over_c']:>9.1f}"
        )
    print("seconds per epoch, median of interleaved repeats; * = extrapolated from timed steps")
    print(f"\nFLOPs per epoch (GFLOP) and efficiency of (c); matmul peak {report['peak_gflops']:.1f} GFLOP/s")
    print(
        f"{'classes':>8}{'(a)':>9}{'(b)':>9}{'(c)':>8}{'minimal':>9}{'(c) GFLOP/s':>13}{'of peak':>9}"
        f"{'min/(c)':>9}{'min@peak/(c)':>14}"
    )
    for r in report["results"]:
        f, e = r["flops"], r["efficiency"]
        print(
            f"{r['classes']:>8}{f['a_per_epoch'] / 1e9:>9.0f}{f['b_per_epoch'] / 1e9:>9.0f}"
            f"{f['c_per_epoch_counted'] / 1e9:>8.1f}{f['minimal_per_epoch'] / 1e9:>9.1f}"
            f"{e['c_achieved_gflops']:>13.1f}{e['c_achieved_over_peak']:>9.2f}"
            f"{e['minimal_over_c_counted']:>9.2f}{e['minimal_at_peak_over_c_time']:>14.2f}"
        )
    for r in report["results"]:
        if r["classes"] >= 100:
            ok = "met" if r["ratio_a_over_c"] >= 10 else "MISSED"
            print(f"target (a)/(c) >= 10 at {r['classes']} classes: {r['ratio_a_over_c']:.1f} ({ok})")


def machine(threads: int) -> dict[str, Any]:
    import open_clip
    import torch

    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "torch_threads": threads,
    }


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10 classes, 1 repeat")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--full-epoch-steps", type=int, default=0, help="time whole epochs of (a)/(b) up to this many steps"
    )
    parser.add_argument("--ab-steps", type=int, default=1, help="steps of (a)/(b) per repeat beyond that")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "tune.json")
    args = parser.parse_args()
    if args.quick:
        args.classes, args.repeats = [10], 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from promptcli.models.loading import load_model

    torch.set_num_threads(args.threads)
    info = machine(args.threads)
    info["uptime_start"], info["load_average_start"] = uptime(), [round(x, 2) for x in os.getloadavg()]
    peak_start = matmul_peak()
    loaded = load_model("ViT-B-32", None, device="cpu")  # no --pretrained: random weights, nothing fetched
    start = time.perf_counter()
    results = [bench_classes(loaded, n, args) for n in args.classes]
    peak = max(peak_start, matmul_peak())
    info["uptime_end"], info["load_average_end"] = uptime(), [round(x, 2) for x in os.getloadavg()]
    for row in results:
        row["efficiency"] = efficiency(row, peak)
    report = {
        "machine": info,
        "setting": {
            "model": "ViT-B-32 (open_clip, random weights, fp32)",
            "shots": SHOTS,
            "batch_size": BATCH,
            "n_ctx": N_CTX,
            "class_position": "end",
            "csc": False,
            "optimizer": "sgd lr 0.002 (first epoch: warm-up 1e-5), momentum 0.9, weight decay 5e-4",
            "loss": "ce",
            "repeats": args.repeats,
            "statistic": "median of interleaved repeats",
        },
        "peak_gflops": peak,
        "peak_gflops_start": peak_start,
        "bench_seconds": time.perf_counter() - start,
        "results": results,
        "targets": {
            f"a_over_c>=10@{r['classes']}": r["ratio_a_over_c"] >= 10 for r in results if r["classes"] >= 100
        },
    }
    print_tables(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
