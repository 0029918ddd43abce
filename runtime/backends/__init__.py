"""Model runners that turn token ids into logits: torch (transformers, CPU float32) and llama.cpp (llama-cpp-python).

Both backends see the same token ids, made once by runtime.tokenize with the baseline's tokenizer.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from core.errors import QuantGateError

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
        from runtime.backends.torch_backend import (
            TorchBackend,  # lazy: torch only for this backend
        )

        return TorchBackend.load(model)
    if kind in ("llama.cpp", "llamacpp", "llama_cpp"):
        from runtime.backends.llamacpp_backend import (
            LlamaCppBackend,  # lazy: llama_cpp only for this backend
        )

        if not is_gguf(model):
            raise QuantGateError(f"{model}: the llama.cpp backend runs GGUF files only")
        return LlamaCppBackend(model, n_ctx=n_ctx)
    raise QuantGateError(f"unknown backend {kind!r} (choose from {', '.join(BACKENDS)})")
