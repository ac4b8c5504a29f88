"""W8A16 "dequantize weight, then GEMM" route (backends/triton/dequant_mm.py): bias follows the
contract (NOTES section 5: added in fp32 to the fp32 product, then ONE cast to out_dtype).

The data are chosen so that every intermediate is exact (x on a 2**-6 grid, fp8 weights in
{0, +-0.5, +-1, +-1.5, +-2}, power-of-two block scales, K = 256: |x @ w.T| <= 2**10 on a 2**-7
grid, 17 bits), so the GEMM's product equals the reference's fp32 product whatever the summation
order, and the only rounding left is the bias's: the result must equal the reference bit for bit.
Each case also computes the old rounding (bias cast to x's dtype and added by the 16-bit GEMM)
and checks that it differs, so the test can fail. Runs on CPU (Triton interpreter).
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_params
from cublas_emulation import route_on_cpu

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise import reference
from torch_fp8_blockwise.formats import cdiv

pytestmark = pytest.mark.parametrize("backend", backend_params("triton", op="blockwise_matmul"))

E4M3 = torch.float8_e4m3fn
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def _exact_problem(m: int, n: int, k: int, x_dtype: torch.dtype, block=(128, 128)):
    """x [m, k] x_dtype, wq [n, k] e4m3, ws [cdiv(n, bn), cdiv(k, bk)] powers of two: x @ w.T exact in fp32."""
    x = (torch.randint(-64, 65, (m, k)) * 2.0**-6).to(x_dtype)
    wq = (torch.randint(-4, 5, (n, k)) * 0.5).to(E4M3)
    ws = 2.0 ** torch.randint(-2, 3, (cdiv(n, block[0]), cdiv(k, block[1]))).float()
    return x, wq, ws


def _old_rounding(x, wq, ws, block, bias, out_dtype):
    """What dequant_matmul computed before: bias rounded to x's dtype, added by the 16-bit GEMM."""
    w = reference.dequantize(wq, ws, block, F32).to(x.dtype)
    return torch.addmm(bias.to(x.dtype), x, w.t()).to(out_dtype)


def _dequant_mm():
    from torch_fp8_blockwise.backends.triton import dequant_mm

    return dequant_mm


@pytest.mark.parametrize(
    "x_dtype,bias_dtype",
    [(BF16, F32), (BF16, F16), (F16, F32)],
    ids=["bf16x-f32bias", "bf16x-f16bias", "f16x-f32bias"],
)
@pytest.mark.parametrize("panels", [1, 3], ids=["whole", "3-panels"])
def test_a_wider_bias_is_added_in_fp32_before_the_one_rounding(
    backend, monkeypatch, x_dtype, bias_dtype, panels
):
    dm = _dequant_mm()
    m, n, k, block = 9, 300, 256, (128, 128)
    if panels == 3:  # 128-row panels: bias sliced per panel, a ragged last one (300 = 128 + 128 + 44)
        monkeypatch.setattr(dm, "PANEL_BYTES", 128 * k * torch.tensor([], dtype=x_dtype).element_size())
    x, wq, ws = _exact_problem(m, n, k, x_dtype, block)
    bias = (torch.randn(n) * 8).to(bias_dtype)  # |bias| ~ |x @ w.T|: its low bits reach the result
    ref = reference.blockwise_matmul(x, wq, ws, block, None, bias, x_dtype, "none")
    y = dm.dequant_matmul(x, wq, ws, block, bias, x_dtype)
    assert y.dtype == x_dtype
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    old = _old_rounding(x, wq, ws, block, bias, x_dtype)
    assert (old != ref).sum() > m * n // 50, "the data no longer tell the two roundings apart"


def test_a_bf16_bias_beyond_fp16_range_stays_finite_on_fp16_x(backend):
    """bf16 bias 66560 (> fp16's 65504) + x @ w.T = -2048 -> 64512, an fp16 value; the old rounding
    made the bias inf first."""
    dm = _dequant_mm()
    m, n, k, block = 3, 130, 256, (128, 128)
    x = torch.full((m, k), -8.0, dtype=F16)
    wq = torch.ones(n, k).to(E4M3)
    ws = torch.ones(cdiv(n, 128), cdiv(k, 128))
    bias = torch.full((n,), 66560.0, dtype=BF16)
    ref = reference.blockwise_matmul(x, wq, ws, block, None, bias, F16, "none")
    assert torch.all(ref == 64512)
    torch.testing.assert_close(dm.dequant_matmul(x, wq, ws, block, bias, F16), ref, rtol=0, atol=0)
    assert torch.isinf(_old_rounding(x, wq, ws, block, bias, F16)).all()


@pytest.mark.parametrize(
    "x_dtype,bias_dtype,out_dtype",
    [(BF16, BF16, BF16), (F16, F16, F16), (F32, BF16, BF16), (F32, F32, F16)],
    ids=["bf16", "f16", "f32x-bf16bias-bf16out", "f32x-f32bias-f16out"],
)
def test_a_bias_exact_in_x_dtype_takes_the_16_bit_gemm_and_is_exact_too(
    backend, x_dtype, bias_dtype, out_dtype
):
    m, n, k, block = 5, 200, 256, (128, 128)
    x, wq, ws = _exact_problem(m, n, k, x_dtype, block)
    bias = (torch.randn(n) * 8).to(bias_dtype)
    ref = reference.blockwise_matmul(x, wq, ws, block, None, bias, out_dtype, "none")
    torch.testing.assert_close(
        _dequant_mm().dequant_matmul(x, wq, ws, block, bias, out_dtype), ref, rtol=0, atol=0
    )


def test_the_routed_op_adds_an_fp32_bias_exactly(backend, monkeypatch):
    """The CUDA routing on CPU (tests/cublas_emulation.py): W8A16 at M >= 128 takes dequant_mm."""
    route_on_cpu(monkeypatch)
    dm = _dequant_mm()
    calls = []
    real = dm.dequant_matmul
    monkeypatch.setattr(dm, "dequant_matmul", lambda *a: calls.append(1) or real(*a))
    x, wq, ws = _exact_problem(130, 144, 256, BF16)
    bias = torch.randn(144) * 8
    y = tfb.blockwise_matmul(x, wq, ws, bias=bias, activation="none")
    assert calls == [1]
    ref = reference.blockwise_matmul(x, wq, ws, (128, 128), None, bias, BF16, "none")
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
