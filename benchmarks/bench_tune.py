"""Benchmark `promptcli tune`: time per epoch of CoOp's computation against promptcli's, FLOPs, peak memory.

    python benchmarks/bench_tune.py                         # 10, 100 and 1,000 classes, 3 repeats, memory runs
    python benchmarks/bench_tune.py --repeats 1 --threads 1 --c-max-steps 5   # what a busy 2-core machine allows
    python benchmarks/bench_tune.py --quick                 # 10 classes, 1 repeat, no memory runs

Setting (CoOp's): open_clip ViT-B-32 with random weights on CPU, 16 shots per class, batch 32, 16
learned context vectors shared by all classes, class name at the end, SGD (lr 0.002 with CoOp's
warm-up epoch at 1e-5, momentum 0.9, weight decay 5e-4), cross-entropy. One epoch is ceil(16 C / 32)
steps. Class names of realistic, varied token counts: CIFAR-10 (10), CIFAR-100 (100), ImageNet
(1,000; open_clip's ``IMAGENET_CLASSNAMES``, 1 to 14 tokens). Three computations of the same step:

(a) CoOp's original: every step encodes the batch's 224x224 images with the (frozen) image encoder and
    runs the text transformer with gradient over every class prompt padded to 77 tokens.
(b) cached image features (as promptcli trains), text pass still the plain 77-token one
    (``PromptLearner.forward_plain``).
(c) promptcli as shipped: an epoch of ``promptcli.learning.training.train`` (the loop ``promptcli tune``
    runs) with the ``coop`` head, whose text pass is ``PromptLearner.forward``: the shared [SOS]+context
    prefix computed once per block, each class only up to its own end-of-text token (classes grouped
    by that length, their tokens packed without padding), the last block only for what the
    end-of-text tokens need. Its epoch time is the one ``train`` reports (it includes the
    end-of-epoch training-accuracy pass). Epochs longer than ``--c-max-steps`` steps are timed on
    their first ``--c-max-steps`` batches and extrapolated with the median step time (marked *).

(a) and (b) run the same step by hand (same optimiser, loss, batch order). They are slow, so each
repeat times ``--ab-steps`` (1) steps and the epoch time is extrapolated as steps per epoch x step
time (every step has the same shapes; ``--full-epoch-steps N`` times whole epochs of up to N steps).
Above ``--plain-max-classes`` (100) the plain pass over all classes does not fit in memory (CoOp's
1,000 x 77-token pass with gradient needs ~19 GB of activations: 1,957 MiB measured at 100), so
their step is composed from a slice of that many classes: (a) = (a) on the slice + (C / slice - 1) x (b) on the slice (the plain
pass is the same independent 77-token pass per class; marked †). The three are run interleaved
``--repeats`` times and the median of each is kept.

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

Memory (``--memory-classes``, default the counts >= 100): in a fresh process per measurement, the
peak resident memory one training step adds (VmHWM after minus VmRSS before, the peak reset through
/proc/self/clear_refs; glibc told to map every allocation over 16 KiB on its own so frees return):
plain (b)'s step (up to ``--plain-max-classes``), shipped, shipped with ``--class-chunk
--memory-chunk`` (50), and a no-gradient text pass (eval).

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


NAMES = {"imagenet": False}  # --imagenet-names: ImageNet's names at every class count


def classnames(n: int) -> list[str]:
    """Realistic names (and token counts): CIFAR-10's for 10 classes, the first ``n`` of CIFAR-100's up
    to 100, of ImageNet's (open_clip's ``IMAGENET_CLASSNAMES``, 1 to 14 tokens) up to 1,000."""
    if n == 10 and not NAMES["imagenet"]:
        return list(CIFAR10)
    if n <= len(CIFAR100) and not NAMES["imagenet"]:
        return [name.replace("_", " ") for name in CIFAR100[:n]]
    from open_clip import IMAGENET_CLASSNAMES

    if n > len(IMAGENET_CLASSNAMES):
        raise SystemExit(f"--classes: at most {len(IMAGENET_CLASSNAMES)} classes")
    return list(IMAGENET_CLASSNAMES[:n])


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


def setup(loaded: Any, n_classes: int, seed: int, class_chunk: int = 0) -> dict[str, Any]:
    """The coop head as ``tune`` builds it, 16-shot cached features, the loss and CoOp's optimiser settings."""
    import torch
    import torch.nn.functional as F

    from promptcli.learning.losses import make_loss
    from promptcli.learning.options import OptimConfig
    from promptcli.learning.training import TrainData
    from promptcli.models.heads import build_head
    from promptcli.models.prompt_learner import PromptConfig

    names = classnames(n_classes)
    config = PromptConfig(
        method="coop", n_ctx=N_CTX, class_position="end", csc=False, class_chunk=class_chunk
    )
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


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds: this process's CPU time is what contention on a shared machine does not inflate."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def coop_steps(
    s: dict[str, Any], loaded: Any, n_steps: int, *, encode_images: bool, seed: int
) -> tuple[float, float]:
    """(a) / (b): ``n_steps`` training steps with the plain text pass; (wall, CPU) seconds per step."""
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
    start = clock()
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
    wall, cpu = since(start)
    return wall / len(batches), cpu / len(batches)


def shipped_epoch(s: dict[str, Any], seed: int, max_steps: int = 0) -> tuple[float, float]:
    """(c): one epoch of ``promptcli.learning.training.train``; the epoch time it reports (and the CPU
    time from the call to its end-of-epoch callback).

    With ``max_steps`` and a longer epoch, ``train`` runs an epoch of the first ``max_steps`` batches
    and the rest is extrapolated: its epoch time + (steps - max_steps) x the median time between
    steps (``train``'s ``on_step`` calls). Its accuracy pass covers those samples only (at 1,000 classes
    the text pass dominates it: the logits of all 16,000 samples would add ~16 GFLOP, under 0.2%).
    """
    from promptcli.learning.training import TrainData, train

    data = s["data"]
    steps = math.ceil(len(data) / BATCH)
    truncated = bool(max_steps) and steps > max_steps
    if truncated:
        data = TrainData(features=data.features[: max_steps * BATCH], labels=data.labels[: max_steps * BATCH])
    stamps: list[tuple[float, float]] = []
    epoch_end: list[float] = []
    start = clock()
    result = train(
        s["head"],
        data,
        s["loss"],
        s["optim"],
        seed=seed,
        device="cpu",
        amp=False,
        on_step=lambda _: stamps.append(clock()),
        on_epoch=lambda _: epoch_end.append(time.process_time()),
    )
    wall, cpu = float(result.history[0]["time"]), epoch_end[0] - start[1]
    if truncated:
        wall += (steps - max_steps) * statistics.median(b[0] - a[0] for a, b in zip(stamps, stamps[1:]))
        cpu += (steps - max_steps) * statistics.median(b[1] - a[1] for a, b in zip(stamps, stamps[1:]))
    return wall, cpu


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
        "longest_computed_length": learner.seq_len,
        "full_length": learner.full_length,
        "suffix_own": own,
        "suffix_computed": list(learner.needed_tokens),
        "length_groups": len(learner.chunks(None)[0].groups),
    }


def shipped_forward_flops(width: int, layers: int, embed: int, prefix: int, suffixes: list[int]) -> int:
    """FLOPs of the shipped text forward as counted: each class computed to its own length (grouped),
    attention counted dense (prefix: P keys each; a suffix token: P + its row's length); in the last
    block keys/values for every token and the rest for the end-of-text tokens only."""
    w2 = width * width
    keys = [prefix] * prefix + [prefix + s for s in suffixes for _ in range(s)]
    forward = (layers - 1) * text_layer_flops(width, keys, backward=False)
    forward += 4 * w2 * len(keys) + sum(20 * w2 + 4 * (prefix + s) * width for s in suffixes)
    return forward + 2 * len(suffixes) * width * embed


def plain_slice_steps(
    loaded: Any, s_slice: dict[str, Any], seed: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(wall, CPU) seconds of one (a) and one (b) step with a slice of the classes (see ``compose_plain``)."""
    a = coop_steps(s_slice, loaded, 1, encode_images=True, seed=seed)
    b = coop_steps(s_slice, loaded, 1, encode_images=False, seed=seed)
    return a, b


def compose_plain(a_slice: float, b_slice: float, ratio: float) -> tuple[float, float]:
    """(a) and (b) at ``ratio`` x the slice's classes: the plain text pass is the same 77-token pass per
    class, independent across classes, so C classes cost C / slice times a slice's text pass; (a) adds
    the image encoder once. (b)'s step on the slice is its text pass plus a negligible product."""
    return a_slice + (ratio - 1) * b_slice, ratio * b_slice


def bench_classes(loaded: Any, n_classes: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    s = setup(loaded, n_classes, args.seed)
    lay = layout(loaded, s["head"])
    if lay["fast_path"] != "shared-prefix":
        raise SystemExit(f"expected the shared-prefix fast path, got {lay['fast_path']}")
    steps_per_epoch = math.ceil(len(s["data"]) / BATCH)
    full = steps_per_epoch <= args.full_epoch_steps
    ab_steps = steps_per_epoch if full else min(args.ab_steps, steps_per_epoch)
    composed = n_classes > args.plain_max_classes
    c_truncated = bool(args.c_max_steps) and steps_per_epoch > args.c_max_steps
    print(f"\n{n_classes} classes: {len(s['data'])} samples, {steps_per_epoch} steps/epoch", flush=True)
    s_plain, ratio = s, 1.0
    if composed:  # the plain 77-token pass over all classes does not fit in memory: time a slice
        s_plain = setup(loaded, args.plain_max_classes, args.seed)
        ratio = n_classes / args.plain_max_classes
        print(f"  (a), (b): composed from a {args.plain_max_classes}-class slice x {ratio:g}", flush=True)

    # warm-up runs (allocator, kernels) double as the FLOP counts
    _, flops_a_step = count_flops(lambda: coop_steps(s_plain, loaded, 1, encode_images=True, seed=0))
    _, flops_b_step = count_flops(lambda: coop_steps(s_plain, loaded, 1, encode_images=False, seed=0))
    if composed:
        flops_a_step, flops_b_step = compose_plain(flops_a_step, flops_b_step, ratio)
    _, flops_c_run = count_flops(lambda: shipped_epoch(s, 0, args.c_max_steps))
    features = s["data"].features
    c_steps_run = min(args.c_max_steps, steps_per_epoch) if c_truncated else steps_per_epoch
    with torch.no_grad():  # train() runs one accuracy pass in the epoch and one after it
        _, flops_accuracy_run = count_flops(lambda: s["head"](features[: c_steps_run * BATCH]))
        _, flops_accuracy_full = count_flops(lambda: s["head"](features))
    flops_c_step = (flops_c_run - 2 * flops_accuracy_run) / c_steps_run
    flops_c_epoch = steps_per_epoch * flops_c_step + flops_accuracy_full
    _, text_forward_counted = count_flops(lambda: s["head"].learner())
    print("  warm-up and FLOP counts done", flush=True)

    times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    cpu_times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    for rep in range(args.repeats):
        if composed:
            (a_wall, a_cpu), (b_wall, b_cpu) = plain_slice_steps(loaded, s_plain, rep)
            a = compose_plain(a_wall, b_wall, ratio) + compose_plain(a_cpu, b_cpu, ratio)
            step = {"a": (a[0], a[2]), "b": (a[1], a[3])}
        else:
            step = {
                "a": coop_steps(s, loaded, ab_steps, encode_images=True, seed=rep),
                "b": coop_steps(s, loaded, ab_steps, encode_images=False, seed=rep),
            }
        for k in ("a", "b"):
            times[k].append(steps_per_epoch * step[k][0])
            cpu_times[k].append(steps_per_epoch * step[k][1])
        c_wall, c_cpu = shipped_epoch(s, rep, args.c_max_steps)
        times["c"].append(c_wall)
        cpu_times["c"].append(c_cpu)
        print(
            f"  repeat {rep + 1}/{args.repeats}: (a) {times['a'][-1]:.1f} s  (b) {times['b'][-1]:.1f} s  "
            f"(c) {times['c'][-1]:.2f} s per epoch; CPU (a) {cpu_times['a'][-1]:.1f} s  "
            f"(b) {cpu_times['b'][-1]:.1f} s  (c) {cpu_times['c'][-1]:.2f} s",
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}

    w, layers, embed, prefix = lay["width"], lay["layers"], lay["embed"], lay["prefix"]
    minimal_epoch = steps_per_epoch * minimal_step_flops(w, layers, embed, prefix, lay["suffix_own"], BATCH)
    shipped_formula = shipped_forward_flops(w, layers, embed, prefix, lay["suffix_computed"])
    return {
        "classes": n_classes,
        "classnames": s["names"],
        "n_train": len(s["data"]),
        "steps_per_epoch": steps_per_epoch,
        "ab_steps_timed_per_repeat": 1 if composed else ab_steps,
        "ab_extrapolated": not full or composed,
        "ab_composed_from_slice_of_classes": args.plain_max_classes if composed else None,
        "c_steps_timed": c_steps_run,
        "c_extrapolated": c_truncated,
        "layout": lay,
        "seconds_per_epoch": times,
        "median_seconds_per_epoch": med,
        "ratio_a_over_c": med["a"] / med["c"],
        "ratio_b_over_c": med["b"] / med["c"],
        "cpu_seconds_per_epoch": cpu_times,
        "median_cpu_seconds_per_epoch": cpu_med,
        "cpu_ratio_a_over_c": cpu_med["a"] / cpu_med["c"],
        "cpu_ratio_b_over_c": cpu_med["b"] / cpu_med["c"],
        "flops": {
            "a_per_epoch": flops_a_step * steps_per_epoch,
            "b_per_epoch": flops_b_step * steps_per_epoch,
            "c_per_epoch_counted": flops_c_epoch,
            "c_per_step_counted": flops_c_step,
            "c_accuracy_pass": flops_accuracy_full,
            "minimal_per_epoch": minimal_epoch,
            "text_forward_counted": text_forward_counted,
            "text_forward_formula_shipped_layout": shipped_formula,
        },
    }


# -- peak memory of one step (a fresh process per measurement) ----------------------------------


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(n_classes: int, mode: str, chunk: int, threads: int) -> dict[str, Any]:
    """Peak resident memory added by one training step (``mode``: plain, shipped, chunked) or one
    no-grad text pass (eval), after a warm-up step (not for plain), in this fresh process."""
    import torch

    from promptcli.models.loading import load_model

    torch.set_num_threads(threads)
    loaded = load_model("ViT-B-32", None, device="cpu", random_weights=True)
    s = setup(loaded, n_classes, 0, class_chunk=chunk if mode == "chunked" else 0)
    head, data = s["head"], s["data"]
    x, y = data.features[:BATCH], data.labels[:BATCH]

    def step() -> None:
        if mode == "eval":
            with torch.no_grad():
                head.learner()
            return
        logits = head.logit_scale * x @ head.learner.forward_plain().t() if mode == "plain" else head(x)
        s["loss"](logits, y).backward()
        head.learner.zero_grad(set_to_none=True)

    if mode != "plain":  # warm-up; plain's peak is gigabytes, its one-time allocations do not matter
        step()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = _proc_status_kib("VmRSS")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = _proc_status_kib("VmHWM")
    return {
        "classes": n_classes,
        "mode": mode,
        "class_chunk": chunk if mode == "chunked" else 0,
        "classnames": "imagenet" if NAMES["imagenet"] or n_classes > 100 else "cifar",
        "resident_before_mib": base / 1024,
        "step_peak_mib": (peak - base) / 1024,
        "step_seconds": seconds,
        "class_feature_matrix_mib": n_classes * loaded.embed_dim * 4 / 2**20,
    }


def measure_memory(n_classes: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`memory_child` in a fresh process."""
    import sys

    # every allocation over 16 KiB its own mapping, nothing kept on free: RSS follows live memory
    malloc = {"MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}
    env = {**os.environ, **malloc, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [
        sys.executable,
        __file__,
        "--memory-child",
        str(n_classes),
        mode,
        "--memory-chunk",
        str(args.memory_chunk),
    ]
    cmd += ["--threads", str(args.threads)] + (["--imagenet-names"] if args.imagenet_names else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"memory child {n_classes} {mode} failed:\n{out.stderr[-2000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"  memory {n_classes} classes {mode}: step peak {row['step_peak_mib']:.0f} MiB "
        f"({row['step_seconds']:.1f} s)",
        flush=True,
    )
    return row


# -- report ------------------------------------------------------------------------------------


def efficiency(row: dict[str, Any], peak: float) -> dict[str, float]:
    f, t = row["flops"], row["median_seconds_per_epoch"]
    achieved = f["c_per_epoch_counted"] / t["c"] / 1e9
    return {
        "c_achieved_gflops": achieved,
        "c_achieved_over_peak": achieved / peak,
        "minimal_over_c_counted": f["minimal_per_epoch"] / f["c_per_epoch_counted"],
        "c_counted_over_minimal": f["c_per_epoch_counted"] / f["minimal_per_epoch"],
        "minimal_at_peak_over_c_time": f["minimal_per_epoch"] / 1e9 / peak / t["c"],
        "a_achieved_gflops": f["a_per_epoch"] / t["a"] / 1e9,
        "b_achieved_gflops": f["b_per_epoch"] / t["b"] / 1e9,
    }


def targets(results: list[dict[str, Any]]) -> dict[str, bool]:
    """Issue 19: (a)/(c) >= 15 at 100 and more classes; (c) at most 1.2 x the minimal FLOPs everywhere."""
    out = {f"a_over_c>=15@{r['classes']}": r["ratio_a_over_c"] >= 15 for r in results if r["classes"] >= 100}
    out.update(
        {
            f"cpu_a_over_c>=15@{r['classes']}": r["cpu_ratio_a_over_c"] >= 15
            for r in results
            if r["classes"] >= 100
        }
    )
    out.update(
        {
            f"c_over_minimal<=1.2@{r['classes']}": r["efficiency"]["c_counted_over_minimal"] <= 1.2
            for r in results
        }
    )
    return out


def print_tables(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(
        f"\ntune: ViT-B-32 (random weights), CPU, {m['torch_threads']} torch threads on {m['cpus']} CPUs; "
        f"16 shots, batch {BATCH}, n_ctx {N_CTX}, class position end, shared context, SGD"
    )
    print(f"load average at start {m['load_average_start']}, at end {m['load_average_end']}")
    head = f"{'classes':>8}{'steps':>7}{'(a) CoOp orig.':>16}{'(b) cached+plain':>18}"
    print(head + f"{'(c) promptcli':>15}{'(a)/(c)':>9}{'(b)/(c)':>9}{'CPU (a)/(c)':>13}{'CPU (b)/(c)':>13}")
    for r in report["results"]:
        t = r["median_seconds_per_epoch"]
        mark = "†" if r["ab_composed_from_slice_of_classes"] else ("*" if r["ab_extrapolated"] else " ")
        cmark = "*" if r["c_extrapolated"] else " "
        print(
            f"{r['classes']:>8}{r['steps_per_epoch']:>7}{t['a']:>14.1f}s{mark}{t['b']:>16.1f}s{mark}"
            f"{t['c']:>13.2f}s{cmark}{r['ratio_a_over_c']:>9.1f}{r['ratio_b_over_c']:>9.1f}"
            f"{r['cpu_ratio_a_over_c']:>13.1f}{r['cpu_ratio_b_over_c']:>13.1f}"
        )
    print("wall seconds per epoch, median of interleaved repeats; * = extrapolated from timed steps;")
    print("CPU: the same ratios in this process's CPU time (not inflated by other processes' load);")
    print("† = also composed from a slice of the classes (the plain pass over all does not fit in memory)")
    print(f"\nFLOPs per epoch (GFLOP) and efficiency of (c); matmul peak {report['peak_gflops']:.1f} GFLOP/s")
    print(
        f"{'classes':>8}{'(a)':>10}{'(b)':>10}{'(c)':>9}{'minimal':>9}{'(c)/min':>9}{'(c) GFLOP/s':>13}"
        f"{'of peak':>9}{'min@peak/(c)':>14}"
    )
    for r in report["results"]:
        f, e = r["flops"], r["efficiency"]
        print(
            f"{r['classes']:>8}{f['a_per_epoch'] / 1e9:>10.0f}{f['b_per_epoch'] / 1e9:>10.0f}"
            f"{f['c_per_epoch_counted'] / 1e9:>9.1f}{f['minimal_per_epoch'] / 1e9:>9.1f}"
            f"{e['c_counted_over_minimal']:>9.3f}{e['c_achieved_gflops']:>13.1f}{e['c_achieved_over_peak']:>9.2f}"
            f"{e['minimal_at_peak_over_c_time']:>14.2f}"
        )
    if report["memory"]:
        print("\npeak memory added by one step (MiB; fresh process each; VmHWM - VmRSS before the step)")
        print(f"{'classes':>8}{'mode':>14}{'step peak':>11}{'(C, D) matrix':>15}{'step s':>8}")
        for r in report["memory"]:
            mode = r["mode"] + (f" {r['class_chunk']}" if r["class_chunk"] else "")
            print(
                f"{r['classes']:>8}{mode:>14}{r['step_peak_mib']:>11.0f}{r['class_feature_matrix_mib']:>15.1f}"
                f"{r['step_seconds']:>8.1f}"
            )
    for name, ok in report["targets"].items():
        print(f"target {name}: {'met' if ok else 'MISSED'}")


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
    parser.add_argument("--quick", action="store_true", help="10 classes, 1 repeat, no memory runs")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--full-epoch-steps", type=int, default=0, help="time whole epochs of (a)/(b) up to this many steps"
    )
    parser.add_argument("--ab-steps", type=int, default=1, help="steps of (a)/(b) per repeat beyond that")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--plain-max-classes",
        type=int,
        default=100,
        help="above this many classes, (a)/(b) are composed from a slice of this many (memory)",
    )
    parser.add_argument(
        "--c-max-steps", type=int, default=60, help="longer epochs of (c): time this many steps, extrapolate"
    )
    parser.add_argument(
        "--memory-classes",
        type=int,
        nargs="*",
        default=None,
        help="peak-memory runs (default: classes >= 100)",
    )
    parser.add_argument(
        "--memory-chunk", type=int, default=50, help="--class-chunk of the chunked memory runs"
    )
    parser.add_argument(
        "--memory-modes",
        nargs="+",
        default=["plain", "shipped", "chunked", "eval"],
        help="memory runs to make",
    )
    parser.add_argument("--memory-only", action="store_true", help="only the memory runs (own JSON)")
    parser.add_argument("--imagenet-names", action="store_true", help="ImageNet's class names at every count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cocoop", action="store_true", help="only the CoCoOp text-pass section (see cocoop_text_pass)"
    )
    parser.add_argument("--cocoop-images", type=int, default=8, help="--cocoop: images per step")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "tune.json")
    parser.add_argument("--memory-child", nargs=2, metavar=("CLASSES", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    NAMES["imagenet"] = args.imagenet_names
    if args.cocoop:
        return cocoop_main(args)
    if args.memory_child:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        n, mode = int(args.memory_child[0]), args.memory_child[1]
        print(json.dumps(memory_child(n, mode, args.memory_chunk, args.threads)))
        return
    if args.quick:
        args.classes, args.repeats, args.memory_classes = [10], 1, []
    if args.memory_classes is None:
        args.memory_classes = [n for n in args.classes if n >= 100]
    if args.memory_only:
        memory = []
        for n in args.memory_classes:
            modes = [m for m in args.memory_modes if m != "plain" or n <= args.plain_max_classes]
            memory += [measure_memory(n, mode, args) for mode in modes]
        report = {"machine": machine(args.threads), "load_average_end": os.getloadavg(), "memory": memory}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from promptcli.models.loading import load_model

    torch.set_num_threads(args.threads)
    info = machine(args.threads)
    info["uptime_start"], info["load_average_start"] = uptime(), [round(x, 2) for x in os.getloadavg()]
    peak_start = matmul_peak()
    # random weights (seeded), nothing fetched
    loaded = load_model("ViT-B-32", None, device="cpu", random_weights=True)
    start = time.perf_counter()
    results = []
    partial = args.json.with_suffix(".partial.json")
    for n in args.classes:
        results.append(bench_classes(loaded, n, args))
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"machine": info, "results": results}, indent=2))
    memory = []
    for n in args.memory_classes:
        modes = [m for m in args.memory_modes if m != "plain" or n <= args.plain_max_classes]
        for mode in modes:
            memory.append(measure_memory(n, mode, args))
            partial.write_text(json.dumps({"machine": info, "results": results, "memory": memory}, indent=2))
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
            "c_max_steps": args.c_max_steps,
            "plain_max_classes": args.plain_max_classes,
            "memory_chunk": args.memory_chunk,
            "statistic": "median of interleaved repeats",
        },
        "peak_gflops": peak,
        "peak_gflops_start": peak_start,
        "bench_seconds": time.perf_counter() - start,
        "results": results,
        "memory": memory,
        "targets": targets(results),
    }
    print_tables(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")


# -- CoCoOp's per-image text pass (issue 14) -----------------------------------------------------


def cocoop_text_pass(
    loaded: Any, n_classes: int, n_images: int, threads: int, repeats: int = 3
) -> dict[str, Any]:
    """One CoCoOp step's text pass (forward + backward into context and meta-net) for ``n_images``
    images x ``n_classes`` classes: the shipped packed pass (``CoCoOpHead.text_features``: each image's
    [SOS]+context prefix once per block, each (image, class) row only its own tokens) against the naive
    one (``text_features_plain``: B x C prompts of 77 tokens). Median of ``repeats`` timed runs after
    the FLOP-counted one; the two results compared."""
    import torch

    from promptcli.learning.method_options import coop_variant_config
    from promptcli.learning.options import TuneOptions
    from promptcli.models.heads import build_head

    torch.set_num_threads(threads)
    options = TuneOptions(method="cocoop")
    head = build_head(
        "cocoop",
        classnames=classnames(n_classes),
        dim=loaded.embed_dim,
        loaded=loaded,
        prompt_config=coop_variant_config(options),
        generator=torch.Generator().manual_seed(FEATURE_SEED),
        options=options,
    )
    gen = torch.Generator().manual_seed(FEATURE_SEED)
    x = torch.nn.functional.normalize(torch.randn(n_images, loaded.embed_dim, generator=gen), dim=-1)
    params = [p for g in head.param_groups(0.0) for p in g["params"]]

    def step(text_fn) -> list[Any]:
        text = text_fn(head.shift(x))
        loss = torch.einsum("bd,bcd->bc", x, text).logsumexp(1).mean()
        return [text.detach(), *torch.autograd.grad(loss, params)]

    row: dict[str, Any] = {"classes": n_classes, "images": n_images, "threads": threads}
    outs = {}
    for name, fn in (("packed", head.text_features), ("naive", head.text_features_plain)):
        outs[name] = step(fn)  # warm-up
        row[f"{name}_flops"] = count_flops(lambda fn=fn: step(fn))[1]
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            step(fn)
            times.append(time.perf_counter() - start)
        row[f"{name}_seconds"] = statistics.median(times)
    row["speedup"] = row["naive_seconds"] / row["packed_seconds"]
    row["flop_ratio"] = row["naive_flops"] / row["packed_flops"]
    row["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(outs["packed"], outs["naive"]))
    row["tokens_per_row_packed"] = sorted(set(head.learner.needed_tokens))
    row["prefix_tokens"] = head.learner.shared_prefix_len
    return row


def cocoop_main(args: argparse.Namespace) -> None:
    """``--cocoop``: the CoCoOp text pass on ViT-B-32 (random weights), --classes x --cocoop-images."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from promptcli.models.loading import load_model

    loaded = load_model("ViT-B-32", None, device="cpu", random_weights=True)
    rows = []
    for n in args.classes:
        row = cocoop_text_pass(loaded, n, args.cocoop_images, args.threads, args.repeats)
        rows.append(row)
        print(
            f"cocoop text pass, {n} classes x {args.cocoop_images} images: packed {row['packed_seconds']:.3f} s "
            f"({row['packed_flops'] / 1e9:.1f} GFLOP), naive 77-token {row['naive_seconds']:.3f} s "
            f"({row['naive_flops'] / 1e9:.1f} GFLOP): {row['speedup']:.1f}x faster, "
            f"{row['flop_ratio']:.1f}x fewer FLOPs, max |diff| {row['max_abs_diff']:.2e}"
        )
    out = args.json.with_name("cocoop.json") if args.json.name == "tune.json" else args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(args.threads), "cocoop": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
