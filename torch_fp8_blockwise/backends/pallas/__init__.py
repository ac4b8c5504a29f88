"""Pallas TPU backend: ``torch.ops.fp8.*`` on XLA tensors through JAX Pallas kernels + call_jax.

Files: ``blockwise_matmul.py`` (the matmul kernel, pure JAX), ``quantize.py`` (quantize /
dequantize kernels, pure JAX), ``grouped.py`` (MoE gmm / tgmm kernels, pure JAX), ``bridge.py``
(torch <-> JAX, call_jax, M buckets, E8M0 as uint8), ``tuning.py`` (tuned table, heuristic, VMEM / roofline model), ``lowering.py`` (offline Mosaic
proof behind ``scripts/check_lowering.py --target tpu``). Design notes and the comparison with
tpu-inference's kernels: docs/pallas.md.

The op functions take the canonical, already-validated arguments documented in
:mod:`torch_fp8_blockwise.reference`. jax is imported here (its absence makes this package's
import fail, which the dispatcher records as the reason); torch_xla only for XLA tensors.
"""

from __future__ import annotations

import importlib.util

import jax  # noqa: F401  (an ImportError here is the dispatcher's "pallas unavailable" reason)
import torch

from .bridge import blockwise_matmul, dequantize, grouped_matmul, grouped_matmul_transposed, quantize

__all__ = [
    "blockwise_matmul",
    "dequantize",
    "grouped_matmul",
    "grouped_matmul_transposed",
    "quantize",
    "unavailable_reason",
]


def unavailable_reason(device: torch.device) -> str | None:
    """None if the kernels can run on tensors of ``device``: xla (needs torch_xla) or cpu
    (interpret mode, for tests); else why not."""
    if device.type == "xla":
        if importlib.util.find_spec("torch_xla") is None:
            return "tensors are on an XLA device but torch_xla is not installed (pip install 'torch_xla[pallas]')"
        return None
    if device.type == "cpu":
        return None
    return (
        f"the Pallas backend runs on xla (TPU, or torch_xla's CPU device) or cpu tensors, not {device.type}"
    )
