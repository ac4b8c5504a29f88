"""Bad input: every case raises TypeError/ValueError naming the argument, the expectation and what came.

Validation runs before dispatch, so these hold for every backend; the fake (meta) implementations
run the same checks, so torch.compile reports the same errors at trace time.
"""

from __future__ import annotations

import pytest
import torch

import torch_fp8_blockwise as tfb

E4M3 = torch.float8_e4m3fn
N, K = 256, 384


def _w():
    return tfb.quantize(torch.randn(N, K), (128, 128))


W, WS = _w()
X = torch.randn(3, K, dtype=torch.bfloat16)
XQ, XS = tfb.quantize(X.float(), (1, 128))
MW, MWS = tfb.mxfp8_quantize(torch.randn(N, K))
MXQ, MXS = tfb.mxfp8_quantize(torch.randn(3, K))


def mm(**over):
    args = {"x": X, "w": W, "w_scale": WS}
    args.update(over)
    return lambda: tfb.blockwise_matmul(**args)


def mx(**over):
    args = {"x": X, "w": MW, "w_scale": MWS}
    args.update(over)
    return lambda: tfb.mxfp8_matmul(**args)


# (id, call, exception, regex that must appear in the message)
CASES = [
    # blockwise_matmul
    ("x-not-tensor", mm(x=[[1.0] * K]), TypeError, r"x: expected a torch.Tensor, got list"),
    (
        "x-int-dtype",
        mm(x=torch.ones(3, K, dtype=torch.int32)),
        TypeError,
        r"x: expected dtype in .*got torch.int32",
    ),
    (
        "x-float64",
        mm(x=torch.ones(3, K, dtype=torch.float64)),
        TypeError,
        r"x: expected dtype .*got torch.float64",
    ),
    ("x-0d", mm(x=torch.tensor(1.0)), ValueError, r"x: expected at least 1 dims \[..., K\], got shape \(\)"),
    (
        "k-mismatch",
        mm(x=torch.randn(3, K + 1)),
        ValueError,
        rf"x: expected last dim K={K}.*got shape \(3, {K + 1}\)",
    ),
    (
        "w-not-fp8",
        mm(w=torch.randn(N, K)),
        TypeError,
        r"w: expected dtype in \(torch.float8_e4m3fn, torch.float8_e5m2\), got torch.float32",
    ),
    ("w-3d", mm(w=W[None]), ValueError, r"w: expected 2 dims \[N, K\].*got shape \(1, 256, 384\)"),
    (
        "w-transposed",
        mm(w=W.T.contiguous().T),
        ValueError,
        r"w: expected a contiguous row-major \[N, K\] weight, got strides \(1, 256\)",
    ),
    (
        "w-scale-shape",
        mm(w_scale=WS[:1]),
        ValueError,
        r"w_scale: expected shape \(2, 3\) \(cdiv\(N=256, 128\), cdiv\(K=384, 128\)\), got \(1, 3\)",
    ),
    (
        "w-scale-transposed-grid",
        mm(w_scale=WS.T.contiguous()),
        ValueError,
        r"w_scale: expected shape \(2, 3\).*got \(3, 2\)",
    ),
    (
        "w-scale-dtype",
        mm(w_scale=WS.bfloat16()),
        TypeError,
        r"w_scale: expected dtype in \(torch.float32\), got torch.bfloat16",
    ),
    (
        "block-shape-64",
        mm(block_shape=(64, 128)),
        ValueError,
        r"block_shape: block rows must be one of \(128, 256, 512\).*got \[64, 128\]",
    ),
    ("block-shape-len", mm(block_shape=(128,)), ValueError, r"block_shape: expected a pair \[rows, cols\]"),
    (
        "block-shape-scale-mismatch",
        mm(block_shape=(128, 256)),
        ValueError,
        r"w_scale: expected shape \(2, 2\)",
    ),
    ("fp8-x-without-scale", mm(x=XQ), ValueError, r"x_scale: required when x is fp8"),
    ("x-scale-for-bf16-x", mm(x_scale=XS), ValueError, r"x_scale: only for fp8 x, but x is torch.bfloat16"),
    (
        "x-scale-shape",
        mm(x=XQ, x_scale=XS[:, :2]),
        ValueError,
        r"x_scale: expected shape \(3, 3\).*got \(3, 2\)",
    ),
    (
        "x-scale-dtype",
        mm(x=XQ, x_scale=XS.half()),
        TypeError,
        r"x_scale: expected dtype in \(torch.float32\), got torch.float16",
    ),
    (
        "fp8-x-activation-none",
        mm(x=XQ, x_scale=XS, activation="none"),
        ValueError,
        r"activation: 'none' keeps x at its own precision",
    ),
    (
        "activation-unknown",
        mm(activation="static"),
        ValueError,
        r"activation: expected one of \('dynamic', 'none'\), got 'static'",
    ),
    (
        "bias-shape",
        mm(bias=torch.randn(N + 1)),
        ValueError,
        r"bias: expected shape \(256,\) \(N,\), got \(257,\)",
    ),
    (
        "bias-dtype",
        mm(bias=torch.ones(N, dtype=torch.int64)),
        TypeError,
        r"bias: expected dtype .*got torch.int64",
    ),
    ("out-dtype-fp8", mm(out_dtype=E4M3), TypeError, r"out_dtype: expected one of .*got torch.float8_e4m3fn"),
    ("out-dtype-int", mm(out_dtype=torch.int32), TypeError, r"out_dtype: expected one of .*got torch.int32"),
    (
        "device-mismatch",
        mm(x=X.to("meta")),
        ValueError,
        r"x: expected a tensor on cpu \(the device of w\)|w: expected a tensor on meta",
    ),
    # quantize
    ("quantize-1d", lambda: tfb.quantize(torch.randn(K)), ValueError, r"x: expected at least 2 dims"),
    (
        "quantize-int",
        lambda: tfb.quantize(torch.ones(2, K, dtype=torch.int8)),
        TypeError,
        r"x: expected dtype .*got torch.int8",
    ),
    (
        "quantize-dtype",
        lambda: tfb.quantize(X, dtype=torch.bfloat16),
        TypeError,
        r"dtype: expected one of \(torch.float8_e4m3fn, torch.float8_e5m2\), got torch.bfloat16",
    ),
    (
        "quantize-format",
        lambda: tfb.quantize(X, scale_format="e8m0"),
        ValueError,
        r"scale_format: expected one of \('fp32', 'ue8m0'\), got 'e8m0'",
    ),
    (
        "quantize-block-rows",
        lambda: tfb.quantize(X, (2, 128)),
        ValueError,
        r"block rows must be one of \(1, 128, 256, 512\)",
    ),
    (
        "quantize-block-cols",
        lambda: tfb.quantize(X, (1, 100)),
        ValueError,
        r"block cols one of \(128, 256, 512\); got \[1, 100\]",
    ),
    (
        "quantize-block-type",
        lambda: tfb.quantize(X, (1.0, 128)),
        TypeError,
        r"block_shape: expected two ints",
    ),
    # dequantize
    (
        "dequantize-not-fp8",
        lambda: tfb.dequantize(X, XS, (1, 128)),
        TypeError,
        r"q: expected dtype in \(torch.float8_e4m3fn",
    ),
    (
        "dequantize-scale-shape",
        lambda: tfb.dequantize(XQ, XS[:, :1], (1, 128)),
        ValueError,
        r"scale: expected shape \(3, 3\) \(q \(3, 384\) tiled by \[1, 128\]\), got \(3, 1\)",
    ),
    (
        "dequantize-out-dtype",
        lambda: tfb.dequantize(XQ, XS, (1, 128), torch.int32),
        TypeError,
        r"out_dtype: expected one of",
    ),
    (
        "dequantize-scale-dtype",
        lambda: tfb.dequantize(XQ, XS.double(), (1, 128)),
        TypeError,
        r"scale: expected dtype in \(torch.float32\), got torch.float64",
    ),
    # mxfp8
    (
        "mx-quantize-k",
        lambda: tfb.mxfp8_quantize(torch.randn(3, 100)),
        ValueError,
        r"x: MXFP8 needs K to be a positive multiple of 32.*got K=100",
    ),
    ("mx-quantize-dtype", lambda: tfb.mxfp8_quantize(X, torch.float16), TypeError, r"dtype: expected one of"),
    (
        "mx-scale-float",
        mx(w_scale=MWS.float()),
        TypeError,
        r"w_scale: expected dtype in \(torch.uint8\), got torch.float32",
    ),
    (
        "mx-scale-shape",
        mx(w_scale=MWS[:, :3]),
        ValueError,
        r"w_scale: expected shape \(256, 12\).*got \(256, 3\)",
    ),
    ("mx-fp8-x-no-scale", mx(x=MXQ), ValueError, r"x_scale: required when x is fp8"),
    (
        "mx-x-scale-float",
        mx(x=MXQ, x_scale=MXS.float()),
        TypeError,
        r"x_scale: expected dtype in \(torch.uint8\)",
    ),
    (
        "mx-k-not-32",
        lambda: tfb.mxfp8_matmul(torch.randn(2, 40), MW[:, :40].contiguous(), MWS[:, :1]),
        ValueError,
        r"w: MXFP8 needs K .*got K=40",
    ),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


def test_use_backend_unknown_name():
    with pytest.raises(ValueError, match=r"use_backend: expected one of .*got 'cuda'"):
        with tfb.use_backend("cuda"):
            pass


def test_device_without_backend_says_why():
    from torch_fp8_blockwise import _dispatch

    with pytest.raises(tfb.BackendUnavailable, match=r"no fp8 backend for device type 'meta'"):
        _dispatch.implementation("blockwise_matmul", torch.device("meta"))


def test_non_contiguous_activation_and_scales_work():
    x = torch.randn(K, 5).T  # [5, K] with strides (1, 5): an activation may have any strides
    ws_t = WS.T.contiguous().T  # same values, column-major (DeepGEMM's TMA-aligned scale layout)
    y = tfb.blockwise_matmul(x, W, ws_t, out_dtype=torch.float32)
    ref = tfb.blockwise_matmul(x.contiguous(), W, WS, out_dtype=torch.float32)
    # Same math, different GEMM blocking for the strided x: only fp32 rounding order differs.
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-3)


def test_backward_raises_clear_error():
    x = X.float().requires_grad_()
    y = tfb.blockwise_matmul(x, W, WS)
    with pytest.raises(RuntimeError, match=r"fp8::blockwise_matmul is inference-only and has no gradient"):
        y.sum().backward()
