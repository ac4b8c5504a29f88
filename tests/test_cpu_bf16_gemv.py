"""The AVX512-BF16 GEMV of the CPU backend (fp8_cpu.c, ``gemv_bf16_rows``): the M = 1 product of a
bf16-exact activation (bf16 x of W8A16; W8A8's e4m3 codes, dynamic or given) with e4m3 weights.

It is part of the kernels' ISA 2 (test_cpu_bf16_gemm.py) and also needs AVX512-VBMI; elsewhere
every test here is skipped with that reason (ISA 2's buffered kernel or the AVX2 GEMV then serves
one-row products, as test_cpu_kernels.py / test_cpu_bf16_gemm.py test).
Against the reference within the kernel-error bound for ragged K (masked tail), every e4m3 code
(subnormals, -0, nan) widened exactly, tiny activations that vdpbf16ps would flush routed to the
AVX2 GEMV, and the inputs it must not take (fp32 / fp16 x of W8A16, e5m2 weights, M > 1) left to
the AVX2 kernels bit for bit.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from cpu_kernel_helpers import on_isa

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise import reference
from torch_fp8_blockwise.testing import assert_kernel_close, sqnr, sqnr_floor

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.fixture
def bf16():
    """The library on ISA 2 with the one-row GEMV (AVX512-VBMI too); restores the ISA afterwards."""
    with on_isa("avx512bf16") as lib:
        if not lib.fp8_bf16_pays(1, 1, 1, 0, 128):  # a one-row product of a tiny e4m3 weight
            pytest.skip("this CPU has no AVX512-VBMI: one-row products keep the AVX2 GEMV")
        yield lib


def _mm(x, wq, ws, block=(128, 128), **kw):
    with tfb.use_backend("cpu"):
        return tfb.blockwise_matmul(x, wq, ws, block, **kw)


def _both(lib, *args, **kw):
    """(ISA 2 result, AVX2 result) of the same call."""
    y1 = _mm(*args, **kw)
    lib.fp8_set_isa(1)
    y0 = _mm(*args, **kw)
    lib.fp8_set_isa(2)
    return y1, y0


MODES = ["none", "dynamic", "fp8_x"]
# K: masked tail inside a 64-chunk (100, 1000), one chunk (64), ragged blocks (200), SmolLM2 (576)
CASES = list(itertools.product([1, 3, 4, 5, 300], [64, 100, 200, 576, 1000], MODES))


@pytest.mark.parametrize("n,k,mode", CASES, ids=str)
def test_matches_reference(bf16, n, k, mode):
    torch.manual_seed(n * 7919 + k)
    w_true = torch.randn(n, k)
    wq, ws = reference.quantize(w_true, (128, 128), E4M3, "fp32")
    x_true = torch.randn(1, k, dtype=torch.bfloat16)
    bias = torch.randn(n, dtype=torch.bfloat16) if n % 2 else None
    x, x_scale, act = x_true, None, "none" if mode == "none" else "dynamic"
    if mode == "fp8_x":
        x, x_scale = reference.quantize(x_true.float(), (1, 128), E4M3, "fp32")
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref = reference.blockwise_matmul(x, wq, ws, (128, 128), x_scale, bias, out_dtype, act)
        y, y_avx2 = _both(bf16, x, wq, ws, x_scale=x_scale, bias=bias, activation=act, out_dtype=out_dtype)
        assert_kernel_close(y, ref, f"bf16 gemv {mode} {out_dtype}")
        assert_kernel_close(y_avx2, ref, f"avx2 gemv {mode} {out_dtype}")
        # The weight's quantization loss (W8A16: x is exact) over enough outputs for a SQNR; W8A8's
        # loss adds x's and is covered by test_cpu_kernels' larger-M cases.
        if out_dtype == torch.float32 and n >= 300 and mode == "none":
            exact = x_true.float() @ w_true.T + (bias.float() if bias is not None else 0)
            assert sqnr(y, exact) >= sqnr_floor(E4M3)


def test_it_is_the_path_taken(bf16):
    """The switch changes the result's rounding on random data (another summation order): the
    AVX512-BF16 GEMV does run, and ISA 1 (FP8_CPU_ISA=avx2) turns it off."""
    wq, ws = reference.quantize(torch.randn(256, 1024), (128, 128), E4M3, "fp32")
    x = torch.randn(1, 1024, dtype=torch.bfloat16)
    y1, y0 = _both(bf16, x, wq, ws, activation="none", out_dtype=torch.float32)
    assert not torch.equal(y1, y0)


def test_every_e4m3_code_is_widened_exactly(bf16):
    """A weight row holding every non-nan code, x one-hot at column c: y = code c's value, bit for
    bit, sign of zero included (subnormals, -0 and the largest normals; the nan codes are zeroed
    here, test_nan_codes_give_nan_rows covers them)."""
    u = torch.arange(256, dtype=torch.uint8)
    u[(u & 0x7F) == 0x7F] = 0
    codes = u.view(E4M3).reshape(1, 256)
    values, ws = codes.float()[0], torch.ones(1, 2)
    x = torch.eye(256, dtype=torch.bfloat16)
    for c in range(256):
        y = _mm(x[c : c + 1], codes, ws, activation="none", out_dtype=torch.float32)[0, 0]
        assert torch.equal(y, values[c]), (c, y, values[c])


def test_nan_codes_give_nan_rows(bf16):
    wq, ws = reference.quantize(torch.randn(8, 300), (128, 128), E4M3, "fp32")
    u = wq.view(torch.uint8)
    u[2, 5], u[6, 290] = 0x7F, 0xFF  # the second in the masked tail of K
    for act in ("none", "dynamic"):
        y = _mm(torch.randn(1, 300, dtype=torch.bfloat16), wq, ws, activation=act, out_dtype=torch.float32)
        assert torch.isnan(y[0]).nonzero().flatten().tolist() == [2, 6]


def test_tiny_activations_take_the_avx2_gemv(bf16):
    """vdpbf16ps flushes subnormal inputs and results: an activation with a nonzero value below
    2^-100 goes to the AVX2 GEMV (bit-equal to it; ISA 2's one rule, bf16_has_tiny), one at 2^-99
    stays on the AVX512-BF16 one."""
    wq, ws = reference.quantize(torch.randn(64, 256), (128, 128), E4M3, "fp32")
    for tiny, routed in ((2.0**-110, True), (1e-40, True), (2.0**-99, False)):
        x = torch.randn(1, 256, dtype=torch.bfloat16)
        x[0, 0], x[0, 200] = tiny, -tiny
        y1, y0 = _both(bf16, x, wq, ws, activation="none", out_dtype=torch.float32)
        ref = reference.blockwise_matmul(x, wq, ws, (128, 128), None, None, torch.float32, "none")
        assert_kernel_close(y1, ref, f"tiny {tiny}")
        if routed:
            assert torch.equal(y1, y0), tiny
    x = torch.full((1, 256), 2.0**-120, dtype=torch.bfloat16)  # every product tiny: exact reference
    y1, y0 = _both(bf16, x, wq, ws, activation="none", out_dtype=torch.float32)
    assert torch.equal(y1, y0)
    assert_kernel_close(
        y1, reference.blockwise_matmul(x, wq, ws, (128, 128), None, None, torch.float32, "none")
    )


@pytest.mark.parametrize(
    "case",
    ["fp32_x", "fp16_x", "e5m2_w", "m2", "bk256", "bn_any"],
)
def test_what_it_does_not_take_stays_bit_exact_with_avx2(bf16, case):
    """fp32 / fp16 x of W8A16 (not exact in bf16) and e5m2 weights of this small size keep the AVX2
    GEMV: ISA 2 changes nothing. M = 2 (ISA 2's buffered kernel), blocks of 256 along K and of 256
    along N are taken (and checked against the reference)."""
    k, n, block, wdtype, xdtype, m = 512, 96, (128, 128), E4M3, torch.bfloat16, 1
    if case == "fp32_x":
        xdtype = torch.float32
    elif case == "fp16_x":
        xdtype = torch.float16
    elif case == "e5m2_w":
        wdtype = E5M2
    elif case == "m2":
        m = 2
    elif case == "bk256":
        block = (128, 256)
    elif case == "bn_any":
        block = (256, 128)
    wq, ws = reference.quantize(torch.randn(n, k), block, wdtype, "fp32")
    x = torch.randn(m, k, dtype=xdtype)
    y1, y0 = _both(bf16, x, wq, ws, block, activation="none", out_dtype=torch.float32)
    ref = reference.blockwise_matmul(x, wq, ws, block, None, None, torch.float32, "none")
    assert_kernel_close(y1, ref, case)
    if case in ("fp32_x", "fp16_x", "e5m2_w"):
        assert torch.equal(y1, y0), case


def test_results_do_not_depend_on_the_thread_count(bf16):
    """Above GEMV_PAR_MIN both threads share the rows; each output has one owner."""
    wq, ws = reference.quantize(torch.randn(1024, 1024), (128, 128), E4M3, "fp32")
    x = torch.randn(1, 1024, dtype=torch.bfloat16)
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(_mm(x, wq, ws, activation="none", out_dtype=torch.float32))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0], out[1])
