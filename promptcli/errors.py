"""The one error type of promptcli, turned into a one-line message by the CLI."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_RUNTIME = 1


# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators: from user data (a label, a class
# name, a file name) printed raw, they would break a message over lines or send the terminal escape sequences.
_CONTROLS = {
    c: repr(chr(c))[1:-1] if c < 0x100 else f"\\u{c:04x}"
    for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}


def printable(text: str) -> str:
    """``text`` with each control character written as its Python escape (``\\x1b``, ``\\t``, ``\\n``):
    a message stays one line and carries no terminal escape sequence, whatever user data it quotes."""
    return text.translate(_CONTROLS)


class PromptcliError(Exception):
    """An error the user can act on.

    ``where`` names the file, row or option at fault, ``what`` says what is wrong and ``hint``
    what to do about it. The CLI prints ``Error: <where>: <what> — <hint>`` and exits with
    ``exit_code`` (2 for bad usage or input, 1 for failures at run time).
    """

    def __init__(
        self,
        what: str,
        *,
        where: str | Path | None = None,
        hint: str | None = None,
        exit_code: int = EXIT_BAD_INPUT,
    ) -> None:
        self.what = what
        self.where = str(where) if where is not None else None
        self.hint = hint
        self.exit_code = exit_code
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The one line the CLI prints (control characters of quoted user data escaped: :func:`printable`)."""
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.hint:
            text += f" — {self.hint}"
        return printable(text)


class InputError(PromptcliError, ValueError):
    """Bad input: a file, a row or an option the user must fix (exit code 2); a ``ValueError`` to Python code."""


class RuntimeFailure(PromptcliError, RuntimeError):
    """A failure while running with valid input (exit code 1); a ``RuntimeError`` to Python code."""

    def __init__(self, what: str, **kwargs) -> None:
        kwargs.setdefault("exit_code", EXIT_RUNTIME)
        super().__init__(what, **kwargs)


class PromptcliWarning(UserWarning):
    """Something a library call went on despite (the CLI prints these as "Warning: ...")."""


def warn_user(message: str) -> None:
    """The library steps' default ``warn``: a :class:`PromptcliWarning` through Python's warnings machinery, so a
    script or notebook sees it (and can filter it, or turn it into an error) rather than losing it."""
    package = str(Path(__file__).parent)
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(
        package
    ):  # attributed to the caller's code
        frame, level = frame.f_back, level + 1
    warnings.warn(message, PromptcliWarning, stacklevel=level)
