"""Records that cross package borders: small, versioned, JSON-serializable (see docs/DESIGN.md)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form every content key is hashed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Recipe:
    """What was asked of a quantization job, independent of where its input and output live."""

    precision: str
    pure: bool = False
    imatrix_sha256: str | None = None
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    tensor_type_overrides: tuple[tuple[str, str], ...] = ()
    allow_requantize: bool = False
    generic: bool = False
    schema_version: int = SCHEMA_VERSION
    type_map_sha256: str | None = None  # precision AUTO: SHA-256 of the canonical JSON of the per-tensor types
    policy: str | None = None           # precision AUTO: canonical JSON of policy, budget and profile SHA-256

    def as_dict(self) -> dict[str, Any]:
        """The recipe's fields; the AUTO-only fields are left out when unset, so the recipes (and keys) of
        llama.cpp mixes are unchanged by their existence."""
        d = asdict(self)
        for k in _AUTO_FIELDS:
            if d[k] is None:
                del d[k]
        return d

    def key(self) -> str:
        """SHA-256 of the recipe's canonical JSON."""
        return sha256_text(canonical_json(self.as_dict()))


_AUTO_FIELDS = ("type_map_sha256", "policy")


def job_key(source_sha256: str, recipe: Recipe, tool_version: str) -> str:
    """Content address of a job: same source, same recipe, same tool version -> same artifact."""
    return sha256_text(f"{source_sha256}\n{recipe.key()}\n{tool_version}")


@dataclass
class QuantizedArtifact:
    """A GGUF file quantgate wrote, with what it is made of and how long it took."""

    path: str
    sha256: str
    nbytes: int
    source: str
    source_sha256: str
    recipe: Recipe
    job_key: str
    tool_version: str
    file_type: int
    tensor_types: dict[str, str]
    tensor_bytes: dict[str, int]
    n_params: int
    bits_per_weight: float
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GateResult:
    """One gate's outcome: what was measured, against what, and whether it passed."""

    name: str                      # e.g. "accuracy_drop<=0.005" or "structural:verify"
    kind: str                      # "structural" | "metric" | "expectation"
    metric: str | None = None
    comparator: str | None = None  # "<=", "<", ">=", ">", "=="
    threshold: float | None = None
    value: float | None = None
    category: str | None = None    # per-category gate (code/chat/math) or None for overall
    passed: bool = False
    detail: str = ""
    skipped: bool = False          # not run because an earlier gate failed (counts as not passed)


@dataclass
class Verdict:
    """The gate's decision on one artifact: every gate with its value, and the overall pass/fail."""

    artifact_sha256: str
    passed: bool
    gates: list[GateResult]
    gate_set: str                  # name (or SHA-256) of the gate configuration that decided
    metrics: dict[str, float] = field(default_factory=dict)
    report_paths: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
