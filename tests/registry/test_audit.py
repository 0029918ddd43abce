"""The hash-chained audit trail: appends, the four kinds of tampering (raw SQL), concurrent writers, PostgreSQL."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from core.hashing import canonical_json
from registry.audit import GENESIS, AuditLog, event_hash, record_event, verify_rows

REPO = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("QUANTGATE_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def _sqlite_log(tmp_path: Path, n: int = 6) -> tuple[AuditLog, Path]:
    db = tmp_path / "audit.db"
    log = AuditLog(f"sqlite:///{db}")
    for i in range(n):
        log.append("quantize" if i % 2 == 0 else "validate", model="m", version=str(i), artifact_sha256=f"{i:064x}",
                   config={"i": i}, verdict="passed", detail=f"event {i}")
    return log, db


def _raw(db: Path, *sql: str, params: tuple = ()) -> None:
    con = sqlite3.connect(db)
    try:
        for s in sql:
            con.execute(s, params) if params and "?" in s else con.execute(s)
        con.commit()
    finally:
        con.close()


def _kinds(rep) -> list[tuple[str, int]]:
    return [(p.kind, p.position) for p in rep.problems]


def test_append_links_each_event_to_the_previous_and_verifies(tmp_path):
    log, _ = _sqlite_log(tmp_path, 4)
    evs = log.events()
    assert [e.index for e in evs] == [0, 1, 2, 3]
    assert evs[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(evs, evs[1:], strict=False))
    assert all(event_hash(e.body()) == e.hash for e in evs)
    assert evs[0].actor["user"] and evs[0].actor["host"] and evs[0].ts.endswith("Z")
    assert "python" in evs[0].versions and "sqlalchemy" in evs[0].versions
    rep = log.verify()
    assert rep.ok and rep.n_events == 4 and rep.head_hash == evs[-1].hash
    log.close()


def test_edited_event_is_caught_at_its_position(tmp_path):
    log, db = _sqlite_log(tmp_path)
    _raw(db, "UPDATE quantgate_audit_events SET body = replace(body, 'event 2', 'event 2 (fixed)') WHERE seq = 3")
    rep = log.verify()
    assert not rep.ok and ("edited", 3) in _kinds(rep)
    assert {k for k, _ in _kinds(rep)} == {"edited"}


def test_edited_and_rehashed_event_is_caught(tmp_path):
    log, db = _sqlite_log(tmp_path)
    con = sqlite3.connect(db)
    body = json.loads(con.execute("SELECT body FROM quantgate_audit_events WHERE seq = 2").fetchone()[0])
    body["verdict"] = "failed"
    con.execute("UPDATE quantgate_audit_events SET body = ?, hash = ? WHERE seq = 2",
                (canonical_json(body), event_hash(body)))
    con.commit()
    con.close()
    rep = log.verify()
    assert ("edited", 2) in _kinds(rep)


def test_deleted_event_is_caught(tmp_path):
    log, db = _sqlite_log(tmp_path)
    _raw(db, "DELETE FROM quantgate_audit_events WHERE seq = 3")
    rep = log.verify()
    assert _kinds(rep) == [("deleted", 3)]
    assert "#2..#2" in rep.problems[0].message


def test_deleted_last_event_is_caught_by_the_head(tmp_path):
    log, db = _sqlite_log(tmp_path)
    _raw(db, "DELETE FROM quantgate_audit_events WHERE seq = 6")
    rep = log.verify()
    assert [k for k, _ in _kinds(rep)] == ["deleted"]


def test_inserted_event_is_caught(tmp_path):
    log, db = _sqlite_log(tmp_path)
    con = sqlite3.connect(db)
    prev = con.execute("SELECT hash FROM quantgate_audit_events WHERE seq = 2").fetchone()[0]
    forged = json.loads(con.execute("SELECT body FROM quantgate_audit_events WHERE seq = 2").fetchone()[0])
    forged.update(event_id=str(uuid.uuid4()), action="promote", detail="forged", index=1000, prev_hash="f" * 64)
    h = event_hash(forged)
    con.execute("UPDATE quantgate_audit_events SET seq = seq + 100 WHERE seq >= 3")
    con.execute("INSERT INTO quantgate_audit_events (seq, chain_index, event_id, ts, action, model_name, model_version,"
                " artifact_sha256, job_key, body, prev_hash, hash) VALUES (3, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (1000, forged["event_id"], forged["ts"], "promote", "m", forged["version"], forged["artifact_sha256"],
                 None, canonical_json(forged), forged["prev_hash"], h))
    con.commit()
    con.close()
    assert prev  # the forged row sits between seq 2 and the old seq 3
    rep = log.verify()
    assert _kinds(rep) == [("inserted", 3)]


def test_reordered_events_are_caught(tmp_path):
    log, db = _sqlite_log(tmp_path)
    _raw(db, "UPDATE quantgate_audit_events SET seq = -1 WHERE seq = 3",
         "UPDATE quantgate_audit_events SET seq = 3 WHERE seq = 4",
         "UPDATE quantgate_audit_events SET seq = 4 WHERE seq = -1")
    rep = log.verify()
    assert not rep.ok
    assert rep.problems[0].kind == "reordered" and rep.problems[0].position == 3
    assert {k for k, _ in _kinds(rep)} == {"reordered"}


def test_database_refuses_a_fork(tmp_path):
    log, db = _sqlite_log(tmp_path, 3)
    con = sqlite3.connect(db)
    row = con.execute("SELECT prev_hash FROM quantgate_audit_events WHERE seq = 3").fetchone()
    with pytest.raises(sqlite3.IntegrityError):
        con.execute("INSERT INTO quantgate_audit_events (chain_index, event_id, ts, action, body, prev_hash, hash) "
                    "VALUES (99, 'x', 't', 'a', '{}', ?, ?)", (row[0], "e" * 64))
    con.close()


def test_verify_rows_on_an_empty_chain():
    assert verify_rows([], {"chain_index": -1, "hash": GENESIS}).ok
    rep = verify_rows([], {"chain_index": 4, "hash": "a" * 64})
    assert [p.kind for p in rep.problems] == ["deleted"]


def test_record_event_uses_the_configured_database(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTGATE_AUDIT_DB_URL", f"sqlite:///{tmp_path / 'a.db'}")
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    ev = record_event("cache_import", inputs=[gguf], config={"cache": "local"}, detail="imported")
    assert ev.index == 0 and ev.inputs[0]["sha256"] and ev.inputs[0]["bytes"] == 64
    with AuditLog(f"sqlite:///{tmp_path / 'a.db'}") as log:
        assert [e.action for e in log.events()] == ["cache_import"]


_WRITER = """
import sys, time
from pathlib import Path
from registry.audit import AuditLog
url, go, n, who = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
log = AuditLog(url)
while not go.exists():
    time.sleep(0.01)
for i in range(n):
    log.append("validate", model="race", version=who, config={"i": i}, versions={})
log.close()
"""


def _race_appends(url: str, tmp_path: Path, n_proc: int, n_each: int) -> None:
    go = tmp_path / "go"
    AuditLog(url).close()  # create the schema first, as a deployment would
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, url, str(go), str(n_each), f"w{k}"], cwd=REPO)
             for k in range(n_proc)]
    time.sleep(1.5)  # let every writer import and connect
    go.touch()
    for p in procs:
        assert p.wait(timeout=120) == 0


def test_concurrent_writers_never_fork_the_chain(tmp_path):
    url = f"sqlite:///{tmp_path / 'race.db'}"
    _race_appends(url, tmp_path, 4, 15)
    with AuditLog(url) as log:
        rep = log.verify()
        evs = log.events()
    assert rep.ok, rep.problems
    assert [e.index for e in evs] == list(range(60))
    assert {e.version for e in evs} == {"w0", "w1", "w2", "w3"}


@pytest.fixture
def pg_url():
    sa = pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg2")
    schema = f"qg_audit_{uuid.uuid4().hex[:10]}"
    try:
        eng = sa.create_engine(PG_URL)
        with eng.begin() as c:
            c.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no PostgreSQL at {PG_URL}: {e}")
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with eng.begin() as c:
        c.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    eng.dispose()


def test_postgresql_chain_with_concurrent_writers_and_tampering(pg_url, tmp_path):
    _race_appends(pg_url, tmp_path, 3, 10)
    with AuditLog(pg_url) as log:
        rep = log.verify()
        assert rep.ok and rep.n_events == 30, rep.problems
        with log.engine.begin() as c:
            c.exec_driver_sql("UPDATE quantgate_audit_events "
                              "SET body = replace(body, '\"versions\":{}', '\"versions\":{\"x\":\"1\"}') "
                              "WHERE seq = (SELECT min(seq) + 4 FROM quantgate_audit_events)")
        rep = log.verify()
    assert _kinds(rep) == [("edited", 5)]


def test_cli_audit_verify_exits_1_and_names_the_position(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from quantgate.cli import app

    log, db = _sqlite_log(tmp_path)
    log.close()
    monkeypatch.setenv("QUANTGATE_AUDIT_DB_URL", f"sqlite:///{db}")
    monkeypatch.setenv("QUANTGATE_MLFLOW_URI", f"sqlite:///{tmp_path / 'no-mlflow' / 'mlflow.db'}")  # chain only
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    runner = CliRunner()
    r = runner.invoke(app, ["audit", "verify"])
    assert r.exit_code == 0 and "intact: 6 events" in r.output, r.output
    _raw(db, "DELETE FROM quantgate_audit_events WHERE seq = 4")
    r = runner.invoke(app, ["audit", "verify", "--json"])
    assert r.exit_code == 1
    rep = json.loads(r.output)
    assert [(p["kind"], p["position"]) for p in rep["problems"]] == [("deleted", 4)]
