"""MXFP8 (OCP Microscaling): quantizer and GEMM with E8M0 scales per 32 elements of K.

Layouts:

* x [M, K] fp8 row-major, x_scale [M, K // 32] uint8 E8M0 bits (scale = 2**(bits - 127), 255 = nan).
* w [N, K] fp8 row-major, w_scale [N, K // 32] uint8 E8M0 bits.
* y [M, N] = sum_g (sum_{k in g} xq * wq) * 2**(xs[m, g] - 127) * 2**(ws[n, g] - 127) + bias.

Two GEMM paths in one kernel (``NATIVE`` constexpr):

* sm_100 (Blackwell datacenter): ``tl.dot_scaled`` -> ``tcgen05.mma ... kind::mxf8f6f4.block_scale``,
  the hardware applies the E8M0 scales inside the MMA.
* sm_90 / sm_120 (no MX MMA; Hopper has none and Triton 3.5 has no sm_120 lowering for it): explicit
  scaling at bf16-MMA speed. Per K tile each operand's scales are loaded as ONE vector
  ``[rows, BLOCK_K // 32]`` of E8M0 bytes (4 bytes per row at BLOCK_K = 128; the first version
  gathered one byte per element, 15-25x slower than bf16 on the H100), turned into power-of-two
  multipliers in registers, broadcast over their 32 columns, and multiplied into the fp8 tile
  widened to bf16; then one bf16 tensor-core dot per tile accumulates into the fp32 accumulator
  (no per-tile promotion). Exactness: an e4m3 (e5m2) value has 4 (3) significant bits and bf16 has 8,
  and multiplying by 2**(e - 127) only moves the exponent, so ``q * 2**(e - 127)`` is a bf16 value
  whenever it is an fp32 normal (bf16 and fp32 share the exponent range; the largest 4-bit value,
  1.875 * 2**127, is below bf16's max). The bf16 products then reach the fp32 accumulator exactly,
  so this path differs from the reference only in fp32 summation order while every scale of the
  tile lies in ``SAFE_LO .. SAFE_HI`` (2**-47 .. 2**45, :data:`SAFE_LO`).

Out of that window (E8M0 0, 254, 255, checkpoint scales, or |x| above ~1.6e16 quantized here),
dequantizing first can differ from the reference's order at fp32's edge (an E8M0 254 gave nan
where the reference gives inf: a dequantized element overflowed and met a zero), and so can the
MMA's own block scaling. The loop notes such a scale as it loads it (one compare per scale byte);
a tile that met one is then recomputed in the reference's order, per 32-group: the partial sum of
fp8 products (one K = 32 dot), times x's scale, then w's (:func:`_reference_order_store`). Tiles
inside the window pay only for that compare.

Quantizer rounding rule (same as ue8m0 in reference.py): scale = 2**ceil(log2(max(amax, 1e-10) /
fp8_max)) with the bit trick of formats.round_scale_ue8m0, E8M0 bits = its float32 exponent field,
q = clamp(x / scale, +-fp8_max). Rounding the scale UP keeps |x| / scale <= fp8_max: nothing
saturates that a float scale would not (the OCP spec's floor rule can clip the block's max).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .configs import GemmConfig
from .quantize import group_quantize
from .tiles import grouped_tile, split_k_range, store_tile

MX_BLOCK = 32

_FORMATS = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}


@triton.jit
def _e8m0_to_f32(bits):
    """uint8 E8M0 bits -> float32 2**(bits - 127); 0 -> 2**-127 (subnormal), 255 -> nan."""
    e = bits.to(tl.int32)
    v = (e << 23).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, 5.877471754111438e-39, v)
    return tl.where(e == 255, float("nan"), v)


@triton.jit
def _scale_groups(q, bits, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, KEEP_F32: tl.constexpr):
    """fp8 tile q [ROWS, BLOCK_K] times its E8M0 scales bits [ROWS, BLOCK_K // 32] (one per 32
    columns), broadcast in registers -> bf16 (fp32 with KEEP_F32: the interpreter's bf16 dot is wrong).
    Exact: see the module docstring."""
    mult = _e8m0_to_f32(bits)
    if KEEP_F32:
        v = tl.reshape(q.to(tl.float32), [ROWS, BLOCK_K // 32, 32]) * mult[:, :, None]
    else:
        # bf16 x bf16 product of exact values is exact; half the registers of fp32 (compiled at
        # 128 x 128 x 128 / 8 warps for sm_90: fp32 used all 255 registers per thread).
        v = tl.reshape(q.to(tl.bfloat16), [ROWS, BLOCK_K // 32, 32]) * mult.to(tl.bfloat16)[:, :, None]
    return tl.reshape(v, [ROWS, BLOCK_K])


#: E8M0 bytes within which the fast loop (operands dequantized before the dot, or the MMA's own
#: block scaling) equals the reference up to fp32 summation order: with both exponents e_x, e_w in
#: [-47, 45] (so their sum in [-94, 90]), every dequantized fp8 value, every product of two, each
#: 32-group's partial sum P (nonzero |P| in [2**-32, 2**36.6] for e5m2, the wider format) times
#: 2**e_x, and that times 2**e_w are fp32 normals, and multiplying by a power of two is then exact,
#: so the order of the two scalings cannot matter. Outside (E8M0 0, 254, 255, scales from a
#: checkpoint, or the quantizer's for a 32-group with amax above 448 * 2**45 ~ 1.6e16; its 1e-10
#: amax floor keeps it above 2**-42), the order can decide between finite, inf and nan: such a
#: tile is redone in the reference's order (:func:`_reference_order_store`).
SAFE_LO: tl.constexpr = tl.constexpr(127 - 47)
SAFE_HI: tl.constexpr = tl.constexpr(127 + 45)


@triton.jit
def _reference_order_store(
    x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_xsm, stride_wsn,
    stride_ym, pid_m, pid_n, pid_k, g_begin, g_end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr, DOT_F32: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Compute and store the tile over 32-groups [g_begin, g_end) in the reference's order: per
    group, the partial sum of fp8 products, times x's scale, then w's, added to an fp32
    accumulator. One K = 32 dot and one promotion of the tile per group: several times the fast
    loop's cost, so only tiles with a scale outside SAFE_LO..SAFE_HI come here. Large tiles run in
    column halves (each with its own accumulator and store) so the registers fit without spills."""
    PARTS: tl.constexpr = 2 if BLOCK_M * BLOCK_N >= 128 * 128 else 1
    SUB_N: tl.constexpr = BLOCK_N // PARTS
    offs = tl.arange(0, 32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    xs_rows = xs_ptr + offs_m.to(tl.int64) * stride_xsm
    for part in tl.static_range(PARTS):
        offs_n = pid_n * BLOCK_N + part * SUB_N + tl.arange(0, SUB_N)
        mask_n = offs_n < N
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        ws_rows = ws_ptr + offs_n.to(tl.int64) * stride_wsn
        if SWAP_AB:
            acc = tl.zeros([SUB_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, SUB_N], dtype=tl.float32)
        for gi in range(g_begin, g_end):
            k = gi * 32 + offs
            a = tl.load(x_rows + k[None, :], mask=mask_m[:, None], other=0.0)
            b = tl.load(w_rows + k[None, :], mask=mask_n[:, None], other=0.0)
            xs = _e8m0_to_f32(tl.load(xs_rows + gi, mask=mask_m, other=127))
            ws = _e8m0_to_f32(tl.load(ws_rows + gi, mask=mask_n, other=127))
            if DOT_F32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            else:
                a, b = a.to(tl.bfloat16), b.to(tl.bfloat16)  # exact: fp8 values are bf16 values
            if SWAP_AB:
                acc += tl.dot(b, tl.trans(a)) * xs[None, :] * ws[:, None]
            else:
                acc += tl.dot(a, tl.trans(b)) * xs[:, None] * ws[None, :]
        store_tile(
            acc, y_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, pid_k, SPLIT_K, SWAP_AB, HAS_BIAS
        )


@triton.jit(noinline=True)
def _reference_order_store_call(
    x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_xsm, stride_wsn,
    stride_ym, pid_m, pid_n, pid_k, g_begin, g_end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr, DOT_F32: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """:func:`_reference_order_store` as a PTX function of its own (the explicit path): its
    registers and loads stay out of the fast loop's (test_triton_lowering counts the loop's loads).
    The sm_100 path inlines it: Triton's tcgen05 / tensor-memory pipeline rejects calls."""
    _reference_order_store(
        x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_xsm, stride_wsn,
        stride_ym, pid_m, pid_n, pid_k, g_begin, g_end, BLOCK_M, BLOCK_N, SPLIT_K, SWAP_AB, DOT_F32, HAS_BIAS,
    )  # fmt: skip


@triton.jit
def _mxfp8_gemm_kernel(
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    NATIVE: tl.constexpr,
    X_FMT: tl.constexpr,
    W_FMT: tl.constexpr,
    DOT_F32: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """y[M, N] (= or += for SPLIT_K > 1) the MX product. Grid: (tiles of M x N, SPLIT_K).
    K % 32 == 0 (validated); a K tail shorter than BLOCK_K is masked to zero."""
    SCALES: tl.constexpr = BLOCK_K // 32
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, SCALES)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    xs_rows = xs_ptr + offs_m.to(tl.int64)[:, None] * stride_xsm
    ws_rows = ws_ptr + offs_n.to(tl.int64)[:, None] * stride_wsn

    t_begin, t_end = split_k_range(pid_k, K, BLOCK_K, SPLIT_K)
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Per row, whether an E8M0 byte this program reads lies outside SAFE_LO..SAFE_HI (from the
    # scale vectors the loop loads anyway; one compare and a 4-wide max per row and K tile). If
    # one does, the fast result may differ from the reference and the tile is redone after the loop.
    x_out = tl.zeros([BLOCK_M], tl.int32)
    w_out = tl.zeros([BLOCK_N], tl.int32)
    for t in range(t_begin, t_end):
        k = t * BLOCK_K + offs_k
        mask_k = k < K
        a = tl.load(x_rows + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        g = t * SCALES + offs_g
        mask_g = g < K // 32
        # One [rows, BLOCK_K // 32] vector of scale bytes per operand and tile (4 bytes per row at
        # BLOCK_K = 128). 127 = 2**0 for the masked tail: its elements are 0, the scale must not be nan.
        sa = tl.load(xs_rows + g[None, :], mask=mask_m[:, None] & mask_g[None, :], other=127)
        sb = tl.load(ws_rows + g[None, :], mask=mask_n[:, None] & mask_g[None, :], other=127)
        x_out |= tl.max(((sa < SAFE_LO) | (sa > SAFE_HI)).to(tl.int32), axis=1)
        w_out |= tl.max(((sb < SAFE_LO) | (sb > SAFE_HI)).to(tl.int32), axis=1)
        if NATIVE:
            if SWAP_AB:
                acc = tl.dot_scaled(b, sb, W_FMT, tl.trans(a), sa, X_FMT, acc)
            else:
                acc = tl.dot_scaled(a, sa, X_FMT, tl.trans(b), sb, W_FMT, acc)
        else:
            af = _scale_groups(a, sa, BLOCK_M, BLOCK_K, DOT_F32)
            bf = _scale_groups(b, sb, BLOCK_N, BLOCK_K, DOT_F32)
            if SWAP_AB:
                acc = tl.dot(bf, tl.trans(af), acc)
            else:
                acc = tl.dot(af, tl.trans(bf), acc)

    edge = tl.max(x_out, axis=0) + tl.max(w_out, axis=0) > 0
    g_begin, g_end = t_begin * SCALES, tl.minimum(t_end * SCALES, K // 32)
    if edge:
        if NATIVE:
            _reference_order_store(
                x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_xsm,
                stride_wsn, stride_ym, pid_m, pid_n, pid_k, g_begin, g_end, BLOCK_M, BLOCK_N, SPLIT_K, SWAP_AB,
                DOT_F32, HAS_BIAS,
            )  # fmt: skip
        else:
            _reference_order_store_call(
                x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_xsm,
                stride_wsn, stride_ym, pid_m, pid_n, pid_k, g_begin, g_end, BLOCK_M, BLOCK_N, SPLIT_K, SWAP_AB,
                DOT_F32, HAS_BIAS,
            )  # fmt: skip
    else:
        store_tile(
            acc, y_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, pid_k, SPLIT_K, SWAP_AB, HAS_BIAS
        )


def native_supported(device: torch.device) -> bool:
    """True where tl.dot_scaled lowers to block-scaled MMA hardware: sm_100 / sm_103."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] == 10


def mxfp8_quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] bf16/fp16/fp32 (K % 32 == 0) -> (q [M, K] ``dtype``, scale_u8 [M, K // 32] uint8 E8M0)."""
    return group_quantize(x, MX_BLOCK, dtype, "ue8m0", e8m0_bits=True)


def launch_mxfp8_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    cfg: GemmConfig,
    native: bool,
) -> torch.Tensor:
    """Run the MX kernel with a fixed config and path (tests and the tuner call this directly).

    x [M, K] fp8, x_scale [M, K // 32] uint8, w [N, K] fp8, w_scale [N, K // 32] uint8 -> y [M, N].
    """
    m, k = x.shape
    n = w.shape[0]
    cfg = cfg.for_problem(MX_BLOCK, k)
    direct = cfg.split_k == 1 and (out_dtype in (torch.float32, torch.float16) or not configs.interpreting())
    y = (torch.empty if cfg.split_k == 1 else torch.zeros)(
        (m, n), dtype=out_dtype if direct else torch.float32, device=x.device
    )
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    _mxfp8_gemm_kernel[grid](
        x, w, x_scale, w_scale, bias if bias is not None else w_scale, y,
        m, n, k, x.stride(0), w.stride(0), x_scale.stride(0), w_scale.stride(0), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        SPLIT_K=cfg.split_k, SWAP_AB=cfg.swap_ab, NATIVE=native, X_FMT=_FORMATS[x.dtype],
        W_FMT=_FORMATS[w.dtype], DOT_F32=configs.interpreting(), HAS_BIAS=bias is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y if y.dtype == out_dtype else y.to(out_dtype)


def mxfp8_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: GemmConfig | None = None,
    native: bool | None = None,
) -> torch.Tensor:
    """Canonical mxfp8_matmul (reference.py): y [M, N] ``out_dtype``.

    High-precision x is quantized first (e4m3fn, one pass); ``native`` defaults to the device's
    support (sm_100) and may be forced for tests (the interpreter runs both paths).
    """
    if x_scale is None:
        x, x_scale = mxfp8_quantize(x, torch.float8_e4m3fn)
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    cfg = config or configs.select("mxfp8", x.device, m, w.shape[0], k, MX_BLOCK)
    use_native = native_supported(x.device) if native is None else native
    return launch_mxfp8_gemm(x, w, w_scale, x_scale.contiguous(), bias, out_dtype, cfg, use_native)
