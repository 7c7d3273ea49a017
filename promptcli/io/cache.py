"""The per-user cache folder, and the SHA-256 digests of large files remembered there.

Every command records the hashes of its inputs (features files, checkpoints, prompts). At about 1.5 s per GB
that is seconds per command for an ImageNet-sized features file or a large checkpoint, paid again by every
step of a sweep. A digest of a file of ``MIN_BYTES`` or more is remembered under ``<cache root>/sha256/``,
keyed by the file's real path, and trusted only while the file's device, inode, size, modification and
change times (in ns) are all unchanged. A user cannot set a file's change time back, so any write to the file,
or a file renamed over it, misses the cache. As git does for its index, a file modified less than
``RACY_SECONDS`` before it was hashed is not remembered: on a filesystem with coarse timestamps a second write
in the same tick would keep every time stamp. One kind of write keeps the times: a program writing through a
shared memory map (``mmap``) after the file was hashed, which the kernel need not stamp (promptcli and h5py
write through ``write``). The cache is best effort: an unreadable or damaged entry is recomputed, an unwritable
folder is skipped, and ``PROMPTCLI_HASH_CACHE=0`` (or ``false``, ``no``, ``off``) turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from promptcli.errors import InputError

MIN_BYTES = 64 << 20  # smaller files hash in under 0.1 s: not worth an entry
RACY_SECONDS = 2.0
OFF = frozenset({"0", "false", "no", "off"})
_HEX = frozenset("0123456789abcdef")


def default_cache_root() -> Path:
    """``$PROMPTCLI_CACHE``, else ``~/.cache/promptcli``, as an absolute path (a relative one is meant from
    where the command runs, and is recorded in outputs)."""
    env = os.environ.get("PROMPTCLI_CACHE")
    try:
        return Path(os.path.abspath(Path(env).expanduser() if env else Path.home() / ".cache" / "promptcli"))
    except RuntimeError:  # no HOME, and no passwd entry for the user (containers)
        raise InputError(
            "no cache folder: HOME is not set and the user has no home directory",
            hint="set PROMPTCLI_CACHE to a writable folder",
        ) from None


def hash_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remembered_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """:func:`hash_file`, remembered across commands for large files (see the module docstring)."""
    before = os.stat(path)
    if before.st_size < MIN_BYTES or os.environ.get("PROMPTCLI_HASH_CACHE", "1").strip().lower() in OFF:
        return hash_file(path, chunk)
    stamp, real = _stamp(before), os.path.realpath(path)
    try:
        entry = default_cache_root() / "sha256" / f"{hashlib.sha256(real.encode()).hexdigest()}.json"
    except InputError:  # no cache folder to be found: best effort, so hashed every time
        return hash_file(path, chunk)
    known = _read(entry)
    if known is not None and known["stamp"] == stamp:
        return known["sha256"]
    digest = hash_file(path, chunk)
    settled = time.time_ns() - max(before.st_mtime_ns, before.st_ctime_ns) > RACY_SECONDS * 1e9
    if settled and _stamp(os.stat(path)) == stamp:  # and not written while it was read
        _write(entry, {"path": real, "stamp": stamp, "sha256": digest})
    return digest


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _read(entry: Path) -> dict | None:
    """A valid remembered entry, or None (missing, unreadable or damaged: the digest is computed anew)."""
    try:
        data = json.loads(entry.read_text(encoding="utf-8"))
        digest, stamp = data["sha256"], data["stamp"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    valid_digest = isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX
    valid_stamp = isinstance(stamp, list) and len(stamp) == 5 and all(type(v) is int for v in stamp)
    return data if valid_digest and valid_stamp else None


def _write(entry: Path, data: dict) -> None:
    """Write an entry atomically (temporary file renamed into place); give up quietly on any OS error."""
    from promptcli.io.fileio import apply_default_mode

    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
        apply_default_mode(
            tmp
        )  # as any file under the umask (mkstemp's is private): a group may share the cache
        os.replace(tmp, entry)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
