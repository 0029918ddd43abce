"""core.memory: freed heap pages go back to the OS."""
import sys

import numpy as np
import pytest

from core.memory import release_free_memory


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux's")
def test_freed_heap_holes_leave_rss():
    release_free_memory()
    # 64 KiB arrays come from the malloc heap (below the mmap threshold); every 16th stays alive, so the freed ones
    # are holes the heap cannot shrink past by itself
    arrays = [np.ones(8192) for _ in range(6000)]   # ~390 MB
    keep = arrays[::16]
    before = _rss()
    del arrays
    after_free = _rss()
    assert release_free_memory() is True
    after_trim = _rss()
    freed = 6000 * 65536 * 15 // 16
    assert before - after_trim > freed // 2, (before, after_free, after_trim)
    assert len(keep) == 375


_FRAGMENTED_HEAP = """
import json, numpy as np, psutil
from core.memory import release_free_memory
proc = psutil.Process()
big = np.ones(16 << 17)  # 16 MiB, mmapped; freeing it raises glibc's mmap threshold to 16 MiB
del big
parts, pins = [], []
for _ in range(48):  # 48 x 4 MiB, now from the heap, each followed by 64 KiB that stays: a fragmented heap
    parts.append(np.ones(4 << 17))
    pins.append(np.ones(8 << 10))
before = proc.memory_info().rss
del parts
held = proc.memory_info().rss
ok = release_free_memory()
print(json.dumps({"ok": ok, "before": before, "held": held, "after": proc.memory_info().rss}))
"""


def test_release_free_memory_returns_a_fragmented_heaps_free_pages():
    """After blocks of weights are freed, glibc keeps allocations below its raised mmap threshold in the heap (RSS
    grew ~96 MB a block at 8B shapes); release_free_memory (called as each streamed block is freed) hands those pages back.
    In a fresh interpreter: the heap's state there is known (in this one, earlier tests have moved the threshold)."""
    import json
    import os
    import subprocess
    import sys

    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, cwd=root,
                       env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    assert m["ok"]
    assert m["before"] - m["held"] < 0.25 * 192 * 2**20, m  # free() kept the pages: the fragmented heap
    assert m["held"] - m["after"] > 0.5 * 192 * 2**20, m  # most of the 192 MiB freed goes back
