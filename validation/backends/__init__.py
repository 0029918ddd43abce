"""Model runners that turn token ids into logits: torch (transformers, CPU float32) and llama.cpp (llama-cpp-python).

Both backends see the same token ids, made once by `tokenize_samples` with the baseline's tokenizer.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from quant.errors import QuantGateError

BACKENDS = ("torch", "llama.cpp")


class LogitsBackend(Protocol):
    """Runs one model: `logits` returns, for each token sequence, float32 logits of shape (len(ids), n_vocab)."""

    name: str
    n_vocab: int

    def logits(self, batch: list[list[int]]) -> list[np.ndarray]: ...

    def close(self) -> None: ...


def is_gguf(path: "str | os.PathLike[str]") -> bool:
    """True when `path` is a file starting with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def open_backend(kind: str, model: "str | os.PathLike[str]", *, n_ctx: int) -> LogitsBackend:
    """Open `model` (HF folder or GGUF) with backend `kind` ("torch" or "llama.cpp", the latter GGUF only)."""
    if kind == "torch":
        from validation.backends.torch_backend import TorchBackend

        return TorchBackend.load(model)
    if kind in ("llama.cpp", "llamacpp", "llama_cpp"):
        from validation.backends.llamacpp_backend import LlamaCppBackend

        if not is_gguf(model):
            raise QuantGateError(f"{model}: the llama.cpp backend runs GGUF files only")
        return LlamaCppBackend(model, n_ctx=n_ctx)
    raise QuantGateError(f"unknown backend {kind!r} (choose from {', '.join(BACKENDS)})")


def tokenize_samples(model: "str | os.PathLike[str]", texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text with `model`'s tokenizer (HF folder: transformers AutoTokenizer; GGUF: llama.cpp's
    vocab-only tokenizer): BOS (when the vocabulary has one) then the text's tokens, cut to `max_tokens` ids."""
    if max_tokens < 2:
        raise QuantGateError(f"max_tokens must be at least 2 (one context token and one scored token), got {max_tokens}")
    if is_gguf(model):
        from validation.backends.llamacpp_backend import llama_tokenize

        bos, pieces = llama_tokenize(model, texts)
    else:
        from validation.backends.torch_backend import hf_tokenize

        bos, pieces = hf_tokenize(model, texts)
    prefix = [bos] if bos is not None else []
    return [(prefix + list(ids))[:max_tokens] for ids in pieces]
