"""What the DVC stages write besides artifacts: per-mix metrics JSON and offline PNG plots (matplotlib, no CDN)."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from core.atomic import atomic_write_bytes
from core.png import png_bytes, pyplot
from validation.tensor_error import per_tensor_errors

_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


def quantize_metrics(artifact: Mapping[str, Any], tensor_errors: Sequence[Mapping[str, Any]] | None) -> dict:
    """Size and bits/weight of one mix's artifact, plus its mean and worst per-tensor relative RMSE."""
    m: dict[str, Any] = {"mix": artifact["recipe"]["precision"], "size_bytes": artifact["nbytes"],
                         "size_mib": round(artifact["nbytes"] / 2**20, 4),
                         "bpw": round(artifact["bits_per_weight"], 5), "n_params": artifact["n_params"]}
    rel = [e["rel_rmse"] for e in tensor_errors or () if e.get("rel_rmse") is not None and e["qtype"] != "F32"]
    if rel:
        m["weight_rel_rmse_mean"] = round(sum(rel) / len(rel), 6)
        m["weight_rel_rmse_max"] = round(max(rel), 6)
    return m


def validate_metrics(verdict: Mapping[str, Any]) -> dict:
    """Quality of one mix from its verdict (PPL ratio, KL divergence, accuracy drop): no thresholds, no pass/fail,
    so a threshold change leaves this file (and the stages reading it) unchanged."""
    met = verdict.get("metrics") or {}
    keep = ("ppl_ratio", "kl_mean", "kl_p99", "top1_agreement", "accuracy_drop", "acc_candidate", "acc_baseline")
    return {k: met[k] for k in keep if isinstance(met.get(k), (int, float)) and math.isfinite(met[k])}


def tensor_error_rows(baseline: "str | os.PathLike[str]", gguf: "str | os.PathLike[str]") -> list[dict]:
    """Per-tensor weight error of a quantized GGUF against its source (validation.tensor_error)."""

    return [e.to_dict() for e in per_tensor_errors(baseline, gguf)]


def _layer(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def render_plots(metric_files: Iterable[Path], tensor_error_files: Iterable[Path], out_dir: Path) -> list[Path]:
    """Two PNGs: bits/weight vs KL divergence per mix (vs weight error when no validation ran), and the mean
    per-tensor relative RMSE by layer for each mix."""

    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    metric_files = [p for f in metric_files for p in (sorted(x for x in Path(f).iterdir() if x.is_dir())
                                                      if Path(f).is_dir() and not any(Path(f).glob("*.json"))
                                                      else [Path(f)])]
    tensor_error_files = [p for f in tensor_error_files for p in (sorted(Path(f).glob("*.json"))
                                                                  if Path(f).is_dir() else [Path(f)])]
    rows = []
    for f in metric_files:
        d: dict[str, Any] = {}
        for part in sorted(Path(f).glob("*.json")) if Path(f).is_dir() else [Path(f)]:
            d.update(json.loads(part.read_text(encoding="utf-8")))
        rows.append(d)
    rows.sort(key=lambda r: r.get("bpw", 0.0))
    written = []

    def save(fig: Any, name: str) -> None:
        atomic_write_bytes(out_dir / name, png_bytes(fig, dpi=100, tight=False))
        written.append(out_dir / name)

    have_kld = rows and all("kl_mean" in r for r in rows)
    ykey, ylabel = ("kl_mean", "mean KL divergence") if have_kld else ("weight_rel_rmse_mean",
                                                                      "mean per-tensor relative RMSE (weights)")
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r.get("bpw") for r in rows if ykey in r]
    ys = [r.get(ykey) for r in rows if ykey in r]
    ax.plot(xs, ys, "o-")
    for r in rows:
        if ykey in r:
            ax.annotate(r.get("mix", "?"), (r["bpw"], r[ykey]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log" if ys and min(ys) > 0 else "linear")
    ax.set_title("size vs quality per mix")
    ax.grid(True, alpha=0.3)
    save(fig, "bpw_vs_kld.png" if have_kld else "bpw_vs_weight_error.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for f in sorted(tensor_error_files):
        errs = json.loads(Path(f).read_text(encoding="utf-8"))
        by_layer: dict[int, list[float]] = {}
        for e in errs:
            li = _layer(e["name"])
            if li is not None and e.get("rel_rmse") is not None and e["qtype"] != "F32":
                by_layer.setdefault(li, []).append(e["rel_rmse"])
        layers = sorted(by_layer)
        ax.plot(layers, [sum(by_layer[i]) / len(by_layer[i]) for i in layers], "o-", label=Path(f).stem)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean relative RMSE of the layer's weights")
    ax.set_title("per-tensor error by layer")
    ax.legend()
    ax.grid(True, alpha=0.3)
    save(fig, "tensor_error_by_layer.png")
    return written
