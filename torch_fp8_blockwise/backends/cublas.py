"""cuBLAS block-scaled W8A8 through ``torch._scaled_mm`` (sm_90): the prefill route on Hopper.

The one call that works for our layouts (shared/NOTES.md section 6, measured on an H100 with
torch 2.11 + CUDA 13)::

    torch._scaled_mm(xq, wq.t(), xs_col_major, ws.t(), out_dtype=..., bias=...)

* xq [M_pad, K] float8_e4m3fn row-major, M_pad = M rounded up to a multiple of 4 (cuBLAS answers
  CUBLAS_STATUS_NOT_SUPPORTED otherwise; the extra rows are zeros and are cropped off).
* xs_col_major [M_pad, K/128] float32 with strides (1, M_pad): 1 x 128 activation groups, stored
  outer-dim-major (``xs.t().contiguous().t()``); a row-major xs is rejected.
* wq.t() [K, N] view of the row-major [N, K] e4m3fn / e5m2 weight (no copy).
* ws.t() [K/128, cdiv(N, 128)] view of the row-major [cdiv(N, 128), K/128] float32 weight scale
  (DeepSeek's ``weight_scale_inv``); a contiguous [K/128, N/128] copy is rejected.

Only calls it computes correctly may come here (:func:`ineligible_reason`): 128 x 128 weight
blocks, K % 128 == 0 (with K = 576 or 4160 cuBLAS returns WRONG numbers without an error:
relative error 0.1 to 6e5), N % 16 == 0. Whether the device and this torch build can run it at
all is decided once per device by :func:`probe`: a tiny call checked against the reference,
never by catching errors on the hot path.

Bias: torch only passes it to the cuBLAS epilogue when its dtype equals a bf16/fp16 ``out_dtype``
(fp32 output with a bias is refused). The epilogue widens the bias to its fp32 compute type, adds
and rounds once, which is the contract (NOTES section 5: "+ bias in fp32, then cast"). Any other
combination asks cuBLAS for fp32 output and adds ``bias.float()`` after, then casts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Weight block and activation group cuBLAS's block-wise scaling implements (1 x 128 x 128).
BLOCK = (128, 128)
#: cuBLAS rejects M % 4 != 0 with block-wise scales; zero rows are padded and cropped.
M_ALIGN = 4
#: N % 16 != 0 is rejected by cuBLAS (NOTES section 6).
N_ALIGN = 16
X_DTYPE = torch.float8_e4m3fn
W_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Compute capabilities where the block-scaled call was measured correct and fast. Others (sm_100,
#: sm_120) may work, but nobody here has checked their numbers yet: they stay on Triton.
ARCHS: tuple[tuple[int, int], ...] = ((9, 0),)
#: Probe problem: M, N, K small enough to cost microseconds, K spanning two scale blocks and N
#: not a multiple of 128 so that both scale grids and the row-padding are exercised.
PROBE_SHAPE = (3, 144, 256)

#: Answer of probe() while the current stream is being captured into a CUDA graph: the probe's
#: synchronize would break the capture, so it waits for the first call outside one (not cached).
CAPTURING = "not probed yet: first call inside CUDA graph capture (Triton serves it)"

_probes: dict[int, str | None] = {}


def ineligible_reason(
    block_shape: tuple[int, int],
    n: int,
    k: int,
    x_dtype: torch.dtype,
    w_dtype: torch.dtype,
    activation: str,
    out_dtype: torch.dtype,
) -> str | None:
    """None if cuBLAS block-scaled computes this blockwise_matmul correctly, else why not.

    A pure function of the call's static properties (any M works: rows are padded to a multiple
    of 4). ``x_dtype`` is x's dtype as passed: fp8 x must be e4m3fn; a high-precision x is
    quantized by our activation quantizer to e4m3fn when ``activation == "dynamic"``.
    """
    if tuple(block_shape) != BLOCK:
        return f"block_shape {list(block_shape)}: cuBLAS block scaling takes only 128x128 weight blocks"
    if k % 128 != 0:
        return f"K={k} is not a multiple of 128 (cuBLAS returns wrong numbers without an error there)"
    if n % N_ALIGN != 0:
        return f"N={n} is not a multiple of {N_ALIGN}"
    if x_dtype in W_DTYPES:
        if x_dtype != X_DTYPE:
            return f"x is {x_dtype}; cuBLAS block scaling takes float8_e4m3fn activations"
    elif activation != "dynamic":
        return f"activation={activation!r} (W8A16) is not a W8A8 product"
    if w_dtype not in W_DTYPES:
        return f"w is {w_dtype}, not an fp8 weight"
    if out_dtype not in OUT_DTYPES:
        return f"out_dtype {out_dtype} is not one of bfloat16, float16, float32"
    return None


def _arch_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"cuBLAS block-scaled runs on CUDA tensors, not {device.type}"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} has no working CUDA (torch.cuda.is_available() is False)"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    cap = torch.cuda.get_device_capability(device)
    if cap not in ARCHS:
        return (
            f"compute capability sm_{cap[0]}{cap[1]}: block-scaled _scaled_mm is only trusted on "
            f"{', '.join(f'sm_{a}{b}' for a, b in ARCHS)} (measured there; no evidence for other archs)"
        )
    return None


def probe(device: torch.device | str) -> str | None:
    """None if cuBLAS block-scaled works on ``device``, else why not. Decided once per device.

    On a CUDA device of a trusted arch it runs one call of :data:`PROBE_SHAPE` and checks it
    against the reference with the kernel-error bound; any exception or a wrong answer makes the
    route unavailable on that device for the life of the process, with the reason kept.
    """
    device = torch.device(device)
    key = device.index if device.type == "cuda" and device.index is not None else -1
    if device.type == "cuda" and key == -1 and torch.cuda.is_available():
        key = torch.cuda.current_device()
    if device.type != "cuda":
        return _arch_reason(device)
    if key in _probes:
        return _probes[key]
    reason = _arch_reason(torch.device("cuda", key) if key >= 0 else device)
    if reason is None:
        if torch.cuda.is_current_stream_capturing():
            return CAPTURING
        reason = _probe_call(torch.device("cuda", key))
    _probes[key] = reason
    return reason


def _probe_call(device: torch.device) -> str | None:
    from .. import reference
    from ..testing import kernel_error_bound, rel_error

    m, n, k = PROBE_SHAPE
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device)
    w_true = torch.randn(n, k, generator=gen).to(device)
    wq, ws = reference.quantize(w_true, BLOCK, X_DTYPE, "fp32")
    xq, xs = reference.quantize_activation(x, BLOCK[1])
    try:
        y = matmul(xq, xs, wq, ws, None, torch.bfloat16)
        torch.cuda.synchronize(device)
    except Exception as e:  # once per device, at the probe: never on the hot path
        return f"probe call failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    ref = reference.blockwise_matmul(xq, wq, ws, BLOCK, xs, None, torch.bfloat16, "dynamic")
    err = rel_error(y, ref)
    if not err <= kernel_error_bound(torch.bfloat16):
        return f"probe call gave wrong numbers: mean|y-ref|/mean|ref| = {err:.2e}"
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """The dispatcher's hook: why this backend cannot run on ``device`` (None: it can)."""
    return probe(device)


def probe_results() -> dict[int, str | None]:
    """{cuda device index: None (works) or the reason it does not}, for the devices probed so far."""
    return dict(_probes)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended to [M, C] up to ``rows``. fp8 is padded through its uint8 bits (0x00 is
    +0.0 in both fp8 formats), since not every torch build implements fill for fp8."""
    pad = rows - t.shape[0]
    if pad == 0:
        return t
    if t.dtype in W_DTYPES:
        return F.pad(t.view(torch.uint8), (0, 0, 0, pad)).view(t.dtype)
    return F.pad(t, (0, 0, 0, pad))


def _outer_major(xs: torch.Tensor) -> torch.Tensor:
    """[M, KB] float32 -> the same values with strides exactly (1, M), the layout cuBLAS requires.
    (``xs.t().contiguous().t()`` keeps strides (1, 1) when KB == 1, since a [1, M] tensor counts
    as contiguous either way.)"""
    out = torch.empty_strided(xs.shape, (1, xs.shape[0]), dtype=xs.dtype, device=xs.device)
    return out.copy_(xs)


def matmul(
    xq: torch.Tensor,
    xs: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """W8A8 product through cuBLAS on an eligible problem (see :func:`ineligible_reason`).

    xq [M, K] float8_e4m3fn row-major, xs [M, K/128] float32 (any layout), w [N, K] fp8
    row-major, w_scale [cdiv(N, 128), K/128] float32 row-major, bias [N] or None -> y [M, N].
    """
    m = xq.shape[0]
    m_pad = -(-m // M_ALIGN) * M_ALIGN
    xq = _pad_rows(xq, m_pad)
    xs = _outer_major(_pad_rows(xs, m_pad))
    fused = bias is not None and bias.dtype == out_dtype and out_dtype != torch.float32
    mm_dtype = out_dtype if bias is None or fused else torch.float32
    y = torch._scaled_mm(xq, w.t(), xs, w_scale.t(), out_dtype=mm_dtype, bias=bias if fused else None)
    if m_pad != m:
        y = y[:m]
    if bias is not None and not fused:
        y = y + bias.float()
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _quantize_activation(x: torch.Tensor, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our 1 x bk e4m3fn activation quantizer: the Triton kernel (89% of copy bandwidth on H100)
    where Triton can run, else the reference (the same numbers by contract)."""
    from .. import _dispatch

    if _dispatch.unavailable_reason("triton", x.device) is None:
        from .triton.quantize import group_quantize

        return group_quantize(x, bk, X_DTYPE, "fp32")
    from .. import reference

    return reference.quantize_activation(x, bk)


def blockwise_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    block_shape: tuple[int, int],
    x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str,
) -> torch.Tensor:
    """Canonical blockwise_matmul (reference.py) on cuBLAS: y [M, N] ``out_dtype``.

    Raises BackendUnavailable for a call cuBLAS cannot compute correctly (forced with
    ``use_backend("cublas")``; the router never sends one).
    """
    reason = ineligible_reason(block_shape, w.shape[0], w.shape[1], x.dtype, w.dtype, activation, out_dtype)
    if reason is not None:
        from .._dispatch import BackendUnavailable

        raise BackendUnavailable(
            f"fp8::blockwise_matmul: backend 'cublas' cannot compute this call: {reason}"
        )
    if x_scale is None:
        x, x_scale = _quantize_activation(x, block_shape[1])
    return matmul(x, x_scale, w, w_scale, bias, out_dtype)
