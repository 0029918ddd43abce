"""How many blocks differ between two ggml builds (e.g. FMA-free vs default flags), and between us and each.

    .venv/bin/python benchmarks/compare_oracle_builds.py --lib-a PATH/libggml-base.so --lib-b PATH/libggml-base.so

Each library runs in its own subprocess (both are called libggml-base.so.0) over every type x input family x
{no imatrix, imatrix}, >= 10,240 blocks per case; the result is a table of differing-block counts.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def _cases():
    from quant.formats import get_qtype
    from tests.quant.kernel_cases import FAMILIES, make_family, make_imatrix

    for t in TYPES:
        blk = get_qtype(t).block_size
        rows, cols = (40, 256 * 256) if blk == 256 else (40, 8192)
        for fam in FAMILIES:
            for im in ("none", "positive"):
                yield t, fam, im, make_family(fam, rows, cols, block=blk), make_imatrix(im, cols)


def dump(lib: str, out: Path) -> None:
    """Quantize every case with the library at `lib` (or ours when lib == 'ours') into out/<case>.npy."""
    if lib != "ours":
        os.environ["QUANTGATE_GGML_LIB"] = lib
        from tests.ggml_oracle import ggml_quantize as q
    else:
        import quant

        def q(x, t, w):
            return quant.quantize(x, t, imatrix=w)
    for t, fam, im, x, w in _cases():
        with np.errstate(all="ignore"):
            np.save(out / f"{t}-{fam}-{im}.npy", q(x, t, w))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lib-a", required=True, help="reference build (e.g. the FMA-free oracle)")
    ap.add_argument("--lib-b", required=True, help="other build (e.g. default flags)")
    ap.add_argument("--dump", nargs=2, metavar=("LIB", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dump:
        dump(args.dump[0], Path(args.dump[1]))
        return
    from quant.formats import get_qtype
    from tests.quant.kernel_cases import count_differing_blocks

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for label, lib in (("a", args.lib_a), ("b", args.lib_b), ("ours", "ours")):
            d = Path(tmp) / label
            d.mkdir()
            subprocess.run([sys.executable, __file__, "--lib-a", "-", "--lib-b", "-", "--dump", lib, str(d)],
                           check=True)
            dirs[label] = d
        table: dict[str, dict[str, int]] = {}
        for f in sorted(dirs["a"].glob("*.npy")):
            t = f.name.split("-")[0]
            ts = get_qtype(t).type_size
            a, b, o = (np.load(dirs[k] / f.name) for k in ("a", "b", "ours"))
            row = table.setdefault(t, {"blocks": 0, "a_vs_b": 0, "ours_vs_a": 0, "ours_vs_b": 0})
            row["blocks"] += count_differing_blocks(a, a, ts)[1]
            row["a_vs_b"] += count_differing_blocks(a, b, ts)[0]
            row["ours_vs_a"] += count_differing_blocks(o, a, ts)[0]
            row["ours_vs_b"] += count_differing_blocks(o, b, ts)[0]
    print(f"{'type':6} {'blocks':>9} {'A vs B':>8} {'ours vs A':>10} {'ours vs B':>10}")
    for t, r in table.items():
        print(f"{t:6} {r['blocks']:9d} {r['a_vs_b']:8d} {r['ours_vs_a']:10d} {r['ours_vs_b']:10d}")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
