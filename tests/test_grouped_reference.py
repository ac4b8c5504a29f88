"""The grouped ops' contract (reference.py) checked against independent forms and the unquantized
product: every zero / non-zero pattern of 8 groups, random sizes (hypothesis), empty groups, one
group with every row, boundaries inside a quantization block, rows past sum(group_sizes)."""

from __future__ import annotations

import pytest
import torch
from grouped_cases import (
    assert_quantization_loss_ok,
    dense_gmm,
    dense_tgmm,
    gmm_inputs,
    pattern_cases,
    pattern_sizes,
    unquantized_gmm,
    unquantized_tgmm,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_fp8_blockwise  # noqa: F401  (registers the ops)
from torch_fp8_blockwise import reference, testing, use_backend
from torch_fp8_blockwise.ops import grouped_matmul, grouped_matmul_transposed

F32 = torch.float32


def _ref_gmm(args: dict, out_dtype=F32) -> torch.Tensor:
    a = args
    return reference.grouped_matmul(
        a["x"], a["w"], a["w_scale"], a["group_sizes"], tuple(a["block_shape"]), a["x_scale"], out_dtype,
        a["activation"],
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["dynamic", "fp8", "none"])
def test_gmm_every_zero_nonzero_pattern_of_8_groups(mode):
    # Sizes 3, 17, 1, 9 put group boundaries at odd rows; 5 extra rows lie past the sum.
    for pattern, case in pattern_cases(mode):
        sizes = case["args"]["group_sizes"].tolist()
        y = _ref_gmm(case["args"])
        testing.assert_kernel_close(y, dense_gmm(case["args"], F32), f"pattern {pattern:08b}")
        assert not y[sum(sizes) :].any(), f"pattern {pattern:08b}: rows past sum(group_sizes) not 0"


def test_tgmm_every_zero_nonzero_pattern_of_8_groups():
    # Sizes 40, 130, 7, 90 with block_m=128: groups straddle quantization blocks and share scales.
    for pattern in range(256):
        sizes = pattern_sizes(pattern, 8, (40, 130, 7, 90))
        m = sum(sizes) + 3
        x, dy = torch.randn(m, 24), torch.randn(m, 40)
        gs = torch.tensor(sizes, dtype=torch.int32)
        out = reference.grouped_matmul_transposed(x, dy, gs, 128, F32)
        testing.assert_kernel_close(out, dense_tgmm(x, dy, sizes, 128, F32), f"pattern {pattern:08b}")
        for g, s in enumerate(sizes):
            if s == 0:
                assert not out[g].any(), f"pattern {pattern:08b}: empty group {g} not 0"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 200), min_size=1, max_size=10),
    extra=st.integers(1, 40),  # the backend functions take M > 0 (the op handles M = 0)
    mode=st.sampled_from(["dynamic", "fp8", "none"]),
)
def test_gmm_random_sizes(sizes, extra, mode):
    case = gmm_inputs(sizes, n=136, k=200, mode=mode, extra_rows=extra)
    y = _ref_gmm(case["args"])
    testing.assert_kernel_close(y, dense_gmm(case["args"], F32), f"sizes {sizes}")
    assert not y[sum(sizes) :].any()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=10),
    extra=st.integers(1, 40),  # the backend functions take M > 0 (the op handles M = 0)
    block_m=st.sampled_from([128, 256, 512]),
)
def test_tgmm_random_sizes(sizes, extra, block_m):
    m = sum(sizes) + extra
    x, dy = torch.randn(m, 40), torch.randn(m, 24)
    out = reference.grouped_matmul_transposed(x, dy, torch.tensor(sizes, dtype=torch.int32), block_m, F32)
    testing.assert_kernel_close(out, dense_tgmm(x, dy, sizes, block_m, F32), f"sizes {sizes}")


@pytest.mark.parametrize("mode", ["dynamic", "fp8", "none"])
@pytest.mark.parametrize(
    "sizes", [[300], [0, 0, 300, 0], [77, 0, 129, 1, 93]], ids=["one", "one-of-4", "mixed"]
)
def test_gmm_quantization_loss(mode, sizes):
    case = gmm_inputs(sizes, n=256, k=512, mode=mode, extra_rows=7)
    y = _ref_gmm(case["args"])
    exact = unquantized_gmm(case["x_f"], case["w_f"], sizes)
    assert_quantization_loss_ok(y, exact, f"{mode} {sizes}")


@pytest.mark.parametrize("block_m", [128, 256, 512])
@pytest.mark.parametrize(
    "sizes", [[1000], [0, 1000, 0], [200, 0, 333, 1, 466]], ids=["one", "one-of-3", "mixed"]
)
def test_tgmm_quantization_loss(block_m, sizes):
    m = sum(sizes) + 24
    x, dy = torch.randn(m, 160), torch.randn(m, 136)
    out = reference.grouped_matmul_transposed(x, dy, torch.tensor(sizes, dtype=torch.int32), block_m, F32)
    exact = unquantized_tgmm(x, dy, sizes)
    nonempty = [g for g, s in enumerate(sizes) if s > 1]  # a 1-row group is a rank-1 product
    assert_quantization_loss_ok(out[nonempty], exact[nonempty], f"block_m {block_m} {sizes}")


def test_tgmm_straddling_block_has_one_scale_for_both_groups():
    # Rows 0..127 form one block; group 0 = rows 0..9 (tiny values), group 1 = rows 10..127 (huge).
    # With a shared scale, group 0's values are quantized on group 1's scale: most round to 0.
    x = torch.cat([torch.full((10, 1), 1e-3), torch.full((118, 1), 100.0)])
    dy = torch.ones(128, 1)
    out = reference.grouped_matmul_transposed(x, dy, torch.tensor([10, 118], dtype=torch.int32), 128, F32)
    scale = torch.tensor(100.0) / 448
    small = (torch.tensor(1e-3) / scale).to(torch.float8_e4m3fn).float() * scale  # e4m3 subnormal
    assert out[0, 0, 0] == pytest.approx(10 * small.item(), rel=1e-6)
    assert abs(small.item() - 1e-3) > 1e-4  # its own scale would have kept 1e-3 to 3 bits
    assert out[1, 0, 0] == pytest.approx(118 * 100.0, rel=1e-6)


def test_group_bounds_truncate_at_m():
    starts, ends = reference.group_bounds(torch.tensor([3, 0, 5, 4], dtype=torch.int32), 6)
    assert starts.tolist() == [0, 3, 3, 6] and ends.tolist() == [3, 3, 6, 6]


def test_sum_above_m_truncates_in_the_reference():
    # The device behaviour (the CPU op rejects it): groups end at row M.
    case = gmm_inputs([4, 9], n=128, k=128)
    a = dict(case["args"], group_sizes=torch.tensor([4, 20], dtype=torch.int32))
    testing.assert_kernel_close(_ref_gmm(a), dense_gmm(case["args"], F32), "sum > M")


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float16])
def test_ops_through_the_reference_backend(out_dtype):
    case = gmm_inputs([5, 0, 11], n=128, k=256, x_dtype=torch.bfloat16, extra_rows=2)
    with use_backend("reference"):
        y = grouped_matmul(**case["args"], out_dtype=out_dtype)
        out = grouped_matmul_transposed(case["x_f"], case["x_f"][:, :64], case["args"]["group_sizes"])
    assert y.dtype == (out_dtype or torch.bfloat16) and y.shape == (18, 128)
    testing.assert_kernel_close(y, _ref_gmm(case["args"], y.dtype), "gmm op")
    assert out.shape == (3, 256, 64) and out.dtype == torch.bfloat16


def test_ops_empty_sizes():
    w, ws = reference.quantize(torch.randn(2, 128, 256), (128, 128), torch.float8_e4m3fn, "fp32")
    gs = torch.tensor([0, 0], dtype=torch.int32)
    assert grouped_matmul(torch.randn(0, 256), w, ws, gs).shape == (0, 128)
    assert not grouped_matmul(torch.randn(3, 256), w, ws, gs).any()
    no_groups = grouped_matmul(torch.randn(3, 256), w[:0], ws[:0], gs[:0])
    assert no_groups.shape == (3, 128) and not no_groups.any()
    out = grouped_matmul_transposed(torch.randn(0, 32), torch.randn(0, 16), gs)
    assert out.shape == (2, 32, 16) and not out.any()
    assert grouped_matmul_transposed(torch.randn(5, 32), torch.randn(5, 16), gs[:0]).shape == (0, 32, 16)
