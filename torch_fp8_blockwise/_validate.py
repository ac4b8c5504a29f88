"""Argument checks shared by every op and every backend (and by the fake implementations).

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, value,
layout or device) with a message that names the argument, says what was expected and what came.
Runs before dispatch, so all backends reject the same inputs with the same words.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .formats import (
    BLOCK_COLS,
    BLOCK_ROWS,
    FP8_DTYPES,
    HIGH_PRECISION_DTYPES,
    MATMUL_BLOCKS,
    MX_BLOCK,
    SCALE_FORMATS,
    cdiv,
    is_fp8,
)

ACTIVATIONS: tuple[str, ...] = ("dynamic", "none")


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d) for d in dtypes)


def tensor(t: object, name: str, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout is not torch.strided:
        raise TypeError(f"{name}: expected a dense (torch.strided) tensor, got layout {t.layout}")


#: Tensor arguments that may be None.
OPTIONAL_TENSORS: tuple[str, ...] = ("x_scale", "bias")


def tensors(**named: object) -> None:
    """``tensor()`` for each keyword argument; the names in OPTIONAL_TENSORS may be None."""
    for name, t in named.items():
        tensor(t, name, optional=name in OPTIONAL_TENSORS)


def dtype_in(t: torch.Tensor, name: str, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name}: expected dtype in ({_names(allowed)}), got {t.dtype}")


def dtype_arg(dtype: object, name: str, allowed: Sequence[torch.dtype]) -> None:
    if dtype not in allowed:
        raise TypeError(f"{name}: expected one of ({_names(allowed)}), got {dtype}")


def dtype_kind(value: object, name: str, *, optional: bool = False) -> None:
    """A dtype argument as the caller passed it (the Python wrappers): a ``torch.dtype`` (or None
    where optional). torch's op schema would read an int as a ScalarType code (5 -> float16) and
    reject a string with a RuntimeError; both are refused here, before the op."""
    if (value is None and optional) or isinstance(value, torch.dtype):
        return
    raise TypeError(f"{name}: expected a torch.dtype{' or None' if optional else ''}, got {value!r}")


def str_kind(value: object, name: str, allowed: Sequence[str]) -> None:
    """A string argument as the caller passed it (the Python wrappers)."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, one of {tuple(allowed)}, got {value!r}")


#: The range of a schema ``int``: a larger Python int fails in torch's argument parser.
_INT64 = 1 << 63


def block_ints(value: object, name: str) -> list[int]:
    """``value`` as the list of two ints an ``int[]`` argument takes, for the Python wrappers.

    A pair (list / tuple) of integers: Python ints or numpy integers (any ``numbers.Integral``
    converted exactly with ``operator.index``), accepted because torch's schema parser accepts
    them in ``torch.ops.fp8.*`` too (one rule for the wrappers and the ops). A bool is refused (the
    schema would read True as 1: block_shape=[True, 128] must not mean [1, 128]), as are floats,
    tensors and ints outside int64 (the schema parser's range)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name}: expected a pair [rows, cols], got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value):
        raise TypeError(f"{name}: expected two ints, got {value!r}")
    ints = [operator.index(v) for v in value]
    if any(not -_INT64 <= v < _INT64 for v in ints):
        raise ValueError(f"{name}: expected two ints within int64, got {value!r}")
    return ints


def min_ndim(t: torch.Tensor, name: str, ndim: int, what: str) -> None:
    if t.dim() < ndim:
        raise ValueError(f"{name}: expected at least {ndim} dims {what}, got shape {tuple(t.shape)}")


def shape_is(t: torch.Tensor, name: str, expected: Sequence[int], what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} {what}, got {tuple(t.shape)}")


def same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            raise ValueError(
                f"{name}: expected a tensor on {first.device} (the device of {first_name}), "
                f"got one on {t.device}"
            )


def block_shape(value: object, name: str, rows: Sequence[int], cols: Sequence[int]) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name}: expected a pair [rows, cols], got {value!r}")
    br, bc = value
    if isinstance(br, bool) or isinstance(bc, bool) or not isinstance(br, int) or not isinstance(bc, int):
        raise TypeError(f"{name}: expected two ints, got {value!r}")
    if br not in rows or bc not in cols:
        raise ValueError(
            f"{name}: block rows must be one of {tuple(rows)} and block cols one of "
            f"{tuple(cols)}; got {[br, bc]}"
        )
    return br, bc


def quantize_args(x: torch.Tensor, block: object, dtype: object, scale_format: object) -> tuple[int, int]:
    tensor(x, "x")
    dtype_in(x, "x", HIGH_PRECISION_DTYPES)
    min_ndim(x, "x", 2, "(blocks tile the last two dims)")
    dtype_arg(dtype, "dtype", FP8_DTYPES)
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format: expected one of {SCALE_FORMATS}, got {scale_format!r}")
    return block_shape(block, "block_shape", BLOCK_ROWS, BLOCK_COLS)


def scale_grid(shape: Sequence[int], block: tuple[int, int]) -> tuple[int, ...]:
    """Scale shape for a tensor whose last two dims are tiled by ``block``."""
    *lead, rows, cols = shape
    return (*lead, cdiv(rows, block[0]), cdiv(cols, block[1]))


def dequantize_args(
    q: torch.Tensor, scale: torch.Tensor, block: object, out_dtype: object
) -> tuple[int, int]:
    tensor(q, "q")
    tensor(scale, "scale")
    dtype_in(q, "q", FP8_DTYPES)
    min_ndim(q, "q", 2, "(blocks tile the last two dims)")
    dtype_in(scale, "scale", (torch.float32,))
    dtype_arg(out_dtype, "out_dtype", HIGH_PRECISION_DTYPES)
    br_bc = block_shape(block, "block_shape", BLOCK_ROWS, BLOCK_COLS)
    shape_is(scale, "scale", scale_grid(q.shape, br_bc), f"(q {tuple(q.shape)} tiled by {list(br_bc)})")
    same_device(q=q, scale=scale)
    return br_bc


@dataclass(frozen=True)
class MatmulProblem:
    """Validated sizes of one blockwise_matmul call: x [*lead, K] @ w[N, K]^T -> [*lead, N].

    The derived fields are computed once here, on a validation-cache miss, so that the per-call
    path (``ops._run_matmul``) reads them instead of rebuilding tuples on every call."""

    lead: tuple[int, ...]
    m: int
    n: int
    k: int
    bn: int
    bk: int
    out_dtype: torch.dtype
    #: x's device (every tensor argument is on it).
    device: torch.device
    #: (*lead, N), the result's shape.
    out_shape: tuple[int, ...] = field(init=False)
    #: M == 0 or N == 0: the result is an empty tensor, nothing to compute.
    empty: bool = field(init=False)
    #: x is not [M, K] already (lead is not one dim): the op flattens x to 2-D and reshapes y back.
    batched: bool = field(init=False)
    #: (bn, bk), as the backends take it.
    block: tuple[int, int] = field(init=False)
    #: For an empty result of real tensors (set by matmul_args_cached): a zero-size tensor of the
    #: result's shape, dtype and device, so that each call's fresh result is one ``torch.empty_like``
    #: (~0.6 us less than building it from shape, dtype and device arguments). Never returned itself.
    empty_template: torch.Tensor | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_shape", (*self.lead, self.n))
        object.__setattr__(self, "empty", self.m == 0 or self.n == 0)
        object.__setattr__(self, "batched", len(self.lead) != 1)
        object.__setattr__(self, "block", (self.bn, self.bk))


def _weight(w: torch.Tensor) -> tuple[int, int]:
    dtype_in(w, "w", FP8_DTYPES)
    if w.dim() != 2:
        raise ValueError(f"w: expected 2 dims [N, K] (out_features, in_features), got shape {tuple(w.shape)}")
    if not w.is_contiguous():
        raise ValueError(
            f"w: expected a contiguous row-major [N, K] weight, got strides {tuple(w.stride())}; "
            "call w.contiguous() once when loading (a per-call copy of the weight would be silent and slow)"
        )
    return w.shape[0], w.shape[1]


def _activation_and_tail(
    x: torch.Tensor,
    k: int,
    x_scale: torch.Tensor | None,
    x_scale_dtype: torch.dtype,
    groups: int,
    group_what: str,
    bias: torch.Tensor | None,
    n: int,
    out_dtype: torch.dtype | None,
) -> tuple[tuple[int, ...], int, torch.dtype]:
    """Checks shared by the matmul ops for x, x_scale, bias and out_dtype; returns (lead, M, out_dtype)."""
    dtype_in(x, "x", FP8_DTYPES + HIGH_PRECISION_DTYPES)
    min_ndim(x, "x", 1, "[..., K]")
    if x.shape[-1] != k:
        raise ValueError(f"x: expected last dim K={k} (the weight's in_features), got shape {tuple(x.shape)}")
    lead = tuple(x.shape[:-1])
    if is_fp8(x.dtype):
        if x_scale is None:
            raise ValueError(f"x_scale: required when x is fp8 ({x.dtype}); expected shape {(*lead, groups)}")
        dtype_in(x_scale, "x_scale", (x_scale_dtype,))
        shape_is(x_scale, "x_scale", (*lead, groups), f"(x.shape[:-1] + ({group_what},))")
    elif x_scale is not None:
        raise ValueError(
            f"x_scale: only for fp8 x, but x is {x.dtype}; drop x_scale (x is quantized on the fly)"
        )
    if bias is not None:
        dtype_in(bias, "bias", HIGH_PRECISION_DTYPES)
        shape_is(bias, "bias", (n,), "(N,)")
    if out_dtype is None:
        out_dtype = torch.bfloat16 if is_fp8(x.dtype) else x.dtype
    dtype_arg(out_dtype, "out_dtype", HIGH_PRECISION_DTYPES)
    m = 1
    for d in lead:
        m *= d
    return lead, m, out_dtype


def matmul_args(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    block: object,
    x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    activation: object,
) -> MatmulProblem:
    tensors(x=x, w=w, w_scale=w_scale, x_scale=x_scale, bias=bias)
    bn, bk = block_shape(block, "block_shape", MATMUL_BLOCKS, MATMUL_BLOCKS)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")

    n, k = _weight(w)
    dtype_in(w_scale, "w_scale", (torch.float32,))
    shape_is(w_scale, "w_scale", (cdiv(n, bn), cdiv(k, bk)), f"(cdiv(N={n}, {bn}), cdiv(K={k}, {bk}))")
    if is_fp8(x.dtype) and activation == "none":
        raise ValueError(
            f"activation: 'none' keeps x at its own precision, but x is {x.dtype}; "
            "use activation='dynamic' (the default) and pass x_scale"
        )
    lead, m, out_dtype = _activation_and_tail(
        x, k, x_scale, torch.float32, cdiv(k, bk), f"cdiv(K={k}, {bk})", bias, n, out_dtype
    )
    same_device(x=x, w=w, w_scale=w_scale, x_scale=x_scale, bias=bias)
    return MatmulProblem(lead=lead, m=m, n=n, k=k, bn=bn, bk=bk, out_dtype=out_dtype, device=x.device)


#: matmul_args results for argument metadata seen before (the hot path of an eager call). Bounded:
#: a model has a few hundred (shape, dtype) combinations; past the cap the cache starts over.
_MATMUL_CACHE_CAP = 4096
_matmul_cache: dict[tuple, MatmulProblem] = {}


def matmul_args_cached(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    block: list[int] | tuple[int, ...],
    x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    activation: str,
) -> MatmulProblem:
    """:func:`matmul_args` for real (not symbolic) tensors, memoized on everything it checks:
    dtypes, shapes, devices, the weight's contiguity, block, out_dtype, activation.
    A miss (or any invalid call) runs the full checks, so errors are word for word the same.
    A hit costs one tuple and one dict lookup (~1.5 us on our CPU machine; the full checks
    ~11 us: ``scripts/bench_host.py --breakdown``). Every element is read from the tensors on every call: a tensor's metadata can change
    in place (``resize_``, ``set_``, ``.data =``), so the key never trusts an object's identity."""
    key = (
        x.dtype, x.shape, x.device, w.dtype, w.shape, w.is_contiguous(), w.device,
        w_scale.dtype, w_scale.shape, w_scale.device,
        None if x_scale is None else (x_scale.dtype, x_scale.shape, x_scale.device),
        None if bias is None else (bias.dtype, bias.shape, bias.device),
        tuple(block), out_dtype, activation,
    )  # fmt: skip
    p = _matmul_cache.get(key)
    if p is None:
        p = matmul_args(x, w, w_scale, block, x_scale, bias, out_dtype, activation)
        if p.empty:  # sizes as varargs: x's device, no device= to parse
            object.__setattr__(p, "empty_template", x.new_empty(*p.out_shape, dtype=p.out_dtype))
        if len(_matmul_cache) >= _MATMUL_CACHE_CAP:
            _matmul_cache.clear()
        _matmul_cache[key] = p
    return p


def _mx_k(k: int, name: str) -> None:
    if k % MX_BLOCK != 0 or k == 0:
        raise ValueError(
            f"{name}: MXFP8 needs K to be a positive multiple of {MX_BLOCK} (one E8M0 scale per 32), got K={k}"
        )


def mxfp8_quantize_args(x: torch.Tensor, dtype: object) -> None:
    tensor(x, "x")
    dtype_in(x, "x", HIGH_PRECISION_DTYPES)
    min_ndim(x, "x", 1, "[..., K]")
    _mx_k(x.shape[-1], "x")
    dtype_arg(dtype, "dtype", FP8_DTYPES)


def mxfp8_matmul_args(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> MatmulProblem:
    tensors(x=x, w=w, w_scale=w_scale, x_scale=x_scale, bias=bias)
    n, k = _weight(w)
    _mx_k(k, "w")
    dtype_in(w_scale, "w_scale", (torch.uint8,))
    shape_is(w_scale, "w_scale", (n, k // MX_BLOCK), f"(N={n}, K={k} // {MX_BLOCK}) E8M0 bits")
    lead, m, out_dtype = _activation_and_tail(
        x, k, x_scale, torch.uint8, k // MX_BLOCK, f"K={k} // {MX_BLOCK}", bias, n, out_dtype
    )
    same_device(x=x, w=w, w_scale=w_scale, x_scale=x_scale, bias=bias)
    return MatmulProblem(lead=lead, m=m, n=n, k=k, bn=1, bk=MX_BLOCK, out_dtype=out_dtype, device=x.device)


# ------------------------------------------------------------------- grouped (MoE) matmul ops
#: Rows per quantization block along M accepted by grouped_matmul_transposed.
GROUPED_BLOCK_M: tuple[int, ...] = MATMUL_BLOCKS


@dataclass(frozen=True)
class GroupedProblem:
    """Validated sizes of one grouped op call.

    grouped_matmul: x [M, K], w [G, N, K] -> y [M, N], (bn, bk) the weight block.
    grouped_matmul_transposed: x [M, K], dy [M, N] -> out [G, K, N], bn = bk = 0, block_m the
    rows of one quantization block along M.
    """

    m: int
    n: int
    k: int
    g: int
    bn: int
    bk: int
    block_m: int
    out_dtype: torch.dtype


def _group_sizes(group_sizes: torch.Tensor, g: int, what: str) -> None:
    dtype_in(group_sizes, "group_sizes", (torch.int32,))
    shape_is(group_sizes, "group_sizes", (g,), f"(G,) = one row count per group, {what}")


def group_sizes_values(group_sizes: torch.Tensor, m: int) -> None:
    """Checks of the VALUES of group_sizes, run only where they are free (CPU tensors).

    On cuda / xla reading them would be a host sync, which the grouped ops must not do (they run
    inside CUDA graphs and XLA graphs); there, sum(group_sizes) > M truncates the groups at row M
    and a negative size gives an unspecified result (docs/grouped.md).
    """
    if group_sizes.device.type != "cpu" or group_sizes.numel() == 0:
        return
    if bool((group_sizes < 0).any()):
        raise ValueError(f"group_sizes: expected sizes >= 0, got {group_sizes.tolist()}")
    total = int(group_sizes.sum(dtype=torch.int64))
    if total > m:
        raise ValueError(f"group_sizes: expected sum(group_sizes) <= M={m} (x's rows), got sum {total}")


def grouped_matmul_args(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    group_sizes: torch.Tensor,
    block: object,
    x_scale: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    activation: object,
) -> GroupedProblem:
    tensors(x=x, w=w, w_scale=w_scale, group_sizes=group_sizes, x_scale=x_scale)
    bn, bk = block_shape(block, "block_shape", MATMUL_BLOCKS, MATMUL_BLOCKS)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    dtype_in(w, "w", FP8_DTYPES)
    if w.dim() != 3:
        raise ValueError(f"w: expected 3 dims [G, N, K] (groups, out, in), got shape {tuple(w.shape)}")
    if not w.is_contiguous():
        raise ValueError(
            f"w: expected a contiguous row-major [G, N, K] weight, got strides {tuple(w.stride())}; "
            "call w.contiguous() once when loading (a per-call copy of the weight would be silent and slow)"
        )
    g, n, k = w.shape
    dtype_in(w_scale, "w_scale", (torch.float32,))
    shape_is(
        w_scale, "w_scale", (g, cdiv(n, bn), cdiv(k, bk)), f"(G={g}, cdiv(N={n}, {bn}), cdiv(K={k}, {bk}))"
    )
    _group_sizes(group_sizes, g, "w.shape[0]")
    if x.dim() != 2:
        raise ValueError(f"x: expected 2 dims [M, K] (rows sorted by group), got shape {tuple(x.shape)}")
    if is_fp8(x.dtype) and activation == "none":
        raise ValueError(
            f"activation: 'none' keeps x at its own precision, but x is {x.dtype}; "
            "use activation='dynamic' (the default) and pass x_scale"
        )
    _, m, out_dtype = _activation_and_tail(
        x, k, x_scale, torch.float32, cdiv(k, bk), f"cdiv(K={k}, {bk})", None, n, out_dtype
    )
    same_device(x=x, w=w, w_scale=w_scale, group_sizes=group_sizes, x_scale=x_scale)
    return GroupedProblem(m=m, n=n, k=k, g=g, bn=bn, bk=bk, block_m=0, out_dtype=out_dtype)


def grouped_matmul_transposed_args(
    x: torch.Tensor,
    dy: torch.Tensor,
    group_sizes: torch.Tensor,
    block_m: object,
    out_dtype: torch.dtype | None,
) -> GroupedProblem:
    tensors(x=x, dy=dy, group_sizes=group_sizes)
    if not isinstance(block_m, numbers.Integral) or isinstance(block_m, bool):
        raise TypeError(f"block_m: expected an int, got {block_m!r}")
    block_m = operator.index(block_m)
    if block_m not in GROUPED_BLOCK_M:
        raise ValueError(f"block_m: expected one of {GROUPED_BLOCK_M}, got {block_m}")
    for name, t, cols in (("x", x, "K"), ("dy", dy, "N")):
        dtype_in(t, name, HIGH_PRECISION_DTYPES)
        if t.dim() != 2:
            raise ValueError(f"{name}: expected 2 dims [M, {cols}], got shape {tuple(t.shape)}")
    m, k = x.shape
    if dy.shape[0] != m:
        raise ValueError(f"dy: expected {m} rows (x's M, rows sorted by group), got shape {tuple(dy.shape)}")
    if group_sizes.dim() != 1:
        raise ValueError(f"group_sizes: expected 1 dim (G,), got shape {tuple(group_sizes.shape)}")
    g = group_sizes.shape[0]
    _group_sizes(group_sizes, g, "the number of groups")
    if out_dtype is None:
        out_dtype = x.dtype
    dtype_arg(out_dtype, "out_dtype", HIGH_PRECISION_DTYPES)
    same_device(x=x, dy=dy, group_sizes=group_sizes)
    return GroupedProblem(m=m, n=dy.shape[1], k=k, g=g, bn=0, bk=0, block_m=block_m, out_dtype=out_dtype)
