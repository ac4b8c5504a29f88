#!/usr/bin/env python
"""Benchmark (and optionally profile) the Triton fp8 kernels on a CUDA GPU.

    python scripts/bench_triton.py                          # small + medium + large, every op
    python scripts/bench_triton.py --cases small --ops w8a8 mxfp8
    python scripts/bench_triton.py --profile /tmp/fp8_trace.json   # torch.profiler chrome trace
    python scripts/bench_triton.py --dry-run                # no GPU: print the plan and selected configs

Per case it prints the median time (triton.testing.do_bench), TFLOP/s (2 M N K / t), GB/s (bytes
the op must move at least: operands, scales, output) and the ratio to baselines measured in the
same run: torch's bf16 matmul (x_bf16 @ w_bf16.T) and torch._scaled_mm (row-wise fp8 scaling; the
closest it has to block-wise) where this torch/GPU supports it ("n/a" otherwise).
A ratio > 1 means our kernel is faster.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# (M, N, K): DeepSeek-V3-like layers. small = decode (weight-bandwidth-bound), medium = short
# prefill / batched decode, large = prefill (tensor-core-bound).
CASES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "small": ((1, 7168, 2048), (16, 2112, 7168), (64, 4608, 7168)),
    "medium": ((256, 7168, 2048), (512, 4096, 4096)),
    "large": ((4096, 7168, 2048), (4096, 4608, 7168), (8192, 8192, 8192)),
}
OPS = ("w8a8", "w8a16", "mxfp8", "quant")


def _bytes(op: str, m: int, n: int, k: int) -> int:
    out = m * n * 2
    if op == "w8a8":
        return (
            m * k * 2 + n * k + (n // 128 + 1) * (k // 128 + 1) * 4 + out
        )  # bf16 x read once (quantized in-pipeline)
    if op == "w8a16":
        return m * k * 2 + n * k + (n // 128 + 1) * (k // 128 + 1) * 4 + out
    if op == "mxfp8":
        return m * k * 2 + n * k + n * (k // 32) + out
    return m * k * 2 + m * k + m * (k // 128) * 4  # quant: read bf16, write fp8 + scales


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--profile", metavar="TRACE.json", help="write a torch.profiler chrome trace")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the configs; run nothing")
    p.add_argument("--arch", type=int, default=90, help="arch whose configs --dry-run shows (90, 100, 120)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    args = p.parse_args(argv)

    shapes = [s for c in args.cases for s in CASES[c]]
    if args.dry_run:
        return _dry_run(args, shapes)
    import torch

    if not torch.cuda.is_available():
        print("bench_triton: no CUDA GPU visible; run with --dry-run on CPU", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_triton: unset TRITON_INTERPRET to benchmark compiled kernels", file=sys.stderr)
        return 2
    return _bench(args, shapes)


def _dry_run(args, shapes) -> int:
    from torch_fp8_blockwise.backends.triton import configs

    print(f"dry run: configs for sm_{args.arch} (tuned table, else heuristic); nothing is launched")
    for (m, n, k), op in [(s, o) for s in shapes for o in args.ops]:
        flops = 2 * m * n * k
        if op == "quant":
            print(f"{op:<6} M={m:<5} K={k:<6} bytes={_bytes(op, m, n, k) / 1e6:8.2f} MB")
            continue
        key = (args.arch, op, configs.m_bucket(m), n, k)
        cfg = configs.load_table().get(key) or configs.heuristic(op, args.arch, m, n, k)
        bk = 32 if op == "mxfp8" else 128
        print(
            f"{op:<6} M={m:<5} N={n:<6} K={k:<6} {flops / 1e9:9.2f} GFLOP "
            f"{_bytes(op, m, n, k) / 1e6:8.2f} MB  {cfg.for_problem(bk, k)}"
        )
    return 0


def _bench(args, shapes) -> int:
    import torch
    import triton.testing

    import torch_fp8_blockwise as tfb
    from torch_fp8_blockwise import reference

    dev = torch.device("cuda")
    e4m3 = torch.float8_e4m3fn
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}")
    print(
        f"{'op':<6} {'M':>5} {'N':>6} {'K':>6} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'vs bf16':>8} {'vs _scaled_mm':>13}"
    )
    prof = None
    if args.profile:
        prof = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
            record_shapes=True,
        )
        prof.__enter__()
    for m, n, k in shapes:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w_true = torch.randn(n, k, device=dev)
        w_bf16 = w_true.to(torch.bfloat16)
        base_bf16 = triton.testing.do_bench(lambda x=x, w=w_bf16: x @ w.T, rep=args.rep)
        base_scaled = _scaled_mm_baseline(x, w_true, args.rep)
        wq, ws = reference.quantize(w_true, (128, 128), e4m3, "fp32")
        wmx, wmx_s = reference.mxfp8_quantize(w_true, e4m3)
        runs = {
            "w8a8": lambda x=x, wq=wq, ws=ws: tfb.blockwise_matmul(x, wq, ws),
            "w8a16": lambda x=x, wq=wq, ws=ws: tfb.blockwise_matmul(x, wq, ws, activation="none"),
            "mxfp8": lambda x=x, w=wmx, s=wmx_s: tfb.mxfp8_matmul(x, w, s),
            "quant": lambda x=x: tfb.quantize(x, (1, 128)),
        }
        for op in args.ops:
            with torch.profiler.record_function(f"{op} M={m} N={n} K={k}"):
                ms = triton.testing.do_bench(runs[op], rep=args.rep)
            tflops = 2 * m * n * k / ms / 1e9 if op != "quant" else 0.0
            gbs = _bytes(op, m, n, k) / ms / 1e6
            vs_bf16 = f"{base_bf16 / ms:8.2f}" if op != "quant" else "       -"
            vs_scaled = f"{base_scaled / ms:13.2f}" if base_scaled and op != "quant" else f"{'n/a':>13}"
            print(f"{op:<6} {m:>5} {n:>6} {k:>6} {ms:9.4f} {tflops:8.1f} {gbs:8.1f} {vs_bf16} {vs_scaled}")
    if prof is not None:
        prof.__exit__(None, None, None)
        prof.export_chrome_trace(args.profile)
        print(f"chrome trace written to {args.profile} (open in https://ui.perfetto.dev)")
    return 0


def _scaled_mm_baseline(x, w_true, rep: int) -> float | None:
    """Median ms of torch._scaled_mm with row-wise fp8 scales, or None where unsupported."""
    import torch
    import triton.testing

    if not hasattr(torch, "_scaled_mm"):
        return None
    try:
        e4m3 = torch.float8_e4m3fn
        xs = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-10) / 448.0
        wsc = w_true.abs().amax(dim=1, keepdim=True).clamp(min=1e-10) / 448.0
        xq = (x.float() / xs).to(e4m3)
        wq = (w_true / wsc).to(e4m3)

        def run():
            return torch._scaled_mm(xq, wq.T, scale_a=xs, scale_b=wsc.T, out_dtype=torch.bfloat16)

        run()
        return triton.testing.do_bench(run, rep=rep)
    except (RuntimeError, TypeError) as e:
        print(f"torch._scaled_mm unavailable here: {str(e)[:100]}", file=sys.stderr)
        return None


if __name__ == "__main__":
    sys.exit(main())
