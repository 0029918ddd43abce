"""The one progress callback type every long step accepts: (done, total, what) -> None.

`what` names the unit just finished (a tensor, a stage, a dataset chunk); callers that only count ignore it.
"""
from __future__ import annotations

from typing import Callable

ProgressFn = Callable[[int, int, str], None]


def no_progress(done: int, total: int, what: str) -> None:
    """A ProgressFn that does nothing (the default where a caller passes none)."""
