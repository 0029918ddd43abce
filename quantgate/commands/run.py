"""Pipeline runners: `run` (in-process), `submit` / `status` / `worker` (Celery + Redis), and `stage ...` (DVC)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from quantgate.cli_app import app, cell, console, err_console, fail, handle_errors, lit, model_repo_option, model_rev_option

stage_app = typer.Typer(no_args_is_help=True, help="One DVC stage each (dvc.yaml calls these): prepare, quantize, "
                                                   "validate, register, plots.")
app.add_typer(stage_app, name="stage")


def read_params(path: Path) -> dict[str, Any]:
    """params.yaml as a dict ({} when the file is absent); anchors/aliases and oversized files are refused."""
    from quantgate.config import read_params_file

    return read_params_file(path)


def build_spec(params_file: Path, model: Optional[str], mixes: list[str], workdir: Optional[Path],
               validate: Optional[bool], register: Optional[bool], model_name: Optional[str],
               profile: Optional[bool] = None, auto_target: Optional[str] = None,
               model_repo: Optional[str] = None, model_rev: Optional[str] = None, on_worker: bool = False,
               split_max_size: Optional[str] = None, split_max_tensors: Optional[int] = None):
    """A JobSpec from params.yaml with CLI flags on top (flags win). An AUTO mix implies the profile step.
    `--model X` replaces params' model whole: outputs and the default registered name follow X, and params'
    model.name (which names params' model) is not used for it. `on_worker` (submit): a reference that names a
    registry, the Hub or a DVC repository is checked and sent as a reference for the worker to resolve; anything
    else is a path, resolved here. Split output: --split-max-size/--split-max-tensors, else params split_max_size /
    split_max_tensors."""
    from quantgate.config import load_settings
    from quantgate.inputs import check_reference, is_repo_url, names_remote_source, resolve_model
    from quantgate.jobs import DEFAULT_AUTO_TARGET, PROFILE_OPTIONS, JobSpec

    p = read_params(params_file)
    from_params = model is None
    if from_params:
        model, model_repo, model_rev, params_name = params_model(p, params_file, model_repo, model_rev)
        model_name = model_name or params_name
    source_name = lineage = None
    ref: dict[str, Any] = {}
    if on_worker and names_remote_source(model, model_repo):
        check_reference(model, model_repo, model_rev)
        repo = model_repo if not model_repo or is_repo_url(model_repo) else str(Path(model_repo).resolve())
        model_path, ref = model, {"model_ref": True, "model_repo": repo, "model_rev": model_rev}
    else:
        src = resolve_model(model, repo=model_repo, rev=model_rev)
        model_path, lineage = src.path, src.lineage_json()
        # params' own plain path keeps its naming (outputs and registered name after params model.name)
        source_name = None if from_params and src.is_local else src.name
    chosen = tuple(mixes) or tuple(p.get("mixes") or ())
    if not chosen:
        fail("no mixes: pass --mix (repeatable) or set mixes in params.yaml")
    settings = load_settings(workdir=workdir)
    gates = p.get("gates") if (validate if validate is not None else bool(p.get("gates"))) else None
    ev = p.get("eval") or {}
    return JobSpec(model=str(model_path), mixes=chosen, workdir=str(settings.workdir), gates=gates,
                   dataset=ev.get("dataset"), register=bool(register) if register is not None else False,
                   model_name=model_name, profile=bool(profile), source_name=source_name, source_lineage=lineage,
                   options={k: v for k, v in ev.items() if k != "dataset"},
                   profile_options={k: v for k, v in (p.get("profile") or {}).items() if k in PROFILE_OPTIONS},
                   auto_target=str(auto_target or (p.get("auto") or {}).get("target") or DEFAULT_AUTO_TARGET),
                   split=split_from(p, split_max_size, split_max_tensors), **ref)


def params_model(params: dict[str, Any], params_file: Path, repo: Optional[str], rev: Optional[str]
                 ) -> tuple[str, Optional[str], Optional[str], Optional[str]]:
    """params.yaml's model as (reference, repo, rev, name): model.path is a model reference exactly like --model
    (a local path is relative to the current directory, as the DVC prepare stage reads it), model.repo/model.rev
    its DVC repository and revision (--model-repo/--model-rev win), model.name the registered name."""
    m = params.get("model")
    if m is None or (isinstance(m, dict) and m.get("path") in (None, "")):
        fail(f"no model: pass --model or set model.path in {params_file}")
    if not isinstance(m, dict):
        fail(f"{params_file}: model must be a mapping (path, name, repo, rev), got {type(m).__name__}")
    for key in ("path", "repo", "rev", "name"):
        v = m.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int, float))):
            fail(f"{params_file}: model.{key} must be text, got {type(v).__name__}")
    return str(m["path"]), repo or _opt(m.get("repo")), rev or _opt(m.get("rev")), _opt(m.get("name"))


def split_from(params: dict[str, Any], max_size: Optional[str], max_tensors: Optional[int]) -> dict[str, int]:
    """QuantizeRequest's split fields: the CLI flags when either is given, else params split_max_size /
    split_max_tensors (null or absent: one file)."""
    from quant.gguf_split import split_options

    if max_size is None and max_tensors is None:
        max_size, max_tensors = params.get("split_max_size"), params.get("split_max_tensors")
    return split_options(max_size, max_tensors)


def _use_broker(broker: Optional[str]) -> None:
    """CLI flag over environment: the Celery app reads QUANTGATE_BROKER_URL when quantgate.broker is first imported."""
    if broker is not None:
        os.environ["QUANTGATE_BROKER_URL"] = broker


def _results_table(result: dict[str, Any]) -> None:
    from rich.table import Table

    from quantgate.jobs import summarize

    t = Table("mix", "MiB", "bpw", "verdict", "version", "job key", "sha256")
    for r in summarize(result["results"]):
        verdict = "-" if r["passed"] is None else ("passed" if r["passed"] else "FAILED")
        t.add_row(cell(r["mix"]), f"{r['nbytes'] / 2**20:.2f}", f"{r['bits_per_weight']:.3f}", verdict,
                  cell(r["version"] or "-"), cell(r["job_key"][:12]), cell(r["sha256"][:12]))
    console.print(t)


_SPEC_HELP = dict(
    params=typer.Option(Path("params.yaml"), "--params", help="params.yaml to read model/mixes/gates from"),
    model=typer.Option(None, "--model", "-m", help="Checkpoint (HF folder, GGUF, Hub id in the HF cache, "
                                                   "models:/NAME/VERSION, or a path in --model-repo); outputs and the "
                                                   "registered model are named after it; default: params model.path, "
                                                   "the same kind of reference (model.repo/model.rev)"),
    model_repo=model_repo_option(),
    model_rev=model_rev_option(),
    mix=typer.Option([], "--mix", help="Mix to produce (repeatable); default: params mixes"),
    workdir=typer.Option(None, "--workdir", help="Where job folders go (default: settings workdir, out/jobs)"),
    validate=typer.Option(None, "--validate/--no-validate", help="Run the gates (default: when params has gates)"),
    register=typer.Option(None, "--register/--no-register", help="Register each artifact (default: no)"),
    model_name=typer.Option(None, "--model-name", help="Registered model name (default: params model.name)"),
    profile=typer.Option(None, "--profile/--no-profile",
                         help="Build the sensitivity profile first (params `profile:` options; an AUTO mix implies it)"),
    auto_target=typer.Option(None, "--auto-target",
                             help="Budget of the AUTO mix: a mix name (its size, default Q4_K_M), bits per weight "
                                  "(4.5) or a file size (3.9GB); default: params auto.target"),
    split_max_size=typer.Option(None, "--split-max-size",
                                help="Write split GGUFs (llama-gguf-split layout) with at most this much tensor data "
                                     "per part, e.g. 2G; default: params split_max_size"),
    split_max_tensors=typer.Option(None, "--split-max-tensors",
                                   help="Write split GGUFs with at most N tensors per part; default: params "
                                        "split_max_tensors"),
)


@app.command()
@handle_errors
def run(
    params: Path = _SPEC_HELP["params"], model: Optional[str] = _SPEC_HELP["model"],
    model_repo: Optional[str] = _SPEC_HELP["model_repo"], model_rev: Optional[str] = _SPEC_HELP["model_rev"],
    mix: list[str] = _SPEC_HELP["mix"], workdir: Optional[Path] = _SPEC_HELP["workdir"],
    validate: Optional[bool] = _SPEC_HELP["validate"], register: Optional[bool] = _SPEC_HELP["register"],
    model_name: Optional[str] = _SPEC_HELP["model_name"], profile: Optional[bool] = _SPEC_HELP["profile"],
    auto_target: Optional[str] = _SPEC_HELP["auto_target"],
    split_max_size: Optional[str] = _SPEC_HELP["split_max_size"],
    split_max_tensors: Optional[int] = _SPEC_HELP["split_max_tensors"],
    as_json: bool = typer.Option(False, "--json", help="Print the job result as JSON"),
) -> None:
    """Run the pipeline for one model over its mixes in this process (no broker); reruns reuse finished work."""
    from quantgate.jobs import run_job

    spec = build_spec(params, model, mix, workdir, validate, register, model_name, profile, auto_target,
                      model_repo, model_rev, split_max_size=split_max_size, split_max_tensors=split_max_tensors)
    result = run_job(spec)
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        _results_table(result)


@app.command()
@handle_errors
def submit(
    params: Path = _SPEC_HELP["params"], model: Optional[str] = _SPEC_HELP["model"],
    model_repo: Optional[str] = _SPEC_HELP["model_repo"], model_rev: Optional[str] = _SPEC_HELP["model_rev"],
    mix: list[str] = _SPEC_HELP["mix"], workdir: Optional[Path] = _SPEC_HELP["workdir"],
    validate: Optional[bool] = _SPEC_HELP["validate"], register: Optional[bool] = _SPEC_HELP["register"],
    model_name: Optional[str] = _SPEC_HELP["model_name"], profile: Optional[bool] = _SPEC_HELP["profile"],
    auto_target: Optional[str] = _SPEC_HELP["auto_target"],
    split_max_size: Optional[str] = _SPEC_HELP["split_max_size"],
    split_max_tensors: Optional[int] = _SPEC_HELP["split_max_tensors"],
    broker: Optional[str] = typer.Option(None, "--broker", help="Broker URL (default: QUANTGATE_BROKER_URL)"),
) -> None:
    """Send the pipeline to the Celery workers; print the job id (`quantgate status JOB --watch` follows it).
    A models:/ reference, Hub id or --model-repo path is resolved by the worker; a plain path must exist there."""
    _use_broker(broker)
    spec = build_spec(params, model, mix, workdir, validate, register, model_name, profile, auto_target,
                      model_repo, model_rev, on_worker=True, split_max_size=split_max_size,
                      split_max_tensors=split_max_tensors)
    d = spec.to_dict()
    calib = d["profile_options"].get("calib")
    paths = {"model": spec.model if spec.model_ref else str(Path(spec.model).resolve()),  # a reference: as given
             "workdir": str(Path(spec.workdir).resolve()),
             "dataset": str(Path(spec.dataset).resolve()) if spec.dataset else None,
             "profile_options": {**d["profile_options"], **({"calib": str(Path(calib).resolve())} if calib else {})}}
    spec = type(spec).from_dict({**d, **paths})  # workers may run elsewhere: absolute paths on shared storage
    from quantgate.dispatch import reported_unreachable
    from quantgate.dispatch import submit as send

    with reported_unreachable():
        job_id = send(spec)
    print(job_id)


def _render_tasks(st: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table("task", "state", "progress", "error")
    for name, info in st["tasks"].items():
        prog = f"{info['percent']:.0f}%" if "percent" in info else ""
        t.add_row(cell(name), cell(info["state"]), cell(prog), cell(info.get("error", "")))
    console.print(t)


@app.command()
@handle_errors
def status(
    job: str = typer.Argument(..., help="Job id printed by `quantgate submit`"),
    watch: bool = typer.Option(False, "--watch", "-w", help="Follow the job with a live progress bar until it ends"),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between polls with --watch"),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON"),
    broker: Optional[str] = typer.Option(None, "--broker", help="Broker URL (default: QUANTGATE_BROKER_URL)"),
) -> None:
    """Show a submitted job's state and progress; exit 0 when it succeeded, 1 when it failed, 3 while running."""
    _use_broker(broker)
    from quantgate.dispatch import reported_unreachable

    with reported_unreachable():
        _status(job, watch, interval, as_json)


def _status(job: str, watch: bool, interval: float, as_json: bool) -> None:
    from quantgate.dispatch import job_status

    st = job_status(job)
    if watch and st["state"] not in ("SUCCESS", "FAILURE"):
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(TextColumn("[bold]{task.fields[job]}[/]"), BarColumn(), TaskProgressColumn(),
                      TimeElapsedColumn(), TextColumn("{task.description}"), console=err_console,
                      transient=False) as progress:
            bar = progress.add_task(lit(st["stage"], 80), total=100.0, job=lit(job[:12]))
            while True:
                progress.update(bar, completed=st["percent"], description=f"{lit(st['stage'], 80)} ({st['done']}/"
                                                                           f"{st['total']} tasks)")
                if st["state"] in ("SUCCESS", "FAILURE"):
                    break
                time.sleep(interval)
                st = job_status(job)
    if as_json:
        print(json.dumps(st, indent=2, sort_keys=True, default=str))
    else:
        console.print(f"job {lit(job)}: [bold]{lit(st['state'])}[/] {st['percent']:.1f}% ({st['done']}/{st['total']} tasks) "
                      f"{lit(st['stage'])}", highlight=False)
        _render_tasks(st)
        if st["result"]:
            _results_table(st["result"])
    raise typer.Exit({"SUCCESS": 0, "FAILURE": 1}.get(st["state"], 3))


@app.command()
def worker(
    concurrency: int = typer.Option(0, "--concurrency", help="Pool processes (0: settings, default 2)"),
    pidfile: Optional[Path] = typer.Option(None, "--pidfile", help="Write the main process id here"),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l", help="DEBUG INFO WARNING ERROR"),
    hostname: Optional[str] = typer.Option(None, "--hostname", "-n", help="Node name (default: quantgate@%h)"),
    logfile: Optional[Path] = typer.Option(None, "--logfile", help="Log to this file instead of stderr"),
    broker: Optional[str] = typer.Option(None, "--broker", help="Broker URL (default: QUANTGATE_BROKER_URL)"),
) -> None:
    """Start a Celery worker on quantgate's app (acks late, prefetch 1, requeue on crash); Ctrl-C stops it."""
    from quantgate.config import load_settings

    _use_broker(broker)
    s = load_settings()
    if s.embedded:
        fail("no broker configured (QUANTGATE_BROKER_URL is empty or memory://): a worker needs Redis")
    from core.errors import QuantGateError

    try:
        from quantgate.broker import check_settings  # raises on import too: the app is configured there

        check_settings(s)
    except QuantGateError as e:
        fail(str(e))
    argv = [sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "-Q", "quantgate",
            "--concurrency", str(concurrency or s.worker_concurrency), "--loglevel", loglevel,
            "--hostname", hostname or "quantgate@%h", "--without-gossip", "--without-mingle"]
    if pidfile is not None:
        argv += ["--pidfile", str(pidfile)]
    if logfile is not None:
        argv += ["--logfile", str(logfile)]
    os.execv(sys.executable, argv)


# ---------------------------------------------------------------------------------------------- DVC stages


@stage_app.command("prepare")
@handle_errors
def stage_prepare(
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Model reference: HF folder or GGUF path, Hub id in the HF cache, "
                                             "models:/NAME/VERSION or models:/NAME@ALIAS, a path in --model-repo; "
                                             "default: params model.path"),
    model_repo: Optional[str] = model_repo_option(),
    model_rev: Optional[str] = model_rev_option(),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml (model.path/repo/rev)"),
    out: Path = typer.Option(..., "--out", "-o", help="JSON file for the source record (source.json)"),
) -> None:
    """Resolve the model reference, check it loads and record what it names (source.json: the reference, what it
    resolved to and how to resolve exactly that again, SHA-256, fingerprint, lineage); later stages open that."""
    from quantgate.source_record import prepare_source, write_source

    if model is None:
        model, model_repo, model_rev, _name = params_model(read_params(params), params, model_repo, model_rev)
    rec, _ = prepare_source(model, repo=model_repo, rev=model_rev)
    write_source(rec, out)
    console.print(f"{lit(rec.ref)}: {lit(rec.resolved)} ({rec.kind}, {lit(rec.checkpoint_kind)}), sha256 "
                  f"{rec.sha256[:16]}", highlight=False)


def _opt(v: Any) -> Optional[str]:
    """An optional params.yaml text field: empty or absent -> None."""
    return str(v) if v not in (None, "") else None


@stage_app.command("profile-content")
@handle_errors
def stage_profile_content(
    profile: Path = typer.Option(..., "--profile", help="Profile JSON that `quantgate profile` wrote"),
    out: Path = typer.Option(..., "--out", "-o", help="The profile's content, for DVC to track"),
) -> None:
    """Write a profile without its run facts (timings, cache hits) and with floats rounded, so a fresh
    `dvc repro` writes the same file (the AUTO mix is planned from it)."""
    from core.errors import QuantGateError
    from quantgate.dvc_report import profile_content, write_json

    try:
        d = json.loads(profile.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QuantGateError(f"cannot read profile {profile}: {e}") from e
    if not isinstance(d, dict):
        raise QuantGateError(f"{profile}: not a profile (expected a JSON object)")
    write_json(out, profile_content(d))
    console.print(f"wrote {lit(out)}", highlight=False)


@stage_app.command("quantize")
@handle_errors
def stage_quantize(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint: HF folder or GGUF (or --source)"),
    source: Optional[Path] = typer.Option(None, "--source", help="The prepare stage's source.json: its model, "
                                                                 "SHA-256 checked, lineage written into the GGUF"),
    mix: str = typer.Option(..., "--mix", help="llama.cpp mix, e.g. Q4_K_M"),
    out_dir: Path = typer.Option(..., "--out-dir", help="Folder for model-<MIX>.gguf and artifact.json"),
    metrics: Optional[Path] = typer.Option(None, "--metrics", help="Also write size/bpw/weight-error metrics JSON"),
    tensor_errors: Optional[Path] = typer.Option(None, "--tensor-errors", help="Also write per-tensor errors JSON"),
    profile: Optional[Path] = typer.Option(None, "--profile", help="AUTO: the sensitivity profile (profile stage)"),
    auto_target: str = typer.Option("Q4_K_M", "--auto-target",
                                    help="AUTO budget: a mix name (its size), bits per weight or a file size"),
    params: Optional[Path] = typer.Option(None, "--params", help="params.yaml whose split_max_size / "
                                                                 "split_max_tensors make split GGUFs"),
    split_max_size: Optional[str] = _SPEC_HELP["split_max_size"],
    split_max_tensors: Optional[int] = _SPEC_HELP["split_max_tensors"],
) -> None:
    """Quantize with one mix into out_dir (GGUF written atomically, then its artifact record) and its metrics;
    --mix AUTO quantizes with `--precision auto` from --profile under a budget policy (--auto-target).
    artifact.json is the content record (no durations: DVC hashes it); the time taken is printed."""
    from core.atomic import atomic_write_text
    from core.records import QuantizedArtifact
    from quantgate.dvc_report import quantize_metrics, tensor_error_rows, write_json
    from quantgate.jobs import ARTIFACT_JSON, is_auto, quantize_auto_step, quantize_step
    from quantgate.source_record import model_or_source

    src = model_or_source(model, source)
    split = split_from(read_params(params) if params is not None else {}, split_max_size, split_max_tensors)
    if is_auto(mix):
        if profile is None:
            fail("--mix AUTO needs --profile (the profile stage's output)")
        art = quantize_auto_step(src.path, profile, target=auto_target, out_dir=out_dir, name="model",
                                 source_lineage=src.lineage_json(), split=split)
    else:
        if profile is not None:
            fail("--profile is only used with --mix AUTO")
        art = quantize_step(src.path, mix, out_dir=out_dir, name="model", source_lineage=src.lineage_json(),
                            split=split)
    content = {**{k: v for k, v in art.items() if k not in ("reused", "seconds", "timings")},
               **QuantizedArtifact.from_dict(art).content_dict()}
    if not src.is_local:  # the reference, not this machine's download folder (what DVC tracks is content)
        content["source"] = src.ref
    atomic_write_text(out_dir / ARTIFACT_JSON, json.dumps(content, indent=2, sort_keys=True) + "\n")
    errs = tensor_error_rows(src.path, art["path"]) if (metrics or tensor_errors) else None
    for path, obj in ((tensor_errors, errs), (metrics, quantize_metrics(art, errs))):
        if path is not None:
            write_json(path, obj)
    took = f" in {art['seconds']:.1f}s" if isinstance(art.get("seconds"), (int, float)) else " (reused)"
    console.print(f"{lit(mix)}: {lit(art['path'])} {art['nbytes'] / 2**20:.2f} MiB {art['bits_per_weight']:.3f} bpw"
                  f"{took}", highlight=False)


@stage_app.command("validate")
@handle_errors
def stage_validate(
    artifact: Path = typer.Option(..., "--artifact", help="artifact.json of the quantize stage"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="The source model (or --source)"),
    source: Optional[Path] = typer.Option(None, "--source", help="The prepare stage's source.json: the baseline is "
                                                                 "its model, SHA-256 checked"),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml (gates, eval)"),
    out: Path = typer.Option(..., "--out", "-o", help="Verdict JSON (the run record; reports go beside it)"),
    summary: Optional[Path] = typer.Option(None, "--summary",
                                           help="Also write the verdict's content (no timestamps, no paths) here"),
    metrics: Optional[Path] = typer.Option(None, "--metrics", help="Also write PPL ratio/KLD/accuracy-drop JSON"),
    quantize_metrics: Optional[Path] = typer.Option(None, "--quantize-metrics",
                                                    help="The quantize stage's metrics JSON, merged into --metrics "
                                                         "(one metrics file per mix)"),
) -> None:
    """Run the validation gate (thresholds from params.yaml `gates`) and write the verdict (and its metrics)."""
    from quantgate.dvc_report import mix_metrics, validate_metrics, verdict_summary, write_json
    from quantgate.jobs import validate_step
    from quantgate.source_record import model_or_source

    base = model_or_source(baseline, source, "--baseline").path
    p = read_params(params)
    ev = dict(p.get("eval") or {})
    rec = json.loads(artifact.read_text(encoding="utf-8"))
    qm = json.loads(quantize_metrics.read_text(encoding="utf-8")) if quantize_metrics is not None else None
    v = validate_step(rec, baseline=base, gates=p.get("gates") or {}, dataset=ev.pop("dataset", None),
                      options=ev, out=out)
    if summary is not None:
        write_json(summary, verdict_summary(v))
    if metrics is not None:
        write_json(metrics, mix_metrics(qm, validate_metrics(v)))
    console.print(f"{lit(rec['recipe']['precision'])}: {'passed' if v.get('passed') else 'FAILED'}", highlight=False)


@stage_app.command("register")
@handle_errors
def stage_register(
    artifact: Path = typer.Option(..., "--artifact", help="artifact.json of the quantize stage"),
    verdict: Optional[Path] = typer.Option(None, "--verdict", help="Verdict JSON of the validate stage"),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Registered model name"),
    out: Path = typer.Option(..., "--out", "-o", help="JSON record of the registered version"),
) -> None:
    """Register the artifact (+ verdict) in the model registry (idempotent) and record the version (its content:
    model, version, artifact, verdict, alias; the MLflow run id is printed)."""
    from quantgate.dvc_report import registration_record, write_json
    from quantgate.jobs import register_step

    rec = json.loads(artifact.read_text(encoding="utf-8"))
    v = json.loads(verdict.read_text(encoding="utf-8")) if verdict else None
    rv = register_step(rec, v, model_name=model_name)
    write_json(out, registration_record(rv, bool(v and v.get("passed")), rec["recipe"]["precision"].lower()))
    console.print(f"{lit(rv['model_name'])} v{lit(rv['version'])} ({lit(rv['verdict'])}), MLflow run "
                  f"{lit(rv.get('run_id', ''))}", highlight=False)


@stage_app.command("plots")
@handle_errors
def stage_plots(
    metrics: list[Path] = typer.Option(..., "--metrics", help="A mix's metrics folder or JSON file (repeatable)"),
    tensor_errors: list[Path] = typer.Option([], "--tensor-errors", help="A mix's per-tensor errors JSON"),
    out_dir: Path = typer.Option(..., "--out-dir", help="Folder for the plots' data (JSON) and PNGs"),
) -> None:
    """The pipeline's plots: their data for `dvc plots show/diff` (bpw_vs_kld.json, layer_error.json) and the same
    plots as offline PNGs: bits/weight vs KL divergence (or weight error), per-tensor error by layer."""
    from quantgate.dvc_report import render_plots

    for p in render_plots(metrics, tensor_errors, out_dir):
        console.print(f"wrote {lit(p)}", highlight=False)
