#!/usr/bin/env python
"""CPU benchmark of the fp8 ops against baselines measured in the same run.

    python scripts/bench_cpu.py                  # every shape below (a few minutes on 2 cores)
    python scripts/bench_cpu.py --quick          # N = K = 4096 at M = 1, 16 only, plus quantize
    python scripts/bench_cpu.py --threads 1      # every op on one thread (ours and torch's)
    python scripts/bench_cpu.py --threads 1 --cpu-time   # the work per call, robust to a busy machine
    python scripts/bench_cpu.py --call-cost      # the per-call cost table alone

Matmul, per (M, N, K): median ms of torch bf16 matmul with a bf16 weight (the speed to beat),
torch fp32 matmul, naive eager "dequantize the fp8 weight with torch ops, then bf16 matmul" (what
users write by hand), and our CPU backend in W8A16 (activation="none") and W8A8 dynamic modes
through the public op, plus W8A16fn: the backend function called directly (the difference is the
torch.ops dispatch and argument checks, ~70-100 us today); ratios are time / bf16 time (lower is
better) and W8A8 / W8A16.

GEMV bandwidth (M = 1, W8A16, bf16 x, through the op): the fp8 weight's bytes per second, against
a copy of the same bytes into a preallocated tensor (read + written, the issue's definition: the
weight is read once per call, a copy moves each byte twice), in the same run; torch's bf16 GEMV
(x @ w_bf16.T, 2 bytes per weight) beside it. N = K = 4096 (16.8 MB: with its copy's 33.6 MB it
fits a 32 MB L3 in part, as the quantize row of the same size) and 12288 x 4096 (50 MB: DRAM).

Per-call cost at SmolLM2's shapes: microseconds per call (each case a loop of calls, interleaved
rounds, median) of an M = 0 call of ``torch.ops.fp8.blockwise_matmul`` against ``torch.mm`` of the
same empty bf16 x (the op's fixed cost: dispatch, validation, backend choice, no kernel), and of an
M = 1 call (W8A16 and W8A8) against torch's bf16 ``F.linear`` (what the bf16 model runs per layer
at decode).

Quantize: GB/s (bytes read + written) of 1 x 128 activation groups and 128 x 128 weight blocks
from bf16, against a copy of the same bf16 tensor into a preallocated one (``dst.copy_(x)``: the
machine's copy bandwidth), in the same run; a clone (copy into a fresh allocation) is shown too.
Sizes against the cache: 1 x 128 runs on 2048 x 4096 (16 MB: its copy's 32 MB of source and
destination fit a 32 MB L3 in part, so on our CI machine that copy reads 33-53 GB/s from run to run,
L3 and DRAM mixed) and on 6144 x 4096 (48 MB, beyond any L3 here: DRAM bandwidth, ~25-33 GB/s,
and the quantize outputs, 24 MB, stay below glibc's largest mmap threshold, 32 MiB, so they reuse
heap memory); 128 x 128 on 4096 x 4096 (32 MB).

Allocation: quantize returns fresh tensors, so each call's outputs are new memory. glibc's default
malloc maps a block of this size (8-16 MB) afresh on every call and unmaps it on free, and in
these VMs each first touch of a 4 KB page then costs ~3 us (the clone column drops to ~4 GB/s):
the allocator, not the op, would set the quantize figure, and which regime a run lands in
depends on earlier allocations. So by default the script pins glibc's thresholds first (mmap
threshold 32 MiB, no trimming: freed blocks stay in the heap and are reused, as a long-running
server's allocator does), for every case alike; ``--malloc default`` leaves glibc as it is.

Peak extra memory of one matmul call: a fresh subprocess makes the fp8 weight, runs the call once
(lazy initialisation, compile), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``
= 5), runs the call again and reports VmHWM - VmRSS before the call: every byte the call touched
beyond its inputs, torch's allocator and our C kernel's buffers alike.

These machines are shared and noisy: compare the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import torch_fp8_blockwise as tfb  # noqa: E402
from torch_fp8_blockwise import reference  # noqa: E402
from torch_fp8_blockwise.backends import cpu  # noqa: E402

BIG = [(m, 4096, 4096) for m in (1, 16, 256, 2048)]
# SmolLM2-135M projections (hidden 576, intermediate 1536; k/v 192 rows): (N, K)
SMOL = [(m, n, k) for n, k in ((576, 576), (192, 576), (1536, 576), (576, 1536)) for m in (1, 64)]


CLOCK: Callable[[], float] = time.perf_counter


def steady_malloc() -> str:
    """Pin glibc malloc's mmap threshold (32 MiB, its maximum) and trim threshold (1 GiB), so blocks
    below 32 MiB come from the heap and stay there when freed (see the module docstring)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default (no glibc)"
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    if libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30):
        return "steady (glibc mmap threshold 32 MiB, no trim)"
    return "default (mallopt refused)"


def interleaved_ms(
    cases: dict[str, Callable[[], object]],
    budget_s: float = 5.0,
    prepare: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Median ms of each case, run round-robin so that load from other processes hits every case
    alike; in each round every case is called twice and the second call is timed, so no case pays
    for the cache misses the previous case caused. 3..100 rounds, as many as fit in ~budget_s.
    prepare: name -> a function run before that case's calls in each round, untimed (e.g. turning
    the C++ kernel of the op off for a case of the Python kernels)."""
    prepare = prepare or {}
    nothing = lambda: None  # noqa: E731
    probe = {}
    for name, fn in cases.items():
        prepare.get(name, nothing)()
        start = time.perf_counter()
        fn()  # warm-up: lazy initialisation, compile, allocator
        probe[name] = time.perf_counter() - start
    rounds = int(min(100, max(3, budget_s / (2 * sum(probe.values())))))
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            prepare.get(name, nothing)()
            if probe[name] < 1.0:
                fn()
            start = CLOCK()
            fn()
            times[name].append((CLOCK() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_matmul(m: int, n: int, k: int) -> None:
    w = torch.randn(n, k)
    wq, ws = tfb.quantize(w, (128, 128))
    w_bf16, w_f32 = w.bfloat16(), w
    x = torch.randn(m, k, dtype=torch.bfloat16)
    xf = x.float()

    def eager():
        return x @ reference.dequantize(wq, ws, (128, 128), torch.bfloat16).T

    cases = {
        "bf16": lambda: x @ w_bf16.T,
        "fp32": lambda: xf @ w_f32.T,
        "eager": eager,
        "W8A16": lambda: tfb.blockwise_matmul(x, wq, ws, activation="none"),
        "W8A8": lambda: tfb.blockwise_matmul(x, wq, ws),
        # The backend function alone, without the torch.ops dispatch and argument checks.
        "W8A16fn": lambda: cpu.blockwise_matmul(x, wq, ws, (128, 128), None, None, torch.bfloat16, "none"),
    }
    ms = interleaved_ms(cases)
    base = ms["bf16"]
    row = " ".join(f"{ms[c]:9.2f}" for c in cases)
    ratios = " ".join(f"{ms[c] / base:7.2f}" for c in ("fp32", "eager", "W8A16", "W8A8", "W8A16fn"))
    print(f"{m:>5} {n:>5} {k:>5} {row} | {ratios} {ms['W8A8'] / ms['W8A16']:9.2f}", flush=True)


def bench_gemv() -> None:
    print(
        "\nGEMV M = 1 (W8A16, bf16 x, through the op): fp8 weight GB/s vs copy of the same bytes"
        " (read + written) in the same run; bf16 = torch's x @ w_bf16.T in bf16 weight bytes"
    )
    print(
        f"{'N':>6} {'K':>5} {'MB':>6} {'ms':>7} {'GB/s':>7} {'copy GB/s':>10} {'of copy':>8} "
        f"{'bf16 ms':>8} {'bf16 GB/s':>10}"
    )
    for n, k in ((4096, 4096), (12288, 4096)):
        _gemv_row(n, k)


def _gemv_row(n: int, k: int) -> None:
    bits = torch.randint(0, 0x7E, (n, k), dtype=torch.uint8)  # finite e4m3 codes
    wq, ws = bits.view(torch.float8_e4m3fn), torch.rand(n // 128, k // 128) + 0.5
    w_bf16 = torch.randn(n, k, dtype=torch.bfloat16)
    dst = torch.empty_like(bits)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    ms = interleaved_ms(
        {
            "copy": lambda: dst.copy_(bits),
            "gemv": lambda: tfb.blockwise_matmul(x, wq, ws, activation="none"),
            "bf16": lambda: x @ w_bf16.T,
        }
    )
    gbs, copy_gbs, bf16_gbs = (
        n * k / ms["gemv"] / 1e6,
        2 * n * k / ms["copy"] / 1e6,
        2 * n * k / ms["bf16"] / 1e6,
    )
    print(
        f"{n:>6} {k:>5} {n * k / 1e6:6.1f} {ms['gemv']:7.2f} {gbs:7.2f} {copy_gbs:10.2f} {gbs / copy_gbs:8.0%} "
        f"{ms['bf16']:8.2f} {bf16_gbs:10.2f}",
        flush=True,
    )


def bench_call_cost(calls: int = 200) -> None:
    from torch_fp8_blockwise.backends import cpu_native

    cpu_native.install()  # what the first CPU blockwise_matmul call does: build or load the C++ kernel
    print(
        f"\nper-call cost at SmolLM2's shapes (us per call, loops of {calls} calls, interleaved rounds, median):"
        " M = 0 op (all 8 arguments spelled out, and 'op3': op(x, w, w_scale), the defaults left to the"
        " schema) vs torch.mm of the same; M = 1 op vs torch's bf16 F.linear; 'py': the op's Python"
        f" kernels (the C++ kernel of backends/cpu_native.py off; {cpu_native.status()})"
    )
    print(
        f"{'N':>5} {'K':>5} | {'mm M=0':>7} {'op M=0':>7} {'x mm':>5} {'op3 M=0':>7} {'x mm':>5} {'py M=0':>7} "
        f"{'x mm':>5} | {'bf16 M=1':>8} "
        f"{'W8A16':>7} {'W8A8':>7} {'W8A16 x':>8} {'W8A8 x':>7} {'py W8A16 x':>10} {'py W8A8 x':>9}"
    )
    for n, k in ((576, 576), (192, 576), (1536, 576), (576, 1536)):
        _call_cost_row(n, k, calls)


def _call_cost_row(n: int, k: int, calls: int) -> None:
    from torch_fp8_blockwise.backends import cpu_native

    op = torch.ops.fp8.blockwise_matmul.default
    linear = torch.nn.functional.linear
    w = torch.randn(n, k)
    wq, ws = tfb.quantize(w, (128, 128))
    w_bf16 = w.bfloat16()
    w_t = w_bf16.t()
    x0, x1 = torch.empty(0, k, dtype=torch.bfloat16), torch.randn(1, k, dtype=torch.bfloat16)
    cpp = cpu_native.installed()

    def loop(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls):
                fn()

        return run

    cases = {
        "mm0": loop(lambda: torch.mm(x0, w_t)),
        "op0": loop(lambda: op(x0, wq, ws, [128, 128], None, None, None, "none")),
        "op3": loop(lambda: op(x0, wq, ws)),
        "py0": loop(lambda: op(x0, wq, ws, [128, 128], None, None, None, "none")),
        "bf16": loop(lambda: linear(x1, w_bf16)),
        "W8A16": loop(lambda: op(x1, wq, ws, [128, 128], None, None, None, "none")),
        "W8A8": loop(lambda: op(x1, wq, ws, [128, 128], None, None, None, "dynamic")),
        "pyW8A16": loop(lambda: op(x1, wq, ws, [128, 128], None, None, None, "none")),
        "pyW8A8": loop(lambda: op(x1, wq, ws, [128, 128], None, None, None, "dynamic")),
    }
    on, off = (lambda: cpu_native.set_enabled(cpp)), (lambda: cpu_native.set_enabled(False))
    prepare = {name: off if name.startswith("py") else on for name in cases}
    try:
        ms = interleaved_ms(cases, budget_s=4.0, prepare=prepare)
    finally:
        on()
    us = {name: t * 1e3 / calls for name, t in ms.items()}
    print(
        f"{n:>5} {k:>5} | {us['mm0']:7.2f} {us['op0']:7.2f} {us['op0'] / us['mm0']:5.2f} {us['op3']:7.2f} "
        f"{us['op3'] / us['mm0']:5.2f} {us['py0']:7.2f} "
        f"{us['py0'] / us['mm0']:5.2f} | {us['bf16']:8.2f} {us['W8A16']:7.2f} {us['W8A8']:7.2f} "
        f"{us['W8A16'] / us['bf16']:8.2f} {us['W8A8'] / us['bf16']:7.2f} {us['pyW8A16'] / us['bf16']:10.2f} "
        f"{us['pyW8A8'] / us['bf16']:9.2f}",
        flush=True,
    )


def bench_quantize() -> None:
    print(
        "\nquantize from bf16 (GB/s = bytes read + written; copy = dst.copy_(x) of the same bf16 tensor into"
        " a preallocated dst: the machine's copy bandwidth; clone = the same copy plus a fresh allocation,"
        " whose first-touch page faults cost more than the copy above ~32 MB)"
    )
    print(
        f"{'block':>10} {'shape':>12} {'ms':>8} {'GB/s':>8} {'copy GB/s':>10} {'of copy':>8} {'clone GB/s':>11}"
    )
    for block, shape in (((1, 128), (2048, 4096)), ((1, 128), (6144, 4096)), ((128, 128), (4096, 4096))):
        x = torch.randn(shape, dtype=torch.bfloat16)
        dst = torch.empty_like(x)
        ms = interleaved_ms(
            {
                "copy": lambda x=x, dst=dst: dst.copy_(x),
                "clone": x.clone,
                "quantize": lambda x=x, block=block: tfb.quantize(x, block),
            }
        )
        numel = x.numel()
        scales = numel // (block[0] * block[1]) * 4
        q_gbs = (numel * 2 + numel + scales) / ms["quantize"] / 1e6
        copy_gbs, clone_gbs = (numel * 4 / ms[name] / 1e6 for name in ("copy", "clone"))
        print(
            f"{str(block):>10} {str(shape):>12} {ms['quantize']:8.2f} {q_gbs:8.2f} {copy_gbs:10.2f} "
            f"{q_gbs / copy_gbs:8.0%} {clone_gbs:11.2f}",
            flush=True,
        )


_PEAK = """
import sys, torch, torch_fp8_blockwise as tfb
m, n, k, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
bits = torch.randint(0, 0x7E, (n, k), dtype=torch.uint8)  # finite e4m3 codes, no float32 weight
wq, ws = bits.view(torch.float8_e4m3fn), torch.rand(n // 128, k // 128) + 0.5
x = torch.randn(m, k, dtype=torch.bfloat16)
call = lambda: tfb.blockwise_matmul(x, wq, ws, activation=mode)
call()
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
before = status("VmRSS:")
y = call()
print(status("VmHWM:") - before)
"""


def bench_peak_memory(shapes) -> None:
    print("\npeak extra memory of one call (VmHWM - VmRSS before it, fresh process, 2nd call)")
    print(
        f"{'M':>5} {'N':>5} {'K':>5} {'mode':>8} {'extra KB':>9} {'fp32 weight MB':>15} {'bf16 weight MB':>15}"
    )
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    for m, n, k in shapes:
        for mode in ("none", "dynamic"):
            out = subprocess.run(
                [sys.executable, "-c", _PEAK, str(m), str(n), str(k), mode],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": str(torch.get_num_threads())},
            )
            extra = out.stdout.strip() or f"failed: {out.stderr.strip()[-200:]}"
            print(
                f"{m:>5} {n:>5} {k:>5} {mode:>8} {extra:>9} {n * k * 4 / 2**20:15.1f} {n * k * 2 / 2**20:15.1f}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="N = K = 4096 at M = 1 and 16 only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process's CPU time instead of the wall clock: on a shared, busy machine "
        "this is the work each case does (use with --threads 1; with more threads it counts spin-waits)",
    )
    parser.add_argument(
        "--malloc",
        choices=("steady", "default"),
        default="steady",
        help="steady: pin glibc's malloc thresholds so fresh outputs reuse heap memory instead of "
        "page-faulting on every call (see above); default: glibc as it is",
    )
    parser.add_argument(
        "--call-cost",
        action="store_true",
        help="only the per-call cost table (SmolLM2's shapes at M = 0 and 1)",
    )
    args = parser.parse_args()
    malloc = steady_malloc() if args.malloc == "steady" else "default"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    torch.manual_seed(0)
    print(
        f"threads={torch.get_num_threads()} torch {torch.__version__} cpu kernels: {cpu.kernel_status()}; "
        f"malloc: {malloc}"
    )
    clock = "process CPU time" if args.cpu_time else "wall clock"
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}; {clock} ms; ratios = time / bf16 time")
    if args.call_cost:
        bench_call_cost()
        return 0
    print(
        f"{'M':>5} {'N':>5} {'K':>5} {'bf16':>9} {'fp32':>9} {'eager':>9} {'W8A16':>9} {'W8A8':>9} "
        f"{'W8A16fn':>9} | {'fp32':>7} {'eager':>7} {'W8A16':>7} {'W8A8':>7} {'W8A16fn':>7} {'W8A8/W8A16':>9}"
    )
    shapes = BIG[:2] if args.quick else BIG + SMOL
    for m, n, k in shapes:
        bench_matmul(m, n, k)
    bench_gemv()
    bench_call_cost()
    bench_quantize()
    bench_peak_memory([(1, 4096, 4096)] if args.quick else [(1, 4096, 4096), (256, 4096, 4096)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
