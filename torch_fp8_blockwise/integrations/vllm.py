"""vLLM's block-FP8 calling conventions on our ops, so a vLLM-style linear method can call us
without changing its tensors.

vLLM (``vllm/model_executor/layers/quantization/utils/fp8_utils.py``) quantizes activations with
``per_token_group_quant_fp8(x, group_size) -> (x_q, x_s)`` and multiplies with
``w8a8_triton_block_scaled_mm(A, B, As, Bs, block_size, output_dtype)``. The layouts are DeepSeek's,
the same as ours, so these functions only check arguments and call ``torch.ops.fp8``: they run on
every device we dispatch to (cpu, cuda via Triton, xla via Pallas).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops as _ops  # noqa: F401  (registers torch.ops.fp8.*)
from ..formats import BLOCK_COLS, FP8_DTYPES, SCALE_EPS, cdiv

__all__ = ["per_token_group_quant_fp8", "w8a8_block_fp8_matmul", "w8a8_triton_block_scaled_mm"]


def w8a8_block_fp8_matmul(
    A: torch.Tensor,
    B: torch.Tensor,
    As: torch.Tensor,
    Bs: torch.Tensor,
    block_size: Sequence[int],
    output_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """``C = (A * As) @ (B * Bs).T`` with vLLM's argument order (``w8a8_triton_block_scaled_mm``).

    Args:
        A: [..., K] float8_e4m3fn (or e5m2) activations, e.g. from :func:`per_token_group_quant_fp8`.
        B: [N, K] float8_e4m3fn / e5m2 weight, contiguous row-major.
        As: [..., cdiv(K, bk)] float32 per-token-group multipliers of A (row- or column-major).
        Bs: [cdiv(N, bn), cdiv(K, bk)] float32 multipliers of B (vLLM's ``weight_scale_inv``).
        block_size: [bn, bk], each of 128, 256, 512.
        output_dtype: bfloat16 / float16 / float32 (vLLM's default: float16).

    Returns: [..., N] ``output_dtype``; fp32 accumulation per K block (the library's W8A8 contract).
    """
    if not isinstance(block_size, (list, tuple)) or len(block_size) != 2:
        raise ValueError(f"block_size: expected [block_n, block_k], got {block_size!r}")
    if not all(isinstance(b, int) for b in block_size):
        raise TypeError(f"block_size: expected two ints, got {block_size!r}")
    for name, t in (("A", A), ("B", B), ("As", As), ("Bs", Bs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if A.dtype not in FP8_DTYPES:
        raise TypeError(
            f"A: expected an fp8 tensor (float8_e4m3fn / float8_e5m2) with its scales As, got {A.dtype}; "
            "quantize it with per_token_group_quant_fp8 first (or call torch_fp8_blockwise.blockwise_matmul, "
            "which quantizes high-precision activations itself)"
        )
    return torch.ops.fp8.blockwise_matmul(A, B, Bs, list(block_size), As, None, output_dtype, "dynamic")


#: The name vLLM's current code and tests import (``fp8_utils.w8a8_triton_block_scaled_mm``); the
#: same function.
w8a8_triton_block_scaled_mm = w8a8_block_fp8_matmul


#: Group sizes of :func:`per_token_group_quant_fp8`: our quantizer's K blocks plus vLLM's 64.
GROUP_SIZES: tuple[int, ...] = (64, *BLOCK_COLS)

#: TMA needs 16-byte aligned strides: 4 float32 scales (vLLM's ``get_tma_aligned_size(m, 4)``).
_TMA_ALIGN = 4


def per_token_group_quant_fp8(
    x: torch.Tensor,
    group_size: int,
    eps: float = 1e-10,
    dtype: torch.dtype | None = None,
    column_major_scales: bool = False,
    tma_aligned_scales: bool = False,
    out_q: torch.Tensor | None = None,
    use_ue8m0: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 quantization with vLLM's signature and semantics.

    Each token's K values are split into groups of ``group_size``; per group,
    ``x_s = max(amax, eps) / fp8_max`` (rounded up to a power of two with ``use_ue8m0``) and
    ``x_q = clamp(x / x_s, -fp8_max, fp8_max)``. One difference, by design: ``amax`` is the largest
    FINITE |x|, so an inf saturates without zeroing the rest of its group (vLLM's kernel lets an
    inf set the scale).

    Args:
        x: [..., K] bfloat16 / float16 / float32, any strides. vLLM requires K to be a multiple of
            ``group_size``; here a ragged last group is allowed (zero-padded, as in the matmul), e.g.
            K = 576 for SmolLM2.
        group_size: 64, 128, 256 or 512. 128-512 run ``torch.ops.fp8.quantize`` directly; 64 (a
            real config, e.g. in vLLM's tests) runs it on each 64-group zero-padded to 128, which
            gives the same scale and codes (zeros do not change a group's amax) at the cost of
            one padded copy of x.
        eps: must be 1e-10, the floor our quantizer uses (vLLM's default); any other value raises.
        dtype: float8_e4m3fn (default, as vLLM on CUDA) or float8_e5m2.
        column_major_scales: return x_s with column-major strides over its last two dims (same
            values): strides ``(..., 1, M)`` for x_s [..., M, G], as vLLM does for CUTLASS.
        tma_aligned_scales: with ``column_major_scales``, DeepGEMM's TMA layout: the column stride
            is M rounded up to a multiple of 4 (16 bytes), strides ``(G * M4, 1, M4)`` for a 3-D
            x_s, as vLLM's ``per_token_group_quant_fp8``; the padding rows hold zeros. Without
            ``column_major_scales`` it changes nothing (as in vLLM).
        out_q: optional [..., K] tensor of ``dtype`` that receives x_q (returned).
        use_ue8m0: power-of-two scales (DeepSeek V3.1 / DeepGEMM on Blackwell). None means False
            here (vLLM decides from its DeepGEMM setup, which we do not have).

    Returns:
        x_q: [..., K] ``dtype``.
        x_s: [..., cdiv(K, group_size)] float32 multipliers (x ~= x_q * x_s per group), in the
            layout the two flags ask for (row-major by default).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {GROUP_SIZES}, got {group_size!r}")
    if eps != SCALE_EPS:
        raise ValueError(
            f"eps: our quantizer's floor is fixed at {SCALE_EPS:g} (vLLM's default), got {eps!r}; "
            "a different floor would change the scale of near-zero groups"
        )
    dtype = torch.float8_e4m3fn if dtype is None else dtype
    if dtype not in FP8_DTYPES:
        raise TypeError(f"dtype: expected float8_e4m3fn or float8_e5m2, got {dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected [..., K], got a 0-dim tensor")
    if out_q is not None and (
        not isinstance(out_q, torch.Tensor) or out_q.shape != x.shape or out_q.dtype != dtype
    ):
        got = (
            f"{tuple(out_q.shape)} {out_q.dtype}" if isinstance(out_q, torch.Tensor) else type(out_q).__name__
        )
        raise ValueError(f"out_q: expected a {tuple(x.shape)} {dtype} tensor, got {got}")

    k = x.shape[-1]
    groups = cdiv(k, group_size)
    scale_format = "ue8m0" if use_ue8m0 else "fp32"
    x2 = x.reshape(-1, k)  # quantize's (1, g) blocks tile the last two dims: one row per token
    if group_size in BLOCK_COLS:
        q, s = torch.ops.fp8.quantize(x2, [1, group_size], dtype, scale_format)
    else:  # one row of 128 per 64-group, its second half zeros
        padded = torch.nn.functional.pad(x2, (0, groups * group_size - k))
        wide = torch.nn.functional.pad(padded.reshape(-1, group_size), (0, BLOCK_COLS[0] - group_size))
        q_wide, s_wide = torch.ops.fp8.quantize(wide, [1, BLOCK_COLS[0]], dtype, scale_format)
        q = q_wide[:, :group_size].reshape(x2.shape[0], groups * group_size)[:, :k]
        s = s_wide.reshape(x2.shape[0], groups)
    x_q = q.reshape(x.shape)
    x_s = s.reshape(*x.shape[:-1], groups)
    if column_major_scales and x_s.dim() >= 2:
        x_s = _column_major(x_s, _TMA_ALIGN if tma_aligned_scales else 1)
    if out_q is not None:
        out_q.copy_(x_q)
        x_q = out_q
    return x_q, x_s


def _column_major(x_s: torch.Tensor, align: int) -> torch.Tensor:
    """x_s [..., M, G] with strides (G * Ma, 1, Ma) over its last three dims, Ma = M rounded up to
    ``align``; rows M..Ma of the storage are zeros."""
    m, groups = x_s.shape[-2:]
    m_aligned = cdiv(m, align) * align
    storage = x_s.new_zeros(*x_s.shape[:-2], groups, m_aligned)
    out = storage[..., :m].transpose(-1, -2)
    out.copy_(x_s)
    return out
