"""Triton backend (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1`` for tests).

Op functions take the canonical, validated arguments documented in
:mod:`torch_fp8_blockwise.reference` and :mod:`torch_fp8_blockwise._dispatch`:

* :func:`quantize`, :func:`dequantize`: kernels in ``quantize.py``.
* :func:`blockwise_matmul`: W8A8 / W8A16 kernel in ``blockwise_matmul.py``.
* :func:`mxfp8_quantize`, :func:`mxfp8_matmul`: ``mxfp8.py``.
* :func:`dequant_matmul`: W8A16 at large M through dequantized weight panels + torch's GEMM
  (``dequant_mm.py``; the router picks it, for bf16/fp16 output only).
* :func:`grouped_matmul`, :func:`grouped_matmul_transposed` (MoE gmm / tgmm): ``grouped.py``.

Importing this package needs ``triton``; without it the ImportError propagates and the dispatcher
reports it as the reason the backend is unavailable.
"""

from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (an ImportError here is the dispatcher's "unavailable" reason)

from . import configs
from .blockwise_matmul import blockwise_matmul
from .dequant_mm import dequant_matmul
from .grouped import grouped_matmul, grouped_matmul_transposed
from .mxfp8 import mxfp8_matmul, mxfp8_quantize
from .quantize import block_quantize, dequantize

__all__ = [
    "blockwise_matmul",
    "dequant_matmul",
    "dequantize",
    "grouped_matmul",
    "grouped_matmul_transposed",
    "mxfp8_matmul",
    "mxfp8_quantize",
    "quantize",
    "unavailable_reason",
]


def unavailable_reason(device: torch.device) -> str | None:
    """None if Triton kernels can run on tensors of ``device``, else why not."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"torch {torch.__version__} has no working CUDA (torch.cuda.is_available() is False)"
        return None
    if device.type == "cpu":
        if configs.interpreting():
            return None
        late = (
            " (it is set now, but was not when the kernels were defined)"
            if os.environ.get("TRITON_INTERPRET") == "1"
            else ""
        )
        return (
            "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 in the environment "
            f"before triton kernels are defined (before importing torch_fp8_blockwise){late}"
        )
    return f"Triton kernels run on cuda tensors (or cpu under TRITON_INTERPRET=1), not {device.type}"


def quantize(
    x: torch.Tensor, block_shape: tuple[int, int], dtype: torch.dtype, scale_format: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, R, C] -> (q [B, R, C] ``dtype``, scale [B, cdiv(R, br), cdiv(C, bc)] float32)."""
    return block_quantize(x, block_shape, dtype, scale_format)
