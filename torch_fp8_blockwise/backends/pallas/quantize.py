"""Pallas TPU kernels for block-wise FP8 quantize / dequantize of [B, R, C] tensors (pure JAX).

Semantics are those of :mod:`torch_fp8_blockwise.reference`: per (br, bc) block, amax over the
finite values, ``scale = max(amax, 1e-10) / fp8_max`` (``ue8m0``: rounded up to a power of two by
the bit trick of ``formats.round_scale_ue8m0``), ``q = clip(x / scale, -fp8_max, fp8_max)``.

Grid ``(B, Rp / tr, Cp / tc)``: a step holds a ``[tr, tc]`` tile, ``tc = c_sub * bc``, and walks
its ``c_sub`` quantization-block columns with static ``pl.ds`` slices; ``tr`` rows (a multiple of
the 32-row fp8 tile, up to 256) for 1 x bc groups, ``tr = br`` for 2D blocks. A tile holds up to
512 Ki elements (2 MiB of f32 input), so the ~0.35 us step overhead stays small next to the
copy (one 128-column block per step would pay it 16x as often). Scales are produced in a
kernel-friendly layout and transposed outside (they are 1/128 or less of the data):

* 1 x bc groups: [B, CB, Rp, 1] (block (c_sub, tr, 1): column vectors, broadcast along lanes);
* br x bc blocks: [B, CB, RB, 1, 1] (block (c_sub, 1, 1): one scalar per quantization block).

E8M0 scales (DeepSeek V3.1 / MX ``ue8m0`` stored as one byte) arrive as uint8 bits, because
torch_xla cannot move float8_e8m0fnu; :func:`e8m0_bits_to_f32` decodes them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

FP8_MAX: dict[str, float] = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
SCALE_EPS = 1e-10
#: Rows per step for 1 x bc groups (a multiple of the 32-row fp8 tile).
GROUP_ROWS = 256
#: Elements per step: 256 x 2048 f32 = 2 MiB per input buffer; with the fp8 output and double
#: buffering ~5 MiB, inside every generation's default 16 MiB scoped VMEM.
TILE_ELEMS = 256 * 2048


def _round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def round_scale_ue8m0(scale: jax.Array) -> jax.Array:
    """Positive f32 scales rounded up to a power of two with integer ops (formats.round_scale_ue8m0)."""
    bits = lax.bitcast_convert_type(scale, jnp.int32)
    return lax.bitcast_convert_type((bits + 0x7FFFFF) & 0x7F800000, jnp.float32)


def e8m0_bits_to_f32(bits: jax.Array) -> jax.Array:
    """uint8 E8M0 bits -> float32 2**(bits - 127); 255 -> nan; 0 -> 2**-127 (formats.e8m0_to_float)."""
    as_int = bits.astype(jnp.int32)
    value = jnp.where(
        as_int > 0,
        lax.bitcast_convert_type(as_int << 23, jnp.float32),
        lax.bitcast_convert_type(jnp.int32(0x00400000), jnp.float32),
    )
    return jnp.where(as_int == 255, jnp.nan, value)


def _exact_div(amax: jax.Array, big: float) -> jax.Array:
    """amax / big as a true IEEE division, bit-identical to torch's ``amax / fp8_max``.

    XLA rewrites division by a constant into multiplication by its rounded reciprocal (1/448 is
    not a binary fraction), which moved 53% of scales by 1 ulp in a 100k sample and flipped
    roundings of q. ``big + 0 * amax`` equals ``big`` exactly (amax is finite and >= 1e-10 here)
    but is not a constant, so the division stays a division; cost: 2 VPU ops per row.
    """
    return amax / (big + 0.0 * amax)


def _row_tile(rows: int, br: int) -> int:
    if br > 1:
        return br
    return min(GROUP_ROWS, _round_up(rows, 32))


def _col_blocks(cols: int, bc: int, tr: int) -> int:
    """Quantization-block columns per step: the largest divisor of cdiv(cols, bc) that keeps the
    tile within TILE_ELEMS, so columns are padded only to the quantization block."""
    cb = -(-cols // bc)
    cap = max(1, TILE_ELEMS // (tr * bc))
    return max(d for d in range(1, min(cb, cap) + 1) if cb % d == 0)


def _tiling(rows: int, cols: int, br: int, bc: int) -> tuple[int, int, int, int]:
    """(tr, c_sub, rp, cp) shared by quantize and dequantize: row tile, quantization blocks per
    column step, and the padded rows / cols (padded only to the row tile and the block)."""
    tr = _row_tile(rows, br)
    return tr, _col_blocks(cols, bc, tr), _round_up(rows, tr), _round_up(cols, bc)


def _quantize_kernel(x_ref, q_ref, s_ref, *, dtype: str, scale_format: str, bc: int, grouped: bool) -> None:
    """x_ref [tr, tc] -> q_ref [tr, tc] fp8; s_ref [c_sub, tr, 1] (1 x bc groups) or
    [c_sub, 1, 1] (2D blocks: the whole tr = br rows share one scale)."""
    big = FP8_MAX[dtype]
    for c in range(x_ref.shape[1] // bc):
        cols = pl.ds(c * bc, bc)
        xf = x_ref[:, cols].astype(jnp.float32)
        mag = jnp.abs(xf)
        # inf and nan fail `<= f32 max`: they must not set the block's scale (reference semantics).
        mag = jnp.where(mag <= jnp.finfo(jnp.float32).max, mag, 0.0)
        amax = jnp.max(mag, axis=1, keepdims=True)  # [tr, 1]
        if not grouped:
            amax = jnp.max(amax, axis=0, keepdims=True)  # [1, 1]
        scale = _exact_div(jnp.maximum(amax, SCALE_EPS), big)
        if scale_format == "ue8m0":
            scale = round_scale_ue8m0(scale)
        q_ref[:, cols] = jnp.clip(xf / scale, -big, big).astype(q_ref.dtype)
        s_ref[c] = scale


def _dequantize_kernel(q_ref, s_ref, o_ref, *, bc: int) -> None:
    """q_ref [tr, tc] fp8 times per-block scales s_ref [c_sub, tr, 1] or [c_sub, 1, 1] -> o_ref."""
    for c in range(q_ref.shape[1] // bc):
        cols = pl.ds(c * bc, bc)
        o_ref[:, cols] = (q_ref[:, cols].astype(jnp.float32) * s_ref[c]).astype(o_ref.dtype)


def _scale_spec(br: int, tr: int, c_sub: int) -> pl.BlockSpec:
    if br == 1:
        return pl.BlockSpec((None, c_sub, tr, 1), lambda b, r, c: (b, c, r, 0))
    return pl.BlockSpec((None, c_sub, None, 1, 1), lambda b, r, c: (b, c, r, 0, 0))


def quantize(
    x: jax.Array,
    *,
    block: tuple[int, int],
    dtype: str,
    scale_format: str,
    interpret: bool = False,
    debug: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """x [B, R, C] bf16/f16/f32 -> (q [B, R, C] ``dtype``, scale [B, cdiv(R, br), cdiv(C, bc)] f32).

    ``block`` = (br, bc): br in (1, 128, 256, 512), bc in (128, 256, 512). Zero padding of ragged
    edges is exact: padded zeros never raise a block's amax.
    """
    br, bc = block
    bsz, rows, cols = x.shape
    if x.dtype == jnp.float16:  # Mosaic has no f16 type: widen outside the kernel (exact)
        x = x.astype(jnp.float32)
    tr, c_sub, rp, cp = _tiling(rows, cols, br, bc)
    tc = c_sub * bc
    if (rp, cp) != (rows, cols):
        x = jnp.pad(x, ((0, 0), (0, rp - rows), (0, cp - cols)))
    cb = cp // bc
    scale_rows = rp if br == 1 else rp // br
    s_shape = (bsz, cb, scale_rows, 1) if br == 1 else (bsz, cb, scale_rows, 1, 1)
    q, s = pl.pallas_call(
        functools.partial(_quantize_kernel, dtype=dtype, scale_format=scale_format, bc=bc, grouped=br == 1),
        out_shape=(
            jax.ShapeDtypeStruct((bsz, rp, cp), jnp.dtype(dtype)),
            jax.ShapeDtypeStruct(s_shape, jnp.float32),
        ),
        grid=(bsz, rp // tr, cp // tc),
        in_specs=[pl.BlockSpec((None, tr, tc), lambda b, r, c: (b, r, c))],
        out_specs=(pl.BlockSpec((None, tr, tc), lambda b, r, c: (b, r, c)), _scale_spec(br, tr, c_sub)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret,
        debug=debug,
        name="fp8_blockwise_quantize",
    )(x)
    scale = s.reshape(bsz, cb, scale_rows).transpose(0, 2, 1)  # [B, RB, CB]
    rb = -(-rows // br)
    return q[:, :rows, :cols], scale[:, :rb, :]


def dequantize(
    q: jax.Array,
    scale: jax.Array,
    *,
    block: tuple[int, int],
    out_dtype: str,
    interpret: bool = False,
    debug: bool = False,
) -> jax.Array:
    """q [B, R, C] fp8, scale [B, cdiv(R, br), cdiv(C, bc)] f32 (or uint8 E8M0 bits) -> [B, R, C]."""
    br, bc = block
    bsz, rows, cols = q.shape
    if scale.dtype == jnp.uint8:
        scale = e8m0_bits_to_f32(scale)
    tr, c_sub, rp, cp = _tiling(rows, cols, br, bc)
    tc = c_sub * bc
    if (rp, cp) != (rows, cols):
        q = jnp.pad(q, ((0, 0), (0, rp - rows), (0, cp - cols)))
    rb_p, cb = rp // br, cp // bc
    s = scale.astype(jnp.float32)
    s = jnp.pad(s, ((0, 0), (0, rb_p - s.shape[1]), (0, cb - s.shape[2]))).transpose(0, 2, 1)
    s = s[..., None] if br == 1 else s[..., None, None]
    # Mosaic has no f16 type: a float16 result is computed as float32 and narrowed outside.
    kernel_out = "float32" if out_dtype == "float16" else out_dtype
    out = pl.pallas_call(
        functools.partial(_dequantize_kernel, bc=bc),
        out_shape=jax.ShapeDtypeStruct((bsz, rp, cp), jnp.dtype(kernel_out)),
        grid=(bsz, rp // tr, cp // tc),
        in_specs=[pl.BlockSpec((None, tr, tc), lambda b, r, c: (b, r, c)), _scale_spec(br, tr, c_sub)],
        out_specs=pl.BlockSpec((None, tr, tc), lambda b, r, c: (b, r, c)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret,
        debug=debug,
        name="fp8_blockwise_dequantize",
    )(q, s)
    return out[:, :rows, :cols].astype(out_dtype)
