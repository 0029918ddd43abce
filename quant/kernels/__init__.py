"""Quantize/dequantize kernels, one module per family; each module exports KERNELS = {name: (quantize, dequantize)}.

Kernel contract (checked by quant.api before a kernel is called):
  quantize(x, imatrix) -> uint8 (rows, row_bytes); x float32 C-contiguous (rows, cols), cols % block == 0,
      finite; imatrix float32 (cols,) or None.
  dequantize(raw, cols) -> float32 (rows, cols); raw uint8 C-contiguous (rows, row_bytes).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

QuantizeFn = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
DequantizeFn = Callable[[np.ndarray, int], np.ndarray]


def load_kernels() -> dict[str, tuple[QuantizeFn, DequantizeFn]]:
    """Import every kernel family and merge their tables (imported lazily: numba compiles on first use)."""
    from quant.kernels import (  # lazy: numba compiles at first use
        floats,
        iq1,
        iq2,
        iq3,
        iquants_nl,
        kquants,
        legacy,
        mxfp4,
        ternary,
    )

    table: dict[str, tuple[QuantizeFn, DequantizeFn]] = {}
    for mod in (floats, legacy, kquants, iquants_nl, ternary, mxfp4):
        table.update(mod.KERNELS)
    for mod in (iq3, iq2, iq1):  # the imatrix-driven i-quants
        table.update(mod.KERNELS)
    return table
