"""Collect an importance matrix the way llama-imatrix does, with transformers forward hooks instead of ggml's
eval callback.

For every matrix multiplication by a 2-D weight (every nn.Linear: the blk.* projections and, with
process_output, output.weight; a MoE router's ffn_gate_inp) the hook adds, per input column j, the sum of x_j^2 over
all tokens to `sums` and the token count to `counts` (one count per dense tensor, as collect_imatrix does). For the
fused 3-D experts of a MoE block (ffn_{gate,up,down}_exps, llama.cpp's MUL_MAT_ID) it adds, per expert, the sums
over the tokens routed to that expert and their number: n_expert x n_embd sums (n_expert x n_ff for down) and
n_expert counts, stored as llama-imatrix stores 3-D tensors (docs/ANALYZER.md, "MoE"). Text is handled as llama-imatrix
handles its file: all calibration samples are tokenized and concatenated, cut into chunks of `chunk_size` tokens
(the remainder is dropped), and the first token of every chunk is replaced by BOS. imatrix.chunk_count is the
number of chunks, imatrix.chunk_size the tokens per chunk, so the result round-trips through save_imatrix_gguf
and load_imatrix and llama-quantize reads it like one of its own.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from core.errors import CheckpointError, QuantGateError
from core.memory import release_free_memory
from core.progress import ProgressFn
from analyzer.param_slots import experts_modules, expert_gguf_names, router_modules
from analyzer.stream_measure import can_stream
from quant.imatrix import Imatrix, ImatrixEntry
from quant.loaders import open_checkpoint
from quant.model_plan import plan_model
from runtime.backends.torch_backend import load_torch_model
from runtime.layer_stream import DEFAULT_ACTIVATION_BUDGET, LayerStream, group_by_budget, model_type_of
from runtime.tokenize import DEFAULT_CHUNK_SIZE, CalibrationTokens, calibration_chunks

#: MoE families collected block by block (runtime.layer_stream runs them; their GGUF names follow gguf's tables
#: plus analyzer.param_slots' fused experts); the streamed measurement itself is llama-layout only.
MOE_STREAM_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe"})
#: Precisions the collection's matmuls can run in (collect_imatrix's `matmul_dtype`).
MATMUL_DTYPES = ("float32", "bfloat16")


def linear_gguf_names(model, arch: str) -> dict[str, str]:
    """nn.Linear module name -> GGUF tensor name of its weight (through gguf's TensorNameMap for `arch`)."""
    import gguf
    import torch

    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise CheckpointError(f"architecture {arch!r} has no GGUF tensor name map")
    n_layer = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    name_map = gguf.get_tensor_name_map(archs[arch], n_layer)
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            g = name_map.get_name(key=f"{mod_name}.weight", try_suffixes=(".weight",))
            if g is None:
                raise CheckpointError(f"cannot map module {mod_name!r} to a GGUF tensor name for {arch!r}")
            out[mod_name] = g
    return out


def collect_imatrix(model_path: "str | os.PathLike[str]", texts: Sequence[str], *,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, n_chunks: int | None = None, process_output: bool = True,
                    dataset_name: str = "", progress: ProgressFn | None = None,
                    tokens: CalibrationTokens | None = None, matmul_dtype: str = "float32") -> Imatrix:
    """Run the model (HF folder or float GGUF, float32 torch) over the calibration chunks and return the
    importance matrix: for each 2-D matmul weight, per-input-column sums of squared activations and token counts.
    Layer by layer (runtime.layer_stream: one block's weights in memory) when the architecture has an adapter,
    else the whole model. `tokens`: the chunks, already cut (else `texts` are tokenized here). `matmul_dtype`
    "bfloat16": the matmuls run under torch.autocast in bfloat16 (float32 accumulation, residual stream and norms
    in float32; ~2.7x faster on CPUs with AMX/AVX512-BF16, values within ~1.5%: what the analyzer's own profile
    collection uses, docs/ANALYZER.md); "float32" (default): what llama-imatrix's float32 path computes."""
    if matmul_dtype not in MATMUL_DTYPES:
        raise QuantGateError(f"matmul dtype {matmul_dtype!r} is not one of {', '.join(MATMUL_DTYPES)}")
    toks = tokens if tokens is not None else calibration_chunks(model_path, texts, chunk_size, n_chunks)
    arch = _arch_of(model_path)
    sums: dict[str, np.ndarray] = {}     # (n_mat, cols): one row per expert (1 for a dense tensor)
    counts: dict[str, np.ndarray] = {}   # (n_mat,) token counts
    last: list = [None, None]  # (input tensor, its column sums): q/k/v and gate/up are fed the same tensor

    def add(gname: str, x, expert: int = 0, n_expert: int = 1) -> None:
        import torch

        if last[0] is x:  # the same tensor object (held here, so its memory cannot be reused by another)
            s, n = last[1]
        else:
            xd = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            s, n = (xd * xd).sum(dim=0).numpy(), int(xd.shape[0])
            last[0], last[1] = x, (s, n)
            del xd
        if gname not in sums:
            sums[gname] = np.zeros((n_expert, s.shape[-1]), np.float64)
            counts[gname] = np.zeros(n_expert, np.int64)
        sums[gname][expert] += s
        counts[gname][expert] += n

    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=matmul_dtype == "bfloat16"):
        if can_stream(model_path) or model_type_of(model_path) in MOE_STREAM_TYPES:  # block by block
            _collect_streamed(model_path, arch, toks, process_output, add, progress)
        else:
            _collect_full(model_path, arch, toks, process_output, add, progress)
    last[0] = last[1] = None
    release_free_memory()
    entries = {}
    for gname, s in sums.items():
        if not np.all(np.isfinite(s)):
            raise QuantGateError(f"non-finite activations in {gname}")
        entries[gname] = ImatrixEntry(s.reshape(-1).astype(np.float32), counts[gname].astype(np.float32))
    if not entries:
        raise CheckpointError(f"{model_path}: no 2-D matmul weights found to collect activations for")
    return Imatrix(entries, [dataset_name] if dataset_name else [], len(toks.chunks), toks.chunk_size)


def _hook(add, gname: str):
    def hook(_mod, inputs, _out):
        add(gname, inputs[0])
    return hook


def _experts_hook(add, i: int):
    """Forward hook of block i's fused experts (called as experts(hidden_states, top_k_index, top_k_weights)):
    per expert, the inputs of the tokens routed to it (gate/up) and its SwiGLU output (down), as llama-imatrix
    collects MUL_MAT_ID: one count per (token, slot) routed to the expert."""
    names = {half: g for g, (_, half) in expert_gguf_names(i).items()}

    def hook(mod, args, kwargs, _out):
        import torch

        x = args[0] if args else kwargs["hidden_states"]
        idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
        x = x.reshape(-1, x.shape[-1])
        idx = idx.reshape(x.shape[0], -1)
        n_exp = int(mod.gate_up_proj.shape[0])
        for e in range(n_exp):
            tok, _slot = torch.nonzero(idx == e, as_tuple=True)
            xe = x[tok]
            gate, up = torch.nn.functional.linear(xe, mod.gate_up_proj[e]).chunk(2, dim=-1)
            add(names[0], xe, e, n_exp)
            add(names[1], xe, e, n_exp)
            add(names[None], mod.act_fn(gate) * up, e, n_exp)
    return hook


def _moe_hooks(model, arch: str, add) -> list:
    """Hooks on the MoE parts of `model` (a loaded model or a layer stream's skeleton, whose block modules keep
    their hooks when their weights are swapped in): every block's fused experts and router."""
    handles = [mod.register_forward_hook(_experts_hook(add, i), with_kwargs=True)
               for i, mod in experts_modules(model).items()]
    handles += [mod.register_forward_hook(_hook(add, g)) for g, mod in router_modules(model, arch).items()]
    return handles


def _collect_streamed(model_path, arch: str, toks: CalibrationTokens, process_output: bool, add,
                      progress: ProgressFn | None) -> None:
    """One block in memory at a time; chunks in order within each block, so the float64 sums add up in the same
    order as the whole-model loop. MoE blocks' experts and routers are hooked on the stream's skeleton; `progress`
    hears of every block done, for each group of chunks."""
    with LayerStream(model_path) as ls:
        names = linear_gguf_names(ls.skeleton, arch)
        groups = group_by_budget([len(c) for c in toks.chunks], ls.n_embd, DEFAULT_ACTIVATION_BUDGET)
        moe = _moe_hooks(ls.skeleton, arch, add)
        try:
            _stream_groups(ls, names, groups, toks, process_output, add, progress)
        finally:
            for h in moe:
                h.remove()


def _stream_groups(ls: LayerStream, names: dict[str, str], groups, toks: CalibrationTokens, process_output: bool,
                   add, progress: ProgressFn | None) -> None:
    """The chunk groups through the stream's blocks (nn.Linear hooks per block) and the head."""
    import torch

    n_chunks, steps = len(toks.chunks), len(groups) * ls.n_layer
    for k, g in enumerate(groups):
        def on_layer(i: int, n: int, k: int = k, g: list[int] = g) -> None:
            if progress is not None:
                progress(k * ls.n_layer + i, steps, f"imatrix: chunks {g[0] + 1}-{g[-1] + 1} of {n_chunks}, "
                                                    f"block {i}/{n} done")

        def on_block(i: int, layer):
            prefix = ls.arch.layer_prefix.format(i=i).rstrip(".")
            mods = dict(layer.named_modules())
            return [mods[m[len(prefix) + 1:]].register_forward_hook(_hook(add, gn))
                    for m, gn in names.items() if m.startswith(prefix + ".")]

        hs = ls.hidden_states([toks.chunks[i] for i in g], on_block=on_block, progress=on_layer)
        head_mod = next((m for m, gn in names.items() if gn == "output.weight"), None)
        if process_output and head_mod is not None:
            with torch.inference_mode(), ls.head(weight=False) as (norm, _w):
                for h in hs:
                    add("output.weight", norm(h))
        del hs


def _collect_full(model_path, arch: str, toks: CalibrationTokens, process_output: bool, add,
                  progress: ProgressFn | None) -> None:
    """The whole float32 model (architectures without a layer-streaming adapter)."""
    import torch

    model = load_torch_model(model_path)
    names = linear_gguf_names(model, arch)
    if not process_output:
        names = {m: g for m, g in names.items() if g.startswith("blk.")}
    mods = dict(model.named_modules())
    handles = [mods[m].register_forward_hook(_hook(add, g)) for m, g in names.items()]
    handles += _moe_hooks(model, arch, add)
    try:
        with torch.inference_mode():
            for i, chunk in enumerate(toks.chunks):
                model(input_ids=torch.tensor([chunk], dtype=torch.long), use_cache=False)
                if progress is not None:
                    progress(i + 1, len(toks.chunks), "imatrix")
    finally:
        for h in handles:
            h.remove()


def _arch_of(model_path: "str | os.PathLike[str]") -> str:

    with open_checkpoint(Path(model_path), allow_requantize=True) as ckpt:
        return plan_model(ckpt).arch
