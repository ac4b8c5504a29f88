"""torch_fp8_blockwise: FP8 block-wise quantized matmul as ``torch.ops.fp8.*`` on every device.

Importing this package registers the ops. Python wrappers with full docstrings:
:func:`quantize`, :func:`dequantize`, :func:`blockwise_matmul`, :func:`mxfp8_quantize`,
:func:`mxfp8_matmul`, :func:`grouped_matmul`, :func:`grouped_matmul_transposed`
(MoE). Models: :class:`Fp8BlockwiseLinear`, :func:`quantize_model_`
(:mod:`.nn`), :class:`Fp8Experts` (:mod:`.experts`, MoE); DeepSeek-format safetensors: :mod:`.checkpoint`. Backend choice follows the
tensors' device (cpu -> CPU path, cuda -> Triton, xla -> Pallas); :func:`use_backend` forces one.
On CUDA, blockwise_matmul is routed per call to cuBLAS block-scaled or a Triton kernel by a
measured rule (``_route``; docs/routing.md), adjustable with :func:`set_route` /
:func:`routing_override`.
"""

# checkpoint imports safetensors only when one of its functions runs: the package import stays cheap.
from . import checkpoint, nn
from ._dispatch import BackendUnavailable, backend_table, unavailable_reason, use_backend
from ._route import routing_override, set_route
from .experts import Fp8Experts
from .formats import FP8_DTYPES, SCALE_FORMATS, fp8_max
from .nn import Fp8BlockwiseLinear, Fp8Config, QuantizationSummary, quantize_model_
from .ops import (
    blockwise_matmul,
    dequantize,
    grouped_matmul,
    grouped_matmul_transposed,
    mxfp8_matmul,
    mxfp8_quantize,
    quantize,
)

__version__ = "0.1.0"

__all__ = [
    "FP8_DTYPES",
    "SCALE_FORMATS",
    "BackendUnavailable",
    "Fp8BlockwiseLinear",
    "Fp8Experts",
    "Fp8Config",
    "QuantizationSummary",
    "backend_table",
    "blockwise_matmul",
    "checkpoint",
    "dequantize",
    "fp8_max",
    "grouped_matmul",
    "grouped_matmul_transposed",
    "mxfp8_matmul",
    "mxfp8_quantize",
    "nn",
    "quantize",
    "quantize_model_",
    "routing_override",
    "set_route",
    "unavailable_reason",
    "use_backend",
]
