"""GGUF tokenization without llama-cpp-python: the rebuilt tokenizer gives llama.cpp's ids (SentencePiece and
byte-level BPE vocabularies, data/eval.jsonl), and the CLI runs GGUF baselines with `import llama_cpp` blocked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantgate.convert import convert_model
from runtime.backends.gguf_tokenizer import gguf_tokenize, supported
from runtime.backends.llamacpp_backend import llama_tokenize
from tests.quantgate.tiny_hf import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
EDGE = ["", " ", "  two leading spaces", "<s> </s> typed specials", "tab\tand\n\nnewlines  ", "café 東京 ✅🚀 3.14"]
# `import llama_cpp` raises ImportError in this interpreter: the default install (scripts/setup.sh without --oracle)
_NO_LLAMA = "import runpy, sys; sys.modules['llama_cpp'] = None; sys.argv = ['quantgate'] + sys.argv[1:]; " \
            "runpy.run_module('quantgate.cli', run_name='__main__')"


def _texts() -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "data" / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["text"] for r in rows] + EDGE


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tokgguf")
    qwen = make_tiny_model(d / "qwen2", "qwen2", seed=1)
    out = {"spm": d / "reference-f16.gguf", "bpe": d / "qwen2-f16.gguf"}
    convert_model(ROOT / "models" / "reference", out["spm"], "f16")
    convert_model(qwen, out["bpe"], "f16")
    return out


@pytest.mark.parametrize("vocab", ["spm", "bpe"])
def test_rebuilt_tokenizer_gives_llama_cpp_ids(require_oracle, ggufs, vocab):
    texts = _texts()
    assert supported(ggufs[vocab]) is None
    bos_ref, ref = llama_tokenize(ggufs[vocab], texts)
    bos, ids = gguf_tokenize(ggufs[vocab], texts)
    assert bos == bos_ref
    assert [i for i in range(len(texts)) if ids[i] != ref[i]] == []
    assert sum(len(x) for x in ids) > 10_000 if vocab == "spm" else True


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", _NO_LLAMA, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1200)


def test_cli_runs_gguf_baseline_without_llama_cpp(tmp_path):
    model = make_tiny_model(tmp_path / "model", "llama", seed=3)
    f16 = tmp_path / "model-f16.gguf"
    convert_model(model, f16, "f16")
    probe = _cli(["version"], tmp_path)
    assert probe.returncode == 0, probe.stderr
    blocked = subprocess.run([sys.executable, "-c", "import sys; sys.modules['llama_cpp'] = None\n"
                              "from runtime.backends.llamacpp_backend import llama_available\n"
                              "print(llama_available())"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=300)
    assert blocked.stdout.strip() == "False", blocked.stderr
    calib = tmp_path / "calib.jsonl"
    lines = [json.loads(x) for x in (ROOT / "data" / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    calib.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in lines[:20]), encoding="utf-8")
    auto = _cli(["quantize", "--model", str(f16), "--precision", "auto", "--target-bpw", "6", "--out",
                 str(tmp_path / "auto.gguf"), "--calib", str(calib), "--cache-dir", str(tmp_path / "cache"), "-q"],
                tmp_path)
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert "llama-cpp-python" not in auto.stderr
    q8 = _cli(["quantize", "--model", str(f16), "--precision", "Q8_0", "--out", str(tmp_path / "q8.gguf"), "-q"],
              tmp_path)
    assert q8.returncode == 0, q8.stderr
    sample = tmp_path / "eval.jsonl"
    sample.write_text("".join(json.dumps(r) + "\n" for r in lines[::10]), encoding="utf-8")
    val = _cli(["validate", "--baseline", str(f16), "--quantized", str(tmp_path / "q8.gguf"), "--threshold", "0.05",
                "--metric", "kl_mean", "--dataset", str(sample), "--max-tokens", "48", "--no-expectations",
                "--report-dir", str(tmp_path / "reports")], tmp_path)
    assert val.returncode == 0, val.stdout + val.stderr
    assert "PASSED" in val.stdout and "structural:derived_from" not in val.stderr
