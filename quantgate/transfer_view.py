"""How a command shows the registry's byte transfers (uploads at register, downloads of `models:/` references and
`models download` / `export`): a rich bar on stderr when stderr is a terminal, else (for transfers of at least
PLAIN_MIN_BYTES or of unknown size) one plain line when a transfer
(or enters its next phase: staging, uploading) starts, one every PLAIN_EVERY seconds while it runs and one
when it ends (a CI log gets a few lines, never a bar's
redraws); nothing under --quiet. Every command runs inside `showing_transfers` (quantgate.cli_app.handle_errors)."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

from core.progress import reporting_transfers
from core.text import one_line

PLAIN_EVERY = 30.0
#: Off a terminal, transfers of a known size below this are not reported: they end at once, and a line for them
#: would break the one-line `error:` contract of a command that fails after a small download.
PLAIN_MIN_BYTES = 64 << 20


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class TransferView:
    """A ProgressFn (done bytes, total bytes, what) drawing one bar per transfer, or writing plain lines."""

    def __init__(self, console: Any, *, interactive: bool | None = None, clock: Callable[[], float] = time.monotonic,
                 plain_every: float = PLAIN_EVERY) -> None:
        self.console = console
        self.interactive = console.is_terminal if interactive is None else interactive
        self.clock, self.plain_every = clock, plain_every
        self._progress: Any = None
        self._task: Any = None
        self._what: str | None = None
        self._last = 0.0
        self._ended = False

    def __call__(self, done: int, total: int, what: str) -> None:
        what = one_line(what, 160)
        if self.interactive:
            self._bar(done, total, what)
        else:
            self._line(done, total, what)

    def _bar(self, done: int, total: int, what: str) -> None:
        if self._progress is None:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            self._progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), console=self.console, transient=True)
            self._progress.start()
        if what != self._what:
            self._task = self._progress.add_task(what, total=total or None)
            self._what = what
        self._progress.update(self._task, completed=done, total=total or None)

    def _line(self, done: int, total: int, what: str) -> None:
        if 0 < total < PLAIN_MIN_BYTES:
            return
        now = self.clock()
        end = bool(total) and done >= total
        if what == self._what and (self._ended or (not end and now - self._last < self.plain_every)):
            return  # the same transfer (and phase): a line at its end and every plain_every seconds
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        of = f" of {_size(total)}" if total else ""
        self.console.print(f"{what}: {_size(done)}{of}{pct}", markup=False, highlight=False, soft_wrap=True)
        self._what, self._last, self._ended = what, now, end

    def close(self) -> None:
        """Remove the bar (transient) once the command is done."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@contextlib.contextmanager
def showing_transfers(console: Any, enabled: bool = True) -> Iterator[None]:
    """Show the registry transfers made inside the block on `console` (disabled: none are shown)."""
    if not enabled:
        with reporting_transfers(None):
            yield
        return
    view = TransferView(console)
    try:
        with reporting_transfers(view):
            yield
    finally:
        view.close()


__all__ = ["PLAIN_EVERY", "TransferView", "showing_transfers"]
