"""One output helper for all subcommands: messages, progress bars, tables and ``--json``.

Human-readable messages and progress go to stderr; results (tables) go to stdout unless stdout
carries data (``--json`` or ``-o -``), in which case they go to stderr too.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from promptcli.errors import printable
from promptcli.io.fileio import json_text


class Output:
    def __init__(self, quiet: bool = False, json_mode: bool = False, stdout_is_data: bool = False) -> None:
        self.quiet = quiet
        self.json_mode = json_mode
        self.err = Console(stderr=True, highlight=False)
        data_on_stdout = json_mode or stdout_is_data
        self.results = self.err if data_on_stdout else Console(highlight=False)

    # messages and cells are plain text: a path or label holding "[...]" must not be read as rich markup
    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(escape(message))

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]Warning:[/yellow] {escape(printable(message))}")

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A results table (suppressed by --quiet: scripts that want numbers use --json or -o)."""
        if self.quiet:
            return
        table = Table(title=title, title_justify="left")
        for i, col in enumerate(columns):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*[escape(_fmt(v)) for v in row])
        self.results.print(table)

    def result(self, data: dict[str, Any]) -> None:
        """The machine-readable summary: JSON on stdout with --json, else nothing."""
        if self.json_mode:
            sys.stdout.write(json_text(data))
            sys.stdout.flush()

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None, unit: str = "images") -> Iterator[Any]:
        """A progress bar on a terminal; a no-op advance() when quiet or not a TTY."""
        if self.quiet or not self.err.is_terminal:
            yield _NoProgress()
            return
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=self.err, transient=False) as bar:
            task = bar.add_task(description, total=total, rate="")
            yield _Bar(bar, task, unit)


@contextlib.contextmanager
def epoch_progress(out: Output, label: str, epochs: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar over training epochs; yields the ``on_epoch(row)`` hook that describes and advances it."""
    with out.progress(label, total=epochs, unit="epochs") as bar:
        done = [0]  # epochs shown so far (a resumed run jumps to its checkpoint's epoch)

        def on_epoch(row: dict[str, Any]) -> None:
            clean, judged = row.get("clean_accuracy"), row.get("n_judged_clean")
            bar.describe(
                f"epoch {row['epoch']}/{epochs} loss {row['loss']:.4f} acc {pct(row['accuracy'])}"
                + (f" clean {pct(clean)}" if clean is not None else "")
                + (f" judged clean {judged}" if judged is not None else "")
            )
            bar.advance(row["epoch"] - done[0])
            done[0] = row["epoch"]

        yield on_epoch


def pct(value: float | None) -> str:
    """An accuracy (a fraction) as promptcli shows it to people: percent, one decimal; "-" when unknown."""
    return "-" if value is None else f"{100 * value:.1f}%"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


class _NoProgress:
    def advance(self, n: int = 1) -> None:
        pass

    def describe(self, text: str) -> None:
        pass


class _Bar:
    def __init__(self, bar: Progress, task: Any, unit: str) -> None:
        self.bar, self.task, self.unit = bar, task, unit

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)
        speed = self.bar.tasks[self.task].speed
        if speed:
            self.bar.update(self.task, rate=f"{speed:.1f} {self.unit}/s")

    def describe(self, text: str) -> None:
        self.bar.update(self.task, description=text)
