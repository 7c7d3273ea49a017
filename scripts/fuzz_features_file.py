"""Byte-flip fuzz of the promptcli features reader.

usage (PYTHONPATH=<checkout>; not part of the test suite; a few minutes on 2 cores):
       python scripts/fuzz_features_file.py make DIR/base.h5          the file and its twin (DIR/base.twin.h5)
       python scripts/fuzz_features_file.py run DIR/base.h5 DIR/report.json [--struct-cap N] [--data-n N]
                                                                       [--runs-n N] [--limit S]
       python scripts/fuzz_features_file.py recheck DIR/report.json hang,signal   each again in a fresh process

Structure offsets = offsets whose byte is equal in two files written with different values (metadata,
attribute text, constant padding); every one of them (up to --struct-cap) gets a single-byte xor 0xff,
--runs-n random structural offsets get a random 4-byte run, --data-n random other offsets a random xor.
Each trial reads the damaged copy in a forked child (read_features with views, read_feature_index,
iter_blocks), killed after --limit seconds (a hang).
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from promptcli.errors import InputError
from promptcli.io import features as F

N, DIM, VIEWS = 2100, 8, 2


def make(out: Path, seed: int) -> None:
    from promptcli.io.provenance import base_provenance

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    v = rng.normal(size=(N, VIEWS, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=2, keepdims=True)
    letters = "abcdefghij" if seed == 0 else "klmnopqrst"
    classes = [f"class {letters[i]}" for i in range(10)]
    chars = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    paths = [f"{classes[i % 10].replace(' ', '_')}/{''.join(rng.choice(chars, 12))}.jpg" for i in range(N)]
    split_names = ["train", "valid", "tests", "other"]
    splits = [split_names[(i + seed) % 4] for i in range(N)]
    attrs = {
        **base_provenance(),
        "model_name": "ViT-B-32",
        "pretrained": "openai",
        "model_config": "",
        "checkpoint_sha256": "0" * 64,
        "random_weights_seed": "",
        "embed_dim": DIM,
        "image_size": 224,
        "preprocess": {"size": 224, "mean": [0.48, 0.45, 0.40], "std": [0.26, 0.26, 0.27]},
        "precision": "float32",
        "runtime": {"device": "cpu"},
        "source": "data/train",
        "source_kind": "folder",
        "source_digest": "1" * 64,
        "images_digest": "2" * 64,
        "manifest": json.dumps({"n_rows": N, "views": VIEWS, "seed": 0, "dtype": "float16"}),
        "files_digest": "3" * 64,
        "n_images": N,
        "n_skipped": 0,
        "skipped": [],
        "options": {"views": VIEWS, "seed": 0, "batch_size": 64, "workers": 2, "dtype": "float16"},
        "views": VIEWS,
        "seed": 0,
        "dtype": "float16",
        "augmentation": "RandomResizedCrop(scale=(0.08, 1), bicubic) + RandomHorizontalFlip + Normalize",
    }
    attrs["created"] = "2026-01-01T00:00:00+00:00"
    F.write_features(
        out,
        features=[x[i : i + 700] for i in range(0, N, 700)],
        n_rows=N,
        dim=DIM,
        paths=paths,
        labels=[i % 10 for i in range(N)],
        splits=splits,
        classnames=classes,
        attrs=attrs,
        n_views=VIEWS,
        views=[v[i : i + 700] for i in range(0, N, 700)],
        dtype="float16",
    )


def content(path: str):
    fs = F.read_features(path)
    index = F.read_feature_index(path)
    blocks = np.concatenate([b for _, b in F.iter_blocks(path, F.row_blocks(len(index), 500), index.stamp)])
    return fs, index, blocks


def diff(orig, got) -> list[str]:
    fs0, _, _ = orig
    fs, index, blocks = got
    out = []
    for name in ("features", "views", "labels"):
        if not np.array_equal(getattr(fs0, name), getattr(fs, name)):
            out.append(name)
    if not np.array_equal(fs0.features, blocks):
        out.append("iter_blocks")
    for name in ("paths", "splits", "classnames"):
        if getattr(fs0, name) != getattr(fs, name) or getattr(fs0, name) != getattr(index, name):
            out.append(name)
    for key in sorted(set(fs0.attrs) | set(fs.attrs), key=repr):
        if fs0.attrs.get(key, "<absent>") != fs.attrs.get(key, "<absent>"):
            out.append(f"attr:{key}")
    return out


def trial(base: bytes, offset: int, patch: bytes, orig, work: Path, limit: float) -> tuple[str, str]:
    data = bytearray(base)
    data[offset : offset + len(patch)] = patch
    path = work / f"t{offset}.h5"
    path.write_bytes(bytes(data))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            signal.alarm(int(limit) + 5)  # backstop: default SIGALRM action ends the child
            try:
                got = content(str(path))
                d = diff(orig, got)
                res = ("silent_wrong", ",".join(d)) if d else ("same", "")
            except InputError as exc:
                msg = str(exc)
                one_line = "\n" not in msg and str(path) in msg
                res = ("input_error" if one_line else "input_error_bad", msg.replace(str(path), "FILE")[:300])
            except BaseException as exc:  # noqa: BLE001
                res = ("crash", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
            os.write(w, json.dumps(res).encode())
        finally:
            os._exit(0)
    os.close(w)
    ready, _, _ = select.select([r], [], [], limit)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        path.unlink()
        return ("hang", "")
    raw = b""
    while chunk := os.read(r, 65536):
        raw += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    path.unlink()
    if not raw:
        return ("signal", f"status {status}")
    kind, msg = json.loads(raw)
    return kind, msg


def run(base_path: Path, report: Path, struct_cap: int, data_n: int, runs_n: int, limit: float) -> None:
    twin = base_path.with_suffix(".twin.h5")
    base, other = base_path.read_bytes(), twin.read_bytes()
    orig = content(str(base_path))
    n = min(len(base), len(other))
    struct = [i for i in range(n) if base[i] == other[i]]
    rest = [i for i in range(len(base)) if i >= n or base[i] != other[i]]
    rng = random.Random(0)
    head = [i for i in struct if i < 8192]
    tail = [i for i in struct if i >= 8192]
    picked = head + sorted(rng.sample(tail, min(struct_cap, len(tail))))
    plan = [(i, bytes([base[i] ^ 0xFF]), "xor_ff") for i in picked]
    for i in rng.sample(struct, min(runs_n, len(struct))):
        plan.append((i, bytes(rng.randrange(256) for _ in range(4)), "run4"))
    for i in rng.sample(rest, min(data_n, len(rest))):
        plan.append((i, bytes([base[i] ^ rng.randrange(1, 256)]), "data_xor"))
    work = Path(os.environ.get("FUZZ_WORK", str(base_path.parent / "work")))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    t0 = time.time()
    for k, (off, patch, kind) in enumerate(plan):
        outcome, msg = trial(base, off, patch, orig, work, limit)
        results.append(
            {"offset": off, "patch": patch.hex(), "mutation": kind, "outcome": outcome, "msg": msg}
        )
        if k % 500 == 0:
            print(f"{k}/{len(plan)} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    summary = {
        "file_size": len(base),
        "structural_offsets": len(struct),
        "trials": len(plan),
        "by_mutation_outcome": {
            m: dict(Counter(r["outcome"] for r in results if r["mutation"] == m))
            for m in ("xor_ff", "run4", "data_xor")
        },
        "outcomes": dict(Counter(r["outcome"] for r in results)),
        "crash_kinds": dict(Counter(r["msg"].split(":")[0] for r in results if r["outcome"] == "crash")),
        "silent_fields": dict(Counter(r["msg"] for r in results if r["outcome"] == "silent_wrong")),
        "error_kinds": dict(
            Counter(r["msg"][:70] for r in results if r["outcome"].startswith("input_error")).most_common(25)
        ),
        "hang_offsets": [r["offset"] for r in results if r["outcome"] == "hang"],
        "seconds": round(time.time() - t0),
    }
    report.write_text(json.dumps({"summary": summary, "results": results}, indent=1))
    print(json.dumps(summary, indent=1))


def one(base_path: Path, offset: int, patch: str) -> None:
    """One trial in this process (run it under `timeout -s KILL`): prints the outcome as JSON."""
    import tempfile

    orig = content(str(base_path))
    with tempfile.TemporaryDirectory() as tmp:
        data = bytearray(base_path.read_bytes())
        p = bytes.fromhex(patch)
        data[offset : offset + len(p)] = p
        path = Path(tmp) / "t.h5"
        path.write_bytes(bytes(data))
        try:
            d = diff(orig, content(str(path)))
            res = ("silent_wrong", ",".join(d)) if d else ("same", "")
        except InputError as exc:
            msg = str(exc)
            res = ("input_error" if "\n" not in msg and str(path) in msg else "input_error_bad", msg[:300])
        except Exception as exc:  # noqa: BLE001
            res = ("crash", f"{type(exc).__name__}: {exc}"[:300])
    print(json.dumps(res))


def recheck(report: Path, outcomes: set[str]) -> None:
    """Re-run the trials of these outcomes each in a fresh process under `timeout -s KILL 20`."""
    import subprocess

    data = json.loads(report.read_text())
    base = report.parent / "base.h5"
    changed = Counter()
    for r in data["results"]:
        if r["outcome"] not in outcomes:
            continue
        proc = subprocess.run(
            [
                "timeout",
                "-s",
                "KILL",
                "20",
                sys.executable,
                __file__,
                "one",
                str(base),
                str(r["offset"]),
                r["patch"],
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode in (124, 137, -9):
            kind, msg = "hang", "fresh process killed after 20 s"
        elif proc.returncode < 0 or proc.returncode > 128 or not proc.stdout.strip():
            kind, msg = "signal", f"rc {proc.returncode}"
        else:
            kind, msg = json.loads(proc.stdout.strip().splitlines()[-1])
        changed[(r["outcome"], kind)] += 1
        r["fork_outcome"], r["outcome"], r["msg"] = r["outcome"], kind, msg
    results = data["results"]
    s = data["summary"]
    s["outcomes"] = dict(Counter(r["outcome"] for r in results))
    s["by_mutation_outcome"] = {
        m: dict(Counter(r["outcome"] for r in results if r["mutation"] == m))
        for m in ("xor_ff", "run4", "data_xor")
    }
    s["crash_kinds"] = dict(Counter(r["msg"][:60] for r in results if r["outcome"] == "crash"))
    s["silent_fields"] = dict(Counter(r["msg"] for r in results if r["outcome"] == "silent_wrong"))
    s["hang_offsets"] = [(r["offset"], r["mutation"]) for r in results if r["outcome"] == "hang"]
    s["signal_offsets"] = [(r["offset"], r["mutation"]) for r in results if r["outcome"] == "signal"]
    s["rechecked"] = {f"{a}->{b}": n for (a, b), n in changed.items()}
    report.write_text(json.dumps(data, indent=1))
    print(
        json.dumps(
            {
                k: s[k]
                for k in (
                    "outcomes",
                    "by_mutation_outcome",
                    "crash_kinds",
                    "hang_offsets",
                    "signal_offsets",
                    "rechecked",
                )
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    if sys.argv[1] == "one":
        one(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    elif sys.argv[1] == "recheck":
        recheck(Path(sys.argv[2]), set(sys.argv[3].split(",")))
    elif sys.argv[1] == "make":
        out = Path(sys.argv[2])
        make(out, 0)
        make(out.with_suffix(".twin.h5"), 1)
    else:
        args = sys.argv[4:]
        opt = {a.lstrip("-"): float(b) for a, b in zip(args[::2], args[1::2])}
        run(
            Path(sys.argv[2]),
            Path(sys.argv[3]),
            int(opt.get("struct-cap", 6000)),
            int(opt.get("data-n", 800)),
            int(opt.get("runs-n", 800)),
            opt.get("limit", 5.0),
        )
