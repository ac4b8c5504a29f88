"""Block-wise FP8 GEMM (W8A8 and W8A16, DeepSeek layout): one Triton kernel and its launcher.

Operands (canonical arguments, see reference.py):

* x [M, K] row-major: fp8 (W8A8) or bfloat16/float16/float32 (W8A16).
* x_scale [M, cdiv(K, bk)] float32 (W8A8 only): one multiplier per token and K block.
* w [N, K] fp8 row-major (out_features, in_features); w_scale [cdiv(N, bn), cdiv(K, bk)] float32.

Per K tile (block_k divides bk, enforced by GemmConfig.for_problem, so a tile never straddles two
scale blocks), W8A8 computes an fp8 x fp8 tensor-core product with fp32 accumulation and promotes
it into the fp32 accumulator with the tile's scales: ``acc += dot(xq, wq.T) * xs[m] * ws[n]``
(DeepGEMM's "promotion": the fp8 MMA's internal accumulator is only ~14 bits on Hopper, so a
long-K sum must not stay inside it). W8A16 converts the fp8 weight tile to x's dtype in registers
(exact: every e4m3/e5m2 value is a bf16/fp16 value) and scales the product per column; the
dequantized weight never exists in global memory.

``swap_ab`` (decode, M <= 64) computes ``w_tile @ x_tile.T`` so N fills the 64-row side of the
MMA; ``split_k`` adds fp32 partials of K ranges with atomics. Masks cover all M, N, K edges
(masked loads read 0, so ragged blocks behave as zero-padded).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .configs import GemmConfig
from .quantize import group_quantize
from .tiles import grouped_tile, split_k_range, store_tile


@triton.jit
def _blockwise_gemm_kernel(
    x_ptr,
    w_ptr,
    xs_ptr,
    ws_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_xsm,
    stride_wsn,
    stride_ym,
    SCALE_BN: tl.constexpr,
    SCALE_BK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    W8A16: tl.constexpr,
    IEEE_F32: tl.constexpr,
    DOT_F32: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """y[M, N] (= or += when SPLIT_K > 1) sum_kb (x[:, kb] @ w[:, kb].T) * xs[:, kb] * ws[n // SCALE_BN, kb].

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K). DOT_F32 widens operands to fp32 before
    tl.dot (only under the interpreter, whose bf16 dot multiplies raw bits); IEEE_F32 asks for a
    true fp32 dot (W8A16 with fp32 x), not tf32.
    """
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    xs_rows = xs_ptr + offs_m * stride_xsm
    ws_rows = ws_ptr + (offs_n // SCALE_BN) * stride_wsn

    t_begin, t_end = split_k_range(pid_k, K, BLOCK_K, SPLIT_K)

    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(t_begin, t_end):
        k = t * BLOCK_K + offs_k
        mask_k = k < K
        a = tl.load(x_rows + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        kb = (t * BLOCK_K) // SCALE_BK
        ws = tl.load(ws_rows + kb, mask=mask_n, other=0.0)
        if W8A16:
            b = b.to(a.dtype)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if SWAP_AB:
            if IEEE_F32:
                part = tl.dot(b, tl.trans(a), input_precision="ieee")
            else:
                part = tl.dot(b, tl.trans(a))
            if W8A16:
                acc += part * ws[:, None]
            else:
                xs = tl.load(xs_rows + kb, mask=mask_m, other=0.0)
                # x's scale first, as the reference and the unswapped tile: the order decides
                # between finite and inf at fp32's edge, so it must not depend on SWAP_AB (i.e. M).
                acc += part * xs[None, :] * ws[:, None]
        else:
            if IEEE_F32:
                part = tl.dot(a, tl.trans(b), input_precision="ieee")
            else:
                part = tl.dot(a, tl.trans(b))
            if W8A16:
                acc += part * ws[None, :]
            else:
                xs = tl.load(xs_rows + kb, mask=mask_m, other=0.0)
                acc += part * xs[:, None] * ws[None, :]

    store_tile(
        acc, y_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, pid_k, SPLIT_K, SWAP_AB, HAS_BIAS
    )


def launch_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    block_shape: tuple[int, int],
    x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    cfg: GemmConfig,
) -> torch.Tensor:
    """Run the kernel with a fixed config (tests and the tuner call this directly).

    x [M, K] (fp8 with x_scale [M, cdiv(K, bk)] f32, or high precision with x_scale None = W8A16),
    w [N, K] fp8, w_scale [cdiv(N, bn), cdiv(K, bk)] f32, bias [N] or None -> y [M, N] out_dtype.
    """
    bn, bk = block_shape
    m, k = x.shape
    n = w.shape[0]
    cfg = cfg.for_problem(bk, k)
    if x.stride(1) != 1:
        x = x.contiguous()
    w8a16 = x_scale is None
    # split-K accumulates with fp32 atomics; the interpreter rounds bf16 stores wrongly (NOTES.md).
    direct = cfg.split_k == 1 and (out_dtype in (torch.float32, torch.float16) or not configs.interpreting())
    y = (torch.empty if cfg.split_k == 1 else torch.zeros)(
        (m, n), dtype=out_dtype if direct else torch.float32, device=x.device
    )
    dot_f32 = configs.interpreting() and x.dtype == torch.bfloat16
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    _blockwise_gemm_kernel[grid](
        x, w, x_scale if x_scale is not None else w_scale, w_scale, bias if bias is not None else w_scale, y,
        m, n, k, x.stride(0), w.stride(0), x_scale.stride(0) if x_scale is not None else 0, w_scale.stride(0),
        y.stride(0),
        SCALE_BN=bn, SCALE_BK=bk, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, SPLIT_K=cfg.split_k, SWAP_AB=cfg.swap_ab, W8A16=w8a16,
        IEEE_F32=x.dtype == torch.float32, DOT_F32=dot_f32, HAS_BIAS=bias is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y if y.dtype == out_dtype else y.to(out_dtype)


def blockwise_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    block_shape: tuple[int, int],
    x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Canonical blockwise_matmul (reference.py): y [M, N] ``out_dtype``.

    activation "dynamic" with high-precision x: quantize x per 1 x bk group to e4m3fn with fp32
    scales (group kernel, one pass), then the W8A8 kernel. "none": the W8A16 kernel on x as is.
    ``config`` overrides the table/heuristic choice (tests, tuner).
    """
    bk = block_shape[1]
    if x_scale is None and activation == "dynamic":
        x, x_scale = group_quantize(x, bk, torch.float8_e4m3fn, "fp32")
    kernel = "w8a16" if x_scale is None else "w8a8"
    m, k = x.shape
    x_bytes = x.element_size() if kernel == "w8a16" else 1
    cfg = config or configs.select(kernel, x.device, m, w.shape[0], k, bk, x_bytes)
    return launch_gemm(x, w, w_scale, block_shape, x_scale, bias, out_dtype, cfg)
