"""Triton quantize / dequantize kernels under TRITON_INTERPRET=1: bit-exact against the reference.

The interpreter rounds fp32 -> fp8 casts wrongly (triton#8322, shared/NOTES.md), so under it the
launchers store float32 values and torch does the final cast (see backends/triton/quantize.py):
these tests check the kernels' amax / scale / ue8m0 / division / clamp / nan logic bit for bit;
the in-kernel cast is proven by offline compilation (test_triton_lowering.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_params

from torch_fp8_blockwise import reference

pytestmark = pytest.mark.parametrize("backend", backend_params("triton", op="quantize"))

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _backend():
    from torch_fp8_blockwise.backends import triton as backend

    return backend


def _assert_same_quant(got, ref, what):
    (q, s), (rq, rs) = got, ref
    assert q.dtype == rq.dtype and s.dtype == rs.dtype, what
    assert q.shape == rq.shape and s.shape == rs.shape, what
    torch.testing.assert_close(s, rs, rtol=0, atol=0, msg=f"{what}: scales differ")
    # Compare the fp8 bit patterns: equal values, equal nan positions.
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)), f"{what}: q differs"


def _input(shape, dtype, special=True):
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[-1])  # wide dynamic range across groups
    if special:
        x.view(-1)[3] = float("inf")
        x.view(-1)[7] = float("-inf")
        x.view(-1)[11] = float("nan")
        x[..., : shape[-2] // 2, 130:150] = 0.0  # an all-zero stretch: eps scale
    return x.to(dtype)


@pytest.mark.parametrize("block", [(1, 128), (1, 256), (1, 512), (128, 128), (256, 512), (512, 128)])
@pytest.mark.parametrize(
    "dtype,fmt,x_dtype",
    [(E4M3, "fp32", torch.float32), (E4M3, "ue8m0", torch.bfloat16), (E5M2, "fp32", torch.float16)],
)
def test_quantize_bit_exact(backend, block, dtype, fmt, x_dtype):
    x = _input((2, 300, 1100), x_dtype)
    got = _backend().quantize(x, block, dtype, fmt)
    _assert_same_quant(got, reference.quantize(x, block, dtype, fmt), f"{block} {dtype} {fmt}")


def test_group_quantize_strided_rows(backend):
    """Rows with a stride (a slice of a wider activation) are read in place."""
    from torch_fp8_blockwise.backends.triton.quantize import group_quantize

    wide = torch.randn(37, 640)
    x = wide[:, :500]
    assert not x.is_contiguous()
    got = group_quantize(x, 128, E4M3, "fp32")
    _assert_same_quant(
        got, tuple(t[0] for t in reference.quantize(x[None], (1, 128), E4M3, "fp32")), "strided"
    )


@pytest.mark.parametrize("block", [(1, 128), (128, 128), (512, 256)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_matches_reference(backend, block, out_dtype):
    q, s = reference.quantize(torch.randn(2, 260, 700), block, E4M3, "fp32")
    got = _backend().dequantize(q, s, block, out_dtype)
    torch.testing.assert_close(got, reference.dequantize(q, s, block, out_dtype), rtol=0, atol=0)


def test_quantize_through_op(backend):
    """torch.ops.fp8.quantize forced onto this backend (batch dims flattened by ops.py)."""
    import torch_fp8_blockwise as tfb

    x = _input((3, 2, 40, 300), torch.bfloat16, special=False)
    with tfb.use_backend(backend):
        got = tfb.quantize(x, (1, 128), E4M3, "ue8m0")
    _assert_same_quant(got, reference.quantize(x, (1, 128), E4M3, "ue8m0"), "op")
