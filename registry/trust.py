"""Where a version's verdict comes from: the audit chain, never a file, a tag or a message.

quantgate's own validation (quantgate.pipeline.validate_artifact) appends a "validate" event that carries the
verdict's SHA-256 (`verdict_digest`), every gate's name/passed/skipped, and (when QUANTGATE_VERDICT_KEY is set) an
HMAC-SHA256 signature over artifact, digest, status and gate set. A verdict is *backed* when such an event exists
for its artifact with the same digest and status, its gates recompute to the same result, the event's own hash
checks out, and (key set) its signature is valid. Registration refuses a verdict that is not backed; `promote` and
the alias check (`check_registry`) read the verdict of a version from its "register" event and the backing
"validate" event, never from MLflow tags. docs/security/trust-model.md says who can forge what.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from core.hashing import canonical_json, sha256_text
from core.records import Verdict
from registry.audit import AuditEvent, event_hash, record_event
from registry.client import FAILED, PASSED, UNVALIDATED

VERDICT_KEY_ENV = "QUANTGATE_VERDICT_KEY"


def verdict_key(env: Mapping[str, str] | None = None) -> bytes | None:
    """The HMAC key for verdict signatures ($QUANTGATE_VERDICT_KEY), or None when unset/empty."""
    val = (os.environ if env is None else env).get(VERDICT_KEY_ENV, "")
    return val.encode("utf-8") if val else None


def verdict_digest(v: Verdict) -> str:
    """SHA-256 of the verdict's canonical JSON, report paths left out (they move with the files, not the decision)."""
    d = v.to_dict()
    d.pop("report_paths", None)
    return sha256_text(canonical_json(d))


def gates_pass(gates: Iterable[Any]) -> bool:
    """The gate's own rule: at least one gate, and every gate passed and none skipped."""
    gs = [g if isinstance(g, Mapping) else asdict(g) for g in gates]
    return bool(gs) and all(bool(g.get("passed")) and not g.get("skipped") for g in gs)


def verdict_status_of(v: Verdict) -> str:
    return PASSED if v.passed else FAILED


def sign(key: bytes, artifact_sha256: str, digest: str, status: str, gate_set: str) -> str:
    """HMAC-SHA256 (hex) over what a validate event asserts."""
    return _mac(key, {"what": "validate", "artifact_sha256": artifact_sha256, "verdict_sha256": digest,
                      "status": status, "gate_set": gate_set})


def sign_registration(key: bytes, model: str, version: str, artifact_sha256: str, digest: str, status: str) -> str:
    """HMAC-SHA256 (hex) over what a register event asserts: this version is this artifact with this verdict."""
    return _mac(key, {"what": "register", "model": model, "version": str(version), "artifact_sha256": artifact_sha256,
                      "verdict_sha256": digest, "status": status})


def _mac(key: bytes, payload: Mapping[str, Any]) -> str:
    return hmac.new(key, canonical_json(dict(payload)).encode("utf-8"), hashlib.sha256).hexdigest()


def validation_config(v: Verdict, key: bytes | None = None) -> dict[str, Any]:
    """What the "validate" event records about a verdict: gate set, metrics, digest, per-gate results, signature."""
    digest = verdict_digest(v)
    cfg: dict[str, Any] = {
        "gate_set": v.gate_set, "metrics": v.metrics, "verdict_sha256": digest,
        "gates": [{"name": g.name, "passed": bool(g.passed), "skipped": bool(g.skipped)} for g in v.gates],
    }
    if key is not None:
        cfg["signature"] = sign(key, v.artifact_sha256, digest, verdict_status_of(v), v.gate_set)
    return cfg


def self_consistency(v: Verdict) -> str | None:
    """Why a verdict contradicts its own gates (None when `passed` equals what its gates say)."""
    if v.passed == gates_pass(v.gates):
        return None
    if v.passed:
        bad = [g.name for g in v.gates if not g.passed or g.skipped]
        return "it says passed but " + (f"gate(s) {', '.join(bad[:5])} did not pass" if bad else "it has no gates")
    return "it says failed but every gate passed"


@dataclass
class Backing:
    """Whether the chain backs a verdict, the event that does, and why not otherwise."""

    ok: bool
    status: str
    reason: str
    event: AuditEvent | None = None


def _event_backs(e: AuditEvent, status: str, key: bytes | None) -> str | None:
    """Why this validate event does not back `status` (None when it does)."""
    if event_hash(e.body()) != e.hash:
        return f"validate event #{e.index} does not match its hash"
    cfg = e.config or {}
    if e.verdict != status:
        return f"validate event #{e.index} recorded {e.verdict}"
    gates = cfg.get("gates")
    if not isinstance(gates, list):
        return f"validate event #{e.index} has no per-gate results"
    if gates_pass(gates) != (status == PASSED):
        return f"validate event #{e.index}'s gates do not add up to {status}"
    if key is not None:
        want = sign(key, e.artifact_sha256 or "", str(cfg.get("verdict_sha256")), status, str(cfg.get("gate_set")))
        if not hmac.compare_digest(str(cfg.get("signature", "")), want):
            return f"validate event #{e.index} has no valid signature ({VERDICT_KEY_ENV} is set)"
    return None


def find_backing(events: Iterable[AuditEvent], artifact_sha256: str, *, digest: str | None = None,
                 status: str = PASSED, key: bytes | None = None) -> Backing:
    """The latest "validate" event for the artifact that backs `status` (and `digest`, when given)."""
    why = f"no validation of artifact {artifact_sha256[:12]} is recorded in the audit chain"
    specific = None  # why the events that recorded this very verdict do not back it
    for e in reversed([e for e in events if e.action == "validate" and e.artifact_sha256 == artifact_sha256]):
        if digest is not None and (e.config or {}).get("verdict_sha256") != digest:
            why = f"no validation recorded in the audit chain produced this verdict (SHA-256 {digest[:12]})"
            continue
        bad = _event_backs(e, status, key)
        if bad is None:
            return Backing(True, status, f"backed by validate event #{e.index}", e)
        specific = specific or bad
    return Backing(False, status, specific or why)


def check_verdict(v: Verdict, events: Iterable[AuditEvent], key: bytes | None = None) -> Backing:
    """Is this verdict the one quantgate's validation recorded? Its gates must add up to its `passed`, and a
    validate event with its digest and status (signed, when a key is set) must be in the chain."""
    status = verdict_status_of(v)
    why = self_consistency(v)
    if why:
        return Backing(False, status, f"the verdict contradicts its gates: {why}")
    return find_backing(events, v.artifact_sha256, digest=verdict_digest(v), status=status, key=key)


def version_status(events: Iterable[AuditEvent], model: str, version: str | int, key: bytes | None = None, *,
                   artifact_sha256: str | None = None) -> Backing:
    """A version's verdict as the chain has it: its first "register" event's artifact and verdict digest (signed
    when a key is set), backed by a passing validate event. `artifact_sha256` (MLflow's sha256 tag) must agree.
    Anything else (no register event, failed, unvalidated, unbacked) is not passed."""
    evs = list(events)
    reg = next((e for e in evs if e.action == "register" and e.model == model and e.version == str(version)), None)
    if reg is None:
        return Backing(False, UNVALIDATED, f"the audit chain has no registration of {model} v{version}")
    if event_hash(reg.body()) != reg.hash:
        return Backing(False, UNVALIDATED, f"register event #{reg.index} does not match its hash")
    if artifact_sha256 is not None and artifact_sha256 != reg.artifact_sha256:
        return Backing(False, UNVALIDATED, f"MLflow says artifact {artifact_sha256[:12]}, the chain registered "
                                           f"{(reg.artifact_sha256 or '?')[:12]}", reg)
    if reg.verdict != PASSED:
        return Backing(False, reg.verdict or UNVALIDATED, f"registered as {reg.verdict or UNVALIDATED}", reg)
    if "verdict_sha256" not in (reg.config or {}):
        return _legacy_status(evs, reg, key)
    digest = (reg.config or {}).get("verdict_sha256")
    if not digest:
        return Backing(False, UNVALIDATED, f"register event #{reg.index} names no verdict", reg)
    if key is not None:
        want = sign_registration(key, model, str(version), reg.artifact_sha256 or "", digest, PASSED)
        if not hmac.compare_digest(str((reg.config or {}).get("signature", "")), want):
            return Backing(False, UNVALIDATED, f"register event #{reg.index} has no valid signature "
                                               f"({VERDICT_KEY_ENV} is set)", reg)
    b = find_backing(evs, reg.artifact_sha256 or "", digest=digest, status=PASSED, key=key)
    return b if b.ok else Backing(False, UNVALIDATED, b.reason, reg)


def _legacy_status(evs: list[AuditEvent], reg: AuditEvent, key: bytes | None) -> Backing:
    """A register event written before verdict digests existed (no `verdict_sha256` key at all): passed when the
    chain also holds a passing validate event of the same artifact. Never with a key set (nothing is signed)."""
    if key is not None:
        return Backing(False, UNVALIDATED, f"register event #{reg.index} predates verdict signatures "
                                           f"({VERDICT_KEY_ENV} is set): re-validate and register again", reg)
    ok = [e for e in evs if e.action == "validate" and e.artifact_sha256 == reg.artifact_sha256
          and e.verdict == PASSED and event_hash(e.body()) == e.hash]
    if not ok:
        return Backing(False, UNVALIDATED, f"register event #{reg.index} (before verdict digests) has no passing "
                                           "validate event of its artifact in the chain", reg)
    return Backing(True, PASSED, f"registered before verdict digests; validate event #{ok[-1].index} passed", ok[-1])


def record_validation(v: Verdict, *, db_url: str, inputs: Iterable[Any] = (), outputs: Iterable[Any] = (),
                      key: bytes | None = None) -> AuditEvent:
    """Append the "validate" event that backs `v` (what quantgate.pipeline.validate_artifact calls after the gate)."""
    k = verdict_key() if key is None else key
    return record_event("validate", db_url=db_url, artifact_sha256=v.artifact_sha256, inputs=inputs,
                        outputs=outputs, config=validation_config(v, k), verdict=verdict_status_of(v),
                        detail=f"gate set {v.gate_set}: {verdict_status_of(v)}")


def version_events(log: Any, model: str, version: str | int) -> list[AuditEvent]:
    """A version's events and those of the artifact its (first) register event names, in chain order."""
    own = log.events(model=model, version=str(version))
    reg = next((e for e in own if e.action == "register"), None)
    if reg is None or not reg.artifact_sha256:
        return own
    seen = {e.hash for e in own}
    more = [e for e in log.events(artifact_sha256=reg.artifact_sha256) if e.hash not in seen]
    return sorted(own + more, key=lambda e: e.index)


# ------------------------------------------------------------------------------------- registry cross-check


@dataclass
class Finding:
    """Something in MLflow the audit chain does not back: kind (alias/anchor/unanchored), model, version, message."""

    kind: str
    model: str
    version: str
    message: str
    alias: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RegistryCheck:
    """Result of checking every registered model's aliases and anchors against the chain."""

    checked: bool
    n_models: int = 0
    n_versions: int = 0
    findings: list[Finding] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "n_models": self.n_models, "n_versions": self.n_versions,
                "ok": self.ok, "note": self.note, "findings": [f.to_dict() for f in self.findings]}

    def summary(self) -> str:
        if not self.checked:
            return f"registry not checked: {self.note}"
        if self.ok:
            return (f"registry backed by the chain: {self.n_models} model(s), {self.n_versions} version(s), every "
                    "alias on a validated version, every anchor in the chain")
        return f"registry NOT backed by the chain: {len(self.findings)} finding(s)"


def _local_store_missing(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        p = Path(uri[len("sqlite:///"):])
        return None if p.is_file() else p
    if uri.startswith("file:") or "://" not in uri:
        p = Path(uri.removeprefix("file://").removeprefix("file:"))
        return None if p.exists() else p
    return None


def check_registry(settings: Any, events: list[AuditEvent], key: bytes | None = None) -> RegistryCheck:
    """Every alias must point at a version the chain says passed; every quantgate version's `audit_event_hash`
    anchor (version tag and run tag) must name a register event the chain holds. Reads MLflow only."""
    missing = _local_store_missing(settings.registry_uri)
    if missing is not None:
        return RegistryCheck(False, note=f"no MLflow store at {missing}")
    from registry.client import mlflow_client  # lazy: defers mlflow

    client = mlflow_client(settings)
    by_hash = {e.hash: e for e in events}
    out = RegistryCheck(True)
    models = list(_all_models(client))
    out.n_models = len(models)
    for rm in models:
        name = rm.name
        for alias, ver in sorted((getattr(rm, "aliases", None) or {}).items()):
            b = version_status(events, name, str(ver), key, artifact_sha256=_sha_tag(client, name, str(ver)))
            if not b.ok:
                out.findings.append(Finding("alias", name, str(ver), f"alias {alias!r} points at v{ver}, which has "
                                                                     f"no passing validation: {b.reason}", alias))
        for mv in _versions(client, name):
            out.n_versions += 1
            tags = dict(mv.tags or {})
            if "gguf_file" not in tags:
                continue  # not registered by quantgate
            anchors = {("version tag", tags.get("audit_event_hash"))}
            try:
                anchors.add(("run tag", client.get_run(mv.run_id).data.tags.get("quantgate.audit_event_hash")))
            except Exception:  # noqa: BLE001 - a deleted run: the version anchor still speaks
                pass
            named = [(w, h) for w, h in anchors if h]
            if not named:
                out.findings.append(Finding("unanchored", name, str(mv.version), f"{name} v{mv.version} carries no "
                                            "audit_event_hash anchor: its registration is not in the audit chain"))
            for where, h in sorted(named):
                e = by_hash.get(h)
                if e is None or e.action != "register" or e.model != name or e.version != str(mv.version):
                    out.findings.append(Finding("anchor", name, str(mv.version), f"{name} v{mv.version}'s {where} "
                                                f"anchors audit event {h[:16]}, which the chain lacks"))
    return out


def _sha_tag(client: Any, name: str, version: str) -> str | None:
    try:
        return client.get_model_version(name, version).tags.get("sha256")
    except Exception:  # noqa: BLE001 - the version is gone; version_status reports what the chain says
        return None


def _all_models(client: Any) -> Iterable[Any]:
    token = None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return


def _versions(client: Any, name: str) -> Iterable[Any]:
    esc = name.replace("'", "\\'")
    token = None
    while True:
        page = client.search_model_versions(f"name='{esc}'", max_results=10000, page_token=token)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return


__all__ = ["VERDICT_KEY_ENV", "verdict_key", "verdict_digest", "gates_pass", "sign", "sign_registration", "validation_config",
           "self_consistency", "Backing", "find_backing", "check_verdict", "version_status", "Finding",
           "RegistryCheck", "check_registry", "record_validation", "version_events"]
