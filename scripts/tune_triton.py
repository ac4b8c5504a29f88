#!/usr/bin/env python
"""Tune the Triton GEMM configs on this GPU and write torch_fp8_blockwise/data/cuda/gemm_configs.json.

    python scripts/tune_triton.py                       # sweep on the visible GPU, merge into the table
    python scripts/tune_triton.py --kernels w8a8 --shapes 7168x2048 --m 1 2 4 8 16 4096
    python scripts/tune_triton.py --from-heuristic --arch 90 100 120   # no GPU: heuristic-derived entries
    python scripts/tune_triton.py --dry-run             # print the sweep plan, run nothing

Key of an entry: (arch, kernel, m_bucket, N, K); see torch_fp8_blockwise/backends/triton/configs.py.
Every candidate is filtered by the shared-memory model of configs.fits() for this arch, timed with
triton.testing.do_bench (median, after warm-up), and checked against the reference on the same
inputs before it may win. Run scripts/check_lowering.py --target cuda afterwards: it compiles
every table entry for sm_90/100/120 and fails on spills or smem overflow.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# DeepSeek-V3 linear layers (N, K) with 128 x 128 blocks: q_a / kv_a projections, o_proj,
# MLP down / gate-up shards (TP 8), and a square one.
DEFAULT_SHAPES = ((2112, 7168), (7168, 2048), (4608, 7168), (7168, 2304), (4096, 4096))
#: Every M bucket of configs.M_BUCKETS: decode gets its own (1, 2, 4, 8, 16, 24, ...) because the
#: entry tuned at M=16 ran M=1 slower than the heuristic on the H100 (11.0 vs 8.7 us, N=7168, K=2048),
#: and the lookup never borrows a neighbouring bucket's entry.
DEFAULT_M = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096)
TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "torch_fp8_blockwise", "data", "cuda")


def candidates(kernel: str, arch: int, m: int, k: int):
    from torch_fp8_blockwise.backends.triton.configs import GemmConfig, fits

    decode = m <= 64
    # W8A16 never swaps: the swapped weight as wgmma's register operand loads 8/2 bytes at a time
    # (configs.heuristic).
    swap = decode and kernel != "w8a16"
    bms = (16, 32, 64) if decode else (64, 128, 256)
    out = []
    for bm, bn, bk, stages, warps, split in itertools.product(
        bms, (64, 128, 256), (64, 128, 256), (2, 3, 4, 5), (4, 8), (1, 2, 4, 8) if decode else (1,)
    ):
        if decode and bm < m and bm < 64:
            continue
        if swap and bn < 64:  # the MMA's long side must be >= 64 rows (wgmma)
            continue
        cfg = GemmConfig(
            bm,
            bn,
            bk,
            group_m=1 if decode else 8,
            split_k=split,
            swap_ab=swap,
            num_warps=warps,
            num_stages=stages,
        )
        if fits(cfg, kernel, arch):
            out.append(cfg)
    return out


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes: expected NxK (e.g. 7168x2048), got {text!r}") from None
    return n, k


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--kernels", nargs="+", default=["w8a8", "w8a16", "mxfp8"], choices=["w8a8", "w8a16", "mxfp8"]
    )
    p.add_argument("--shapes", nargs="+", type=_parse_shape, default=list(DEFAULT_SHAPES), metavar="NxK")
    p.add_argument(
        "--m",
        nargs="+",
        type=int,
        default=list(DEFAULT_M),
        help="M values to tune, one entry per M bucket (configs.M_BUCKETS; tune each decode bucket itself)",
    )
    p.add_argument("--arch", nargs="+", type=int, default=None, help="with --from-heuristic / --dry-run")
    p.add_argument("--from-heuristic", action="store_true", help="write heuristic-derived entries (no GPU)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--out", default=os.path.join(TABLE, "gemm_configs.json"))
    p.add_argument("--max-candidates", type=int, default=48, help="per (kernel, M, N, K), evenly sampled")
    args = p.parse_args(argv)

    from torch_fp8_blockwise.backends.triton import configs

    if args.dry_run or args.from_heuristic:
        archs = args.arch or list(configs.ARCHS)
        entries = []
        for arch, kernel, (n, k), m in itertools.product(archs, args.kernels, args.shapes, args.m):
            cfg = configs.heuristic(kernel, arch, m, n, k)
            if args.dry_run:
                print(
                    f"sm_{arch} {kernel:<6} M={m:<5} N={n:<6} K={k:<6} candidates={len(candidates(kernel, arch, m, k)):<4} heuristic={cfg}"
                )
            entries.append(_entry(arch, kernel, configs.m_bucket(m), n, k, cfg, "heuristic"))
        if args.from_heuristic and not args.dry_run:
            _write(args.out, entries, configs)
        return 0
    return _tune(args, configs)


def _entry(arch, kernel, bucket, n, k, cfg, source, ms=None):
    e = {
        "arch": arch,
        "kernel": kernel,
        "m_bucket": bucket,
        "n": n,
        "k": k,
        "config": cfg.to_json(),
        "source": source,
    }
    if ms is not None:
        e["ms"] = round(ms, 5)
    return e


def _write(path: str, new_entries: list[dict], configs) -> None:
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        table = {"note": "", "entries": []}
    keyed = {(e["arch"], e["kernel"], e["m_bucket"], e["n"], e["k"]): e for e in table["entries"]}
    for e in new_entries:
        keyed[(e["arch"], e["kernel"], e["m_bucket"], e["n"], e["k"])] = e
    sources = {e.get("source", "heuristic").split(":")[0] for e in keyed.values()}
    table["note"] = (
        "Entries are heuristic-derived (configs.heuristic) until tuned on a GPU; 'source' says which "
        "each entry is. Regenerate with scripts/tune_triton.py on the target GPU. Key: (arch, kernel, "
        "m_bucket, n, k); m_bucket is the smallest of configs.M_BUCKETS >= M."
        if "heuristic" in sources
        else "Measured entries only (configs.heuristic covers every other key and says so once per "
        "process), written by scripts/tune_triton.py. Key: (arch, kernel, m_bucket, n, k); m_bucket = the "
        "smallest of configs.M_BUCKETS >= M, looked up exactly (a bucket without an entry uses the "
        "heuristic, never a neighbour's entry). 'ms' = the tuner's median."
    )
    table["entries"] = [keyed[key] for key in sorted(keyed)]
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    configs.load_table.cache_clear()
    print(f"wrote {len(new_entries)} entries ({len(keyed)} total) to {path}")


def make_problem(kernel: str, m: int, n: int, k: int, device):
    """Inputs of one tuning point: (run(cfg) -> y [M, N] bf16, ref [M, N] bf16).

    ref is reference.py on the SAME quantized inputs the kernel sees: W8A8 gets x quantized per
    1 x 128 group; W8A16 keeps x in bf16, so its reference is activation "none" (passing "dynamic"
    here quantized x in the reference only, and every W8A16 candidate was rejected on the H100).
    """
    import torch

    from torch_fp8_blockwise import reference
    from torch_fp8_blockwise.backends.triton.blockwise_matmul import launch_gemm
    from torch_fp8_blockwise.backends.triton.mxfp8 import launch_mxfp8_gemm, native_supported

    w_true = torch.randn(n, k, device=device)
    x_true = torch.randn(m, k, device=device)
    if kernel == "mxfp8":
        wq, ws = reference.mxfp8_quantize(w_true, torch.float8_e4m3fn)
        xq, xs = reference.mxfp8_quantize(x_true, torch.float8_e4m3fn)
        ref = reference.mxfp8_matmul(xq, wq, ws, xs, None, torch.bfloat16)
        native = native_supported(torch.device(device))

        def run(cfg):
            return launch_mxfp8_gemm(xq, wq, ws, xs, None, torch.bfloat16, cfg, native)

        return run, ref
    wq, ws = reference.quantize(w_true, (128, 128), torch.float8_e4m3fn, "fp32")
    if kernel == "w8a8":
        xq, xs = reference.quantize_activation(x_true, 128)
        activation = "dynamic"
    else:
        xq, xs = x_true.to(torch.bfloat16), None
        activation = "none"
    ref = reference.blockwise_matmul(xq, wq, ws, (128, 128), xs, None, torch.bfloat16, activation)

    def run(cfg):
        return launch_gemm(xq, wq, ws, (128, 128), xs, None, torch.bfloat16, cfg)

    return run, ref


def correct(y, ref) -> bool:
    """The tuner's gate: a candidate may win only with the numerics contract's bf16 kernel-error
    bound (testing.kernel_error_bound: one bf16 step, 2**-7) against the reference."""
    import torch

    from torch_fp8_blockwise.testing import kernel_error_bound, rel_error

    return y.shape == ref.shape and rel_error(y, ref) <= kernel_error_bound(torch.bfloat16)


def _tune(args, configs) -> int:
    import torch

    if not torch.cuda.is_available():
        print("tune_triton: no CUDA GPU visible; use --dry-run or --from-heuristic", file=sys.stderr)
        return 2
    import triton.testing

    dev = torch.device("cuda")
    arch = configs.device_arch(dev)
    source = (
        f"tuned: {torch.cuda.get_device_name(dev)}, torch {torch.__version__} / triton {triton.__version__}, "
        f"scripts/tune_triton.py (do_bench, L2 flushed), {datetime.date.today().isoformat()}"
    )
    entries = []
    for kernel, (n, k), m in itertools.product(args.kernels, args.shapes, args.m):
        run, ref = make_problem(kernel, m, n, k, dev)
        cands = candidates(kernel, arch, m, k)
        stride = max(1, len(cands) // args.max_candidates)
        cands = cands[::stride] + [configs.heuristic(kernel, arch, m, n, k)]
        best = None
        for cfg in cands:
            cfg = cfg.for_problem(32 if kernel == "mxfp8" else 128, k)
            try:
                y = run(cfg)
                if not correct(y, ref):
                    print(f"  reject {cfg}: wrong result", file=sys.stderr)
                    continue
                ms = triton.testing.do_bench(lambda cfg=cfg, run=run: run(cfg), warmup=10, rep=50)
            except Exception as e:  # out of resources etc.: skip this candidate, say why
                print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                continue
            if best is None or ms < best[0]:
                best = (ms, cfg)
        if best is None:
            print(f"sm_{arch} {kernel} M={m} N={n} K={k}: no candidate ran", file=sys.stderr)
            continue
        ms, cfg = best
        tflops = 2 * m * n * k / ms / 1e9
        print(f"sm_{arch} {kernel:<6} M={m:<5} N={n:<6} K={k:<6} {ms:8.4f} ms {tflops:7.1f} TFLOP/s {cfg}")
        entries.append(_entry(arch, kernel, configs.m_bucket(m), n, k, replace(cfg), source, ms))
    _write(args.out, entries, configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
