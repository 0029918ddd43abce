"""On-disk cache of the baseline's log-probabilities, so scoring several candidates runs the baseline once.

An entry is two files under <cache_dir>/logits/: `<key>.f16`, the float16 log-probs of every scored position
(row-major, n_rows x n_vocab), and `<key>.json`, its manifest (key fields, n_vocab, per-sample row offsets).
Both are written atomically, the manifest last: an entry without a manifest is never read.
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
CACHE_FORMAT = "quantgate-baseline-logprobs-v1"
_DTYPE = np.dtype("<f2")


@dataclass(frozen=True)
class CacheKey:
    """What the baseline log-probs depend on: the model, the dataset, the token budget, the tool version, and
    (belt and braces) the exact token ids fed to the model, which also covers the tokenizer."""

    baseline_sha256: str
    dataset_sha256: str
    max_tokens: int
    tool_version: str
    tokens_sha256: str

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
    """A cache hit: memory-mapped float16 rows; `sample(i)` is sample i's (n_i, n_vocab) log-probs."""

    rows: np.ndarray
    offsets: list[int]

    def sample(self, i: int) -> np.ndarray:
        return self.rows[self.offsets[i]:self.offsets[i + 1]]


class CacheWriter:
    """Streams one entry's rows to disk; `commit()` publishes it (manifest written last)."""

    def __init__(self, f, manifest_path: Path, key: CacheKey, n_vocab: int) -> None:
        self._f, self._manifest, self._key, self._n_vocab = f, manifest_path, key, n_vocab
        self._offsets = [0]

    def append(self, log_probs: np.ndarray) -> None:
        """Append one sample's (n, n_vocab) log-probs (converted to little-endian float16)."""
        a = np.ascontiguousarray(log_probs, dtype=_DTYPE)
        if a.ndim != 2 or a.shape[1] != self._n_vocab:
            raise ValueError(f"expected (n, {self._n_vocab}) log-probs, got {a.shape}")
        self._f.write(a.tobytes())
        self._offsets.append(self._offsets[-1] + a.shape[0])

    def manifest(self) -> dict:
        return {"format": CACHE_FORMAT, "key": asdict(self._key), "n_vocab": self._n_vocab,
                "dtype": "float16", "n_rows": self._offsets[-1], "offsets": self._offsets}


class LogitsCache:
    """The baseline log-prob cache in one folder (default: core.hashing.cache_dir(), i.e. $QUANTGATE_CACHE_DIR or
    ~/.cache/quantgate)."""

    def __init__(self, root: "str | os.PathLike[str] | None" = None) -> None:
        if root is None:

            root = cache_dir()
        self.folder = Path(root) / "logits"

    def _paths(self, key: CacheKey) -> tuple[Path, Path]:
        d = key.digest()
        return self.folder / f"{d}.f16", self.folder / f"{d}.json"

    def lookup(self, key: CacheKey) -> CachedLogProbs | None:
        """The entry for `key`, or None when absent, incomplete or inconsistent (then it is recomputed)."""
        data_path, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != asdict(key):
                return None
            n_rows, n_vocab, offsets = int(meta["n_rows"]), int(meta["n_vocab"]), list(meta["offsets"])
            if data_path.stat().st_size != n_rows * n_vocab * _DTYPE.itemsize or offsets[-1] != n_rows:
                return None
            rows = np.memmap(data_path, dtype=_DTYPE, mode="r", shape=(n_rows, n_vocab)) if n_rows else \
                np.zeros((0, n_vocab), dtype=_DTYPE)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None
        return CachedLogProbs(rows, offsets)

    @contextlib.contextmanager
    def writer(self, key: CacheKey, n_vocab: int) -> Iterator[CacheWriter | None]:
        """Context for writing an entry; yields None (no caching) when the folder is not writable. The entry is
        published (rows renamed into place, then the manifest) only when the block exits without an exception."""
        data_path, meta_path = self._paths(key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            cm = atomic_write(data_path)
            f = cm.__enter__()
        except OSError as e:
            logger.warning("baseline log-prob cache disabled: cannot write %s: %s", self.folder, e)
            yield None
            return
        w = CacheWriter(f, meta_path, key, n_vocab)
        try:
            yield w
        except BaseException:
            cm.__exit__(*sys.exc_info())
            raise
        cm.__exit__(None, None, None)
        atomic_write_text(meta_path, json.dumps(w.manifest()))
