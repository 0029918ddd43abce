"""The calibration cache: measurements that cost forward passes (imatrices, per-tensor errors), stored in one
SQLite file and keyed by everything they depend on.

Key = SHA-256 of the canonical JSON of (model SHA-256, calibration set SHA-256, kind of measurement, its config,
tool version). A changed model or calibration file has another SHA-256, so it can never hit a stale entry; the
per-(tensor, type) granularity of the analyzer's entries lets several candidate-type sets share one database.
The database runs in WAL mode (readers never block the writer) with a busy timeout, and every statement is retried
with backoff when SQLite still reports the database busy or locked, so several processes can fill it at once.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

from core.atomic import atomic_write
from core.errors import QuantGateError
from core.hashing import cache_dir as default_dir
from core.hashing import canonical_json

DB_NAME = "calibration.sqlite"
SCHEMA_VERSION = 1
EXPORT_FORMAT = "quantgate-calibration-cache"
_RETRIES = 50
_BUSY_TIMEOUT_S = 30.0
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    model_sha256 TEXT NOT NULL,
    calib_sha256 TEXT NOT NULL,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,
    tool_version TEXT NOT NULL,
    value BLOB NOT NULL,
    value_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_used REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS entries_model ON entries (model_sha256, calib_sha256);
CREATE INDEX IF NOT EXISTS entries_kind ON entries (kind);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""


class CacheError(QuantGateError):
    """The cache file or an export file is unusable."""


@dataclass(frozen=True)
class CacheKey:
    """What a cached value depends on; `digest` is its primary key."""

    model_sha256: str
    calib_sha256: str
    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    tool_version: str = ""

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical JSON of all five parts."""
        body = canonical_json({"model": self.model_sha256, "calib": self.calib_sha256, "kind": self.kind,
                               "config": self.config, "tool": self.tool_version})
        return hashlib.sha256(body.encode("utf-8")).hexdigest()


@dataclass
class CacheStats:
    """Entry counts and bytes, overall and per kind of measurement."""

    path: str
    entries: int
    bytes: int
    hits: int
    models: int
    calibration_sets: int
    tool_versions: list[str]
    by_kind: dict[str, dict[str, int]]

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def default_path(cache_dir: "str | os.PathLike[str] | None" = None) -> Path:
    """The database file: <cache_dir>/calibration.sqlite (cache_dir default: core.hashing.cache_dir())."""

    return Path(cache_dir) / DB_NAME if cache_dir is not None else default_dir() / DB_NAME


def _retry(fn: Callable[[], T]) -> T:
    """Run `fn`, retrying with jittered exponential backoff while SQLite says busy/locked."""
    delay = 0.01
    for attempt in range(_RETRIES):
        try:
            return fn()
        except sqlite3.OperationalError as e:
            msg = str(e).lower()
            if ("locked" not in msg and "busy" not in msg) or attempt == _RETRIES - 1:
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)
    raise AssertionError("unreachable")


class CalibrationCache:
    """SQLite-backed store of calibration measurements (see the module docstring). Use as a context manager."""

    def __init__(self, cache_dir: "str | os.PathLike[str] | None" = None, *, path: "str | os.PathLike[str] | None" = None
                 ) -> None:
        self.path = Path(path) if path is not None else default_path(cache_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        _retry(lambda: self._conn.execute("PRAGMA journal_mode=WAL").fetchone())
        self._conn.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        _retry(lambda: self._conn.executescript(_SCHEMA))
        _retry(lambda: self._conn.execute("INSERT OR IGNORE INTO meta (k, v) VALUES ('schema_version', ?)",
                                          (str(SCHEMA_VERSION),)))
        row = self._conn.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()
        if row is None or int(row[0]) != SCHEMA_VERSION:
            raise CacheError(f"{self.path}: cache schema {row and row[0]} is not {SCHEMA_VERSION}; delete the file")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "CalibrationCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: takes the write lock up front so two writers never deadlock mid-way."""
        _retry(lambda: self._conn.execute("BEGIN IMMEDIATE"))
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        _retry(lambda: self._conn.execute("COMMIT"))

    # ------------------------------------------------------------------------------------------ raw values

    def get(self, key: CacheKey) -> bytes | None:
        """The stored bytes for `key`, or None (a miss); a hit bumps its use count and time."""
        row = _retry(lambda: self._conn.execute("SELECT value, value_sha256 FROM entries WHERE key = ?",
                                                (key.digest,)).fetchone())
        if row is None:
            return None
        value = bytes(row[0])
        if hashlib.sha256(value).hexdigest() != row[1]:
            self.delete(key)  # a corrupted row is a miss, and is recomputed
            return None
        _retry(lambda: self._conn.execute("UPDATE entries SET hits = hits + 1, last_used = ? WHERE key = ?",
                                          (time.time(), key.digest)))
        return value

    def put(self, key: CacheKey, value: bytes) -> None:
        """Store `value` under `key` (replacing an older value of the same key)."""
        now = time.time()
        row = (key.digest, key.model_sha256, key.calib_sha256, key.kind, canonical_json(key.config),
               key.tool_version, sqlite3.Binary(value), hashlib.sha256(value).hexdigest(), now, now)
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO entries (key, model_sha256, calib_sha256, kind, config, tool_version, "
                      "value, value_sha256, created_at, last_used, hits) VALUES (?,?,?,?,?,?,?,?,?,?,0)", row)

    def delete(self, key: CacheKey) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM entries WHERE key = ?", (key.digest,))

    # ------------------------------------------------------------------------------------- typed helpers

    def get_json(self, key: CacheKey) -> Any | None:
        raw = self.get(key)
        return None if raw is None else json.loads(raw.decode("utf-8"))

    def put_json(self, key: CacheKey, value: Any) -> None:
        self.put(key, canonical_json(value).encode("utf-8"))

    def get_arrays(self, key: CacheKey) -> dict[str, np.ndarray] | None:
        raw = self.get(key)
        if raw is None:
            return None
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def put_arrays(self, key: CacheKey, arrays: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self.put(key, buf.getvalue())

    # ------------------------------------------------------------------------------------- maintenance

    def stats(self) -> CacheStats:
        """Counts and sizes of what is stored."""
        c = self._conn
        n, nbytes, hits = c.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(value)), 0), COALESCE(SUM(hits), 0) "
                                    "FROM entries").fetchone()
        models = c.execute("SELECT COUNT(DISTINCT model_sha256) FROM entries").fetchone()[0]
        calibs = c.execute("SELECT COUNT(DISTINCT calib_sha256) FROM entries").fetchone()[0]
        tools = [r[0] for r in c.execute("SELECT DISTINCT tool_version FROM entries ORDER BY 1")]
        by_kind = {k: {"entries": int(cnt), "bytes": int(b)} for k, cnt, b in c.execute(
            "SELECT kind, COUNT(*), SUM(LENGTH(value)) FROM entries GROUP BY kind ORDER BY kind")}
        return CacheStats(str(self.path), int(n), int(nbytes), int(hits), int(models), int(calibs), tools, by_kind)

    def prune(self, *, keep_tool_version: str | None = None, older_than_s: float | None = None,
              max_bytes: int | None = None) -> int:
        """Delete entries of other tool versions (they can never hit again), entries unused for `older_than_s`
        seconds, then least recently used entries until at most `max_bytes` remain; returns how many went."""
        removed = 0
        with self._tx() as c:
            if keep_tool_version is not None:
                removed += c.execute("DELETE FROM entries WHERE tool_version != ?", (keep_tool_version,)).rowcount
            if older_than_s is not None:
                removed += c.execute("DELETE FROM entries WHERE last_used < ?",
                                     (time.time() - older_than_s,)).rowcount
            if max_bytes is not None:
                total = 0
                drop = []
                for key, size in c.execute("SELECT key, LENGTH(value) FROM entries ORDER BY last_used DESC, key"):
                    total += size
                    if total > max_bytes:
                        drop.append((key,))
                c.executemany("DELETE FROM entries WHERE key = ?", drop)
                removed += len(drop)
        if removed:
            _retry(lambda: self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        return removed

    def export(self, out: "str | os.PathLike[str]") -> int:
        """Write every entry to a JSONL file (a header line, then one entry a line with its value base64-encoded
        and SHA-256); returns the number of entries."""

        rows = self._conn.execute("SELECT key, model_sha256, calib_sha256, kind, config, tool_version, value, "
                                  "value_sha256, created_at FROM entries ORDER BY key").fetchall()
        with atomic_write(out) as fh:
            fh.write((json.dumps({"format": EXPORT_FORMAT, "schema_version": SCHEMA_VERSION,
                                  "entries": len(rows)}) + "\n").encode("utf-8"))
            for key, m, cal, kind, cfg, tool, value, vsha, created in rows:
                fh.write((json.dumps({"key": key, "model_sha256": m, "calib_sha256": cal, "kind": kind,
                                      "config": json.loads(cfg), "tool_version": tool, "value_sha256": vsha,
                                      "created_at": created, "value": base64.b64encode(bytes(value)).decode("ascii")},
                                     sort_keys=True) + "\n").encode("utf-8"))
        return len(rows)

    def import_file(self, src: "str | os.PathLike[str]") -> "ImportResult":
        """Add the entries of an export file; every entry's key and value hash are re-verified first, and existing
        keys are kept. The caller records the import in the audit trail (quantgate.pipeline.import_cache)."""
        src = Path(src)
        entries = _read_export(src)
        added = 0
        now = time.time()
        with self._tx() as c:
            for e in entries:
                cur = c.execute(
                    "INSERT OR IGNORE INTO entries (key, model_sha256, calib_sha256, kind, config, tool_version, "
                    "value, value_sha256, created_at, last_used, hits) VALUES (?,?,?,?,?,?,?,?,?,?,0)",
                    (e.key.digest, e.key.model_sha256, e.key.calib_sha256, e.key.kind, canonical_json(e.key.config),
                     e.key.tool_version, sqlite3.Binary(e.value), e.value_sha256, e.created_at, now))
                added += cur.rowcount
        return ImportResult(str(src), len(entries), added, len(entries) - added)


@dataclass
class _Entry:
    key: CacheKey
    value: bytes
    value_sha256: str
    created_at: float


@dataclass
class ImportResult:
    """What an import did: entries in the file, newly added, already present (kept)."""

    source: str
    entries: int
    added: int
    skipped: int


def _read_export(src: Path) -> list[_Entry]:
    """Parse and verify an export file completely before anything is written."""
    try:
        lines = src.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CacheError(f"{src}: cannot read cache export: {e}") from None
    try:
        head = json.loads(lines[0]) if lines else {}
    except ValueError:
        head = {}
    if head.get("format") != EXPORT_FORMAT or head.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(f"{src}: not a quantgate calibration cache export (schema {SCHEMA_VERSION})")
    out = []
    for i, line in enumerate(lines[1:], start=2):
        try:
            d = json.loads(line)
            key = CacheKey(d["model_sha256"], d["calib_sha256"], d["kind"], d["config"], d["tool_version"])
            value = base64.b64decode(d["value"], validate=True)
            vsha, created = str(d["value_sha256"]), float(d["created_at"])
        except (ValueError, KeyError, TypeError) as e:
            raise CacheError(f"{src}:{i}: malformed entry ({e})") from None
        if key.digest != d["key"]:
            raise CacheError(f"{src}:{i}: key does not match its parts (edited entry?)")
        if hashlib.sha256(value).hexdigest() != vsha:
            raise CacheError(f"{src}:{i}: value does not match its SHA-256 (corrupted entry)")
        out.append(_Entry(key, value, vsha, created))
    if len(out) != head.get("entries"):
        raise CacheError(f"{src}: header announces {head.get('entries')} entries, file holds {len(out)} (truncated?)")
    return out
