"""HF checkpoint -> float GGUF (F32 / F16 / BF16) laid out as the pinned llama.cpp convert_hf_to_gguf.py writes it:
same tensor names, order and types, same KVs in the same order (tokenizer included), plus quantgate.* provenance.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
from gguf.constants import GGUFValueType

import quant
from core.paths import check_output_target
from core.errors import CheckpointError, UnsupportedTypeError
from core.hashing import checkpoint_sha256, remember_file_sha256
from core.records import QuantizedArtifact, Recipe, job_key
from core.version import __version__
from quant.fingerprint import PLACEHOLDER, fingerprint_or_tap
from quant.formats import get_qtype
from quant.gguf_kv import KV
from quant.gguf_writer import TensorSpec, write_gguf
from quant.loaders import open_checkpoint
from quant.mixes import ALWAYS_F32_SUFFIXES
from quant.model_plan import plan_model
from quantgate.pipeline import GGML_QNT_VERSION, identity_kv

#: --outtype -> (ggml type of the converted weights, general.file_type), as convert_hf_to_gguf's LlamaFileType.
OUTTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32)}


def converted_type(name: str, shape: tuple[int, ...], outtype: str) -> str:
    """The ggml type convert_hf_to_gguf gives a tensor: 1-D tensors, norms, non-weights (biases) and its
    always-F32 tensors (MoE routers, ...) stay F32, everything else gets the outtype."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or name[-7:] not in (".weight", ".lora_a", ".lora_b"):
        return "F32"
    if name.endswith(ALWAYS_F32_SUFFIXES):  # e.g. the MoE routers ffn_gate_inp / ffn_gate_inp_shexp
        return "F32"
    return OUTTYPES[outtype][0]


def convert_recipe(outtype: str, generic: bool, tokenizer_pre: str | None) -> Recipe:
    """The recipe of a convert job; its precision names the operation ("convert:f16[:pre=NAME]") so that a
    convert output never shares a job key with a quantize output of the same type."""
    precision = f"convert:{outtype}" + (f":pre={tokenizer_pre}" if tokenizer_pre else "")
    return Recipe(precision=precision, generic=generic)


def convert_model(
    source: Path,
    out: Path,
    outtype: str = "f16",
    generic: bool = False,
    *,
    tokenizer_pre: str | None = None,
    threads: int | None = None,
    on_tensor: Callable[[int, int, str], None] | None = None,
    source_lineage: str | None = None,
) -> QuantizedArtifact:
    """Convert an HF checkpoint (folder, .safetensors or torch file) to a float GGUF as convert_hf_to_gguf.py
    would, written atomically; returns its record. `generic` keeps the original tensor names (no tokenizer);
    `source_lineage` (quantgate.inputs) names where the source came from in the file's quantgate.* keys."""

    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise UnsupportedTypeError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    file_type = OUTTYPES[outtype][1]
    t0 = time.perf_counter()
    recipe = convert_recipe(outtype, generic, tokenizer_pre)
    check_output_target(out, [source])
    with open_checkpoint(source) as ckpt:
        check_output_target(out, ckpt.files)
        if ckpt.kind == "gguf":
            raise CheckpointError(f"{source}: already a GGUF file; use `quantgate quantize` to change its types")
        source_sha = checkpoint_sha256(ckpt.files)
        t_hash = time.perf_counter()
        plan = plan_model(ckpt, generic=generic, tokenizer_pre=tokenizer_pre)
        if plan.file_type_index is not None:
            kv = plan.converter_kv(file_type, GGML_QNT_VERSION)
        else:
            kv = plan.kv + [KV("general.file_type", file_type, GGUFValueType.UINT32),
                            KV("general.quantization_version", GGML_QNT_VERSION, GGUFValueType.UINT32)]
        types = {pt.name: converted_type(pt.name, tuple(pt.shape), outtype) for pt in plan.tensors}
        key = job_key(source_sha, recipe, __version__)
        # lineage by content from this file on (docs/LINEAGE.md); uncached, it is computed from the tensors the
        # loop below reads (one read of the source) and written into the header after the last tensor
        fingerprint, tap = fingerprint_or_tap(ckpt, source)
        t_fp = time.perf_counter()
        head = list(kv)

        def tail(fp: str | None) -> list[KV]:
            out = identity_kv(recipe, source_sha, ckpt.kind, key, fp, source_lineage=source_lineage)
            tok = plan.tokenizer
            if tok is not None and tok.pre_source is not None:
                out.append(KV("quantgate.tokenizer_pre_source", tok.pre_source, GGUFValueType.STRING))
            return out

        kv = head + tail(PLACEHOLDER if tap is not None else fingerprint)

        def final_kv() -> list[KV]:
            return head + tail(tap.finish())

        def producer(pt, qtype: str) -> Callable[[], np.ndarray]:
            def produce() -> np.ndarray:
                x = pt.source.read()
                if tap is not None:
                    tap.add(pt.source, x)
                if pt.transform is not None:
                    x = pt.transform(x)
                x = np.ascontiguousarray(x, dtype=np.float32).reshape(pt.shape)  # as PlannedTensor.read
                m = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
                return quant.quantize(m, qtype, name=pt.name).reshape(-1)

            return produce

        specs = [TensorSpec(pt.name, tuple(pt.shape), types[pt.name], producer(pt, types[pt.name]),
                        n_dims=len(pt.shape))
                 for pt in plan.tensors]  # the converter's order: extra tensors first, then as the source lists them
        with quant.threads(threads):
            result = write_gguf(out, kv=kv, tensors=specs, on_tensor=on_tensor,
                                final_kv=final_kv if tap is not None else None)
        remember_file_sha256(result.path, result.sha256)  # a quantize of this file need not hash it again
        t_write = time.perf_counter()

    n_params = sum(int(np.prod(pt.shape, dtype=np.int64)) for pt in plan.tensors)
    tensor_bytes = {sp.name: get_qtype(sp.qtype).nbytes(sp.shape) for sp in specs}
    return QuantizedArtifact(
        path=str(result.path),
        sha256=result.sha256,
        nbytes=result.nbytes,
        source=str(source),
        source_sha256=source_sha,
        recipe=recipe,
        job_key=key,
        tool_version=__version__,
        file_type=file_type,
        tensor_types=types,
        tensor_bytes=tensor_bytes,
        n_params=n_params,
        bits_per_weight=8.0 * sum(tensor_bytes.values()) / max(n_params, 1),
        seconds=t_write - t0,
        timings={"hash": t_hash - t0, "fingerprint": t_fp - t_hash, "convert_write": t_write - t_fp,
                 "output_hash": result.seconds.get("hash", 0.0), "write": result.seconds.get("write", 0.0)},
    )
