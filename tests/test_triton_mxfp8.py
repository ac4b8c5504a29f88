"""Triton MXFP8 quantizer and GEMM under TRITON_INTERPRET=1, against the reference.

Both GEMM paths run here: the explicit-scaling path (sm_90 / sm_120) in every environment, the
tl.dot_scaled path (sm_100) only where the interpreter implements dot_scaled (triton >= 3.9;
triton 3.5's InterpreterBuilder has no create_dot_scaled).
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_params

from torch_fp8_blockwise import reference
from torch_fp8_blockwise.testing import assert_kernel_close, sqnr, sqnr_floor

pytestmark = pytest.mark.parametrize("backend", backend_params("triton", op="mxfp8_matmul"))

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _interpreter_has_dot_scaled() -> bool:
    try:
        from triton.runtime.interpreter import InterpreterBuilder
    except ImportError:
        return False
    return hasattr(InterpreterBuilder, "create_dot_scaled")


def _paths():
    import triton

    skip = pytest.mark.skipif(
        not _interpreter_has_dot_scaled(),
        reason=f"triton {triton.__version__}'s interpreter has no tl.dot_scaled (InterpreterBuilder."
        "create_dot_scaled is missing; triton 3.5 lacks it, 3.9 has it): run in the 'latest' environment",
    )
    return [pytest.param(False, id="explicit"), pytest.param(True, id="native-dot_scaled", marks=skip)]


def _backend():
    from torch_fp8_blockwise.backends import triton as backend

    return backend


def _cfg(**kw):
    from torch_fp8_blockwise.backends.triton.configs import GemmConfig

    return GemmConfig(**kw)


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_mxfp8_quantize_bit_exact(backend, dtype, x_dtype):
    x = torch.randn(45, 320) * torch.logspace(-4, 4, 320)
    x[0, 5], x[1, 40], x[2, 70] = float("inf"), float("nan"), float("-inf")
    x[3, 96:128] = 0.0  # all-zero group: eps scale, q = 0
    x = x.to(x_dtype)
    q, s = _backend().mxfp8_quantize(x, dtype)
    rq, rs = reference.mxfp8_quantize(x, dtype)
    assert s.dtype == torch.uint8 and s.shape == (45, 10)
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


# (M, N, K, config): K = 96 is three groups, a tail shorter than block_k = 128.
CASES = [
    pytest.param(13, 70, 96, dict(block_m=16, block_n=32, block_k=128), id="k-tail"),
    pytest.param(
        3, 200, 320, dict(block_m=16, block_n=128, block_k=64, split_k=2, swap_ab=True), id="swap-split"
    ),
    pytest.param(40, 33, 256, dict(block_m=32, block_n=32, block_k=128, group_m=2), id="grouped"),
]


@pytest.mark.parametrize("native", _paths())
@pytest.mark.parametrize("m,n,k,cfg", CASES)
@pytest.mark.parametrize("w_dtype", [E4M3, E5M2])
def test_mxfp8_matmul_fp8_x(backend, native, m, n, k, cfg, w_dtype):
    wq, ws = reference.mxfp8_quantize(torch.randn(n, k), w_dtype)
    xq, xs = reference.mxfp8_quantize(torch.randn(m, k) * 5, E4M3)
    bias = torch.randn(n).to(torch.bfloat16)
    y = _backend().mxfp8_matmul(xq, wq, ws, xs, bias, torch.float32, config=_cfg(**cfg), native=native)
    ref = reference.mxfp8_matmul(xq, wq, ws, xs, bias, torch.float32)
    assert_kernel_close(y, ref, f"mxfp8 native={native} {m}x{n}x{k}")


@pytest.mark.parametrize("native", _paths())
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_mxfp8_matmul_dynamic_x_and_sqnr(backend, native, out_dtype):
    m, n, k = 9, 150, 512
    w_true = torch.randn(n, k)
    wq, ws = reference.mxfp8_quantize(w_true, E4M3)
    x = torch.randn(m, k).to(out_dtype)
    y = _backend().mxfp8_matmul(x, wq, ws, None, None, out_dtype, native=native)
    ref = reference.mxfp8_matmul(x, wq, ws, None, None, out_dtype)
    assert_kernel_close(y, ref, f"dynamic native={native}")
    assert sqnr(y.float(), x.float() @ w_true.T) >= sqnr_floor(E4M3, "ue8m0")


@pytest.mark.parametrize("native", _paths())
def test_mxfp8_matmul_extreme_scales(backend, native):
    """Groups whose scales differ by 2**40 (E8M0 bits far from 127) stay exact in both paths."""
    m, n, k = 4, 32, 128
    x = torch.randn(m, k) * torch.tensor([1e-6, 1.0, 1e6, 1e-3]).repeat_interleave(32)
    w = torch.randn(n, k) * torch.tensor([1e5, 1e-5, 1.0, 10.0]).repeat_interleave(32)
    xq, xs = reference.mxfp8_quantize(x, E4M3)
    wq, ws = reference.mxfp8_quantize(w, E4M3)
    y = _backend().mxfp8_matmul(xq, wq, ws, xs, None, torch.float32, native=native)
    assert_kernel_close(y, reference.mxfp8_matmul(xq, wq, ws, xs, None, torch.float32), "extreme")


def test_mxfp8_through_ops(backend):
    """torch.ops.fp8.mxfp8_* forced onto this backend, incl. the K % 32 error from validation."""
    import torch_fp8_blockwise as tfb

    wq, ws = reference.mxfp8_quantize(torch.randn(64, 160), E4M3)
    x = torch.randn(2, 3, 160, dtype=torch.bfloat16)
    with tfb.use_backend(backend):
        y = tfb.mxfp8_matmul(x, wq, ws)
        with pytest.raises(ValueError, match="32"):
            tfb.mxfp8_quantize(torch.randn(4, 100))
    ref = reference.mxfp8_matmul(x.reshape(6, 160), wq, ws, None, None, torch.bfloat16).reshape(2, 3, 64)
    assert_kernel_close(y, ref, "op")


@pytest.mark.parametrize("swap", [False, True], ids=["plain", "swap"])
def test_mxfp8_explicit_path_is_exact_up_to_summation_order(backend, swap):
    """The explicit path scales each fp8 tile by its power-of-two group scales in registers: every
    operand value is exact, so against the reference (fp32 output) only the order of fp32 sums
    differs: far inside the 1e-3 kernel budget. Groups span 2**-36 .. 2**30 so a wrong group index
    (a scale applied to the neighbouring 32 columns) would be visible; their E8M0 scales stay inside
    the window of the fast loop (mxfp8.SAFE_LO .. SAFE_HI), the loop tested here."""
    m, n, k = 19, 40, 384  # 12 groups: 3 K tiles of 128, 4 scale vectors each
    spread = 2.0 ** torch.arange(-36, 36, 6, dtype=torch.float64).float()
    x = torch.randn(m, k) * spread.repeat_interleave(32)
    w = torch.randn(n, k) * spread.flip(0).repeat_interleave(32)
    xq, xs = reference.mxfp8_quantize(x, E4M3)
    wq, ws = reference.mxfp8_quantize(w, E4M3)
    cfg = _cfg(block_m=16, block_n=32, block_k=128, swap_ab=swap, group_m=1)
    y = _backend().mxfp8_matmul(xq, wq, ws, xs, None, torch.float32, config=cfg, native=False)
    ref = reference.mxfp8_matmul(xq, wq, ws, xs, None, torch.float32)
    from torch_fp8_blockwise.backends.triton import mxfp8
    from torch_fp8_blockwise.testing import rel_error

    for s in (xs, ws):
        assert mxfp8.SAFE_LO <= int(s.min()) and int(s.max()) <= mxfp8.SAFE_HI

    assert rel_error(y, ref) < 1e-6


def _edge_operands(edge: str, m: int, n: int, k: int):
    """MX operands at fp32's overflow edge: x [m, k], w [n, k] e4m3fn with E8M0 scales."""
    g = torch.Generator().manual_seed(0)
    xq, xs = reference.mxfp8_quantize(torch.randn(m, k, generator=g), E4M3)
    wq, ws = reference.mxfp8_quantize(torch.randn(n, k, generator=g), E4M3)
    if edge == "x_scale 254":
        xs[:, 1] = 254  # 2**127: the partial product times it overflows, times w's scale stays inf
    elif edge == "w_scale 254":
        ws[: n // 2, 2] = 254
    elif edge == "x_scale 0":
        xs[:, 0] = 0  # 2**-127, subnormal
        ws[:, 0] = 254
    else:  # "x 3e38": the quantizer's own scales (2**120), products overflow
        x = torch.randn(m, k, generator=g)
        x[:, 40] = 3e38
        xq, xs = reference.mxfp8_quantize(x, E4M3)
    return xq, xs, wq, ws


@pytest.mark.parametrize("native", _paths())
@pytest.mark.parametrize(
    "tile",
    [{}, {"swap_ab": True}, {"split_k": 2}, {"block_m": 128, "block_n": 128}],
    ids=["plain", "swap", "split", "halves"],
)
@pytest.mark.parametrize("edge", ["x_scale 254", "w_scale 254", "x_scale 0", "x 3e38"])
def test_mxfp8_overflow_edge_follows_the_reference_order(backend, native, tile, edge):
    """At fp32's edge the order of scaling decides between finite, inf and nan: both paths give
    the reference's pattern (partial sum of each 32-group, times x's scale, then w's), with bias,
    split-K and the column halves of a large tile. Both paths dequantized the operands first (or
    let the MMA scale them): an E8M0 scale of 254 gave nan where the reference gives inf."""
    m, n, k = 5, 160, 256
    xq, xs, wq, ws = _edge_operands(edge, m, n, k)
    bias = torch.randn(n)
    cfg = _cfg(**{"block_m": 16, "block_n": 32, "block_k": 128, "group_m": 1, **tile})
    y = _backend().mxfp8_matmul(xq, wq, ws, xs, bias, torch.float32, config=cfg, native=native)
    ref = reference.mxfp8_matmul(xq, wq, ws, xs, bias, torch.float32)
    for fn in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(fn(y), fn(ref)), (fn.__name__, int(fn(y).sum()), int(fn(ref).sum()))
    fin = torch.isfinite(ref)
    assert_kernel_close(y[fin], ref[fin], f"finite part, {edge}")
