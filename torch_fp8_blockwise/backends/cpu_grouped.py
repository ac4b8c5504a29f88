"""CPU backend of the grouped (MoE) ops: the dense CPU matmul (``cpu.py``) once per group.

gmm with the compiled kernels (``cpu_kernels/fp8_cpu.c``): the activation of every grouped row is
prepared once, in one C call (W8A8 dynamic: quantized to e4m3 per 1 x bk and dequantized again, bit
for bit the reference's quantization; fp8 x: times its x_scale; W8A16: converted), into a float32
[rows, K] array. Each non-empty group then gets the dense path's kernel for its row count on its
contiguous row slice of that array and ``w[g]`` (W8A16 form: the activation is already final): the
groups of MoE decode size (1-16 rows per expert; ``cpu.uses_fused_gemm``) all go to ONE C call,
``fp8_gemm_grouped``: the fused GEMM, which streams each fp8 weight once and never stores a
dequantized copy, over (group, 4-row weight tile) tasks in one parallel region (a parallel region
per group cost a barrier each, and on a busy machine a barrier waits for a descheduled thread: 6x
swings at 64 groups); at prefill sizes ``cpu.blockwise_matmul`` (dequantized 512-row weight panels
and torch's GEMM). The activation rule is per row, so preparing
all rows at once equals preparing each group's rows. Reading group_sizes here is free (CPU), so the
row ranges are plain Python slices; the loop runs over groups (G iterations), never over rows or
blocks.

On an AVX512-BF16 CPU (ISA 2) every group, decode-sized or not, goes first to
``fp8_gemm_grouped_x``, which takes x as the op does and, where bf16 operands are exact (W8A16
bf16 x, W8A8), prepares the activation, checks the overflow edge over those rows and runs the bf16
kernels in ONE call (``_fused_bf16``; each group on the kernel for its rows: fp8_cpu.c's
bf16_kernel_of); it refuses (nothing written) for fp32 / fp16 W8A16 x, which then takes the paths
above.

Without the kernels (``FP8_CPU_KERNELS=0``, no compiler), gmm is the pure-torch form of the same
rule: activation dequantized to float32 once, each group's weight dequantized to float32 and one
fp32 GEMM per group.

tgmm: x and dy are quantized per (block_m rows x 1 column) at absolute row offsets. That is a row
block of the transposed operand, so both are transposed once ([K, M] and [N, M], rows contiguous)
and go through ``cpu.quantize`` / ``cpu.dequantize`` with (1, block_m) blocks (C kernels, or their
torch fallback): 4-5x cheaper than column blocks on the row-major array (strided reads), with the
same blocks, hence the same scales and codes bit for bit. A block that straddles a group boundary
gives its one scale to both groups' rows. Then ``out[g] = xd^T[:, rows_g] @ (dyd^T[:, rows_g])^T``
in fp32 (torch's GEMM takes the strided slices as they are).

Why per-group dequantize-then-multiply meets the kernel-error bound: see ``cpu.py``'s docstring
(every scale is constant inside the block it multiplies; the difference is fp32 summation order).
Canonical signatures and semantics: :mod:`torch_fp8_blockwise.reference`.
"""

from __future__ import annotations

import torch

from .. import reference
from .._memory import empty
from ..reference import group_bounds
from . import cpu_kernels


def _row_ranges(group_sizes: torch.Tensor, m: int) -> list[tuple[int, int, int]]:
    """(group, start, end) of every non-empty group, clipped to [0, m)."""
    starts, ends = group_bounds(group_sizes, m)
    pairs = zip(starts.tolist(), ends.tolist(), strict=True)
    return [(g, s, e) for g, (s, e) in enumerate(pairs) if e > s]


def _torch_activation_f32(
    x: torch.Tensor, x_scale: torch.Tensor | None, bk: int, activation: str
) -> torch.Tensor:
    """x [M, K] as the float32 operand of the GEMM (the rule of cpu._torch_blockwise_matmul)."""
    if x_scale is not None:
        return cpu._dequantize_f32(x[None], x_scale[None], (1, bk))[0]
    if activation == "dynamic":
        xq, xs = cpu._quantize_f32(x[None], (1, bk), torch.float8_e4m3fn, "fp32")
        return cpu._dequantize_f32(xq.to(torch.float8_e4m3fn), xs, (1, bk))[0]
    return x.float()


def _compiled_activation_f32(
    lib, x: torch.Tensor, x_scale: torch.Tensor | None, bk: int, activation: str
) -> torch.Tensor:
    """x [M, K] contiguous (fp8 with x_scale [M, cdiv(K, bk)], or bf16/fp16/fp32) -> float32 [M, K]
    in one ``fp8_prepare_x`` call; fp32 x under W8A16 is already the operand and is returned as is."""
    dynamic = x_scale is None and activation == "dynamic"
    if x.dtype == torch.float32 and not dynamic and x_scale is None:
        return cpu._c(x)
    m, k = x.shape
    x = cpu._c(x)
    xdt = cpu._DT[x.dtype] if x_scale is None else 3 + cpu._KIND[x.dtype]
    xs = None if x_scale is None else cpu._c(x_scale.float())
    xf = torch.empty(m, k, dtype=torch.float32)
    lib.fp8_prepare_x(
        x.data_ptr(), xdt, 0 if xs is None else xs.data_ptr(), dynamic, m, k, bk, xf.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return xf


def _fused_bf16(
    lib,
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    activation: str,
    fused: list[tuple[int, int, int, int]],
    w: torch.Tensor,
    w_scale: torch.Tensor,
    block_shape: tuple[int, int],
    y: torch.Tensor,
    out_dtype: torch.dtype,
) -> int:
    """The fused groups ((group, row in x, row in y, rows) each) in ONE ``fp8_gemm_grouped_x`` call
    on x [M', K] as the op takes it (its activation rule applied in C), w [G, N, K] and w_scale
    contiguous: 0 (y's rows written), ``cpu_kernels.EDGE`` (fp32's overflow edge over x's rows:
    nothing written) or ``cpu_kernels.NOT_BF16`` (the bf16 kernels are not exact for this
    activation: nothing written, the caller takes the fp32 kernels)."""
    x = cpu._c(x)
    xdt = cpu._DT[x.dtype] if x_scale is None else 3 + cpu._KIND[x.dtype]
    xs = None if x_scale is None else cpu._c(x_scale.float())
    gid, x_row, y_row, rows = torch.tensor(fused, dtype=torch.int64).T.contiguous()
    threads = torch.get_num_threads()
    rc = lib.fp8_gemm_grouped_x(
        x.data_ptr(), xdt, 0 if xs is None else xs.data_ptr(), x_scale is None and activation == "dynamic",
        x.shape[0], len(fused), gid.data_ptr(), x_row.data_ptr(), y_row.data_ptr(), rows.data_ptr(),
        w.data_ptr(), cpu._KIND[w.dtype], w_scale.data_ptr(), w.shape[0], w.shape[1], w.shape[2], *block_shape,
        y.data_ptr(), cpu._DT[out_dtype], threads,
    )  # fmt: skip
    if rc == cpu_kernels.ERR_NOMEM:
        cpu._raise_c_error(rc, "grouped_matmul", 2 * x.numel() + 256 * int(rows.max()) * 4 * threads)
    return rc


def grouped_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    group_sizes: torch.Tensor,
    block_shape: tuple[int, int],
    x_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str,
) -> torch.Tensor:
    """x [M, K] contiguous (rows sorted by group), w [G, N, K] fp8 contiguous, w_scale
    [G, cdiv(N, bn), cdiv(K, bk)] float32, group_sizes [G] int32 (CPU), x_scale [M, cdiv(K, bk)]
    float32 or None -> y [M, N] out_dtype; rows at or past sum(group_sizes) are 0."""
    m, n, k = x.shape[0], w.shape[1], w.shape[2]
    ranges = _row_ranges(group_sizes, m)
    if not ranges:
        return torch.zeros(m, n, dtype=out_dtype)
    lo, hi = ranges[0][1], ranges[-1][2]  # rows outside [lo, hi) belong to no group
    # Every row in [lo, hi) is written by its group's kernel: only the others are zero-filled.
    y = empty(m, n, dtype=out_dtype)
    y[:lo].zero_()
    y[hi:].zero_()
    xs = None if x_scale is None else x_scale[lo:hi]
    lib = cpu._lib()
    args = (x, w, w_scale, group_sizes, block_shape, x_scale, out_dtype, activation)  # for the edge path
    if lib is None:
        xd = _torch_activation_f32(x[lo:hi], xs, block_shape[1], activation)
        if cpu._at_edge_torch(xd, xs, w_scale, w.dtype):
            return reference.grouped_matmul(*args)
        for g, s, e in ranges:
            wd = cpu._dequantize_weight(w[g], w_scale[g], block_shape)
            y[s:e] = (xd[s - lo : e - lo] @ wd.T).to(out_dtype)
        return y
    w, w_scale = cpu._c(w), cpu._c(w_scale.float())
    # Decode-sized groups go to ONE C call (one parallel region: a barrier per call, not per group,
    # and no per-group Python); larger groups take the dense large-M path on their rows.
    fused = [(g, s - lo, s, e - s) for g, s, e in ranges if cpu.uses_fused_gemm(e - s, n, k, grouped=True)]
    # The AVX512-BF16 kernels where they are exact (fp8_cpu.c) and pay: the dense rule per group
    # (fp8_cpu.c's bf16_pays; one row: the VBMI GEMV of e4m3 weights, else only a weight of
    # GEMV_PAR_MIN elements or more), so a group's rows stay exactly the dense matmul's; and the
    # panel groups too, whatever the output dtype: from 16 rows fp8_cpu.c's packed kernel, exact,
    # no dequantized panel, at about torch's bf16 GEMM rate (Qwen3-30B-A3B at T = 512, one thread:
    # gate_up 150 vs 186 ms on bf16 panels, down_proj 94 vs 166 ms on the buffered kernel), and
    # from 2 rows its AMX kernel where the CPU has AMX-BF16 tiles (docs/cpu.md).
    one_row = any(f[3] == 1 for f in fused) and lib.fp8_bf16_pays(1, n, k, cpu._KIND[w.dtype], block_shape[1])
    on_bf16 = [f for f in fused if f[3] > 1 or one_row]
    on_bf16 += [
        (g, s - lo, s, e - s) for g, s, e in ranges if not cpu.uses_fused_gemm(e - s, n, k, grouped=True)
    ]
    if on_bf16 and lib.fp8_get_isa() == 2:
        rc = _fused_bf16(lib, x[lo:hi], xs, activation, on_bf16, w, w_scale, block_shape, y, out_dtype)
        if rc == cpu_kernels.EDGE:
            return reference.grouped_matmul(*args)
        if rc == 0:
            if len(on_bf16) == len(ranges):
                return y
            done = {g for g, *_ in on_bf16}
            ranges, fused = [r for r in ranges if r[0] not in done], [f for f in fused if f[0] not in done]
    # W8A16 with bf16 / fp16 x and no fused group: each panel group takes its rows of x as they are
    # (the dense path converts them only where its GEMM is fp32), so no float32 copy of every row is
    # made (at prefill size a fresh 32 MB array, most of it page faults: ~24 ms of CPU time at
    # 4096 x 2048). Same operand values as the prepared copy, hence the same result bit for bit.
    direct = not fused and x_scale is None and activation == "none" and x.dtype != torch.float32
    xf = (
        cpu._c(x[lo:hi])
        if direct
        else _compiled_activation_f32(lib, x[lo:hi], xs, block_shape[1], activation)
    )
    # One rule for every row, whichever kernel its group gets (cpu.py: the fp32 overflow edge).
    if cpu.at_overflow_edge(lib, xf, None if xs is None else cpu._c(xs.float()), w_scale, cpu._KIND[w.dtype]):
        return reference.grouped_matmul(*args)
    fused_groups = {g for g, *_ in fused}
    for g, s, e in ranges:
        if g not in fused_groups:
            # activation="none": xf is final (already quantized and dequantized where W8A8 asks it,
            # or W8A16's x itself).
            y[s:e] = cpu.blockwise_matmul(
                xf[s - lo : e - lo],
                w[g],
                w_scale[g],
                block_shape,
                None,
                None,
                out_dtype,
                "none",
                edge_checked=True,
                grouped=True,
            )
    if fused:
        gid, x_row, y_row, rows = torch.tensor(fused, dtype=torch.int64).T.contiguous()
        threads = torch.get_num_threads()
        rc = lib.fp8_gemm_grouped(
            xf.data_ptr(), len(fused), gid.data_ptr(), x_row.data_ptr(), y_row.data_ptr(), rows.data_ptr(),
            w.data_ptr(), cpu._KIND[w.dtype], w_scale.data_ptr(), n, k, *block_shape,
            y.data_ptr(), cpu._DT[out_dtype], threads,
        )  # fmt: skip
        if rc:
            cpu._raise_c_error(rc, "grouped_matmul", 4 * int(rows.max()) * 4 * threads)
    return y


#: Output dtypes of ``combine`` (fp8_cpu.c's dtype codes).
_COMBINE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def combine(
    y: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor | None:
    """The MoE combine ``out[t] = sum_j y[slots[j, t]] * weights[t, j]`` (slot order, float32,
    rounded once to ``out_dtype``) in ONE C pass (fp8_cpu.c's ``fp8_combine``: bit for bit
    ``o = y[slots[0]] * w[:, :1]; o += ...`` in torch, without its k gathered [T, H] copies), or
    None where the kernels are not loaded (the caller then runs the torch form).

    y: [R, H] float32; slots: [k, T] int64, every value in [0, R) (checked: C reads those rows);
    weights: [T, k] float32; out_dtype: float32, bfloat16 or float16."""
    lib = cpu_kernels.library()
    if lib is None:
        return None
    if y.dtype != torch.float32 or y.dim() != 2:
        raise TypeError(f"combine: y must be a 2-D float32 tensor, got {y.dtype} {tuple(y.shape)}")
    if slots.dtype != torch.int64 or slots.dim() != 2:
        raise TypeError(f"combine: slots must be a 2-D int64 tensor, got {slots.dtype} {tuple(slots.shape)}")
    k, t = slots.shape
    if weights.dtype != torch.float32 or tuple(weights.shape) != (t, k):
        raise TypeError(
            f"combine: weights must be float32 [{t}, {k}], got {weights.dtype} {tuple(weights.shape)}"
        )
    if out_dtype not in _COMBINE_DTYPES:
        raise TypeError(f"combine: out_dtype must be one of {tuple(_COMBINE_DTYPES)}, got {out_dtype}")
    rows, h = y.shape
    if slots.numel():
        lo, hi = (int(v) for v in slots.aminmax())
        if lo < 0 or hi >= rows:
            raise ValueError(f"combine: slots must index rows of y in [0, {rows}), got [{lo}, {hi}]")
    out = empty(t, h, dtype=out_dtype)
    if t == 0 or h == 0:
        return out
    if k == 0:
        return out.zero_()
    y, slots, weights = cpu._c(y), cpu._c(slots), cpu._c(weights)
    rc = lib.fp8_combine(
        y.data_ptr(),
        slots.data_ptr(),
        weights.data_ptr(),
        t,
        k,
        h,
        out.data_ptr(),
        _COMBINE_DTYPES[out_dtype],
        torch.get_num_threads(),
    )
    if rc:
        raise MemoryError(f"combine: the CPU kernel could not allocate its {h * 4}-byte row buffers")
    return out


def _columns_transposed_f32(t: torch.Tensor, block_m: int) -> torch.Tensor:
    """[M, C] -> float32 [C, M]: t^T quantized to e4m3 per 1 x block_m (= t's block_m x 1 column
    blocks at absolute row offsets) and dequantized, each element rounded once in fp32."""
    tt = t.T.contiguous()[None]
    q, scale = cpu.quantize(tt, (1, block_m), torch.float8_e4m3fn, "fp32")
    return cpu.dequantize(q, scale, (1, block_m), torch.float32)[0]


def grouped_matmul_transposed(
    x: torch.Tensor,
    dy: torch.Tensor,
    group_sizes: torch.Tensor,
    block_m: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """x [M, K], dy [M, N] bf16/fp16/fp32 contiguous, group_sizes [G] int32 (CPU)
    -> out [G, K, N] out_dtype, out[g] = x_g^T dy_g on the block-quantized operands."""
    ranges = _row_ranges(group_sizes, x.shape[0])
    # Only empty groups are zero-filled: the GEMMs overwrite the rest (a [64, 2048, 1408] fp32
    # result is 740 MB, one pass of it is a large part of a decode-sized tgmm).
    out = torch.empty(group_sizes.shape[0], x.shape[1], dy.shape[1], dtype=out_dtype)
    used = {g for g, _, _ in ranges}
    for g in range(out.shape[0]):
        if g not in used:
            out[g].zero_()  # (a boolean-mask assignment took 159 ms at [64, 2048, 1408] with no empty group)
    if not ranges:
        return out
    xt, dt = _columns_transposed_f32(x, block_m), _columns_transposed_f32(dy, block_m)  # [K, M], [N, M]
    # Other output dtypes: each group's fp32 product lands in one reused [K, N] buffer, then is cast
    # into out[g]; a fresh fp32 result per group cost page faults over every byte of it
    # (sys time was ~half the CPU time of a 16-group, K 7168 x N 2048 tgmm).
    acc = None if out_dtype == torch.float32 else torch.empty(x.shape[1], dy.shape[1], dtype=torch.float32)
    for g, s, e in ranges:
        torch.mm(xt[:, s:e], dt[:, s:e].T, out=out[g] if acc is None else acc)
        if acc is not None:
            out[g].copy_(acc)
    return out


# Last: cpu.py imports this module at its end, so whichever of the two is imported first, the other
# finds every function it names already defined (importing this module first used to fail).
from . import cpu  # noqa: E402
