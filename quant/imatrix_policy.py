"""When an importance matrix is mandatory: ggml's rule for the kernels and llama-quantize's rule for a model.

ggml_quantize_requires_imatrix (ggml.c): IQ2_XXS, IQ2_XS and IQ1_S cannot be quantized without one (ggml asserts);
quant.quantize refuses them. tensor_requires_imatrix (src/llama-quant.cpp) is stricter for whole models: every
tensor whose final type (after llama.cpp's type choice and block-size fallback) is IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S,
IQ1_S or IQ1_M, or Q2_K inside a Q2_K_S file, needs imatrix data -- except token_embd / per_layer_token_embd and
output.weight, which llama-imatrix does not collect.
"""
from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np

from core.errors import ImatrixRequiredError

#: ggml_quantize_requires_imatrix
KERNEL_REQUIRES_IMATRIX = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S"})
#: the types tensor_requires_imatrix names for every file type
_MODEL_REQUIRES_IMATRIX = frozenset({"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"})
_EXEMPT = frozenset({"token_embd.weight", "per_layer_token_embd.weight", "output.weight"})


class _Imatrix(Protocol):
    def values(self, name: str) -> np.ndarray | None: ...


def check_kernel_imatrix(qtype: str, imatrix: np.ndarray | None, name: str | None = None) -> None:
    """Raise ImatrixRequiredError where ggml_quantize_chunk would assert for want of an importance matrix."""
    if imatrix is None and qtype in KERNEL_REQUIRES_IMATRIX:
        what = f"tensor {name!r}" if name else "this input"
        raise ImatrixRequiredError(
            f"{qtype} needs an importance matrix (ggml refuses to quantize it without one): {what} has none"
        )


def tensor_requires_imatrix(name: str, qtype: str, ftype: str) -> bool:
    """llama.cpp's tensor_requires_imatrix for GGUF tensor `name` quantized to `qtype` in file type `ftype`."""
    if name in _EXEMPT:
        return False
    if qtype in _MODEL_REQUIRES_IMATRIX:
        return True
    return qtype == "Q2_K" and ftype == "Q2_K_S"


def check_model_imatrix(quantized: Iterable[tuple[str, str]], ftype: str, imatrix: _Imatrix | None) -> None:
    """Refuse a model quantization llama-quantize refuses: without an imatrix, the first (name, type) that requires
    one; with an imatrix, the first such tensor the imatrix has no data for. `quantized` lists the tensors that
    are actually quantized, in llama-quantize's order."""
    for name, qtype in quantized:
        if not tensor_requires_imatrix(name, qtype, ftype):
            continue
        if imatrix is None:
            raise ImatrixRequiredError(
                f"this quantization requires an importance matrix (offending tensor: {name}, target type: {qtype}); "
                "pass --imatrix (quantgate imatrix or llama-imatrix makes one)"
            )
        if imatrix.values(name) is None:
            raise ImatrixRequiredError(
                f"missing importance matrix for tensor {name} in a very low-bit quantization ({qtype}); the "
                "imatrix has no entry for it"
            )
