"""Give freed heap memory back to the operating system between the phases of a long run."""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = (ctypes.c_size_t,), ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """glibc's malloc_trim(0): return the free pages of every malloc arena to the OS (numpy and torch free their
    8-32 MB temporaries into the heap, where the pages stay resident and count in RSS until reused). Returns
    whether anything was released; a no-op (False) where the C library has no malloc_trim."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
