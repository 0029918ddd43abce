"""An MLflow pyfunc model whose one artifact is a GGUF file: `mlflow.pyfunc.load_model` finds the file, and
`predict` generates text with llama-cpp-python when it is installed (else it raises a clear error).

This module imports mlflow at import time: only registry.registration (lazily) and MLflow's loader import it.
"""
from __future__ import annotations

import os
from typing import Any

import mlflow.pyfunc

GGUF_ARTIFACT_KEY = "gguf"


class GGUFModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper of a GGUF: input is a list of prompts, output the generated continuations."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Locate the GGUF among the model's artifacts; llama.cpp loads it on the first predict."""
        path = context.artifacts.get(GGUF_ARTIFACT_KEY)
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF artifact {GGUF_ARTIFACT_KEY!r} missing from the MLflow model: {path}")
        self.gguf_path = path
        self._llm = None
        self._n_ctx = 0

    def _model(self, n_ctx: int) -> Any:
        if self._llm is not None and self._n_ctx == n_ctx:
            return self._llm
        try:
            import llama_cpp
        except ImportError as e:
            raise RuntimeError(
                "generating needs llama-cpp-python, which is not installed: pip install 'llama-cpp-python==0.3.36' "
                f"(the GGUF itself is at {self.gguf_path})"
            ) from e
        try:
            self._llm = llama_cpp.Llama(model_path=self.gguf_path, n_ctx=n_ctx, n_threads=os.cpu_count() or 1,
                                        verbose=False)
        except (ValueError, RuntimeError) as e:
            raise RuntimeError(
                f"llama.cpp could not load {self.gguf_path}: {e} (a GGUF needs tokenizer.* metadata to run; "
                "GGUFs quantized from a folder without a tokenizer cannot generate)"
            ) from e
        self._n_ctx = n_ctx
        return self._llm

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        """Generate one continuation per prompt (greedy by default; params: max_tokens, temperature, seed, n_ctx)."""
        p = dict(params or {})
        llm = self._model(int(p.get("n_ctx", 512)))
        out = []
        for prompt in model_input:
            r = llm.create_completion(str(prompt), max_tokens=int(p.get("max_tokens", 16)),
                                      temperature=float(p.get("temperature", 0.0)), seed=int(p.get("seed", 0)))
            out.append(r["choices"][0]["text"])
        return out


__all__ = ["GGUFModel", "GGUF_ARTIFACT_KEY"]
