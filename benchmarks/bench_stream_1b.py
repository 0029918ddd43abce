"""Layer-streamed analyzer and evaluation on the ~1.1B-parameter sample: wall time and peak RSS of
`quantgate quantize --precision auto --target-bpw 4.85` (profile included, cold cache) next to
`quantgate quantize --precision Q4_K_M` on the same checkpoint, and peak RSS of the evaluation passes.

    .venv/bin/python benchmarks/bench_stream_1b.py --workdir /tmp/qg-stream-1b [--eval-samples 8] [--max-tokens 64]
                                                   [--skip-eval]   # only Q4_K_M, auto, Q4_K_M

The checkpoint is `quantgate.sample` SHAPE_1B (TinyLlama's shape, F16, 1 GiB shards) with the bundled reference
model's tokenizer files copied in (a sample has no tokenizer; its ids all fall inside the 32,000-row vocabulary).
Runs, each in its own process (peak RSS from os.wait4's ru_maxrss of that child): the baseline pass
(`validation.evaluate.cache_baseline`); Q4_K_M; the candidate pass (`evaluate` of the Q4_K_M file with the torch
backend on the cached baseline); auto (fresh calibration cache); Q4_K_M again (the ratio uses the mean of the two Q4_K_M runs around the
auto run: the machine is shared). Writes <workdir>/results.json after every stage.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1 << 30


def _maxrss(usage) -> int | None:
    return None if usage is None else int(usage.ru_maxrss) * 1024


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Wall seconds and peak RSS (bytes, the child's own ru_maxrss from os.wait4) of one child process; stops the
    benchmark if it fails."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    err = p.stderr.read() if p.stderr is not None else b""
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{err.decode()[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_bytes": _maxrss(usage)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qg-stream-1b"))
    ap.add_argument("--eval-samples", type=int, default=8, help="first N samples of data/eval.jsonl")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-auto", action="store_true", help="only Q4_K_M and the evaluation passes")
    ap.add_argument("--skip-eval", action="store_true", help="only Q4_K_M, auto, Q4_K_M (no evaluation passes)")
    args = ap.parse_args()

    from quantgate.sample import SHAPE_1B, make_sample_checkpoint

    wd = args.workdir
    src = wd / "hf"
    if not (src / "config.json").exists():
        make_sample_checkpoint(src, SHAPE_1B, seed=1, max_shard_bytes=1 << 30)
        for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            if (ROOT / "models/reference" / f).exists():
                shutil.copy(ROOT / "models/reference" / f, src / f)
    py = sys.executable
    cli = [py, "-m", "quantgate.cli"]
    env = {"PYTHONPATH": str(ROOT)}
    res: dict = {"model": str(src), "shape": SHAPE_1B.__dict__, "when": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                      time.gmtime())}
    q4 = wd / "q4km.gguf"
    out = wd / "results.json"

    def save(stage: str, value) -> None:
        res[stage] = value
        out.write_text(json.dumps(res, indent=1))
        print(stage, json.dumps(value), flush=True)

    def quantize(precision: str, dst: Path, extra: list[str] = (), env2: dict | None = None) -> dict:
        return run_measured(cli + ["quantize", "--model", str(src), "--precision", precision, *extra, "-o", str(dst)],
                            {**env, **(env2 or {})})

    # evaluation passes: the baseline pass (cache miss) and the candidate pass (torch backend, cache hit)
    eval_set = wd / "eval.jsonl"
    lines = (ROOT / "data/eval.jsonl").read_text(encoding="utf-8").splitlines()[:args.eval_samples]
    eval_set.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ecache = wd / "eval-cache"
    shutil.rmtree(ecache, ignore_errors=True)
    base_cmd = (f"from validation.evaluate import cache_baseline; cache_baseline({str(src)!r}, {str(eval_set)!r}, "
                f"max_tokens={args.max_tokens}, cache_dir={str(ecache)!r})")
    cand_cmd = (f"from validation.evaluate import evaluate; evaluate({str(src)!r}, {str(q4)!r}, {str(eval_set)!r}, "
                f"backend='torch', max_tokens={args.max_tokens}, cache_dir={str(ecache)!r})")
    base_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    res.update(baseline_file_bytes=base_bytes, baseline_bound_bytes=base_bytes + int(1.5 * GiB))
    if not args.skip_eval:
        save("baseline_pass", run_measured([py, "-c", base_cmd], env))
        save("goal_baseline_rss", res["baseline_pass"]["peak_rss_bytes"] <= res["baseline_bound_bytes"])
    save("q4km_1", quantize("Q4_K_M", q4))
    if not args.skip_eval:
        res.update(candidate_file_bytes=q4.stat().st_size, candidate_bound_bytes=q4.stat().st_size + int(1.5 * GiB))
        save("candidate_pass", run_measured([py, "-c", cand_cmd], env))
        save("goal_candidate_rss", res["candidate_pass"]["peak_rss_bytes"] <= res["candidate_bound_bytes"])
    if args.skip_auto:
        return
    cache = wd / "calib-cache"
    shutil.rmtree(cache, ignore_errors=True)
    save("auto", quantize("auto", wd / "auto.gguf", ["--target-bpw", "4.85", "--cache-dir", str(cache)],
                          {"QUANTGATE_CACHE_DIR": str(cache)}))
    save("q4km_2", quantize("Q4_K_M", q4))
    q4_wall = (res["q4km_1"]["wall_s"] + res["q4km_2"]["wall_s"]) / 2
    save("auto_over_q4km_wall", res["auto"]["wall_s"] / q4_wall)
    save("goal_wall_15x", res["auto_over_q4km_wall"] <= 15)
    save("goal_auto_rss_3GB", res["auto"]["peak_rss_bytes"] <= 3e9)


if __name__ == "__main__":
    main()
