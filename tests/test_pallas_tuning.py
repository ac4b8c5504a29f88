"""Block-size selection for the Pallas matmul: M buckets, tuned table, heuristic, VMEM / roofline model."""

from __future__ import annotations

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
