"""What the registry records of one GGUF: its facts (read from the file and its artifact record) flattened into
MLflow params, tags and metrics."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from core.hashing import canonical_json, file_sha256, sha256_text
from core.records import QuantizedArtifact, Recipe, Verdict
from quant.gguf_reader import read_gguf
from registry.client import RegistryError, _key


@dataclass
class GGUFFacts:
    """What the registry needs to know about a GGUF: identity, provenance keys quantgate wrote, size."""

    path: Path
    sha256: str
    nbytes: int
    job_key: str
    source_sha256: str | None
    source_name: str
    precision: str | None
    recipe: dict[str, Any]
    imatrix_sha256: str | None
    tool_version: str | None
    file_type: int | None
    bits_per_weight: float
    n_params: int
    timings: dict[str, float] = field(default_factory=dict)


def gguf_facts(path: "str | os.PathLike[str]", artifact: QuantizedArtifact | None = None) -> GGUFFacts:
    """Identity and provenance of a GGUF: from the pipeline's record when given, else from the file's KVs."""

    p = Path(path)
    sha = file_sha256(p)
    if artifact is not None and artifact.sha256 != sha:
        raise RegistryError(f"{p}: SHA-256 {sha} differs from the artifact record's {artifact.sha256}")
    with read_gguf(p) as g:
        kv = {k.key: k.value for k in g.kv if k.key.startswith(("quantgate.", "general."))}
        n_el = sum(t.n_elements for t in g.tensors)
        bpw = 8.0 * sum(t.nbytes for t in g.tensors) / max(n_el, 1)
    recipe = json.loads(kv["quantgate.recipe"]) if isinstance(kv.get("quantgate.recipe"), str) else {}
    if artifact is not None:
        return GGUFFacts(p, sha, artifact.nbytes, artifact.job_key, artifact.source_sha256,
                         Path(artifact.source).name or artifact.source, artifact.recipe.precision,
                         asdict(artifact.recipe), artifact.recipe.imatrix_sha256, artifact.tool_version,
                         artifact.file_type, artifact.bits_per_weight, artifact.n_params,
                         {**({"total": artifact.seconds} if artifact.seconds is not None else {}),
                          **artifact.timings})
    return GGUFFacts(
        path=p, sha256=sha, nbytes=p.stat().st_size,
        job_key=kv.get("quantgate.job_key") or sha256_text(f"external\n{sha}"),
        source_sha256=kv.get("quantgate.source_sha256"),
        source_name=str(kv.get("general.name") or p.stem),
        precision=kv.get("quantgate.precision"), recipe=recipe,
        imatrix_sha256=kv.get("quantgate.imatrix_sha256"), tool_version=kv.get("quantgate.version"),
        file_type=kv.get("general.file_type"), bits_per_weight=bpw, n_params=n_el,
    )


def _params(f: GGUFFacts, verdict: Verdict | None, reports: Mapping[str, Path], extra: Mapping[str, Any]) -> dict:

    p: dict[str, Any] = {
        "source_model": f.source_name, "source_sha256": f.source_sha256, "precision": f.precision,
        "recipe_key": Recipe(**{**f.recipe, "tensor_type_overrides": tuple(map(tuple, f.recipe.get(
            "tensor_type_overrides", ())))}).key() if f.recipe else None,
        "recipe": canonical_json(f.recipe) if f.recipe else None, "job_key": f.job_key,
        "imatrix_sha256": f.imatrix_sha256, "tool_version": f.tool_version, "artifact_sha256": f.sha256,
    }
    if "profile" in reports:
        p["profile_sha256"] = file_sha256(reports["profile"])
    if verdict is not None:
        p["gate_set"] = verdict.gate_set
        for g in verdict.gates:
            if g.threshold is not None:
                p[_key(f"threshold.{g.name}")] = f"{g.comparator or ''} {g.threshold}".strip()
    if "validation_json" in reports:
        try:
            ds = json.loads(Path(reports["validation_json"]).read_text(encoding="utf-8")).get("dataset") or {}
            p["calibration_sha256"] = ds.get("sha256")
        except (OSError, ValueError, AttributeError):
            pass
    p.update(extra)
    return {k: str(v)[:6000] for k, v in p.items() if v is not None}


def _metrics(f: GGUFFacts, verdict: Verdict | None, reports: Mapping[str, Path]) -> dict[str, float]:
    m: dict[str, float] = {"file_size_bytes": float(f.nbytes), "bits_per_weight": f.bits_per_weight,
                           "n_params": float(f.n_params)}
    m.update({f"timing.{k}_s": v for k, v in f.timings.items()})
    if verdict is not None:
        m.update({_key(k): v for k, v in verdict.metrics.items()})
        for g in verdict.gates:
            if g.value is not None:
                m[_key(f"gate.{g.name}")] = g.value
    if "validation_json" in reports:
        try:
            rep = json.loads(Path(reports["validation_json"]).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            rep = {}
        for k, v in (rep.get("overall") or {}).items():
            m[_key(f"val.{k}")] = v
        for cat, d in (rep.get("per_category") or {}).items():
            for k, v in (d or {}).items():
                m[_key(f"val.{cat}.{k}")] = v
        for k, v in (rep.get("timings") or {}).items():
            m[_key(f"val.timing.{k}")] = v
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and v == v and abs(float(v)) != float("inf")}
