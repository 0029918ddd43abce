"""Perturbation deltas through one llama-style decoder block: `block(H + dH; W + dW) - block(H; W)` computed from
the deltas themselves, for the streamed sensitivity measurement (analyzer.stream_measure).

The clean block is run once in float32 and its intermediates kept (`BlockBase`). A perturbation (a delta of the
block input and/or of one or more weights) is then carried through the block as a delta: every matmul is applied
to the *delta* only (`W dx + dW (x + dx)`), in bfloat16 with float32 accumulation (AMX / AVX512-BF16 on CPUs that
have it: ~7x the float32 rate), and every nonlinearity (RMSNorm, rotary embedding, softmax, SiLU-gated MLP) is
evaluated exactly in float32, as `f(x + dx) - f(x)` (RMSNorm from the delta of the mean square, no cancellation).
The rounding of a bfloat16 matmul is relative to its operand, so a delta keeps ~3 significant digits however
small it is; the elementwise differences lose only float32 digits local to one sub-layer, fewer than the plain
difference of two float32 block outputs (docs/ANALYZER.md,
"Delta forward"). Layout: LlamaDecoderLayer (also Qwen2's and Mistral's): input_layernorm -> self_attn
(q/k/v/o_proj, rotary, grouped-query attention) -> residual -> post_attention_layernorm -> mlp (gate/up/down,
act_fn) -> residual.
"""
from __future__ import annotations

from typing import Any

#: block parameter name (relative to the block) -> delta key
PARAMS = {"self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
          "self_attn.o_proj.weight": "o", "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up",
          "mlp.down_proj.weight": "down"}


def supports_layer(layer: Any) -> bool:
    """Whether a loaded decoder block has the layout this module computes deltas for."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = {n for n, _ in layer.named_parameters()}
    allowed = set(PARAMS) | {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.bias",
                             "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias"}
    return (attn is not None and mlp is not None and set(PARAMS) <= names and names <= allowed
            and hasattr(attn, "head_dim") and hasattr(attn, "num_key_value_groups") and hasattr(mlp, "act_fn")
            and hasattr(layer.input_layernorm, "variance_epsilon"))


def _bf16_linear(torch, x, w_bf16):
    """x @ w.T with bfloat16 operands and float32 accumulation, returned as float32."""
    return torch.nn.functional.linear(x.to(torch.bfloat16), w_bf16).float()


def rms_delta(torch, norm, x, dx):
    """norm(x + dx) - norm(x) for an RMSNorm module, without the cancellation of subtracting two outputs."""
    eps = norm.variance_epsilon
    s = x.pow(2).mean(-1, keepdim=True)
    ds = (2 * x * dx + dx * dx).mean(-1, keepdim=True)
    a, b = torch.sqrt(s + eps), torch.sqrt(s + ds + eps)
    r, r2 = 1 / a, 1 / b
    dr = -r * r2 * ds / (a + b)
    return norm.weight * (dx * r2 + x * dr)


class BlockBase:
    """The clean block on hidden states h (batch, tokens, hidden), float32, with the intermediates every delta
    needs. `cos, sin`: the rotary embeddings of the positions; `window`: sliding-window size or None."""

    def __init__(self, torch, layer: Any, h, cos, sin, window: int | None = None) -> None:
        self.torch, self.layer = torch, layer
        attn, mlp = layer.self_attn, layer.mlp
        self.attn, self.mlp = attn, mlp
        b, t, _ = h.shape
        self.shape_heads = (t, -1, attn.head_dim)
        self.cos, self.sin = cos, sin
        self.groups = int(attn.num_key_value_groups)
        self.scaling = float(attn.scaling)
        self.w = {k: dict(layer.named_parameters())[p].detach().to(torch.bfloat16) for p, k in PARAMS.items()}
        self.h = h
        self.n1 = layer.input_layernorm(h)
        q = self._heads(attn.q_proj(self.n1))
        k = self._heads(attn.k_proj(self.n1))
        self.v = self._heads(attn.v_proj(self.n1))
        self.qr, self.kr = self._rope(q), self._rope(k)
        i = torch.arange(t)
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed &= i[None, :] > i[:, None] - int(window)
        self.mask = torch.zeros(t, t).masked_fill(~allowed, float("-inf"))
        self.p = self._probs(self.qr, self.kr)                 # (b, heads, t, t)
        self.ctx = self._merge(self.p @ self._rep(self.v))
        self.h1 = h + attn.o_proj(self.ctx)
        self.n2 = layer.post_attention_layernorm(self.h1)
        self.g, self.u = mlp.gate_proj(self.n2), mlp.up_proj(self.n2)
        self.a = mlp.act_fn(self.g)
        self.m = self.a * self.u

    # -- pieces ---------------------------------------------------------------------------------------------
    def _heads(self, x):
        return x.reshape(*x.shape[:-2], *self.shape_heads).transpose(-2, -3)   # (..., heads, t, d)

    def _merge(self, x):
        x = x.transpose(-2, -3)
        return x.reshape(*x.shape[:-2], -1)

    def _rep(self, x):
        return x if self.groups == 1 else x.repeat_interleave(self.groups, dim=-3)

    def _rope(self, x):
        half = x.shape[-1] // 2
        rot = self.torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        cos, sin = self.cos.unsqueeze(-3), self.sin.unsqueeze(-3)
        return x * cos + rot * sin

    def _probs(self, qr, kr):
        s = (qr @ self._rep(kr).transpose(-1, -2)) * self.scaling + self.mask
        return self.torch.softmax(s, dim=-1)

    def _lin(self, x, key: str, dw: dict[str, Any], x_full):
        """W dx + dW x_full (either part absent when its delta is)."""
        out = _bf16_linear(self.torch, x, self.w[key]) if x is not None else None
        if key in dw:
            part = _bf16_linear(self.torch, x_full, dw[key])
            out = part if out is None else out + part
        return out

    # -- the delta ------------------------------------------------------------------------------------------
    def delta(self, dh=None, dw: dict[str, Any] | None = None):
        """block(h + dh; W + dw) - block(h; W), float32. `dh`: (..., batch, tokens, hidden) or None; `dw`: delta key
        ('q', 'k', 'v', 'o', 'gate', 'up', 'down') -> bfloat16 weight delta. Leading axes of dh broadcast (several
        perturbed streams at once)."""
        torch = self.torch
        dw = dw or {}
        dn1 = rms_delta(torch, self.layer.input_layernorm, self.h, dh) if dh is not None else None
        n1f = self.n1 if dn1 is None else self.n1 + dn1
        dq, dk, dv = (self._lin(dn1, key, dw, n1f) for key in ("q", "k", "v"))
        dctx = None
        if dq is not None or dk is not None or dv is not None:
            qr = self.qr if dq is None else self.qr + self._rope(self._heads(dq))
            kr = self.kr if dk is None else self.kr + self._rope(self._heads(dk))
            p2 = self.p if dq is None and dk is None else self._probs(qr, kr)
            v2 = self.v if dv is None else self.v + self._heads(dv)
            d = (p2 - self.p) @ self._rep(v2) if p2 is not self.p else 0
            if dv is not None:
                d = d + self.p @ self._rep(self._heads(dv))
            dctx = self._merge(d)
        ctxf = self.ctx if dctx is None else self.ctx + dctx
        da = self._lin(dctx, "o", dw, ctxf)
        dh1 = dh if da is None else (da if dh is None else dh + da)
        dn2 = rms_delta(torch, self.layer.post_attention_layernorm, self.h1, dh1) if dh1 is not None else None
        n2f = self.n2 if dn2 is None else self.n2 + dn2
        dg, du = self._lin(dn2, "gate", dw, n2f), self._lin(dn2, "up", dw, n2f)
        dm = None
        if dg is not None or du is not None:
            uf = self.u if du is None else self.u + du
            dm = 0
            if dg is not None:
                dm = (self.mlp.act_fn(self.g + dg) - self.a) * uf
            if du is not None:
                dm = dm + self.a * du
        mf = self.m if dm is None else self.m + dm
        df = self._lin(dm, "down", dw, mf)
        if df is None:
            return dh1
        return df if dh1 is None else dh1 + df
