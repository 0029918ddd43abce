"""Split GGUF output through a live Celery worker: `quantgate submit --split-max-tensors N --register` (and params
split_max_tensors) run by a real worker on a real Redis broker writes the split set, validates the whole set against
the source and registers it as ONE version holding every part; the parts hold the unsplit file's tensors and the
registry download gives them back, SHA-256 checked."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from core.hashing import checkpoint_sha256
from quantgate.jobs import quantize_step
from tests._mlflow_models import REFERENCE
from tests.tasks.conftest import QUANTGATE, ROOT, wait_for

EVAL = {"dataset": str(ROOT / "data" / "eval.jsonl"), "max_tokens": 16, "expectations": False}


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(QUANTGATE + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def _tensors(paths) -> dict[str, bytes]:
    return {t.name: bytes(t.data.view(np.uint8).reshape(-1)) for p in paths for t in GGUFReader(p).tensors}


def test_submit_split_is_validated_and_registered_as_one_version(cluster, tmp_path):
    from mlflow import MlflowClient

    from registry.config import RegistrySettings
    from registry.queries import download

    model = tmp_path / "ref"                                   # under the worker's model roots
    shutil.copytree(REFERENCE, model, ignore=shutil.ignore_patterns("*.png"))
    w = cluster.worker("w1")
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"model": {"path": str(model), "name": "ref-split"}, "mixes": ["Q8_0"],
                                  "gates": ["ppl_ratio <= 1.5", "kl_mean <= 0.5"], "eval": EVAL,
                                  "split_max_tensors": 1000}))  # the flag wins over params
    env = {**os.environ, "QUANTGATE_BROKER_URL": cluster.redis.url, "PYTHONPATH": str(ROOT)}
    sub = _cli(["submit", "--params", str(params), "--split-max-tensors", "8", "--register", "--workdir",
                str(cluster.workdir)], env, tmp_path)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip()
    watch = _cli(["status", job, "--watch", "--interval", "0.3"], env, tmp_path)
    assert watch.returncode == 0, watch.stdout + watch.stderr + w.log()[-3000:]
    st = json.loads(_cli(["status", job, "--json"], env, tmp_path).stdout)
    assert set(st["tasks"]) == {"Q8_0:quantize", "Q8_0:validate", "Q8_0:register"}
    (rec,) = st["result"]["results"]
    art = rec["artifact"]
    parts = [Path(p["path"]) for p in art["parts"]]
    assert art["split"] == {"split_max_tensors": 8} and len(parts) >= 3 and art["path"] == str(parts[0])
    assert all(p.is_file() and p.name.endswith(f"-of-{len(parts):05d}.gguf") for p in parts)
    assert art["sha256"] == checkpoint_sha256(parts)
    # the parts are the unsplit file's tensors, byte for byte
    whole = quantize_step(model, "Q8_0", workdir=tmp_path / "whole", name="ref")
    assert _tensors(parts) == _tensors([whole["path"]]) and whole["job_key"] == art["job_key"]

    # validated as one model: the verdict is the set's (its SHA-256), and it passed
    v = rec["verdict"]
    assert v["passed"] is True and v["artifact_sha256"] == art["sha256"]
    # registered as ONE version holding every part
    settings = RegistrySettings.from_env({"QUANTGATE_STORE_DIR": str(cluster.folder / "store")})
    client = MlflowClient(settings.tracking_uri, settings.registry_uri)
    versions = client.search_model_versions("name = 'ref-split'")
    assert [str(mv.version) for mv in versions] == [str(rec["version"]["version"])]
    assert versions[0].tags["sha256"] == art["sha256"]
    got = download(f"ref-split/{rec['version']['version']}", tmp_path / "dl", settings=settings)
    assert got.name == parts[0].name
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == [p.name for p in parts]
    assert all((tmp_path / "dl" / p.name).read_bytes() == p.read_bytes() for p in parts)

    # resubmitted: the finished split set is reused, and the version is not registered twice
    again = _cli(["submit", "--params", str(params), "--split-max-tensors", "8", "--register", "--workdir",
                  str(cluster.workdir)], env, tmp_path)
    assert again.returncode == 0, again.stderr
    wait_for(lambda: _cli(["status", again.stdout.strip(), "--json"], env, tmp_path).returncode == 0, 120,
             "the resubmitted job")
    st2 = json.loads(_cli(["status", again.stdout.strip(), "--json"], env, tmp_path).stdout)
    assert st2["result"]["results"][0]["artifact"]["reused"] is True
    assert st2["result"]["results"][0]["version"]["created"] is False
    assert len(client.search_model_versions("name = 'ref-split'")) == 1
    assert w.alive()
