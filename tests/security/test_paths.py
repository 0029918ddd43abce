"""Issue 12 section 3: downloads stay inside --out, Celery workers read models only under their configured roots
and write only under their configured workdir. Real MLflow SQLite store, real GGUFs, real Redis + workers."""
from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from core.hashing import file_sha256
from tests.tasks.conftest import cluster, models, redis_server  # noqa: F401 (fixtures for the worker test)

TINY = dict(n_layer=1, n_embd=256, n_ff=256, n_head=2, n_head_kv=1, n_vocab=256)


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    """A real embedded registry (SQLite + local artifacts) with one tiny GGUF per precision registered."""
    from core.records import QuantizeRequest
    from quantgate.pipeline import quantize_model
    from quantgate.sample import SampleShape, make_sample_checkpoint
    from registry.client import mlflow_client
    from registry.config import RegistrySettings
    from registry.registration import register_gguf

    work = tmp_path_factory.mktemp("sec-reg")
    src = make_sample_checkpoint(work / "tiny", SampleShape(**TINY), seed=5)
    settings = RegistrySettings.from_env(env={"QUANTGATE_STORE_DIR": str(work / "store")})
    versions = {}
    for prec in ("Q8_0", "Q4_0", "Q5_0"):
        art = quantize_model(QuantizeRequest(source=src, out=work / f"tiny-{prec}.gguf", precision=prec, threads=1))
        rv = register_gguf(art.path, settings=settings, artifact=art, model_name="sec-tiny")
        versions[prec] = rv
    return settings, mlflow_client(settings), versions, work


def _artifact_dir(client, mv) -> Path:
    model_id = getattr(mv, "model_id", None) or str(mv.source).removeprefix("models:/")
    return Path(unquote(urlparse(client.get_logged_model(model_id).artifact_location).path)) / "artifacts"


def test_download_tag_with_dotdot_cannot_write_outside_out(reg, tmp_path):
    """An MLflow tag gguf_file='../../../escape.gguf' with a matching sha256 tag used to overwrite a file outside
    --out; now the download is refused and the file outside is untouched."""
    from registry.client import RegistryError
    from registry.queries import download

    settings, client, versions, _ = reg
    rv = versions["Q4_0"]
    mv = client.get_model_version(rv.model_name, str(rv.version))
    evil = "../../../escape.gguf"
    planted = (_artifact_dir(client, mv) / evil).resolve()   # what the store would serve for that tag
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"GGUF attacker bytes")
    client.set_model_version_tag(rv.model_name, str(rv.version), "gguf_file", evil)
    client.set_model_version_tag(rv.model_name, str(rv.version), "sha256", file_sha256(planted))

    out = tmp_path / "a" / "b" / "c"
    victim = (out / evil).resolve()
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_bytes(b"victim")
    assert out not in victim.parents
    with pytest.raises(RegistryError, match="gguf_file"):
        download(f"{rv.model_name}/{rv.version}", out, settings=settings)
    assert victim.read_bytes() == b"victim"
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.parametrize("name", ["/etc/x.gguf", "sub/x.gguf", "..\\x.gguf", "..", ".", "", "x\x00.gguf",
                                  ".hidden.gguf", "x.txt"])
def test_download_refuses_unsafe_file_names(reg, tmp_path, name):
    from registry.client import RegistryError
    from registry.queries import download

    settings, client, versions, _ = reg
    rv = versions["Q5_0"]
    good = client.get_model_version(rv.model_name, str(rv.version)).tags["gguf_file"]
    client.set_model_version_tag(rv.model_name, str(rv.version), "gguf_file", name)
    try:
        with pytest.raises(RegistryError, match="gguf_file"):
            download(f"{rv.model_name}/{rv.version}", tmp_path / "out", settings=settings)
    finally:
        client.set_model_version_tag(rv.model_name, str(rv.version), "gguf_file", good)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*"))


def test_download_refuses_a_symlink_target_pointing_outside(reg, tmp_path):
    from registry.client import RegistryError
    from registry.queries import download

    settings, client, versions, _ = reg
    rv = versions["Q8_0"]
    name = client.get_model_version(rv.model_name, str(rv.version)).tags["gguf_file"]
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.gguf"
    victim.write_bytes(b"victim")
    (out / name).symlink_to(victim)
    with pytest.raises(RegistryError, match="outside"):
        download(f"{rv.model_name}/{rv.version}", out, settings=settings)
    assert victim.read_bytes() == b"victim"


def test_download_sha_mismatch_leaves_nothing_visible(reg, tmp_path):
    from registry.client import RegistryError
    from registry.queries import download

    settings, client, versions, _ = reg
    rv = versions["Q8_0"]
    mv = client.get_model_version(rv.model_name, str(rv.version))
    good = mv.tags["sha256"]
    client.set_model_version_tag(rv.model_name, str(rv.version), "sha256", "0" * 64)
    out = tmp_path / "out"
    try:
        with pytest.raises(RegistryError, match="SHA-256"):
            download(f"{rv.model_name}/{rv.version}", out, settings=settings)
    finally:
        client.set_model_version_tag(rv.model_name, str(rv.version), "sha256", good)
    assert list(out.iterdir()) == []   # no GGUF, no temp folder


def test_download_still_works(reg, tmp_path):
    from registry.queries import download

    settings, client, versions, work = reg
    rv = versions["Q8_0"]
    got = download(f"{rv.model_name}/{rv.version}", tmp_path / "out", settings=settings)
    assert got.parent == (tmp_path / "out").resolve()
    assert file_sha256(got) == file_sha256(work / "tiny-Q8_0.gguf")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [got.name]


# --- job paths -----------------------------------------------------------------------------------------------

def _settings(**kw):
    from quantgate.config import Settings

    return Settings(broker_url="memory://", **kw)


def _spec(model, workdir, **kw):
    from quantgate.jobs import JobSpec

    return JobSpec(model=str(model), mixes=("Q8_0",), workdir=str(workdir), **kw)


@pytest.fixture
def tree(tmp_path):
    roots = tmp_path / "models"
    (roots / "m").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    (outside / "secret").mkdir(parents=True)
    (roots / "link").symlink_to(outside / "secret")
    wd = tmp_path / "jobs"
    wd.mkdir()
    return roots, outside, wd


def test_check_job_paths_accepts_paths_under_roots(tree):
    from quantgate.jobs import check_job_paths

    roots, outside, wd = tree
    s = _settings(model_roots=str(roots), workdir=wd)
    check_job_paths(_spec(roots / "m", wd / "sub", dataset=str(roots / "eval.jsonl"),
                          profile_options={"calib": str(roots / "c.jsonl")}), s)
    check_job_paths(_spec(roots / "m", wd), s)


@pytest.mark.parametrize("case", ["model", "symlink", "dotdot", "workdir", "workdir_dotdot", "dataset", "calib"])
def test_check_job_paths_refuses(tree, case):
    from quantgate.jobs import JobPathError, check_job_paths

    roots, outside, wd = tree
    s = _settings(model_roots=f"{outside / 'nothing'}{os.pathsep}{roots}", workdir=wd)
    spec = {"model": _spec(outside / "secret", wd), "symlink": _spec(roots / "link", wd),
            "dotdot": _spec(roots / ".." / "elsewhere" / "secret", wd),
            "workdir": _spec(roots / "m", outside), "workdir_dotdot": _spec(roots / "m", wd / ".." / "elsewhere"),
            "dataset": _spec(roots / "m", wd, dataset=str(outside / "eval.jsonl")),
            "calib": _spec(roots / "m", wd, profile_options={"calib": str(outside / "c.jsonl")})}[case]
    with pytest.raises(JobPathError, match="outside"):
        check_job_paths(spec, s)


def test_worker_default_root_is_its_current_directory(tree, monkeypatch):
    from quantgate.jobs import JobPathError, check_job_paths

    roots, outside, wd = tree
    monkeypatch.chdir(roots)
    s = _settings(workdir=wd)
    check_job_paths(_spec(roots / "m", wd), s)
    with pytest.raises(JobPathError, match="QUANTGATE_MODEL_ROOTS"):
        check_job_paths(_spec(outside / "secret", wd), s)


def test_worker_refuses_model_and_workdir_outside_its_roots(cluster, models, tmp_path):  # noqa: F811
    """A task sent straight to a real worker (no client-side check) with a model outside QUANTGATE_MODEL_ROOTS or
    a workdir outside QUANTGATE_WORKDIR fails at once with the reason in its state and is never retried; nothing
    is written."""
    from tasks.app import app

    cluster.worker("w1", QUANTGATE_MODEL_ROOTS=str(models["tiny2"]))  # tiny2 readable, tiny not
    bad_model = app.send_task("quantgate.quantize", args=(str(models["tiny"]), "Q8_0", str(cluster.workdir)))
    evil_wd = tmp_path / "evil-out"
    bad_wd = app.send_task("quantgate.quantize", args=(str(models["tiny2"]), "Q8_0", str(evil_wd)))
    for r, what in ((bad_model, "model"), (bad_wd, "workdir")):
        deadline = time.monotonic() + 60
        while r.state not in ("FAILURE", "SUCCESS") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.state == "FAILURE", (what, r.state)
        assert "outside" in str(r.result) and what in str(r.result), str(r.result)
        assert type(r.result).__name__ == "JobPathError"
        assert (r.retries or 0) == 0
    assert not evil_wd.exists()
    assert not list(Path(cluster.workdir).rglob("*.gguf")) if Path(cluster.workdir).exists() else True


# ------------------------------------------------------------------------------ quantize/convert --out targets


def _tiny(tmp_path):
    from tests.validation._tiny import make_tiny_model

    return make_tiny_model(tmp_path / "tiny")


def _quantize_cli(*args: str):
    from typer.testing import CliRunner

    from quantgate.cli import app

    return CliRunner().invoke(app, ["quantize", *args, "-q"])


def test_quantize_out_refuses_a_device_the_input_and_the_source_folder(tmp_path):
    import os
    import stat

    src = _tiny(tmp_path)
    f16 = tmp_path / "m-f16.gguf"
    assert _quantize_cli("--model", str(src), "--precision", "F16", "--out", str(f16)).exit_code == 0
    before = f16.read_bytes()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    cases = {
        "a character device": "/dev/null",
        "a FIFO": str(fifo),
        "a folder": str(tmp_path),
        "the input file": str(f16),
        "a file inside the source folder": str(src / "q.gguf"),
    }
    for what, out in cases.items():
        model = f16 if what == "the input file" else src
        r = _quantize_cli("--model", str(model), "--precision", "Q8_0", "--out", out)
        assert r.exit_code == 2, (what, r.output)
        assert "error:" in r.output and "Traceback" not in r.output, (what, r.output)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)            # still a device
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert f16.read_bytes() == before                           # the input untouched
    assert not (src / "q.gguf").exists()                        # the source folder untouched
    # a plain new path and overwriting a previous output both still work
    out = tmp_path / "q8.gguf"
    assert _quantize_cli("--model", str(src), "--precision", "Q8_0", "--out", str(out)).exit_code == 0
    assert _quantize_cli("--model", str(src), "--precision", "Q8_0", "--out", str(out)).exit_code == 0


def test_output_through_a_symlink_to_the_input_is_refused(tmp_path):
    from core.paths import OutputTargetError, check_output_target

    src = tmp_path / "in.gguf"
    src.write_bytes(b"GGUF")
    link = tmp_path / "out.gguf"
    link.symlink_to(src)
    import pytest

    with pytest.raises(OutputTargetError):
        check_output_target(link, [src])
