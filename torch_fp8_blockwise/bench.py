"""Benchmark of ``blockwise_matmul`` on every backend available here, against bf16 and fp32 matmul
measured in the same run (``fp8-blockwise bench``, ``python scripts/bench.py``).

For each weight shape (N, K) and each M: quantize the weight once (128x128 blocks), then time

* ``bf16`` / ``fp32``: ``x @ w.T`` in that dtype (the baselines);
* each backend x mode: ``w8a8`` (bf16 x, activation="dynamic": x quantized per 1x128 group inside
  the op, what an FP8 model layer does), ``w8a8-fp8x`` (x pre-quantized to fp8 + x_scale, outside the
  timed call), ``w8a16`` (activation="none").

"speed vs bf16" = bf16 time / this time (above 1: faster than bf16). Timers: CPU and XLA, median
wall time over repeats after a warm-up call (XLA: ``.cpu()`` forces the lazy graph); CUDA, CUDA-graph
replay of several captured calls (kernel time; one eager call's host cost is a separate figure,
see shared NOTES section 6). Results: a table on stdout, ``--json`` a file, ``--plot`` a PNG,
``--profile`` a torch.profiler chrome trace of one call of each op.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from . import _dispatch
from .ops import blockwise_matmul, quantize

SHAPES: dict[str, list[tuple[int, int]]] = {
    "deepseek-v3": [(2112, 7168), (4608, 7168), (7168, 2048), (24576, 1536), (7168, 18432)],
    "llama-3-70b": [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)],
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
}

#: preset -> (weight shapes (N, K), M values). model-shapes = every shape of SHAPES.
PRESETS: dict[str, tuple[list[tuple[int, int]], list[int]]] = {
    "small": ([(576, 576), (1536, 576), (1024, 1024)], [1, 16]),
    "medium": ([(2048, 2048), (4096, 4096), (4608, 7168)], [1, 16, 128]),
    "large": ([(7168, 2048), (8192, 8192), (7168, 18432)], [1, 128, 2048]),
    "model-shapes": ([s for shapes in SHAPES.values() for s in shapes], [1, 16, 128]),
}
MODES = ("w8a8", "w8a8-fp8x", "w8a16")
BLOCK = (128, 128)
#: Backends that run on CPU tensors only in an interpreter (Triton TRITON_INTERPRET=1, Pallas
#: interpret=True): 100-1000x slower than the CPU backend, so they join only with --interpreters.
INTERPRETED = ("triton", "pallas")


@dataclass
class Result:
    """One timed point; ``speed_vs_bf16`` = bf16 ms / ms at the same (m, n, k)."""

    op: str  # "bf16", "fp32", or "<backend>/<mode>"
    m: int
    n: int
    k: int
    ms: float
    tflops: float
    speed_vs_bf16: float | None = None
    error: str | None = None


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            n, k = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected NxK[,NxK...], e.g. 576x576,1536x576; got {text!r}"
            ) from None
        if n < 1 or k < 1:
            raise argparse.ArgumentTypeError(f"N and K must be positive, got {item!r}")
        shapes.append((n, k))
    return shapes


def _parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parse_modes(text: str) -> list[str]:
    modes = text.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {bad}; expected some of {MODES}")
    return modes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="small",
        help="shapes x M values (model-shapes: DeepSeek-V3, Llama-3-70B, SmolLM2 linears)",
    )
    parser.add_argument(
        "--shapes", type=_parse_shapes, help="override the preset's weight shapes: NxK,NxK,..."
    )
    parser.add_argument("--m", type=_parse_ints, help="override the preset's M values: 1,16,...")
    parser.add_argument("--device", choices=("cpu", "cuda", "xla"), default="cpu")
    parser.add_argument("--modes", type=_parse_modes, default=list(MODES), help=f"some of {','.join(MODES)}")
    parser.add_argument(
        "--backends",
        type=lambda s: s.split(","),
        help="backends to time (default: every one available on --device)",
    )
    parser.add_argument(
        "--interpreters",
        action="store_true",
        help="on cpu, also time the Triton / Pallas interpreters (very slow)",
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per point (median)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG: time and speed vs bf16 per shape")
    parser.add_argument("--profile", metavar="DIR", help="write a torch.profiler chrome trace to DIR")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


# ------------------------------------------------------------------------------------------ timers
def _sync_cpu(y: torch.Tensor) -> None:
    if y.device.type == "xla":
        y.cpu()  # runs the lazy graph and waits for it


def wall_ms(fn: Callable[[], torch.Tensor], repeats: int, min_seconds: float = 0.05) -> float:
    """Median wall time of ``fn()`` (CPU / XLA) after one warm-up call; at least ``repeats`` calls,
    more for tiny ops until ``min_seconds`` have passed (a 20 us op timed 10 times is noise)."""
    _sync_cpu(fn())
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - begin < min_seconds and len(times) < 1000):
        start = time.perf_counter()
        _sync_cpu(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cuda_graph_ms(fn: Callable[[], torch.Tensor], repeats: int, calls_per_graph: int = 10) -> float:
    """Median time of one ``fn()`` under CUDA-graph replay: ``calls_per_graph`` calls are captured in
    one graph (so the replay's own launch cost is shared), replayed ``repeats`` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside capture: Triton JIT, cuBLAS handles, allocator
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls_per_graph)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------- backends
def backends_for(
    device: torch.device, requested: list[str] | None, interpreters: bool
) -> dict[str, str | None]:
    """backend name -> None if it runs here, else why not. Default: the device's own backend, plus
    on cpu the interpreted ones when ``interpreters``."""
    if requested is None:
        requested = [_dispatch.DEVICE_BACKENDS.get(device.type, "reference")]
        if device.type == "cpu" and interpreters:
            requested += list(INTERPRETED)
    unknown = [b for b in requested if b not in _dispatch.BACKEND_MODULES]
    if unknown:
        raise ValueError(
            f"--backends: unknown {unknown}; expected some of {tuple(_dispatch.BACKEND_MODULES)}"
        )
    return {b: _dispatch.unavailable_reason(b, device) for b in requested}


def _device(name: str) -> torch.device:
    if name == "xla":
        import torch_xla

        return torch_xla.device()
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench --device cuda: torch sees no CUDA device here")
    return torch.device(name)


# --------------------------------------------------------------------------------------------- run
def run(
    shapes: list[tuple[int, int]],
    ms: list[int],
    *,
    device: str = "cpu",
    modes: list[str] | tuple[str, ...] = MODES,
    backends: list[str] | None = None,
    interpreters: bool = False,
    repeats: int = 10,
    progress: bool = True,
    profile_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Time every (shape, M) point; returns the results, baselines first at each point."""
    dev = _device(device)
    available = backends_for(dev, backends, interpreters)
    for name, reason in available.items():
        if reason is not None:
            log(f"backend {name}: skipped ({reason})")
    runnable = [b for b, reason in available.items() if reason is None]
    timer = (
        (lambda fn: cuda_graph_ms(fn, repeats)) if dev.type == "cuda" else (lambda fn: wall_ms(fn, repeats))
    )
    points = [(n, k, m) for n, k in shapes for m in ms]
    results: list[Result] = []
    calls: dict[str, Callable[[], torch.Tensor]] = {}  # the last point's calls, for the profile
    bar = _progress(len(points) * (2 + len(runnable) * len(modes)), progress)
    gen = torch.Generator().manual_seed(0)
    for n, k, m in points:
        w = torch.randn(n, k, generator=gen) * 0.02
        x = torch.randn(m, k, generator=gen)
        with _dispatch.use_backend("cpu"):  # quantize once on CPU: the same weights for every backend
            wq, ws = quantize(w, BLOCK)
            xq, xs = quantize(x, (1, BLOCK[1]))
        x16, w16 = x.to(dev, torch.bfloat16), w.to(dev, torch.bfloat16)
        x32, w32 = x.to(dev), w.to(dev)
        wq, ws, xq, xs = wq.to(dev), ws.to(dev), xq.to(dev), xs.to(dev)
        del w, x
        calls = {"bf16": lambda x16=x16, w16=w16: x16 @ w16.T, "fp32": lambda x32=x32, w32=w32: x32 @ w32.T}
        for backend in runnable:
            for mode in modes:
                if mode == "w8a8-fp8x":
                    args, kwargs = (xq, wq, ws), {"x_scale": xs, "out_dtype": torch.bfloat16}
                else:
                    args = (x16, wq, ws)
                    kwargs = {"activation": "dynamic" if mode == "w8a8" else "none"}

                def call(args=args, kwargs=kwargs, backend=backend) -> torch.Tensor:
                    with _dispatch.use_backend(backend):
                        return blockwise_matmul(*args, **kwargs)

                calls[f"{backend}/{mode}"] = call
        bf16_ms = None
        for op, fn in calls.items():
            try:
                t = timer(fn)
                error = None
            except Exception as e:  # one broken backend must not hide the others' numbers
                t, error = float("nan"), f"{type(e).__name__}: {e}"
                log(f"{op} at M={m}, N={n}, K={k}: FAILED: {error}")
            bf16_ms = t if op == "bf16" else bf16_ms
            speed = bf16_ms / t if bf16_ms and t == t and t > 0 else None
            results.append(Result(op, m, n, k, t, 2 * m * n * k / (t * 1e-3) / 1e12, speed, error))
            bar.update(1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    bar.close()
    if profile_dir is not None:
        write_profile(calls, dev, profile_dir)
        log(f"profile of one call of each op at the last point: {os.path.join(profile_dir, 'trace.json')}")
    return results


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="bench", unit="op", file=sys.stderr, leave=False)


def write_profile(calls: dict[str, Callable[[], torch.Tensor]], device: torch.device, directory: str) -> str:
    """torch.profiler chrome trace (``DIR/trace.json``) of one call of each op, each in a record_function
    range named after the op."""
    from torch.profiler import ProfilerActivity, profile, record_function

    os.makedirs(directory, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for fn in calls.values():  # warm: the trace should show steady-state calls, not JIT / tracing
        _sync_cpu(fn())
    with profile(activities=activities, record_shapes=True) as prof:
        for op, fn in calls.items():
            with record_function(op):
                _sync_cpu(fn())
        if device.type == "cuda":
            torch.cuda.synchronize()
    path = os.path.join(directory, "trace.json")
    prof.export_chrome_trace(path)
    return path


# ------------------------------------------------------------------------------------------ output
def format_table(results: list[Result]) -> str:
    header = f"{'M':>6} {'N':>6} {'K':>6} {'op':<22} {'ms':>10} {'TFLOP/s':>9} {'speed vs bf16':>13}"
    lines = [header, "-" * len(header)]
    for r in results:
        speed = f"{r.speed_vs_bf16:.2f}x" if r.speed_vs_bf16 is not None else "-"
        ms = "FAILED" if r.error else f"{r.ms:.4f}"
        lines.append(f"{r.m:>6} {r.n:>6} {r.k:>6} {r.op:<22} {ms:>10} {r.tflops:>9.3f} {speed:>13}")
    return "\n".join(lines)


def environment(device: str) -> dict[str, str]:
    env = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": str(torch.get_num_threads()),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_json(results: list[Result], path: str, *, device: str, preset: str, repeats: int) -> None:
    payload = {
        "schema": "torch_fp8_blockwise.bench/1",
        "environment": environment(device),
        "preset": preset,
        "block": list(BLOCK),
        "repeats": repeats,
        "timer": "cuda-graph replay" if device == "cuda" else "median wall time",
        "results": [asdict(r) for r in results],
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, allow_nan=True)


def write_plot(results: list[Result], path: str, title: str = "") -> None:
    """PNG with two panels, one group of bars per (M, N, K): time (ms, log scale) and speed vs bf16."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = list(dict.fromkeys((r.m, r.n, r.k) for r in results))
    ops = list(dict.fromkeys(r.op for r in results))
    by = {(r.op, r.m, r.n, r.k): r for r in results}
    width = 0.8 / len(ops)
    fig, (ax_t, ax_s) = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(points) * len(ops) / 2), 8), sharex=True)
    for i, op in enumerate(ops):
        xs = [j + i * width for j in range(len(points))]
        times = [by[(op, *p)].ms if (op, *p) in by else float("nan") for p in points]
        speeds = [
            by[(op, *p)].speed_vs_bf16 or float("nan") if (op, *p) in by else float("nan") for p in points
        ]
        ax_t.bar(xs, times, width, label=op)
        ax_s.bar(xs, speeds, width, label=op)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("ms (log)")
    ax_s.set_yscale("log")
    ax_s.axhline(1.0, color="black", linewidth=0.8)
    ax_s.set_ylabel("speed vs bf16 (x, log; 1 = bf16)")
    ax_s.set_xticks([j + 0.4 - width / 2 for j in range(len(points))])
    ax_s.set_xticklabels([f"M={m}\n{n}x{k}" for m, n, k in points], fontsize=7)
    ax_t.legend(fontsize=7, ncol=min(4, len(ops)))
    ax_t.set_title(title or "blockwise_matmul vs bf16 / fp32 matmul")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_from_args(args: argparse.Namespace) -> int:
    shapes, ms = PRESETS[args.preset]
    shapes, ms = args.shapes or shapes, args.m or ms
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    results = run(
        shapes,
        ms,
        device=args.device,
        modes=args.modes,
        backends=args.backends,
        interpreters=args.interpreters,
        repeats=args.repeats,
        progress=not args.no_progress,
        profile_dir=args.profile,
        log=log,
    )
    env = environment(args.device)
    print(f"fp8-blockwise bench, preset {args.preset}: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(format_table(results))
    if args.json:
        write_json(results, args.json, device=args.device, preset=args.preset, repeats=args.repeats)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(results, args.plot, title=f"fp8-blockwise bench ({args.preset}, {args.device})")
        print(f"wrote {args.plot}")
    return 1 if any(r.error for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
