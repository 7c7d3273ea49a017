"""Safe file writing: temporary file renamed into place, no silent overwrite, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from promptcli.errors import InputError

STDIO = "-"


def check_output_path(path: str | Path, force: bool, option: str = "-o") -> Path:
    """Refuse to overwrite an existing output unless ``force``; check its folder exists."""
    path = Path(path)
    if path.exists() and not force:
        raise InputError(
            "output exists", where=path, hint=f"pass --force to overwrite it or choose another {option}"
        )
    if path.is_dir():
        raise InputError("output is a directory", where=path, hint=f"give a file name to {option}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise InputError("output folder does not exist", where=parent, hint="create it first")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_default_mode(path: str | Path, directory: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp (mode 0600/0700) the usual permissions under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=suffix if suffix is not None else ".tmp", dir=path.parent or "."
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file."""
    with open_output_text(path) as handle:
        handle.write(text)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
