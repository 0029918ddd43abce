"""Quantize at scale: convert -> quantize -> validate -> auto on a generated checkpoint, each stage a subprocess under
a memory watchdog, side by side with llama.cpp (llama-cpp-python) on the same files.

    .venv/bin/python benchmarks/bench_scale.py --shape 1b [--workdir /tmp/qg-scale] [--threads 2] [--repeat 2]
    .venv/bin/python benchmarks/bench_scale.py --shape 8b --stages convert,quantize --repeat 1   # ~16 GB, streaming

Per stage: wall time, peak RSS (wait4 ru_maxrss of the stage process, and the watchdog's polled peak of its process
tree), the largest system-wide `Dirty:` seen in /proc/meminfo while it ran, and ours/llama.cpp where llama.cpp does
the same work: `llama_model_quantize` for quantize (runs interleaved, ours first, --repeat times; the tensor bytes of
both outputs are compared), and `llama_cpp.Llama(logits_all=True)` evaluating the same token ids for the scoring
pass of validate. A stage whose process tree passes --limit-gb is killed and recorded as such (the machine is
shared: one stage must never run it out of memory). Results: one JSON (--json) and Markdown rows on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
#: Shapes made here from quantgate.sample's (8b: `quantgate sample --shape 8b` itself).
SHAPE_CODE = {"1b": "dataclasses.replace(SHAPE_1B, n_vocab=4096)",
              "smoke": "dataclasses.replace(SHAPE_8B, n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2)"}
LLAMA_FTYPES = {"Q4_K_M": 15, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_S": 14, "Q3_K_M": 12, "Q2_K": 10, "Q4_0": 2,
                "IQ4_XS": 30}

# The llama.cpp side of quantize: the whole-model quantizer llama-quantize runs, through llama-cpp-python.
_LLAMA_QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = int(sys.argv[3]), int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""

# The llama.cpp side of the scoring pass: evaluate the candidate on token ids given in a JSON file (the ids our
# evaluation tokenized), all logits kept, and reduce each position to its log-softmax at the next token.
_LLAMA_EVAL = """
import json, sys, numpy as np, llama_cpp
ids = json.load(open(sys.argv[2]))
n_ctx = max(len(s) for s in ids)
m = llama_cpp.Llama(model_path=sys.argv[1], logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                    n_threads=int(sys.argv[3]), n_threads_batch=int(sys.argv[3]), verbose=False)
nll, n = 0.0, 0
for s in ids:
    m.reset()
    m.eval(s)
    logits = np.asarray(m.scores[:len(s)], dtype=np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    nll -= float(sum(lp[i, s[i + 1]] for i in range(len(s) - 1)))
    n += len(s) - 1
print(json.dumps({"tokens": n, "ppl": float(np.exp(nll / n))}))
"""


@dataclass
class StageResult:
    """One measured subprocess: what ran, how long, how much memory, and whether the watchdog stopped it."""

    stage: str
    who: str
    cmd: list[str]
    rc: int | None = None
    wall_s: float = 0.0
    maxrss_mb: float = 0.0          # wait4 ru_maxrss of the stage process
    cpu_s: float = 0.0              # wait4 user + system CPU seconds of the stage process (less load-dependent)
    tree_peak_mb: float = 0.0       # watchdog's polled peak RSS of the process and its children
    dirty_peak_mb: float = 0.0      # largest system-wide Dirty: while it ran (other jobs write too)
    killed: bool = False
    extra: dict = field(default_factory=dict)


def _dirty_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _tree_rss(p: psutil.Process) -> int:
    total = 0
    try:
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:  # a child (or the stage itself) exited between listing and reading: poll again next tick
        return 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_stage(stage: str, who: str, cmd: list[str], *, limit_gb: float, min_free_gb: float, env: dict, cwd: Path,
              nice: int, cap_s: float | None = None) -> StageResult:
    """Run cmd as its own process group under the watchdog (killed above limit_gb, or after cap_s seconds of wall
    time: recorded as `capped`); refused when the machine has less than min_free_gb available before it starts.
    Its stderr goes to STAGE-WHO.log, each line prefixed with the seconds since the stage started (how far a capped
    stage got). Returns its wall time and memory figures."""
    res = StageResult(stage, who, [str(c) for c in cmd])
    free = psutil.virtual_memory().available / 2**30
    if free < min_free_gb:
        res.extra["refused"] = f"only {free:.1f} GiB available (--min-free-gb {min_free_gb})"
        print(f"  {stage}/{who}: refused ({res.extra['refused']})", flush=True)
        return res
    out = open(cwd / f"{stage}-{who}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(res.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd,
                            start_new_session=True, preexec_fn=lambda: os.nice(nice))
    ps = psutil.Process(proc.pid)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            rss = _tree_rss(ps)
            res.tree_peak_mb = max(res.tree_peak_mb, rss / 2**20)
            res.dirty_peak_mb = max(res.dirty_peak_mb, _dirty_mb())
            if rss > limit_gb * 2**30:
                res.killed = True
                os.killpg(proc.pid, 9)
                return
            if cap_s is not None and time.perf_counter() - t0 > cap_s:
                res.extra["capped"] = f"stopped after the {cap_s:.0f} s cap"
                os.killpg(proc.pid, 9)
                return
            stop.wait(0.25)

    def log_stderr() -> None:
        for line in iter(proc.stderr.readline, b""):
            out.write(f"[{time.perf_counter() - t0:9.1f} s] {line.decode(errors='replace').rstrip()}\n")
            out.flush()

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    e = threading.Thread(target=log_stderr, daemon=True)
    e.start()
    stdout = proc.stdout.read()
    _, status, ru = os.wait4(proc.pid, 0)
    res.wall_s = time.perf_counter() - t0
    stop.set()
    w.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    res.rc = proc.returncode
    res.maxrss_mb = ru.ru_maxrss / 1024
    res.cpu_s = ru.ru_utime + ru.ru_stime
    e.join(5)
    out.close()
    text = stdout.decode(errors="replace").strip()
    if text.startswith("{"):
        try:
            res.extra["json"] = json.loads(text)
        except json.JSONDecodeError:
            pass
    elif text:
        res.extra["stdout_tail"] = text[-300:]
    state = "KILLED by watchdog" if res.killed else res.extra.get("capped", f"rc {res.rc}")
    print(f"  {stage}/{who}: {state}, {res.wall_s:.1f} s (CPU {res.cpu_s:.1f} s, load {os.getloadavg()[0]:.1f}), "
          f"maxrss {res.maxrss_mb:.0f} MB, "
          f"tree peak {res.tree_peak_mb:.0f} MB, dirty peak {res.dirty_peak_mb:.0f} MB", flush=True)
    return res


def tensors_equal(a: Path, b: Path) -> bool:
    """Same tensor names, types and bytes (KVs differ: ours carries quantgate.* provenance)."""
    from quant.gguf_reader import read_gguf  # lazy: the benchmark's own process needs it only here

    with read_gguf(a) as ga, read_gguf(b) as gb:
        ta = {t.name: t for t in ga.tensors}
        tb = {t.name: t for t in gb.tensors}
        if ta.keys() != tb.keys():
            return False
        for name, t in ta.items():
            u = tb[name]
            if t.qtype != u.qtype or t.nbytes != u.nbytes or bytes(ga.tensor_data(t)) != bytes(gb.tensor_data(u)):
                return False
            ga.release(t)
            gb.release(u)
    return True


def _forget_fingerprint(cache: Path, path: Path) -> None:
    """Drop `path`'s entries from the fingerprint cache (quant.fingerprint's JSON file)."""
    f = cache / "fingerprint_cache.json"
    if f.exists():
        data = json.loads(f.read_text())
        f.write_text(json.dumps({k: v for k, v in data.items() if str(path.resolve()) not in k}))


def make_source(shape: str, hf: Path, env: dict, cwd: Path) -> None:
    """The checkpoint: `quantgate sample --shape` with the reference model's 4k BPE tokenizer, so that validate can
    tokenize text (1b: its vocabulary shrunk to those 4,096 tokens; 8b: Llama-3-8B's 128,256-row embedding and head
    kept, the tokenizer's 4,096 tokens padded to 128,256 with [PADi] entries when converted, as llama.cpp's
    converter pads a vocabulary smaller than `vocab_size`; smoke: two small blocks with the 8b's 128,256-row
    embedding and head and its padded tokenizer, a minutes-long check of the 8b's code paths before an hours-long
    run)."""
    if (hf / "config.json").exists():
        return
    t = time.perf_counter()
    if shape in SHAPE_CODE:
        code = ("import dataclasses, sys; from quantgate.sample import SHAPE_1B, SHAPE_8B, make_sample_checkpoint; "
                f"make_sample_checkpoint(sys.argv[1], {SHAPE_CODE[shape]}, seed=1)")
        subprocess.run([PY, "-c", code, str(hf)], check=True, env=env, cwd=cwd)
    else:
        subprocess.run([PY, "-m", "quantgate.cli", "sample", "--shape", shape, "--out", str(hf)], check=True,
                       env=env, cwd=cwd)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (ROOT / "models/reference" / name).exists():
            shutil.copy(ROOT / "models/reference" / name, hf / name)
    print(f"generated {hf} in {time.perf_counter() - t:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("1b", "8b", "smoke"), default="1b")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qg-scale"))
    ap.add_argument("--stages", default="convert,quantize,validate,auto")
    ap.add_argument("--types", default="Q4_K_M", help="quantize types compared with llama.cpp (comma-separated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="interleaved quantize runs per side")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--target-bpw", type=float, default=4.85)
    ap.add_argument("--limit-gb", type=float, default=14.0, help="watchdog: kill a stage above this RSS")
    ap.add_argument("--min-free-gb", type=float, default=4.0, help="refuse a stage below this much available memory")
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and GGUFs")
    ap.add_argument("--baseline-root", type=Path, default=None,
                    help="also quantize with the quantgate checkout at this path (e.g. `git archive main`), "
                         "interleaved: ours, baseline, llama.cpp")
    ap.add_argument("--cold", action="store_true",
                    help="forget the F16 GGUF's cached weights fingerprint before every quantgate quantize "
                         "(each run is a first quantize of the file)")
    ap.add_argument("--skip-llama-quantize", action="store_true",
                    help="quantize: ours only (llama.cpp's side already measured on these shapes)")
    ap.add_argument("--backend", choices=("llama.cpp", "torch"), default="llama.cpp",
                    help="validate: the candidate's runner (torch where llama.cpp's CPU backend crashes, e.g. AMX)")
    ap.add_argument("--no-llama-eval", action="store_true", help="validate: skip llama.cpp's scoring pass")
    ap.add_argument("--auto-cap-s", type=float, default=None,
                    help="auto: stop the stage after this many seconds (its log shows how far it got)")
    args = ap.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    wd = (args.workdir / args.shape).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QUANTGATE_CACHE_DIR": str(wd / "cache"),
           "QUANTGATE_STORE_DIR": str(wd / "store"), "MLFLOW_DISABLE_TELEMETRY": "true",
           "GX_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}
    qg = [PY, "-m", "quantgate.cli"]
    hf, f16 = wd / "hf", wd / "f16.gguf"
    results: list[StageResult] = []

    def stage(name: str, who: str, cmd: list, env_over: dict | None = None, cap_s: float | None = None) -> StageResult:
        r = run_stage(name, who, cmd, limit_gb=args.limit_gb, min_free_gb=args.min_free_gb, env=env_over or env,
                      cwd=wd, nice=args.nice, cap_s=cap_s)
        results.append(r)
        return r

    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, shape {args.shape}, threads {args.threads}", flush=True)
    make_source(args.shape, hf, env, wd)
    if "convert" in stages or not f16.exists():
        f16.unlink(missing_ok=True)
        stage("convert", "quantgate", qg + ["convert", "--model", hf, "--out", f16, "--json"])
    q4 = wd / "ours-Q4_K_M.gguf"
    warm = wd / "warm-f16.gguf"  # the bundled model as F16 GGUF: warm-up quantizes before the timed runs
    if "quantize" in stages and not warm.exists():
        subprocess.run(qg + ["convert", "--model", ROOT / "models/reference", "--out", warm], env=env, cwd=wd,
                       check=True, capture_output=True)
    if "quantize" in stages:
        for qtype in [t.strip() for t in args.types.split(",") if t.strip()]:
            ours, theirs = wd / f"ours-{qtype}.gguf", wd / f"llama-{qtype}.gguf"
            sides = [("quantgate", env, ours)]
            if args.baseline_root is not None:
                sides.insert(0, ("baseline", {**env, "PYTHONPATH": str(args.baseline_root.resolve())},
                                 wd / f"baseline-{qtype}.gguf"))
            for who, side_env, out in sides:  # untimed: numba compiles/loads each side's kernels for this type
                subprocess.run(qg + ["quantize", "--model", warm, "--precision", qtype, "--out", wd / "warm-q.gguf"],
                               env=side_env, cwd=wd, capture_output=True)
            for i in range(args.repeat):
                for who, side_env, out in sides:
                    if args.cold:
                        _forget_fingerprint(wd / "cache", f16)
                    r = stage(f"quantize {qtype}", who, qg + ["quantize", "--model", f16, "--precision", qtype,
                                                              "--threads", args.threads, "--out", out, "--json"],
                              side_env)
                    r.extra["run"] = i + 1
                if args.skip_llama_quantize:
                    continue
                r = stage(f"quantize {qtype}", "llama.cpp", [PY, "-c", _LLAMA_QUANTIZE, f16, theirs,
                                                             LLAMA_FTYPES[qtype], args.threads])
                r.extra["run"] = i + 1
            if ours.exists() and theirs.exists():
                same = tensors_equal(ours, theirs)
                results[-1].extra["tensor_bytes_identical"] = same
                print(f"  {qtype}: tensor bytes identical to llama.cpp's: {same}", flush=True)
            if qtype != "Q4_K_M" and not args.keep:
                ours.unlink(missing_ok=True)
            if not args.keep:
                theirs.unlink(missing_ok=True)
    if "validate" in stages and q4.exists():
        if not (hf / "tokenizer.json").exists() and not (hf / "tokenizer.model").exists():
            print("  validate: skipped (the checkpoint has no tokenizer)", flush=True)
        else:
            data = wd / f"eval{args.samples}.jsonl"
            lines = (ROOT / "data/eval.jsonl").read_text().splitlines()[:args.samples]
            data.write_text("\n".join(lines) + "\n")
            stage("validate", "quantgate", qg + ["validate", "--baseline", hf, "--quantized", q4, "--dataset", data,
                                                 "--gates", ROOT / "gates.yaml",
                                                 "--max-tokens", args.tokens, "--backend", args.backend,
                                                 "--no-expectations", "--report-dir", wd / "reports", "--quiet"])
            for rep in sorted((wd / "reports").glob("*/validation.json")):  # our passes' own timings
                t = json.loads(rep.read_text()).get("timings", {})
                results[-1].extra["json"] = {"timings": {k: v for k, v in t.items() if isinstance(v, (int, float))
                                                         and not isinstance(v, bool)}}
            ids_file = wd / "ids.json"
            # the ids validation scores: the dataset's usable samples, tokenized with the baseline's tokenizer
            code = ("import json, sys; from runtime.datasets import load_dataset; "
                    "from runtime.tokenize import tokenize_samples; ds = load_dataset(sys.argv[2]); "
                    "ids = tokenize_samples(sys.argv[1], [s.text for s in ds.usable()], int(sys.argv[3])); "
                    "json.dump(ids, open(sys.argv[4], 'w'))")
            if not args.no_llama_eval and subprocess.run([PY, "-c", code, hf, data, str(args.tokens), ids_file],
                                                         env=env, cwd=wd).returncode == 0:
                stage("validate (scoring pass)", "llama.cpp", [PY, "-c", _LLAMA_EVAL, q4, ids_file, args.threads])
    if "auto" in stages and f16.exists():
        calib = ROOT / "data/calibration.jsonl"
        stage("auto", "quantgate", qg + ["quantize", "--model", f16, "--precision", "auto", "--target-bpw",
                                         args.target_bpw, "--calib", calib, "--threads", args.threads,
                                         "--out", wd / "ours-auto.gguf", "--cache-dir", wd / "calib-cache", "--json"],
              cap_s=args.auto_cap_s)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    print("\n| stage | who | wall s | CPU s | peak RSS MB (maxrss / tree) | max Dirty MB | note |\n"
          "|---|---|---|---|---|---|---|")
    for r in results:
        note = "KILLED (watchdog)" if r.killed else r.extra.get("capped") or ("ok" if r.rc == 0 else f"rc {r.rc}")
        t = r.extra.get("json", {}).get("timings") if isinstance(r.extra.get("json"), dict) else None
        if t:
            note += "; " + ", ".join(f"{k} {v:.1f}" for k, v in t.items() if isinstance(v, (int, float)))
        if "tensor_bytes_identical" in r.extra:
            note += f"; bytes identical: {r.extra['tensor_bytes_identical']}"
        print(f"| {r.stage} | {r.who} | {r.wall_s:.1f} | {r.cpu_s:.1f} | {r.maxrss_mb:.0f} / {r.tree_peak_mb:.0f} | "
              f"{r.dirty_peak_mb:.0f} | {note} |")
    if not args.keep:
        for p in (hf, f16, q4, wd / "ours-auto.gguf"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
