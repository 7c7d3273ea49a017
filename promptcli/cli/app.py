"""The ``promptcli`` entry point: registers the subcommands and turns errors into one-line messages."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import typer

import promptcli
from promptcli.errors import EXIT_BAD_INPUT, EXIT_RUNTIME, PromptcliError, printable
from promptcli.io.fileio import forget_new_outputs
from promptcli.io.provenance import recorded_command


def _version(value: bool) -> None:
    if value:
        typer.echo(f"promptcli {promptcli.__version__}")
        raise typer.Exit()


def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """Noise-robust prompt tuning of CLIP."""


COMMANDS = (
    "extract",
    "corrupt",
    "pseudolabel",
    "tune",
    "eval",
    "gradstats",
    "clean",
    "report",
    "demo-images",
    "dataset",
)


def make_app(names: Sequence[str] = COMMANDS) -> typer.Typer:
    """The typer app with the subcommands ``names``.

    Each subcommand lives in ``promptcli/cli/<name>.py`` (``-`` -> ``_``) as a function named ``command``
    whose docstring is its help.
    """
    app = typer.Typer(
        name="promptcli",
        help="Noise-robust prompt tuning of CLIP: extract features, corrupt labels, tune prompts, evaluate.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="markdown",
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    for name in names:
        module_name = f"promptcli.cli.{name.replace('-', '_')}"
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        app.command(name, help=module.__doc__)(module.command)
    return app


def __getattr__(name: str) -> typer.Typer:
    if name == "app":  # the whole CLI as a typer app, built on first use (keeps this import cheap)
        return make_app()
    raise AttributeError(name)


def _flag_help_option(make: Any) -> Any:
    """``-h/--help`` is made per context; show it as the flag it is, like the other flags."""

    def get_help_option(ctx: click.Context) -> Any:
        option = make(ctx)
        if option is not None:
            option.metavar = ""
        return option

    return get_help_option


def build_command(only: str | None = None) -> click.Command:
    """The click command tree of the CLI (only the subcommand ``only`` when it names one: a faster start).

    Help reads as users expect: flags show no value placeholder (typer renders ``<bool>``) and
    arguments show upper-case names.
    """
    root = typer.main.get_command(make_app([only] if only in COMMANDS else COMMANDS))
    commands = getattr(root, "commands", {})
    for cmd in [root, *commands.values()]:
        for param in cmd.params:
            if getattr(param, "param_type_name", "") == "argument":
                if param.metavar is None:
                    param.metavar = param.name.upper()
                if hasattr(param, "_usage_display_name"):  # typer writes a required one as {NAME}
                    param._usage_display_name = _usage_name.__get__(param)
                else:  # typer < 0.29 writes make_metavar(): a set metavar as it is, or (0.27, 0.28) as {NAME}
                    param.make_metavar = lambda *args, _param=param, **kwargs: _usage_name(_param)
            elif getattr(param, "is_flag", False) and not getattr(param, "count", False):
                param.metavar = ""
        cmd.get_help_option = _flag_help_option(cmd.get_help_option)
    return root


def _usage_name(param: Any) -> str:
    """An argument in the usage line as POSIX writes it: NAME when required, [NAME] when not."""
    name = param.metavar or param.name.upper()
    name = name if param.required else f"[{name}]"
    return name + ("..." if param.nargs != 1 else "")


# typer >= 0.23 vendors click: its usage errors derive from typer.TyperException, not click's.
_USAGE_ERRORS = tuple({click.ClickException, getattr(typer, "TyperException", click.ClickException)})
_ABORTS = tuple({click.exceptions.Abort, typer.Abort})


# Outputs are renamed into place only when complete, so an interrupted command replaced nothing;
# extract and tune keep their finished chunks/epochs in OUTPUT.partial.
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention
INTERRUPTED = (
    "interrupted — no half-written output was left (files are renamed into place when complete; a tune "
    "--log holds the epochs done); extract and tune kept their finished work in OUTPUT.partial: rerun "
    "the same command with --resume to continue"
)


# A termination signal (a scheduler's time limit or preemption, `kill`, `docker stop`, a closed terminal)
# stops a command as Ctrl-C does, so the same cleanup runs: outputs stay as they were, the output lock is
# released (a lock left by a killed run on another host of a shared file system cannot be judged stale) and the
# checkpoint is kept. Only signals still at their default are taken: nohup's ignored SIGHUP stays ignored.
TERMINATION_SIGNALS = ("SIGTERM", "SIGHUP")


FINALIZER_RETRY_S = 0.05


def _inside_finalizer(frame: Any) -> bool:
    """Whether ``frame`` runs inside an object's ``__del__`` (e.g. a ZipFile closed by the garbage collector)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def terminated_message(signum: int) -> str:
    """The one line for a run stopped by signal ``signum``."""
    return f"terminated by {signal.Signals(signum).name} — " + INTERRUPTED.removeprefix("interrupted — ")


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[list[int]]:
    """While inside, SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread; yields the signals received.

    A second signal of the same kind ends the process at once (its default), for a cleanup that hangs.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupt(signum: int, frame: Any) -> None:
        if _inside_finalizer(frame):  # Python would print and drop an exception raised there: the run went on
            timer = threading.Timer(FINALIZER_RETRY_S, os.kill, (os.getpid(), signum))
            timer.daemon = True
            timer.start()  # the same signal again, once the finalizer is over
            return
        received.append(signum)
        signal.signal(signum, signal.SIG_DFL)
        raise KeyboardInterrupt

    previous = {}
    for name in TERMINATION_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, interrupt)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def usage_message(exc: Exception) -> str:
    """A usage error as one line: the option, what is wrong, and what to do."""
    param = getattr(exc, "param", None)
    ctx = getattr(exc, "ctx", None)
    where = ""
    if param is not None:
        opts = [o for o in getattr(param, "opts", []) if o.startswith("--")] or list(
            getattr(param, "opts", [])
        )
        where = opts[0] if opts and getattr(param, "param_type_name", "") == "option" else param.name.upper()
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        choices = getattr(descriptor, "choices", None) if getattr(descriptor, "is_choice", False) else None
    else:  # typer before its type descriptors (< 0.29) gives an enum option a click Choice type
        choices = getattr(getattr(param, "type", None), "choices", None)
    help_hint = f"see `{ctx.command_path} --help`" if ctx is not None else "see `promptcli --help`"
    if choices and getattr(exc, "message", None) and "not one of" in str(exc.message):
        bad = str(exc.message).split("is not one of")[0].split(",")[-1].strip()
        values = ", ".join(str(getattr(c, "value", c)) for c in choices)
        return f"{where}: unknown value {bad} — use one of: {values}"
    message = " ".join(exc.format_message().split()) if hasattr(exc, "format_message") else str(exc)
    message = message.removeprefix("Value error, ")
    return f"{where + ': ' if where and where not in message else ''}{message} — {help_hint}"


def _stop_writing_stdout() -> None:
    """After the reader of stdout went away (``| head``): exit quietly, the way ``yes | head`` does.

    stdout now points at /dev/null so the interpreter's final flush cannot fail (Python would print
    "Exception ignored ... BrokenPipeError" and exit 120); the exit status is 1.
    """
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _error(message: str) -> None:
    """Print the one line of an error, control characters of the user data it quotes escaped (one line still)."""
    with contextlib.suppress(OSError, ValueError):  # stderr may be gone (a closed terminal's SIGHUP)
        sys.stderr.write(f"Error: {printable(message)}\n")
        sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; ``--debug`` (anywhere on the line) or PROMPTCLI_DEBUG=1 shows tracebacks."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("PROMPTCLI_DEBUG", "") not in ("", "0") or "--debug" in args
    args = [a for a in args if a != "--debug"]
    with recorded_command(args), termination_as_interrupt() as received:
        forget_new_outputs()  # outputs checked by an earlier command of this process are not this one's
        _run(args, debug, received)


def _interrupted(received: list[int]) -> None:
    """Say that the run was stopped (by Ctrl-C, or by the first termination signal received) and exit."""
    if received:
        _error(terminated_message(received[0]))
        sys.exit(128 + received[0])
    _error(INTERRUPTED)
    sys.exit(EXIT_INTERRUPTED)


def _run(args: list[str], debug: bool, received: list[int]) -> None:
    if args == ["--version"]:  # answered before any command is built
        sys.stdout.write(f"promptcli {promptcli.__version__}\n")
        sys.exit(0)
    command = build_command(next((a for a in args if not a.startswith("-")), None))
    try:
        code = command.main(args=args, prog_name="promptcli", standalone_mode=False)
    except PromptcliError as exc:
        if debug:
            traceback.print_exc()
        _error(exc.message)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, *_ABORTS) as exc:
        failure = _eof_failure(exc, received)
        if failure is None:
            _interrupted(received)
        _failed(failure, debug)
    except _USAGE_ERRORS as exc:
        if getattr(exc, "exit_code", 1) == 0 or type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # `promptcli` alone prints the help
            sys.exit(exc.exit_code)
        _error(usage_message(exc))
        sys.exit(EXIT_BAD_INPUT)
    except BrokenPipeError:
        _stop_writing_stdout()
        sys.exit(EXIT_RUNTIME)
    except Exception as exc:
        _failed(exc, debug)
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into Exit(130), returned without standalone mode
        _interrupted(received)
    sys.exit(code if isinstance(code, int) else 0)


def _eof_failure(abort: BaseException, received: list[int]) -> EOFError | None:
    """The EOFError behind a click Abort, when it was not an interrupt; else None.

    click (and typer) turn any EOFError raised inside a command into Abort, as for Ctrl-C, even without
    standalone mode: a truncated pickle, zip or npz read by a library is no interrupt, and must not read as one
    (exit 130 tells a retry loop that the run was stopped by a signal)."""
    if received or isinstance(abort, KeyboardInterrupt):
        return None
    cause = abort.__cause__ if abort.__cause__ is not None else abort.__context__
    if not isinstance(cause, EOFError):
        return None
    seen: set[int] = set()
    link: BaseException | None = cause
    while link is not None and id(link) not in seen:  # an EOFError while stopping for Ctrl-C is the interrupt
        if isinstance(link, KeyboardInterrupt):
            return None
        seen.add(id(link))
        link = link.__cause__ if link.__cause__ is not None else link.__context__
    return cause


def _failed(exc: BaseException, debug: bool) -> None:
    """Report an exception no promptcli check turned into a one-line error, and exit 1."""
    from promptcli.io.fileio import disk_full_error, is_disk_full

    if is_disk_full(exc):  # a write outside promptcli's own file helpers
        _error(disk_full_error(getattr(exc, "filename", None) and Path(exc.filename).parent).message)
        sys.exit(EXIT_RUNTIME)
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, named so that torch is not imported here
        if debug:
            traceback.print_exception(exc)
        _error(
            "out of GPU memory — lower --batch-size (or --grad-batch, --class-chunk), "
            "or run this step with --device cpu"
        )
        sys.exit(EXIT_RUNTIME)
    if debug:
        traceback.print_exception(exc)
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    _error(
        f"unexpected {type(exc).__name__}{': ' + first if first else ''} — "
        "rerun with --debug for the traceback and report it"
    )
    sys.exit(EXIT_RUNTIME)
