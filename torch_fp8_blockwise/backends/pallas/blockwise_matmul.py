"""Pallas TPU kernel: 2D block-wise FP8 matmul ``y = x @ w.T`` with per-block scales (pure JAX).

Layouts (row-major, as DeepSeek-V3 checkpoints store them):

* ``x``: [M, K]. float8_e4m3fn / e5m2 with ``x_scale`` (W8A8, pre-quantized), or bfloat16 /
  float16 / float32 (``x_mode="dynamic"``: quantized to e4m3fn in VMEM per 1 x bk group;
  ``x_mode="none"``: W8A16, kept at its precision).
* ``x_scale``: [M, cdiv(K, bk)] float32 multipliers (fp8 x only); x ~= x_q * x_scale.
* ``w``: [N, K] float8_e4m3fn / e5m2 (out_features, in_features).
* ``w_scale``: [cdiv(N, bn), cdiv(K, bk)] float32 multipliers; w ~= w_q * w_scale.
* ``bias``: [N] float32 or None.  Output: [M, N] ``out_dtype``.

Grid ``(M / tm, N / tn, K / tk)``, K innermost ("arbitrary", it carries the fp32 accumulator in a
VMEM scratch), M and N "parallel" (megacore / v7x dual TensorCores split them). BlockSpecs give
double-buffered HBM->VMEM copies: block (i, j, k+1) is fetched while block (i, j, k) computes.

Inside one grid step the kernel walks the ``tk / bk`` K quantization blocks of its tile with static
``pl.ds`` slices ("large blocks" mode; ``tn == bn`` and ``tk == bk`` is the "aligned" mode with one
scalar weight scale per step). Per K block it issues ONE fp8 x fp8 -> fp32 ``dot_general`` over
the full ``tn`` width (a [tm, bk] x [bk, tn] product: N needs no split, because the weight scale
only changes every bn columns and is applied to 128-aligned column slices), then multiplies each
bn-column slice of that partial product by ``x_scale[m, kb]``, then by ``w_scale[nb, kb]`` (the
reference's order, which decides between finite and inf at fp32's overflow edge), BEFORE adding it
to the accumulator: the scales vary along K, so scaling after the K loop would be wrong, and the
operands are never dequantized to fp32 before the dot. Cost of the scaling: two multiplies and an
add per output element per K block, on the VPU, against bk MACs on the MXU (W8A16: one multiply).

Where scales live: ``w_scale`` is blocked into SMEM ((tn/bn, tk/bk) scalars per step, read as
scalars: a VMEM block of 1 x 1 would violate the (8, 128) tiling rule); ``x_scale`` is passed
as [cdiv(K, bk), M, 1] so each block (tk/bk, tm, 1) is a column vector that broadcasts along the
lanes of a [tm, bn] partial product.

On chips without an fp8 MXU (v5e, v6e) ``mxu="bf16"`` widens the fp8 VMEM tiles to bf16 right
before the dot (exact: every e4m3/e5m2 value is a bf16 value); HBM traffic stays fp8.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .quantize import quantize as _quantize

QUANT_BLOCKS: tuple[int, ...] = (128, 256, 512)
X_MODES: tuple[str, ...] = ("fp8", "dynamic", "none")
MXU_DTYPES: tuple[str, ...] = ("fp8", "bf16")
FP8_NAMES: tuple[str, ...] = ("float8_e4m3fn", "float8_e5m2")
#: High-precision dtypes a kernel instance takes. Mosaic has no f16 type ("Unsupported type in
#: mosaic dialect: 'f16'", from its layout passes), so float16 x is widened to float32 and a
#: float16 output is produced as float32 and narrowed, both by XLA outside the kernel.
HIGH_NAMES: tuple[str, ...] = ("bfloat16", "float32")
E4M3_MAX = 448.0
SCALE_EPS = 1e-10
#: Unrolled scaled sub-block updates per grid step above this bloat the Mosaic program (code size
#: and compile time grow linearly); 128 covers tn = 2048 x tk = 1024 with 128 x 128 blocks.
MAX_SUBBLOCKS = 128


def kernel_dtype(name: str) -> str:
    """The dtype a kernel instance uses for an x / out dtype of the op: float16 -> float32."""
    return "float32" if name == "float16" else name


def _sublane_tile(dtype_name: str) -> int:
    """Rows of one native VMEM tile: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit types."""
    return 32 // jnp.dtype(dtype_name).itemsize


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Static (compile-time) parameters of one kernel instance; validates itself.

    tm, tn, tk: kernel block (rows of x, rows of w, reduction) held in VMEM per grid step.
    bn, bk: quantization block of w (and 1 x bk groups of x).
    x_dtype, w_dtype, out_dtype: dtype names (jnp.dtype(name) works), x is what enters the kernel.
    x_mode: "fp8" (x fp8 + x_scale), "dynamic" (high-precision x quantized in VMEM), "none" (W8A16).
    mxu: "fp8" = native fp8 dot (v7x); "bf16" = widen fp8 tiles to bf16 in VMEM (v5e / v6e).
    vmem_limit_bytes: Mosaic's scoped VMEM limit, sized from the footprint by tuning.py.
    """

    tm: int
    tn: int
    tk: int
    bn: int
    bk: int
    x_dtype: str
    w_dtype: str
    out_dtype: str
    x_mode: str
    mxu: str = "fp8"
    has_bias: bool = False
    vmem_limit_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("bn", "bk"):
            value = getattr(self, name)
            if value not in QUANT_BLOCKS:
                raise ValueError(f"MatmulConfig.{name}: expected one of {QUANT_BLOCKS}, got {value}")
        if self.x_mode not in X_MODES:
            raise ValueError(f"MatmulConfig.x_mode: expected one of {X_MODES}, got {self.x_mode!r}")
        if self.mxu not in MXU_DTYPES:
            raise ValueError(f"MatmulConfig.mxu: expected one of {MXU_DTYPES}, got {self.mxu!r}")
        if self.w_dtype not in FP8_NAMES:
            raise ValueError(f"MatmulConfig.w_dtype: expected one of {FP8_NAMES}, got {self.w_dtype!r}")
        if self.out_dtype not in HIGH_NAMES:
            raise ValueError(
                f"MatmulConfig.out_dtype: expected one of {HIGH_NAMES} (Mosaic has no f16; use "
                f"kernel_dtype()), got {self.out_dtype!r}"
            )
        allowed_x = FP8_NAMES if self.x_mode == "fp8" else HIGH_NAMES
        if self.x_dtype not in allowed_x:
            raise ValueError(
                f"MatmulConfig.x_dtype: x_mode={self.x_mode!r} expects one of {allowed_x}, got {self.x_dtype!r}"
            )
        # fp8 x arrives as 32-row native tiles; a smaller batch block would be padded by Mosaic.
        row_tile = max(8, _sublane_tile(self.x_dtype), _sublane_tile(self.out_dtype))
        if self.tm <= 0 or self.tm % row_tile:
            raise ValueError(
                f"MatmulConfig.tm (batch block): expected a positive multiple of {row_tile} "
                f"(sublane tile of x {self.x_dtype} / out {self.out_dtype}), got {self.tm}"
            )
        if self.tn <= 0 or self.tn % 128 or self.tn % self.bn:
            raise ValueError(
                f"MatmulConfig.tn (out block): expected a positive multiple of 128 and of bn={self.bn}, "
                f"got {self.tn}"
            )
        if self.tk <= 0 or self.tk % 128 or self.tk % self.bk:
            raise ValueError(
                f"MatmulConfig.tk (in block): expected a positive multiple of 128 and of bk={self.bk}, "
                f"got {self.tk}"
            )
        subblocks = (self.tn // self.bn) * (self.tk // self.bk)
        if subblocks > MAX_SUBBLOCKS:
            raise ValueError(
                f"MatmulConfig: (tn/bn) * (tk/bk) = {subblocks} quantization blocks per grid step "
                f"exceeds {MAX_SUBBLOCKS} (each is an unrolled dot); use smaller tn or tk"
            )

    @property
    def mode(self) -> str:
        """ "aligned" (kernel block = quantization block) or "large" (several per step)."""
        return "aligned" if (self.tn, self.tk) == (self.bn, self.bk) else "large"

    @property
    def dot_dtype(self) -> str:
        """dtype of both dot operands on the MXU."""
        if self.x_mode == "none":
            return "bfloat16" if self.x_dtype == "bfloat16" else "float32"
        x_q = "float8_e4m3fn" if self.x_mode == "dynamic" else self.x_dtype
        # Mixed e4m3 x e5m2 has no single MXU operand type: widen both (exact) to bf16.
        if self.mxu == "bf16" or x_q != self.w_dtype:
            return "bfloat16"
        return x_q


def _widen(v: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Cast a VMEM tile to the dot dtype; fp8 -> bf16 goes through f32 (exact both ways)
    because Mosaic (jax 0.7.1) has no direct fp8 -> bf16 cast ("Unsupported cast")."""
    if v.dtype == dtype:
        return v
    if v.dtype.itemsize == 1 and dtype == jnp.bfloat16:
        v = v.astype(jnp.float32)
    return v.astype(dtype)


def _quantize_rows(xk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[tm, bk] high precision -> ([tm, bk] e4m3fn, [tm, 1] f32 scale), the reference's rule.

    amax over finite values only (``mag <= f32 max`` is False for inf and nan), scale =
    max(amax, 1e-10) / 448, q = clip(x / scale): bit-identical to reference.quantize(x, (1, bk)).
    """
    xf = xk.astype(jnp.float32)
    mag = jnp.abs(xf)
    mag = jnp.where(mag <= jnp.finfo(jnp.float32).max, mag, 0.0)
    amax = jnp.max(mag, axis=1, keepdims=True)
    amax = jnp.maximum(amax, SCALE_EPS)
    # `E4M3_MAX + 0 * amax` == 448 exactly but is not a constant, so XLA keeps a true division
    # (see quantize._exact_div: the reciprocal rewrite moves ~half the scales by 1 ulp).
    scale = amax / (E4M3_MAX + 0.0 * amax)
    q = jnp.clip(xf / scale, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    return q, scale


def _kernel(*refs, cfg: MatmulConfig) -> None:
    """One grid step (i, j, k): acc[tm, tn] += sum over quant blocks of scaled fp32 partials."""
    it = iter(refs)
    x_ref = next(it)  # [tm, tk]
    xs_ref = next(it) if cfg.x_mode == "fp8" else None  # [tk/bk, tm, 1] f32
    w_ref = next(it)  # [tn, tk]
    ws_ref = next(it)  # SMEM [1, (tn/bn) * (tk/bk)] f32, row-major over (nn, kk)
    bias_ref = next(it) if cfg.has_bias else None  # [1, tn] f32
    out_ref = next(it)  # [tm, tn]
    acc_ref = next(it)  # VMEM scratch [tm, tn] f32

    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init() -> None:
        acc_ref[...] = jnp.zeros_like(acc_ref)

    dot_dtype = jnp.dtype(cfg.dot_dtype)
    # f32 operands (W8A16 with f32/f16 x) need the 6-pass bf16 MXU algorithm to stay fp32-exact.
    precision = lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None
    n_sub, k_sub = cfg.tn // cfg.bn, cfg.tk // cfg.bk

    # Activation operand and row scales per K sub-block, shared by all N sub-blocks of the tile.
    xq_blocks: list[jax.Array] = []
    xs_blocks: list[jax.Array | None] = []
    for kk in range(k_sub):
        xk = x_ref[:, pl.ds(kk * cfg.bk, cfg.bk)]
        if cfg.x_mode == "dynamic":
            xk, xs = _quantize_rows(xk)
        elif cfg.x_mode == "fp8":
            xs = xs_ref[kk]
        else:
            xs = None
        xq_blocks.append(_widen(xk, dot_dtype))
        xs_blocks.append(xs)

    for kk in range(k_sub):
        # ONE dot per K quantization block over the whole tn width: w_scale varies along N only
        # per bn columns, so it can be applied to 128-aligned column slices of the product, and a
        # wide N keeps the MXU busy (v7x: 256x256). Only the K direction needs separate dots.
        partial = lax.dot_general(
            xq_blocks[kk],
            _widen(w_ref[:, pl.ds(kk * cfg.bk, cfg.bk)], dot_dtype),
            (((1,), (1,)), ((), ())),  # x @ w.T: contract the K axis of both
            preferred_element_type=jnp.float32,
            precision=precision,
        )  # [tm, tn] f32
        for nn in range(n_sub):
            # Scale this quantization block's partial BEFORE accumulating (scales vary along K),
            # in the reference's order: (partial * x_scale) * w_scale. At fp32's overflow edge the
            # order decides between finite and inf (partial * x_scale may overflow where
            # x_scale * w_scale does not, and inf * 0 is nan), so it must be the reference's.
            # Cost: one more VPU multiply per output element per K block than multiplying by the
            # combined [tm, 1] scale: 3 VPU ops per element (mul, mul, add) instead of 2, against
            # bk = 128..512 MACs per element on the MXU (1 extra VPU op per 128 MXU MACs at
            # bk = 128, per 512 at bk = 512). tuning.py's roofline has no VPU term, so it
            # predicts no change. docs/pallas.md puts the scaling's VPU time at the order of the
            # MXU time on v7x at bk = 128: with VPU ~ MXU time T, a step goes from max(T, T) to
            # max(T, 1.5 T) if the units overlap (up to 1.5x), from 2 T to 2.5 T if not (1.25x);
            # at bk >= 256 the VPU work (0.75 T or less) stays under the MXU's if they overlap.
            # Not measured (no TPU). HBM traffic and MXU work are unchanged.
            cols = slice(nn * cfg.bn, (nn + 1) * cfg.bn)
            part = partial[:, cols]
            if xs_blocks[kk] is not None:
                part = part * xs_blocks[kk]
            acc_ref[:, cols] += part * ws_ref[0, nn * k_sub + kk]

    @pl.when(k == pl.num_programs(2) - 1)
    def _store() -> None:
        acc = acc_ref[...]
        if bias_ref is not None:
            acc = acc + bias_ref[...]
        out_ref[...] = acc.astype(out_ref.dtype)


def _round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def vmem_footprint(cfg: MatmulConfig) -> int:
    """Bytes of VMEM the kernel holds: double-buffered in/out blocks + accumulator + temporaries.

    Blocks are counted at their padded native tile size ((8|16|32) x 128), which is what Mosaic
    allocates: the x_scale block [tk/bk, tm, 1] occupies 128 lanes per row, 128x its payload.
    """

    def tile(rows: int, cols: int, dtype: str) -> int:
        return _round_up(rows, _sublane_tile(dtype)) * _round_up(cols, 128) * jnp.dtype(dtype).itemsize

    buffers = tile(cfg.tm, cfg.tk, cfg.x_dtype) + tile(cfg.tn, cfg.tk, cfg.w_dtype)
    buffers += tile(cfg.tm, cfg.tn, cfg.out_dtype)
    if cfg.x_mode == "fp8":
        buffers += (cfg.tk // cfg.bk) * tile(cfg.tm, 1, "float32")
    if cfg.has_bias:
        buffers += tile(1, cfg.tn, "float32")
    acc = tile(cfg.tm, cfg.tn, "float32")
    # Live values per step: the quantized / widened x sub-blocks, one widened [tn, bk] w slice and
    # one [tm, tn] f32 partial product.
    dot_bytes = jnp.dtype(cfg.dot_dtype).itemsize
    temps = (cfg.tk // cfg.bk) * cfg.tm * cfg.bk * dot_bytes
    temps += cfg.tn * cfg.bk * dot_bytes + tile(cfg.tm, cfg.tn, "float32")
    if cfg.x_mode == "dynamic":
        temps += 2 * tile(cfg.tm, cfg.bk, "float32")  # f32 copy of x and |x| of one sub-block
    return 2 * buffers + acc + temps


def tile_weight_scale(ws: jax.Array, cfg: MatmulConfig) -> jax.Array:
    """[Np/bn, Kp/bk] -> [Np/tn, Kp/tk, 1, (tn/bn)*(tk/bk)]: one contiguous SMEM row per grid step.

    SMEM blocks obey the same (8, 128)-or-full-dim rule as VMEM blocks, so a (1, 1) or (2, 4)
    block of the [NB, KB] scale is illegal; this tiny (1/16384 of the weight) transpose makes each
    step's scales the full trailing dims of a 4D array.
    """
    n_sub, k_sub = cfg.tn // cfg.bn, cfg.tk // cfg.bk
    nb, kb = ws.shape
    ws = ws.reshape(nb // n_sub, n_sub, kb // k_sub, k_sub).transpose(0, 2, 1, 3)
    return ws.reshape(nb // n_sub, kb // k_sub, 1, n_sub * k_sub)


def matmul_padded(
    x: jax.Array,
    x_scale: jax.Array | None,
    w: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None,
    cfg: MatmulConfig,
    *,
    interpret: bool = False,
    debug: bool = False,
) -> jax.Array:
    """The pallas_call on tile-aligned operands.

    Args:
        x: [Mp, Kp] with Mp % tm == 0 and Kp % tk == 0.
        x_scale: [Kp / bk, Mp, 1] float32 (x_mode "fp8") else None.
        w: [Np, Kp] fp8 with Np % tn == 0.
        w_scale: [Np / tn, Kp / tk, 1, (tn / bn) * (tk / bk)] float32: the (tn/bn, tk/bk) scales
            of kernel block (j, k) flattened into one SMEM row (see :func:`tile_weight_scale`).
        bias: [1, Np] float32 or None.

    Returns: [Mp, Np] ``cfg.out_dtype``.
    """
    mp, kp = x.shape
    np_, _ = w.shape
    if mp % cfg.tm or kp % cfg.tk or np_ % cfg.tn:
        raise ValueError(f"matmul_padded: x {x.shape}, w {w.shape} are not multiples of {cfg}")
    n_sub, k_sub = cfg.tn // cfg.bn, cfg.tk // cfg.bk
    in_specs = [pl.BlockSpec((cfg.tm, cfg.tk), lambda i, j, k: (i, k))]
    args = [x]
    if cfg.x_mode == "fp8":
        in_specs.append(pl.BlockSpec((k_sub, cfg.tm, 1), lambda i, j, k: (k, i, 0)))
        args.append(x_scale)
    in_specs += [
        pl.BlockSpec((cfg.tn, cfg.tk), lambda i, j, k: (j, k)),
        pl.BlockSpec((None, None, 1, n_sub * k_sub), lambda i, j, k: (j, k, 0, 0), memory_space=pltpu.SMEM),
    ]
    args += [w, w_scale]
    if cfg.has_bias:
        in_specs.append(pl.BlockSpec((1, cfg.tn), lambda i, j, k: (0, j)))
        args.append(bias)
    grid = (mp // cfg.tm, np_ // cfg.tn, kp // cfg.tk)
    bytes_accessed = (
        x.size * x.dtype.itemsize * grid[1]  # x is re-read once per N tile
        + w.size * w.dtype.itemsize * grid[0]  # w is re-read once per M tile
        + mp * np_ * jnp.dtype(cfg.out_dtype).itemsize
    )
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.dtype(cfg.out_dtype)),
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((cfg.tm, cfg.tn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((cfg.tm, cfg.tn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=cfg.vmem_limit_bytes,
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * mp * np_ * kp, transcendentals=0, bytes_accessed=int(bytes_accessed)
        ),
        interpret=interpret,
        debug=debug,  # prints the kernel jaxpr and Mosaic MLIR while lowering (lowering.py reads it)
        name=f"fp8_blockwise_matmul_{cfg.mode}",
    )(*args)


def blockwise_matmul(
    x: jax.Array,
    w: jax.Array,
    w_scale: jax.Array,
    x_scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    cfg: MatmulConfig,
    out_dtype: str | None = None,
    interpret: bool = False,
    debug: bool = False,
) -> jax.Array:
    """y[Mp, N] = x @ w.T with block scales; pads N and K to the tiles, crops N.

    Args:
        x: [Mp, K], Mp % cfg.tm == 0 (the caller pads M to its bucket). fp8 with ``x_scale`` for
            x_mode "fp8"; bf16 / f16 / f32 for "dynamic" and "none". A high-precision x with
            x_mode "fp8" and no x_scale is dynamic W8A8 run as two kernels: the Pallas quantize
            kernel (1 x bk groups, e4m3fn, the reference's rule) then the fp8-x matmul; the
            tuner picks this when re-quantizing x in every N tile would cost more (tuning.py).
        w: [N, K] fp8. w_scale: [cdiv(N, bn), cdiv(K, bk)] float32.
        x_scale: [Mp, cdiv(K, bk)] float32 for fp8 x, else None.
        bias: [N] any float dtype or None (added in fp32).
        out_dtype: dtype of the result (default ``cfg.out_dtype``); float16 is produced by the
            kernel as float32 and narrowed here. float16 x is widened to float32 here (exact).

    Zero padding is exact: padded K columns add 0 * scale to every sum, padded N rows are cropped.
    Returns: [Mp, N] ``out_dtype``.
    """
    if x.dtype == jnp.float16:
        x = x.astype(jnp.float32)
    if cfg.x_mode == "fp8" and x_scale is None:
        if x.dtype.itemsize == 1:
            raise ValueError(f"blockwise_matmul: fp8 x ({x.dtype}) needs x_scale [M, cdiv(K, {cfg.bk})]")
        if cfg.x_dtype != "float8_e4m3fn":
            raise ValueError(
                f"blockwise_matmul: dynamic W8A8 quantizes x to float8_e4m3fn, cfg has {cfg.x_dtype}"
            )
        xq, xs = _quantize(
            x[None],
            block=(1, cfg.bk),
            dtype="float8_e4m3fn",
            scale_format="fp32",
            interpret=interpret,
            debug=debug,
        )
        x, x_scale = xq[0], xs[0]
    if (x.dtype.itemsize == 1) != (cfg.x_mode == "fp8"):
        raise ValueError(
            f"blockwise_matmul: x is {x.dtype} but cfg.x_mode={cfg.x_mode!r} (x_dtype {cfg.x_dtype})"
        )
    mp, k = x.shape
    n = w.shape[0]
    kp, np_ = _round_up(k, cfg.tk), _round_up(n, cfg.tn)
    kb, nb = kp // cfg.bk, np_ // cfg.bn
    if kp != k:
        x = jnp.pad(x, ((0, 0), (0, kp - k)))
    if kp != k or np_ != n:
        w = jnp.pad(w, ((0, np_ - n), (0, kp - k)))
    ws = w_scale.astype(jnp.float32)
    ws = tile_weight_scale(jnp.pad(ws, ((0, nb - ws.shape[0]), (0, kb - ws.shape[1]))), cfg)
    xs = None
    if cfg.x_mode == "fp8":
        xs = jnp.pad(x_scale.astype(jnp.float32), ((0, 0), (0, kb - x_scale.shape[1])))
        xs = xs.T[:, :, None]  # [Kp/bk, Mp, 1]: one column vector per K block
    b = None
    if bias is not None:
        b = jnp.pad(bias.astype(jnp.float32), (0, np_ - n))[None, :]
    y = matmul_padded(x, xs, w, ws, b, cfg, interpret=interpret, debug=debug)
    y = y[:, :n] if np_ != n else y
    return y if out_dtype is None else y.astype(out_dtype)
