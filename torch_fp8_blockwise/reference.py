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
* ``grouped_matmul(x[M, K], w[G, N, K], w_scale[G, cdiv(N,bn), cdiv(K,bk)], group_sizes[G] int32, (bn, bk),
  x_scale[M, cdiv(K,bk)] | None, out_dtype, activation) -> y[M, N]`` with M, N, K, G > 0.
* ``grouped_matmul_transposed(x[M, K], dy[M, N], group_sizes[G] int32, block_m, out_dtype) -> out[G, K, N]``
  with M, N, K, G > 0.

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

Grouped (MoE) ops. Rows of x are sorted by group: with ``end[g] = sum(group_sizes[:g+1])`` and
``start[g] = end[g] - group_sizes[g]``, group g owns rows ``[start[g], end[g])`` clipped to
``[0, M)`` (:func:`group_bounds`). So rows at or past ``sum(group_sizes)`` belong to no group, and
a sum above M truncates the groups at row M (the behaviour on devices, where the ops must not read
group_sizes on the host; on CPU the op rejects a sum above M and negative sizes, which have no
specified result on devices).

* gmm, ``grouped_matmul``: x [M, K] (fp8 with x_scale [M, cdiv(K, bk)], or bf16/fp16/fp32 with
  activation "dynamic" = quantized per 1 x bk group to e4m3fn, or "none" = W8A16), w [G, N, K] fp8,
  w_scale [G, cdiv(N, bn), cdiv(K, bk)] float32. Row i of group g is exactly
  ``blockwise_matmul(x[i], w[g], w_scale[g])`` (the W8A8 / W8A16 rules above, fp32 accumulation,
  then the cast); rows of no group are 0. Empty groups own no rows; one group may own every row.
* tgmm, ``grouped_matmul_transposed`` (the weight gradient of gmm): x [M, K] and dy [M, N]
  bf16/fp16/fp32 are each quantized to float8_e4m3fn in blocks of ``block_m`` rows x 1 column at
  ABSOLUTE row offsets 0, block_m, 2 block_m, ... (per-column scales, tokamax's tiled layout):
  ``xq, xs = quantize(x, (block_m, 1))`` with xs [cdiv(M, block_m), K], likewise dys
  [cdiv(M, block_m), N]; every row of x and dy enters its block's amax, rows of no group included.
  ``out[g, k, n] = sum_b (sum_{i in b & group g} xq[i, k] * dyq[i, n]) * xs[b, k] * dys[b, n]``
  over the row blocks b that intersect group g, fp32 accumulation, then the cast. A block that
  straddles a group boundary has ONE scale for the rows of both groups. An empty group gives 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import MX_BLOCK, cdiv, compute_scale, e8m0_to_float, float_to_e8m0, fp8_max


def _pad_to_blocks(x: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    rows, cols = x.shape[-2:]
    if x.numel() == 0:  # F.pad rejects a zero-size dim in torch 2.9 ("negative output size")
        return x.new_zeros((*x.shape[:-2], cdiv(rows, br) * br, cdiv(cols, bc) * bc))
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


def group_bounds(group_sizes: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) int64 [G] of each group's rows, clipped to [0, m] (see the module docstring)."""
    ends = torch.cumsum(group_sizes.long(), dim=0)
    starts = ends - group_sizes.long()
    return starts.clamp(0, m), ends.clamp(0, m)


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
    starts, ends = group_bounds(group_sizes, x.shape[0])
    y = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    for g, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        if e > s:
            xs = None if x_scale is None else x_scale[s:e]
            y[s:e] = blockwise_matmul(
                x[s:e], w[g], w_scale[g], block_shape, xs, None, torch.float32, activation
            )
    return y.to(out_dtype)


def quantize_columns(x: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tgmm operand quantization: x [M, C] -> (q [M, C] float8_e4m3fn, scale [cdiv(M, block_m), C]
    float32), one scale per column and block of block_m rows at absolute offsets."""
    return quantize(x, (block_m, 1), torch.float8_e4m3fn, "fp32")


def grouped_matmul_transposed(
    x: torch.Tensor,
    dy: torch.Tensor,
    group_sizes: torch.Tensor,
    block_m: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    xq, xs = quantize_columns(x, block_m)
    dq, ds = quantize_columns(dy, block_m)
    xf, df = xq.float(), dq.float()
    starts, ends = group_bounds(group_sizes, x.shape[0])
    out = torch.zeros(group_sizes.shape[0], x.shape[1], dy.shape[1], dtype=torch.float32, device=x.device)
    for g, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        for b in range(s // block_m, cdiv(e, block_m)):
            rows = slice(max(s, b * block_m), min(e, (b + 1) * block_m))
            partial = xf[rows].T @ df[rows]
            out[g] += partial * xs[b][:, None] * ds[b][None, :]
    return out.to(out_dtype)
