#!/usr/bin/env python
"""One MoE experts block: FP8 ``Fp8Experts`` (W8A16 and W8A8) vs transformers' experts module in
bf16 and fp32 ("grouped_mm" and "eager" experts implementations), ratios from the same run.

    python scripts/bench_moe.py                               # Qwen3-30B-A3B expert shapes, 32 experts
    python scripts/bench_moe.py --threads 1 --cpu-time        # the work per call on a busy machine
    python scripts/bench_moe.py --experts 16 --hidden 7168 --intermediate 2048   # DeepSeek-V3's shapes
    python scripts/bench_moe.py --device cuda --experts 128 --tokens 1 4 16 512 4096

Per token count T (decode T = 1, 4, 16; prefill T = 512 by default): the median ms of one experts
forward ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` for each
variant, then FP8 / bf16 and FP8 / fp32 (the faster of each baseline's two implementations;
< 1: FP8 faster). The variants run interleaved (one call of each per round), so a load change on a
shared machine hits all of them alike. Routing: each token picks k distinct experts uniformly at
random (a balanced router). FP8 gets bf16 hidden states (a bf16 model's activations); the fp32
baseline gets fp32 ones. Expert weights are random (randn / sqrt(fan-in)): speed does not depend on them.

A host holds only part of a real model's experts (Qwen3-30B-A3B: 128 experts of 2048 x 768, 1.2 GB
of bf16 per layer), so ``--experts`` defaults to 32 (decode touches at most T*k of them anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from torch_fp8_blockwise.experts import Fp8Experts  # noqa: E402
from torch_fp8_blockwise.nn import Fp8Config  # noqa: E402

CLOCK: Callable[[], float] = time.perf_counter
IMPLEMENTATIONS = ("grouped_mm", "eager")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _float_experts(e: int, h: int, i: int, dtype: torch.dtype, impl: str, device: torch.device, seed: int):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=i, num_experts=e)
    cfg._experts_implementation = impl
    g = torch.Generator().manual_seed(seed)
    module = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.randn(e, 2 * i, h, generator=g) / h**0.5)
        module.down_proj.copy_(torch.randn(e, h, i, generator=g) / i**0.5)
    return module.to(device=device, dtype=dtype).eval()


def variants(e: int, h: int, i: int, device: torch.device) -> dict[str, tuple[Callable, torch.dtype]]:
    """name -> (experts module, dtype of its hidden states)."""
    out: dict[str, tuple[Callable, torch.dtype]] = {}
    base = _float_experts(e, h, i, torch.float32, "eager", torch.device("cpu"), seed=0)
    for act, label in (("none", "fp8 W8A16"), ("dynamic", "fp8 W8A8")):
        out[label] = (Fp8Experts.from_experts(base, Fp8Config(activation=act)).to(device), torch.bfloat16)
    del base
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for impl in IMPLEMENTATIONS:
            out[f"{tag} {impl}"] = (_float_experts(e, h, i, dtype, impl, device, seed=0), dtype)
    return out


def bench(
    e: int, h: int, i: int, k: int, tokens: list[int], device: torch.device, repeats: int
) -> list[dict[str, float]]:
    mods = variants(e, h, i, device)
    rows = []
    for t in tokens:
        g = torch.Generator().manual_seed(t)
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(device)
        w = torch.rand(t, k, generator=g).to(device)
        x = torch.randn(t, h, generator=g).to(device)
        inputs = {name: (x.to(dtype), idx, w.to(dtype)) for name, (_, dtype) in mods.items()}
        times: dict[str, list[float]] = {name: [] for name in mods}
        with torch.inference_mode():
            for name, (mod, _) in mods.items():  # warm-up
                mod(*inputs[name])
            for _ in range(repeats):
                for name, (mod, _) in mods.items():
                    _sync(device)
                    start = CLOCK()
                    mod(*inputs[name])
                    _sync(device)
                    times[name].append((CLOCK() - start) * 1e3)
        row = {"T": t} | {name: statistics.median(v) for name, v in times.items()}
        bf16 = min(row[f"bf16 {impl}"] for impl in IMPLEMENTATIONS)
        fp32 = min(row[f"fp32 {impl}"] for impl in IMPLEMENTATIONS)
        for label in ("fp8 W8A16", "fp8 W8A8"):
            row[f"{label} / bf16"] = row[label] / bf16
            row[f"{label} / fp32"] = row[label] / fp32
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, float]]) -> None:
    head = list(rows[0])
    widths = [max(len(c), 9) for c in head]
    print("  ".join(c.rjust(wd) for c, wd in zip(head, widths, strict=True)))
    for row in rows:
        cells = [
            str(int(v)) if c == "T" else (f"{v:.3f}x" if "/" in c else f"{v:.3f}") for c, v in row.items()
        ]
        print("  ".join(s.rjust(wd) for s, wd in zip(cells, widths, strict=True)))
    print("(ms per experts forward, medians; ratios < 1: FP8 faster than the faster implementation)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 512])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="process CPU time instead of the wall clock")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    device = torch.device(args.device)
    print(
        f"experts E={args.experts}, hidden H={args.hidden}, intermediate I={args.intermediate}, top-k={args.top_k}, "
        f"device {device}, threads {torch.get_num_threads()}, clock {'cpu time' if args.cpu_time else 'wall'}"
    )
    rows = bench(args.experts, args.hidden, args.intermediate, args.top_k, args.tokens, device, args.repeats)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
