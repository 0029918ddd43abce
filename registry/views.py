"""What people see of a version in MLflow: the tags they filter on and the Markdown description of the version
page (mix, size, bits per weight, KLD ± its standard error, PPL ratio, verdict, gate set, links to the reports)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

from core.records import Verdict
from core.templating import render
from registry.client import FAILED
from registry.facts import GGUFFacts

#: Version tags meant for people (filters in the MLflow UI and `search_model_versions`).
FILTER_TAGS = ("verdict", "rejected", "precision", "file_type", "gate_set", "source")
#: Version tags quantgate's own code reads (download, idempotency, audit anchor): kept, not meant for filtering.
MACHINE_TAGS = ("sha256", "job_key", "gguf_file", "audit_event_hash")

#: Which run artifact each report link of the description points to (role -> label), in display order.
REPORT_LINKS = (("validation_html", "validation report (HTML)"), ("validation_md", "validation report (Markdown)"),
                ("validation_json", "validation JSON"), ("junit", "JUnit XML"), ("compliance", "compliance report"))


def version_tags(f: GGUFFacts, verdict: Verdict | None, status: str) -> dict[str, str]:
    """The tags a new version gets: FILTER_TAGS (rejected only on a failed verdict) + MACHINE_TAGS (without the
    audit anchor, set once the register event exists)."""
    tags = {"verdict": status, "precision": f.precision or "", "file_type": f.file_type_name,
            "gate_set": verdict.gate_set if verdict else "", "source": f.source_ref,
            "sha256": f.sha256, "job_key": f.job_key, "gguf_file": f.path.name}
    if status == FAILED:
        tags["rejected"] = "true"
    return tags


def artifact_href(run_id: str, path: str) -> str:
    """A link to a run artifact relative to the MLflow UI's root (the tracking server's `get-artifact` route)."""
    return f"get-artifact?path={quote(path, safe='')}&run_uuid={quote(run_id, safe='')}"


def _size(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _num(metrics: Mapping[str, float], key: str, spec: str, pct: bool = False) -> str | None:
    v = metrics.get(key)
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    se = metrics.get(f"{key}_se")
    scale = 100.0 if pct else 1.0
    text = format(v * scale, spec) + (" %" if pct else "")
    if isinstance(se, (int, float)) and math.isfinite(se):
        text += f" ± {format(se * scale, spec)}" + (" %" if pct else "")
    return text


def version_description(f: GGUFFacts, verdict: Verdict | None, status: str, metrics: Mapping[str, float],
                        run_id: str, artifacts: Mapping[str, str]) -> str:
    """The Markdown of the version page. `artifacts`: role -> artifact path in the run (REPORT_LINKS roles)."""
    rows = []
    for label, key, spec, pct in (("KL divergence (mean)", "kl_mean", ".5f", False),
                                  ("KL divergence (upper 95 %)", "kl_mean_upper95", ".5f", False),
                                  ("PPL ratio", "ppl_ratio", ".5f", False),
                                  ("top-1 agreement", "top1_agreement", ".2f", True),
                                  ("accuracy drop", "accuracy_drop", ".2f", True)):
        text = _num(metrics, key, spec, pct)
        if text is not None and not (key == "kl_mean_upper95" and "kl_mean_se" in metrics):
            rows.append({"label": label, "value": text})
    gates = verdict.gates if verdict is not None else []
    d = {"mix": f.precision or "GGUF", "file_type": f.file_type_name or "unknown", "size": _size(f.nbytes),
         "bpw": f"{f.bits_per_weight:.3f}", "verdict": status, "gate_set": verdict.gate_set if verdict else "",
         "gates_total": len(gates), "gates_passed": sum(1 for g in gates if g.passed and not g.skipped),
         "rows": rows, "source": f.source_ref, "source_sha256": f.source_sha256 or "", "gguf_file": f.path.name,
         "sha256": f.sha256,
         "links": [{"label": label, "href": artifact_href(run_id, artifacts[role])}
                   for role, label in REPORT_LINKS if role in artifacts]}
    return render(Path(__file__).parent / "templates", "version_description.md.j2", d=d)


def report_artifact_paths(reports: Mapping[str, Path]) -> dict[str, str]:
    """Where register_gguf logs each report role in the run (reports/<role>/<file name>)."""
    return {role: f"reports/{role}/{Path(p).name}" for role, p in reports.items()}


__all__ = ["FILTER_TAGS", "MACHINE_TAGS", "REPORT_LINKS", "version_tags", "version_description", "artifact_href",
           "report_artifact_paths"]
