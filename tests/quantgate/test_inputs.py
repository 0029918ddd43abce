"""Model inputs beyond a local path (quantgate.inputs.resolve_model), through the CLI: a Hub id in a real Hugging Face
cache layout (blobs/snapshots/refs, symlinked shards), an MLflow model version (mlflow.transformers, SQLite store),
a DVC-tracked folder at a git revision (git + dvc init/add/push to a local remote, cache removed). Each GGUF names
where its source came from (quantgate.source_ref / quantgate.source_lineage), and so do the registry and the
compliance report."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "models" / "reference"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cli(tmp_path, monkeypatch):
    from quantgate.cli import app

    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "qg-cache"))
    monkeypatch.setenv("QUANTGATE_STORE_DIR", str(tmp_path / "mlruns-store"))
    for var in ("QUANTGATE_MLFLOW_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "QUANTGATE_AUDIT_DB_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def _kv(path: Path) -> dict:
    from quant.gguf_reader import read_gguf

    with read_gguf(path) as g:
        return {k.key: k.value for k in g.kv if k.key.startswith("quantgate.")}


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    from gguf import GGUFReader

    return {t.name: bytes(t.data.tobytes()) for t in GGUFReader(str(path)).tensors}


def _sharded_copy(dst: Path) -> Path:
    """The reference checkpoint with its weights split into two safetensors shards + an index (what large Hub
    models look like)."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir(parents=True)
    for f in REFERENCE.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    tensors = load_file(REFERENCE / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, dst / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s for s, ks in halves.items() for k in ks}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def _hf_cache(root: Path, repo_id: str, source: Path, commit: str = COMMIT) -> Path:
    """huggingface_hub's cache layout: models--ORG--NAME/{blobs/<hash>, snapshots/<commit>/<file> -> blob,
    refs/main = commit}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        if not f.is_file():
            continue
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo


def test_hub_id_from_the_local_hf_cache(cli, tmp_path, monkeypatch):
    from huggingface_hub import scan_cache_dir

    hub = tmp_path / "hf-home" / "hub"
    _hf_cache(hub, "acme/reference", _sharded_copy(tmp_path / "sharded"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    info = scan_cache_dir(hub)  # huggingface_hub itself reads our layout as a cached repo
    assert [r.repo_id for r in info.repos] == ["acme/reference"] and not info.warnings

    r = cli("quantize", "-m", "acme/reference", "-p", "Q8_0", "-o", tmp_path / "hub-q8_0.gguf", "-q")
    assert r.exit_code == 0, r.output
    kv = _kv(tmp_path / "hub-q8_0.gguf")
    assert kv["quantgate.source_ref"] == f"acme/reference@{COMMIT}"
    lin = json.loads(kv["quantgate.source_lineage"])
    assert lin == {"kind": "hf", "ref": f"acme/reference@{COMMIT}", "name": "reference", "repo_id": "acme/reference",
                   "revision": "main", "commit": COMMIT}
    # the symlinked shards are read like the single file: same tensors as quantizing the folder itself
    r = cli("quantize", "-m", REFERENCE, "-p", "Q8_0", "-o", tmp_path / "dir-q8_0.gguf", "-q")
    assert r.exit_code == 0, r.output
    assert _tensor_bytes(tmp_path / "hub-q8_0.gguf") == _tensor_bytes(tmp_path / "dir-q8_0.gguf")
    assert "quantgate.source_ref" not in _kv(tmp_path / "dir-q8_0.gguf")  # a plain path has no lineage keys

    # the revision picks the snapshot; an unknown one, or an id that is not cached: one error line, exit 2
    r = cli("quantize", "-m", "acme/reference", "--model-rev", COMMIT, "-p", "Q8_0", "--dry-run", "-o", "x.gguf")
    assert r.exit_code == 0, r.output
    for args in (("acme/reference", "--model-rev", "v9"), ("acme/missing",)):
        r = cli("quantize", "-m", *args, "-p", "Q8_0", "-o", tmp_path / "no.gguf")
        assert r.exit_code == 2 and r.output.count("error:") == 1 and "not in the Hugging Face cache" in r.output
        assert "Traceback" not in r.output and not (tmp_path / "no.gguf").exists()

    # HF_HUB_CACHE wins over HF_HOME
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    r = cli("quantize", "-m", "acme/reference", "-p", "Q8_0", "--dry-run", "-o", "x.gguf")
    assert r.exit_code == 2 and "empty-hub" in r.output


def test_a_local_folder_named_like_a_hub_id_wins(cli, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    _hf_cache(hub, "acme/reference", REFERENCE)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    shutil.copytree(REFERENCE, tmp_path / "acme" / "reference")
    r = cli("quantize", "-m", "acme/reference", "-p", "Q8_0", "-o", tmp_path / "local.gguf", "-q")
    assert r.exit_code == 0, r.output
    assert "quantgate.source_ref" not in _kv(tmp_path / "local.gguf")  # the folder, not the cache snapshot


def _log_checkpoint(tracking_uri: str, name: str) -> str:
    """Register the reference checkpoint folder as a model version the documented way (docs/DECISIONS.md): the
    folder logged as run artifacts under `model/`, the version created from `runs:/<run>/model` (files copied,
    no weights loaded). Returns the version."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, tracking_uri)
    exp = client.create_experiment("base-models")
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(REFERENCE), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    assert mlflow.__version__
    return str(mv.version)


def test_mlflow_model_version_as_source_named_in_gguf_registry_and_report(cli, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    store = tmp_path / "mlruns-store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    version = _log_checkpoint(uri, "base-llama")
    MlflowClient(uri, uri).set_registered_model_alias("base-llama", "base", version)

    r = cli("convert", "-m", f"models:/base-llama/{version}", "-o", tmp_path / "base-f16.gguf", "-q")
    assert r.exit_code == 0, r.output
    lin = json.loads(_kv(tmp_path / "base-f16.gguf")["quantgate.source_lineage"])
    assert lin["kind"] == "mlflow" and lin["ref"] == f"models:/base-llama/{version}" and lin["version"] == version
    # an alias resolves to the same version (and says which alias); the download is cached
    r = cli("quantize", "-m", "models:/base-llama@base", "-p", "Q4_K_M", "-o", tmp_path / "base-q4.gguf", "--json")
    assert r.exit_code == 0, r.output
    art = json.loads(r.output[r.output.index("{"):])
    kv = _kv(tmp_path / "base-q4.gguf")
    lin = json.loads(kv["quantgate.source_lineage"])
    assert kv["quantgate.source_ref"] == f"models:/base-llama/{version}" and lin["alias"] == "base"
    assert lin["name"] == "base-llama" and lin["run_id"]
    # the source is the same checkpoint: same source SHA-256 as the folder the version was logged from
    from core.hashing import checkpoint_sha256

    assert art["source_sha256"] == checkpoint_sha256([REFERENCE / "model.safetensors"])
    (tmp_path / "art.json").write_text(r.output[r.output.index("{"):])
    r = cli("register", tmp_path / "base-q4.gguf", "--artifact", tmp_path / "art.json", "--json")
    assert r.exit_code == 0, r.output
    rv = json.loads(r.output[r.output.index("{"):])
    assert rv["model_name"].startswith("base-llama-")  # named after the source, not after a cache folder
    mv = MlflowClient(uri, uri).get_model_version(rv["model_name"], rv["version"])
    assert mv.tags["source"] == f"models:/base-llama/{version}"
    run = MlflowClient(uri, uri).get_run(mv.run_id)
    assert run.data.params["source.version"] == version and run.data.params["source.kind"] == "mlflow"
    r = cli("report", rv["model_name"], rv["version"], "--out", tmp_path / "rep", "--format", "md")
    assert r.exit_code == 0, r.output
    md = next((tmp_path / "rep").glob("*.md")).read_text()
    assert "models:/base\\-llama/" in md or "models:/base-llama/" in md

    # a quantgate GGUF version is an input too (evaluate/validate --candidate): its GGUF, SHA-256 checked
    from quantgate.inputs import resolve_model

    got = resolve_model(f"models:/{rv['model_name']}/{rv['version']}")
    assert got.path.read_bytes() == (tmp_path / "base-q4.gguf").read_bytes() and got.kind == "mlflow"
    r = cli("quantize", "-m", "models:/base-llama/99", "-p", "Q8_0", "-o", tmp_path / "none.gguf")
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "no version 99" in r.output


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True, env=env).stdout.strip()


def _dvc(repo: Path, *args: str) -> None:
    dvc = Path(sys.executable).with_name("dvc")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run([str(dvc), *args], cwd=repo, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]


def dvc_model_repo(tmp_path: Path) -> tuple[Path, str]:
    """A real git + DVC repo holding the reference model at models/base, tagged v1 and pushed to a local remote:
    (repo, v1's commit)."""
    repo = tmp_path / "models-repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _dvc(repo, "init", "-q")
    _dvc(repo, "config", "core.check_update", "false")
    _dvc(repo, "remote", "add", "-d", "store", str(tmp_path / "dvc-remote"))
    shutil.copytree(REFERENCE, repo / "models" / "base", ignore=shutil.ignore_patterns("*.png"))
    _dvc(repo, "add", "-q", "models/base")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "base model v1")
    _git(repo, "tag", "v1")
    v1 = _git(repo, "rev-parse", "HEAD")
    _dvc(repo, "push", "-q")
    return repo, v1


def test_dvc_tracked_model_at_a_revision(cli, tmp_path):
    repo, v1 = dvc_model_repo(tmp_path)
    # a later revision changes the model; v1 stays reachable only through git + the remote
    cfg = json.loads((repo / "models" / "base" / "config.json").read_text())
    (repo / "models" / "base" / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-6}))
    _dvc(repo, "add", "-q", "models/base")
    _git(repo, "commit", "-q", "-am", "base model v2")
    shutil.rmtree(repo / ".dvc" / "cache")  # v1's files are now only in the DVC remote

    r = cli("quantize", "-m", "models/base", "--model-repo", repo, "--model-rev", "v1", "-p", "Q8_0",
            "-o", tmp_path / "dvc-q8_0.gguf", "-q")
    assert r.exit_code == 0, r.output
    kv = _kv(tmp_path / "dvc-q8_0.gguf")
    lin = json.loads(kv["quantgate.source_lineage"])
    md5 = next(o["md5"] for o in __import__("yaml").safe_load(_git(repo, "show", "v1:models/base.dvc"))["outs"])
    assert lin == {"kind": "dvc", "ref": f"{repo}@{v1}:models/base", "name": "base", "repo": str(repo),
                   "rev": "v1", "commit": v1, "path": "models/base", "md5": md5}
    assert kv["quantgate.source_ref"] == f"{repo}@{v1}:models/base"
    # v1's bytes: the same tensors as quantizing the reference folder it was made from
    r = cli("quantize", "-m", REFERENCE, "-p", "Q8_0", "-o", tmp_path / "ref-q8_0.gguf", "-q")
    assert _tensor_bytes(tmp_path / "dvc-q8_0.gguf") == _tensor_bytes(tmp_path / "ref-q8_0.gguf")
    # the DVC stages take the same reference: prepare pins the commit, quantize --source writes the same lineage
    r = cli("stage", "prepare", "-m", "models/base", "--model-repo", repo, "--model-rev", "v1", "-o",
            tmp_path / "source.json")
    assert r.exit_code == 0, r.output
    src = json.loads((tmp_path / "source.json").read_text())
    assert src["pin"] == {"value": "models/base", "repo": str(repo), "rev": v1} and src["lineage"]["rev"] == "v1"
    r = cli("stage", "quantize", "--source", tmp_path / "source.json", "--mix", "Q8_0", "--out-dir", tmp_path / "st")
    assert r.exit_code == 0, r.output
    assert _kv(tmp_path / "st" / "model-Q8_0.gguf")["quantgate.source_lineage"] == kv["quantgate.source_lineage"]

    r = cli("quantize", "-m", "models/nothing", "--model-repo", repo, "-p", "Q8_0", "-o", tmp_path / "n.gguf")
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "does not exist" in r.output
    r = cli("quantize", "-m", "models/base", "--model-repo", repo, "--model-rev", "nope", "-p", "Q8_0",
            "-o", tmp_path / "n.gguf")
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "cannot resolve revision" in r.output
