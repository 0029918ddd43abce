"""Diff two quantized versions of a model: metadata, tensor types and sizes, per-tensor error and model metrics
against the baseline, gate verdict changes, and a one-paragraph summary (JSON / Markdown / HTML reports).

Model metrics come from evaluating both files against the baseline when one is given (the baseline's log-probs
are cached, so the second evaluation reuses the first one's), else from the validation.json each file already
has in its default report folder (when both have one).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_write_text
from core.png import legend_outside, png_data_uri, pyplot
from core.templating import render
from core.text import md_cell, md_code, md_escape, one_line
from quant.gguf_split import SPLIT_KEYS, gguf_files
from runtime.datasets import DEFAULT_EVAL
from validation.evaluate import evaluate
from validation.publish import (
    _TEMPLATES,
    Staging,
    default_report_root,
    eval_report_of,
    fmt,
    plot_label,
)
from validation.structural import inspect_candidate, read_metadata
from validation.thresholds import GateSet, GateSpec, evaluate_gates, expand

SCHEMA = "quantgate.diff"
SCHEMA_VERSION = 1
#: Metrics compared for regressions when no gate set is given (direction: the comparator).
DEFAULT_GATED = GateSet("diff-default", (GateSpec("kl_mean", "<=", 0.0), GateSpec("ppl_ratio", "<=", 0.0),
                                         GateSpec("accuracy_drop", "<=", 0.0), GateSpec("top1_agreement", ">=", 0.0)))
_LONG = 80


@dataclass
class DiffReport:
    """What changed from artifact A to artifact B (see module docstring); `regressions` lists gated metrics where B
    is worse than A by more than `tolerance`."""

    a: dict[str, Any]
    b: dict[str, Any]
    baseline: dict[str, Any] | None
    metadata: dict[str, Any]
    tensors: list[dict[str, Any]]
    metrics: dict[str, Any] | None
    metrics_source: str | None
    gates: list[dict[str, Any]]
    gated: list[dict[str, Any]]
    tolerance: float | None
    regressions: list[str] = field(default_factory=list)
    summary: str = ""
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def verdict_line(self, tolerance: float | None) -> str:
        """The diff's last line: regressions (when a tolerance was given) and the key deltas."""
        if tolerance is None:
            return f"DIFF: {self.a['sha256'][:12]} -> {self.b['sha256'][:12]} (no --fail-on-regression given)"
        if self.regressions:
            return f"REGRESSION beyond {tolerance:g}: " + "; ".join(self.regressions)
        return f"NO REGRESSION beyond {tolerance:g} on {len(self.gated)} gated metrics"


def _display(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, list) and len(v) > 8:
        digest = hashlib.sha256(json.dumps(v, default=str).encode()).hexdigest()[:12]
        return f"<array of {len(v)}, sha256 {digest}>"
    if isinstance(v, str) and len(v) > _LONG:
        return v[:_LONG - 3] + "..."
    return v


def _file_facts(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, tuple[str, int, list[int]]]]:
    """One side of the diff: a GGUF, or the whole split GGUF any part of which is `path` (every part must be
    there: a missing one is a CheckpointError). `path` in the facts is the file llama.cpp is given (the first part),
    `files` every part; the split layout keys (split.no/count/tensors.count) are left out of the metadata compared."""
    f = inspect_candidate(path)
    files = [str(q) for q in gguf_files(path)]
    meta = {k: v for k, v in read_metadata(path).items() if k not in SPLIT_KEYS}
    facts = {"path": f.path, "files": files, "parts": len(files), "sha256": f.sha256, "nbytes": f.nbytes,
             "file_type": f.file_type, "precision": f.precision, "n_tensors": len(f.tensor_types),
             "tensor_bytes": sum(f.tensor_bytes.values())}
    tensors = {n: (f.tensor_types[n], f.tensor_bytes[n], f.tensor_shapes[n]) for n in f.tensor_types}
    return facts, meta, tensors


def diff_metadata(ma: dict[str, Any], mb: dict[str, Any]) -> dict[str, Any]:
    """Keys added, removed and changed from A to B (long values shown as a length + SHA-256 prefix)."""
    def same(x: Any, y: Any) -> bool:
        return json.dumps(_plain(x), default=str) == json.dumps(_plain(y), default=str)

    return {"added": {k: _display(mb[k]) for k in mb if k not in ma},
            "removed": {k: _display(ma[k]) for k in ma if k not in mb},
            "changed": {k: [_display(ma[k]), _display(mb[k])] for k in ma if k in mb and not same(ma[k], mb[k])}}


def _plain(v: Any) -> Any:
    return v.tolist() if isinstance(v, np.ndarray) else v


def _latest_validation(path: Path, sha: str) -> dict[str, Any] | None:
    p = default_report_root(path) / sha / "validation.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def diff(a: "str | os.PathLike[str]", b: "str | os.PathLike[str]", baseline: "str | os.PathLike[str] | None" = None,
         *, dataset: "str | os.PathLike[str] | None" = None, gates: GateSet | None = None, backend: str = "torch",
         max_tokens: int = 256, batch_size: int = 8, cache_dir: "str | os.PathLike[str] | None" = None,
         tolerance: float | None = None) -> DiffReport:
    """Compare quantized GGUF `a` (older) with `b` (newer); see DiffReport. Raises QuantGateError on unusable
    inputs."""
    a, b = Path(a), Path(b)
    fa, ma, ta = _file_facts(a)
    fb, mb, tb = _file_facts(b)
    rep_a = rep_b = None
    source = None
    base_info = None
    if baseline is not None:

        ds = Path(dataset) if dataset is not None else DEFAULT_EVAL
        kw = dict(backend=backend, max_tokens=max_tokens, batch_size=batch_size, cache_dir=cache_dir)
        rep_a = evaluate(baseline, Path(fa["path"]), ds, **kw)   # a split GGUF: its first part (as llama.cpp)
        rep_b = evaluate(baseline, Path(fb["path"]), ds, **kw)
        source = "evaluation"
        base_info = {"path": str(baseline), "sha256": rep_a.baseline.sha256, "dataset": str(ds),
                     "dataset_sha256": rep_a.dataset_sha256, "max_tokens": max_tokens,
                     "baseline_cache_hit_b": rep_b.timings.baseline_cache_hit}
    else:
        va, vb = _latest_validation(Path(fa["path"]), fa["sha256"]), _latest_validation(Path(fb["path"]), fb["sha256"])
        if va and vb and "overall" in va and "overall" in vb:
            rep_a, rep_b = eval_report_of(va), eval_report_of(vb)
            source = "validation reports"
            base_info = {"path": rep_a.baseline.path, "sha256": rep_a.baseline.sha256,
                         "dataset": rep_a.dataset_path, "dataset_sha256": rep_a.dataset_sha256}
    err_a = {e.name: e for e in rep_a.per_tensor} if rep_a else {}
    err_b = {e.name: e for e in rep_b.per_tensor} if rep_b else {}
    tensors = []
    for name in list(ta) + [n for n in tb if n not in ta]:
        (qa, ba, sa), (qb, bb, sb) = ta.get(name, (None, None, None)), tb.get(name, (None, None, None))
        ea, eb = err_a.get(name), err_b.get(name)
        ra = ea.rel_rmse if ea else None
        rb = eb.rel_rmse if eb else None
        tensors.append({"name": name, "type_a": qa, "type_b": qb, "bytes_a": ba, "bytes_b": bb,
                        "shape_changed": sa is not None and sb is not None and sa != sb,
                        "rel_rmse_a": ra, "rel_rmse_b": rb,
                        "rel_rmse_delta": (rb - ra) if ra is not None and rb is not None else None})
    metrics = None
    gate_rows: list[dict[str, Any]] = []
    gated: list[dict[str, Any]] = []
    regressions: list[str] = []
    if rep_a is not None and rep_b is not None:
        oa, ob = rep_a.overall.to_dict(), rep_b.overall.to_dict()
        metrics = {"a": oa, "b": ob, "delta": {k: _delta(oa[k], ob[k]) for k in oa},
                   "per_category": {c: {"a": rep_a.per_category[c].to_dict(), "b": m.to_dict(),
                                        "delta": {k: _delta(rep_a.per_category[c].to_dict()[k], v)
                                                  for k, v in m.to_dict().items()}}
                                    for c, m in rep_b.per_category.items() if c in rep_a.per_category}}
        if gates is not None:
            for ga, gb in zip(evaluate_gates(gates, rep_a), evaluate_gates(gates, rep_b)):
                gate_rows.append({"name": ga.name, "a_value": ga.value, "b_value": gb.value, "a_passed": ga.passed,
                                  "b_passed": gb.passed, "changed": ga.passed != gb.passed})
        cats = sorted(set(rep_a.per_category) & set(rep_b.per_category))
        for g in expand(gates or DEFAULT_GATED, cats):
            va_ = _value(rep_a, g)
            vb_ = _value(rep_b, g)
            worse = g.worse(va_, vb_) if va_ is not None and vb_ is not None else None
            row = {"metric": g.metric, "category": g.category, "comparator": g.comparator, "a": va_, "b": vb_,
                   "worse_by": worse}
            gated.append(row)
            if tolerance is not None and worse is not None and worse > tolerance:
                regressions.append(f"{g.metric}{'@' + g.category if g.category else ''} {fmt(va_)} -> {fmt(vb_)} "
                                   f"(worse by {worse:.6g})")
    rep = DiffReport(a=fa, b=fb, baseline=base_info, metadata=diff_metadata(ma, mb), tensors=tensors,
                     metrics=metrics, metrics_source=source, gates=gate_rows, gated=gated, tolerance=tolerance,
                     regressions=regressions)
    rep.summary = summarize(rep)
    return rep


def _value(rep: Any, g: GateSpec) -> float | None:
    m = rep.overall if g.category is None else rep.per_category.get(g.category)
    v = getattr(m, g.metric) if m is not None else None
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def _delta(x: Any, y: Any) -> float | None:
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return float(y) - float(x)
    return None


def summarize(r: DiffReport) -> str:
    """One paragraph: sizes, type changes, metadata changes, metric deltas, gate flips, regressions."""
    a, b = Path(r.a["path"]).name, Path(r.b["path"]).name
    retyped = [t for t in r.tensors if t["type_a"] != t["type_b"] and t["type_a"] and t["type_b"]]
    added = [t for t in r.tensors if t["type_a"] is None]
    removed = [t for t in r.tensors if t["type_b"] is None]
    size = r.b["nbytes"] - r.a["nbytes"]
    parts = [f"{b} ({_layout(r.b)}{r.b.get('precision') or '?'}, {r.b['nbytes']:,} bytes) vs {a} ({_layout(r.a)}"
             f"{r.a.get('precision') or '?'}, {r.a['nbytes']:,} bytes): {size:+,} bytes "
             f"({100.0 * size / max(r.a['nbytes'], 1):+.1f}%)",
             f"{len(retyped)} of {len(r.tensors)} tensors change type"
             + (f" ({len(added)} added, {len(removed)} removed)" if added or removed else ""),
             f"metadata: {len(r.metadata['added'])} keys added, {len(r.metadata['removed'])} removed, "
             f"{len(r.metadata['changed'])} changed"]
    if r.metrics is not None:
        d = r.metrics["delta"]
        parts.append(f"vs the baseline ({r.metrics_source}): KL mean {fmt(r.metrics['a']['kl_mean'])} -> "
                     f"{fmt(r.metrics['b']['kl_mean'])}, PPL ratio {fmt(r.metrics['a']['ppl_ratio'], '.5f')} -> "
                     f"{fmt(r.metrics['b']['ppl_ratio'], '.5f')}, top-1 agreement "
                     f"{fmt(r.metrics['a']['top1_agreement'], '.4f')} -> {fmt(r.metrics['b']['top1_agreement'], '.4f')}"
                     f" (delta KL {fmt(d['kl_mean'], '+.3g')})")
    else:
        parts.append("no model metrics (give --baseline, or validate both files first)")
    flips = [g for g in r.gates if g["changed"]]
    if r.gates:
        parts.append(f"{len(flips)} gate verdicts change" + (": " + ", ".join(
            f"{g['name']} {'pass->FAIL' if g['a_passed'] else 'fail->pass'}" for g in flips) if flips else ""))
    if r.tolerance is not None:
        parts.append(f"regressions beyond {r.tolerance:g}: " + ("; ".join(r.regressions) if r.regressions else "none"))
    return "; ".join(parts) + "."


def _layout(facts: dict[str, Any]) -> str:
    """'N-part split, ' for a split GGUF side, '' for one file (reports of older versions have no 'parts')."""
    n = facts.get("parts") or 1
    return f"{n}-part split, " if n > 1 else ""


def _md_row(cells: list[Any]) -> str:
    return "| " + " | ".join(md_cell(c) for c in cells) + " |"


def render_markdown(r: DiffReport) -> str:
    """diff.md: summary, metric deltas, gate changes, tensors whose type changed, metadata changes. Every value
    that comes from a file (names, paths, metadata keys and values) is escaped: literal text, never HTML/Markdown."""
    lines = [f"## quantgate diff: {md_code(Path(r.a['path']).name)} -> {md_code(Path(r.b['path']).name)}", "",
             md_escape(r.summary, 4000), ""]
    if r.metrics is not None:
        lines += ["| metric | A | B | delta |", "|---|---|---|---|"]
        lines += [_md_row([k, fmt(r.metrics['a'][k]), fmt(r.metrics['b'][k]), fmt(r.metrics['delta'][k], '+.4g')])
                  for k in r.metrics["a"]]
        lines.append("")
    if r.gates:
        lines += ["| gate | A | B |", "|---|---|---|"]
        lines += [_md_row([g['name'], f"{fmt(g['a_value'])} {'pass' if g['a_passed'] else 'FAIL'}",
                           f"{fmt(g['b_value'])} {'pass' if g['b_passed'] else 'FAIL'}"]) for g in r.gates]
        lines.append("")
    changed = [t for t in r.tensors if t["type_a"] != t["type_b"]]
    if changed:
        lines += ["| tensor | type A | type B | bytes A | bytes B | rel RMSE A | rel RMSE B |", "|---|---|---|---|---|---|---|"]
        lines += [_md_row([t['name'], t['type_a'], t['type_b'], fmt(t['bytes_a']), fmt(t['bytes_b']),
                           fmt(t['rel_rmse_a'], '.5f'), fmt(t['rel_rmse_b'], '.5f')]) for t in changed]
        lines.append("")
    for kind in ("added", "removed", "changed"):
        for k, v in r.metadata[kind].items():
            lines.append(f"- metadata {kind}: {md_code(k, 200)} = {md_code(json.dumps(v, default=str), 200)}")
    return "\n".join(lines) + "\n"


def _plot_rel_rmse(r: DiffReport) -> str | None:
    rows = [t for t in r.tensors if t["rel_rmse_a"] is not None and t["rel_rmse_b"] is not None]
    if not rows:
        return None

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2))
    x = range(len(rows))
    ax.plot(x, [t["rel_rmse_a"] for t in rows], "o", label=plot_label(Path(r.a["path"]).name), markersize=4)
    ax.plot(x, [t["rel_rmse_b"] for t in rows], "s", label=plot_label(Path(r.b["path"]).name), markersize=4)
    ax.set_yscale("log")
    ax.set_xlabel("tensor (file order)")
    ax.set_ylabel("relative RMSE vs baseline")
    ax.set_title("Per-tensor error, A vs B")
    legend_outside(ax, fontsize=8)
    uri = png_data_uri(fig, dpi=90)
    return uri


def render_html(r: DiffReport) -> str:
    """diff.html: self-contained page with the Markdown's content as tables and an inline per-tensor error plot,
    rendered from validation/templates/diff.html.j2 with every value HTML-escaped."""

    tables: list[dict[str, Any]] = []
    if r.metrics is not None:
        tables.append({"title": "Metrics vs baseline", "head": ["metric", "A", "B", "delta"],
                       "rows": [[k, fmt(r.metrics["a"][k]), fmt(r.metrics["b"][k]), fmt(r.metrics["delta"][k], "+.4g")]
                                for k in r.metrics["a"]]})
    if (uri := _plot_rel_rmse(r)) is not None:
        tables.append({"title": "per-tensor error A vs B", "image": uri})
    tables.append({"title": "Tensors", "head": ["tensor", "type A", "type B", "bytes A", "bytes B", "rel RMSE A",
                                                "rel RMSE B"],
                   "rows": [[t["name"], str(t["type_a"]), str(t["type_b"]), fmt(t["bytes_a"]), fmt(t["bytes_b"]),
                             fmt(t["rel_rmse_a"], ".5f"), fmt(t["rel_rmse_b"], ".5f")] for t in r.tensors],
                   "text_cols": (0,)})
    tables.append({"title": "Metadata", "head": ["metadata", "key", "value"],
                   "rows": [[kind, k, json.dumps(v, default=str)[:200]] for kind in ("added", "removed", "changed")
                            for k, v in r.metadata[kind].items()], "text_cols": (1, 2)})
    # every key the template reads, on every table (the environment's StrictUndefined fails on a missing one)
    # control characters shown escaped, each value on one line (HTML escaping is the template's autoescape)
    tables = [{"title": "", "image": None, "head": None, "text_cols": (0,), **t, "rows": [[one_line(c, 100_000) for c in row]
                                                                       for row in t.get("rows", [])]}
              for t in tables]
    return render(_TEMPLATES, "diff.html.j2", summary=one_line(r.summary, 100_000), tables=tables)


def write_diff_reports(r: DiffReport, report_dir: "str | os.PathLike[str] | None" = None) -> Path:
    """Write diff.json/.md/.html atomically into <report_dir>/diff-<a sha12>-<b sha12>/ (default report dir:
    <b>.reports/); returns the folder."""
    b = Path(r.b["path"])
    root = Path(report_dir) if report_dir is not None else default_report_root(b)
    with Staging(root, f"diff-{r.a['sha256'][:12]}-{r.b['sha256'][:12]}") as st:
        atomic_write_text(st.path / "diff.json", json.dumps(r.to_dict(), indent=2, default=str) + "\n")
        atomic_write_text(st.path / "diff.md", render_markdown(r))
        atomic_write_text(st.path / "diff.html", render_html(r))
        st.publish()
    return st.final


__all__ = ["DiffReport", "DEFAULT_GATED", "diff", "diff_metadata", "summarize", "render_markdown", "render_html",
           "write_diff_reports"]
