"""Block-size selection for the Pallas matmul: M buckets, tuned table, heuristic, VMEM / roofline model."""

from __future__ import annotations

import dataclasses
import importlib
import logging

import pytest

pytest.importorskip("jax", reason="the Pallas backend needs jax (environment 'xla')")

tuning = importlib.import_module("torch_fp8_blockwise.backends.pallas.tuning")
bm = importlib.import_module("torch_fp8_blockwise.backends.pallas.blockwise_matmul")

MiB = 1 << 20


@pytest.mark.parametrize(
    "m, bucket", [(1, 32), (32, 32), (33, 64), (100, 128), (1000, 1024), (1025, 2048), (5000, 5120)]
)
def test_m_bucket(m, bucket) -> None:
    assert tuning.m_bucket(m) == bucket


def test_m_bucket_rejects_empty() -> None:
    with pytest.raises(ValueError, match="m: expected a positive row count, got 0"):
        tuning.m_bucket(0)


@pytest.mark.parametrize(
    "kind, gen",
    [("TPU v5 lite", "v5e"), ("v5litepod", "v5e"), ("TPU v6e", "v6e"), ("TPU7x", "v7x"), ("TPU v4", "v5e")],
)
def test_generation_from_device_kind(kind, gen) -> None:
    assert tuning.generation_from_device_kind(kind) == gen


def test_table_entries_are_legal_marked_and_selected() -> None:
    table = tuning.load_table()
    assert len(table) >= 100
    for key, e in table.items():
        assert e["source"] in ("model", "measured"), key
        p = tuning.Problem(
            e["m_bucket"], e["n"], e["k"], e["bn"], e["bk"], e["x_mode"], e["x_dtype"], e["w_dtype"]
        )
        assert tuning.table_key(e["generation"], p) == key
        spec = tuning.GENERATIONS[e["generation"]]
        cfg = p.config(e["tm"], e["tn"], e["tk"], spec)  # validates, sizes VMEM against the budget
        assert bm.vmem_footprint(cfg) <= spec.vmem_bytes * tuning.VMEM_USABLE
        assert tuning.select(e["generation"], p) == cfg
    # Every initial entry comes from the model, never presented as measured.
    assert {e["source"] for e in table.values()} == {"model"}


def test_heuristic_fallback_logs_once(caplog) -> None:
    p = tuning.Problem(64, 1000, 3000, 128, 128, "dynamic", "bfloat16", "float8_e4m3fn")
    tuning._fallback.cache_clear()
    tuning.select.cache_clear()
    with caplog.at_level(logging.WARNING, logger=tuning.__name__):
        first = tuning.select("v7x", p)
        for _ in range(50):
            assert tuning.select("v7x", p) == first
        tuning.select.cache_clear()  # even past the select cache, the warning is per key, once
        assert tuning.select("v7x", p) == first
    warnings = [r for r in caplog.records if "no tuned block sizes" in r.getMessage()]
    assert len(warnings) == 1
    # Tiles divide the quantization-block-padded sizes: no padding beyond the w_scale grid.
    assert 1024 % first.tn == 0 and 3072 % first.tk == 0 and 64 % first.tm == 0


def test_vmem_footprint_counts_double_buffers_and_tiles() -> None:
    cfg = bm.MatmulConfig(256, 1024, 512, 128, 128, "float8_e4m3fn", "float8_e4m3fn", "bfloat16", "fp8")
    blocks = 256 * 512 + 1024 * 512 + 256 * 1024 * 2 + 4 * 256 * 128 * 4  # x, w, out, x_scale (128 lanes)
    acc = 256 * 1024 * 4
    temps = 4 * 256 * 128 + 1024 * 128 + 256 * 1024 * 4
    assert bm.vmem_footprint(cfg) == 2 * blocks + acc + temps
    limit = tuning.vmem_limit(cfg, tuning.GENERATIONS["v7x"])
    assert bm.vmem_footprint(cfg) < limit <= 64 * MiB and limit % MiB == 0


def test_vmem_budget_rejects_oversized_blocks() -> None:
    cfg = bm.MatmulConfig(2048, 2048, 512, 128, 128, "float32", "float8_e4m3fn", "float32", "dynamic")
    with pytest.raises(ValueError, match="exceeds 75% of v7x's 64 MiB"):
        tuning.vmem_limit(cfg, tuning.GENERATIONS["v7x"])
    tuning.vmem_limit(cfg, tuning.GENERATIONS["v6e"])  # 128 MiB: fits


def test_roofline_model_regimes() -> None:
    v5e = tuning.GENERATIONS["v5e"]
    decode = tuning.Problem(32, 18432, 7168, 128, 128, "fp8", "float8_e4m3fn", "float8_e4m3fn")
    prefill = tuning.Problem(4096, 18432, 7168, 128, 128, "fp8", "float8_e4m3fn", "float8_e4m3fn")
    r_dec = tuning.roofline(decode, tuning.model_best(decode, v5e), v5e)
    r_pre = tuning.roofline(prefill, tuning.model_best(prefill, v5e), v5e)
    assert r_dec.intensity < 100 < 500 < r_pre.intensity
    assert r_pre.mxu_util > 0.85 and r_dec.hbm_util > 0.75
    # 128-deep K blocks on v7x's 256-deep MXU: at most half of the fp8 peak.
    v7x = tuning.GENERATIONS["v7x"]
    r7 = tuning.roofline(prefill, tuning.model_best(prefill, v7x), v7x)
    assert r7.mxu_util <= 0.5


# ------------------------------------------------------------------------------- tgmm tiling choice
gp = importlib.import_module("torch_fp8_blockwise.backends.pallas.grouped")

TGMM_GRID = [
    (rows, k, n, g)
    for rows in (1, 64, 4096)
    for k, n in ((72, 40), (2048, 1408), (7168, 2048), (4096, 14336))
    for g in (1, 256)
]


@pytest.mark.parametrize("generation", sorted(tuning.GENERATIONS))
def test_tgmm_choice_is_legal_fits_vmem_and_is_the_model_best(generation) -> None:
    spec = tuning.GENERATIONS[generation]
    for rows, k, n, g in TGMM_GRID:
        for block_m, out_dtype in ((128, "bfloat16"), (256, "float32"), (512, "bfloat16")):
            p = tuning.TgmmProblem(rows, k, n, g, block_m, out_dtype)
            cfg = tuning.tgmm_select(generation, p)
            what = f"{generation} {p}: {cfg}"
            assert isinstance(cfg, gp.TgmmConfig), what  # validated by its __post_init__
            assert cfg.tm in gp.TGMM_TILE_M and (cfg.tm % block_m == 0 or block_m % cfg.tm == 0), what
            padded_k, padded_n = -(-k // 128) * 128, -(-n // 128) * 128
            assert cfg.tk % 128 == 0 and cfg.tk <= min(2048, padded_k), what
            assert cfg.tn % 128 == 0 and cfg.tn <= min(2048, padded_n), what
            assert (cfg.block_m, cfg.out_dtype, cfg.mxu) == (block_m, out_dtype, spec.mxu), what
            tiles = tuning.tgmm_config_tiles(cfg)
            assert cfg.prequantize or cfg.tm >= block_m, what
            need = tuning.tgmm_vmem_footprint(p, tiles, spec)
            assert need <= spec.vmem_bytes * tuning.VMEM_USABLE, what
            assert need < cfg.vmem_limit_bytes <= spec.vmem_bytes, what
            # No legal candidate is modelled faster (beyond the 0.1% tie band) than the choice.
            chosen = tuning.tgmm_roofline(p, tiles, spec).time_s
            for c in tuning.tgmm_candidates(p, spec):
                assert tuning.tgmm_roofline(p, c, spec).time_s * 1.001 >= chosen, (what, c)


@pytest.mark.parametrize("generation", sorted(tuning.GENERATIONS))
def test_tgmm_bigger_problems_never_get_smaller_tiles(generation) -> None:
    # More rows per group: each output tile amortizes more MXU work, so the model never shrinks the
    # work of a step (tm * tk * tn) as rows grow, among choices with the same quantization place
    # (in-kernel quantization's bf16 tiles and f32 copies cap its tiles lower, so a switch may).
    for k, n, g in ((2048, 1408, 64), (7168, 2048, 256), (4096, 14336, 8), (512, 768, 16)):
        for block_m in (128, 256):
            sizes = {True: [], False: []}
            for rows in (1, 4, 16, 64, 256, 1024, 4096):
                c = tuning.tgmm_select(generation, tuning.TgmmProblem(rows, k, n, g, block_m))
                sizes[c.prequantize].append(c.tm * c.tk * c.tn)
            for place in sizes.values():
                assert place == sorted(place), (generation, k, n, g, block_m, sizes)


def test_tgmm_vmem_budget_rejects_oversized_tiles() -> None:
    p = tuning.TgmmProblem(4096, 4096, 4096, 8, 128, "float32")
    with pytest.raises(ValueError, match="exceeds 75% of v7x's 64 MiB"):
        tuning.tgmm_vmem_limit(p, tuning.TgmmTiles(512, 2048, 1024), tuning.GENERATIONS["v7x"])
    assert (512, 2048, 1024, True) not in tuning.tgmm_candidates(p, tuning.GENERATIONS["v7x"])
    assert (512, 2048, 1024, True) in tuning.tgmm_candidates(p, tuning.GENERATIONS["v6e"])  # 128 MiB


def test_tgmm_model_regimes_and_gain_over_the_fixed_tiling() -> None:
    v7x = tuning.GENERATIONS["v7x"]
    # Decode-like (8 rows per expert): the [G, K, N] output writes bound the step, not the MXU.
    dec = tuning.TgmmProblem(8, 7168, 2048, 256)
    r_dec = tuning.tgmm_roofline(dec, tuning.tgmm_best(dec, v7x), v7x)
    assert r_dec.bound == "memory" and r_dec.mxu_util < 0.01
    # Prefill-like (1024 rows per expert): compute bound, at most the 50% cap of 128-deep blocks.
    pre = tuning.TgmmProblem(1024, 4096, 14336, 8)
    r_pre = tuning.tgmm_roofline(pre, tuning.tgmm_best(pre, v7x), v7x)
    assert r_pre.bound == "compute" and 0.1 < r_pre.mxu_util <= 0.5
    # The old fixed tiling (256 x 512 x 512) is step-overhead bound: the choice is >= 2x faster.
    fixed = tuning.tgmm_roofline(pre, tuning.TgmmTiles(256, 512, 512), v7x)
    assert fixed.time_s > 2 * r_pre.time_s
    # The bf16 baseline (full-depth bf16 dots, no quantize / epilogue passes) is modelled too.
    base = dataclasses.replace(pre, operand="bfloat16")
    assert tuning.tgmm_roofline(base, tuning.tgmm_best(base, v7x), v7x).time_s > 0


def test_tgmm_model_picks_in_kernel_quantization_where_the_prologue_costs_more() -> None:
    v7x = tuning.GENERATIONS["v7x"]

    def best_time(p, place: bool) -> float:
        return min(tuning.tgmm_roofline(p, c, v7x).time_s for c in tuning.tgmm_candidates(p, v7x)
                   if c.prequantize == place)  # fmt: skip

    # MoE prefill at K=2048 (Qwen3-like, 256 rows per expert): the tiles cover K and N in one column,
    # so each bf16 element is read once by the kernel, against twice bf16 + fp8 write + fp8 read.
    moe = tuning.TgmmProblem(256, 2048, 768, 128)
    cfg = tuning.tgmm_select("v7x", moe)
    assert not cfg.prequantize and cfg.tm >= moe.block_m
    assert best_time(moe, False) < 0.8 * best_time(moe, True)
    # Wide K and N (8 x 8 output tiles of 2048): in-kernel re-reads (and re-quantizes) x per N tile
    # and dy per K tile at 2 (4 for f32) bytes, the prologue reads 5 (9) bytes once + 1 per tile.
    for in_dtype in ("bfloat16", "float32"):
        wide = tuning.TgmmProblem(512, 16384, 16384, 8, in_dtype=in_dtype)
        assert tuning.tgmm_select("v7x", wide).prequantize, in_dtype
        assert best_time(wide, True) < 0.9 * best_time(wide, False), in_dtype
    # tm < block_m cannot see a block's amax in one tile: never offered in-kernel.
    p = tuning.TgmmProblem(64, 2048, 768, 16, block_m=512)
    assert all(c.prequantize for c in tuning.tgmm_candidates(p, v7x) if c.tm < 512)
    assert any(not c.prequantize for c in tuning.tgmm_candidates(p, v7x))


def test_tgmm_in_kernel_model_bytes_and_vmem() -> None:
    v7x = tuning.GENERATIONS["v7x"]
    # 128 groups x 256 rows, tiles dividing K and N: one (K, N) column, 64 M tiles of 512.
    p = tuning.TgmmProblem(256, 2048, 768, 128)
    inq, pre = tuning.TgmmTiles(512, 2048, 768, False), tuning.TgmmTiles(512, 2048, 768, True)
    m, out = 256 * 128, 128 * 2048 * 768 * 2
    # In-kernel: bf16 x and dy once, the output once; no pass before the kernel.
    assert tuning.tgmm_roofline(p, inq, v7x).hbm_bytes == m * (2048 + 768) * 2 + out
    # Prologue: fp8 tiles + 4 f32 scale rows per tile in the kernel, and the XLA quantize pass.
    kernel = m * (2048 + 768) + 64 * 4 * (2048 + 768) * 4 + out
    assert tuning.tgmm_roofline(p, pre, v7x).hbm_bytes == kernel + m * (2048 + 768) * (2 * 2 + 1)
    # f32 inputs double the in-kernel input bytes.
    p32 = dataclasses.replace(p, in_dtype="float32")
    assert tuning.tgmm_roofline(p32, inq, v7x).hbm_bytes == m * (2048 + 768) * 4 + out
    # A padded N: the pad copy of dy (read at its size, written padded) is charged, x needs none.
    odd = dataclasses.replace(p, n=700)
    r = tuning.tgmm_roofline(odd, inq, v7x)
    slice_out = 2 * 128 * 2048 * 700 * 2
    assert r.hbm_bytes == m * (2048 + 768) * 2 + out + (m * 700 + m * 768) * 2 + slice_out
    # VMEM counts the wider input tiles and the f32 working copies.
    small = tuning.TgmmTiles(256, 512, 512, False)
    assert (tuning.tgmm_vmem_footprint(p, small, v7x)
            > tuning.tgmm_vmem_footprint(p, small._replace(prequantize=True), v7x))  # fmt: skip
    blocks16 = 256 * 512 * 2 * 2
    assert (tuning.tgmm_vmem_footprint(p32, small, v7x) - tuning.tgmm_vmem_footprint(p, small, v7x)
            == 2 * blocks16)  # fmt: skip
    with pytest.raises(ValueError, match=r"tm=512, tk=2048, tn=2048 \(in-kernel quantize\): VMEM"):
        tuning.tgmm_vmem_limit(p32, tuning.TgmmTiles(512, 2048, 2048, False), v7x)


def test_tgmm_config_in_kernel_needs_whole_blocks() -> None:
    with pytest.raises(
        ValueError, match=r"prequantize=False .* expected tm >= block_m .* tm=128, block_m=256"
    ):
        gp.TgmmConfig(tm=128, tk=128, tn=128, block_m=256, prequantize=False)
    assert gp.TgmmConfig(tm=128, tk=128, tn=128, block_m=256).sub == 1  # prequantized: legal
    assert gp.TgmmConfig(tm=512, tk=128, tn=128, block_m=256, prequantize=False).sub == 2


def test_one_vmem_limit_rule() -> None:
    v7x = tuning.GENERATIONS["v7x"]
    need = 10 * MiB + 12345
    assert tuning.scoped_vmem_limit(need, v7x, "x") == -(-(need * 5 // 4 + 2 * MiB) // MiB) * MiB
    p = tuning.TgmmProblem(64, 2048, 768, 8)
    t = tuning.TgmmTiles(256, 512, 512, False)
    assert tuning.tgmm_vmem_limit(p, t, v7x) == tuning.scoped_vmem_limit(
        tuning.tgmm_vmem_footprint(p, t, v7x), v7x, "t"
    )


def test_tgmm_rows_bucket() -> None:
    assert [tuning.tgmm_rows_bucket(m, 8) for m in (1, 8, 9, 64, 65, 8192)] == [1, 1, 2, 8, 16, 1024]
    with pytest.raises(ValueError, match="m, g: expected positive"):
        tuning.tgmm_rows_bucket(0, 8)


def test_lowering_proves_the_bench_moe_shapes() -> None:
    # scripts/check_lowering.py --target tpu lowers the tgmm tiles chosen for TGMM_PROBLEMS: they
    # must include every MoE shape the benchmark models.
    import os
    import sys

    lowering = importlib.import_module("torch_fp8_blockwise.backends.pallas.lowering")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    try:
        bench = importlib.import_module("bench_grouped")
    finally:
        sys.path.pop(0)
    assert set(bench.MOE_SHAPES) <= set(lowering.TGMM_PROBLEMS)
