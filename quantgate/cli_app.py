"""The typer app and the helpers every command module shares (one-line errors, exit codes)."""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import typer
from rich.console import Console

from core.errors import QuantGateError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Quantize LLM checkpoints to GGUF v3 (bit-exact with ggml), inspect and verify the files.",
)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable)


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn expected failures (bad input, missing files) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QuantGateError as e:
            fail(str(e))
        except FileNotFoundError as e:
            fail(f"file not found: {e.filename or e}")
        except (IsADirectoryError, PermissionError) as e:
            fail(f"{e.strerror}: {e.filename}")

    return wrapper  # type: ignore[return-value]
