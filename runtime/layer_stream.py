"""Layer-streamed forward passes: a decoder-only model run one block at a time, read straight from its file.

Only one decoder block's float32 weights are in memory at a time: they are read from the checkpoint tensor by
tensor (HF safetensors / PyTorch through quant.loaders, GGUF dequantized through quant.gguf_to_hf, Q/K permutation
undone), the block runs over every sequence's hidden states, and is freed before the next block is read. The final
norm and lm_head then turn each sequence's hidden states into logits, one sequence at a time. Peak memory is one
block + the embedding or the head + the activations of the sequences (n_tokens x hidden x 4 bytes), instead of the
whole model in float32 (docs/EVALUATION.md, "Memory").

The blocks are transformers' own modules (built on the meta device from the model's config, materialized per block
with `load_state_dict(assign=True)`), called as the model's own forward calls them (same causal masks, same rotary
embeddings), so the logits equal transformers' full forward (tested on the bundled Llama and a tiny Qwen2).
An architecture is one row of `ARCHS` (where the embedding, blocks, final norm and head live); `supports()` says
whether a checkpoint can stream, and callers fall back to the full-model path (runtime.backends.torch_backend)
when it cannot.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from core.errors import CheckpointError
from core.memory import release_free_memory
from quant.gguf_split import open_gguf
from quant.loaders import open_checkpoint
from runtime.backends import is_gguf


@dataclass(frozen=True)
class BlockArch:
    """Where a decoder-only transformers model keeps its parts (HF names and module attributes)."""

    layer_prefix: str = "model.layers.{i}."
    embed: str = "model.embed_tokens.weight"
    norm: str = "model.norm.weight"
    head: str = "lm_head.weight"
    #: attribute path of the decoder (holds .layers, .norm, .rotary_emb) in the *ForCausalLM module
    decoder: str = "model"
    #: embeddings multiplied by sqrt(hidden_size) (Gemma's ScaledWordEmbedding)
    embed_scale: bool = False
    #: logits soft-capped as c * tanh(logits / c) with c = config.final_logit_softcapping (Gemma 2; Gemma 3 when set)
    logit_softcap: bool = False
    #: one rotary embedding per attention type (Gemma 3: local and global rope thetas), chosen per layer
    rotary_per_layer_type: bool = False


#: HF model_type -> its layout. Every row is tested against transformers' full forward, from the HF folder and
#: from our GGUF (tests/runtime/test_layer_stream*.py). The attention type of a layer (full / sliding window) comes
#: from config.layer_types where the config has it, else from config.sliding_window (Mixtral, Phi-3, Qwen3-MoE,
#: Mistral: one mask for every layer, as their forward builds it). MoE blocks hold transformers 5's fused experts;
#: the checkpoint's per-expert weights are gathered per block (runtime.backends.torch_backend.runtime_layout).
ARCHS: dict[str, BlockArch] = {
    "llama": BlockArch(),
    "qwen2": BlockArch(),
    "mistral": BlockArch(),
    "qwen3": BlockArch(),
    "phi3": BlockArch(),
    "mixtral": BlockArch(),
    "qwen2_moe": BlockArch(),
    "qwen3_moe": BlockArch(),
    "gemma2": BlockArch(embed_scale=True, logit_softcap=True),
    "gemma3_text": BlockArch(embed_scale=True, logit_softcap=True, rotary_per_layer_type=True),
}


class _Weights:
    """Float32 HF-named tensors of a checkpoint, read one at a time (or one block's at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._gguf = None
        if is_gguf(path):
            from quant.gguf_to_hf import hf_config_from_gguf, hf_tensor_map  # lazy: gguf package name maps

            self._gguf = open_gguf(path)
            try:
                self.config_dict: dict[str, Any] = hf_config_from_gguf(self._gguf)
                self._tmap = hf_tensor_map(self._gguf, self.config_dict)
            except BaseException:
                self._gguf.close()
                raise
            by_name = {t.name: t for t in self._gguf.tensors}
            #: HF name (a {x} template for a stacked expert tensor) -> the GGUF tensor holding it
            self._infos = {hf: by_name[g] for g, hf in self._tmap.hf_name.items()}
            self.names = set()
            for hf, info in self._infos.items():
                if info.name in self._tmap.experts:
                    self.names.update(hf.format(x=x) for x in range(int(info.shape[0])))
                else:
                    self.names.add(hf)
        else:
            self._ckpt = open_checkpoint(path)
            if self._ckpt.config is None:
                self._ckpt.close()
                raise CheckpointError(f"{path}: an HF folder with config.json is needed to run the model")
            self.config_dict = dict(self._ckpt.config)
            self._tensors = {t.name: t for t in self._ckpt.tensors}
            self.names = set(self._tensors)

    def read(self, name: str) -> np.ndarray:
        """One (non-expert) tensor (HF name, HF layout) as float32."""
        if name not in self.names or (self._gguf is not None and name not in self._infos):
            raise CheckpointError(f"{self.path}: the checkpoint has no tensor {name!r}")
        if self._gguf is not None:
            from quant.gguf_to_hf import hf_tensors_of  # lazy: as above

            return next(iter(hf_tensors_of(self._gguf, self._tmap, self._infos[name])))[1]
        return np.ascontiguousarray(self._tensors[name].read(), dtype=np.float32)

    def with_prefix(self, prefix: str) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, float32 array) of every tensor whose HF name starts with `prefix` (one block's weights; a
        GGUF's stacked experts come out one weight per expert, as HF checkpoints store them)."""
        if self._gguf is not None:
            from quant.gguf_to_hf import hf_tensors_of  # lazy: as above

            for hf, info in self._infos.items():
                if hf.startswith(prefix):
                    yield from hf_tensors_of(self._gguf, self._tmap, info)
            return
        for name in sorted(n for n in self.names if n.startswith(prefix)):
            yield name, self.read(name)

    def close(self) -> None:
        if self._gguf is not None:
            self._gguf.close()
        else:
            self._ckpt.close()


def model_type_of(path: "str | os.PathLike[str]") -> str | None:
    """The HF model_type a checkpoint runs as (GGUF: through quant.gguf_to_hf), None when it cannot be told."""
    p = Path(path)
    try:
        if is_gguf(p):
            from quant.gguf_to_hf import hf_config_from_gguf  # lazy: gguf package name maps

            with open_gguf(p) as g:  # llama.cpp's arch names differ (llama with experts = mixtral, qwen2moe, ...)
                return hf_config_from_gguf(g).get("model_type")
        with open_checkpoint(p) as ckpt:
            return (ckpt.config or {}).get("model_type")
    except (CheckpointError, OSError, ValueError, KeyError, TypeError):
        return None


def supports(path: "str | os.PathLike[str]") -> bool:
    """Whether `path` can run layer by layer (its architecture has a row in ARCHS)."""
    return model_type_of(path) in ARCHS


def _module(root: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


class LayerStream:
    """A checkpoint opened for layer-streamed forward passes (see the module docstring). Use as a context manager."""

    def __init__(self, path: "str | os.PathLike[str]") -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.torch = torch
        self.path = Path(path)
        self.weights = _Weights(self.path)
        try:
            cfg = dict(self.weights.config_dict)
            model_type = cfg.get("model_type")
            if model_type not in ARCHS:
                raise CheckpointError(f"{self.path}: architecture {model_type!r} has no layer-streaming adapter "
                                      f"(known: {', '.join(sorted(ARCHS))})")
            self.arch = ARCHS[model_type]
            self.config = AutoConfig.for_model(**cfg) if is_gguf(self.path) else AutoConfig.from_pretrained(
                str(self.path if self.path.is_dir() else self.path.parent))
            with torch.device("meta"):
                self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
            self.skeleton.eval()
            self.decoder = _module(self.skeleton, self.arch.decoder)
            self.n_layer = int(self.config.num_hidden_layers)
            self.n_embd = int(self.config.hidden_size)
            self.n_vocab = int(self.config.vocab_size)
            self.tied = bool(getattr(self.config, "tie_word_embeddings", False)) or self.arch.head not in \
                self.weights.names
            rot = self.decoder.rotary_emb
            self.rotary = type(rot)(config=rot.config)  # buffers (inv_freq) computed on the CPU from the config
            window = getattr(self.config, "sliding_window", None)
            self.layer_types = list(getattr(self.config, "layer_types", None) or
                                    ["full_attention" if window is None else "sliding_attention"] * self.n_layer)
            self.n_experts = int(getattr(self.config, "num_local_experts", None) or
                                 getattr(self.config, "num_experts", None) or 0)
            self.softcap = getattr(self.config, "final_logit_softcapping", None) if self.arch.logit_softcap else None
        except BaseException:
            self.weights.close()
            raise

    def __enter__(self) -> "LayerStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.weights.close()

    # -- parts ------------------------------------------------------------------------------------------------

    def tensor(self, name: str):
        """One weight as a float32 torch tensor (HF name)."""
        return self.torch.from_numpy(self.weights.read(name))

    @contextmanager
    def block(self, i: int) -> Iterator[Any]:
        """Block i with its weights read from the file, freed (back on the meta device) when the context exits."""
        from runtime.backends.torch_backend import runtime_layout  # lazy: as the torch backend is

        layer = self.decoder.layers[i]
        prefix = self.arch.layer_prefix.format(i=i)
        expected = {prefix + n for n, _ in layer.named_parameters()}
        sd = {}
        for name, arr in runtime_layout(self.weights.with_prefix(prefix), expected, self.n_experts):
            if name not in expected:
                raise CheckpointError(f"{self.path}: tensor {name!r} has no place in block {i}")
            sd[name[len(prefix):]] = self.torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        missing = sorted(expected - {prefix + n for n in sd})
        if missing:
            raise CheckpointError(f"{self.path}: block {i} lacks {', '.join(missing[:5])}")
        layer.load_state_dict(sd, strict=True, assign=True)
        del sd
        try:
            yield layer
        finally:
            layer.to("meta")
            release_free_memory()  # the block's weights and temporaries: give their heap pages back

    def embed(self, ids: Sequence[Sequence[int]]) -> list[Any]:
        """Input hidden states (1, n, hidden) of each sequence (the embedding is read, used, and dropped)."""
        torch = self.torch
        w = self.tensor(self.arch.embed)
        out = []
        for s in ids:
            t = torch.as_tensor(np.asarray(s, dtype=np.int64))
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= w.shape[0]):
                raise CheckpointError(f"token id out of range for a vocabulary of {w.shape[0]}")
            e = torch.nn.functional.embedding(t, w).unsqueeze(0)
            if self.arch.embed_scale:  # as Gemma's ScaledWordEmbedding: a float32 scalar of sqrt(hidden)
                e = e * torch.tensor(self.n_embd ** 0.5).to(e.dtype)
            out.append(e)
        return out

    def context(self, h) -> dict[str, Any]:
        """What every block call on hidden states `h` (batch, n, hidden) needs: masks per attention type,
        rotary embeddings, positions, computed as the model's own forward computes them."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        torch = self.torch
        pos = torch.arange(h.shape[1]).unsqueeze(0)
        kw = {"config": self.config, "inputs_embeds": h, "attention_mask": None, "cache": None, "position_ids": pos}
        masks = {"full_attention": create_causal_mask(**kw)}
        if "sliding_attention" in self.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
        if self.arch.rotary_per_layer_type:
            rope = {t: self.rotary(h, pos, t) for t in set(self.layer_types)}
        else:
            one = self.rotary(h, pos)
            rope = {t: one for t in set(self.layer_types)}
        return {"masks": masks, "position_embeddings": rope, "position_ids": pos}

    def run_block(self, layer: Any, i: int, h, ctx: dict[str, Any]):
        """Block i (loaded) on hidden states h with the context of `context(h)`."""
        kind = self.layer_types[i]
        return layer(h, attention_mask=ctx["masks"][kind], position_embeddings=ctx["position_embeddings"][kind],
                     position_ids=ctx["position_ids"], use_cache=False)

    @contextmanager
    def head(self, weight: bool = True) -> Iterator[tuple[Any, Any]]:
        """(final norm module, lm_head weight) loaded; freed on exit. Tied models use the embedding. `weight`
        False: only the norm is read (the weight is None), for callers that need the normed states alone."""
        norm = self.decoder.norm
        norm.load_state_dict({"weight": self.tensor(self.arch.norm)}, strict=True, assign=True)
        w = self.tensor(self.arch.embed if self.tied else self.arch.head) if weight else None
        try:
            yield norm, w
        finally:
            norm.to("meta")
            del w
            release_free_memory()

    def logits(self, norm: Any, w: Any, h: Any):
        """Logits of final-block hidden states h (1, n, hidden): final norm, head, and the architecture's
        soft-cap (Gemma 2), as the model's *ForCausalLM forward computes them."""
        out = self.torch.nn.functional.linear(norm(h)[0], w)
        if self.softcap is not None:
            out = self.torch.tanh(out / self.softcap) * self.softcap
        return out

    # -- whole passes ---------------------------------------------------------------------------------------------

    def hidden_states(self, ids: Sequence[Sequence[int]], *, on_block: "Callable[[int, Any], None] | None" = None,
                      progress: "Callable[[int, int], None] | None" = None) -> list[Any]:
        """Final-block hidden states (before the final norm) of each sequence, one block in memory at a time.
        `on_block(i, layer)` runs with block i loaded, before it is applied (e.g. to add forward hooks)."""
        torch = self.torch
        with torch.inference_mode():
            hs = self.embed(ids)
            ctxs = [self.context(h) for h in hs]
            for i in range(self.n_layer):
                with self.block(i) as layer:
                    handles = on_block(i, layer) if on_block is not None else None
                    try:  # in place: each sequence's input states are freed as its output is made
                        for j, c in enumerate(ctxs):
                            hs[j] = self.run_block(layer, i, hs[j], c)
                    finally:
                        for hd in handles or ():
                            hd.remove()
                if progress is not None:
                    progress(i + 1, self.n_layer)
        return hs


def group_by_budget(lengths: Sequence[int], n_embd: int, budget_bytes: int) -> list[list[int]]:
    """Indices of sequences in consecutive groups whose float32 hidden states (2 copies: in and out of a block)
    fit in `budget_bytes` (a group holds at least one sequence)."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        b = 2 * 4 * int(n) * n_embd
        if groups[-1] and used + b > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += b
    return [g for g in groups if g]


#: Activations kept per sweep over the blocks; more sequences than this make several sweeps (weights re-read).
DEFAULT_ACTIVATION_BUDGET = 512 << 20


def stream_logits(path: "str | os.PathLike[str]", ids: Sequence[Sequence[int]],
                  on_logits: Callable[[int, np.ndarray], None], *,
                  activation_budget: int = DEFAULT_ACTIVATION_BUDGET,
                  progress: "Callable[[int, int], None] | None" = None) -> int:
    """Run every sequence of `ids` through the model at `path` layer by layer and call `on_logits(i, logits)` with
    sequence i's float32 logits (n_i, n_vocab), in order. Returns n_vocab. One sequence per block call (no
    padding), as the torch backend does, so the logits do not depend on which sequences share a sweep."""
    torch = _torch()
    with LayerStream(path) as ls:
        groups = group_by_budget([len(s) for s in ids], ls.n_embd, activation_budget)
        for g in groups:
            hs = ls.hidden_states([ids[i] for i in g])
            with torch.inference_mode(), ls.head() as (norm, w):
                for i, h in zip(g, hs):
                    on_logits(i, ls.logits(norm, w, h).float().numpy())
            del hs
            if progress is not None:
                progress(g[-1] + 1, len(ids))
        return ls.n_vocab


def _torch():
    import torch

    return torch


def hf_config(path: "str | os.PathLike[str]"):
    """The transformers config a checkpoint runs with (HF folder: its config.json; GGUF: rebuilt from its KVs by
    quant.gguf_to_hf), without reading any weights."""
    from transformers import AutoConfig

    p = Path(path)
    if is_gguf(p):
        from quant.gguf_to_hf import hf_config_from_gguf  # lazy: gguf package name maps

        with open_gguf(p) as g:
            return AutoConfig.for_model(**hf_config_from_gguf(g))
    return AutoConfig.from_pretrained(str(p if p.is_dir() else p.parent))
