"""What every output file records about how it was made."""

from __future__ import annotations

import contextlib
import datetime as _dt
import shlex
import sys
from collections.abc import Iterator
from typing import Any

import promptcli

_COMMAND: list[str] | None = None


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
    """The promptcli command line being run (else this process's), shell-quoted."""
    if _COMMAND is not None:
        return shlex.join(_COMMAND)
    argv = list(sys.argv)
    if argv and argv[0].endswith(("promptcli", "__main__.py")):
        argv[0] = "promptcli"
    return shlex.join(argv)


def _version(package: str) -> str:
    """An installed package's version, from its metadata: without importing it (torch takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    return {
        "promptcli_version": promptcli.__version__,
        "open_clip_version": _version("open_clip_torch"),
        "torch_version": _version("torch"),
    }


def base_provenance() -> dict[str, Any]:
    """Versions, creation time (UTC, ISO 8601) and the command line."""
    return {
        **versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
    }
