"""The packed AVX512-BF16 GEMM of the CPU kernels (fp8_cpu.c's bf16_run_packed, ISA 2): products of
PACK_MIN_ROWS (16) rows or more, dense and per group. Each test skips, with the reason, on a CPU
without AVX512-BF16 (the shared parametrized tests then run the AVX2 kernels).

* one rule picks the kernel (fp8_bf16_kernel: GEMV / tiles / packed), and Python and C agree;
* every block shape, ragged N and K (an odd K: the last pair alone), 1 to 3 row chunks, W8A16 and
  W8A8, e4m3 / e5m2 weights, every output dtype and bias: within the kernel-error bound of the
  reference;
* the output conversion is torch's (bf16 / fp16 outputs are the fp32 result rounded, bit for bit);
* nan / inf propagate as in the reference, and a row's tail never reads the next row;
* a grouped op's group is the dense matmul of its rows bit for bit, whichever kernel each group
  gets; the result does not depend on the thread count.
"""

from __future__ import annotations

import pytest
import torch
from cpu_kernel_helpers import on_isa

from torch_fp8_blockwise import reference
from torch_fp8_blockwise.backends import cpu, cpu_kernels
from torch_fp8_blockwise.testing import assert_kernel_close

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
PACK_MIN_ROWS = 16


@pytest.fixture(params=["packed", "amx"])
def large(request):
    """The kernel of 16+ row groups under test: "packed" (AVX512-BF16, AMX tiles off) or "amx"
    (skipped where the CPU has no AMX-BF16 or the OS does not grant it)."""
    return request.param


@pytest.fixture
def lib(large):
    with on_isa("amx" if large == "amx" else "avx512bf16") as lib:
        yield lib


def _kernel(lib, m, n, k, dtype=E4M3, bk=128):
    return cpu_kernels.BF16_KERNELS[lib.fp8_bf16_kernel(m, n, k, 0 if dtype == E4M3 else 1, bk)]


def _dense(x, w, ws, block, out_dtype=torch.float32, act="none", bias=None):
    return cpu.blockwise_matmul(x, w, ws, block, None, bias, out_dtype, act)


def test_one_rule_picks_the_kernel(lib, large):
    """fp8_bf16_kernel answers with bf16_run's rule: without AMX tiles, tiles from 2 rows and packed
    from PACK_MIN_ROWS; with them, AMX from AMX_MIN_ROWS (2) rows (one row: the GEMV where it
    applies, see test_cpu_bf16_gemm)."""
    rows = (2, 15, 16, 17, 48, 49, 4096)
    small = "amx" if large == "amx" else "tiles"
    assert [_kernel(lib, m, 256, 512) for m in rows] == [small, small] + [large] * 5
    lib.fp8_set_isa(1)
    try:
        assert _kernel(lib, 64, 256, 512) is None  # AVX2: no bf16 kernel
    finally:
        lib.fp8_set_isa(2)


@pytest.mark.parametrize("m", [16, 37, 193, 400])  # 1, 1, 2 and 3 chunks of 192 rows (the dense op's
# fused call up to SMALL_M = 48, its large-M call after)
@pytest.mark.parametrize("n,k", [(64, 128), (100, 277), (130, 513)])
@pytest.mark.parametrize("block", [(128, 128), (1, 128), (128, 256), (256, 512)], ids=str)
@pytest.mark.parametrize("act", ["none", "dynamic"])
def test_matches_the_reference(lib, large, m, n, k, block, act):
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    wq, ws = reference.quantize(torch.randn(n, k, generator=g), block, E4M3, "fp32")
    x = torch.randn(m, k, generator=g).bfloat16()
    assert _kernel(lib, m, n, k, bk=block[1]) == large
    y = _dense(x, wq, ws, block, act=act)
    ref = reference.blockwise_matmul(x, wq, ws, block, None, None, torch.float32, act)
    assert_kernel_close(y, ref, f"{m}x{n}x{k} {block} {act}")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("wdtype", [E4M3, E5M2], ids=str)
def test_output_dtypes_bias_and_formats(lib, out_dtype, bias_dtype, wdtype):
    """M = 24 (the dense op's fused call, which takes bias): W8A16 and W8A8 within the bound."""
    wq, ws = reference.quantize(torch.randn(72, 300), (128, 128), wdtype, "fp32")
    x = torch.randn(24, 300).bfloat16()
    bias = None if bias_dtype is None else torch.randn(72).to(bias_dtype)
    for act in ("none", "dynamic"):
        y = _dense(x, wq, ws, (128, 128), out_dtype, act, bias)
        ref = reference.blockwise_matmul(x, wq, ws, (128, 128), None, bias, out_dtype, act)
        assert_kernel_close(y, ref, f"{out_dtype} {bias_dtype} {act}")


def test_low_precision_outputs_are_the_float32_result_rounded(lib):
    """The packed store converts as torch does: bf16 (round to nearest even) and fp16 outputs equal
    the fp32 output of the same product cast by torch, bit for bit, inf included (a row of huge x
    overflows fp16), nan where it is nan."""
    wq, ws = reference.quantize(torch.randn(130, 256), (128, 128), E4M3, "fp32")
    x = torch.randn(40, 256).bfloat16()
    x[3] *= 1e4  # products past fp16's range: inf after the cast
    wq.view(torch.uint8)[7, 9] = 0x7F  # an e4m3 nan: column 7 is nan
    y32 = _dense(x, wq, ws, (128, 128))
    assert y32[:, 7].isnan().all() and (y32[3].abs() > 65504).any()
    for dt in (torch.bfloat16, torch.float16):
        y, cast = _dense(x, wq, ws, (128, 128), dt), y32.to(dt)
        nan = cast.isnan()  # (a nan's payload is the kernels' own: c10's 0x7FC0 for bf16)
        assert torch.equal(y.isnan(), nan), dt
        assert torch.equal(y.view(torch.int16)[~nan], cast.view(torch.int16)[~nan]), dt


def test_nan_and_inf_propagate(lib):
    """nan / inf codes of the weight and inf / nan in x reach the output where the reference's do."""
    wq, ws = reference.quantize(torch.randn(80, 277), (128, 128), E4M3, "fp32")
    codes = wq.view(torch.uint8)
    codes[3, 5], codes[60, 276] = 0x7F, 0xFF
    w5, ws5 = reference.quantize(torch.randn(80, 277), (128, 128), E5M2, "fp32")
    w5.view(torch.uint8)[2, 7] = 0x7C  # e5m2 +inf
    x = torch.randn(32, 277).bfloat16()
    x[4, 100], x[9, 200] = float("inf"), float("nan")
    for w, s in ((wq, ws), (w5, ws5)):
        for act in ("none", "dynamic"):
            ref = reference.blockwise_matmul(x, w, s, (128, 128), None, None, torch.float32, act)
            assert_kernel_close(_dense(x, w, s, (128, 128), act=act), ref, act)


def test_odd_k_tail_reads_only_its_row(lib):
    """K = 277 is odd: a row's last element is multiplied alone. Every odd row starts with nan, so a
    kernel that paired the last element of an even row with the next row's first would make that
    even row nan (nan x a zero weight is nan)."""
    wq, ws = reference.quantize(torch.randn(64, 277), (128, 128), E4M3, "fp32")
    x = torch.randn(20, 277).bfloat16()
    x[1::2, 0] = float("nan")
    y = _dense(x, wq, ws, (128, 128))
    assert y[1::2].isnan().all() and y[0::2].isfinite().all()
    ref = reference.blockwise_matmul(x, wq, ws, (128, 128), None, None, torch.float32, "none")
    assert_kernel_close(y, ref)


def test_mx_blocks(lib, large):
    """(1, 32) blocks (MXFP8 through the block-wise kernels): a scale per column and per 32 K."""
    w = torch.randn(96, 256)
    wq, wsc = cpu.mxfp8_quantize(w, E4M3)
    x = torch.randn(64, 256).bfloat16()
    assert _kernel(lib, 64, 96, 256, bk=32) == large
    y = cpu.mxfp8_matmul(x, wq, wsc, None, None, torch.float32)
    ref = reference.mxfp8_matmul(x, wq, wsc, None, None, torch.float32)
    assert_kernel_close(y, ref)


def test_groups_are_the_dense_matmul_of_their_rows(lib):
    """Groups of 0, 1, 5, 16, 200, 37, 0 and 3 rows (GEMV, tiles and packed in one call): each
    group's rows equal the dense matmul of those rows, bit for bit, for both activations and for
    fp32 and bf16 outputs (bf16: the large groups used to take bf16 panels; now the exact kernel)."""
    sizes = [0, 1, 5, 16, 200, 37, 0, 3]
    g = len(sizes)
    wq, ws = reference.quantize(torch.randn(g, 96, 384), (128, 128), E4M3, "fp32")
    x = torch.randn(sum(sizes), 384).bfloat16()
    gs = torch.tensor(sizes, dtype=torch.int32)
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    for act in ("none", "dynamic"):
        for out_dtype in (torch.float32, torch.bfloat16):
            y = cpu.grouped_matmul(x, wq, ws, gs, (128, 128), None, out_dtype, act)
            ref = reference.grouped_matmul(x, wq, ws, gs, (128, 128), None, out_dtype, act)
            assert_kernel_close(y, ref, f"{act} {out_dtype}")
            for e, (s, t) in enumerate(zip(bounds, bounds[1:], strict=False)):
                if t > s:
                    dense = _dense(x[s:t], wq[e], ws[e], (128, 128), out_dtype, act)
                    assert torch.equal(y[s:t], dense), (act, out_dtype, e)


def test_result_does_not_depend_on_threads(lib):
    """Tasks are (group, 192-row chunk, 64-column panel): every output element has one owner, so
    1 and 2 threads give the same bits (M = 400: three row chunks)."""
    wq, ws = reference.quantize(torch.randn(200, 640), (128, 128), E4M3, "fp32")
    x = torch.randn(400, 640).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _dense(x, wq, ws, (128, 128), act="dynamic")
        torch.set_num_threads(2)
        two = _dense(x, wq, ws, (128, 128), act="dynamic")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_kept_scratch_never_leaks_into_a_later_call(lib):
    """The activation copies the calling thread keeps between calls (fp8_cpu.c's scratch_take) are
    written whole before they are read: a small ragged W8A8 product after a large one (its arrays
    hold the large call's nan rows: a stale value read anywhere, padding included, would make a
    nan) equals the same product on freshly made arrays, bit for bit."""
    wq, ws = reference.quantize(torch.randn(3, 200, 1024), (128, 128), E4M3, "fp32")
    big = torch.full((600, 1024), float("nan"), dtype=torch.bfloat16)
    cpu.grouped_matmul(
        big,
        wq,
        ws,
        torch.tensor([300, 0, 300], dtype=torch.int32),
        (128, 128),
        None,
        torch.float32,
        "dynamic",
    )
    x, gs = torch.randn(53, 1000).bfloat16(), torch.tensor([17, 0, 36], dtype=torch.int32)
    w2, ws2 = reference.quantize(torch.randn(3, 150, 1000), (128, 128), E4M3, "fp32")
    after_big = cpu.grouped_matmul(x, w2, ws2, gs, (128, 128), None, torch.float32, "dynamic")
    cpu_kernels.release_scratch()
    fresh = cpu.grouped_matmul(x, w2, ws2, gs, (128, 128), None, torch.float32, "dynamic")
    assert torch.equal(after_big, fresh) and fresh.isfinite().all()
    ref = reference.grouped_matmul(x, w2, ws2, gs, (128, 128), None, torch.float32, "dynamic")
    assert_kernel_close(fresh, ref)
