"""Proof for the precision analyzer: bits per weight vs mean KL divergence on the held-out eval set for every
llama.cpp mix (with and without our collected importance matrix) and for `--precision auto` at several budgets,
plus the cold/warm times of `quantgate profile` (the calibration cache).

    .venv/bin/python benchmarks/bench_auto_mix.py --model models/reference --out-dir out/bench_auto_mix \
        --plot docs/bpw_vs_kld.png [--measure-mode stream|exact]

The accuracy check of the streamed analyzer alone (Q4_K_M with/without imatrix and auto at Q4_K_M's file size):
    ... --mixes Q4_K_M --auto-bpw '' --out-dir out/bench_auto_stream --plot out/bench_auto_stream/plot.png

Calibration: data/calibration.jsonl (profile, imatrix). Evaluation: data/eval.jsonl only (validation.evaluate).
Writes <out-dir>/results.json and <out-dir>/table.md (the table in docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
AUTO_BPW = (3.5, 4.0, 4.5, 5.0, 5.5, 6.5)


def _timed_profile(model: Path, calib: Path, out: Path, cache_dir: Path, imatrix_out: Path,
                   measure_mode: str = "stream") -> float:
    """Wall time of one `quantgate profile` CLI run (fresh process: imports included)."""
    cmd = [sys.executable, "-m", "quantgate.cli", "profile", "--model", str(model), "--calib", str(calib),
           "--out", str(out), "--cache-dir", str(cache_dir), "--imatrix-out", str(imatrix_out), "-q",
           "--measure-mode", measure_mode]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "QUANTGATE_CACHE_DIR": str(cache_dir),
                                         "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models/reference")
    ap.add_argument("--calib", type=Path, default=ROOT / "data/calibration.jsonl")
    ap.add_argument("--eval", dest="eval_set", type=Path, default=ROOT / "data/eval.jsonl")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "out/bench_auto_mix")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/bpw_vs_kld.png")
    ap.add_argument("--backend", default="torch", help="evaluation backend for the candidates (torch or llama.cpp)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--auto-bpw", default=",".join(map(str, AUTO_BPW)))
    ap.add_argument("--measure-mode", default="stream", help="profile measurement: stream (default) or exact")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from <out-dir>/results.json")
    args = ap.parse_args()
    if args.replot:
        _plot(json.loads((args.out_dir / "results.json").read_text())["rows"], args.plot, args.model.name)
        return

    from analyzer.auto import auto_request
    from core.records import QuantizeRequest
    from quantgate.pipeline import quantize_model
    from validation.evaluate import evaluate

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = out / "cache"
    if (cache_dir / "calibration.sqlite").exists():
        for f in cache_dir.glob("calibration.sqlite*"):
            f.unlink()  # the cold run must really be cold
    prof_path, imat_path = out / "profile.json", out / "imatrix.gguf"
    cold = _timed_profile(args.model, args.calib, prof_path, cache_dir, imat_path, args.measure_mode)
    warm = _timed_profile(args.model, args.calib, out / "profile_warm.json", cache_dir, out / "imatrix_warm.gguf",
                          args.measure_mode)
    print(f"quantgate profile: cold {cold:.1f}s, warm {warm:.1f}s ({cold / warm:.1f}x)", flush=True)
    prof = json.loads(prof_path.read_text())

    rows: list[dict] = []
    eval_cache = out / "logits_cache"

    def score(label: str, kind: str, art, extra: dict | None = None) -> None:
        rep = evaluate(args.model, art.path, args.eval_set, backend=args.backend, max_tokens=args.max_tokens,
                       cache_dir=eval_cache)
        row = {"label": label, "kind": kind, "bpw": art.bits_per_weight, "file_bytes": art.nbytes,
               "kld_mean": rep.overall.kl_mean, "kld_p99": rep.overall.kl_p99, "ppl_ratio": rep.overall.ppl_ratio,
               "top1": rep.overall.top1_agreement, "file_type": art.file_type, **(extra or {})}
        rows.append(row)
        print(json.dumps(row), flush=True)

    for mix in [m for m in args.mixes.split(",") if m]:
        for use_imat in (False, True):
            dst = out / f"{mix}{'-imat' if use_imat else ''}.gguf"
            art = quantize_model(QuantizeRequest(source=args.model, out=dst, precision=mix,
                                                 imatrix=imat_path if use_imat else None))
            score(mix + (" +imatrix" if use_imat else ""), "mix+imatrix" if use_imat else "mix", art)
    q4km = next(r for r in rows if r["label"] == "Q4_K_M")
    targets = [("size", str(q4km["file_bytes"]))] + [("bpw", b) for b in args.auto_bpw.split(",") if b]
    for kind, value in targets:
        dst = out / f"auto-{kind}-{value}.gguf"
        kw = {"target_size": value} if kind == "size" else {"target_bpw": float(value)}
        with auto_request(args.model, dst, profile=prof_path, policy="budget", imatrix=imat_path,
                          cache_dir=cache_dir, **kw) as (req, plan):
            art = quantize_model(req)
        score(f"auto {kind}<={value}", "auto", art, {"file_type_mix": plan.file_type_mix})

    q4km_imat = next(r for r in rows if r["label"] == "Q4_K_M +imatrix")
    auto_q4 = rows[-len(targets)]
    verdict = {
        "auto_file_bytes": auto_q4["file_bytes"], "q4km_file_bytes": q4km["file_bytes"],
        "auto_kld": auto_q4["kld_mean"], "q4km_kld": q4km["kld_mean"], "q4km_imatrix_kld": q4km_imat["kld_mean"],
        "reduction_vs_q4km": 1 - auto_q4["kld_mean"] / q4km["kld_mean"],
        "goal_size": auto_q4["file_bytes"] <= q4km["file_bytes"],
        "goal_20pct": auto_q4["kld_mean"] <= 0.8 * q4km["kld_mean"],
        "goal_40pct": auto_q4["kld_mean"] <= 0.6 * q4km["kld_mean"],
        "goal_beats_imatrix": auto_q4["kld_mean"] < q4km_imat["kld_mean"],
    }
    result = {"model": str(args.model), "backend": args.backend, "max_tokens": args.max_tokens,
              "measure_mode": args.measure_mode,
              "profile_seconds": {"cold": cold, "warm": warm, "speedup": cold / warm},
              "validation": prof.get("validation"), "rows": rows, "verdict": verdict}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = ["| file | bpw | bytes | mean KLD | KLD p99 | PPL ratio | top-1 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["bpw"]):
        lines.append(f"| {r['label']} | {r['bpw']:.3f} | {r['file_bytes']} | {r['kld_mean']:.5f} | "
                     f"{r['kld_p99']:.4f} | {r['ppl_ratio']:.4f} | {r['top1']:.2%} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(verdict, indent=1))
    _plot(rows, args.plot, args.model.name)


def _plot(rows: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for kind, style, name in (("mix", "o-", "llama.cpp mixes"), ("mix+imatrix", "s--", "llama.cpp mixes + imatrix"),
                              ("auto", "D-", "auto (budget, imatrix)")):
        pts = sorted((r["bpw"], r["kld_mean"], r["label"]) for r in rows if r["kind"] == kind)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        if kind == "mix":
            for x, y, lab in pts:
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    same = next((r for r in rows if r["kind"] == "auto" and r["label"].startswith("auto size")), None)
    if same is not None:
        ax.plot([same["bpw"]], [same["kld_mean"]], "*", color="crimson", markersize=14, zorder=5,
                label="auto, file size <= Q4_K_M")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (whole file's tensor data)")
    ax.set_ylabel("mean KL divergence vs F16 (nats/token), held-out eval set")
    ax.set_title(f"bpw vs mean KLD: {model}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
