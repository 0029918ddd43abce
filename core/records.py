"""Records that cross package borders: small, versioned, JSON-serializable; each owns its to_dict / from_dict.

Every record carries `schema_version`; from_dict accepts the JSON that to_dict wrote (and ignores keys that job
records add around it, such as `reused`), and raises RecordError on anything else.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from core.errors import QuantGateError
from core.hashing import canonical_json, sha256_text

SCHEMA_VERSION = 1

#: The precision / mix name meaning "types chosen per tensor by the analyzer" (`--precision auto`, mix AUTO).
AUTO = "AUTO"


def is_auto(name: object) -> bool:
    """True for the AUTO precision / mix name, whatever its case or surrounding spaces."""
    return str(name).strip().upper() == AUTO


class RecordError(QuantGateError, ValueError):
    """A record's JSON form that is not what its to_dict writes (wrong type, missing or mistyped field)."""


def _known(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(d, Mapping):
        raise RecordError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _build(cls: type, d: Mapping[str, Any]) -> Any:
    try:
        return cls(**d)
    except TypeError as e:
        raise RecordError(f"{cls.__name__}: {e}") from None


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

    to_dict = as_dict

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Recipe":
        """The inverse of as_dict (JSON turns the override pairs into lists: they become tuples again)."""
        r = _known(cls, d)
        try:
            r["tensor_type_overrides"] = tuple((str(a), str(b)) for a, b in r.get("tensor_type_overrides", ()))
        except (TypeError, ValueError):
            raise RecordError("Recipe: tensor_type_overrides must be a list of [pattern, type] pairs") from None
        return _build(cls, r)

    def key(self) -> str:
        """SHA-256 of the recipe's canonical JSON."""
        return sha256_text(canonical_json(self.as_dict()))


_AUTO_FIELDS = ("type_map_sha256", "policy")


def job_key(source_sha256: str, recipe: Recipe, tool_version: str) -> str:
    """Content address of a job: same source, same recipe, same tool version -> same artifact."""
    return sha256_text(f"{source_sha256}\n{recipe.key()}\n{tool_version}")


@dataclass(frozen=True)
class QuantizeRequest:
    """A quantization job: where from, where to, and the recipe's knobs (the analyzer builds AUTO ones)."""

    source: Path
    out: Path
    precision: str
    pure: bool = False
    imatrix: Path | None = None
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    tensor_type_overrides: tuple[tuple[str, str], ...] = ()
    threads: int | None = None
    allow_requantize: bool = False
    generic: bool = False
    #: precision AUTO: explicit GGUF name -> type for every quantizable tensor (analyzer.policy)
    type_map: tuple[tuple[str, str], ...] = ()
    #: precision AUTO: the llama.cpp mix whose general.file_type the file carries (the closest one)
    file_type_mix: str | None = None
    #: precision AUTO: how the types were chosen (policy, budget, profile SHA-256), canonical JSON
    policy: str | None = None
    #: write a llama.cpp split GGUF (quant.gguf_split): at most this many tensor-data bytes, or tensors, per part
    split_max_bytes: int | None = None
    split_max_tensors: int | None = None
    #: where the source came from when it is not a plain path (HF cache id, models:/ version, DVC revision):
    #: canonical JSON with at least `kind` and `ref` (quantgate.inputs.ModelInput.lineage_json); not in the job key
    source_lineage: str | None = None


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
    seconds: float | None = None   # None in a content record (content_dict): how long it took is not what it is
    timings: dict[str, float] = field(default_factory=dict)
    #: a split GGUF: [{path, sha256, nbytes}] per part, in order (path is the first part's, sha256 the set's
    #: core.hashing.checkpoint_sha256, nbytes the total); empty for a single file
    parts: list[dict[str, Any]] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what `quantize --json`, artifact.json and Celery results carry)."""
        return asdict(self)

    def content_dict(self) -> dict[str, Any]:
        """to_dict without the durations (seconds, timings): the same file gives the same record on every run, so
        a DVC-tracked artifact.json hashes the same on every machine."""
        d = self.to_dict()
        d.pop("seconds")
        d.pop("timings")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantizedArtifact":
        """The one way back from JSON; keys that job records add around it (reused, plan_key, auto) are ignored."""
        a = _known(cls, d)
        if not isinstance(a.get("recipe"), Mapping):
            raise RecordError("QuantizedArtifact: recipe must be a JSON object")
        return _build(cls, {**a, "recipe": Recipe.from_dict(a["recipe"])})


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GateResult":
        """The inverse of to_dict."""
        return _build(cls, _known(cls, d))


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
        """JSON-ready form (verdict.json, the registry's copy, Celery results)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Verdict":
        """The one way back from JSON (as the gate writes it)."""
        v = _known(cls, d)
        gates = v.get("gates", [])
        if not isinstance(gates, list):
            raise RecordError("Verdict: gates must be a list")
        return _build(cls, {**v, "gates": [GateResult.from_dict(g) for g in gates]})


#: The largest record file read back (a verdict with every gate is a few hundred KB).
MAX_RECORD_BYTES = 16 << 20


def load_record(cls: type, path: "str | Path") -> Any:
    """Read a record of type `cls` from its JSON file (artifact.json, verdict.json); RecordError on anything else."""
    p = Path(path)
    try:
        if not p.is_file():
            raise RecordError(f"{p}: not a regular file")
        if p.stat().st_size > MAX_RECORD_BYTES:
            raise RecordError(f"{p}: larger than {MAX_RECORD_BYTES >> 20} MiB; not a {cls.__name__} record")
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RecordError(f"{p}: not a {cls.__name__} JSON ({type(e).__name__}: {str(e)[:200]})") from None
    return cls.from_dict(data)
