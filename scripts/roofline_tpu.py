#!/usr/bin/env python
"""VMEM and roofline model of every tuned Pallas blockwise_matmul entry, against v5e / v6e / v7x budgets.

    python scripts/roofline_tpu.py                    # the shipped table (data/tpu/blockwise_matmul.json)
    python scripts/roofline_tpu.py --block 256 256    # what-if: model-best configs for 256 x 256 blocks
    python scripts/roofline_tpu.py --generation v7x

Per row: grid steps, HBM->VMEM bytes per step, arithmetic intensity (flops per HBM byte moved),
VMEM footprint (double-buffered blocks + accumulator + temporaries) vs the generation's VMEM,
modelled time, % of MXU peak and % of HBM bandwidth. Goals on paper: >= 85% of MXU peak for large
(prefill, M = 4096) shapes, >= 85% of HBM bandwidth for decode (M bucket 32). The model and its
assumptions are in torch_fp8_blockwise/backends/pallas/tuning.py; nothing here was timed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

tuning = importlib.import_module("torch_fp8_blockwise.backends.pallas.tuning")
bm = importlib.import_module("torch_fp8_blockwise.backends.pallas.blockwise_matmul")

GOAL = 0.85


def _rows(generations: list[str], block: tuple[int, int] | None):
    """(generation, problem, config) for the table entries, or model-best configs for ``block``."""
    if block is None:
        for e in sorted(tuning.load_table().values(), key=lambda e: e["key"]):
            if e["generation"] not in generations:
                continue
            p = tuning.Problem(
                e["m_bucket"], e["n"], e["k"], e["bn"], e["bk"], e["x_mode"], e["x_dtype"], e["w_dtype"]
            )
            spec = tuning.GENERATIONS[e["generation"]]
            kp = tuning.kernel_problem(p, e.get("prequantize", False))
            yield e["generation"], p, kp.config(e["tm"], e["tn"], e["tk"], spec), e["source"]
        return
    shapes = sorted(
        {(e["m_bucket"], e["n"], e["k"], e["x_mode"], e["x_dtype"]) for e in tuning.load_table().values()}
    )
    for g in generations:
        for m, n, k, x_mode, x_dtype in shapes:
            p = tuning.Problem(m, n, k, *block, x_mode, x_dtype, "float8_e4m3fn")
            yield g, p, tuning.model_best(p, tuning.GENERATIONS[g]), "model (what-if)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--generation", nargs="+", default=sorted(tuning.GENERATIONS))
    parser.add_argument("--block", nargs=2, type=int, metavar=("BN", "BK"), help="what-if quantization block")
    args = parser.parse_args(argv)
    block = tuple(args.block) if args.block else None

    mib = tuning.MiB
    print(
        f"{'gen':4s} {'M':>5s} {'N':>6s} {'K':>6s} {'b':7s} {'x_mode':7s} {'tm':>4s} {'tn':>5s} {'tk':>5s} "
        f"{'steps':>6s} {'KiB/step':>8s} {'AI':>6s} {'VMEM MiB (limit/cap)':>21s} {'time us':>8s} "
        f"{'MXU%':>5s} {'HBM%':>5s} bound    source"
    )
    summary: dict[tuple[str, str], list[float]] = {}
    for g, p, cfg, source in _rows(args.generation, block):
        spec = tuning.GENERATIONS[g]
        r = tuning.roofline(p, cfg, spec)
        need = bm.vmem_footprint(cfg)
        print(
            f"{g:4s} {p.m:5d} {p.n:6d} {p.k:6d} {p.bn}x{p.bk:<3d} {p.x_mode:7s} {cfg.tm:4d} {cfg.tn:5d} {cfg.tk:5d} "
            f"{r.steps:6d} {r.step_bytes / 1024:8.0f} {r.intensity:6.0f} "
            f"{need / mib:6.1f} ({cfg.vmem_limit_bytes / mib:3.0f}/{spec.vmem_bytes / mib:3.0f}) "
            f"{r.time_s * 1e6:8.1f} {100 * r.mxu_util:5.1f} {100 * r.hbm_util:5.1f} {r.bound:8s} {source}"
            + (" +quantize pass" if tuning.prequantizes(p, cfg) else "")
        )
        if p.m >= 4096:
            summary.setdefault((g, "prefill M=4096: MXU% of peak"), []).append(r.mxu_util)
        if p.m <= 32:
            summary.setdefault((g, "decode M<=32: HBM% of bandwidth"), []).append(r.hbm_util)

    print("\nSummary (goal: >= 85%):")
    for (g, what), values in sorted(summary.items()):
        lo, med = min(values), statistics.median(values)
        verdict = "meets goal" if lo >= GOAL else ("median meets goal" if med >= GOAL else "BELOW goal")
        print(
            f"  {g:4s} {what:32s} min {100 * lo:5.1f}%  median {100 * med:5.1f}%  ({verdict}, {len(values)} shapes)"
        )
    for g in args.generation:
        s = tuning.GENERATIONS[g]
        print(
            f"  {g}: VMEM {s.vmem_bytes // mib} MiB/TC (kernels may claim {tuning.VMEM_USABLE:.0%}), HBM "
            f"{s.hbm_bytes_per_s / 1e9:.0f} GB/s, MXU {s.bf16_flops / 1e12:.0f} TFLOP/s bf16"
            + (
                f", {s.fp8_flops / 1e12:.0f} fp8"
                if s.fp8_flops
                else ", no fp8 MXU (fp8 widened to bf16 in VMEM)"
            )
            + f", MXU depth {s.mxu_k}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
