"""The llama.cpp backend: the candidate GGUF run by llama-cpp-python (its CPU build), on token ids given to it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from core.errors import CheckpointError, QuantGateError
from quant.gguf_split import first_part


def llama_available() -> bool:
    """True when llama-cpp-python can be imported (the preferred GGUF tokenizer and the llama.cpp backend)."""
    try:
        import llama_cpp  # noqa: F401  # lazy: only probes the optional package
    except ImportError:
        return False
    return True


def _llama(path: "str | os.PathLike[str]", **kw):
    try:
        import llama_cpp
    except ImportError:
        raise QuantGateError("the llama.cpp backend needs llama-cpp-python (pip install llama-cpp-python)") from None
    path = first_part(path)  # a split GGUF: llama.cpp opens the first part and finds the others by name
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kw)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: llama.cpp cannot load this GGUF: {e}") from None


def llama_tokenize(path: "str | os.PathLike[str]", texts: list[str]) -> tuple[int | None, list[list[int]]]:
    """(BOS id or None, token ids of each text without special tokens) with llama.cpp's vocab-only tokenizer."""
    llm = _llama(path, vocab_only=True)
    try:
        bos = llm.token_bos()
        ids = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
    finally:
        llm.close()
    return (bos if bos is not None and bos >= 0 else None), ids


class LlamaCppBackend:
    """One llama.cpp context with logits for every position; each sequence is evaluated from an empty KV cache."""

    name = "llama.cpp"

    def __init__(self, path: "str | os.PathLike[str]", *, n_ctx: int, n_threads: int | None = None) -> None:
        self.path = Path(path)
        self.n_ctx = int(n_ctx)
        self.llm = _llama(self.path, n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ctx, logits_all=True,
                          n_threads=n_threads or os.cpu_count() or 1, seed=0)
        self.n_vocab = int(self.llm.n_vocab())

    def logits(self, batch: list[list[int]]) -> list[np.ndarray]:
        """float32 logits (len(ids), n_vocab) of each sequence."""
        out = []
        for ids in batch:
            if len(ids) > self.n_ctx:
                raise QuantGateError(f"sequence of {len(ids)} tokens exceeds the llama.cpp context of {self.n_ctx}")
            self.llm.reset()
            self.llm.eval(list(ids))
            out.append(np.array(self.llm.scores[:len(ids)], dtype=np.float32))
        return out

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None
