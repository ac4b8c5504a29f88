"""The ``torch.ops.fp8`` ops: schemas in ONE place, each with its fake implementation beside it.

Flow of a call: schema (here) -> validate (``_validate``) -> pick backend (``_dispatch``) ->
backend function on canonical shapes -> reshape to the caller's batch dims.
The same schema strings are declared in C++ in ``csrc_stubs/fp8_ops.cpp``; a test keeps them equal.

The ops are inference-only: each has an autograd formula that raises on backward, so a gradient
can never be silently zero or wrong.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence

import torch

from . import _dispatch, _route, _validate
from .formats import MX_BLOCK

SCHEMAS: dict[str, str] = {
    "quantize": (
        '(Tensor x, int[] block_shape, ScalarType dtype=float8_e4m3fn, str scale_format="fp32")'
        " -> (Tensor q, Tensor scale)"
    ),
    "dequantize": "(Tensor q, Tensor scale, int[] block_shape, ScalarType out_dtype=float32) -> Tensor",
    "blockwise_matmul": (
        "(Tensor x, Tensor w, Tensor w_scale, int[] block_shape=[128,128], Tensor? x_scale=None,"
        ' Tensor? bias=None, ScalarType? out_dtype=None, str activation="dynamic") -> Tensor'
    ),
    "mxfp8_quantize": "(Tensor x, ScalarType dtype=float8_e4m3fn) -> (Tensor q, Tensor scale_u8)",
    "mxfp8_matmul": (
        "(Tensor x, Tensor w, Tensor w_scale, Tensor? x_scale=None, Tensor? bias=None,"
        " ScalarType? out_dtype=None) -> Tensor"
    ),
}


#: All ops live in one Library fragment: define + impl is the cheapest registration torch offers
#: from Python (a trivial op: 3.3 us per call vs 10 us through torch.library.custom_op on our CPU
#: machine, 14.8 vs 28.7 us on the H100 host; NOTES section 6). vLLM registers its ops the same way.
_LIB = torch.library.Library("fp8", "FRAGMENT")
#: Dispatch keys below Autograd that may run our implementation directly (a plain dense tensor);
#: anything else there (Python for fake tensors and modes, Functionalize, ...) is redispatched.
_BELOW_AUTOGRAD = torch._C._after_autograd_keyset
_DENSE_KEYS = frozenset({torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA, torch._C.DispatchKey.XLA})
#: raw dispatch keyset at the Autograd kernel -> whether its keys below Autograd are plain dense.
_plain_keysets: dict[int, bool] = {}


def _is_plain(below: torch._C.DispatchKeySet) -> bool:
    return below.remove(torch._C.DispatchKey.ADInplaceOrView).highestPriorityTypeId() in _DENSE_KEYS


def _no_gradient(name: str) -> RuntimeError:
    return RuntimeError(
        f"fp8::{name} is inference-only and has no gradient; run it under torch.no_grad() / "
        "torch.inference_mode(), or keep the layer in high precision for training"
    )


class _InferenceOnly(torch.autograd.Function):
    """Wraps a call whose inputs require grad: outputs carry a grad_fn whose backward raises, so a
    gradient can never be silently zero."""

    @staticmethod
    def forward(ctx, name: str, op, *args):  # grad mode is off here: the op runs without autograd
        ctx.name = name
        return op(*args)

    @staticmethod
    def backward(ctx, *grads):
        raise _no_gradient(ctx.name)


def _autograd_kernel(name: str, impl):
    """The op's kernel at the Autograd key (opcheck's test_autograd_registration wants one).

    Fast path, no input requiring grad and a plain dense keyset below Autograd: call ``impl``
    directly, saving the second trip through the dispatcher that a redispatch costs. Fake tensors,
    modes and functionalization are redispatched to their keys; inputs requiring grad get outputs
    whose backward raises. (The dispatcher drops trailing arguments equal to their schema
    defaults; ``impl`` has the same defaults.)"""
    op = getattr(torch.ops.fp8, name).default
    # Locals, not module attributes: every call of every op runs these lines.
    is_grad_enabled, any_requires_grad = torch._C.is_grad_enabled, torch._C._any_requires_grad
    plain_keysets = _plain_keysets

    def kernel(keyset, *args):
        if is_grad_enabled() and any_requires_grad(*args):
            return _InferenceOnly.apply(name, op, *args)
        raw = keyset.raw_repr()
        plain = plain_keysets.get(raw)
        if plain is None:
            plain = plain_keysets[raw] = _is_plain(keyset & _BELOW_AUTOGRAD)
        if plain:
            return impl(*args)
        return op.redispatch(keyset & _BELOW_AUTOGRAD, *args)

    return kernel


#: Dispatch keys of tensors that are not dense (sparse COO / CSR, mkldnn) on the devices we serve:
#: an op call with such an argument lands in ``_not_dense``'s kernel, never in ``impl`` (which
#: would fail with torch's "Cannot access data pointer" or "unsupported memory format", naming
#: no argument). A registration per key costs the dense path nothing.
_NOT_DENSE_KEYS = tuple(
    k
    for k in (
        "SparseCPU",
        "SparseCUDA",
        "SparseMeta",
        "SparseCsrCPU",
        "SparseCsrCUDA",
        "SparseCsrMeta",
        "MkldnnCPU",
    )
    if hasattr(torch._C.DispatchKey, k)
)


def _not_dense(name: str):
    """The kernel of ``fp8::<name>`` at the non-dense keys: a TypeError naming the argument."""
    arg_names = [a.name for a in getattr(torch.ops.fp8, name).default._schema.arguments]

    def kernel(*args):
        for arg_name, value in zip(arg_names, args, strict=False):
            if isinstance(value, torch.Tensor):
                _validate.tensor(value, arg_name)  # raises for the first non-dense one
        raise TypeError(f"fp8::{name}: expected dense (torch.strided) tensors")  # (a non-dense kwarg)

    return kernel


def _register(name: str, impl, fake) -> None:
    """Define ``fp8::<name>`` with ``SCHEMAS[name]``: ``impl`` for every backend key, ``fake`` for
    tracing (FakeTensor / torch.compile), an inference-only autograd kernel, and a kernel that
    refuses sparse / mkldnn arguments by name."""
    _LIB.define(name + SCHEMAS[name])
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fp8::{name}", fake, lib=_LIB)
    _LIB.impl(name, _autograd_kernel(name, impl), "Autograd", with_keyset=True)
    for key in _NOT_DENSE_KEYS:
        _LIB.impl(name, _not_dense(name), key)


#: Module-level alias: the empty-result path of the matmul ops skips the ``torch`` attribute lookup.
_empty_like = torch.empty_like


def _flat3(t: torch.Tensor) -> torch.Tensor:
    """[..., R, C] -> [B, R, C] (a view when t is contiguous)."""
    return t.reshape(-1, *t.shape[-2:])


# --------------------------------------------------------------------------------------- quantize
def _quantize_impl(
    x: torch.Tensor,
    block_shape: Sequence[int],
    dtype: torch.dtype = torch.float8_e4m3fn,
    scale_format: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    block = _validate.quantize_args(x, block_shape, dtype, scale_format)
    scale_shape = _validate.scale_grid(x.shape, block)
    if x.numel() == 0:
        q = torch.empty(x.shape, dtype=dtype, device=x.device)
        return q, torch.zeros(scale_shape, dtype=torch.float32, device=x.device)
    _, fn = _dispatch.implementation("quantize", x.device)
    if x.dim() == 2:  # the common case: index views cost the call ~7 us less than two reshapes
        q, scale = fn(x[None], block, dtype, scale_format)
        return q[0], scale[0]
    q, scale = fn(_flat3(x), block, dtype, scale_format)
    return q.reshape(x.shape), scale.reshape(scale_shape)


def _quantize_fake(x, block_shape, dtype=torch.float8_e4m3fn, scale_format="fp32"):
    block = _validate.quantize_args(x, block_shape, dtype, scale_format)
    scale_shape = _validate.scale_grid(x.shape, block)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(scale_shape, dtype=torch.float32)


# ------------------------------------------------------------------------------------- dequantize
def _dequantize_impl(
    q: torch.Tensor,
    scale: torch.Tensor,
    block_shape: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    block = _validate.dequantize_args(q, scale, block_shape, out_dtype)
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=out_dtype, device=q.device)
    _, fn = _dispatch.implementation("dequantize", q.device)
    return fn(_flat3(q), _flat3(scale), block, out_dtype).reshape(q.shape)


def _dequantize_fake(q, scale, block_shape, out_dtype=torch.float32):
    _validate.dequantize_args(q, scale, block_shape, out_dtype)
    return q.new_empty(q.shape, dtype=out_dtype)


# ------------------------------------------------------------------------------- blockwise_matmul
def _blockwise_matmul_impl(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    block_shape: Sequence[int] = (128, 128),
    x_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    activation: str = "dynamic",
) -> torch.Tensor:
    p = _validate.matmul_args_cached(x, w, w_scale, block_shape, x_scale, bias, out_dtype, activation)
    if p.empty:  # a fresh empty tensor like the cached template: no shape/dtype/device to parse
        return _empty_like(p.empty_template)
    return _run_matmul("blockwise_matmul", p, x, w, w_scale, x_scale, bias, activation)


def _run_matmul(
    op: str,
    p: _validate.MatmulProblem,
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str | None = None,
) -> torch.Tensor:
    """Shared tail of the matmul ops for non-empty results (``p.empty`` is False): K == 0,
    flattening batch dims, dispatch, reshape back. ``activation`` None: mxfp8_matmul (no block).

    On CUDA (the device's own backend, not one forced with use_backend), blockwise_matmul goes
    through the routing rule (``_route``): cuBLAS, the Triton kernel or dequantize + GEMM."""
    device = p.device
    if p.k == 0:  # an empty sum: y = bias (or 0)
        y = torch.zeros(p.out_shape, dtype=torch.float32, device=device)
        return (y if bias is None else y + bias.float()).to(p.out_dtype)
    name, fn = _dispatch.implementation(op, device)
    if name == "triton" and activation is not None and _dispatch.forced_backend() is None:
        name, fn = _route.route(device, p.m, p.n, p.k, p.block, x.dtype, w.dtype, activation, p.out_dtype)
    if p.batched:  # copies only a non-contiguous activation, never the weight
        x = x.reshape(p.m, p.k)
        if x_scale is not None:
            x_scale = x_scale.reshape(p.m, -1)
    if x_scale is not None:
        x_scale = x_scale.contiguous()
    if bias is not None:  # every kernel reads bias[n] at bias_ptr + n (a stride-2 view or an
        bias = bias.contiguous()  # expand()ed one gave wrong numbers or read past its storage)
    if activation is None:
        y = fn(x, w, w_scale.contiguous(), x_scale, bias, p.out_dtype)
    else:
        y = fn(x, w, w_scale.contiguous(), p.block, x_scale, bias, p.out_dtype, activation)
    return y.reshape(p.out_shape) if p.batched else y


def _blockwise_matmul_fake(
    x, w, w_scale, block_shape=(128, 128), x_scale=None, bias=None, out_dtype=None, activation="dynamic"
):
    p = _validate.matmul_args(x, w, w_scale, block_shape, x_scale, bias, out_dtype, activation)
    return x.new_empty((*p.lead, p.n), dtype=p.out_dtype)


# -------------------------------------------------------------------------------- mxfp8_quantize
def _mxfp8_quantize_impl(
    x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    _validate.mxfp8_quantize_args(x, dtype)
    scale_shape = (*x.shape[:-1], x.shape[-1] // MX_BLOCK)
    if x.numel() == 0:
        q = torch.empty(x.shape, dtype=dtype, device=x.device)
        return q, torch.zeros(scale_shape, dtype=torch.uint8, device=x.device)
    _, fn = _dispatch.implementation("mxfp8_quantize", x.device)
    q, scale = fn(x.reshape(-1, x.shape[-1]), dtype)
    return q.reshape(x.shape), scale.reshape(scale_shape)


def _mxfp8_quantize_fake(x, dtype=torch.float8_e4m3fn):
    _validate.mxfp8_quantize_args(x, dtype)
    scale_shape = (*x.shape[:-1], x.shape[-1] // MX_BLOCK)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(scale_shape, dtype=torch.uint8)


# ---------------------------------------------------------------------------------- mxfp8_matmul
def _mxfp8_matmul_impl(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    p = _validate.mxfp8_matmul_args(x, w, w_scale, x_scale, bias, out_dtype)
    if p.empty:
        return x.new_empty(*p.out_shape, dtype=p.out_dtype)  # x's device; sizes as varargs
    return _run_matmul("mxfp8_matmul", p, x, w, w_scale, x_scale, bias)


def _mxfp8_matmul_fake(x, w, w_scale, x_scale=None, bias=None, out_dtype=None):
    p = _validate.mxfp8_matmul_args(x, w, w_scale, x_scale, bias, out_dtype)
    return x.new_empty((*p.lead, p.n), dtype=p.out_dtype)


_register("quantize", _quantize_impl, _quantize_fake)
_register("dequantize", _dequantize_impl, _dequantize_fake)
_register("blockwise_matmul", _blockwise_matmul_impl, _blockwise_matmul_fake)
_register("mxfp8_quantize", _mxfp8_quantize_impl, _mxfp8_quantize_fake)
_register("mxfp8_matmul", _mxfp8_matmul_impl, _mxfp8_matmul_fake)
#: The overloads themselves: calling one skips OpOverloadPacket.__call__ (~4 us) and the torch.ops
#: attribute chain.
_blockwise_matmul_op = torch.ops.fp8.blockwise_matmul.default
_quantize_op = torch.ops.fp8.quantize.default
_dequantize_op = torch.ops.fp8.dequantize.default


# ----------------------------------------------------------------------------- Python wrappers
#: Block sizes any op accepts (``_validate`` checks each op's own set); the wrappers' fast check
#: lets only these through untouched, so that an int the schema cannot hold (1 << 63) or a bool
#: (True == 1) reaches ``_precheck`` and its named error.
_BLOCK_SIZES = frozenset({1, 128, 256, 512})
_DTYPE = torch.dtype


def _is_int_pair(block_shape: object) -> bool:
    """The common block_shape, checked cheaply: a list or tuple of two ints from _BLOCK_SIZES (the
    schema's int[] takes either as it is)."""
    return (
        type(block_shape) in (list, tuple)
        and len(block_shape) == 2
        and type(block_shape[0]) is int
        and type(block_shape[1]) is int
        and block_shape[0] in _BLOCK_SIZES
        and block_shape[1] in _BLOCK_SIZES
    )


_NO_BLOCK = object()


def _precheck(
    block_shape: object = _NO_BLOCK,
    *,
    dtypes: dict[str, tuple[object, bool]] | None = None,
    strings: dict[str, tuple[object, tuple[str, ...]]] | None = None,
    **tensors: object,
) -> list[int] | None:
    """The wrappers' checks of argument KINDS, which torch's op schema would otherwise reject with
    a RuntimeError, or accept with a silent conversion (an int as a dtype code, True as 1); the
    full checks of values run inside the op. dtypes: name -> (value, may be None); strings:
    name -> (value, allowed values). Returns block_shape as the list of ints the op takes."""
    _validate.tensors(**tensors)
    for name, (value, optional) in (dtypes or {}).items():
        _validate.dtype_kind(value, name, optional=optional)
    for name, (value, allowed) in (strings or {}).items():
        _validate.str_kind(value, name, allowed)
    if block_shape is _NO_BLOCK:
        return None
    return _validate.block_ints(block_shape, "block_shape")


def quantize(
    x: torch.Tensor,
    block_shape: Sequence[int] = (1, 128),
    dtype: torch.dtype = torch.float8_e4m3fn,
    scale_format: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 quantization of the last two dims of ``x``.

    Args:
        x: [..., R, C] bfloat16 / float16 / float32, any device with a backend.
        block_shape: (br, bc): br in (1, 128, 256, 512), bc in (128, 256, 512).
            (1, 128) = per-token groups for activations, (128, 128) = DeepSeek weight blocks.
        dtype: torch.float8_e4m3fn (max 448) or torch.float8_e5m2 (max 57344).
        scale_format: "fp32" (scale = max(amax, 1e-10) / fp8_max) or "ue8m0" (that scale rounded
            up to a power of two, as DeepSeek V3.1 and MX use).

    Returns:
        q: [..., R, C] ``dtype``, same layout as x.
        scale: [..., cdiv(R, br), cdiv(C, bc)] float32, row-major; a MULTIPLIER: x ~= q * scale
            (for a weight [N, K] with (128, 128) blocks this is DeepSeek's ``weight_scale_inv``).

    Non-finite input: ``+-inf`` saturates to ``+-fp8_max`` and ``nan`` stays ``nan`` in its own
    element; neither changes the block's scale, which comes from the finite values. An all-zero
    block gives q = 0 and scale = 1e-10 / fp8_max. Finite input never produces nan.
    """
    if not (
        isinstance(x, torch.Tensor) and _is_int_pair(block_shape) and type(dtype) is _DTYPE
        and type(scale_format) is str
    ):  # fmt: skip
        block_shape = _precheck(  # raises with the argument's name
            block_shape, x=x, dtypes={"dtype": (dtype, False)},
            strings={"scale_format": (scale_format, _validate.SCALE_FORMATS)},
        )  # fmt: skip
    return _quantize_op(x, block_shape, dtype, scale_format)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    block_shape: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``q * scale`` broadcast over blocks, cast to ``out_dtype``.

    Args:
        q: [..., R, C] float8_e4m3fn or float8_e5m2.
        scale: [..., cdiv(R, br), cdiv(C, bc)] float32 multipliers.
        block_shape: (br, bc) used when quantizing.
        out_dtype: bfloat16, float16 or float32.

    Returns: [..., R, C] ``out_dtype``.
    """
    if not (
        isinstance(q, torch.Tensor) and isinstance(scale, torch.Tensor) and _is_int_pair(block_shape)
        and type(out_dtype) is _DTYPE
    ):  # fmt: skip
        # raises with the argument's name
        block_shape = _precheck(block_shape, q=q, scale=scale, dtypes={"out_dtype": (out_dtype, False)})
    return _dequantize_op(q, scale, block_shape, out_dtype)


def blockwise_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    block_shape: Sequence[int] = (128, 128),
    x_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    activation: str = "dynamic",
) -> torch.Tensor:
    """``y = x @ w.T`` with a block-wise FP8 weight (DeepSeek-V3 layout).

    Args:
        x: [..., K]. Either fp8 (float8_e4m3fn / e5m2) with ``x_scale``, or bfloat16 / float16 /
            float32; any strides (a non-contiguous activation is copied once).
        w: [N, K] (out_features, in_features) float8_e4m3fn or float8_e5m2, contiguous row-major.
        w_scale: [cdiv(N, bn), cdiv(K, bk)] float32, row-major; w ~= w_q * w_scale
            (DeepSeek's ``weight_scale_inv``).
        block_shape: (bn, bk), each of 128, 256, 512.
        x_scale: [..., cdiv(K, bk)] float32 multipliers for fp8 x (1 x bk groups); None otherwise.
        bias: [N] bfloat16 / float16 / float32, added in fp32 before the cast.
        out_dtype: bfloat16 / float16 / float32; default x.dtype, or bfloat16 for fp8 x.
        activation: for high-precision x: "dynamic" quantizes x per 1 x bk group to e4m3fn
            (W8A8); "none" keeps x at its precision (W8A16, weight-only).

    Returns: [..., N] ``out_dtype``. Semantics: :mod:`torch_fp8_blockwise.reference`.
    """
    T = torch.Tensor
    if (  # the common call, checked in one expression; anything else gets _precheck's message
        isinstance(x, T) and isinstance(w, T) and isinstance(w_scale, T)
        and (x_scale is None or isinstance(x_scale, T)) and (bias is None or isinstance(bias, T))
        and _is_int_pair(block_shape) and (out_dtype is None or type(out_dtype) is _DTYPE)
        and type(activation) is str
    ):  # fmt: skip
        block = block_shape  # the schema's int[] takes a list or a tuple as it is
    else:
        block = _precheck(
            block_shape, x=x, w=w, w_scale=w_scale, x_scale=x_scale, bias=bias,
            dtypes={"out_dtype": (out_dtype, True)}, strings={"activation": (activation, _validate.ACTIVATIONS)},
        )  # fmt: skip
    return _blockwise_matmul_op(x, w, w_scale, block, x_scale, bias, out_dtype, activation)


def mxfp8_quantize(
    x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8 (OCP Microscaling) quantization: 32 consecutive elements along K share one scale.

    Args:
        x: [..., K] bfloat16 / float16 / float32, K a multiple of 32.
        dtype: element type, torch.float8_e4m3fn or torch.float8_e5m2.

    Returns:
        q: [..., K] ``dtype``.
        scale_u8: [..., K // 32] uint8 E8M0 bits, scale = 2**(bits - 127) (255 = NaN), a multiplier:
            x ~= q * scale. Rounding rule: scale = 2**ceil(log2(max(amax, 1e-10) / fp8_max)) with amax
            the block's largest finite |x| (rounding up: nothing saturates that fits the fp8 range).
            uint8 because torch_xla cannot move float8_e8m0fnu; ``scale_u8.view(torch.float8_e8m0fnu)``
            gives the torch dtype where it exists.
    """
    _precheck(x=x, dtypes={"dtype": (dtype, False)})
    return torch.ops.fp8.mxfp8_quantize(x, dtype)


def mxfp8_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``y = x @ w.T`` with MXFP8 operands (1 x 32 groups along K, E8M0 scales).

    Args:
        x: [..., K]: fp8 with ``x_scale``, or bfloat16 / float16 / float32 (quantized on the fly
            with :func:`mxfp8_quantize` to e4m3fn). K a multiple of 32.
        w: [N, K] float8_e4m3fn / e5m2, contiguous row-major (e.g. from :func:`mxfp8_quantize`).
        w_scale: [N, K // 32] uint8 E8M0 bits.
        x_scale: [..., K // 32] uint8 E8M0 bits for fp8 x; None otherwise.
        bias: [N] bfloat16 / float16 / float32, added in fp32.
        out_dtype: bfloat16 / float16 / float32; default x.dtype, or bfloat16 for fp8 x.

    Returns: [..., N] ``out_dtype``; semantics: W8A8 blockwise with (bn, bk) = (1, 32).
    """
    _precheck(x=x, w=w, w_scale=w_scale, x_scale=x_scale, bias=bias, dtypes={"out_dtype": (out_dtype, True)})
    return torch.ops.fp8.mxfp8_matmul(x, w, w_scale, x_scale, bias, out_dtype)


# ==================================================================== grouped (MoE) matmul ops
SCHEMAS["grouped_matmul"] = (
    "(Tensor x, Tensor w, Tensor w_scale, Tensor group_sizes, int[] block_shape=[128,128],"
    ' Tensor? x_scale=None, ScalarType? out_dtype=None, str activation="dynamic") -> Tensor'
)
SCHEMAS["grouped_matmul_transposed"] = (
    "(Tensor x, Tensor dy, Tensor group_sizes, int block_m=128, ScalarType? out_dtype=None) -> Tensor"
)


def _grouped_matmul_impl(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    group_sizes: torch.Tensor,
    block_shape: Sequence[int] = (128, 128),
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    activation: str = "dynamic",
) -> torch.Tensor:
    p = _validate.grouped_matmul_args(x, w, w_scale, group_sizes, block_shape, x_scale, out_dtype, activation)
    _validate.group_sizes_values(group_sizes, p.m)
    if p.m == 0 or p.n == 0:
        return x.new_empty(p.m, p.n, dtype=p.out_dtype)
    if p.k == 0 or p.g == 0:  # an empty sum, or no group owns a row
        return x.new_zeros(p.m, p.n, dtype=p.out_dtype)
    _, fn = _dispatch.implementation("grouped_matmul", x.device)
    xs = None if x_scale is None else x_scale.contiguous()
    return fn(
        x.contiguous(), w, w_scale.contiguous(), group_sizes.contiguous(), (p.bn, p.bk), xs, p.out_dtype,
        activation,
    )  # fmt: skip


def _grouped_matmul_fake(
    x, w, w_scale, group_sizes, block_shape=(128, 128), x_scale=None, out_dtype=None, activation="dynamic"
):
    p = _validate.grouped_matmul_args(x, w, w_scale, group_sizes, block_shape, x_scale, out_dtype, activation)
    return x.new_empty((p.m, p.n), dtype=p.out_dtype)


def _grouped_matmul_transposed_impl(
    x: torch.Tensor,
    dy: torch.Tensor,
    group_sizes: torch.Tensor,
    block_m: int = 128,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    p = _validate.grouped_matmul_transposed_args(x, dy, group_sizes, block_m, out_dtype)
    _validate.group_sizes_values(group_sizes, p.m)
    out_shape = (p.g, p.k, p.n)
    if p.g == 0 or p.k == 0 or p.n == 0:
        return x.new_empty(out_shape, dtype=p.out_dtype)
    if p.m == 0:  # every group is empty: an empty sum
        return x.new_zeros(out_shape, dtype=p.out_dtype)
    _, fn = _dispatch.implementation("grouped_matmul_transposed", x.device)
    return fn(x.contiguous(), dy.contiguous(), group_sizes.contiguous(), block_m, p.out_dtype)


def _grouped_matmul_transposed_fake(x, dy, group_sizes, block_m=128, out_dtype=None):
    p = _validate.grouped_matmul_transposed_args(x, dy, group_sizes, block_m, out_dtype)
    return x.new_empty((p.g, p.k, p.n), dtype=p.out_dtype)


_register("grouped_matmul", _grouped_matmul_impl, _grouped_matmul_fake)
_register("grouped_matmul_transposed", _grouped_matmul_transposed_impl, _grouped_matmul_transposed_fake)


def grouped_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    group_sizes: torch.Tensor,
    block_shape: Sequence[int] = (128, 128),
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    activation: str = "dynamic",
) -> torch.Tensor:
    """Grouped (MoE) ``y[i] = x[i] @ w[g(i)].T`` with block-wise FP8 expert weights (gmm).

    Args:
        x: [M, K] token rows sorted by group (expert): group g owns rows
            [sum(group_sizes[:g]), sum(group_sizes[:g+1])). Either fp8 (float8_e4m3fn / e5m2) with
            ``x_scale``, or bfloat16 / float16 / float32 (a non-contiguous x is copied once).
        w: [G, N, K] (groups, out_features, in_features) float8_e4m3fn / e5m2, contiguous row-major:
            G DeepSeek-layout weights stacked.
        w_scale: [G, cdiv(N, bn), cdiv(K, bk)] float32 multipliers, row-major; w[g] ~= wq[g] * w_scale[g].
        group_sizes: [G] int32 row counts, on x's device. sum(group_sizes) <= M: rows at or past the
            sum are 0 in the result. On CPU a larger sum or a negative size is a ValueError; on
            cuda / xla the values are never read on the host (no sync: CUDA graphs and XLA graphs
            hold), a sum above M truncates the groups at row M and negative sizes are unspecified.
        block_shape: (bn, bk), each of 128, 256, 512.
        x_scale: [M, cdiv(K, bk)] float32 multipliers for fp8 x (1 x bk groups); None otherwise.
        out_dtype: bfloat16 / float16 / float32; default x.dtype, or bfloat16 for fp8 x.
        activation: for high-precision x: "dynamic" quantizes x per 1 x bk group to e4m3fn
            (W8A8); "none" keeps x at its precision (W8A16).

    Returns: [M, N] ``out_dtype``; row i of group g equals ``blockwise_matmul(x[i], w[g], w_scale[g])``.
    Semantics: :mod:`torch_fp8_blockwise.reference`; design notes: docs/grouped.md.
    """
    block = _precheck(
        block_shape, x=x, w=w, w_scale=w_scale, group_sizes=group_sizes, x_scale=x_scale,
        dtypes={"out_dtype": (out_dtype, True)}, strings={"activation": (activation, _validate.ACTIVATIONS)},
    )  # fmt: skip
    return torch.ops.fp8.grouped_matmul.default(
        x, w, w_scale, group_sizes, block, x_scale, out_dtype, activation
    )


def grouped_matmul_transposed(
    x: torch.Tensor,
    dy: torch.Tensor,
    group_sizes: torch.Tensor,
    block_m: int = 128,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Grouped ``out[g] = x_g.T @ dy_g`` with both operands quantized to FP8 along M (tgmm).

    The weight-gradient form of :func:`grouped_matmul`: the reduction runs over the rows of each group.

    Args:
        x: [M, K] bfloat16 / float16 / float32, rows sorted by group (as in :func:`grouped_matmul`).
        dy: [M, N] bfloat16 / float16 / float32, the same row order.
        group_sizes: [G] int32 row counts on x's device (same rules as :func:`grouped_matmul`).
        block_m: rows per quantization block along M: 128, 256 or 512. x and dy are quantized to
            float8_e4m3fn with one float32 scale per (block of block_m rows, column), blocks at
            absolute row offsets 0, block_m, ... (x_scale [cdiv(M, block_m), K], dy_scale
            [cdiv(M, block_m), N]); a block straddling a group boundary has one scale for both groups.
        out_dtype: bfloat16 / float16 / float32; default x.dtype.

    Returns: [G, K, N] ``out_dtype``, fp32-accumulated; an empty group gives zeros.
    Semantics: :mod:`torch_fp8_blockwise.reference`.
    """
    _precheck(x=x, dy=dy, group_sizes=group_sizes, dtypes={"out_dtype": (out_dtype, True)})
    if not isinstance(block_m, numbers.Integral) or isinstance(block_m, bool):
        raise TypeError(f"block_m: expected an int, got {block_m!r}")
    block_m = operator.index(block_m)  # as the op's schema parser reads it
    return torch.ops.fp8.grouped_matmul_transposed.default(x, dy, group_sizes, block_m, out_dtype)
