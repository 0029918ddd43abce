"""On-disk cache of the baseline's log-probabilities in llama-perplexity's compact form, so scoring a candidate needs
only the candidate in memory and the baseline runs once per (model, dataset, settings, tool version).

Per scored position the entry keeps one fixed-size record (`record_dtype(n_vocab)`, little-endian):

  scale      float32  quantization step: (max log-prob - min_lp) / 65535
  min_lp     float32  max(min log-prob, max log-prob - 16): the clamp (llama.cpp's min_log_prob)
  lp_target  float32  log-probability of the true next token (exact PPL, accuracy, delta-p)
  top1       int32    the baseline's most probable token (exact top-1 agreement)
  q[n_vocab] uint16   round((log p - min_lp) / scale), 0 for entries at or below the clamp

i.e. llama-perplexity's --kl-divergence-base record (tools/perplexity/perplexity.cpp: two floats then n_vocab uint16
log-probs quantized between max-16 nats and the max) plus the target's log-prob and the argmax: 2*n_vocab + 16 bytes
a token, half of float32. The candidate is put on the same grid before comparing (docs/EVALUATION.md gives why, and
the error measured against the exact float64 path).

An entry is two files under <cache_dir>/baseline/: `<key>.lp16` (the records, row-major) and `<key>.json` (its
manifest: key fields, n_vocab, per-sample row offsets). Both are written atomically, the manifest last: an entry
without a manifest is never read.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from core.atomic import atomic_write, atomic_write_text
from core.hashing import cache_dir

logger = logging.getLogger(__name__)
CACHE_FORMAT = "quantgate-baseline-lp16-v2"
#: llama.cpp's clamp: log-probs more than this many nats below the max are stored as the clamp.
CLAMP_NATS = 16.0
#: Documented bound on the relative error of kl_mean from the stored records vs the exact float64 full-vocabulary KL,
#: measured on the reference model (docs/EVALUATION.md), asserted live in tests/validation/test_baseline_cache.py.
KLD_REL_ERROR_BOUND = 1e-3


def record_dtype(n_vocab: int) -> np.dtype:
    """The structured little-endian dtype of one cached position for a vocabulary of `n_vocab`."""
    return np.dtype([("scale", "<f4"), ("min_lp", "<f4"), ("lp_target", "<f4"), ("top1", "<i4"),
                     ("q", "<u2", (n_vocab,))])


def compress(log_probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Records (n,) of record_dtype(n_vocab) from (n, n_vocab) normalized float64 log-probs and the n true next
    tokens, quantized as llama-perplexity does (nearest step between the clamp and the max)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    n, n_vocab = lp.shape
    out = np.zeros(n, dtype=record_dtype(n_vocab))
    if n == 0:
        return out
    hi = lp.max(axis=-1)
    lo = np.maximum(lp.min(axis=-1), hi - CLAMP_NATS).astype(np.float32)
    scale = ((hi - lo) / 65535.0).astype(np.float32)
    out["scale"], out["min_lp"] = scale, lo
    out["lp_target"] = lp[np.arange(n), t]
    out["top1"] = lp.argmax(axis=-1)
    out["q"] = _on_grid(lp, out)
    return out


def _on_grid(lp: np.ndarray, records: np.ndarray) -> np.ndarray:
    """Grid indices (float64, 0..65535) of log-probs `lp` on each record's grid; at or below the clamp -> 0."""
    lo = records["min_lp"].astype(np.float64)[:, None]
    sc = records["scale"].astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(sc > 0, np.rint((lp - lo) / np.where(sc > 0, sc, 1.0)), 0.0)
    return np.clip(q, 0, 65535)


def decode(records: np.ndarray) -> np.ndarray:
    """(n, n_vocab) float64 log-probs of records, renormalized so each row sums to 1."""
    lp = records["min_lp"].astype(np.float64)[:, None] + records["scale"].astype(np.float64)[:, None] * records["q"]
    return _log_normalize(lp)


def _log_normalize(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def score_against(records: np.ndarray, cand_log_probs: np.ndarray, targets: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-token values of a candidate against cached baseline records: (baseline log-prob of the target, candidate
    log-prob of the target, baseline top-1, candidate top-1, KL(base || cand)).

    KL compares the decoded baseline with the candidate put on the same grid (same clamp, same step; its values
    above the baseline's max are kept unclipped), both renormalized: a candidate identical to the baseline scores
    exactly KL 0, ratio 1. Targets and top-1 come from full precision (float32 targets on both sides)."""
    lc = np.asarray(cand_log_probs, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    rows = np.arange(t.size)
    lo = records["min_lp"].astype(np.float64)[:, None]
    sc = records["scale"].astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        qc = np.where(sc > 0, np.maximum(np.rint((lc - lo) / np.where(sc > 0, sc, 1.0)), 0.0), 0.0)
    lb_n = decode(records)
    lc_n = _log_normalize(lo + sc * qc)
    pb = np.exp(lb_n)
    kl = (pb * (lb_n - lc_n)).sum(axis=-1)
    lp_target_c = lc[rows, t].astype(np.float32).astype(np.float64)
    return (records["lp_target"].astype(np.float64), lp_target_c, records["top1"].astype(np.int64),
            lc.argmax(axis=-1), kl)


@dataclass(frozen=True)
class CacheKey:
    """What the baseline log-probs depend on: the model, the dataset, the token budget, the tool version, (belt and
    braces) the exact token ids fed to the model (which also covers the tokenizer), the backend that ran the
    baseline and the number of kept tokens. Not the batch size: the torch backend runs one sequence per forward
    pass (no padding), so a sequence's logits never depend on its batch."""

    baseline_sha256: str
    dataset_sha256: str
    max_tokens: int
    tool_version: str
    tokens_sha256: str
    backend: str = "torch"

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the key fields: the entry's file name."""
        text = json.dumps({"format": CACHE_FORMAT, **asdict(self)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokens_sha256(token_ids: list[list[int]]) -> str:
    """SHA-256 of the token ids of every sample (int32 little-endian, each sample prefixed by its length)."""
    h = hashlib.sha256()
    for ids in token_ids:
        h.update(np.int64(len(ids)).tobytes())
        h.update(np.asarray(ids, dtype="<i4").tobytes())
    return h.hexdigest()


@dataclass
class CachedLogProbs:
    """Baseline records (memory-mapped on a cache hit); `sample(i)` is sample i's (n_i,) records."""

    rows: np.ndarray
    offsets: list[int]
    n_vocab: int

    def sample(self, i: int) -> np.ndarray:
        return self.rows[self.offsets[i]:self.offsets[i + 1]]


class CacheWriter:
    """Streams one entry's records to disk (or to memory when `f` is None); `commit()` publishes it."""

    def __init__(self, f, key: CacheKey, n_vocab: int) -> None:
        self._f, self._key, self._n_vocab = f, key, n_vocab
        self._dtype = record_dtype(n_vocab)
        self._offsets = [0]
        self._memory: list[np.ndarray] = []

    def append(self, records: np.ndarray) -> None:
        """Append one sample's (n,) records (from `compress`)."""
        a = np.ascontiguousarray(records)
        if a.dtype != self._dtype or a.ndim != 1:
            raise ValueError(f"expected (n,) records of {self._dtype}, got {a.shape} {a.dtype}")
        if self._f is None:
            self._memory.append(a.copy())
        else:
            self._f.write(a.tobytes())
        self._offsets.append(self._offsets[-1] + a.shape[0])

    def in_memory(self) -> CachedLogProbs:
        """The records written so far when caching to disk is off."""
        rows = np.concatenate(self._memory) if self._memory else np.zeros(0, self._dtype)
        return CachedLogProbs(rows, list(self._offsets), self._n_vocab)

    def manifest(self) -> dict:
        return {"format": CACHE_FORMAT, "key": asdict(self._key), "n_vocab": self._n_vocab,
                "record": str(self._dtype.descr), "n_rows": self._offsets[-1], "offsets": self._offsets}


class LogitsCache:
    """The baseline log-prob cache in one folder (default: core.hashing.cache_dir(), i.e. $QUANTGATE_CACHE_DIR or
    ~/.cache/quantgate)."""

    def __init__(self, root: "str | os.PathLike[str] | None" = None) -> None:
        if root is None:

            root = cache_dir()
        self.folder = Path(root) / "baseline"

    def paths(self, key: CacheKey) -> tuple[Path, Path]:
        """(records file, manifest) of `key`'s entry."""
        d = key.digest()
        return self.folder / f"{d}.lp16", self.folder / f"{d}.json"

    def lookup(self, key: CacheKey) -> CachedLogProbs | None:
        """The entry for `key`, or None when absent, incomplete or inconsistent (then it is recomputed)."""
        data_path, meta_path = self.paths(key)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != asdict(key):
                return None
            n_rows, n_vocab, offsets = int(meta["n_rows"]), int(meta["n_vocab"]), [int(o) for o in meta["offsets"]]
            dtype = record_dtype(n_vocab)
            if data_path.stat().st_size != n_rows * dtype.itemsize or offsets[-1] != n_rows or offsets[0] != 0:
                return None
            rows = np.memmap(data_path, dtype=dtype, mode="r", shape=(n_rows,)) if n_rows else np.zeros(0, dtype)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None
        return CachedLogProbs(rows, offsets, n_vocab)

    @contextlib.contextmanager
    def writer(self, key: CacheKey, n_vocab: int) -> Iterator[CacheWriter]:
        """Context for writing an entry; when the folder is not writable the writer keeps the records in memory
        (2*n_vocab+16 bytes a token) instead. The entry is published (records renamed into place, then the manifest) only
        when the block exits without an exception."""
        data_path, meta_path = self.paths(key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            cm = atomic_write(data_path)
            f = cm.__enter__()
        except OSError as e:
            logger.warning("baseline log-prob cache disabled: cannot write %s: %s", self.folder, e)
            yield CacheWriter(None, key, n_vocab)
            return
        w = CacheWriter(f, key, n_vocab)
        try:
            yield w
        except BaseException:
            cm.__exit__(*sys.exc_info())
            raise
        cm.__exit__(None, None, None)
        atomic_write_text(meta_path, json.dumps(w.manifest()))
