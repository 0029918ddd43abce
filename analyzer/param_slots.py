"""Where each GGUF weight lives in an instantiated transformers model: a whole 2-D parameter, or a row range of
transformers 5's fused MoE expert parameters (one job: the name map the analyzer reads and perturbs through).

Dense and shared-expert matmuls are 2-D parameters, mapped by gguf's TensorNameMap. The fused experts of a MoE
block (Mixtral, Qwen2-MoE, Qwen3-MoE: `mlp.experts.gate_up_proj` (n_expert, 2*ff, n_embd) = gate rows then up
rows, `mlp.experts.down_proj` (n_expert, n_embd, ff); runtime.backends.torch_backend.runtime_layout) hold the
three GGUF tensors llama.cpp's converter stacks: `ffn_gate_exps` = gate_up_proj[:, :ff], `ffn_up_exps` =
gate_up_proj[:, ff:], `ffn_down_exps` = down_proj, each (n_expert, rows, cols) as the GGUF stores it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

#: module name -> its decoder block index
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class ParamSlot:
    """The part of a transformers parameter holding one GGUF tensor: all of it (`rows` None) or, for a fused
    expert parameter (n_expert, rows, cols), the row range `rows` of every expert."""

    param: Any
    rows: slice | None = None

    def read(self) -> np.ndarray:
        """The GGUF tensor's float32 values in the GGUF (numpy-order) layout."""
        t = self.param.detach()
        if self.rows is not None:
            t = t[:, self.rows, :]
        return np.ascontiguousarray(t.float().numpy())

    def write(self, value: np.ndarray) -> None:
        """Set the slot to `value` (same shape as read() returns)."""
        import torch

        with torch.no_grad():
            v = torch.from_numpy(np.ascontiguousarray(value)).to(self.param.dtype)
            if self.rows is None:
                self.param.data.copy_(v)
            else:
                self.param.data[:, self.rows, :].copy_(v)


def is_experts_module(mod: Any) -> bool:
    """A transformers 5 fused-experts module: 3-D gate_up_proj and down_proj parameters."""
    gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    return getattr(gu, "ndim", 0) == 3 and getattr(dn, "ndim", 0) == 3


def experts_modules(model: Any) -> dict[int, Any]:
    """Block index -> the fused-experts module of that block's MoE feed-forward."""
    out = {}
    for name, mod in model.named_modules():
        m = _LAYER.search(name + ".")
        if m is not None and is_experts_module(mod):
            out[int(m.group(1))] = mod
    return out


def expert_gguf_names(i: int) -> dict[str, tuple[str, int | None]]:
    """GGUF name -> (fused parameter, half of its rows: 0 gate, 1 up, None all) of block i's experts."""
    return {f"blk.{i}.ffn_gate_exps.weight": ("gate_up_proj", 0), f"blk.{i}.ffn_up_exps.weight": ("gate_up_proj", 1),
            f"blk.{i}.ffn_down_exps.weight": ("down_proj", None)}


def param_slots(model: Any, arch: str) -> dict[str, ParamSlot]:
    """GGUF tensor name -> its slot, for every 2-D parameter gguf's TensorNameMap names (arch = GGUF
    architecture) and every fused expert tensor."""
    import gguf

    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    name_map = gguf.get_tensor_name_map(archs[arch], int(model.config.num_hidden_layers))
    out: dict[str, ParamSlot] = {}
    for pname, p in model.named_parameters():
        if p.ndim == 2:
            g = name_map.get_name(key=pname, try_suffixes=(".weight", ".bias"))
            if g is not None:
                out[g] = ParamSlot(p)
    for i, mod in experts_modules(model).items():
        ff = int(mod.down_proj.shape[-1])
        for g, (attr, half) in expert_gguf_names(i).items():
            rows = None if half is None else slice(half * ff, (half + 1) * ff)
            out[g] = ParamSlot(getattr(mod, attr), rows)
    return out


def router_modules(model: Any, arch: str) -> dict[str, Any]:
    """GGUF name (blk.N.ffn_gate_inp.weight) -> the router module of a MoE block (a module that is not an
    nn.Linear but multiplies its input by a 2-D `weight`: transformers 5's *TopKRouter)."""
    import gguf
    import torch

    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    name_map = gguf.get_tensor_name_map(archs[arch], int(model.config.num_hidden_layers))
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) or getattr(w, "ndim", 0) != 2:
            continue
        g = name_map.get_name(key=f"{name}.weight", try_suffixes=(".weight",))
        if g is not None and g.endswith(".ffn_gate_inp.weight"):
            out[g] = mod
    return out
