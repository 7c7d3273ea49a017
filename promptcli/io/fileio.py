"""Safe file writing: temporary file renamed into place, no silent overwrite, hashing."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from promptcli.errors import InputError, RuntimeFailure

STDIO = "-"
F = TypeVar("F", bound=Callable[..., Any])


def check_output_path(path: str | Path, force: bool, option: str = "-o") -> Path:
    """Refuse to overwrite an existing output unless ``force``; check its folder exists."""
    if not str(path).strip():  # Path("") is "." (an unset shell variable?)
        raise InputError("empty file name", where=option, hint=f"give {option} a file name")
    path = Path(path)
    if path.is_dir():  # also -o "" (an unset shell variable), which a Path option reads as "."
        raise InputError("output is a directory", where=path, hint=f"give a file name to {option}")
    if path.exists() and not force:
        raise InputError(
            "output exists", where=path, hint=f"pass --force to overwrite it or choose another {option}"
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise InputError("output folder does not exist", where=parent, hint="create it first")
    check_writable_folder(parent, option)
    return path


def check_writable_folder(folder: str | Path, option: str = "-o") -> None:
    """Refuse, before any work, an output folder this process cannot create files in."""
    folder = Path(folder)
    read_only_mount = hasattr(os, "statvfs") and bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    if read_only_mount or not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(
            "output folder is not writable" + (" (read-only file system)" if read_only_mount else ""),
            where=folder,
            hint=f"choose an {option} in a folder you can write to",
        )


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (symlinks, hard links and case-insensitive file systems too)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links and case-insensitive file systems
    except OSError:
        return False


def check_distinct(inputs: dict[str, str | Path | None], outputs: dict[str, str | Path | None]) -> None:
    """Refuse an output that is also an input, or two outputs that name one file.

    Keys name the argument or option (``-o``, ``--log``, ``FEATURES``); ``None`` entries are
    skipped. ``-`` (stdin/stdout) is no file, but two outputs on stdout would mix their data.
    """
    given_out = [(k, str(v)) for k, v in outputs.items() if v is not None]
    given_in = [(k, str(v)) for k, v in inputs.items() if v is not None and str(v) != STDIO]
    for i, (name, path) in enumerate(given_out):
        for other, other_path in given_out[:i]:
            if path == STDIO and other_path == STDIO:
                raise InputError(
                    f"{other} and {name} both write to stdout", where=name, hint="send one of them to a file"
                )
            if STDIO not in (path, other_path) and same_file(path, other_path):
                raise InputError(
                    f"{other} and {name} name the same file", where=path, hint="give each output its own file"
                )
        if path == STDIO:
            continue
        for other, in_path in given_in:
            if same_file(path, in_path):
                raise InputError(
                    f"output {name} is the input {other}",
                    where=path,
                    hint="write the output to another file (the input must stay intact)",
                )


LOCK_SUFFIX = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _this_host() -> str:
    import socket

    return socket.gethostname() or "?"


def _lock_owner(lock: Path) -> tuple[int, str | None] | None:
    """(pid, host) written in a lock; host None in a lock from before hosts were recorded."""
    try:
        fields = lock.read_text(encoding="utf-8").split()
        return int(fields[0]), (fields[1] if len(fields) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None


def _owner_gone(owner: tuple[int, str | None]) -> bool:
    """Whether a lock's writer surely no longer runs: only knowable for a process on this host."""
    pid, host = owner
    return host in (None, _this_host()) and not _pid_alive(pid)


@contextlib.contextmanager
def output_lock(path: str | Path, option: str = "-o") -> Iterator[Path]:
    """Hold ``<path>.lock`` (created with O_EXCL, holding the pid) while a command writes ``path``.

    A second command writing the same output is refused; a lock whose pid no longer runs on this
    host (the writer was killed) is taken over; one from another host (a shared filesystem) is
    never guessed stale. The lock holds "pid host" and is removed on exit, whatever happens.
    """
    me = (os.getpid(), _this_host())
    lock = Path(f"{path}{LOCK_SUFFIX}")
    parent = lock.parent
    if not parent.is_dir():
        raise InputError("output folder does not exist", where=parent, hint="create it first")
    check_writable_folder(parent, option)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is None:  # being written this very moment, or damaged: look once more
                time.sleep(0.05)
                owner = _lock_owner(lock)
            if owner is not None and not _owner_gone(owner):
                pid, host = owner
                on = "" if host in (None, me[1]) else f" on {host}"
                raise InputError(
                    f"another promptcli (pid {pid}{on}) is writing this output",
                    where=path,
                    hint=f"wait for it to finish or choose another output (if none runs, delete {lock})",
                ) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its writer is gone
            continue
        try:
            with disk_full_guard(parent), os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(f"{me[0]} {me[1]}\n")
        except BaseException:
            lock.unlink()
            raise
        break
    else:
        raise InputError("could not take the output lock", where=lock, hint="delete it if no promptcli runs")
    try:
        yield lock
    finally:
        if _lock_owner(lock) == me:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def check_jsonl_prefix(path: str | Path, expected: list[dict], force: bool, option: str = "--log") -> None:
    """Before rewriting a JSON-lines file on resume: refuse unless its lines begin ``expected``.

    A resumed run rewrites its log from the checkpoint's rows; a file whose lines are not (a prefix
    of) those rows was written by something else and is kept unless ``force``.
    """
    path = Path(path)
    if force or not path.exists():
        return
    expected = [json.loads(json.dumps(row, sort_keys=True, default=str)) for row in expected]
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [json.loads(line) for line in lines]
    except (UnicodeDecodeError, ValueError):
        rows = None
    if rows is None or len(rows) > len(expected) or rows != expected[: len(rows)]:
        raise InputError(
            "exists and is not the log of the run being resumed",
            where=path,
            hint=f"pass --force to overwrite it or choose another {option}",
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_default_mode(path: str | Path, directory: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp (mode 0600/0700) the usual permissions under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "errno = 28")
_NEARLY_FULL_BYTES = 1 << 20


def is_disk_full(exc: BaseException, folder: str | Path | None = None) -> bool:
    """Whether ``exc`` is a write failing for want of space (on ``folder``'s file system, when given).

    OSError carries the errno; h5py and safetensors only say so in their message; torch.save's
    "file write failed" says nothing, so a write error on a file system left with (almost) no free
    space counts as well.
    """
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    if any(text in str(exc) for text in _DISK_FULL_TEXTS):
        return True
    if folder is None or not hasattr(os, "statvfs"):
        return False
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES


def disk_full_error(folder: str | Path | None) -> RuntimeFailure:
    """The one-line error for a full disk (exit 1), naming the folder being written."""
    return RuntimeFailure(
        "no space left on device (the disk is full)",
        where=folder,
        hint="free some space or write to another folder, then rerun (extract and tune: with --resume)",
    )


@contextlib.contextmanager
def disk_full_guard(folder: str | Path) -> Iterator[None]:
    """Turn a write that fails for want of space in ``folder`` into :func:`disk_full_error`."""
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, RuntimeFailure) and is_disk_full(exc, folder):
            raise disk_full_error(folder) from exc
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    with disk_full_guard(folder):
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=suffix if suffix is not None else ".tmp", dir=folder
        )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with disk_full_guard(folder):
            yield tmp_path
        apply_default_mode(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def open_output_text(path: str | Path) -> Iterator[IO[str]]:
    """Open a text output: stdout for ``-``, else a temporary file renamed into place on success."""
    if str(path) == STDIO:
        yield sys.stdout
        sys.stdout.flush()
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        yield handle


def json_text(data: Any, indent: int | None = 2) -> str:
    """The one JSON form of promptcli's summaries and sidecars: sorted keys, anything else as str."""
    return json.dumps(data, indent=indent, sort_keys=True, default=str) + "\n"


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """Write a JSON summary or sidecar through a temporary file."""
    write_text_atomic(path, json_text(data, indent))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file."""
    with open_output_text(path) as handle:
        handle.write(text)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes (remembered across commands for large files: io/cache.py)."""
    from promptcli.io.cache import remembered_sha256

    return remembered_sha256(path, chunk)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def require_file(path: str | Path, what: str = "file") -> Path:
    """Return ``path`` as a Path if it is an existing file, else a clear InputError."""
    if str(path) == STDIO:
        return Path(STDIO)
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found", where=p, hint="check the path")
    if p.is_dir():
        raise InputError(f"expected a {what}, got a directory", where=p, hint="give a file path")
    return p


def locks_output(argument: str = "output", group: str | None = None) -> Callable[[F], F]:
    """Decorate a function that writes the file named by its ``argument`` to hold :func:`output_lock`.

    ``group`` names the argument holding the function's process group under torchrun (an object
    with ``from_main(fn)``: fn runs on rank 0, its error reaches every rank); then rank 0 alone
    holds the lock and a refused lock stops every rank. None there means a single process.
    """

    def decorate(func: F) -> F:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            target = bound.arguments[argument]
            if str(target) == STDIO:
                return func(*args, **kwargs)
            ranks = bound.arguments.get(group) if group else None
            if ranks is None:
                with output_lock(target):
                    return func(*args, **kwargs)
            with contextlib.ExitStack() as held:
                ranks.from_main(lambda: held.enter_context(output_lock(target)) and None)
                return func(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
