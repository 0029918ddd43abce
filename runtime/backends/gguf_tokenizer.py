"""GGUF tokenization without llama-cpp-python: a `tokenizers` tokenizer rebuilt from the file's tokenizer.ggml.* KVs
(transformers' GGUF tokenizer loader), adjusted where transformers and llama.cpp tokenize differently.

Only vocabularies whose ids were checked equal to llama.cpp's are accepted (tests/runtime/test_tokenize_gguf.py):
  tokenizer.ggml.model "llama" (SentencePiece BPE, byte fallback): llama.cpp prepends one space when
      tokenizer.ggml.add_space_prefix (default true) and turns every space into U+2581, whatever the text starts
      with; transformers' Metaspace(prepend_scheme="first") does not add the prefix to text that starts with a
      space, so the normalizer is replaced by llama.cpp's rule.
  tokenizer.ggml.model "gpt2" (byte-level BPE) with a pre-tokenizer of the Qwen2 split family (tokenizer.ggml.pre
      "qwen2", what quantgate convert writes for unrecognized BPE vocabularies, and its aliases).
Any other vocabulary raises QuantGateError asking for llama-cpp-python rather than guessing ids.
Special-token text ("<s>" typed in a sample) is tokenized as plain text, as llama.cpp does with parse_special=False.
"""
from __future__ import annotations

import os
from pathlib import Path

from core.errors import CheckpointError, QuantGateError
from quant.gguf_split import open_gguf

#: tokenizer.ggml.pre values whose split regex is Qwen2's in both llama.cpp and transformers
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen", "megrez")
_DEFAULT_BOS = {"llama": 1, "gpt2": 11}


def _vocab_facts(path: Path) -> tuple[str | None, str | None, bool, int | None]:
    with open_gguf(path) as g:
        model = g.value("tokenizer.ggml.model")
        pre = g.value("tokenizer.ggml.pre")
        prefix = g.value("tokenizer.ggml.add_space_prefix")
        bos = g.value("tokenizer.ggml.bos_token_id")
    if bos is None:  # llama.cpp's defaults when the file names no BOS (llama-vocab.cpp: SPM 1, BPE 11)
        bos = _DEFAULT_BOS.get(str(model))
    return (str(model) if model is not None else None, str(pre) if pre is not None else None,
            True if prefix is None else bool(prefix), int(bos) if bos is not None else None)


def supported(path: "str | os.PathLike[str]") -> str | None:
    """None when this GGUF's vocabulary can be tokenized without llama.cpp, else why not."""
    model, pre, _, _ = _vocab_facts(Path(path))
    if model == "llama":
        return None
    if model == "gpt2" and pre in _QWEN2_PRE:
        return None
    if model is None:
        return "the GGUF has no tokenizer.ggml.model"
    return f"tokenizer.ggml.model {model!r}" + (f" with tokenizer.ggml.pre {pre!r}" if model == "gpt2" else "")


def load_gguf_tokenizer(path: "str | os.PathLike[str]"):
    """(tokenizers.Tokenizer giving llama.cpp's ids, BOS id or None) for a GGUF whose vocabulary `supported`."""
    p = Path(path)
    why = supported(p)
    if why is not None:
        raise QuantGateError(f"{p}: tokenizing this GGUF needs llama-cpp-python ({why} is not rebuilt without it): "
                             "pip install llama-cpp-python, or bash scripts/setup.sh --oracle")
    model, _, add_prefix, bos = _vocab_facts(p)
    from tokenizers import normalizers  # lazy: with transformers
    from transformers import AutoTokenizer  # lazy: transformers only when a GGUF is tokenized

    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{p}: cannot rebuild the tokenizer from the GGUF: {e}") from None
    bt = tok.backend_tokenizer
    if model == "llama":
        steps = [normalizers.Prepend("\u2581")] if add_prefix else []
        bt.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
        bt.pre_tokenizer = None
    bt.encode_special_tokens = True
    return bt, bos


def gguf_tokenize(path: "str | os.PathLike[str]", texts: list[str]) -> tuple[int | None, list[list[int]]]:
    """(BOS id or None, token ids of each text without special tokens), the ids llama.cpp's tokenizer gives."""
    bt, bos = load_gguf_tokenizer(path)
    return bos, [list(bt.encode(t, add_special_tokens=False).ids) if t else [] for t in texts]
