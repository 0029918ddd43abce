"""On-disk cache of the baseline's log-probabilities in a compact top-k form, so scoring a candidate needs only the
candidate in memory and the baseline runs once per (model, dataset, settings, tool version).

Per scored position the entry keeps one fixed-size record (`record_dtype(top_k)`, little-endian):

  ids[k]     int32    the baseline's k most probable next tokens, most probable first (ids[0] is its top-1)
  lp[k]      float32  their log-probabilities (log-softmax computed in float64 from the float32 logits)
  lp_rest    float32  log of the probability mass of every other token (-inf when k covers the vocabulary)
  lp_target  float32  log-probability of the true next token (exact PPL, accuracy and delta-p, not top-k bound)

i.e. 8*k + 8 bytes a token (k = 64: 520 B) instead of 2*n_vocab (llama-perplexity's --kl-divergence-base file keeps,
per token, two floats and n_vocab uint16 log-probs quantized between max-16 nats and the max: 256 KB a token at a
128k vocabulary). KL divergence from it is the divergence between the two distributions collapsed to k+1 outcomes
(the k tokens and "the rest"), a lower bound of the exact one: docs/EVALUATION.md gives its measured error.

An entry is two files under <cache_dir>/baseline/: `<key>.topk` (the records, row-major) and `<key>.json` (its
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
CACHE_FORMAT = "quantgate-baseline-topk-v2"
#: Default number of baseline tokens kept per position (docs/EVALUATION.md: error measured at this k).
DEFAULT_TOP_K = 64


def record_dtype(top_k: int) -> np.dtype:
    """The structured little-endian dtype of one cached position for `top_k` kept tokens."""
    return np.dtype([("ids", "<i4", (top_k,)), ("lp", "<f4", (top_k,)), ("lp_rest", "<f4"), ("lp_target", "<f4")])


def _tail_log_mass(lp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log sum exp of each row of float64 log-probs `lp` over the tokens NOT in that row of `ids` (float64)."""
    rest = lp.copy()
    np.put_along_axis(rest, ids, -np.inf, axis=-1)
    m = rest.max(axis=-1, keepdims=True)
    finite = np.isfinite(m)
    m0 = np.where(finite, m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.exp(rest - m0).sum(axis=-1, keepdims=True)) + m0
    return np.where(finite, out, -np.inf)[:, 0]


def compress(log_probs: np.ndarray, targets: np.ndarray, top_k: int) -> np.ndarray:
    """Records (n,) of record_dtype(k) from (n, n_vocab) normalized float64 log-probs and the n true next tokens;
    k = min(top_k, n_vocab). Ties keep the lower token id first (np.argmax's choice, so ids[0] is the argmax)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    n, n_vocab = lp.shape
    k = min(int(top_k), n_vocab)
    out = np.zeros(n, dtype=record_dtype(top_k))
    if n == 0:
        return out
    ids = np.argsort(-lp, axis=-1, kind="stable")[:, :k]
    out["ids"][:, :k] = ids
    out["lp"][:, :k] = np.take_along_axis(lp, ids, axis=-1)
    if k < top_k:   # vocabulary smaller than top_k: pad with impossible entries that weigh nothing
        out["ids"][:, k:] = ids[:, :1]
        out["lp"][:, k:] = -np.inf
    out["lp_rest"] = _tail_log_mass(lp, ids)
    out["lp_target"] = lp[np.arange(n), t]
    return out


def score_against(records: np.ndarray, cand_log_probs: np.ndarray, targets: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-token values of a candidate against cached baseline records: (baseline log-prob of the target, candidate
    log-prob of the target, baseline top-1, candidate top-1, KL(base || cand) over the k+1 collapsed outcomes).

    The candidate's values are rounded to float32 exactly as the baseline's were, so a candidate identical to the
    baseline scores exactly KL 0, ratio 1."""
    lc = np.asarray(cand_log_probs, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    rows = np.arange(t.size)
    lb_k = records["lp"].astype(np.float64)
    ids = records["ids"].astype(np.int64)
    lc_k = np.take_along_axis(lc, ids, axis=-1).astype(np.float32).astype(np.float64)
    pb_k = np.exp(lb_k)
    with np.errstate(invalid="ignore"):
        head = np.where(pb_k > 0, pb_k * (lb_k - lc_k), 0.0).sum(axis=-1)
    # the tail is the complement of the (unique) kept ids; padding repeats ids[0], which put_along_axis ignores
    lb_rest = records["lp_rest"].astype(np.float64)
    lc_rest = _tail_log_mass(lc, ids).astype(np.float32).astype(np.float64)
    pb_rest = np.exp(lb_rest)
    with np.errstate(invalid="ignore"):
        tail = np.where(pb_rest > 0, pb_rest * (lb_rest - lc_rest), 0.0)
    lp_target_c = lc[rows, t].astype(np.float32).astype(np.float64)
    return (records["lp_target"].astype(np.float64), lp_target_c, ids[:, 0], lc.argmax(axis=-1), head + tail)


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
    top_k: int = DEFAULT_TOP_K

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
        self._dtype = record_dtype(key.top_k)
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
        return self.folder / f"{d}.topk", self.folder / f"{d}.json"

    def lookup(self, key: CacheKey) -> CachedLogProbs | None:
        """The entry for `key`, or None when absent, incomplete or inconsistent (then it is recomputed)."""
        data_path, meta_path = self.paths(key)
        dtype = record_dtype(key.top_k)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != asdict(key):
                return None
            n_rows, n_vocab, offsets = int(meta["n_rows"]), int(meta["n_vocab"]), [int(o) for o in meta["offsets"]]
            if data_path.stat().st_size != n_rows * dtype.itemsize or offsets[-1] != n_rows or offsets[0] != 0:
                return None
            rows = np.memmap(data_path, dtype=dtype, mode="r", shape=(n_rows,)) if n_rows else np.zeros(0, dtype)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None
        return CachedLogProbs(rows, offsets, n_vocab)

    @contextlib.contextmanager
    def writer(self, key: CacheKey, n_vocab: int) -> Iterator[CacheWriter]:
        """Context for writing an entry; when the folder is not writable the writer keeps the records in memory
        (8*k+8 bytes a token) instead. The entry is published (records renamed into place, then the manifest) only
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
