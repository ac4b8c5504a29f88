#!/usr/bin/env python
"""Kernel time of every CUDA blockwise_matmul path vs bf16 cuBLAS and cuBLAS block-scaled, same run.

    python scripts/bench_triton.py                      # 5 DeepSeek-V3 (N, K) x M 1..4096, on a GPU
    python scripts/bench_triton.py --json out.json --plot ratios.png
    python scripts/bench_triton.py --interpret          # CPU: tiny shapes, end to end (Triton interpreter)
    python scripts/bench_triton.py --dry-run            # no launch: the plan and the Triton configs

Columns (microseconds; "ratio" = best of bf16 cuBLAS and cuBLAS block-scaled / ours, > 1 = we are
faster; the issue-8 bar is >= 0.97 at every point):

* bf16: ``x_bf16 @ w_bf16.T`` (torch, cuBLAS).
* cublas-bs: ``torch._scaled_mm`` block-scaled, fp8 x (1x128 groups) and 128x128 weight blocks,
  M padded to a multiple of 4 (backends/cublas.py; what our cuBLAS route runs).
* routed: ``tfb.blockwise_matmul`` with fp8 x + x_scale through the routing rule; the letter says
  which route it took (C cuBLAS, T Triton, D dequantize + GEMM).
* triton: the Triton W8A8 kernel forced with ``use_backend("triton")``.
* dynamic: routed, bf16 x (our activation quantizer + the routed W8A8 kernel).
* w8a16: routed, bf16 x with activation="none".
* mxfp8: ``tfb.mxfp8_matmul`` with pre-quantized MX x (1x32 E8M0 groups).
* host: eager host time per call of the routed fp8-x op (issuing calls without synchronizing),
  and of bf16 ``x @ w.T`` for scale (issue 8: <= 3x).

Kernel times are medians under CUDA-graph replay (triton.testing.do_bench_cudagraph), so host
overhead is excluded. Decode (M <= --cold-m, default 64) is timed with a cold L2: each replay
cycles through enough weight copies to cover >= 2.5x the L2 size (the header says how many).
vLLM's Triton kernel is not run here (its code cannot be vendored); its H100 figures in
shared/data/h100/bench_2026-11-22.md were measured with vLLM's own kernel and configs.

``--interpret`` runs the same table on CPU with tiny shapes (TRITON_INTERPRET=1, wall-clock
medians): it proves the script end to end; bf16 is torch's CPU matmul and cuBLAS is "n/a".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: DeepSeek-V3 layer shapes (N, K) and token counts M (issue 8).
SHAPES: tuple[tuple[int, int], ...] = ((2112, 7168), (4608, 7168), (7168, 2048), (24576, 1536), (7168, 18432))
M_VALUES: tuple[int, ...] = (1, 16, 64, 256, 1024, 4096)
#: --interpret: small enough for the Triton interpreter, one shape with ragged N and a K that
#: cuBLAS could not take.
INTERPRET_SHAPES: tuple[tuple[int, int], ...] = ((256, 256), (144, 384), (200, 320))
INTERPRET_M: tuple[int, ...] = (1, 5, 32)
ROUTES = ("routed", "triton", "dynamic", "w8a16", "mxfp8")
BASELINES = ("bf16", "cublas-bs")
ROUTE_LETTER = {"cublas": "C", "triton": "T", "triton_dequant_mm": "D", "cpu": "cpu"}
L2_FALLBACK_BYTES = 50 * 2**20  # H100
COLD_FACTOR = 2.5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", metavar="NxK", help="(N, K) pairs, default: the DeepSeek-V3 five")
    p.add_argument("--m", nargs="+", type=int, help="M values, default 1 16 64 256 1024 4096")
    p.add_argument("--routes", nargs="+", default=list(ROUTES), choices=ROUTES)
    p.add_argument("--cold-m", type=int, default=64, help="M up to which weights are timed with a cold L2")
    p.add_argument("--rep", type=int, default=100, help="do_bench_cudagraph repetition time (ms)")
    p.add_argument("--host-calls", type=int, default=200, help="eager calls per host-time sample")
    p.add_argument("--json", metavar="FILE", help="write every row as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG of the ratios (matplotlib, Agg)")
    p.add_argument("--interpret", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    p.add_argument("--dry-run", action="store_true", help="print the plan and Triton configs; launch nothing")
    p.add_argument("--arch", type=int, default=90, help="arch whose configs --dry-run shows (90, 100, 120)")
    args = p.parse_args(argv)
    try:
        shapes = [_parse_shape(s) for s in args.shapes] if args.shapes else None
    except ValueError as e:
        p.error(str(e))
    shapes = shapes or list(INTERPRET_SHAPES if args.interpret else SHAPES)
    ms = args.m or list(INTERPRET_M if args.interpret else M_VALUES)
    if args.dry_run:
        return _dry_run(args, shapes, ms)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton kernels are defined
    import torch

    if not args.interpret:
        if not torch.cuda.is_available():
            print("bench_triton: no CUDA GPU visible; use --interpret (CPU) or --dry-run", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("bench_triton: unset TRITON_INTERPRET to time compiled kernels", file=sys.stderr)
            return 2
    rows = _bench(args, shapes, ms)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"rows written to {args.json}")
    if args.plot:
        _plot(rows, args.plot, args.routes)
        print(f"plot written to {args.plot}")
    return 0


def _parse_shape(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--shapes: expected NxK with positive ints, e.g. 7168x2048, got {text!r}")
    return int(parts[0]), int(parts[1])


def _dry_run(args, shapes, ms) -> int:
    from torch_fp8_blockwise import _route
    from torch_fp8_blockwise.backends.triton import configs

    print(f"dry run: {len(shapes)} shapes x {len(ms)} M; configs for sm_{args.arch}; nothing is launched")
    for line in _route.describe():
        print(line)
    for (n, k), m in [(s, m) for s in shapes for m in ms]:
        for kernel in ("w8a8", "mxfp8"):
            key = (args.arch, kernel, configs.m_bucket(m), n, k)
            cfg = configs.load_table().get(key) or configs.heuristic(kernel, args.arch, m, n, k)
            bk = 32 if kernel == "mxfp8" else 128
            print(
                f"{kernel:<6} M={m:<5} N={n:<6} K={k:<6} {2 * m * n * k / 1e9:9.2f} GFLOP  {cfg.for_problem(bk, k)}"
            )
    return 0


class _Timer:
    """Kernel time (us) of fn: CUDA-graph replay medians on a GPU, wall-clock medians on CPU."""

    def __init__(self, cuda: bool, rep: int) -> None:
        self.cuda, self.rep = cuda, rep

    def __call__(self, fn, per_call: int = 1) -> float:
        fn()  # warm-up outside capture: compiles kernels, probes cuBLAS, fills caches
        if self.cuda:
            import torch
            import triton.testing

            torch.cuda.synchronize()
            ms = triton.testing.do_bench_cudagraph(fn, rep=self.rep, return_mode="median")
        else:
            from torch_fp8_blockwise.testing import median_ms

            ms = median_ms(fn, 3)
        return ms * 1e3 / per_call


def _host_us(fn, calls: int, sync) -> float:
    """Eager host time per call: issue ``calls`` calls, min over 5 samples (no per-call sync)."""
    fn()
    sync()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
        sync()
    return best


def _bench(args, shapes, ms) -> list[dict]:
    import torch

    from torch_fp8_blockwise import reference
    from torch_fp8_blockwise.backends import cublas

    cuda = not args.interpret
    dev = torch.device("cuda" if cuda else "cpu")
    timer = _Timer(cuda, args.rep)
    e4m3, bf16 = torch.float8_e4m3fn, torch.bfloat16

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        import triton

        props = torch.cuda.get_device_properties(dev)
        l2 = getattr(props, "L2_cache_size", 0) or L2_FALLBACK_BYTES
        probe = cublas.probe(dev)
        print(
            f"{props.name}, torch {torch.__version__}, triton {triton.__version__}, L2 {l2 / 2**20:.0f} MiB"
        )
        print(f"cuBLAS block-scaled probe: {probe or 'passed'}")
    else:
        l2 = 0
        probe = "no CUDA device (--interpret): cuBLAS block-scaled n/a"
        print(
            f"CPU (--interpret, Triton interpreter), torch {torch.__version__}: wall-clock medians, not GPU times"
        )
        print(probe)
    print("kernel times in us; ratio = best(bf16, cublas-bs) / ours (> 1: ours faster; bar 0.97)")
    print("vLLM Triton: not run (see the docstring; reference figures in shared/data/h100/)")
    ctx = {"args": args, "cuda": cuda, "dev": dev, "timer": timer, "sync": sync, "l2": l2, "probe": probe}
    cols = [*BASELINES, *args.routes]
    head = f"{'M':>5} {'N':>6} {'K':>6} {'L2':>8} " + " ".join(f"{c:>16}" for c in cols)
    head += f" {'host us':>8} {'host bf16':>9}"
    print(head)
    print("-" * len(head))
    rows = []
    for n, k in shapes:
        w_true = torch.randn(n, k, device=dev) * 0.05
        wq, ws = reference.quantize(w_true, (128, 128), e4m3, "fp32")
        wmx, wmx_s = reference.mxfp8_quantize(w_true, e4m3)
        w_bf16 = w_true.to(bf16)
        del w_true
        for m in ms:
            row = _point(ctx, m, n, k, wq, ws, wmx, wmx_s, w_bf16)
            rows.append(row)
            _print_row(row, cols)
    _summary(rows, args.routes)
    return rows


def _point(ctx: dict, m: int, n: int, k: int, wq, ws, wmx, wmx_s, w_bf16) -> dict:
    """One (M, N, K) row: kernel times of the baselines and our routes, ratios, host times."""
    import torch

    import torch_fp8_blockwise as tfb
    from torch_fp8_blockwise import _route, reference
    from torch_fp8_blockwise.backends import cublas

    args, cuda, dev, timer = ctx["args"], ctx["cuda"], ctx["dev"], ctx["timer"]
    e4m3, bf16 = torch.float8_e4m3fn, torch.bfloat16
    cold = cuda and m <= args.cold_m
    # Cold L2: consecutive calls in one replay read different weight copies, >= 2.5x L2 in all.
    copies = max(2, math.ceil(COLD_FACTOR * ctx["l2"] / (n * k))) if cold else 1
    pairs = [(wq, ws)] + [(wq.clone(), ws.clone()) for _ in range(copies - 1)]
    x = torch.randn(m, k, device=dev, dtype=bf16)
    xq, xs = reference.quantize_activation(x.float(), 128)
    mxq, mxs = reference.mxfp8_quantize(x.float(), e4m3)

    def rotate(call, weights):
        return lambda: [call(w) for w in weights]

    times: dict[str, float | None] = {}
    bf16_copies = max(2, math.ceil(COLD_FACTOR * ctx["l2"] / (2 * n * k))) if cold else 1
    w_bf16s = [w_bf16] + [w_bf16.clone() for _ in range(bf16_copies - 1)]
    times["bf16"] = timer(rotate(lambda w: x @ w.T, w_bf16s), bf16_copies)
    del w_bf16s
    eligible = cublas.ineligible_reason((128, 128), n, k, e4m3, e4m3, "dynamic", bf16) is None
    times["cublas-bs"] = None
    if ctx["probe"] is None and eligible:
        times["cublas-bs"] = timer(
            rotate(lambda p: cublas.matmul(xq, xs, p[0], p[1], None, bf16), pairs), copies
        )
    route = _route.route(dev, m, n, k, (128, 128), e4m3, e4m3, "dynamic", bf16)[0] if cuda else "cpu"

    def forced_triton(p):
        with tfb.use_backend("triton"):
            return tfb.blockwise_matmul(xq, p[0], p[1], x_scale=xs)

    runs = {
        "routed": lambda p: tfb.blockwise_matmul(xq, p[0], p[1], x_scale=xs),
        "triton": forced_triton,
        "dynamic": lambda p: tfb.blockwise_matmul(x, p[0], p[1]),
        "w8a16": lambda p: tfb.blockwise_matmul(x, p[0], p[1], activation="none"),
        "mxfp8": lambda p: tfb.mxfp8_matmul(mxq, p[0], p[1], x_scale=mxs),
    }
    for name in args.routes:
        weights = pairs
        if name == "mxfp8":
            weights = [(wmx, wmx_s)] + [(wmx.clone(), wmx_s.clone()) for _ in range(copies - 1)]
        times[name] = timer(rotate(runs[name], weights), copies)
    host = _host_us(lambda: tfb.blockwise_matmul(xq, wq, ws, x_scale=xs), args.host_calls, ctx["sync"])
    host_bf16 = _host_us(lambda: x @ w_bf16.T, args.host_calls, ctx["sync"])
    base = [t for key in BASELINES if (t := times[key]) is not None]
    best = min(base) if base else None
    return {
        "m": m, "n": n, "k": k, "cold_l2": cold, "weight_copies": copies, "route": route,
        "us": times, "ratio": {r: (best / times[r] if best else None) for r in args.routes},
        "host_us": host, "host_bf16_us": host_bf16,
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu-interpret",
    }  # fmt: skip


def _print_row(row: dict, cols: list[str]) -> None:
    cells = []
    for c in cols:
        t = row["us"].get(c)
        if t is None:
            cells.append(f"{'n/a':>16}")
            continue
        tag = f"{ROUTE_LETTER.get(row['route'], row['route'])} " if c == "routed" else ""
        ratio = row["ratio"].get(c)
        cells.append((f"{tag}{t:.1f}" + (f" ({ratio:.2f})" if ratio is not None else "")).rjust(16))
    cuda = row["device"] != "cpu-interpret"
    l2_tag = f"cold x{row['weight_copies']}" if row["cold_l2"] else "warm" if cuda else "cpu"
    print(
        f"{row['m']:>5} {row['n']:>6} {row['k']:>6} {l2_tag:>8} "
        + " ".join(cells)
        + f" {row['host_us']:>8.1f} {row['host_bf16_us']:>9.1f}"
    )


def _summary(rows: list[dict], routes) -> None:
    print()
    for r in routes:
        ratios = [row["ratio"][r] for row in rows if row["ratio"].get(r)]
        if not ratios:
            print(f"{r:<8} no baseline to compare with")
            continue
        geo = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
        worst = min(ratios)
        below = sum(v < 0.97 for v in ratios)
        print(f"{r:<8} geomean ratio {geo:.3f}, worst {worst:.3f}, {below}/{len(ratios)} points below 0.97")


def _plot(rows: list[dict], path: str, routes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['n']}x{r['k']}\nM={r['m']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(rows)), 4.5))
    for route in routes:
        ys = [r["ratio"].get(route) or float("nan") for r in rows]
        ax.plot(range(len(rows)), ys, marker="o", label=route)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(0.97, color="red", lw=0.8, ls="--", label="bar 0.97")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=6, rotation=90)
    ax.set_ylabel("best(bf16, cuBLAS block-scaled) / ours")
    ax.set_title(f"fp8 blockwise matmul speed ratio ({rows[0]['device'] if rows else ''})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
