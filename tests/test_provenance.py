"""Provenance: the working directory, the code's git commit, the libraries' and the device's record."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

import promptcli
from promptcli.errors import InputError
from promptcli.io import provenance
from promptcli.io.fileio import check_jsonl_prefix
from promptcli.learning.training import autocast_dtype
from promptcli.models.devices import runtime_record

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER = "89abcdef0123456789abcdef0123456789abcdef"
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(root: Path, *args: str) -> str:
    command = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def _repository(root: Path) -> str:
    """A git repository at ``root`` with one committed file; returns the commit."""
    _git(root, "init", "-q")
    (root / "a.txt").write_text("one\n")
    _git(root, "add", "a.txt")
    _git(root, "commit", "-q", "-m", "first")
    return _git(root, "rev-parse", "HEAD")


def test_no_git_record_outside_a_checkout(tmp_path):
    assert provenance.git_state(tmp_path) is None


@needs_git
def test_a_checkout_records_its_commit_and_whether_tracked_files_changed(tmp_path):
    commit = _repository(tmp_path)
    assert provenance.git_state(tmp_path) == {"commit": commit, "dirty": False}
    (tmp_path / "new.txt").write_text("untracked\n")  # not code promptcli runs: still clean
    assert provenance.git_state(tmp_path) == {"commit": commit, "dirty": False}
    (tmp_path / "a.txt").write_text("two\n")
    assert provenance.git_state(tmp_path) == {"commit": commit, "dirty": True}


@needs_git
def test_git_variables_of_the_caller_do_not_point_git_at_another_repository(tmp_path, monkeypatch):
    """Run from a git hook, `git rebase -x` or a dotfiles set-up (GIT_DIR, GIT_INDEX_FILE set)."""
    ours, other = tmp_path / "ours", tmp_path / "other"
    ours.mkdir(), other.mkdir()
    commit = _repository(ours)
    _repository(other)
    (other / "a.txt").write_text("changed\n")
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    monkeypatch.setenv("GIT_INDEX_FILE", str(other / ".git" / "index"))
    assert provenance.git_state(ours) == {"commit": commit, "dirty": False}


@needs_git
def test_without_git_the_commit_is_read_from_the_files(tmp_path, monkeypatch):
    commit = _repository(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no git to run
    assert provenance.git_state(tmp_path) == {"commit": commit, "dirty": None}  # dirty: unknown


@pytest.mark.parametrize("layout", ["loose", "packed", "detached", "worktree", "broken"])
def test_head_commit_follows_refs_packed_refs_and_worktrees(tmp_path, monkeypatch, layout):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    repo = tmp_path / "repo"
    git_dir = repo / ".git"
    (git_dir / "refs" / "heads").mkdir(parents=True)
    (git_dir / "HEAD").write_text("ref: refs/heads/main\n")
    expected: str | None = SHA
    if layout == "loose":
        (git_dir / "refs" / "heads" / "main").write_text(SHA + "\n")
    elif layout == "packed":
        (git_dir / "packed-refs").write_text(
            f"# pack-refs with: peeled\n{OTHER} refs/heads/other\n{SHA} refs/heads/main\n"
        )
    elif layout == "detached":
        (git_dir / "HEAD").write_text(SHA + "\n")
    elif layout == "worktree":  # .git is a file naming the worktree's folder; refs are the main repository's
        (git_dir / "refs" / "heads" / "main").write_text(OTHER + "\n")
        (git_dir / "refs" / "heads" / "feature").write_text(SHA + "\n")
        tree_dir = git_dir / "worktrees" / "wt"
        tree_dir.mkdir(parents=True)
        (tree_dir / "HEAD").write_text("ref: refs/heads/feature\n")
        (tree_dir / "commondir").write_text("../..\n")
        repo = tmp_path / "wt"
        repo.mkdir()
        (repo / ".git").write_text(f"gitdir: {tree_dir}\n")
    else:  # a ref that is not there: no commit, and no failure
        expected = None
    state = provenance.git_state(repo)
    assert state == (None if expected is None else {"commit": expected, "dirty": None})


def test_base_provenance_records_cwd_code_and_libraries(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = provenance.base_provenance()
    assert record["cwd"] == str(tmp_path)  # what the command's relative paths are relative to
    assert record["git"] == provenance.git_state(Path(promptcli.__file__).resolve().parent.parent)
    libraries = record["libraries"]
    assert set(provenance.LIBRARIES) | {"python"} == set(libraries)
    assert libraries["torch"] == version("torch") and libraries["numpy"] == version("numpy")
    assert libraries["python"] == ".".join(map(str, sys.version_info[:3]))
    for key in ("promptcli_version", "open_clip_version", "torch_version", "created", "command"):
        assert record[key], key  # the fields older files have stay


def test_provenance_of_a_non_utf8_folder_or_argument_is_utf8_text(tmp_path, monkeypatch):
    """A working directory or argument naming a non-UTF-8 file crashed writing every record (the features
    file's attributes: an 'unexpected UnicodeEncodeError'). Its invalid bytes are recorded as \\xNN."""
    folder = os.path.join(os.fsencode(tmp_path), b"run\xff")
    try:
        os.mkdir(folder)
    except OSError:
        pytest.skip("this file system takes UTF-8 names only")
    monkeypatch.chdir(folder)
    with provenance.recorded_command(["extract", "imgs", "-o", os.fsdecode(b"o\xff.h5")]):
        record = provenance.base_provenance()
    assert record["cwd"] == f"{tmp_path}/run\\xff"
    assert record["command"] == "promptcli extract imgs -o 'o\\xff.h5'"
    json.dumps(record, ensure_ascii=False).encode("utf-8")


def test_this_checkout_records_its_commit():
    root = Path(promptcli.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        pytest.skip("promptcli is not running from a git checkout")
    state = provenance.code_version()
    assert state is not None and len(state["commit"]) in (40, 64)
    assert state["dirty"] in (True, False, None)


def test_provenance_imports_no_torch():
    code = (
        "import sys; from promptcli.io.provenance import base_provenance; r = base_provenance();"
        "assert r['libraries']['torch'] and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(promptcli.__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_runtime_record_on_cpu():
    assert autocast_dtype("cpu", True) is None  # --amp autocasts on CUDA only
    assert runtime_record("cpu", autocast_dtype("cpu", True)) == {
        "device": "cpu",
        "autocast": False,
        "autocast_dtype": None,
        "torch_threads": torch.get_num_threads(),
    }
    record = runtime_record(torch.device("cpu"), torch.bfloat16)
    assert record["autocast"] is True and record["autocast_dtype"] == "bfloat16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runtime_record_on_cuda():
    dtype = autocast_dtype("cuda", True)
    assert dtype in (torch.bfloat16, torch.float16) and autocast_dtype("cuda", False) is None
    record = runtime_record("cuda", dtype)
    assert record["device"] == f"cuda:{torch.cuda.current_device()}"
    assert record["device_name"] == torch.cuda.get_device_name(torch.cuda.current_device())
    assert record["cuda_version"] == torch.version.cuda and record["autocast"] is True
    assert json.loads(json.dumps(record)) == record


def test_a_resumed_log_may_differ_only_in_the_named_run_keys(tmp_path):
    log = tmp_path / "log.jsonl"
    row = {"epoch": 1, "run": {"method": "coop", "runtime": {"device": "cuda:0"}}}
    log.write_text(json.dumps(row) + "\n")
    elsewhere = {"epoch": 1, "run": {"method": "coop", "runtime": {"device": "cpu"}}}
    check_jsonl_prefix(log, [elsewhere], False, ignore_run_keys=("runtime",))
    with pytest.raises(InputError, match="not the log"):
        check_jsonl_prefix(log, [elsewhere], False)
    with pytest.raises(InputError, match="not the log"):
        other = {"epoch": 1, "run": {"method": "cocoop", "runtime": {"device": "cuda:0"}}}
        check_jsonl_prefix(log, [other], False, ignore_run_keys=("runtime",))
