"""The pyfunc model whose artifact is the GGUF: loadable with mlflow.pyfunc.load_model; generates with llama.cpp
when the GGUF has a tokenizer, and says clearly why not otherwise."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from registry.registration import promote, register_gguf


def test_load_model_finds_the_gguf_and_explains_why_it_cannot_generate(store):
    import mlflow

    promote(store.model, store.passing.version, "validated", settings=store.settings)
    m = mlflow.pyfunc.load_model(f"models:/{store.model}@validated")
    impl = m.unwrap_python_model()
    assert Path(impl.gguf_path).read_bytes() == Path(store.art_pass.path).read_bytes()
    with pytest.raises(RuntimeError, match="(llama.cpp could not load|llama-cpp-python is not installed)"):
        m.predict(["hello"])


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_registered_gguf_with_tokenizer_generates(store, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    if importlib.util.find_spec("quant.tokenizer_gguf") is None:
        pytest.skip("quant/tokenizer_gguf.py (tokenizer export) not there yet")
    import mlflow

    from core.records import QuantizeRequest
    from quantgate.pipeline import quantize_model
    from tests.quantgate.tiny_hf import make_tiny_model

    src = make_tiny_model(tmp_path / "tiny-tok", "llama", n_layer=1)
    art = quantize_model(QuantizeRequest(source=src, out=tmp_path / "tok-q8_0.gguf", precision="Q8_0", threads=1))
    rv = register_gguf(art.path, settings=store.settings, artifact=art, model_name="tiny-generate")
    m = mlflow.pyfunc.load_model(rv.model_uri)
    out = m.predict(["the model", "bytes matter"], params={"max_tokens": 4, "n_ctx": 64})
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert out == m.predict(["the model", "bytes matter"], params={"max_tokens": 4, "n_ctx": 64})  # greedy
