"""Distributed extraction: torchrun with 2 CPU processes (gloo) against a single-process run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from promptcli.errors import InputError
from promptcli.extraction.distributed import DistContext, context_from_env, shard
from promptcli.io.fileio import output_lock

# 18 rows in chunks of 4 -> 5 chunks: rank 0 takes 0, 2, 4 and rank 1 takes 1, 3.
EXTRACT_ARGS = ["--views", "1", "--dtype", "float32", "-b", "4", "--chunk-size", "4"]
DATASETS = ("features", "views", "paths", "labels", "splits", "classnames")


def torchrun(images: Path, output: Path, model_args: list[str], *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROMPTCLI_DIST_TIMEOUT": "120"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "promptcli", "extract", str(images), "-o", str(output), *model_args, *EXTRACT_ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)


def assert_same_datasets(a: Path, b: Path) -> None:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert set(fa) == set(fb) == set(DATASETS)
        for name in DATASETS:
            x, y = fa[name][...], fb[name][...]
            assert x.dtype == y.dtype and x.shape == y.shape, name
            same = x.tolist() == y.tolist() if x.dtype == object else x.tobytes() == y.tobytes()
            assert same, f"{name} differs"


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, image_folder, tiny_model_files) -> Path:
    from promptcli.cli.app import main

    out = tmp_path_factory.mktemp("single") / "single.h5"
    args = ["extract", str(image_folder), "-o", str(out), "-q", "-j", "0"]
    args += ["--model", "tiny-clip", "--model-config", str(tiny_model_files["config"])]
    args += ["--pretrained", str(tiny_model_files["weights"]), "--device", "cpu", *EXTRACT_ARGS]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    return out


@pytest.mark.slow
def test_failure_on_one_rank_stops_all_and_the_resumed_run_matches_one_process(
    tmp_path, image_folder, cli_model_args, single_run
):
    images = tmp_path / "train"
    shutil.copytree(image_folder, images)
    bad = images / "blue_sky" / "img004.png"  # row 4: chunk 1, which rank 1 encodes
    bad.write_bytes(b"not an image")
    out = tmp_path / "dist.h5"
    with output_lock(out):  # another writer holds the output: rank 0 is refused and every rank stops
        proc = torchrun(images, out, cli_model_args, "-j", "0")
    assert proc.returncode != 0  # torchrun's own status for a failed rank
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "is writing this output" in errors[0], proc.stderr[-3000:]
    assert not out.exists() and not Path(f"{out}.partial").exists()

    proc = torchrun(images, out, cli_model_args, "-j", "0")
    assert proc.returncode != 0
    assert not Path(f"{out}.lock").exists()  # released by rank 0 however the run ended
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]  # reported once, by rank 0, for rank 1's image
    assert errors[0].startswith(f"Error: {bad}: cannot read image (not a readable image) — ")
    assert not out.exists()
    partial = Path(f"{out}.partial")
    assert (partial / "failed-rank1").exists() and not (partial / "chunk-000001.npz").exists()
    n_left = len(list(partial.glob("chunk-*.npz")))  # rank 0 stops as soon as it sees the failure

    # fix the image and resume on 2 ranks: the remaining chunks are shared out again
    shutil.copyfile(image_folder / "blue_sky" / "img004.png", bad)
    proc = torchrun(images, out, cli_model_args, "-j", "1", "--resume", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_datasets(single_run, out)
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["distributed"]) == {"world_size": 2, "backend": "gloo"}
        with h5py.File(
            single_run, "r"
        ) as one:  # the images' digest too, from chunks of two ranks and two runs
            assert f.attrs["images_digest"] == one.attrs["images_digest"]
        assert f["features"].shape == (18, 32) and f["views"].shape == (18, 1, 32)
    summary = json.loads(proc.stdout)  # only rank 0 prints: exactly one JSON document
    assert (summary["n_images"], summary["resumed_chunks"], summary["output"]) == (18, n_left, str(out))
    assert proc.stderr.count("Wrote 18 embeddings") == 1
    assert not partial.exists()
    # requeued after it finished: every rank sees the same run's file and stops; nothing is rewritten
    before = out.read_bytes()
    proc = torchrun(images, out, cli_model_args, "-j", "1", "--resume", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["already_complete"] is True and out.read_bytes() == before


def test_shard_covers_every_item_once():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(sum(parts, [])) == items


def test_context_from_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert context_from_env() is None
    with pytest.raises(InputError, match="without WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR"):
        context_from_env(force=True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert context_from_env() is None  # torchrun with one process: a plain run
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ctx = context_from_env()
    assert (ctx.world_size, ctx.rank, ctx.local_rank, ctx.is_main, ctx.active) == (4, 3, 1, False, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(InputError, match="RANK 4 outside WORLD_SIZE 4"):
        context_from_env()


def test_distributed_flag_without_torchrun_is_a_clear_error(monkeypatch, run_cli, image_folder, tmp_path):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = run_cli("extract", image_folder, "-o", tmp_path / "x.h5", "--distributed")
    assert code == 2
    assert "Error: --distributed: distributed run without WORLD_SIZE" in err and "torchrun" in err


def test_ranks_pick_their_local_gpu_and_refuse_a_fixed_one():
    ctx = DistContext(world_size=2, rank=1, local_rank=1)
    assert ctx.device_spec("cpu") == "cpu"
    with pytest.raises(InputError, match="each rank uses cuda:LOCAL_RANK"):
        ctx.device_spec("cuda:0")
    if not torch.cuda.is_available():  # a CPU machine: auto is a real device, cuda a one-line error
        assert ctx.device_spec("auto") == "cpu" and ctx.device_spec(None) == "cpu"
        with pytest.raises(InputError, match="--device: cuda requested but CUDA is not available"):
            ctx.device_spec("cuda")


def test_mixed_precision_picks_bf16_only_where_the_gpu_computes_it():
    from promptcli.models.devices import bf16_ok, resolve_precision

    assert not bf16_ok(torch.device("cpu"))
    with pytest.raises(InputError, match="bf16 needs a GPU"):
        resolve_precision("bf16", torch.device("cpu"))
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability(0)
        assert bf16_ok(torch.device("cuda", 0)) == (major >= 8)


def test_single_process_collective_returns_and_raises():
    ctx = DistContext()
    assert ctx.collective(lambda: 5) == 5 and ctx.from_main(lambda: [1, 2]) == [1, 2]
    with pytest.raises(InputError, match="boom"):
        ctx.collective(lambda: (_ for _ in ()).throw(InputError("boom", where="x")))
