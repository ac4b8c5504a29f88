"""Inputs and independent checks shared by the tests of the grouped ops (tests/test_grouped_*.py).

The independent forms compute the contract of reference.py a second way (dense per-row weights for
gmm; element-wise dequantized operands for tgmm), so the reference itself is tested, not only
copied by the backends.
"""

from __future__ import annotations

import itertools

import torch

from torch_fp8_blockwise import reference, testing

E4M3 = torch.float8_e4m3fn
#: cosine between a quantized product and the unquantized one (issue 10's bar).
COSINE_FLOOR = 0.999


def pattern_sizes(pattern: int, g: int, sizes: tuple[int, ...]) -> list[int]:
    """Group sizes for bit pattern ``pattern``: bit j set -> group j non-empty, size from ``sizes``."""
    cycle = itertools.cycle(sizes)
    return [next(cycle) if pattern >> j & 1 else 0 for j in range(g)]


def gmm_inputs(
    sizes: list[int],
    n: int,
    k: int,
    mode: str = "dynamic",
    extra_rows: int = 0,
    block: tuple[int, int] = (128, 128),
    x_dtype: torch.dtype = torch.float32,
    w_dtype: torch.dtype = E4M3,
) -> dict:
    """x [M, K] with M = sum(sizes) + extra_rows, w [G, N, K] quantized with ``block``.

    mode "fp8": x quantized per 1 x bk (x_scale given); "dynamic" / "none": high-precision x.
    Returns the op arguments plus the unquantized x_f / w_f for the SQNR check.
    """
    g = len(sizes)
    m = sum(sizes) + extra_rows
    x_f = torch.randn(m, k).to(x_dtype)
    w_f = torch.randn(g, n, k)
    w, ws = reference.quantize(w_f, block, w_dtype, "fp32")
    args = {
        "x": x_f,
        "w": w,
        "w_scale": ws,
        "group_sizes": torch.tensor(sizes, dtype=torch.int32),
        "block_shape": list(block),
        "x_scale": None,
        "activation": "none" if mode == "none" else "dynamic",
    }
    if mode == "fp8":
        args["x"], args["x_scale"] = reference.quantize_activation(x_f.float(), block[1])
    return {"args": args, "x_f": x_f, "w_f": w_f}


def row_groups(sizes: list[int], m: int) -> torch.Tensor:
    """Group of each row, -1 for rows of no group."""
    owner = torch.full((m,), -1, dtype=torch.long)
    start = 0
    for g, s in enumerate(sizes):
        owner[start : min(m, start + s)] = g
        start += s
    return owner


def dense_gmm(args: dict, out_dtype: torch.dtype) -> torch.Tensor:
    """gmm by a gathered per-row weight (small shapes only: materializes [M, N, K])."""
    x, w, ws, xs = args["x"], args["w"], args["w_scale"], args["x_scale"]
    bn, bk = args["block_shape"]
    g, n, k = w.shape
    owner = row_groups(args["group_sizes"].tolist(), x.shape[0])
    wd = reference.dequantize(w, ws, (bn, bk), torch.float32)  # [G, N, K]
    if xs is None and args["activation"] == "dynamic":
        x, xs = reference.quantize_activation(x, bk)
    xd = x.float() if xs is None else reference.dequantize(x, xs, (1, bk), torch.float32)
    per_row = wd[owner.clamp(min=0)]  # [M, N, K]
    y = torch.einsum("mk,mnk->mn", xd.double(), per_row.double())
    y[owner < 0] = 0
    return y.to(out_dtype)


def unquantized_gmm(x_f: torch.Tensor, w_f: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    owner = row_groups(sizes, x_f.shape[0])
    y = torch.einsum("mk,mnk->mn", x_f.double(), w_f.double()[owner.clamp(min=0)])
    y[owner < 0] = 0
    return y


def dense_tgmm(x, dy, sizes: list[int], block_m: int, out_dtype: torch.dtype) -> torch.Tensor:
    """tgmm on element-wise dequantized operands (scales expanded to every element)."""
    xq, xs = reference.quantize_columns(x, block_m)
    dq, ds = reference.quantize_columns(dy, block_m)
    xd = reference.dequantize(xq, xs, (block_m, 1), torch.float32).double()
    dd = reference.dequantize(dq, ds, (block_m, 1), torch.float32).double()
    return unquantized_tgmm(xd, dd, sizes).to(out_dtype)


def unquantized_tgmm(x, dy, sizes: list[int]) -> torch.Tensor:
    m = x.shape[0]
    out = torch.zeros(len(sizes), x.shape[1], dy.shape[1], dtype=torch.float64)
    start = 0
    for g, s in enumerate(sizes):
        rows = slice(min(m, start), min(m, start + s))
        out[g] = x[rows].double().T @ dy[rows].double()
        start += s
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denom = a.norm() * b.norm()
    return 1.0 if denom == 0 else float(a @ b / denom)


def assert_quantization_loss_ok(y: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """The second budget: cosine >= 0.999 and SQNR >= the floor vs the unquantized product."""
    cos, snr = cosine(y, exact), testing.sqnr(y, exact)
    assert cos >= COSINE_FLOOR, f"{what}: cosine {cos:.5f} < {COSINE_FLOOR}"
    assert snr >= testing.SQNR_FLOOR_DB, f"{what}: SQNR {snr:.1f} dB < {testing.SQNR_FLOOR_DB}"


def run_gmm(backend: str, args: dict, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The op through torch.ops.fp8 on ``backend`` (validation + dispatch included)."""
    from torch_fp8_blockwise import use_backend
    from torch_fp8_blockwise.ops import grouped_matmul

    with use_backend(backend):
        return grouped_matmul(**args, out_dtype=out_dtype)


def run_tgmm(backend: str, x, dy, sizes: list[int], block_m: int, out_dtype=None) -> torch.Tensor:
    from torch_fp8_blockwise import use_backend
    from torch_fp8_blockwise.ops import grouped_matmul_transposed

    with use_backend(backend):
        return grouped_matmul_transposed(x, dy, torch.tensor(sizes, dtype=torch.int32), block_m, out_dtype)


def check_gmm(backend: str, case: dict, out_dtype: torch.dtype | None = None, what: str = "") -> torch.Tensor:
    """Backend vs reference (kernel error bound) and rows past the sum exactly 0."""
    y = run_gmm(backend, case["args"], out_dtype)
    ref = run_gmm("reference", case["args"], out_dtype)
    testing.assert_kernel_close(y, ref, what)
    total = int(case["args"]["group_sizes"].sum())
    assert not y[total:].any(), f"{what}: rows past sum(group_sizes) are not 0"
    return y


def check_tgmm(backend: str, x, dy, sizes, block_m: int, out_dtype=None, what: str = "") -> torch.Tensor:
    out = run_tgmm(backend, x, dy, sizes, block_m, out_dtype)
    ref = run_tgmm("reference", x, dy, sizes, block_m, out_dtype)
    testing.assert_kernel_close(out, ref, what)
    return out


def with_sizes(case: dict, sizes: list[int], extra_rows: int) -> dict:
    """The same weights (and the first rows of x) with other group sizes: sweeps reuse one case."""
    m = sum(sizes) + extra_rows
    args = dict(case["args"], group_sizes=torch.tensor(sizes, dtype=torch.int32), x=case["args"]["x"][:m])
    if args["x_scale"] is not None:
        args["x_scale"] = args["x_scale"][:m]
    return {"args": args, "x_f": case["x_f"][:m], "w_f": case["w_f"]}


def pattern_cases(mode: str, n: int = 160, k: int = 256, sizes=(3, 17, 1, 9), extra_rows: int = 5):
    """(pattern, case) for all 256 zero / non-zero patterns of 8 groups, sharing one weight set."""
    full = gmm_inputs(pattern_sizes(255, 8, sizes), n=n, k=k, mode=mode, extra_rows=extra_rows)
    for pattern in range(256):
        yield pattern, with_sizes(full, pattern_sizes(pattern, 8, sizes), extra_rows)
