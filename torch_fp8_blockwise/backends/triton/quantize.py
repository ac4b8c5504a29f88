"""Block-wise FP8 quantize / dequantize kernels and their launchers.

Three kernels, each reading its input once (bandwidth-bound by construction):

* :func:`_group_quant_kernel`: 1 x G groups along the last dim (activations: G = bk = 128 for
  DeepSeek, G = 32 for MXFP8). One program quantizes a [ROWS, G] tile: amax per row, scale, divide,
  store. ROWS * G = 4096 elements per program, so each of 128 threads holds 32 fp32 values and the
  loads are 16-byte vectors.
* :func:`_block_quant_kernel`: br x bc weight blocks (128..512 squared). One program per block.
  A block of <= 16384 elements (DeepSeek's 128 x 128) is quantized in one pass from registers;
  a larger one (a 512 x 512 fp32 block is 1 MB) is walked in CHUNK-row slices twice (amax, then
  quantize): x is read twice, which costs nothing that matters for a one-off weight conversion.
* :func:`_dequant_kernel`: q * scale broadcast over blocks.

Numerics (reference.py): amax over finite |x| only, scale = max(amax, 1e-10) / fp8_max,
ue8m0 = the float32 bit trick of formats.round_scale_ue8m0, q = clamp(x / scale) with an
IEEE-rounded division (tl.math.div_rn, so a GPU result matches torch bit for bit) and a clamp that
keeps nan (propagate_nan=ALL: PTX max.f32 would otherwise turn nan into -fp8_max).

Interpreter note (shared/NOTES.md, triton#8322): the CPU interpreter rounds fp32 -> fp8 and
fp32 -> bf16 casts wrongly (31.6 -> 16, 464 -> nan). Under TRITON_INTERPRET=1 the launchers make
the kernels store float32 (values already on the fp8 grid's scale, before the final rounding) and
cast with torch, so tests check the kernels' amax/scale/divide/clamp logic bit for bit; the
in-kernel cast itself is checked by offline compilation only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats import SCALE_EPS, fp8_max
from .configs import interpreting

#: Elements per program of the group kernel (4096 fp32 = 32 registers per thread at 4 warps).
GROUP_TILE_ELEMS = 4096
#: Rows per slice of the block kernel (64 x 512 fp32 = 128 KB of registers at 8 warps: 64 regs/thread).
BLOCK_CHUNK_ELEMS = 16384


@triton.jit
def _scale_from_amax(amax, FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr):
    scale = tl.maximum(amax, EPS) / FP8_MAX
    if UE8M0:
        # 2**ceil(log2(scale)) exactly: +0x7FFFFF carries into the exponent iff mantissa != 0.
        bits = scale.to(tl.int32, bitcast=True)
        scale = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _finite_abs(x):
    mag = tl.abs(x)
    return tl.where(mag < float("inf"), mag, 0.0)  # nan < inf is False: nan and inf count as 0


@triton.jit
def _quant_values(x, scale, FP8_MAX: tl.constexpr):
    q = tl.math.div_rn(x, scale)
    q = tl.maximum(q, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(q, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _group_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    rows,
    cols,
    stride_x,
    stride_q,
    stride_s,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    EPS: tl.constexpr,
    UE8M0: tl.constexpr,
    SCALE_E8M0_BITS: tl.constexpr,
):
    """x [rows, cols] (stride_x between rows, unit stride along cols) -> q [rows, cols] and
    s [rows, cdiv(cols, GROUP)]: float32 multipliers, or (SCALE_E8M0_BITS) uint8 exponent bits."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    g = tl.program_id(1)
    c = g * GROUP + tl.arange(0, GROUP)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    r64 = r.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = _scale_from_amax(tl.max(_finite_abs(x), axis=1), FP8_MAX, EPS, UE8M0)
    q = _quant_values(x, scale[:, None], FP8_MAX)
    tl.store(q_ptr + r64[:, None] * stride_q + c[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    if SCALE_E8M0_BITS:
        bits = (scale.to(tl.int32, bitcast=True) >> 23) & 0xFF
        tl.store(s_ptr + r64 * stride_s + g, bits.to(tl.uint8), mask=r < rows)
    else:
        tl.store(s_ptr + r64 * stride_s + g, scale, mask=r < rows)


@triton.jit
def _block_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    rows,
    cols,
    stride_xb,
    stride_xr,
    stride_qb,
    stride_qr,
    stride_sb,
    stride_sr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    CHUNK: tl.constexpr,
    FP8_MAX: tl.constexpr,
    EPS: tl.constexpr,
    UE8M0: tl.constexpr,
):
    """x [B, rows, cols] -> q [B, rows, cols], s [B, cdiv(rows, BR), cdiv(cols, BC)] float32.
    Program (rb, cb, b) owns block (rb, cb) of batch b."""
    rb, cb, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = cb * BC + tl.arange(0, BC)
    x_base = x_ptr + b.to(tl.int64) * stride_xb
    q_base = q_ptr + b.to(tl.int64) * stride_qb
    if CHUNK == BR:
        # The whole block fits in registers (128 x 128: 64 fp32 per thread at 8 warps): one pass.
        r = rb * BR + tl.arange(0, BR)
        mask = (r < rows)[:, None] & (c < cols)[None, :]
        x = tl.load(x_base + r.to(tl.int64)[:, None] * stride_xr + c[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        scale = _scale_from_amax(tl.max(tl.max(_finite_abs(x), axis=1), axis=0), FP8_MAX, EPS, UE8M0)
        q = _quant_values(x, scale, FP8_MAX)
        tl.store(
            q_base + r.to(tl.int64)[:, None] * stride_qr + c[None, :], q.to(q_ptr.dtype.element_ty), mask=mask
        )
    else:
        # Larger blocks: amax over CHUNK-row slices, then quantize them (x is read twice).
        amax = tl.zeros([CHUNK], dtype=tl.float32)
        for r0 in range(0, BR, CHUNK):
            r = rb * BR + r0 + tl.arange(0, CHUNK)
            mask = (r < rows)[:, None] & (c < cols)[None, :]
            x = tl.load(x_base + r.to(tl.int64)[:, None] * stride_xr + c[None, :], mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.max(_finite_abs(x.to(tl.float32)), axis=1))
        scale = _scale_from_amax(tl.max(amax, axis=0), FP8_MAX, EPS, UE8M0)
        for r0 in range(0, BR, CHUNK):
            r = rb * BR + r0 + tl.arange(0, CHUNK)
            mask = (r < rows)[:, None] & (c < cols)[None, :]
            x = tl.load(x_base + r.to(tl.int64)[:, None] * stride_xr + c[None, :], mask=mask, other=0.0)
            q = _quant_values(x.to(tl.float32), scale, FP8_MAX)
            tl.store(
                q_base + r.to(tl.int64)[:, None] * stride_qr + c[None, :],
                q.to(q_ptr.dtype.element_ty),
                mask=mask,
            )
    tl.store(s_ptr + b.to(tl.int64) * stride_sb + rb * stride_sr + cb, scale)


@triton.jit
def _dequant_kernel(
    q_ptr,
    s_ptr,
    y_ptr,
    rows,
    cols,
    stride_qb,
    stride_qr,
    stride_sb,
    stride_sr,
    stride_yb,
    stride_yr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
):
    """q [B, rows, cols] fp8, s [B, cdiv(rows, BR), cdiv(cols, BC)] f32 -> y = q * s (broadcast).

    TILE_C divides BC (128 | 128, 256, 512), so a tile lies in one column of scale blocks: one
    scale per tile row, loaded as a vector instead of gathered per element.
    """
    r = tl.program_id(0) * TILE_R + tl.arange(0, TILE_R)
    c = tl.program_id(1) * TILE_C + tl.arange(0, TILE_C)
    b = tl.program_id(2).to(tl.int64)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    r64 = r.to(tl.int64)
    q = tl.load(q_ptr + b * stride_qb + r64[:, None] * stride_qr + c[None, :], mask=mask, other=0.0)
    s_col = (tl.program_id(1) * TILE_C) // BC
    s = tl.load(s_ptr + b * stride_sb + (r // BR) * stride_sr + s_col, mask=r < rows, other=0.0)[:, None]
    y = q.to(tl.float32) * s
    tl.store(
        y_ptr + b * stride_yb + r64[:, None] * stride_yr + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask
    )


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the kernel stores: float32 under the interpreter for fp8/bf16 (its casts are wrong)."""
    if interpreting() and dtype != torch.float32 and dtype != torch.float16:
        return torch.float32
    return dtype


def group_quantize(
    x: torch.Tensor, group: int, dtype: torch.dtype, scale_format: str, e8m0_bits: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row groups of ``group`` columns.

    Args:
        x: [R, C] bfloat16/float16/float32, unit stride along C (rows may be strided).
        group: 32 (MX), 128, 256 or 512.
        dtype: float8_e4m3fn or float8_e5m2.
        scale_format: "fp32" or "ue8m0".
        e8m0_bits: return the scales as uint8 E8M0 bits (MX layout) instead of float32.

    Returns: q [R, C] ``dtype`` contiguous; scale [R, cdiv(C, group)] float32 (or uint8), row-major.
    """
    rows, cols = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    groups = -(-cols // group)
    q = torch.empty((rows, cols), dtype=_store_dtype(dtype), device=x.device)
    s = torch.empty((rows, groups), dtype=torch.uint8 if e8m0_bits else torch.float32, device=x.device)
    tile_rows = max(1, min(GROUP_TILE_ELEMS // group, triton.next_power_of_2(rows)))
    grid = (triton.cdiv(rows, tile_rows), groups)
    _group_quant_kernel[grid](
        x, q, s, rows, cols, x.stride(0), q.stride(0), s.stride(0),
        GROUP=group, ROWS=tile_rows, FP8_MAX=fp8_max(dtype), EPS=SCALE_EPS,
        UE8M0=scale_format == "ue8m0" or e8m0_bits, SCALE_E8M0_BITS=e8m0_bits,
        num_warps=4,
    )  # fmt: skip
    return q.to(dtype), s


def block_quantize(
    x: torch.Tensor, block_shape: tuple[int, int], dtype: torch.dtype, scale_format: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, R, C] -> (q [B, R, C] ``dtype``, scale [B, cdiv(R, br), cdiv(C, bc)] float32)."""
    br, bc = block_shape
    b, rows, cols = x.shape
    if br == 1:
        q, s = group_quantize(x.reshape(b * rows, cols), bc, dtype, scale_format)
        return q.reshape(b, rows, cols), s.reshape(b, rows, -1)
    if x.stride(2) != 1:
        x = x.contiguous()
    q = torch.empty((b, rows, cols), dtype=_store_dtype(dtype), device=x.device)
    s = torch.empty((b, -(-rows // br), -(-cols // bc)), dtype=torch.float32, device=x.device)
    chunk = min(br, BLOCK_CHUNK_ELEMS // bc)
    _block_quant_kernel[(s.shape[1], s.shape[2], b)](
        x, q, s, rows, cols, x.stride(0), x.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
        BR=br, BC=bc, CHUNK=chunk, FP8_MAX=fp8_max(dtype), EPS=SCALE_EPS, UE8M0=scale_format == "ue8m0",
        num_warps=8,
    )  # fmt: skip
    return q.to(dtype), s


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, block_shape: tuple[int, int], out_dtype: torch.dtype
) -> torch.Tensor:
    """q [B, R, C] fp8, scale [B, RB, CB] float32 -> [B, R, C] ``out_dtype``."""
    b, rows, cols = q.shape
    if q.stride(2) != 1:
        q = q.contiguous()
    y = torch.empty((b, rows, cols), dtype=_store_dtype(out_dtype), device=q.device)
    dequantize_into(q, scale, block_shape, y)
    return y.to(out_dtype)


def dequantize_into(
    q: torch.Tensor, scale: torch.Tensor, block_shape: tuple[int, int], y: torch.Tensor
) -> None:
    """y[...] = q * scale (broadcast over (br, bc) blocks), written in place.

    q [B, R, C] fp8 and y [B, R, C] (any float dtype), both with unit stride along C (rows and
    batches may be strided, e.g. a row panel of a larger weight); scale [B, cdiv(R, br), cdiv(C, bc)]
    float32 whose row 0 is the block of q's row 0.
    """
    br, bc = block_shape
    b, rows, cols = q.shape
    tile_r, tile_c = 32, 128
    grid = (triton.cdiv(rows, tile_r), triton.cdiv(cols, tile_c), b)
    _dequant_kernel[grid](
        q, scale, y, rows, cols, q.stride(0), q.stride(1), scale.stride(0), scale.stride(1),
        y.stride(0), y.stride(1), BR=br, BC=bc, TILE_R=tile_r, TILE_C=tile_c, num_warps=4,
    )  # fmt: skip
