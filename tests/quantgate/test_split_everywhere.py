"""Split GGUF output beyond `quantize`: `quantgate run` (flags or params), the DVC quantize stage (params
split_max_size / split_max_tensors), the Celery canvas and JobSpec (what crosses Redis) carry QuantizeRequest's split
fields; the parts hold the unsplit file's tensors, byte for byte, and llama-cpp-python loads them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from typer.testing import CliRunner

from quant.gguf_split import SplitError
from quantgate.cli import app
from quantgate.jobs import JobSpec, quantize_step

REFERENCE = Path(__file__).resolve().parents[2] / "models" / "reference"
runner = CliRunner()


def _tensors(paths) -> dict[str, bytes]:
    return {t.name: bytes(t.data.view(np.uint8).reshape(-1)) for p in paths for t in GGUFReader(p).tensors}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The unsplit F16 file of the bundled model (what every split must equal)."""
    return quantize_step(REFERENCE, "F16", workdir=tmp_path_factory.mktemp("whole"), name="ref")


def test_run_writes_parts_equal_to_the_unsplit_file(whole, tmp_path):
    (tmp_path / "params.yaml").write_text("split_max_tensors: 1000\n")   # the flag wins over params
    args = ["run", "--params", str(tmp_path / "params.yaml"), "--model", str(REFERENCE), "--mix", "F16",
            "--workdir", str(tmp_path / "jobs"), "--no-validate", "--split-max-tensors", "8", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    art = json.loads(r.stdout)["results"][0]["artifact"]
    parts = [Path(p["path"]) for p in art["parts"]]
    assert len(parts) >= 3 and art["path"] == str(parts[0]) and art["split"] == {"split_max_tensors": 8}
    assert all(p.name.endswith(f"-of-{len(parts):05d}.gguf") for p in parts)
    assert _tensors(parts) == _tensors([whole["path"]]) and art["job_key"] == whole["job_key"]
    again = runner.invoke(app, args)                  # rerun: the finished split set is reused, not rewritten
    assert again.exit_code == 0 and json.loads(again.stdout)["results"][0]["artifact"]["reused"] is True
    bad = runner.invoke(app, args[:-1] + ["--split-max-size", "2G"])
    assert bad.exit_code == 2 and "not both" in bad.output


def test_stage_quantize_splits_from_params(whole, tmp_path):
    (tmp_path / "params.yaml").write_text("split_max_size: 3M\nsplit_max_tensors: null\n")
    out = tmp_path / "q"
    r = runner.invoke(app, ["stage", "quantize", "--model", str(REFERENCE), "--mix", "F16", "--out-dir", str(out),
                            "--params", str(tmp_path / "params.yaml")])
    assert r.exit_code == 0, r.output
    art = json.loads((out / "artifact.json").read_text())
    parts = sorted(out.glob("model-F16-*-of-*.gguf"))
    assert len(parts) == len(art["parts"]) >= 2 and [str(p) for p in parts] == [p["path"] for p in art["parts"]]
    assert _tensors(parts) == _tensors([whole["path"]])
    (tmp_path / "params.yaml").write_text("split_max_size: lots\n")
    bad = runner.invoke(app, ["stage", "quantize", "--model", str(REFERENCE), "--mix", "F16", "--out-dir",
                              str(tmp_path / "q2"), "--params", str(tmp_path / "params.yaml")])
    assert bad.exit_code == 2 and "--split-max-size 'lots'" in bad.output


def test_jobspec_and_canvas_carry_split():
    spec = JobSpec(model=str(REFERENCE), mixes=("F16",), split={"split_max_tensors": 8})
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).split == {"split_max_tensors": 8}
    for hostile in ({"split_max_tensors": -1}, {"split_max_tensors": 8, "split_max_bytes": 9}, {"rm": 1}, [8]):
        with pytest.raises(SplitError):
            JobSpec.from_dict({**spec.to_dict(), "split": hostile})
    from quantgate.dispatch import pipeline

    sig = pipeline(spec, "job-1")
    quantize_sig = sig.tasks[0].tasks[0] if hasattr(sig, "tasks") else sig.body.tasks[0].tasks[0]
    assert quantize_sig.task == "quantgate.quantize" and quantize_sig.args[-1] == {"split_max_tensors": 8}


def test_llama_cpp_loads_split_parts(whole, tmp_path, require_oracle):
    from tests.ggml_oracle import llama_logits

    art = quantize_step(REFERENCE, "F16", workdir=tmp_path, name="ref", split={"split_max_tensors": 8})
    split_logits = llama_logits(art["parts"][0]["path"], n_ctx=128)
    assert np.isfinite(split_logits).all() and np.array_equal(split_logits, llama_logits(whole["path"], n_ctx=128))


def test_export_ollama_refuses_a_split_part_cli(tmp_path):
    art = quantize_step(REFERENCE, "F16", workdir=tmp_path / "jobs", name="ref", split={"split_max_tensors": 8})
    r = runner.invoke(app, ["export", "ollama", art["parts"][0]["path"], "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "Ollama imports one GGUF file" in r.output, r.output
    assert not (tmp_path / "o").exists()
