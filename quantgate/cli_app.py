"""The typer app and the helpers every command module shares (one-line errors, exit codes, literal text).

Exit codes: 0 ok, 1 only "gate failed / file invalid" (commands raise typer.Exit(1) themselves), 2 every unusable
input or environment fault, printed as ONE `error: ...` line on stderr, never a traceback (set QUANTGATE_DEBUG=1 to
get the traceback as well). `handle_errors` (per command) and `run_app` (around the whole app) are the one place
that maps exceptions to that line.

Untrusted text (tensor names, paths, model names, metadata, dataset text, MLflow tags) is printed literally: pass it
through `lit()` (markup-escaped, one line, control characters shown as \\xNN) or put `cell()` in table rows. The
consoles also show any stray control character (ESC of an ANSI sequence, BEL, ...) escaped, and never read
`:emoji:` codes.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import sys
import traceback
from typing import Any, Callable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from core.errors import QuantGateError
from core.text import MAX_LINE, one_line
from core.version import __version__
from quantgate.transfer_view import showing_transfers

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Quantize LLM checkpoints to GGUF v3 (bit-exact with ggml), inspect and verify the files.",
)


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_print_version,
                                       help="Print the version and exit")) -> None:
    """Quantize LLM checkpoints to GGUF v3 (bit-exact with ggml), inspect and verify the files."""

# Control characters except \n and \t (which rich lays out itself): shown as \xNN so no ANSI sequence, BEL or
# carriage return from a file reaches the terminal.
_STRAY_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class _LiteralConsole(Console):
    """A rich Console that never lets a control character through and never reads :emoji: codes."""

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("emoji", False)
        stream = sys.stderr if kw.get("stderr") else sys.stdout
        if not stream.isatty() and not os.environ.get("COLUMNS"):
            kw.setdefault("width", 1000)  # CI logs: never wrap a SHA-256 or a path at 80 columns
        super().__init__(**kw)

    def render_str(self, text: str, **kw: Any) -> Text:  # type: ignore[override]
        return super().render_str(_STRAY_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text), **kw)


console = _LiteralConsole()
err_console = _LiteralConsole(stderr=True)
F = TypeVar("F", bound=Callable)

#: Set to 1 to print the traceback of an error (after its one line).
DEBUG_ENV = "QUANTGATE_DEBUG"


def model_repo_option() -> Any:
    """`--model-repo`, spelled the same in every command that takes a model (quantgate.inputs.resolve_model)."""
    return typer.Option(None, "--model-repo", help="DVC-tracked git repository (path or URL) that holds --model")


def model_rev_option() -> Any:
    """`--model-rev`: a git revision of --model-repo, or the Hub revision of an org/name --model."""
    return typer.Option(None, "--model-rev", help="Git revision of --model-repo, or the Hub revision of an org/name "
                                                  "--model")


def lit(text: object, limit: int = MAX_LINE) -> str:
    """Untrusted text for an f-string printed with rich markup: one line, control characters escaped, `[` escaped."""
    return escape(one_line(text, limit))


def cell(text: object, limit: int = MAX_LINE) -> Text:
    """Untrusted text as a rich table cell: literal (a Text is never parsed as markup), one line."""
    return Text(one_line(text, limit))


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line (literal, one line, cut to a sane length) and exit non-zero."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", one_line(message)), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _errno_text(e: OSError) -> str:
    name = errno.errorcode.get(e.errno, "") if isinstance(e.errno, int) else ""
    what = e.strerror or str(e) or type(e).__name__
    where = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    return f"{what}" + (f" [{name}]" if name else "") + (f": {where}" if where != "" else "")


def error_message(e: BaseException) -> str:
    """The one `error:` line for an exception (the mapping every command shares)."""
    if isinstance(e, QuantGateError):
        return str(e)
    if isinstance(e, FileNotFoundError):
        return f"file not found: {e.filename if e.filename is not None else e}"
    if isinstance(e, OSError):
        hint = ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = " (free some space or write elsewhere)"
        elif e.errno == errno.EFBIG:
            hint = " (file size limit: check `ulimit -f`)"
        elif e.errno == errno.EROFS:
            hint = " (write to a writable location)"
        elif e.errno == errno.ENAMETOOLONG:
            hint = " (use a shorter name)"
        return _errno_text(e) + hint
    if isinstance(e, RecursionError):
        return "input nested too deeply to read (RecursionError): not a usable file"
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, (ValueError, OverflowError)):  # parsing: bad JSON/YAML/number, bad encoding, ...
        return f"invalid input ({type(e).__name__}): {e}"
    return f"internal error: {type(e).__name__}: {e} (rerun with {DEBUG_ENV}=1 for the traceback)"


def _report(e: BaseException) -> None:
    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        traceback.print_exception(e, file=sys.stderr)
    fail(error_message(e))


def _passes_through(e: BaseException) -> bool:
    """typer/click control flow (Exit, Abort, usage errors) is not an error of ours."""
    import click

    return isinstance(e, (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort,
                          click.ClickException))


#: Environment that keeps the libraries' progress bars and advice out of a `--quiet` run (read by tqdm, the Hub
#: client, transformers, MLflow and GX when they start; set before their first import).
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
             "GX_ANALYTICS_ENABLED": "false", "MLFLOW_LOGGING_LEVEL": "ERROR"}
#: Library loggers a `--quiet` run raises to ERROR (gguf's "Unknown separator token", MLflow's INFO/WARNING lines...).
QUIET_LOGGERS = ("gguf", "transformers", "mlflow", "great_expectations", "huggingface_hub", "alembic", "urllib3",
                 "dvc", "numba", "py.warnings", "root")


@contextlib.contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """`--quiet`: no library noise while the command runs (progress bars, warnings, log lines of transformers,
    gguf, MLflow, GX, tqdm), by environment, logger levels, warning filters and a muted sys.stderr; everything is
    restored on the way out, before an error is reported, so our own `error:` line is never hidden."""
    if not enabled:
        yield
        return
    import logging
    import warnings

    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if "transformers" in sys.modules:  # imported already: its progress-bar switch was read at import
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    levels = {n: logging.getLogger(None if n == "root" else n).level for n in QUIET_LOGGERS}
    for n in QUIET_LOGGERS:
        logging.getLogger(None if n == "root" else n).setLevel(logging.ERROR)
    saved_err = sys.stderr
    devnull = open(os.devnull, "w", encoding="utf-8")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sys.stderr = devnull  # bars that are drawn whatever the settings (GX's tqdm passes disable= itself)
            yield
    finally:
        sys.stderr = saved_err
        devnull.close()
        for n, lvl in levels.items():
            logging.getLogger(None if n == "root" else n).setLevel(lvl)


def handle_errors(fn: F) -> F:
    """Turn every failure of a command into one line on stderr and exit code 2 (see the module docstring); a command
    called with quiet=True runs inside quiet_libraries(), any other shows its registry uploads and downloads
    (quantgate.transfer_view)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            quiet = kwargs.get("quiet") is True
            with quiet_libraries(quiet), showing_transfers(err_console, enabled=not quiet):
                return fn(*args, **kwargs)
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130)
        except Exception as e:
            if _passes_through(e):
                raise
            _report(e)

    return wrapper  # type: ignore[return-value]


def run_app() -> int:
    """Run the app with the same error mapping around it (for failures outside a command's body) and with
    SIGXFSZ ignored, so exceeding `ulimit -f` makes the write raise EFBIG (one error line) instead of killing us."""
    import signal

    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        app(standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if isinstance(e, (typer.Exit, typer.Abort)):
            return getattr(e, "exit_code", 1)
        try:
            _report(e)
        except typer.Exit as x:
            return x.exit_code
    return 0
