"""A CPU stand-in for ``torch._scaled_mm`` with block-wise scales, for tests of the cuBLAS route.

It accepts exactly the call that works on an H100 (shared/NOTES.md section 6) and rejects what
cuBLAS / torch reject there (wrong layouts, M % 4, K % 128, N % 16, fast accumulation, a bias
torch would refuse), then computes the block-scaled product with the reference. So a test on CPU
proves our call construction: padding of M, cropping, scale layouts, bias and out dtype.
"""

from __future__ import annotations

import torch

from torch_fp8_blockwise import reference
from torch_fp8_blockwise.formats import cdiv

E4M3, E5M2, F32 = torch.float8_e4m3fn, torch.float8_e5m2, torch.float32


class EmulatedScaledMm:
    """Callable with torch._scaled_mm's signature; ``calls`` records each accepted call's layout."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(
        self, a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False
    ):
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise RuntimeError(f"emulated torch._scaled_mm (block-wise) rejects the call: {what}")

        m, k = a.shape
        k2, n = b.shape
        need(k == k2, f"inner dims {k} != {k2}")
        need(a.dtype == E4M3 and a.stride() == (k, 1), f"a: e4m3fn row-major, got {a.dtype} {a.stride()}")
        need(
            b.dtype in (E4M3, E5M2) and b.stride() == (1, k), f"b: fp8 column-major [K, N], got {b.stride()}"
        )
        need(m % 4 == 0, f"M={m} % 4 != 0 (CUBLAS_STATUS_NOT_SUPPORTED)")
        need(k % 128 == 0, f"K={k} % 128 != 0 (cuBLAS would return wrong numbers)")
        need(n % 16 == 0, f"N={n} % 16 != 0")
        kb, nb = k // 128, cdiv(n, 128)
        need(
            scale_a.dtype == F32 and tuple(scale_a.shape) == (m, kb), f"scale_a shape {tuple(scale_a.shape)}"
        )
        need(scale_a.stride() == (1, m), f"scale_a must be outer-dim-major (1, {m}), got {scale_a.stride()}")
        need(
            scale_b.dtype == F32 and tuple(scale_b.shape) == (kb, nb), f"scale_b shape {tuple(scale_b.shape)}"
        )
        need(scale_b.stride() == (1, kb), f"scale_b must be ws.t() of a row-major ws, got {scale_b.stride()}")
        need(not use_fast_accum and scale_result is None, "use_fast_accum / scale_result")
        out_dtype = out_dtype or torch.bfloat16
        if bias is not None:
            need(out_dtype != F32, "Bias is not supported when out_dtype is set to Float32")
            need(bias.dtype == out_dtype, f"Bias must be {out_dtype} to compute {out_dtype} output")
            need(tuple(bias.shape) == (n,), f"bias shape {tuple(bias.shape)}")
        self.calls.append({"m": m, "n": n, "k": k, "bias": bias is not None, "out_dtype": out_dtype})
        return reference.blockwise_matmul(
            a, b.t(), scale_b.t(), (128, 128), scale_a.contiguous(), bias, out_dtype, "dynamic"
        )


def route_on_cpu(monkeypatch) -> EmulatedScaledMm:
    """Make CPU tensors take the CUDA routing (device backend "triton", the cuBLAS probe passed,
    torch._scaled_mm emulated): the routed op then runs end to end here, Triton kernels in the
    interpreter. Returns the emulation (its ``calls`` show which calls went to cuBLAS)."""
    from cpu_kernel_helpers import python_kernels_only

    from torch_fp8_blockwise import _dispatch, _route
    from torch_fp8_blockwise.backends import cublas

    python_kernels_only(monkeypatch)  # the C++ CPU kernel would take these calls before any routing
    emu = EmulatedScaledMm()
    monkeypatch.setattr(torch, "_scaled_mm", emu)
    monkeypatch.setitem(_dispatch.DEVICE_BACKENDS, "cpu", "triton")
    monkeypatch.setattr(cublas, "probe", lambda device: None)
    monkeypatch.setattr(_dispatch, "_impl_cache", {})
    monkeypatch.setattr(_route, "_cache", {})
    return emu
