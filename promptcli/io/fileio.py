"""Safe file writing: temporary file renamed into place, no silent overwrite, hashing."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from promptcli.errors import InputError, RuntimeFailure

STDIO = "-"
F = TypeVar("F", bound=Callable[..., Any])


# Outputs checked not to exist (no --force): :func:`place_output` puts them in place only if they still do not,
# so a command started meanwhile that wrote the same file first (two `corrupt -o n.csv` of a sweep) is not
# silently replaced. Taken off once written: this process may then rewrite its own output.
_NEW_OUTPUTS: set[str] = set()


def check_output_path(path: str | Path, force: bool, option: str = "-o") -> Path:
    """Refuse to overwrite an existing output unless ``force``; check its folder exists."""
    if not str(path).strip():  # Path("") is "." (an unset shell variable?)
        raise InputError("empty file name", where=option, hint=f"give {option} a file name")
    path = Path(path)
    if path.is_dir():  # also -o "" (an unset shell variable), which a Path option reads as "."
        raise InputError("output is a directory", where=path, hint=f"give a file name to {option}")
    if os.path.lexists(path) and not force:  # lexists: a dangling symbolic link is the user's too
        raise InputError(
            "output exists", where=path, hint=f"pass --force to overwrite it or choose another {option}"
        )
    if force:
        _NEW_OUTPUTS.discard(os.path.realpath(path))
    elif str(path) != STDIO:
        _NEW_OUTPUTS.add(os.path.realpath(path))
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


def shown_path(path: str | Path) -> str:
    """``path`` as text to print: a byte that is not UTF-8 (a surrogate-escaped name on POSIX) as ``\\xNN``."""
    try:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate no file name decodes to
        return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def check_utf8_path(path: str | Path, file: str | Path | None = None, hint: str | None = None) -> None:
    """Refuse a path whose name is not valid UTF-8 (POSIX names are bytes; Python escapes the invalid ones),
    naming ``file`` (default: ``path``). Image paths are recorded as UTF-8 (features files, CSV image and
    label files): such a name could not be written, and a lossy spelling could collide with another file's
    or not find the file again."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            "file or folder name is not valid UTF-8",
            where=shown_path(path if file is None else file),
            hint=hint or "rename it using UTF-8 characters only (image paths are recorded as UTF-8 text)",
        ) from None


def kind_of_file(mode: int) -> str:
    """What a ``st_mode`` names, for messages: "a regular file", "a folder", "a FIFO", "a device", ..."""
    for test, kind in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "another kind of file"


def open_regular(path: str | Path) -> IO[bytes]:
    """``path`` opened for binary reading; OSError "not a regular file (...)" for anything else, whose open
    or read would block (a FIFO) or never end (``/dev/zero``)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO's open waits for a writer
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file ({kind_of_file(mode)})")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


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
# errno values of file systems without hard links (some FUSE, SMB and FAT mounts)
_NO_HARD_LINKS = frozenset(
    getattr(errno, name)
    for name in ("EPERM", "ENOTSUP", "EOPNOTSUPP", "EXDEV", "EMLINK", "ENOSYS")
    if hasattr(errno, name)
)


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


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None where that is not known.

    With the pid it names one process: a pid reused by another process after the writer died starts later.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22, after the parenthesised command name
    except (OSError, IndexError):
        return None


# pid, host, start, job: None where not recorded (older locks; start outside Linux; job outside Slurm)
Owner = tuple[int, str | None, str | None, str | None, str | None]


def _pid_namespace() -> str | None:
    """This process's pid namespace (containers sharing a host name have their own pids), where known."""
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:").strip("[]")
    except OSError:
        return None


def _slurm_job() -> str | None:
    """``slurm:<job id>:<restart count>`` inside a Slurm job, else None. A requeued job keeps its id and counts
    one restart more, so a lock its earlier run left (killed on another node) is known stale."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm:{job}:{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else None


# pid_t is a 32-bit signed int wherever promptcli runs: a larger number, or one below 1 (which os.kill takes for a
# process group, or every process), names no process
MAX_PID = 2**31 - 1
LOCK_MAX_BYTES = 4096  # a lock holds one short line


def _lock_owner(lock: Path) -> Owner | None:
    """(pid, host, start, job, pid namespace) written in a lock, or None for a missing or damaged one (not a
    regular file, not UTF-8, no pid first, or a number that cannot be a pid): no live writer's."""
    try:
        with open_regular(lock) as handle:  # a FIFO in its place would block the read
            fields = handle.read(LOCK_MAX_BYTES).decode("utf-8").split()
        pid = int(fields[0])
    except (OSError, ValueError, IndexError):
        return None
    if not 1 <= pid <= MAX_PID:
        return None
    rest = [None if f == "-" else f for f in fields[1:5]]
    rest += [None] * (4 - len(rest))
    return pid, rest[0], rest[1], rest[2], rest[3]


def _lock_text(owner: Owner) -> str:
    return " ".join("-" if f is None else str(f) for f in owner) + "\n"


def _earlier_run_of_this_job(theirs: str | None) -> bool:
    """Whether a lock's job is an earlier run of this requeued Slurm job."""
    mine = _slurm_job()
    if not (theirs and mine and theirs.startswith("slurm:")):
        return False
    *their_job, their_count = theirs.split(":")
    *my_job, my_count = mine.split(":")
    try:
        return their_job == my_job and int(my_count) > int(their_count)
    except ValueError:
        return False


def _owner_gone(owner: Owner) -> bool:
    """Whether a lock's writer surely no longer runs: known for a process on this host, and for an earlier run of
    this requeued Slurm job on any host."""
    pid, host, start, job, namespace = owner
    if _earlier_run_of_this_job(job):
        return True
    if host not in (None, _this_host()):
        return False
    if namespace is not None and namespace != _pid_namespace():  # another container's pids: not ours to judge
        return False
    if not _pid_alive(pid):
        return True
    now = _process_start(pid)
    return start is not None and now is not None and now != start  # the pid now names another process


def _create_lock(lock: Path, content: str) -> bool:
    """Create ``lock`` holding ``content`` at once (a file written aside, then hard-linked): False if it exists.

    So a lock is never seen empty while its writer fills it. Where hard links are not supported, the lock
    is created exclusively and then written.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{lock.name}.", dir=lock.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
        apply_default_mode(tmp)
        try:
            _link(tmp, lock)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _check_lock_is_a_file(lock: Path) -> None:
    """Refuse a folder, FIFO or device where the output lock goes: no lock of a writer, nor one to remove."""
    try:
        mode = os.stat(lock).st_mode
    except (FileNotFoundError, NotADirectoryError):  # gone meanwhile, or a link to nothing: taken as stale
        return
    except OSError as exc:
        raise InputError(
            f"cannot read the output lock ({exc.strerror or exc})",
            where=lock,
            hint="make it readable, or delete it if no promptcli runs",
        ) from exc
    if not stat.S_ISREG(mode):
        raise InputError(
            f"{kind_of_file(mode)} is in the way of the output lock",
            where=lock,
            hint="move or delete it: promptcli creates this file while it writes the output",
        )


@contextlib.contextmanager
def output_lock(path: str | Path, option: str = "-o") -> Iterator[Path]:
    """Hold ``<path>.lock`` (created with O_EXCL, holding the pid) while a command writes ``path``.

    A second command writing the same output is refused; a lock whose pid no longer runs on this
    host (the writer was killed) is taken over; one from another host (a shared filesystem) is
    never guessed stale. The lock holds "pid host" and is removed on exit, whatever happens.
    """
    me: Owner = (os.getpid(), _this_host(), _process_start(os.getpid()), _slurm_job(), _pid_namespace())
    lock = Path(f"{path}{LOCK_SUFFIX}")
    parent = lock.parent
    if not parent.is_dir():
        raise InputError("output folder does not exist", where=parent, hint="create it first")
    check_writable_folder(parent, option)
    what = "output" if option == "-o" else f"{option} file"
    for _ in range(3):
        with disk_full_guard(parent):
            if _create_lock(lock, _lock_text(me)):
                break
        _check_lock_is_a_file(lock)
        owner = _lock_owner(lock)
        if owner is None:  # a lock from an older version being written this very moment, or damaged
            time.sleep(0.05)
            owner = _lock_owner(lock)
        if owner is not None and not _owner_gone(owner):
            pid, host = owner[:2]
            on = "" if host in (None, me[1]) else f" on {host}"
            raise InputError(
                f"another promptcli (pid {pid}{on}) is writing this {what}",
                where=path,
                hint=f"wait for it to finish or choose another {option} (if none runs, delete {lock})",
            ) from None
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()  # stale: its writer is gone
    else:
        raise InputError("could not take the output lock", where=lock, hint="delete it if no promptcli runs")
    try:
        yield lock
    finally:
        if _lock_owner(lock) == me:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def check_jsonl_prefix(
    path: str | Path,
    expected: list[dict],
    force: bool,
    option: str = "--log",
    ignore_run_keys: tuple[str, ...] = (),
) -> None:
    """Before rewriting a JSON-lines file on resume: refuse unless its lines begin ``expected``.

    A resumed run rewrites its log from the checkpoint's rows; a file whose lines are not (a prefix
    of) those rows was written by something else and is kept unless ``force``. ``ignore_run_keys``: keys of
    the rows' ``run`` object left out of the comparison (where the run computed, which a resume may change).
    """
    path = Path(path)
    if force or not path.exists():
        return

    def comparable(row: Any) -> Any:
        if not (ignore_run_keys and isinstance(row, dict) and isinstance(row.get("run"), dict)):
            return row
        return {**row, "run": {k: v for k, v in row["run"].items() if k not in ignore_run_keys}}

    expected = [comparable(json.loads(json.dumps(row, sort_keys=True, default=str))) for row in expected]
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [comparable(json.loads(line)) for line in lines]
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


class OutputTaken(InputError):
    """An output checked to be new was written by another command while this one ran."""

    def __init__(self, path: str | Path, kept: str | Path | None = None) -> None:
        hint = "pass --force to overwrite it or choose another output"
        if kept is not None:  # a checkpoint or chunks: --force alone would start over
            hint = f"this run's work stays in {kept}: rerun with --resume --force to put it in its place, or choose another -o"
        super().__init__("output exists: another command wrote it while this one ran", where=path, hint=hint)


def forget_new_outputs() -> None:
    """Forget the outputs checked to be new (each CLI command starts afresh in a long-lived process)."""
    _NEW_OUTPUTS.clear()


def _link(source: str | Path, target: str | Path) -> None:
    """``os.link``; on NFS a retried request may answer EEXIST for the link it made: that is success."""
    try:
        os.link(source, target)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if os.path.samefile(source, target):
                return
        raise


def place_output(tmp: str | Path, path: str | Path, kept: str | Path | None = None) -> None:
    """Rename the finished ``tmp`` to ``path``; an output checked to be new must still not exist (a hard link
    never replaces a file), else :class:`OutputTaken` (``kept``: where this run's work stays for ``--resume``)."""
    key = os.path.realpath(path)
    if key not in _NEW_OUTPUTS:
        os.replace(tmp, path)
        return
    try:
        _link(tmp, path)
    except FileExistsError:
        raise OutputTaken(path, kept) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(path):  # no hard links here: the same check, a moment before the rename
            raise OutputTaken(path, kept) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)
    _NEW_OUTPUTS.discard(key)


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
        place_output(tmp_path, path)
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


def check_input_file(path: str | Path, what: str = "file", hint: str = "check the path") -> Path:
    """``path`` as a Path when it names a regular file (through links); else a one-line error saying what is
    there: "<what> not found" (with ``hint``), or "<what> is a folder (a FIFO, a device), not a regular file"
    rather than a "not found" that sends the user looking for a file that is there, or a read that blocks on a
    FIFO or never ends on a device. The one check of every input file read whole."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{what} not found", where=shown_path(p), hint=hint) from None
    except OSError as exc:  # a permission denied on a folder above, a link loop, a name too long
        raise InputError(
            f"cannot read the {what} ({exc.strerror or exc})", where=shown_path(p), hint=hint
        ) from None
    if not stat.S_ISREG(mode):
        raise InputError(
            f"{what} is {kind_of_file(mode)}, not a regular file",
            where=shown_path(p),
            hint=f"give the path of a {what}" if what.endswith("file") else f"give a file as the {what}",
        )
    return p


def require_file(path: str | Path, what: str = "file") -> Path:
    """Return ``path`` as a Path if it is an existing regular file (``-``: stdin), else a clear InputError."""
    if str(path) == STDIO:
        return Path(STDIO)
    return check_input_file(path, what)


# The option that names each locked argument, for messages.
_LOCKED_OPTIONS = {"output": "-o", "log_path": "--log"}


def locks_output(*arguments: str, group: str | None = None) -> Callable[[F], F]:
    """Decorate a function that writes the files named by its ``arguments`` (default ``output``) to hold
    :func:`output_lock` on each (``None`` and ``-`` are no file), so that two commands never write one file.

    ``group`` names the argument holding the function's process group under torchrun (an object
    with ``from_main(fn)``: fn runs on rank 0, its error reaches every rank); then rank 0 alone
    holds the locks and a refused lock stops every rank. None there means a single process.
    """
    arguments = arguments or ("output",)

    def decorate(func: F) -> F:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            targets = [(bound.arguments.get(name), _LOCKED_OPTIONS.get(name, "-o")) for name in arguments]
            targets = [(t, option) for t, option in targets if t is not None and str(t) != STDIO]
            # one lock per file: -o and --log naming one file are refused by the function, as for any command
            targets = list({os.path.realpath(t): (t, option) for t, option in reversed(targets)}.values())[
                ::-1
            ]
            ranks = bound.arguments.get(group) if group else None
            with contextlib.ExitStack() as held:

                def take() -> None:
                    for target, option in targets:
                        held.enter_context(output_lock(target, option))

                if ranks is None:
                    take()
                else:
                    ranks.from_main(take)
                return func(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
