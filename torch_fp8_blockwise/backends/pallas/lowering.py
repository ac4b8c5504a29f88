"""Offline proof that the Pallas kernels compile for real TPUs: ``scripts/check_lowering.py --target tpu``.

For each configuration, ``jax.export(..., platforms=("tpu",))`` lowers the kernel through Mosaic on
this CPU-only machine (it rejects what a TPU would reject, e.g. illegal block shapes or casts) and
``pallas_call(debug=True)`` prints the Mosaic MLIR, which we read to check that every
``tpu.matmul`` of an fp8-MXU configuration takes fp8 operands and that no fp8 tile is widened
before it (``fp8 dot kept``). Configurations:

* shipped: every distinct kernel config of the tuned table (data/tpu/blockwise_matmul.json);
* sweep: legal block sizes x quantization blocks x activation modes x dtypes x MXU paths;
* quantize / dequantize kernels for every block-shape family;
* illegal: block sizes our validation must reject (with a ValueError) before Mosaic sees them.

"lowered: yes" means: Pallas' TPU lowering accepted the kernel, ``jax.export`` serialized it as a
``tpu_custom_call``, and Mosaic's layout passes (``tpu-infer-memref-layout`` ...
``tpu-apply-vector-layout``, which libtpu otherwise runs at compile time) succeeded for the
config's TPU generation. Only the last stage, LLO code generation in libtpu, needs a TPU.

Exit status 1 if a shipped or sweep configuration fails to lower, an fp8-MXU configuration loses
its fp8 dot, or an illegal configuration is not rejected.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import io
import re
import time

import jax
import jax.numpy as jnp
from jax import export
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib.mlir import ir
from jax.experimental.mosaic.dialects import tpu as tpu_dialect
from jaxlib.mlir.passmanager import PassManager

from . import tuning

# Not `from . import blockwise_matmul`: the package attribute of that name is the op function.
bm = importlib.import_module(__package__ + ".blockwise_matmul")
qz = importlib.import_module(__package__ + ".quantize")
gp = importlib.import_module(__package__ + ".grouped")

#: TPU generation number that Mosaic's layout passes take (``hardware-generation``).
HARDWARE_GENERATION = {"v5e": 5, "v6e": 6, "v7x": 7}
_LAYOUT_PASSES = (
    "tpu-infer-memref-layout",
    "tpu-canonicalize-mosaic",
    "tpu-infer-vector-layout",
    "tpu-relayout-insertion",
    "tpu-apply-vector-layout",
)
_MATMUL_RE = re.compile(r"tpu\.matmul .*?: vector<[0-9x]*x(\w+)>, vector<[0-9x]*x(\w+)>")
_FP8_WIDEN_RE = re.compile(r"arith\.extf .*: vector<[0-9x]*xf8\w*> to")


@dataclasses.dataclass
class Row:
    kind: str  # "shipped", "sweep", "quantize", "illegal"
    what: str
    vmem: str = "-"
    lowered: str = "-"
    fp8_dot: str = "n/a"
    ok: bool = True
    note: str = ""


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _export(fn, *args) -> str:
    """Lower ``fn`` for TPU; returns the Mosaic MLIR printed by pallas_call(debug=True)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        export.export(jax.jit(fn), platforms=("tpu",))(*args)
    return buf.getvalue()


def mosaic_modules(debug_output: str) -> list[str]:
    """The Mosaic MLIR modules printed by pallas_call(debug=True), one per kernel."""
    out = []
    for part in debug_output.split("The Mosaic module for pallas_call")[1:]:
        body = part[part.index("\n") + 1 :]
        out.append(body[: body.index("\n}\n") + 3])
    return out


def layout_passes(debug_output: str, generation: str) -> str | None:
    """Run Mosaic's layout passes (memref layout, canonicalization, vector layout inference and
    application: the compile-time stages that assign (8, 128) vreg tilings and reject much of what
    a TPU cannot do, e.g. any f16 value; not all: an fp8 matmul passes for generation 5) for
    ``generation`` on every kernel; None if they pass, else the error.

    ``jax.export`` only serializes the Mosaic module; these passes otherwise run in libtpu when a
    TPU compiles it. What still only happens on a TPU: the final LLO code generation.
    """
    gen = HARDWARE_GENERATION[generation]
    pipeline = ",".join(f"func.func({name}{{hardware-generation={gen}}})" for name in _LAYOUT_PASSES)
    modules = mosaic_modules(debug_output)
    if not modules:
        return "no Mosaic module in the debug output"
    ctx = jax_mlir.make_ir_context()
    tpu_dialect.register_dialect(ctx)
    with ctx, ir.Location.unknown():
        for text in modules:
            try:
                module = ir.Module.parse(text)
                PassManager.parse(f"builtin.module({pipeline})").run(module.operation)
            except Exception as e:  # MLIRError: report Mosaic's diagnostic
                return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def fp8_dot_kept(mosaic: str) -> tuple[bool, str]:
    """(all tpu.matmul operands are fp8 and no fp8 tile is widened, summary of operand types)."""
    types = _MATMUL_RE.findall(mosaic)
    if not types:
        return False, "no tpu.matmul found"
    fp8 = all(a.startswith("f8") and b.startswith("f8") for a, b in types)
    widened = bool(_FP8_WIDEN_RE.search(mosaic))
    return fp8 and not widened, f"{len(types)} matmuls {sorted(set(types))}" + (
        ", fp8 widened" if widened else ""
    )


def lower_matmul(cfg: bm.MatmulConfig, prequantize: bool = False) -> str:
    """Lower one kernel config on a (tm, 2 tn, 2 tk) problem (grid 1 x 2 x 2: K loop + N tiles).

    ``prequantize``: an fp8-x config fed bf16 x without x_scale (dynamic W8A8 as quantize kernel +
    matmul kernel), so both Pallas kernels lower.
    """
    m, n, k = cfg.tm, 2 * cfg.tn, 2 * cfg.tk
    args = [
        _sds((m, k), "bfloat16" if prequantize else cfg.x_dtype),
        _sds((n, k), cfg.w_dtype),
        _sds((n // cfg.bn, k // cfg.bk), "float32"),
        _sds((m, k // cfg.bk), "float32") if cfg.x_mode == "fp8" and not prequantize else None,
        _sds((n,), "float32") if cfg.has_bias else None,
    ]
    return _export(functools.partial(bm.blockwise_matmul, cfg=cfg, debug=True), *args)


def describe(cfg: bm.MatmulConfig) -> str:
    dt = lambda d: d.replace("float8_", "").replace("bfloat16", "bf16").replace("float", "f")  # noqa: E731
    return (
        f"{cfg.mode:7s} {cfg.x_mode:7s} tm={cfg.tm:<4d} tn={cfg.tn:<4d} tk={cfg.tk:<4d} "
        f"b={cfg.bn}x{cfg.bk:<3d} x={dt(cfg.x_dtype):6s} w={dt(cfg.w_dtype):6s} "
        f"out={dt(cfg.out_dtype):4s} mxu={cfg.mxu:4s}{' bias' if cfg.has_bias else ''}"
    )


def check_matmul(kind: str, generation: str, cfg: bm.MatmulConfig, prequantize: bool = False) -> Row:
    spec = tuning.GENERATIONS[generation]
    need = bm.vmem_footprint(cfg)
    row = Row(kind, f"{generation:4s} {describe(cfg)}" + (" +quantize pass" if prequantize else ""))
    row.vmem = f"{need / tuning.MiB:6.2f}/{spec.vmem_bytes * tuning.VMEM_USABLE / tuning.MiB:.0f} MiB"
    try:
        mosaic = lower_matmul(cfg, prequantize)
    except Exception as e:  # Mosaic's verdict is the point of this check: report any failure
        row.lowered, row.ok, row.note = "NO", False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return row
    error = layout_passes(mosaic, generation)
    if error is not None:
        row.lowered, row.ok, row.note = f"NO ({generation} layout)", False, error
        return row
    row.lowered = "yes"
    kept, summary = fp8_dot_kept(mosaic)
    if cfg.dot_dtype.startswith("float8"):
        row.fp8_dot = "yes" if kept else "NO"
        row.ok = kept
    else:  # bf16 MXU path (v5e / v6e, mixed fp8 types) or W8A16: the dot must be in that dtype
        want = {"bfloat16": "bf16", "float32": "f32"}[cfg.dot_dtype]
        types = set(_MATMUL_RE.findall(mosaic))
        row.ok = types == {(want, want)}
        row.fp8_dot = f"n/a ({want})" if row.ok else f"NO: {sorted(types)}"
    row.note = summary
    return row


def shipped_configs() -> list[tuple[str, bm.MatmulConfig, bool]]:
    """Distinct (generation, config, prequantize) of the tuned table, as tuning.select builds them."""
    seen: dict[tuple[str, bm.MatmulConfig, bool], None] = {}
    for e in tuning.load_table().values():
        p = tuning.Problem(
            e["m_bucket"], e["n"], e["k"], e["bn"], e["bk"], e["x_mode"], e["x_dtype"], e["w_dtype"]
        )
        pre = e.get("prequantize", False)
        cfg = tuning.kernel_problem(p, pre).config(
            e["tm"], e["tn"], e["tk"], tuning.GENERATIONS[e["generation"]]
        )
        seen[(e["generation"], cfg, pre)] = None
    return list(seen)


def sweep_configs() -> list[tuple[str, bm.MatmulConfig, bool]]:
    """Legal block sizes across quantization blocks, modes, dtypes and both MXU paths."""
    out = []
    x_variants = [
        ("fp8", "float8_e4m3fn", "float8_e4m3fn", "bfloat16"),
        ("fp8", "float8_e5m2", "float8_e5m2", "float32"),
        ("fp8", "float8_e5m2", "float8_e4m3fn", "bfloat16"),  # mixed: widened to bf16 by design
        ("dynamic", "bfloat16", "float8_e4m3fn", "bfloat16"),
        ("dynamic", "float32", "float8_e5m2", "float32"),
        ("none", "bfloat16", "float8_e4m3fn", "bfloat16"),
        ("none", "float32", "float8_e4m3fn", "float32"),
    ]
    blocks = [(128, 128), (256, 256), (512, 512), (128, 512), (256, 128)]
    tiles = [(32, 1, 1), (64, 2, 2), (256, 4, 1), (512, 1, 4)]  # (tm, tn / bn, tk / bk)
    for generation in ("v7x", "v6e"):  # fp8 MXU path and bf16-widening path
        spec = tuning.GENERATIONS[generation]
        for i, (x_mode, x_dtype, w_dtype, out_dtype) in enumerate(x_variants):
            for j, (bn, bk) in enumerate(blocks):
                tm, fn, fk = tiles[(i + j) % len(tiles)]
                p = tuning.Problem(
                    tm, fn * bn, fk * bk, bn, bk, x_mode, x_dtype, w_dtype, out_dtype, (i + j) % 2 == 1
                )
                out.append((generation, p.config(tm, fn * bn, fk * bk, spec), False))
        # Dynamic W8A8 as a separate quantize pass + the fp8-x kernel (tuning.prequantizes).
        p = tuning.Problem(256, 1024, 1024, 128, 128, "fp8", "float8_e4m3fn", "float8_e4m3fn")
        out.append((generation, p.config(256, 1024, 1024, spec), True))
    return out


#: (what, kwargs for MatmulConfig or a VMEM budget check) that must be rejected.
ILLEGAL: tuple[tuple[str, dict], ...] = (
    ("quant block 64", {"bn": 64}),
    ("quant block 384", {"bk": 384}),
    ("batch block 8 for fp8 x (32-row tile)", {"tm": 8}),
    ("batch block 20", {"tm": 20, "x_dtype": "bfloat16", "x_mode": "dynamic"}),
    ("out block 192", {"tn": 192}),
    ("out block 128 < bn 256", {"tn": 128, "bn": 256}),
    ("in block 640 with bk 256", {"tk": 640, "bk": 256}),
    ("256 sub-blocks per step", {"tn": 2048, "tk": 2048}),
    ("fp8 x_mode with bf16 x", {"x_dtype": "bfloat16"}),
    ("float16 out (Mosaic has no f16)", {"out_dtype": "float16"}),
    ("over v7x VMEM: tm=2048 tn=2048 tk=512, f32 x and out", {"tm": 2048, "tn": 2048, "tk": 512,
     "x_dtype": "float32", "x_mode": "dynamic", "out_dtype": "float32", "vmem": "v7x"}),
)  # fmt: skip


def check_illegal(what: str, kwargs: dict) -> Row:
    base = dict(
        tm=32, tn=256, tk=256, bn=128, bk=128, x_dtype="float8_e4m3fn", w_dtype="float8_e4m3fn",
        out_dtype="bfloat16", x_mode="fp8",
    )  # fmt: skip
    kwargs = dict(kwargs)
    generation = kwargs.pop("vmem", None)
    row = Row("illegal", what, lowered="-")
    try:
        cfg = bm.MatmulConfig(**{**base, **kwargs})
        if generation is not None:
            tuning.vmem_limit(cfg, tuning.GENERATIONS[generation])
    except ValueError as e:
        row.fp8_dot, row.note = "rejected", str(e)[:150]
        return row
    row.ok, row.fp8_dot, row.note = False, "ACCEPTED", "validation let an illegal config through"
    return row


def check_quantize() -> list[Row]:
    """Quantize and dequantize kernels per block family, dtype pair and scale format (f32 and E8M0
    scales), each lowered and put through the layout passes of every generation."""
    rows = []
    cases = (
        ((1, 128), "float32", "float8_e4m3fn", "fp32", "bfloat16"),
        ((1, 512), "bfloat16", "float8_e5m2", "ue8m0", "float32"),
        ((128, 128), "float16", "float8_e4m3fn", "ue8m0", "float16"),
        ((256, 512), "float32", "float8_e5m2", "fp32", "bfloat16"),
        ((512, 128), "bfloat16", "float8_e4m3fn", "fp32", "float32"),
    )
    for block, x_dtype, dtype, fmt, out_dtype in cases:
        shape = (2, 600, 1400)
        sb = (2, -(-600 // block[0]), -(-1400 // block[1]))
        row = Row("quantize", f"block={block} x={x_dtype} q={dtype} scale={fmt} out={out_dtype}")
        try:
            quant = functools.partial(qz.quantize, block=block, dtype=dtype, scale_format=fmt, debug=True)
            deq = functools.partial(qz.dequantize, block=block, out_dtype=out_dtype, debug=True)
            texts = [
                _export(quant, _sds(shape, x_dtype)),
                _export(deq, _sds(shape, dtype), _sds(sb, "float32")),
                _export(deq, _sds(shape, dtype), _sds(sb, "uint8")),  # E8M0 scales as bits
            ]
        except Exception as e:  # report Mosaic's verdict
            row.lowered, row.ok, row.note = "NO", False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            continue
        for generation in HARDWARE_GENERATION:
            error = next((err for t in texts if (err := layout_passes(t, generation)) is not None), None)
            if error is not None:
                row.lowered, row.ok, row.note = f"NO ({generation} layout)", False, error
                break
        else:
            row.lowered = "yes"
        rows.append(row)
    return rows


#: MoE problems of the grouped rows: (M rows, N, K, G experts): DeepSeek-V3 (256 experts, hidden
#: 7168, expert width 2048) at decode and prefill, a Qwen3-MoE-like 128 experts at hidden 2048.
GROUPED_PROBLEMS: tuple[tuple[int, int, int, int], ...] = (
    (256, 2048, 7168, 256),
    (65536, 2048, 7168, 256),
    (16384, 768, 2048, 128),
)


#: tgmm problems (G, M rows, K, N) whose chosen tiling (tuning.tgmm_select) must lower: the MoE
#: shapes of scripts/bench_grouped.py (MOE_SHAPES; a test keeps the two lists equal) and the shapes
#: tests/test_grouped_pallas.py runs through the default config.
TGMM_PROBLEMS: tuple[tuple[int, int, int, int], ...] = (
    (8, 8192, 4096, 14336),
    (64, 16384, 2048, 1408),
    (128, 32768, 2048, 768),
    (256, 65536, 7168, 2048),
    (256, 2048, 7168, 2048),
    (4, 463, 72, 40),
    (4, 360, 72, 40),
)
#: (block_m, out dtype, x / dy dtype) variants the choice is proven for: tgmm's default block_m 128,
#: the larger 256 block, bf16 and f32 out, bf16 and f32 inputs (in-kernel quantization reads them).
TGMM_VARIANTS: tuple[tuple[int, str, str], ...] = (
    (128, "bfloat16", "bfloat16"),
    (128, "float32", "bfloat16"),
    (256, "bfloat16", "bfloat16"),
    (128, "float32", "float32"),
)


def tgmm_configs(generation: str, quick: bool = False) -> list[tuple[gp.TgmmConfig, str, str]]:
    """Distinct tgmm configs to lower for ``generation``: every tiling (and quantization place)
    tuning.tgmm_select returns for TGMM_PROBLEMS x TGMM_VARIANTS ("chosen"), and the fixed tilings
    the interpret tests sweep: tile_m in TGMM_TILE_M x tile_k in TGMM_TILE_K with block_m 128 (the
    tokamax case) and block_m 256 / 512 at tile_m 256 / 512, tn = 512, prequantized; and in-kernel
    quantization for every tile_m >= block_m at tile_k = tn = 512, and tile_m 256 / block_m 128 with
    f32 inputs too ("tested"). Each as (config, origin, x / dy dtype to lower it with); a
    prequantized kernel reads fp8 whatever the inputs, so it is lowered once, with bf16 inputs."""
    spec = tuning.GENERATIONS[generation]
    out: dict[tuple[gp.TgmmConfig, str], str] = {}

    def add(cfg: gp.TgmmConfig, origin: str, in_dtype: str) -> None:
        out.setdefault((cfg, "bfloat16" if cfg.prequantize else in_dtype), origin)

    for g, m, k, n in TGMM_PROBLEMS[:1] if quick else TGMM_PROBLEMS:
        for block_m, out_dtype, in_dtype in TGMM_VARIANTS[:1] if quick else TGMM_VARIANTS:
            p = tuning.TgmmProblem(
                tuning.tgmm_rows_bucket(m, g), k, n, g, block_m, out_dtype, in_dtype=in_dtype
            )
            add(tuning.tgmm_select(generation, p), "chosen", in_dtype)
    tilings = [(tm, tk, 128) for tm in gp.TGMM_TILE_M for tk in gp.TGMM_TILE_K]
    tilings += [(256, 512, 256), (512, 512, 512)]
    for tm, tk, block_m in tilings[:2] if quick else tilings:
        add(gp.TgmmConfig(tm=tm, tk=tk, tn=512, block_m=block_m, mxu=spec.mxu), "tested", "bfloat16")
    in_kernel = [(tm, bm) for tm in gp.TGMM_TILE_M for bm in gp.TGMM_TILE_M if tm >= bm]
    for tm, block_m in in_kernel[1:2] if quick else in_kernel:
        cfg = gp.TgmmConfig(tm=tm, tk=512, tn=512, block_m=block_m, mxu=spec.mxu, prequantize=False)
        add(cfg, "tested", "bfloat16")
        if (tm, block_m) == (256, 128):
            add(cfg, "tested", "float32")
    return [(cfg, origin, in_dtype) for (cfg, in_dtype), origin in out.items()]


def _lowered_row(row: Row, lower, generation: str, fp8_mxu: bool) -> Row:
    """Lower, run the layout passes, and check the dot dtype of a grouped kernel."""
    try:
        mosaic = lower()
    except Exception as e:  # Mosaic's verdict is the point: report any failure
        row.lowered, row.ok, row.note = "NO", False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return row
    error = layout_passes(mosaic, generation)
    if error is not None:
        row.lowered, row.ok, row.note = f"NO ({generation} layout)", False, error
        return row
    row.lowered = "yes"
    types = set(_MATMUL_RE.findall(mosaic))
    want = ("f8E4M3FN", "f8E4M3FN") if fp8_mxu else ("bf16", "bf16")
    row.ok = types == {want}
    row.fp8_dot = ("yes" if row.ok else "NO") if fp8_mxu else ("n/a (bf16)" if row.ok else "NO")
    row.note = f"{len(_MATMUL_RE.findall(mosaic))} matmuls {sorted(types)}"
    return row


def check_grouped(quick: bool = False) -> list[Row]:
    """gmm: the config bridge.gmm_config picks (dense table / model at cdiv(M, G) rows) for each
    GROUPED_PROBLEMS entry and generation, on a 3-group problem of 2 M tiles; tgmm: every tiling
    :func:`tgmm_configs` (every tiling tuning.tgmm_select picks for TGMM_PROBLEMS, and the tested
    fixed tilings), per generation."""
    rows = []
    gens = ("v7x",) if quick else tuple(tuning.GENERATIONS)
    for generation in gens:
        for m, n, k, g in GROUPED_PROBLEMS[:1] if quick else GROUPED_PROBLEMS:
            for x_mode, x_dtype in (("fp8", "float8_e4m3fn"), ("dynamic", "bfloat16")):
                p = tuning.Problem(
                    tuning.m_bucket(-(-m // g)), n, k, 128, 128, x_mode, x_dtype, "float8_e4m3fn"
                )
                cfg = tuning.select(generation, p)
                mp, kk, nn = 2 * cfg.tm, 2 * cfg.tk, cfg.tn
                args = [
                    _sds((mp, kk), "bfloat16" if cfg.x_mode != x_mode else cfg.x_dtype),
                    _sds((3, nn, kk), cfg.w_dtype),
                    _sds((3, nn // cfg.bn, kk // cfg.bk), "float32"),
                    _sds((3,), "int32"),
                    _sds((mp, kk // cfg.bk), "float32") if x_mode == "fp8" else None,
                ]
                fn = functools.partial(gp.gmm, cfg=cfg, debug=True)
                what = f"{generation:4s} gmm  {describe(cfg)} (M={m} N={n} K={k} G={g})"
                row = Row("grouped", what, vmem=f"{bm.vmem_footprint(cfg) / tuning.MiB:6.2f} MiB")
                rows.append(_lowered_row(row, lambda fn=fn, args=args: _export(fn, *args), generation,
                                         cfg.dot_dtype.startswith("float8")))  # fmt: skip
        for cfg, origin, in_dtype in tgmm_configs(generation, quick):
            mm = 2 * max(cfg.tm, cfg.block_m)
            args = [_sds((mm, 2 * cfg.tk), in_dtype), _sds((mm, cfg.tn), in_dtype), _sds((3,), "int32")]
            fn = functools.partial(gp.tgmm, cfg=cfg, debug=True)
            vmem = tuning.tgmm_vmem_footprint(
                tuning.TgmmProblem(1, cfg.tk, cfg.tn, 1, cfg.block_m, cfg.out_dtype, in_dtype=in_dtype),
                tuning.tgmm_config_tiles(cfg),
                tuning.GENERATIONS[generation],
            )
            what = (
                f"{generation:4s} tgmm tile_m={cfg.tm:<4d} tile_k={cfg.tk:<5d} tn={cfg.tn:<5d} "
                f"block_m={cfg.block_m} sub={cfg.sub} out={cfg.out_dtype} mxu={cfg.mxu} "
                f"q={'xla' if cfg.prequantize else 'kernel'} in={'f32' if in_dtype == 'float32' else 'bf16'} ({origin})"
            )
            row = Row("grouped", what, vmem=f"{vmem / tuning.MiB:6.2f} MiB")
            rows.append(
                _lowered_row(row, lambda fn=fn, args=args: _export(fn, *args), generation, cfg.mxu == "fp8")
            )
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="check_lowering.py --target tpu")
    parser.add_argument("--no-sweep", action="store_true", help="shipped configs, quantize and illegal only")
    parser.add_argument("-v", "--verbose", action="store_true", help="print notes for passing rows too")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = [check_matmul("shipped", g, c, pre) for g, c, pre in shipped_configs()]
    if not args.no_sweep:
        rows += [check_matmul("sweep", g, c, pre) for g, c, pre in sweep_configs()]
    rows += check_quantize()
    rows += check_grouped(quick=args.no_sweep)
    rows += [check_illegal(w, k) for w, k in ILLEGAL]

    print(
        f"{'kind':8s} {'configuration':104s} {'VMEM (need/budget)':19s} {'lowered':7s} {'fp8 dot kept':12s}"
    )
    for r in rows:
        flag = "" if r.ok else "  <-- FAIL"
        print(f"{r.kind:8s} {r.what:104s} {r.vmem:19s} {r.lowered:7s} {r.fp8_dot:12s}{flag}")
        if r.note and (args.verbose or not r.ok or r.kind == "illegal"):
            print(f"{'':8s}   {r.note}")
    failed = [r for r in rows if not r.ok]
    counts = {
        k: sum(r.kind == k for r in rows) for k in ("shipped", "sweep", "quantize", "grouped", "illegal")
    }
    print(
        f"\n{len(rows)} rows ({', '.join(f'{v} {k}' for k, v in counts.items())}) in "
        f"{time.perf_counter() - start:.0f} s: {len(failed)} failed"
    )
    return 1 if failed else 0
