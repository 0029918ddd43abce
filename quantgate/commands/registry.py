"""Registry and audit commands: models list|show|download|check, register, promote, audit verify|export, report."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer

from quantgate.cli_app import app, cell, console, err_console, fail, handle_errors, lit

F = TypeVar("F", bound=Callable)
models_app = typer.Typer(no_args_is_help=True, help="Registered models: list, show, download, check.")
audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit trail: verify, export.")
app.add_typer(models_app, name="models")
app.add_typer(audit_app, name="audit")


def _registry_errors(fn: F) -> F:
    """handle_errors, plus MLflow's own exceptions (unreachable server, bad URI) as one line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except Exception as e:  # noqa: BLE001
            if type(e).__module__.startswith("mlflow"):
                fail(f"MLflow: {e}")
            raise

    return handle_errors(wrapper)  # type: ignore[return-value]


def _settings():
    from quantgate.config import registry_settings

    return registry_settings()


def _parse_reports(values: list[str]) -> dict[str, Path]:
    from core.errors import QuantGateError
    from registry.client import REPORT_ROLES

    out = {}
    for v in values:
        role, sep, path = v.partition("=")
        if not sep or role not in REPORT_ROLES or not path:
            raise QuantGateError(f"--report expects ROLE=PATH with ROLE one of {', '.join(REPORT_ROLES)}; got {v!r}")
        out[role] = Path(path)
    return out


@app.command()
@_registry_errors
def register(
    gguf: Path = typer.Argument(..., help="GGUF file to register"),
    verdict: Optional[Path] = typer.Option(None, "--verdict", help="Validation verdict JSON (absent: unvalidated)"),
    artifact: Optional[Path] = typer.Option(None, "--artifact", help="Artifact record JSON (`quantize --json`)"),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Registered model (default: source + sha)"),
    source_name: Optional[str] = typer.Option(None, "--source-name", help="Source model name for the default"),
    report: list[str] = typer.Option([], "--report", help="ROLE=PATH report to attach (validation_json, "
                                                          "validation_html, validation_md, junit, diff, profile, "
                                                          "audit, imatrix); the verdict's own reports by default"),
    compliance: bool = typer.Option(True, "--compliance/--no-compliance",
                                    help="Also store the version's compliance report (HTML) in its run"),
    as_json: bool = typer.Option(False, "--json", help="Print the registered version as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No upload progress, no library noise"),
) -> None:
    """Register a GGUF (+ its verdict) as an MLflow model version; the same artifact and job return the same one.
    The run gets the verdict's reports (validation.json/.md/.html, junit.xml) and the compliance report."""
    from core.records import QuantizedArtifact, Verdict, load_record
    from registry.client import VerdictRefused
    from registry.facts import verdict_reports
    from registry.registration import register_gguf

    v = load_record(Verdict, verdict) if verdict else None
    try:
        rv = register_gguf(gguf, settings=_settings(), verdict=v,
                           artifact=load_record(QuantizedArtifact, artifact) if artifact else None,
                           reports={**verdict_reports(v), **_parse_reports(report)}, model_name=model_name,
                           source_name=source_name, compliance=compliance)
    except VerdictRefused as e:
        fail(str(e), 1)
        return
    if as_json:
        print(json.dumps(rv.to_dict(), indent=2, sort_keys=True))
        return
    what = "registered" if rv.created else "already registered"
    console.print(f"{what}: {lit(rv.model_name)} v{lit(rv.version)} ({rv.verdict}) sha256 {rv.artifact_sha256[:16]} "
                  f"run {rv.run_id}", highlight=False)


@app.command()
@_registry_errors
def promote(
    model: str = typer.Argument(..., help="Registered model name"),
    version: str = typer.Argument(..., help="Model version number"),
    alias: str = typer.Argument(..., help="Alias: validated, production, or a mix name like q4_k_m"),
    reason: str = typer.Option("", "--reason", help="Why (kept in the audit trail)"),
) -> None:
    """Point an alias at a version whose validation passed; refuse (exit 1, audited) failed or unvalidated ones."""
    from registry.client import PromotionRefused
    from registry.registration import promote as do_promote

    try:
        mv = do_promote(model, version, alias, settings=_settings(), reason=reason)
    except PromotionRefused as e:
        fail(str(e), 1)
        return
    console.print(f"{lit(model)}@{lit(alias)} -> v{lit(mv.version)} (aliases now: {lit(', '.join(mv.aliases))})",
                  highlight=False)


@models_app.command("list")
@_registry_errors
def models_list(as_json: bool = typer.Option(False, "--json", help="Machine-readable output")) -> None:
    """List registered models with their version counts and aliases."""
    from rich.table import Table

    from registry.queries import list_models

    rows = list_models(_settings())
    if as_json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return
    t = Table("model", "versions", "aliases", "source sha256")
    for r in rows:
        t.add_row(cell(r["name"]), str(r["versions"]),
                  cell(", ".join(f"{a}->v{v}" for a, v in sorted(r["aliases"].items()))), cell(r["source_sha256"][:16]))
    console.print(t)


@models_app.command("show")
@_registry_errors
def models_show(
    model: str = typer.Argument(..., help="Registered model name"),
    version: Optional[str] = typer.Argument(None, help="Version (default: all versions)"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
) -> None:
    """Show a model's versions (or one version) with verdict, aliases, SHA-256 and tags."""
    from rich.table import Table

    from registry.queries import show

    rows = show(model, version, settings=_settings())
    if as_json:
        print(json.dumps(rows, indent=2, sort_keys=True, default=str))
        return
    t = Table("version", "verdict", "aliases", "precision", "file type", "sha256", "job key")
    for r in rows:
        tg = r["tags"]
        t.add_row(cell(r["version"]), cell(tg.get("verdict", "") + (" (rejected)" if tg.get("rejected") == "true" else "")),
                  cell(", ".join(r["aliases"])), cell(tg.get("precision", "")), cell(tg.get("file_type", "")),
                  cell(tg.get("sha256", "")[:16]), cell(tg.get("job_key", "")[:16]))
    console.print(t)
    if version is not None:
        for k, v in sorted(rows[0]["tags"].items()):
            console.print(f"  {lit(k)}: {lit(v)}", highlight=False)


@models_app.command("download")
@_registry_errors
def models_download(
    ref: str = typer.Argument(..., help="[models:/]MODEL@ALIAS (or MODEL/VERSION)"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the GGUF into"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar"),
) -> None:
    """Download a version's GGUF (with a progress bar in bytes on a terminal, a few plain lines otherwise), check its
    SHA-256 against the registry, and audit the download."""
    from registry.queries import download

    path = download(ref, out, settings=_settings())  # the bytes go to handle_errors' transfer view
    console.print(f"downloaded {lit(ref)} to {lit(path)}", highlight=False)


def _registry_check(settings, events):
    from registry.trust import check_registry, verdict_key

    return check_registry(settings, events, verdict_key())


def _print_findings(check) -> None:
    for f in check.findings:
        err_console.print(f"[red]{lit(f.kind)}[/] {lit(f.model)} v{lit(f.version)}: {lit(f.message)}", highlight=False,
                          soft_wrap=True)
    console.print(lit(check.summary()), highlight=False)


@models_app.command("check")
@_registry_errors
def models_check(as_json: bool = typer.Option(False, "--json", help="Machine-readable output")) -> None:
    """Check MLflow against the audit chain: every alias on a version whose validation passed (per the chain, not
    tags), every version's audit_event_hash anchor in the chain. Reads only; exit 1 when anything is not backed."""
    from registry.audit import read_only_verify

    s = _settings()
    _, events = read_only_verify(s.audit_db_url)
    check = _registry_check(s, events)
    if as_json:
        print(json.dumps(check.to_dict(), indent=2, sort_keys=True))
    else:
        _print_findings(check)
    raise typer.Exit(0 if check.ok else 1)


@audit_app.command("verify")
@_registry_errors
def audit_verify(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
    chain_only: bool = typer.Option(False, "--chain-only", help="Skip the MLflow cross-check (`models check`)"),
) -> None:
    """Recompute the audit chain (read-only); list every edited, deleted, inserted or reordered event; cross-check
    MLflow (aliases on unvalidated versions, anchors the chain lacks); exit 1 if anything is wrong."""
    from registry.audit import read_only_verify

    s = _settings()
    rep, events = read_only_verify(s.audit_db_url)
    check = None if chain_only else _registry_check(s, events)
    ok = rep.ok and (check is None or check.ok)
    if as_json:
        print(json.dumps(rep.to_dict() | ({"registry": check.to_dict()} if check else {}), indent=2, sort_keys=True))
    else:
        for p in rep.problems:
            err_console.print(f"[red]{lit(p.kind)}[/] at position {p.position}: {lit(p.message)}", highlight=False,
                              soft_wrap=True)
        console.print(lit(rep.summary()), highlight=False)
        if check is not None:
            _print_findings(check)
    raise typer.Exit(0 if ok else 1)


@audit_app.command("export")
@_registry_errors
def audit_export(
    model: str = typer.Option(..., "--model", help="Registered model name"),
    version: Optional[str] = typer.Option(None, "--version", help="One version (with its artifact's events)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="JSONL file (default: ./audit-MODEL[-vN].jsonl)"),
    attach: bool = typer.Option(True, "--attach/--no-attach", help="Attach to the version's MLflow run"),
) -> None:
    """Write a model's (or one version's) audit events as JSON lines and attach them to the version in MLflow."""
    from registry.queries import export_events

    path, n = export_events(model, version, out, settings=_settings(), attach=attach)
    console.print(f"wrote {n} events to {lit(path)}", highlight=False)


@app.command()
@_registry_errors
def report(
    model: str = typer.Argument(..., help="Registered model name"),
    version: str = typer.Argument(..., help="Model version"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the report into"),
    fmt: str = typer.Option("html", "--format", "-f", help="html | md | json"),
    attach: bool = typer.Option(True, "--attach/--no-attach", help="Store the report beside the version in MLflow"),
) -> None:
    """Write a version's compliance report: lineage, gates, plots, environment, audit chain verification."""
    from registry.compliance import write_report

    path = write_report(model, version, out, fmt, settings=_settings(), attach=attach)
    console.print(f"wrote {lit(path)}", highlight=False)
