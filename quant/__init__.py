"""quantgate's quantization core: ggml-exact kernels, GGUF v3 I/O, checkpoint loaders and llama.cpp mixes."""
from quant.api import dequantize, quantize, threads
from quant.formats import QTYPE_NAMES, QTYPES, QType, get_qtype

__all__ = ["quantize", "dequantize", "threads", "QTYPE_NAMES", "QTYPES", "QType", "get_qtype"]
