"""MLflow side of the registry: one run per quantization job, one registered model per source model, one model
version (a pyfunc model whose artifact is the GGUF) per artifact, aliases only for versions that passed the gate.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from quant.errors import QuantGateError
from quantgate.records import GateResult, QuantizedArtifact, Recipe, Verdict, canonical_json, sha256_text
from registry.audit import AuditLog, claims_table
from registry.config import RegistrySettings

PASSED, FAILED, UNVALIDATED = "passed", "failed", "unvalidated"
#: Roles of the report files a registration attaches to its run (under reports/<role>/).
REPORT_ROLES = ("validation_json", "validation_html", "junit", "diff", "profile", "audit", "imatrix")
CLAIM_STALE_SECONDS = float(os.environ.get("QUANTGATE_CLAIM_STALE_SECONDS", "900"))
_ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


class RegistryError(QuantGateError):
    """A registry operation that cannot be done as asked (unknown model, version, alias...)."""


class PromotionRefused(RegistryError):
    """An alias was asked for a version that did not pass the validation gate."""


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


# ---------------------------------------------------------------------------------------------- helpers


def mlflow_client(settings: RegistrySettings) -> Any:
    """An MlflowClient on the settings' tracking and registry URIs (imports mlflow; telemetry off)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    settings.ensure_local_dirs()
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)


def sanitize_name(s: str) -> str:
    """A registered-model / metric-safe name: letters, digits, '-', '_', '.'; other runs become '-'."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-.")
    return out or "model"


def _key(s: str) -> str:
    s = s.replace("<=", "_le_").replace(">=", "_ge_").replace("==", "_eq_").replace("<", "_lt_").replace(">", "_gt_")
    return re.sub(r"[^A-Za-z0-9_./ -]+", "_", s)[:240]


def default_model_name(source_name: str, source_sha256: str | None) -> str:
    """One registered model per source: sanitized source name + the first 8 hex digits of its SHA-256."""
    base = sanitize_name(Path(source_name.rstrip("/\\")).name or source_name)
    return f"{base}-{source_sha256[:8]}" if source_sha256 else base


def gguf_facts(path: "str | os.PathLike[str]", artifact: QuantizedArtifact | None = None) -> GGUFFacts:
    """Identity and provenance of a GGUF: from the pipeline's record when given, else from the file's KVs."""
    from quant.gguf_reader import read_gguf
    from quant.hashing import file_sha256

    p = Path(path)
    sha = file_sha256(p)
    if artifact is not None and artifact.sha256 != sha:
        raise RegistryError(f"{p}: SHA-256 {sha} differs from the artifact record's {artifact.sha256}")
    with read_gguf(p) as g:
        kv = {k.key: k.value for k in g.kv if k.key.startswith(("quantgate.", "general."))}
        n_el = sum(t.n_elements for t in g.tensors)
        bpw = 8.0 * sum(t.nbytes for t in g.tensors) / max(n_el, 1)
    recipe = json.loads(kv["quantgate.recipe"]) if isinstance(kv.get("quantgate.recipe"), str) else {}
    if artifact is not None:
        return GGUFFacts(p, sha, artifact.nbytes, artifact.job_key, artifact.source_sha256,
                         Path(artifact.source).name or artifact.source, artifact.recipe.precision,
                         asdict(artifact.recipe), artifact.recipe.imatrix_sha256, artifact.tool_version,
                         artifact.file_type, artifact.bits_per_weight, artifact.n_params,
                         {"total": artifact.seconds, **artifact.timings})
    return GGUFFacts(
        path=p, sha256=sha, nbytes=p.stat().st_size,
        job_key=kv.get("quantgate.job_key") or sha256_text(f"external\n{sha}"),
        source_sha256=kv.get("quantgate.source_sha256"),
        source_name=str(kv.get("general.name") or p.stem),
        precision=kv.get("quantgate.precision"), recipe=recipe,
        imatrix_sha256=kv.get("quantgate.imatrix_sha256"), tool_version=kv.get("quantgate.version"),
        file_type=kv.get("general.file_type"), bits_per_weight=bpw, n_params=n_el,
    )


def verdict_from_dict(d: Mapping[str, Any]) -> Verdict:
    """A Verdict from its JSON form (as the gate writes it)."""
    gates = [GateResult(**g) for g in d.get("gates", [])]
    return Verdict(**{**{k: v for k, v in d.items() if k != "gates"}, "gates": gates})


def load_verdict(path: "str | os.PathLike[str]") -> Verdict:
    """Read a verdict JSON file."""
    try:
        return verdict_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (ValueError, TypeError) as e:
        raise RegistryError(f"{path}: not a verdict JSON ({e})") from e


def verdict_status(verdict: Verdict | None) -> str:
    return UNVALIDATED if verdict is None else (PASSED if verdict.passed else FAILED)


def _params(f: GGUFFacts, verdict: Verdict | None, reports: Mapping[str, Path], extra: Mapping[str, Any]) -> dict:
    from quant.hashing import file_sha256

    p: dict[str, Any] = {
        "source_model": f.source_name, "source_sha256": f.source_sha256, "precision": f.precision,
        "recipe_key": Recipe(**{**f.recipe, "tensor_type_overrides": tuple(map(tuple, f.recipe.get(
            "tensor_type_overrides", ())))}).key() if f.recipe else None,
        "recipe": canonical_json(f.recipe) if f.recipe else None, "job_key": f.job_key,
        "imatrix_sha256": f.imatrix_sha256, "tool_version": f.tool_version, "artifact_sha256": f.sha256,
    }
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


def _metrics(f: GGUFFacts, verdict: Verdict | None, reports: Mapping[str, Path]) -> dict[str, float]:
    m: dict[str, float] = {"file_size_bytes": float(f.nbytes), "bits_per_weight": f.bits_per_weight,
                           "n_params": float(f.n_params)}
    m.update({f"timing.{k}_s": v for k, v in f.timings.items()})
    if verdict is not None:
        m.update({_key(k): v for k, v in verdict.metrics.items()})
        for g in verdict.gates:
            if g.value is not None:
                m[_key(f"gate.{g.name}")] = g.value
    if "validation_json" in reports:
        try:
            rep = json.loads(Path(reports["validation_json"]).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            rep = {}
        for k, v in (rep.get("overall") or {}).items():
            m[_key(f"val.{k}")] = v
        for cat, d in (rep.get("per_category") or {}).items():
            for k, v in (d or {}).items():
                m[_key(f"val.{cat}.{k}")] = v
        for k, v in (rep.get("timings") or {}).items():
            m[_key(f"val.timing.{k}")] = v
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and v == v and abs(float(v)) != float("inf")}


# ---------------------------------------------------------------------------------------------- idempotency


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


# ---------------------------------------------------------------------------------------------- registry


def _ensure_experiment(client: Any, settings: RegistrySettings) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(settings.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(settings.experiment, artifact_location=settings.artifact_location)
    except MlflowException:  # created meanwhile by another worker
        return client.get_experiment_by_name(settings.experiment).experiment_id


def _ensure_model(client: Any, name: str, f: GGUFFacts) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException:
        pass
    try:
        client.create_registered_model(
            name, tags={"source_model": f.source_name, "source_sha256": f.source_sha256 or ""},
            description=f"GGUF quantizations of {f.source_name} (source SHA-256 {f.source_sha256}) made by quantgate.")
    except MlflowException:  # RESOURCE_ALREADY_EXISTS from a concurrent worker
        client.get_registered_model(name)


def _find_existing(client: Any, name: str, sha: str, job: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{name}' and tags.sha256='{sha}' and tags.job_key='{job}'")
    except MlflowException:
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
) -> RegisteredVersion:
    """Log the job as an MLflow run and register the GGUF as a version of its source's model (idempotent).

    Same model name + artifact SHA-256 + job key returns the existing version (created=False), also when several
    workers race. A failed verdict still registers the version, tagged verdict=failed and rejected=true.
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
        claim = _claim(log, key, name, f.sha256, f.job_key, wait_timeout)
        if not claim.mine:
            return RegisteredVersion(name, str(claim.version), str(claim.run_id), f.sha256, f.job_key,
                                     _version_verdict(s, name, str(claim.version)), False,
                                     f"models:/{name}/{claim.version}")
        try:
            rv = _create_version(s, log, f, name, status, verdict, rep, dict(extra_params or {}))
        except BaseException:
            _settle_claim(log, key, None, None)
            raise
        _settle_claim(log, key, rv.version, rv.run_id)
        return rv


def _version_verdict(s: RegistrySettings, name: str, version: str) -> str:
    return mlflow_client(s).get_model_version(name, version).tags.get("verdict", UNVALIDATED)


def _create_version(s: RegistrySettings, log: AuditLog, f: GGUFFacts, name: str, status: str,
                    verdict: Verdict | None, rep: Mapping[str, Path], extra: dict[str, Any]) -> RegisteredVersion:
    client = mlflow_client(s)
    existing = _find_existing(client, name, f.sha256, f.job_key)
    if existing is not None:  # made by a worker that died before settling its claim
        return RegisteredVersion(name, str(existing.version), existing.run_id, f.sha256, f.job_key,
                                 existing.tags.get("verdict", status), False, f"models:/{name}/{existing.version}")
    import mlflow

    from registry.pyfunc_gguf import GGUF_ARTIFACT_KEY, GGUFModel

    exp_id = _ensure_experiment(client, s)
    _ensure_model(client, name, f)
    tags = {"sha256": f.sha256, "file_type": "" if f.file_type is None else str(f.file_type),
            "bits_per_weight": f"{f.bits_per_weight:.4f}", "verdict": status,
            "gate_set": verdict.gate_set if verdict else "", "job_key": f.job_key,
            "source_sha256": f.source_sha256 or "", "precision": f.precision or "", "gguf_file": f.path.name}
    if status == FAILED:
        tags["rejected"] = "true"
    run_name = f"{f.precision or 'gguf'}-{f.sha256[:12]}"
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name,
                          tags={"quantgate.job_key": f.job_key, "quantgate.artifact_sha256": f.sha256}) as run:
        mlflow.log_params(_params(f, verdict, rep, extra))
        mlflow.log_metrics(_metrics(f, verdict, rep))
        with tempfile.TemporaryDirectory(prefix="quantgate-reg-") as tmp:
            if verdict is not None:
                (Path(tmp) / "verdict.json").write_text(json.dumps(verdict.to_dict(), indent=2, sort_keys=True))
                mlflow.log_artifact(str(Path(tmp) / "verdict.json"), "validation")
            (Path(tmp) / "gguf_facts.json").write_text(json.dumps(
                {**asdict(f), "path": str(f.path)}, indent=2, sort_keys=True, default=str))
            mlflow.log_artifact(str(Path(tmp) / "gguf_facts.json"), "quantgate")
        for role, p in rep.items():
            mlflow.log_artifact(str(p), f"reports/{role}")
        info = _log_pyfunc(
            name="gguf_model", python_model=GGUFModel(), artifacts={GGUF_ARTIFACT_KEY: str(f.path)},
            pip_requirements=_requirements(), metadata={"artifact_sha256": f.sha256, "job_key": f.job_key},
        )
    mv = client.create_model_version(name, source=info.model_uri, run_id=run.info.run_id, tags=tags,
                                     model_id=info.model_id,
                                     description=f"{f.path.name} ({f.precision}), verdict: {status}")
    ev = log.append("register", model=name, version=mv.version, artifact_sha256=f.sha256, job_key=f.job_key,
                    inputs=[{"role": "gguf", "path": str(f.path), "sha256": f.sha256, "bytes": f.nbytes}]
                    + [{"role": r, "path": str(p), "sha256": _sha(p)} for r, p in rep.items()],
                    outputs=[{"role": "model_version", "uri": f"models:/{name}/{mv.version}",
                              "run_id": run.info.run_id, "sha256": f.sha256}],
                    config={"recipe": f.recipe, "source_sha256": f.source_sha256, "gate_set": tags["gate_set"],
                            "tracking_uri": s.tracking_uri},
                    verdict=status, detail=f"registered {f.path.name} as {name} v{mv.version}")
    client.set_model_version_tag(name, mv.version, "audit_event_hash", ev.hash)
    _log_audit_excerpt(client, log, run.info.run_id, name, str(mv.version), f)
    return RegisteredVersion(name, str(mv.version), run.info.run_id, f.sha256, f.job_key, status, True,
                             f"models:/{name}/{mv.version}")


def _log_audit_excerpt(client: Any, log: AuditLog, run_id: str, name: str, version: str, f: GGUFFacts) -> None:
    """Attach the artifact's events so far (quantize, validate, ..., register) to the run as audit/events.jsonl."""
    from registry.audit import iter_jsonl

    events = log.events(model=name, version=version, artifact_sha256=f.sha256, job_key=f.job_key)
    with tempfile.TemporaryDirectory(prefix="quantgate-audit-") as tmp:
        path = Path(tmp) / "events.jsonl"
        path.write_text("".join(iter_jsonl(events)), encoding="utf-8")
        client.log_artifact(run_id, str(path), "audit")


def _log_pyfunc(**kwargs: Any) -> Any:
    """mlflow.pyfunc.log_model without its CloudPickle warning: GGUFModel is pickled by reference to the
    importable class registry.pyfunc_gguf.GGUFModel (the loading environment needs quantgate installed)."""
    import logging

    import mlflow

    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return mlflow.pyfunc.log_model(**kwargs)
    finally:
        logger.setLevel(level)


def _sha(p: Path) -> str:
    from quant.hashing import file_sha256

    return file_sha256(p)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "llama-cpp-python", "quantgate"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def get_version(client: Any, name: str, version: str | int) -> Any:
    """The MLflow model version, or a RegistryError naming what is missing."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        raise RegistryError(f"no version {version} of registered model {name!r}") from e


def promote(model: str, version: str | int, alias: str, *, settings: RegistrySettings | None = None,
            reason: str = "") -> Any:
    """Point `alias` at a version that passed the gate; refuse (and audit the refusal) for any other version."""
    s = settings or RegistrySettings.from_env()
    if not _ALIAS_RE.match(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise RegistryError(f"invalid alias {alias!r}: letters, digits, '_' and '-', not 'latest' or v<number>")
    client = mlflow_client(s)
    mv = get_version(client, model, version)
    status = mv.tags.get("verdict", UNVALIDATED)
    sha, job = mv.tags.get("sha256"), mv.tags.get("job_key")
    with AuditLog(s.audit_db_url) as log:
        if status != PASSED:
            why = f"version {mv.version} of {model} is {status}: only a version whose validation passed gets an alias"
            log.append("refuse", model=model, version=mv.version, artifact_sha256=sha, job_key=job,
                       config={"alias": alias, "reason": reason}, verdict=status, detail=why)
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


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """'NAME@ALIAS' -> (name, None, alias); 'NAME/VERSION' or 'NAME:VERSION' -> (name, version, None)."""
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        return name, None, alias
    for sep in ("/", ":"):
        if sep in ref and ref.rsplit(sep, 1)[1].isdigit():
            name, ver = ref.rsplit(sep, 1)
            return name, ver, None
    return ref, None, None


def resolve(client: Any, ref: str) -> Any:
    """The model version a reference names (NAME@ALIAS, NAME/VERSION)."""
    from mlflow.exceptions import MlflowException

    name, ver, alias = parse_model_ref(ref)
    if alias:
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            raise RegistryError(f"registered model {name!r} has no alias {alias!r}") from e
    if ver:
        return get_version(client, name, ver)
    raise RegistryError(f"{ref!r}: expected MODEL@ALIAS or MODEL/VERSION")


def gguf_artifact_uri(client: Any, mv: Any) -> str:
    """URI of the GGUF inside the version's pyfunc model (the artifact MLflow stores once)."""
    if "gguf_file" not in mv.tags:
        raise RegistryError(f"{mv.name} v{mv.version} was not registered by quantgate (no gguf_file tag)")
    model_id = getattr(mv, "model_id", None) or str(mv.source).removeprefix("models:/")
    loc = client.get_logged_model(model_id).artifact_location.rstrip("/")
    return f"{loc}/artifacts/{mv.tags['gguf_file']}"


def download(ref: str, out_dir: "str | os.PathLike[str]", *, settings: RegistrySettings | None = None) -> Path:
    """Fetch a version's GGUF (MODEL@ALIAS or MODEL/VERSION) into out_dir, check its SHA-256, audit it."""
    import mlflow

    from quant.hashing import file_sha256

    s = settings or RegistrySettings.from_env()
    client = mlflow_client(s)
    mv = resolve(client, ref)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / mv.tags["gguf_file"]
    with tempfile.TemporaryDirectory(prefix=".quantgate-dl-", dir=out) as tmp:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=gguf_artifact_uri(client, mv), dst_path=tmp))
        sha = file_sha256(got)
        if sha != mv.tags.get("sha256"):
            raise RegistryError(f"downloaded {got.name} has SHA-256 {sha}, the registry says {mv.tags.get('sha256')}")
        os.replace(got, target)
    with AuditLog(s.audit_db_url) as log:
        log.append("download", model=mv.name, version=mv.version, artifact_sha256=sha, job_key=mv.tags.get("job_key"),
                   inputs=[{"role": "model_version", "uri": ref}],
                   outputs=[{"role": "gguf", "path": str(target), "sha256": sha}],
                   verdict=mv.tags.get("verdict"), detail=f"downloaded {ref} to {target}")
    return target


def list_models(settings: RegistrySettings | None = None) -> list[dict[str, Any]]:
    """Registered models with their aliases and number of versions."""
    client = mlflow_client(settings or RegistrySettings.from_env())
    out = []
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name='{rm.name}'")
        out.append({"name": rm.name, "versions": len(versions), "aliases": dict(rm.aliases or {}),
                    "source_sha256": (rm.tags or {}).get("source_sha256", "")})
    return out


def version_info(client: Any, mv: Any) -> dict[str, Any]:
    """A version as a plain dict: tags, aliases, run, source."""
    return {"name": mv.name, "version": str(mv.version), "aliases": list(mv.aliases or []), "tags": dict(mv.tags),
            "run_id": mv.run_id, "source": mv.source, "status": mv.status,
            "created": mv.creation_timestamp, "description": mv.description}


def show(model: str, version: str | None = None, *, settings: RegistrySettings | None = None) -> list[dict]:
    """One version's details, or every version of a model (oldest first)."""
    client = mlflow_client(settings or RegistrySettings.from_env())
    if version is not None:
        return [version_info(client, get_version(client, model, version))]
    versions = client.search_model_versions(f"name='{model}'")
    if not versions:
        raise RegistryError(f"no registered model {model!r} (or it has no versions)")
    # search results carry no aliases: fetch each version
    return [version_info(client, client.get_model_version(model, v.version))
            for v in sorted(versions, key=lambda v: int(v.version))]


def attach_to_version(client: Any, mv: Any, path: Path, folder: str) -> None:
    """Store a file beside a version: as an artifact of the version's run, under `folder`."""
    client.log_artifact(mv.run_id, str(path), folder)


def run_artifact_text(settings: RegistrySettings, run_id: str, artifact_path: str) -> str | None:
    """Text of one run artifact, or None when it is not there."""
    import mlflow

    try:
        with tempfile.TemporaryDirectory(prefix="quantgate-art-") as tmp:
            p = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp,
                                                    tracking_uri=settings.tracking_uri)
            return Path(p).read_text(encoding="utf-8")
    except Exception:  # noqa: BLE001 - missing artifact: MlflowException or OSError depending on the store
        return None


def iter_run_artifacts(client: Any, run_id: str, path: str = "") -> Iterator[str]:
    """Paths of every file artifact of a run."""
    for a in client.list_artifacts(run_id, path or None):
        if a.is_dir:
            yield from iter_run_artifacts(client, run_id, a.path)
        else:
            yield a.path


def export_events(model: str, version: str | int | None, out: "str | os.PathLike[str] | None" = None, *,
                  settings: RegistrySettings | None = None, attach: bool = True) -> tuple[Path, int]:
    """Write a model's (or one version's, with its artifact's and job's) audit events as JSONL, atomically;
    attach the file to the version's run (audit/). Returns the path and the number of events."""
    from quant.atomic import atomic_write_text
    from registry.audit import iter_jsonl

    s = settings or RegistrySettings.from_env()
    client = mlflow_client(s)
    mv = get_version(client, model, version) if version is not None else None
    with AuditLog(s.audit_db_url) as log:
        if mv is not None:
            events = log.events(model=model, version=mv.version, artifact_sha256=mv.tags.get("sha256"),
                                job_key=mv.tags.get("job_key"))
        else:
            events = log.events(model=model)
    suffix = f"-v{mv.version}" if mv is not None else ""
    path = Path(out) if out is not None else Path(f"audit-{sanitize_name(model)}{suffix}.jsonl")
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(iter_jsonl(events)))
    if attach:
        targets = [mv] if mv is not None else client.search_model_versions(f"name='{model}'")
        for t in targets:
            attach_to_version(client, t, path, "audit")
    return path, len(events)


__all__ = ["export_events", "register_gguf", "promote", "download", "list_models", "show", "resolve", "gguf_facts",
           "load_verdict",
           "verdict_from_dict", "default_model_name", "RegisteredVersion", "RegistryError", "PromotionRefused",
           "mlflow_client", "PASSED", "FAILED", "UNVALIDATED", "REPORT_ROLES"]
