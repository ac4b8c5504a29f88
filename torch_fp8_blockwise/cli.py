"""Command line: ``fp8-blockwise demo`` (README's main job) and ``fp8-blockwise backends``.

``demo`` quantizes a random linear layer to DeepSeek-style 128x128 FP8 blocks and runs
``blockwise_matmul`` (W8A8 dynamic and W8A16) on every backend that can run on this machine,
printing the kernel error vs the reference, the SQNR vs the unquantized product and the time.
Without a GPU/TPU the Triton and Pallas kernels run in their interpreters (slow by design: they
prove numerics, not speed); torch_xla's CPU device runs the Pallas path the way a TPU would.
"""

from __future__ import annotations

import argparse
import os
import sys

# Before triton / torch_xla are imported: interpret kernels on a machine without the device.
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import _dispatch  # noqa: E402
from .ops import blockwise_matmul, quantize  # noqa: E402
from .testing import median_ms, rel_error, sqnr  # noqa: E402


def _xla_device() -> torch.device | None:
    try:
        import torch_xla
    except ImportError:
        return None
    return torch_xla.device()


def demo(m: int, n: int, k: int, repeats: int) -> int:
    torch.manual_seed(0)
    w_true = torch.randn(n, k) * 0.02
    x = torch.randn(m, k, dtype=torch.bfloat16)
    with _dispatch.use_backend("reference"):
        wq, ws = quantize(w_true, (128, 128))
    exact = x.float() @ w_true.T
    print(f"torch_fp8_blockwise demo: x [{m}, {k}] bf16 @ w [{n}, {k}] float8_e4m3fn, 128x128 blocks")
    print(
        "err vs ref = mean|y - ref| / mean|ref| (bound 1e-3); SQNR vs the unquantized product (floor 28 dB)"
    )
    print(
        f"weight: {wq.numel() / 2**20:.2f} MiB fp8 + scales {tuple(ws.shape)} float32 (weight_scale_inv layout)"
    )
    header = f"{'backend':<34} {'mode':<13} {'err vs ref':>11} {'SQNR dB':>8} {'ms':>9} {'x ref-time':>10}"
    print(header)
    print("-" * len(header))
    failures = 0
    for activation, mode in (("dynamic", "W8A8 dynamic"), ("none", "W8A16")):
        with _dispatch.use_backend("reference"):
            ref = blockwise_matmul(x, wq, ws, out_dtype=torch.float32, activation=activation)
        ref_ms = None  # the reference row (first) is the baseline of the last column
        runs: list[tuple[str, torch.device, str | None]] = [
            (name, torch.device("cpu"), name) for name in _dispatch.BACKEND_MODULES
        ]
        xla = _xla_device()
        if xla is not None:
            runs.append(("pallas @ xla:0 (CPU)", xla, None))
        for label, device, forced in runs:
            reason = _dispatch.unavailable_reason(forced or "pallas", device)
            if reason is not None:
                print(f"{label:<34} {mode:<13} unavailable: {reason}")
                continue
            with _dispatch.use_backend(forced or "pallas"):
                ran = _dispatch.implementation("blockwise_matmul", device)[0]
            if ran != (forced or "pallas"):
                label += f" (-> {ran})"
            xd, wd, sd = x.to(device), wq.to(device), ws.to(device)

            def run(xd=xd, wd=wd, sd=sd, activation=activation) -> torch.Tensor:
                y = blockwise_matmul(xd, wd, sd, out_dtype=torch.float32, activation=activation)
                return y.cpu()  # forces the lazy XLA graph to execute

            try:
                if forced is None:
                    y = run()
                    ms = median_ms(run, repeats)
                else:
                    with _dispatch.use_backend(forced):
                        y = run()
                        ms = median_ms(run, repeats)
            except Exception as e:  # a demo reports a broken backend and goes on to the next
                failures += 1
                print(f"{label:<34} {mode:<13} FAILED: {type(e).__name__}: {e}")
                continue
            err, db = rel_error(y, ref), sqnr(y, exact)
            ref_ms = ref_ms or ms
            print(f"{label:<34} {mode:<13} {err:>11.2e} {db:>8.2f} {ms:>9.2f} {ms / ref_ms:>10.2f}")
    return 1 if failures else 0


def backends() -> int:
    for name, row in _dispatch.backend_table("cpu").items():
        print(f"{name:<10} {row.pop('status')}")
        for op, impl in row.items():
            print(f"    {op:<18} -> {impl}")
    from . import _route
    from .backends import cublas

    print()
    for line in _route.describe():
        print(line)
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            device = torch.device("cuda", index)
            reason = cublas.probe(device)
            name = torch.cuda.get_device_name(device)
            print(f"  cuda:{index} ({name}) cuBLAS block-scaled probe: {reason or 'passed'}")
    else:
        print(f"  cuBLAS block-scaled: {cublas.probe('cuda')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fp8-blockwise", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_demo = sub.add_parser("demo", help="run blockwise_matmul on every available backend")
    p_demo.add_argument("--m", type=int, default=16)
    p_demo.add_argument("--n", type=int, default=1024)
    p_demo.add_argument("--k", type=int, default=1024)
    p_demo.add_argument("--repeats", type=int, default=3)
    sub.add_parser("backends", help="which backend runs each op here, and why a backend cannot")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        return demo(args.m, args.n, args.k, args.repeats)
    return backends()


if __name__ == "__main__":
    sys.exit(main())
