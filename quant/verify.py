"""Check a GGUF file against the spec and what ggml/llama.cpp enforce, listing every problem found."""
from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGUFValueType

from core.errors import CheckpointError, GGUFFormatError, UnsupportedTypeError
from quant.api import dequantize
from quant.formats import QTYPES
from quant.gguf_reader import GGML_TYPES, GGUFFile, TensorInfo, file_kind, gguf_pad, read_gguf
from quant.gguf_split import check_parts, part_paths
from quant.model_plan import CHECKED_ARCHS, check_architecture

GGML_QNT_VERSION = 2                      # ggml.h: bump on quantization format changes
#: llama.h llama_ftype values (general.file_type) and their names
LLAMA_FTYPES: dict[int, str] = {
    0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 7: "MOSTLY_Q8_0", 8: "MOSTLY_Q5_0",
    9: "MOSTLY_Q5_1", 10: "MOSTLY_Q2_K", 11: "MOSTLY_Q3_K_S", 12: "MOSTLY_Q3_K_M", 13: "MOSTLY_Q3_K_L",
    14: "MOSTLY_Q4_K_S", 15: "MOSTLY_Q4_K_M", 16: "MOSTLY_Q5_K_S", 17: "MOSTLY_Q5_K_M", 18: "MOSTLY_Q6_K",
    19: "MOSTLY_IQ2_XXS", 20: "MOSTLY_IQ2_XS", 21: "MOSTLY_Q2_K_S", 22: "MOSTLY_IQ3_XS", 23: "MOSTLY_IQ3_XXS",
    24: "MOSTLY_IQ1_S", 25: "MOSTLY_IQ4_NL", 26: "MOSTLY_IQ3_S", 27: "MOSTLY_IQ3_M", 28: "MOSTLY_IQ2_S",
    29: "MOSTLY_IQ2_M", 30: "MOSTLY_IQ4_XS", 31: "MOSTLY_IQ1_M", 32: "MOSTLY_BF16", 36: "MOSTLY_TQ1_0",
    37: "MOSTLY_TQ2_0", 38: "MOSTLY_MXFP4_MOE", 39: "MOSTLY_NVFP4", 40: "MOSTLY_Q1_0", 41: "MOSTLY_Q2_0",
}
UNQUANTIZED_TYPES = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})
_FLOAT_FTYPES = {0: {"F32"}, 1: {"F32", "F16"}, 32: {"F32", "BF16"}}
_CHUNK_BYTES = 64 << 20       # bounded memory: values are checked this many bytes at a time
# (view dtype, exponent mask) of the stored float formats: all exponent bits set means NaN or Inf
_FLOAT_BITS = {"F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}


@dataclass
class VerifyReport:
    """Outcome of verify_gguf: ok is True exactly when problems is empty; notes are informational."""

    path: Path
    ok: bool
    problems: list[str]
    n_tensors: int
    file_size: int
    notes: list[str] = field(default_factory=list)


def _check_metadata(g: GGUFFile, problems: list[str], notes: list[str]) -> None:
    arch = g.get("general.architecture")
    if arch is None:
        problems.append("general.architecture is missing")
    elif arch.vtype != GGUFValueType.STRING or not arch.value:
        problems.append("general.architecture must be a non-empty STRING")
    quantized = [t for t in g.tensors if t.qtype not in UNQUANTIZED_TYPES]
    ft = g.get("general.file_type")
    if ft is None:  # optional in the GGUF spec; llama.cpp guesses it (general.quantization_version is the required one)
        notes.append("general.file_type is missing (optional)")
    elif ft.vtype != GGUFValueType.UINT32:
        problems.append(f"general.file_type must be UINT32 (llama.cpp reads it as u32), got {ft.vtype.name}")
    elif int(ft.value) not in LLAMA_FTYPES:
        problems.append(f"general.file_type = {ft.value} is not a known llama_ftype")
    else:
        ftype = int(ft.value)
        allowed = _FLOAT_FTYPES.get(ftype)
        if allowed is not None:
            bad = [t for t in g.tensors if t.qtype not in allowed and t.qtype in QTYPES]
            for t in bad:
                problems.append(
                    f"general.file_type is {LLAMA_FTYPES[ftype]} but tensor {t.name!r} is {t.qtype}"
                )
        elif not quantized:
            notes.append(f"general.file_type is {LLAMA_FTYPES[ftype]} but no tensor is quantized")
    qv = g.get("general.quantization_version")
    if qv is None:
        if quantized:
            problems.append("general.quantization_version is missing but the file has quantized tensors")
    elif qv.vtype != GGUFValueType.UINT32 or int(qv.value) != GGML_QNT_VERSION:
        problems.append(
            f"general.quantization_version must be UINT32 {GGML_QNT_VERSION}, got {qv.value!r} ({qv.vtype.name})"
        )


def _check_architecture(g: GGUFFile, problems: list[str], notes: list[str]) -> None:
    """Zero tensors is a problem; for the architectures in CHECKED_ARCHS every tensor each block needs must be there
    with the shape the hyperparameters give, and the hyperparameters must be positive and finite
    (quant.model_plan.check_architecture)."""
    arch = g.value("general.architecture")
    arch = arch if isinstance(arch, str) else ""
    kv = {k.key: k.value for k in g.kv}
    problems.extend(check_architecture(arch, kv, {t.name: tuple(t.shape) for t in g.tensors}))
    if g.tensors and arch and arch not in CHECKED_ARCHS:
        notes.append(f"tensor completeness is checked for {', '.join(CHECKED_ARCHS)} only, not {arch!r}")


def _check_padding(g: GGUFFile, problems: list[str], notes: list[str]) -> None:
    if g.tensors and g.region(g.header_end, g.data_offset).any():
        problems.append("padding before the data section is not all zero")
    end = g.data_offset
    for t in g.tensors:
        padded_end = t.offset + gguf_pad(t.nbytes, g.alignment)
        if t.nbytes and g.region(t.offset + t.nbytes, padded_end).any():
            problems.append(f"padding after tensor {t.name!r} is not all zero")
        end = max(end, padded_end)
    if g.tensors and g.file_size > end:
        notes.append(f"{g.file_size - end} extra bytes after the tensor data")
    elif g.file_size < end and all(t.offset + t.nbytes <= g.file_size for t in g.tensors):
        problems.append(
            f"file ends at {g.file_size}, before the padded end of the tensor data ({end}): "
            "ggml pads the last tensor too, and loaders that read the whole data section fail"
        )


def _count_bad_floats(raw: np.ndarray, qtype: str) -> tuple[int, int, int]:
    dt, mask = _FLOAT_BITS[qtype]
    bits = raw.view(dt)
    n_nan = n_inf = 0
    first = -1
    step = _CHUNK_BYTES // bits.itemsize
    for s in range(0, bits.size, step):
        chunk = bits[s:s + step]
        special = (chunk & mask) == mask
        if special.any():
            idx = np.flatnonzero(special)
            if first < 0:
                first = s + int(idx[0])
            nan = (chunk[idx] & ~np.array(mask | (1 << (8 * bits.itemsize - 1)), dtype=dt)) != 0
            n_nan += int(nan.sum())
            n_inf += int((~nan).sum())
    return n_nan, n_inf, first


def _count_bad_quantized(raw: np.ndarray, t: TensorInfo) -> tuple[int, int, int]:

    cols = t.shape[-1] if t.shape else 1
    row_bytes = QTYPES[t.qtype].row_bytes(cols)
    rows = t.nbytes // row_bytes
    step = max(1, _CHUNK_BYTES // 4 // max(cols, 1))
    n_nan = n_inf = 0
    first = -1
    for r in range(0, rows, step):
        n = min(step, rows - r)
        x = dequantize(raw[r * row_bytes:(r + n) * row_bytes], t.qtype, (n, cols))
        nan, inf = np.isnan(x), np.isinf(x)
        if first < 0 and (nan.any() or inf.any()):
            first = r * cols + int(np.flatnonzero(nan | inf)[0])
        n_nan += int(nan.sum())
        n_inf += int(inf.sum())
    return n_nan, n_inf, first


def _check_values(g: GGUFFile, problems: list[str], notes: list[str]) -> None:
    for t in g.tensors:
        if t.ggml_type not in GGML_TYPES or not t.nbytes or t.offset + t.nbytes > g.file_size:
            continue
        if t.qtype not in QTYPES:
            notes.append(f"cannot check values of type {t.qtype} (tensor {t.name!r})")
            continue
        raw = g.tensor_data(t)
        if t.qtype in _FLOAT_BITS:
            n_nan, n_inf, first = _count_bad_floats(raw, t.qtype)
        else:
            try:
                n_nan, n_inf, first = _count_bad_quantized(raw, t)
            except (ImportError, UnsupportedTypeError) as e:
                notes.append(f"cannot check values of type {t.qtype} (tensor {t.name!r}): {e}")
                continue
        if n_nan or n_inf:
            problems.append(
                f"tensor {t.name!r} ({t.qtype}) has {n_nan} NaN and {n_inf} Inf values "
                f"(first at flat index {first})"
            )


def verify_gguf(path: "str | os.PathLike[str]", *, check_values: bool = True) -> VerifyReport:
    """Check structure, metadata and (optionally) tensor values of a GGUF file, or of the whole split GGUF any
    part of which is given (quant.gguf_split); never raises on bad input."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        return VerifyReport(p, False, [f"cannot open: {e.strerror or e}"], 0, 0)
    size = st.st_size
    if not stat.S_ISREG(st.st_mode):  # never opened: a FIFO blocks, a device never ends (the CLI: exit 2)
        return VerifyReport(p, False, [f"not a regular file ({file_kind(st.st_mode)})"], 0, 0)
    try:
        g = read_gguf(p, strict=False)
    except GGUFFormatError as e:
        return VerifyReport(p, False, [str(e)], 0, size)
    try:
        paths = part_paths(p, g)
    except CheckpointError as e:
        g.close()
        return VerifyReport(p, False, [str(e)], len(g.tensors), size)
    if paths is not None:
        g.close()
        return _verify_split(paths, check_values=check_values)
    with g:
        problems = list(g.problems)
        notes: list[str] = []
        if g.version != 3:
            notes.append(f"GGUF version {g.version} (quantgate writes version 3)")
        _check_metadata(g, problems, notes)
        _check_architecture(g, problems, notes)
        _check_padding(g, problems, notes)
        if check_values:
            _check_values(g, problems, notes)
    return VerifyReport(p, not problems, problems, len(g.tensors), size, notes)


def _verify_split(paths: list[Path], *, check_values: bool) -> VerifyReport:
    """verify_gguf for a split GGUF: each part's structure, padding and values, the set's consistency
    (quant.gguf_split.check_parts), and metadata and architecture over the whole set; problems name their part."""
    problems: list[str] = []
    notes: list[str] = [f"split GGUF of {len(paths)} parts"]
    parts: list[GGUFFile] = []
    size = 0
    try:
        for i, q in enumerate(paths):
            if not q.is_file():
                problems.append(f"{q}: part {i + 1} of {len(paths)} of the split GGUF is missing")
                continue
            try:
                parts.append(read_gguf(q, strict=False))
            except GGUFFormatError as e:
                problems.append(str(e))
                continue
            size += parts[-1].file_size
        if problems:  # missing or unparseable parts: the set cannot be checked further
            return VerifyReport(paths[0], False, problems, sum(len(g.tensors) for g in parts), size, notes)
        for g in parts:
            part_problems: list[str] = list(g.problems)
            part_notes: list[str] = []
            _check_padding(g, part_problems, part_notes)
            if check_values:
                _check_values(g, part_problems, part_notes)
            problems += [f"{g.path.name}: {m}" for m in part_problems]
            notes += [f"{g.path.name}: {m}" for m in part_notes]
        problems += check_parts(parts)
        whole = dataclasses.replace(parts[0], tensors=[t for g in parts for t in g.tensors])  # metadata view only
        _check_metadata(whole, problems, notes)
        _check_architecture(whole, problems, notes)
        return VerifyReport(paths[0], not problems, problems, len(whole.tensors), size, notes)
    finally:
        for g in parts:
            g.close()


__all__ = ["VerifyReport", "verify_gguf", "LLAMA_FTYPES", "GGML_QNT_VERSION", "UNQUANTIZED_TYPES"]
