"""Compliance report of one model version: lineage, gates, plots, environment and the audit chain's verification,
as one self-contained document (HTML with inline CSS and base64 PNG plots, Markdown, or JSON)."""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_text
from core.hashing import file_sha256
from core.png import png_data_uri, pyplot
from core.templating import environment
from registry.audit import AuditEvent, AuditLog, tool_versions
from registry.client import (
    PASSED,
    UNVALIDATED,
    RegistryError,
    get_version,
    mlflow_client,
    sanitize_name,
)
from registry.config import RegistrySettings
from registry.queries import attach_to_version, iter_run_artifacts, run_artifact_text
from registry.trust import verdict_key, version_events, version_status

FORMATS = ("html", "md", "json")
NOT_VALIDATED = "not validated"
_CATEGORY_METRICS = ("kl_mean", "top1_agreement", "accuracy_drop", "ln_ppl_ratio")


@dataclass
class Plot:
    """One figure: a title and a PNG as a data URI (or a note when there is nothing to plot)."""

    title: str
    data_uri: str | None
    note: str = ""


def _ts(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def make_plots(validation: dict[str, Any] | None) -> list[Plot]:
    """Per-tensor error and per-category metrics from a validation report (EvalReport JSON), as inline PNGs."""
    if not validation:
        return [Plot("Per-tensor error", None, NOT_VALIDATED), Plot("Per-category metrics", None, NOT_VALIDATED)]
    plt = pyplot()
    plots = []
    rows = [(t.get("name", "?"), t.get("rel_rmse")) for t in validation.get("per_tensor") or []]
    rows = sorted([(n, float(v)) for n, v in rows if isinstance(v, (int, float))], key=lambda r: -r[1])[:40]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 0.22 * len(rows) + 1.2))
        ax.barh([n for n, _ in rows][::-1], [v for _, v in rows][::-1], color="#4c72b0")
        ax.set_xlabel("relative RMSE (dequantized vs baseline)")
        ax.set_title(f"Per-tensor error (worst {len(rows)})")
        ax.tick_params(axis="y", labelsize=7)
        plots.append(Plot("Per-tensor error", png_data_uri(fig)))
    else:
        plots.append(Plot("Per-tensor error", None, "the validation report has no per-tensor errors"))
    cats = validation.get("per_category") or {}
    series = {m: {c: d.get(m) for c, d in cats.items() if isinstance((d or {}).get(m), (int, float))}
              for m in _CATEGORY_METRICS}
    series = {m: v for m, v in series.items() if v}
    if series:
        fig, axes = plt.subplots(1, len(series), figsize=(3.2 * len(series), 3), squeeze=False)
        for ax, (metric, vals) in zip(axes[0], series.items(), strict=True):
            ax.bar(list(vals), list(vals.values()), color="#55a868")
            ax.set_title(metric, fontsize=9)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        fig.tight_layout()
        plots.append(Plot("Per-category metrics", png_data_uri(fig)))
    else:
        plots.append(Plot("Per-category metrics", None, "the validation report has no per-category metrics"))
    return plots


def _num(v: Any) -> str:
    """Numbers for people: 6 significant digits; anything else as is."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "" if v is None else str(v)
    return f"{v:.6g}"


def _alias_history(events: list[AuditEvent], version: str) -> list[dict[str, Any]]:
    out = []
    for e in events:
        if e.action not in ("promote", "refuse"):
            continue
        prev = (e.config or {}).get("previous_version")
        if e.version == version or (prev is not None and str(prev) == version):
            out.append({"when": e.ts, "who": f"{e.actor.get('user')}@{e.actor.get('host')}", "action": e.action,
                        "alias": (e.config or {}).get("alias"), "version": e.version,
                        "previous_version": prev, "detail": e.detail})
    return out


def _bpw(metrics: dict[str, Any]) -> str:
    v = metrics.get("bits_per_weight")
    return f"{v:.4f}" if isinstance(v, (int, float)) else "?"


def build_report(model: str, version: str | int, *, settings: RegistrySettings | None = None) -> dict[str, Any]:
    """Collect everything the report shows from MLflow and the audit trail (a JSON-ready dict)."""

    s = settings or RegistrySettings.from_env()
    client = mlflow_client(s)
    mv = get_version(client, model, version)
    run = client.get_run(mv.run_id)
    params, metrics = dict(run.data.params), dict(run.data.metrics)
    arts = list(iter_run_artifacts(client, mv.run_id))
    verdict_txt = run_artifact_text(s, mv.run_id, "validation/verdict.json")
    verdict = json.loads(verdict_txt) if verdict_txt else None
    vj = next((a for a in arts if a.startswith("reports/validation_json/")), None)
    validation = json.loads(run_artifact_text(s, mv.run_id, vj) or "null") if vj else None
    sha, job = mv.tags.get("sha256"), mv.tags.get("job_key")
    with AuditLog(s.audit_db_url) as log:
        events = log.events(model=model, version=mv.version, artifact_sha256=sha, job_key=job)
        model_events = log.events(model=model)
        chain = log.verify()
        backing = version_status(version_events(log, model, mv.version), model, mv.version, verdict_key(),
                                 artifact_sha256=sha)
    reg = next((e for e in events if e.action == "register" and e.version == str(mv.version)), None)
    tag_status = mv.tags.get("verdict", UNVALIDATED)
    status = PASSED if backing.ok else backing.status  # the chain's word, never the tag's
    aliases = list(mv.aliases or [])
    lineage = [
        {"step": "source checkpoint", "sha256": params.get("source_sha256") or mv.tags.get("source_sha256"),
         "detail": params.get("source_model", "") + (f" from {params['source.ref']}" if params.get("source.ref")
                                                     else "")},
        {"step": "calibration set", "sha256": params.get("calibration_sha256"), "detail": "validation dataset"},
        {"step": "imatrix", "sha256": params.get("imatrix_sha256"), "detail": ""},
        {"step": "profile", "sha256": params.get("profile_sha256"), "detail": ""},
        {"step": "quantized file", "sha256": sha, "detail": f"{mv.tags.get('gguf_file')} ({params.get('precision')}, "
                                                          f"{_bpw(metrics)} bpw)"},
        {"step": "validation", "sha256": None,
         "detail": NOT_VALIDATED if verdict is None else f"{status} (gate set {verdict.get('gate_set')})"},
        {"step": "registration", "sha256": None,
         "detail": f"{model} v{mv.version}" + (f" by {reg.actor.get('user')}@{reg.actor.get('host')} at {reg.ts}"
                                               if reg else f" at {_ts(mv.creation_timestamp)}")},
    ]
    return {
        "schema_version": 1,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "model": model, "version": str(mv.version), "verdict": status, "verdict_tag": tag_status,
        "verdict_backing": backing.reason,
        "rejected": mv.tags.get("rejected") == "true", "aliases": aliases,
        "unbacked_aliases": [] if backing.ok else aliases,
        "tags": dict(mv.tags), "run_id": mv.run_id, "params": params, "metrics": metrics,
        "lineage": lineage, "gates": (verdict or {}).get("gates", []), "gate_set": (verdict or {}).get("gate_set"),
        "validation": None if validation is None else {
            "overall": validation.get("overall"), "per_category": validation.get("per_category"),
            "per_tensor": validation.get("per_tensor"), "dataset": validation.get("dataset")},
        "alias_history": _alias_history(model_events, str(mv.version)),
        "events": [e.to_dict() for e in events],
        "environment": {"registered_with": (reg.versions if reg else {}), "report_generated_with": tool_versions(),
                        "host": platform.node()},
        "audit_chain": chain.to_dict() | {"summary": chain.summary()},
        "artifacts": arts,
    }


def render(report: dict[str, Any], fmt: str) -> str:
    """The report as HTML (self-contained), Markdown or JSON text."""
    if fmt == "json":
        return json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r} (choose from {', '.join(FORMATS)})")

    env = environment(Path(__file__).parent / "templates", fmt)  # HTML autoescaped, Markdown escaped per value
    env.filters["num"] = _num
    plots = make_plots(report.get("validation"))
    return env.get_template(f"compliance.{fmt}.j2").render(r=report, plots=plots, NOT_VALIDATED=NOT_VALIDATED)


def write_report(model: str, version: str | int, out_dir: "str | Path", fmt: str = "html", *,
                 settings: RegistrySettings | None = None, attach: bool = True) -> Path:
    """Build, render and atomically write the report to out_dir; store it beside the version in MLflow; audit it."""

    if fmt not in FORMATS:
        raise RegistryError(f"unknown report format {fmt!r} (choose from {', '.join(FORMATS)})")
    s = settings or RegistrySettings.from_env()
    rep = build_report(model, version, settings=s)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{sanitize_name(model)}-v{rep['version']}-compliance.{fmt}"
    atomic_write_text(path, render(rep, fmt))
    client = mlflow_client(s)
    if attach:
        attach_to_version(client, get_version(client, model, rep["version"]), path, "compliance")
    with AuditLog(s.audit_db_url) as log:
        log.append("report", model=model, version=rep["version"], artifact_sha256=rep["tags"].get("sha256"),
                   job_key=rep["tags"].get("job_key"), outputs=[{"role": f"compliance_{fmt}", "path": str(path),
                                                                  "sha256": file_sha256(path)}],
                   verdict=rep["verdict"], detail=f"compliance report ({fmt}); chain {rep['audit_chain']['summary']}")
    return path


__all__ = ["build_report", "render", "write_report", "make_plots", "FORMATS", "NOT_VALIDATED"]
