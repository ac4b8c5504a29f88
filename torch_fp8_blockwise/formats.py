"""FP8 formats, block-size rules and scale rules shared by every backend.

Everything here is plain data or a few-line torch function; kernels in other languages (Triton,
Pallas) re-implement the same rules and are tested against :mod:`torch_fp8_blockwise.reference`.

Scale conventions (one for the whole library):

* A scale is a float32 MULTIPLIER: ``x ~= q * scale`` (DeepSeek's ``weight_scale_inv`` layout).
* ``scale = max(amax, SCALE_EPS) / fp8_max(dtype)`` where ``amax`` is the largest finite
  ``|x|`` of the block.
* ``scale_format="ue8m0"`` rounds that scale UP to a power of two (DeepSeek V3.1, MX): rounding
  up keeps ``|x| / scale <= fp8_max``, so nothing saturates that would not have saturated anyway.
"""

from __future__ import annotations

import torch

FP8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)
HIGH_PRECISION_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)

_FP8_MAX: dict[torch.dtype, float] = {
    torch.float8_e4m3fn: 448.0,
    torch.float8_e5m2: 57344.0,
}

#: Lower bound of ``amax`` when computing a scale. vLLM's ``per_token_group_quant_fp8`` uses the
#: same value, so an all-zero block gets the same (tiny, finite) scale in both libraries.
SCALE_EPS = 1e-10

SCALE_FORMATS: tuple[str, ...] = ("fp32", "ue8m0")

#: Rows of a quantization block: 1 = per-token groups (activations), else square-ish weight blocks.
BLOCK_ROWS: tuple[int, ...] = (1, 128, 256, 512)
#: Columns of a quantization block (the reduction dimension K for matmul operands).
BLOCK_COLS: tuple[int, ...] = (128, 256, 512)
#: Weight block sizes accepted by blockwise_matmul for both bn and bk.
MATMUL_BLOCKS: tuple[int, ...] = (128, 256, 512)

#: OCP Microscaling: 32 consecutive elements along K share one E8M0 scale.
MX_BLOCK = 32
E8M0_BIAS = 127
E8M0_NAN = 255


def cdiv(a: int, b: int) -> int:
    """Ceiling division for non-negative ints (works on SymInts too)."""
    return (a + b - 1) // b


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return _FP8_MAX[dtype]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in _FP8_MAX


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round positive normal float32 scales up to the next power of two (exact, no log2).

    Adding 0x7FFFFF to the bit pattern carries into the exponent iff the mantissa is non-zero, and
    masking keeps only the exponent: ``2**ceil(log2(s))`` computed with integer ops, so every
    backend (Triton, Pallas, C++) can reproduce it bit for bit.
    """
    bits = scale.float().view(torch.int32)
    return ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)


def compute_scale(amax: torch.Tensor, dtype: torch.dtype, scale_format: str) -> torch.Tensor:
    """float32 block scale from a block's finite amax (see the module docstring)."""
    scale = torch.clamp(amax.float(), min=SCALE_EPS) / fp8_max(dtype)
    if scale_format == "ue8m0":
        scale = round_scale_ue8m0(scale)
    return scale


def float_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Encode positive power-of-two float32 scales (e.g. from :func:`round_scale_ue8m0`) as E8M0
    uint8 bits: the float32 exponent field."""
    return (scale.float().view(torch.int32) >> 23).to(torch.uint8)


def e8m0_to_float(bits: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 scales stored as uint8 bits: 2**(bits - 127), 255 -> NaN."""
    if bits.dtype != torch.uint8:
        raise TypeError(f"e8m0 bits: expected torch.uint8, got {bits.dtype}")
    as_int = bits.to(torch.int32)
    # Exponent field = bits; 0 would be a float32 zero/subnormal, so build 2**-127 by halving.
    value = torch.where(
        as_int > 0,
        (as_int << 23).view(torch.float32),
        torch.full_like(as_int, 0x00400000).view(torch.float32),
    )
    return torch.where(as_int == E8M0_NAN, torch.full_like(value, float("nan")), value)
