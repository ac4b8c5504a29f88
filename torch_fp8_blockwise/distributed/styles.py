"""``ParallelStyle``s for :class:`~torch_fp8_blockwise.nn.Fp8BlockwiseLinear`, usable with
``torch.distributed.tensor.parallel.parallelize_module``.

torch's ``ColwiseParallel`` / ``RowwiseParallel`` raise NotImplementedError on our layer (they take
nn.Linear / nn.Embedding and shard parameters, while our weight and scales are buffers). These
styles check the block-alignment rule first (:class:`BlockShardingError` before anything moves),
then keep this rank's slice of the weight, its scales and the bias, and make the layer an
:class:`~.layers.Fp8ColwiseLinear` / :class:`~.layers.Fp8RowwiseLinear` whose forward runs on plain
local tensors (inputs and outputs are plain tensors, as torch's styles with ``use_local_output=True``):

* ``Fp8ColwiseParallel``: x [..., K] replicated -> [..., N / tp] (this rank's output features).
* ``Fp8RowwiseParallel``: x [..., K / tp] (this rank's input features) -> [..., N] replicated.
* ``Fp8ExpertParallel``: an :class:`~torch_fp8_blockwise.experts.Fp8Experts` keeps this rank's
  contiguous range of whole experts (:mod:`.experts`: "allreduce" or "alltoall" dispatch);
  tokens in and out the same on every rank.

``src_data_rank`` (the attribute torch's ``ParallelStyle`` has, set by ``parallelize_module(...,
src_data_rank=)``; torch's default 0): as ``distribute_tensor``, rank ``src_data_rank``'s full layer
is the truth and every rank receives its shard from it (``dist.scatter``, fp8 as uint8: gloo rejects
float8); None: every rank slices its own copy, nothing is sent (every rank must then hold the same
layer). A meta layer gets meta shards and nothing is sent either way. To avoid holding the full
model, parallelize a meta model and fill it with
:func:`torch_fp8_blockwise.distributed.checkpoint.load` (each rank reads its slices).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle

from ..experts import Fp8Experts
from ..nn import Fp8BlockwiseLinear
from .alignment import BlockShardingError
from .experts import check_dispatch, shard_experts_
from .layers import check_src_data_rank, shard_layer_
from .plan import PlannedLayer, layer_problem


def _mesh_1d(device_mesh: DeviceMesh, style: str) -> DeviceMesh:
    if not isinstance(device_mesh, DeviceMesh):
        raise TypeError(f"{style}: device_mesh: expected a DeviceMesh, got {type(device_mesh).__name__}")
    if device_mesh.ndim != 1:
        raise ValueError(
            f"{style}: device_mesh: expected a 1-D mesh (the tensor-parallel dimension), got "
            f"{device_mesh.ndim}-D {tuple(device_mesh.shape)}; pass mesh['tp']"
        )
    return device_mesh


class _Fp8Parallel(ParallelStyle):
    kind = ""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        style = type(self).__name__
        if not isinstance(module, Fp8BlockwiseLinear):
            raise TypeError(
                f"{style}: expected an Fp8BlockwiseLinear, got {type(module).__name__} (convert with "
                "quantize_model_ or checkpoint.load first; torch's own styles serve nn.Linear)"
            )
        mesh = _mesh_1d(device_mesh, style)
        tp = mesh.size()
        layer = PlannedLayer(self.kind, (module.out_features, module.in_features), module.config.block_shape)
        why = layer_problem(type(module).__name__, layer, tp)
        if why is not None:
            raise BlockShardingError(f"{style}: {why}")
        src = check_src_data_rank(self.src_data_rank, tp)
        return shard_layer_(module, self.kind, mesh.get_local_rank(), tp, mesh.get_group(), src)


class Fp8ColwiseParallel(_Fp8Parallel):
    """Split an Fp8BlockwiseLinear's output features: needs ``N % (tp * bn) == 0``.
    x [..., K] (same on every rank) -> [..., N / tp]; no collective; bit-exact with one device."""

    kind = "colwise"


class Fp8RowwiseParallel(_Fp8Parallel):
    """Split an Fp8BlockwiseLinear's input features: needs ``K % (tp * bk) == 0``.
    x [..., K / tp] -> [..., N] on every rank: float32 partials, one float32 all-reduce, bias once,
    one cast to x.dtype."""

    kind = "rowwise"


class Fp8ExpertParallel(ParallelStyle):
    """Split an :class:`~torch_fp8_blockwise.experts.Fp8Experts` by whole experts: needs
    ``num_experts % tp == 0``; rank r keeps experts ``[r E / tp, (r + 1) E / tp)``.

    dispatch: "allreduce" (every rank runs its experts on all tokens' pairs, one float32
    all-reduce, no host sync) or "alltoall" (fp8 activations + 1 x bk scales to the experts'
    owners with all_to_all_single, float32 outputs back; one host read of the split sizes per
    call). ``dp_attention=True`` ("alltoall" only): data-parallel attention, each rank brings its
    own tokens (T may differ per rank, 0 allowed) and gets its own tokens' outputs back.
    See :mod:`torch_fp8_blockwise.distributed.experts`.
    """

    def __init__(self, dispatch: str = "allreduce", *, dp_attention: bool = False) -> None:
        super().__init__()
        self.dispatch = check_dispatch(dispatch, dp_attention)
        self.dp_attention = dp_attention

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        style = type(self).__name__
        if not isinstance(module, Fp8Experts) or getattr(module, "kind", "") == "expert":
            raise TypeError(
                f"{style}: expected an unsplit Fp8Experts, got {type(module).__name__} (convert with "
                "quantize_model_ or checkpoint.load first)"
            )
        mesh = _mesh_1d(device_mesh, style)
        tp = mesh.size()
        layer = PlannedLayer(
            "expert", (2 * module.intermediate_dim, module.hidden_dim), module.config.block_shape,
            num_experts=module.num_experts,
        )  # fmt: skip
        why = layer_problem(type(module).__name__, layer, tp)
        if why is not None:
            raise BlockShardingError(f"{style}: {why}")
        src = check_src_data_rank(self.src_data_rank, tp)
        return shard_experts_(
            module, mesh.get_local_rank(), tp, mesh.get_group(), self.dispatch, src, self.dp_attention
        )
