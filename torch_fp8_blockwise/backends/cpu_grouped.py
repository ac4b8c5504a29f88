"""CPU backend of the grouped (MoE) ops: one fp32 GEMM per group on its contiguous row range.

Same idea as ``cpu.blockwise_matmul`` (module docstring there): dequantizing both operands to fp32
and multiplying once equals the per-block scaled sum up to fp32 rounding order, because every scale
is constant inside the block it multiplies. Activation quantization is vectorized over all rows at
once; the loop runs over groups (G iterations, one GEMM each), never over rows. Reading
group_sizes here is free (CPU), so the row ranges are plain Python slices.

tgmm: x and dy are quantized per (block_m rows x 1 column) over the whole array, i.e. at absolute
row offsets, then dequantized element-wise in fp32 (``q * scale`` rounds once), so a block that
straddles a group boundary contributes the same scale to both groups' sums; then
``out[g] = xd[rows_g].T @ dyd[rows_g]``.

Canonical signatures and semantics: :mod:`torch_fp8_blockwise.reference`.
"""

from __future__ import annotations

import torch

from ..reference import group_bounds
from .cpu import _dequantize_f32, _dequantize_weight, _quantize_f32


def _row_ranges(group_sizes: torch.Tensor, m: int) -> list[tuple[int, int, int]]:
    """(group, start, end) of every non-empty group, clipped to [0, m)."""
    starts, ends = group_bounds(group_sizes, m)
    pairs = zip(starts.tolist(), ends.tolist(), strict=True)
    return [(g, s, e) for g, (s, e) in enumerate(pairs) if e > s]


def _activation_f32(x: torch.Tensor, x_scale: torch.Tensor | None, bk: int, activation: str) -> torch.Tensor:
    """x [M, K] as the float32 operand of the GEMM (the rule of cpu.blockwise_matmul)."""
    if x_scale is not None:
        return _dequantize_f32(x[None], x_scale[None], (1, bk))[0]
    if activation == "dynamic":
        xq, xs = _quantize_f32(x[None], (1, bk), torch.float8_e4m3fn, "fp32")
        return _dequantize_f32(xq.to(torch.float8_e4m3fn), xs, (1, bk))[0]
    return x.float()


def grouped_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    group_sizes: torch.Tensor,
    block_shape: tuple[int, int],
    x_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str,
) -> torch.Tensor:
    m = x.shape[0]
    ranges = _row_ranges(group_sizes, m)
    y = torch.zeros(m, w.shape[1], dtype=out_dtype)
    if not ranges:
        return y
    lo, hi = ranges[0][1], ranges[-1][2]  # rows outside [lo, hi) belong to no group
    xd = _activation_f32(x[lo:hi], None if x_scale is None else x_scale[lo:hi], block_shape[1], activation)
    for g, s, e in ranges:
        wd = _dequantize_weight(w[g], w_scale[g], block_shape)
        y[s:e] = (xd[s - lo : e - lo] @ wd.T).to(out_dtype)
    return y


def _columns_f32(t: torch.Tensor, block_m: int) -> torch.Tensor:
    """[M, C] -> float32 [M, C] quantized per (block_m x 1) block to e4m3fn and dequantized."""
    q, scale = _quantize_f32(t[None], (block_m, 1), torch.float8_e4m3fn, "fp32")
    return _dequantize_f32(q.to(torch.float8_e4m3fn), scale, (block_m, 1))[0]


def grouped_matmul_transposed(
    x: torch.Tensor,
    dy: torch.Tensor,
    group_sizes: torch.Tensor,
    block_m: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    out = torch.zeros(group_sizes.shape[0], x.shape[1], dy.shape[1], dtype=out_dtype)
    ranges = _row_ranges(group_sizes, x.shape[0])
    if not ranges:
        return out
    xd, dd = _columns_f32(x, block_m), _columns_f32(dy, block_m)
    for g, s, e in ranges:
        out[g] = (xd[s:e].T @ dd[s:e]).to(out_dtype)
    return out
