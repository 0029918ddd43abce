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

    def key(self) -> str:
        """SHA-256 of the recipe's canonical JSON."""
        return sha256_text(canonical_json(asdict(self)))


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
