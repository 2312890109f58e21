"""What every command shares: the consoles and the one error boundary."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from dvcray_cli.errors import DvcrayError

F = TypeVar("F", bound=Callable[..., Any])

def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


# In CI no colour unless forced (FORCE_COLOR), and never a live display.
_ci_style = {"color_system": None, "force_terminal": False} if _in_ci() and not os.environ.get("FORCE_COLOR") else {}


class _Console(Console):
    @property
    def file(self):
        stream = Console.file.fget(self)
        # Importing DVC wraps sys.stdout and sys.stderr with colorama, which strips colour
        # from a stream that is no terminal, FORCE_COLOR or not: write past its wrapper.
        return getattr(stream, "_StreamWrapper__wrapped", stream)

    @file.setter
    def file(self, value) -> None:
        Console.file.fset(self, value)

    def on_broken_pipe(self) -> None:
        # The reader went away (`dvcray runs | head -1`): end quietly with 0, as
        # other command-line tools do (Rich's own handler exits 1).
        quiet_stdout()
        raise SystemExit(0)


# Results (tables, --json) go to stdout; messages, progress and errors to stderr.
out = _Console(highlight=False, soft_wrap=True, **_ci_style)
err = _Console(stderr=True, highlight=False, soft_wrap=True, **_ci_style)

# `--env` of the commands that run experiments (runs/stage_env.py).
EnvOption = Annotated[Optional[list[str]], typer.Option(
    "--env", metavar="NAME[=VALUE]", show_default=False,
    help="Give the stage and its Ray workers this variable: NAME=VALUE, or NAME for its value here (repeatable; "
         "also the env list of tool.dvcray in pyproject.toml). Secret-like names are refused: values go to the store.")]

# The root options every command honours (`--verbose`).
flags = {"verbose": False}


def print_idle_timeout(seconds: float, effect: str) -> None:
    """The plan's idle-timeout line: ``effect`` (with ``{idle}``) after that long, or off."""
    from dvcray_cli.clusters import format_duration

    idle = format_duration(seconds)
    out.print(f"  Idle timeout:  {idle} ({effect.format(idle=idle)})" if seconds > 0
              else "  Idle timeout:  off (the cluster runs until `dvcray cluster down`)", markup=False)


def plain_output() -> bool:
    """No spinners or live tables: CI, or stderr is not a terminal (FORCE_COLOR gives colour,
    and makes Rich take any stream for a terminal: a live table there would be redrawn
    into a log four times a second)."""
    try:
        terminal = err.file.isatty()
    except (AttributeError, ValueError):
        terminal = False
    return _in_ci() or not terminal


def fail(exc: DvcrayError) -> typer.Exit:
    """Print a DvcrayError the way people read it and give the exit to raise."""
    err.print(Text.assemble(("Error:", "bold red"), " ", exc.message), highlight=False)
    if exc.hint:
        err.print(exc.hint, markup=False)
    if flags["verbose"]:
        err.print("".join(traceback.format_exception(exc)), markup=False)
    return typer.Exit(exc.exit_code)


def boundary(func: F) -> F:
    """Turn DvcrayError and Ctrl-C into a message and an exit code (DESIGN.md).

    Anything else is a bug: under pytest it propagates so tests see it; for a
    user it is one line and the hint to rerun with --verbose.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DvcrayError as exc:
            raise fail(exc) from None
        except KeyboardInterrupt:
            err.print("Interrupted.")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # The reader went away (`dvcray runs | head -1`): end quietly, as other CLIs do.
            quiet_stdout()
            raise typer.Exit(0) from None
        except typer.Exit:
            raise
        except Exception as exc:
            if flags["verbose"] or "PYTEST_CURRENT_TEST" in os.environ:
                raise
            err.print(Text.assemble(("Unexpected error:", "bold red"), f" {type(exc).__name__}: {exc}"))
            err.print("This is a bug in dvcray. Rerun with --verbose for the traceback.")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def quiet_stdout() -> None:
    """Point stdout at /dev/null once its reader is gone, so nothing more fails
    (Python's own flush at exit included)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def check_jobs(jobs: int | None) -> None:
    """``--jobs``, checked before anything runs or leaves DVC's queue."""
    from dvcray_cli.errors import UsageError

    if jobs is not None and jobs < 1:
        raise UsageError("--jobs must be at least 1.", "Example: --jobs 2 runs at most two experiments at once.")


def write_json(data: Any) -> None:
    """Machine-readable output: one JSON document on stdout."""
    import json

    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()
