"""The CLI: every command listed, one clear error line and a non-zero exit on bad input, outputs that parse."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from quantgate.cli import app
from quantgate.sample import SampleShape, make_sample_checkpoint

runner = CliRunner()
TINY = SampleShape(n_layer=1, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=256)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    return make_sample_checkpoint(tmp_path_factory.mktemp("s") / "hf", TINY, seed=1)


def _error_line(result) -> str:
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got: {result.stderr!r}"
    assert lines[0].startswith("error:")
    return lines[0]


def test_help_lists_every_command():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("quantize", "inspect", "verify", "sample", "version"):
        assert cmd in res.stdout


def test_quantize_json_record_and_inspect(sample_dir, tmp_path):
    out = tmp_path / "m.gguf"
    res = runner.invoke(app, ["quantize", "-m", str(sample_dir), "-p", "q4_k_m", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["recipe"]["precision"] == "Q4_K_M" and rec["file_type"] == 15
    assert rec["tensor_types"]["blk.0.attn_q.weight"] == "Q4_K"
    assert len(rec["sha256"]) == 64 and out.stat().st_size == rec["nbytes"]
    ins = runner.invoke(app, ["inspect", str(out), "--json"])
    assert ins.exit_code == 0
    table = json.loads(ins.stdout)
    assert table["metadata"]["quantgate.source_sha256"] == rec["source_sha256"]
    assert table["metadata"]["general.file_type"] == 15
    ok = runner.invoke(app, ["verify", str(out)])
    assert ok.exit_code == 0 and "valid" in ok.stdout


def test_missing_model_is_one_line_exit_2(tmp_path):
    res = runner.invoke(app, ["quantize", "-m", str(tmp_path / "nope"), "-p", "Q8_0", "-o", str(tmp_path / "o.gguf")])
    assert res.exit_code == 2
    assert "nope" in _error_line(res)
    assert not (tmp_path / "o.gguf").exists()


def test_unknown_precision_lists_valid_ones(sample_dir, tmp_path):
    res = runner.invoke(app, ["quantize", "-m", str(sample_dir), "-p", "Q7_K", "-o", str(tmp_path / "o.gguf")])
    assert res.exit_code == 2
    line = _error_line(res)
    assert "Q7_K" in line and "Q4_K_M" in line


def test_bad_tensor_type_override(sample_dir, tmp_path):
    res = runner.invoke(app, ["quantize", "-m", str(sample_dir), "-p", "Q8_0", "-o", str(tmp_path / "o.gguf"),
                              "--tensor-type", "attn_v"])
    assert res.exit_code == 2
    assert "REGEX=TYPE" in _error_line(res)


def test_nan_weight_names_the_tensor_and_leaves_no_file(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = make_sample_checkpoint(tmp_path / "hf", TINY, seed=2)
    tensors = load_file(str(d / "model.safetensors"))
    bad = tensors["model.layers.0.mlp.up_proj.weight"].copy()
    bad[3, 7] = np.nan
    tensors["model.layers.0.mlp.up_proj.weight"] = bad
    save_file(tensors, str(d / "model.safetensors"))
    out = tmp_path / "o.gguf"
    res = runner.invoke(app, ["quantize", "-m", str(d), "-p", "Q4_K_M", "-o", str(out)])
    assert res.exit_code == 2
    line = _error_line(res)
    assert "blk.0.ffn_up.weight" in line and "NaN" in line
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"], "no temporary litter beside the target"


def test_verify_corrupt_file_exits_1(sample_dir, tmp_path):
    out = tmp_path / "m.gguf"
    assert runner.invoke(app, ["quantize", "-m", str(sample_dir), "-p", "Q8_0", "-o", str(out), "-q"]).exit_code == 0
    data = bytearray(out.read_bytes())
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data[: len(data) // 2]))
    res = runner.invoke(app, ["verify", str(bad)])
    assert res.exit_code == 1
    assert "INVALID" in res.stdout
    assert "problem:" in res.stderr


def test_inspect_garbage_is_one_line(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"not a gguf file at all")
    res = runner.invoke(app, ["inspect", str(f)])
    assert res.exit_code == 2
    _error_line(res)


def test_generic_mode_for_unknown_architecture(tmp_path):
    from safetensors.numpy import save_file

    d = tmp_path / "odd"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "weirdnet", "architectures": ["WeirdNet"]}))
    rng = np.random.default_rng(0)
    save_file({"enc.proj.weight": rng.standard_normal((64, 256)).astype(np.float32),
               "enc.norm.weight": np.ones(256, np.float32)}, str(d / "model.safetensors"))
    res = runner.invoke(app, ["quantize", "-m", str(d), "-p", "Q8_0", "-o", str(tmp_path / "o.gguf")])
    assert res.exit_code == 2 and "weirdnet" in _error_line(res).lower() and "--generic" in res.stderr
    res = runner.invoke(app, ["quantize", "-m", str(d), "-p", "Q8_0", "-o", str(tmp_path / "o.gguf"), "--generic",
                              "--json"])
    assert res.exit_code == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["tensor_types"] == {"enc.proj.weight": "Q8_0", "enc.norm.weight": "F32"}
    from gguf import GGUFReader

    r = GGUFReader(tmp_path / "o.gguf")
    assert r.fields["general.architecture"].contents() == "quantgate-generic"
