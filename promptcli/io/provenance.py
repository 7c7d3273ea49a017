"""What every output file records about how it was made.

Besides the versions, the creation time and the command line: the working directory the command's relative
paths are relative to (``cwd``), the git commit of a promptcli run from a checkout (``git``: commit and whether
the tree had uncommitted changes; None when not run from a git checkout) and the versions of the libraries that
change numbers (``libraries``). None of it imports torch: commands that need no model stay fast.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promptcli
from promptcli.io.fileio import shown_path

_COMMAND: list[str] | None = None

# Library -> its distribution's name: what ``libraries`` records (None when not installed).
LIBRARIES = {
    "numpy": "numpy",
    "torch": "torch",
    "open_clip": "open_clip_torch",
    "timm": "timm",
    "transformers": "transformers",
    "h5py": "h5py",
    "safetensors": "safetensors",
}
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_GIT_TIMEOUT_S = 5.0
# tracked files only (untracked ones are not code promptcli runs); no file-system monitor hook is started
_GIT_STATUS = ("-c", "core.fsmonitor=false", "status", "--porcelain=v2", "--branch", "--untracked-files=no")


@contextlib.contextmanager
def recorded_command(args: list[str]) -> Iterator[None]:
    """Record the promptcli arguments being run while the block runs (the CLI does; ``sys.argv`` may be another
    program's). Afterwards the earlier value is back, so later library calls in the same process do not record
    this command as theirs."""
    global _COMMAND
    before, _COMMAND = _COMMAND, ["promptcli", *args]
    try:
        yield
    finally:
        _COMMAND = before


def command_line() -> str:
    """The promptcli command line being run (else this process's), shell-quoted; a byte of an argument that is
    not UTF-8 (a file name) as ``\\xNN``, so the record can be written as UTF-8."""
    if _COMMAND is not None:
        return shown_path(shlex.join(_COMMAND))
    argv = list(sys.argv)
    if argv and argv[0].endswith(("promptcli", "__main__.py")):
        argv[0] = "promptcli"
    return shown_path(shlex.join(argv))


def working_directory() -> str | None:
    """The current directory (what relative paths in ``command`` are relative to), a byte that is not UTF-8 as
    ``\\xNN``; None if it was removed."""
    try:
        return shown_path(os.getcwd())
    except OSError:
        return None


def _version(package: str) -> str | None:
    """An installed package's version, from its metadata: without importing it (torch takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    """Python's and the number-changing libraries' versions (None: not installed); once per process."""
    return {"python": platform.python_version(), **{k: _version(d) for k, d in LIBRARIES.items()}}


def versions() -> dict[str, str]:
    """promptcli's, open_clip's and torch's versions, as every output has recorded them ("unknown": missing)."""
    libraries = library_versions()
    return {
        "promptcli_version": promptcli.__version__,
        "open_clip_version": libraries["open_clip"] or "unknown",
        "torch_version": libraries["torch"] or "unknown",
    }


def _git_status(root: Path) -> dict[str, Any] | None:
    """Commit and dirtiness from one ``git status`` (tracked files only); None when git fails or is absent."""
    # GIT_DIR, GIT_INDEX_FILE, ... (set in git hooks, `git rebase -x`, dotfiles set-ups) would point git at
    # another repository: promptcli's own checkout is asked about, with its own index
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_OPTIONAL_LOCKS="0", LC_ALL="C")  # read-only: no index refresh written
    try:
        proc = subprocess.run(
            ["git", "-C", str(root), *_GIT_STATUS],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env=env,
            timeout=_GIT_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    lines = proc.stdout.splitlines()
    oid = next((line.split()[2] for line in lines if line.startswith("# branch.oid ")), "")
    if not _SHA.fullmatch(oid):  # "(initial)": a repository without commits
        return None
    return {"commit": oid, "dirty": any(line and not line.startswith("#") for line in lines)}


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _head_commit(dot_git: Path) -> str | None:
    """The checked-out commit read from the files under ``.git`` (a folder, or a worktree's ``gitdir:`` file)."""
    git_dir = dot_git
    if dot_git.is_file():
        text = _read_text(dot_git) or ""
        if not text.startswith("gitdir:"):
            return None
        git_dir = dot_git.parent / text[len("gitdir:") :].strip()
    head = _read_text(git_dir / "HEAD")
    if head is None:
        return None
    if not head.startswith("ref:"):
        return head if _SHA.fullmatch(head) else None  # a detached HEAD
    ref = head[len("ref:") :].strip()
    common = _read_text(git_dir / "commondir")  # a worktree's refs live in the main repository
    common_dir = git_dir / common if common else git_dir
    for folder in (git_dir, common_dir):
        sha = _read_text(folder / ref)
        if sha is not None and _SHA.fullmatch(sha):
            return sha
    for line in (_read_text(common_dir / "packed-refs") or "").splitlines():
        sha, _, name = line.partition(" ")
        if name == ref and _SHA.fullmatch(sha):
            return sha
    return None


def git_state(root: Path) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout at ``root`` (``dirty``: tracked files changed; None when git
    is not installed and the commit was read from ``.git``); None when ``root`` has no ``.git``."""
    dot_git = root / ".git"
    if not dot_git.exists():
        return None
    status = _git_status(root)
    if status is not None:
        return status
    commit = _head_commit(dot_git)
    return None if commit is None else {"commit": commit, "dirty": None}


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any] | None:
    """The git state of the checkout promptcli runs from (an editable install: ``.git`` beside the package
    folder); None for an installed copy. Once per process."""
    return git_state(Path(promptcli.__file__).resolve().parent.parent)


def base_provenance() -> dict[str, Any]:
    """Versions, creation time (UTC, ISO 8601), the command line, its working directory, the code's git commit
    and the libraries' versions."""
    return {
        **versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "cwd": working_directory(),
        "git": code_version(),
        "libraries": library_versions(),
    }
