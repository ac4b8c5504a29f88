"""torch <-> JAX for the Pallas kernels: call_jax on XLA tensors, direct jax.jit on CPU tensors.

Two ways in, one set of JAX functions (module scope, so ``call_jax``'s cache, keyed on
``id(fn)`` + shapes + static kwargs, hits: 100 calls with one shape trace once):

* XLA tensors (``device.type == "xla"``): ``torch_xla.core.xla_builder.call_jax`` stages the
  JAX function (Pallas kernel included, as a ``tpu_custom_call`` on TPU) into torch_xla's lazy
  graph. On torch_xla's CPU device (``PJRT_DEVICE=CPU``) the kernel runs with ``interpret=True``.
* CPU tensors (a test forced ``use_backend("pallas")``): the same functions under ``jax.jit`` with
  ``interpret=True``, on arrays converted through numpy (fp8 / bf16 by their bit patterns).

M is padded to a bucket (:func:`tuning.m_bucket`) in torch before the call, so every batch size
in a bucket shares one trace and one compiled kernel; N and K are padded inside the JAX function.
torch_xla cannot move float8_e8m0fnu ("Type not supported"): E8M0 tensors cross as uint8 bits.
"""

from __future__ import annotations

import collections
import functools
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch

from . import blockwise_matmul as _bm
from . import grouped as _gp
from . import quantize as _qz
from . import tuning

#: Number of times each bridged JAX function was traced (a trace is a Python run of its body).
TRACE_COUNTS: collections.Counter[str] = collections.Counter()

#: Overrides the planned TPU generation ("v5e", "v6e", "v7x"); else the device tells.
GENERATION_ENV = "FP8_PALLAS_TPU_GENERATION"

_TORCH_TO_NUMPY: dict[torch.dtype, tuple[torch.dtype, np.dtype]] = {
    # torch dtype: (same-width integer view, numpy dtype that jax understands)
    torch.float8_e4m3fn: (torch.uint8, np.dtype(ml_dtypes.float8_e4m3fn)),
    torch.float8_e5m2: (torch.uint8, np.dtype(ml_dtypes.float8_e5m2)),
    torch.bfloat16: (torch.int16, np.dtype(ml_dtypes.bfloat16)),
    torch.float8_e8m0fnu: (torch.uint8, np.dtype(np.uint8)),  # E8M0 crosses as its bits
}
_NUMPY_TO_TORCH: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float8_e4m3fn": (np.dtype(np.uint8), torch.float8_e4m3fn),
    "float8_e5m2": (np.dtype(np.uint8), torch.float8_e5m2),
    "bfloat16": (np.dtype(np.int16), torch.bfloat16),
}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float8_e4m3fn -> "float8_e4m3fn" (the jnp.dtype name the kernels take)."""
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------ JAX functions (module scope)
def _matmul_jax(x, w, w_scale, x_scale, bias, *, cfg: _bm.MatmulConfig, out_dtype: str, interpret: bool):
    TRACE_COUNTS["blockwise_matmul"] += 1
    if w_scale.dtype == jnp.uint8:  # E8M0 weight scales
        w_scale = _qz.e8m0_bits_to_f32(w_scale)
    return _bm.blockwise_matmul(
        x, w, w_scale, x_scale, bias, cfg=cfg, out_dtype=out_dtype, interpret=interpret
    )


def _quantize_jax(x, *, block: tuple[int, int], dtype: str, scale_format: str, interpret: bool):
    TRACE_COUNTS["quantize"] += 1
    return _qz.quantize(x, block=block, dtype=dtype, scale_format=scale_format, interpret=interpret)


def _dequantize_jax(q, scale, *, block: tuple[int, int], out_dtype: str, interpret: bool):
    TRACE_COUNTS["dequantize"] += 1
    return _qz.dequantize(q, scale, block=block, out_dtype=out_dtype, interpret=interpret)


def _gmm_jax(x, w, w_scale, group_sizes, x_scale, *, cfg: _bm.MatmulConfig, out_dtype: str, interpret: bool):
    TRACE_COUNTS["grouped_matmul"] += 1
    return _gp.gmm(x, w, w_scale, group_sizes, x_scale, cfg=cfg, out_dtype=out_dtype, interpret=interpret)


def _tgmm_jax(x, dy, group_sizes, *, cfg: _gp.TgmmConfig, out_dtype: str, interpret: bool):
    TRACE_COUNTS["grouped_matmul_transposed"] += 1
    return _gp.tgmm(x, dy, group_sizes, cfg=cfg, out_dtype=out_dtype, interpret=interpret)


_JITTED = {
    fn: jax.jit(fn, static_argnames=static)
    for fn, static in (
        (_matmul_jax, ("cfg", "out_dtype", "interpret")),
        (_quantize_jax, ("block", "dtype", "scale_format", "interpret")),
        (_dequantize_jax, ("block", "out_dtype", "interpret")),
        (_gmm_jax, ("cfg", "out_dtype", "interpret")),
        (_tgmm_jax, ("cfg", "out_dtype", "interpret")),
    )
}


# ------------------------------------------------------------------------------ tensor crossing
def to_jax(t: torch.Tensor | None) -> jax.Array | None:
    """CPU torch tensor -> jax array (bit-exact; fp8 and bf16 via integer views)."""
    if t is None:
        return None
    t = t.detach().contiguous()
    if t.dtype in _TORCH_TO_NUMPY:
        int_dtype, np_dtype = _TORCH_TO_NUMPY[t.dtype]
        return jnp.asarray(t.view(int_dtype).numpy().view(np_dtype))
    return jnp.asarray(t.numpy())


def to_torch(a: jax.Array) -> torch.Tensor:
    """jax array -> CPU torch tensor (a copy; fp8 and bf16 via integer views)."""
    arr = np.asarray(a)
    if arr.dtype.name in _NUMPY_TO_TORCH:
        int_dtype, torch_dtype = _NUMPY_TO_TORCH[arr.dtype.name]
        return torch.from_numpy(arr.view(int_dtype).copy()).view(torch_dtype)
    return torch.from_numpy(arr.copy())


def xla_arg(t: torch.Tensor | None) -> torch.Tensor | None:
    """An XLA tensor as call_jax can take it: float8_e8m0fnu is bit-cast to uint8."""
    if t is not None and t.dtype == torch.float8_e8m0fnu:
        return t.view(torch.uint8)
    return t


def on_xla_cpu() -> bool:
    """True when torch_xla's device is its CPU client (Pallas must interpret), False on TPU."""
    import torch_xla.runtime as xr

    return xr.device_type() != "TPU"


@functools.cache
def generation() -> str:
    """TPU generation to plan block sizes for: $FP8_PALLAS_TPU_GENERATION, else the attached TPU,
    else (CPU interpret / lowering) the design target v7x."""
    override = os.environ.get(GENERATION_ENV)
    if override:
        if override not in tuning.GENERATIONS:
            raise ValueError(
                f"${GENERATION_ENV}: expected one of {tuple(tuning.GENERATIONS)}, got {override!r}"
            )
        return override
    try:
        import torch_xla.runtime as xr

        if xr.device_type() == "TPU":
            from torch_xla._internal import tpu

            return tuning.generation_from_device_kind(tpu.get_tpu_type())
    except ImportError:
        pass
    return tuning.DEFAULT_GENERATION


def _run(fn, args: tuple, kwargs: dict, device: torch.device):
    """Run a module-scope JAX function on torch tensors of ``device`` (xla or cpu)."""
    if device.type == "xla":
        import torch_xla.core.xla_builder as xb

        kwargs = {**kwargs, "interpret": on_xla_cpu()}
        return xb.call_jax(fn, tuple(xla_arg(a) for a in args), kwargs)
    out = _JITTED[fn](*(to_jax(a) for a in args), **kwargs, interpret=True)
    if isinstance(out, tuple):
        return tuple(to_torch(o) for o in out)
    return to_torch(out)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Append ``rows`` zero rows to a 2D tensor. torch.cat rather than F.pad: constant_pad_nd has
    no fp8 kernel on CPU, and on XLA it builds an f64 pad value that the HLO verifier rejects for
    fp8 ("mixed precision is disallowed"); zero bits are +0.0 in every float format."""
    return torch.cat([t, t.new_zeros(rows, t.shape[1])])


# ---------------------------------------------------------------------------------- entry points
def matmul_config(
    m_padded: int,
    n: int,
    k: int,
    block_shape: tuple[int, int],
    x_mode: str,
    x_dtype: torch.dtype,
    w_dtype: torch.dtype,
    out_dtype: torch.dtype,
    has_bias: bool,
) -> _bm.MatmulConfig:
    # float16 runs as float32 inside the kernel (Mosaic has no f16; see blockwise_matmul.HIGH_NAMES).
    problem = tuning.Problem(
        m_padded, n, k, *block_shape, x_mode, _bm.kernel_dtype(dtype_name(x_dtype)), dtype_name(w_dtype),
        _bm.kernel_dtype(dtype_name(out_dtype)), has_bias,
    )  # fmt: skip
    return tuning.select(generation(), problem)


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
    config: _bm.MatmulConfig | None = None,
) -> torch.Tensor:
    """y [M, N] ``out_dtype`` = x [M, K] @ w [N, K].T with w_scale [cdiv(N,bn), cdiv(K,bk)] f32
    (or float8_e8m0fnu) and x_scale [M, cdiv(K,bk)] f32 for fp8 x; see reference.blockwise_matmul.

    ``config`` forces the kernel's block sizes (tests, tuner); by default the tuned table / model
    picks them for (generation, M bucket, N, K, block, dtypes). M is padded to the bucket here.
    """
    m, k = x.shape
    n = w.shape[0]
    if x_scale is not None:
        x_mode = "fp8"
    else:
        x_mode = "dynamic" if activation == "dynamic" else "none"
    mp = tuning.m_bucket(m)
    if config is None:
        cfg = matmul_config(mp, n, k, block_shape, x_mode, x.dtype, w.dtype, out_dtype, bias is not None)
    else:
        cfg = config
        mp = -(-m // cfg.tm) * cfg.tm
        allowed = ("dynamic", "fp8") if x_mode == "dynamic" else (x_mode,)
        if cfg.x_mode not in allowed:
            raise ValueError(
                f"config: x_mode {cfg.x_mode!r} cannot run a {x_mode!r} call; expected one of {allowed}"
            )
    if mp != m:
        x = _pad_rows(x, mp - m)
        x_scale = None if x_scale is None else _pad_rows(x_scale, mp - m)
    kwargs = {"cfg": cfg, "out_dtype": dtype_name(out_dtype)}
    y = _run(_matmul_jax, (x, w, w_scale, x_scale, bias), kwargs, x.device)
    return y[:m] if mp != m else y


def quantize(
    x: torch.Tensor, block_shape: tuple[int, int], dtype: torch.dtype, scale_format: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, R, C] -> (q [B, R, C] ``dtype``, scale [B, cdiv(R,br), cdiv(C,bc)] float32)."""
    kwargs = {"block": tuple(block_shape), "dtype": dtype_name(dtype), "scale_format": scale_format}
    q, scale = _run(_quantize_jax, (x,), kwargs, x.device)
    return q, scale


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, block_shape: tuple[int, int], out_dtype: torch.dtype
) -> torch.Tensor:
    """q [B, R, C] fp8, scale [B, RB, CB] float32 (or float8_e8m0fnu) -> [B, R, C] ``out_dtype``."""
    kwargs = {"block": tuple(block_shape), "out_dtype": dtype_name(out_dtype)}
    return _run(_dequantize_jax, (q, scale), kwargs, q.device)


# --------------------------------------------------------------------------- grouped (MoE) ops
def gmm_config(
    m: int,
    n: int,
    k: int,
    g: int,
    block_shape: tuple[int, int],
    x_mode: str,
    x_dtype: torch.dtype,
    w_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> _bm.MatmulConfig:
    """Block sizes for gmm: the dense table / model for the average rows per group (cdiv(M, G),
    bucketed), i.e. the M extent one expert's weight streams against; known on the host without
    reading group_sizes."""
    rows = tuning.m_bucket(max(1, -(-m // g)))
    return matmul_config(rows, n, k, block_shape, x_mode, x_dtype, w_dtype, out_dtype, False)


def grouped_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    group_sizes: torch.Tensor,
    block_shape: tuple[int, int],
    x_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str,
    *,
    config: _bm.MatmulConfig | None = None,
) -> torch.Tensor:
    """y [M, N] ``out_dtype`` (reference.grouped_matmul): x [M, K], w [G, N, K] fp8, w_scale
    [G, cdiv(N,bn), cdiv(K,bk)] f32, group_sizes [G] int32 (never read on the host), x_scale
    [M, cdiv(K,bk)] f32 for fp8 x. M is padded to its bucket, then to the M tile, with zero rows
    that belong to no group (so one trace serves every M of a bucket and every group sizes)."""
    m, k = x.shape
    g, n, _ = w.shape
    x_mode = "fp8" if x_scale is not None else ("dynamic" if activation == "dynamic" else "none")
    cfg = config or gmm_config(m, n, k, g, block_shape, x_mode, x.dtype, w.dtype, out_dtype)
    mp = -(-tuning.m_bucket(m) // cfg.tm) * cfg.tm
    if mp != m:
        x = _pad_rows(x, mp - m)
        x_scale = None if x_scale is None else _pad_rows(x_scale, mp - m)
    kwargs = {"cfg": cfg, "out_dtype": dtype_name(out_dtype)}
    y = _run(_gmm_jax, (x, w, w_scale, group_sizes, x_scale), kwargs, x.device)
    return y[:m] if mp != m else y


def tgmm_config(
    m: int,
    k: int,
    n: int,
    g: int,
    block_m: int,
    out_dtype: torch.dtype,
    in_dtype: str = "bfloat16",
) -> _gp.TgmmConfig:
    """Tiles and quantization place (XLA pass or in-kernel) for tgmm of x [m, k], dy [m, n] of
    kernel dtype ``in_dtype`` (the wider of the two; float16 runs as float32) over g groups: the TPU model's best (tuning.tgmm_select) for
    cdiv(m, g) rows per group (bucketed to a power of two; known on the host without reading
    group_sizes), with the scoped VMEM limit sized from the tiles."""
    problem = tuning.TgmmProblem(
        tuning.tgmm_rows_bucket(m, g), k, n, g, block_m, _bm.kernel_dtype(dtype_name(out_dtype)),
        in_dtype=in_dtype,
    )  # fmt: skip
    return tuning.tgmm_select(generation(), problem)


def grouped_matmul_transposed(
    x: torch.Tensor,
    dy: torch.Tensor,
    group_sizes: torch.Tensor,
    block_m: int,
    out_dtype: torch.dtype,
    *,
    config: _gp.TgmmConfig | None = None,
) -> torch.Tensor:
    """out [G, K, N] ``out_dtype`` (reference.grouped_matmul_transposed): x [M, K], dy [M, N]
    bf16 / f16 / f32, group_sizes [G] int32 (never read on the host). M is padded to its bucket with
    zero rows (they belong to no group and leave every block's scale unchanged). ``config`` forces
    the kernel's tiles (tests); by default :func:`tgmm_config` picks them."""
    m, k = x.shape
    wider = max((_bm.kernel_dtype(dtype_name(t.dtype)) for t in (x, dy)), key=lambda d: jnp.dtype(d).itemsize)
    cfg = config or tgmm_config(m, k, dy.shape[1], group_sizes.shape[0], block_m, out_dtype, wider)
    if cfg.block_m != block_m:
        raise ValueError(f"config: block_m {cfg.block_m} differs from the call's block_m {block_m}")
    mp = tuning.m_bucket(m)
    if mp != m:
        x, dy = _pad_rows(x, mp - m), _pad_rows(dy, mp - m)
    kwargs = {"cfg": cfg, "out_dtype": dtype_name(out_dtype)}
    return _run(_tgmm_jax, (x, dy, group_sizes), kwargs, x.device)
