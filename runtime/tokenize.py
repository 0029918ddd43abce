"""The one tokenizer dispatch: token ids of texts with a model's own tokenizer, whatever the container.

HF folder: transformers' AutoTokenizer; GGUF: llama.cpp's vocab-only tokenizer when llama-cpp-python is installed,
else the same ids from a tokenizer rebuilt from the GGUF's tokenizer.ggml.* KVs (runtime.backends.gguf_tokenizer). Evaluation (tokenize_samples: one
sample per sequence) and calibration (calibration_chunks: llama-imatrix's concatenated chunks) both come through
`tokenize`, so baseline, candidate and analyzer see the same ids.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from core.errors import QuantGateError
from runtime.backends import is_gguf
from runtime.backends.gguf_tokenizer import gguf_tokenize
from runtime.backends.llamacpp_backend import llama_available, llama_tokenize
from runtime.backends.torch_backend import hf_tokenize


def tokenize(model: "str | os.PathLike[str]", texts: list[str]) -> tuple[int | None, list[list[int]]]:
    """(BOS id or None, token ids of each text without special tokens) with `model`'s own tokenizer."""
    if is_gguf(model):
        if llama_available():
            return llama_tokenize(model, texts)
        return gguf_tokenize(model, texts)

    return hf_tokenize(model, texts)


def tokenize_samples(model: "str | os.PathLike[str]", texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text with `model`'s tokenizer: BOS (when the vocabulary has one) then the text's tokens,
    cut to `max_tokens` ids."""
    if max_tokens < 2:
        raise QuantGateError(f"max_tokens must be at least 2 (one context token and one scored token), got {max_tokens}")
    bos, pieces = tokenize(model, texts)
    prefix = [bos] if bos is not None else []
    return [(prefix + list(ids))[:max_tokens] for ids in pieces]


DEFAULT_CHUNK_SIZE = 512


@dataclass
class CalibrationTokens:
    """Chunks of token ids fed to the model (each starts with BOS when the vocabulary has one)."""

    chunks: list[list[int]]
    chunk_size: int
    n_dropped: int  # tokens after the last full chunk


def calibration_chunks(model: "str | os.PathLike[str]", texts: Sequence[str], chunk_size: int = DEFAULT_CHUNK_SIZE,
                       n_chunks: int | None = None) -> CalibrationTokens:
    """Tokenize `texts` with the model's tokenizer, concatenate, and cut into llama-imatrix's chunks."""
    if chunk_size < 16:
        raise QuantGateError(f"chunk_size must be at least 16 tokens (llama-imatrix ignores smaller batches), "
                             f"got {chunk_size}")
    bos, pieces = tokenize(model, list(texts))
    stream = [int(t) for ids in pieces for t in ids]
    total = len(stream) // chunk_size
    if n_chunks is not None:
        total = min(total, int(n_chunks))
    if total < 1:
        raise QuantGateError(f"calibration text has {len(stream)} tokens, fewer than one chunk of {chunk_size}; "
                             "use more text or a smaller --chunk-size")
    chunks = []
    for i in range(total):
        c = stream[i * chunk_size:(i + 1) * chunk_size]
        if bos is not None:
            c[0] = int(bos)
        chunks.append(c)
    return CalibrationTokens(chunks, chunk_size, len(stream) - total * chunk_size)
