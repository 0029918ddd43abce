"""The client side of the Celery runner: the job as a canvas of task signatures (by name), submit, and status.

The tasks themselves live in tasks/ (the floor above); this module only names them, so the CLI can send jobs and
read their state without importing the workers' code. Task names: quantgate.{profile,quantize,validate,register,
collect}.
"""
from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from celery import chain, chord, group
from celery.canvas import Signature

from core.errors import QuantGateError
from core.records import is_auto
from quantgate.broker import app
from quantgate.config import load_settings
from quantgate.jobs import JobSpec, check_job_paths

STAGES = ("quantize", "validate", "register")
_MANIFEST = "quantgate-job-{}"


def _sig(step: str, *args: Any, partial: bool = False) -> Signature:
    """A signature of task quantgate.<step>; partial ones take the previous task's result as first argument,
    the others are immutable (they ignore it)."""
    return app.signature(f"quantgate.{step}", args=args, immutable=not partial)


def stage_list(spec: JobSpec) -> list[str]:
    """The per-mix stages this spec runs."""
    return ["quantize"] + (["validate"] if spec.gates is not None else []) + (["register"] if spec.register else [])


def task_id(job_id: str, mix: str, stage: str) -> str:
    """Deterministic task ids, so `status` can find every task of a job from its id alone."""
    return f"{job_id}.{mix}.{stage}"


def pipeline(spec: JobSpec, job_id: str) -> Any:
    """The job as a Celery canvas: [profile ->] chord(one chain per mix: quantize -> validate -> register)(collect).

    A job on a model reference (spec.model_ref) starts with a `resolve` task: a worker resolves the reference and
    pins it (quantgate.source_record: the version of an alias, the commit of a revision); its source record is
    handed down the chain (profile passes it on, each quantize gets it, validate and collect read it from the
    records), and every task opens that pinned source on its own machine, SHA-256 checked."""
    chains = []
    d = spec.to_dict()
    ref = spec.model_ref
    model = () if ref else (spec.model,)  # a reference job's tasks get the source record from the chain instead
    auto = {"profile_options": d["profile_options"], "auto_target": spec.auto_target}
    for mix in spec.mixes:
        steps = [_sig("quantize", *model, mix, spec.workdir, spec.model_name, auto if is_auto(mix) else None,
                      d["split"] or None, partial=ref).set(task_id=task_id(job_id, mix, "quantize"))]
        if spec.gates is not None:
            steps.append(_sig("validate", None if ref else spec.model, d["gates"], spec.dataset, d["options"],
                              partial=True).set(task_id=task_id(job_id, mix, "validate")))
        if spec.register:
            steps.append(_sig("register", spec.model_name, partial=True).set(task_id=task_id(job_id, mix, "register")))
        chains.append(chain(*steps))
    body = chord(group(chains), _sig("collect", None if ref else spec.model, partial=True).set(task_id=job_id))
    head = [_sig("resolve", spec.model, spec.model_repo, spec.model_rev).set(task_id=f"{job_id}.source")] if ref \
        else []
    if spec.needs_profile:
        head.append(_sig("profile", *model, spec.workdir, d["profile_options"], partial=ref)
                    .set(task_id=f"{job_id}.profile"))
    return chain(*head, body) if head else body


def _safe_url(url: Any) -> str:
    """A broker/backend URL without its password."""
    return re.sub(r"://[^@/]*@", "://***@", str(url or ""))


@contextlib.contextmanager
def reported_unreachable() -> Any:
    """For the CLI: Redis/RabbitMQ down or unreachable becomes one QuantGateError naming the URLs (exit 2), not a
    client traceback. (submit/job_status themselves raise the client's error, which callers such as the tasks'
    retry logic recognise as transient.)"""
    try:
        yield
    except QuantGateError:
        raise
    except Exception as e:  # noqa: BLE001 - only the broker clients' own errors and OSError are translated
        if isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("redis", "kombu", "amqp", "celery"):
            raise QuantGateError(
                f"cannot reach the broker ({_safe_url(app.conf.broker_url)}) or result backend "
                f"({_safe_url(app.conf.result_backend)}): {type(e).__name__}: {e}") from e
        raise


def submit(spec: JobSpec, job_id: str | None = None) -> str:
    """Send a job to the workers; returns its id (the id of its final task). The manifest lets `status` find
    the per-mix tasks later from the id alone."""
    check_job_paths(spec, load_settings())  # what the workers would refuse, refused before sending
    job_id = job_id or uuid.uuid4().hex
    manifest = {"job_id": job_id, "spec": spec.to_dict(), "stages": stage_list(spec), "submitted_at": time.time()}
    app.loader.import_default_modules()  # the task modules named in the app's `include` (eager mode runs them here)
    app.backend.set(_MANIFEST.format(job_id), json.dumps(manifest))
    _release(pipeline(spec, job_id).apply_async())
    return job_id


def _release(result: Any) -> None:
    """Unsubscribe from the sent tasks' result channels now: `status` reads state by id, and an AsyncResult left
    to the garbage collector would try to unsubscribe later, perhaps after Redis went away."""
    todo, seen = [result], set()
    while todo:
        r = todo.pop()
        if r is None or id(r) in seen:
            continue
        seen.add(id(r))
        todo += [getattr(r, "parent", None)] + list(getattr(r, "results", None) or [])
        if type(r).__name__ == "AsyncResult" and r.backend is not None:
            with contextlib.suppress(Exception):
                r.backend.remove_pending_result(r)
            r.backend = None
    # Results the canvas created internally (a chord's header tasks) that the returned result does not reach: the
    # backend holds them in its pending table; left there, their __del__ runs at interpreter exit and prints a
    # 19-line "Exception ignored ... sys.meta_path is None" after every successful submit.
    for r in _pending(app.backend):
        with contextlib.suppress(Exception):
            app.backend.remove_pending_result(r)
        r.backend = None


def _pending(backend: Any) -> list[Any]:
    """Every result object an asynchronous backend still tracks (its pending table maps task id -> result, or
    task id -> {id(result): result} in newer Celery)."""
    out = []
    for mapping in getattr(backend, "_pending_results", None) or ():
        for v in list(mapping.values()):
            out += list(v.values()) if isinstance(v, (dict, Mapping)) else [v]
    return [r for r in out if hasattr(r, "backend")]


def load_manifest(job_id: str) -> dict[str, Any] | None:
    """The manifest `submit` stored for a job, or None for an unknown id."""
    raw = app.backend.get(_MANIFEST.format(job_id))
    return json.loads(raw) if raw else None


def _meta(tid: str) -> dict[str, Any]:
    """A task's stored state without an AsyncResult (which subscribes to Redis pub/sub and lingers)."""
    meta = app.backend.get_task_meta(tid)
    if meta.get("status") in ("FAILURE", "RETRY", "REVOKED"):
        exc = app.backend.exception_to_python(meta.get("result"))
        meta["error"] = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    return meta


def job_status(job_id: str) -> dict[str, Any]:
    """The job's state with overall progress {done, total, percent, stage} and every task's state and error."""
    manifest = load_manifest(job_id)
    if manifest is None:
        raise QuantGateError(f"unknown job {job_id!r} (no manifest in the result backend; expired, lost with a "
                             f"restarted non-persistent Redis, or never submitted)")
    spec = manifest["spec"]
    stages = manifest["stages"]
    tasks: dict[str, dict[str, Any]] = {}
    frac = 0.0
    current = "queued"
    errors = []
    names = [(f"{mix}:{st}", task_id(job_id, mix, st)) for mix in spec["mixes"] for st in stages]
    js = JobSpec.from_dict(spec)
    if js.needs_profile:
        names.insert(0, ("profile", f"{job_id}.profile"))
    if js.model_ref:
        names.insert(0, ("source", f"{job_id}.source"))
    for name, tid in names:
        meta = _meta(tid)
        state = meta.get("status", "PENDING")
        info: dict[str, Any] = {"state": state, "retries": meta.get("retries") or 0}
        if state == "SUCCESS":
            frac += 1.0
        elif state == "PROGRESS" and isinstance(meta.get("result"), dict):
            frac += float(meta["result"].get("percent", 0.0)) / 100.0
            info.update(meta["result"])
            current = name
        elif state == "STARTED":
            current = name
        elif state in ("FAILURE", "REVOKED"):
            info["error"] = meta["error"]
            errors.append(f"{name}: {meta['error']}")
        elif state == "RETRY":
            info["error"] = meta["error"]
            current = f"{name} (retrying)"
        tasks[name] = info
    total = len(names)
    final = _meta(job_id)
    if final.get("status") == "SUCCESS":
        state, current = "SUCCESS", "done"
    elif errors:
        state = "FAILURE"
    elif frac > 0 or current != "queued":
        state = "PROGRESS"
    else:
        state = "PENDING"
    done = sum(1 for t in tasks.values() if t["state"] == "SUCCESS")
    return {"job_id": job_id, "state": state, "done": done, "total": total,
            "percent": round(100.0 * frac / total, 1) if total else 100.0, "stage": current, "tasks": tasks,
            "errors": errors, "result": final.get("result") if state == "SUCCESS" else None,
            "date_done": final.get("date_done") if state == "SUCCESS" else None}
