#!/usr/bin/env python
"""Host (CPU-side) cost of one eager fp8 op call, against a bare torch.mm measured in the same run.

    python scripts/bench_host.py                 # CPU tensors: M=0 proxy + a real small call
    python scripts/bench_host.py --device cuda   # on a GPU: per-call host time of real calls

The M=0 call of ``torch.ops.fp8.blockwise_matmul`` runs the op's whole Python path (dispatch,
validation, backend choice) and no kernel: it is the proxy for host overhead that a CPU machine
can measure (issue 8: <= 10 us on the project's CPU machine, where torch.mm of the same takes ~2 us).
A "real small call" then adds the backend's work (on CPU: the CPU backend's kernel).

Timing: each case runs ``--calls`` times back to back, ``--rounds`` times, cases interleaved round
by round (so a noisy neighbour hits every case alike); the minimum per-call time over rounds is
reported (the least disturbed round), as wall time and as CPU time of the calling thread (robust
on a shared machine; on CPU tensors a real call's kernel may run on other threads too). On CUDA the host time is the time to *issue* the calls
(the loop does not synchronize per call); the kernels are drained once at the end of a round.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _cases(device: str, n: int, k: int, m_real: int):
    import torch

    import torch_fp8_blockwise as tfb
    from torch_fp8_blockwise import reference

    dev = torch.device(device)
    w_true = torch.randn(n, k, device=dev)
    wq, ws = reference.quantize(w_true, (128, 128), torch.float8_e4m3fn, "fp32")
    w_bf16 = w_true.to(torch.bfloat16)
    op = torch.ops.fp8.blockwise_matmul.default
    x0 = torch.empty(0, k, device=dev, dtype=torch.bfloat16)
    x = torch.randn(m_real, k, device=dev, dtype=torch.bfloat16)
    xq, xs = reference.quantize_activation(x.float(), 128)
    xq0, xs0 = xq[:0], xs[:0]
    cases = {
        "torch.mm bf16 M=0": lambda: torch.mm(x0, w_bf16.t()),
        "fp8.blockwise_matmul M=0 (bf16 x, dynamic)": lambda: op(x0, wq, ws, [128, 128], None, None, None, "dynamic"),
        "fp8.blockwise_matmul M=0 (fp8 x + x_scale)": lambda: op(xq0, wq, ws, [128, 128], xs0, None, None, "dynamic"),
        "tfb.blockwise_matmul M=0 (Python wrapper)": lambda: tfb.blockwise_matmul(x0, wq, ws),
        f"torch.mm bf16 M={m_real}": lambda: torch.mm(x, w_bf16.t()),
        f"fp8.blockwise_matmul M={m_real} (bf16 x, dynamic)": lambda: op(x, wq, ws, [128, 128], None, None, None, "dynamic"),
        f"fp8.blockwise_matmul M={m_real} (fp8 x + x_scale)": lambda: op(xq, wq, ws, [128, 128], xs, None, None, "dynamic"),
    }  # fmt: skip
    return cases


def _breakdown_cases(n: int, k: int):
    """The parts of an M=0 call (CPU tensors), each timed on its own: where the time goes.

    "dispatcher floor" is an op with the same schema registered the same way (Library define/impl,
    an Autograd kernel taking the keyset) whose kernel returns a prebuilt tensor: the cost of any
    Python-kernel op with this signature before our code runs."""
    import torch

    from torch_fp8_blockwise import _validate, ops, reference

    wq, ws = reference.quantize(torch.randn(n, k), (128, 128), torch.float8_e4m3fn, "fp32")
    x0 = torch.empty(0, k, dtype=torch.bfloat16)
    xq, xs = reference.quantize_activation(torch.randn(1, k), 128)
    xq0, xs0 = xq[:0], xs[:0]
    block = [128, 128]
    lib = torch.library.Library("fp8_bench_host", "FRAGMENT")
    lib.define("floor" + ops.SCHEMAS["blockwise_matmul"])
    out = torch.empty(0, n, dtype=torch.bfloat16)
    lib.impl("floor", lambda *a: out, "CompositeExplicitAutograd")
    lib.impl("floor", lambda keyset, *a: out, "Autograd", with_keyset=True)
    floor = torch.ops.fp8_bench_host.floor.default
    keysets = []
    lib.define("keyset" + ops.SCHEMAS["blockwise_matmul"])
    lib.impl("keyset", lambda keyset, *a: keysets.append(keyset) or out, "Autograd", with_keyset=True)
    torch.ops.fp8_bench_host.keyset.default(x0, wq, ws)
    kernel = ops._autograd_kernel("blockwise_matmul", ops._blockwise_matmul_impl)
    p = _validate.matmul_args_cached(x0, wq, ws, block, None, None, None, "dynamic")
    cases = {
        "dispatcher floor (same schema, no-op kernel)": lambda: floor(
            x0, wq, ws, block, None, None, None, "dynamic"
        ),
        "our Autograd kernel, called directly": lambda: kernel(keysets[0], x0, wq, ws),
        "  _blockwise_matmul_impl, called directly": lambda: ops._blockwise_matmul_impl(x0, wq, ws),
        "    _validate.matmul_args_cached (bf16 x)": lambda: _validate.matmul_args_cached(
            x0, wq, ws, block, None, None, None, "dynamic"
        ),
        "    _validate.matmul_args_cached (fp8 x)": lambda: _validate.matmul_args_cached(
            xq0, wq, ws, block, xs0, None, None, "dynamic"
        ),
        "    the result: torch.empty_like(template)": lambda: torch.empty_like(p.empty_template),
        "  torch._C._any_requires_grad (3 tensors)": lambda: torch._C._any_requires_grad(x0, wq, ws),
        "_validate.matmul_args (full checks, a miss)": lambda: _validate.matmul_args(
            x0, wq, ws, block, None, None, None, "dynamic"
        ),
    }
    return cases, lib


def measure(cases: dict, calls: int, rounds: int, sync) -> dict[str, tuple[float, float]]:
    """Per case: minimum over rounds of the mean per-call (wall, calling-thread CPU) time in
    microseconds, cases interleaved. The thread CPU time is what the call costs the host even when
    other processes share the cores (wall time then also counts the time we were descheduled)."""
    best = {name: (float("inf"), float("inf")) for name in cases}
    for fn in cases.values():  # warm-up: caches, lazy imports, kernel compilation
        for _ in range(3):
            fn()
    sync()
    for _ in range(rounds):
        for name, fn in cases.items():
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                fn()
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            sync()
            best[name] = (min(best[name][0], wall / calls * 1e6), min(best[name][1], cpu / calls * 1e6))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--m", type=int, default=4, help="M of the real small call")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--breakdown", action="store_true", help="also time the parts of an M=0 call (CPU)")
    args = p.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_host: no CUDA device visible; use --device cpu", file=sys.stderr)
        return 2

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    cases = _cases(args.device, args.n, args.k, args.m)
    best = measure(cases, args.calls, args.rounds, sync)
    base0 = best["torch.mm bf16 M=0"]
    base = best[f"torch.mm bf16 M={args.m}"]
    print(f"torch {torch.__version__}, device {args.device}, N={args.n} K={args.k}")
    print(f"host time per eager call, min over {args.rounds} rounds of {args.calls} calls")
    print(f"{'case':<48} {'wall us':>9} {'x mm':>6} {'thread CPU us':>14} {'x mm':>6}")
    for name, (wall, cpu) in best.items():
        ref = base0 if "M=0" in name else base
        print(f"{name:<48} {wall:>9.2f} {wall / ref[0]:>6.2f} {cpu:>14.2f} {cpu / ref[1]:>6.2f}")
    if args.breakdown:
        parts, _lib = _breakdown_cases(args.n, args.k)
        parts["torch.mm bf16 M=0"] = cases["torch.mm bf16 M=0"]
        best = measure(parts, args.calls, args.rounds, sync)
        print("\nparts of the M=0 call (each timed alone; thread CPU us, x the same run's torch.mm M=0)")
        for name, (_, cpu) in best.items():
            print(f"{name:<48} {cpu:>9.2f} {cpu / best['torch.mm bf16 M=0'][1]:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
