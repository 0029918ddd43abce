"""Generate quant/kernels/iq_grids.py: the i-quant grid seeds of ggml's iq2xs_init_impl / iq3xs_init_impl.

The seeds (`kgrid_*` in ggml-quants.c, one packed level per 2 or 3 bits) are copied verbatim from the pinned llama.cpp
source; everything else (grids, maps, neighbour lists) is computed from them by quant.kernels.iq_tables, as ggml
computes it in ggml_quantize_init. Run: python scripts/gen_iq_grids.py [path/to/llama.cpp] (default: the pinned tree).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name in the generated module, C array name, expected length)
SEEDS = (
    ("KGRID_IQ2XXS", "kgrid_2bit_256", 256),
    ("KGRID_IQ2XS", "kgrid_2bit_512", 512),
    ("KGRID_IQ1S", "kgrid_1bit_2048", 2048),
    ("KGRID_IQ2S", "kgrid_2bit_1024", 1024),
    ("KGRID_IQ3XXS", "kgrid_256", 256),
    ("KGRID_IQ3S", "kgrid_512", 512),
)


def parse_seeds(src: str) -> dict[str, list[int]]:
    """The values of each `static const uint16_t NAME[...] = {...};` array named in SEEDS."""
    out = {}
    for py_name, c_name, n in SEEDS:
        m = re.search(r"static const uint16_t " + re.escape(c_name) + r"\[[^\]]*\]\s*=\s*\{([^}]*)\}", src)
        if m is None:
            raise SystemExit(f"{c_name} not found in ggml-quants.c")
        vals = [int(v) for v in m.group(1).replace("\n", " ").split(",") if v.strip()]
        if len(vals) != n:
            raise SystemExit(f"{c_name}: {len(vals)} values, expected {n}")
        out[py_name] = vals
    return out


def render(seeds: dict[str, list[int]], origin: str) -> str:
    lines = [
        '"""ggml\'s i-quant grid seeds (kgrid_* of iq2xs_init_impl / iq3xs_init_impl), GENERATED: do not edit.',
        "",
        f"Source: {origin} (scripts/gen_iq_grids.py).",
        "Each entry packs one grid point: 2 bits per coordinate (IQ2/IQ1: 8 coordinates) or 3 bits (IQ3: 4).",
        '"""',
        "# fmt: off",
        "import numpy as np",
        "",
    ]
    for name, vals in seeds.items():
        lines.append(f"{name} = np.array([")
        for i in range(0, len(vals), 16):
            lines.append("    " + ", ".join(str(v) for v in vals[i:i + 16]) + ",")
        lines.append("], dtype=np.uint16)")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    from tests.ggml_oracle import llamacpp_src

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else llamacpp_src()
    src = (root / "ggml" / "src" / "ggml-quants.c").read_text()
    text = render(parse_seeds(src), "llama.cpp ggml/src/ggml-quants.c at llama-cpp-python 0.3.36")
    target = ROOT / "quant" / "kernels" / "iq_grids.py"
    target.write_text(text)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
