"""Open Hugging Face safetensors checkpoints (one file, a folder, or a sharded folder) without loading tensor data."""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from core.errors import CheckpointError
from quant.loaders.base import Checkpoint, SourceTensor, open_regular, to_float32

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: Largest safetensors JSON header read (bytes). The format allows 100 MB, but Python's json needs ~25x the text
#: in memory for a header of tiny entries (60 MB took 1.5 GB); real headers are ~120 bytes a tensor (a 70B shard:
#: under 100 KB), so 16 MiB (~130k tensors in one file) leaves ample room and bounds the parse to a few hundred MB.
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: Largest config.json / sharded index read (bytes).
MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_INDEX_BYTES = 16 * 1024 * 1024
_DTYPES: dict[str, tuple[str, int]] = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}


def _reader(path: Path, offset: int, count: int, dtype: str):
    def read() -> np.ndarray:
        with open_regular(path) as f:
            f.seek(offset)
            raw = np.fromfile(f, dtype=_DTYPES[dtype][0], count=count)
        if raw.size != count:
            raise CheckpointError(f"{path}: truncated tensor data (expected {count} values, read {raw.size})")
        return raw if dtype == "F32" else to_float32(raw, dtype)
    return read


def read_safetensors_header(path: Path) -> list[SourceTensor]:
    """Parse one .safetensors file's header into lazily-read tensors (sorted by name, as safetensors lists them);
    a truncated/corrupt header, out-of-range offsets or an unsupported dtype raise CheckpointError."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:  # checked before a single header byte is read
                raise CheckpointError(
                    f"{path}: safetensors header of {n} bytes is larger than the {MAX_HEADER_BYTES} allowed; refused")
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header (length {n}, file {size} bytes)")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file: {e.strerror or e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    data_len = size - data_start
    out: list[SourceTensor] = []
    spans: list[tuple[int, int, str]] = []
    for name in sorted(k for k in header if k != "__metadata__"):
        meta = header[name]
        try:
            dtype = meta["dtype"]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: a dimension like 1e400 (inf)
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype}; only F32, F16 and BF16 sources are supported")
        count = math.prod(shape)  # exact: np.prod overflows (10**30) or wraps ([2**32, 2**32] -> 0)
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_len or end - begin != count * _DTYPES[dtype][1]:
            raise CheckpointError(
                f"{path}: tensor {name!r} data range [{begin}, {end}) does not fit its shape {list(shape)} "
                f"and dtype {dtype} or lies outside the file (corrupt or truncated file)")
        spans.append((begin, end, name))
        out.append(SourceTensor(name, shape, dtype, _reader(path, data_start + begin, count, dtype)))
    check_disjoint_ranges(path, spans)
    return out


def check_disjoint_ranges(path: Path, spans: "list[tuple[int, int, str]]") -> None:
    """Refuse two tensors whose data ranges [begin, end) overlap (the safetensors format forbids it; one tensor's
    bytes would silently double as another's). Empty tensors occupy no bytes and never overlap."""
    prev_end, prev_name = 0, ""
    for begin, end, name in sorted((s for s in spans if s[1] > s[0]), key=lambda s: (s[0], s[1])):
        if begin < prev_end:
            raise CheckpointError(f"{path}: tensors {prev_name!r} and {name!r} have overlapping data ranges "
                                  f"(corrupt or crafted file)")
        if end > prev_end:
            prev_end, prev_name = end, name


def load_config(folder: Path) -> dict | None:
    """The folder's config.json as a dict, or None when there is none; unparsable JSON raises CheckpointError."""
    cfg = folder / "config.json"
    if not cfg.exists():
        return None
    try:
        with open_regular(cfg, "config.json") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{cfg}: config.json is larger than {MAX_CONFIG_BYTES} bytes; refused")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg}: cannot parse config.json: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg}: config.json is not a JSON object")
    return data


def shards_from_index(index: Path) -> tuple[list[Path], set[str]]:
    """Validate a sharded-checkpoint index (`weight_map`): every shard must exist inside the index's folder
    (absolute paths and `..` escapes are refused). Returns the shards in name order and the indexed tensor names."""
    folder = index.parent
    try:
        with open_regular(index, "index") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
        if len(raw) > MAX_INDEX_BYTES:
            raise CheckpointError(f"{index}: index is larger than {MAX_INDEX_BYTES} bytes; refused")
        data = json.loads(raw.decode("utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index}: corrupt index (needs a non-empty 'weight_map' object)") from None
    root = Path(os.path.abspath(folder))
    shards: dict[str, Path] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or os.path.isabs(shard) or "\\" in shard:
            raise CheckpointError(f"{index}: tensor {tensor!r} points to an invalid shard name {shard!r}")
        # the shard's *name* must stay inside the folder (no `..`); the entry itself may be a symlink, as every
        # file of a Hugging Face cache snapshot is (snapshots/<commit>/x -> ../../blobs/<hash>)
        p = Path(os.path.normpath(root / shard))
        if root not in p.parents:
            raise CheckpointError(f"{index}: shard {shard!r} lies outside the checkpoint folder; refused")
        if not p.is_file():
            raise CheckpointError(f"{index}: shard {shard!r} is missing")
        shards[shard] = p
    return [shards[k] for k in sorted(shards)], set(weight_map)


def collect_sharded(
    path: "str | os.PathLike[str]", single_name: str, index_name: str,
    read_tensors: "Callable[[Path], Iterable[SourceTensor]]",
) -> tuple[Path, list[Path], list[SourceTensor]]:
    """Resolve a checkpoint file, or a folder with `single_name` or a sharded `index_name`, into its files and
    their tensors (via `read_tensors(file)`); refuses a tensor in two shards and an index that disagrees with
    its shards. Returns (folder holding config.json, files, tensors)."""
    p = Path(path)
    if p.is_file():
        files, folder, expected = [p], p.parent, None
    elif (p / index_name).is_file():
        folder = p
        files, expected = shards_from_index(p / index_name)
    elif (p / single_name).is_file():
        files, folder, expected = [p / single_name], p, None
    else:
        raise CheckpointError(f"{p}: no {single_name} or {index_name} in this folder")
    tensors: list[SourceTensor] = []
    seen: dict[str, Path] = {}
    for f in files:
        for t in read_tensors(f):
            if t.name in seen:
                raise CheckpointError(f"tensor {t.name!r} appears in both {seen[t.name].name} and {f.name}")
            seen[t.name] = f
            tensors.append(t)
    if expected is not None and expected != set(seen):
        missing = sorted(expected - set(seen))[:5]
        extra = sorted(set(seen) - expected)[:5]
        raise CheckpointError(
            f"{p}: index and shards disagree (missing from shards: {missing}, not in index: {extra})")
    return folder, files, tensors


def open_safetensors_checkpoint(path: "str | os.PathLike[str]") -> Checkpoint:
    """Open a .safetensors file, or an HF folder with model.safetensors or a sharded index, lazily (no tensor data
    is read); config.json (if present) becomes Checkpoint.config. Shards are read in name order."""
    folder, files, tensors = collect_sharded(path, SINGLE_NAME, INDEX_NAME, read_safetensors_header)
    config = load_config(folder)  # a lone .safetensors file uses the config.json beside it, if any
    return Checkpoint(path=Path(path), kind="safetensors", files=files, tensors=tensors, config=config)
