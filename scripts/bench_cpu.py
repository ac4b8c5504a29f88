#!/usr/bin/env python
"""CPU benchmark of blockwise_matmul against baselines measured in the same run.

    python scripts/bench_cpu.py [--n 4096 --k 4096 --m 1 16 256] [--repeats 5]

For each M prints the median time of: torch bf16 matmul with a bf16 weight (the speed to beat),
"dequantize the fp8 weight then matmul" in eager torch (what users write by hand), and our CPU
backend in W8A8 and W8A16 modes, with each time's ratio to the bf16 baseline and GB/s of weight
traffic (fp8 bytes) for ours. These machines are noisy: compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import torch_fp8_blockwise as tfb  # noqa: E402
from torch_fp8_blockwise.testing import median_ms  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    n, k = args.n, args.k
    w = torch.randn(n, k)
    wq, ws = tfb.quantize(w, (128, 128))
    w_bf16 = w.bfloat16()
    print(f"N={n} K={k} threads={torch.get_num_threads()} torch {torch.__version__}")
    print(f"{'M':>5} {'case':<32} {'ms':>9} {'x bf16':>8} {'weight GB/s':>12}")
    for m in args.m:
        x = torch.randn(m, k, dtype=torch.bfloat16)
        base = median_ms(lambda x=x: x @ w_bf16.T, args.repeats)
        cases = {
            "bf16 matmul (baseline)": lambda x=x: x @ w_bf16.T,
            "eager dequantize + matmul": lambda x=x: x @ tfb.dequantize(wq, ws, (128, 128), torch.bfloat16).T,
            "fp8 cpu W8A8 dynamic": lambda x=x: tfb.blockwise_matmul(x, wq, ws),
            "fp8 cpu W8A16": lambda x=x: tfb.blockwise_matmul(x, wq, ws, activation="none"),
        }
        for name, fn in cases.items():
            ms = base if name.startswith("bf16") else median_ms(fn, args.repeats)
            gbs = f"{n * k / ms / 1e6:12.2f}" if name.startswith("fp8") else f"{'':>12}"
            print(f"{m:>5} {name:<32} {ms:>9.2f} {ms / base:>8.2f} {gbs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
