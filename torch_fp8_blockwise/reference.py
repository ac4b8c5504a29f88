"""Pure-torch reference semantics: the contract every backend is tested against.

Written for clarity, not speed, and runnable on any device torch supports (CPU, CUDA, XLA). It is
also the "reference" backend, so it takes the canonical arguments the dispatcher hands to every
backend (see :mod:`torch_fp8_blockwise._dispatch`):

* ``quantize(x[B, R, C], (br, bc), dtype, scale_format) -> (q[B, R, C], scale[B, cdiv(R,br), cdiv(C,bc)])``
* ``dequantize(q[B, R, C], scale[B, RB, CB], (br, bc), out_dtype) -> x[B, R, C]``
* ``blockwise_matmul(x[M, K], w[N, K], w_scale[cdiv(N,bn), cdiv(K,bk)], (bn, bk), x_scale[M, cdiv(K,bk)] | None,
  bias[N] | None, out_dtype, activation) -> y[M, N]`` with M, N, K > 0.
* ``mxfp8_quantize(x[M, K], dtype) -> (q[M, K], scale_u8[M, K // 32])`` with K % 32 == 0.
* ``mxfp8_matmul(x[M, K], w[N, K], w_scale[N, K // 32] uint8, x_scale[M, K // 32] uint8 | None, bias[N] | None,
  out_dtype) -> y[M, N]`` with M, N > 0 and K % 32 == 0, K > 0.

Semantics (shared/NOTES.md, "Reference semantics"):

* Quantize: ``amax`` = largest finite ``|x|`` in the block; ``scale = max(amax, 1e-10) / fp8_max``
  (``ue8m0``: rounded up to a power of two); ``q = clamp(x / scale, -fp8_max, fp8_max)``.
  So an all-zero block gives ``q = 0`` and a tiny finite scale; ``+-inf`` saturates to
  ``+-fp8_max`` without disturbing the block's scale; ``nan`` stays ``nan`` in its own element only.
  Ragged edge blocks behave as if zero-padded.
* W8A8: ``y[m, n] = sum_kb (sum_{k in kb} xq[m, k] * wq[n, k]) * xs[m, kb] * ws[n // bn, kb]``,
  fp32 accumulation, then ``+ bias``, then cast to ``out_dtype``. Dynamic activations are quantized
  with :func:`quantize` in ``1 x bk`` groups to float8_e4m3fn, fp32 scales.
* W8A16: ``y = x.float() @ dequantize(w, w_scale).T + bias``, cast.
* MXFP8 (OCP Microscaling): 1 x 32 groups along K, scales ``2**ceil(log2(max(amax, 1e-10) / fp8_max))``
  (the ue8m0 rule above, stored as E8M0 uint8 bits ``2**(bits - 127)``); the matmul is W8A8 with
  ``(bn, bk) = (1, 32)``; high-precision x is quantized with :func:`mxfp8_quantize` to e4m3fn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import MX_BLOCK, cdiv, compute_scale, e8m0_to_float, float_to_e8m0, fp8_max


def _pad_to_blocks(x: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    rows, cols = x.shape[-2:]
    return F.pad(x, (0, cdiv(cols, bc) * bc - cols, 0, cdiv(rows, br) * br - rows))


def expand_scale(scale: torch.Tensor, block_shape: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """Repeat a [..., RB, CB] block scale to [..., rows, cols] (one value per element)."""
    br, bc = block_shape
    full = scale.repeat_interleave(br, dim=-2).repeat_interleave(bc, dim=-1)
    return full[..., :rows, :cols]


def block_amax(x: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """Largest finite |x| per (br, bc) block of the last two dims, float32 [..., RB, CB]."""
    br, bc = block_shape
    mag = x.float().abs()
    # Non-finite elements (inf, nan) must not set the scale of their whole block.
    mag = torch.where(torch.isfinite(mag), mag, torch.zeros_like(mag))
    mag = _pad_to_blocks(mag, br, bc)
    *lead, rows, cols = mag.shape
    blocks = mag.reshape(*lead, rows // br, br, cols // bc, bc)
    return blocks.amax(dim=(-3, -1))


def quantize(
    x: torch.Tensor, block_shape: tuple[int, int], dtype: torch.dtype, scale_format: str
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape[-2:]
    scale = compute_scale(block_amax(x, block_shape), dtype, scale_format)
    big = fp8_max(dtype)
    q = torch.clamp(x.float() / expand_scale(scale, block_shape, rows, cols), -big, big)
    return q.to(dtype), scale


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, block_shape: tuple[int, int], out_dtype: torch.dtype
) -> torch.Tensor:
    rows, cols = q.shape[-2:]
    return (q.float() * expand_scale(scale.float(), block_shape, rows, cols)).to(out_dtype)


def quantize_activation(x: torch.Tensor, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic W8A8 activation quantization: 1 x bk groups, float8_e4m3fn, fp32 scales.

    x [M, K] -> (xq [M, K] float8_e4m3fn, xs [M, cdiv(K, bk)] float32).
    """
    return quantize(x, (1, bk), torch.float8_e4m3fn, "fp32")


def blockwise_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    block_shape: tuple[int, int],
    x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str,
) -> torch.Tensor:
    bn, bk = block_shape
    n, k = w.shape
    if x_scale is None and activation == "none":
        acc = x.float() @ dequantize(w, w_scale, block_shape, torch.float32).T
    else:
        if x_scale is None:
            x, x_scale = quantize_activation(x, bk)
        # One float32 scale per weight row and K block: [N, KB].
        ws_rows = w_scale.float().repeat_interleave(bn, dim=0)[:n]
        xf, wf = x.float(), w.float()
        acc = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)
        for kb in range(cdiv(k, bk)):
            cols = slice(kb * bk, min(k, (kb + 1) * bk))
            partial = xf[:, cols] @ wf[:, cols].T
            acc += partial * x_scale[:, kb, None].float() * ws_rows[None, :, kb]
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


def mxfp8_quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = quantize(x, (1, MX_BLOCK), dtype, "ue8m0")
    return q, float_to_e8m0(scale)


def mxfp8_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if x_scale is None:
        x, x_scale = mxfp8_quantize(x, torch.float8_e4m3fn)
    return blockwise_matmul(
        x, w, e8m0_to_float(w_scale), (1, MX_BLOCK), e8m0_to_float(x_scale), bias, out_dtype, "dynamic"
    )
