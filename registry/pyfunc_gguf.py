"""An MLflow pyfunc model whose one artifact is a GGUF file: `mlflow.pyfunc.load_model` finds the file, and
`predict` generates text with llama-cpp-python when it is installed (else it raises a clear error).

This file is logged as a *model from code* (mlflow.pyfunc.log_model(python_model=<this file>)): MLflow copies it
into the model and runs it at load time, so it imports nothing of quantgate, only mlflow (and llama_cpp on the first
predict). The model's requirements are published packages (mlflow, llama-cpp-python).
"""
from __future__ import annotations

import os
from typing import Any

import mlflow.models
import mlflow.pyfunc

GGUF_ARTIFACT_KEY = "gguf"
#: predict's params and their defaults (greedy decoding): the model signature's ParamSchema.
DEFAULT_PARAMS: dict[str, Any] = {"max_tokens": 16, "temperature": 0.0, "seed": 0, "n_ctx": 512}


def signature() -> Any:
    """The model signature: a column of prompts in, a column of continuations out, DEFAULT_PARAMS as params (so
    `predict(prompts, params={"max_tokens": 8})` is accepted and checked by MLflow)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {int: "long", float: "double"}
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in DEFAULT_PARAMS.items()]))


def _prompts(model_input: Any) -> list[str]:
    """Prompts from what pyfunc hands predict: a DataFrame (signature enforced), a list, a Series or a string."""
    if hasattr(model_input, "columns"):
        col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(x) for x in model_input[col].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "tolist"):
        return [str(x) for x in model_input.tolist()]
    return [str(x) for x in model_input]


class GGUFModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper of a GGUF: input is a list of prompts, output the generated continuations."""

    #: No type-hint validation: the explicit signature (with its params schema) describes predict; MLflow would
    #: otherwise infer one from type hints and drop the params, or warn on every definition without them.
    _skip_type_hint_validation = True

    def load_context(self, context):  # noqa: ANN001 - see _skip_type_hint_validation
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

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - see _skip_type_hint_validation
        """Generate one continuation per prompt (greedy by default; params: max_tokens, temperature, seed, n_ctx)."""
        p = {**DEFAULT_PARAMS, **(params or {})}
        llm = self._model(int(p["n_ctx"]))
        out = []
        for prompt in _prompts(model_input):
            r = llm.create_completion(prompt, max_tokens=int(p["max_tokens"]), temperature=float(p["temperature"]),
                                      seed=int(p["seed"]))
            out.append(r["choices"][0]["text"])
        return out


mlflow.models.set_model(GGUFModel())

__all__ = ["GGUFModel", "GGUF_ARTIFACT_KEY", "DEFAULT_PARAMS", "signature"]
