"""Byte progress of the registry's transfers, which MLflow makes without a callback.

- Downloads: the bytes that have arrived in the download's temp folder (`watch_tree`).
- Uploads (`watch_upload`): `mlflow.pyfunc.log_model` first copies the GGUF into a staging folder, then uploads that
  folder to the artifact store (a file copy for a local store, an HTTP PUT streamed from the staged file for an
  `mlflow server`). Neither step reports progress, so a thread reads, twice a second, the file offsets the kernel
  keeps for this process's open files (`/proc/self/fdinfo`): an open file named like one of the GGUF's parts, other
  than the source itself, is the copy or the upload in flight, and its offset is the bytes done. The first such file
  seen is the staging copy, any later one the upload. Where /proc is absent (not Linux) the bar shows only the
  phases' start and end.

Polling reads only small /proc entries: memory and speed of the transfer itself are unchanged (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterable, Iterator

from core.progress import ProgressFn

POLL_SECONDS = 0.5
_FD_DIR = Path("/proc/self/fd")


def tree_bytes(folder: Path) -> int:
    """Total size of the regular files under folder (files that vanish meanwhile count 0)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


@contextlib.contextmanager
def _poller(poll, final) -> Iterator[None]:
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(POLL_SECONDS):
            poll()

    t = threading.Thread(target=loop, name="quantgate-transfer-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
    final()


@contextlib.contextmanager
def watch_tree(folder: Path, total: int, what: str, progress: ProgressFn | None) -> Iterator[None]:
    """Report the bytes that have arrived under `folder` every 0.5 s while the block runs, and once at its end."""
    if progress is None:
        yield
        return
    with _poller(lambda: progress(tree_bytes(folder), total, what), lambda: progress(tree_bytes(folder), total, what)):
        yield


def open_files(names: set[str], exclude: set[str]) -> list[tuple[str, str, int]]:
    """(path, mode, bytes) of this process's open files whose base name is in `names` and whose path is not in
    `exclude`: mode "w" (written: bytes = its size now, as a copy writes it) or "r" (read: bytes = the offset, as an
    upload streams it). [] where /proc/self/fd cannot be read."""
    found: list[tuple[str, str, int]] = []
    try:
        fds = os.listdir(_FD_DIR)
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(_FD_DIR / fd)
        except OSError:
            continue
        if os.path.basename(target) not in names or target in exclude:
            continue
        try:
            info = (_FD_DIR.parent / "fdinfo" / fd).read_text(encoding="ascii", errors="replace")
            fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
            pos, flags = int(fields.get("pos", "0").strip()), int(fields.get("flags", "0").strip(), 8)
            if flags & os.O_ACCMODE == os.O_RDONLY:
                found.append((target, "r", pos))
            else:  # a copy writes the whole file in one sendfile call: the offset moves only at its end
                found.append((target, "w", os.stat(target).st_size))
        except (OSError, ValueError):
            continue
    return found


class _UploadWatch:
    """Per part: the open files seen for it in order of appearance; the first is its staging copy, any later one
    its upload. Bytes done in a phase: the largest figure among that phase's files."""

    def __init__(self, sources: list[Path], total: int, label: str, progress: ProgressFn) -> None:
        self.names = {p.name for p in sources}
        self.exclude = {str(p.resolve()) for p in sources} | {str(p) for p in sources}
        self.total, self.label, self.progress = total, label, progress
        self.seen: dict[str, dict[tuple[str, str], int]] = {n: {} for n in self.names}

    def poll(self) -> None:
        for path, mode, n in open_files(self.names, self.exclude):
            files = self.seen[os.path.basename(path)]
            files[(path, mode)] = max(n, files.get((path, mode), 0))
        uploading = any(len(f) > 1 for f in self.seen.values())
        done = 0
        for f in self.seen.values():
            figures = list(f.values())
            done += max(figures[1:], default=0) if uploading else max(figures, default=0)
        self.progress(min(done, self.total), self.total,
                      f"{self.label} ({'uploading' if uploading else 'staging'})")


@contextlib.contextmanager
def watch_upload(sources: Iterable[Path], label: str, progress: ProgressFn | None) -> Iterator[None]:
    """Report the bytes of `sources` (a GGUF and its parts) staged and then uploaded while the block runs (see the
    module docstring); a final report of all bytes when it ends."""
    files = [Path(p) for p in sources]
    if progress is None:
        yield
        return
    total = sum(p.stat().st_size for p in files)
    w = _UploadWatch(files, total, label, progress)
    progress(0, total, f"{label} (staging)")
    with _poller(w.poll, lambda: progress(total, total, f"{label} (uploaded)")):
        yield


__all__ = ["POLL_SECONDS", "open_files", "tree_bytes", "watch_tree", "watch_upload"]
