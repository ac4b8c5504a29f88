"""Wrong KINDS of arguments (issue 17, item 12): each Python wrapper raises TypeError / ValueError
naming the argument, before torch's op schema parser sees it (which would raise a RuntimeError, or
silently read an int as a dtype code and True as 1). Non-dense tensors are refused by name by the
wrappers and by ``torch.ops.fp8.*`` alike.

The rule for integers in ``block_shape`` / ``block_m``: a Python int or a numpy integer, accepted by
the wrappers exactly as the ops' schema parser accepts them (``operator.index``: same value), so the
two entry points agree; bools, floats, tensors and ints outside int64 are refused.

What the ops cannot refuse (documented in docs/api.md): torch's parser converts ``out_dtype=5`` to
float16 and ``[True, 128]`` to ``[1, 128]`` before any of our code runs; called through
``torch.ops.fp8.*`` directly, those are the caller's responsibility (the wrappers refuse them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise import reference

E4M3 = torch.float8_e4m3fn
X = torch.randn(4, 256)
WQ, WS = (t[0] for t in reference.quantize(torch.randn(1, 256, 256), (128, 128), E4M3, "fp32"))
MQ, MS = reference.mxfp8_quantize(torch.randn(256, 256), E4M3)
GS = torch.tensor([4], dtype=torch.int32)
SPARSE = X.to_sparse()

# (call, exception, message pattern); every message names the argument.
WRAPPER_CASES = [
    (lambda: tfb.quantize(X, (1, 128), dtype="e4m3"), TypeError, "dtype: expected a torch.dtype"),
    (lambda: tfb.quantize(X, (1, 128), dtype=5), TypeError, "dtype: expected a torch.dtype"),
    (lambda: tfb.quantize(X, (1, 128), scale_format=None), TypeError, "scale_format: expected a str"),
    (lambda: tfb.quantize(X, None), ValueError, "block_shape: expected a pair"),
    (lambda: tfb.quantize(X, [1 << 63, 128]), ValueError, "block_shape: expected two ints within int64"),
    (lambda: tfb.quantize(X, [True, 128]), TypeError, "block_shape: expected two ints"),
    (lambda: tfb.quantize(X, [1.0, 128]), TypeError, "block_shape: expected two ints"),
    (lambda: tfb.quantize(SPARSE, (1, 128)), TypeError, "x: expected a dense"),
    (lambda: tfb.dequantize(WQ, WS, (128, 128), out_dtype=5), TypeError, "out_dtype: expected a torch.dtype"),
    (lambda: tfb.dequantize(WQ, WS, (128, 128), out_dtype="float32"), TypeError, "out_dtype: expected"),
    (lambda: tfb.dequantize(WQ, WS, [128, False]), TypeError, "block_shape: expected two ints"),
    (
        lambda: tfb.blockwise_matmul(X, WQ, WS, out_dtype="bfloat16"),
        TypeError,
        "out_dtype: expected a torch.dtype",
    ),
    (lambda: tfb.blockwise_matmul(X, WQ, WS, out_dtype=5), TypeError, "out_dtype: expected a torch.dtype"),
    (lambda: tfb.blockwise_matmul(X, WQ, WS, out_dtype=True), TypeError, "out_dtype: expected a torch.dtype"),
    (lambda: tfb.blockwise_matmul(X, WQ, WS, activation=None), TypeError, "activation: expected a str"),
    (lambda: tfb.blockwise_matmul(X, WQ, WS, activation=1), TypeError, "activation: expected a str"),
    (lambda: tfb.blockwise_matmul(X, WQ, WS, None), ValueError, "block_shape: expected a pair"),
    (
        lambda: tfb.blockwise_matmul(X, WQ, WS, [1 << 63, 128]),
        ValueError,
        "block_shape: expected two ints within",
    ),
    (
        lambda: tfb.blockwise_matmul(X, WQ, WS, [-(1 << 63) - 1, 128]),
        ValueError,
        "block_shape: expected two ints",
    ),
    (lambda: tfb.blockwise_matmul(X, WQ, WS, [True, 128]), TypeError, "block_shape: expected two ints"),
    (
        lambda: tfb.blockwise_matmul(X, WQ, WS, torch.tensor([128, 128])),
        ValueError,
        "block_shape: expected a pair",
    ),
    (lambda: tfb.blockwise_matmul(X, WQ, WS, [128, 64]), ValueError, "block_shape: block rows must be"),
    (lambda: tfb.blockwise_matmul(SPARSE, WQ, WS), TypeError, "x: expected a dense"),
    (lambda: tfb.blockwise_matmul(X, WQ, WS.to_sparse()), TypeError, "w_scale: expected a dense"),
    (
        lambda: tfb.blockwise_matmul(X, WQ, WS, bias=torch.randn(256).to_sparse()),
        TypeError,
        "bias: expected a dense",
    ),
    (lambda: tfb.blockwise_matmul(X.to_sparse_csr(), WQ, WS), TypeError, "x: expected a dense"),
    (lambda: tfb.mxfp8_quantize(X, "e4m3"), TypeError, "dtype: expected a torch.dtype"),
    (lambda: tfb.mxfp8_quantize(SPARSE), TypeError, "x: expected a dense"),
    (lambda: tfb.mxfp8_matmul(X, MQ, MS, out_dtype=5), TypeError, "out_dtype: expected a torch.dtype"),
    (lambda: tfb.mxfp8_matmul(SPARSE, MQ, MS), TypeError, "x: expected a dense"),
    (lambda: tfb.grouped_matmul(X, WQ[None], WS[None], GS, None), ValueError, "block_shape: expected a pair"),
    (
        lambda: tfb.grouped_matmul(X, WQ[None], WS[None], GS, [True, 128]),
        TypeError,
        "block_shape: expected two",
    ),
    (
        lambda: tfb.grouped_matmul(X, WQ[None], WS[None], GS, out_dtype=5),
        TypeError,
        "out_dtype: expected a torch",
    ),
    (
        lambda: tfb.grouped_matmul(X, WQ[None], WS[None], GS, activation=None),
        TypeError,
        "activation: expected a str",
    ),
    (lambda: tfb.grouped_matmul(SPARSE, WQ[None], WS[None], GS), TypeError, "x: expected a dense"),
    (lambda: tfb.grouped_matmul_transposed(X, X, GS, True), TypeError, "block_m: expected an int"),
    (lambda: tfb.grouped_matmul_transposed(X, X, GS, 128.0), TypeError, "block_m: expected an int"),
    (
        lambda: tfb.grouped_matmul_transposed(X, X, GS, out_dtype=5),
        TypeError,
        "out_dtype: expected a torch.dtype",
    ),
    (lambda: tfb.grouped_matmul_transposed(X, SPARSE, GS), TypeError, "dy: expected a dense"),
]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("call, exc, pattern", WRAPPER_CASES)
def test_wrappers_refuse_wrong_kinds_by_name(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# torch.ops.fp8.* with a non-dense tensor: our kernel at the sparse / mkldnn keys names the argument.
OPS = torch.ops.fp8
OP_CASES = [
    (lambda: OPS.quantize(SPARSE, [1, 128]), "x"),
    (lambda: OPS.dequantize(WQ, WS.to_sparse(), [128, 128]), "scale"),
    (lambda: OPS.blockwise_matmul(SPARSE, WQ, WS), "x"),
    (lambda: OPS.blockwise_matmul(X, WQ, WS, bias=torch.randn(256).to_sparse()), "bias"),
    (lambda: OPS.blockwise_matmul(X.to_sparse_csr(), WQ, WS), "x"),
    (lambda: OPS.blockwise_matmul(X.to_mkldnn(), WQ, WS), "x"),
    (lambda: OPS.mxfp8_quantize(SPARSE), "x"),
    (lambda: OPS.mxfp8_matmul(X, MQ, MS.to_sparse()), "w_scale"),
    (lambda: OPS.grouped_matmul(X, WQ[None], WS[None], GS.to_sparse()), "group_sizes"),
    (lambda: OPS.grouped_matmul_transposed(SPARSE, X, GS), "x"),
]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("call, name", OP_CASES)
def test_ops_refuse_non_dense_tensors_by_name(call, name):
    with pytest.raises(TypeError, match=f"^{name}: expected a dense"):
        call()


def test_numpy_integers_are_accepted_alike_by_wrappers_and_ops():
    """np.int64 block sizes: the ops' schema parser takes them (operator.index), so the wrappers
    take them too, with the same result as Python ints."""
    block = [np.int64(128), np.int64(128)]
    want = tfb.blockwise_matmul(X, WQ, WS, [128, 128])
    assert torch.equal(tfb.blockwise_matmul(X, WQ, WS, block), want)
    assert torch.equal(OPS.blockwise_matmul(X, WQ, WS, block), want)
    q, s = tfb.quantize(X, (np.int32(1), np.int64(128)))
    assert torch.equal(q.view(torch.uint8), tfb.quantize(X, (1, 128))[0].view(torch.uint8))
    gs = torch.tensor([2, 2], dtype=torch.int32)
    assert torch.equal(
        tfb.grouped_matmul_transposed(X, X, gs, np.int64(128)), tfb.grouped_matmul_transposed(X, X, gs, 128)
    )
