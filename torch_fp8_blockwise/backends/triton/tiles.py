"""@triton.jit pieces shared by the GEMM kernels (blockwise_matmul.py, mxfp8.py): tile order,
split-K ranges and the epilogue (bias, swap-AB layout, split-K atomics)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid``: GROUP_M row-tiles share each weight column-tile while it
    is in L2 (weights are the big operand)."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def split_k_range(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """[begin, end) K tiles of split ``pid_k``."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    begin = pid_k * per_split
    return begin, tl.minimum(begin + per_split, k_tiles)


@triton.jit
def store_tile(
    acc,
    y_ptr,
    bias_ptr,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    stride_ym,
    pid_k,
    SPLIT_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Add bias (split 0 only) and write the fp32 tile: [BLOCK_N, BLOCK_M] when SWAP_AB, else
    [BLOCK_M, BLOCK_N]; atomics into a zeroed fp32 buffer when SPLIT_K > 1, else a cast store."""
    if SWAP_AB:
        y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
        y_mask = mask_n[:, None] & mask_m[None, :]
    else:
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        y_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            bias = tl.where(pid_k == 0, bias, 0.0)  # split 0 adds it; the others add partials only
        if SWAP_AB:
            acc += bias[:, None]
        else:
            acc += bias[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
