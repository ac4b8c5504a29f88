"""integrations.vllm: vLLM's argument conventions on our ops, checked against the reference and an
independent re-statement of vLLM's per-token-group rule (the plugin inside vLLM: test_vllm_plugin.py)."""

from __future__ import annotations

import pytest
import torch

from torch_fp8_blockwise import blockwise_matmul, reference
from torch_fp8_blockwise.formats import round_scale_ue8m0
from torch_fp8_blockwise.integrations.vllm import (
    per_token_group_quant_fp8,
    w8a8_block_fp8_matmul,
    w8a8_triton_block_scaled_mm,
)
from torch_fp8_blockwise.testing import assert_kernel_close, sqnr, sqnr_floor

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _vllm_rule(x: torch.Tensor, g: int, dtype: torch.dtype, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's per-token-group rule restated for finite x: x_s = max(amax, 1e-10) / fp8_max
    (power of two rounded up with ue8m0), x_q = clamp(x / x_s)."""
    fmax = torch.finfo(dtype).max
    groups = x.float().reshape(*x.shape[:-1], -1, g)
    s = groups.abs().amax(-1).clamp(min=1e-10) / fmax
    if ue8m0:
        s = round_scale_ue8m0(s)
    q = (groups / s[..., None]).clamp(-fmax, fmax).to(dtype).reshape(x.shape)
    return q, s


@pytest.mark.parametrize(
    "shape, g, dtype, ue8m0, x_dtype",
    [
        ((5, 256), 128, E4M3, False, torch.bfloat16),
        ((2, 3, 512), 256, E4M3, True, torch.float32),
        ((7, 1024), 512, E5M2, False, torch.float16),
        ((1, 128), 128, None, None, torch.bfloat16),
    ],
)
def test_per_token_group_quant_matches_vllm_rule(shape, g, dtype, ue8m0, x_dtype) -> None:
    x = (torch.randn(shape) * 3).to(x_dtype)
    x_q, x_s = per_token_group_quant_fp8(x, g, dtype=dtype, use_ue8m0=ue8m0)
    want_q, want_s = _vllm_rule(x, g, dtype or E4M3, bool(ue8m0))
    assert x_q.shape == x.shape and x_q.dtype == (dtype or E4M3)
    assert x_s.shape == (*shape[:-1], shape[-1] // g) and x_s.dtype == torch.float32 and x_s.is_contiguous()
    assert torch.equal(x_s, want_s)
    assert torch.equal(x_q.view(torch.uint8), want_q.view(torch.uint8))


@pytest.mark.parametrize("shape", [(6, 384), (2, 5, 256)])
def test_column_major_scales_same_values_column_major_strides(shape) -> None:
    x = torch.randn(shape)
    _, row = per_token_group_quant_fp8(x, 128)
    _, col = per_token_group_quant_fp8(x, 128, column_major_scales=True)
    assert torch.equal(col, row)
    m, groups = shape[-2], shape[-1] // 128
    assert col.stride()[-2:] == (1, m) and col.transpose(-1, -2).is_contiguous()
    assert groups > 1  # otherwise the two layouts coincide and the test proves nothing


@pytest.mark.parametrize("num_tokens", [7, 33])
@pytest.mark.parametrize("d", [512, 1536])
@pytest.mark.parametrize("group_size", [64, 128, 512])
@pytest.mark.parametrize("column_major", [True, False])
@pytest.mark.parametrize("tma_aligned", [True, False])
def test_vllm_test_grid(num_tokens, d, group_size, column_major, tma_aligned) -> None:
    """vLLM's test_per_token_group_quant_fp8 grid (its group sizes and layout flags, smaller M and K):
    values equal to vLLM's rule bit for bit, and the strides vLLM's test checks."""
    torch.manual_seed(0)
    x = torch.rand(num_tokens, d, dtype=torch.bfloat16)
    x_q, x_s = per_token_group_quant_fp8(
        x, group_size, column_major_scales=column_major, tma_aligned_scales=tma_aligned
    )
    want_q, want_s = _vllm_rule(x, group_size, E4M3, False)
    assert torch.equal(x_s, want_s) and torch.equal(x_q.view(torch.uint8), want_q.view(torch.uint8))
    if column_major:
        aligned_m = -(-num_tokens // 4) * 4 if tma_aligned else num_tokens  # vLLM get_tma_aligned_size(m, 4)
        assert x_s.stride() == (1, aligned_m)
    else:
        assert x_s.is_contiguous()


@pytest.mark.parametrize("shape", [(2, 5, 256), (3, 8, 384)])
def test_tma_aligned_scales_3d_strides_like_vllm(shape) -> None:
    """vLLM lays a 3-D TMA-aligned x_s [B, M, G] out with strides (G * M4, 1, M4), M4 = M rounded up
    to 4; the padding rows are zeros."""
    x = torch.randn(shape)
    _, row = per_token_group_quant_fp8(x, 128)
    _, tma = per_token_group_quant_fp8(x, 128, column_major_scales=True, tma_aligned_scales=True)
    m, groups = shape[1], shape[2] // 128
    m4 = -(-m // 4) * 4
    assert torch.equal(tma, row) and tma.stride() == (groups * m4, 1, m4)
    storage = torch.as_strided(tma, (shape[0], groups, m4), (groups * m4, m4, 1))
    assert torch.all(storage[..., m:] == 0)


@pytest.mark.parametrize("dtype, ue8m0", [(E4M3, True), (E5M2, False)])
def test_group_64_matches_the_reference_with_ragged_k(dtype, ue8m0) -> None:
    """Group 64 (each group zero-padded to our 128 quantizer) = the pure-torch reference at (1, 64),
    ragged last group included."""
    x = torch.randn(5, 200) * 10
    x[1, 64:128] = 0  # an all-zero group: scale eps / fp8_max
    x_q, x_s = per_token_group_quant_fp8(x, 64, dtype=dtype, use_ue8m0=ue8m0)
    ref_q, ref_s = reference.quantize(x, (1, 64), dtype, "ue8m0" if ue8m0 else "fp32")
    assert x_s.shape == (5, 4) and torch.equal(x_s, ref_s)
    assert torch.equal(x_q.view(torch.uint8), ref_q.view(torch.uint8))


def test_column_major_and_tma_scales_feed_the_matmul() -> None:
    """The layouts vLLM hands its CUTLASS / DeepGEMM paths give the same product as row-major scales."""
    B, Bs = reference.quantize(torch.randn(256, 384), (128, 128), E4M3, "fp32")
    x = torch.randn(7, 384)
    A, As = per_token_group_quant_fp8(x, 128)
    want = w8a8_block_fp8_matmul(A, B, As, Bs, [128, 128], torch.float32)
    for flags in ({"column_major_scales": True}, {"column_major_scales": True, "tma_aligned_scales": True}):
        A2, As2 = per_token_group_quant_fp8(x, 128, **flags)
        assert torch.equal(w8a8_block_fp8_matmul(A2, B, As2, Bs, [128, 128], torch.float32), want)


def test_w8a8_triton_block_scaled_mm_is_vllms_name_for_the_matmul() -> None:
    assert w8a8_triton_block_scaled_mm is w8a8_block_fp8_matmul


def test_out_q_receives_the_result() -> None:
    x = torch.randn(3, 256)
    out = torch.empty(3, 256, dtype=E4M3)
    x_q, _ = per_token_group_quant_fp8(x, 128, out_q=out)
    assert x_q is out
    assert torch.equal(out.view(torch.uint8), per_token_group_quant_fp8(x, 128)[0].view(torch.uint8))


def test_ragged_k_is_zero_padded_like_the_matmul() -> None:
    x = torch.randn(4, 576)
    x_q, x_s = per_token_group_quant_fp8(x, 128)
    ref_q, ref_s = reference.quantize(x, (1, 128), E4M3, "fp32")
    assert (
        x_s.shape == (4, 5)
        and torch.equal(x_s, ref_s)
        and torch.equal(x_q.view(torch.uint8), ref_q.view(torch.uint8))
    )


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"group_size": 32}, ValueError, "group_size: expected one of (64, 128, 256, 512)"),
        ({"eps": 1e-6}, ValueError, "eps: our quantizer's floor is fixed at 1e-10"),
        ({"dtype": torch.bfloat16}, TypeError, "dtype: expected float8_e4m3fn or float8_e5m2"),
        ({"out_q": torch.empty(3, 128, dtype=E4M3)}, ValueError, "out_q: expected a (3, 256)"),
    ],
)
def test_per_token_group_quant_rejects_what_it_cannot_honor(kwargs, exc, words) -> None:
    args = {"group_size": 128, **kwargs}
    with pytest.raises(exc) as info:
        per_token_group_quant_fp8(torch.randn(3, 256), **args)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "m_shape, n, k, block, out_dtype",
    [
        ((13,), 300, 576, [128, 128], torch.float16),
        ((2, 3), 256, 512, [256, 128], torch.bfloat16),
        ((1,), 130, 1024, [128, 512], torch.float32),
    ],
)
def test_w8a8_block_fp8_matmul_matches_reference(m_shape, n, k, block, out_dtype) -> None:
    w = torch.randn(n, k)
    B, Bs = reference.quantize(w, tuple(block), E4M3, "fp32")
    x = torch.randn(*m_shape, k)
    A, As = per_token_group_quant_fp8(x, block[1], column_major_scales=True)
    y = w8a8_block_fp8_matmul(A, B, As, Bs, block, out_dtype)
    ref = reference.blockwise_matmul(
        A.reshape(-1, k), B, Bs, tuple(block), As.reshape(-1, As.shape[-1]), None, out_dtype, "dynamic"
    ).reshape(*m_shape, n)
    assert_kernel_close(y, ref, f"w8a8 {m_shape} {n}x{k} {block}")
    assert sqnr(y, x @ w.T) >= sqnr_floor(E4M3)
    # vLLM's two calls = our one-call dynamic path.
    assert_kernel_close(y, blockwise_matmul(x, B, Bs, block, out_dtype=out_dtype), "vs dynamic op")


def test_w8a8_default_output_dtype_is_float16_like_vllm() -> None:
    B, Bs = reference.quantize(torch.randn(128, 128), (128, 128), E4M3, "fp32")
    A, As = per_token_group_quant_fp8(torch.randn(2, 128), 128)
    assert w8a8_block_fp8_matmul(A, B, As, Bs, [128, 128]).dtype == torch.float16


@pytest.mark.parametrize(
    "change, exc, words",
    [
        ({"A": torch.randn(2, 256)}, TypeError, "A: expected an fp8 tensor"),
        ({"block_size": [128]}, ValueError, "block_size: expected [block_n, block_k]"),
        ({"block_size": [64, 128]}, ValueError, "block_shape"),
        ({"Bs": torch.ones(1, 1)}, ValueError, "w_scale: expected shape (2, 2)"),
        ({"As": torch.ones(2, 3)}, ValueError, "x_scale: expected shape (2, 2)"),
    ],
)
def test_w8a8_rejects_bad_arguments(change, exc, words) -> None:
    B, Bs = reference.quantize(torch.randn(256, 256), (128, 128), E4M3, "fp32")
    A, As = per_token_group_quant_fp8(torch.randn(2, 256), 128)
    args = {"A": A, "B": B, "As": As, "Bs": Bs, "block_size": [128, 128], **change}
    with pytest.raises(exc) as info:
        w8a8_block_fp8_matmul(**args)
    assert words in str(info.value)
