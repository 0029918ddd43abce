"""A split GGUF registers as ONE model version holding every part; download returns every part, each checked by
SHA-256 (through the set's digest), audited part by part; a tampered part is refused and nothing lands."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.hashing import checkpoint_sha256, file_sha256
from core.records import QuantizeRequest
from quantgate.pipeline import quantize_model
from quantgate.sample import SampleShape, make_sample_checkpoint
from registry.audit import AuditLog, record_event
from registry.client import RegistryError
from registry.config import RegistrySettings
from registry.queries import download
from registry.registration import register_gguf
from tests.registry.conftest import TINY, make_verdict, validated


@pytest.fixture(scope="module")
def split_version(tmp_path_factory):
    work = tmp_path_factory.mktemp("split-reg")
    src = make_sample_checkpoint(work / "tiny-llama", SampleShape(**TINY), seed=5)
    art = quantize_model(QuantizeRequest(source=src, out=work / "tiny-q8_0.gguf", precision="Q8_0", threads=1,
                                         split_max_tensors=5))
    settings = RegistrySettings.from_env(env={"QUANTGATE_STORE_DIR": str(work / "mlruns-store")})
    record_event("quantize", db_url=settings.audit_db_url, artifact_sha256=art.sha256, job_key=art.job_key,
                 inputs=[{"role": "source", "path": art.source, "sha256": art.source_sha256}],
                 outputs=[p["path"] for p in art.parts], detail="quantized to Q8_0 (split)")
    verdict = validated(make_verdict(art, True), settings.audit_db_url)
    rv = register_gguf(art.path, settings=settings, verdict=verdict, artifact=art)
    return work, art, settings, rv


def test_one_version_for_every_part(split_version):
    work, art, settings, rv = split_version
    parts = [Path(p["path"]) for p in art.parts]
    assert len(parts) >= 2 and art.sha256 == checkpoint_sha256(parts)
    again = register_gguf(parts[-1], settings=settings, verdict=make_verdict(art, True), artifact=art)  # any part
    assert (again.model_name, again.version, again.created) == (rv.model_name, rv.version, False)
    with AuditLog(settings.audit_db_url) as log:
        reg = [e for e in log.events(artifact_sha256=art.sha256) if e.action == "register"]
    assert len(reg) == 1
    recorded = {i["role"]: i["sha256"] for i in reg[0].inputs if i["role"].startswith("gguf_part_")}
    assert recorded == {f"gguf_part_{i + 1}": file_sha256(p) for i, p in enumerate(parts)}


def test_download_returns_every_part_checked(split_version, tmp_path):
    work, art, settings, rv = split_version
    got = download(f"{rv.model_name}/{rv.version}", tmp_path / "dl", settings=settings)
    parts = [Path(p["path"]) for p in art.parts]
    assert got == tmp_path / "dl" / parts[0].name
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == [p.name for p in parts]  # nothing else, no temps
    for p in parts:
        assert (tmp_path / "dl" / p.name).read_bytes() == p.read_bytes()
    with AuditLog(settings.audit_db_url) as log:
        dl = [e for e in log.events(artifact_sha256=art.sha256) if e.action == "download"][-1]
    assert [o["sha256"] for o in dl.outputs[1:]] == [file_sha256(p) for p in parts]


def test_a_tampered_part_is_refused(split_version, tmp_path):
    work, art, settings, rv = split_version
    stored = [p for p in Path(settings.store_dir).rglob(Path(art.parts[-1]["path"]).name) if p.is_file()]
    assert len(stored) == 1
    original = stored[0].read_bytes()
    stored[0].write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        with pytest.raises(RegistryError, match="parts have SHA-256"):
            download(f"{rv.model_name}/{rv.version}", tmp_path / "dl", settings=settings)
        assert not list((tmp_path / "dl").iterdir())
    finally:
        stored[0].write_bytes(original)


def test_ollama_export_refuses_a_split_version_before_fetching(split_version, tmp_path):
    from quantgate.export import ExportError, export_ollama
    from registry.queries import gguf_file_name

    work, art, settings, rv = split_version
    ref = f"{rv.model_name}/{rv.version}"
    assert gguf_file_name(ref, settings=settings) == Path(art.parts[0]["path"]).name
    with pytest.raises(ExportError, match="split GGUF; Ollama imports one GGUF file"):
        export_ollama(ref, tmp_path / "ollama", settings=settings)
    with pytest.raises(ExportError, match="part of a split GGUF"):
        export_ollama(art.parts[1]["path"], tmp_path / "ollama", settings=settings)
    assert not (tmp_path / "ollama").exists()          # refused before anything was written


def test_hf_export_lists_every_part(split_version, tmp_path):
    from quantgate.export import export_hf

    work, art, settings, rv = split_version
    exp = export_hf(rv.model_name, tmp_path / "hf", settings=settings, include_failed=True)
    names = [Path(p["path"]).name for p in art.parts]
    [f] = [f for f in exp.files if f.version == str(rv.version)]
    assert f.parts == names and f.file == names[0] and f.sha256 == art.sha256
    assert f.size_bytes == sum(p["nbytes"] for p in art.parts)
    card = exp.readme.read_text(encoding="utf-8")
    row = next(line for line in card.splitlines() if names[0] in line and "|" in line)
    assert all(n in row for n in names)
    assert sorted(p.name for p in (tmp_path / "hf").glob("*.gguf")) == names
