"""The one progress callback type every long step accepts: (done, total, what) -> None.

`what` names the unit just finished (a tensor, a stage, a dataset chunk); callers that only count ignore it.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator

ProgressFn = Callable[[int, int, str], None]


def no_progress(done: int, total: int, what: str) -> None:
    """A ProgressFn that does nothing (the default where a caller passes none)."""


# A process-wide (per context) receiver for byte transfers -- registry uploads and downloads -- so a command can show
# them without every layer between it and the registry taking a callback: `with reporting_transfers(fn): ...`.
_TRANSFER: ContextVar[ProgressFn | None] = ContextVar("quantgate_transfer_progress", default=None)


def transfer_progress() -> ProgressFn | None:
    """The ProgressFn for byte transfers installed by reporting_transfers (None: nobody is listening)."""
    return _TRANSFER.get()


@contextlib.contextmanager
def reporting_transfers(fn: ProgressFn | None) -> Iterator[None]:
    """Send the byte transfers made inside the block (done bytes, total bytes, what) to `fn`."""
    token = _TRANSFER.set(fn)
    try:
        yield
    finally:
        _TRANSFER.reset(token)
