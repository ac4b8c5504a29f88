#!/usr/bin/env python
"""Grouped (MoE) FP8 matmuls vs a bf16 grouped baseline measured in the same run, plus the TPU
roofline of each Pallas tiling.

    python scripts/bench_grouped.py                  # CPU tensors, small MoE shapes (runs anywhere)
    python scripts/bench_grouped.py --device cuda    # MoE shapes: 8-256 experts, hidden 2048-7168
    python scripts/bench_grouped.py --roofline-only  # the TPU model rows only (no timing)
    python scripts/bench_grouped.py --decode --threads 1 --cpu-time   # MoE decode on CPU: 1-16 rows
                                                     # per expert, the work per call on a busy machine

Per shape: gmm (``fp8.grouped_matmul``, W8A8 with dynamic activations and with pre-quantized x) and
tgmm (``fp8.grouped_matmul_transposed``) in ms, the bf16 baseline (``torch._grouped_mm`` where this
torch has it for the device, else one matmul per group) in ms, and ours / baseline (< 1: faster).
Rows are spread evenly over experts (sorted by expert), as a balanced router gives.

``--decode``: MoE decode, 1, 4 and 16 rows per expert, with expert shapes of real models cut to
what a CPU host holds (``DECODE_EXPERTS``; the weights of DeepSeek-V3's 256 experts alone are 3.8 GB
of fp8 and 7.5 GB of bf16 per projection, so 16 of its experts stand in). ``--cpu-time`` times with
the process's CPU time (all threads) instead of the wall clock: with ``--threads 1`` that is the
work per call, which other jobs on a shared machine do not change.

Roofline (no TPU timing here): for each shape and TPU generation, the Pallas gmm config the bridge
picks and the tgmm tiling ``tuning.tgmm_select`` picks, modelled with backends/pallas/tuning.py's
roofline: % of MXU peak against the cap that exact 128-deep quantization blocks put on a 256-deep MXU
(each K / M block's partial is one 128-deep dot, half a pass: 50% on v6e / v7x), the same model with
256-deep blocks (the larger-block option), and the modelled time of the fp8 op, of a bf16 grouped
matmul in the same model, and their ratio.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from torch_fp8_blockwise import reference  # noqa: E402
from torch_fp8_blockwise.ops import grouped_matmul, grouped_matmul_transposed  # noqa: E402

#: (experts G, tokens M routed in total (rows), hidden K, expert width N)
MOE_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (8, 8192, 4096, 14336),  # Mixtral-like
    (64, 16384, 2048, 1408),  # DeepSeek-V2-Lite / Qwen-MoE-like
    (128, 32768, 2048, 768),  # Qwen3-MoE-30B-like
    (256, 65536, 7168, 2048),  # DeepSeek-V3
    (256, 2048, 7168, 2048),  # DeepSeek-V3 decode-ish (8 rows per expert)
)
SMALL_SHAPES: tuple[tuple[int, int, int, int], ...] = ((8, 512, 512, 256), (16, 1024, 256, 384))
#: (experts G, hidden K, expert width N) for --decode; 184M-235M weight elements each.
DECODE_EXPERTS: tuple[tuple[int, int, int], ...] = (
    (64, 2048, 1408),  # DeepSeek-V2-Lite / Qwen1.5-MoE-like
    (128, 2048, 768),  # Qwen3-MoE-30B-A3B
    (16, 7168, 2048),  # DeepSeek-V3's expert shape, 16 of its 256 experts
)
DECODE_ROWS_PER_EXPERT = (1, 4, 16)
DECODE_SHAPES: tuple[tuple[int, int, int, int], ...] = tuple(
    (g, g * r, k, n) for g, k, n in DECODE_EXPERTS for r in DECODE_ROWS_PER_EXPERT
)

#: Clock of the timings: the wall clock, or the process's CPU time (--cpu-time).
CLOCK: Callable[[], float] = time.perf_counter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int) -> float:
    """Median ms of ``repeats`` calls after one warm-up call, on CLOCK."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        _sync(device)
        times.append((CLOCK() - start) * 1e3)
    return statistics.median(times)


def _has_grouped_mm(device: torch.device) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.randn(32, 16, dtype=torch.bfloat16, device=device)
        b = torch.randn(2, 16, 16, dtype=torch.bfloat16, device=device)
        torch._grouped_mm(a, b, offs=torch.tensor([16, 32], dtype=torch.int32, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def bench(shapes, device: torch.device, repeats: int) -> None:
    grouped_mm = _has_grouped_mm(device)
    base_name = "torch._grouped_mm" if grouped_mm else "loop of matmuls"
    clock = "process CPU time" if CLOCK is time.process_time else "wall clock"
    print(f"device {device}, torch {torch.__version__}; bf16 baseline: {base_name}; {clock}")
    if device.type == "cpu":
        from torch_fp8_blockwise.backends import cpu

        print(f"threads {torch.get_num_threads()}; cpu kernels: {cpu.kernel_status()}")
    print(
        f"{'G':>4s} {'M':>6s} {'K':>5s} {'N':>6s} | {'gmm dyn':>8s} {'gmm fp8x':>8s} {'bf16':>8s} "
        f"{'dyn/bf16':>8s} {'fp8x/bf16':>9s} | {'tgmm':>8s} {'bf16':>8s} {'tgmm/bf16':>9s}   (ms)"
    )
    for g, m, k, n in shapes:
        _bench_shape(g, m, k, n, device, repeats, grouped_mm)


def _bench_shape(
    g: int, m: int, k: int, n: int, device: torch.device, repeats: int, grouped_mm: bool
) -> None:
    sizes = torch.full((g,), m // g, dtype=torch.int32)
    sizes[: m - int(sizes.sum())] += 1
    gs = sizes.to(device)
    offs = torch.cumsum(gs, 0, dtype=torch.int32)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
    w_f = torch.randn(g, n, k, device=device)
    w, ws = reference.quantize(w_f, (128, 128), torch.float8_e4m3fn, "fp32")
    w_bf = w_f.bfloat16()
    xq, xs = reference.quantize_activation(x.float(), 128)
    dy = torch.randn(m, n, dtype=torch.bfloat16, device=device)
    bounds = list(zip([0, *offs.tolist()[:-1]], offs.tolist(), strict=True))

    if grouped_mm:
        w_t = w_bf.transpose(-2, -1)  # [G, K, N] view: _grouped_mm's layout for 2D x 3D

        def base_gmm():
            return torch._grouped_mm(x, w_t, offs=offs)

        def base_tgmm():
            return torch._grouped_mm(x.t(), dy, offs=offs)
    else:

        def base_gmm():
            return torch.cat([x[s:e] @ w_bf[i].T for i, (s, e) in enumerate(bounds)])

        def base_tgmm():
            return torch.stack([x[s:e].T @ dy[s:e] for s, e in bounds])

    t_dyn = _timed(lambda: grouped_matmul(x, w, ws, gs), device, repeats)
    t_fp8 = _timed(lambda: grouped_matmul(xq, w, ws, gs, x_scale=xs), device, repeats)
    t_base = _timed(base_gmm, device, repeats)
    t_tg = _timed(lambda: grouped_matmul_transposed(x, dy, gs), device, repeats)
    t_tbase = _timed(base_tgmm, device, repeats)
    print(
        f"{g:4d} {m:6d} {k:5d} {n:6d} | {t_dyn:8.2f} {t_fp8:8.2f} {t_base:8.2f} {t_dyn / t_base:8.2f} "
        f"{t_fp8 / t_base:9.2f} | {t_tg:8.2f} {t_tbase:8.2f} {t_tg / t_tbase:9.2f}"
    )


def roofline(shapes) -> None:
    """Pallas tilings of gmm / tgmm in the TPU model (backends/pallas/tuning.py), per generation.

    Per row: the tiling the bridge picks (tgmm: and where x / dy are quantized, q=xla: an XLA pass
    before the kernel, q=kernel: in the kernel), its % of MXU peak against the cap of exact 128-deep
    quantization blocks and the same with 256-deep blocks (the larger-block option), then the
    modelled time of the fp8 block-wise op and of a bf16 baseline in the same model (bf16 operands,
    full-depth dots at the bf16 MXU rate, its own best tiling; no quantize or epilogue pass) and
    their ratio (the issue's bar: v7x blockwise / bf16 1.23x at K=2048, 1.19x at K=512).
    """
    try:
        tuning = importlib.import_module("torch_fp8_blockwise.backends.pallas.tuning")
    except ImportError as e:
        print(f"\nroofline: skipped (the Pallas model needs jax: {e})")
        return

    print(
        "\nTPU roofline (model, not timed): % of MXU peak of the grouped kernels; cap = what exact "
        "bk-deep dots allow on the MXU (128-deep blocks: 50% of a 256-deep MXU); fp8 / bf16 = modelled "
        "time of the block-wise op / a bf16 grouped matmul (issue bar on v7x: 1.23 at K=2048, 1.19 at K=512)"
    )
    print(f"{'gen':4s} {'op':4s} {'G':>4s} {'M':>6s} {'K':>5s} {'N':>6s}  {'tiling':33s} {'MXU%':>5s}"
          f" {'cap%':>5s}  {'256-block MXU%':>14s} {'cap%':>5s}  {'fp8 us':>8s} {'bf16 us':>8s}"
          f" {'fp8/bf16':>8s}")  # fmt: skip

    def emit(gen, op, g, m, k, n, tiling, util, cap, util2, cap2, t_fp8, t_bf16):
        print(f"{gen:4s} {op:4s} {g:4d} {m:6d} {k:5d} {n:6d}  {tiling:33s} {100 * util:5.1f} {100 * cap:5.0f}"
              f"  {100 * util2:14.1f} {100 * cap2:5.0f}  {1e6 * t_fp8:8.1f} {1e6 * t_bf16:8.1f}"
              f" {t_fp8 / t_bf16:8.2f}")  # fmt: skip

    for gen, spec in sorted(tuning.GENERATIONS.items()):
        for g, m, k, n in shapes:
            rows = tuning.m_bucket(max(1, -(-m // g)))
            line = []
            for block in (128, 256):
                p = tuning.Problem(rows, n, k, block, block, "dynamic", "bfloat16", "float8_e4m3fn")
                cfg = tuning.select(gen, p) if block == 128 else tuning.model_best(p, spec)
                visits = -(-m // cfg.tm) + g - 1  # one visit per (group, M tile) pair
                r = tuning.roofline(tuning.Problem(visits * cfg.tm, n, k, block, block, cfg.x_mode,
                                                   cfg.x_dtype, "float8_e4m3fn"), cfg, spec)  # fmt: skip
                useful = 2.0 * m * n * k
                util = useful / r.time_s / spec.peak_flops(cfg.dot_dtype)
                cap = min(1.0, block / spec.mxu_k)
                line.append((cfg, util, cap, r.time_s))
            (cfg, util, cap, t_fp8), (_, util2, cap2, _) = line
            t_bf16, _ = tuning.gmm_bf16_roofline(m, n, k, g, spec)
            tiling = f"tm={cfg.tm} tn={cfg.tn} tk={cfg.tk}"
            emit(gen, "gmm", g, m, k, n, tiling, util, cap, util2, cap2, t_fp8, t_bf16)
            # tgmm: the tiling tuning.tgmm_select picks (block_m 128, bf16 out as with bf16 x / dy).
            rows = tuning.tgmm_rows_bucket(m, g)
            tg = []
            for block_m in (128, 256):
                q = tuning.TgmmProblem(rows, k, n, g, block_m, "bfloat16")
                c = tuning.tgmm_select(gen, q)
                r = tuning.tgmm_roofline(q, tuning.tgmm_config_tiles(c), spec)
                tg.append((c, r.mxu_util, min(1.0, min(c.tm, block_m) / spec.mxu_k), r.time_s))
            (c, util, cap, t_fp8), (_, util2, cap2, _) = tg
            base = tuning.TgmmProblem(rows, k, n, g, out_dtype="bfloat16", operand="bfloat16")
            t_bf16 = tuning.tgmm_roofline(base, tuning.tgmm_best(base, spec), spec).time_s
            tiling = f"tm={c.tm} tk={c.tk} tn={c.tn} q={'xla' if c.prequantize else 'kernel'}"
            emit(gen, "tgmm", g, m, k, n, tiling, util, cap, util2, cap2, t_fp8, t_bf16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu (small shapes by default) or cuda")
    parser.add_argument("--moe", action="store_true", help="the MoE shapes even on cpu (slow)")
    parser.add_argument("--decode", action="store_true", help="MoE decode shapes (1-16 rows per expert)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process's CPU time instead of the wall clock (CPU; use with --threads 1: "
        "with more threads it counts spin-waits)",
    )
    parser.add_argument("--roofline-only", action="store_true")
    parser.add_argument("--shape", nargs=4, type=int, action="append", metavar=("G", "M", "K", "N"),
                        help="time this shape instead of the defaults (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    shapes = MOE_SHAPES if (device.type != "cpu" or args.moe) else SMALL_SHAPES
    if args.decode:
        shapes = DECODE_SHAPES
    if args.shape:
        shapes = tuple(tuple(s) for s in args.shape)
    if not args.roofline_only:
        bench(shapes, device, args.repeats)
    roofline(MOE_SHAPES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
