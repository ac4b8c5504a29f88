"""The reference itself against independent, element-by-element statements of the contract."""

from __future__ import annotations

import math

import pytest
import torch

from torch_fp8_blockwise import formats, reference

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def test_matmul_equals_the_written_formula_in_float64():
    """y[m,n] = sum_kb (sum_{k in kb} xq*wq) * xs[m,kb] * ws[n//bn,kb], computed element by element."""
    m, n, k, bn, bk = 3, 130, 260, 128, 128
    wq, ws = reference.quantize(torch.randn(n, k), (bn, bk), E4M3, "fp32")
    xq, xs = reference.quantize(torch.randn(m, k), (1, bk), E4M3, "fp32")
    bias = torch.randn(n)
    y = reference.blockwise_matmul(xq, wq, ws, (bn, bk), xs, bias, torch.float32, "dynamic")
    xd, wd = xq.double(), wq.double()
    for i in range(m):
        for j in (0, 1, 127, 128, 129):
            total = 0.0
            for kb in range(math.ceil(k / bk)):
                part = sum(xd[i, c].item() * wd[j, c].item() for c in range(kb * bk, min(k, (kb + 1) * bk)))
                total += part * xs[i, kb].item() * ws[j // bn, kb].item()
            assert y[i, j].item() == pytest.approx(total + bias[j].item(), rel=1e-5, abs=1e-5)


def test_w8a16_is_x_times_dequantized_weight():
    wq, ws = reference.quantize(torch.randn(200, 300), (128, 128), E4M3, "fp32")
    x = torch.randn(5, 300, dtype=torch.bfloat16)
    y = reference.blockwise_matmul(x, wq, ws, (128, 128), None, None, torch.float32, "none")
    w = torch.stack(
        [torch.stack([wq[r, c].float() * ws[r // 128, c // 128] for c in range(300)]) for r in range(200)]
    )
    torch.testing.assert_close(y, x.float() @ w.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("fmt", ["fp32", "ue8m0"])
def test_quantize_scale_rule_and_round_trip(dtype, fmt):
    x = torch.randn(300, 1000) * 10
    q, s = reference.quantize(x, (128, 128), dtype, fmt)
    assert s.shape == (3, 8) and s.dtype == torch.float32
    big = formats.fp8_max(dtype)
    amax = x[128:256, 256:384].abs().max()
    expected = amax / big
    if fmt == "ue8m0":
        expected = 2.0 ** math.ceil(math.log2(expected.item()))
    assert s[1, 2].item() == pytest.approx(float(expected), rel=1e-7)
    assert q.float().abs().max() <= big
    # Per element, dequantization is within half an fp8 step (relative 2**-4 for e4m3, 2**-3 e5m2).
    deq = q.float() * reference.expand_scale(s, (128, 128), 300, 1000)
    rel_step = 2.0 ** -(4 if dtype == E4M3 else 3)
    normal = x.abs() > big * s.max() * 2.0**-6  # far from the subnormal range of any block
    assert ((deq - x).abs() <= rel_step * x.abs() + 1e-12)[normal].all()


def test_ragged_edges_behave_as_zero_padded():
    x = torch.randn(200, 1000)
    padded = torch.zeros(256, 1024)
    padded[:200, :1000] = x
    q, s = reference.quantize(x, (128, 128), E4M3, "fp32")
    qp, sp = reference.quantize(padded, (128, 128), E4M3, "fp32")
    assert torch.equal(s, sp)
    assert torch.equal(q.float(), qp[:200, :1000].float())


@pytest.mark.parametrize("shape", [(0, 200), (3, 0), (2, 0, 130)], ids=str)
def test_quantize_of_an_empty_tensor_has_empty_outputs(shape):
    """Zero rows or columns (an MoE group with no tokens; found by hypothesis in the grouped tests
    under torch 2.9, whose F.pad rejects a zero-size dim): empty q and a scale grid of cdiv sizes."""
    x = torch.randn(shape)
    q, s = reference.quantize(x, (1, 128), E4M3, "fp32")
    *lead, rows, cols = shape
    assert q.shape == x.shape and q.dtype == E4M3
    assert s.shape == (*lead, rows, math.ceil(cols / 128))
    xq, xs = reference.quantize_activation(x, 128)
    assert xq.shape == x.shape and xs.shape == s.shape


def test_round_scale_ue8m0_is_exact_ceil_power_of_two():
    vals = torch.cat(
        [torch.rand(1000) * 10.0 ** torch.randint(-12, 12, (1000,)), 2.0 ** torch.arange(-40.0, 40.0)]
    )
    got = formats.round_scale_ue8m0(vals)
    want = torch.tensor([2.0 ** math.ceil(math.log2(v)) for v in vals.double().tolist()], dtype=torch.float32)
    # math.log2 in float64 is exact at powers of two, so these agree bit for bit.
    assert torch.equal(got, want)


def test_e8m0_encode_decode():
    bits = torch.arange(256, dtype=torch.uint8)
    vals = formats.e8m0_to_float(bits)
    assert vals[127] == 1.0 and vals[128] == 2.0 and vals[0] == 2.0**-127 and vals[254] == 2.0**127
    assert torch.isnan(vals[255])
    assert torch.equal(formats.float_to_e8m0(vals[:255]), bits[:255])


def test_activation_scales_match_vllm_per_token_group_convention():
    """vLLM per_token_group_quant_fp8: scale = max(amax, 1e-10) / 448 per 1 x group_size group."""
    x = torch.randn(4, 256)
    x[1, :128] = 0
    _, s = reference.quantize(x, (1, 128), E4M3, "fp32")
    assert s.shape == (4, 2)
    assert s[0, 1] == x[0, 128:].abs().max() / 448.0
    assert s[1, 0] == torch.tensor(1e-10) / 448.0


def test_mxfp8_is_blockwise_with_1x32_groups():
    x, w = torch.randn(5, 64), torch.randn(7, 64)
    xq, xs = reference.mxfp8_quantize(x, E4M3)
    wq, ws = reference.mxfp8_quantize(w, E4M3)
    assert xs.dtype == torch.uint8 and xs.shape == (5, 2)
    y = reference.mxfp8_matmul(xq, wq, ws, xs, None, torch.float32)
    xd = xq.float() * formats.e8m0_to_float(xs).repeat_interleave(32, 1)
    wd = wq.float() * formats.e8m0_to_float(ws).repeat_interleave(32, 1)
    torch.testing.assert_close(y, xd @ wd.T, rtol=1e-5, atol=1e-5)
