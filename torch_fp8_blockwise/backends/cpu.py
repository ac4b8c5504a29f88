"""CPU backend: compiled fp8 kernels (``cpu_kernels/fp8_cpu.c``) with a pure-torch fallback.

How a matmul runs (x [M, K], w [N, K] fp8, N = K = 4096 numbers in docs/cpu.md):

* The activation becomes float32 [M, K] first, inside the C code: W8A16 converts it, W8A8
  quantizes it to e4m3 in 1 x bk groups and dequantizes it again (bit for bit the reference's
  quantization: the loss W8A8 promises), fp8 x with x_scale is dequantized. O(M K).
* M <= ``SMALL_M``: ONE call of the fused C GEMM (activation, product, bias and output cast):
  each thread widens 4 weight rows x 512 K of fp8 into float32 times their block scale (integer
  ops + F16C, exact) in L1 and multiplies them with all M rows; the weight is read once and no
  dequantized copy exists (extra memory: the fp32 activation, 8 KB per thread and the output).
  On an AVX512-BF16 CPU the same call runs ``vdpbf16ps`` on exact bf16 operands where they exist
  (W8A16 with bf16 x; W8A8's e4m3 codes with their scales per K block), decided inside C
  (docs/cpu.md; ``FP8_CPU_ISA=avx2`` turns it off).
* M = 1 (decode) on ISA 2 with AVX512-VBMI, e4m3 weights with bk a multiple of 64 and a
  bf16-exact activation: the same call runs fp8_cpu.c's one-row GEMV (``gemv_bf16_rows``: codes
  widened to bf16 in registers by byte lookups, ``vdpbf16ps``), 0.58-0.69x bf16 ``F.linear``'s
  time at SmolLM2's shapes (docs/cpu.md).
* M > ``SMALL_M`` (and, for weights under 2M elements, M > 256): the weight is dequantized in panels of ``PANEL`` rows into one reused fp32
  buffer ([PANEL, K], 8 MB at K = 4096) and each panel goes to torch's fp32 GEMM (MKL /
  oneDNN), so the big product runs at torch's speed; the dequantized weight never exists whole.
  With bf16 output on a CPU with native bf16 GEMM (AVX512-BF16 / AMX), the panels and the
  activation are bf16 instead (``BF16_PANELS``). On an AVX512-BF16 CPU, where bf16 operands are
  exact, the AVX512-BF16 kernels take large M too, whatever the output dtype: from 16 rows the
  packed kernel (fp8_cpu.c's bf16_run_packed: outer-product register blocks on k-pair panels, at
  about torch's bf16 GEMM rate, exact, no dequantized panel), and on a CPU with AMX-BF16 tiles
  from 2 rows the AMX kernel (amx_run; the rule is fp8_cpu.c's bf16_kernel_of). The grouped ops route each group by the same rule,
  except that on a CPU with AVX-512 (``AVX512_GEMM``) a group of ``GROUPED_PANEL_MIN_M`` rows or more
  takes the panels whatever its weight's size (``uses_fused_gemm(grouped=True)``).

Why dequantize-then-multiply is within the kernel-error bound of the W8A8 reference: the scale of
a product term depends on (m, kb) for x and on (n // bn, kb) for w, both constant inside a K
block, so ``sum_kb (sum_k xq*wq) * xs * ws == sum_k (xq*xs)[m, k] * (wq*ws)[n, k]``; each
dequantized operand is exact up to one fp32 rounding, so the two differ only by fp32 rounding order.

Boundary: every tensor whose pointer goes to C passes :func:`_c` (contiguous, else a copy); a
C error code becomes MemoryError / RuntimeError (:func:`_raise_c_error`), never abort().

The fp32 overflow edge: the kernels scale the operands before the product, the reference scales
each K block's partial sum; near fp32's limit the order decides between finite, inf and nan.
``fp8_overflow_edge`` (C; :func:`at_overflow_edge`, :func:`_at_edge_torch`) flags such inputs, and
they get :mod:`reference`'s result on every path, so no result depends on M (docs/cpu.md).

Fallback: when the kernels cannot be built or are disabled (``FP8_CPU_KERNELS=0``; the reason is
in :func:`kernel_status`), the same ops run as vectorized torch code (one fp32 GEMM per matmul,
no Python loop over blocks), about 50x slower at M = 1 because torch widens fp8 with a scalar
loop (0.2 Gelem/s). Both paths are tested against the reference.

Canonical signatures and semantics: :mod:`torch_fp8_blockwise.reference`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import reference
from .._memory import empty
from ..formats import MX_BLOCK, cdiv, compute_scale, e8m0_to_float, float_to_e8m0, fp8_max
from . import cpu_kernels, cpu_native

#: Largest M served by the fused C GEMM; above it torch's GEMM on dequantized panels is faster
#: (measured crossover on 2 Zen3 cores, N = K = 4096: see docs/cpu.md).
SMALL_M = 48
#: Weights of fewer elements use the fused GEMM up to M = SMALL_WEIGHT_MAX_M: at M = 64 it costs
#: the same CPU time as panels for SmolLM2's 576 x 576 and 1536 x 576 weights, in one parallel
#: region instead of ~7 (each region's barrier can wait a time slice on a busy machine).
SMALL_WEIGHT = 1 << 21
SMALL_WEIGHT_MAX_M = 256
#: Weight rows per dequantized panel for M > SMALL_M (a multiple of every bn; 4 MB of fp32 at K = 4096).
PANEL = 512


def uses_fused_gemm(m: int, n: int, k: int, *, grouped: bool = False) -> bool:
    """Whether an [m, k] x [n, k]^T product runs the fused C GEMM (else dequantized panels + torch's
    GEMM): the one rule, used here and by the grouped ops per group (``grouped=True``: a group of
    ``GROUPED_PANEL_MIN_M`` rows or more takes the panels whatever its weight's size on a CPU with
    AVX-512, ``AVX512_GEMM``)."""
    if grouped and AVX512_GEMM and m >= GROUPED_PANEL_MIN_M:
        return False
    return m <= SMALL_M or (m <= SMALL_WEIGHT_MAX_M and n * k < SMALL_WEIGHT)


def _cpu_flags() -> set[str]:
    """The first CPU's flags in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 (torch's bf16 GEMM is then ~2x its fp32 GEMM; without them it is
    many times slower than fp32: 2453 vs 447 ms at M = 256, N = K = 4096 on AVX2-only Zen3)."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def _cpu_has_avx512() -> bool:
    """AVX-512 F: torch's GEMM (MKL / oneDNN) then runs 512-bit FMAs, our fused C GEMM AVX2 ones."""
    return "avx512f" in _cpu_flags()


#: CPU with AVX-512 (see :func:`uses_fused_gemm`'s ``grouped`` rule).
AVX512_GEMM = _cpu_has_avx512()
#: Rows from which a grouped op's group takes the panels on an AVX-512 CPU even for a weight under
#: SMALL_WEIGHT. Panels / fused GEMM CPU time on one Zen 4 thread (fp32 output, medians of 11
#: interleaved rounds, docs/grouped.md): N x K = 2048 x 768: 0.98 at 64 rows, 0.85 at 96, 0.85 at 128, 0.81 at 256;
#: 768 x 2048: 1.03 / 0.93 / 0.94 / 0.83; 1408 x 1024: 1.14 / 1.01 / 1.00 / 0.88. The dense op keeps
#: its rule (its figures in docs/cpu.md were measured on AVX2-only Zen 3).
GROUPED_PANEL_MIN_M = 96

#: Large-M panels in bf16 (bf16 output only); FP8_CPU_PANEL_DTYPE=bf16 / fp32 overrides the CPU check.
BF16_PANELS = {"bf16": True, "fp32": False}.get(
    os.environ.get("FP8_CPU_PANEL_DTYPE", ""), _cpu_has_native_bf16()
)

_KIND = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}
_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def kernel_status() -> str:
    """Whether the compiled kernels run ("compiled (avx2): <path>", "compiled (avx512bf16): <path>")
    or why the torch path is used."""
    return cpu_kernels.status()


def _lib():
    lib = cpu_kernels._lib
    return cpu_kernels.library() if lib is cpu_kernels._UNSET else lib


# ---------------------------------------------------------------------- the boundary to C
def _c(t: torch.Tensor) -> torch.Tensor:
    """THE boundary to the C kernels: every tensor whose ``data_ptr()`` this backend hands to
    ``fp8_cpu.c`` passes here first. The kernels read each operand as dense row-major memory of its
    own dtype (element (i, j) of an [R, C] operand at ``ptr + (i * C + j) * itemsize``): a strided
    view (``t[:, 0]``), a broadcast (``expand``, stride 0) or a transpose read that way gives wrong
    numbers or reads past the storage. Returns ``t`` itself when it is contiguous (the common case:
    one check), else a contiguous copy, which the caller must hold until the C call returns.
    Weights never arrive here strided (the ops refuse them: a per-call weight copy would be slow),
    activations, scales and bias may (a copy of those is O(M K) or smaller)."""
    return t.contiguous()


def _raise_c_error(rc: int, op: str, nbytes: int) -> None:
    """A C kernel's error code as the Python exception (the C code never aborts the process)."""
    if rc == cpu_kernels.ERR_NOMEM:
        raise MemoryError(f"{op}: the CPU kernel could not allocate {nbytes} bytes of scratch memory")
    raise RuntimeError(f"{op}: the CPU kernel returned error code {rc}")


def _at_edge_torch(xd: torch.Tensor, x_scale: torch.Tensor | None, w_scale: torch.Tensor, kind) -> bool:
    """fp8_cpu.c's ``fp8_overflow_edge`` in torch (the fallback path's twin; see there): xd the
    dequantized float32 activation [M, K]."""
    k = xd.shape[-1]
    a = xd.abs().nan_to_num(nan=0.0).amax().item() if xd.numel() else 0.0
    bad = not bool(w_scale.isfinite().all()) or (x_scale is not None and not bool(x_scale.isfinite().all()))
    wm = w_scale.abs().amax().item() if w_scale.numel() else 0.0
    return bad or not (k * fp8_max(kind) * a * max(wm, 1.0) < 2.0**124)


# ------------------------------------------------------------------------- pure-torch fallback
def _blocked(x: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    """[B, R, C] -> [B, RB, br, CB, bc], zero-padding ragged edges (a view when aligned)."""
    _, rows, cols = x.shape
    pad_r, pad_c = cdiv(rows, br) * br - rows, cdiv(cols, bc) * bc - cols
    if pad_r or pad_c:
        x = F.pad(x, (0, pad_c, 0, pad_r))
    b, rows_p, cols_p = x.shape
    return x.view(b, rows_p // br, br, cols_p // bc, bc)


def _unblocked(xb: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    b, rb, br, cb, bc = xb.shape
    return xb.reshape(b, rb * br, cb * bc)[:, :rows, :cols]


def _quantize_f32(
    x: torch.Tensor, block_shape: tuple[int, int], dtype: torch.dtype, scale_format: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize [B, R, C]; returns q as float32 values already on the fp8 grid, and the scale."""
    _, rows, cols = x.shape
    xb = _blocked(x.float(), *block_shape)
    # nan/inf must not set the block's scale (see reference): count them as 0 for amax.
    amax = torch.nan_to_num(xb.abs(), nan=0.0, posinf=0.0).amax(dim=(2, 4))
    scale = compute_scale(amax, dtype, scale_format)
    big = fp8_max(dtype)
    qb = (xb / scale[:, :, None, :, None]).clamp_(-big, big)
    return _unblocked(qb, rows, cols), scale


def _torch_quantize(
    x: torch.Tensor, block_shape: tuple[int, int], dtype: torch.dtype, scale_format: str
) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = _quantize_f32(x, block_shape, dtype, scale_format)
    return q.to(dtype), scale


def _dequantize_f32(q: torch.Tensor, scale: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """[B, R, C] fp8 -> float32 ``q * scale`` with the scale broadcast per block (no expansion)."""
    _, rows, cols = q.shape
    qb = _blocked(q.float(), *block_shape)
    return _unblocked(qb.mul_(scale.float()[:, :, None, :, None]), rows, cols)


def _torch_dequantize(
    q: torch.Tensor, scale: torch.Tensor, block_shape: tuple[int, int], out_dtype: torch.dtype
) -> torch.Tensor:
    return _dequantize_f32(q, scale, block_shape).to(out_dtype)


def _dequantize_weight(w: torch.Tensor, w_scale: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """[N, K] fp8 weight -> float32 [N, K] (the hot spot; see the module docstring)."""
    return _dequantize_f32(w[None], w_scale[None], block_shape)[0]


def _torch_blockwise_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    block_shape: tuple[int, int],
    x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str,
) -> torch.Tensor:
    bk = block_shape[1]
    if x_scale is not None:
        xd = _dequantize_f32(x[None], x_scale[None], (1, bk))[0]
    elif activation == "dynamic":
        xq, xs = _quantize_f32(x[None], (1, bk), torch.float8_e4m3fn, "fp32")
        # Round to the e4m3 grid (the quantization loss W8A8 promises), then rescale in fp32.
        xd = _dequantize_f32(xq.to(torch.float8_e4m3fn), xs, (1, bk))[0]
    else:
        xd = x.float()
    if _at_edge_torch(xd, x_scale, w_scale, w.dtype):
        return reference.blockwise_matmul(x, w, w_scale, block_shape, x_scale, bias, out_dtype, activation)
    wd = _dequantize_weight(w, w_scale, block_shape)
    y = xd @ wd.T if bias is None else torch.addmm(bias.float(), xd, wd.T)
    return y.to(out_dtype)


# ------------------------------------------------------------------------------ compiled path
def quantize(
    x: torch.Tensor, block_shape: tuple[int, int], dtype: torch.dtype, scale_format: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, R, C] -> (q [B, R, C] ``dtype``, scale [B, cdiv(R, br), cdiv(C, bc)] float32)."""
    lib = _lib()
    if lib is None:
        return _torch_quantize(x, block_shape, dtype, scale_format)
    x = _c(x)
    b, rows, cols = x.shape
    br, bc = block_shape
    q = torch.empty(x.shape, dtype=dtype)
    scale = torch.empty(b, cdiv(rows, br), cdiv(cols, bc), dtype=torch.float32)
    lib.fp8_quantize(
        x.data_ptr(), _DT[x.dtype], b, rows, cols, br, bc, _KIND[dtype], scale_format == "ue8m0",
        q.data_ptr(), scale.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return q, scale


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, block_shape: tuple[int, int], out_dtype: torch.dtype
) -> torch.Tensor:
    """q [B, R, C] fp8, scale [B, cdiv(R, br), cdiv(C, bc)] float32 -> [B, R, C] ``out_dtype``."""
    lib = _lib()
    if lib is None:
        return _torch_dequantize(q, scale, block_shape, out_dtype)
    q, scale = _c(q), _c(scale.float())
    out = empty(*q.shape, dtype=out_dtype)
    b, rows, cols = q.shape
    lib.fp8_dequantize(
        q.data_ptr(), _KIND[q.dtype], scale.data_ptr(), b, rows, cols, *block_shape,
        out.data_ptr(), _DT[out_dtype], torch.get_num_threads(),
    )  # fmt: skip
    return out


def blockwise_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    block_shape: tuple[int, int],
    x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str,
    *,
    edge_checked: bool = False,
    grouped: bool = False,
) -> torch.Tensor:
    """x [M, K], w [N, K] fp8 (contiguous), w_scale [cdiv(N, bn), cdiv(K, bk)] float32,
    x_scale [M, cdiv(K, bk)] float32 or None -> y [M, N] (the op checked dtypes and shapes: no
    per-call cast of the scales here; ``_c`` only checks their layout).

    edge_checked: the caller has already found these operands clear of the overflow edge
    (:func:`at_overflow_edge`; the grouped op checks all its rows at once), so the panel path
    does not check again. grouped: route by the grouped ops' rule (``uses_fused_gemm(grouped=True)``)."""
    if not cpu_native._tried:  # the first call: build / load the C++ kernel for the calls after it
        cpu_native.install()
    lib = _lib()
    if lib is None:
        return _torch_blockwise_matmul(x, w, w_scale, block_shape, x_scale, bias, out_dtype, activation)
    bn, bk = block_shape
    (m, k), n = x.shape, w.shape[0]
    args = (x, w, w_scale, block_shape, x_scale, bias, out_dtype, activation)  # for the edge path
    x, w = _c(x), _c(w)
    # The activation as the C code reads it: high precision (converted, or quantized to e4m3 and
    # dequantized for dynamic W8A8), or fp8 bytes (codes 3, 4) with their scales.
    xdt = _DT[x.dtype] if x_scale is None else 3 + _KIND[x.dtype]
    xs = 0 if x_scale is None else _c(x_scale)
    dynamic = x_scale is None and activation == "dynamic"
    ws = _c(w_scale)
    threads, kind = torch.get_num_threads(), _KIND[w.dtype]
    if uses_fused_gemm(m, n, k, grouped=grouped):
        bias = None if bias is None else _c(bias)
        y = torch.empty(m, n, dtype=out_dtype)  # (small: M <= SMALL_M, and a call less per decode step)
        rc = lib.fp8_gemm(
            x.data_ptr(), xdt, 0 if x_scale is None else xs.data_ptr(), dynamic, m, w.data_ptr(), kind,
            ws.data_ptr(), n, k, bn, bk, None if bias is None else bias.data_ptr(),
            0 if bias is None else _DT[bias.dtype], y.data_ptr(), _DT[out_dtype], threads,
        )  # fmt: skip
        if rc == cpu_kernels.EDGE:
            return reference.blockwise_matmul(*args)
        if rc:
            _raise_c_error(rc, "blockwise_matmul", 4 * m * (k + 4 * threads))
        return y
    # Large M on an AVX512-BF16 CPU: the bf16 kernels where they are exact (the packed or the AMX
    # kernel, no panel; the grouped op's rule), else the panels below.
    if bias is None and lib.fp8_get_isa() == 2:
        y = empty(m, n, dtype=out_dtype)
        rc = cpu_grouped._fused_bf16(
            lib, x, x_scale, activation, [(0, 0, 0, m)], w[None], ws[None], block_shape, y, out_dtype
        )
        if rc == cpu_kernels.EDGE:
            return reference.blockwise_matmul(*args)
        if rc == 0:
            return y
    # Large M: the GEMM runs in torch, on panels of dequantized weight. bf16 panels only where
    # the CPU multiplies bf16 natively and the output is bf16 (rounding the operands to bf16 costs
    # ~1e-3 relative error, inside the bf16 output's bound, not inside fp32's 1e-3).
    gemm_dtype = torch.bfloat16 if out_dtype == torch.bfloat16 and BF16_PANELS else torch.float32
    if xdt == _DT[gemm_dtype] and not dynamic:
        xf = x
    else:
        xf = torch.empty(m, k, dtype=torch.float32)
        lib.fp8_prepare_x(
            x.data_ptr(), xdt, 0 if x_scale is None else xs.data_ptr(), dynamic, m, k, bk, xf.data_ptr(), threads
        )  # fmt: skip
    if not edge_checked and at_overflow_edge(lib, xf, None if x_scale is None else xs, ws, kind):
        return reference.blockwise_matmul(*args)
    xf = xf.to(gemm_dtype)
    # y^T panel by panel (a contiguous slice of y^T is a valid out= for mm), bias fused into addmm,
    # then one pass that transposes and casts.
    panel = max(PANEL, bn)
    buf = torch.empty(min(panel, n), k, dtype=gemm_dtype)
    yt = torch.empty(n, m, dtype=gemm_dtype)
    row_bytes, scale_row_bytes = k * w.element_size(), ws.shape[1] * 4
    for n0 in range(0, n, panel):
        rows = min(panel, n - n0)
        lib.fp8_dequantize(
            w.data_ptr() + n0 * row_bytes, kind, ws.data_ptr() + (n0 // bn) * scale_row_bytes,
            1, rows, k, bn, bk, buf.data_ptr(), _DT[gemm_dtype], threads,
        )  # fmt: skip
        if bias is None:
            torch.mm(buf[:rows], xf.T, out=yt[n0 : n0 + rows])
        else:
            torch.addmm(bias[n0 : n0 + rows, None].to(gemm_dtype), buf[:rows], xf.T, out=yt[n0 : n0 + rows])
    return empty(m, n, dtype=out_dtype).copy_(yt.T)


def at_overflow_edge(
    lib, xf: torch.Tensor, x_scale: torch.Tensor | None, w_scale: torch.Tensor, kind: int
) -> bool:
    """``fp8_overflow_edge`` (fp8_cpu.c) on xf [M, K] (the activation as the GEMM multiplies it,
    float32 / bf16 / fp16, contiguous), x_scale (fp8 x only) and w_scale (float32, contiguous; every
    scale the product uses): True where only the reference's order of scaling gives the
    contract's result (then the caller returns ``reference``'s, whatever M is)."""
    xs, nxs = (0, 0) if x_scale is None else (x_scale.data_ptr(), x_scale.numel())
    edge = lib.fp8_overflow_edge(
        xf.data_ptr(), _DT[xf.dtype], xf.numel(), xs, nxs, w_scale.data_ptr(), w_scale.numel(), xf.shape[-1],
        kind, torch.get_num_threads(),
    )  # fmt: skip
    return bool(edge)


def mxfp8_quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = quantize(x[None], (1, MX_BLOCK), dtype, "ue8m0")
    return q[0], float_to_e8m0(scale[0])


def mxfp8_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if x_scale is None:
        x, x_scale = mxfp8_quantize(x, torch.float8_e4m3fn)
    return blockwise_matmul(
        x, w, e8m0_to_float(w_scale), (1, MX_BLOCK), e8m0_to_float(x_scale), bias, out_dtype, "dynamic"
    )


from . import cpu_grouped  # noqa: E402
from .cpu_grouped import grouped_matmul, grouped_matmul_transposed  # noqa: E402, F401
