"""llama.cpp's named file types (Q4_K_M, ...) and its per-tensor type choice, ported from the pinned
src/llama-quant.cpp: tensor_allows_quantization, llama_tensor_get_type(_impl), tensor_type_fallback and the
counters of llama_model_quantize_impl (incl. tensor_requires_imatrix). The K-quant/legacy file types take
_get_type_impl; the i-quant, ternary, MXFP4 and Q2_K_S file types (LOWBIT_FTYPES) take _get_type_impl_lowbit, the same
C chain restricted to the branches those file types can reach (every ftype test in the chain names its file types,
so for one file type only its own branches and the ftype-independent ones can fire).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Collection, Sequence

from core.errors import CheckpointError, ImatrixRequiredError, UnsupportedTypeError
from quant.formats import QTYPES, get_qtype
from quant.gguf_reader import ggml_type
from quant.imatrix_policy import tensor_requires_imatrix
from quant.model_plan import ModelPlan, PlannedTensor

logger = logging.getLogger(__name__)


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
    # i-quant, ternary and MXFP4 file types (llama_ftype_get_default_type), and Q2_K_S, which shares their rules
    MixInfo("IQ2_XXS", 19, "IQ2_XXS"), MixInfo("IQ2_XS", 20, "IQ2_XS"), MixInfo("Q2_K_S", 21, "Q2_K"),
    MixInfo("IQ3_XS", 22, "IQ3_S"), MixInfo("IQ3_XXS", 23, "IQ3_XXS"), MixInfo("IQ1_S", 24, "IQ1_S"),
    MixInfo("IQ4_NL", 25, "IQ4_NL"), MixInfo("IQ3_S", 26, "IQ3_S"), MixInfo("IQ3_M", 27, "IQ3_S"),
    MixInfo("IQ2_S", 28, "IQ2_XS"), MixInfo("IQ2_M", 29, "IQ2_S"), MixInfo("IQ4_XS", 30, "IQ4_XS"),
    MixInfo("IQ1_M", 31, "IQ1_M"), MixInfo("TQ1_0", 36, "TQ1_0"), MixInfo("TQ2_0", 37, "TQ2_0"),
    MixInfo("MXFP4_MOE", 38, "MXFP4"),
)}
#: The file types whose rules live in _get_type_impl_lowbit.
LOWBIT_FTYPES = frozenset(("IQ2_XXS", "IQ2_XS", "Q2_K_S", "IQ3_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ3_M",
                           "IQ2_S", "IQ2_M", "IQ4_XS", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4_MOE"))

_FLOAT_TYPES = ("F32", "F16", "BF16")
# tensor_type_fallback's table: a 256-block type whose block does not divide the row -> a 32-block type
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
             "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
             "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q2_0": "Q4_0", "TQ1_0": "Q4_0",
             "TQ2_0": "Q4_0"}
# convert_hf_to_gguf keeps these 2-D tensors in F32 (its "some tensor types are always in float32" list)
_HF_F32_PATTERNS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "position_embd.weight",
                    "token_types.weight", "ssm_conv1d.weight", "shortconv.conv.weight", "time_mix_first.weight",
                    "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_decay_w1.weight",
                    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight")
ALWAYS_F32_SUFFIXES = _HF_F32_PATTERNS  # public for quantgate.convert (the same converter rule)
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


def main_types(mix: MixInfo) -> set[str]:
    """The types a file of this file type must hold at least one of: its default type or that type's fallback
    (MXFP4_MOE: MXFP4 for expert tensors, Q8_0 for all others, so a dense model holds no MXFP4)."""
    d = mix.default_type
    if mix.name == "MXFP4_MOE":
        return {d, "Q8_0"}
    return {d, _FALLBACK[d]} if d in _FALLBACK else {d}


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
    gt = ggml_type(t)  # every type ggml knows, kernels or not: choosing types needs only their block size
    if gt is None:
        raise UnsupportedTypeError(f"unknown ggml type {t!r}")
    return gt.block_size


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


def _hp_facts(arch: str, hp: dict) -> tuple[int, int, bool]:
    """(hparams.n_expert, n_gqa(), model.type == LLM_TYPE_70B) as llama.cpp's rules read them."""
    n_expert_hp = int(hp.get("n_expert", 0))
    n_head, n_head_kv = int(hp.get("n_head", 0)), int(hp.get("n_head_kv", 0))
    n_gqa = n_head // n_head_kv if n_head_kv else 0
    is_70b = arch == "llama" and n_expert_hp != 8 and int(hp.get("n_layer", 0)) == 80 and n_head != n_head_kv
    return n_expert_hp, n_gqa, is_70b


def _layer_info(name: str, i_layer: int, n_layer: int, n_expert_hp: int) -> tuple[int, int]:
    """layer_info: the counter is the layer, except in MoE models, where the layer is parsed from blk.N."""
    if max(1, n_expert_hp) > 1:
        m = re.match(r"blk\.(-?\d+)\.", name)
        if not m:
            raise CheckpointError(f"failed to determine layer for tensor {name}")
        i_layer = int(m.group(1))
        if not 0 <= i_layer < n_layer:
            raise CheckpointError(f"bad layer {i_layer} for tensor {name}; must be in [0, {n_layer})")
    return i_layer, n_layer


def _glm5_next_q8(arch: str, name: str, new_type: str) -> bool:
    """glm5-next keeps attn_q_a/attn_q_b/nextn.eh_proj at Q8_0 or better."""
    return (arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj"))
            and new_type not in _FLOAT_TYPES)


def _get_type_impl(qs: _State, new_type: str, name: str, ne: list[int], ftype: str, cat: str,
                   arch: str, hp: dict, output_tensor_type: str | None) -> str:
    """llama_tensor_get_type_impl for the K-quant and legacy file types (the others: _get_type_impl_lowbit)."""
    if _glm5_next_q8(arch, name, new_type):
        return "Q8_0"
    if ftype in LOWBIT_FTYPES:
        return _get_type_impl_lowbit(qs, new_type, name, ne, ftype, cat, arch, hp, output_tensor_type)
    n_expert_hp, n_gqa, is_70b = _hp_facts(arch, hp)
    falcon = arch == "falcon"

    def layer_info(i_layer: int, n_layer: int) -> tuple[int, int]:
        return _layer_info(name, i_layer, n_layer, n_expert_hp)

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


_IQ2_FAMILY = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
_IQ_OUTPUT_Q5_K = ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
_MOE8_ATTN_OUTPUT_Q5_K = ("IQ3_XS", "IQ3_XXS", "IQ4_NL", "IQ3_S", "IQ3_M", "IQ4_XS")


def _get_type_impl_lowbit(qs: _State, new_type: str, name: str, ne: list[int], ftype: str, cat: str,
                          arch: str, hp: dict, output_tensor_type: str | None) -> str:
    """llama_tensor_get_type_impl for LOWBIT_FTYPES, branch for branch in the C chain's order."""
    n_expert_hp, n_gqa, is_70b = _hp_facts(arch, hp)
    falcon = arch == "falcon"
    iq2 = ftype in ("IQ2_S", "IQ2_M")
    if cat == "output" or (qs.has_tied_embeddings and cat == "token_embd"):
        if output_tensor_type is not None:
            return output_tensor_type
        if ftype == "MXFP4_MOE" or falcon or ne[0] % _block(new_type) != 0:
            return "Q8_0"
        if ftype in _IQ_OUTPUT_Q5_K:
            return "Q5_K"
        return "Q6_K" if new_type != "Q8_0" else new_type
    if ftype == "MXFP4_MOE":  # expert tensors (3-D) -> MXFP4, everything else -> Q8_0
        is_expert = arch != "bailingmoe3" or cat in ("ffn_up", "ffn_gate", "ffn_down")
        return "MXFP4" if ne[2] > 1 and is_expert else "Q8_0"
    if cat == "token_embd":  # (--token-embedding-type was handled by the caller)
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S"
        if ftype in ("TQ1_0", "TQ2_0"):
            return "Q4_K"
        return new_type
    if ftype in _IQ2_FAMILY:
        if _is_attn_v(cat):
            new_type = "Q4_K" if n_gqa >= 4 or n_expert_hp >= 4 else "IQ3_S" if iq2 else "Q2_K"
            qs.i_attention_wv += 1
        elif n_expert_hp == 8 and cat == "attn_k":
            new_type = "Q4_K"
        elif cat == "ffn_down":
            if qs.i_ffn_down < qs.n_layer // 8:
                new_type = "IQ3_S" if iq2 else "Q2_K"
            qs.i_ffn_down += 1
        elif cat == "attn_output":
            if n_expert_hp == 8:
                new_type = "Q5_K"
            elif ftype in ("IQ1_S", "IQ1_M"):
                new_type = "IQ2_XXS"
            elif iq2:
                new_type = "IQ3_S"
        return new_type
    if _is_attn_v(cat):
        if ftype == "Q2_K_S":
            if n_gqa >= 4:
                new_type = "Q4_K"
        elif ftype == "IQ3_XXS":
            new_type = "Q4_K" if n_gqa >= 4 else "IQ3_XXS" if qs.has_imatrix else "IQ3_S"
        elif ftype in ("IQ3_XS", "IQ3_S"):
            if n_gqa >= 4:
                new_type = "Q4_K"
        elif ftype == "IQ3_M":
            new_type = "Q4_K"
        elif ftype in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
            new_type = "Q5_K"
        if is_70b and new_type in ("Q3_K", "Q4_K"):
            new_type = "Q5_K"
        if n_expert_hp == 8:
            new_type = "Q8_0"
        qs.i_attention_wv += 1
    elif cat == "attn_k":
        if n_expert_hp == 8:
            new_type = "Q8_0"
        elif ftype == "IQ3_XS":
            new_type = "IQ3_XXS"
        elif ftype == "IQ3_XXS":
            new_type = "IQ2_S"
    elif cat == "attn_q":
        if ftype == "IQ3_XS":
            new_type = "IQ3_XXS"
        elif ftype == "IQ3_XXS":
            new_type = "IQ2_S"
    elif cat == "ffn_down":
        i_layer, n_layer = _layer_info(name, qs.i_ffn_down, qs.n_layer, n_expert_hp)
        if ftype == "Q2_K_S":
            if i_layer < n_layer // 8:
                new_type = "Q4_K"
        elif ftype == "IQ3_XXS" and not qs.has_imatrix:
            new_type = "Q4_K" if i_layer < n_layer // 8 else "Q3_K"
        elif ftype == "IQ3_M" and (i_layer < n_layer // 8 or (n_expert_hp == 8 and _use_more_bits(i_layer, n_layer))):
            new_type = "Q4_K"
        elif i_layer < n_layer // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not qs.has_imatrix:
            new_type = "Q5_K"
        qs.i_ffn_down += 1
    elif cat == "attn_output":
        if not falcon:
            if n_expert_hp == 8:
                if ftype in _MOE8_ATTN_OUTPUT_Q5_K:
                    new_type = "Q5_K"
            elif ftype == "IQ3_XXS":
                new_type = "IQ3_S"
            elif ftype == "IQ3_M":
                new_type = "Q4_K"
    elif cat in ("ffn_gate", "ffn_up"):
        i = qs.i_ffn_gate if cat == "ffn_gate" else qs.i_ffn_up
        i_layer, n_layer = _layer_info(name, i, qs.n_layer, n_expert_hp)
        if ftype == "IQ3_XS" and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            new_type = "IQ3_XXS"
        if cat == "ffn_gate":
            qs.i_ffn_gate += 1
        else:
            qs.i_ffn_up += 1
    return new_type


def _fallback(new_type: str, ncols: int) -> str:
    """tensor_type_fallback: a row length that does not fit the block size demotes to a 32-block type, else F16."""
    if new_type in _FLOAT_TYPES or ncols % _block(new_type) == 0:
        return new_type
    if new_type not in _FALLBACK and _block(new_type) > 32:
        raise UnsupportedTypeError(f"no tensor type fallback is defined for type {new_type}")
    ret = _FALLBACK.get(new_type, new_type)
    if ncols % _block(ret) != 0:
        ret = "F16"
    return ret


def requires_imatrix(name: str, new_type: str, ftype: str) -> bool:
    """tensor_requires_imatrix: the very low-bit types (and Q2_K in a Q2_K_S file) are garbage without an importance
    matrix, except in token_embd/output (the one rule: quant.imatrix_policy)."""
    return tensor_requires_imatrix(name, new_type, ftype)


def missing_kernels(types: "dict[str, str]") -> list[str]:
    """The planned tensor types quant has no kernel for (sorted): a file type needing one cannot be written."""
    return sorted({t for t in types.values() if t not in QTYPES})


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
                 allow_requantize: bool = False, has_imatrix: bool = False,
                 imatrix_names: "Collection[str] | None" = None) -> dict[str, str]:
    """GGUF tensor name -> ggml type name, exactly as llama.cpp's quantizer chooses them for this file type and
    options (--pure, --output-tensor-type, --token-embedding-type, --tensor-type REGEX=TYPE in order, first match).

    Refuses (CheckpointError) what llama_model_quantize refuses before writing: a tensor whose type needs an
    importance matrix when there is none (or, given `imatrix_names`, none for that tensor), and requantization
    without allow_requantize. Logs llama.cpp's warning when row lengths forced fallback types."""
    mix = get_mix(precision)
    ftype, default_type = mix.name, mix.default_type
    has_imatrix = has_imatrix or imatrix_names is not None
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
    fallbacks: list[str] = []
    by_name = {t.name: t for t in plan.tensors}
    ordered = [by_name[n] for n in llama_quantize_order(names)]
    for t in ordered:  # llama_model_quantize_impl's preliminary loop
        cur = current_type(plan, t)
        cat = _category(t.name)
        ne = _ne(t.shape)
        allowed = allows_quantization(t.name, t.shape, plan.arch)
        if not allowed:
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
                chosen, new_type = new_type, _fallback(new_type, ne[0])
                if chosen not in _FLOAT_TYPES and ne[0] % _block(chosen):
                    fallbacks.append(t.name)
        if not has_imatrix and allowed and requires_imatrix(t.name, new_type, ftype):
            raise ImatrixRequiredError(
                f"{ftype} requires an importance matrix (offending tensor: {t.name}, target type: {new_type}); "
                "pass --imatrix (quantgate imatrix or llama-imatrix makes one)")
        result[t.name] = new_type
    for t in ordered:  # the main loop's checks, before any tensor is quantized
        cur, new_type = current_type(plan, t), result[t.name]
        if new_type == cur:
            continue
        if imatrix_names is not None and t.name not in imatrix_names and requires_imatrix(t.name, new_type, ftype):
            raise ImatrixRequiredError(f"the importance matrix has no entry for tensor {t.name}, which {ftype} quantizes "
                                  f"to {new_type} (garbage without one)")
        if cur not in _FLOAT_TYPES and not allow_requantize:
            raise CheckpointError(
                f"tensor {t.name} is already quantized ({cur}); requantizing to {new_type} is disabled "
                "(pass --allow-requantize to permit it)")
    if fallbacks:
        logger.warning("%d of %d tensor(s) required fallback quantization (e.g. %s)", len(fallbacks), len(names),
                       fallbacks[0])
    return {n: result[n] for n in names}
