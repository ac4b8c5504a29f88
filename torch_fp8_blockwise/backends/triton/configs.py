"""Launch configurations for the Triton GEMMs: tuned table first, shared-memory-aware heuristic second.

Key of the tuned table (``torch_fp8_blockwise/data/cuda/gemm_configs.json``, written by
``scripts/tune_triton.py``): ``(arch, kernel, m_bucket, N, K)`` where ``arch`` is the compute
capability as an int (90 = H100/H200, 100 = B200, 120 = RTX 50xx), ``kernel`` one of
:data:`KERNELS` and ``m_bucket`` the smallest of :data:`M_BUCKETS` that is >= M (M beyond the last
bucket uses the last). Decode has its own buckets (1, 2, 4, 8, 16, 24, ..., vLLM's style): on the
H100, the entry tuned at M=16 made M=1 slower (11.0 vs 8.7 us at N=7168, K=2048), so a bucket
without an entry never borrows a neighbour's; it falls back to :func:`heuristic`, and
:func:`select` says so once per ``(arch, kernel)`` in the process, never per call.

Every config, tuned or heuristic, passes through :meth:`GemmConfig.for_problem`, which shrinks
``block_k`` to divide the quantization block ``bk`` (a K tile then never straddles two scale
blocks: the seed's M=256, N=512, K=1024 failure came from block_k and the scale layout
disagreeing) and through :func:`fits`, so a config that would overflow the device's shared memory
is never launched.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import asdict, dataclass, replace
from importlib import resources

import torch

#: Kernels that read this table. w8a8: fp8 x fp8 blockwise; w8a16: bf16/fp16/fp32 x fp8 blockwise;
#: mxfp8: fp8 x fp8 with E8M0 scales per 32 elements of K.
KERNELS: tuple[str, ...] = ("w8a8", "w8a16", "mxfp8")
#: Upper bounds of the M buckets (vLLM's decode granularity below 128); M <= 64 is the decode regime
#: (weight-bandwidth-bound), where one config does not serve M = 1 and M = 16 alike (module docstring).
M_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096)
#: Architectures with shipped configs and offline-compile proof.
ARCHS: tuple[int, ...] = (90, 100, 120)

#: Dynamic shared memory a block may opt into (bytes). sm_90 / sm_100: 227 KB; consumer Blackwell
#: sm_120 (RTX 50xx): 99 KB = 101,376 B, where the seed's fixed configs did not fit.
SMEM_LIMIT: dict[int, int] = {90: 232_448, 100: 232_448, 120: 101_376}
#: SM counts used to size split-K when no GPU is visible (H100 SXM, B200, RTX 5070 Ti).
DEFAULT_SMS: dict[int, int] = {90: 132, 100: 148, 120: 70}

TABLE_FILE = "gemm_configs.json"


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch parameters of one GEMM launch.

    block_m x block_n output tile, block_k of K per step. ``swap_ab`` computes the tile as
    ``w_tile @ x_tile.T`` so that N fills the MMA's 64-row side when M is small (decode): Hopper's
    wgmma needs 64 rows per warpgroup, and M = 1..64 would otherwise waste most of it.
    ``split_k`` > 1 splits the K loop over that many programs that atomically add fp32 partials
    (decode shapes have too few output tiles to fill 132 SMs).
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    split_k: int = 1
    swap_ab: bool = False
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "group_m", "split_k", "num_warps"):
            if not _pow2(getattr(self, name)):
                raise ValueError(f"GemmConfig.{name}: expected a power of two, got {getattr(self, name)}")
        # tl.dot needs every dimension >= 16; fp8 MMAs consume K in steps of 32.
        if self.block_m < 16 or self.block_n < 16:
            raise ValueError(
                f"GemmConfig: block_m and block_n must be >= 16, got {self.block_m}, {self.block_n}"
            )
        if self.block_k < 32:
            raise ValueError(f"GemmConfig.block_k: expected >= 32 (one fp8 MMA K step), got {self.block_k}")
        if self.num_stages < 1:
            raise ValueError(f"GemmConfig.num_stages: expected >= 1, got {self.num_stages}")

    def for_problem(self, bk: int, k: int) -> GemmConfig:
        """This config adjusted to a problem: block_k divides ``bk`` and split_k <= number of K tiles.

        ``bk`` is the K extent of one scale block (128/256/512 for blockwise, 32 for MXFP8 where
        any block_k that is a multiple of 32 works). Both are powers of two, so min() divides.
        """
        # MXFP8 (bk = 32): the kernel indexes scales per 32 columns, any block_k works.
        block_k = self.block_k if bk <= 32 else min(self.block_k, bk)
        if bk > 32 and bk % block_k:
            raise ValueError(f"GemmConfig: block_k={block_k} must divide the scale block bk={bk}")
        k_tiles = -(-k // block_k)
        split_k = self.split_k
        while split_k > 1 and split_k > k_tiles:
            split_k //= 2
        return replace(self, block_k=block_k, split_k=split_k)

    def to_json(self) -> dict:
        return asdict(self)


def operand_bytes(kernel: str, x_bytes: int = 2) -> tuple[int, int, int]:
    """(bytes per x element in smem, per w element in smem, extra per w element after conversion)."""
    if kernel == "w8a8":
        return 1, 1, 0
    if kernel == "w8a16":
        return x_bytes, 1, x_bytes  # fp8 w staged, then converted for the MMA
    return 1, 1, 2  # mxfp8: explicit path converts both operands to bf16 in registers


def smem_estimate(cfg: GemmConfig, kernel: str, x_bytes: int = 2) -> int:
    """Upper estimate of the dynamic shared memory of a launch (bytes).

    Pipelined operand buffers (num_stages copies of an x tile and a w tile), plus one converted
    tile for W8A16/MX (the MMA reads its B operand from shared memory), or the epilogue's
    block_m x block_n fp32 layout-conversion scratch if larger (Triton reuses the operand buffers
    for it after the K loop), plus 2 KB of barriers. Compared with real compilation by
    scripts/check_lowering.py (e.g. w8a8 128x128x128, 4 stages: estimate 133,120 B, compiled
    131,072 B on sm_90).
    """
    xb, wb, extra = operand_bytes(kernel, x_bytes)
    stage = cfg.block_k * (cfg.block_m * xb + cfg.block_n * wb)
    convert = cfg.block_k * (cfg.block_n + (cfg.block_m if kernel == "mxfp8" else 0)) * extra
    return max(cfg.num_stages * stage + convert, cfg.block_m * cfg.block_n * 4) + 2048


def fits(cfg: GemmConfig, kernel: str, arch: int, x_bytes: int = 2) -> bool:
    return smem_estimate(cfg, kernel, x_bytes) <= SMEM_LIMIT.get(arch, SMEM_LIMIT[120])


def m_bucket(m: int) -> int:
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


#: Measured on one H100 (sm_90, 132 SMs; shared/data/h100/bench_2026-11-22.md, kernel us under
#: CUDA-graph replay), W8A8, each pair = the old heuristic's config vs the tuner's at the same point.
#: The rule in :func:`heuristic` picks the faster of every pair that differs by more than 5 %;
#: tests/test_triton_configs.py replays this list. Fields: (M, N, K), faster (block_m, block_n,
#: split_k, swap_ab) and its us, slower one and its us.
MEASURED_PAIRS_SM90: tuple[tuple[tuple[int, int, int], tuple, float, tuple, float], ...] = (
    ((1, 2112, 7168), (32, 64, 4, True), 9.7, (16, 128, 4, True), 10.4),
    ((16, 2112, 7168), (32, 64, 4, True), 9.7, (16, 128, 4, True), 12.9),
    ((1, 4608, 7168), (16, 128, 2, True), 16.4, (64, 64, 1, True), 20.4),
    ((16, 4608, 7168), (16, 128, 2, True), 18.6, (64, 64, 1, True), 21.3),
    ((1, 7168, 2048), (16, 128, 2, True), 8.7, (32, 128, 1, True), 11.0),
    ((64, 4608, 7168), (64, 64, 1, True), 22.2, (64, 128, 2, True), 28.9),
    ((64, 7168, 2048), (64, 64, 1, True), 10.3, (64, 128, 2, True), 19.2),
    ((256, 2112, 7168), (64, 64, 1, False), 21.2, (128, 128, 1, False), 44.3),
    ((256, 4608, 7168), (64, 64, 1, False), 40.1, (128, 128, 1, False), 45.7),
    ((1024, 2112, 7168), (64, 64, 1, False), 55.4, (128, 128, 1, False), 86.1),
)

#: Prefill tiles, largest first: (block_m, block_n, num_warps, num_stages). 128 x 128 / 8 warps is
#: the M=4096 winner (608 TFLOP/s at N=4608, K=7168); every 64 x 64 entry the H100 tuner chose
#: without swap-AB has 4 warps and 3 stages; 64 x 128 takes 8 warps (a 64 x 128 fp32 tile at 4 warps
#: spilled 112-240 B when compiled for sm_90/sm_100/sm_120).
PREFILL_TILES: tuple[tuple[int, int, int, int], ...] = ((128, 128, 8, 4), (64, 128, 8, 4), (64, 64, 4, 3))
#: Smallest fraction of the last wave's SM slots a prefill grid may leave busy before a smaller tile
#: is tried: tiles / (ceil(tiles / SMs) * SMs). The H100 data put the line between 0.69 (M=1024,
#: N=2112 at 64 x 128: 272 tiles on 132 SMs, the tuner preferred 64 x 64) and 0.73 (M=1024, N=4608 at
#: 128 x 128: 288 tiles, 133.5 us vs 138.4 us for 64 x 128).
MIN_WAVE_FILL = 0.7


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def wave_fill(tiles: int, sms: int) -> float:
    """Fraction of the launched waves' SM slots that hold a tile (1.0 = no idle SM in the last wave)."""
    return tiles / (_cdiv(tiles, sms) * sms)


def _decode_config(m: int, n: int, k: int, sms: int, min_rows: int = 64) -> GemmConfig:
    """M <= 64: swap-AB (N is the MMA's 64-row side), then split-K until about one program per SM.

    * block_m = next_pow2(M) in [16, 64] (the MMA's N side; a 64-row x tile at M=1 measured slower:
      20.4 vs 16.4 us at N=4608, K=7168).
    * block_n = 64 at block_m = 64 (M=64: 10.3 vs 19.2 us at N=7168, K=2048 and 22.2 vs 28.9 us at
      N=4608, K=7168 against 128 / 8 warps); below that 128, or 64 when N has fewer than SMs / 4
      column tiles of 128 (N=2112: 17 tiles; 64 x split 4 = 132 programs ran 9.7 us vs 128 x split 4
      = 68 programs 10.4 us at M=1 and 12.9 us at M=16).
    * split_k doubles while the grid stays <= the SM count and each split keeps >= 2 K tiles
      (M=1, N=7168, K=2048: split 2 = 112 programs, 8.7 us; split 1, 11.0 us).

    ``min_rows``: the smallest block_n the MMA takes as its row side (128 for sm_100's block-scaled
    tcgen05 MMA, see :func:`heuristic`).
    """
    bm = min(64, max(16, _next_pow2(m)))
    if min_rows < 128 and (bm == 64 or _cdiv(n, 128) * 4 < sms):
        bn = 64
    else:
        bn = 128
    tiles = _cdiv(m, bm) * _cdiv(n, bn)
    k_tiles = _cdiv(k, 128)
    split = 1
    while tiles * split * 2 <= sms and split * 2 <= min(16, k_tiles // 2):
        split *= 2
    return GemmConfig(
        block_m=bm, block_n=bn, block_k=128, group_m=1, split_k=split, swap_ab=True, num_warps=4, num_stages=4
    )


def _prefill_config(m: int, n: int, sms: int, min_rows: int = 64) -> GemmConfig:
    """M > 64: the largest of :data:`PREFILL_TILES` whose grid fills >= :data:`MIN_WAVE_FILL` of its
    waves, else the one with the fullest waves (ties: the larger tile).

    M=256, N=2112, K=7168: 128 x 128 gives 34 tiles (0.26 of one wave; 43.7-44.3 us), 64 x 64 gives
    132 (21.2 us). M=256, N=7168, K=2048: 128 x 128 gives 112 tiles (0.85) and is what the tuner chose.
    """
    best = None
    for bm, bn, warps, stages in PREFILL_TILES:
        if bm < min_rows:
            continue
        fill = wave_fill(_cdiv(m, bm) * _cdiv(n, bn), sms)
        cfg = GemmConfig(block_m=bm, block_n=bn, block_k=128, num_warps=warps, num_stages=stages)
        if fill >= MIN_WAVE_FILL:
            return cfg
        if best is None or fill > best[0]:
            best = (fill, cfg)
    return best[1]


def heuristic(
    kernel: str, arch: int, m: int, n: int, k: int, sms: int | None = None, x_bytes: int = 2
) -> GemmConfig:
    """A config that fits ``arch``'s shared memory for any (M, N, K), re-derived from the H100 data.

    Decode (M <= 64): :func:`_decode_config`; prefill: :func:`_prefill_config`; both reproduce the
    faster config of every measured pair in :data:`MEASURED_PAIRS_SM90`. W8A16 and MXFP8 take the
    same tiles (they read the same fp8 weight bytes; W8A16 without swap-AB, see below). Then as many pipeline stages (<= the tile's
    own, at most 4) as the arch's shared memory allows (sm_120: 99 KB), else block_k = 64 with 2
    stages, then block_k = 32. ``x_bytes`` is the size of an x element for W8A16 (2 for bf16/fp16, 4
    for fp32 x, whose tiles take twice the shared memory). ``sms``: the SM count (default: the
    arch's flagship, :data:`DEFAULT_SMS`).
    """
    sms = sms or DEFAULT_SMS.get(arch, 132)
    # sm_100's tcgen05 block-scaled MMA (MXFP8 native path) takes 128 rows per CTA: with a 64-row
    # side Triton lowered tl.dot_scaled to a bf16 emulation (kind::f16), compiled for sm_100.
    min_rows = 128 if kernel == "mxfp8" and arch == 100 else 64
    cfg = _decode_config(m, n, k, sms, min_rows) if m <= 64 else _prefill_config(m, n, sms, min_rows)
    if kernel == "w8a16" and cfg.swap_ab:
        # W8A16 keeps x as the MMA's A side. Swapped, the widened weight becomes wgmma's register
        # operand, and Triton (3.9, sm_90, 16 x 128 x 128 / 4 warps, compiled) then copies the fp8 tile
        # with 8-byte cp.async (64 per thread per stage) and reads it back 2 bytes at a time (64
        # ld.shared.b16 per K tile): the likely cause of W8A16 decode running 1.9-2.3x slower than
        # W8A8 on the H100. Unswapped, every copy is 16 bytes and the smem reads are vectors
        # (mma.sync for block_m < 64, wgmma with the weight from shared memory at 64).
        cfg = replace(cfg, swap_ab=False)
        if cfg.block_m * cfg.block_n >= 32 * 128:
            # 32 x 128 x 128 at 4 warps spilled 16 B on sm_120 with triton 3.5 (168 registers with
            # 3.9); at 8 warps 110-146 registers on sm_90/100/120 with both.
            cfg = replace(cfg, num_warps=8)
    if kernel == "w8a16" and x_bytes == 4:
        # fp32 x takes an IEEE fp32 dot, i.e. CUDA-core FMAs with both operands in registers:
        # compiled at 128 x 128 x 128 / 8 warps it spilled 18 KB per thread on sm_90, and 64 x 64 x 32
        # at 4 warps still 370 B. 64 x 64 x 32 at 8 warps (16 x 64 at 4) does not spill
        # (scripts/check_lowering.py, rows "w8a16_f32").
        bm = min(cfg.block_m, 64)
        cfg = replace(cfg, block_m=bm, block_n=64, block_k=32, num_warps=8 if bm >= 64 else 4)
    elif cfg.block_m * cfg.block_n >= 64 * 128:
        # A 64 x 128 fp32 tile (plus the promoted partial product) exceeds 255 registers per
        # thread at 4 warps: compiled, it spilled 112-240 B on sm_90/sm_100/sm_120.
        cfg = replace(cfg, num_warps=8)
    elif kernel == "mxfp8" and arch != 100 and cfg.swap_ab and cfg.block_m * cfg.block_n >= 32 * 128:
        # The explicit MX path widens and scales both operands in registers: 32 x 128 x 128 swap-AB
        # at 4 warps spilled 16 B on sm_90 (255 registers); at 8 warps 153 registers, no spill.
        cfg = replace(cfg, num_warps=8)
    for stages in range(cfg.num_stages, 1, -1):
        cand = replace(cfg, num_stages=stages)
        if fits(cand, kernel, arch, x_bytes):
            return cand
    for block_k in (64, 32):
        cand = replace(cfg, num_stages=2, block_k=block_k)
        if fits(cand, kernel, arch, x_bytes):
            return cand
    # Unreachable: 128 x 128 x 32 with 2 stages of fp32 x needs < 70 KB, below every limit.
    raise AssertionError(f"no heuristic config fits sm_{arch} for {kernel}")


@functools.cache
def load_table() -> dict[tuple[int, str, int, int, int], GemmConfig]:
    """The tuned table as {(arch, kernel, m_bucket, N, K): GemmConfig}."""
    text = resources.files("torch_fp8_blockwise").joinpath("data", "cuda", TABLE_FILE).read_text()
    raw = json.loads(text)
    table = {}
    for e in raw["entries"]:
        key = (int(e["arch"]), str(e["kernel"]), int(e["m_bucket"]), int(e["n"]), int(e["k"]))
        table[key] = GemmConfig(**e["config"])
    return table


#: (arch, kernel, kind) already warned about, and (arch, kernel, bucket, N, K) misses already seen.
_warned: set[tuple] = set()


def device_arch(device: torch.device) -> int:
    """Compute capability as an int (e.g. 90); CPU tensors (interpreter) use sm_90's configs."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


@functools.cache
def _sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def select(
    kernel: str, device: torch.device, m: int, n: int, k: int, bk: int, x_bytes: int = 2
) -> GemmConfig:
    """Config for one launch: the tuned entry of M's own bucket if present, else the heuristic.

    Lookup is by exact bucket: a bucket without an entry falls back to :func:`heuristic` (never to
    a neighbouring bucket's entry, module docstring) and says so once per process for each
    ``(arch, kernel)`` and kind of miss (untuned shape / untuned M bucket of a tuned shape).
    ``bk`` is the scale block along K (see :meth:`GemmConfig.for_problem`); ``x_bytes`` the size of
    an x element in W8A16 (the table is tuned for bf16; an entry that would not fit shared memory
    with fp32 x is replaced by the heuristic).
    ``FP8_TRITON_CONFIG`` (a JSON GemmConfig) overrides both, for the tuner.
    """
    arch = device_arch(device)
    override = os.environ.get("FP8_TRITON_CONFIG")
    if override:
        return GemmConfig(**json.loads(override)).for_problem(bk, k)
    table = load_table()
    bucket = m_bucket(m)
    cfg = table.get((arch, kernel, bucket, n, k))
    if cfg is not None and not fits(cfg, kernel, arch, x_bytes):
        cfg = heuristic(kernel, arch, m, n, k, None, x_bytes)
    if cfg is None:
        if device.type == "cuda":
            _warn_miss(table, arch, kernel, bucket, m, n, k)
        sms = _sms(device.index or 0) if device.type == "cuda" else None
        cfg = heuristic(kernel, arch, m, n, k, sms, x_bytes)
    return cfg.for_problem(bk, k)


def tuned_buckets(table: dict, arch: int, kernel: str, n: int, k: int) -> list[int]:
    """M buckets of the table that have an entry for (arch, kernel, N, K)."""
    return sorted(b for (a, kn, b, nn, kk) in table if (a, kn, nn, kk) == (arch, kernel, n, k))


def _warn_miss(table: dict, arch: int, kernel: str, bucket: int, m: int, n: int, k: int) -> None:
    # Every decode call of an untuned bucket lands here: after the first, one set lookup.
    seen = (arch, kernel, bucket, n, k)
    if seen in _warned:
        return
    _warned.add(seen)
    tuned = tuned_buckets(table, arch, kernel, n, k)
    kind = "bucket" if tuned else "shape"
    if (arch, kernel, kind) in _warned:
        return
    _warned.add((arch, kernel, kind))
    if tuned:
        msg = (
            f"fp8 triton: no tuned {kernel} config for sm_{arch} in M bucket {bucket} (first miss: M={m}, "
            f"N={n}, K={k}; tuned buckets of this shape: {tuned}); using the heuristic, not a neighbouring "
            "bucket's entry (on H100 the M=16 entry made M=1 slower: 11.0 vs 8.7 us)."
        )
    else:
        msg = (
            f"fp8 triton: no tuned {kernel} config for sm_{arch} (first miss: M={m}, N={n}, K={k}); "
            "using the shared-memory-aware heuristic. Run scripts/tune_triton.py on this GPU to tune."
        )
    warnings.warn(msg + " Said once per process.", stacklevel=4)


#: Whether this package's kernels are interpreted: triton.jit reads TRITON_INTERPRET when a kernel
#: is defined, i.e. while this package is imported (configs is imported before any kernel module).
INTERPRETED_AT_IMPORT: bool = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    """True when this package's Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return INTERPRETED_AT_IMPORT
