"""CPU backend of the grouped ops vs the reference (kernel error bound) and the unquantized product;
registration checks (opcheck, torch.compile fullgraph) run here on CPU tensors."""

from __future__ import annotations

import pytest
import torch
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
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.library import opcheck

import torch_fp8_blockwise  # noqa: F401  (registers the ops)
from torch_fp8_blockwise.ops import grouped_matmul

B = "cpu"


@pytest.mark.parametrize("mode", ["dynamic", "fp8", "none"])
def test_gmm_every_zero_nonzero_pattern_of_8_groups(mode):
    for pattern, case in pattern_cases(mode):
        check_gmm(B, case, what=f"{pattern:08b}")


def test_tgmm_every_zero_nonzero_pattern_of_8_groups():
    for pattern in range(256):
        sizes = pattern_sizes(pattern, 8, (40, 130, 7, 90))
        m = sum(sizes) + 3
        check_tgmm(B, torch.randn(m, 24), torch.randn(m, 40), sizes, 128, what=f"{pattern:08b}")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12),
    extra=st.integers(0, 40),
    mode=st.sampled_from(["dynamic", "fp8", "none"]),
    block_m=st.sampled_from([128, 256, 512]),
)
@example(sizes=[0], extra=0, mode="fp8", block_m=128)  # M = 0: once failed in the input helper (torch 2.9)
def test_random_sizes(sizes, extra, mode, block_m):
    check_gmm(B, gmm_inputs(sizes, n=136, k=200, mode=mode, extra_rows=extra), what=str(sizes))
    m = sum(sizes) + extra
    check_tgmm(B, torch.randn(m, 40), torch.randn(m, 24), sizes, block_m, what=str(sizes))


@pytest.mark.parametrize(
    "x_dtype,out_dtype",
    [(torch.bfloat16, None), (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
)
@pytest.mark.parametrize("block", [(128, 128), (256, 128), (128, 512)])
def test_gmm_dtypes_and_blocks(x_dtype, out_dtype, block):
    sizes = [100, 0, 157, 1]
    case = gmm_inputs(sizes, n=300, k=520, block=block, x_dtype=x_dtype, extra_rows=3)
    y = check_gmm(B, case, out_dtype)
    assert_quantization_loss_ok(y, unquantized_gmm(case["x_f"].float(), case["w_f"], sizes), str(block))


def test_gmm_e5m2_weights():
    case = gmm_inputs([64, 64], n=128, k=256, w_dtype=torch.float8_e5m2)
    check_gmm(B, case)


@pytest.mark.parametrize("block_m", [128, 256, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tgmm_quantization_loss(block_m, dtype):
    sizes = [300, 0, 457, 1, 200]
    m = sum(sizes) + 5
    x, dy = torch.randn(m, 136).to(dtype), torch.randn(m, 160).to(dtype)
    out = check_tgmm(B, x, dy, sizes, block_m, torch.float32)
    exact = unquantized_tgmm(x.float(), dy.float(), sizes)
    assert_quantization_loss_ok(out[[0, 2, 4]], exact[[0, 2, 4]], f"block_m {block_m}")


def _gmm_opcheck_args():
    case = gmm_inputs([3, 0, 5], n=256, k=384, x_dtype=torch.bfloat16, extra_rows=2)
    return case["args"]


def test_opcheck_gmm_high_precision_x():
    a = _gmm_opcheck_args()
    args = (a["x"], a["w"], a["w_scale"], a["group_sizes"], a["block_shape"], None, torch.float32, "dynamic")
    # test_schema fails inside torch for any fp8 CPU input (see test_registration.test_opcheck).
    opcheck(
        torch.ops.fp8.grouped_matmul.default,
        args,
        test_utils=["test_faketensor", "test_aot_dispatch_dynamic"],
    )


def test_opcheck_gmm_fp8_x():
    a = gmm_inputs([4, 4], n=128, k=256, mode="fp8")["args"]
    args = (a["x"], a["w"], a["w_scale"], a["group_sizes"], a["block_shape"], a["x_scale"], None, "dynamic")
    opcheck(
        torch.ops.fp8.grouped_matmul.default,
        args,
        test_utils=["test_faketensor", "test_aot_dispatch_dynamic"],
    )


def test_opcheck_tgmm():
    x, dy = torch.randn(20, 64, dtype=torch.bfloat16), torch.randn(20, 32, dtype=torch.bfloat16)
    gs = torch.tensor([7, 0, 13], dtype=torch.int32)
    opcheck(torch.ops.fp8.grouped_matmul_transposed.default, (x, dy, gs, 128, torch.float32))


def test_compile_fullgraph_gmm_no_breaks():
    from torch._dynamo.utils import counters

    a = _gmm_opcheck_args()

    def fn(x, group_sizes):
        return torch.relu(grouped_matmul(x, a["w"], a["w_scale"], group_sizes)) * 2

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for m, sizes in ((10, [3, 0, 5]), (17, [0, 17, 0]), (31, [10, 10, 10])):
        x = torch.randn(m, 384, dtype=torch.bfloat16)
        gs = torch.tensor(sizes, dtype=torch.int32)
        torch.testing.assert_close(compiled(x, gs), fn(x, gs))
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0


def test_backward_is_a_clear_error():
    a = _gmm_opcheck_args()
    x = a["x"].float().requires_grad_()
    y = grouped_matmul(x, a["w"], a["w_scale"], a["group_sizes"])
    with pytest.raises(RuntimeError, match=r"fp8::grouped_matmul is inference-only"):
        y.sum().backward()


def test_bench_script_runs_on_cpu(capsys):
    import importlib.util
    import os

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_grouped.py"
    )
    spec = importlib.util.spec_from_file_location("bench_grouped", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--shape", "4", "64", "128", "128", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[:4] == ["4", "64", "128", "128"])
    assert len(row.split()) == 14  # G M K N | 5 numbers | 3 numbers
