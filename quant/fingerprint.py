"""Weights fingerprint: one SHA-256 naming a model's weights whatever the container (HF safetensors / PyTorch folder,
F32/F16/BF16 GGUF written by quantgate convert or llama.cpp's convert_hf_to_gguf.py).

Definition (version "quantgate-weights-v1", docs/LINEAGE.md):
  1. Every tensor is brought to its HF name and HF layout: GGUF names are mapped back and llama's Q/K RoPE row
     permutation undone (quant.gguf_to_hf); HF names are kept. Non-weight entries are dropped: `*.rotary_emb.inv_freq`
     and, when the HF config ties the embeddings, `lm_head.weight` (GGUFs of tied models carry no output.weight).
     A multimodal checkpoint (Gemma3ForConditionalGeneration) is fingerprinted as the text model its GGUF holds:
     vision tower and projector dropped, `language_model.` removed from the names (quant.model_plan.text_model_name).
  2. Its values (as float32) are rounded to BF16 bits, round-to-nearest-even, NaN made quiet (what gguf-py and
     quantgate write for --outtype bf16), little-endian, C order: digest_i = SHA-256 of those bytes.
  3. The fingerprint is the SHA-256 of "quantgate-weights-v1\\n" followed by one line "name\\tshape\\tdigest_i\\n" per
     tensor, sorted by name, shape written as comma-separated dims (HF order).
BF16 is the coarsest of the three float containers, so the F32, F16 and BF16 GGUFs of one F16 (or F32 or BF16)
checkpoint round to the same bits, whatever order the files store the tensors in. What it does not cover: an F16
GGUF of a BF16 (or F32) checkpoint went through F16 first, and values F16 cannot hold (below 6.1e-5 in magnitude,
above 65504) round differently: that file gets another fingerprint (validation then checks its weights one by one).

Computed tensor by tensor (one float32 tensor in memory at a time) and cached by the files' (path, size, mtime).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from core.errors import CheckpointError
from core.hashing import cache_dir, load_json_cache, store_json_cache
from quant.gguf_reader import read_gguf
from quant.loaders import Checkpoint, SourceTensor, open_checkpoint

VERSION = "quantgate-weights-v1"
_CHUNK = 1 << 22  # elements rounded per step
_CACHE_NAME = "fingerprint_cache.json"


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values -> BF16 bit patterns (uint16), round-to-nearest-even, NaN kept NaN (quiet)."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    r = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    r = np.where(nan, (n >> 16) | 0x40, r)
    return r.astype("<u2")


def _bf16_fast(flat: np.ndarray) -> np.ndarray:
    """bf16_bits of a flat float32 chunk through the BF16 conversion kernel (ggml_compute_fp32_to_bf16: the same
    rounding and NaN rule, bit for bit; numba, on the kernels' threads): ~10 numpy passes become one."""
    from quant.kernels.floats import quantize_bf16  # lazy: numba loads with the kernels, at first use

    width = 4096
    rows = flat.size // width
    head = quantize_bf16(flat[:rows * width].reshape(rows, width)).reshape(-1) if rows else np.empty(0, np.uint8)
    if flat.size == rows * width:
        return head
    return np.concatenate([head, quantize_bf16(flat[rows * width:].reshape(1, -1)).reshape(-1)])


def tensor_digest(arr: np.ndarray) -> str:
    """SHA-256 of a tensor's BF16 bits (C order, little-endian), rounded in chunks."""
    flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    h = hashlib.sha256()
    for s in range(0, flat.size, _CHUNK):
        h.update(_bf16_fast(flat[s:s + _CHUNK]))
    return h.hexdigest()


def combine(entries: dict[str, tuple[tuple[int, ...], str]]) -> str:
    """The fingerprint of {HF name: (shape, tensor digest)} (step 3 of the definition)."""
    h = hashlib.sha256(f"{VERSION}\n".encode())
    for name in sorted(entries):
        shape, digest = entries[name]
        h.update(f"{name}\t{','.join(str(int(d)) for d in shape)}\t{digest}\n".encode("utf-8"))
    return h.hexdigest()


def _skip(name: str, tied: bool) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight")


def _gguf_entries(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    from quant.gguf_to_hf import hf_config_from_gguf, iter_hf_tensors  # lazy: only GGUF inputs need the name map

    with read_gguf(path) as g:
        cfg = hf_config_from_gguf(g)
        out = {}
        for name, arr in iter_hf_tensors(g, cfg):
            if not _skip(name, False):
                out[name] = (tuple(arr.shape), tensor_digest(arr))
            del arr
            g.release()  # this tensor's mapped pages: keeps RSS at one tensor, not the whole file
        return out


def _hf_fingerprint_names(ckpt: Checkpoint) -> dict[str, str]:
    """HF folder tensor name -> the text model's name the fingerprint hashes it under (multimodal prefixes dropped;
    tensors the fingerprint skips, e.g. a tied head, left out)."""
    from quant.model_plan import text_model_name  # lazy: the converter's tables load with the first HF folder

    cfg = ckpt.config or {}
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    tied = bool(cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False)))
    names = {}
    for t in ckpt.tensors:
        name = text_model_name(cfg, t.name)
        if name is not None and not _skip(name, tied):
            names[t.name] = name
    return names


def _hf_entries(ckpt: Checkpoint) -> dict[str, tuple[tuple[int, ...], str]]:
    names = _hf_fingerprint_names(ckpt)
    out = {}
    for t in ckpt.tensors:
        if t.name in names:
            out[names[t.name]] = (tuple(t.shape), tensor_digest(t.read()))
    return out


def _cache_key(files: list[Path]) -> str:
    parts = []
    for f in sorted(Path(p).resolve() for p in files):
        st = f.stat()
        parts.append([str(f), st.st_size, st.st_mtime_ns])
    # "+text-model": entries cached before multimodal checkpoints were fingerprinted as their text model are not reused
    return VERSION + "+text-model:" + json.dumps(parts, separators=(",", ":"))


def _store(path: Path, key: str, value: str) -> None:
    data = load_json_cache(path)  # re-read: another process may have added entries meanwhile
    data[key] = value
    store_json_cache(path, data)


def cached_fingerprint(files: "list[Path]") -> tuple[bool, str | None]:
    """(True, fingerprint or None) when the cache holds the fingerprint of the checkpoint made of `files`, else
    (False, None): nothing is read but the cache."""
    hit = load_json_cache(cache_dir() / _CACHE_NAME).get(_cache_key(files))
    if isinstance(hit, str) and (hit == "none" or len(hit) == 64):
        return True, None if hit == "none" else hit
    return False, None


class FingerprintTap:
    """The weights fingerprint of an opened checkpoint computed from the float32 tensors another pass reads anyway
    (the quantize loop): `add(source tensor, its float32 values)` for each tensor as it is read, `finish()` reads
    the few mapped tensors that pass did not (if any), combines and caches. Same definition and result as
    weights_fingerprint; only the read is shared. `open` returns None where the checkpoint cannot be tapped (a
    split GGUF, a GGUF whose names cannot be mapped back): use weights_fingerprint there."""

    def __init__(self, ckpt: Checkpoint, names: "dict[str, object]", hf_of) -> None:
        self._ckpt, self._names, self._hf_of = ckpt, names, hf_of
        self._by_name = {t.name: t for t in ckpt.tensors}
        self.entries: dict[str, tuple[tuple[int, ...], str]] = {}
        self._done: set[str] = set()

    @classmethod
    def open(cls, ckpt: Checkpoint) -> "FingerprintTap | None":
        """A tap for `ckpt` (GGUF: one file whose tensors map back to HF names; HF folders and state dicts)."""
        if ckpt.kind == "gguf":
            from quant.gguf_to_hf import hf_arrays_of, hf_config_from_gguf, hf_tensor_map  # lazy, as _gguf_entries

            if len(ckpt.files) != 1:
                return None
            try:
                with read_gguf(ckpt.files[0]) as g:
                    tmap = hf_tensor_map(g, hf_config_from_gguf(g))
            except CheckpointError:
                return None
            return cls(ckpt, dict(tmap.hf_name), lambda name, arr: hf_arrays_of(tmap, name, arr))
        names = _hf_fingerprint_names(ckpt)
        return cls(ckpt, names, lambda name, arr: [(names[name], arr)])

    def add(self, source: SourceTensor, arr: np.ndarray) -> None:
        """Digest `arr`, the float32 values `source` (one of the checkpoint's own tensors) read as, if it counts."""
        if source.name not in self._names or source.name in self._done or self._by_name.get(source.name) is not source:
            return
        for name, a in self._hf_of(source.name, np.asarray(arr, dtype=np.float32).reshape(source.shape)):
            if not _skip(name, False):
                self.entries[name] = (tuple(a.shape), tensor_digest(a))
        self._done.add(source.name)

    def finish(self) -> str:
        """The fingerprint (tensors not added are read here), stored in the cache as weights_fingerprint stores it."""
        for name in self._names:
            if name not in self._done:
                t = self._by_name[name]
                self.add(t, t.read())
        fp = combine(self.entries)
        _store(cache_dir() / _CACHE_NAME, _cache_key(self._ckpt.files), fp)
        return fp


#: The header's fingerprint value while a writer's loop computes it (a digest's length: the header keeps its size).
PLACEHOLDER = "0" * 64


def fingerprint_or_tap(ckpt: Checkpoint, source: "str | os.PathLike[str]", *, tap: bool = True
                       ) -> "tuple[str | None, FingerprintTap | None]":
    """(fingerprint, None) when it is cached, or when `tap` is False or the checkpoint cannot be tapped (computed
    here, in a pass of its own); else (None, a FingerprintTap) for the caller's read loop to fill and finish()."""
    cached, fp = cached_fingerprint(ckpt.files)
    t = None if cached or not tap else FingerprintTap.open(ckpt)
    if not cached and t is None:
        fp = weights_fingerprint(source)
    return fp, t


def weights_fingerprint(path: "str | os.PathLike[str]") -> str | None:
    """The weights fingerprint of a checkpoint (HF folder, .safetensors, .bin, GGUF), or None for a GGUF whose
    architecture or tensors cannot be mapped back to HF names (quant.gguf_to_hf: llama and qwen2 families)."""
    p = Path(path)
    with warnings.catch_warnings():  # a quantized GGUF is fingerprinted as dequantized, not requantized: no warning
        warnings.simplefilter("ignore")
        ckpt = open_checkpoint(p, allow_requantize=True)
    with ckpt:
        key = _cache_key(ckpt.files)
        cache_file = cache_dir() / _CACHE_NAME
        hit = load_json_cache(cache_file).get(key)
        if isinstance(hit, str) and (hit == "none" or len(hit) == 64):
            return None if hit == "none" else hit
        if ckpt.kind == "gguf" and len(ckpt.files) > 1:
            fp: str | None = None  # a split GGUF: gguf_to_hf maps single files only (none rather than a partial one)
        elif ckpt.kind == "gguf":
            try:
                fp = combine(_gguf_entries(ckpt.files[0]))
            except CheckpointError:
                fp = None
        else:
            fp = combine(_hf_entries(ckpt))
    _store(cache_file, key, fp or "none")
    return fp


__all__ = ["VERSION", "bf16_bits", "tensor_digest", "combine", "weights_fingerprint", "cached_fingerprint",
           "FingerprintTap", "PLACEHOLDER", "fingerprint_or_tap"]
