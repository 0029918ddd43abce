"""A tamper-evident audit trail: append-only events in a hash chain, stored with SQLAlchemy beside MLflow's backend.

Each event's hash is SHA-256 over the canonical JSON of its body, and the body carries the previous event's hash
and the event's index in the chain. Appends are serialized (SQLite: BEGIN IMMEDIATE; PostgreSQL: SELECT ... FOR
UPDATE on a head row), and UNIQUE constraints on index and prev_hash make a fork impossible at the database level.
`verify_chain` recomputes everything and names each edited, deleted, inserted or reordered event by position.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import platform
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from sqlalchemy import (
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    event,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError, SQLAlchemyError

from core.errors import QuantGateError
from core.hashing import canonical_json, file_sha256
from registry.config import RegistrySettings

AUDIT_SCHEMA_VERSION = 1
GENESIS = "0" * 64
#: Actions the tool records; other packages may add their own names.
ACTIONS = ("quantize", "profile", "validate", "register", "promote", "refuse", "download", "cache_import", "export",
           "report")

metadata = MetaData()
events_table = Table(
    "quantgate_audit_events", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("chain_index", Integer, nullable=False, unique=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("ts", String(40), nullable=False),
    Column("action", String(64), nullable=False, index=True),
    Column("model_name", String(256), index=True),
    Column("model_version", String(32)),
    Column("artifact_sha256", String(64), index=True),
    Column("job_key", String(64)),
    Column("body", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False, unique=True),
    Column("hash", String(64), nullable=False, unique=True),
)
head_table = Table(
    "quantgate_audit_head", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("chain_index", Integer, nullable=False),  # index of the last event, -1 when empty
    Column("hash", String(64), nullable=False),
)
claims_table = Table(
    "quantgate_registrations", metadata,
    Column("claim_key", String(64), primary_key=True),
    Column("model_name", String(256), nullable=False),
    Column("artifact_sha256", String(64), nullable=False),
    Column("job_key", String(64), nullable=False),
    Column("version", String(32)),
    Column("run_id", String(64)),
    Column("owner", String(256), nullable=False),
    Column("claimed_at", Float, nullable=False),
)
#: Columns that repeat fields of the hashed body (so they can be queried); verify checks they agree.
_PROJECTED = {"chain_index": "index", "event_id": "event_id", "ts": "ts", "action": "action", "model_name": "model",
              "model_version": "version", "artifact_sha256": "artifact_sha256", "job_key": "job_key",
              "prev_hash": "prev_hash"}


@dataclass
class AuditEvent:
    """One audit event: who, when, what, on which inputs/outputs (with SHA-256), under which config and versions."""

    index: int
    event_id: str
    ts: str
    action: str
    actor: dict[str, Any]
    model: str | None
    version: str | None
    artifact_sha256: str | None
    job_key: str | None
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    config: dict[str, Any]
    versions: dict[str, str]
    verdict: str | None
    detail: str
    prev_hash: str
    hash: str = ""
    schema_version: int = AUDIT_SCHEMA_VERSION

    def body(self) -> dict[str, Any]:
        """Everything but the hash: what the hash is computed over."""
        d = asdict(self)
        d.pop("hash")
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def event_hash(body: Mapping[str, Any]) -> str:
    """SHA-256 of an event body's canonical JSON (sorted keys, no whitespace, UTF-8)."""
    return hashlib.sha256(canonical_json(dict(body)).encode("utf-8")).hexdigest()


def file_ref(path: "str | os.PathLike[str]", role: str = "") -> dict[str, Any]:
    """An input/output entry for an event: path, role, size and SHA-256 of a file."""

    p = Path(path)
    return {"role": role, "path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)}


def actor() -> dict[str, Any]:
    """Who acts: OS user (or $QUANTGATE_ACTOR), host and process id."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return {"user": os.environ.get("QUANTGATE_ACTOR") or user, "host": socket.gethostname(), "pid": os.getpid()}


def tool_versions() -> dict[str, str]:
    """quantgate, Python and key dependency versions (installed distributions only; never imports them)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("quantgate", "numpy", "gguf", "torch", "mlflow", "llama-cpp-python", "sqlalchemy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _norm_refs(refs: Iterable[Any]) -> list[dict[str, Any]]:
    out = []
    for r in refs:
        if isinstance(r, Mapping):
            out.append(json.loads(canonical_json(dict(r))))
        else:
            out.append(file_ref(r))
    return out


# ---------------------------------------------------------------------------------------------- storage


def make_engine(url: str) -> Engine:
    """An engine whose transactions serialize writers: SQLite BEGIN IMMEDIATE + WAL + a long busy timeout."""
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 120})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _rec):  # noqa: ANN001
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (pysqlite would defer it)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=120000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # noqa: ANN001
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def init_schema(engine: Engine) -> None:
    """Create the audit tables and the head row if missing (safe when several processes start at once)."""
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(7210524611)"))
                metadata.create_all(conn)
                if conn.execute(select(head_table.c.id).where(head_table.c.id == 1)).first() is None:
                    conn.execute(insert(head_table).values(id=1, chain_index=-1, hash=GENESIS))
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            if attempt == 4:
                raise
            time.sleep(0.1 * (attempt + 1))


class AuditLog:
    """The audit trail in one database: append events, read them, verify the chain."""

    def __init__(self, url: str, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or make_engine(url)
        init_schema(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(
        self,
        action: str,
        *,
        model: str | None = None,
        version: str | int | None = None,
        artifact_sha256: str | None = None,
        job_key: str | None = None,
        inputs: Iterable[Any] = (),
        outputs: Iterable[Any] = (),
        config: Mapping[str, Any] | None = None,
        verdict: str | None = None,
        detail: str = "",
        versions: Mapping[str, str] | None = None,
    ) -> AuditEvent:
        """Append one event at the head of the chain, serialized against every other writer."""
        ins, outs = _norm_refs(inputs), _norm_refs(outputs)
        cfg = json.loads(canonical_json(dict(config or {})))
        vers = dict(versions) if versions is not None else tool_versions()
        with self.engine.begin() as conn:
            head = conn.execute(select(head_table).where(head_table.c.id == 1).with_for_update()).one()
            ev = AuditEvent(
                index=head.chain_index + 1, event_id=str(uuid.uuid4()), ts=_utc_now(), action=action, actor=actor(),
                model=model, version=None if version is None else str(version), artifact_sha256=artifact_sha256,
                job_key=job_key, inputs=ins, outputs=outs, config=cfg, versions=vers, verdict=verdict,
                detail=detail, prev_hash=head.hash,
            )
            ev.hash = event_hash(ev.body())
            conn.execute(insert(events_table).values(
                chain_index=ev.index, event_id=ev.event_id, ts=ev.ts, action=ev.action, model_name=ev.model,
                model_version=ev.version, artifact_sha256=ev.artifact_sha256, job_key=ev.job_key,
                body=canonical_json(ev.body()), prev_hash=ev.prev_hash, hash=ev.hash,
            ))
            conn.execute(update(head_table).where(head_table.c.id == 1).values(chain_index=ev.index, hash=ev.hash))
        return ev

    def events(self, *, model: str | None = None, version: str | int | None = None,
               artifact_sha256: str | None = None, job_key: str | None = None) -> list[AuditEvent]:
        """Events in storage order. With filters: one model's events (model), narrowed to one version together
        with the events about its artifact or job (quantize, validate, ... before it had a version)."""
        t = events_table
        q = select(t.c.body, t.c.hash).order_by(t.c.seq)
        if model is not None and version is None:
            q = q.where(t.c.model_name == model)
        elif version is not None or artifact_sha256 is not None or job_key is not None:
            conds = []
            if version is not None:
                conds.append(and_(t.c.model_name == model, t.c.model_version == str(version)))
            if artifact_sha256 is not None:
                conds.append(t.c.artifact_sha256 == artifact_sha256)
            if job_key is not None:
                conds.append(t.c.job_key == job_key)
            q = q.where(or_(*conds))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [AuditEvent(**{**json.loads(r.body), "hash": r.hash}) for r in rows]

    def verify(self) -> "ChainReport":
        """Recompute the whole chain (see verify_rows)."""
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(select(events_table).order_by(events_table.c.seq))]
            head = conn.execute(select(head_table).where(head_table.c.id == 1)).first()
        return verify_rows(rows, None if head is None else dict(head._mapping))


def record_event(action: str, *, db_url: str | None = None, **fields: Any) -> AuditEvent:
    """Append one audit event; the one call other packages (pipeline, gate, cache) make.

    `fields` are AuditLog.append's keywords: model, version, artifact_sha256, job_key, inputs, outputs (file
    paths or {"role","path","sha256",...} dicts), config (dict), verdict ("passed"/"failed"/...), detail (text).
    The database is `db_url`, else QUANTGATE_AUDIT_DB_URL, else the SQLite file beside MLflow's database.
    """
    if db_url is None:
        db_url = RegistrySettings.from_env().audit_db_url
    try:
        with AuditLog(db_url) as log:
            return log.append(action, **fields)
    except (SQLAlchemyError, OSError) as e:
        msg = " ".join(str(getattr(e, "orig", None) or e).split())[:200]
        raise AuditUnavailable(f"cannot append the {action!r} audit event to {_redact(db_url)}: "
                               f"{type(e).__name__}: {msg}") from None


class AuditUnavailable(QuantGateError):
    """The audit trail cannot be written: nothing that needs an audit event may be published."""


def _redact(url: str) -> str:
    """A database URL without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: show it as given
        return url


# ---------------------------------------------------------------------------------------------- verification


@dataclass
class ChainProblem:
    """One finding: kind (edited/deleted/inserted/reordered/head), 1-based storage position, and what is wrong."""

    kind: str
    position: int
    message: str
    event_id: str | None = None


@dataclass
class ChainReport:
    """Result of recomputing the chain."""

    ok: bool
    n_events: int
    head_hash: str
    problems: list[ChainProblem] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: intact with its head, or how many problems."""
        if self.ok:
            return f"audit chain intact: {self.n_events} events, head {self.head_hash[:16]}"
        return f"audit chain TAMPERED: {len(self.problems)} problem(s) in {self.n_events} events"


def _check_row(pos: int, row: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[ChainProblem]]:
    eid = row.get("event_id")
    try:
        body = json.loads(row["body"])
    except (TypeError, ValueError):
        return None, [ChainProblem("edited", pos, "event body is not valid JSON", eid)]
    probs = []
    if event_hash(body) != row["hash"]:
        probs.append(ChainProblem("edited", pos, f"event #{body.get('index')} ({body.get('action')}): content does "
                                               "not match its hash", eid))
    bad = [c for c, k in _PROJECTED.items() if row.get(c) != body.get(k)]
    if bad:
        probs.append(ChainProblem("edited", pos, f"event #{body.get('index')}: column(s) {', '.join(bad)} differ "
                                                 "from the hashed body", eid))
    return body, probs


def verify_rows(rows: Sequence[Mapping[str, Any]], head: Mapping[str, Any] | None) -> ChainReport:
    """Check rows (in storage order) and the head row: every hash, every link, every index, the head."""
    problems: list[ChainProblem] = []
    bodies: list[dict[str, Any] | None] = []
    for pos, row in enumerate(rows, 1):
        body, probs = _check_row(pos, row)
        bodies.append(body)
        problems += probs
    where = {row["hash"]: pos for pos, row in enumerate(rows, 1)}

    def index(i: int) -> int:
        b = bodies[i]
        return int(b.get("index", -1)) if b else int(rows[i].get("chain_index", -1))

    last: int | None = None  # 0-based position of the last event accepted into the chain
    for i, row in enumerate(rows):
        exp_hash = rows[last]["hash"] if last is not None else GENESIS
        exp_index = index(last) + 1 if last is not None else 0
        pos, eid = i + 1, row.get("event_id")
        if row["prev_hash"] == exp_hash:
            if index(i) != exp_index:
                problems.append(ChainProblem("edited", pos, f"index {index(i)} where {exp_index} belongs", eid))
            last = i
            continue
        nxt = rows[i + 1] if i + 1 < len(rows) else None
        j = where.get(row["prev_hash"])
        if j is not None:
            problems.append(ChainProblem("reordered", pos, f"event #{index(i)} is stored at position {pos} but "
                                                           f"chains after the event at position {j}", eid))
            last = i
        elif nxt is not None and nxt["prev_hash"] == exp_hash:
            problems.append(ChainProblem("inserted", pos, f"event at position {pos} is not part of the chain "
                                                          "(its successor links to the event before it)", eid))
        elif index(i) > exp_index:
            problems.append(ChainProblem("deleted", pos, f"event(s) #{exp_index}..#{index(i) - 1} missing before "
                                                         f"position {pos}", eid))
            last = i
        else:
            problems.append(ChainProblem("edited", max(pos - 1, 1), f"the event before position {pos} was altered "
                                                                    "and re-hashed (its successor links elsewhere)",
                                         rows[i - 1].get("event_id") if i else eid))
            last = i
    head_hash = rows[last]["hash"] if last is not None else GENESIS
    if head is not None:
        n_head = int(head["chain_index"]) + 1
        if head["hash"] != head_hash:
            if head["hash"] in where:
                p = where[head["hash"]]
                problems.append(ChainProblem("inserted", p + 1, f"event(s) stored after the recorded head (position "
                                                                f"{p})"))
            elif last is None or n_head > index(last) + 1:
                got = index(last) + 1 if last is not None else 0
                problems.append(ChainProblem("deleted", len(rows) + 1, f"the head records {n_head} events, the "
                                                                       f"chain ends after {got}"))
            else:
                problems.append(ChainProblem("edited", len(rows), "the head row does not match the last event"))
    return ChainReport(ok=not problems, n_events=len(rows), head_hash=head_hash, problems=problems)


def _readonly_engine(url: str) -> "tuple[Engine | None, str]":
    """An engine that cannot write: SQLite opened with mode=ro (no file is created), other databases in
    read-only transactions. (None, why) when a SQLite file is missing."""
    if url.startswith("sqlite:///"):
        import sqlite3

        path = Path(url[len("sqlite:///"):].split("?", 1)[0])
        if not path.is_file():
            return None, f"no audit database at {path}"
        uri = f"{path.resolve().as_uri()}?mode=ro"
        return create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, timeout=120)), ""
    if url.startswith(("postgresql", "postgres")):
        return create_engine(url, pool_pre_ping=True, execution_options={"postgresql_readonly": True}), ""
    return create_engine(url, pool_pre_ping=True), ""


def read_only_verify(url: str) -> "tuple[ChainReport, list[AuditEvent]]":
    """Verify the chain without writing anything (no table, head row or file is created): a missing database, a
    missing table or a missing head row is reported as deleted. Also returns the events whose bodies parse."""
    from sqlalchemy import inspect

    engine, why = _readonly_engine(url)
    if engine is None:
        return ChainReport(False, 0, GENESIS, [ChainProblem("deleted", 1, why)]), []
    try:
        names = set(inspect(engine).get_table_names())
        gone = [t.name for t in (events_table, head_table) if t.name not in names]
        if gone:
            return ChainReport(False, 0, GENESIS, [ChainProblem("deleted", 1, f"table(s) {', '.join(gone)} missing "
                                                                              "from the audit database")]), []
        with engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(select(events_table).order_by(events_table.c.seq))]
            head = conn.execute(select(head_table).where(head_table.c.id == 1)).first()
    finally:
        engine.dispose()
    rep = verify_rows(rows, None if head is None else dict(head._mapping))
    if head is None:
        rep.problems.append(ChainProblem("deleted", len(rows) + 1, "the head row is missing"))
        rep.ok = False
    events = []
    for r in rows:
        try:
            events.append(AuditEvent(**{**json.loads(r["body"]), "hash": r["hash"]}))
        except (TypeError, ValueError):
            continue  # verify_rows named it
    return rep, events


def iter_jsonl(events: Iterable[AuditEvent]) -> Iterator[str]:
    """Events as JSON lines (canonical JSON, hash included) for export."""
    for e in events:
        yield canonical_json(e.to_dict()) + "\n"


__all__ = ["AuditEvent", "AuditLog", "ChainProblem", "ChainReport", "record_event", "file_ref", "event_hash",
           "verify_rows", "read_only_verify", "iter_jsonl", "AuditUnavailable", "tool_versions", "actor", "make_engine", "GENESIS", "ACTIONS"]
