"""torch_fp8_blockwise: FP8 block-wise quantized matmul as ``torch.ops.fp8.*`` on every device.

Importing this package registers the ops. Python wrappers with full docstrings:
:func:`quantize`, :func:`dequantize`, :func:`blockwise_matmul`, :func:`mxfp8_quantize`,
:func:`mxfp8_matmul`. Models: :class:`Fp8BlockwiseLinear`, :func:`quantize_model_`
(:mod:`.nn`); DeepSeek-format safetensors: :mod:`.checkpoint`. Backend choice follows the
tensors' device (cpu -> CPU path, cuda -> Triton, xla -> Pallas); :func:`use_backend` forces one.
"""

# checkpoint imports safetensors only when one of its functions runs: the package import stays cheap.
from . import checkpoint, nn
from ._dispatch import BackendUnavailable, backend_table, unavailable_reason, use_backend
from .formats import FP8_DTYPES, SCALE_FORMATS, fp8_max
from .nn import Fp8BlockwiseLinear, Fp8Config, QuantizationSummary, quantize_model_
from .ops import blockwise_matmul, dequantize, mxfp8_matmul, mxfp8_quantize, quantize

__version__ = "0.1.0"

__all__ = [
    "FP8_DTYPES",
    "SCALE_FORMATS",
    "BackendUnavailable",
    "Fp8BlockwiseLinear",
    "Fp8Config",
    "QuantizationSummary",
    "backend_table",
    "blockwise_matmul",
    "checkpoint",
    "dequantize",
    "fp8_max",
    "mxfp8_matmul",
    "mxfp8_quantize",
    "nn",
    "quantize",
    "quantize_model_",
    "unavailable_reason",
    "use_backend",
]
