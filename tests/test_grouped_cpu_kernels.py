"""The CPU grouped ops on each path of the CPU backend (AVX2 C kernels, scalar C kernels, pure torch
as with FP8_CPU_KERNELS=0) against the reference (kernel error bound): MoE decode sizes (1-16 rows
per expert), groups past the fused GEMM's row limit (weight panels), odd K / N, empty groups, rows
of no group. On the compiled path each group's rows must equal the dense CPU matmul bit for bit
(the grouped op adds no numerics of its own), and the number of C calls per op is pinned: one
activation call and one fused GEMM per non-empty decode group, no dequantized weight (a guard
against a per-block or per-row loop and against dequantizing whole weights at small M; a count,
not a timing).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from cpu_kernel_helpers import CallSpy, compiled_or_fail, on_isa, python_kernels_only, restore_isa, use_isa
from grouped_cases import (
    assert_quantization_loss_ok,
    check_gmm,
    check_tgmm,
    gmm_inputs,
    unquantized_gmm,
    unquantized_tgmm,
)

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise import reference
from torch_fp8_blockwise.backends import cpu, cpu_grouped, cpu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = "cpu"


@pytest.fixture(params=["amx", "avx512bf16", "avx2", "scalar", "torch"])
def path(request, monkeypatch):
    """Run the test body on one of the CPU backend's paths ("torch" = the FP8_CPU_KERNELS=0 path). "avx2": without the AVX512-BF16 GEMM; "avx512bf16" skipped where the CPU lacks it."""
    if request.param == "torch":
        python_kernels_only(monkeypatch)
        monkeypatch.setattr(cpu_kernels, "_lib", None)
        yield "torch"
        return
    lib = compiled_or_fail()
    before = use_isa(lib, request.param)
    yield request.param
    restore_isa(lib, before)


@pytest.fixture
def avx2_kernels():
    """The library on its AVX2 kernels (for the tests of their routing), restored afterwards."""
    with on_isa("avx2") as lib:
        yield lib


# Decode: 1-16 rows per expert with empty experts between; "mixed": decode groups beside groups
# past SMALL_M (60 rows: panels for weights >= SMALL_WEIGHT, else the fused GEMM up to 256 rows;
# 300 rows: panels always). N, K off the 128 grid.
DECODE = [1, 0, 16, 3, 0, 0, 7, 1, 12, 2, 0, 5]
MIXED = [3, 300, 0, 1, 60, 16]
GMM_CASES = [
    # sizes, n, k, mode, x dtype, out dtype, block, extra rows
    (DECODE, 130, 1000, "dynamic", torch.bfloat16, None, (128, 128), 3),
    (DECODE, 300, 200, "fp8", torch.float32, torch.float32, (128, 128), 0),
    (DECODE, 257, 576, "none", torch.bfloat16, torch.float32, (256, 128), 2),
    (DECODE, 130, 300, "none", torch.float32, torch.bfloat16, (128, 256), 1),
    (MIXED, 1100, 200, "dynamic", torch.float32, torch.float32, (128, 128), 4),
    (MIXED, 130, 520, "fp8", torch.float32, torch.bfloat16, (128, 128), 0),
    (MIXED, 600, 130, "none", torch.float16, torch.float16, (256, 128), 5),
    ([0, 0, 40, 0], 136, 200, "dynamic", torch.bfloat16, torch.float32, (128, 128), 0),  # one group
]


@pytest.mark.parametrize("sizes,n,k,mode,x_dtype,out_dtype,block,extra", GMM_CASES, ids=str)
def test_gmm_matches_reference(path, sizes, n, k, mode, x_dtype, out_dtype, block, extra):
    case = gmm_inputs(sizes, n=n, k=k, mode=mode, extra_rows=extra, block=block, x_dtype=x_dtype)
    y = check_gmm(B, case, out_dtype, what=f"{path} {mode}")
    exact = unquantized_gmm(case["x_f"].float(), case["w_f"], sizes)
    assert_quantization_loss_ok(y, exact, f"{path} {mode}")


def test_gmm_e5m2_decode(path):
    check_gmm(B, gmm_inputs(DECODE, n=130, k=300, w_dtype=torch.float8_e5m2, extra_rows=2), what=path)


def test_gmm_one_group_holds_every_row_and_no_group_holds_any(path):
    case = gmm_inputs([0, 9, 0], n=130, k=200)
    check_gmm(B, case, what=path)
    empty = gmm_inputs([0, 0, 0], n=130, k=200, extra_rows=4)
    y = check_gmm(B, empty, what=path)
    assert y.shape == (4, 130) and not y.any()


@pytest.mark.parametrize("mode", ["dynamic", "fp8", "none"])
@pytest.mark.parametrize("bf16_panels", [False, True])
def test_gmm_rows_equal_the_dense_cpu_matmul_bit_for_bit(monkeypatch, mode, bf16_panels):
    """Each group's rows are exactly cpu.blockwise_matmul of those rows (fused and panel groups)."""
    compiled_or_fail()
    monkeypatch.setattr(cpu, "BF16_PANELS", bf16_panels)
    case = gmm_inputs(MIXED, n=600, k=300, mode=mode, extra_rows=3, x_dtype=torch.bfloat16)
    a = case["args"]
    for out_dtype in (torch.float32, torch.bfloat16):
        y = cpu_grouped.grouped_matmul(
            a["x"], a["w"], a["w_scale"], a["group_sizes"], tuple(a["block_shape"]), a["x_scale"],
            out_dtype, a["activation"],
        )  # fmt: skip
        start = 0
        for g, size in enumerate(MIXED):
            rows = slice(start, start + size)
            xs = None if a["x_scale"] is None else a["x_scale"][rows]
            dense = cpu.blockwise_matmul(
                a["x"][rows], a["w"][g], a["w_scale"][g], tuple(a["block_shape"]), xs, None, out_dtype,
                a["activation"],
            )  # fmt: skip
            assert torch.equal(y[rows], dense), f"group {g} ({size} rows), {out_dtype}"
            start += size
        assert not y[start:].any()


@pytest.mark.parametrize("avx512", [False, True])
@pytest.mark.parametrize("mode", ["dynamic", "none"])
def test_gmm_prefill_group_of_a_small_weight(avx2_kernels, monkeypatch, avx512, mode):
    """A group of GROUPED_PANEL_MIN_M rows of a weight under SMALL_WEIGHT takes the panels on an
    AVX-512 CPU (``cpu.AVX512_GEMM``), the fused GEMM elsewhere; either way its rows are exactly the
    dense matmul's by the grouped rule, within the kernel-error bound of the reference. (On the
    AVX2 kernels: the AVX512-BF16 ones take such a group whenever its panels would be fp32.)"""
    spy = CallSpy(avx2_kernels)
    python_kernels_only(monkeypatch)
    monkeypatch.setattr(cpu_kernels, "_lib", spy)
    monkeypatch.setattr(cpu, "AVX512_GEMM", avx512)
    rows = cpu.GROUPED_PANEL_MIN_M
    sizes, n, k = [rows, 0, 5], 136, 200
    assert rows > cpu.SMALL_M and n * k < cpu.SMALL_WEIGHT
    assert cpu.uses_fused_gemm(rows, n, k, grouped=True) is not avx512
    assert cpu.uses_fused_gemm(rows, n, k)  # the dense rule is unchanged
    case = gmm_inputs(sizes, n=n, k=k, mode=mode, x_dtype=torch.bfloat16, extra_rows=2)
    a = case["args"]
    for out_dtype in (torch.float32, torch.bfloat16):
        spy.calls.clear()
        y = check_gmm(B, case, out_dtype, what=f"avx512={avx512} {mode}")
        assert ("fp8_dequantize" in spy.names) is avx512, spy.names
        dense = cpu.blockwise_matmul(
            a["x"][:rows], a["w"][0], a["w_scale"][0], tuple(a["block_shape"]), None, None, out_dtype,
            a["activation"], grouped=True,
        )  # fmt: skip
        assert torch.equal(y[:rows], dense)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_gmm_w8a16_panel_groups_take_x_as_it_is(avx2_kernels, monkeypatch, x_dtype):
    """W8A16 with bf16 / fp16 x and only panel groups: no float32 copy of every row
    (no fp8_prepare_x call for the whole x; the dense path converts a group's rows only where its GEMM
    is fp32), the overflow edge checked once on x itself, and the result bit for bit what the
    prepared float32 copy gives (the dense matmul of each group's fp32 rows)."""
    spy = CallSpy(avx2_kernels)
    python_kernels_only(monkeypatch)
    monkeypatch.setattr(cpu_kernels, "_lib", spy)
    sizes = [300, 0, 260]
    case = gmm_inputs(sizes, n=600, k=300, mode="none", x_dtype=x_dtype, extra_rows=3)
    a = case["args"]
    for bf16_panels in (False, True):
        monkeypatch.setattr(cpu, "BF16_PANELS", bf16_panels)
        for out_dtype in (torch.float32, torch.bfloat16):
            spy.calls.clear()
            y = check_gmm(B, case, out_dtype, what=f"{x_dtype} {out_dtype} bf16 panels {bf16_panels}")
            assert spy.names.count("fp8_overflow_edge") == 1 and spy.names[0] == "fp8_overflow_edge"
            gemm_dtype = torch.bfloat16 if out_dtype == torch.bfloat16 and bf16_panels else torch.float32
            # one conversion per group where the GEMM is fp32 or x is fp16, none for bf16 x in bf16 GEMMs
            convert = x_dtype != gemm_dtype
            assert spy.names.count("fp8_prepare_x") == (2 if convert else 0), spy.names
            start = 0
            for g, size in enumerate(sizes):
                xf = a["x"][start : start + size].float()
                dense = cpu.blockwise_matmul(
                    xf, a["w"][g], a["w_scale"][g], tuple(a["block_shape"]), None, None, out_dtype, "none",
                    grouped=True,
                )  # fmt: skip
                assert torch.equal(y[start : start + size], dense), (g, out_dtype, bf16_panels)
                start += size
            assert not y[start:].any()


def _call_gmm(sizes, n, k, mode, x_dtype=torch.bfloat16):
    case = gmm_inputs(sizes, n=n, k=k, mode=mode, x_dtype=x_dtype, extra_rows=2)
    with tfb.use_backend(B):
        tfb.grouped_matmul(**case["args"])


@pytest.mark.parametrize("isa", ["avx2", "avx512bf16"])
@pytest.mark.parametrize(
    "mode,x_dtype,act",
    [("dynamic", torch.bfloat16, 1), ("fp8", torch.float32, 1), ("none", torch.float32, 0)],
)
def test_gmm_c_calls_at_decode_sizes(request, isa, monkeypatch, mode, x_dtype, act):
    """One activation call for all rows (none for fp32 W8A16 x), one overflow-edge check of all
    of it, then ONE grouped fused GEMM call for all non-empty groups, whatever the number of groups and K blocks: no weight is ever
    dequantized at decode sizes, and there is one parallel region per call, not one per group.
    With the AVX512-BF16 kernels, where they are exact (W8A8), ONE call does all of it
    (fp8_gemm_grouped_x: activation, edge check and GEMM); where they are not (fp32 x under W8A16)
    that call refuses and the AVX2 calls follow, as they do for one-row groups of a small weight."""
    lib = compiled_or_fail()
    before = use_isa(lib, isa)
    request.addfinalizer(lambda: restore_isa(lib, before))
    spy = CallSpy(lib)
    python_kernels_only(monkeypatch)
    monkeypatch.setattr(cpu_kernels, "_lib", spy)

    def no_torch_dequantize(*args):
        raise AssertionError("a whole weight was dequantized in torch on the compiled path")

    monkeypatch.setattr(cpu, "_dequantize_weight", no_torch_dequantize)
    monkeypatch.setattr(cpu, "_dequantize_f32", no_torch_dequantize)
    for k in (128, 2000):
        spy.calls.clear()
        _call_gmm(DECODE, 136, k, mode, x_dtype)
        assert sum(1 for s in DECODE if s) > 1
        fp32 = ["fp8_prepare_x"] * act + ["fp8_overflow_edge", "fp8_gemm_grouped"]
        if isa == "avx512bf16" and lib.fp8_bf16_pays(1, 136, k, 0, 128):  # + VBMI: the one-row GEMV
            assert spy.names == ["fp8_gemm_grouped_x"] + ([] if act else fp32), k
        elif isa == "avx512bf16":  # DECODE's one-row groups of this small weight: the AVX2 GEMV
            assert spy.names == ["fp8_gemm_grouped_x", *fp32], k
            spy.calls.clear()
            _call_gmm([s for s in DECODE if s != 1], 136, k, mode, x_dtype)
            assert spy.names == ["fp8_gemm_grouped_x"] + ([] if act else fp32), k
        else:
            assert spy.names == fp32, k


def test_gmm_c_calls_with_a_large_group(monkeypatch):
    """A 300-row group takes the dense large-M path: cdiv(N, 512) dequantized weight panels (the
    prepared activation is reused, not prepared again, nor checked for the overflow edge again); the
    decode groups stay fused, in one call. With the AVX512-BF16 kernels and fp32 panels, ONE call
    (fp8_gemm_grouped_x) takes every group, the 300-row one included."""
    lib = compiled_or_fail()
    spy = CallSpy(lib)
    python_kernels_only(monkeypatch)
    monkeypatch.setattr(cpu_kernels, "_lib", spy)
    monkeypatch.setattr(cpu, "BF16_PANELS", False)  # bf16 panels would convert the fp32 activation
    before = (lib.fp8_get_isa(), lib.fp8_get_amx())
    try:
        if lib.fp8_set_isa(2) == 2:
            _call_gmm([3, 0, 300, 5], 1100, 200, "dynamic")
            assert spy.names == ["fp8_gemm_grouped_x"]
            spy.calls.clear()
        use_isa(lib, "avx2")
        _call_gmm([3, 0, 300, 5], 1100, 200, "dynamic")
    finally:
        restore_isa(lib, before)
    assert spy.names == ["fp8_prepare_x", "fp8_overflow_edge", *["fp8_dequantize"] * 3, "fp8_gemm_grouped"]


def test_gmm_torch_path_dequantizes_each_used_weight_once(monkeypatch):
    """The FP8_CPU_KERNELS=0 path: one weight dequantization per non-empty group (not per row or block)."""
    python_kernels_only(monkeypatch)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    seen = []
    real = cpu._dequantize_weight

    def counting(w, w_scale, block_shape):
        seen.append(tuple(w.shape))
        return real(w, w_scale, block_shape)

    monkeypatch.setattr(cpu, "_dequantize_weight", counting)
    _call_gmm(DECODE, 136, 300, "dynamic")
    assert seen == [(136, 300)] * sum(1 for s in DECODE if s)


def test_gmm_threads_do_not_change_the_result():
    compiled_or_fail()
    case = gmm_inputs(MIXED, n=1100, k=576, x_dtype=torch.bfloat16)
    before = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with tfb.use_backend(B):
                out.append(tfb.grouped_matmul(**case["args"], out_dtype=torch.float32))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*out)


# ------------------------------------------------------------------------------------ tgmm
TGMM_CASES = [
    # sizes, K, N, block_m, x dtype, out dtype, extra rows
    ([1, 0, 16, 3, 0, 7], 200, 130, 128, torch.bfloat16, None, 3),
    ([100, 0, 157, 1, 300], 130, 72, 128, torch.float32, torch.float32, 5),
    ([300, 0, 457, 1], 72, 200, 256, torch.bfloat16, torch.float32, 0),
    ([40, 90, 0], 64, 96, 512, torch.float16, torch.bfloat16, 2),
]


@pytest.mark.parametrize("sizes,k,n,block_m,dtype,out_dtype,extra", TGMM_CASES, ids=str)
def test_tgmm_matches_reference(path, sizes, k, n, block_m, dtype, out_dtype, extra):
    m = sum(sizes) + extra
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    out = check_tgmm(B, x, dy, sizes, block_m, out_dtype, what=path)
    used = [g for g, s in enumerate(sizes) if s]
    assert not out[[g for g, s in enumerate(sizes) if not s]].any(), "empty groups are not 0"
    exact = unquantized_tgmm(x.float(), dy.float(), sizes)
    assert_quantization_loss_ok(out[used], exact[used], f"{path} block_m {block_m}")


def test_tgmm_quantizes_exactly_as_the_reference(path):
    """The transposed row-block quantization gives the reference's column-block codes and scales."""
    x = torch.randn(300, 130, dtype=torch.bfloat16)
    x[5:9] = 0  # an all-zero stretch and a straddled block below
    for block_m in (128, 256):
        xd_t = cpu_grouped._columns_transposed_f32(x, block_m)
        q, s = reference.quantize_columns(x, block_m)
        assert torch.equal(xd_t.T, reference.dequantize(q, s, (block_m, 1), torch.float32))


def test_tgmm_c_calls_do_not_grow_with_groups(monkeypatch):
    """Quantize and dequantize once per operand, whatever G and the number of M blocks."""
    spy = CallSpy(compiled_or_fail())
    python_kernels_only(monkeypatch)
    monkeypatch.setattr(cpu_kernels, "_lib", spy)
    for sizes in ([5, 0, 3], [40] * 12):
        spy.calls.clear()
        m = sum(sizes)
        with tfb.use_backend(B):
            tfb.grouped_matmul_transposed(
                torch.randn(m, 130), torch.randn(m, 72), torch.tensor(sizes, dtype=torch.int32)
            )
        assert spy.names == ["fp8_quantize", "fp8_dequantize"] * 2, sizes


# ------------------------------------------------------------------------- FP8_CPU_KERNELS=0
def test_disabled_kernels_run_the_torch_path_in_a_fresh_process():
    code = (
        "import torch, sys; sys.path.insert(0, 'tests');"
        "from grouped_cases import gmm_inputs, check_gmm, check_tgmm;"
        "from torch_fp8_blockwise.backends import cpu;"
        "assert 'FP8_CPU_KERNELS=0' in cpu.kernel_status(), cpu.kernel_status();"
        "check_gmm('cpu', gmm_inputs([2, 0, 9, 1], n=130, k=300, extra_rows=2));"
        "check_tgmm('cpu', torch.randn(20, 130), torch.randn(20, 72), [2, 0, 9, 1], 128);"
        "print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "FP8_CPU_KERNELS": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("first", ["cpu_grouped", "cpu"])
def test_either_cpu_module_imports_first(first):
    code = f"from torch_fp8_blockwise.backends import {first}; from torch_fp8_blockwise.backends import cpu_grouped"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_bench_script_options(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_grouped", os.path.join(ROOT, "scripts", "bench_grouped.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = torch.get_num_threads()
    try:
        assert (
            bench.main(["--shape", "4", "16", "128", "136", "--repeats", "1", "--threads", "1", "--cpu-time"])
            == 0
        )
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "process CPU time" in out and "threads 1" in out
    assert any(line.split()[:4] == ["4", "16", "128", "136"] for line in out.splitlines())
    assert {(g, m // g) for g, m, _, _ in bench.DECODE_SHAPES} == {
        (g, r) for g, _, _ in bench.DECODE_EXPERTS for r in (1, 4, 16)
    }
