"""What the registry records of one GGUF: its facts (read from the file and its artifact record) flattened into
MLflow params, tags and metrics."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from core.hashing import canonical_json, combined_sha256, file_sha256, sha256_text
from core.records import QuantizedArtifact, Recipe, Verdict
from quant.gguf_split import open_gguf_parts
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
    #: a split GGUF: [{file, sha256, bytes}] per part in order (path is the first part, sha256 the set's
    #: core.hashing.checkpoint_sha256, nbytes the total); empty for a single file
    parts: list[dict[str, Any]] = field(default_factory=list)
    #: where the source came from (the GGUF's quantgate.source_lineage: HF cache id, models:/ version, DVC revision)
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def file_type_name(self) -> str:
        """general.file_type by llama.cpp's name (MOSTLY_Q4_K_M), or the number when the enum lacks it."""
        return file_type_name(self.file_type)

    @property
    def source_ref(self) -> str:
        """The source reference people filter on: the lineage's ref (models:/base-llama/3, org/name@commit,
        REPO@commit:PATH), else the source name."""
        return str(self.lineage.get("ref") or self.source_name)


def file_type_name(file_type: int | None) -> str:
    """llama.cpp's LLAMA_FTYPE name of a general.file_type value (gguf.LlamaFileType), '' for None."""
    if file_type is None:
        return ""
    from gguf.constants import LlamaFileType

    try:
        return LlamaFileType(int(file_type)).name
    except ValueError:
        return str(file_type)


def _lineage(kv: Mapping[str, Any]) -> dict[str, Any]:
    raw = kv.get("quantgate.source_lineage")
    try:
        d = json.loads(raw) if isinstance(raw, str) else {}
    except ValueError:
        return {}
    return {str(k): v for k, v in d.items() if isinstance(v, (str, int, float))} if isinstance(d, dict) else {}


def gguf_facts(path: "str | os.PathLike[str]", artifact: QuantizedArtifact | None = None) -> GGUFFacts:
    """Identity and provenance of a GGUF: from the pipeline's record when given, else from the file's KVs."""

    files = open_gguf_parts(path)  # any part of a split GGUF stands for the whole set
    try:
        p = files[0].path if len(files) > 1 else Path(path)
        kv = {k.key: k.value for k in files[0].kv if k.key.startswith(("quantgate.", "general."))}
        tensors = [t for g in files for t in g.tensors]
        n_el = sum(t.n_elements for t in tensors)
        bpw = 8.0 * sum(t.nbytes for t in tensors) / max(n_el, 1)
    finally:
        for g in files:
            g.close()
    parts = [{"file": g.path.name, "sha256": file_sha256(g.path), "bytes": g.file_size} for g in files] \
        if len(files) > 1 else []
    sha = combined_sha256({q["file"]: q["sha256"] for q in parts}) if parts else file_sha256(p)
    if artifact is not None and artifact.sha256 != sha:
        raise RegistryError(f"{p}: SHA-256 {sha} differs from the artifact record's {artifact.sha256}")
    recipe = json.loads(kv["quantgate.recipe"]) if isinstance(kv.get("quantgate.recipe"), str) else {}
    lineage = _lineage(kv)
    if artifact is not None:
        return GGUFFacts(p, sha, artifact.nbytes, artifact.job_key, artifact.source_sha256,
                         str(lineage.get("name") or Path(artifact.source).name or artifact.source),
                         artifact.recipe.precision,
                         asdict(artifact.recipe), artifact.recipe.imatrix_sha256, artifact.tool_version,
                         artifact.file_type, artifact.bits_per_weight, artifact.n_params,
                         {**({"total": artifact.seconds} if artifact.seconds is not None else {}),
                          **artifact.timings}, parts, lineage)
    return GGUFFacts(
        path=p, sha256=sha, nbytes=sum(q["bytes"] for q in parts) if parts else p.stat().st_size,
        job_key=kv.get("quantgate.job_key") or sha256_text(f"external\n{sha}"),
        source_sha256=kv.get("quantgate.source_sha256"),
        source_name=str(lineage.get("name") or kv.get("general.name") or p.stem),
        precision=kv.get("quantgate.precision"), recipe=recipe,
        imatrix_sha256=kv.get("quantgate.imatrix_sha256"), tool_version=kv.get("quantgate.version"),
        file_type=kv.get("general.file_type"), bits_per_weight=bpw, n_params=n_el, parts=parts, lineage=lineage,
    )


#: The validation reports a registered version's run holds (the gate writes them beside the verdict).
RUN_REPORTS = ("validation_json", "validation_md", "validation_html", "junit")


def verdict_reports(verdict: Verdict | None) -> dict[str, Path]:
    """The verdict's own report files (RUN_REPORTS roles of its report_paths) that exist, to attach to its run."""
    paths = (verdict.report_paths or {}) if verdict is not None else {}
    return {r: Path(paths[r]) for r in RUN_REPORTS if paths.get(r) and Path(paths[r]).is_file()}


def _params(f: GGUFFacts, verdict: Verdict | None, reports: Mapping[str, Path], extra: Mapping[str, Any]) -> dict:

    p: dict[str, Any] = {
        "source_model": f.source_name, "source_sha256": f.source_sha256, "precision": f.precision,
        "recipe_key": Recipe(**{**f.recipe, "tensor_type_overrides": tuple(map(tuple, f.recipe.get(
            "tensor_type_overrides", ())))}).key() if f.recipe else None,
        "recipe": canonical_json(f.recipe) if f.recipe else None, "job_key": f.job_key,
        "imatrix_sha256": f.imatrix_sha256, "tool_version": f.tool_version, "artifact_sha256": f.sha256,
        "file_type": f.file_type_name or None,
    }
    p.update({_key(f"source.{k}"): v for k, v in f.lineage.items()})
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


#: The evaluation's quality figures (validation.metrics.Metrics) a run keeps, overall and per category: what people
#: compare across versions. Sample/token counts, delta_p_mean and the expectation suites' counters are left out
#: (they are in the attached validation.json and verdict.json).
QUALITY_METRICS = ("ppl_baseline", "ppl_candidate", "ppl_ratio", "ln_ppl_ratio", "kl_mean", "kl_median", "kl_p99",
                   "kl_max", "top1_agreement", "acc_baseline", "acc_candidate", "accuracy_drop", "delta_p_rms",
                   "ppl_ratio_se", "ln_ppl_ratio_se", "kl_mean_se", "kl_mean_upper95", "top1_agreement_se")
#: Per category (val.<category>.<metric>) only the headline figures.
CATEGORY_METRICS = ("kl_mean", "kl_mean_se", "ppl_ratio", "ln_ppl_ratio", "top1_agreement", "accuracy_drop")


def _metrics(f: GGUFFacts, verdict: Verdict | None, reports: Mapping[str, Path]) -> dict[str, float]:
    m: dict[str, float] = {"file_size_bytes": float(f.nbytes), "bits_per_weight": f.bits_per_weight,
                           "n_params": float(f.n_params)}
    m.update({f"timing.{k}_s": v for k, v in f.timings.items()})
    if verdict is not None:
        m.update({k: v for k, v in verdict.metrics.items() if k in QUALITY_METRICS or k == "gates_failed"})
        for g in verdict.gates:
            if g.value is not None and g.kind == "metric":
                m[_key(f"gate.{g.name}")] = g.value
    if "validation_json" in reports:
        try:
            rep = json.loads(Path(reports["validation_json"]).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            rep = {}
        for k, v in (rep.get("overall") or {}).items():
            if k in QUALITY_METRICS:
                m.setdefault(k, v)
        for cat, d in (rep.get("per_category") or {}).items():
            for k, v in (d or {}).items():
                if k in CATEGORY_METRICS:
                    m[_key(f"val.{cat}.{k}")] = v
        total = (rep.get("timings") or {}).get("total_seconds")
        if total is not None:
            m["timing.validate_s"] = total
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and v == v and abs(float(v)) != float("inf")}
