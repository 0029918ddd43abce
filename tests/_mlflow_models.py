"""Source models in a real MLflow store for tests: an HF checkpoint folder registered as a model version the
documented way (docs/REGISTRY.md: run artifacts under model/, the version created from runs:/<run>/model; files
copied, no weights loaded), and a retrained copy of the bundled reference model (other bytes, same shape)."""
from __future__ import annotations

import shutil
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference"


def log_version(uri: str, store: Path, name: str, folder: Path) -> str:
    """Register `folder` as a new version of `name` in the SQLite store at `uri` (artifacts under store/artifacts);
    returns the version."""
    from mlflow import MlflowClient

    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name("base-models")
    exp_id = exp.experiment_id if exp else client.create_experiment(
        "base-models", artifact_location=(store / "artifacts").as_uri())
    run = client.create_run(exp_id)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return str(client.create_model_version(name, source=f"runs:/{run.info.run_id}/model",
                                           run_id=run.info.run_id).version)


def retrained(dst: Path) -> Path:
    """The reference checkpoint with one norm weight scaled: another model version with other bytes."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(REFERENCE, dst, ignore=shutil.ignore_patterns("*.png"))
    t = load_file(REFERENCE / "model.safetensors")
    name = next(k for k in sorted(t) if k.endswith("norm.weight"))
    t[name] = t[name] * 1.01
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
