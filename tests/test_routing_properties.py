"""Property-based tests (hypothesis) of the routed blockwise_matmul and of the routing rule.

* The rule alone over random calls: never a route the call is ineligible for (cuBLAS: K % 128,
  N % 16, non-128x128 blocks, e5m2 x, W8A16; dequant_mm: fp32 output, W8A8), and with no
  preference, exactly the documented table.
* The routed op end to end on CPU over random M, N, K, dtypes, scale formats, bias and out dtype,
  routing boundaries included (K % 128, M % 4, N % 16): Triton kernels in the interpreter,
  cuBLAS through the emulation of NOTES' exact _scaled_mm call, each against the reference.

Derandomized, no example database: the same examples every run (CI time stays fixed).
"""

from __future__ import annotations

import pytest
import torch
from cublas_emulation import route_on_cpu
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise import _route, reference
from torch_fp8_blockwise.formats import MATMUL_BLOCKS
from torch_fp8_blockwise.testing import assert_kernel_close

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
FP8 = (E4M3, E5M2)
HIGH = (BF16, F16, F32)

SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow],
}


def _table_route(m: int, n: int, k: int) -> str:
    """The documented W8A8 table read the plain way: the last step whose m_from <= m."""
    steps = _route.W8A8_TABLE.get((n, k), _route.W8A8_DEFAULT)
    return [name for m_from, name in steps if m_from <= m][-1]


@settings(max_examples=400, **SETTINGS)
@given(
    m=st.integers(1, 10_000),
    n=st.one_of(st.sampled_from([2112, 4608, 7168, 24576]), st.integers(1, 30_000)),
    k=st.one_of(st.sampled_from([1536, 2048, 7168, 18432]), st.integers(1, 30_000)),
    block=st.tuples(st.sampled_from(MATMUL_BLOCKS), st.sampled_from(MATMUL_BLOCKS)),
    x_dtype=st.sampled_from(FP8 + HIGH),
    w_dtype=st.sampled_from(FP8),
    activation=st.sampled_from(["dynamic", "none"]),
    out_dtype=st.sampled_from(HIGH),
    cublas=st.booleans(),
    dequant_mm=st.booleans(),
    prefer=st.sampled_from([None, *_route.ROUTES]),
)
def test_rule_never_routes_a_call_where_it_cannot_be_computed(
    m, n, k, block, x_dtype, w_dtype, activation, out_dtype, cublas, dequant_mm, prefer
):
    if x_dtype in FP8:
        activation = "dynamic"  # validation rejects fp8 x with activation "none"
    name = _route.decide(
        m,
        n,
        k,
        block,
        x_dtype,
        w_dtype,
        activation,
        out_dtype,
        cublas=cublas,
        dequant_mm=dequant_mm,
        prefer=prefer,
    )
    w8a16 = activation == "none"
    assert name in _route.ROUTES
    if name == "cublas":
        assert cublas and not w8a16 and block == (128, 128) and k % 128 == 0 and n % 16 == 0
        assert x_dtype == E4M3 or x_dtype in HIGH
    if name == "triton_dequant_mm":
        assert dequant_mm and w8a16 and _route.dequant_mm_supports(x_dtype, out_dtype)
        assert out_dtype != F32 or x_dtype == F32  # a bf16/fp16 weight panel misses fp32's 1e-3
    eligible = cublas and block == (128, 128) and k % 128 == 0 and n % 16 == 0 and x_dtype != E5M2
    if prefer is None and not w8a16 and eligible:
        assert name == _table_route(m, n, k)
    if prefer is None and w8a16 and dequant_mm and _route.dequant_mm_supports(x_dtype, out_dtype):
        assert name == ("triton_dequant_mm" if m >= 128 else "triton")


@st.composite
def _calls(draw):
    m = draw(st.one_of(st.integers(1, 9), st.sampled_from([31, 32, 33, 36])))
    n = draw(st.one_of(st.sampled_from([16, 112, 128, 144, 160]), st.integers(1, 200)))
    k = draw(st.one_of(st.sampled_from([128, 256, 384]), st.integers(1, 400)))
    mode = draw(st.sampled_from(["fp8_x", "fp8_x_e5m2", "dynamic_bf16", "dynamic_f32", "w8a16"]))
    return {
        "m": m,
        "n": n,
        "k": k,
        "mode": mode,
        "w_dtype": draw(st.sampled_from(FP8)),
        "fmt": draw(st.sampled_from(["fp32", "ue8m0"])),
        "block": draw(st.sampled_from([(128, 128), (128, 128), (256, 128), (128, 256)])),
        "bias": draw(st.sampled_from([None, BF16, F16, F32])),
        "out_dtype": draw(st.sampled_from(HIGH)),
        "prefer": draw(st.sampled_from([None, "cublas", "triton"])),
    }


def _check_routed_call(c: dict) -> None:
    gen = torch.Generator().manual_seed(c["m"] * 1_000_003 + c["n"] * 1009 + c["k"])
    m, n, k, block = c["m"], c["n"], c["k"], c["block"]
    wq, ws = reference.quantize(torch.randn(n, k, generator=gen) * 0.05, block, c["w_dtype"], c["fmt"])
    x = torch.randn(m, k, generator=gen)
    kwargs = {"out_dtype": c["out_dtype"], "bias": None}
    if c["bias"] is not None:
        kwargs["bias"] = torch.randn(n, generator=gen).to(c["bias"])
    if c["mode"].startswith("fp8_x"):
        x_dtype = E5M2 if c["mode"] == "fp8_x_e5m2" else E4M3
        x, kwargs["x_scale"] = reference.quantize(x, (1, block[1]), x_dtype, c["fmt"])
    elif c["mode"] == "dynamic_bf16" or c["mode"] == "w8a16":
        x = x.to(BF16)
    if c["mode"] == "w8a16":
        kwargs["activation"] = "none"
    with tfb.use_backend("reference"):
        ref = tfb.blockwise_matmul(x, wq, ws, block, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        emu = route_on_cpu(mp)
        with tfb.routing_override(c["prefer"]):
            y = tfb.blockwise_matmul(x, wq, ws, block, **kwargs)
    assert_kernel_close(y, ref, f"routed {c}")
    eligible = (
        block == (128, 128) and k % 128 == 0 and n % 16 == 0 and c["mode"] not in ("fp8_x_e5m2", "w8a16")
    )
    if not eligible:
        assert emu.calls == [], c  # cuBLAS never receives a call it would get wrong
    elif c["prefer"] == "cublas":
        assert [call["m"] for call in emu.calls] == [-(-m // 4) * 4], c


@settings(max_examples=20, **SETTINGS)
@given(c=_calls())
def test_routed_op_matches_the_reference(c):
    _check_routed_call(c)


@pytest.mark.slow
@settings(max_examples=120, **SETTINGS)
@given(c=_calls())
def test_routed_op_matches_the_reference_many(c):
    _check_routed_call(c)
