"""Structural gates on real GGUF files: pass, unusable (corrupt/truncated), NaN, SHA-256 manifest, derived-from."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from core.errors import QuantGateError
from quant.gguf_reader import read_gguf
from tests.validation._gate_fixtures import gate_env, other_model_gguf  # noqa: F401  (fixtures)
from validation.structural import (
    CandidateFacts,
    expected_sha256,
    file_type_gate,
    inspect_candidate,
    structural_gates,
)


def _by_name(gates):
    return {g.name: g for g in gates}


def test_good_candidate_passes_every_gate(gate_env, tmp_path):  # noqa: F811
    q8 = gate_env["ggufs"]["Q8_0"]
    facts = inspect_candidate(q8)
    (tmp_path / "SHA256SUMS").write_text(f"{facts.sha256}  {q8.name}\n{'0' * 64}  other.gguf\n")
    facts, gates = structural_gates(q8, baseline=gate_env["model"], manifest=tmp_path / "SHA256SUMS")
    g = _by_name(gates)
    assert set(g) == {"structural:verify", "structural:finite", "structural:file_type", "structural:sha256",
                      "structural:derived_from", "structural:tokenizer"}
    assert all(x.passed and x.kind == "structural" for x in gates), [x.detail for x in gates]
    assert facts.precision == "Q8_0" and facts.file_type == 7


@pytest.mark.parametrize("damage", ["magic", "truncate", "tensor_table"])
def test_unusable_files_raise(gate_env, tmp_path, damage):  # noqa: F811
    src = gate_env["ggufs"]["Q8_0"]
    bad = tmp_path / "bad.gguf"
    data = bytearray(src.read_bytes())
    if damage == "magic":
        data[:4] = b"GGUX"
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        with read_gguf(src) as g:
            end = g.header_end
        data[end - 40:end] = b"\xff" * 40          # the last tensor info: absurd dimensions / type
    bad.write_bytes(bytes(data))
    with pytest.raises(QuantGateError) as e:
        structural_gates(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(QuantGateError, match="not found"):
        inspect_candidate(tmp_path / "absent.gguf")


def test_nan_fails_finite_gate_and_sha_mismatch(gate_env, tmp_path):  # noqa: F811
    src = gate_env["ggufs"]["Q8_0"]
    bad = tmp_path / "nan.gguf"
    shutil.copy(src, bad)
    with read_gguf(src) as g:
        t = next(t for t in g.tensors if t.qtype == "F32")
        off = t.offset
    with open(bad, "r+b") as f:
        f.seek(off)
        f.write(np.array([np.nan, np.inf], dtype="<f4").tobytes())
    (tmp_path / "rec.json").write_text(json.dumps({"artifact": {"sha256": inspect_candidate(src).sha256}}))
    _, gates = structural_gates(bad, manifest=tmp_path / "rec.json")
    g = _by_name(gates)
    assert not g["structural:finite"].passed and g["structural:finite"].value == 2.0
    assert t.name in g["structural:finite"].detail
    assert not g["structural:sha256"].passed and g["structural:verify"].passed
    assert expected_sha256(tmp_path / "rec.json", "x") == inspect_candidate(src).sha256


def test_candidate_of_another_model_fails_derived_from(gate_env, other_model_gguf):  # noqa: F811
    _, gates = structural_gates(other_model_gguf, baseline=gate_env["model"])
    g = _by_name(gates)["structural:derived_from"]
    assert not g.passed and "differs" in g.detail


def test_file_type_consistency():
    def facts(ft, types, precision=None):
        return CandidateFacts("x.gguf", "0" * 64, 1, ft, precision, None, dict(enumerate(types)))

    assert file_type_gate(facts(15, ["F32", "Q4_K", "Q6_K"], "Q4_K_M"), {}).passed
    assert file_type_gate(facts(15, ["F32", "Q5_0"]), {}).passed           # k-quant fell back (ggml rule)
    assert not file_type_gate(facts(15, ["F32", "Q8_0"]), {}).passed       # Q4_K_M with no Q4_K at all
    assert not file_type_gate(facts(1, ["F16", "Q8_0"]), {}).passed        # MOSTLY_F16 holding Q8_0
    assert not file_type_gate(facts(7, ["Q8_0"], "Q4_K_M"), {}).passed     # provenance disagrees
    assert not file_type_gate(facts(None, ["Q8_0"]), {}).passed
    counts = {"quantgate.tensor_type_counts": json.dumps({"Q8_0": 2})}
    assert not file_type_gate(facts(7, ["Q8_0"]), counts).passed
    assert file_type_gate(facts(7, ["Q8_0", "Q8_0"]), counts).passed


def test_file_type_consistency_of_auto_files():
    """--precision auto files: general.file_type must be the closest mix recorded in quantgate.policy; the mix's
    main type need not be present (auto picks per tensor)."""
    def facts(ft, types):
        return CandidateFacts("x.gguf", "0" * 64, 1, ft, "AUTO", None, dict(enumerate(types)))

    policy = {"quantgate.policy": json.dumps({"file_type_mix": "Q4_K_M", "mode": "budget"})}
    assert file_type_gate(facts(15, ["F32", "Q5_K", "Q3_K", "Q6_K"]), policy).passed
    assert not file_type_gate(facts(7, ["F32", "Q5_K", "Q3_K"]), policy).passed           # 7 is not Q4_K_M
    assert not file_type_gate(facts(15, ["F32", "Q5_K"]), {}).passed                       # no policy recorded
    bad = {"quantgate.policy": "not json"}
    assert not file_type_gate(facts(15, ["F32", "Q5_K"]), bad).passed
