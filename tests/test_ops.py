"""Numerics of every op on every backend available here, against the pure-torch reference.

Written once, parametrized over backends x shapes x dtypes. Inputs are quantized with the reference
so every backend sees the same bits; two budgets are checked separately (torch_fp8_blockwise.testing):
kernel error vs the reference (tight) and quantization loss vs the unquantized product (SQNR).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import backend_params

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise import reference
from torch_fp8_blockwise.testing import SQNR_FLOOR_DB, assert_kernel_close, sqnr, sqnr_floor

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2

# (M, N, K): odd M, N and K that are not multiples of the block, and one 4544-like size (slow).
FAST_SHAPES = [(1, 128, 128), (2, 576, 1000), (13, 1000, 576), (67, 128, 1000), (128, 576, 128)]
SLOW_SHAPES = [(300, 1000, 576), (300, 4544 // 4, 1000), (128, 576, 4544)]
MODES = ["w8a8_dynamic", "w8a8_fp8_x", "w8a16"]

# Weight dtype, scale format, block shape, output dtype and bias rotate across the shape x mode
# cases so each value meets every mode without a full cross product (interpreters are slow).
VARIANTS = [
    (E4M3, "fp32", (128, 128), torch.float32, False),
    (E4M3, "ue8m0", (128, 128), torch.bfloat16, True),
    (E5M2, "fp32", (128, 128), torch.float32, True),
    (E4M3, "fp32", (256, 128), torch.float16, False),
    (E5M2, "ue8m0", (128, 256), torch.float32, False),
]


def _cases(shapes):
    out = []
    for i, ((m, n, k), mode) in enumerate(itertools.product(shapes, MODES)):
        out.append((m, n, k, mode, *VARIANTS[i % len(VARIANTS)]))
    return out


def _ids(case) -> str:
    m, n, k, mode, wdtype, fmt, block, out_dtype, bias = case
    return (
        f"{m}x{n}x{k}-{mode}-{str(wdtype)[-6:]}-{fmt}-b{block[0]}x{block[1]}-"
        f"{str(out_dtype)[6:]}{'-bias' if bias else ''}"
    )


CASES = [pytest.param(*c, id=_ids(c)) for c in _cases(FAST_SHAPES)] + [
    pytest.param(*c, id=_ids(c), marks=pytest.mark.slow) for c in _cases(SLOW_SHAPES)
]


def _matmul_inputs(m, n, k, mode, wdtype, fmt, block, bias, lead=()):
    w_true = torch.randn(n, k)
    wq, ws = reference.quantize(w_true, block, wdtype, fmt)
    x_true = torch.randn(*lead, m, k, dtype=torch.bfloat16)
    kwargs = {"bias": torch.randn(n) if bias else None}
    x = x_true
    if mode == "w8a8_fp8_x":
        x, kwargs["x_scale"] = reference.quantize(x_true.float(), (1, block[1]), E4M3, fmt)
    elif mode == "w8a16":
        kwargs["activation"] = "none"
    exact = x_true.float() @ w_true.T + (kwargs["bias"] if bias else 0)
    return x, wq, ws, kwargs, exact


@pytest.mark.parametrize("backend", backend_params(op="blockwise_matmul"))
@pytest.mark.parametrize("m,n,k,mode,wdtype,fmt,block,out_dtype,bias", CASES)
def test_blockwise_matmul(backend, m, n, k, mode, wdtype, fmt, block, out_dtype, bias):
    x, wq, ws, kwargs, exact = _matmul_inputs(m, n, k, mode, wdtype, fmt, block, bias)
    with tfb.use_backend("reference"):
        ref = tfb.blockwise_matmul(x, wq, ws, block, out_dtype=out_dtype, **kwargs)
    with tfb.use_backend(backend):
        y = tfb.blockwise_matmul(x, wq, ws, block, out_dtype=out_dtype, **kwargs)
    assert_kernel_close(y, ref, f"{backend} blockwise_matmul")
    assert sqnr(y, exact) >= sqnr_floor(wdtype, fmt)


@pytest.mark.parametrize("backend", backend_params(op="blockwise_matmul"))
def test_blockwise_matmul_batch_dims_and_empty(backend):
    x, wq, ws, kwargs, _ = _matmul_inputs(
        5, 200, 300, "w8a8_dynamic", E4M3, "fp32", (128, 128), True, lead=(2,)
    )
    with tfb.use_backend("reference"):
        ref = tfb.blockwise_matmul(x, wq, ws, **kwargs)
    with tfb.use_backend(backend):
        y = tfb.blockwise_matmul(x, wq, ws, **kwargs)
        empty = tfb.blockwise_matmul(x[:, :0], wq, ws, **kwargs)
        one = tfb.blockwise_matmul(x[0, 0], wq, ws, **kwargs)
    assert y.shape == (2, 5, 200) and y.dtype == torch.bfloat16
    assert_kernel_close(y, ref)
    assert empty.shape == (2, 0, 200) and empty.dtype == torch.bfloat16
    assert_kernel_close(one, ref[0, 0])


QUANT_CASES = [
    ((2, 13, 1000), (1, 128), E4M3, "fp32"),
    ((2, 13, 1000), (1, 256), E5M2, "ue8m0"),
    ((576, 1000), (128, 128), E4M3, "ue8m0"),
    ((300, 200), (256, 128), E5M2, "fp32"),
    ((1000, 576), (128, 512), E4M3, "fp32"),
]


def _assert_same_values(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0, equal_nan=True, msg=what)


@pytest.mark.parametrize("backend", backend_params(op="quantize"))
@pytest.mark.parametrize("shape,block,dtype,fmt", QUANT_CASES, ids=str)
def test_quantize_matches_reference_bits(backend, shape, block, dtype, fmt):
    x = torch.randn(shape) * 3
    with tfb.use_backend("reference"):
        q_ref, s_ref = tfb.quantize(x, block, dtype, fmt)
    with tfb.use_backend(backend):
        q, s = tfb.quantize(x, block, dtype, fmt)
    _assert_same_values(s, s_ref, "scale")
    _assert_same_values(q, q_ref, "q")


@pytest.mark.parametrize("backend", backend_params(op="quantize"))
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=str)
def test_quantize_special_values(backend, dtype):
    """All-zero block, +-inf, nan, huge and tiny values: the documented behaviour on every backend."""
    x = torch.randn(4, 256)
    x[0] = 0.0  # an all-zero 1x128 block (and a second one)
    x[1, 3], x[1, 200] = float("inf"), -float("inf")
    x[2, 5] = float("nan")
    x[3, :128] = 1e-30  # tiny but non-zero
    x[3, 128:] = 3e38  # near float32 max: the scale must stay finite
    with tfb.use_backend(backend):
        q, s = tfb.quantize(x, (1, 128), dtype, "fp32")
    big = tfb.fp8_max(dtype)
    qf = q.float()
    assert torch.isfinite(s).all() and (s > 0).all()
    assert (qf[0] == 0).all()
    assert qf[1, 3] == big and qf[1, 200] == -big
    finite_row1 = torch.ones(256, dtype=torch.bool)
    finite_row1[[3, 200]] = False
    # inf does not set the scale: the finite values of the block keep their resolution.
    assert qf[1, finite_row1].abs().max() > big / 2
    assert torch.isnan(qf[2, 5]) and torch.isnan(qf[2]).sum() == 1
    assert not torch.isnan(qf[[0, 1, 3]]).any()
    assert (qf[3, 128:].abs() == big).all()
    assert torch.allclose(qf[3, :128] * s[3, 0], x[3, :128], rtol=0.07)


@pytest.mark.parametrize("backend", backend_params(op="dequantize"))
@pytest.mark.parametrize("shape,block,dtype,fmt", QUANT_CASES, ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dequantize_matches_reference(backend, shape, block, dtype, fmt, out_dtype):
    x = torch.randn(shape)
    q, s = reference.quantize(x, block, dtype, fmt)
    ref = reference.dequantize(q, s, block, out_dtype)
    with tfb.use_backend(backend):
        y = tfb.dequantize(q, s, block, out_dtype)
    _assert_same_values(y, ref, "dequantize")
    assert sqnr(y, x) >= sqnr_floor(dtype, fmt)


@pytest.mark.parametrize("backend", backend_params(op="mxfp8_quantize"))
@pytest.mark.parametrize("shape", [(1, 32), (13, 96), (2, 7, 1024)], ids=str)
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=str)
def test_mxfp8_quantize_matches_reference_bits(backend, shape, dtype):
    x = torch.randn(shape) * 5
    with tfb.use_backend("reference"):
        q_ref, s_ref = tfb.mxfp8_quantize(x, dtype)
    with tfb.use_backend(backend):
        q, s = tfb.mxfp8_quantize(x, dtype)
    assert s.dtype == torch.uint8 and s.shape == (*shape[:-1], shape[-1] // 32)
    assert torch.equal(s, s_ref)
    _assert_same_values(q, q_ref, "q")


MX_CASES = [(1, 128, 64), (13, 200, 96), (67, 64, 1024), (128, 576, 256)]


@pytest.mark.parametrize("backend", backend_params(op="mxfp8_matmul"))
@pytest.mark.parametrize("m,n,k", MX_CASES, ids=str)
@pytest.mark.parametrize("fp8_x", [False, True], ids=["dynamic", "fp8_x"])
def test_mxfp8_matmul(backend, m, n, k, fp8_x):
    w_true, x_true = torch.randn(n, k), torch.randn(m, k)
    wq, ws = reference.mxfp8_quantize(w_true, E4M3)
    bias = torch.randn(n)
    x, kwargs = x_true, {}
    if fp8_x:
        x, kwargs["x_scale"] = reference.mxfp8_quantize(x_true, E4M3)
    with tfb.use_backend("reference"):
        ref = tfb.mxfp8_matmul(x, wq, ws, bias=bias, out_dtype=torch.float32, **kwargs)
    with tfb.use_backend(backend):
        y = tfb.mxfp8_matmul(x, wq, ws, bias=bias, out_dtype=torch.float32, **kwargs)
    assert_kernel_close(y, ref, f"{backend} mxfp8_matmul")
    assert sqnr(y, x_true @ w_true.T + bias) >= SQNR_FLOOR_DB
