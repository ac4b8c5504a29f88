"""The AVX512-BF16 fused GEMM of the CPU kernels (fp8_cpu.c, ISA 2): what the shared parametrized
tests (test_cpu_kernels.py, test_grouped_cpu_kernels.py, test_cpu_hardening.py run every matmul
case on it too) do not pin down. Each test skips, with the reason, on a CPU without AVX512-BF16.

* every finite fp8 code is widened to bf16 exactly (a one-hot x reads each code back unrounded);
* nan / inf codes reach the output as in the reference with bf16 x (the bf16 kernels' operand);
* vdpbf16ps flushes denormals: a W8A16 bf16 x with a nonzero |x| below 2^-100 takes the fp32
  kernels (bit for bit the AVX2 result);
* FP8_CPU_ISA=avx2 turns the bf16 kernels off.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from cpu_kernel_helpers import compiled_or_fail, on_isa, use_isa

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise import reference
from torch_fp8_blockwise.backends import cpu, cpu_kernels
from torch_fp8_blockwise.testing import assert_kernel_close

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def lib():
    with on_isa("avx512bf16") as lib:
        yield lib


def _matmul(x, w, ws, out_dtype=torch.float32, activation="none"):
    with tfb.use_backend("cpu"):
        return tfb.blockwise_matmul(x, w, ws, (128, 128), out_dtype=out_dtype, activation=activation)


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=str)
def test_every_finite_code_is_widened_exactly(lib, dtype):
    """w [4, 256] holds every finite code (rotated per row), scales 1, x one-hot bf16 rows: y[m, n]
    is the code's value, bit for bit (M = 32 per call: the fused GEMM's tile path)."""
    codes = torch.arange(256, dtype=torch.int32)
    finite = torch.isfinite(codes.to(torch.uint8).view(dtype).float())
    row = torch.cat([codes[finite], torch.zeros(256 - int(finite.sum()), dtype=torch.int32)])
    w = torch.stack([row.roll(64 * r) for r in range(4)]).to(torch.uint8).view(dtype)
    ws = torch.ones(1, 2)
    eye = torch.eye(256, dtype=torch.bfloat16)
    for m0 in range(0, 256, 32):
        x = eye[m0 : m0 + 32]
        y = _matmul(x, w, ws)
        ref = reference.blockwise_matmul(x, w, ws, (128, 128), None, None, torch.float32, "none")
        assert torch.equal(y, ref), m0
        assert torch.equal(y, w.float().T[m0 : m0 + 32])


@pytest.mark.parametrize("m", [1, 2, 5])
def test_nan_and_inf_codes_propagate_with_bf16_x(lib, m):
    """As test_cpu_kernels' nan / inf test, with the bf16 x that the bf16 kernels take (W8A16) and
    with W8A8 (the e4m3 codes of x): K = 277 (blocks of 128, 128, 21: masked tails)."""
    wq, ws = reference.quantize(torch.randn(8, 277), (128, 128), E4M3, "fp32")
    codes = wq.view(torch.uint8)
    codes[3, 5], codes[4, 260], codes[6, 275] = 0x7F, 0xFF, 0x7F  # e4m3 nan
    w5, ws5 = reference.quantize(torch.randn(8, 277), (128, 128), E5M2, "fp32")
    w5.view(torch.uint8)[2, 7] = 0x7C  # e5m2 +inf
    x = (torch.rand(m, 277) + 0.5).bfloat16()
    x[:, 5] = 0.0
    for w, s in ((wq, ws), (w5, ws5)):
        for act in ("none", "dynamic"):
            ref = reference.blockwise_matmul(x, w, s, (128, 128), None, None, torch.float32, act)
            assert_kernel_close(_matmul(x, w, s, activation=act), ref, act)
    assert ref.isinf().any()


@pytest.mark.parametrize("m", [1, 3])
def test_tiny_bf16_x_takes_the_fp32_kernels(lib, m):
    """W8A16 bf16 x with a nonzero |x| below 2^-100 (1e-33; and bf16 subnormals, 1e-39, which
    vdpbf16ps would read as 0): the fp32 kernels' result bit for bit, within the reference's bound."""
    wq, ws = reference.quantize(torch.randn(40, 300), (128, 128), E5M2, "fp32")
    for tiny in (1e-33, 1e-39):
        x = torch.randn(m, 300).bfloat16()
        x[-1, 7] = tiny
        x_all = torch.full((m, 300), tiny).bfloat16()
        for xx in (x, x_all):
            y = _matmul(xx, wq, ws)
            ref = reference.blockwise_matmul(xx, wq, ws, (128, 128), None, None, torch.float32, "none")
            assert_kernel_close(y, ref, f"{tiny}")
            use_isa(lib, "avx2")
            y_avx2 = _matmul(xx, wq, ws)
            use_isa(lib, "avx512bf16")
            assert torch.equal(y, y_avx2), tiny
    assert (ref != 0).all() and ref.abs().max() < 1e-30  # the all-tiny product is not flushed to 0


def test_w8a8_is_the_reference_order_of_scaling(lib):
    """W8A8: ((sum of code products) * x_scale) * w_scale per K block, the reference's order: the
    relative error is fp32 summation order alone (far below the 1e-3 bound)."""
    wq, ws = reference.quantize(torch.randn(64, 1000), (128, 128), E4M3, "fp32")
    x = torch.randn(7, 1000).bfloat16()
    y = _matmul(x, wq, ws, activation="dynamic")
    ref = reference.blockwise_matmul(x, wq, ws, (128, 128), None, None, torch.float32, "dynamic")
    assert ((y - ref).abs().mean() / ref.abs().mean()).item() < 1e-6


def _status_with(isa: str) -> str:
    code = "from torch_fp8_blockwise.backends import cpu; print(cpu.kernel_status())"
    env = {**os.environ, "PYTHONPATH": ROOT, "FP8_CPU_ISA": isa}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return out.stdout + out.stderr


def test_env_forces_the_avx2_kernels():
    """FP8_CPU_ISA=avx2 (A/B runs) turns the bf16 kernels off, FP8_CPU_ISA=avx512bf16 the AMX tiles;
    by default a CPU with AVX512-BF16 uses its kernels, and one with AMX-BF16 its tiles too."""
    lib = compiled_or_fail()
    assert _status_with("avx2").startswith("compiled (avx2)")
    before, amx = lib.fp8_get_isa(), lib.fp8_get_amx()
    has_bf16 = lib.fp8_set_isa(2) == 2
    has_amx = has_bf16 and lib.fp8_set_amx(1) == 1
    lib.fp8_set_isa(before)
    lib.fp8_set_amx(amx)
    if has_bf16:
        assert _status_with("avx512bf16").startswith("compiled (avx512bf16)")
        if not os.environ.get("FP8_CPU_ISA"):
            want = "compiled (avx512bf16+amx)" if has_amx else "compiled (avx512bf16)"
            assert cpu.kernel_status().startswith(want)


@pytest.mark.parametrize("n", [500, 512])  # x 1024: below and at GEMV_PAR_MIN elements
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=str)
def test_one_row_rule_is_the_same_in_python_and_c(lib, n, dtype):
    """One rule (fp8_cpu.c's bf16_pays, asked through fp8_bf16_pays) sends a one-row product to ISA
    2's kernels: the VBMI GEMV for e4m3 weights where the CPU has AVX512-VBMI, else only a weight
    of GEMV_PAR_MIN elements or more. cpu_grouped follows it, so a one-row group is the dense
    matmul bit for bit, and fp8_gemm_grouped_x refuses exactly where it says no."""
    k = 1024
    kind = 0 if dtype == E4M3 else 1
    vbmi = lib.fp8_bf16_pays(1, 1, 1, 0, 128) == 1
    pays = lib.fp8_bf16_pays(1, n, k, kind, 128) == 1
    assert pays is (n == 512 or (vbmi and dtype == E4M3))
    assert lib.fp8_bf16_pays(2, 1, 1, kind, 128) == 1  # from two rows on, always
    wq, ws = reference.quantize(torch.randn(2, n, k), (128, 128), dtype, "fp32")
    x = torch.randn(4, k).bfloat16()
    sizes = torch.tensor([1, 3], dtype=torch.int32)
    for act in ("none", "dynamic"):
        y = cpu.grouped_matmul(x, wq, ws, sizes, (128, 128), None, torch.float32, act)
        dense = cpu.blockwise_matmul(x[:1], wq[0], ws[0], (128, 128), None, None, torch.float32, act)
        assert torch.equal(y[:1], dense), act
        y_c = torch.empty(1, n)
        zero, one = torch.zeros(1, dtype=torch.int64), torch.ones(1, dtype=torch.int64)
        rc = lib.fp8_gemm_grouped_x(
            x.data_ptr(), 1, None, act == "dynamic", 1, 1, zero.data_ptr(), zero.data_ptr(), zero.data_ptr(),
            one.data_ptr(), wq.data_ptr(), kind, ws.data_ptr(), 2, n, k, 128, 128,
            y_c.data_ptr(), 0, 1,
        )  # fmt: skip
        assert rc == (0 if pays else cpu_kernels.NOT_BF16), rc
