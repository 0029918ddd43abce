"""Thin Celery wrappers over quantgate.jobs: profile, quantize, validate, register, and the per-model pipeline.

Tasks only move JSON records (never tensors or file contents); files live on storage every worker sees.
Transient failures (broker, Redis, MLflow or database unreachable) are retried with exponential backoff; bad
input (QuantGateError) fails at once with its message in the task state and is never retried.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from celery import Task

from core.errors import QuantGateError, ServiceUnavailable
from core.progress import reporting_transfers
from core.text import one_line
from quant.gguf_split import check_split_fields
from quantgate import jobs, lease
from quantgate.broker import app
from quantgate.config import load_settings
from quantgate.dispatch import job_status, load_manifest, submit  # noqa: F401 (callers holding this module)
from quantgate.source_record import SourceRecord, open_source, prepare_source

_log = logging.getLogger(__name__)


class TransientError(ConnectionError):
    """A failure worth retrying: a service was unreachable (wraps the original exception)."""


def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "a service is unreachable", not "the input is bad".

    Only the connection-level subclasses of OSError: FileNotFoundError, PermissionError etc. are bad input."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import redis.exceptions as rx

        types += [rx.ConnectionError, rx.TimeoutError, rx.BusyLoadingError]
    except ImportError:  # pragma: no cover - redis is a celery[redis] dependency
        pass
    try:
        from kombu.exceptions import OperationalError

        types.append(OperationalError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import requests.exceptions as qx

        types += [qx.ConnectionError, qx.Timeout]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


TRANSIENT = _transient_types()


def is_transient(exc: BaseException) -> bool:
    """True when `exc` (or an exception it was raised from) is a connection failure; never for bad input."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 10:
        if isinstance(e, ServiceUnavailable):
            return True  # MLflow unreachable, reported by the registry / resolver as one error line
        if isinstance(e, QuantGateError):
            return False
        if isinstance(e, TRANSIENT):
            return True
        if type(e).__name__ == "OperationalError" and type(e).__module__.startswith("sqlalchemy"):
            return True  # database locked or unreachable
        msg = str(e)
        if type(e).__module__.startswith("mlflow") and any(
                s in msg for s in ("Max retries exceeded", "Connection refused", "TEMPORARILY_UNAVAILABLE")):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


@contextlib.contextmanager
def transient_guard() -> Iterator[None]:
    """Re-raise connection-level failures as TransientError (which autoretry retries): a ServiceUnavailable (MLflow
    unreachable: RegistryUnreachable, ModelSourceUnreachable) or a connection error; everything else as is."""
    try:
        yield
    except TransientError:
        raise
    except ServiceUnavailable as e:
        raise TransientError(str(e)) from e
    except QuantGateError:
        raise
    except Exception as e:
        if is_transient(e):
            raise TransientError(f"{type(e).__name__}: {e}") from e
        raise


def _check(spec: jobs.JobSpec, *artifacts: Any, source: bool = False) -> None:
    """Refuse a job touching paths outside this worker's model roots / workdir (JobPathError: FAILURE, no retry);
    settings are read per task so a worker follows QUANTGATE_MODEL_ROOTS / QUANTGATE_WORKDIR. A plain model path
    must exist here (it is read where the worker runs); `source`: the model is a pinned source this worker resolved
    into its own input cache (checked by _open instead)."""
    settings = load_settings()
    jobs.check_job_paths(spec, settings, model=not source)
    if not source and not spec.model_ref and not Path(spec.model).exists():
        raise jobs.JobPathError(
            f"model {one_line(spec.model, 200)}: no such file or folder on this worker; a plain path is read "
            "where the worker runs (put it on storage the workers share, or submit a models:/ reference or Hub id, "
            "which the worker resolves itself)")
    for art in artifacts:
        if isinstance(art, Mapping) and art.get("path"):
            jobs.check_write_path(art["path"], settings, "artifact")


def _open(source: Any) -> tuple[str, SourceRecord]:
    """The local path of a pinned source record (the `resolve` task's result, hostile like any message): checked
    as the resolver checks a reference, resolved here by its pin (downloaded into this worker's input cache once),
    SHA-256 checked against the record."""
    rec = SourceRecord.from_dict(source)
    jobs.check_source_ref(rec.pin["value"], rec.pin.get("repo"), rec.pin.get("rev"), load_settings())
    with transient_guard():
        return str(open_source(rec).path), rec


_SETTINGS = load_settings()  # the worker's, read once at start (QUANTGATE_MAX_RETRIES, QUANTGATE_RETRY_BACKOFF_MAX)


class QuantgateTask(Task):
    """Base task: autoretry transient errors with backoff (2 s, 4 s, ... capped at settings retry_backoff_max, full
    jitter, settings max_retries times), never bad input; throttled PROGRESS reports."""

    autoretry_for = (TransientError,)
    dont_autoretry_for = (QuantGateError,)
    retry_backoff = 2
    retry_backoff_max = _SETTINGS.retry_backoff_max
    retry_jitter = True
    max_retries = _SETTINGS.max_retries
    acks_late = True
    reject_on_worker_lost = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the body under the task's lease (quantgate.lease): a copy of a task that a live worker is still
        running waits for it, then returns its stored result; a dead owner's lease expires and the copy runs."""
        gate = lease.TaskLease.for_task(self)
        if gate is None:
            return super().__call__(*args, **kwargs)
        waited = gate.acquire()
        try:
            if waited > 0 or (self.request.delivery_info or {}).get("redelivered"):
                meta: Mapping[str, Any] = {}
                with contextlib.suppress(Exception):   # backend unreachable: just run (every task is idempotent)
                    meta = self.backend.get_task_meta(self.request.id)
                if meta.get("status") == "SUCCESS":
                    _log.warning("%s already finished on another worker (waited %.1f s): returning its result",
                                 self.request.id, waited)
                    return meta.get("result")
            return super().__call__(*args, **kwargs)
        finally:
            gate.release()

    def progress_fn(self, stage: str, min_interval: float = 0.5):
        """A (done, total, stage) callback that records PROGRESS meta at most every `min_interval` seconds."""
        last = [0.0]

        def report(done: int, total: int, sub: str = stage) -> None:
            now = time.monotonic()
            if done < total and now - last[0] < min_interval:
                return
            last[0] = now
            self.report(stage, done, total)

        return report

    def report(self, stage: str, done: int, total: int) -> None:
        """update_state(PROGRESS) with {done, total, percent, stage} (skipped when there is no task id)."""
        if not self.request.id:
            return
        pct = 100.0 * done / total if total else 0.0
        try:
            self.update_state(state="PROGRESS", meta={"done": done, "total": total, "percent": round(pct, 1),
                                                      "stage": stage})
        except Exception as e:  # noqa: BLE001 - progress is best effort: a Redis blip must not fail the work
            _log.warning("progress report failed (%s: %s); continuing", type(e).__name__, e)


@app.task(bind=True, base=QuantgateTask, name="quantgate.resolve")
def resolve(self: QuantgateTask, ref: str, repo: str | None = None, rev: str | None = None) -> dict[str, Any]:
    """Resolve a job's model reference on this worker (models:/NAME@ALIAS, a Hub id in this machine's HF cache,
    a path in a DVC repository at a revision) and pin it: the source record every later task of the job opens."""
    self.report("resolve", 0, 1)
    jobs.check_source_ref(ref, repo, rev, load_settings())
    with transient_guard():
        rec, _ = prepare_source(ref, repo=repo, rev=rev)
    return rec.to_dict()


@app.task(bind=True, base=QuantgateTask, name="quantgate.profile")
def profile(self: QuantgateTask, model: str | dict[str, Any], workdir: str,
            options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Sensitivity profile of the source model (cached by its SHA-256 and the profile options). Given a source
    record (a job on a model reference) it profiles that source and returns the record, for the quantize tasks
    after it (they find the cached profile)."""
    self.report("profile", 0, 1)
    path, rec = _open(model) if isinstance(model, Mapping) else (model, None)
    _check(jobs.JobSpec(model=path, mixes=(), workdir=workdir, profile_options=dict(options or {})),
           source=rec is not None)
    with transient_guard():
        prof = jobs.profile_step(path, workdir=workdir, options=options)
    return rec.to_dict() if rec is not None else prof


@app.task(bind=True, base=QuantgateTask, name="quantgate.quantize")
def quantize(self: QuantgateTask, model: str | dict[str, Any], mix: str, workdir: str, name: str | None = None,
             auto: Mapping[str, Any] | None = None, split: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Quantize one model with one mix (idempotent by job key); AUTO uses the job's profile (auto: its
    profile_options and auto_target); split: QuantizeRequest's split fields (split GGUF parts); returns {mix,
    job_key, artifact} (+ source: the source record, for a job on a model reference, whose lineage the GGUF
    carries)."""
    self.report("quantize", 0, 1)
    a = dict(auto or {})
    path, rec = _open(model) if isinstance(model, Mapping) else (model, None)
    spec = jobs.JobSpec(model=path, mixes=(mix,), workdir=workdir, model_name=name,
                        profile_options=dict(a.get("profile_options") or {}),
                        auto_target=a.get("auto_target") or jobs.DEFAULT_AUTO_TARGET,
                        source_name=rec.name if rec else None, source_lineage=rec.lineage_json() if rec else None,
                        split=check_split_fields(split))
    _check(spec, source=rec is not None)
    with transient_guard():
        art = jobs.quantize_for(spec, mix, on_progress=self.progress_fn("quantize"))
    out = {"mix": mix, "job_key": art["job_key"], "artifact": art, "verdict": None, "version": None}
    return {**out, "source": rec.to_dict()} if rec is not None else out


@app.task(bind=True, base=QuantgateTask, name="quantgate.validate")
def validate(self: QuantgateTask, record: dict[str, Any], baseline: str | None, gates: Any,
             dataset: str | None = None, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the validation gate on the record's artifact against the baseline (None: the record's source, a job
    on a model reference); returns the record with its verdict."""
    self.report("validate", 0, 1)
    if baseline is None:
        path, rec = _open(record.get("source"))
    else:
        path, rec = baseline, None
    _check(jobs.JobSpec(model=path, mixes=(), workdir=str(load_settings().workdir), dataset=dataset),
           record.get("artifact"), source=rec is not None)
    with transient_guard():
        verdict = jobs.validate_step(record["artifact"], baseline=path, gates=gates, dataset=dataset,
                                     options=options, on_progress=self.progress_fn("validate"))
    return {**record, "verdict": verdict}


@app.task(bind=True, base=QuantgateTask, name="quantgate.register")
def register(self: QuantgateTask, record: dict[str, Any], model_name: str | None = None) -> dict[str, Any]:
    """Register the record's artifact (and verdict) in the model registry; idempotent."""
    self.report("register", 0, 1)
    artifact = record.get("artifact")
    if isinstance(artifact, Mapping) and artifact.get("path"):
        jobs.check_write_path(artifact["path"], load_settings(), "artifact")
    with transient_guard(), reporting_transfers(self.progress_fn("register")):  # upload bytes as PROGRESS meta
        version = jobs.register_step(record["artifact"], record.get("verdict"), model_name=model_name)
    return {**record, "version": version}


@app.task(bind=True, base=QuantgateTask, name="quantgate.collect")
def collect(self: QuantgateTask, records: list[dict[str, Any]], model: str | None) -> dict[str, Any]:
    """Chord callback: the job's result, in the same shape as jobs.run_job's (+ source: the pinned source record
    of a job on a model reference, model: the reference it resolved to)."""
    if model is None:
        rec = SourceRecord.from_dict((records[0] if records else {}).get("source"))
        return {"model": rec.resolved, "source_sha256": rec.sha256, "source": rec.to_dict(),
                "results": list(records)}
    jobs.check_read_path(model, load_settings(), "model")
    with transient_guard():
        ident = jobs.source_identity(model)
    return {"model": model, "source_sha256": ident["sha256"], "results": list(records)}
