"""Mosaic lowering for real TPUs, offline (jax.export, platforms=("tpu",)): a fast sample here; the
full table + sweep is `python scripts/check_lowering.py --target tpu` (a CI step of its own)."""

from __future__ import annotations

import importlib

import pytest

pytest.importorskip("jax", reason="the Pallas backend needs jax (environment 'xla')")

lowering = importlib.import_module("torch_fp8_blockwise.backends.pallas.lowering")
tuning = importlib.import_module("torch_fp8_blockwise.backends.pallas.tuning")
bm = importlib.import_module("torch_fp8_blockwise.backends.pallas.blockwise_matmul")


def _cfg(**kw) -> bm.MatmulConfig:
    base = dict(
        tm=32, tn=256, tk=256, bn=128, bk=128, x_dtype="float8_e4m3fn", w_dtype="float8_e4m3fn",
        out_dtype="bfloat16", x_mode="fp8",
    )  # fmt: skip
    return bm.MatmulConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "cfg",
    [
        _cfg(tn=128, tk=128),  # aligned
        _cfg(x_mode="dynamic", x_dtype="bfloat16", tm=64, tn=512, tk=512, has_bias=True),  # large
        _cfg(tm=256, tn=1024, tk=1024, bn=256, bk=512),
    ],
    ids=["aligned-fp8x", "large-dynamic-bias", "large-256x512"],
)
def test_v7x_configs_lower_with_fp8_dot(cfg) -> None:
    mosaic = lowering.lower_matmul(cfg)
    assert "tpu.matmul" in mosaic and "memory_space<smem>" in mosaic
    kept, summary = lowering.fp8_dot_kept(mosaic)
    assert kept, summary


def test_checker_detects_widened_fp8() -> None:
    """The bf16 MXU path widens fp8 tiles before the dot: the fp8 check must say so."""
    mosaic = lowering.lower_matmul(_cfg(mxu="bf16"))
    kept, summary = lowering.fp8_dot_kept(mosaic)
    assert not kept and "bf16" in summary and "fp8 widened" in summary


def test_w8a16_lowers_in_bf16() -> None:
    row = lowering.check_matmul("sweep", "v7x", _cfg(x_mode="none", x_dtype="bfloat16"))
    assert row.ok and row.lowered == "yes" and row.fp8_dot == "n/a (bf16)"


def test_illegal_configs_rejected_before_mosaic() -> None:
    rows = [lowering.check_illegal(w, k) for w, k in lowering.ILLEGAL]
    assert all(r.ok and r.fp8_dot == "rejected" for r in rows), [(r.what, r.note) for r in rows if not r.ok]


def test_shipped_configs_cover_table() -> None:
    shipped = lowering.shipped_configs()
    assert len(shipped) >= 50 and {g for g, _, _ in shipped} == set(tuning.GENERATIONS)
    assert any(c.mxu == "fp8" for _, c, _ in shipped) and any(c.mxu == "bf16" for _, c, _ in shipped)


def test_prequantized_dynamic_lowers_both_kernels() -> None:
    mosaic = lowering.lower_matmul(_cfg(tm=64, tn=512, tk=512), prequantize=True)
    assert mosaic.count("tpu.matmul") >= 4 and "fp8_blockwise_quantize" in mosaic
    assert lowering.fp8_dot_kept(mosaic)[0]


def test_layout_pass_failures_are_reported() -> None:
    """A Mosaic module the passes cannot take comes back as an error string, never as a pass."""
    bad = (
        "The Mosaic module for pallas_call k:\nmodule {\n  func.func @main(%a: i32) {\n"
        "    %0 = tpu.not_an_op %a : i32\n    return\n  }\n}\n"
    )
    assert lowering.layout_passes(bad, "v7x").startswith("MLIRError")
    assert lowering.layout_passes("no module here", "v7x") == "no Mosaic module in the debug output"
    good = lowering.lower_matmul(_cfg())
    assert len(lowering.mosaic_modules(good)) == 1 and lowering.layout_passes(good, "v7x") is None
