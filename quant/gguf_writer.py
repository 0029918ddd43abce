"""Streaming, atomic GGUF v3 writer that lays bytes out exactly as ggml's gguf_write_to_file does.

Tensor infos are computed up front; tensor bytes are then produced, written, hashed and freed one tensor
at a time, so peak memory is one tensor regardless of model size.

Own serializer rather than gguf.GGUFWriter because GGUFWriter (0.19.0) always inserts
general.architecture first (the caller's KV order must be kept), refuses empty arrays (ggml allows them
and llama-quantize copies them), writes n_dims = len(shape) where ggml writes ggml_n_dims (trailing
ne == 1 dropped), and opens its own files (no atomic temp file, no hashing while writing).
"""
from __future__ import annotations

import hashlib
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np
from gguf.constants import GGUFValueType

from core.atomic import atomic_write
from core.errors import GGUFFormatError
from quant.gguf_kv import KV
from quant.gguf_reader import (
    ALIGNMENT_KEY,
    GGML_MAX_DIMS,
    GGML_MAX_NAME,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    NUMPY_DTYPE,
    encode_str,
    ggml_type,
    gguf_pad,
)

GGUF_VERSION = 3
_INT_TYPES = {t for t, d in NUMPY_DTYPE.items() if d.kind in "iu" and t != GGUFValueType.BOOL}
_FLOAT_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}


@dataclass
class TensorSpec:
    """A tensor to write: numpy-order shape (last axis = row), ggml type name and a producer of its bytes."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    produce: Callable[[], np.ndarray]   # returns exactly the tensor's bytes as uint8
    # dimensions written: None = ggml_n_dims (trailing 1s dropped, as ggml / llama-quantize write); convert passes
    # len(shape), as gguf-py's GGUFWriter (convert_hf_to_gguf.py) writes a (1, n) tensor as 2-D
    n_dims: int | None = None


@dataclass
class WriteResult:
    """What was written: final path, SHA-256 of the whole file, its size and each tensor's absolute offset."""

    path: Path
    sha256: str
    nbytes: int
    tensor_offsets: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)  # produce / hash / write: where the time went


def _str_bytes(s: Any, what: str) -> bytes:
    if not isinstance(s, (str, bytes)):
        raise GGUFFormatError(f"{what}: expected a string, got {type(s).__name__}")
    return struct.pack("<Q", len(b := encode_str(s))) + b


def _scalar(value: Any, vt: GGUFValueType, what: str) -> bytes:
    if vt == GGUFValueType.STRING:
        return _str_bytes(value, what)
    if vt == GGUFValueType.BOOL:
        if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
            return b"\x01" if value else b"\x00"
        raise GGUFFormatError(f"{what}: expected a bool, got {value!r}")
    if vt in _INT_TYPES:
        if not isinstance(value, (int, np.integer)):
            raise GGUFFormatError(f"{what}: expected an integer for {vt.name}, got {value!r}")
        info = np.iinfo(NUMPY_DTYPE[vt])
        if not info.min <= int(value) <= info.max:
            raise GGUFFormatError(f"{what}: {value} does not fit in {vt.name}")
        return NUMPY_DTYPE[vt].type(int(value)).tobytes()
    if vt in _FLOAT_TYPES:
        if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
            raise GGUFFormatError(f"{what}: expected a number for {vt.name}, got {value!r}")
        try:
            return struct.pack("<f" if vt == GGUFValueType.FLOAT32 else "<d", float(value))
        except OverflowError:
            raise GGUFFormatError(f"{what}: {value} does not fit in {vt.name}") from None
    raise GGUFFormatError(f"{what}: invalid value type {vt!r}")


def _numeric_array(value: Any, sub: GGUFValueType, what: str) -> bytes:
    dt = NUMPY_DTYPE[sub]
    if not isinstance(value, np.ndarray):
        # python sequences: check element by element (np.asarray would turn big ints into floats)
        try:
            items = list(value)
        except TypeError:
            raise GGUFFormatError(f"{what}: expected a sequence of {sub.name}, got {type(value).__name__}") from None
        if sub in _INT_TYPES or sub == GGUFValueType.BOOL:
            for v in items:
                if sub == GGUFValueType.BOOL:
                    _scalar(v, sub, what)
                elif not isinstance(v, (int, np.integer)):
                    raise GGUFFormatError(f"{what}: expected integers for {sub.name}, got {v!r}")
            items = [int(v) for v in items]
        elif not all(isinstance(v, (int, float, np.integer, np.floating)) for v in items):
            raise GGUFFormatError(f"{what}: expected numbers for {sub.name}")
        value = np.array(items, dtype=np.float64 if sub in _FLOAT_TYPES else object)
    if value.ndim != 1:
        raise GGUFFormatError(f"{what}: arrays must be 1-D, got shape {value.shape}")
    if value.size == 0:
        return b""
    kind = value.dtype.kind
    if sub == GGUFValueType.BOOL:
        if kind not in "biuO" or not np.isin(value, (0, 1)).all():
            raise GGUFFormatError(f"{what}: expected bools")
        return (value != 0).astype(dt).tobytes()
    if sub in _INT_TYPES:
        if kind not in "biuO":
            raise GGUFFormatError(f"{what}: expected integers for {sub.name}, got {value.dtype}")
        lo, hi = int(value.min()), int(value.max())
        info = np.iinfo(dt)
        if lo < info.min or hi > info.max:
            raise GGUFFormatError(f"{what}: values in [{lo}, {hi}] do not fit in {sub.name}")
        return value.astype(dt).tobytes()
    if kind not in "biuf":
        raise GGUFFormatError(f"{what}: expected numbers for {sub.name}, got {value.dtype}")
    return value.astype(dt).tobytes()


def encode_kv(kv: KV) -> bytes:
    """Serialize one KV pair exactly as ggml writes it: key, value type, [element type, count], payload."""
    what = f"KV {kv.key!r}"
    try:
        vt = GGUFValueType(kv.vtype)
    except ValueError:
        raise GGUFFormatError(f"{what}: invalid value type {kv.vtype!r}") from None
    out = _str_bytes(kv.key, f"key {kv.key!r}")
    if vt != GGUFValueType.ARRAY:
        return out + struct.pack("<I", vt) + _scalar(kv.value, vt, what)
    if kv.sub_type is None:
        raise GGUFFormatError(f"{what}: an ARRAY value needs its element type (sub_type)")
    try:
        sub = GGUFValueType(kv.sub_type)
    except ValueError:
        raise GGUFFormatError(f"{what}: invalid array element type {kv.sub_type!r}") from None
    if sub == GGUFValueType.ARRAY:
        raise GGUFFormatError(f"{what}: arrays of arrays are not allowed in GGUF")
    if sub == GGUFValueType.STRING:
        if isinstance(kv.value, (str, bytes)):
            raise GGUFFormatError(f"{what}: expected a sequence of strings, got a single string")
        items = list(kv.value)
        payload = b"".join(_str_bytes(s, f"{what}[{i}]") for i, s in enumerate(items))
        n = len(items)
    else:
        payload = _numeric_array(kv.value, sub, what)
        n = len(payload) // NUMPY_DTYPE[sub].itemsize
    return out + struct.pack("<IIQ", GGUFValueType.ARRAY, sub, n) + payload


def _with_alignment(kv: Sequence[KV], alignment: int) -> list[KV]:
    if alignment <= 0 or alignment & (alignment - 1) or alignment >= 2**32:
        raise GGUFFormatError(f"alignment {alignment} is not a power of 2 that fits in UINT32")
    kvs = list(kv)
    seen: set[str] = set()
    for k in kvs:
        if not isinstance(k.key, str) or not k.key:
            raise GGUFFormatError(f"KV keys must be non-empty strings, got {k.key!r}")
        if k.key in seen:
            raise GGUFFormatError(f"duplicate KV key {k.key!r}")
        seen.add(k.key)
    given = next((k for k in kvs if k.key == ALIGNMENT_KEY), None)
    if given is not None:
        if given.vtype != GGUFValueType.UINT32 or given.value != alignment:
            raise GGUFFormatError(
                f"{ALIGNMENT_KEY} in kv is {given.value!r} ({GGUFValueType(given.vtype).name}) but the file is "
                f"written with alignment {alignment} (UINT32)"
            )
    elif alignment != GGUF_DEFAULT_ALIGNMENT:
        kvs.append(KV(ALIGNMENT_KEY, alignment, GGUFValueType.UINT32))
    return kvs


def _tensor_info(spec: TensorSpec, rel_offset: int) -> tuple[bytes, int]:
    """Encode one tensor-info record (ggml_n_dims dims, ne in ggml order); return it with the data size."""
    if not isinstance(spec.name, str):
        raise GGUFFormatError(f"tensor names must be strings, got {spec.name!r}")
    name_b = encode_str(spec.name)
    if len(name_b) >= GGML_MAX_NAME:
        raise GGUFFormatError(
            f"tensor name {spec.name!r} is {len(name_b)} bytes; ggml allows at most {GGML_MAX_NAME - 1}"
        )
    t = ggml_type(spec.qtype) if isinstance(spec.qtype, str) else None
    if t is None:
        raise GGUFFormatError(f"tensor {spec.name!r}: unknown ggml type {spec.qtype!r}")
    shape = tuple(spec.shape)
    if len(shape) > GGML_MAX_DIMS or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        raise GGUFFormatError(
            f"tensor {spec.name!r}: shape {shape} must have at most {GGML_MAX_DIMS} positive dimensions"
        )
    ne = [int(d) for d in reversed(shape)] + [1] * (GGML_MAX_DIMS - len(shape))
    if ne[0] % t.block_size:
        raise GGUFFormatError(
            f"tensor {spec.name!r}: row length {ne[0]} is not a multiple of {t.name}'s block size {t.block_size}"
        )
    n_el = ne[0] * ne[1] * ne[2] * ne[3]
    if n_el >= 2**63:
        raise GGUFFormatError(f"tensor {spec.name!r}: shape {shape} has too many elements")
    n_dims = next((i + 1 for i in range(GGML_MAX_DIMS - 1, 0, -1) if ne[i] > 1), 1)
    if spec.n_dims is not None:
        if not n_dims <= spec.n_dims <= GGML_MAX_DIMS:
            raise GGUFFormatError(f"tensor {spec.name!r}: cannot write shape {shape} with {spec.n_dims} dimensions")
        n_dims = spec.n_dims
    rec = (
        struct.pack("<Q", len(name_b)) + name_b + struct.pack("<I", n_dims)
        + struct.pack(f"<{n_dims}q", *ne[:n_dims]) + struct.pack("<iQ", t.id, rel_offset)
    )
    return rec, t.nbytes(n_el)


def build_metadata(
    kv: Sequence[KV], tensors: Sequence[TensorSpec], alignment: int = GGUF_DEFAULT_ALIGNMENT
) -> tuple[bytes, list[int], list[int]]:
    """Header + KV + tensor infos + padding, with each tensor's data offset (relative) and byte size.

    Validates everything that can be validated before any tensor is produced.
    """
    kvs = _with_alignment(kv, alignment)
    names: set[str] = set()
    infos, offsets, sizes = [], [], []
    rel = 0
    for spec in tensors:
        if spec.name in names:
            raise GGUFFormatError(f"duplicate tensor name {spec.name!r}")
        names.add(spec.name)
        rec, nbytes = _tensor_info(spec, rel)
        infos.append(rec)
        offsets.append(rel)
        sizes.append(nbytes)
        rel += gguf_pad(nbytes, alignment)
    meta = bytearray(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kvs)))
    for k in kvs:
        meta += encode_kv(k)
    for rec in infos:
        meta += rec
    meta += bytes(gguf_pad(len(meta), alignment) - len(meta))
    return bytes(meta), offsets, sizes


def _tensor_bytes(spec: TensorSpec, expected: int) -> memoryview:
    data = spec.produce()
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        got = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise GGUFFormatError(f"tensor {spec.name!r}: produce() must return a uint8 array, got {got}")
    if data.nbytes != expected:
        raise GGUFFormatError(
            f"tensor {spec.name!r}: produce() returned {data.nbytes} bytes, expected {expected} "
            f"for {spec.qtype} {tuple(spec.shape)}"
        )
    return memoryview(np.ascontiguousarray(data).reshape(-1))


def _drop_written(f, upto: int) -> None:
    """Start writeback of the bytes written so far and drop those already clean from the page cache
    (POSIX_FADV_DONTNEED: Linux writes dirty pages back asynchronously and evicts the clean ones): dirty pages and
    the output's cache stay at about one tensor instead of growing with the file (a 16 GB model would otherwise
    leave GBs of dirty pages on a shared machine until the final fsync)."""
    if hasattr(os, "posix_fadvise"):
        f.flush()
        os.posix_fadvise(f.fileno(), 0, upto, os.POSIX_FADV_DONTNEED)


_REHASH_CHUNK = 8 << 20


def _rewrite_header(f: BinaryIO, old: bytes, new: bytes, end: int) -> "hashlib._Hash":
    """Overwrite the header `old` at the start of the open output with `new` (same length) and return the SHA-256
    of the whole file, its data read back in chunks (the temp file's descriptor is open read-write: mkstemp)."""
    if len(new) != len(old):
        raise GGUFFormatError(f"the final KVs change the header's length ({len(old)} -> {len(new)} bytes); late "
                              "values must have the length of their placeholders")
    f.flush()
    fd = f.fileno()
    os.pwrite(fd, new, 0)
    h = hashlib.sha256(new)
    buf = bytearray(_REHASH_CHUNK)
    mv = memoryview(buf)
    pos = len(new)
    while pos < end:
        n = os.preadv(fd, [mv[:min(_REHASH_CHUNK, end - pos)]], pos)
        if n <= 0:
            raise GGUFFormatError(f"output ended at {pos} of {end} bytes while being hashed")
        h.update(mv[:n])
        pos += n
    return h


def write_gguf(
    path: "str | os.PathLike[str]",
    *,
    kv: Sequence[KV],
    tensors: Sequence[TensorSpec],
    alignment: int = GGUF_DEFAULT_ALIGNMENT,
    on_tensor: Callable[[int, int, str], None] | None = None,
    before_publish: Callable[[WriteResult], None] | None = None,
    final_kv: Callable[[], Sequence[KV]] | None = None,
) -> WriteResult:
    """Write a GGUF v3 file atomically, streaming tensors one at a time; returns its SHA-256 and layout.

    KV pairs are written in the given order (general.alignment appended when alignment != 32).
    `on_tensor(done, total, name)` is called after each tensor is written (done counts from 1).
    Invalid input raises GGUFFormatError before anything is written; a failure mid-file leaves no file.
    `before_publish(result)` runs once the bytes are durable in the temp file and before it is renamed to `path`
    (the pipeline appends its audit event there); if it raises, no file is published.
    `final_kv()`, when given, runs after the last tensor is written and returns the KVs the header really holds:
    values known only once every tensor has been produced (the source's weights fingerprint, computed from the
    tensors as the producers read them). They must encode to the same length as `kv` (same keys, fixed-length
    values: placeholders of the digests' length); the header is rewritten in place and the file's SHA-256 is then
    computed by reading the data back (one sequential read of the output, instead of a second pass over the input).
    """
    meta, offsets, sizes = build_metadata(kv, tensors, alignment)
    target = Path(path)
    h = [hashlib.sha256(meta)]
    pos = len(meta)
    seconds = {"produce": 0.0, "hash": 0.0, "write": 0.0}

    def result() -> WriteResult:
        return WriteResult(target, h[0].hexdigest(), pos, {s.name: len(meta) + o for s, o in zip(tensors, offsets)},
                           dict(seconds))

    def emit(f: BinaryIO, buf: memoryview, pad: bytes, end: int) -> None:
        t1 = time.perf_counter()
        if final_kv is None:  # else hashed once the final header is known (_rehash)
            h[0].update(buf)  # hashlib and file writes release the GIL: this overlaps the next tensor's production
            h[0].update(pad)
        t2 = time.perf_counter()
        f.write(buf)
        f.write(pad)
        _drop_written(f, end)
        seconds["hash"] += t2 - t1
        seconds["write"] += time.perf_counter() - t2

    hook = None if before_publish is None else (lambda _tmp: before_publish(result()))
    # One writer thread hashes and writes tensor i while tensor i + 1 is produced (read, converted, quantized);
    # at most one tensor's bytes wait, and tensors reach the file in order.
    with atomic_write(target, before_replace=hook) as f, ThreadPoolExecutor(1, "gguf-writer") as writer:
        f.write(meta)
        pending: Future | None = None
        try:
            for i, (spec, size) in enumerate(zip(tensors, sizes)):
                t0 = time.perf_counter()
                buf = _tensor_bytes(spec, size)
                seconds["produce"] += time.perf_counter() - t0
                pad = bytes(gguf_pad(size, alignment) - size)
                if pending is not None:
                    pending.result()
                    if on_tensor is not None:
                        on_tensor(i, len(tensors), tensors[i - 1].name)
                pos += size + len(pad)
                pending = writer.submit(emit, f, buf, pad, pos)
                del buf
            if pending is not None:
                pending.result()
                if on_tensor is not None:
                    on_tensor(len(tensors), len(tensors), tensors[-1].name)
            if final_kv is not None:
                t0 = time.perf_counter()
                h[0] = _rewrite_header(f, meta, build_metadata(final_kv(), tensors, alignment)[0], pos)
                seconds["hash"] += time.perf_counter() - t0
        finally:
            if pending is not None:
                wait([pending])  # never leave the with-block (close, unlink) while a write is in flight
    return result()


__all__ = ["TensorSpec", "WriteResult", "write_gguf", "build_metadata", "encode_kv", "GGUF_VERSION"]
