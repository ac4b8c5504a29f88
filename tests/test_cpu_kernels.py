"""The CPU backend's three paths (AVX2 C kernels, scalar C kernels, pure torch) against the reference.

Every path runs the same cases: W8A8 dynamic / fp8 x / W8A16, both fp8 dtypes, both scale
formats, three block shapes, bias, three output dtypes, odd M / N / K on both sides of SMALL_M
(fused C GEMM vs dequantized panels + torch GEMM), non-contiguous x; quantize / dequantize bit for
bit with special values. The compiled library must build wherever a C compiler exists (a failed
build fails here, it is not skipped), and the number of C calls per matmul must not grow with the
number of K blocks (a guard against a per-block Python loop, not a timing).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from cpu_kernel_helpers import CallSpy, compiled_or_fail, python_kernels_only, restore_isa, use_isa

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise import reference
from torch_fp8_blockwise.backends import cpu, cpu_kernels
from torch_fp8_blockwise.testing import assert_kernel_close, sqnr, sqnr_floor

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_library_builds_where_a_compiler_exists():
    if os.environ.get("FP8_CPU_KERNELS") == "0":
        assert cpu_kernels.library() is None and "FP8_CPU_KERNELS=0" in cpu.kernel_status()
        return
    if cpu_kernels.compiler() is None:
        assert cpu_kernels.library() is None and "no C compiler" in cpu.kernel_status()
        return
    assert cpu_kernels.library() is not None, cpu.kernel_status()
    assert cpu.kernel_status().startswith("compiled ("), cpu.kernel_status()


def _on_path(name, monkeypatch):
    lib = cpu_kernels.library()
    if name == "torch":
        python_kernels_only(monkeypatch)
        monkeypatch.setattr(cpu_kernels, "_lib", None)
        yield "torch"
        return
    if lib is None:
        pytest.skip(f"compiled kernels unavailable here: {cpu.kernel_status()}")
    before = use_isa(lib, name)
    yield name
    restore_isa(lib, before)


@pytest.fixture(params=["avx2", "scalar", "torch"])
def path(request, monkeypatch):
    """Run the test body on one of the CPU backend's paths ("avx2": without the AVX512-BF16 GEMM)."""
    yield from _on_path(request.param, monkeypatch)


@pytest.fixture(params=["amx", "avx512bf16", "avx2", "scalar", "torch"])
def mm_path(request, monkeypatch):
    """``path`` plus the AVX512-BF16 fused GEMM (skipped where the CPU lacks it): the matmul tests."""
    yield from _on_path(request.param, monkeypatch)


# --------------------------------------------------------------------------------- matmul
MODES = ["w8a8_dynamic", "w8a8_fp8_x", "w8a16"]
# Fused GEMM (M <= 48, and M <= 256 for small weights) and panels (M = 300); N, K off the block
# grid; N = 1100 spans 3 panels of 512.
SHAPES = [(1, 1000, 576), (2, 576, 200), (13, 200, 1000), (67, 1100, 576), (300, 1100, 200)]
VARIANTS = [
    (E4M3, "fp32", (128, 128), torch.float32, False),
    (E4M3, "ue8m0", (128, 128), torch.bfloat16, True),
    (E5M2, "fp32", (128, 128), torch.float32, True),
    (E4M3, "fp32", (256, 128), torch.float16, True),
    (E5M2, "ue8m0", (128, 256), torch.float32, False),
    (E4M3, "fp32", (128, 512), torch.bfloat16, False),
]
CASES = [
    (*shape, mode, *VARIANTS[i % len(VARIANTS)])
    for i, (shape, mode) in enumerate(itertools.product(SHAPES, MODES))
]


def _inputs(m, n, k, mode, wdtype, fmt, block, bias):
    w_true = torch.randn(n, k)
    wq, ws = reference.quantize(w_true, block, wdtype, fmt)
    x_true = torch.randn(m, k, dtype=torch.bfloat16)
    kwargs = {"bias": torch.randn(n, dtype=torch.bfloat16) if bias else None}
    x = x_true
    if mode == "w8a8_fp8_x":
        x, kwargs["x_scale"] = reference.quantize(x_true.float(), (1, block[1]), E4M3, fmt)
    elif mode == "w8a16":
        kwargs["activation"] = "none"
    exact = x_true.float() @ w_true.T + (kwargs["bias"].float() if bias else 0)
    return x, wq, ws, kwargs, exact


@pytest.mark.parametrize("m,n,k,mode,wdtype,fmt,block,out_dtype,bias", CASES, ids=str)
def test_matmul_matches_reference(mm_path, m, n, k, mode, wdtype, fmt, block, out_dtype, bias):
    x, wq, ws, kwargs, exact = _inputs(m, n, k, mode, wdtype, fmt, block, bias)
    ref = reference.blockwise_matmul(
        x,
        wq,
        ws,
        block,
        kwargs.get("x_scale"),
        kwargs["bias"],
        out_dtype,
        kwargs.get("activation", "dynamic"),
    )
    with tfb.use_backend("cpu"):
        y = tfb.blockwise_matmul(x, wq, ws, block, out_dtype=out_dtype, **kwargs)
    assert_kernel_close(y, ref, f"{mm_path} {mode}")
    assert sqnr(y, exact) >= sqnr_floor(wdtype, fmt)


@pytest.mark.parametrize("m", [3, 60, 300])
def test_matmul_non_contiguous_x_and_batch_dims(mm_path, m):
    wq, ws = reference.quantize(torch.randn(300, 640), (128, 128), E4M3, "fp32")
    x = torch.randn(2, 640, m, dtype=torch.bfloat16).transpose(1, 2)  # [2, m, 640], K stride m
    ref = reference.blockwise_matmul(
        x.reshape(-1, 640), wq, ws, (128, 128), None, None, torch.bfloat16, "none"
    )
    with tfb.use_backend("cpu"):
        y = tfb.blockwise_matmul(x, wq, ws, activation="none")
    assert_kernel_close(y.reshape(-1, 300), ref, mm_path)


@pytest.mark.parametrize("m", [1, 2])
def test_matmul_nan_and_inf_in_the_weight_propagate(mm_path, m):
    """fp8 nan / inf codes must reach the output as the reference has them, not as finite values:
    e4m3 nan of both signs in the GEMV's (m = 1) and the tile mm_path's (m = 2) 16-wide loops and
    scalar tails (K = 277: blocks of 128, 128, 21), one where x is 0 (nan * 0 = nan)."""
    wq, ws = reference.quantize(torch.randn(8, 277), (128, 128), E4M3, "fp32")
    codes = wq.view(torch.uint8)
    codes[3, 5], codes[4, 260], codes[6, 275] = 0x7F, 0xFF, 0x7F  # e4m3 nan
    w5, ws5 = reference.quantize(torch.randn(8, 277), (128, 128), E5M2, "fp32")
    w5.view(torch.uint8)[2, 7] = 0x7C  # e5m2 +inf
    x = torch.rand(m, 277) + 0.5
    x[:, 5] = 0.0
    for w, s in ((wq, ws), (w5, ws5)):
        ref = reference.blockwise_matmul(x, w, s, (128, 128), None, None, torch.float32, "none")
        with tfb.use_backend("cpu"):
            y = tfb.blockwise_matmul(x, w, s, activation="none")
        assert_kernel_close(y, ref, mm_path)
    assert y.isinf().any() and ref.isinf().any()  # the inf check above saw an inf


# ----------------------------------------------------------------------- quantize / dequantize
def _special(shape, dtype):
    x = torch.randn(shape) * 3
    x[0, : min(shape[1], 300)] = 0.0  # all-zero blocks
    x[1, 3], x[1, -1] = float("inf"), -float("inf")
    x[2, 5], x[-1, -2] = float("nan"), float("nan")
    x[3, :40] = 1e-40  # fp32 subnormals (0 in bf16 / fp16)
    x[4, :64] = 1e-30
    x[5, 7] = 3e38
    x[6] = torch.linspace(-500, 500, shape[1])  # many ties on the fp8 grid after scaling
    return x.to(dtype)


QUANT = [
    ((9, 1000), (1, 128)),
    ((300, 200), (128, 128)),
    ((9, 96), (1, 256)),
    ((513, 260), (256, 128)),
    ((130, 1100), (128, 512)),
]


def _assert_quantize_bit_exact(x, block, calls=1):
    """CPU quantize of x (``calls`` times) equals reference.quantize bit for bit, in both formats
    and scale formats."""
    for dtype, fmt in itertools.product((E4M3, E5M2), ("fp32", "ue8m0")):
        q_ref, s_ref = reference.quantize(x, block, dtype, fmt)
        for _ in range(calls):
            with tfb.use_backend("cpu"):
                q, s = tfb.quantize(x, block, dtype, fmt)
            assert torch.equal(s, s_ref), (dtype, fmt)
            assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), (dtype, fmt)


@pytest.mark.parametrize("shape,block", QUANT, ids=str)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_quantize_bit_exact(path, shape, block, in_dtype):
    x = _special(shape, in_dtype)
    _assert_quantize_bit_exact(x, block)


@pytest.mark.parametrize("block", [(1, 128), (128, 128), (256, 512)], ids=str)
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_quantize_every_16_bit_input_bit_exact(path, block, in_dtype):
    """Every bf16 / fp16 bit pattern (nan, inf, subnormals, both zeros) once, in blocks that mix
    magnitudes differently per block shape, so each value meets many scales; the 32-wide AVX2
    loop, its 8-wide tail and the scalar tail all run (rows of 205 = 128 + 77 = 128 + 2 * 32 + 8 + 5)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits[torch.randperm(2**16, generator=torch.Generator().manual_seed(0))].view(in_dtype)
    x = torch.cat([x, x[:64]]).reshape(-1, 205)  # 320 rows of 205
    _assert_quantize_bit_exact(x, block)


@pytest.mark.parametrize("block", [(1, 128), (128, 128)], ids=str)
@pytest.mark.parametrize("order", ["by_magnitude", "shuffled"])
def test_quantize_every_finite_bf16_bit_exact(path, block, order):
    """The finite-block fast path (no inf / nan in the block): every finite bf16 value, in blocks of
    neighbouring magnitudes (each value meets a scale set by values like it, so the top of the fp8
    range and its subnormals are both hit) and shuffled (scales set by unrelated values)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.bfloat16)
    x = x[x.isfinite()]  # 65280 = 255 x 256
    if order == "by_magnitude":
        x = x[torch.argsort(x.float().abs(), stable=True)]
    else:
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(1))]
    _assert_quantize_bit_exact(x.reshape(255, 256), block)


@pytest.mark.parametrize("m", [3, 300], ids=lambda m: f"M{m}")
def test_dynamic_activation_quantization_is_the_quantize_op_bit_for_bit(path, m):
    """W8A8 dynamic quantizes x inside the C call (finite and inf / nan groups take different
    loops); its result must be exactly that of the same product given quantize(x, (1, 128)) as
    fp8 x + x_scale, at the fused small-M size and the panel size."""
    wq, ws = reference.quantize(torch.randn(256, 512), (128, 128), E4M3, "fp32")
    x = torch.randn(m, 512) * 5
    x[1, 7], x[2, 300] = float("inf"), float("nan")
    x = x.to(torch.bfloat16)
    with tfb.use_backend("cpu"):
        xq, xs = tfb.quantize(x, (1, 128))
        dynamic = tfb.blockwise_matmul(x, wq, ws, activation="dynamic", out_dtype=torch.float32)
        given = tfb.blockwise_matmul(xq, wq, ws, x_scale=xs, out_dtype=torch.float32)
    assert torch.equal(dynamic.isnan(), given.isnan())
    assert torch.equal(dynamic.nan_to_num(), given.nan_to_num())
    assert dynamic[:2].isfinite().all() and dynamic[2].isnan().all()  # inf saturates, nan spreads


def test_quantize_batched_and_non_contiguous(path):
    x = torch.randn(3, 200, 130, dtype=torch.bfloat16).transpose(1, 2)
    q_ref, s_ref = reference.quantize(x, (128, 128), E4M3, "fp32")
    with tfb.use_backend("cpu"):
        q, s = tfb.quantize(x, (128, 128))
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dequantize_every_code_bit_exact(mm_path, dtype, out_dtype):
    """Every code (nan, inf, subnormals) in every block, times scales whose products over- or
    underflow in some output dtypes; ragged edge blocks on both dims."""
    codes = (torch.arange(200)[:, None] + torch.arange(700)[None, :]) % 256
    q = codes.to(torch.uint8).view(dtype)  # [200, 700]
    scale = torch.tensor([[1.0, 3.7e-3, 2.0**-120], [1e30, 5.5, 2.0**100]])  # (128, 256) blocks
    ref = reference.dequantize(q, scale, (128, 256), out_dtype)
    with tfb.use_backend("cpu"):
        y = tfb.dequantize(q, scale, (128, 256), out_dtype)
    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)
    if mm_path in (
        "avx512bf16",
        "amx",
    ):  # its AVX-512 dequantization is the AVX2 one bit for bit (subnormals too)
        lib = cpu_kernels.library()
        before = use_isa(lib, "avx2")
        with tfb.use_backend("cpu"):
            y_avx2 = tfb.dequantize(q, scale, (128, 256), out_dtype)
        restore_isa(lib, before)
        bits = {torch.float32: torch.int32}.get(out_dtype, torch.int16)
        same = y.view(bits) == y_avx2.view(bits)
        assert (same | (y.isnan() & y_avx2.isnan())).all()  # a fp32 nan's payload may differ


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=str)
def test_mxfp8_quantize_bit_exact(path, dtype):
    x = _special((9, 320), torch.bfloat16)
    q_ref, s_ref = reference.mxfp8_quantize(x, dtype)
    with tfb.use_backend("cpu"):
        q, s = tfb.mxfp8_quantize(x, dtype)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("m", [1, 13, 60, 300])
@pytest.mark.parametrize("fp8_x", [False, True], ids=["dynamic", "fp8_x"])
def test_mxfp8_matmul(mm_path, m, fp8_x):
    """MXFP8 runs the blockwise machinery with (bn, bk) = (1, 32)."""
    w_true, x_true = torch.randn(600, 96), torch.randn(m, 96)
    wq, ws = reference.mxfp8_quantize(w_true, E4M3)
    x, x_scale = reference.mxfp8_quantize(x_true, E4M3) if fp8_x else (x_true, None)
    ref = reference.mxfp8_matmul(x, wq, ws, x_scale, None, torch.float32)
    with tfb.use_backend("cpu"):
        y = tfb.mxfp8_matmul(x, wq, ws, x_scale, out_dtype=torch.float32)
    assert_kernel_close(y, ref, mm_path)


# ------------------------------------------------------------------ threads, call counts, build
@pytest.mark.parametrize("k", [128, 4096])
@pytest.mark.parametrize("mode", ["dynamic", "none"])
@pytest.mark.parametrize("isa", ["avx2", "avx512bf16"])
def test_c_calls_per_matmul_do_not_grow_with_k_blocks(monkeypatch, k, mode, isa):
    """One fused GEMM call at small M; one dequantize call per 512-row panel at large M, plus one
    for the activation and one for the overflow-edge check. 32 K blocks cost the same number of
    calls as 1. With the AVX512-BF16 kernels, large M with fp32 output first offers the bf16 GEMM
    (one call: activation, edge check, product), which takes W8A8 and refuses fp32 x under W8A16."""
    lib = compiled_or_fail()
    before = use_isa(lib, isa)
    spy = CallSpy(lib)
    python_kernels_only(monkeypatch)
    monkeypatch.setattr(cpu_kernels, "_lib", spy)
    wq, ws = reference.quantize(torch.randn(1100, k), (128, 128), E4M3, "fp32")
    with tfb.use_backend("cpu"):
        tfb.blockwise_matmul(torch.randn(4, k), wq, ws, activation=mode)
        small = spy.names
        spy.calls.clear()
        tfb.blockwise_matmul(torch.randn(cpu.SMALL_WEIGHT_MAX_M + 1, k), wq, ws, activation=mode)
        large = spy.names
    restore_isa(lib, before)
    assert small == ["fp8_gemm"]  # activation, product, bias and cast in one call
    act = ["fp8_prepare_x"] if mode == "dynamic" else []  # fp32 x is used as it is
    # cdiv(1100, 512) panels
    panels = [*act, "fp8_overflow_edge", "fp8_dequantize", "fp8_dequantize", "fp8_dequantize"]
    if isa == "avx512bf16":
        assert large == ["fp8_gemm_grouped_x"] + (panels if mode == "none" else [])
    else:
        assert large == panels


def test_threads_follow_torch_and_results_do_not_depend_on_them(monkeypatch):
    spy = CallSpy(compiled_or_fail())
    python_kernels_only(monkeypatch)
    monkeypatch.setattr(cpu_kernels, "_lib", spy)
    wq, ws = reference.quantize(torch.randn(1000, 576), (128, 128), E4M3, "fp32")
    x, big = torch.randn(5, 576, dtype=torch.bfloat16), torch.randn(600, 700)
    before = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            spy.calls.clear()
            with tfb.use_backend("cpu"):
                out[threads] = (
                    tfb.blockwise_matmul(x, wq, ws),
                    *tfb.quantize(big, (128, 128)),
                )
            assert {n for _, n in spy.calls} == {threads}
    finally:
        torch.set_num_threads(before)
    for a, b in zip(out[1], out[2], strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == E4M3 else torch.equal(a, b)


@pytest.mark.parametrize("block", [(1, 128), (128, 128)], ids=str)
def test_quantize_thread_shares_cross_chunk_slab_and_batch_edges(path, block):
    """Each thread walks its share of slabs chunk by chunk, with the next chunk's amax pass beside
    the current one's rounding pass: shares that start and end mid-batch, a partial last slab, a
    partial last chunk (4400 columns = 4096 + 304 for 2D blocks, 4 x 1024 + 304 for 1 x 128) and
    inf / nan blocks next to finite ones all match the reference at every thread count. With more
    threads than cores (16 on CI's 2) the shares finish unevenly, so threads take each other's last
    slabs (the AVX2 walk's work sharing, fp8_cpu.c quant_claim) in most of the repeated calls:
    every slab must still be quantized exactly once, by whichever thread took it."""
    x = torch.randn(2, 260, 4400) * 3
    x[0, 5, 4390], x[1, 259, 17], x[1, 130, 2000] = float("nan"), float("inf"), -float("inf")
    x = x.to(torch.bfloat16)
    before = torch.get_num_threads()
    try:
        for threads, calls in ((1, 1), (3, 1), (5, 1), (16, 8)):
            torch.set_num_threads(threads)
            _assert_quantize_bit_exact(x, block, calls)
    finally:
        torch.set_num_threads(before)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": ROOT, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


_CHECK = """
import warnings, torch, torch_fp8_blockwise as tfb
from torch_fp8_blockwise import reference
from torch_fp8_blockwise.backends import cpu
from torch_fp8_blockwise.testing import assert_kernel_close
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    wq, ws = tfb.quantize(torch.randn(300, 200), (128, 128))
x = torch.randn(3, 200)
ref = reference.blockwise_matmul(x, wq, ws, (128, 128), None, None, torch.float32, "dynamic")
assert_kernel_close(tfb.blockwise_matmul(x, wq, ws), ref)
print(cpu.kernel_status())
print("warnings:", [str(w.message) for w in caught])
"""


@pytest.mark.slow
def test_fallback_when_disabled_or_the_build_fails(tmp_path):
    off = _run(_CHECK, FP8_CPU_KERNELS="0")
    assert off.returncode == 0, off.stderr
    assert "disabled by FP8_CPU_KERNELS=0" in off.stdout and "warnings: []" in off.stdout
    broken = _run(_CHECK, CC="false", FP8_CPU_KERNEL_CACHE=str(tmp_path), FP8_CPU_OPS_CPP="0")
    assert broken.returncode == 0, broken.stderr
    assert "failed" in broken.stdout and "CPU kernels unavailable" in broken.stdout  # status + one warning


@pytest.mark.slow
def test_concurrent_first_builds_share_one_cache(tmp_path):
    """Two processes building into an empty cache at once both load a whole library."""
    if cpu_kernels.compiler() is None:
        pytest.skip("no C compiler")
    # FP8_CPU_OPS_CPP=0: the C library alone (the C++ op kernel has its own tests)
    env = {**os.environ, "PYTHONPATH": ROOT, "FP8_CPU_KERNEL_CACHE": str(tmp_path), "FP8_CPU_OPS_CPP": "0"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHECK], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all("compiled (" in out for out in outs), outs
    # the library and its verification record; no temporary file left behind
    assert sorted(f.suffix for f in tmp_path.iterdir()) == [".sha256", ".so"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_bf16_panels_stay_within_the_output_bound(monkeypatch, mode, out_dtype):
    """The bf16 large-M panels (used on CPUs with native bf16 GEMM) serve bf16 output only."""
    compiled_or_fail()
    monkeypatch.setattr(cpu, "BF16_PANELS", True)
    m, n, k = cpu.SMALL_WEIGHT_MAX_M + 19, 700, 640
    x, wq, ws, kwargs, exact = _inputs(m, n, k, mode, E4M3, "fp32", (128, 128), True)
    ref = reference.blockwise_matmul(
        x,
        wq,
        ws,
        (128, 128),
        kwargs.get("x_scale"),
        kwargs["bias"],
        out_dtype,
        kwargs.get("activation", "dynamic"),
    )
    with tfb.use_backend("cpu"):
        y = tfb.blockwise_matmul(x, wq, ws, out_dtype=out_dtype, **kwargs)
    assert_kernel_close(y, ref, f"bf16 panels {mode}")
    assert sqnr(y, exact) >= sqnr_floor(E4M3)
