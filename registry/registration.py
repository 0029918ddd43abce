"""Registration: one run per quantization job, one registered model per source model, one model version (a pyfunc
model whose artifact is the GGUF) per artifact, aliases only for versions that passed the gate.

Registration is idempotent per (model name, artifact SHA-256, job key): a claim row with that key in the audit
database (unique primary key) decides which worker creates the version; the others wait and return it.
"""
from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from core.hashing import file_sha256, sha256_text
from core.progress import ProgressFn, transfer_progress
from core.records import QuantizedArtifact, Verdict
from registry.audit import AuditLog, claims_table, iter_jsonl
from registry.client import (
    _ALIAS_RE,
    PASSED,
    UNVALIDATED,
    PromotionRefused,
    RegistryError,
    VerdictRefused,
    default_model_name,
    get_version,
    mlflow_client,
    raise_unreachable,
    verdict_status,
)
from registry.config import RegistrySettings
from registry.facts import GGUFFacts, _metrics, _params, gguf_facts
from registry.transfer import watch_upload
from registry.views import report_artifact_paths, version_description, version_tags
from registry.trust import (
    Backing,
    check_verdict,
    sign_registration,
    verdict_digest,
    verdict_key,
    version_events,
    version_status,
)

CLAIM_STALE_SECONDS = float(os.environ.get("QUANTGATE_CLAIM_STALE_SECONDS", "900"))


@dataclass
class RegisteredVersion:
    """A model version of a GGUF artifact, and whether this call created it."""

    model_name: str
    version: str
    run_id: str
    artifact_sha256: str
    job_key: str
    verdict: str
    created: bool
    model_uri: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_dead(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class _Claim:
    mine: bool
    version: str | None
    run_id: str | None


def _claim(log: AuditLog, key: str, model: str, sha: str, job: str, timeout: float) -> _Claim:
    """Take the registration claim for `key`, or wait until its holder finished and return what it made."""
    t = claims_table
    deadline = time.monotonic() + timeout
    while True:
        try:
            with log.engine.begin() as conn:
                row = conn.execute(select(t).where(t.c.claim_key == key).with_for_update()).first()
                if row is None:
                    conn.execute(insert(t).values(claim_key=key, model_name=model, artifact_sha256=sha, job_key=job,
                                                  owner=_owner(), claimed_at=time.time()))
                    return _Claim(True, None, None)
                if row.version is not None:
                    return _Claim(False, row.version, row.run_id)
                if time.time() - row.claimed_at > CLAIM_STALE_SECONDS or _owner_dead(row.owner):
                    conn.execute(update(t).where(t.c.claim_key == key).values(owner=_owner(), claimed_at=time.time()))
                    return _Claim(True, None, None)
        except IntegrityError:
            continue  # another worker inserted the claim between our read and insert: read it again
        if time.monotonic() > deadline:
            raise RegistryError(f"timed out waiting for another worker registering {sha[:12]} as {model}")
        time.sleep(0.25)


def _settle_claim(log: AuditLog, key: str, version: str | None, run_id: str | None) -> None:
    t = claims_table
    with log.engine.begin() as conn:
        if version is None:
            conn.execute(t.delete().where(t.c.claim_key == key))
        else:
            conn.execute(update(t).where(t.c.claim_key == key).values(version=version, run_id=run_id))


def _ensure_experiment(client: Any, settings: RegistrySettings) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(settings.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(settings.experiment, artifact_location=settings.artifact_location)
    except MlflowException as e:  # created meanwhile by another worker
        raise_unreachable(e, client)
        return client.get_experiment_by_name(settings.experiment).experiment_id


def _ensure_model(client: Any, name: str, f: GGUFFacts) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as e:
        raise_unreachable(e, client)  # down is not "no such model"
    try:
        client.create_registered_model(
            name, tags={"source_model": f.source_name, "source_sha256": f.source_sha256 or "", "source": f.source_ref},
            description=f"GGUF quantizations of {f.source_name} (source SHA-256 {f.source_sha256}) made by quantgate.")
    except MlflowException as e:  # RESOURCE_ALREADY_EXISTS from a concurrent worker
        raise_unreachable(e, client)
        client.get_registered_model(name)


def _find_existing(client: Any, name: str, sha: str, job: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{name}' and tags.sha256='{sha}' and tags.job_key='{job}'")
    except MlflowException as e:
        raise_unreachable(e, client)  # down is not "not registered yet": that would register a second copy
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def register_gguf(
    gguf: "str | os.PathLike[str]",
    *,
    settings: RegistrySettings | None = None,
    verdict: Verdict | None = None,
    artifact: QuantizedArtifact | None = None,
    reports: Mapping[str, "str | os.PathLike[str]"] | None = None,
    model_name: str | None = None,
    source_name: str | None = None,
    extra_params: Mapping[str, Any] | None = None,
    wait_timeout: float = 900.0,
    compliance: bool = False,
    progress: ProgressFn | None = None,
) -> RegisteredVersion:
    """Log the job as an MLflow run and register the GGUF as a version of its source's model (idempotent).

    Same model name + artifact SHA-256 + job key returns the existing version (created=False), also when several
    workers race. A failed verdict still registers the version, tagged verdict=failed and rejected=true.
    compliance=True also writes the version's compliance report (HTML) into its run (compliance/) and links it
    from the version description. `progress(done, total, what)` gets the GGUF's bytes staged and uploaded twice a
    second (registry.transfer; default: the receiver core.progress.reporting_transfers installed).
    """
    s = settings or RegistrySettings.from_env()
    f = gguf_facts(gguf, artifact)
    if source_name:
        f.source_name = source_name
    if verdict is not None and verdict.artifact_sha256 != f.sha256:
        raise RegistryError(f"the verdict is for artifact {verdict.artifact_sha256[:12]}, not {f.sha256[:12]} "
                            f"({f.path})")
    rep = {k: Path(v) for k, v in (reports or {}).items() if v is not None}
    for role, p in rep.items():
        if not p.is_file():
            raise RegistryError(f"report {role!r} not found: {p}")
    name = model_name or s.model_name or default_model_name(f.source_name, f.source_sha256)
    status = verdict_status(verdict)
    key = sha256_text(f"{name}\n{f.sha256}\n{f.job_key}")
    with AuditLog(s.audit_db_url) as log:
        backing = None
        if verdict is not None:
            backing = check_verdict(verdict, log.events(artifact_sha256=f.sha256), verdict_key())
            if not backing.ok:
                why = f"the verdict for {f.path.name} is not backed by quantgate's validation: {backing.reason}"
                log.append("refuse", model=name, artifact_sha256=f.sha256, job_key=f.job_key,
                           config={"action": "register", "verdict_sha256": verdict_digest(verdict),
                                   "claimed": status, "reason": backing.reason}, verdict=status, detail=why)
                raise VerdictRefused(f"refused to register {f.path.name} as {name}: {why}")
        claim = _claim(log, key, name, f.sha256, f.job_key, wait_timeout)
        if not claim.mine:
            return RegisteredVersion(name, str(claim.version), str(claim.run_id), f.sha256, f.job_key,
                                     _version_verdict(s, name, str(claim.version)), False,
                                     f"models:/{name}/{claim.version}")
        try:
            rv = _create_version(s, log, f, name, status, verdict, rep, dict(extra_params or {}), backing,
                                 compliance, progress if progress is not None else transfer_progress())
        except BaseException:
            _settle_claim(log, key, None, None)
            raise
        _settle_claim(log, key, rv.version, rv.run_id)
        return rv


def _version_verdict(s: RegistrySettings, name: str, version: str) -> str:
    return mlflow_client(s).get_model_version(name, version).tags.get("verdict", UNVALIDATED)


def _create_version(s: RegistrySettings, log: AuditLog, f: GGUFFacts, name: str, status: str,
                    verdict: Verdict | None, rep: Mapping[str, Path], extra: dict[str, Any],
                    backing: Backing | None = None, compliance: bool = False,
                    progress: ProgressFn | None = None) -> RegisteredVersion:
    client = mlflow_client(s)
    existing = _find_existing(client, name, f.sha256, f.job_key)
    if existing is not None:  # made by a worker that died before settling its claim
        return RegisteredVersion(name, str(existing.version), existing.run_id, f.sha256, f.job_key,
                                 existing.tags.get("verdict", status), False, f"models:/{name}/{existing.version}")
    import mlflow

    from registry.pyfunc_gguf import GGUF_ARTIFACT_KEY, signature  # lazy: defers mlflow

    exp_id = _ensure_experiment(client, s)
    _ensure_model(client, name, f)
    tags = version_tags(f, verdict, status)
    metrics = _metrics(f, verdict, rep)
    run_name = f"{f.precision or 'gguf'}-{f.sha256[:12]}"
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name,
                          tags={"quantgate.job_key": f.job_key, "quantgate.artifact_sha256": f.sha256}) as run:
        mlflow.log_params(_params(f, verdict, rep, extra))
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory(prefix="quantgate-reg-") as tmp:
            if verdict is not None:
                (Path(tmp) / "verdict.json").write_text(json.dumps(verdict.to_dict(), indent=2, sort_keys=True))
                mlflow.log_artifact(str(Path(tmp) / "verdict.json"), "validation")
            (Path(tmp) / "gguf_facts.json").write_text(json.dumps(
                {**asdict(f), "path": str(f.path)}, indent=2, sort_keys=True, default=str))
            mlflow.log_artifact(str(Path(tmp) / "gguf_facts.json"), "quantgate")
        for role, p in rep.items():
            mlflow.log_artifact(str(p), f"reports/{role}")
        files = {GGUF_ARTIFACT_KEY: str(f.path)}  # a split GGUF: every part, beside the first (llama.cpp finds them)
        files.update({f"gguf_part_{i + 1}": str(f.path.with_name(q["file"])) for i, q in enumerate(f.parts) if i})
        with watch_upload([Path(p) for p in files.values()], f"upload {f.path.name}", progress):
            info = _log_pyfunc(
                name="gguf_model", python_model=str(Path(__file__).with_name("pyfunc_gguf.py")),
                artifacts=files, signature=signature(),
                pip_requirements=_requirements(), metadata={"artifact_sha256": f.sha256, "job_key": f.job_key},
            )
    arts = report_artifact_paths(rep)
    mv = client.create_model_version(name, source=info.model_uri, run_id=run.info.run_id, tags=tags,
                                     model_id=info.model_id,
                                     description=version_description(f, verdict, status, metrics, run.info.run_id,
                                                                     arts))
    digest = verdict_digest(verdict) if verdict is not None else None
    vkey = verdict_key()
    trust_cfg: dict[str, Any] = {"verdict_sha256": digest,
                                 "validate_event": backing.event.hash if backing and backing.event else None}
    if vkey is not None and digest is not None:
        trust_cfg["signature"] = sign_registration(vkey, name, str(mv.version), f.sha256, digest, status)
    ev = log.append("register", model=name, version=mv.version, artifact_sha256=f.sha256, job_key=f.job_key,
                    inputs=[{"role": "gguf", "path": str(f.path), "sha256": f.sha256, "bytes": f.nbytes}]
                    + [{"role": f"gguf_part_{i + 1}", "path": str(f.path.with_name(q["file"])), "sha256": q["sha256"],
                        "bytes": q["bytes"]} for i, q in enumerate(f.parts)]
                    + [{"role": r, "path": str(p), "sha256": _sha(p)} for r, p in rep.items()],
                    outputs=[{"role": "model_version", "uri": f"models:/{name}/{mv.version}",
                              "run_id": run.info.run_id, "sha256": f.sha256}],
                    config={"recipe": f.recipe, "source_sha256": f.source_sha256, "gate_set": tags["gate_set"],
                            "tracking_uri": s.tracking_uri, **trust_cfg},
                    verdict=status, detail=f"registered {f.path.name} as {name} v{mv.version}")
    client.set_model_version_tag(name, mv.version, "audit_event_hash", ev.hash)
    client.set_tag(run.info.run_id, "quantgate.audit_event_hash", ev.hash)  # a second anchor, on the run
    _log_audit_excerpt(client, log, run.info.run_id, name, str(mv.version), f)
    if compliance:
        _attach_compliance(s, client, name, str(mv.version), run.info.run_id, f, verdict, status, metrics, arts)
    return RegisteredVersion(name, str(mv.version), run.info.run_id, f.sha256, f.job_key, status, True,
                             f"models:/{name}/{mv.version}")


def _log_audit_excerpt(client: Any, log: AuditLog, run_id: str, name: str, version: str, f: GGUFFacts) -> None:
    """Attach the artifact's events so far (quantize, validate, ..., register) to the run as audit/events.jsonl."""

    events = log.events(model=name, version=version, artifact_sha256=f.sha256, job_key=f.job_key)
    with tempfile.TemporaryDirectory(prefix="quantgate-audit-") as tmp:
        path = Path(tmp) / "events.jsonl"
        path.write_text("".join(iter_jsonl(events)), encoding="utf-8")
        client.log_artifact(run_id, str(path), "audit")


def _attach_compliance(s: RegistrySettings, client: Any, name: str, version: str, run_id: str, f: GGUFFacts,
                       verdict: Verdict | None, status: str, metrics: Mapping[str, float],
                       arts: Mapping[str, str]) -> None:
    """Write the version's compliance report (HTML) into its run (compliance/, audited as a "report" event) and
    link it from the version description."""
    from registry.compliance import write_report  # lazy: matplotlib, only when a report is asked for

    with tempfile.TemporaryDirectory(prefix="quantgate-compliance-") as tmp:
        path = write_report(name, version, tmp, "html", settings=s)
    links = {**arts, "compliance": f"compliance/{path.name}"}
    client.update_model_version(name, version, description=version_description(f, verdict, status, metrics, run_id,
                                                                                links))


def _log_pyfunc(**kwargs: Any) -> Any:
    """mlflow.pyfunc.log_model of the model-from-code file registry/pyfunc_gguf.py: MLflow stores the file itself
    with the model, so `mlflow.pyfunc.load_model` works wherever mlflow (and, to generate, llama-cpp-python) is
    installed, without quantgate. MLflow's notes about models from code are kept out of the log."""
    import logging

    import mlflow

    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for note in _PYFUNC_NOTES:
                warnings.filterwarnings("ignore", message=note)
            return mlflow.pyfunc.log_model(**kwargs)
    finally:
        logger.setLevel(level)


#: MLflow's advice printed on every log_model that does not apply here: the signature is explicit (type hints would
#: replace it and lose its params schema) and an input example would run llama.cpp at registration.
_PYFUNC_NOTES = (r"(?s).*Add type hints to the `predict` method", r"(?s).*An input example was not provided")


def _sha(p: Path) -> str:

    return file_sha256(p)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "llama-cpp-python"):  # published packages only: the loader ships with the model
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def promote(model: str, version: str | int, alias: str, *, settings: RegistrySettings | None = None,
            reason: str = "") -> Any:
    """Point `alias` at a version that passed the gate; refuse (and audit the refusal) for any other version.

    "Passed" is what the audit chain says (registry.trust.version_status: the version's register event, backed by
    quantgate's own passing validate event), never the version's `verdict` tag, which anyone with MLflow access
    can set."""
    s = settings or RegistrySettings.from_env()
    if not _ALIAS_RE.match(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise RegistryError(f"invalid alias {alias!r}: letters, digits, '_' and '-', not 'latest' or v<number>")
    client = mlflow_client(s)
    mv = get_version(client, model, version)
    sha, job = mv.tags.get("sha256"), mv.tags.get("job_key")
    with AuditLog(s.audit_db_url) as log:
        backing = version_status(version_events(log, model, mv.version), model, mv.version, verdict_key(),
                                 artifact_sha256=sha)
        status = PASSED if backing.ok else backing.status
        if not backing.ok:
            why = (f"version {mv.version} of {model} is {status} in the audit chain ({backing.reason}): only a "
                   "version whose validation passed gets an alias")
            log.append("refuse", model=model, version=mv.version, artifact_sha256=sha, job_key=job,
                       config={"alias": alias, "reason": reason, "tag_verdict": mv.tags.get("verdict"),
                               "why": backing.reason}, verdict=status, detail=why)
            raise PromotionRefused(f"refused to set alias {alias!r}: {why}")
        try:
            previous = client.get_model_version_by_alias(model, alias).version
        except Exception:  # noqa: BLE001 - MLflow raises MlflowException (REST: RestException) for "no such alias"
            previous = None
        client.set_registered_model_alias(model, alias, mv.version)
        log.append("promote", model=model, version=mv.version, artifact_sha256=sha, job_key=job,
                   config={"alias": alias, "previous_version": previous, "reason": reason}, verdict=status,
                   detail=f"alias {alias} -> v{mv.version}" + (f" (was v{previous})" if previous else ""))
    return client.get_model_version(model, mv.version)
