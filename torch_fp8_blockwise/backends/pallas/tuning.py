"""Block sizes for the Pallas matmul: tuned table, heuristic fallback, VMEM and roofline model.

Pure Python + JAX dtypes (no torch). The table lives in ``torch_fp8_blockwise/data/tpu/
blockwise_matmul.json``; one entry per key

    (generation, m_bucket, n, k, bn, bk, x_mode, x_dtype, w_dtype) -> (tm, tn, tk)

with ``"source"``: ``"model"`` (chosen by :func:`model_best`, i.e. the roofline model below,
never timed) or ``"measured"`` (written by ``scripts/tune_pallas.py --measure`` on a TPU).
A key missing from the table falls back to :func:`model_best` and logs that ONCE per key.

The model (all numbers per chip, public Google Cloud TPU pages; see docs/pallas.md):

==========  ========  ============  ==============  ===============  ============
generation  VMEM/TC   HBM GB/s      bf16 TFLOP/s    fp8 TFLOP/s      MXU
==========  ========  ============  ==============  ===============  ============
v5e         128 MiB   819           197             - (bf16 path)    4x 128x128
v6e         128 MiB   1640          918             - (bf16 path)    2x 256x256
v7x         64 MiB    7370          2307            4614             256x256, fp8
==========  ========  ============  ==============  ===============  ============

time(step) = max(flops / peak, bytes / bandwidth) + 0.35 us grid-step overhead, where bytes are the
HBM->VMEM copies of the step (x and w tiles and their scales, plus the output tile once per (i, j))
and peak is scaled down when the batch block under-fills the MXU rows (tm < MXU rows) or a K
quantization block under-fills its contraction depth (bk = 128 on a 256-deep v6e / v7x MXU: 50%).
Not modelled: the VPU work of the scaling (per output element per K block, a multiply by the x
scale, a multiply by the w scale and an add, in the reference's order; against bk MACs on the MXU),
which the TPU tuner measures.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Iterable
from typing import NamedTuple

import jax.numpy as jnp

from .blockwise_matmul import MatmulConfig, vmem_footprint

log = logging.getLogger(__name__)

TABLE_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "data", "tpu", "blockwise_matmul.json")

#: Fixed cost of one grid step (pipeline bookkeeping + DMA issue), from the Pallas TPU docs'
#: matmul study: ~0.35 us, which is why tiny blocks lose even when they fit.
STEP_OVERHEAD_S = 0.35e-6
#: Part of VMEM a kernel may claim; the rest is Mosaic's internal scratch and spill room.
VMEM_USABLE = 0.75


@dataclasses.dataclass(frozen=True)
class TpuSpec:
    """Per-chip budgets of one TPU generation (see the module table)."""

    name: str
    vmem_bytes: int
    hbm_bytes_per_s: float
    bf16_flops: float
    fp8_flops: float | None  # None: no fp8 MXU, fp8 tiles are widened to bf16 in VMEM
    mxu_rows: int  # rows streamed per pass: a batch block below this leaves the MXU part idle
    mxu_k: int  # contraction depth of one MXU pass: a bk-deep dot fills bk / mxu_k of it

    @property
    def mxu(self) -> str:
        return "fp8" if self.fp8_flops else "bf16"

    def peak_flops(self, dot_dtype: str) -> float:
        if dot_dtype.startswith("float8") and self.fp8_flops:
            return self.fp8_flops
        if dot_dtype == "float32":
            return self.bf16_flops / 6  # HIGHEST precision: 6 bf16 passes
        return self.bf16_flops


MiB = 1 << 20
GENERATIONS: dict[str, TpuSpec] = {
    "v5e": TpuSpec("v5e", 128 * MiB, 819e9, 197e12, None, 128, 128),
    "v6e": TpuSpec("v6e", 128 * MiB, 1640e9, 918e12, None, 256, 256),
    "v7x": TpuSpec("v7x", 64 * MiB, 7370e9, 2307e12, 4614e12, 256, 256),
}
#: What a CPU-hosted run (interpret mode, lowering checks) plans for: the kernel's design target.
DEFAULT_GENERATION = "v7x"

#: M is padded up to one of these (then to multiples of the last) so a new batch size reuses a
#: traced kernel: 32 covers the 32-row fp8 sublane tile, so decode (M = 1..32) is one bucket.
M_BUCKETS: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)


def m_bucket(m: int) -> int:
    """Padded M: the smallest bucket >= m, or m rounded up to a multiple of 1024 (<= 1/2 waste
    below 1024, <= 1024 rows above; every bucket is a multiple of 32)."""
    if m <= 0:
        raise ValueError(f"m: expected a positive row count, got {m}")
    for b in M_BUCKETS:
        if m <= b:
            return b
    return -(-m // M_BUCKETS[-1]) * M_BUCKETS[-1]


def generation_from_device_kind(kind: str) -> str:
    """Map jax's ``device.device_kind`` ("TPU v5 lite", "TPU v6e", "TPU7x", ...) to a table key."""
    k = kind.lower().replace(" ", "")
    if "v5lite" in k or "v5e" in k:
        return "v5e"
    if "v6" in k:
        return "v6e"
    if "7x" in k or "v7" in k:
        return "v7x"
    # v4 / v5p: no fp8 MXU either; plan with the smallest budgets we model.
    log.warning("fp8 pallas: TPU kind %r is not modelled; planning with v5e budgets", kind)
    return "v5e"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One matmul as the tuner sees it: padded M bucket, N, K, quant block, modes and dtypes."""

    m: int
    n: int
    k: int
    bn: int
    bk: int
    x_mode: str
    x_dtype: str
    w_dtype: str
    out_dtype: str = "bfloat16"
    has_bias: bool = False

    def config(self, tm: int, tn: int, tk: int, spec: TpuSpec) -> MatmulConfig:
        """A validated MatmulConfig whose VMEM limit is sized from its own footprint."""
        cfg = MatmulConfig(
            tm, tn, tk, self.bn, self.bk, self.x_dtype, self.w_dtype, self.out_dtype,
            self.x_mode, spec.mxu, self.has_bias,
        )  # fmt: skip
        return dataclasses.replace(cfg, vmem_limit_bytes=vmem_limit(cfg, spec))


def scoped_vmem_limit(need: int, spec: TpuSpec, what: str) -> int:
    """Scoped VMEM limit for Mosaic from a kernel's footprint ``need`` (bytes): need + 25% + 2 MiB for
    Mosaic's own scratch, rounded up to 1 MiB; ValueError naming ``what`` (the tiles) when the
    footprint exceeds the usable part of the generation's VMEM. The one rule of every kernel here."""
    budget = int(spec.vmem_bytes * VMEM_USABLE)
    if need > budget:
        raise ValueError(
            f"{what}: VMEM footprint {need / MiB:.1f} MiB exceeds {VMEM_USABLE:.0%} of {spec.name}'s "
            f"{spec.vmem_bytes // MiB} MiB"
        )
    return min(spec.vmem_bytes, -(-(need * 5 // 4 + 2 * MiB) // MiB) * MiB)


def vmem_limit(cfg: MatmulConfig, spec: TpuSpec) -> int:
    """:func:`scoped_vmem_limit` of the matmul kernel's :func:`vmem_footprint`."""
    return scoped_vmem_limit(vmem_footprint(cfg), spec, f"block sizes tm={cfg.tm}, tn={cfg.tn}, tk={cfg.tk}")


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Model of one kernel launch (see the module docstring)."""

    steps: int
    flops: float
    hbm_bytes: float  # what the kernel actually moves (x re-read per N tile, w per M tile)
    min_bytes: float  # each operand once: the bandwidth floor of the problem
    step_bytes: float  # bytes copied HBM->VMEM per grid step
    intensity: float  # flops per HBM byte moved
    time_s: float
    mxu_util: float  # achieved / peak flops
    hbm_util: float  # min_bytes / time vs bandwidth
    bound: str  # "compute" or "memory"


def roofline(p: Problem, cfg: MatmulConfig, spec: TpuSpec) -> Roofline:
    mp = -(-p.m // cfg.tm) * cfg.tm
    np_ = -(-p.n // cfg.tn) * cfg.tn
    kp = -(-p.k // cfg.tk) * cfg.tk
    gi, gj, gk = mp // cfg.tm, np_ // cfg.tn, kp // cfg.tk
    xb, wb = jnp.dtype(cfg.x_dtype).itemsize, jnp.dtype(cfg.w_dtype).itemsize
    ob = jnp.dtype(cfg.out_dtype).itemsize
    x_scale_b = 4 * cfg.tm * (cfg.tk // cfg.bk) if cfg.x_mode == "fp8" else 0
    step_bytes = cfg.tm * cfg.tk * xb + cfg.tn * cfg.tk * wb + x_scale_b
    step_bytes += 4 * (cfg.tn // cfg.bn) * (cfg.tk // cfg.bk)
    steps = gi * gj * gk
    hbm = steps * step_bytes + mp * np_ * ob
    min_bytes = p.m * p.k * jnp.dtype(p.x_dtype).itemsize + p.n * p.k * wb + p.m * p.n * ob
    flops = 2.0 * mp * np_ * kp
    # One dot per K quantization block: a 128-deep dot on a 256-deep MXU (v6e, v7x) runs at half
    # rate, the price of 2D scales (each K block's partial must be scaled before accumulation).
    fill = min(1.0, cfg.tm / spec.mxu_rows) * min(1.0, cfg.bk / spec.mxu_k)
    peak = spec.peak_flops(cfg.dot_dtype) * fill
    t_step = max(2.0 * cfg.tm * cfg.tn * cfg.tk / peak, step_bytes / spec.hbm_bytes_per_s)
    time_s = steps * (t_step + STEP_OVERHEAD_S) + mp * np_ * ob / spec.hbm_bytes_per_s
    if prequantizes(p, cfg):
        q_bytes, q_steps = quantize_pass(p)
        hbm += q_bytes
        time_s += q_bytes / spec.hbm_bytes_per_s + q_steps * STEP_OVERHEAD_S
    useful = 2.0 * p.m * p.n * p.k
    bound = (
        "compute" if 2.0 * cfg.tm * cfg.tn * cfg.tk / peak >= step_bytes / spec.hbm_bytes_per_s else "memory"
    )
    return Roofline(
        steps=steps,
        flops=flops,
        hbm_bytes=hbm,
        min_bytes=min_bytes,
        step_bytes=step_bytes,
        intensity=flops / hbm,
        time_s=time_s,
        mxu_util=useful / time_s / spec.peak_flops(cfg.dot_dtype),
        hbm_util=min_bytes / time_s / spec.hbm_bytes_per_s,
        bound=bound,
    )


def prequantizes(p: Problem, cfg: MatmulConfig) -> bool:
    """True when a dynamic-W8A8 problem runs as a Pallas quantize pass + the fp8-x kernel."""
    return p.x_mode == "dynamic" and cfg.x_mode == "fp8"


def quantize_pass(p: Problem) -> tuple[int, int]:
    """(HBM bytes, grid steps) of quantizing x [M, K] to e4m3 in 1 x bk groups with the Pallas
    quantize kernel: x read once, fp8 x and f32 scales written; 512 Ki-element tiles per step."""
    elems = p.m * p.k
    nbytes = elems * (jnp.dtype(p.x_dtype).itemsize + 1) + 4 * p.m * -(-p.k // p.bk)
    return nbytes, -(-elems // (256 * 2048))


def _divisor_tiles(dim: int, quant: int, cap: int) -> list[int]:
    """Tiles t = quant * d (multiple of 128) dividing round_up(dim, quant), t <= cap: no padding
    beyond the quantization block, which the w_scale grid implies anyway."""
    blocks = -(-dim // quant)
    return [quant * d for d in range(1, blocks + 1) if blocks % d == 0 and quant * d <= cap] or [quant]


def kernel_problem(p: Problem, prequantize: bool) -> Problem:
    """The problem the matmul kernel sees: for a prequantized dynamic problem, fp8 e4m3 x + x_scale."""
    return dataclasses.replace(p, x_mode="fp8", x_dtype="float8_e4m3fn") if prequantize else p


def candidates(p: Problem, spec: TpuSpec) -> Iterable[MatmulConfig]:
    """Every legal config for ``p`` that fits ``spec``'s VMEM (tn, tk up to 2048, tm up to 1024).

    A dynamic-W8A8 problem also gets the fp8-x kernel configs (run after a quantize pass): in-kernel
    quantization re-reads the bf16 x tile once per N tile, the separate pass reads it once.
    """
    tms = [t for t in (32, 64, 128, 256, 512, 1024) if t <= p.m and p.m % t == 0] or [p.m]
    kernel_problems = [p, kernel_problem(p, True)] if p.x_mode == "dynamic" else [p]
    for kp in kernel_problems:
        for tm in tms:
            for tn in _divisor_tiles(p.n, p.bn, 2048):
                for tk in _divisor_tiles(p.k, p.bk, 2048):
                    try:
                        yield kp.config(tm, tn, tk, spec)
                    except ValueError:  # too many sub-blocks or over the VMEM budget
                        continue


def model_best(p: Problem, spec: TpuSpec) -> MatmulConfig:
    """The candidate with the smallest modelled time (ties: fewer sub-blocks, i.e. shorter code)."""
    best = min(
        candidates(p, spec),
        key=lambda c: (roofline(p, c, spec).time_s, (c.tn // c.bn) * (c.tk // c.bk)),
        default=None,
    )
    if best is None:
        raise ValueError(f"no legal block sizes for {p} on {spec.name}")
    return best


def table_key(generation: str, p: Problem) -> str:
    return f"{generation}|m{p.m}|n{p.n}|k{p.k}|b{p.bn}x{p.bk}|{p.x_mode}|{p.x_dtype}|{p.w_dtype}"


@functools.cache
def load_table(path: str = TABLE_PATH) -> dict[str, dict]:
    """{table_key: entry} from the JSON table (empty dict if the file is absent)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    return {e["key"]: e for e in data["entries"]}


@functools.cache
def _fallback(generation: str, p: Problem) -> MatmulConfig:
    cfg = model_best(p, GENERATIONS[generation])
    log.warning(
        "fp8 pallas: no tuned block sizes for %s; using the roofline heuristic tm=%d tn=%d tk=%d "
        "(logged once per shape; run scripts/tune_pallas.py --measure on a TPU to tune it)",
        table_key(generation, p), cfg.tm, cfg.tn, cfg.tk,
    )  # fmt: skip
    return cfg


@functools.cache
def select(generation: str, p: Problem) -> MatmulConfig:
    """Kernel config for problem ``p`` (M already bucketed) on ``generation``: table, else model.

    For a dynamic-W8A8 problem the result may have ``x_mode="fp8"``: quantize x with the Pallas
    quantize kernel first (see :func:`prequantizes`).
    """
    spec = GENERATIONS[generation]
    entry = load_table().get(table_key(generation, p))
    if entry is not None:
        kp = kernel_problem(p, entry.get("prequantize", False))
        return kp.config(entry["tm"], entry["tn"], entry["tk"], spec)
    return _fallback(generation, p)


# ------------------------------------------------------------------------ grouped: tgmm model
#: tgmm K / N tile sizes the choice tries besides the 128-multiples that divide the padded dim
#: (clipped to it): 512 .. 2048 are what amortizes the 0.35 us step at the fp8 rate.
TGMM_TILE_KN: tuple[int, ...] = (512, 1024, 2048)


def _pow2_at_least(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


def tgmm_rows_bucket(m: int, g: int) -> int:
    """Rows per group the tgmm choice plans for: cdiv(m, g) up to a power of two (<= 2x the real
    rows, so decode's 8 rows per expert is not planned as 32; one cache entry per octave)."""
    if m <= 0 or g <= 0:
        raise ValueError(f"m, g: expected positive row and group counts, got m={m}, g={g}")
    return _pow2_at_least(-(-m // g))


@dataclasses.dataclass(frozen=True)
class TgmmProblem:
    """One tgmm call as the model sees it: ``g`` groups of ``rows`` rows each (a balanced router;
    the bridge passes ``tgmm_rows_bucket(M, G)``), out [G, K, N] ``out_dtype``.

    operand "fp8": this project's kernel (x, dy quantized per block_m x 1 column block; one
    min(tm, block_m)-deep fp8 dot per block, scaled before accumulation); "bfloat16": the unquantized
    bf16 baseline (one tm-deep bf16 dot per step, no scales, no quantize / epilogue passes).
    in_dtype: the dtype of x and dy as the kernel or the quantize pass reads them ("bfloat16", the
    dtype of MoE weight gradients, or "float32"; float16 runs as float32).
    """

    rows: int
    k: int
    n: int
    g: int
    block_m: int = 128
    out_dtype: str = "bfloat16"
    operand: str = "fp8"
    in_dtype: str = "bfloat16"

    @property
    def m(self) -> int:
        return self.rows * self.g


class TgmmTiles(NamedTuple):
    """One tgmm candidate: tiles tm (M), tk, tn (output) and where x / dy are quantized (``prequantize``:
    an XLA pass before the kernel; False: in the kernel, tm >= block_m; see grouped.TgmmConfig)."""

    tm: int
    tk: int
    tn: int
    prequantize: bool = True


def _vtile(rows: int, cols: int, dtype: str) -> int:
    """Bytes of a [rows, cols] VMEM block at its native (8|16|32) x 128 tile padding."""
    item = jnp.dtype(dtype).itemsize
    return -(-rows // (32 // item)) * (32 // item) * -(-cols // 128) * 128 * item


def tgmm_dot_dtype(p: TgmmProblem, spec: TpuSpec) -> str:
    """fp8 on an fp8 MXU (v7x), else bf16 (v5e / v6e widen the fp8 tiles in VMEM)."""
    return "float8_e4m3fn" if p.operand == "fp8" and spec.fp8_flops else "bfloat16"


def tgmm_vmem_footprint(p: TgmmProblem, t: TgmmTiles, spec: TpuSpec) -> int:
    """VMEM bytes of one tgmm kernel instance (grouped._tgmm_kernel) with tiles ``t``.

    Prequantized: double-buffered fp8 x [tm, tk] and dy [tm, tn] tiles, their scale blocks
    xs [sub, tk, 1] (128 lanes per row: 128x its payload) and ds [sub, 1, tn], the out [tk, tn]
    block, the f32 accumulator, and the live values of a step (the masked f32 and dot-dtype operand
    copies, the transposed x rows, the f32 partial and its scaled copy). In-kernel quantization: the
    x / dy tiles at ``in_dtype`` (2x / 4x the fp8 bytes), no scale blocks, and as live values the f32
    tile of each operand (x transposed) and its masked copy, one block's |v|, quotient and e4m3
    values (+ their bf16 widening on a bf16 MXU), the f32 partial and its scaled copy.
    """
    tm, tk, tn = t.tm, t.tk, t.tn
    dot = jnp.dtype(tgmm_dot_dtype(p, spec)).itemsize
    acc = _vtile(tk, tn, "float32")
    if p.operand != "fp8":
        blocks = _vtile(tm, tk, "bfloat16") + _vtile(tm, tn, "bfloat16") + _vtile(tk, tn, p.out_dtype)
        return 2 * blocks + acc + tm * tk * dot + tk * tn * 4
    if not t.prequantize:
        blocks = _vtile(tm, tk, p.in_dtype) + _vtile(tm, tn, p.in_dtype) + _vtile(tk, tn, p.out_dtype)
        widen = dot if dot > 1 else 0
        temps = 2 * tm * (tk + tn) * 4 + p.block_m * (tk + tn) * (4 + 4 + 1 + widen) + 2 * tk * tn * 4
        return 2 * blocks + acc + temps
    op = "float8_e4m3fn"
    blocks = _vtile(tm, tk, op) + _vtile(tm, tn, op) + _vtile(tk, tn, p.out_dtype)
    sub = max(1, tm // p.block_m)
    blocks += sub * (_vtile(tk, 1, "float32") + _vtile(1, tn, "float32"))
    temps = tm * (tk + tn) * (4 + dot) + min(tm, p.block_m) * tk * dot + 2 * tk * tn * 4
    return 2 * blocks + acc + temps


def tgmm_vmem_limit(p: TgmmProblem, t: TgmmTiles, spec: TpuSpec) -> int:
    """:func:`scoped_vmem_limit` of :func:`tgmm_vmem_footprint` (the matmul kernel's rule)."""
    what = f"tgmm tiles tm={t.tm}, tk={t.tk}, tn={t.tn}" + ("" if t.prequantize else " (in-kernel quantize)")
    return scoped_vmem_limit(tgmm_vmem_footprint(p, t, spec), spec, what)


@functools.cache
def _tgmm_visits(rows: int, g: int, tm: int) -> int:
    """Real visits (intersecting (group, M tile) pairs) of g consecutive groups of ``rows`` rows."""
    return sum((s + rows - 1) // tm - s // tm + 1 for s in range(0, rows * g, rows))


def tgmm_roofline(p: TgmmProblem, t: TgmmTiles, spec: TpuSpec) -> Roofline:
    """Model of one tgmm call (grid (K tiles, N tiles, visits), see grouped.py) with tiles ``t``.

    Per (K tile, N tile) column of the grid: ``V = tiles_m + G - 1`` steps (the static visit
    bound) each pay the step overhead; each real visit runs one ``2 d tk tn``-flop dot per
    d = min(tm, block_m)-row quantization block holding rows of its group (the bf16 baseline: one
    tm-deep dot per visit) at the dot's rate, scaled by how much of the MXU it fills (d-deep on an
    ``mxu_k``-deep MXU, tk streamed rows on ``mxu_rows``); the column's HBM bytes are each M tile of
    x and dy once (consecutive visits of a tile keep its blocks) plus one [tk, tn] output tile per
    group (written back when the group changes). The column costs max(MXU time, bytes / bandwidth)
    (each step max(MXU, DMA) with the column's bytes spread over its steps). Around the kernel, fp8
    adds, when the tiles do not divide K and N, the slice of the padding off the output (read and
    written once), and:

    * ``t.prequantize``: the kernel reads fp8 tiles and their f32 scales; the XLA column
      quantization of x and dy before it reads them twice at ``in_dtype`` and writes fp8 once.
    * in-kernel quantization: the kernel reads x and dy tiles at ``in_dtype`` (x once per N tile, dy
      once per K tile); no pass before it but the zero padding of x / dy where the tiles need it
      (read and written once at ``in_dtype``).

    Not modelled: the VPU work of the mask and scaling, the XLU transpose of the x rows, and for
    in-kernel quantization its VPU work (|v|, finite test, max, divide, clip, e4m3 cast: about 7 VPU
    ops per input element per visit, x redone per N tile and dy per K tile, where the XLA pass does
    it once) and the transpose of x in f32 (4x the bytes of the fp8 transpose).
    """
    tm, tk, tn = t.tm, t.tk, t.tn
    fp8 = p.operand == "fp8"
    m_in = m_bucket(p.m)  # the bridge pads M to its bucket
    mp = -(-m_in // max(tm, p.block_m)) * max(tm, p.block_m)
    kp, np_ = -(-p.k // tk) * tk, -(-p.n // tn) * tn
    tiles_m, kt, nt = mp // tm, kp // tk, np_ // tn
    grid_visits = tiles_m + p.g - 1
    real = _tgmm_visits(p.rows, p.g, tm)
    touched = -(-p.m // tm)
    dot = tgmm_dot_dtype(p, spec)
    depth = min(tm, p.block_m) if fp8 else tm
    # fp8: one dot per quantization block that holds rows of the visit's group (the kernel skips
    # the others); the bf16 baseline runs the whole tile per visit.
    dots = _tgmm_visits(p.rows, p.g, depth) if fp8 else real
    fill = min(1.0, depth / spec.mxu_k) * min(1.0, tk / spec.mxu_rows)
    peak = spec.peak_flops(dot)
    t_mxu = 2.0 * depth * tk * tn / (peak * fill)  # one dot
    ob = jnp.dtype(p.out_dtype).itemsize
    ib = jnp.dtype(p.in_dtype).itemsize
    if not fp8:
        in_col = touched * tm * (tk + tn) * 2
    elif t.prequantize:
        in_col = touched * tm * (tk + tn) + touched * max(1, tm // p.block_m) * (tk + tn) * 4
    else:
        in_col = touched * tm * (tk + tn) * ib
    out_col = p.g * tk * tn * ob
    step_bytes = (in_col + out_col) / real
    t_col = max(dots * t_mxu, real * step_bytes / spec.hbm_bytes_per_s) + grid_visits * STEP_OVERHEAD_S
    time_s = kt * nt * t_col
    hbm = kt * nt * (in_col + out_col)
    if fp8:
        if t.prequantize:
            extra = mp * (kp + np_) * (2 * ib + 1)
        else:
            extra = sum(
                (m_in * c + mp * cp) * ib for c, cp in ((p.k, kp), (p.n, np_)) if (mp, cp) != (m_in, c)
            )
        if (kp, np_) != (p.k, p.n):
            extra += 2 * p.g * p.k * p.n * ob  # slicing the tile padding off copies the output
        hbm += extra
        time_s += extra / spec.hbm_bytes_per_s
    useful = 2.0 * p.m * p.k * p.n
    min_bytes = p.m * (p.k + p.n) * ib + p.g * p.k * p.n * ob
    return Roofline(
        steps=kt * nt * grid_visits,
        flops=2.0 * kt * nt * dots * depth * tk * tn,
        hbm_bytes=hbm,
        min_bytes=min_bytes,
        step_bytes=step_bytes,
        intensity=2.0 * kt * nt * dots * depth * tk * tn / hbm,
        time_s=time_s,
        mxu_util=useful / time_s / peak,
        hbm_util=min_bytes / time_s / spec.hbm_bytes_per_s,
        bound="compute" if dots * t_mxu >= real * step_bytes / spec.hbm_bytes_per_s else "memory",
    )


def _tgmm_tiles(dim: int) -> list[int]:
    """K / N tile candidates: 128-multiples dividing the 128-padded dim (no padding beyond the lane
    tile) up to 2048, and TGMM_TILE_KN clipped to the padded dim."""
    padded = -(-dim // 128) * 128
    tiles = {t for t in range(128, min(padded, 2048) + 1, 128) if padded % t == 0}
    tiles |= {min(t, padded) for t in TGMM_TILE_KN}
    return sorted(tiles)


def tgmm_candidates(p: TgmmProblem, spec: TpuSpec) -> list[TgmmTiles]:
    """Every legal tiling for ``p`` that fits ``spec``'s VMEM: tm in grouped.TGMM_TILE_M that
    divides or is divided by block_m (TgmmConfig's rule; the bf16 baseline has no block), tk / tn
    from :func:`_tgmm_tiles`; for fp8 each both prequantized and, where tm >= block_m, with
    in-kernel quantization (as :func:`candidates` offers dynamic W8A8 both ways)."""
    from .grouped import TGMM_TILE_M  # grouped imports nothing of tuning: no cycle

    fp8 = p.operand == "fp8"
    tms = [t for t in TGMM_TILE_M if not fp8 or t % p.block_m == 0 or p.block_m % t == 0]
    out = []
    for tm in tms:
        for pre in (True, False) if fp8 and tm >= p.block_m else (True,):
            for tk in _tgmm_tiles(p.k):
                for tn in _tgmm_tiles(p.n):
                    t = TgmmTiles(tm, tk, tn, pre)
                    if tgmm_vmem_footprint(p, t, spec) <= spec.vmem_bytes * VMEM_USABLE:
                        out.append(t)
    return out


def tgmm_best(p: TgmmProblem, spec: TpuSpec) -> TgmmTiles:
    """The candidate with the smallest modelled time; ties (within 0.1%): the smaller VMEM
    footprint, then the smaller tiles, then prequantized (deterministic)."""
    cands = tgmm_candidates(p, spec)
    if not cands:
        raise ValueError(f"no legal tgmm tiles for {p} on {spec.name}")
    times = {c: tgmm_roofline(p, c, spec).time_s for c in cands}
    fastest = min(times.values())
    close = [c for c in cands if times[c] <= fastest * 1.001]
    return min(close, key=lambda c: (tgmm_vmem_footprint(p, c, spec), c[:3], not c.prequantize))


@functools.cache
def tgmm_select(generation: str, p: TgmmProblem):
    """grouped.TgmmConfig for the fp8 problem ``p`` on ``generation``: the model's best tiles and
    quantization place, with the scoped VMEM limit sized from their footprint (cached per problem: it
    runs per call)."""
    from .grouped import TgmmConfig

    if p.operand != "fp8":
        raise ValueError(f"p.operand: the tgmm kernel runs 'fp8' operands, got {p.operand!r}")
    spec = GENERATIONS[generation]
    t = tgmm_best(p, spec)
    return TgmmConfig(
        tm=t.tm, tk=t.tk, tn=t.tn, block_m=p.block_m, out_dtype=p.out_dtype, mxu=spec.mxu,
        vmem_limit_bytes=tgmm_vmem_limit(p, t, spec), prequantize=t.prequantize,
    )  # fmt: skip


def tgmm_config_tiles(cfg) -> TgmmTiles:
    """The TgmmTiles of a grouped.TgmmConfig (for the model functions)."""
    return TgmmTiles(cfg.tm, cfg.tk, cfg.tn, cfg.prequantize)


# -------------------------------------------------------------------- grouped: bf16 gmm baseline
def gmm_bf16_roofline(m: int, n: int, k: int, g: int, spec: TpuSpec) -> tuple[float, tuple[int, int, int]]:
    """(modelled seconds, (tm, tn, tk)) of the best-tiled bf16 grouped matmul y [M, N] = x [M, K] @
    w[g] [N, K].T (megablox gmm: grid (N tiles, visits, K tiles), visits = cdiv(M, tm) + G - 1, one
    full tk-deep bf16 dot per step, no scales): the baseline of the fp8 gmm in the same model as
    :func:`roofline`."""
    best = None
    budget = spec.vmem_bytes * VMEM_USABLE
    for tm in (128, 256, 512, 1024):
        visits = -(-m // tm) + g - 1
        for tn in _tgmm_tiles(n):
            for tk in _tgmm_tiles(k):
                vmem = 2 * (
                    _vtile(tm, tk, "bfloat16") + _vtile(tn, tk, "bfloat16") + _vtile(tm, tn, "bfloat16")
                )
                if vmem + 2 * _vtile(tm, tn, "float32") > budget:
                    continue
                np_, kp = -(-n // tn) * tn, -(-k // tk) * tk
                steps = visits * (np_ // tn) * (kp // tk)
                peak = spec.bf16_flops * min(1.0, tm / spec.mxu_rows) * min(1.0, tk / spec.mxu_k)
                step_bytes = 2 * (tm * tk + tn * tk)
                t_step = max(2.0 * tm * tn * tk / peak, step_bytes / spec.hbm_bytes_per_s)
                t = steps * (t_step + STEP_OVERHEAD_S) + visits * tm * np_ * 2 / spec.hbm_bytes_per_s
                if best is None or t < best[0]:
                    best = (t, (tm, tn, tk))
    if best is None:
        raise ValueError(f"no bf16 gmm tiling fits {spec.name} for M={m} N={n} K={k} G={g}")
    return best
