"""A safe GGUF v2/v3 parser: every count and length is checked against the file before it is trusted.

A corrupt or hostile file yields GGUFFormatError with a clear message, never a crash, a hang or an
allocation sized by a lying header field. Tensor data is exposed as zero-copy memory-mapped views.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUFValueType

from core.errors import GGUFFormatError
from core.paths import file_kind
from core.regular_file import NotRegularFileError, open_regular_file
from quant.gguf_kv import KV

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64          # names must be shorter than this many bytes (ggml keeps a NUL-terminated char[64])
ALIGNMENT_KEY = "general.alignment"
_HEADER_BYTES = 24          # magic, version, n_tensors, n_kv
_MIN_KV_BYTES = 14          # key length + 1-byte key + value type + 1-byte value
_MIN_TI_BYTES = 24          # name length + n_dims + type + offset


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type id with its block geometry (weights per block, bytes per block)."""

    id: int
    name: str
    block_size: int
    type_size: int

    def nbytes(self, n_elements: int) -> int:
        return n_elements // self.block_size * self.type_size


def _ggml_types() -> dict[int, GGMLType]:
    table = {int(t): GGMLType(int(t), t.name, bs, ts) for t, (bs, ts) in GGML_QUANT_SIZES.items()}
    # The pinned ggml (ggml.h) knows Q2_0 = 42 (block_q2_0: fp16 scale + 64 2-bit weights); gguf 0.19.0 does not.
    table.setdefault(42, GGMLType(42, "Q2_0", 64, 18))
    return table


#: Every tensor type the pinned ggml accepts in a GGUF file, by id.
GGML_TYPES: dict[int, GGMLType] = _ggml_types()
_GGML_BY_NAME: dict[str, GGMLType] = {t.name: t for t in GGML_TYPES.values()}


def ggml_type(name_or_id: "str | int") -> GGMLType | None:
    """Look up a ggml tensor type by name (case-insensitive) or id; None when ggml does not know it."""
    if isinstance(name_or_id, str):
        return _GGML_BY_NAME.get(name_or_id.strip().upper())
    return GGML_TYPES.get(int(name_or_id))


_SCALAR_FMT: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<b", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
#: numpy dtype of each fixed-size GGUF value type, as stored (little-endian).
NUMPY_DTYPE: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}


def decode_str(raw: bytes) -> str:
    """GGUF strings are bytes; decode as UTF-8 keeping invalid bytes round-trippable (surrogateescape)."""
    return raw.decode("utf-8", "surrogateescape")


def encode_str(s: "str | bytes") -> bytes:
    """Inverse of decode_str."""
    return s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")


def gguf_pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


@dataclass(frozen=True)
class TensorInfo:
    """One tensor-info record: numpy-order shape, ggml type, absolute data offset and byte size."""

    name: str
    shape: tuple[int, ...]
    qtype: str            # ggml type name, or 'UNKNOWN(id)'
    ggml_type: int
    offset: int           # absolute offset in the file
    nbytes: int           # 0 when the type is unknown or the shape invalid

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFFile:
    """A parsed GGUF file: header, metadata, tensor infos and mapped tensor data."""

    path: Path
    version: int
    alignment: int
    kv: list[KV]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int
    header_end: int = 0     # where the tensor infos end (the data section starts after padding to alignment)
    problems: list[str] = field(default_factory=list)   # spec violations found (only non-empty with strict=False)
    _mm: mmap.mmap | None = field(default=None, repr=False)

    def get(self, key: str) -> KV | None:
        for kv in self.kv:
            if kv.key == key:
                return kv
        return None

    def value(self, key: str, default: Any = None) -> Any:
        kv = self.get(key)
        return default if kv is None else kv.value

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def tensor_data(self, name: "str | TensorInfo") -> np.ndarray:
        """The tensor's stored bytes as a read-only uint8 view of the mapped file (no copy)."""
        t = name if isinstance(name, TensorInfo) else self.tensor(name)
        if self._mm is None:
            raise GGUFFormatError(f"{self.path}: file is closed")
        if t.offset + t.nbytes > self.file_size:
            raise GGUFFormatError(f"{self.path}: data of tensor {t.name!r} lies beyond the end of the file")
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def release(self, t: "TensorInfo | None" = None) -> None:
        """Drop this process's mapped pages of tensor `t` (None: of the whole file) once its data has been copied
        out (madvise MADV_DONTNEED): the pages stay in the page cache and a later read faults them back in, but
        they stop counting as resident, so reading a whole model tensor by tensor keeps RSS at about one tensor."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, stop = (0, self.file_size) if t is None else (t.offset, min(t.offset + t.nbytes, self.file_size))
        start -= start % mmap.PAGESIZE  # madvise wants a page-aligned start; the page it shares is re-faulted if read
        if stop > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def region(self, start: int, stop: int) -> np.ndarray:
        """Bytes [start, stop) of the file, clipped to its end, as a read-only uint8 view."""
        if self._mm is None:
            raise GGUFFormatError(f"{self.path}: file is closed")
        start, stop = min(max(start, 0), self.file_size), min(max(stop, 0), self.file_size)
        return np.frombuffer(self._mm, dtype=np.uint8, count=max(stop - start, 0), offset=start)

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # views handed out by tensor_data() still alive: the GC unmaps later
                pass

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise GGUFFormatError(
                f"truncated or corrupt: {what} needs {n} bytes at offset {self.pos}, "
                f"but only {self.remaining} bytes remain in the file"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def string(self, what: str) -> bytes:
        n = self.unpack("<Q", f"length of {what}")
        if n > self.remaining:
            raise GGUFFormatError(
                f"{what} claims a length of {n} bytes at offset {self.pos - 8}, "
                f"but only {self.remaining} bytes remain in the file"
            )
        return self.raw(n, what)


def _value_type(v: int, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(v)
    except ValueError:
        raise GGUFFormatError(f"{what} has invalid GGUF value type {v}") from None


def _read_array(cur: _Cursor, key: str) -> tuple[Any, GGUFValueType]:
    sub = _value_type(cur.unpack("<I", f"array type of KV {key!r}"), f"array element type of KV {key!r}")
    if sub == GGUFValueType.ARRAY:
        raise GGUFFormatError(f"KV {key!r} is an array of arrays, which GGUF does not allow")
    n = cur.unpack("<Q", f"array length of KV {key!r}")
    min_elem = 8 if sub == GGUFValueType.STRING else NUMPY_DTYPE[sub].itemsize
    if n * min_elem > cur.remaining:
        raise GGUFFormatError(
            f"KV {key!r} claims {n} array elements ({sub.name}), but only {cur.remaining} bytes remain in the file"
        )
    if sub == GGUFValueType.STRING:
        return [decode_str(cur.string(f"element {i} of KV {key!r}")) for i in range(n)], sub
    dt = NUMPY_DTYPE[sub]
    arr = np.frombuffer(cur.raw(n * dt.itemsize, f"array of KV {key!r}"), dtype=dt)
    if sub == GGUFValueType.BOOL:
        arr = arr != 0
    return arr, sub


def _read_kv(cur: _Cursor, i: int) -> KV:
    key = decode_str(cur.string(f"key of KV pair {i}"))
    vt = _value_type(cur.unpack("<I", f"value type of KV {key!r}"), f"KV {key!r}")
    if vt == GGUFValueType.ARRAY:
        value, sub = _read_array(cur, key)
        return KV(key, value, vt, sub)
    if vt == GGUFValueType.STRING:
        return KV(key, decode_str(cur.string(f"value of KV {key!r}")), vt)
    v = cur.unpack(_SCALAR_FMT[vt], f"value of KV {key!r}")
    if vt == GGUFValueType.BOOL:
        v = v != 0
    return KV(key, v, vt)


def _alignment(kvs: list[KV], problems: list[str]) -> int:
    kv = next((k for k in kvs if k.key == ALIGNMENT_KEY), None)
    if kv is None:
        return GGUF_DEFAULT_ALIGNMENT
    if kv.vtype != GGUFValueType.UINT32:
        problems.append(f"{ALIGNMENT_KEY} must be of type UINT32 but is {kv.vtype.name}")
        return GGUF_DEFAULT_ALIGNMENT
    a = int(kv.value)
    if a == 0 or a & (a - 1):
        problems.append(f"{ALIGNMENT_KEY} = {a} is not a power of 2")
        return GGUF_DEFAULT_ALIGNMENT
    return a


def _read_tensor_info(cur: _Cursor, i: int, problems: list[str]) -> tuple[str, tuple[int, ...], int, int, int | None]:
    raw_name = cur.string(f"name of tensor {i}")
    name = decode_str(raw_name)
    if len(raw_name) >= GGML_MAX_NAME:
        problems.append(f"tensor {i} name {name!r} is {len(raw_name)} bytes long; ggml allows at most {GGML_MAX_NAME - 1}")
    n_dims = cur.unpack("<I", f"n_dims of tensor {name!r}")
    if n_dims > GGML_MAX_DIMS:
        raise GGUFFormatError(f"tensor {name!r} has {n_dims} dimensions; ggml allows at most {GGML_MAX_DIMS}")
    ne = [cur.unpack("<q", f"dimension {j} of tensor {name!r}") for j in range(n_dims)]
    type_id = cur.unpack("<i", f"type of tensor {name!r}")
    rel_offset = cur.unpack("<Q", f"data offset of tensor {name!r}")
    shape = tuple(reversed(ne))
    nbytes: int | None = None
    if any(d < 0 for d in ne):
        problems.append(f"tensor {name!r} has a negative dimension: shape {shape}")
    elif type_id not in GGML_TYPES:
        problems.append(f"tensor {name!r} has unknown ggml type id {type_id}")
    else:
        t = GGML_TYPES[type_id]
        n_el = 1
        for d in ne:
            n_el *= d
        if n_el >= 2**63:
            problems.append(f"tensor {name!r} shape {shape} has too many elements ({n_el})")
        elif (ne[0] if ne else 1) % t.block_size:
            problems.append(
                f"tensor {name!r} ({t.name}) has rows of {ne[0] if ne else 1} elements, "
                f"not a multiple of the block size {t.block_size}"
            )
        else:
            nbytes = t.nbytes(n_el)
    return name, shape, type_id, rel_offset, nbytes


def _check_layout(infos: list[tuple[str, tuple[int, ...], int, int, int | None]], data_offset: int,
                  file_size: int, alignment: int, problems: list[str]) -> None:
    expected: int | None = 0
    spans: list[tuple[int, int, str]] = []
    for name, _shape, _tid, rel, nbytes in infos:
        if rel % alignment:
            problems.append(f"tensor {name!r} data offset {rel} is not a multiple of the alignment {alignment}")
        if expected is not None and rel != expected:
            problems.append(
                f"tensor {name!r} data offset {rel} is not contiguous: expected {expected} "
                "(data must follow the tensor infos in order, padded to the alignment)"
            )
        if nbytes is None:
            expected = None
            continue
        if expected is not None:
            expected += gguf_pad(nbytes, alignment)
        end = data_offset + rel + nbytes
        if end > file_size:
            problems.append(
                f"tensor {name!r} data [{data_offset + rel}, {end}) lies beyond the end of the file ({file_size} bytes)"
            )
        if nbytes:
            spans.append((rel, rel + nbytes, name))
    spans.sort()
    for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            problems.append(f"tensors {n0!r} and {n1!r} overlap (data offsets {s0} and {s1})")


def _parse(buf: mmap.mmap, size: int) -> tuple[int, list[KV], list[TensorInfo], int, int, int, list[str]]:
    cur = _Cursor(buf, size)
    magic = cur.raw(4, "magic")
    if magic != GGUF_MAGIC:
        raise GGUFFormatError(f"not a GGUF file: magic is {magic!r}, expected b'GGUF'")
    version = cur.unpack("<I", "version")
    if version & 0xFFFF == 0 and version:
        raise GGUFFormatError(
            f"GGUF version 0x{version:08x} looks byte-swapped: big-endian GGUF files are not supported"
        )
    if version == 1:
        raise GGUFFormatError("GGUF v1 is no longer supported (llama.cpp refuses it too); convert it to v3 first")
    if version not in (2, 3):
        raise GGUFFormatError(f"unsupported GGUF version {version} (supported: 2 and 3)")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "KV count")
    if n_tensors >= 2**63 or n_kv >= 2**63 or n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TI_BYTES > cur.remaining:
        raise GGUFFormatError(
            f"header claims {n_tensors} tensors and {n_kv} KV pairs, which cannot fit in the "
            f"{cur.remaining} bytes that follow the header"
        )
    problems: list[str] = []
    kvs: list[KV] = []
    seen: set[str] = set()
    for i in range(n_kv):
        kv = _read_kv(cur, i)
        if not kv.key:
            problems.append(f"KV pair {i} has an empty key")
        elif kv.key in seen:
            problems.append(f"duplicate key {kv.key!r} (KV pair {i})")
        seen.add(kv.key)
        kvs.append(kv)
    alignment = _alignment(kvs, problems)

    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        info = _read_tensor_info(cur, i, problems)
        if info[0] in names:
            problems.append(f"duplicate tensor name {info[0]!r} (tensor {i})")
        names.add(info[0])
        infos.append(info)
    header_end = cur.pos
    data_offset = gguf_pad(cur.pos, alignment) if n_tensors else cur.pos
    if data_offset > size:
        problems.append(f"data section would start at offset {data_offset}, beyond the end of the file ({size} bytes)")
    _check_layout(infos, data_offset, size, alignment, problems)
    tensors = [
        TensorInfo(
            name, shape, GGML_TYPES[tid].name if tid in GGML_TYPES else f"UNKNOWN({tid})",
            tid, data_offset + rel, nbytes or 0,
        )
        for name, shape, tid, rel, nbytes in infos
    ]
    return version, kvs, tensors, alignment, data_offset, header_end, problems


def read_gguf(path: "str | os.PathLike[str]", *, strict: bool = True) -> GGUFFile:
    """Parse a GGUF v2/v3 file's header, metadata and tensor infos; tensor data stays on disk (mapped).

    strict=True raises GGUFFormatError listing every spec violation; strict=False returns them in
    `.problems` when the file is still parseable (used by verify). Unparseable files always raise.
    """
    p = Path(path)
    try:  # race-free: a FIFO cannot block the open, nothing but a regular file is read (core.regular_file)
        f = open_regular_file(p)
    except NotRegularFileError as e:
        raise GGUFFormatError(f"{p}: not a regular file ({e.kind}); refused") from None
    except OSError as e:
        raise GGUFFormatError(f"{p}: cannot open: {e.strerror or e}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < _HEADER_BYTES:
            head = f.read(4)
            if head != GGUF_MAGIC[:len(head)]:
                raise GGUFFormatError(f"{p}: not a GGUF file: magic is {head!r}, expected b'GGUF'")
            raise GGUFFormatError(f"{p}: truncated: {size} bytes is too small for a GGUF header ({_HEADER_BYTES} bytes)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        version, kvs, tensors, alignment, data_offset, header_end, problems = _parse(mm, size)
    except GGUFFormatError as e:
        mm.close()
        raise GGUFFormatError(f"{p}: {e}") from None
    except BaseException:
        mm.close()
        raise
    if strict and problems:
        mm.close()
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise GGUFFormatError(f"{p}: invalid GGUF: {shown}")
    return GGUFFile(p, version, alignment, kvs, tensors, data_offset, size, header_end, problems, mm)


__all__ = [
    "GGMLType", "GGML_TYPES", "ggml_type", "TensorInfo", "GGUFFile", "read_gguf", "NUMPY_DTYPE",
    "GGUF_DEFAULT_ALIGNMENT", "GGML_MAX_DIMS", "GGML_MAX_NAME", "ALIGNMENT_KEY", "decode_str", "encode_str",
    "gguf_pad", "file_kind",
]
