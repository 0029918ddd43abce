"""Input families and comparison helpers shared by the kernel tests and the oracle-build comparison script."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType

FAMILIES = (
    "normal", "zeros", "constant", "tiny", "huge", "heavy_tail", "outlier", "mixed_scale", "subnormal", "near_max",
    "one_signed", "sparse",
)
IMATRIX = ("none", "positive", "with_zeros")


def make_family(family: str, rows: int, cols: int, seed: int = 0, block: int = 256) -> np.ndarray:
    """A (rows, cols) float32 test matrix of one input family (deterministic per seed); `block` is the type's block."""
    rng = np.random.default_rng([seed, FAMILIES.index(family), 7])
    g = rng.standard_normal((rows, cols))
    nsub = rows * cols // 16
    nblk = rows * cols // block
    if family == "normal":
        x = g * 0.02
    elif family == "zeros":  # zero rows, -0.0 rows, zero blocks and zero 16-sub-blocks inside live rows
        x = g.copy()
        x[: rows // 4] = 0
        x[rows // 4: rows // 2] = -0.0  # the sign of d's zero comes from the C init, not from x
        x.reshape(-1, block)[rng.random(nblk) < 0.3] = 0
        x.reshape(-1, 16)[rng.random(nsub) < 0.3] = 0
    elif family == "constant":  # constant blocks (upper half), constant 16-sub-blocks (lower half)
        x = np.empty((rows, cols))
        h = rows // 2
        x[:h] = np.repeat(rng.uniform(-3, 3, (h * cols // block, 1)), block, axis=1).reshape(h, cols)
        x[h:] = np.repeat(rng.uniform(-3, 3, ((rows - h) * cols // 16, 1)), 16, axis=1).reshape(rows - h, cols)
    elif family == "tiny":
        x = g * 1e-30
    elif family == "huge":  # squares overflow float32: ggml's inf/NaN arithmetic must be followed literally
        x = g * 10.0 ** rng.uniform(20, 30, (rows, 1))
    elif family == "heavy_tail":  # student-t, df 1..3 by row
        x = rng.standard_t(np.array([1.0, 2.0, 3.0])[np.arange(rows) % 3][:, None], (rows, cols)) * 0.05
    elif family == "outlier":  # one outlier per block
        x = g * 0.01
        idx = rng.integers(0, block, nblk) + np.arange(nblk) * block
        x.reshape(-1)[idx] = rng.choice([-1, 1], nblk) * rng.uniform(1, 1000, nblk)
    elif family == "mixed_scale":
        x = g * 10.0 ** rng.uniform(-8, 8, (nsub, 1)).repeat(16, axis=1).reshape(rows, cols)
    elif family == "subnormal":  # scales whose 1/d overflows or loses bits: ggml's int casts see NaN/Inf/huge
        x = g * 10.0 ** rng.uniform(-45, -36, (rows, 1))
    elif family == "near_max":
        x = rng.uniform(-1, 1, (rows, cols)) * 3.4e38
    elif family == "one_signed":  # all-positive rows then all-negative rows (the min > 0 / max < 0 branches)
        x = np.abs(g) + rng.uniform(0, 2, (rows, 1))
        x[rows // 2:] *= -1
    elif family == "sparse":
        x = np.where(rng.random((rows, cols)) < 0.9, 0.0, g)
    else:
        raise ValueError(family)
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(x, dtype=np.float32)


def make_imatrix(kind: str, cols: int, seed: int = 0) -> np.ndarray | None:
    """None, strictly positive, or ~30% zero per-column importances (plus whole zero 32-column runs)."""
    rng = np.random.default_rng([seed, 99, IMATRIX.index(kind)])
    if kind == "none":
        return None
    w = rng.uniform(0.01, 10.0, cols) ** 2
    if kind == "with_zeros":
        w[rng.random(cols) < 0.3] = 0.0
        w.reshape(-1, 32)[rng.random(cols // 32) < 0.1] = 0.0
    return w.astype(np.float32)


def count_differing_blocks(ours: np.ndarray, ref: np.ndarray, type_size: int) -> tuple[int, int, int]:
    """(differing blocks, total blocks, index of the first differing block or -1)."""
    a = ours.reshape(-1, type_size)
    b = ref.reshape(-1, type_size)
    bad = np.flatnonzero((a != b).any(axis=1))
    return int(bad.size), int(a.shape[0]), int(bad[0]) if bad.size else -1


def assert_blocks_equal(ours: np.ndarray, ref: np.ndarray, type_size: int, what: str) -> None:
    """Every block byte-equal; otherwise say how many blocks differ and show the first."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.uint8, (what, ours.shape, ref.shape)
    n_bad, n, i = count_differing_blocks(ours, ref, type_size)
    if n_bad:
        a = ours.reshape(-1, type_size)
        b = ref.reshape(-1, type_size)
        pytest.fail(
            f"{what}: {n_bad} of {n} blocks differ from ggml; first block {i}:\n"
            f"  ours: {a[i].tolist()}\n  ggml: {b[i].tolist()}"
        )


def same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-equal, except that any NaN matches any NaN (payloads are not part of the format's contract)."""
    both_nan = np.isnan(a) & np.isnan(b)
    return a.shape == b.shape and bool(((a.view(np.uint32) == b.view(np.uint32)) | both_nan).all())


def gguf_dequant(raw: np.ndarray, qtype: str) -> np.ndarray:
    """The gguf package's dequantizer (the independent reference for ours)."""
    return gguf_quants.dequantize(raw, GGMLQuantizationType[qtype])


def assert_matches_ggml(oracle, x: np.ndarray, qtype: str, imatrix: np.ndarray | None, what: str) -> None:
    """quant.quantize and ggml_quantize_chunk give the same bytes for x (float warnings silenced: the extreme
    families overflow on purpose)."""
    import quant
    from quant.formats import get_qtype

    with np.errstate(all="ignore"):
        ours = quant.quantize(x, qtype, imatrix=imatrix)
        ref = oracle.ggml_quantize(x, qtype, imatrix)
    assert_blocks_equal(ours, ref, get_qtype(qtype).type_size, what)
