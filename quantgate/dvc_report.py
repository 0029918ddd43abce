"""What the DVC stages write besides artifacts: one metrics file per mix, the plots as data (for `dvc plots`) and as
offline PNGs (matplotlib, no CDN), and the content records DVC hashes.

Every file a DVC stage declares holds content only, never when or how long: durations, timestamps, MLflow run ids
and absolute paths live in the run records beside them (artifact seconds, verdict created_at, reports), which DVC
does not track. Floats are rounded to SIG significant digits, so the last bits a different CPU's float summation
order may change do not change a hash. This is what lets a fresh clone's `dvc repro` reproduce dvc.lock
(docs/DECISIONS.md, "dvc.lock is reproducible").
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from core.atomic import atomic_write_bytes, atomic_write_text
from core.png import legend_outside, png_bytes, pyplot
from validation.tensor_error import per_tensor_errors

_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
#: significant digits of every float in a DVC-tracked file
SIG = 6
#: the data files of dvc.yaml's top-level `plots:` (written by the plots stage)
BPW_VS_KLD = "bpw_vs_kld.json"
LAYER_ERROR = "layer_error.json"


def rounded(x: Any, sig: int = SIG) -> Any:
    """`x` with every float (in nested dicts/lists) rounded to `sig` significant digits; non-finite floats -> None."""
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, float):
        return float(f"{x:.{sig}g}") if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {k: rounded(v, sig) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v, sig) for v in x]
    return x


def write_json(path: "str | Path", obj: Any) -> None:
    """A DVC-tracked JSON file: floats rounded, keys sorted, written atomically (its folder created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(rounded(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def quantize_metrics(artifact: Mapping[str, Any], tensor_errors: Sequence[Mapping[str, Any]] | None) -> dict:
    """Size and bits/weight of one mix's artifact, plus its mean and worst per-tensor relative RMSE."""
    m: dict[str, Any] = {"mix": artifact["recipe"]["precision"], "size_bytes": artifact["nbytes"],
                         "size_mib": round(artifact["nbytes"] / 2**20, 4),
                         "bpw": round(artifact["bits_per_weight"], 5), "n_params": artifact["n_params"]}
    rel = [e["rel_rmse"] for e in tensor_errors or () if e.get("rel_rmse") is not None and e["qtype"] != "F32"]
    if rel:
        m["weight_rel_rmse_mean"] = round(sum(rel) / len(rel), 6)
        m["weight_rel_rmse_max"] = round(max(rel), 6)
    return rounded(m)


def validate_metrics(verdict: Mapping[str, Any]) -> dict:
    """Quality of one mix from its verdict (PPL ratio, KL divergence, accuracy drop): no thresholds, no pass/fail,
    so a threshold change leaves this file (and the stages reading it) unchanged."""
    met = verdict.get("metrics") or {}
    keep = ("ppl_ratio", "kl_mean", "kl_p99", "top1_agreement", "accuracy_drop", "acc_candidate", "acc_baseline")
    return rounded({k: met[k] for k in keep if isinstance(met.get(k), (int, float)) and math.isfinite(met[k])})


def mix_metrics(quantize: Mapping[str, Any] | None, validate: Mapping[str, Any]) -> dict:
    """The one metrics file of a mix (`dvc metrics show`: one row per mix): its quantize and validation figures."""
    return rounded({**(quantize or {}), **validate})


def verdict_summary(verdict: Mapping[str, Any]) -> dict:
    """The content of a verdict: artifact, gate set, pass/fail and each gate's measured value (rounded), without
    created_at, report paths and gate details (the run record, verdict.json, keeps those)."""
    gates = [{"name": g.get("name"), "kind": g.get("kind"), "passed": bool(g.get("passed")),
              "skipped": bool(g.get("skipped")), "value": g.get("value"), "comparator": g.get("comparator"),
              "threshold": g.get("threshold")} for g in verdict.get("gates") or []]
    return rounded({"artifact_sha256": verdict.get("artifact_sha256"), "gate_set": verdict.get("gate_set"),
                    "passed": bool(verdict.get("passed")), "n_gates": len(gates),
                    "failed": [g["name"] for g in gates if not g["passed"] and not g["skipped"]], "gates": gates})


def profile_content(profile: Mapping[str, Any]) -> dict:
    """A sensitivity profile without what depends on the run (its timings, which also count the tensors the
    calibration cache already held), floats rounded: the file the AUTO mix is planned from, the same on every
    fresh run."""
    return rounded({k: v for k, v in profile.items() if k != "timings"})


def registration_record(rv: Mapping[str, Any], passed: bool, alias: str) -> dict:
    """The content of a registration: model, version, artifact, verdict and the mix alias a passing version holds
    (whether this run or an earlier one promoted it); the MLflow run id is the run record's, printed, not kept."""
    keep = ("model_name", "version", "artifact_sha256", "job_key", "verdict", "model_uri")
    out = {k: rv[k] for k in keep if k in rv}
    if passed:
        out["alias"] = alias
    return out


def tensor_error_rows(baseline: "str | Path", gguf: "str | Path") -> list[dict]:
    """Per-tensor weight error of a quantized GGUF against its source (validation.tensor_error), rounded."""

    return rounded([e.to_dict() for e in per_tensor_errors(baseline, gguf)])


def _layer(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def _json_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given, folders as their *.json files (sorted)."""
    return [p for f in paths for p in (sorted(Path(f).glob("*.json")) if Path(f).is_dir() else [Path(f)])]


def plot_data(metric_files: Iterable[Path], tensor_error_files: Iterable[Path]) -> tuple[list[dict], list[dict]]:
    """The plots' data, as `dvc plots` reads it: one row per mix (mix, bpw, kl_mean, ppl_ratio, size_mib, weight
    error; sorted by bpw) and one row per (mix, layer) with the mean relative RMSE of that layer's weights."""
    mixes = []
    for f in _json_files(metric_files):
        d = json.loads(f.read_text(encoding="utf-8"))
        row = {"mix": d.get("mix") or f.stem}
        row.update({k: d[k] for k in ("bpw", "kl_mean", "ppl_ratio", "size_mib", "weight_rel_rmse_mean")
                    if isinstance(d.get(k), (int, float))})
        if "bpw" in row:
            mixes.append(row)
    mixes.sort(key=lambda r: (r["bpw"], r["mix"]))
    layers = []
    for f in sorted(_json_files(tensor_error_files), key=lambda p: p.stem):
        by_layer: dict[int, list[float]] = {}
        for e in json.loads(f.read_text(encoding="utf-8")):
            li = _layer(e["name"])
            if li is not None and e.get("rel_rmse") is not None and e["qtype"] != "F32":
                by_layer.setdefault(li, []).append(e["rel_rmse"])
        layers += [{"mix": f.stem, "layer": i, "rel_rmse": sum(v) / len(v)} for i, v in sorted(by_layer.items())]
    return rounded(mixes), rounded(layers)


def render_plots(metric_files: Iterable[Path], tensor_error_files: Iterable[Path], out_dir: Path) -> list[Path]:
    """The plots stage: the data files of dvc.yaml's `plots:` (bpw_vs_kld.json, layer_error.json) and the same two
    plots as PNGs: bits/weight vs KL divergence per mix (vs weight error when no validation ran), and the mean
    per-tensor relative RMSE by layer for each mix (legend beside the plot, never over it)."""

    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    mixes, layers = plot_data(metric_files, tensor_error_files)
    written = []
    for name, rows in ((BPW_VS_KLD, mixes), (LAYER_ERROR, layers)):
        write_json(out_dir / name, rows)
        written.append(out_dir / name)

    def save(fig: Any, name: str) -> None:
        atomic_write_bytes(out_dir / name, png_bytes(fig, dpi=100))
        written.append(out_dir / name)

    have_kld = bool(mixes) and all("kl_mean" in r for r in mixes)
    ykey, ylabel = ("kl_mean", "mean KL divergence") if have_kld else ("weight_rel_rmse_mean",
                                                                      "mean per-tensor relative RMSE (weights)")
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [r for r in mixes if r.get(ykey) is not None]
    ax.plot([r["bpw"] for r in pts], [r[ykey] for r in pts], "o-")
    for r in pts:
        ax.annotate(r["mix"], (r["bpw"], r[ykey]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log" if pts and min(r[ykey] for r in pts) > 0 else "linear")
    ax.set_title("size vs quality per mix")
    ax.grid(True, alpha=0.3)
    save(fig, "bpw_vs_kld.png" if have_kld else "bpw_vs_weight_error.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for mix in sorted({r["mix"] for r in layers}):
        rows = [r for r in layers if r["mix"] == mix]
        ax.plot([r["layer"] for r in rows], [r["rel_rmse"] for r in rows], "o-", label=mix)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean relative RMSE of the layer's weights")
    ax.set_title("per-tensor error by layer")
    legend_outside(ax, fontsize=8)
    ax.grid(True, alpha=0.3)
    save(fig, "tensor_error_by_layer.png")
    return written
