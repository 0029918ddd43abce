"""The pyfunc model whose artifact is the GGUF: loadable with mlflow.pyfunc.load_model; generates with llama.cpp
when the GGUF has a tokenizer, and says clearly why not otherwise."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from registry.registration import promote, register_gguf

REPO = Path(__file__).resolve().parents[2]


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

    from quantgate.convert import convert_model

    # the bundled reference model as F16: the venv's llama-cpp-python 0.3.36 build (2026-12-02) segfaults in decode
    # on Q8_0 GGUFs (tiny_hf's and the reference's alike), F16 generates
    art = convert_model(REPO / "models" / "reference", tmp_path / "ref-f16.gguf", "f16", threads=1)
    rv = register_gguf(art.path, settings=store.settings, artifact=art, model_name="reference-generate")
    m = mlflow.pyfunc.load_model(rv.model_uri)
    out = m.predict(["the model", "bytes matter"], params={"max_tokens": 4, "n_ctx": 64})
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert out == m.predict(["the model", "bytes matter"], params={"max_tokens": 4, "n_ctx": 64})  # greedy


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_pyfunc_loads_and_generates_without_quantgate(store, tmp_path):
    """load_model in a process that cannot import quantgate (no project on sys.path, the venv's editable install of
    quantgate switched off), so the loader must ship with the model; with the
    params schema: predict(..., params={"max_tokens": 8}) is accepted; requirements name published packages only."""
    pytest.importorskip("transformers")
    import json
    import os
    import subprocess
    import sys

    import mlflow

    from quantgate.convert import convert_model

    # the bundled reference model as F16 (see test_registered_gguf_with_tokenizer_generates)
    art = convert_model(REPO / "models" / "reference", tmp_path / "reference-f16.gguf", "f16", threads=1)
    rv = register_gguf(art.path, settings=store.settings, artifact=art, model_name="reference-anywhere")
    code = (
        "import json, sys, os, importlib.util\n"
        "sys.meta_path = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "sys.path = [p for p in sys.path if p and not os.path.isdir(os.path.join(p, 'registry'))]\n"
        "assert importlib.util.find_spec('registry') is None and importlib.util.find_spec('quantgate') is None\n"
        "import mlflow\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "outs = [m.predict(['the model', 'bytes'], params={'max_tokens': 8, 'n_ctx': 64}) for _ in range(2)]\n"
        "print(json.dumps({'outs': outs, 'params': [p.name for p in m.metadata.signature.params.params]}))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=store.settings.tracking_uri, MLFLOW_REGISTRY_URI=store.settings.registry_uri,
               MLFLOW_DISABLE_TELEMETRY="true")
    r = subprocess.run([sys.executable, "-c", code, rv.model_uri], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["params"] == ["max_tokens", "temperature", "seed", "n_ctx"]
    a, b = got["outs"]
    assert len(a) == 2 and all(isinstance(t, str) for t in a) and a == b  # greedy: the same text twice
    reqs = Path(mlflow.pyfunc.get_model_dependencies(rv.model_uri)).read_text()
    assert "quantgate" not in reqs and "mlflow==" in reqs and "llama-cpp-python==" in reqs


def test_registration_warns_nothing(store, tmp_path, recwarn):
    """No MLflow advice (type hints, input example) or dependency-mismatch warning on a register in our venv."""
    import warnings

    warnings.simplefilter("always")
    rv = register_gguf(store.art_fail.path, settings=store.settings, artifact=store.art_fail, model_name="quiet-reg")
    assert rv.created
    ours = [w for w in recwarn.list if "mlflow" in str(w.filename) and "noload" not in str(w.message)]
    assert not ours, [str(w.message)[:200] for w in ours]
