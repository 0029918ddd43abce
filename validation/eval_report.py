"""EvalReport: the record of one evaluation (what was compared, on what, with which results and timings)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from validation.metrics import Metrics
from validation.tensor_error import TensorError

SCHEMA_VERSION = 1


@dataclass
class ModelRef:
    """A model by path and content identity (SHA-256 of its weight files, core.hashing.checkpoint_sha256)."""

    path: str
    sha256: str


@dataclass
class Timings:
    """Wall-clock seconds of each phase; tokens/s counts every token fed to the model (context included)."""

    baseline_seconds: float
    baseline_tokens_per_s: float | None      # None on a cache hit (the baseline did not run)
    candidate_seconds: float
    candidate_tokens_per_s: float | None
    tensor_error_seconds: float
    total_seconds: float
    baseline_cache_hit: bool


@dataclass
class EvalReport:
    """Result of `validation.evaluate.evaluate`: metrics overall and per category, per-tensor error, timings."""

    baseline: ModelRef
    candidate: ModelRef
    dataset_path: str
    dataset_sha256: str
    backend: str
    max_tokens: int
    n_samples: int
    n_tokens: int
    overall: Metrics
    per_category: dict[str, Metrics]
    per_tensor: list[TensorError]
    timings: Timings
    tool_version: str
    schema_version: int = SCHEMA_VERSION
    cache_key: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats become None)."""
        return {
            "schema_version": self.schema_version,
            "tool_version": self.tool_version,
            "baseline": asdict(self.baseline),
            "candidate": asdict(self.candidate),
            "dataset": {"path": self.dataset_path, "sha256": self.dataset_sha256},
            "backend": self.backend,
            "max_tokens": self.max_tokens,
            "n_samples": self.n_samples,
            "n_tokens": self.n_tokens,
            "overall": self.overall.to_dict(),
            "per_category": {k: m.to_dict() for k, m in self.per_category.items()},
            "per_tensor": [_finite(t.to_dict()) for t in self.per_tensor],
            "timings": asdict(self.timings),
            "cache_key": self.cache_key,
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        """Indented, key-stable JSON text of to_dict()."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalReport":
        """Inverse of to_dict; refuses other schema versions."""
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"unsupported EvalReport schema_version {d.get('schema_version')!r}")
        return cls(
            baseline=ModelRef(**d["baseline"]),
            candidate=ModelRef(**d["candidate"]),
            dataset_path=d["dataset"]["path"],
            dataset_sha256=d["dataset"]["sha256"],
            backend=d["backend"],
            max_tokens=d["max_tokens"],
            n_samples=d["n_samples"],
            n_tokens=d["n_tokens"],
            overall=Metrics.from_dict(d["overall"]),
            per_category={k: Metrics.from_dict(m) for k, m in d["per_category"].items()},
            per_tensor=[TensorError.from_dict({**t, "bits_per_weight": _nan(t["bits_per_weight"])})
                        for t in d["per_tensor"]],
            timings=Timings(**d["timings"]),
            tool_version=d["tool_version"],
            schema_version=d["schema_version"],
            cache_key=d.get("cache_key", ""),
            notes=list(d.get("notes", [])),
        )


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _nan(v: Any) -> Any:
    return math.nan if v is None else v
