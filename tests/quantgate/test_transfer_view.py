"""The CLI's view of registry transfers (quantgate.transfer_view): plain lines off a terminal (start, phase change,
every PLAIN_EVERY seconds, end), a bar on one, nothing with --quiet."""
from __future__ import annotations

import io

from rich.console import Console

from core.progress import reporting_transfers, transfer_progress
from quantgate.transfer_view import PLAIN_EVERY, TransferView, showing_transfers


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _plain(buf: io.StringIO, clock: Clock) -> TransferView:
    return TransferView(Console(file=buf, width=200), interactive=False, clock=clock)


def test_plain_lines_at_start_phase_change_interval_and_end():
    buf, clock = io.StringIO(), Clock()
    view = _plain(buf, clock)
    total = 3 * 2**30
    view(0, total, "upload big.gguf (staging)")
    for i in range(1, 40):               # 0.5 s polls for 19.5 s: no line before PLAIN_EVERY
        clock.t = i * 0.5
        view(i * 2**20, total, "upload big.gguf (staging)")
    clock.t = PLAIN_EVERY + 1
    view(2**30, total, "upload big.gguf (staging)")
    view(2**30, total, "upload big.gguf (uploading)")   # next phase: a line at once
    clock.t += 1
    view(total, total, "upload big.gguf (uploaded)")
    view(total, total, "upload big.gguf (uploaded)")    # the end is written once
    lines = buf.getvalue().splitlines()
    assert lines == ["upload big.gguf (staging): 0.0 MiB of 3.00 GiB (0%)",
                     "upload big.gguf (staging): 1.00 GiB of 3.00 GiB (33%)",
                     "upload big.gguf (uploading): 1.00 GiB of 3.00 GiB (33%)",
                     "upload big.gguf (uploaded): 3.00 GiB of 3.00 GiB (100%)"]


def test_plain_line_of_unknown_total_and_hostile_name():
    buf = io.StringIO()
    view = _plain(buf, Clock())
    view(5 * 2**20, 0, "download a\x1b[31m[bold]x.gguf\nnext")
    out = buf.getvalue()
    assert "\x1b" not in out and out.count("\n") == 1 and "[bold]x.gguf" in out and "of" not in out


def test_bar_on_a_terminal_is_transient():
    buf = io.StringIO()
    view = TransferView(Console(file=buf, force_terminal=True, width=120), interactive=True)
    view(2**20, 2**21, "download m.gguf")
    view(2**21, 2**21, "download m.gguf")
    view.close()
    assert "download m.gguf" in buf.getvalue()  # drawn while it ran (transient: erased at the end)


def test_showing_transfers_installs_and_removes_the_receiver():
    buf = io.StringIO()
    assert transfer_progress() is None
    with showing_transfers(Console(file=buf, width=200)):
        fn = transfer_progress()
        assert fn is not None
        fn(1, 1 << 30, "download x.gguf")
    assert transfer_progress() is None and "download x.gguf: " in buf.getvalue()
    small = io.StringIO()
    with showing_transfers(Console(file=small, width=200)):
        transfer_progress()(1, 2, "download tiny.gguf")  # a small transfer: no line (error output stays one line)
    assert small.getvalue() == ""
    with reporting_transfers(print), showing_transfers(Console(file=buf), enabled=False):
        assert transfer_progress() is None  # --quiet: nobody listens, even under an outer receiver
