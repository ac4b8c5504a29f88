"""The two numerics budgets every backend is held to (shared/NOTES.md, "Reference semantics").

1. Kernel error vs the reference on the SAME quantized inputs: ``mean|y - ref| / mean|ref|``
   (the metric vLLM and DeepGEMM use) at most :func:`kernel_error_bound` of the output dtype.
2. Quantization loss vs the unquantized product: SQNR at least :data:`SQNR_FLOOR_DB` on randn data
   (torchao's floor).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

SQNR_FLOOR_DB = 28.0
#: Floors for the lossier formats, measured on randn data with the reference (W8A8 / W8A16, 1x128
#: activations, 128x128 weights): power-of-two (ue8m0) scales waste up to one bit of the fp8 range
#: per block (27.8-28.6 dB vs 28.6-29.0 dB with fp32 scales); e5m2 keeps 2 mantissa bits instead of
#: 3 (24.3-25.6 dB).
SQNR_FLOOR_UE8M0_DB = 26.0
SQNR_FLOOR_E5M2_DB = 22.0
KERNEL_ERROR_BOUND = 1e-3


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """mean|y - ref| / mean|ref| in float64 (0 when both are all zero)."""
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.abs().mean().item()
    num = (y - ref).abs().mean().item()
    return num / denom if denom > 0 else num


def sqnr(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (y - ref)^2)."""
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    noise = (y - ref).pow(2).sum().item()
    return float("inf") if noise == 0 else 10.0 * torch.log10(ref.pow(2).sum() / noise).item()


def sqnr_floor(dtype: torch.dtype, scale_format: str = "fp32") -> float:
    """SQNR floor (dB) vs the unquantized product on randn data for the weight format."""
    if dtype == torch.float8_e5m2:
        return SQNR_FLOOR_E5M2_DB
    return SQNR_FLOOR_UE8M0_DB if scale_format == "ue8m0" else SQNR_FLOOR_DB


def kernel_error_bound(out_dtype: torch.dtype) -> float:
    """1e-3 for float32/float16 output; one bf16 rounding step (2**-7) for bfloat16 output,
    where two correct results may round to neighbouring bf16 values."""
    return max(KERNEL_ERROR_BOUND, torch.finfo(out_dtype).eps)


def assert_kernel_close(y: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    if y.shape != ref.shape or y.dtype != ref.dtype:
        raise AssertionError(
            f"{what}: got {tuple(y.shape)} {y.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
        )
    if not torch.equal(torch.isnan(y.cpu()), torch.isnan(ref.cpu())):
        raise AssertionError(f"{what}: nan positions differ from the reference")
    finite = ~torch.isnan(ref.cpu())
    err = rel_error(y.cpu()[finite], ref.cpu()[finite])
    bound = kernel_error_bound(y.dtype)
    if err > bound:
        raise AssertionError(f"{what}: mean|y-ref|/mean|ref| = {err:.3e} > {bound:.1e}")


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` in ms after one warm-up call (traces, compiles, caches).
    For CPU / XLA-on-CPU timings; ``fn`` must block until its result exists (e.g. ``.cpu()``)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
