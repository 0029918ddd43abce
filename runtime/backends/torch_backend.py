"""The torch backend: transformers on CPU in float32, from an HF folder or from a GGUF (dequantized by quant and
mapped back to HF names by quant.gguf_to_hf)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from core.errors import CheckpointError
from quant.gguf_split import open_gguf
from runtime.backends import is_gguf


def hf_tokenize(folder: "str | os.PathLike[str]", texts: list[str]) -> tuple[int | None, list[list[int]]]:
    """(BOS id or None, token ids of each text without special tokens) with the folder's AutoTokenizer."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot load the tokenizer: {e}") from None
    ids = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return tok.bos_token_id, ids


_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                     r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def runtime_layout(tensors: Iterable[tuple[str, np.ndarray]], expected: set[str],
                   n_experts: int) -> Iterator[tuple[str, np.ndarray]]:
    """HF checkpoint tensors -> the names and layout the instantiated transformers model holds: as they come when
    the model has them; MoE checkpoints' per-expert weights (Mixtral w1/w2/w3, Qwen gate/up/down_proj) gathered
    per block into transformers 5's fused experts (mlp.experts.gate_up_proj (n_expert, 2*ff, n_embd) = gate then
    up, mlp.experts.down_proj (n_expert, n_embd, ff)), and Mixtral's block_sparse_moe.gate renamed mlp.gate."""
    pending: dict[int, dict[tuple[str, int], np.ndarray]] = {}
    for name, arr in tensors:
        if name in expected:
            yield name, arr
            continue
        m = _EXPERT.match(name)
        if m is None:
            alt = name.replace(".block_sparse_moe.", ".mlp.")
            yield (alt if alt in expected else name), arr
            continue
        layer, x = int(m.group(1)), int(m.group(2))
        prefix = f"model.layers.{layer}.mlp.experts."
        if prefix + "gate_up_proj" not in expected or not 0 <= x < n_experts:
            yield name, arr  # reported as unexpected by the caller
            continue
        buf = pending.setdefault(layer, {})
        buf[(_ROLE[m.group(3)], x)] = arr
        if len(buf) == 3 * n_experts:
            yield prefix + "gate_up_proj", np.stack(
                [np.concatenate([buf[("gate", i)], buf[("up", i)]], axis=0) for i in range(n_experts)])
            yield prefix + "down_proj", np.stack([buf[("down", i)] for i in range(n_experts)])
            del pending[layer]
    if pending:
        raise CheckpointError(f"incomplete experts for layer(s) {sorted(pending)}: every block needs all "
                              f"{n_experts} experts' gate, up and down weights")


def _model_from_gguf(path: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from quant.gguf_to_hf import (  # lazy: with torch, at first GGUF load
        hf_config_from_gguf,
        iter_hf_tensors,
    )

    with open_gguf(path) as g:
        cfg = hf_config_from_gguf(g)
        config = AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        expected = set(model.state_dict())
        seen: set[str] = set()
        n_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        # one tensor at a time (one block's experts for MoE): no second full copy of the weights
        for name, arr in runtime_layout(iter_hf_tensors(g, cfg), expected, n_experts):
            if name not in expected:
                raise CheckpointError(f"{path}: tensor {name!r} has no place in the transformers model")
            model.load_state_dict({name: torch.from_numpy(arr)}, strict=False, assign=True)
            seen.add(name)
    if config.tie_word_embeddings:
        model.tie_weights()
        seen.add("lm_head.weight")
    missing = sorted(expected - seen)
    if missing:
        raise CheckpointError(f"{path}: GGUF lacks tensors the transformers model needs: {', '.join(missing[:5])}")
    # non-persistent buffers made on the meta device (rotary inv_freq) are rebuilt on the CPU from the config
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)) and hasattr(child, "config"):
                setattr(parent, child_name, type(child)(child.config))
    for mod in model.modules():  # Gemma's scaled embedding: a non-persistent scalar buffer kept as a float too
        emb = getattr(mod, "embed_scale", None)
        if isinstance(emb, torch.Tensor) and emb.is_meta and hasattr(mod, "scalar_embed_scale"):
            mod.embed_scale = torch.tensor(float(mod.scalar_embed_scale))
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: cannot materialize {', '.join(leftover[:5])} for transformers")
    return model


def load_torch_model(path: "str | os.PathLike[str]"):
    """A transformers causal LM in float32 eval mode from an HF folder or a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM


    p = Path(path)
    if is_gguf(p):
        model = _model_from_gguf(p)
    elif p.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    else:
        raise CheckpointError(f"{p}: expected an HF model folder or a GGUF file")
    return model.to(torch.float32).eval()


class TorchBackend:
    """CPU forward passes, one sequence per pass: no padding, so a sequence's logits never depend on which other
    sequences share its batch (cached baseline log-probs stay valid for any batch size)."""

    name = "torch"

    def __init__(self, model) -> None:
        self.model = model
        self.n_vocab = int(model.config.vocab_size)

    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "TorchBackend":
        """Load `path` (HF folder or GGUF) with load_torch_model."""
        return cls(load_torch_model(path))

    def logits(self, batch: list[list[int]]) -> list[np.ndarray]:
        """float32 logits (len(ids), n_vocab) of each sequence."""
        import torch

        out = []
        with torch.inference_mode():
            for ids in batch:
                x = torch.tensor([list(ids)], dtype=torch.long)
                out.append(self.model(input_ids=x, use_cache=False).logits[0].float().numpy().copy())
        return out

    def close(self) -> None:
        self.model = None
