"""Grouped (MoE) block-wise FP8 GEMMs: gmm and tgmm Triton kernels and their launchers.

Semantics: :mod:`torch_fp8_blockwise.reference` (grouped section). Neither launcher reads
group_sizes on the host: the group offsets are an on-device cumsum, and every program finds its
groups itself, so a call can be captured in a CUDA graph with any group sizes.

gmm, ``y[M, N]`` from x [M, K] (fp8 + x_scale [M, cdiv(K, bk)], or high precision for W8A16), w
[G, N, K] fp8, w_scale [G, cdiv(N, bn), cdiv(K, bk)]: grid (cdiv(N, BN), cdiv(M, BM)). An M tile
reads the G inclusive group ends once as one vector and counts ``ends <= row`` for its first and
last row: that gives the range of groups its rows belong to (usually one; two or more when a group
boundary falls inside the tile; none for a tile past sum(group_sizes), which stores zeros). For
each such non-empty group it runs the blockwise K loop of blockwise_matmul.py with w[g], loading
only the rows of that group (others read 0 and add 0), so a boundary tile costs one K loop per
group it touches and no row is computed with a foreign weight.

tgmm, ``out[G, K, N] = x_g^T dy_g``: x and dy are first quantized per (block_m rows x 1 column)
at absolute row offsets by :func:`_column_quant_kernel`, which writes them TRANSPOSED
(xq^T [K, M], dyq^T [N, M]): the reduction axis M is then contiguous in both operands, the
K-major layout fp8 tensor-core MMAs require (wgmma takes fp8 operands only K-major), and the
product is the ``a @ b.T`` form of the blockwise GEMM. Program (K tile x N tile, group g) walks
the M tiles of absolute index ``start // BM .. cdiv(end, BM)``; BM divides block_m, so a tile lies
in one scale block: ``acc += dot(xq^T[k, rows], dyq^T[n, rows].T) * xs[b, k] * dys[b, n]`` with
the row mask (rows of group g) built once per tile and applied to both loads. A scale block that
straddles a group boundary is used by both groups with the same scales (the contract).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from ...formats import SCALE_EPS
from . import configs
from .configs import GemmConfig
from .quantize import _finite_abs, _quant_values, _scale_from_amax, _store_dtype, group_quantize

E4M3_MAX = 448.0
#: Elements per program of the column quantizer (block_m x this / block_m columns): 16384 fp32 =
#: 64 registers per thread at 8 warps.
COLUMN_TILE_ELEMS = 16384


@triton.jit
def _gmm_kernel(
    x_ptr,
    w_ptr,
    xs_ptr,
    ws_ptr,
    ends_ptr,
    sizes_ptr,
    y_ptr,
    M,
    N,
    K,
    G,
    stride_xm,
    stride_wg,
    stride_wn,
    stride_xsm,
    stride_wsg,
    stride_wsn,
    stride_ym,
    SCALE_BN: tl.constexpr,
    SCALE_BK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    W8A16: tl.constexpr,
    IEEE_F32: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """y[rows of group g] = blockwise(x[rows], w[g]); rows of no group = 0. Grid (N tiles, M tiles)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # Groups of this tile's first and last row: group(row) = #{g : end[g] <= row}.
    gid = tl.arange(0, BLOCK_G)
    ends = tl.load(ends_ptr + gid, mask=gid < G, other=2147483647)  # padding lanes: past any row
    first_row = pid_m * BLOCK_M
    last_row = tl.minimum(first_row + BLOCK_M, M) - 1
    g_first = tl.sum((ends <= first_row).to(tl.int32), axis=0)
    g_last = tl.minimum(tl.sum((ends <= last_row).to(tl.int32), axis=0), G - 1)

    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    xs_rows = xs_ptr + offs_m * stride_xsm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(g_first, g_last + 1):
        end = tl.load(ends_ptr + g)
        start = end - tl.load(sizes_ptr + g)
        if end > start:
            in_group = mask_m & (offs_m >= start) & (offs_m < end)
            w_rows = w_ptr + tl.cast(g, tl.int64) * stride_wg + offs_n.to(tl.int64)[:, None] * stride_wn
            ws_rows = ws_ptr + g * stride_wsg + (offs_n // SCALE_BN) * stride_wsn
            for t in range(0, tl.cdiv(K, BLOCK_K)):
                k = t * BLOCK_K + offs_k
                mask_k = k < K
                a = tl.load(x_rows + k[None, :], mask=in_group[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                kb = (t * BLOCK_K) // SCALE_BK
                ws = tl.load(ws_rows + kb, mask=mask_n, other=0.0)
                if W8A16:
                    b = b.to(a.dtype)
                if DOT_F32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if IEEE_F32:
                    part = tl.dot(a, tl.trans(b), input_precision="ieee")
                else:
                    part = tl.dot(a, tl.trans(b))
                if W8A16:
                    acc += part * ws[None, :]
                else:
                    xs = tl.load(xs_rows + kb, mask=in_group, other=0.0)
                    acc += part * xs[:, None] * ws[None, :]

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _column_quant_kernel(
    x_ptr,
    qt_ptr,
    s_ptr,
    rows,
    cols,
    stride_x,
    stride_qt,
    stride_s,
    SCALE_BM: tl.constexpr,
    COLS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    EPS: tl.constexpr,
):
    """x [rows, cols] -> q^T [cols, Mp] e4m3 and s [cdiv(rows, SCALE_BM), cols] float32: one scale
    per column and block of SCALE_BM rows (absolute offsets). Program (row block, column tile).
    Mp = cdiv(rows, SCALE_BM) * SCALE_BM: the rows past ``rows`` are written as 0, so the tgmm
    kernel loads whole M tiles without a mask along M (its contiguous axis)."""
    rb = tl.program_id(0)
    r = rb * SCALE_BM + tl.arange(0, SCALE_BM)
    c = tl.program_id(1) * COLS + tl.arange(0, COLS)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    x = tl.load(x_ptr + r.to(tl.int64)[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = _scale_from_amax(tl.max(_finite_abs(x), axis=0), FP8_MAX, EPS, False)
    q = _quant_values(x, scale[None, :], FP8_MAX)
    q_ptrs = qt_ptr + c.to(tl.int64)[None, :] * stride_qt + r[:, None]
    tl.store(q_ptrs, q.to(qt_ptr.dtype.element_ty), mask=(c < cols)[None, :])
    tl.store(s_ptr + rb * stride_s + c, scale, mask=c < cols)


@triton.jit
def _tgmm_kernel(
    xt_ptr,
    dt_ptr,
    xs_ptr,
    ds_ptr,
    ends_ptr,
    sizes_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xt,
    stride_dt,
    stride_xsb,
    stride_dsb,
    stride_og,
    stride_ok,
    SCALE_BM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[g, k, n] = sum over M tiles of group g of (xq^T[k, rows] . dyq^T[n, rows]) * xs[b, k] * dys[b, n].

    BLOCK_K / BLOCK_N tile the OUTPUT [K, N]; BLOCK_M is the reduction tile (divides SCALE_BM).
    Grid (cdiv(K, BLOCK_K) * cdiv(N, BLOCK_N), G).
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    grid_n = tl.cdiv(N, BLOCK_N)
    offs_k = (pid // grid_n) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = (pid % grid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    end = tl.minimum(tl.load(ends_ptr + g), M)
    start = tl.maximum(tl.load(ends_ptr + g) - tl.load(sizes_ptr + g), 0)

    xt_rows = xt_ptr + offs_k.to(tl.int64)[:, None] * stride_xt
    dt_rows = dt_ptr + offs_n.to(tl.int64)[:, None] * stride_dt
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for t in range(start // BLOCK_M, tl.cdiv(end, BLOCK_M)):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        # Whole-tile loads (masked along K / N only, so they vectorize and pipeline along the
        # contiguous M axis), then the group-boundary mask once per tile on both operands: 0 * nan
        # would be nan, so a foreign row must be zero in both.
        in_group = (rows >= start) & (rows < end)
        a = tl.load(xt_rows + rows[None, :], mask=mask_k[:, None], other=0.0)
        b = tl.load(dt_rows + rows[None, :], mask=mask_n[:, None], other=0.0)
        a = tl.where(in_group[None, :], a, tl.zeros_like(a))
        b = tl.where(in_group[None, :], b, tl.zeros_like(b))
        part = tl.dot(a, tl.trans(b))
        sb = (t * BLOCK_M) // SCALE_BM
        xs = tl.load(xs_ptr + sb * stride_xsb + offs_k, mask=mask_k, other=0.0)
        ds = tl.load(ds_ptr + sb * stride_dsb + offs_n, mask=mask_n, other=0.0)
        acc += part * xs[:, None] * ds[None, :]

    out_ptrs = (
        out_ptr + g.to(tl.int64) * stride_og + offs_k.to(tl.int64)[:, None] * stride_ok + offs_n[None, :]
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


# ------------------------------------------------------------------------------------ launchers
def _out_buffer_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """The interpreter rounds bf16 stores wrongly (NOTES.md): store fp32 there and cast in torch."""
    return out_dtype if out_dtype != torch.bfloat16 or not configs.interpreting() else torch.float32


def _ends(group_sizes: torch.Tensor) -> torch.Tensor:
    """Inclusive group ends, computed on the device (no host sync)."""
    return torch.cumsum(group_sizes, dim=0, dtype=torch.int32)


def gmm_tiles(kernel: str, arch: int, rows: int, x_bytes: int = 2) -> GemmConfig:
    """Tiles for gmm given the average rows per group (decode MoE has a few rows per expert).

    block_m >= 64: a 16-row tile compiled to mma.sync with fp8 widened to f16 on sm_90 / sm_100
    (wgmma and tcgen05 need 64 rows), so decode takes 64-row tiles (64 x 128 fp32 needs 8 warps:
    4 spilled in the blockwise kernel). sm_120's 255 registers spilled 16 B at 128 x 128 x 128 /
    8 warps here (one more loop level than the blockwise kernel), and so did sm_90 under triton 3.5
    (112 B for W8A8, 8 B for W8A16; 3.9 did not): 128 x 64 everywhere. On sm_120 W8A16's bf16
    operands at 128 x 64 x 128 / 2 stages still spilled 32 B (254 registers, triton 3.5): 64 x 64
    for W8A16 on sm_120. fp32 x (W8A16)
    takes the blockwise heuristic's non-spilling 64 x 64 x 32 (configs.heuristic). Then as many
    stages (<= 4) as shared memory allows (configs.fits).
    """
    if kernel == "w8a16" and x_bytes == 4:
        cfg = GemmConfig(block_m=64, block_n=64, block_k=32, group_m=1, num_warps=8)
    else:
        cfg = GemmConfig(
            block_m=64 if rows <= 64 or (arch == 120 and kernel == "w8a16") else 128,
            block_n=64, block_k=128, group_m=1,
            num_warps=8,
        )  # fmt: skip
    for stages in (4, 3, 2):
        cand = replace(cfg, num_stages=stages)
        if configs.fits(cand, kernel, arch, x_bytes):
            return cand
    return replace(cfg, num_stages=2, block_k=64)


def gmm_config(
    kernel: str, device: torch.device, m: int, k: int, g: int, bk: int, x_bytes: int = 2
) -> GemmConfig:
    """:func:`gmm_tiles` for this device and problem (rows per group = cdiv(M, G), no host read)."""
    return gmm_tiles(kernel, configs.device_arch(device), max(1, -(-m // g)), x_bytes).for_problem(bk, k)


def launch_gmm(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    group_sizes: torch.Tensor,
    block_shape: tuple[int, int],
    x_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
    cfg: GemmConfig,
) -> torch.Tensor:
    """gmm with a fixed config. x [M, K] fp8 with x_scale [M, cdiv(K, bk)] (W8A8) or high precision
    with x_scale None (W8A16); w [G, N, K] fp8; w_scale [G, cdiv(N, bn), cdiv(K, bk)] f32;
    group_sizes [G] int32 (read only on the device) -> y [M, N] ``out_dtype``."""
    bn, bk = block_shape
    m, k = x.shape
    g, n, _ = w.shape
    cfg = cfg.for_problem(bk, k)
    y = torch.empty((m, n), dtype=_out_buffer_dtype(out_dtype), device=x.device)
    w8a16 = x_scale is None
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
    _gmm_kernel[grid](
        x, w, x_scale if x_scale is not None else w_scale, w_scale, _ends(group_sizes), group_sizes, y,
        m, n, k, g, x.stride(0), w.stride(0), w.stride(1), x_scale.stride(0) if x_scale is not None else 0,
        w_scale.stride(0), w_scale.stride(1), y.stride(0),
        SCALE_BN=bn, SCALE_BK=bk, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_G=triton.next_power_of_2(g), W8A16=w8a16, IEEE_F32=x.dtype == torch.float32,
        DOT_F32=configs.interpreting() and x.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y if y.dtype == out_dtype else y.to(out_dtype)


def grouped_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    group_sizes: torch.Tensor,
    block_shape: tuple[int, int],
    x_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Canonical grouped_matmul (reference.py): y [M, N] ``out_dtype``.

    activation "dynamic" with high-precision x: x is quantized per 1 x bk group (the blockwise
    group kernel, one pass over x), then the W8A8 kernel; "none": the W8A16 kernel on x as is.
    """
    bk = block_shape[1]
    if x_scale is None and activation == "dynamic":
        x, x_scale = group_quantize(x, bk, torch.float8_e4m3fn, "fp32")
    kernel = "w8a16" if x_scale is None else "w8a8"
    x_bytes = x.element_size() if kernel == "w8a16" else 1
    m, k = x.shape
    cfg = config or gmm_config(kernel, x.device, m, k, w.shape[0], bk, x_bytes)
    return launch_gmm(x, w, w_scale, group_sizes, block_shape, x_scale, out_dtype, cfg)


def quantize_columns_t(t: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t [M, C] -> (q^T [C, Mp] float8_e4m3fn, scale [cdiv(M, block_m), C] float32): the tgmm
    operand quantization of reference.quantize_columns, stored transposed (M contiguous) and
    zero-padded to Mp = cdiv(M, block_m) * block_m rows."""
    rows, cols = t.shape
    s = torch.empty((-(-rows // block_m), cols), dtype=torch.float32, device=t.device)
    q_t = torch.empty((cols, s.shape[0] * block_m), dtype=_store_dtype(torch.float8_e4m3fn), device=t.device)
    tile_cols = COLUMN_TILE_ELEMS // block_m
    _column_quant_kernel[(s.shape[0], triton.cdiv(cols, tile_cols))](
        t, q_t, s, rows, cols, t.stride(0), q_t.stride(0), s.stride(0),
        SCALE_BM=block_m, COLS=tile_cols, FP8_MAX=E4M3_MAX, EPS=SCALE_EPS, num_warps=8,
    )  # fmt: skip
    return q_t.to(torch.float8_e4m3fn), s


def tgmm_tiles(arch: int) -> GemmConfig:
    """Tiles for tgmm in GEMM terms: block_m x block_n tile the output [K, N], block_k is the
    reduction tile over M (shrunk by for_problem to divide block_m, so it never straddles two
    scale blocks). 128 x 64 x 128 at 8 warps: 128 x 128 spilled 8-24 B on sm_90 at 3-4 stages
    (the masked operands pass through registers), 128 x 64 uses 169 registers and 4 stages."""
    cfg = GemmConfig(block_m=128, block_n=64, block_k=128, group_m=1, num_warps=8)
    for stages in (4, 3, 2):
        cand = replace(cfg, num_stages=stages)
        if configs.fits(cand, "w8a8", arch, 1):
            return cand
    return replace(cfg, num_stages=2, block_k=64)


def tgmm_config(device: torch.device, m: int, block_m: int) -> GemmConfig:
    return tgmm_tiles(configs.device_arch(device)).for_problem(block_m, m)


def grouped_matmul_transposed(
    x: torch.Tensor,
    dy: torch.Tensor,
    group_sizes: torch.Tensor,
    block_m: int,
    out_dtype: torch.dtype,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Canonical grouped_matmul_transposed (reference.py): out [G, K, N] ``out_dtype``."""
    m, k = x.shape
    n = dy.shape[1]
    g = group_sizes.shape[0]
    x_t, xs = quantize_columns_t(x, block_m)
    d_t, ds = quantize_columns_t(dy, block_m)
    cfg = (config or tgmm_config(x.device, m, block_m)).for_problem(block_m, m)
    out = torch.empty((g, k, n), dtype=_out_buffer_dtype(out_dtype), device=x.device)
    grid = (triton.cdiv(k, cfg.block_m) * triton.cdiv(n, cfg.block_n), g)
    _tgmm_kernel[grid](
        x_t, d_t, xs, ds, _ends(group_sizes), group_sizes, out, m, n, k,
        x_t.stride(0), d_t.stride(0), xs.stride(0), ds.stride(0), out.stride(0), out.stride(1),
        SCALE_BM=block_m, BLOCK_M=cfg.block_k, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out if out.dtype == out_dtype else out.to(out_dtype)


# ------------------------------------------------------------------- offline compile rows (lowering.py)
#: MoE problems whose configs ship: (M rows, N, K, G experts): DeepSeek-V3 (256 experts, hidden 7168,
#: expert width 2048) at decode and prefill, Qwen3-MoE-like 128 experts at hidden 2048.
PROBLEMS: tuple[tuple[int, int, int, int], ...] = (
    (256, 2048, 7168, 256),
    (65536, 2048, 7168, 256),
    (65536, 7168, 2048, 256),
    (16384, 768, 2048, 128),
)

#: Kernel names of lowering.Job for this file: "<op>.<mma kind>", so lowering.py finds the MMA
#: pattern of the kind after the dot.
KERNELS: tuple[str, ...] = ("gmm.w8a8", "gmm.w8a16", "tgmm.w8a8", "tgmm.quant")


def kernel_fn(kernel: str):
    """The @triton.jit function behind a lowering Job kernel name of :data:`KERNELS`."""
    return {
        "gmm.w8a8": _gmm_kernel,
        "gmm.w8a16": _gmm_kernel,
        "tgmm.w8a8": _tgmm_kernel,
        "tgmm.quant": _column_quant_kernel,
    }[kernel]


def lowering_jobs(arch: int, quick: bool = False) -> list:
    """lowering.Job rows: the configs gmm_config / tgmm_config pick for :data:`PROBLEMS` on ``arch``
    (``quick``: the decode and the first prefill problem, block_m 128 only), and the column
    quantizer for each block_m."""
    from .lowering import _job

    jobs = []
    seen = set()
    block_ms = (128,) if quick else (128, 256, 512)
    for m, _n, k, g in PROBLEMS[:2] if quick else PROBLEMS:
        rows = max(1, -(-m // g))
        for kernel in ("w8a8", "w8a16"):
            cfg = gmm_tiles(kernel, arch, rows).for_problem(128, k)
            if ("gmm", kernel, cfg) in seen:
                continue
            seen.add(("gmm", kernel, cfg))
            sig = {
                "x_ptr": "*fp8e4nv" if kernel == "w8a8" else "*bf16", "w_ptr": "*fp8e4nv", "xs_ptr": "*fp32",
                "ws_ptr": "*fp32", "ends_ptr": "*i32", "sizes_ptr": "*i32", "y_ptr": "*bf16",
                **{a: "i32" for a in ("M", "N", "K", "G", "stride_xm", "stride_wg", "stride_wn", "stride_xsm",
                                      "stride_wsg", "stride_wsn", "stride_ym")},
            }  # fmt: skip
            consts = {
                "SCALE_BN": 128, "SCALE_BK": 128, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                "BLOCK_K": cfg.block_k, "BLOCK_G": triton.next_power_of_2(g), "W8A16": kernel == "w8a16",
                "IEEE_F32": False, "DOT_F32": False,
            }  # fmt: skip
            label = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} s{cfg.num_stages} w{cfg.num_warps} G{g}"
            jobs.append(_job(f"gmm.{kernel}", label, arch, sig, consts, cfg.num_warps, cfg.num_stages))
        for block_m in block_ms:
            cfg = tgmm_tiles(arch).for_problem(block_m, m)
            if ("tgmm", block_m, cfg) in seen:
                continue
            seen.add(("tgmm", block_m, cfg))
            sig = {
                "xt_ptr": "*fp8e4nv", "dt_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "ds_ptr": "*fp32", "ends_ptr": "*i32",
                "sizes_ptr": "*i32", "out_ptr": "*bf16",
                **{a: "i32" for a in ("M", "N", "K", "stride_xt", "stride_dt", "stride_xsb", "stride_dsb",
                                      "stride_og", "stride_ok")},
            }  # fmt: skip
            consts = {
                "SCALE_BM": block_m,
                "BLOCK_M": cfg.block_k,
                "BLOCK_N": cfg.block_n,
                "BLOCK_K": cfg.block_m,
            }
            label = (
                f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} s{cfg.num_stages} w{cfg.num_warps} bm{block_m}"
            )
            jobs.append(_job("tgmm.w8a8", label, arch, sig, consts, cfg.num_warps, cfg.num_stages))
    for block_m in block_ms:
        sig = {
            "x_ptr": "*bf16", "qt_ptr": "*fp8e4nv", "s_ptr": "*fp32",
            **{a: "i32" for a in ("rows", "cols", "stride_x", "stride_qt", "stride_s")},
        }  # fmt: skip
        consts = {
            "SCALE_BM": block_m,
            "COLS": COLUMN_TILE_ELEMS // block_m,
            "FP8_MAX": E4M3_MAX,
            "EPS": SCALE_EPS,
        }
        jobs.append(_job("tgmm.quant", f"{block_m}x1 bf16->e4m3 (q^T)", arch, sig, consts, 8, 3))
    return jobs
