#!/usr/bin/env python
"""Fill the Pallas blockwise_matmul block-size table (torch_fp8_blockwise/data/tpu/blockwise_matmul.json).

    python scripts/tune_pallas.py --from-model              # any machine: roofline-model choice
    python scripts/tune_pallas.py --measure [--top 8]       # on a TPU VM: time the model's best
                                                            # candidates, keep the fastest

Key of an entry: (generation, M bucket, N, K, bn, bk, x_mode, x dtype, w dtype); value (tm, tn, tk),
``prequantize`` (dynamic x: separate Pallas quantize pass + fp8-x kernel), ``source`` ("model" or
"measured") and the modelled / measured time. ``--measure`` only rewrites the entries of the generation it runs on and keeps every other entry.
Shapes: the linear layers of DeepSeek-V3 / R1 (671B), the checkpoints this library targets.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

tuning = importlib.import_module("torch_fp8_blockwise.backends.pallas.tuning")

#: (name, N, K) of DeepSeek-V3 linear layers (out_features, in_features).
SHAPES: tuple[tuple[str, int, int], ...] = (
    ("q_a_proj", 1536, 7168),
    ("q_b_proj", 24576, 1536),
    ("kv_a_proj", 576, 7168),
    ("kv_b_proj", 32768, 512),
    ("o_proj", 7168, 16384),
    ("mlp.gate_up", 18432, 7168),
    ("mlp.down", 7168, 18432),
    ("expert.gate_up", 2048, 7168),
    ("expert.down", 7168, 2048),
)
#: Decode (one token per sequence, 32-row bucket), a mid batch, and a prefill chunk.
M_BUCKETS: tuple[int, ...] = (32, 256, 4096)
#: (x_mode, x dtype): dynamic W8A8 from bf16, pre-quantized fp8 x, W8A16.
X_MODES: tuple[tuple[str, str], ...] = (
    ("dynamic", "bfloat16"),
    ("fp8", "float8_e4m3fn"),
    ("none", "bfloat16"),
)
BLOCK = (128, 128)


def problems():
    for _, n, k in SHAPES:
        for m in M_BUCKETS:
            for x_mode, x_dtype in X_MODES:
                yield tuning.Problem(m, n, k, *BLOCK, x_mode, x_dtype, "float8_e4m3fn", "bfloat16")


def entry(generation: str, p, cfg, source: str, seconds: float) -> dict:
    return {
        "key": tuning.table_key(generation, p),
        "generation": generation,
        "m_bucket": p.m,
        "n": p.n,
        "k": p.k,
        "bn": p.bn,
        "bk": p.bk,
        "x_mode": p.x_mode,
        "x_dtype": p.x_dtype,
        "w_dtype": p.w_dtype,
        "tm": cfg.tm,
        "tn": cfg.tn,
        "tk": cfg.tk,
        "prequantize": tuning.prequantizes(p, cfg),
        "source": source,
        "time_us": round(seconds * 1e6, 2),
    }


def from_model(generations: list[str]) -> list[dict]:
    out = []
    for g in generations:
        spec = tuning.GENERATIONS[g]
        for p in problems():
            cfg = tuning.model_best(p, spec)
            out.append(entry(g, p, cfg, "model", tuning.roofline(p, cfg, spec).time_s))
    return out


def measure(top: int, iters: int) -> list[dict]:
    """Time the model's ``top`` candidates per problem on the attached TPU; keep the fastest."""
    import jax
    import jax.numpy as jnp

    bm = importlib.import_module("torch_fp8_blockwise.backends.pallas.blockwise_matmul")
    device = jax.devices()[0]
    if device.platform != "tpu":
        raise SystemExit(f"--measure needs a TPU; jax sees {device.platform}")
    g = tuning.generation_from_device_kind(device.device_kind)
    spec = tuning.GENERATIONS[g]
    out = []
    for p in problems():
        ranked = sorted(tuning.candidates(p, spec), key=lambda c: tuning.roofline(p, c, spec).time_s)[:top]
        key = jax.random.key(0)
        x = jax.random.normal(key, (p.m, p.k), jnp.float32).astype(p.x_dtype)
        w = jax.random.normal(key, (p.n, p.k), jnp.float32).astype(p.w_dtype)
        ws = jnp.ones((-(-p.n // p.bn), -(-p.k // p.bk)), jnp.float32)
        xs = jnp.ones((p.m, -(-p.k // p.bk)), jnp.float32) if p.x_mode == "fp8" else None
        best = None
        for cfg in ranked:
            fn = jax.jit(lambda x, w, ws, xs, cfg=cfg: bm.blockwise_matmul(x, w, ws, xs, None, cfg=cfg))
            fn(x, w, ws, xs).block_until_ready()  # compile
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn(x, w, ws, xs).block_until_ready()
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            if best is None or t < best[1]:
                best = (cfg, t)
        out.append(entry(g, p, best[0], "measured", best[1]))
        print(
            f"{tuning.table_key(g, p)}: tm={best[0].tm} tn={best[0].tn} tk={best[0].tk} {best[1] * 1e6:.1f} us"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--from-model", action="store_true", help="choose by the roofline model (no TPU)")
    mode.add_argument("--measure", action="store_true", help="time candidates on the attached TPU")
    parser.add_argument("--generations", nargs="+", default=sorted(tuning.GENERATIONS))
    parser.add_argument("--top", type=int, default=8, help="candidates timed per problem (--measure)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=os.path.normpath(tuning.TABLE_PATH))
    args = parser.parse_args(argv)

    new = from_model(args.generations) if args.from_model else measure(args.top, args.iters)
    table = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            table = {e["key"]: e for e in json.load(f)["entries"]}
    table.update({e["key"]: e for e in new})
    doc = {
        "about": (
            "Pallas blockwise_matmul block sizes. key = generation|m<M bucket>|n<N>|k<K>|b<bn>x<bk>|"
            "<x_mode>|<x dtype>|<w dtype>. prequantize: dynamic x is quantized by the Pallas quantize "
            "kernel and the fp8-x kernel runs (else in-kernel quantization). source 'model': chosen by the VMEM/roofline model in "
            "backends/pallas/tuning.py, NOT timed on hardware (time_us is the model's); 'measured': "
            "fastest of the model's top candidates timed by scripts/tune_pallas.py --measure on that TPU."
        ),
        "entries": sorted(table.values(), key=lambda e: e["key"]),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {len(new)} entries ({len(table)} in total) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
