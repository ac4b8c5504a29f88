"""A DTensor sharding rule for ``torch.ops.fp8.blockwise_matmul`` (registered when
:mod:`torch_fp8_blockwise.distributed` is imported), for users who call the op on DTensors.

Without it DTensor fails with "does not have a sharding strategy registered". Strategies offered
(per mesh dimension; DTensor redistributes the inputs to the cheapest one):

* everything replicated;
* column-parallel: x Replicate, w / w_scale / bias Shard(0) -> y Shard(-1); only when the block
  rule holds (``N % (tp * bn) == 0``), so weight rows and scale rows are the same blocks. Bit-exact
  with one device.
* row-parallel: x / x_scale Shard(-1), w / w_scale Shard(1) -> y Partial(sum); only when
  ``K % (tp * bk) == 0``, there is no bias (it would be added tp times) and the output is float32:
  DTensor keeps a Partial through a ``.to(bf16)`` and would sum it in bf16 (2.7e-3 relative error
  measured), so a bf16 row-parallel output is never offered; ask for ``out_dtype=torch.float32``.

tp is the mesh's total size (a conservative check on multi-dimensional meshes). The layers of this
package do not go through DTensor: their forward runs on local tensors (see :mod:`.layers`).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from .. import ops as _ops  # noqa: F401  (defines torch.ops.fp8.*)
from ..formats import FP8_DTYPES
from .alignment import shard_problem


@register_sharding(torch.ops.fp8.blockwise_matmul.default)
def blockwise_matmul_sharding(
    x, w, w_scale, block_shape=(128, 128), x_scale=None, bias=None, out_dtype=None, activation="dynamic"
):
    """Acceptable (output placements, input placements) for one mesh dimension; the tensor
    arguments arrive as DTensor specs (global ``shape``, ``mesh``)."""
    tp = w.mesh.size()
    n, k = w.shape
    block = (int(block_shape[0]), int(block_shape[1]))
    r = Replicate()

    def opt(spec, placement):
        return None if spec is None else placement

    strategies = [([r], [r, r, r, None, opt(x_scale, r), opt(bias, r), None, None])]
    if shard_problem("colwise", (n, k), block, tp) is None:
        strategies.append(
            (
                [Shard(len(x.shape) - 1)],
                [r, Shard(0), Shard(0), None, opt(x_scale, r), opt(bias, Shard(0)), None, None],
            )
        )
    if out_dtype is None:
        out_dtype = torch.bfloat16 if x.tensor_meta.dtype in FP8_DTYPES else x.tensor_meta.dtype
    if bias is None and out_dtype == torch.float32 and shard_problem("rowwise", (n, k), block, tp) is None:
        x_scale_shard = None if x_scale is None else Shard(len(x_scale.shape) - 1)
        strategies.append(
            (
                [Partial()],
                [Shard(len(x.shape) - 1), Shard(1), Shard(1), None, x_scale_shard, None, None, None],
            )
        )
    return strategies
