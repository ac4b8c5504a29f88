"""Entry points with other libraries' argument conventions, running on ``torch.ops.fp8``.

* :mod:`.vllm`: ``w8a8_block_fp8_matmul`` (alias ``w8a8_triton_block_scaled_mm``) and
  ``per_token_group_quant_fp8`` as vLLM's block-FP8 linear methods call them (see docs/vllm.md).
  Importing it does not import vLLM.
"""

from . import vllm

__all__ = ["vllm"]
