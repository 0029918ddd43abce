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
    # the model loads and generates in a process that cannot import quantgate (no project on sys.path, cwd elsewhere)
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, sys, os\n"
        "assert not any(os.path.isdir(os.path.join(p or '.', 'registry')) for p in sys.path), sys.path\n"
        "import importlib.util; assert importlib.util.find_spec('registry') is None\n"
        "import mlflow\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "sig = m.metadata.signature\n"
        "out = m.predict(['the model'], params={'max_tokens': 8, 'n_ctx': 64})\n"
        "print(json.dumps({'out': out, 'params': [p.name for p in sig.params.params]}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(MLFLOW_TRACKING_URI=store.settings.tracking_uri, MLFLOW_REGISTRY_URI=store.settings.registry_uri,
               MLFLOW_DISABLE_TELEMETRY="true")
    r = subprocess.run([sys.executable, "-c", code, rv.model_uri], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["params"] == ["max_tokens", "temperature", "seed", "n_ctx"]
    assert got["out"] == m.predict(["the model"], params={"max_tokens": 8, "n_ctx": 64})
    reqs = (Path(m.metadata.get_model_info().model_uri and mlflow.artifacts.download_artifacts(
        f"{rv.model_uri}/requirements.txt", dst_path=str(tmp_path / "req")))).read_text()
    assert "quantgate" not in reqs and "mlflow==" in reqs


def test_registration_warns_nothing(store, tmp_path, recwarn):
    """No MLflow advice (type hints, input example) or dependency-mismatch warning on a register in our venv."""
    import warnings

    warnings.simplefilter("always")
    rv = register_gguf(store.art_fail.path, settings=store.settings, artifact=store.art_fail, model_name="quiet-reg")
    assert rv.created
    ours = [w for w in recwarn.list if "mlflow" in str(w.filename) and "noload" not in str(w.message)]
    assert not ours, [str(w.message)[:200] for w in ours]
