"""llama.cpp's named file types (Q4_K_M, ...) and its per-tensor type choice, ported from the pinned
src/llama-quant.cpp: tensor_allows_quantization, llama_tensor_get_type(_impl), tensor_type_fallback and the
counters of llama_model_quantize_impl. Only the rules reachable for the file types listed in PRECISIONS are ported
(the IQ*/TQ*/MXFP4 file types are not offered, so their branches are omitted).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from core.errors import CheckpointError, UnsupportedTypeError
from quant.formats import get_qtype
from quant.model_plan import ModelPlan, PlannedTensor


@dataclass(frozen=True)
class MixInfo:
    """One named llama.cpp file type: its name, llama_ftype number and default tensor type."""

    name: str
    llama_ftype: int
    default_type: str


PRECISIONS: dict[str, MixInfo] = {m.name: m for m in (
    MixInfo("F32", 0, "F32"), MixInfo("F16", 1, "F16"), MixInfo("BF16", 32, "BF16"),
    MixInfo("Q4_0", 2, "Q4_0"), MixInfo("Q4_1", 3, "Q4_1"), MixInfo("Q8_0", 7, "Q8_0"),
    MixInfo("Q5_0", 8, "Q5_0"), MixInfo("Q5_1", 9, "Q5_1"), MixInfo("Q2_K", 10, "Q2_K"),
    MixInfo("Q3_K_S", 11, "Q3_K"), MixInfo("Q3_K_M", 12, "Q3_K"), MixInfo("Q3_K_L", 13, "Q3_K"),
    MixInfo("Q4_K_S", 14, "Q4_K"), MixInfo("Q4_K_M", 15, "Q4_K"), MixInfo("Q5_K_S", 16, "Q5_K"),
    MixInfo("Q5_K_M", 17, "Q5_K"), MixInfo("Q6_K", 18, "Q6_K"),
)}

_FLOAT_TYPES = ("F32", "F16", "BF16")
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_FALLBACK.update(dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"), "IQ4_NL"))
# convert_hf_to_gguf keeps these 2-D tensors in F32 (its "some tensor types are always in float32" list)
_HF_F32_PATTERNS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "position_embd.weight",
                    "token_types.weight", "ssm_conv1d.weight", "shortconv.conv.weight", "time_mix_first.weight",
                    "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_decay_w1.weight",
                    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight")
_NO_QUANT_SUBSTR = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)
_GLM5_NEXT_NO_QUANT = ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                       "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
                       "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
                       "attn_v_b.weight")


def get_mix(precision: str) -> MixInfo:
    """Look up a named file type (case-insensitive); unknown names raise UnsupportedTypeError listing valid ones."""
    key = str(precision).strip().upper()
    if key not in PRECISIONS:
        raise UnsupportedTypeError(
            f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return PRECISIONS[key]


def _ne(shape: tuple[int, ...]) -> list[int]:
    ne = [int(d) for d in reversed(shape)] or [1]
    return ne + [1] * (4 - len(ne))


def _n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing (ggml-order) dimensions of size 1 do not count."""
    ne = _ne(shape)
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for sub, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if sub in name:
            return cat
    return "other"


def _is_attn_v(cat: str) -> bool:
    return cat in ("attn_v", "attn_qkv", "attn_kv_b")


def allows_quantization(name: str, shape: tuple[int, ...], arch: str) -> bool:
    """tensor_allows_quantization (quantize_output_tensor=true, only_copy=false)."""
    if _n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if any(s in name for s in _NO_QUANT_SUBSTR) or name in ("position_embd.weight", "token_types.weight"):
        return False
    if arch == "glm5-next" and any(s in name for s in _GLM5_NEXT_NO_QUANT):
        return False
    return True


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer_sort_key(name: str) -> tuple[int, str]:
    """llama_model_loader's weight_name_comparer: by the blk.N layer (-1 when none), then by name."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def llama_quantize_order(names: Sequence[str]) -> list[str]:
    """Tensor order of llama.cpp's quantizer (its weights_map): non-block tensors first, then by layer, each group
    sorted by name. llama-quantize writes its output GGUF in this order and advances its counters in it."""
    return sorted(names, key=_layer_sort_key)


def _block(t: str) -> int:
    return get_qtype(t).block_size


@dataclass
class _State:
    """quantize_state_impl: the counters llama.cpp advances while it walks the tensors."""

    n_attention_wv: int = 0
    n_layer: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    has_tied_embeddings: bool = True
    has_imatrix: bool = False


def _get_type_impl(qs: _State, new_type: str, name: str, ne: list[int], ftype: str, cat: str,
                   arch: str, hp: dict, output_tensor_type: str | None) -> str:
    """llama_tensor_get_type_impl for the non-IQ file types."""
    n_expert_hp = int(hp.get("n_expert", 0))
    n_expert = max(1, n_expert_hp)
    n_head, n_head_kv = int(hp.get("n_head", 0)), int(hp.get("n_head_kv", 0))
    n_gqa = n_head // n_head_kv if n_head_kv else 0
    is_70b = arch == "llama" and n_expert_hp != 8 and int(hp.get("n_layer", 0)) == 80 and n_head != n_head_kv
    falcon = arch == "falcon"

    def layer_info(i_layer: int, n_layer: int) -> tuple[int, int]:
        if n_expert > 1:
            m = re.match(r"blk\.(-?\d+)\.", name)
            if not m:
                raise CheckpointError(f"failed to determine layer for tensor {name}")
            i_layer = int(m.group(1))
            if not 0 <= i_layer < n_layer:
                raise CheckpointError(f"bad layer {i_layer} for tensor {name}; must be in [0, {n_layer})")
        return i_layer, n_layer

    if arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if new_type not in _FLOAT_TYPES:
            return "Q8_0"

    if cat == "output" or (qs.has_tied_embeddings and cat == "token_embd"):
        if output_tensor_type is not None:
            return output_tensor_type
        if falcon or ne[0] % _block(new_type) != 0:
            return "Q8_0"
        return "Q6_K" if new_type != "Q8_0" else new_type
    if cat == "token_embd":
        return new_type  # --token-embedding-type was handled by the caller; no rule for these file types
    if _is_attn_v(cat):
        if ftype == "Q2_K":
            new_type = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif ftype == "Q3_K_M":
            new_type = "Q5_K" if qs.i_attention_wv < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new_type = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new_type = "Q6_K"
        elif ftype == "Q4_K_S" and qs.i_attention_wv < 4:
            new_type = "Q5_K"
        if is_70b and new_type in ("Q3_K", "Q4_K"):
            new_type = "Q5_K"
        if n_expert_hp == 8:
            new_type = "Q8_0"
        qs.i_attention_wv += 1
    elif cat == "attn_k":
        if n_expert_hp == 8:
            new_type = "Q8_0"
    elif cat == "ffn_down":
        i_layer, n_layer = layer_info(qs.i_ffn_down, qs.n_layer)
        if ftype == "Q2_K":
            new_type = "Q3_K"
        elif ftype == "Q3_K_M":
            new_type = ("Q5_K" if i_layer < n_layer // 16
                        else "Q4_K" if not falcon or _use_more_bits(i_layer, n_layer) else "Q3_K")
        elif ftype == "Q3_K_L":
            new_type = "Q4_K" if falcon else "Q5_K"
        elif ftype == "Q4_K_M":
            if falcon:
                new_type = ("Q6_K" if i_layer < n_layer // 16
                            else "Q5_K" if _use_more_bits(i_layer, n_layer) else "Q4_K")
            elif _use_more_bits(i_layer, n_layer):
                new_type = "Q6_K"
        elif ftype == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
            new_type = "Q6_K"
        elif ftype == "Q4_K_S" and not falcon and i_layer < n_layer // 8:
            new_type = "Q5_K"
        elif ftype in ("Q4_0", "Q5_0") and qs.has_imatrix and i_layer < n_layer // 8:
            new_type = "Q4_1" if ftype == "Q4_0" else "Q5_1"
        qs.i_ffn_down += 1
    elif cat == "attn_output":
        if not falcon:
            if n_expert_hp == 8:
                if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                    new_type = "Q5_K"
            else:
                if ftype == "Q2_K":
                    new_type = "Q3_K"
                elif ftype == "Q3_K_M":
                    new_type = "Q4_K"
                elif ftype == "Q3_K_L":
                    new_type = "Q5_K"
        elif ftype == "Q3_K_L":
            new_type = "Q4_K"
    elif cat == "ffn_gate":
        layer_info(qs.i_ffn_gate, qs.n_layer)
        qs.i_ffn_gate += 1
    elif cat == "ffn_up":
        layer_info(qs.i_ffn_up, qs.n_layer)
        qs.i_ffn_up += 1
    return new_type


def _fallback(new_type: str, ncols: int) -> str:
    """tensor_type_fallback: a row length that does not fit the block size demotes to a 32-block type, else F16."""
    if new_type in _FLOAT_TYPES or ncols % _block(new_type) == 0:
        return new_type
    ret = _FALLBACK.get(new_type, new_type)
    if ncols % _block(ret) != 0:
        ret = "F16"
    return ret


def current_type(plan: ModelPlan, t: PlannedTensor) -> str:
    """The type the tensor has in the F32/F16/BF16 GGUF llama.cpp would quantize from: a GGUF source's own type,
    or, for HF sources, what convert_hf_to_gguf writes (F32 for 1-D, norm and always-F32 tensors, else the
    source's float type)."""
    if plan.source_kind == "gguf":
        return t.source.dtype
    if len(t.shape) <= 1 or t.name.endswith("_norm.weight"):
        return "F32"
    if t.name.endswith(_HF_F32_PATTERNS) or not t.name.endswith((".weight", ".lora_a", ".lora_b")):
        return "F32"
    return t.source.dtype


def tensor_types(plan: ModelPlan, precision: str, *, pure: bool = False, output_tensor_type: str | None = None,
                 token_embedding_type: str | None = None, tensor_type_overrides: Sequence[tuple[str, str]] = (),
                 allow_requantize: bool = False, has_imatrix: bool = False) -> dict[str, str]:
    """GGUF tensor name -> ggml type name, exactly as llama.cpp's quantizer chooses them for this file type and
    options (--pure, --output-tensor-type, --token-embedding-type, --tensor-type REGEX=TYPE in order, first match)."""
    mix = get_mix(precision)
    ftype, default_type = mix.name, mix.default_type
    out_t = get_qtype(output_tensor_type).name if output_tensor_type is not None else None
    emb_t = get_qtype(token_embedding_type).name if token_embedding_type is not None else None
    patterns: list[tuple[re.Pattern[str], str]] = []
    for pat, typ in tensor_type_overrides:
        try:
            patterns.append((re.compile(pat), get_qtype(typ).name))
        except re.error as e:
            raise UnsupportedTypeError(f"invalid --tensor-type pattern {pat!r}: {e}") from None

    names = [t.name for t in plan.tensors]
    qs = _State(n_layer=int(plan.hparams.get("n_layer", 0)), has_imatrix=has_imatrix)
    qs.n_attention_wv = sum(1 for n in names if _is_attn_v(_category(n)))
    qs.has_tied_embeddings = "output.weight" not in names
    quantized_default = default_type not in _FLOAT_TYPES

    result: dict[str, str] = {}
    by_name = {t.name: t for t in plan.tensors}
    for t in (by_name[n] for n in llama_quantize_order(names)):
        cur = current_type(plan, t)
        cat = _category(t.name)
        ne = _ne(t.shape)
        if not allows_quantization(t.name, t.shape, plan.arch):
            new_type = cur
        elif emb_t is not None and cat == "token_embd" and not (
                t.name == "per_layer_token_embd.weight" and any(p.search(t.name) for p, _ in patterns)):
            new_type = emb_t
        elif out_t is not None and cat == "output":
            new_type = out_t
        else:
            new_type = default_type
            if quantized_default:
                manual = False
                for pat, typ in patterns:
                    if pat.search(t.name):
                        new_type, manual = typ, True
                        break
                if not manual and not pure:
                    new_type = _get_type_impl(qs, new_type, t.name, ne, ftype, cat, plan.arch, plan.hparams, out_t)
                new_type = _fallback(new_type, ne[0])
        if new_type != cur and cur not in _FLOAT_TYPES and not allow_requantize:
            raise CheckpointError(
                f"tensor {t.name} is already quantized ({cur}); requantizing to {new_type} is disabled "
                "(pass --allow-requantize to permit it)")
        result[t.name] = new_type
    return {n: result[n] for n in names}
