"""IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M: every block byte-identical to ggml_quantize_chunk (with and,
where ggml allows it, without an imatrix), ggml's aborts reproduced as QuantizationError, dequantize equal to gguf."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType

import quant
from core.errors import ImatrixRequiredError, QuantizationError
from quant.formats import get_qtype
from quant.imatrix_policy import KERNEL_REQUIRES_IMATRIX
from quant.kernels import iq1, iq2, iq3, iq_grids
from quant.kernels.iq_tables import tables
from tests.quant.kernel_cases import (
    FAMILIES,
    IMATRIX,
    assert_blocks_equal,
    gguf_dequant,
    make_family,
    make_imatrix,
    same_floats,
)

TYPES = ("IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")
QK_K = 256
ROOT = Path(__file__).resolve().parents[2]
FP16_OFFSETS = {"IQ3_XXS": 0, "IQ3_S": 0, "IQ2_XXS": 0, "IQ2_XS": 0, "IQ2_S": 0, "IQ1_S": 0}


def _variants(qtype: str) -> tuple[str, ...]:
    return tuple(k for k in IMATRIX if not (k == "none" and qtype in KERNEL_REQUIRES_IMATRIX))


def _shape(qtype: str) -> tuple[int, int]:
    """10,240+ super-blocks per type and family, split over the imatrix variants (3 x 3,456 or 2 x 5,120)."""
    return (24, 144 * QK_K) if len(_variants(qtype)) == 3 else (20, 256 * QK_K)


def _check(oracle, x: np.ndarray, qtype: str, w: np.ndarray | None, what: str) -> None:
    """Same bytes as ggml; or, where ggml aborts on a row, QuantizationError naming that row, and ggml aborting."""
    with np.errstate(all="ignore"):
        try:
            ours = quant.quantize(x, qtype, imatrix=w)
        except QuantizationError as e:
            row = int(re.search(r"row (\d+)", str(e)).group(1))
            assert oracle.ggml_aborts(x[row:row + 1], qtype, w), f"{what}: we refuse row {row}, ggml does not abort"
            with pytest.raises(QuantizationError):
                quant.quantize(x[row:row + 1], qtype, imatrix=w)
            return
        ref = oracle.ggml_quantize(x, qtype, w)
    assert_blocks_equal(ours, ref, get_qtype(qtype).type_size, what)


@pytest.mark.oracle
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", TYPES)
def test_matches_ggml(require_oracle, qtype, family):
    rows, cols = _shape(qtype)
    for kind in _variants(qtype):
        x = make_family(family, rows, cols, seed=IMATRIX.index(kind))
        _check(require_oracle, x, qtype, make_imatrix(kind, cols), f"{qtype}/{family}/imatrix={kind}")


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", TYPES)
def test_odd_shapes_and_imatrix_extremes_match_ggml(require_oracle, qtype):
    """One block, one row, many short rows; all-zero and huge imatrix values (ggml aborts on the latter)."""
    rng = np.random.default_rng(11)
    for rows, cols in ((1, 256), (1, 4096), (333, 256), (17, 768)):
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        ws = [rng.uniform(0, 2, cols).astype(np.float32), np.zeros(cols, np.float32), np.full(cols, 1e30, np.float32)]
        if qtype not in KERNEL_REQUIRES_IMATRIX:
            ws.append(None)
        for w in ws:
            _check(require_oracle, x, qtype, w, f"{qtype} {rows}x{cols}")


@pytest.mark.oracle
def test_overflowing_weights_abort_in_ggml_and_raise_here(require_oracle):
    """x^2 overflowing float32 can make every grid distance inf/NaN: where ggml asserts we raise QuantizationError,
    elsewhere the bytes match."""
    x = make_family("huge", 2, 2 * QK_K)
    w = make_imatrix("positive", x.shape[1])
    aborted = []
    for qtype in TYPES:
        with np.errstate(all="ignore"):
            if require_oracle.ggml_aborts(x, qtype, w):
                aborted.append(qtype)
                with pytest.raises(QuantizationError, match=f"ggml's {qtype} quantizer aborts"):
                    quant.quantize(x, qtype, imatrix=w)
            else:
                assert_blocks_equal(quant.quantize(x, qtype, imatrix=w), require_oracle.ggml_quantize(x, qtype, w),
                                    get_qtype(qtype).type_size, qtype)
    assert {"IQ3_XXS", "IQ3_S"} <= set(aborted)


@pytest.mark.parametrize("qtype", sorted(KERNEL_REQUIRES_IMATRIX))
def test_types_ggml_requires_an_imatrix_for_are_refused_without(qtype):
    x = make_family("normal", 2, QK_K)
    with pytest.raises(ImatrixRequiredError, match=f"{qtype} needs an importance matrix"):
        quant.quantize(x, qtype, name="blk.0.ffn_up.weight")
    assert quant.quantize(x, qtype, imatrix=np.ones(QK_K, np.float32)).shape == (2, get_qtype(qtype).type_size)


def test_grid_seeds_are_the_pinned_sources(require_oracle):
    """quant/kernels/iq_grids.py is what scripts/gen_iq_grids.py extracts from the pinned ggml-quants.c."""
    spec = importlib.util.spec_from_file_location("gen_iq_grids", ROOT / "scripts" / "gen_iq_grids.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    src = (require_oracle.llamacpp_src() / "ggml" / "src" / "ggml-quants.c").read_text()
    for name, vals in gen.parse_seeds(src).items():
        assert np.array_equal(getattr(iq_grids, name), np.array(vals, np.uint16)), name


@pytest.mark.parametrize("qtype", TYPES)
def test_tables_give_ggml_commons_grids(qtype):
    """The grids built from the seeds decode to ggml-common.h's iq*_grid tables (as the gguf package has them),
    every grid point is in the map, and every off-grid key lists at least one neighbour."""
    ref = gguf_quants._type_traits[GGMLQuantizationType[qtype]]
    ref.init_grid()
    want = ref.grid.reshape(ref.grid_shape)
    if qtype.startswith("IQ3"):
        ours = iq3.dequant_grid(qtype)
    elif qtype.startswith("IQ2"):
        ours = iq2.dequant_grid(qtype)
    else:
        ours = iq1.dequant_grid()
    assert np.array_equal(ours.astype(np.float32), want)
    t = tables(qtype)
    on = t.kmap >= 0
    assert sorted(t.kmap[on].tolist()) == list(range(t.grid.shape[0]))
    assert (t.neighbours[-t.kmap[~on] - 1] > 0).all()


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_random_bytes_matches_gguf(qtype):
    """Arbitrary block bytes decode exactly as gguf does (NaN = NaN where the scale bytes make a NaN half)."""
    qt = get_qtype(qtype)
    rng = np.random.default_rng(5)
    rows, cols = 16, 8 * QK_K
    raw = rng.integers(0, 256, (rows, qt.row_bytes(cols)), dtype=np.uint8)
    if qtype in FP16_OFFSETS:
        raw.reshape(-1, qt.type_size)[:, 1] &= 0x7B  # finite halves
    with np.errstate(all="ignore"):
        ours = quant.dequantize(raw, qtype, (rows, cols))
        ref = gguf_dequant(raw, qtype).reshape((rows, cols))
    assert ours.dtype == np.float32 and ours.shape == (rows, cols)
    assert same_floats(ours, ref)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_of_quantized_matches_gguf_and_is_close(qtype):
    x = make_family("normal", 8, 8 * QK_K)
    raw = quant.quantize(x, qtype, imatrix=make_imatrix("positive", x.shape[1]))
    ours = quant.dequantize(raw, qtype, x.shape)
    assert np.array_equal(ours.view(np.uint32), gguf_dequant(raw, qtype).reshape(x.shape).view(np.uint32))
    rel = np.sqrt(np.mean((ours - x) ** 2) / np.mean(x ** 2))
    assert 0 < rel < 0.8, rel  # a real approximation (1-3 bits per weight), not noise


@pytest.mark.parametrize("qtype", TYPES)
def test_rows_independent_and_thread_count_free(qtype):
    x = make_family("heavy_tail", 6, 2 * QK_K)
    w = make_imatrix("with_zeros", x.shape[1])
    whole = quant.quantize(x, qtype, imatrix=w)
    with quant.threads(1):
        single = quant.quantize(x, qtype, imatrix=w)
    rows = np.concatenate([quant.quantize(x[i:i + 1], qtype, imatrix=w) for i in range(x.shape[0])])
    assert np.array_equal(whole, single) and np.array_equal(whole, rows)


@pytest.mark.parametrize("qtype", TYPES)
def test_zero_input_gives_zero_blocks(qtype):
    x = np.zeros((2, 2 * QK_K), np.float32)
    raw = quant.quantize(x, qtype, imatrix=np.ones(2 * QK_K, np.float32))
    assert (quant.dequantize(raw, qtype, x.shape) == 0).all()
