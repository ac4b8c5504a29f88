"""Which kernel serves a CUDA ``blockwise_matmul`` call: the routing rule, in one place.

Routes (all meet the same numerics contract, NOTES section 5):

* ``"cublas"``: ``torch._scaled_mm`` block-scaled (backends/cublas.py), W8A8 only, and only for
  calls it computes correctly (128x128 blocks, K % 128 == 0, N % 16 == 0; see
  :func:`torch_fp8_blockwise.backends.cublas.ineligible_reason`) on a device where its probe
  passed (sm_90 today).
* ``"triton"``: our Triton W8A8 / W8A16 kernel (backends/triton/blockwise_matmul.py); takes
  every call.
* ``"triton_dequant_mm"``: W8A16 at large M: dequantize weight panels to x's dtype and run a
  dense GEMM (backends/triton/dequant_mm.py). Only for the (x, out) dtype pairs whose panel
  rounding fits the output's budget (``dequant_mm.supported``: e.g. bf16 x -> bf16 out; a bf16
  panel costs ~2**-9 relative per weight, within one bf16 ulp but not within fp32's 1e-3).

The rule, from the H100 measurements in shared/data/h100/bench_2026-11-22.md (kernel time under
CUDA graphs; decode also with a cold L2): per (N, K) the measured winner at each M of
1, 16, 64, 256, 1024, 4096 owns the M range up to the geometric midpoint with its neighbour
(4, 32, 128, 512, 2048). Tables hold ``(m_from, route)`` steps, ``m_from`` a power of two, so the
decision is a function of ``M.bit_length()`` and one cache entry serves a whole power-of-two band.
docs/routing.md gives the numbers behind each step.

Overrides, strongest first: ``use_backend("cublas" | "triton")`` forces a backend (no routing;
"cublas" then raises for calls it cannot compute); :func:`routing_override` (context manager) or
:func:`set_route` (process-wide) or the environment variable ``FP8_BLOCKWISE_ROUTE`` (read at
import) name a preferred route, taken wherever the call is eligible for it (never a wrong answer:
an ineligible call keeps the automatic rule).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .backends import cublas as _cublas

ROUTES: tuple[str, ...] = ("cublas", "triton", "triton_dequant_mm")
ENV_VAR = "FP8_BLOCKWISE_ROUTE"

Steps = tuple[tuple[int, str], ...]

#: W8A8 (fp8 x, or high-precision x with activation="dynamic"): per (N, K), the route from M >= m_from
#: until the next step. Measured winners (us, Triton tuned / cuBLAS block-scaled, warm; cold decode):
#: (2112, 7168): Triton at 16 (9.7 / 16.0), 64 (19.3 / 22.4), 256 (21.2 / 23.1); cuBLAS at 1024
#:   (45.3 / 55.4) and 4096.
#: (4608, 7168): cuBLAS at 16 (16.8 / 21.3); Triton at 64 (22.2 / 23.3); cuBLAS from 256 (24.2 / 40.1).
#: (7168, 2048): cuBLAS from 16 (9.7 / 11.2; cold 11.2 / 14.3).
#: (24576, 1536): Triton at 16 (9.5 / 15.9); cuBLAS from 64 (16.9 / 20.5).
#: (7168, 18432): cuBLAS from 16 (58.4 / 60.3).
#: At M = 1 cuBLAS was not measured (it needs M % 4 == 0; we pad): Triton keeps M < 4.
W8A8_TABLE: dict[tuple[int, int], Steps] = {
    (2112, 7168): ((1, "triton"), (512, "cublas")),
    (4608, 7168): ((1, "triton"), (4, "cublas"), (32, "triton"), (128, "cublas")),
    (7168, 2048): ((1, "triton"), (4, "cublas")),
    (24576, 1536): ((1, "triton"), (32, "cublas")),
    (7168, 18432): ((1, "triton"), (4, "cublas")),
}
#: Shapes outside the table: one threshold applied to the five measured shapes costs, vs the
#: per-point winner, geomean 1.053x / worst 1.67x at 16, 1.028x / 1.27x at 32 or 64, 1.039x /
#: 1.27x at 128 or 256, 1.111x / 1.72x at 512: cuBLAS from M >= 32.
W8A8_DEFAULT: Steps = ((1, "triton"), (32, "cublas"))
#: W8A16 (activation="none"): the fused Triton kernel reads fp8 weights (decode is weight-bandwidth
#: bound: it must stay there at M <= 64); dequantize + dense GEMM from 256, where the fused kernel
#: is 2.5-3x slower than bf16 cuBLAS; 128 is the geometric midpoint of 64 and 256.
W8A16_DEFAULT: Steps = ((1, "triton"), (128, "triton_dequant_mm"))

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fp8_route", default=None)
_global_route: str | None = None
_cache: dict[tuple, tuple[str, Callable[..., Any]]] = {}


def _check_route(name: object, what: str) -> str | None:
    if name is None or name == "auto":
        return None
    if name not in ROUTES:
        raise ValueError(f"{what}: expected one of {ROUTES} or 'auto'/None, got {name!r}")
    return name  # type: ignore[return-value]


def set_route(name: str | None) -> None:
    """Process-wide preferred route (None or "auto": the measured rule)."""
    global _global_route
    _global_route = _check_route(name, "set_route")
    _cache.clear()


@contextlib.contextmanager
def routing_override(name: str | None) -> Iterator[None]:
    """Prefer route ``name`` for CUDA blockwise_matmul calls in this context, wherever eligible."""
    token = _override.set(_check_route(name, "routing_override"))
    try:
        yield
    finally:
        _override.reset(token)


def preferred_route() -> str | None:
    """The override in force (context manager, else set_route / environment), or None."""
    return _override.get() or _global_route


def _steps_route(steps: Steps, m: int) -> str:
    route = steps[0][1]
    for m_from, name in steps:
        if m >= m_from:
            route = name
    return route


def decide(
    m: int,
    n: int,
    k: int,
    block_shape: tuple[int, int],
    x_dtype: torch.dtype,
    w_dtype: torch.dtype,
    activation: str,
    out_dtype: torch.dtype,
    *,
    cublas: bool,
    dequant_mm: bool,
    prefer: str | None = None,
) -> str:
    """The routing rule: a pure function of the call's sizes and dtypes.

    ``cublas`` / ``dequant_mm``: whether those routes exist on the device (probe passed / the
    function is installed). Returns one of :data:`ROUTES`; never a route the call is ineligible for.
    """
    if activation == "none" and x_dtype not in _cublas.W_DTYPES:
        dequant_ok = dequant_mm and dequant_mm_supports(x_dtype, out_dtype)
        route = prefer if prefer in ("triton", "triton_dequant_mm") else _steps_route(W8A16_DEFAULT, m)
        return route if route == "triton" or dequant_ok else "triton"
    cublas_ok = cublas and (
        _cublas.ineligible_reason(block_shape, n, k, x_dtype, w_dtype, activation, out_dtype) is None
    )
    if prefer in ("triton", "cublas"):
        route = prefer
    else:
        route = _steps_route(W8A8_TABLE.get((n, k), W8A8_DEFAULT), m)
    return route if route == "triton" or cublas_ok else "triton"


def _dequant_matmul() -> Callable[..., torch.Tensor] | None:
    """``backends/triton/dequant_mm.py::dequant_matmul`` once it exists (None until then)."""
    try:
        from .backends.triton import dequant_mm
    except ImportError:
        return None
    return getattr(dequant_mm, "dequant_matmul", None)


def dequant_mm_supports(x_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """(x, out) dtype pairs for which dequantize + GEMM meets the contract: the module's own
    ``supported()`` (its panel rounding measured against each output budget), else the rule of
    thumb: bf16/fp16 output from x of the same dtype (a bf16 panel costs ~2**-9 per weight)."""
    try:
        from .backends.triton import dequant_mm
    except ImportError:
        dequant_mm = None
    supported = getattr(dequant_mm, "supported", None)
    if supported is not None:
        return supported(x_dtype, out_dtype)
    return x_dtype == out_dtype and out_dtype in (torch.bfloat16, torch.float16)


def dequant_mm_reason() -> str | None:
    """None if the W8A16 dequantize + GEMM route is installed, else why not."""
    if _dequant_matmul() is None:
        return "torch_fp8_blockwise.backends.triton.dequant_mm.dequant_matmul is not installed"
    return None


def _kernel(route: str) -> Callable[..., torch.Tensor]:
    """Canonical blockwise_matmul function (reference.py's signature) of a route."""
    if route == "cublas":
        return _cublas.blockwise_matmul
    from .backends import triton as triton_backend

    if route == "triton":
        return triton_backend.blockwise_matmul
    dequant_matmul = _dequant_matmul()

    def run(x, w, w_scale, block_shape, x_scale, bias, out_dtype, activation):
        return dequant_matmul(x, w, w_scale, block_shape, bias, out_dtype)

    return run


def route(
    device: torch.device,
    m: int,
    n: int,
    k: int,
    block_shape: tuple[int, int],
    x_dtype: torch.dtype,
    w_dtype: torch.dtype,
    activation: str,
    out_dtype: torch.dtype,
) -> tuple[str, Callable[..., torch.Tensor]]:
    """(route name, canonical function) for a call; cached per power-of-two M band, so the hot
    path is one dict lookup."""
    prefer = _override.get() or _global_route
    key = (device, m.bit_length(), n, k, block_shape, x_dtype, w_dtype, activation, out_dtype, prefer)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    cublas_reason = _cublas.probe(device)
    name = decide(
        1 << (m.bit_length() - 1),  # the band's lowest M: tables step only at powers of two
        n, k, block_shape, x_dtype, w_dtype, activation, out_dtype,
        cublas=cublas_reason is None, dequant_mm=_dequant_matmul() is not None, prefer=prefer,
    )  # fmt: skip
    hit = (name, _kernel(name))
    if cublas_reason is not _cublas.CAPTURING:  # decide again once the probe has run
        _cache[key] = hit
    return hit


def clear_cache() -> None:
    """Forget cached decisions (after monkeypatching availability in tests)."""
    _cache.clear()


def describe() -> list[str]:
    """The rule as text lines (``fp8-blockwise backends``)."""

    def fmt(steps: Steps) -> str:
        return ", ".join(f"M>={m_from}: {name}" for m_from, name in steps)

    lines = ["CUDA blockwise_matmul routing (measured on H100, shared/data/h100/bench_2026-11-22.md):"]
    lines.append("  W8A8 (fp8 x, or activation='dynamic'), per (N, K):")
    for (n, k), steps in W8A8_TABLE.items():
        lines.append(f"    N={n:<6} K={k:<6} {fmt(steps)}")
    lines.append(f"    other shapes    {fmt(W8A8_DEFAULT)}")
    lines.append(
        f"  W8A16 (activation='none'): {fmt(W8A16_DEFAULT)} (dequant_mm only for (x, out) dtype pairs "
        "it computes within budget)"
    )
    lines.append(
        "  cublas only where eligible: 128x128 blocks, K % 128 == 0, N % 16 == 0, e4m3fn x, "
        "probe passed on the device"
    )
    reason = dequant_mm_reason()
    lines.append(f"  triton_dequant_mm: {'installed' if reason is None else 'not available: ' + reason}")
    lines.append(
        f"  preferred route: {preferred_route() or 'auto'} (set_route, routing_override, ${ENV_VAR})"
    )
    return lines


def _check_tables() -> None:
    for steps in (*W8A8_TABLE.values(), W8A8_DEFAULT, W8A16_DEFAULT):
        if steps[0][0] != 1 or any(m & (m - 1) for m, _ in steps) or any(r not in ROUTES for _, r in steps):
            raise ValueError(f"routing table steps {steps}: must start at M=1, step at powers of two")


_check_tables()
_global_route = _check_route(os.environ.get(ENV_VAR) or None, f"${ENV_VAR}")
