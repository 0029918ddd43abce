"""Validation reports: validation.json (versioned schema), validation.md (PR comment), validation.html (one
self-contained page with inline PNG plots), verdict.json, junit.xml, written into one folder per artifact SHA-256.

The folder is built under a temporary name beside its final place and renamed into place when complete, so a
reader sees either the previous complete report or the new complete one, never a mix. Layout: docs/VALIDATION.md.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_text
from core.hashing import file_sha256
from core.png import legend_outside, png_data_uri, pyplot
from core.templating import render
from core.text import MdSafe, md_cell, md_code, md_escape, one_line
from core.version import __version__
from validation.eval_report import EvalReport
from validation.junit import write_junit

SCHEMA = "quantgate.validation"
SCHEMA_VERSION = 1
_MISSING = "missing"


def default_report_root(artifact: Path) -> Path:
    """Where reports go unless told otherwise: `<artifact>.reports/` beside the artifact."""
    return artifact.parent / f"{artifact.name}.reports"


def artifact_key(artifact: Path) -> str:
    """The report folder's name: the artifact's SHA-256, or `missing` when it is not a readable file."""

    try:
        return file_sha256(artifact) if artifact.is_file() else _MISSING
    except OSError:
        return _MISSING


class Staging:
    """A temporary folder under `root` that replaces `root/name` in one rename on publish()."""

    def __init__(self, root: Path, name: str) -> None:
        self.root, self.final = Path(root), Path(root) / name
        self.path = Path()
        self._published = False

    def __enter__(self) -> "Staging":
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name[:16]}.", suffix=".tmp", dir=self.root))
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def reset(self) -> None:
        """Empty the staging folder (e.g. to leave only an error record)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()

    def publish(self) -> None:
        """Move the staged folder into place, replacing an older report of the same artifact."""
        old = None
        if self.final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.final.name[:16]}.", suffix=".old", dir=self.root))
            os.replace(self.final, old / "r")
        os.replace(self.path, self.final)
        self._published = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def cleanup(self) -> None:
        if not self._published and self.path != Path() and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


def write_error(folder: Path, error: BaseException, *, candidate: Path, baseline: Path, sha256: str) -> Path:
    """error.json: the one record left when inputs are unusable (exit 2)."""
    rec = {"schema": "quantgate.validation_error", "schema_version": SCHEMA_VERSION, "exit_code": 2,
           "error": str(error), "error_type": type(error).__name__, "candidate": str(candidate),
           "artifact_sha256": None if sha256 == _MISSING else sha256, "baseline": str(baseline),
           "created_at": _now()}
    path = folder / "error.json"
    atomic_write_text(path, json.dumps(rec, indent=2) + "\n")
    return path


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def payload(v: Any) -> dict[str, Any]:
    """validation.json's content: schema, artifact, baseline, gate set, verdict, and the EvalReport's fields at top
    level (overall, per_category, per_tensor, timings, dataset, ...; `eval_schema_version` is its version)."""

    d: dict[str, Any] = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "tool_version": __version__,
        "artifact": {k: x for k, x in v.facts.to_dict().items() if k not in ("tensor_shapes", "tensor_bytes")},
        "baseline_model": {"path": v.baseline, "sha256": v.baseline_sha256},
        "gate_set": v.gate_set.to_dict() | {"sha256": v.gate_set.sha256()},
        "verdict": v.verdict.to_dict(),
    }
    if v.eval_report is not None:
        ev = v.eval_report.to_dict()
        ev["eval_schema_version"] = ev.pop("schema_version")
        ev.pop("tool_version", None)
        d.update(ev)
    return d


def eval_report_of(d: dict[str, Any]) -> Any:
    """The EvalReport inside a validation.json dict, or None when evaluation was skipped."""

    if "overall" not in d:
        return None
    ev = {k: x for k, x in d.items() if k not in ("schema", "artifact", "baseline_model", "gate_set", "verdict")}
    ev["schema_version"] = ev.pop("eval_schema_version")
    return EvalReport.from_dict(ev)


# ------------------------------------------------------------------------------------------------ formatting


def fmt(v: Any, spec: str = ".6g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def gate_line(g: Any) -> str:
    """One gate as text: `name: value <op> threshold -> PASS` (or its detail for non-metric gates)."""
    state = "SKIP" if g.skipped else ("PASS" if g.passed else "FAIL")
    if g.kind == "metric" and g.threshold is not None and not g.skipped:
        return f"{g.name}: {fmt(g.value)} {g.comparator} {g.threshold:g} -> {state}"
    return f"{g.name}: {state}" + (f" ({g.detail})" if g.detail else "")


def summary_line(verdict: Any) -> str:
    """The one line that states the verdict and the numbers that decided it (the CLI prints it last)."""
    failed = [g for g in verdict.gates if not g.passed and not g.skipped]
    metric = [g for g in verdict.gates if g.kind == "metric" and not g.skipped]
    n = len(verdict.gates)
    if verdict.passed:
        nums = "; ".join(f"{g.metric}{'@' + g.category if g.category else ''}={fmt(g.value)} "
                         f"{g.comparator} {g.threshold:g}" for g in metric[:4])
        return f"PASSED: {n}/{n} gates passed" + (f"; {nums}" if nums else "") + f" [{verdict.artifact_sha256[:12]}]"
    shown = []
    for g in failed[:3]:
        if g.kind == "metric" and g.value is not None:
            shown.append(f"{g.metric}{'@' + g.category if g.category else ''}={fmt(g.value)} breaks "
                         f"{g.comparator} {g.threshold:g}")
        else:
            shown.append(f"{g.name} ({g.detail[:120]})")
    more = f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""
    return f"FAILED: {len(failed)} of {n} gates failed: {'; '.join(shown)}{more} [{verdict.artifact_sha256[:12]}]"


_MD_METRICS = (("PPL baseline", "ppl_baseline", ".4f"), ("PPL candidate", "ppl_candidate", ".4f"),
               ("PPL ratio", "ppl_ratio", ".5f"), ("KL mean", "kl_mean", ".6f"), ("KL median", "kl_median", ".6f"),
               ("KL p99", "kl_p99", ".6f"), ("KL max", "kl_max", ".6f"), ("top-1 agreement", "top1_agreement", ".4f"),
               ("accuracy baseline", "acc_baseline", ".4f"), ("accuracy candidate", "acc_candidate", ".4f"),
               ("accuracy drop", "accuracy_drop", ".5f"), ("scored tokens", "n_tokens", "d"))


def _metric_rows(rep: Any) -> tuple[list[str], list[list[str]]]:
    # "value ± standard error" where the metric has one (llama-perplexity's style), plus the KL upper bound row
    se = {"ppl_baseline": "ppl_baseline_se", "ppl_candidate": "ppl_candidate_se", "ppl_ratio": "ppl_ratio_se",
          "kl_mean": "kl_mean_se", "top1_agreement": "top1_agreement_se"}
    rows = list(_MD_METRICS)
    rows.insert(4, ("KL mean upper 95%", "kl_mean_upper95", ".6f"))

    def cell(m: Any, f: str, spec: str) -> str:
        v, e = fmt(getattr(m, f), spec), getattr(m, se.get(f, ""), None)
        return v if e is None or e != e or v == "-" else f"{v} ± {fmt(e, spec)}"

    sets = [("overall", rep.overall)] + list(rep.per_category.items())
    head = ["metric"] + [n for n, _ in sets]
    return head, [[label] + [cell(m, f, spec) for _, m in sets] for label, f, spec in rows]


def _md_table(head: list[Any], rows: list[list[Any]]) -> str:
    """A Markdown table; every cell is escaped as literal text (md_cell) unless it is already MdSafe."""
    esc = [[md_cell(c) for c in r] for r in [head] + rows]
    return "\n".join(["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in esc[1:]])


def _gate_rows(verdict: Any, gates: Any = None) -> list[list[Any]]:
    return [["skipped" if g.skipped else ("pass" if g.passed else MdSafe("**FAIL**")), g.kind, g.name, fmt(g.value),
             f"{g.comparator or ''} {fmt(g.threshold)}" if g.threshold is not None else "", g.detail[:200]]
            for g in (verdict.gates if gates is None else gates)]


#: validation.md stays a PR comment (GitHub's limit: 65,536 characters): at most this many rows per table and
#: category columns; the rest is in validation.html. Cells are cut to MD_CELL characters.
MD_MAX_ROWS = 15
MD_MAX_CATEGORIES = 6
MD_CELL = 160


def _md_cap(rows: list[Any], limit: int = MD_MAX_ROWS) -> tuple[list[Any], str]:
    """The first `limit` rows and a note naming how many more the HTML report holds ("" when none)."""
    more = len(rows) - limit
    return (rows[:limit], f"... and {more} more in validation.html") if more > 0 else (rows, "")


def gate_counts(verdict: Any) -> str:
    """`44 gates: 43 passed, 1 failed, 0 skipped` (structural, expectation and metric gates together)."""
    gs = verdict.gates
    n_skip = sum(1 for g in gs if g.skipped)
    n_pass = sum(1 for g in gs if g.passed and not g.skipped)
    return f"{len(gs)} gates: {n_pass} passed, {len(gs) - n_pass - n_skip} failed, {n_skip} skipped"


def render_markdown(v: Any) -> str:
    """validation.md, the PR comment: verdict, the failed gates, the quality gates, the quality table (overall and
    the first categories) and the worst tensors, each table capped (MD_MAX_ROWS, MD_MAX_CATEGORIES, MD_CELL) so
    the comment stays far below GitHub's 65,536 characters whatever the inputs; every gate and tensor is in
    validation.html. Every value that comes from a file (names, paths, gate details, categories) is escaped:
    literal text, never HTML, Markdown or a link."""
    vd = v.verdict
    icon = "✅" if vd.passed else "❌"
    lines = [f"## {icon} quantgate validation: {'PASSED' if vd.passed else 'FAILED'}", "",
             f"**{md_escape(summary_line(vd), 600)}**", "",
             f"{md_code(Path(v.facts.path).name)} (sha256 {md_code(vd.artifact_sha256[:16])}, "
             f"{fmt(v.facts.nbytes, ',d')} bytes) vs baseline {md_code(Path(v.baseline).name)} "
             f"({md_code(v.baseline_sha256[:16])}); gate set {md_code(vd.gate_set)}; {gate_counts(vd)}.", ""]

    def table(head: list[Any], rows: list[list[Any]]) -> list[str]:
        shown, more = _md_cap(rows)
        cut = [[c if isinstance(c, MdSafe) else md_cell(c, MD_CELL) for c in r] for r in shown]
        return [_md_table(head, cut)] + ([f"_{more}_"] if more else []) + [""]

    head = ["result", "kind", "gate", "value", "threshold", "detail"]
    failed = [g for g in vd.gates if not g.passed and not g.skipped]
    if failed:
        lines += ["### Failed gates", ""] + table(head, _gate_rows(vd, failed))
    quality = [g for g in vd.gates if g.kind == "metric"]
    if quality:
        lines += ["### Quality gates", ""] + table(head, _gate_rows(vd, quality))
    rep = v.eval_report
    if rep is not None:
        mhead, rows = _metric_rows(rep)
        ncat = len(mhead) - 2
        keep = 2 + min(ncat, MD_MAX_CATEGORIES)
        lines += [f"### Quality vs baseline ({fmt(rep.n_samples)} samples, {fmt(rep.n_tokens)} tokens, backend "
                  f"{md_escape(rep.backend, 40)})", ""]
        lines += table(mhead[:keep], [r[:keep] for r in rows])
        if ncat > MD_MAX_CATEGORIES:
            lines[-1:] = [f"_{ncat - MD_MAX_CATEGORIES} more categories in validation.html_", ""]
        worst = sorted(rep.per_tensor, key=lambda e: -(e.rel_rmse or 0.0))[:5]
        lines += ["### Worst tensors (relative RMSE)", ""]
        lines += table(["tensor", "type", "rel RMSE", "cosine"],
                       [[e.name, e.qtype, fmt(e.rel_rmse, ".5f"), fmt(e.cosine, ".6f")] for e in worst])
    else:
        lines += ["Evaluation skipped: a structural gate failed.", ""]
    lines += ["Full report: `validation.html` beside this file (every gate, the per-tensor table, the plots); "
              "`validation.json` and `junit.xml` hold the same results for tools.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots + HTML


def _layer(name: str) -> int:
    m = re.match(r"^blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def plot_label(text: Any, limit: int = 60) -> str:
    """Untrusted text as a plot label: one line, control characters escaped, `$` escaped (no mathtext parsing)."""
    return one_line(text, limit).replace("$", r"\$")


def _plain(x: Any) -> Any:
    """Strings in (nested lists/tuples/dicts of) report values on one line with control characters escaped;
    HTML escaping itself is the template's autoescape."""
    if isinstance(x, str):
        return one_line(x, 100_000)
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(i) for i in x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def plot_tensor_error(per_tensor: list[Any]) -> str:
    """Relative RMSE of every tensor by layer (one marker series per tensor kind), log scale, as a PNG data URI."""
    return png_data_uri(tensor_error_figure(per_tensor), dpi=90)


def tensor_error_figure(per_tensor: list[Any]) -> Any:
    """The figure of plot_tensor_error (legend outside the plot area)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    kinds: dict[str, list[tuple[int, float]]] = {}
    for e in per_tensor:
        if e.rel_rmse:
            kind = re.sub(r"^blk\.\d+\.", "", e.name).removesuffix(".weight")
            kinds.setdefault(kind, []).append((_layer(e.name), e.rel_rmse))
    for kind, pts in sorted(kinds.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "s", label=plot_label(kind), markersize=4)
    ax.set_yscale("log")
    ax.set_xlabel("layer (-1: outside the blocks)")
    ax.set_ylabel("relative RMSE")
    ax.set_title("Per-tensor weight error by layer")
    legend_outside(ax)
    ax.grid(alpha=0.3)
    return fig


def plot_categories(rep: Any) -> str:
    """KL mean, top-1 agreement, PPL ratio and accuracy drop per category (and overall), as a PNG data URI."""
    plt = pyplot()
    sets = [("overall", rep.overall)] + list(rep.per_category.items())
    metrics = ("kl_mean", "top1_agreement", "ppl_ratio", "accuracy_drop")
    fig, axes = plt.subplots(1, len(metrics), figsize=(12, 3.2), layout="constrained")   # no label over a neighbour
    for ax, m in zip(axes, metrics):
        vals = [getattr(x, m) for _, x in sets]
        ax.bar([plot_label(n) for n, _ in sets], [v if v is not None and math.isfinite(v) else 0 for v in vals],
               color=["#4c72b0"] + ["#55a868"] * (len(sets) - 1))
        ax.set_title(m, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle("Per-category metrics")
    uri = png_data_uri(fig, dpi=90)
    return uri


def plot_kl_distribution(rep: Any) -> str:
    """The KL divergence distribution per category from its summary statistics (median, mean, p99, max; log scale):
    the EvalReport keeps these, not the per-token values."""
    return png_data_uri(kl_distribution_figure(rep), dpi=90)


def kl_distribution_figure(rep: Any) -> Any:
    """The figure of plot_kl_distribution (legend outside the plot area)."""
    plt = pyplot()
    sets = [("overall", rep.overall)] + list(rep.per_category.items())
    stats = ("kl_median", "kl_mean", "kl_p99", "kl_max")
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / len(stats)
    for i, s in enumerate(stats):
        ys = [max(getattr(m, s) or 0.0, 1e-12) for _, m in sets]
        ax.bar([j + i * width for j in range(len(sets))], ys, width=width, label=s.replace("kl_", ""))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))], [plot_label(n) for n, _ in sets])
    ax.set_yscale("log")
    ax.set_ylabel("KL(baseline || candidate), nats")
    ax.set_title("KL divergence distribution per token")
    legend_outside(ax, fontsize=8)
    return fig


def expectation_suites(gates: list[Any]) -> dict[str, tuple[str, int, int, int, int]]:
    """Our summary of the Great Expectations results (in place of GX's Data Docs, which need a CDN for their
    styling): per suite, its table and how many expectations ran, passed, failed and were skipped."""
    out: dict[str, list[Any]] = {}
    for g in gates:
        if g.kind != "expectation":
            continue
        suite = g.name.split(":", 2)[1] if g.name.count(":") >= 1 else g.name
        row = out.setdefault(suite, [g.category or "", 0, 0, 0, 0])
        row[1] += 1
        row[2 if g.passed and not g.skipped else (4 if g.skipped else 3)] += 1
    return {k: (r[0], r[1], r[2], r[3], r[4]) for k, r in out.items()}


_TEMPLATES = Path(__file__).parent / "templates"


def render_html(v: Any) -> str:
    """validation.html: one self-contained page (inline CSS, plots as base64 PNG data URIs, no external links),
    rendered from templates/validation.html.j2 with every value HTML-escaped."""

    vd = v.verdict
    rep = v.eval_report

    def rows(gates: list[Any]) -> tuple[list[list[Any]], list[str]]:
        return ([[r[0].strip("*").upper()] + r[1:] for r in _gate_rows(vd, gates)],
                ["skip" if g.skipped else ("pass" if g.passed else "fail") for g in gates])

    failed = [g for g in vd.gates if not g.passed and not g.skipped]
    ctx: dict[str, Any] = {
        "vd": vd, "summary": summary_line(vd), "artifact_path": v.facts.path, "baseline": v.baseline,
        "baseline_sha256": v.baseline_sha256, "rep": rep, "counts": gate_counts(vd),
        "gate_head": ["result", "kind", "gate", "value", "threshold", "detail"],
        "suite_rows": [], "suite_classes": [],
    }
    ctx["gate_rows"], ctx["gate_classes"] = rows(list(vd.gates))
    ctx["failed_rows"], ctx["failed_classes"] = rows(failed)
    ctx["quality_rows"], ctx["quality_classes"] = rows([g for g in vd.gates if g.kind == "metric"])
    for name, (table, n, ok, bad, skip) in expectation_suites(vd.gates).items():
        ctx["suite_rows"].append([name, table, n, ok, bad, skip])
        ctx["suite_classes"].append("fail" if bad else ("skip" if skip == n else "pass"))
    if rep is not None:
        ctx["metric_head"], ctx["metric_rows"] = _metric_rows(rep)
        ctx["plots"] = [("per-tensor error by layer", plot_tensor_error(rep.per_tensor)),
                        ("per-category metrics", plot_categories(rep)),
                        ("KL divergence distribution", plot_kl_distribution(rep))]
        ctx["tensor_rows"] = [[e.name, e.qtype, fmt(e.bits_per_weight, ".3f"), fmt(e.mse, ".3e"),
                               fmt(e.rel_rmse, ".5f"), fmt(e.cosine, ".6f"), fmt(e.max_abs_error, ".3e")]
                              for e in rep.per_tensor]
    plots = ctx.pop("plots", [])
    ctx = {k: _PlainView(x) if k in ("vd", "rep") and x is not None else _plain(x) for k, x in ctx.items()}
    return render(_TEMPLATES, "validation.html.j2", plots=plots, **ctx)


class _PlainView:
    """An object whose string attributes read as one line with control characters escaped (for templates)."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __getattr__(self, name: str) -> Any:
        return _plain(getattr(self._obj, name))


def write_reports(folder: Path, v: Any, *, final: Path, junit_copy: "str | os.PathLike[str] | None" = None) -> dict:
    """Write validation.json/.md/.html, verdict.json and junit.xml into `folder` (the staging folder that becomes
    `final`); fills v.verdict.report_paths with the final paths and returns them."""

    names = {"validation_json": "validation.json", "validation_md": "validation.md",
             "validation_html": "validation.html", "verdict": "verdict.json", "junit": "junit.xml"}
    paths = {k: str(final / n) for k, n in names.items()}
    if (folder / "gx" / "index.html").exists():
        paths["data_docs"] = str(final / "gx" / "index.html")
    if junit_copy is not None:
        paths["junit_copy"] = str(junit_copy)
    v.verdict.report_paths = paths
    atomic_write_text(folder / names["validation_json"], json.dumps(payload(v), indent=2, allow_nan=False) + "\n")
    atomic_write_text(folder / names["verdict"], json.dumps(v.verdict.to_dict(), indent=2) + "\n")
    atomic_write_text(folder / names["validation_md"], render_markdown(v))
    atomic_write_text(folder / names["validation_html"], render_html(v))
    write_junit(v.verdict, folder / names["junit"])
    if junit_copy is not None:
        write_junit(v.verdict, junit_copy)
    return paths


__all__ = ["SCHEMA", "SCHEMA_VERSION", "default_report_root", "artifact_key", "Staging", "write_error", "payload",
           "eval_report_of", "fmt", "gate_line", "summary_line", "gate_counts", "expectation_suites", "render_markdown", "render_html", "plot_label",
           "plot_tensor_error", "tensor_error_figure", "plot_categories", "plot_kl_distribution",
           "kl_distribution_figure", "write_reports"]
