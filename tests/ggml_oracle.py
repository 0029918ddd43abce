"""ggml itself as the oracle: `ggml_quantize_chunk` from llama-cpp-python's libggml-base, through ctypes.

Set QUANTGATE_GGML_LIB to a libggml-base.so to compare against another build (e.g. the default-flags one).
"""
from __future__ import annotations

import ctypes
import faulthandler
import functools
import importlib.util
import os
import re
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


def _set_imatrix(p, imatrix: "dict[str, np.ndarray] | None") -> list:
    """Point llama_model_quantize_params.imatrix at `imatrix`; returns what must stay alive during the call."""
    import llama_cpp

    keep: list = []
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, vals) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(vals, dtype=np.float32).reshape(-1)
            b = name.encode()
            keep += [v, b]
            arr[i].name, arr[i].size = b, v.size
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[len(imatrix)].name = None
        keep.append(arr)
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    return keep


def llama_model_quantize(src: Path, dst: Path, ftype: int, *, imatrix: "dict[str, np.ndarray] | None" = None,
                         pure: bool = False, nthread: int = 2) -> int:
    """llama.cpp's whole-model quantizer (llama_model_quantize) with an optional importance matrix (name -> the
    per-column values llama-quantize would hand ggml); returns its status (0 ok, 1 refused/failed)."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = nthread
    p.pure = pure
    keep = _set_imatrix(p, imatrix)
    rc = int(llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)))
    del keep
    return rc


_DRY_RUN_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =\s*[\d.]+ MiB"
                           r"(?: ->\s*[\d.]+ MiB \((\w+)\))?")


def llama_quantize_types(src: Path, ftype: int, *, imatrix: "dict[str, np.ndarray] | None" = None,
                         pure: bool = False) -> tuple[dict[str, str], bool]:
    """llama_model_quantize's --dry-run: every tensor's type as llama.cpp chooses it (the target_type its real run
    writes), read from its log, and whether the real run would refuse for want of an importance matrix. Costs no
    quantization (the very low-bit ggml kernels take seconds even on tiny models)."""
    import llama_cpp

    chunks: list[bytes] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):  # noqa: ARG001 - ctypes signature
        chunks.append(text)

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 1
    p.pure = pure
    p.dry_run = True
    keep = _set_imatrix(p, imatrix)
    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(src).encode() + b".unused", ctypes.byref(p))
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    del keep
    log = b"".join(chunks).decode("utf-8", "replace")
    assert rc == 0, f"llama_model_quantize --dry-run failed: {log[-500:]}"
    types = {m.group(1): (m.group(3) or m.group(2)).upper() for m in _DRY_RUN_LINE.finditer(log)}
    assert types, f"no tensor lines in llama.cpp's log: {log[-500:]}"
    return types, "will require an imatrix" in log


def build_gguf_split(out_dir: Path) -> Path:
    """Compile llama.cpp's own llama-gguf-split (tools/gguf-split/gguf-split.cpp of the pinned source) against
    llama-cpp-python's libllama/libggml: the reference for the split layout (llama-cpp-python ships no tools)."""
    import subprocess

    src = llamacpp_src()
    lib = ggml_lib_path()
    if lib is None or not (src / "tools/gguf-split/gguf-split.cpp").is_file():
        raise RuntimeError("llama.cpp source or llama-cpp-python's libraries missing: scripts/build_oracle.sh")
    stub = out_dir / "build_info_stub.cpp"  # common/build-info.cpp is generated by llama.cpp's CMake
    stub.write_text('int llama_build_number(void) { return 0; }\n'
                    'const char * llama_commit(void) { return "pinned"; }\n'
                    'const char * llama_compiler(void) { return "c++"; }\n'
                    'const char * llama_build_target(void) { return "quantgate-tests"; }\n')
    exe = out_dir / "llama-gguf-split"
    cmd = ["c++", "-std=c++17", "-O1", f"-I{src / 'common'}", f"-I{src / 'include'}", f"-I{src / 'ggml/include'}",
           str(src / "tools/gguf-split/gguf-split.cpp"), str(stub), f"-L{lib.parent}", "-lllama", "-lggml",
           "-lggml-base", f"-Wl,-rpath,{lib.parent}", "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"building llama-gguf-split failed: {res.stderr[-2000:]}")
    return exe


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


def llama_logits(path: "str | os.PathLike[str]", text: bytes = b"def add(a, b): return a + b",
                 n_ctx: int = 256) -> np.ndarray:
    """llama-cpp-python's logits for every token of `text` (BOS added) from a GGUF (a split set by its first part):
    the independent runtime's view, for equality checks between files."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, seed=0, verbose=False)
    try:
        ids = llm.tokenize(text, add_bos=True, special=False)
        llm.reset()
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
