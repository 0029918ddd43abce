"""quantize_model computes an uncached source fingerprint from the tensors its loop reads (one read of the source):
the value recorded in the header is weights_fingerprint's, the recorded SHA-256 is the final file's, the output's
tensors are those of a run with the fingerprint cached, and the fingerprint is cached for the next run."""
from __future__ import annotations

import hashlib

import pytest

from core.records import QuantizeRequest
from quant.fingerprint import weights_fingerprint
from quant.gguf_reader import read_gguf
from quantgate.convert import convert_model
from quantgate.pipeline import quantize_model
from tests.quantgate.tiny_hf import make_tiny_model

pytestmark = pytest.mark.timeout(300)


def _tensors(path):
    with read_gguf(path) as g:
        return {t.name: (t.qtype, bytes(g.tensor_data(t))) for t in g.tensors}


@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_cold_fingerprint_in_the_quantize_pass(tmp_path, monkeypatch, source):
    hf = make_tiny_model(tmp_path / "hf", "llama", seed=3)
    src = hf
    if source == "gguf":
        src = tmp_path / "f16.gguf"
        convert_model(hf, src, "f16")
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "cold"))  # nothing cached: the tap path
    cold = quantize_model(QuantizeRequest(source=src, out=tmp_path / "cold.gguf", precision="Q4_K_M"), record=False)
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "ref"))
    want = weights_fingerprint(src)  # computed in a pass of its own, then cached: the next quantize uses it
    warm = quantize_model(QuantizeRequest(source=src, out=tmp_path / "warm.gguf", precision="Q4_K_M"), record=False)
    assert cold.timings["fingerprint_in_pass"] > 0 and warm.timings["fingerprint_in_pass"] == 0
    with read_gguf(tmp_path / "cold.gguf") as g:
        assert g.value("quantgate.source_fingerprint") == want
    data = (tmp_path / "cold.gguf").read_bytes()
    assert cold.sha256 == hashlib.sha256(data).hexdigest()
    assert data == (tmp_path / "warm.gguf").read_bytes() and cold.sha256 == warm.sha256
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "cold"))  # the tap cached what it computed
    assert weights_fingerprint(src) == want
    assert _tensors(tmp_path / "cold.gguf") == _tensors(tmp_path / "warm.gguf")
