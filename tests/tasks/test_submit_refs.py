"""`quantgate submit --model REF` with a real Redis broker and a real worker: a models:/NAME@ALIAS reference is sent
as a reference and resolved by the worker (the submitter has no access to that registry here), pinned by a `resolve`
task, and every task opens the pinned version; the GGUF and the job result name it. Hostile references and
forged source records in Celery messages fail on the worker at once (no retry). (A plain path that is not on the
worker: test_load_and_bad_input.)"""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

from tests._mlflow_models import REFERENCE, log_version
from tests.tasks.conftest import QUANTGATE, ROOT, wait_for

EVAL = {"dataset": str(ROOT / "data" / "eval.jsonl"), "max_tokens": 16, "expectations": False}


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(QUANTGATE + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def _kv(path: Path) -> dict:
    from quant.gguf_reader import read_gguf

    with read_gguf(path) as g:
        return {k.key: k.value for k in g.kv if k.key.startswith("quantgate.")}


def _send(name: str, *args) -> dict:
    """Send one raw task message (what anyone with broker access can do) and wait for its final state."""
    from quantgate.broker import app
    from quantgate.dispatch import _meta

    tid = uuid.uuid4().hex
    app.send_task(name, args=list(args), task_id=tid)
    return wait_for(lambda: (m := _meta(tid)).get("status") in ("SUCCESS", "FAILURE") and m, 60, f"{name} to end")


def test_submit_models_ref_is_resolved_by_the_worker(cluster, tmp_path):
    from mlflow import MlflowClient

    store = cluster.folder / "store"        # the workers' registry (QUANTGATE_STORE_DIR of the cluster)
    store.mkdir(exist_ok=True)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    v1 = log_version(uri, store, "base", REFERENCE)
    MlflowClient(uri, uri).set_registered_model_alias("base", "champion", v1)
    w = cluster.worker("w1")

    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"gates": ["ppl_ratio <= 1.5", "kl_mean <= 0.5"], "eval": EVAL}))
    # the submitting machine: another registry (empty) and another input cache; it resolves nothing itself
    env = {**os.environ, "QUANTGATE_BROKER_URL": cluster.redis.url, "PYTHONPATH": str(ROOT),
           "QUANTGATE_STORE_DIR": str(tmp_path / "submitter-store"),
           "QUANTGATE_CACHE_DIR": str(tmp_path / "submitter-cache")}
    sub = _cli(["submit", "--params", str(params), "--model", "models:/base@champion", "--mix", "Q8_0",
                "--workdir", str(cluster.workdir)], env, tmp_path)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip()
    watch = _cli(["status", job, "--watch", "--interval", "0.3"], env, tmp_path)
    assert watch.returncode == 0, watch.stdout + watch.stderr + w.log()[-3000:]
    st = json.loads(_cli(["status", job, "--json"], env, tmp_path).stdout)
    assert set(st["tasks"]) == {"source", "Q8_0:quantize", "Q8_0:validate"}
    res = st["result"]
    assert res["model"] == f"models:/base/{v1}" and res["source"]["lineage"]["alias"] == "champion"
    (rec,) = res["results"]
    assert rec["verdict"]["passed"] is True and rec["source"]["sha256"] == res["source_sha256"]
    kv = _kv(Path(rec["artifact"]["path"]))
    assert kv["quantgate.source_ref"] == f"models:/base/{v1}"
    assert json.loads(kv["quantgate.source_lineage"])["alias"] == "champion"
    assert not (tmp_path / "submitter-cache" / "inputs").exists()          # downloaded by the worker only
    assert (cluster.folder / "cache" / "inputs" / "mlflow").is_dir()

    # a reference the worker cannot resolve: the resolve task fails at once with the resolver's message
    bad = _cli(["submit", "--params", str(params), "--model", "models:/base/99", "--mix", "Q8_0",
                "--workdir", str(cluster.workdir)], env, tmp_path)
    assert bad.returncode == 0, bad.stderr
    wait_for(lambda: _cli(["status", bad.stdout.strip(), "--json"], env, tmp_path).returncode == 1, 60, "failure")
    st = json.loads(_cli(["status", bad.stdout.strip(), "--json"], env, tmp_path).stdout)
    assert st["tasks"]["source"]["state"] == "FAILURE" and st["tasks"]["source"]["retries"] == 0
    assert "no version 99" in st["tasks"]["source"]["error"]
    # the submitter refuses a reference no resolver may see before sending it (one error line, exit 2)
    r = _cli(["submit", "--model", "acme/model", "--model-rev", "../../etc", "--mix", "Q8_0", "--no-validate",
              "--workdir", str(cluster.workdir)], env, tmp_path)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "not a git or Hub revision" in r.stderr

    # hostile messages straight onto the queue: the worker runs the same checks, no retry, the worker lives on
    m = _send("quantgate.resolve", "acme/model", None, "--upload-pack=touch /tmp/x")
    assert m["status"] == "FAILURE" and "not a git or Hub revision" in m["error"] and not m.get("retries")
    m = _send("quantgate.resolve", "/etc", None, None)
    assert m["status"] == "FAILURE" and "outside the model roots" in m["error"]
    forged = {**rec["source"], "sha256": "0" * 64}
    m = _send("quantgate.quantize", forged, "Q8_0", str(cluster.workdir), None, None)
    assert m["status"] == "FAILURE" and "changed since it was resolved" in m["error"]
    forged = {**rec["source"], "kind": "path", "pin": {"value": "/etc/passwd", "repo": None, "rev": None}}
    m = _send("quantgate.quantize", forged, "Q8_0", str(cluster.workdir), None, None)
    assert m["status"] == "FAILURE" and "outside the model roots" in m["error"]
    assert "Retry in" not in w.log() and w.alive()
