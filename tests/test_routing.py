"""The CUDA routing rule (_route.py): the measured winners, the cache, overrides, the W8A16 hook.

Random inputs are in tests/test_routing_properties.py; this file pins the rule to the H100 data.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch
from cublas_emulation import route_on_cpu

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise import _route, cli, reference
from torch_fp8_blockwise.testing import assert_kernel_close

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
HIGH = (BF16, F16, F32)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Fastest W8A8 path at each measured M (1, 16, 64, 256, 1024, 4096), T = our tuned Triton,
#: C = cuBLAS block-scaled: shared/data/h100/bench_2026-11-22.md. M=1: cuBLAS was not measured.
MEASURED_WINNERS = {
    (2112, 7168): "TTTTCC",
    (4608, 7168): "TCTCCC",
    (7168, 2048): "TCCCCC",
    (24576, 1536): "TTCCCC",
    (7168, 18432): "TCCCCC",
}
MEASURED_M = (1, 16, 64, 256, 1024, 4096)


def _decide(m, n, k, x_dtype=E4M3, activation="dynamic", out_dtype=BF16, block=(128, 128), **kw):
    kw = {"cublas": True, "dequant_mm": True, **kw}
    return _route.decide(m, n, k, block, x_dtype, E4M3, activation, out_dtype, **kw)


@pytest.mark.parametrize("nk", list(MEASURED_WINNERS))
def test_the_rule_picks_the_measured_winner_at_every_measured_point(nk):
    for m, winner in zip(MEASURED_M, MEASURED_WINNERS[nk], strict=True):
        for x_dtype in (E4M3, BF16):  # fp8 x and dynamic share the crossovers
            expected = {"T": "triton", "C": "cublas"}[winner]
            assert _decide(m, *nk, x_dtype=x_dtype) == expected, (m, nk, x_dtype)


def test_unknown_shapes_switch_to_cublas_at_32():
    assert [_decide(m, 4096, 4096) for m in (1, 16, 31, 32, 33, 5000)] == ["triton"] * 3 + ["cublas"] * 3


def test_w8a16_fused_at_decode_dequant_gemm_from_128_only_within_budget():
    for dtype in (BF16, F16):
        assert [_decide(m, 4096, 4096, dtype, "none", dtype) for m in (1, 64, 127, 128, 256, 4096)] == (
            ["triton"] * 3 + ["triton_dequant_mm"] * 3
        )
    assert _decide(4096, 4096, 4096, BF16, "none", F32) == "triton"  # bf16 panel: 2**-9 > 1e-3 budget
    assert _decide(4096, 4096, 4096, BF16, "none", F16) == "triton"
    assert _decide(4096, 4096, 4096, BF16, "none", dequant_mm=False) == "triton"
    for x_dtype in HIGH:
        for out in HIGH:
            ok = _decide(4096, 4096, 4096, x_dtype, "none", out) == "triton_dequant_mm"
            assert ok == _route.dequant_mm_supports(x_dtype, out), (x_dtype, out)


def test_cublas_never_taken_when_ineligible_or_unavailable():
    assert _decide(4096, 4096, 4160) == "triton"  # K % 128
    assert _decide(4096, 4104, 4096) == "triton"  # N % 16
    assert _decide(4096, 4096, 4096, block=(128, 256)) == "triton"
    assert _decide(4096, 4096, 4096, x_dtype=E5M2) == "triton"
    assert _decide(4096, 4096, 4096, cublas=False) == "triton"
    assert _decide(4096, 4096, 4160, prefer="cublas") == "triton"


def test_preference_is_taken_where_eligible():
    assert _decide(1, 4096, 4096, prefer="cublas") == "cublas"
    assert _decide(4096, 4096, 4096, prefer="triton") == "triton"
    assert _decide(4096, 4096, 4096, BF16, "none", prefer="triton") == "triton"
    assert _decide(1, 4096, 4096, BF16, "none", prefer="triton_dequant_mm") == "triton_dequant_mm"
    assert _decide(1, 4096, 4096, BF16, "none", F32, prefer="triton_dequant_mm") == "triton"
    assert _decide(1, 4096, 4096, BF16, "none", F16, prefer="triton_dequant_mm") == "triton"
    assert _decide(1, 4096, 4096, prefer="triton_dequant_mm") == "triton"  # not a W8A8 route


def test_cache_is_exact_per_power_of_two_band(monkeypatch):
    """route() decides once per band of M.bit_length(); the answer equals decide() at every M."""
    route_on_cpu(monkeypatch)
    calls = []
    real = _route.decide
    monkeypatch.setattr(_route, "decide", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    dev = torch.device("cpu")
    for n, k in [*MEASURED_WINNERS, (4096, 4096)]:
        for m in range(1, 5000):
            name, _ = _route.route(dev, m, n, k, (128, 128), E4M3, E4M3, "dynamic", BF16)
            assert name == real(
                m, n, k, (128, 128), E4M3, E4M3, "dynamic", BF16, cublas=True, dequant_mm=False
            )
    assert len(calls) == 6 * (4999).bit_length()


def test_set_route_and_routing_override(monkeypatch):
    route_on_cpu(monkeypatch)
    dev = torch.device("cpu")

    def name(m):
        return _route.route(dev, m, 4096, 4096, (128, 128), E4M3, E4M3, "dynamic", BF16)[0]

    assert (name(1), name(4096)) == ("triton", "cublas")
    try:
        tfb.set_route("triton")
        assert name(4096) == "triton"
        with tfb.routing_override("cublas"):
            assert name(1) == "cublas"
        assert name(1) == "triton"
    finally:
        tfb.set_route(None)
    assert name(4096) == "cublas"
    with pytest.raises(
        ValueError, match=r"routing_override: expected one of \('cublas', 'triton', 'triton_dequant_mm'\)"
    ):
        with tfb.routing_override("cutlass"):
            pass


def test_environment_variable_sets_the_preference():
    code = "from torch_fp8_blockwise import _route; print(_route.preferred_route())"
    env = {**os.environ, "FP8_BLOCKWISE_ROUTE": "triton", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "triton", out.stderr[-2000:]


def _problem(m, n, k, x_dtype=BF16):
    wq, ws = reference.quantize(torch.randn(n, k) * 0.05, (128, 128), E4M3, "fp32")
    return torch.randn(m, k).to(x_dtype), wq, ws


def test_routed_op_takes_cublas_or_triton_and_meets_the_contract(monkeypatch):
    emu = route_on_cpu(monkeypatch)
    x, wq, ws = _problem(33, 128, 256)  # default rule: cuBLAS from M = 32
    bias = torch.randn(128)
    ref = reference.blockwise_matmul(x, wq, ws, (128, 128), None, bias, BF16, "dynamic")
    assert_kernel_close(tfb.blockwise_matmul(x, wq, ws, bias=bias), ref, "routed to cublas")
    assert [c["m"] for c in emu.calls] == [36]
    y = tfb.blockwise_matmul(x[:5], wq, ws, bias=bias)  # M = 5: Triton (interpreter)
    assert_kernel_close(y, ref[:5], "routed to triton")
    assert len(emu.calls) == 1
    with tfb.use_backend("triton"):  # forcing a backend bypasses the rule
        assert_kernel_close(tfb.blockwise_matmul(x, wq, ws, bias=bias), ref, "forced triton")
    assert len(emu.calls) == 1


def _fake_dequant_mm(monkeypatch) -> list:
    calls = []

    def dequant_matmul(x, w, w_scale, block_shape, bias, out_dtype):
        calls.append((tuple(x.shape), tuple(block_shape), out_dtype))
        return reference.blockwise_matmul(x, w, w_scale, block_shape, None, bias, out_dtype, "none")

    name = "torch_fp8_blockwise.backends.triton.dequant_mm"
    module = types.ModuleType(name)
    module.dequant_matmul = dequant_matmul
    monkeypatch.setitem(sys.modules, name, module)
    import torch_fp8_blockwise.backends.triton as triton_backend

    monkeypatch.setattr(triton_backend, "dequant_mm", module, raising=False)
    return calls


def test_w8a16_hook_routes_large_m_to_dequant_matmul_once_it_exists(monkeypatch):
    route_on_cpu(monkeypatch)
    calls = _fake_dequant_mm(monkeypatch)
    assert _route.dequant_mm_reason() is None
    x, wq, ws = _problem(130, 128, 256)
    ref = reference.blockwise_matmul(x, wq, ws, (128, 128), None, None, BF16, "none")
    assert_kernel_close(tfb.blockwise_matmul(x, wq, ws, activation="none"), ref, "dequant_mm")
    assert calls == [((130, 256), (128, 128), BF16)]
    y = tfb.blockwise_matmul(x.float(), wq, ws, activation="none")  # fp32 out: fused Triton kernel
    assert len(calls) == 1 and y.dtype == F32


def test_the_real_dequant_mm_is_wired_when_present(monkeypatch):
    """Once backends/triton/dequant_mm.py is installed, the route finds it and the routed op runs it
    (on CPU in the interpreter) within the contract; without it, the reason says so."""
    import importlib.util

    present = importlib.util.find_spec("torch_fp8_blockwise.backends.triton.dequant_mm") is not None
    reason = _route.dequant_mm_reason()
    assert (reason is None) == present, reason
    if not present:
        assert "dequant_mm.dequant_matmul is not installed" in reason
        return
    from torch_fp8_blockwise.backends.triton import dequant_mm

    route_on_cpu(monkeypatch)
    calls = []
    real = dequant_mm.dequant_matmul
    monkeypatch.setattr(dequant_mm, "dequant_matmul", lambda *a: calls.append(1) or real(*a))
    x, wq, ws = _problem(130, 144, 384)
    bias = torch.randn(144)
    for dtype in (BF16, F16):
        ref = reference.blockwise_matmul(x.to(dtype), wq, ws, (128, 128), None, bias, dtype, "none")
        y = tfb.blockwise_matmul(x.to(dtype), wq, ws, bias=bias, activation="none")
        assert_kernel_close(y, ref, f"dequant_mm {dtype}")
    assert len(calls) == 2


def test_cli_backends_prints_the_rule(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "CUDA blockwise_matmul routing" in out
    assert "N=4608   K=7168   M>=1: triton, M>=4: cublas, M>=32: triton, M>=128: cublas" in out
    assert "other shapes    M>=1: triton, M>=32: cublas" in out
    assert "cuBLAS block-scaled" in out
