"""Pallas TPU kernels for the grouped (MoE) ops, gmm and tgmm, megablox-style (pure JAX).

Semantics: :mod:`torch_fp8_blockwise.reference` (grouped section). No host read of group_sizes:
the schedule is built from it with jnp ops inside the traced function and reaches the kernel as
scalar-prefetched SMEM arrays (``PrefetchScalarGridSpec``), so one compiled kernel serves every
group-size assignment and the call lives inside an XLA graph.

Schedule ("visits"). Rows are cut into M tiles of ``tm``. A visit is one (group, M tile) pair
whose rows intersect; groups in order, each over its tiles, so a tile holding a group boundary is
visited once per group in it, consecutively. There are at most ``tiles_m + G - 1`` visits (each
boundary inside a tile adds one): that static bound is the grid's visit axis, and the steps past
the real count (a scalar in SMEM) do nothing.

gmm: grid (N tiles, visits, K tiles). Per visit the K loop runs the block-wise product of
blockwise_matmul.py (one fp8 dot per K quantization block over the full tn width, each partial
scaled by x_scale[m, kb], then by w_scale[g, nb, kb], the reference's order, BEFORE it is accumulated) with the visit's group's
weight, on the whole tile; at the last K step the rows of the visit's group are written into the
output block with one select per tile (the group-boundary mask, once per tile, not per
sub-block). Consecutive visits of a tile keep its output block in VMEM (same block index), so a
boundary tile is assembled from its groups before it is written back. Rows of no group are zeroed
by one select outside the kernel (tiles past sum(group_sizes) are never visited).

tgmm: grid (K tiles, N tiles, visits); out[g] [K, N] accumulates over the visits of group g in an
f32 VMEM scratch (initialised at the group's first visit, stored at its last). The reduction axis
is M, so the sub-channel iteration runs over the M tile: ``tm // block_m`` quantization blocks
(at least 1; a tile smaller than block_m lies inside one block) each give one fp8 dot
``xq[rows].T @ dyq[rows]`` scaled by xs[b, k] (column vector) and dys[b, n] (row vector) before it
is accumulated. (tokamax's tgmm took that count from the K tile: cosine 0.34-0.49 for
tile_m > 128.) Rows outside the group are zeroed in both operands once per tile. Scale blocks sit
at absolute row offsets, so a block straddling a group boundary serves both groups with one scale.
An empty group gets one visit that skips the dots and stores its zero tile, so the kernel writes
every output element once and no pass over the [G, K, N] result follows it (a where over it cost
as much HBM traffic as the kernel's own writes).

Where tgmm quantizes (``TgmmConfig.prequantize``, chosen per shape by tuning.tgmm_best):
prequantized, an XLA pass (:func:`quantize_columns`) reads bf16 x and dy twice and writes fp8
before the kernel reads fp8 tiles + scales; in-kernel (tm >= block_m), the kernel reads the bf16 /
f32 tiles and quantizes each block_m-row block of its tile in VMEM with the same rule, bit for bit:
the amax over every row of the block (a block straddling a group boundary keeps one scale for both
groups; rows past sum(group_sizes) count too, as in the reference), then the group mask once per
tile zeroes the values to quantize (zero quantizes to zero). It saves the prologue's HBM traffic
(v7x model, K=2048 MoE shapes: 1.51x -> 1.26x and 1.26x -> 0.94x of bf16) at the price of VPU
work redone per visit: x once per N tile, dy once per K tile.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .blockwise_matmul import MatmulConfig, _quantize_rows, _round_up, _widen, tile_weight_scale
from .quantize import quantize as _quantize

E4M3_MAX = 448.0
SCALE_EPS = 1e-10
#: tgmm M tiles and K / N tiles that are legal and tested (issue 10's tilings).
TGMM_TILE_M: tuple[int, ...] = (128, 256, 512)
TGMM_TILE_K: tuple[int, ...] = (128, 512, 1024)


# ------------------------------------------------------------------------------------- schedule
def visit_schedule(
    group_sizes: jax.Array, m: int, tm: int, visit_empty: bool = False
) -> tuple[jax.Array, ...]:
    """(group_ids, tile_ids, starts, ends, count) for the visits of ``m`` rows in tiles of tm.

    group_ids / tile_ids: [V] int32 with V = cdiv(m, tm) + G - 1, the group and M tile of each
    visit; starts / ends: [G] int32 row ranges clipped to [0, m]; count: [1] int32 number of real
    visits. Steps past count repeat the last real visit (same blocks: no DMA) and are skipped by the
    kernel. ``visit_empty``: an empty group gets one visit too (at the tile holding its start), so
    tgmm writes its zero output in the kernel; V still bounds the count (the non-empty groups span
    at most cdiv(m, tm) + #non-empty - 1 visits).
    """
    g = group_sizes.shape[0]
    tiles_m = -(-m // tm)
    v_max = tiles_m + g - 1
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = jnp.clip(ends - sizes, 0, m)  # from the unclipped end: a sum > m truncates the last groups
    ends = jnp.clip(ends, 0, m)
    nonempty = ends > starts
    first_tile = starts // tm
    last_tile = jnp.maximum(ends - 1, 0) // tm
    tiles = jnp.where(nonempty, last_tile - first_tile + 1, 1 if visit_empty else 0)
    offsets = jnp.cumsum(tiles)  # inclusive visit offsets per group
    count = offsets[-1]
    v = jnp.arange(v_max, dtype=jnp.int32)
    v_real = jnp.minimum(v, jnp.maximum(count - 1, 0))
    gid = jnp.searchsorted(offsets, v_real, side="right").astype(jnp.int32)
    gid = jnp.minimum(gid, g - 1)
    tid = first_tile[gid] + v_real - (offsets[gid] - tiles[gid])
    tid = jnp.clip(tid, 0, tiles_m - 1).astype(jnp.int32)
    return gid, tid, starts.astype(jnp.int32), ends.astype(jnp.int32), count.reshape(1).astype(jnp.int32)


def _is_first_last(ids: jax.Array, count: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Whether visit v is the first / last of a run of equal ``ids`` (scalar reads from SMEM)."""
    n = count[0]
    first = jnp.logical_or(v == 0, ids[jnp.maximum(v - 1, 0)] != ids[v])
    last = jnp.logical_or(v == n - 1, ids[jnp.minimum(v + 1, ids.shape[0] - 1)] != ids[v])
    return first, last


# ------------------------------------------------------------------------------------------ gmm
def _gmm_kernel(gid_ref, tid_ref, starts_ref, ends_ref, count_ref, *refs, cfg: MatmulConfig) -> None:
    it = iter(refs)
    x_ref = next(it)  # [tm, tk]
    xs_ref = next(it) if cfg.x_mode == "fp8" else None  # [tk/bk, tm, 1]
    w_ref = next(it)  # [tn, tk]
    ws_ref = next(it)  # SMEM [1, (tn/bn) * (tk/bk)]
    out_ref = next(it)  # [tm, tn]
    acc_ref = next(it)  # VMEM [tm, tn] f32

    v, k = pl.program_id(1), pl.program_id(2)
    active = v < count_ref[0]

    @pl.when(k == 0)
    def _init() -> None:
        acc_ref[...] = jnp.zeros_like(acc_ref)

    dot_dtype = jnp.dtype(cfg.dot_dtype)
    precision = lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None
    n_sub, k_sub = cfg.tn // cfg.bn, cfg.tk // cfg.bk

    @pl.when(active)
    def _accumulate() -> None:
        for kk in range(k_sub):
            xk = x_ref[:, pl.ds(kk * cfg.bk, cfg.bk)]
            if cfg.x_mode == "dynamic":
                xk, xs = _quantize_rows(xk)
            elif cfg.x_mode == "fp8":
                xs = xs_ref[kk]
            else:
                xs = None
            partial = lax.dot_general(
                _widen(xk, dot_dtype),
                _widen(w_ref[:, pl.ds(kk * cfg.bk, cfg.bk)], dot_dtype),
                (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
                precision=precision,
            )
            for nn in range(n_sub):
                # The reference's order, (partial * x_scale) * w_scale, as blockwise_matmul._kernel
                # (it decides between finite and inf at fp32's edge; one more VPU multiply per
                # element per K block than the combined scale).
                cols = slice(nn * cfg.bn, (nn + 1) * cfg.bn)
                part = partial[:, cols]
                if xs is not None:
                    part = part * xs
                acc_ref[:, cols] += part * ws_ref[0, nn * k_sub + kk]

    @pl.when(jnp.logical_and(active, k == pl.num_programs(2) - 1))
    def _store() -> None:
        g = gid_ref[v]
        rows = tid_ref[v] * cfg.tm + lax.broadcasted_iota(jnp.int32, (cfg.tm, cfg.tn), 0)
        mine = jnp.logical_and(rows >= starts_ref[g], rows < ends_ref[g])
        out_ref[...] = jnp.where(mine, acc_ref[...].astype(out_ref.dtype), out_ref[...])


def gmm_padded(
    x: jax.Array,
    x_scale: jax.Array | None,
    w: jax.Array,
    w_scale: jax.Array,
    group_sizes: jax.Array,
    cfg: MatmulConfig,
    *,
    interpret: bool = False,
    debug: bool = False,
) -> jax.Array:
    """The pallas_call on tile-aligned operands.

    Args:
        x: [Mp, Kp], Mp % tm == 0, Kp % tk == 0 (fp8 for x_mode "fp8", else bf16 / f32).
        x_scale: [Kp / bk, Mp, 1] float32 for x_mode "fp8", else None.
        w: [G, Np, Kp] fp8, Np % tn == 0.
        w_scale: [G, Np / tn, Kp / tk, 1, (tn / bn) * (tk / bk)] float32 (tile_weight_scale per group).
        group_sizes: [G] int32.

    Returns: [Mp, Np] ``cfg.out_dtype``; rows of no group are UNSPECIFIED here (see :func:`gmm`).
    """
    mp, kp = x.shape
    g, np_, _ = w.shape
    n_sub, k_sub = cfg.tn // cfg.bn, cfg.tk // cfg.bk
    gid, tid, starts, ends, count = visit_schedule(group_sizes, mp, cfg.tm)
    in_specs = [pl.BlockSpec((cfg.tm, cfg.tk), lambda j, v, k, gid, tid, *_: (tid[v], k))]
    args = [x]
    if cfg.x_mode == "fp8":
        in_specs.append(pl.BlockSpec((k_sub, cfg.tm, 1), lambda j, v, k, gid, tid, *_: (k, tid[v], 0)))
        args.append(x_scale)
    in_specs += [
        pl.BlockSpec((None, cfg.tn, cfg.tk), lambda j, v, k, gid, tid, *_: (gid[v], j, k)),
        pl.BlockSpec(
            (None, None, None, 1, n_sub * k_sub),
            lambda j, v, k, gid, tid, *_: (gid[v], j, k, 0, 0),
            memory_space=pltpu.SMEM,
        ),
    ]
    args += [w, w_scale]
    grid = (np_ // cfg.tn, gid.shape[0], kp // cfg.tk)
    return pl.pallas_call(
        functools.partial(_gmm_kernel, cfg=cfg),
        out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.dtype(cfg.out_dtype)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=grid,
            in_specs=in_specs,
            out_specs=pl.BlockSpec((cfg.tm, cfg.tn), lambda j, v, k, gid, tid, *_: (tid[v], j)),
            scratch_shapes=[pltpu.VMEM((cfg.tm, cfg.tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=cfg.vmem_limit_bytes,
        ),
        interpret=interpret,
        debug=debug,
        name=f"fp8_gmm_{cfg.mode}",
    )(gid, tid, starts, ends, count, *args)


def gmm(
    x: jax.Array,
    w: jax.Array,
    w_scale: jax.Array,
    group_sizes: jax.Array,
    x_scale: jax.Array | None,
    *,
    cfg: MatmulConfig,
    out_dtype: str | None = None,
    interpret: bool = False,
    debug: bool = False,
) -> jax.Array:
    """y [Mp, N] = grouped block-wise x @ w[g].T; pads N and K to the tiles, zeroes rows of no group.

    Args:
        x: [Mp, K], Mp % cfg.tm == 0 (the caller pads M). fp8 with ``x_scale`` [Mp, cdiv(K, bk)]
            (x_mode "fp8"), or bf16 / f16 / f32 for "dynamic" / "none".
        w: [G, N, K] fp8; w_scale: [G, cdiv(N, bn), cdiv(K, bk)] float32; group_sizes: [G] int32.
    """
    if x.dtype == jnp.float16:
        x = x.astype(jnp.float32)
    if cfg.x_mode == "fp8" and x_scale is None:
        # Dynamic W8A8 as two kernels (the tuner's choice when re-quantizing x per N tile costs
        # more): the Pallas 1 x bk quantizer, then the fp8-x kernel (blockwise_matmul does the same).
        xq, xs = _quantize(x[None], block=(1, cfg.bk), dtype="float8_e4m3fn", scale_format="fp32",
                           interpret=interpret, debug=debug)  # fmt: skip
        x, x_scale = xq[0], xs[0]
    mp, k = x.shape
    g, n, _ = w.shape
    kp, np_ = _round_up(k, cfg.tk), _round_up(n, cfg.tn)
    kb, nb = kp // cfg.bk, np_ // cfg.bn
    if kp != k:
        x = jnp.pad(x, ((0, 0), (0, kp - k)))
    if kp != k or np_ != n:
        w = jnp.pad(w, ((0, 0), (0, np_ - n), (0, kp - k)))
    ws = w_scale.astype(jnp.float32)
    ws = jnp.pad(ws, ((0, 0), (0, nb - ws.shape[1]), (0, kb - ws.shape[2])))
    ws = jax.vmap(lambda s: tile_weight_scale(s, cfg))(ws)
    xs = None
    if cfg.x_mode == "fp8":
        xs = jnp.pad(x_scale.astype(jnp.float32), ((0, 0), (0, kb - x_scale.shape[1]))).T[:, :, None]
    y = gmm_padded(x, xs, w, ws, group_sizes, cfg, interpret=interpret, debug=debug)
    total = jnp.sum(group_sizes.astype(jnp.int32))
    rows = lax.broadcasted_iota(jnp.int32, (mp, 1), 0)
    y = jnp.where(rows < total, y[:, :n], jnp.zeros((), y.dtype))
    return y if out_dtype is None else y.astype(out_dtype)


# ----------------------------------------------------------------------------------------- tgmm
@dataclasses.dataclass(frozen=True)
class TgmmConfig:
    """Static parameters of one tgmm kernel instance; validates itself.

    tm: M (reduction) tile; tk, tn: output [K, N] tile; block_m: rows per quantization block;
    out_dtype: "bfloat16" / "float32"; mxu: "fp8" (v7x) or "bf16" (v5e / v6e widen in VMEM).
    prequantize: True: an XLA pass quantizes x and dy (:func:`quantize_columns`) and the kernel reads
    fp8 tiles + scales; False: the kernel reads the bf16 / f32 tiles and quantizes each block_m-row
    block of its tile in VMEM (needs tm >= block_m: a tile must hold whole blocks to see their amax).
    The choice is tuning.tgmm_best's, per shape (as blockwise_matmul's prequantize for dynamic W8A8).
    """

    tm: int
    tk: int
    tn: int
    block_m: int
    out_dtype: str = "float32"
    mxu: str = "fp8"
    vmem_limit_bytes: int | None = None
    prequantize: bool = True

    def __post_init__(self) -> None:
        if self.block_m not in (128, 256, 512):
            raise ValueError(f"TgmmConfig.block_m: expected one of (128, 256, 512), got {self.block_m}")
        if self.tm <= 0 or self.tm % 128 or (self.tm % self.block_m and self.block_m % self.tm):
            raise ValueError(
                f"TgmmConfig.tm: expected a positive multiple of 128 that divides or is divided by "
                f"block_m={self.block_m} (a tile must not cut a quantization block unevenly), got {self.tm}"
            )
        for name in ("tk", "tn"):
            if getattr(self, name) <= 0 or getattr(self, name) % 128:
                raise ValueError(
                    f"TgmmConfig.{name}: expected a positive multiple of 128, got {getattr(self, name)}"
                )
        if self.out_dtype not in ("bfloat16", "float32"):
            raise ValueError(
                f"TgmmConfig.out_dtype: expected 'bfloat16' or 'float32', got {self.out_dtype!r}"
            )
        if self.mxu not in ("fp8", "bf16"):
            raise ValueError(f"TgmmConfig.mxu: expected 'fp8' or 'bf16', got {self.mxu!r}")
        if not self.prequantize and self.tm < self.block_m:
            raise ValueError(
                f"TgmmConfig.prequantize=False (in-kernel quantization): expected tm >= block_m (a tile "
                f"must hold whole quantization blocks to compute their amax), got tm={self.tm}, "
                f"block_m={self.block_m}"
            )

    @property
    def sub(self) -> int:
        """Quantization blocks per M tile: the sub-channel count comes from the M tile (tokamax's bug
        took it from the K tile)."""
        return max(1, self.tm // self.block_m)

    @property
    def sub_rows(self) -> int:
        return min(self.tm, self.block_m)


def _quantize_block(raw: jax.Array, vals: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Quantize along ``axis`` (the block_m rows of a block) with one scale per other index.

    raw: the block's f32 values, every row (the amax is taken over finite ones only: ``mag <= f32
    max`` is False for inf and nan); vals: what is quantized, raw or raw with rows zeroed (zero
    quantizes to zero, so zeroing before the division equals zeroing the e4m3 result). Returns
    (e4m3fn clip(vals / scale), f32 scale = max(amax, 1e-10) / 448 with ``axis`` kept as size 1):
    the rule of reference.quantize_columns, bit for bit.
    """
    mag = jnp.abs(raw)
    mag = jnp.where(mag <= jnp.finfo(jnp.float32).max, mag, 0.0)
    amax = jnp.maximum(jnp.max(mag, axis=axis, keepdims=True), SCALE_EPS)
    scale = amax / (E4M3_MAX + 0.0 * amax)  # a true division, as blockwise_matmul._quantize_rows
    return jnp.clip(vals / scale, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn), scale


def quantize_columns(t: jax.Array, block_m: int) -> tuple[jax.Array, jax.Array]:
    """[Mp, C] (Mp % block_m == 0) -> (q [Mp, C] e4m3fn, scale [Mp / block_m, C] f32): the rule
    of reference.quantize_columns (finite amax, max(amax, 1e-10) / 448, clip)."""
    mp, c = t.shape
    tf = t.astype(jnp.float32).reshape(mp // block_m, block_m, c)
    q, scale = _quantize_block(tf, tf, axis=1)
    return q.reshape(mp, c), scale[:, 0, :]


def _tgmm_kernel(gid_ref, tid_ref, starts_ref, ends_ref, count_ref, *refs, cfg: TgmmConfig) -> None:
    if cfg.prequantize:
        x_ref, xs_ref, d_ref, ds_ref, out_ref, acc_ref = refs
        # x_ref [tm, tk] fp8, xs_ref [sub, tk, 1] f32, d_ref [tm, tn] fp8, ds_ref [sub, 1, tn] f32
    else:
        x_ref, d_ref, out_ref, acc_ref = refs  # x_ref [tm, tk], d_ref [tm, tn] bf16 / f32
    v = pl.program_id(2)
    active = v < count_ref[0]
    first, last = _is_first_last(gid_ref, count_ref, v)
    g = gid_ref[v]

    @pl.when(jnp.logical_and(active, first))
    def _init() -> None:
        acc_ref[...] = jnp.zeros_like(acc_ref)

    dot_dtype = jnp.float8_e4m3fn if cfg.mxu == "fp8" else jnp.bfloat16

    lo, hi = starts_ref[g], ends_ref[g]

    def prequantized() -> Callable[[int], None]:
        # The group-boundary mask, once per M tile, on both operands (0 * nan would be nan).
        rows_x = tid_ref[v] * cfg.tm + lax.broadcasted_iota(jnp.int32, (cfg.tm, cfg.tk), 0)
        rows_d = tid_ref[v] * cfg.tm + lax.broadcasted_iota(jnp.int32, (cfg.tm, cfg.tn), 0)
        xm = jnp.where((rows_x >= lo) & (rows_x < hi), x_ref[...].astype(jnp.float32), 0.0)
        dm = jnp.where((rows_d >= lo) & (rows_d < hi), d_ref[...].astype(jnp.float32), 0.0)
        xm, dm = xm.astype(dot_dtype), dm.astype(dot_dtype)

        def block(s: int) -> None:
            rows = slice(s * cfg.sub_rows, (s + 1) * cfg.sub_rows)
            partial = lax.dot_general(
                xm[rows], dm[rows], (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )  # [tk, tn]
            acc_ref[...] += partial * xs_ref[s] * ds_ref[s]

        return block

    def in_kernel() -> Callable[[int], None]:
        # x transposed once per tile ([tk, tm]: M along lanes) so each block's amax comes out as the
        # [tk, 1] column vector that scales the [tk, tn] partial, and the dot is a plain [tk, bm] x
        # [bm, tn] product. The group mask, once per tile, zeroes the values to quantize; the amax
        # reads the unmasked tile (a block straddling a group boundary has one scale for both).
        xt = x_ref[...].astype(jnp.float32).T
        df = d_ref[...].astype(jnp.float32)
        # The row masks as one [1, tm] / [tm, 1] vector broadcast by the select: no [tk, tm] int32
        # iota next to the f32 tiles in VMEM.
        cols_x = tid_ref[v] * cfg.tm + lax.broadcasted_iota(jnp.int32, (1, cfg.tm), 1)
        rows_d = tid_ref[v] * cfg.tm + lax.broadcasted_iota(jnp.int32, (cfg.tm, 1), 0)
        xm = jnp.where((cols_x >= lo) & (cols_x < hi), xt, 0.0)
        dm = jnp.where((rows_d >= lo) & (rows_d < hi), df, 0.0)

        def block(s: int) -> None:
            rows = slice(s * cfg.block_m, (s + 1) * cfg.block_m)
            xq, xs = _quantize_block(xt[:, rows], xm[:, rows], axis=1)  # [tk, bm] e4m3, [tk, 1]
            dq, ds = _quantize_block(df[rows], dm[rows], axis=0)  # [bm, tn] e4m3, [1, tn]
            partial = lax.dot_general(
                _widen(xq, dot_dtype), _widen(dq, dot_dtype), (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32,
            )  # fmt: skip
            acc_ref[...] += partial * xs * ds

        return block

    @pl.when(jnp.logical_and(active, lo < hi))  # an empty group's one visit only stores zeros
    def _accumulate() -> None:
        block = prequantized() if cfg.prequantize else in_kernel()
        if cfg.sub == 1:  # the tile intersects the group: its one block does
            block(0)
            return
        for s in range(cfg.sub):  # quantization blocks of this M tile
            # A block holding no row of the group adds zero: skip its dot (and its quantization; a
            # 256-row group in a 512-row tile needs 2 of its 4 blocks).
            first_row = tid_ref[v] * cfg.tm + s * cfg.sub_rows
            pl.when((first_row < hi) & (first_row + cfg.sub_rows > lo))(functools.partial(block, s))

    @pl.when(jnp.logical_and(active, last))
    def _store() -> None:
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(
    x: jax.Array,
    dy: jax.Array,
    group_sizes: jax.Array,
    *,
    cfg: TgmmConfig,
    out_dtype: str | None = None,
    interpret: bool = False,
    debug: bool = False,
) -> jax.Array:
    """out [G, K, N] = x_g.T @ dy_g with both quantized per (block_m rows x column) at absolute offsets.

    Args:
        x: [M, K], dy: [M, N] bf16 / f16 / f32 (any M: padded here to a multiple of tm and
            block_m with zero rows, which belong to no group and leave every scale unchanged).
            ``cfg.prequantize``: quantized by an XLA pass before the kernel, else in the kernel.
        group_sizes: [G] int32.
    """
    m, k = x.shape
    n = dy.shape[1]
    g = group_sizes.shape[0]
    mp = _round_up(m, max(cfg.tm, cfg.block_m))
    kp, np_ = _round_up(k, cfg.tk), _round_up(n, cfg.tn)
    index = {  # block index maps of the grid (K tile i, N tile j, visit v)
        "x": lambda i, j, v, gid, tid, *_: (tid[v], i),
        "xs": lambda i, j, v, gid, tid, *_: (tid[v], 0, i, 0),
        "dy": lambda i, j, v, gid, tid, *_: (tid[v], j),
        "ds": lambda i, j, v, gid, tid, *_: (tid[v], 0, 0, j),
    }
    if cfg.prequantize:
        x = jnp.pad(x.astype(jnp.float32), ((0, mp - m), (0, kp - k)))
        dy = jnp.pad(dy.astype(jnp.float32), ((0, mp - m), (0, np_ - n)))
        xq, xs = quantize_columns(x, cfg.block_m)
        dq, ds = quantize_columns(dy, cfg.block_m)
        # Scales of each M tile's quantization blocks: [Mp / tm, sub, K, 1] and [Mp / tm, sub, 1, N].
        blocks = (jnp.arange(mp // cfg.tm * cfg.sub) * cfg.sub_rows) // cfg.block_m
        xs_t = xs[blocks].reshape(mp // cfg.tm, cfg.sub, kp)[..., None]
        ds_t = ds[blocks].reshape(mp // cfg.tm, cfg.sub, np_)[:, :, None, :]
        args = (xq, xs_t, dq, ds_t)
        in_specs = [
            pl.BlockSpec((cfg.tm, cfg.tk), index["x"]),
            pl.BlockSpec((None, cfg.sub, cfg.tk, 1), index["xs"]),
            pl.BlockSpec((cfg.tm, cfg.tn), index["dy"]),
            pl.BlockSpec((None, cfg.sub, 1, cfg.tn), index["ds"]),
        ]
    else:
        # The kernel reads x and dy at their own precision (float16 as float32: Mosaic has no f16);
        # zero padding (only where the tiles need it) belongs to no group and moves no amax.
        x, dy = (t.astype(jnp.float32) if t.dtype == jnp.float16 else t for t in (x, dy))
        if (mp, kp) != (m, k):
            x = jnp.pad(x, ((0, mp - m), (0, kp - k)))
        if (mp, np_) != (m, n):
            dy = jnp.pad(dy, ((0, mp - m), (0, np_ - n)))
        args = (x, dy)
        in_specs = [pl.BlockSpec((cfg.tm, cfg.tk), index["x"]), pl.BlockSpec((cfg.tm, cfg.tn), index["dy"])]
    gid, tid, starts, ends, count = visit_schedule(group_sizes, mp, cfg.tm, visit_empty=True)
    grid = (kp // cfg.tk, np_ // cfg.tn, gid.shape[0])
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, cfg=cfg),
        out_shape=jax.ShapeDtypeStruct((g, kp, np_), jnp.dtype(cfg.out_dtype)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=grid,
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, cfg.tk, cfg.tn), lambda i, j, v, gid, tid, *_: (gid[v], i, j)),
            scratch_shapes=[pltpu.VMEM((cfg.tk, cfg.tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=cfg.vmem_limit_bytes,
        ),
        interpret=interpret,
        debug=debug,
        name="fp8_tgmm" if cfg.prequantize else "fp8_tgmm_quantize_in_kernel",
    )(gid, tid, starts, ends, count, *args)
    if (kp, np_) != (k, n):  # a copy of the whole output: tuning's model charges it, so tiles divide K, N
        out = out[:, :k, :n]
    return out if out_dtype is None else out.astype(out_dtype)
