"""Where a quantize's time goes, stage by stage, in one process: read (pread + widening to float32), finite check,
kernel, output SHA-256 and write, per tensor type, for one F16/BF16/F32 GGUF and one llama.cpp mix.

    .venv/bin/python benchmarks/profile_quantize.py --model f16.gguf --precision Q8_0 --threads 2
    .venv/bin/python benchmarks/profile_quantize.py --model f16.gguf --precision Q8_0 --fingerprint-in-pass

Runs the same steps `quantize_model` runs (llama-quantize's tensor order, the mix's types), but serially and timed
separately (the pipeline overlaps hashing/writing with the next tensor in a writer thread), plus the source's
weights fingerprint (cold: cache bypassed), in a pass of its own (--fingerprint) or from the tensors the loop reads
(--fingerprint-in-pass: what an uncached quantize does). Wall and CPU seconds (every thread) per step: on a loaded
machine the CPU seconds are the steadier figure. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quant  # noqa: E402
from quant.api import _kernels, check_finite  # noqa: E402
from quant.fingerprint import FingerprintTap  # noqa: E402
from quant.formats import get_qtype  # noqa: E402
from quant.loaders import open_checkpoint  # noqa: E402
from quant.mixes import llama_quantize_order, tensor_types  # noqa: E402
from quant.model_plan import plan_model  # noqa: E402


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--precision", default="Q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fingerprint", action="store_true", help="also time the weights fingerprint (no cache)")
    ap.add_argument("--fingerprint-in-pass", action="store_true",
                    help="time the fingerprint as quantize_model computes it uncached: from the tensors it reads")
    args = ap.parse_args()
    out: dict = {"model": str(args.model), "precision": args.precision, "threads": args.threads}
    t = defaultdict(float)
    cpu = defaultdict(float)  # user + system CPU seconds of the whole process (every thread) per step
    per_type: dict = defaultdict(lambda: defaultdict(float))
    kernels = _kernels()
    with quant.threads(args.threads), open_checkpoint(args.model) as ckpt:
        plan = plan_model(ckpt)
        tap = FingerprintTap.open(ckpt) if args.fingerprint_in_pass else None
        if args.fingerprint_in_pass and tap is None:
            raise SystemExit("error: this checkpoint's fingerprint cannot be computed in the pass")
        types = tensor_types(plan, args.precision)
        by_name = {pt.name: pt for pt in plan.tensors}
        fd, tmp = tempfile.mkstemp(dir=args.model.parent, suffix=".profile")
        h = hashlib.sha256()
        try:
            for name in llama_quantize_order(list(by_name)):
                pt, qt = by_name[name], get_qtype(types[name])
                c0, t0 = _cpu(), time.perf_counter()
                x = pt.source.read_scratch()  # as quantize_model reads (pread into reused buffers)
                if pt.transform is not None:
                    x = pt.transform(x)
                c1, t1 = _cpu(), time.perf_counter()
                m = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
                check_finite(m, name)
                c2, t2 = _cpu(), time.perf_counter()
                q = kernels[qt.name][0](m, None)
                c3, t3 = _cpu(), time.perf_counter()
                if args.fingerprint_in_pass:
                    tap.add(pt.source, x)
                c3b, t3b = _cpu(), time.perf_counter()
                h.update(q)
                c4, t4 = _cpu(), time.perf_counter()
                os.write(fd, q)
                c5, t5 = _cpu(), time.perf_counter()
                for k, v, c in (("read", t1 - t0, c1 - c0), ("finite", t2 - t1, c2 - c1), ("kernel", t3 - t2, c3 - c2),
                                ("fingerprint_in_pass", t3b - t3, c3b - c3), ("hash", t4 - t3b, c4 - c3b),
                                ("write", t5 - t4, c5 - c4)):
                    t[k] += v
                    cpu[k] += c
                    per_type[qt.name][k] += v
                per_type[qt.name]["weights"] += m.size
        finally:
            os.close(fd)
            os.unlink(tmp)
    if args.fingerprint:
        from quant.fingerprint import weights_fingerprint

        os.environ["QUANTGATE_CACHE_DIR"] = tempfile.mkdtemp(prefix="qg-fp-")  # cold: an empty fingerprint cache
        c0, t0 = _cpu(), time.perf_counter()
        weights_fingerprint(args.model)
        t["fingerprint"] = time.perf_counter() - t0
        cpu["fingerprint"] = _cpu() - c0
    out["seconds"] = {k: round(v, 3) for k, v in t.items()}
    out["cpu_seconds"] = {k: round(v, 3) for k, v in cpu.items()}
    out["load_average"] = os.getloadavg()[0]
    out["per_type"] = {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in per_type.items()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
