"""Pipeline actions leave a verifiable trace in the audit chain."""
from __future__ import annotations

import os

from core.records import QuantizeRequest
from quantgate.pipeline import quantize_model
from quantgate.sample import SampleShape, make_sample_checkpoint
from registry.audit import AuditLog


def test_quantize_appends_a_chained_event(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    monkeypatch.setenv("QUANTGATE_AUDIT_DB_URL", url)
    src = make_sample_checkpoint(tmp_path / "hf", SampleShape(n_layer=1, n_embd=256, n_ff=256, n_vocab=256))
    art = quantize_model(QuantizeRequest(source=src, out=tmp_path / "m.gguf", precision="Q8_0"))
    quantize_model(QuantizeRequest(source=src, out=tmp_path / "n.gguf", precision="Q8_0"), record=False)
    with AuditLog(url) as log:
        events = log.events()
        assert [e.action for e in events] == ["quantize"]
        ev = events[0]
        assert ev.artifact_sha256 == art.sha256 and ev.job_key == art.job_key
        assert {i["role"]: i["sha256"] for i in ev.inputs}["source"] == art.source_sha256
        assert ev.outputs[0]["sha256"] == art.sha256
        assert ev.config["recipe"]["precision"] == "Q8_0"
        assert log.verify().ok
    assert os.environ["QUANTGATE_AUDIT_DB_URL"] == url
