"""llama.cpp importance matrices: read and write the GGUF imatrix format and the legacy `.dat` format.

Ported from the pinned llama.cpp: tools/imatrix/imatrix.cpp (save_imatrix, save_imatrix_legacy, load_imatrix),
common/imatrix-loader.cpp (common_imatrix_load) and tools/quantize/quantize.cpp (load_imatrix), see docs/IMATRIX.md.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.gguf_writer import GGUFWriter, WriterState

from core.atomic import atomic_write
from core.errors import CheckpointError, GGUFFormatError, QuantGateError

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"
GGML_MAX_NAME = 64  # ggml tensor names hold at most 63 bytes + NUL (ggml_format_name truncates silently)
GGML_MAX_DIMS = 4
GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
GGUF_MAX_STRING_LENGTH = 1024 * 1024 * 1024
GGUF_MAX_ARRAY_ELEMENTS = 1024 * 1024 * 1024
MAX_EXACT_F32_INT = 1 << 24  # counts are stored as float32; larger integers would not survive a round trip
INT32_MAX = (1 << 31) - 1
UINT32_MAX = (1 << 32) - 1


@dataclass
class ImatrixEntry:
    """Per-tensor statistics: `sums` (n_expert*ne0) squared-activation sums, `counts` (n_expert) token counts.

    For data read from a legacy `.dat` file, `sums` holds the stored (sum/count)*ncall values and counts == [ncall].
    """

    sums: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        self.sums = np.ascontiguousarray(self.sums, dtype=np.float32).reshape(-1)
        self.counts = np.ascontiguousarray(self.counts, dtype=np.float32).reshape(-1)


@dataclass
class Imatrix:
    """An importance matrix keyed by GGUF tensor name ("blk.0.attn_q.weight"), with its imatrix.* metadata."""

    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False  # True when entries hold legacy `.dat` data (values = sums / ncall)

    def values(self, name: str) -> np.ndarray | None:
        """Per-column importance handed to the quantizer, exactly as llama-quantize's load_imatrix derives it."""
        e = self.entries.get(name)
        if e is None:
            return None
        if self.is_legacy:
            ncall = _lround(e.counts[:1])[0] if e.counts.size else 0
            if ncall > 0:
                return (e.sums / np.float32(ncall)).astype(np.float32)
            return e.sums.copy()
        n_counts = e.counts.size
        if n_counts == 0 or e.sums.size % n_counts:
            raise QuantGateError(f"imatrix entry {name!r}: {e.sums.size} sums do not split over {n_counts} counts")
        counts = _lround(e.counts).astype(np.float32)  # (float) llround(count), as in C
        sums = e.sums.reshape(n_counts, -1)
        out = np.ones_like(sums)
        pos = counts > 0
        out[pos] = sums[pos] / counts[pos][:, None]
        return out.reshape(-1)


def _lround(x: np.ndarray) -> np.ndarray:
    """C's lround for the non-negative values we accept (round half away from zero)."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)


def _check(imatrix: Imatrix, err: type[QuantGateError], gguf: bool) -> None:
    """Reject what llama.cpp could not round-trip: empty/odd shapes, non-finite or negative data, long names."""
    suffix = len(SUFFIX_SUMS) if gguf else 0
    if not imatrix.entries:
        raise err("imatrix has no entries")
    for name, e in imatrix.entries.items():
        if not isinstance(name, str) or not name:
            raise err(f"imatrix entry name {name!r} is empty or not a string")
        nbytes = len(name.encode("utf-8"))
        if nbytes + suffix >= GGML_MAX_NAME:
            raise err(f"imatrix entry name {name!r} is too long ({nbytes} bytes; at most {GGML_MAX_NAME - 1 - suffix}"
                      + (f" so that '{name}{SUFFIX_SUMS}' fits a ggml tensor name)" if gguf else ")"))
        if "\0" in name:
            raise err(f"imatrix entry name {name!r} contains a NUL byte")
        if e.counts.size == 0 or e.sums.size == 0 or e.sums.size % e.counts.size:
            raise err(f"imatrix entry {name!r}: {e.sums.size} sums do not split over {e.counts.size} counts")
        if imatrix.is_legacy and e.counts.size != 1:
            raise err(f"legacy imatrix entry {name!r} must have exactly one count (ncall), got {e.counts.size}")
        for what, arr in (("sums", e.sums), ("counts", e.counts)):
            if not np.all(np.isfinite(arr)):
                raise err(f"imatrix entry {name!r} has non-finite {what}")
            if np.any(arr < 0):
                raise err(f"imatrix entry {name!r} has negative {what}")
        if np.any(e.counts >= MAX_EXACT_F32_INT):
            raise err(f"imatrix entry {name!r} has a count >= 2^24 that float32 cannot hold exactly")
    for ds in imatrix.datasets:
        if not isinstance(ds, str):
            raise err(f"imatrix dataset {ds!r} is not a string")
    for what, v in (("chunk_count", imatrix.chunk_count), ("chunk_size", imatrix.chunk_size)):
        if not 0 <= int(v) <= (UINT32_MAX if gguf else INT32_MAX):
            raise err(f"imatrix {what} {v} is out of range")


def _sorted_names(imatrix: Imatrix) -> list[str]:
    """std::sort order of std::string: bytewise."""
    return sorted(imatrix.entries, key=lambda s: s.encode("utf-8"))


# ----------------------------------------------------------------------------------------------------- writing


class _ImatrixWriter(GGUFWriter):
    """GGUFWriter that also writes empty string arrays (with their STRING sub-type), as gguf_set_arr_str does."""

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool,
                  sub_type: GGUFValueType | None = None) -> bytes:
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def save_imatrix_gguf(imatrix: Imatrix, path: str | os.PathLike[str]) -> None:
    """Write `imatrix` as llama-imatrix's save_imatrix does (same keys, tensor names, shapes, types, order), atomically."""
    if imatrix.is_legacy:
        raise GGUFFormatError("legacy imatrix data holds no raw sums/counts: convert it with legacy_to_raw(imatrix, "
                              "chunk_size) first, as llama-imatrix --in-file does")
    _check(imatrix, GGUFFormatError, gguf=True)
    w = _ImatrixWriter(None, arch="")
    w.kv_data[0].clear()  # GGUFWriter always adds general.architecture; the C writer does not
    w.add_key_value("general.type", "imatrix", GGUFValueType.STRING)
    w.add_key_value(KEY_DATASETS, list(imatrix.datasets), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    w.add_key_value(KEY_CHUNK_COUNT, int(imatrix.chunk_count), GGUFValueType.UINT32)
    w.add_key_value(KEY_CHUNK_SIZE, int(imatrix.chunk_size), GGUFValueType.UINT32)
    for name in _sorted_names(imatrix):
        e = imatrix.entries[name]
        nmat = e.counts.size
        # ggml_new_tensor_2d(ne0 = nval/nmat, ne1 = nmat); gguf writes ggml_n_dims() dims, so nmat == 1 is 1-D
        sums_shape = (e.sums.size,) if nmat == 1 else (nmat, e.sums.size // nmat)
        w.add_tensor(name + SUFFIX_SUMS, e.sums.reshape(sums_shape))
        w.add_tensor(name + SUFFIX_COUNTS, e.counts.reshape(nmat) if nmat == 1 else e.counts.reshape(nmat, 1))
    with atomic_write(path) as fh:
        w.fout = [fh]  # gguf-py writes to a path only; hand it our temp file
        w.state = WriterState.EMPTY
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.flush()


def save_imatrix_legacy(imatrix: Imatrix, path: str | os.PathLike[str]) -> None:
    """Write the legacy `.dat` bytes of llama-imatrix's save_imatrix_legacy (entries, then last_call and dataset)."""
    _check(imatrix, CheckpointError, gguf=False)
    out = bytearray()
    stored: list[tuple[str, int, np.ndarray]] = []
    for name in _sorted_names(imatrix):
        e = imatrix.entries[name]
        if imatrix.is_legacy:  # already (sum/count)*ncall: write back unchanged
            stored.append((name, int(_lround(e.counts)[0]), e.sums))
            continue
        counts = _lround(e.counts)
        if np.all(counts == 0):
            continue  # "has no data - skipping"
        if imatrix.chunk_size <= 0:
            raise CheckpointError("imatrix chunk_size must be > 0 to write the legacy format")
        ncall = (int(counts.max()) + imatrix.chunk_size - 1) // imatrix.chunk_size
        cnt = np.repeat(counts.astype(np.float32), e.sums.size // counts.size)
        val = e.sums.copy()
        zero = cnt == 0
        val[zero] = 1.0
        cnt[zero] = 1.0
        stored.append((name, ncall, ((val / cnt) * np.float32(ncall)).astype("<f4")))
    out += struct.pack("<i", len(stored))
    for name, ncall, vals in stored:
        raw = name.encode("utf-8")
        out += struct.pack("<i", len(raw)) + raw
        out += struct.pack("<ii", ncall, vals.size)
        out += vals.astype("<f4").tobytes()
    out += struct.pack("<i", int(imatrix.chunk_count))
    dataset = imatrix.datasets[-1].encode("utf-8") if imatrix.datasets else b""
    out += struct.pack("<i", len(dataset)) + dataset
    with atomic_write(path) as fh:
        fh.write(out)


def legacy_to_raw(imatrix: Imatrix, chunk_size: int) -> Imatrix:
    """Raw sums/counts from legacy data, as llama-imatrix's load_imatrix rebuilds them (x chunk_size)."""
    if not imatrix.is_legacy:
        return imatrix
    if chunk_size <= 0:
        raise CheckpointError("chunk_size must be > 0")
    entries = {}
    for name, e in imatrix.entries.items():
        ncall = int(_lround(e.counts[:1])[0])
        entries[name] = ImatrixEntry(e.sums * np.float32(chunk_size), np.array([ncall * chunk_size], np.float32))
    max_count = max(int(_lround(e.counts).max()) for e in entries.values())
    return Imatrix(entries, list(imatrix.datasets), max_count // chunk_size, chunk_size, is_legacy=False)


# ----------------------------------------------------------------------------------------------------- reading


class _Cursor:
    """Bounds-checked little-endian reads over a mapped file; every length is checked before use."""

    def __init__(self, buf: mmap.mmap | bytes, err: type[QuantGateError], what: str) -> None:
        self.buf, self.pos, self.err, self.what = buf, 0, err, what

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, ctx: str) -> bytes:
        if n < 0 or n > self.remaining:
            raise self.err(f"{self.what}: truncated or corrupt while reading {ctx} "
                           f"(need {n} bytes at offset {self.pos}, {self.remaining} left)")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(b)

    def unpack(self, fmt: str, ctx: str) -> Any:
        vals = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), ctx))
        return vals[0] if len(vals) == 1 else vals


_SCALARS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}


def _gguf_str(c: _Cursor, ctx: str) -> str:
    n = c.unpack("Q", f"{ctx} length")
    if n > GGUF_MAX_STRING_LENGTH:
        raise GGUFFormatError(f"{c.what}: {ctx} length {n} exceeds the GGUF maximum")
    raw = c.take(n, ctx)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GGUFFormatError(f"{c.what}: {ctx} is not valid UTF-8") from exc


def _gguf_value(c: _Cursor, vtype: int, key: str) -> tuple[GGUFValueType, GGUFValueType | None, Any]:
    is_array = vtype == GGUFValueType.ARRAY
    n = 1
    if is_array:
        vtype = c.unpack("I", f"array type of {key!r}")
        n = c.unpack("Q", f"array length of {key!r}")
        if n > GGUF_MAX_ARRAY_ELEMENTS:
            raise GGUFFormatError(f"{c.what}: array {key!r} has {n} elements, more than the GGUF maximum")
    try:
        t = GGUFValueType(vtype)
    except ValueError:
        raise GGUFFormatError(f"{c.what}: key {key!r} has invalid GGUF type {vtype}") from None
    if t == GGUFValueType.ARRAY:
        raise GGUFFormatError(f"{c.what}: key {key!r} is a nested array")
    if t == GGUFValueType.STRING:
        if n * 8 > c.remaining:
            raise GGUFFormatError(f"{c.what}: array {key!r} claims {n} strings, more than the file holds")
        vals = [_gguf_str(c, f"value of {key!r}") for _ in range(n)]
    else:
        fmt = _SCALARS[t]
        size = struct.calcsize("<" + fmt)
        raw = c.take(n * size, f"value of {key!r}")
        vals = list(struct.unpack(f"<{n}{fmt}", raw))
    if is_array:
        return GGUFValueType.ARRAY, t, vals
    return t, None, vals[0]


@dataclass
class _TensorInfo:
    name: str
    ne: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


def _read_gguf(buf: mmap.mmap | bytes, what: str) -> Imatrix:
    """Parse with the checks of gguf_init_from_file, then pair tensors as common_imatrix_load does."""
    c = _Cursor(buf, GGUFFormatError, what)
    c.take(4, "magic")
    version = c.unpack("I", "version")
    if version & 0xFFFF == 0:
        raise GGUFFormatError(f"{what}: GGUF version {version:#x} looks byte-swapped (big-endian file?)")
    if version == 1 or version > 3:
        raise GGUFFormatError(f"{what}: unsupported GGUF version {version} (need 2 or 3)")
    n_tensors, n_kv = c.unpack("qq", "header counts")
    if n_tensors < 0 or n_kv < 0:
        raise GGUFFormatError(f"{what}: negative tensor ({n_tensors}) or key ({n_kv}) count")
    kv: dict[str, tuple[GGUFValueType, GGUFValueType | None, Any]] = {}
    for i in range(n_kv):
        key = _gguf_str(c, f"key {i}")
        if not key:
            raise GGUFFormatError(f"{what}: key {i} is empty")
        if key in kv:
            raise GGUFFormatError(f"{what}: duplicate key {key!r}")
        kv[key] = _gguf_value(c, c.unpack("I", f"type of {key!r}"), key)
    alignment = GGUF_DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        t, _, alignment = kv["general.alignment"]
        if t != GGUFValueType.UINT32:
            raise GGUFFormatError(f"{what}: general.alignment must be UINT32, is {t.name}")
    if alignment == 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"{what}: alignment {alignment} is not a power of 2")
    infos: list[_TensorInfo] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = _gguf_str(c, f"tensor name {i}")
        if len(name.encode("utf-8")) >= GGML_MAX_NAME:
            raise GGUFFormatError(f"{what}: tensor name {name!r} is too long")
        if name in seen:
            raise GGUFFormatError(f"{what}: duplicate tensor name {name!r}")
        seen.add(name)
        n_dims = c.unpack("I", f"n_dims of {name!r}")
        if n_dims > GGML_MAX_DIMS:
            raise GGUFFormatError(f"{what}: tensor {name!r} has {n_dims} dimensions")
        ne = tuple(c.unpack("q", f"shape of {name!r}") for _ in range(n_dims))
        if any(d < 0 for d in ne):
            raise GGUFFormatError(f"{what}: tensor {name!r} has a negative dimension {ne}")
        gtype = c.unpack("i", f"type of {name!r}")
        try:
            block, tsize = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"{what}: tensor {name!r} has invalid ggml type {gtype}") from None
        nel = int(np.prod(ne, dtype=object)) if ne else 1
        if ne and ne[0] % block:
            raise GGUFFormatError(f"{what}: tensor {name!r} row of {ne[0]} is not a multiple of block {block}")
        infos.append(_TensorInfo(name, ne, gtype, c.unpack("Q", f"offset of {name!r}"), nel // block * tsize))
    data_start = c.pos + (-c.pos % alignment) if n_tensors else c.pos
    expected = 0
    for ti in infos:
        if ti.offset != expected:
            raise GGUFFormatError(f"{what}: tensor {ti.name!r} has offset {ti.offset}, expected {expected}")
        expected += ti.nbytes + (-ti.nbytes % alignment)
    if data_start + expected > len(buf):
        raise GGUFFormatError(f"{what}: truncated: data section needs {data_start + expected} bytes, "
                              f"file has {len(buf)}")
    if not infos:
        raise GGUFFormatError(f"{what}: no imatrix data (no tensors)")

    for key in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
        if key not in kv:
            raise GGUFFormatError(f"{what}: missing imatrix metadata {key!r} (llama-quantize refuses such files)")
    datasets: list[str] = []
    t, sub, val = kv[KEY_DATASETS]
    if t == GGUFValueType.ARRAY and sub == GGUFValueType.STRING:
        datasets = list(val)
    meta = {}
    for key in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
        t, _, val = kv[key]
        if t != GGUFValueType.UINT32:
            raise GGUFFormatError(f"{what}: {key} must be UINT32, is {t.name}")
        meta[key] = val

    pairs: dict[str, list[_TensorInfo | None]] = {}
    for ti in infos:
        for slot, suffix in enumerate((SUFFIX_SUMS, SUFFIX_COUNTS)):
            if ti.name.endswith(suffix) and len(ti.name) > len(suffix):
                pairs.setdefault(ti.name[:-len(suffix)], [None, None])[slot] = ti
                break
    entries: dict[str, ImatrixEntry] = {}
    for name, (sums_ti, counts_ti) in pairs.items():
        if sums_ti is None or counts_ti is None:
            raise GGUFFormatError(f"{what}: mismatched sums and counts for {name!r}")
        if sums_ti.ggml_type != GGMLQuantizationType.F32 or counts_ti.ggml_type != GGMLQuantizationType.F32:
            raise GGUFFormatError(f"{what}: sums and counts for {name!r} must be F32")
        arrays = [np.frombuffer(buf[data_start + ti.offset:data_start + ti.offset + ti.nbytes], dtype="<f4")
                  .astype(np.float32) for ti in (sums_ti, counts_ti)]
        entries[name] = ImatrixEntry(arrays[0], arrays[1])
    imatrix = Imatrix(entries, datasets, meta[KEY_CHUNK_COUNT], meta[KEY_CHUNK_SIZE], is_legacy=False)
    _check(imatrix, GGUFFormatError, gguf=True)
    return imatrix


def _read_legacy(buf: mmap.mmap | bytes, what: str) -> Imatrix:
    """Parse the legacy `.dat` layout as common_imatrix_load_legacy does, with every length bounds-checked."""
    c = _Cursor(buf, CheckpointError, what)
    n_entries = c.unpack("i", "entry count")
    if n_entries < 1:
        raise CheckpointError(f"{what}: no data in legacy imatrix file (entry count {n_entries})")
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n_entries):
        n = c.unpack("i", f"name length of entry {i + 1}")
        if n < 0 or n >= GGML_MAX_NAME:
            raise CheckpointError(f"{what}: entry {i + 1} has an invalid name length {n}")
        raw = c.take(n, f"name of entry {i + 1}").split(b"\0", 1)[0]  # std::string{char*} stops at NUL
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{what}: name of entry {i + 1} is not valid UTF-8") from exc
        ncall, nval = c.unpack("ii", f"ncall/nval of {name!r}")
        if nval < 1:
            raise CheckpointError(f"{what}: entry {name!r} has {nval} values")
        if ncall < 0:
            raise CheckpointError(f"{what}: entry {name!r} has a negative call count {ncall}")
        sums = np.frombuffer(c.take(4 * nval, f"values of {name!r}"), dtype="<f4").astype(np.float32)
        entries[name] = ImatrixEntry(sums, np.array([ncall], dtype=np.float32))  # a repeated name: last one wins
    chunk_count, datasets = 0, []
    if c.remaining:  # the trailer (last_call + dataset name) is optional, but not half-written
        chunk_count = c.unpack("i", "chunk count trailer")
        if c.remaining:
            n = c.unpack("i", "dataset name length")
            if n > 0:
                raw = c.take(n, "dataset name").split(b"\0", 1)[0]
                try:
                    datasets.append(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise CheckpointError(f"{what}: dataset name is not valid UTF-8") from exc
    imatrix = Imatrix(entries, datasets, chunk_count, 0, is_legacy=True)
    _check(imatrix, CheckpointError, gguf=False)
    return imatrix


def load_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read a GGUF or legacy `.dat` imatrix (detected by the GGUF magic) with strict, allocation-safe checks."""
    what = str(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise CheckpointError(f"{what}: empty imatrix file")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                if mm[:4] == GGUF_MAGIC:
                    return _read_gguf(mm, what)
                return _read_legacy(mm, what)
    except OSError as exc:
        raise CheckpointError(f"{what}: cannot read imatrix file: {exc}") from exc
