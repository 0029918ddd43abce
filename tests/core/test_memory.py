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
