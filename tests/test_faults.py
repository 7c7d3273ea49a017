"""Issue 18, faults: real signals, concurrent writers, broken pipes and a full disk, on real processes.

Each fault must leave no partial file under the final name and an existing output untouched, say so
in one line, and (for extract and tune) ``--resume`` must end identical to an uninterrupted run.
The interrupted runs are stopped once their ``OUTPUT.partial`` checkpoint shows progress (polled, not
guessed with sleeps); they are long enough that they cannot finish in the moment before the signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import make_image_folder
from promptcli.cli.app import terminated_message, termination_as_interrupt
from promptcli.io.prompt_files import read_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def spawn(cwd: Path, *args: object) -> subprocess.Popen:
    """``python -m promptcli ARGS`` as a real process in its own process group (a job, as a scheduler runs
    it); stderr goes to ``cwd/stderr-<time>.txt``."""
    err = open(cwd / f"stderr-{time.monotonic_ns()}.txt", "w+")  # noqa: SIM115 (closed by finish)
    proc = subprocess.Popen(
        [sys.executable, "-m", "promptcli", *map(str, args)],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=err,
        text=True,
        start_new_session=True,
    )
    proc.err_file = err  # type: ignore[attr-defined]
    return proc


def stderr_so_far(proc: subprocess.Popen) -> str:
    return Path(proc.err_file.name).read_text()  # type: ignore[attr-defined]


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for ``proc``; its exit status and stderr."""
    code = proc.wait(timeout=timeout)
    proc.err_file.seek(0)  # type: ignore[attr-defined]
    err = proc.err_file.read()  # type: ignore[attr-defined]
    proc.err_file.close()  # type: ignore[attr-defined]
    return code, err


def wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll until ``ready()``; fail if ``proc`` ends first (then the run was too short to interrupt)."""
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            code, err = finish(proc)
            pytest.fail(f"the run ended (exit {code}) before {what}: {err}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.01)


def one_line(err: str, start: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), err
    assert "Traceback" not in err and "unexpected" not in err, err
    return lines[0]


# How a run is stopped: Ctrl-C at a terminal, or a scheduler's time limit (SIGTERM to every process of the job,
# DataLoader workers included), with the exit status and the start of the one line each gives.
STOPS = {
    "ctrl-c": (signal.SIGINT, 130, "Error: interrupted"),
    "sigterm": (signal.SIGTERM, 143, "Error: terminated by SIGTERM"),
}


def stopped(proc: subprocess.Popen, how: str = "ctrl-c") -> None:
    signum, status, start = STOPS[how]
    os.killpg(proc.pid, signum)
    code, err = finish(proc)
    assert code == status, err
    line = one_line(err, start)
    assert ".partial" in line and "--resume" in line


def killed(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    finish(proc)


def test_termination_signals_stop_as_ctrl_c_does_and_ignored_ones_stay_ignored():
    before = signal.getsignal(signal.SIGTERM)
    hangup = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with termination_as_interrupt() as received:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)  # the handler runs between bytecodes, at once
            assert received == [signal.SIGTERM]
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second one ends the process
        assert signal.getsignal(signal.SIGTERM) is before
        assert terminated_message(signal.SIGTERM).startswith("terminated by SIGTERM — no half-written output")
    finally:
        signal.signal(signal.SIGHUP, hangup)


def test_a_termination_arriving_inside_a_finalizer_is_not_lost():
    """Python prints and drops an exception raised in ``__del__``: a SIGTERM handled there must stop the run
    once the finalizer is over (CI once saw the run go on to exit 0 after 'Exception ignored in ZipFile.__del__')."""

    class Closing:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs here, inside __del__

    with termination_as_interrupt() as received:
        with pytest.raises(KeyboardInterrupt):
            Closing()  # collected at once
            time.sleep(10)  # the signal again, after the finalizer
        assert received == [signal.SIGTERM]


def h5_datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in f}


def chunks(partial: Path) -> int:
    return len(list(partial.glob("chunk-*.npz"))) if partial.is_dir() else 0


# --- Ctrl-C and kill -9, then --resume ------------------------------------------------------------


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """30 images: one image per chunk gives 30 checkpoints to interrupt between."""
    return make_image_folder(tmp_path_factory.mktemp("faults") / "imgs", per_class=10)


@pytest.mark.slow
@pytest.mark.parametrize("how, workers", [("ctrl-c", "0"), ("sigterm", "2")])
def test_a_stop_and_kill_during_extract_then_resume_is_identical(
    how, workers, tmp_path, many_images, cli_model_args, run_cli
):
    options = [*cli_model_args, "-b", "1", "--chunk-size", "1", "--views", "2", "-q"]
    code, _, err = run_cli("extract", many_images, "-o", tmp_path / "whole.h5", "--workers", "0", *options)
    assert code == 0, err
    out, partial = tmp_path / "cut.h5", tmp_path / "cut.h5.partial"
    options += ["--workers", workers]

    proc = spawn(tmp_path, "extract", many_images, "-o", out, *options)
    wait_for("the first chunk", lambda: chunks(partial) >= 1, proc)
    stopped(proc, how)  # with workers, SIGTERM reaches them too: no DataLoader traceback (one line)
    assert not out.exists() and not Path(f"{out}.lock").exists()
    kept = chunks(partial)
    assert 1 <= kept < 30

    proc = spawn(tmp_path, "extract", many_images, "-o", out, *options, "--resume")
    wait_for("a chunk more", lambda: chunks(partial) > kept, proc)
    killed(proc)
    assert not out.exists() and Path(f"{out}.lock").exists()  # a dead writer's lock: taken over below

    code, _, err = run_cli("extract", many_images, "-o", out, *options, "--resume")
    assert code == 0, err
    assert not partial.exists() and not Path(f"{out}.lock").exists()
    whole, cut = h5_datasets(tmp_path / "whole.h5"), h5_datasets(out)
    assert whole.keys() == cut.keys()
    for name in whole:
        np.testing.assert_array_equal(whole[name], cut[name])


@pytest.mark.slow
@pytest.mark.parametrize("how", STOPS)
def test_a_stop_and_kill_during_tune_then_resume_is_identical(how, tmp_path, noisy_labels, run_cli):
    features, labels = noisy_labels["features"], noisy_labels["labels"]
    options = ["--epochs", "60", "-b", "2", "--n-ctx", "2", "--device", "cpu", "-q"]
    code, _, err = run_cli("tune", features, labels, "-o", tmp_path / "whole.st", *options)
    assert code == 0, err
    out, partial = tmp_path / "cut.st", tmp_path / "cut.st.partial"

    def epoch() -> int:  # the checkpoint's last epoch (it is renamed into place, never half-written)
        return len(torch.load(partial, weights_only=True)["history"]) if partial.exists() else 0

    proc = spawn(tmp_path, "tune", features, labels, "-o", out, *options)
    wait_for("the first checkpoint", partial.exists, proc)
    stopped(proc, how)
    assert not out.exists() and not Path(f"{out}.lock").exists()
    kept = epoch()
    assert 1 <= kept < 60

    proc = spawn(tmp_path, "tune", features, labels, "-o", out, *options, "--resume")
    wait_for("an epoch more", lambda: epoch() > kept, proc)
    killed(proc)
    assert not out.exists()

    code, _, err = run_cli("tune", features, labels, "-o", out, *options, "--resume")
    assert code == 0, err
    assert not partial.exists() and not Path(f"{out}.lock").exists()
    whole, cut = read_prompt(tmp_path / "whole.st"), read_prompt(out)
    assert whole.tensors.keys() == cut.tensors.keys()
    for name in whole.tensors:
        assert torch.equal(whole.tensors[name], cut.tensors[name]), name
    assert whole.metadata["metrics"] == cut.metadata["metrics"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith("stderr-")
    }


@pytest.mark.slow
def test_kill_during_gradstats_and_clean_leaves_the_outputs_as_they_were(tmp_path, noisy_labels, run_cli):
    features, labels = noisy_labels["features"], noisy_labels["labels"]
    for name in ("g.csv", "g.csv.json", "c.csv", "c.csv.json"):
        (tmp_path / name).write_text(f"my own {name}\n")
    before = _snapshot(tmp_path)
    proc = spawn(
        tmp_path, "gradstats", features, labels, "-o", "g.csv", "--epochs", "300", "-b", "2",
        "--n-ctx", "2", "--device", "cpu", "--force",
    )  # fmt: skip
    wait_for("training", lambda: "epochs of batch" in stderr_so_far(proc), proc)
    killed(proc)
    assert _snapshot(tmp_path) == before

    code, _, err = run_cli("tune", features, labels, "-o", tmp_path / "p.st", "--epochs", "2", "--n-ctx", "2",
                           "--device", "cpu", "-q")  # fmt: skip
    assert code == 0, err
    before = _snapshot(tmp_path)
    proc = spawn(
        tmp_path, "clean", features, labels, "-p", "p.st", "-o", "c.csv", "--device", "cpu", "--force"
    )
    # clean has no long phase to wait for: it is killed once torch is loaded, seconds before it ends
    wait_for("torch loaded", lambda: _has_loaded(proc.pid, "libtorch"), proc)
    killed(proc)
    after = _snapshot(tmp_path)
    assert after == before, sorted(set(after) ^ set(before))


def _has_loaded(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


# --- two writers of one output ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("command", ["tune", "extract --resume"])
def test_a_second_writer_of_one_output_is_refused_while_the_first_runs(
    command, tmp_path, noisy_labels, many_images, cli_model_args
):
    out = tmp_path / ("p.st" if command == "tune" else "f.h5")
    if command == "tune":
        args = ["tune", noisy_labels["features"], noisy_labels["labels"], "--epochs", "20", "--n-ctx", "2"]
        args += ["--device", "cpu"]
    else:
        args = ["extract", many_images, *cli_model_args, "--workers", "0", "--chunk-size", "4", "--resume"]
    args += ["-o", out, "-q"]
    lock = Path(f"{out}.lock")
    first = spawn(tmp_path, *args)
    wait_for("the output lock", lock.exists, first)
    os.kill(first.pid, signal.SIGSTOP)  # the first run holds the lock, whatever the machine's speed
    try:
        code, err = finish(spawn(tmp_path, *args))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    line = one_line(err, f"Error: {out}: another promptcli (pid {first.pid}) is writing this output")
    assert code == 2 and str(lock) in line
    code, err = finish(first)
    assert code == 0 and not err, err
    assert out.exists() and not lock.exists() and not Path(f"{out}.partial").exists()


# --- broken pipes ----------------------------------------------------------------------------------


def test_output_into_head_ends_quietly(tmp_path):
    """``corrupt -o - | head -1``: head leaves after one line; promptcli exits 1, nothing on stderr."""
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"img{i:06d}.png,{'abc'[i % 3]}\n" for i in range(100_000)))
    err = tmp_path / "err.txt"
    with open(err, "w") as err_file:
        writer = subprocess.Popen(
            [sys.executable, "-m", "promptcli", "corrupt", labels, "--rate", "0.3", "-o", "-"],
            env=ENV, stdout=subprocess.PIPE, stderr=err_file,
        )  # fmt: skip
        head = subprocess.run(["head", "-1"], stdin=writer.stdout, capture_output=True, text=True)
        writer.stdout.close()
        assert writer.wait(timeout=120) == 1
    assert head.stdout == "path,label,clean_label,is_noisy\n"
    assert err.read_text() == ""


@pytest.mark.slow
def test_predictions_into_a_closed_pipe_end_quietly(tiny_features):
    """``eval --predictions -`` to a reader that is already gone: exit 1, nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE: no race with a reader
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "promptcli", "eval", tiny_features, "--zero-shot", "--predictions", "-",
             "--device", "cpu", "-q"],
            env=ENV, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr


# --- a full disk -----------------------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A 256 KiB tmpfs with under 8 KiB left (needs root to mount: skipped elsewhere)."""
    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        (folder / "old.st").write_bytes(b"an output made before\n")
        stats = os.statvfs(folder)
        (folder / "filler").write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - 8192))
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_line_and_leaves_outputs_as_they_were(
    full_disk, tmp_path, noisy_labels, image_folder, cli_model_args, run_cli
):
    features, labels = noisy_labels["features"], noisy_labels["labels"]
    clean = tmp_path / "clean.csv"  # 40 KB of noisy labels to write: more than the disk has left
    clean.write_text("path,label\n" + "".join(f"img{i:05d}.png,{'abc'[i % 3]}\n" for i in range(2000)))
    before = _snapshot(full_disk)
    runs = {
        "tune": ("tune", features, labels, "-o", full_disk / "old.st", "--force", "--epochs", "2", "--n-ctx", "2",
                 "--device", "cpu", "-q"),
        "extract": ("extract", image_folder, "-o", full_disk / "f.h5", *cli_model_args, "--workers", "0", "-q"),
        "corrupt": ("corrupt", clean, "--rate", "0.3", "-o", full_disk / "n.csv", "-q"),
    }  # fmt: skip
    for name, args in runs.items():
        code, _, err = run_cli(*args)
        line = one_line(err, f"Error: {full_disk}")
        assert code == 1 and "no space left on device (the disk is full)" in line, (name, err)
        leftovers = {p.name for p in full_disk.iterdir()} - set(before)
        assert leftovers <= {"f.h5.partial"}, (name, leftovers)  # extract keeps its (empty) partial
        assert _snapshot(full_disk) == before, name


def test_running_out_of_gpu_memory_is_one_line(monkeypatch, tmp_path, noisy_labels, run_cli):
    import promptcli.learning.tune_run as tune_run

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(tune_run, "train", out_of_memory)
    out = tmp_path / "p.safetensors"
    code, _, err = run_cli(
        "tune", noisy_labels["features"], noisy_labels["labels"], "-o", out, "--device", "cpu"
    )
    line = one_line(err, "Error: out of GPU memory")
    assert code == 1 and "--device cpu" in line and not out.exists()
