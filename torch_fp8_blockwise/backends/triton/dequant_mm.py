"""W8A16 for large M: dequantize fp8 weight panels to x's dtype with a Triton kernel, then torch's GEMM.

At M >= 256 a W8A16 GEMM is compute-bound and bf16 cuBLAS is the fastest bf16 x bf16 kernel on the
GPU (H100: 706 TFLOP/s at M=4096, N=4608, K=7168; our fused W8A16 Triton kernel 250 TFLOP/s there).
So this route spends one pass over the weight (read 1 byte, write 2 bytes per element, at
bandwidth: the dequantizer is :func:`quantize._dequant_kernel`) and hands the rest to cuBLAS.
Expected cost = bf16 GEMM + dequantization, e.g. 4608 x 7168 = 33 M weight elements, about 99 MB
moved, ~33 us at the H100's 3.0 TB/s copy rate (NOTES section 6): 1.09x bf16 cuBLAS at M=4096
(383 us), 1.3x at M=1024, 2x at M=256 if the panel goes to HBM and back. Panels of at most
:data:`PANEL_BYTES` keep the transient bounded and small enough to stay in the 50 MB L2 between
the dequantizer's write and the GEMM's read. Not measured on a GPU yet (no GPU in this session).

Numerics: the panel holds ``wq * ws`` rounded to x's dtype, an error the reference (fp32
``wq * ws``) does not have. Measured on randn data (the test below replays it): bf16 panels give
mean|y - ref| / mean|ref| = 1.7e-3, inside bf16 output's budget (one bf16 step, 2**-7) but above the
1e-3 budget of fp16 and fp32 output; fp16 panels 2.1e-4, inside every budget. :func:`supported`
encodes that, and :func:`dequant_matmul` raises for anything else.

Bias follows the contract (NOTES section 5): added in fp32 to the fp32 accumulator, one rounding
to ``out_dtype`` (:func:`_panel_gemm`). It is never rounded to x's dtype first: an fp32 bias on bf16 x
would otherwise lose up to half a bf16 step before the final rounding, and a bf16 bias on fp16 x
above 65504 would become inf.
"""

from __future__ import annotations

import torch

from .configs import interpreting
from .quantize import dequantize_into

#: Largest dequantized panel (bytes): bounds the transient memory, and 32 MiB fits the H100's 50 MB L2.
PANEL_BYTES = 32 << 20

#: (x dtype, out dtype) pairs whose panel rounding fits the output's kernel-error budget (module
#: docstring: bf16 panel 1.7e-3 vs bf16's 7.8e-3; fp16 panel 2.1e-4 vs 1e-3; fp32 panels are exact).
#: fp16 x with fp32 output is left out although its panel error fits: the GEMM's fp16 result would
#: overflow at 65504 where the fp32 reference does not.
SUPPORTED: frozenset[tuple[torch.dtype, torch.dtype]] = frozenset(
    {
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
    }
)


def supported(x_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether :func:`dequant_matmul` meets the numerics contract for this (x, out) dtype pair."""
    return (x_dtype, out_dtype) in SUPPORTED


#: torch's mixed-precision GEMM (``torch.mm(a, b, out_dtype=torch.float32)`` for bf16 / fp16 a, b):
#: the fp32 accumulator itself as the result; CUDA only (torch >= 2.9 has the overload; on CPU it
#: raises "Could not run 'aten::mm.dtype' ... 'CPU' backend"). Not addmm's out_dtype: it requires
#: the bias in the operands' dtype, the rounding this avoids.
_HAS_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _panel_gemm(x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ wp [n, K].T (+ bias [n]) with the bias added to the fp32 accumulator before the
    one rounding of the result; returns x's dtype, or float32 where bias needs it (the caller
    casts to out_dtype, a single rounding either way)."""
    if bias is None:
        return torch.mm(x, wp.t())
    if bias.dtype == x.dtype or x.dtype == torch.float32:
        # bias is exact in x's dtype; the GEMM adds it to its fp32 accumulator (cuBLAS beta * C,
        # torch's CPU addmm alike) and rounds once.
        return torch.addmm(bias.to(x.dtype), x, wp.t())
    # A bias of another dtype than 16-bit x (fp32 bias on bf16 x, bf16 bias on fp16 x) is not
    # exact in x's dtype: the product stays fp32 and the fp32 bias joins it there. Costs one fp32
    # [M, n] pass more, only for such mixed-dtype biases.
    if x.is_cuda and _HAS_MM_OUT_DTYPE:
        return torch.mm(x, wp.t(), out_dtype=torch.float32).add_(bias.float())
    return torch.addmm(bias.float(), x.float(), wp.float().t())  # CPU (interpreter): same values


def panel_rows(n: int, k: int, bn: int, element_size: int) -> int:
    """Rows of one weight panel: the whole weight if it fits :data:`PANEL_BYTES`, else the largest
    multiple of the scale block ``bn`` that does (at least one block)."""
    if n * k * element_size <= PANEL_BYTES:
        return n
    return max(bn, PANEL_BYTES // (k * element_size) // bn * bn)


def dequant_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    block_shape: tuple[int, int],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """W8A16 y = x @ (w * w_scale expanded).T + bias, through dequantized panels and torch's GEMM.

    Args:
        x: [M, K] bfloat16 / float16 / float32 (rows may be strided, unit stride along K).
        w: [N, K] float8_e4m3fn / float8_e5m2, row-major (out_features, in_features).
        w_scale: [cdiv(N, bn), cdiv(K, bk)] float32 multipliers, row-major; w ~= w_q * w_scale.
        block_shape: (bn, bk), each a power of two >= 128.
        bias: [N] bfloat16 / float16 / float32 or None; added in fp32 before the cast to out_dtype.
        out_dtype: see :func:`supported`: bf16 x only with bf16 output (the bf16 panel's rounding,
            1.7e-3 measured, exceeds fp16/fp32 output's 1e-3 budget), fp16 x with fp16 output. The router uses this
            function only for such pairs (and at large M, where cuBLAS's GEMM pays for the pass).

    Returns: y [M, N] ``out_dtype``, contiguous.
    """
    if not supported(x.dtype, out_dtype):
        raise ValueError(
            f"dequant_matmul: x {x.dtype} with out_dtype {out_dtype} would exceed the output's error budget "
            f"(a {x.dtype} weight panel rounds w * w_scale); supported (x, out) pairs: "
            f"{sorted((str(a), str(b)) for a, b in SUPPORTED)}. Use the fused W8A16 kernel instead."
        )
    bn, _ = block_shape
    if w.stride(1) != 1:
        w = w.contiguous()
    m, k = x.shape
    n = w.shape[0]
    rows = panel_rows(n, k, bn, x.element_size())
    # The interpreter rounds fp32 -> bf16 stores wrongly (NOTES section 2): stage fp32 there.
    stage = torch.float32 if interpreting() and x.dtype == torch.bfloat16 else x.dtype
    panel = torch.empty((min(rows, n), k), dtype=stage, device=x.device)
    y = None if rows >= n else torch.empty((m, n), dtype=out_dtype, device=x.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        buf = panel[: r1 - r0]
        dequantize_into(w[None, r0:r1], w_scale[None, r0 // bn :], block_shape, buf[None])
        wp = buf if stage == x.dtype else buf.to(x.dtype)
        part = _panel_gemm(x, wp, None if bias is None else bias[r0:r1])
        if y is None:
            return part if part.dtype == out_dtype else part.to(out_dtype)
        y[:, r0:r1] = part
    return y
