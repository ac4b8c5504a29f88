"""Triton grouped kernels (gmm, tgmm) under TRITON_INTERPRET=1 vs the reference (kernel error bound)
and the unquantized product. Sweeps use small tiles (16-32 rows) so group boundaries fall inside
tiles at interpreter-friendly sizes; the default tiles run on a few shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_params
from grouped_cases import (
    assert_quantization_loss_ok,
    check_gmm,
    check_tgmm,
    gmm_inputs,
    pattern_cases,
    pattern_sizes,
    unquantized_gmm,
    unquantized_tgmm,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_fp8_blockwise  # noqa: F401  (registers the ops)
from torch_fp8_blockwise import reference, testing

pytestmark = pytest.mark.parametrize("backend", backend_params("triton", op="grouped_matmul"))

#: gmm: 16-row x 32-column output tiles, 32-deep K steps; tgmm: 16 x 32 output tiles, 32-row M steps.
SMALL = {"block_m": 16, "block_n": 32, "block_k": 32, "num_warps": 4, "num_stages": 2}


def _small():
    from torch_fp8_blockwise.backends.triton.configs import GemmConfig

    return GemmConfig(**SMALL)


def _triton_gmm(args: dict, out_dtype=torch.float32, config=None) -> torch.Tensor:
    from torch_fp8_blockwise.backends.triton import grouped

    a = args
    return grouped.grouped_matmul(
        a["x"], a["w"], a["w_scale"], a["group_sizes"], tuple(a["block_shape"]), a["x_scale"], out_dtype,
        a["activation"], config=config,
    )  # fmt: skip


def _ref_gmm(args: dict, out_dtype=torch.float32) -> torch.Tensor:
    a = args
    return reference.grouped_matmul(
        a["x"], a["w"], a["w_scale"], a["group_sizes"], tuple(a["block_shape"]), a["x_scale"], out_dtype,
        a["activation"],
    )  # fmt: skip


def _triton_tgmm(x, dy, sizes, block_m, config=None, out_dtype=torch.float32):
    from torch_fp8_blockwise.backends.triton import grouped

    gs = torch.tensor(sizes, dtype=torch.int32)
    return grouped.grouped_matmul_transposed(x, dy, gs, block_m, out_dtype, config=config)


def _sweep_gmm(mode: str, patterns) -> None:
    for pattern, case in pattern_cases(mode, n=40, k=128, sizes=(3, 17, 1, 9), extra_rows=5):
        if pattern in patterns:
            y = _triton_gmm(case["args"], config=_small())
            testing.assert_kernel_close(y, _ref_gmm(case["args"]), f"{mode} {pattern:08b}")


def _sweep_tgmm(patterns) -> None:
    for pattern in patterns:
        sizes = pattern_sizes(pattern, 8, (40, 130, 7, 90))
        m = sum(sizes) + 3
        x, dy = torch.randn(m, 24), torch.randn(m, 20)
        out = _triton_tgmm(x, dy, sizes, 128, _small())
        ref = reference.grouped_matmul_transposed(
            x, dy, torch.tensor(sizes, dtype=torch.int32), 128, torch.float32
        )
        testing.assert_kernel_close(out, ref, f"{pattern:08b}")


#: A fast subset: all-empty, all-full, single groups at both ends, alternating, and mixed patterns.
SUBSET = (0, 255, 1, 128, 0b01010101, 0b10101010, 0b00111100, 0b11000011, 0b10010110)


@pytest.mark.parametrize("mode", ["dynamic", "fp8", "none"])
def test_gmm_patterns_subset(backend, mode):
    _sweep_gmm(mode, SUBSET)


@pytest.mark.slow
def test_gmm_every_zero_nonzero_pattern_of_8_groups(backend):
    _sweep_gmm("dynamic", range(256))


def test_tgmm_patterns_subset(backend):
    _sweep_tgmm(SUBSET)


@pytest.mark.slow
def test_tgmm_every_zero_nonzero_pattern_of_8_groups(backend):
    _sweep_tgmm(range(256))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 70), min_size=1, max_size=9), extra=st.integers(1, 20)
)  # backend functions take M > 0
def test_random_sizes(backend, sizes, extra):
    case = gmm_inputs(sizes, n=40, k=160, extra_rows=extra)
    testing.assert_kernel_close(
        _triton_gmm(case["args"], config=_small()), _ref_gmm(case["args"]), str(sizes)
    )
    m = sum(sizes) + extra
    x, dy = torch.randn(m, 20), torch.randn(m, 24)
    ref = reference.grouped_matmul_transposed(
        x, dy, torch.tensor(sizes, dtype=torch.int32), 128, torch.float32
    )
    testing.assert_kernel_close(_triton_tgmm(x, dy, sizes, 128, _small()), ref, str(sizes))


@pytest.mark.parametrize(
    "mode,x_dtype,out_dtype",
    [
        ("dynamic", torch.bfloat16, None),
        ("fp8", torch.float32, torch.float16),
        ("none", torch.bfloat16, torch.float32),
        ("none", torch.float32, torch.bfloat16),
    ],
)
def test_gmm_default_tiles_through_the_op(backend, mode, x_dtype, out_dtype):
    sizes = [100, 0, 157, 1]
    case = gmm_inputs(sizes, n=200, k=384, mode=mode, x_dtype=x_dtype, extra_rows=3, block=(128, 128))
    y = check_gmm(backend, case, out_dtype, what=mode)
    assert_quantization_loss_ok(y, unquantized_gmm(case["x_f"].float(), case["w_f"], sizes), mode)


def test_gmm_larger_blocks(backend):
    case = gmm_inputs([40, 0, 57], n=300, k=520, block=(256, 512), extra_rows=2)
    check_gmm(backend, case)


@pytest.mark.parametrize("block_m", [128, 256, 512])
def test_tgmm_default_tiles_through_the_op(backend, block_m):
    sizes = [300, 0, 457, 1]
    m = sum(sizes) + 5
    x, dy = torch.randn(m, 72).bfloat16(), torch.randn(m, 40).bfloat16()
    out = check_tgmm(backend, x, dy, sizes, block_m, torch.float32)
    exact = unquantized_tgmm(x.float(), dy.float(), sizes)
    assert_quantization_loss_ok(out[[0, 2]], exact[[0, 2]], f"block_m {block_m}")


@pytest.mark.parametrize("reduction_tile", [32, 64, 128])
@pytest.mark.parametrize("block_m", [128, 256, 512])
def test_tgmm_reduction_tiles_inside_scale_blocks(backend, reduction_tile, block_m):
    from torch_fp8_blockwise.backends.triton.configs import GemmConfig

    sizes = [150, 0, 333, 60]
    m = sum(sizes)
    x, dy = torch.randn(m, 16), torch.randn(m, 32)
    cfg = GemmConfig(block_m=16, block_n=32, block_k=reduction_tile, num_warps=4, num_stages=2)
    ref = reference.grouped_matmul_transposed(
        x, dy, torch.tensor(sizes, dtype=torch.int32), block_m, torch.float32
    )
    testing.assert_kernel_close(_triton_tgmm(x, dy, sizes, block_m, cfg), ref, f"{reduction_tile}/{block_m}")


def test_sum_above_m_truncates_on_the_device_path(backend):
    # The kernels never read group_sizes on the host; a sum above M ends the groups at row M.
    case = gmm_inputs([5, 9], n=40, k=128)
    args = dict(case["args"], group_sizes=torch.tensor([5, 30], dtype=torch.int32))
    testing.assert_kernel_close(_triton_gmm(args, config=_small()), _ref_gmm(args), "gmm")
    x, dy = torch.randn(14, 16), torch.randn(14, 32)
    gs = torch.tensor([5, 30], dtype=torch.int32)
    ref = reference.grouped_matmul_transposed(x, dy, gs, 128, torch.float32)
    testing.assert_kernel_close(_triton_tgmm(x, dy, [5, 30], 128, _small()), ref, "tgmm")


def test_launchers_never_read_group_sizes_on_the_host(backend, monkeypatch):
    """A host read (item, tolist, bool, int) of a tensor would be a device sync on cuda."""
    case = gmm_inputs([5, 0, 9], n=40, k=128, extra_rows=2)
    expected = _ref_gmm(case["args"])
    x, dy = torch.randn(16, 16), torch.randn(16, 32)

    def host_read(*_a, **_k):
        raise AssertionError("host read of a tensor in a grouped launcher")

    with monkeypatch.context() as mp:
        for name in ("item", "tolist", "__bool__", "__int__", "__index__"):
            mp.setattr(torch.Tensor, name, host_read)
        y = _triton_gmm(case["args"], config=_small())
        out = _triton_tgmm(x, dy, [5, 0, 9], 128, _small())
    testing.assert_kernel_close(y, expected, "gmm")
    assert out.shape == (3, 16, 32)
