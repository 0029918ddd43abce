"""The ggml tensor types quantgate reads and writes: block geometry from the `gguf` package's constants."""
from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from core.errors import ShapeError, UnsupportedTypeError

#: Types `quant.quantize` can produce (and `quant.dequantize` can read), in ggml's naming.
QTYPE_NAMES: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4",
    "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M",
)


@dataclass(frozen=True)
class QType:
    """One ggml tensor type: its name, enum value and block layout (weights per block, bytes per block)."""

    name: str
    ggml_type: GGMLQuantizationType
    block_size: int
    type_size: int

    @property
    def is_float(self) -> bool:
        return self.name in ("F32", "F16", "BF16")

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, cols: int) -> int:
        """Bytes one row of `cols` weights takes; `cols` must be a multiple of the block size."""
        if cols % self.block_size:
            raise ShapeError(
                f"row length {cols} is not a multiple of {self.name}'s block size {self.block_size}"
            )
        return cols // self.block_size * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes a tensor of this numpy-order shape takes (last axis is the row)."""
        n_rows = 1
        for d in shape[:-1]:
            n_rows *= int(d)
        return n_rows * self.row_bytes(int(shape[-1]) if shape else 1)


def _build() -> dict[str, QType]:
    out = {}
    for name in QTYPE_NAMES:
        t = GGMLQuantizationType[name]
        bs, ts = GGML_QUANT_SIZES[t]
        out[name] = QType(name, t, bs, ts)
    return out


QTYPES: dict[str, QType] = _build()


def get_qtype(name: "str | int | GGMLQuantizationType") -> QType:
    """Look up a type by ggml name (case-insensitive) or enum value; unknown names raise a clear error."""
    if isinstance(name, (int, GGMLQuantizationType)):
        try:
            key = GGMLQuantizationType(int(name)).name
        except ValueError:
            raise UnsupportedTypeError(f"unknown ggml type id {int(name)}") from None
    else:
        key = str(name).strip().upper()
    try:
        return QTYPES[key]
    except KeyError:
        raise UnsupportedTypeError(
            f"unsupported tensor type {name!r}; supported: {', '.join(QTYPE_NAMES)}"
        ) from None
