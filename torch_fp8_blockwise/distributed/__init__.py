"""Tensor-parallel FP8 block-wise layers on torch.distributed (DTensor / DeviceMesh) and torch_xla SPMD.

* :func:`check_plan`: a pure shape check of a plan (no process group); :class:`BlockShardingError`.
* :func:`parallelize`: apply a plan (or the default one for transformers decoders) to a model on a
  torch ``DeviceMesh`` or a torch_xla SPMD ``Mesh``; returns a :class:`ShardingReport`.
* :class:`Fp8ColwiseParallel`, :class:`Fp8RowwiseParallel`, :class:`Fp8ExpertParallel`:
  ``ParallelStyle``s for ``parallelize_module`` (:mod:`.experts`: whole experts per rank,
  "allreduce" or "alltoall" dispatch; ``dp_attention=True``: each rank brings its own tokens).
  ``src_data_rank`` as torch's: 0 (default) scatters rank 0's shards, None slices locally.
* a DTensor sharding rule for ``torch.ops.fp8.blockwise_matmul`` (registered on import) for users who
  call the op on DTensors.
* :mod:`.checkpoint`: per-rank load (each rank reads only its slices) and save of a sharded model;
  a model parallelized over a torch_xla Mesh (possibly on the meta device) is loaded by
  :mod:`.xla_checkpoint` (each tensor placed on the devices, sharded, as it is read).
* torch_xla SPMD: :mod:`.xla` (column- / row-parallel layers), :mod:`.xla_experts` (expert parallel).

The block-alignment rule lives in :mod:`.alignment` (one function, :func:`shard_problem`).
"""

from . import checkpoint
from . import sharding_rule as _sharding_rule  # noqa: F401  (registers the DTensor rule)
from .alignment import BlockShardingError, shard_problem, working_tp_sizes
from .experts import DISPATCH_STYLES, Fp8ShardedExperts
from .layers import Fp8ColwiseLinear, Fp8RowwiseLinear
from .parallelize import ShardingReport, parallelize
from .plan import DEFAULT_PLAN, check_plan
from .styles import Fp8ColwiseParallel, Fp8ExpertParallel, Fp8RowwiseParallel

__all__ = [
    "DEFAULT_PLAN",
    "DISPATCH_STYLES",
    "checkpoint",
    "BlockShardingError",
    "Fp8ColwiseLinear",
    "Fp8ColwiseParallel",
    "Fp8ExpertParallel",
    "Fp8RowwiseLinear",
    "Fp8RowwiseParallel",
    "Fp8ShardedExperts",
    "ShardingReport",
    "check_plan",
    "parallelize",
    "shard_problem",
    "working_tp_sizes",
]
