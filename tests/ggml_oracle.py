"""ggml itself as the oracle: `ggml_quantize_chunk` from llama-cpp-python's libggml-base, through ctypes.

Set QUANTGATE_GGML_LIB to a libggml-base.so to compare against another build (e.g. the default-flags one).
"""
from __future__ import annotations

import ctypes
import faulthandler
import functools
import importlib.util
import os
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType

from quant.formats import get_qtype

ORACLE_VERSION = "0.3.36"


def llamacpp_src() -> Path:
    """The pinned llama.cpp source tree (scripts/build_oracle.sh extracts it; QUANTGATE_LLAMACPP_SRC overrides)."""
    env = os.environ.get("QUANTGATE_LLAMACPP_SRC")
    if env:
        return Path(env)
    root = Path(os.environ.get("QUANTGATE_WHEEL_CACHE", Path.home() / ".cache/quantgate/wheels")).parent
    return root / "src" / f"llama_cpp_python-{ORACLE_VERSION}" / "vendor" / "llama.cpp"


def ggml_lib_path() -> Path | None:
    """Path of the libggml-base shared library to use, or None when no oracle is installed."""
    env = os.environ.get("QUANTGATE_GGML_LIB")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        for cand in sorted((Path(d) / "lib").glob("libggml-base.so*")):
            return cand
    return None


@functools.cache
def _lib() -> ctypes.CDLL:
    path = ggml_lib_path()
    if path is None:
        raise RuntimeError("llama-cpp-python (the ggml oracle) is not installed: scripts/build_oracle.sh")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    if hasattr(lib, "ggml_cpu_init"):
        lib.ggml_cpu_init()
    return lib


def available() -> bool:
    """True when the oracle library can be loaded."""
    try:
        _lib()
        return True
    except (RuntimeError, OSError):
        return False


def ggml_quantize(x: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize x (rows, cols) float32 with ggml_quantize_chunk; returns uint8 (rows, row_bytes)."""
    qt = get_qtype(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    out = np.zeros((rows, qt.row_bytes(cols)), dtype=np.uint8)
    lib = _lib()
    t = int(GGMLQuantizationType[qt.name])
    lib.ggml_quantize_init(t)
    w = None
    if imatrix is not None:
        w = np.ascontiguousarray(imatrix, dtype=np.float32)
    n = lib.ggml_quantize_chunk(
        t, x.ctypes.data, out.ctypes.data, 0, rows, cols, None if w is None else w.ctypes.data
    )
    assert n == out.nbytes, (n, out.nbytes)
    return out


def ggml_aborts(x: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> bool:
    """True when ggml_quantize_chunk aborts the process (GGML_ASSERT) on x: run in a forked child, after the parent
    built the type's tables (ggml_quantize_init), so the child only quantizes."""
    lib = _lib()
    lib.ggml_quantize_init(int(GGMLQuantizationType[get_qtype(qtype).name]))
    pid = os.fork()
    if pid == 0:  # child: quantize and exit without running any Python cleanup
        try:
            faulthandler.disable()  # the abort is expected: no Python traceback dump from the child,
            os.environ["GGML_NO_BACKTRACE"] = "1"  # and no gdb attach from ggml_abort (seconds per abort)
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            ggml_quantize(x, qtype, imatrix)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)
