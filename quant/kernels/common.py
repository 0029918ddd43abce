"""Scalar helpers shared by the ggml kernels: ggml's `nearest_int` and its software fp16 conversions, bit-exact.

Every function is numba `@njit(cache=True, error_model="numpy")` without fastmath so float32 arithmetic stays IEEE single, as in C.
`nearest_int` and `fp32_to_fp16_bits` accept float32 only: passing a float64 (an accidental promotion in the caller)
is a typing error at compile time instead of a silent mismatch with ggml.
"""
# ruff: noqa: PLR1730  -- C's `if (a > b) b = a` kept literally: min()/max() differ on NaN/-0.0
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import errors
from numba.extending import intrinsic


@intrinsic
def f32_as_i32(typingctx, f):
    """Reinterpret the bits of a float32 as int32 (C's memcpy/union pun)."""
    if f != types.float32:
        raise errors.TypingError(f"f32_as_i32 needs float32, got {f}")

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def u32_as_f32(typingctx, u):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(u, types.Integer):
        raise errors.TypingError(f"u32_as_f32 needs an integer, got {u}")

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif v.type.width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(u), codegen


@njit(cache=True, error_model="numpy")
def nearest_int(fval):
    """ggml's nearest_int: round float32 to int via the 1.5*2^23 magic-add bit trick (literal port, no range check)."""
    val = fval + np.float32(12582912.0)
    i = np.int64(f32_as_i32(val))
    return (i & 0x007FFFFF) - 0x00400000


@njit(cache=True, error_model="numpy")
def fp32_to_fp16_bits(f):
    """GGML_FP32_TO_FP16 as compiled in ggml-base on x86-64 (ggml_compute_fp32_to_fp16, the software path)."""
    scale_to_inf = np.float32(5.192296858534828e33)  # 0x1.0p+112f
    scale_to_zero = np.float32(7.703719777548943e-34)  # 0x1.0p-110f
    base = (abs(f) * scale_to_inf) * scale_to_zero

    w = np.int64(f32_as_i32(f)) & 0xFFFFFFFF
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000

    base = u32_as_f32((bias >> 1) + 0x07800000) + base
    bits = np.int64(f32_as_i32(base)) & 0xFFFFFFFF
    exp_bits = (bits >> 13) & 0x00007C00
    mantissa_bits = bits & 0x00000FFF
    nonsign = exp_bits + mantissa_bits
    if shl1_w > 0xFF000000:
        res = (sign >> 16) | 0x7E00
    else:
        res = (sign >> 16) | nonsign
    return np.uint16(res & 0xFFFF)


@njit(cache=True, error_model="numpy")
def fp16_bits_to_fp32(h):
    """GGML_FP16_TO_FP32 (ggml_compute_fp16_to_fp32, the software path) on raw half bits."""
    w = (np.int64(h) & 0xFFFF) << 16
    sign = w & 0x80000000
    two_w = (w + w) & 0xFFFFFFFF

    exp_offset = 0xE0 << 23
    exp_scale = np.float32(1.925929944387236e-34)  # 0x1.0p-112f
    normalized_value = u32_as_f32((two_w >> 4) + exp_offset) * exp_scale

    magic_mask = 126 << 23
    magic_bias = np.float32(0.5)
    denormalized_value = u32_as_f32((two_w >> 17) | magic_mask) - magic_bias

    denormalized_cutoff = 1 << 27
    if two_w < denormalized_cutoff:
        r = sign | (np.int64(f32_as_i32(denormalized_value)) & 0xFFFFFFFF)
    else:
        r = sign | (np.int64(f32_as_i32(normalized_value)) & 0xFFFFFFFF)
    return u32_as_f32(r)


@njit(cache=True, error_model="numpy")
def to_u8(v):
    """C conversion of an int to uint8_t (wraps mod 256)."""
    return v & 0xFF


@njit(cache=True, error_model="numpy")
def to_i8(v):
    """C conversion of an int to int8_t (wraps mod 256 into [-128, 127], as GCC does)."""
    return ((v + 128) & 0xFF) - 128


@njit(cache=True, error_model="numpy")
def put_fp16(out, off, f):
    """Store float32 `f` as little-endian ggml_half at out[off:off+2]; returns the stored bits."""
    h = np.int64(fp32_to_fp16_bits(f))
    out[off] = h & 0xFF
    out[off + 1] = (h >> 8) & 0xFF
    return h


@njit(cache=True, error_model="numpy")
def get_fp16(buf, off):
    """Read the little-endian ggml_half at buf[off:off+2] as float32 (GGML_FP16_TO_FP32)."""
    h = np.int64(buf[off]) | (np.int64(buf[off + 1]) << 8)
    return fp16_bits_to_fp32(h)
