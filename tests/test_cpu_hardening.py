"""The CPU backend under hostile input (issue 17, items 1, 2, 3 and 11).

* Layouts at the boundary to C: every tensor whose pointer reaches fp8_cpu.c is contiguous first
  (``cpu._c``); a strided or broadcast bias gave wrong numbers on the fused path and read past its
  storage (SIGSEGV at N = 2^22), so those cases run in a subprocess.
* The kernel cache: a library is loaded only when its size and sha256 match the record written
  after its build; a truncated / zeroed / replaced file (SIGBUS / SIGSEGV inside ctypes.CDLL
  before) is rebuilt, or the torch path is used when the rebuild fails.
* Out of memory: fp8_gemm returns an error code instead of abort(); Python raises MemoryError
  naming the op and the size (run under RLIMIT_AS in a subprocess).
* The fp32 overflow edge: at inputs where the order of scaling decides between finite, inf and
  nan, every path (fused AVX2 GEMV at M = 1, fused tile GEMM, dequantized panels, scalar ISA, pure
  torch, grouped, mxfp8) gives the reference's result, so the result never depends on M.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from cpu_kernel_helpers import compiled_or_fail, python_kernels_only, restore_isa, use_isa

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise import reference
from torch_fp8_blockwise.backends import cpu, cpu_kernels
from torch_fp8_blockwise.testing import assert_kernel_close

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": ROOT, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(params=["amx", "avx512bf16", "avx2", "scalar", "torch"])
def path(request, monkeypatch):
    """Run the test body on one of the CPU backend's paths (as test_cpu_kernels.py). "avx2": without the AVX512-BF16 GEMM; "avx512bf16" skipped where the CPU lacks it."""
    if request.param == "torch":
        python_kernels_only(monkeypatch)
        monkeypatch.setattr(cpu_kernels, "_lib", None)
        yield "torch"
        return
    lib = compiled_or_fail()
    before = use_isa(lib, request.param)
    yield request.param
    restore_isa(lib, before)


# ------------------------------------------------------------------------ 1. layouts at the C boundary
_LAYOUTS = """
import torch, torch_fp8_blockwise as tfb
from torch_fp8_blockwise import reference
from torch_fp8_blockwise.backends import cpu, cpu_grouped, cpu_kernels
from torch_fp8_blockwise.testing import assert_kernel_close
torch.manual_seed(0)
E4M3 = torch.float8_e4m3fn
lib = cpu_kernels.library()
assert lib is not None, cpu.kernel_status()
N, K = 256, 384
wq, ws = (t[0] for t in reference.quantize(torch.randn(1, N, K), (128, 128), E4M3, "fp32"))
mq, ms = reference.mxfp8_quantize(torch.randn(N, K), E4M3)
biases = {
    "stride-2 view": torch.randn(N, 2)[:, 0],
    "expand()ed [1]": torch.tensor([0.5]).expand(N),
    "column of a transposed bf16": torch.randn(3, N, dtype=torch.bfloat16).T[:, 1],
}
for isa in (1, 0):
    lib.fp8_set_isa(isa)
    for m in (1, 3, 64, 300):  # fused GEMV, fused GEMM (also at 64: a small weight), panels
        x = torch.randn(m, K)
        for what, bias in biases.items():
            for act in ("dynamic", "none"):
                y = tfb.blockwise_matmul(x, wq, ws, bias=bias, out_dtype=torch.float32, activation=act)
                ref = reference.blockwise_matmul(x, wq, ws, (128, 128), None, bias, torch.float32, act)
                assert_kernel_close(y, ref, f"isa {isa} M={m} {what} {act}")
            y = tfb.mxfp8_matmul(x, mq, ms, bias=bias, out_dtype=torch.float32)
            ref = reference.mxfp8_matmul(x, mq, ms, None, bias, torch.float32)
            assert_kernel_close(y, ref, f"mxfp8 isa {isa} M={m} {what}")
    # The backend functions themselves, handed strided scales and activations (the ops make them
    # contiguous first; the boundary must hold without that).
    x = torch.randn(5, K)
    xq, xs = reference.quantize(x[None], (1, 128), E4M3, "fp32")
    xq, xs = xq[0], xs[0]
    xs_t = xs.T.contiguous().T  # same values, column-major
    ws_t = ws.T.contiguous().T
    for m_rows in (5,):
        y = cpu.blockwise_matmul(xq, wq, ws_t, (128, 128), xs_t, biases["stride-2 view"], torch.float32, "dynamic")
        ref = reference.blockwise_matmul(xq, wq, ws, (128, 128), xs, biases["stride-2 view"], torch.float32, "dynamic")
        assert_kernel_close(y, ref, f"backend strided scales isa {isa}")
    xt = torch.randn(K, 5).T  # [5, K] column-major
    y = cpu.blockwise_matmul(xt, wq, ws, (128, 128), None, None, torch.float32, "dynamic")
    assert_kernel_close(y, reference.blockwise_matmul(xt, wq, ws, (128, 128), None, None, torch.float32, "dynamic"))
    q, s = cpu.quantize(torch.randn(2, K, 256).transpose(1, 2), (1, 128), E4M3, "fp32")
    d = cpu.dequantize(q, s.transpose(1, 2).contiguous().transpose(1, 2), (1, 128), torch.float32)
    assert torch.equal(d, reference.dequantize(q, s, (1, 128), torch.float32))
    gs = torch.tensor([1, 3, 300], dtype=torch.int32)  # a fused group and a panel group
    xg = torch.randn(304, K)
    xgq, xgs = (t[0] for t in reference.quantize(xg[None], (1, 128), E4M3, "fp32"))
    wg = torch.stack([wq, wq, wq])
    wgs = torch.stack([ws, ws * 2, ws / 2]).transpose(1, 2).contiguous().transpose(1, 2)
    y = cpu_grouped.grouped_matmul(xgq, wg, wgs, gs, (128, 128), xgs.T.contiguous().T, torch.float32, "dynamic")
    ref = reference.grouped_matmul(xgq, wg, wgs.contiguous(), gs, (128, 128), xgs, torch.float32, "dynamic")
    assert_kernel_close(y, ref, f"grouped strided scales isa {isa}")
print("LAYOUTS OK")
"""


def test_strided_and_broadcast_operands_reach_c_as_their_values(tmp_path):
    """A stride-2 bias view gave errors up to 4.3 on the fused path; an expand()ed bias read past
    its 4-byte storage. Now every path matches the reference (in a subprocess: a read past the
    storage can crash)."""
    compiled_or_fail()
    out = _run(_LAYOUTS, FP8_CPU_KERNEL_CACHE=str(cpu_kernels.cache_dir()))
    assert out.returncode == 0 and "LAYOUTS OK" in out.stdout, (
        out.returncode,
        out.stdout,
        out.stderr[-3000:],
    )


def test_a_huge_broadcast_bias_does_not_crash():
    """N = 2^20 with an expand()ed one-element bias: SIGSEGV before (the kernel read 4 MB past it)."""
    compiled_or_fail()
    code = """
    import torch, torch_fp8_blockwise as tfb
    n, k = 1 << 20, 128
    wq = torch.zeros(n, k, dtype=torch.float8_e4m3fn)
    ws = torch.ones(n // 128, 1)
    y = tfb.blockwise_matmul(torch.randn(1, k), wq, ws, bias=torch.tensor([0.5]).expand(n), out_dtype=torch.float32)
    assert bool((y == 0.5).all()), y
    print("BIG BIAS OK")
    """
    out = _run(code, FP8_CPU_KERNEL_CACHE=str(cpu_kernels.cache_dir()))
    assert out.returncode == 0 and "BIG BIAS OK" in out.stdout, (out.returncode, out.stderr[-2000:])


# ------------------------------------------------------------------------------- 2. the kernel cache
_CHECK = """
import torch, torch_fp8_blockwise as tfb
from torch_fp8_blockwise import reference
from torch_fp8_blockwise.backends import cpu
from torch_fp8_blockwise.testing import assert_kernel_close
wq, ws = tfb.quantize(torch.randn(300, 200), (128, 128))
x = torch.randn(3, 200)
ref = reference.blockwise_matmul(x, wq, ws, (128, 128), None, None, torch.float32, "dynamic")
assert_kernel_close(tfb.blockwise_matmul(x, wq, ws), ref)
print("STATUS", cpu.kernel_status())
"""


def _text_section(data: bytes) -> tuple[int, int]:
    """(file offset, size) of the .text section of an ELF64 little-endian shared object."""
    shoff = int.from_bytes(data[0x28:0x30], "little")
    shentsize, shnum, shstrndx = (int.from_bytes(data[o : o + 2], "little") for o in (0x3A, 0x3C, 0x3E))

    def header(i):
        h = data[shoff + i * shentsize : shoff + (i + 1) * shentsize]
        return (
            int.from_bytes(h[0:4], "little"),
            int.from_bytes(h[24:32], "little"),
            int.from_bytes(h[32:40], "little"),
        )

    _, str_off, _ = header(shstrndx)
    for i in range(shnum):
        name, off, size = header(i)
        if data[str_off + name : str_off + name + 6] == b".text\0":
            return off, size
    raise AssertionError("no .text section")


def _zero_text(data: bytes) -> bytes:
    off, size = _text_section(data)
    return data[:off] + bytes(size) + data[off + size :]


@pytest.mark.slow
def test_a_damaged_cached_library_is_rebuilt_not_loaded(tmp_path):
    """Each damage, in a fresh process: the library is rebuilt (its bytes match the record again)
    and the result is right. Before, a truncated file died of SIGBUS inside ctypes.CDLL and a zeroed
    text section of SIGSEGV, in every later process."""
    if cpu_kernels.compiler() is None or os.environ.get("FP8_CPU_KERNELS") == "0":
        pytest.skip("no C compiler / kernels disabled")
    # FP8_CPU_OPS_CPP=0: the C library alone in this cache (the C++ op kernel has its own tests)
    env = {"FP8_CPU_KERNEL_CACHE": str(tmp_path), "FP8_CPU_OPS_CPP": "0"}
    first = _run(_CHECK, **env)
    assert first.returncode == 0 and "STATUS compiled" in first.stdout, first.stderr[-2000:]
    (lib,) = tmp_path.glob("*.so")
    record = cpu_kernels.record_path(lib)
    good, good_record = lib.read_bytes(), record.read_text()
    assert good_record == f"{len(good)} {__import__('hashlib').sha256(good).hexdigest()}"
    damages = {
        "truncated to 20 kB": lambda: lib.write_bytes(good[:20000]),
        "zeroed .text": lambda: lib.write_bytes(_zero_text(good)),
        "garbage": lambda: lib.write_bytes(os.urandom(len(good))),
        "empty": lambda: lib.write_bytes(b""),
        "record missing": record.unlink,
        "record of other bytes": lambda: record.write_text(f"{len(good)} {'0' * 64}"),
        "record not text": lambda: record.write_bytes(b"\xff\xfe\x00"),
        "truncated, record truncated too": lambda: (
            lib.write_bytes(good[:20000]),
            record.write_text(good_record[:10]),
        ),
    }
    for what, damage in damages.items():
        damage()
        out = _run(_CHECK, **env)
        assert out.returncode == 0, (what, out.returncode, out.stderr[-2000:])
        assert "STATUS compiled" in out.stdout, (what, out.stdout)
        assert lib.read_bytes() == good or cpu_kernels._verified(lib), what
        assert record.read_text() == cpu_kernels._fingerprint(lib), what
    # Damaged and the rebuild fails (no compiler): the torch path, with the reason, and the right result.
    lib.write_bytes(good[:20000])
    out = _run(_CHECK, CC="false", PATH="/nonexistent", **env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "STATUS no C compiler" in out.stdout or "failed" in out.stdout, out.stdout
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".sha256", ".so"]  # no temporary left behind


# ----------------------------------------------------------------------------------- 3. out of memory
def test_out_of_memory_in_the_fused_gemm_raises_memory_error():
    """fp8_gemm's scratch (the fp32 activation, M * K * 4 bytes) cannot be allocated under an
    address-space limit: MemoryError naming the op and the size (before: abort(), SIGABRT)."""
    compiled_or_fail()
    code = """
    import resource, torch, torch_fp8_blockwise as tfb
    torch.set_num_threads(1)
    k = 1 << 24  # x bf16 32 MB; the kernel's fp32 copy of it: 64 MB
    wq = torch.zeros(4, k, dtype=torch.float8_e4m3fn)
    ws = torch.ones(1, k // 128)
    x = torch.randn(1, k).to(torch.bfloat16)
    tfb.blockwise_matmul(x[:, :256], wq[:, :256].contiguous(), ws[:, :2].contiguous())  # load everything once
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (24 << 20), resource.RLIM_INFINITY))
    try:
        tfb.blockwise_matmul(x, wq, ws)
    except MemoryError as e:
        print("MemoryError:", e)
    """
    out = _run(code, FP8_CPU_KERNEL_CACHE=str(cpu_kernels.cache_dir()), OMP_NUM_THREADS="1")
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "MemoryError: blockwise_matmul: the CPU kernel could not allocate" in out.stdout, out.stdout
    assert str(4 * (1 << 24) + 4 * 4) in out.stdout, out.stdout  # the size it asked for


def test_c_error_codes_become_exceptions():
    with pytest.raises(MemoryError, match="grouped_matmul: .* 1024 bytes"):
        cpu._raise_c_error(cpu_kernels.ERR_NOMEM, "grouped_matmul", 1024)
    with pytest.raises(RuntimeError, match="error code 7"):
        cpu._raise_c_error(7, "blockwise_matmul", 0)


# ----------------------------------------------------------------------------- 11. the fp32 edge
def _same_specials(y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Same nan / +inf / -inf elements as the reference, and kernel-close finite values."""
    y, ref = y.float(), ref.float()
    for name, fn in (("nan", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        got, want = fn(y), fn(ref)
        assert torch.equal(got, want), (
            f"{what}: {name} at {int(got.sum())} elements, reference {int(want.sum())}"
        )
    fin = torch.isfinite(ref)
    if fin.any():
        assert_kernel_close(y[fin], ref[fin], what)


N, K = 256, 384
MS = (1, 2, 64, 300)  # AVX2 GEMV, fused tile GEMM, fused GEMM (small weight), panels


def _weights(dtype=E4M3):
    wq, ws = reference.quantize(torch.randn(1, N, K), (128, 128), dtype, "fp32")
    return wq[0], ws[0]


def _edge_cases():
    """(name, x, w, w_scale, x_scale, activation) at the overflow edge."""
    wq, ws = _weights()
    cases = []
    for m in MS:
        x = torch.randn(m, K)
        big = x.clone()
        big[:, 5] = 1e38  # dynamic W8A8: the case (249 of 256 inf at M = 1, finite at M = 2)
        cases.append((f"x 1e38 dynamic M={m}", big, wq, ws, None, "dynamic"))
        cases.append((f"x 1e38 W8A16 M={m}", big, wq, ws, None, "none"))
        hp = x.clone()
        hp[0, 7] = float("inf")
        cases.append((f"x inf W8A16 M={m}", hp, wq, ws, None, "none"))
        cases.append((f"x 3e38 bf16 dynamic M={m}", big.to(torch.bfloat16), wq, ws, None, "dynamic"))
        xq, xs = (t[0] for t in reference.quantize(x[None], (1, 128), E4M3, "fp32"))
        for val in (float("inf"), 3e38):
            xs_edge = xs.clone()
            xs_edge[:, 1] = val
            cases.append((f"x_scale {val:g} M={m}", xq, wq, ws, xs_edge, "dynamic"))
            ws_edge = ws.clone()
            ws_edge[0, 2] = val
            cases.append((f"w_scale {val:g} M={m}", x, wq, ws_edge, None, "dynamic"))
            cases.append((f"w_scale {val:g} W8A16 M={m}", x, wq, ws_edge, None, "none"))
            cases.append((f"w_scale {val:g} fp8 x M={m}", xq, wq, ws_edge, xs, "dynamic"))
    return cases


EDGE = _edge_cases()


@pytest.mark.parametrize("case", EDGE, ids=[c[0] for c in EDGE])
def test_overflow_edge_matches_the_reference_on_every_path(path, case):
    what, x, wq, ws, xs, act = case
    y = tfb.blockwise_matmul(x, wq, ws, (128, 128), xs, out_dtype=torch.float32, activation=act)
    ref = reference.blockwise_matmul(x, wq, ws, (128, 128), xs, None, torch.float32, act)
    _same_specials(y, ref, f"{path}: {what}")


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("bits", [254, 253, 255])
def test_mxfp8_extreme_e8m0_scales_match_the_reference(path, m, bits):
    """E8M0 254 (2^127) gave nan where the reference gives +-inf (q * scale overflowed before the
    product); 255 is the nan scale."""
    x = torch.randn(m, K)
    mq, ms = reference.mxfp8_quantize(torch.randn(N, K), E4M3)
    ms = ms.clone()
    ms[: N // 2, 3] = bits
    y = tfb.mxfp8_matmul(x, mq, ms, out_dtype=torch.float32)
    _same_specials(
        y, reference.mxfp8_matmul(x, mq, ms, None, None, torch.float32), f"{path} w_scale {bits} M={m}"
    )
    xq, xs = reference.mxfp8_quantize(x, E4M3)
    xs = xs.clone()
    xs[0, 2] = bits
    mq2, ms2 = reference.mxfp8_quantize(torch.randn(N, K), E4M3)
    y = tfb.mxfp8_matmul(xq, mq2, ms2, xs, out_dtype=torch.float32)
    ref = reference.mxfp8_matmul(xq, mq2, ms2, xs, None, torch.float32)
    _same_specials(y, ref, f"{path} x_scale {bits} M={m}")


@pytest.mark.parametrize("edge", ["x 1e38", "w_scale inf", "x_scale 3e38"])
def test_grouped_overflow_edge_matches_the_reference(path, edge):
    """Groups of 1, 3 and 300 rows (GEMV, fused GEMM, panels) in one call."""
    gs = torch.tensor([1, 3, 300], dtype=torch.int32)
    x = torch.randn(304, K)
    w = [_weights() for _ in range(3)]
    wq, ws = torch.stack([a for a, _ in w]), torch.stack([b for _, b in w])
    xs = None
    if edge == "x 1e38":
        x[:, 9] = 1e38
    elif edge == "w_scale inf":
        ws[1, 0, 1] = float("inf")
    else:
        x, xs = (t[0] for t in reference.quantize(x[None], (1, 128), E4M3, "fp32"))
        xs[:, 0] = 3e38
    y = tfb.grouped_matmul(x, wq, ws, gs, (128, 128), xs, out_dtype=torch.float32)
    ref = reference.grouped_matmul(x, wq, ws, gs, (128, 128), xs, torch.float32, "dynamic")
    _same_specials(y, ref, f"{path} grouped {edge}")


def test_results_do_not_depend_on_m_at_the_edge():
    """Row 0 alone (M = 1) and inside batches of 2, 64 and 300 rows: the same elements overflow."""
    wq, ws = _weights()
    x = torch.randn(300, K)
    x[:, 5] = 1e38
    rows = [tfb.blockwise_matmul(x[:m], wq, ws, out_dtype=torch.float32)[0] for m in MS]
    for m, row in zip(MS[1:], rows[1:], strict=True):
        assert torch.equal(row.isinf(), rows[0].isinf()), m


def test_the_edge_rule_leaves_ordinary_inputs_to_the_kernels():
    """fp8_overflow_edge: 0 for randn data (and large but safe scales), 1 once K * fp8_max * max|a|
    * max(max|ws|, 1) reaches 2^124 or a scale is not finite."""
    lib = compiled_or_fail()
    a = torch.randn(4, 512)
    ws = torch.rand(2, 4)

    def edge(a, ws, xs=None):
        return cpu.at_overflow_edge(lib, a.contiguous(), xs, ws.contiguous(), cpu._KIND[E4M3])

    assert not edge(a, ws) and not edge(a * 1e20, ws) and not edge(a, ws * 1e20)
    limit = 2.0**124 / (512 * 448)
    a_at = torch.zeros(1, 512)
    a_at[0, 3] = limit * 1.01
    a_below = a_at * 0.9
    assert edge(a_at, torch.ones(1, 4)) and not edge(a_below, torch.ones(1, 4))
    assert edge(a_below, torch.full((1, 4), 2.0))  # a w_scale above 1 counts
    for bad in (float("inf"), float("nan")):
        assert edge(a, torch.tensor([[1.0, bad]]))
        assert edge(a, ws, torch.tensor([[0.5, bad]]))
    nan_a = a.clone()
    nan_a[0, 0] = float("nan")  # a nan activation propagates in every order: not the edge
    assert not edge(nan_a, ws)
    inf_a = a.clone()
    inf_a[0, 0] = float("inf")
    assert edge(inf_a, ws)
