"""The SQLite calibration cache: keys, invalidation, concurrent writers, export/import, prune, audit hook."""
from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3

import numpy as np
import pytest

from analyzer.cache import CacheError, CacheKey, CalibrationCache

M1, M2, C1, C2 = "a" * 64, "b" * 64, "c" * 64, "d" * 64


def _key(model=M1, calib=C1, kind="tensor_type_error", tool="0.1.0", **cfg) -> CacheKey:
    return CacheKey(model, calib, kind, {"tensor": "blk.0.attn_q.weight", "type": "Q4_K", **cfg}, tool)


def test_hit_only_for_the_same_model_calibration_config_and_version(tmp_path):
    with CalibrationCache(tmp_path) as c:
        c.put_json(_key(), {"est_error": 0.5})
        assert c.get_json(_key()) == {"est_error": 0.5}
        for other in (_key(model=M2), _key(calib=C2), _key(kind="imatrix"), _key(tool="0.2.0"), _key(type="Q5_K"),
                      _key(measure={"n_seqs": 4})):
            assert c.get(other) is None
        arrays = {"s0": np.arange(5, dtype=np.float32)}
        c.put_arrays(_key(kind="imatrix"), arrays)
        np.testing.assert_array_equal(c.get_arrays(_key(kind="imatrix"))["s0"], arrays["s0"])
        st = c.stats()
        assert st.entries == 2 and st.by_kind["imatrix"]["entries"] == 1 and st.hits == 2


def test_changed_model_or_calibration_file_misses(tiny_profile, tiny_model, calib_jsonl, cache_dir, tmp_path):
    """A real profile: a second run hits every row; an edited calibration set or model recomputes them all."""
    import shutil

    from analyzer.profile import build_profile
    from tests.analyzer.conftest import CHUNK, MEASURE, TYPES

    kw = dict(chunk_size=CHUNK, candidate_types=TYPES, **MEASURE)
    with CalibrationCache(cache_dir) as cache:
        again = build_profile(tiny_model, calib_jsonl, cache=cache, **kw)
        assert again.timings["computed_tensors"] == 0
        assert again.timings["total_s"] * 5 <= tiny_profile.timings["total_s"]  # the cache makes reruns cheap
        assert [t.candidates for t in again.tensors] == [t.candidates for t in tiny_profile.tensors]
        calib2 = tmp_path / "calib2.jsonl"
        calib2.write_text(calib_jsonl.read_text() + json.dumps({"text": "one more line of text " * 20}) + "\n")
        other = build_profile(tiny_model, calib2, cache=cache, candidate_types=("Q8_0",), measure=False,
                              chunk_size=CHUNK)
        assert other.timings["computed_tensors"] == sum(t.quantizable for t in other.tensors)
        model2 = tmp_path / "model2"
        shutil.copytree(tiny_model, model2)
        cfg = json.loads((model2 / "config.json").read_text())
        cfg["rms_norm_eps"] = 2e-5
        (model2 / "config.json").write_text(json.dumps(cfg))
        model2_profile = build_profile(model2, calib_jsonl, cache=cache, candidate_types=("Q8_0",), measure=False,
                                       chunk_size=CHUNK)
        assert model2_profile.model["sha256"] != tiny_profile.model["sha256"]
        assert model2_profile.timings["computed_tensors"] == sum(t.quantizable for t in other.tensors)


def _writer(args) -> int:
    path, worker, n = args
    with CalibrationCache(path=path) as c:
        for i in range(n):
            c.put_json(CacheKey(M1, C1, "w", {"worker": worker, "i": i}, "0.1.0"), {"v": worker * 1000 + i})
            assert c.get_json(CacheKey(M1, C1, "w", {"worker": worker, "i": i}, "0.1.0")) == {"v": worker * 1000 + i}
    return n


def test_several_processes_write_at_once(tmp_path):
    path = tmp_path / "shared.sqlite"
    CalibrationCache(path=path).close()
    with mp.get_context("spawn").Pool(4) as pool:
        assert sum(pool.map(_writer, [(str(path), w, 40) for w in range(4)])) == 160
    with CalibrationCache(path=path) as c:
        assert c.stats().entries == 160
        assert all(c.get_json(CacheKey(M1, C1, "w", {"worker": w, "i": i}, "0.1.0")) == {"v": w * 1000 + i}
                   for w in range(4) for i in range(40))
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_export_import_round_trip_is_audited_by_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTGATE_AUDIT_DB_URL", f"sqlite:///{tmp_path / 'audit.db'}")
    with CalibrationCache(tmp_path / "a") as a:
        for i in range(5):
            a.put_json(_key(i=i), {"i": i})
        a.put_arrays(_key(kind="imatrix"), {"x": np.ones(3, np.float32)})
        assert a.export(tmp_path / "dump.jsonl") == 6
    with CalibrationCache(tmp_path / "b") as b:
        b.put_json(_key(i=0), {"i": 0})
        pass
    from quantgate.pipeline import import_cache

    r = import_cache(tmp_path / "dump.jsonl", tmp_path / "b")
    with CalibrationCache(tmp_path / "b") as b:
        assert (r.entries, r.added, r.skipped) == (6, 5, 1)
        assert all(b.get_json(_key(i=i)) == {"i": i} for i in range(5))
        np.testing.assert_array_equal(b.get_arrays(_key(kind="imatrix"))["x"], np.ones(3, np.float32))
        b.export(tmp_path / "dump2.jsonl")
    strip = [{k: v for k, v in json.loads(ln).items() if k != "created_at"}
             for ln in (tmp_path / "dump.jsonl").read_text().splitlines()[1:]]
    strip2 = [{k: v for k, v in json.loads(ln).items() if k != "created_at"}
              for ln in (tmp_path / "dump2.jsonl").read_text().splitlines()[1:]]
    assert strip == strip2
    from registry.audit import AuditLog

    with AuditLog(f"sqlite:///{tmp_path / 'audit.db'}") as log:
        events = [e for e in log.events() if e.action == "cache_import"]
    assert len(events) == 1


def test_import_refuses_tampered_or_truncated_exports(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTGATE_AUDIT_DB_URL", f"sqlite:///{tmp_path / 'audit.db'}")
    with CalibrationCache(tmp_path / "a") as a:
        a.put_json(_key(), {"est_error": 0.5})
        a.put_json(_key(i=1), {"est_error": 0.7})
        a.export(tmp_path / "dump.jsonl")
    lines = (tmp_path / "dump.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["config"]["type"] = "Q2_K"  # re-labels a measurement: the key no longer matches
    (tmp_path / "edited.jsonl").write_text("\n".join([lines[0], json.dumps(row), lines[2]]) + "\n")
    (tmp_path / "short.jsonl").write_text("\n".join(lines[:2]) + "\n")
    with CalibrationCache(tmp_path / "b") as b:
        with pytest.raises(CacheError, match="key does not match"):
            b.import_file(tmp_path / "edited.jsonl")
        with pytest.raises(CacheError, match="truncated"):
            b.import_file(tmp_path / "short.jsonl")
        assert b.stats().entries == 0


def test_prune_drops_other_versions_and_least_recently_used(tmp_path):
    with CalibrationCache(tmp_path) as c:
        c.put_json(_key(tool="0.0.9"), {"old": True})
        for i in range(4):
            c.put(_key(i=i), b"x" * 100)
        assert c.prune(keep_tool_version="0.1.0") == 1
        c.get(_key(i=3))  # most recently used
        assert c.prune(max_bytes=250) == 2
        assert c.get(_key(i=3)) is not None and c.stats().entries == 2


def test_cli_stats_export_import_prune(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from quantgate.cli import app

    monkeypatch.setenv("QUANTGATE_AUDIT_DB_URL", f"sqlite:///{tmp_path / 'audit.db'}")
    with CalibrationCache(tmp_path / "a") as a:
        a.put_json(_key(), {"est_error": 0.5})
    run = CliRunner().invoke
    r = run(app, ["cache", "stats", "--cache-dir", str(tmp_path / "a"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["entries"] == 1
    assert run(app, ["cache", "export", str(tmp_path / "d.jsonl"), "--cache-dir", str(tmp_path / "a")]).exit_code == 0
    r = run(app, ["cache", "import", str(tmp_path / "d.jsonl"), "--cache-dir", str(tmp_path / "b")])
    assert r.exit_code == 0 and "imported 1 of 1" in r.stdout
    r = run(app, ["cache", "prune", "--cache-dir", str(tmp_path / "b"), "--max-size", "0"])
    assert r.exit_code == 0 and "pruned 1" in r.stdout
    r = run(app, ["cache", "import", str(tmp_path / "missing.jsonl"), "--cache-dir", str(tmp_path / "b")])
    assert r.exit_code == 2
