"""Tensor-parallel forms of :class:`~torch_fp8_blockwise.nn.Fp8BlockwiseLinear` on torch.distributed.

A parallel style turns a layer into one of these in place (``module.__class__`` swap, as FSDP2's
``fully_shard`` does), so the module tree, the ``isinstance`` checks and the ``state_dict`` keys
stay those of the model; only the tensors become this rank's shard. The forward runs on local,
plain tensors with explicit collectives: DTensor dispatch would add ~30 us per call at M = 0 and
70-115 us at M = 1 (measured on our CPU machines, torch 2.13).

* :class:`Fp8ColwiseLinear`: weight rows [r0, r1) of [N, K] (``N % (tp * bn) == 0``), their scale
  rows, bias [r0, r1). x [..., K] (replicated) -> [..., N / tp], this rank's output features.
  No collective; each output feature is computed exactly as on one device (bit-exact).
* :class:`Fp8RowwiseLinear`: weight columns [c0, c1) of [N, K] (``K % (tp * bk) == 0``), their
  scale columns, the full bias. x [..., K / tp] (this rank's input features) -> [..., N]:
  float32 partial product, ONE float32 all-reduce (sum), bias added once, one cast to x.dtype.
  Reducing in bf16 instead differs from one device by 2.7e-3 relative (max abs 0.25, measured):
  the float32 reduction is explicit here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from ..formats import FP8_DTYPES
from ..nn import Fp8BlockwiseLinear
from .alignment import local_range


class _Fp8ShardedLinear(Fp8BlockwiseLinear):
    """Common state: ``tp_rank``, ``tp_size``, ``group`` (a ProcessGroup, or None on the meta /
    shape-only path), and the full ``full_out_features`` / ``full_in_features``.
    ``in_features`` / ``out_features`` are the LOCAL sizes (the shapes of this rank's buffers)."""

    kind: str = ""
    tp_rank: int
    tp_size: int
    group: dist.ProcessGroup | None
    full_out_features: int
    full_in_features: int

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, {self.kind} rank {self.tp_rank}/{self.tp_size} of "
            f"[{self.full_out_features}, {self.full_in_features}]"
        )


class Fp8ColwiseLinear(_Fp8ShardedLinear):
    """Output-feature shard: x [..., K] -> [..., N / tp] (forward inherited: one op call)."""

    kind = "colwise"


class Fp8RowwiseLinear(_Fp8ShardedLinear):
    """Input-feature shard: x [..., K / tp] -> [..., N], one float32 all-reduce."""

    kind = "rowwise"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = torch.ops.fp8.blockwise_matmul.default(
            x,
            self.weight,
            self.weight_scale_inv,
            list(self.config.block_shape),
            None,
            None,  # the bias is added once, after the sum
            torch.float32,
            self.config.activation,
        )
        y = funcol.all_reduce(partial, "sum", self.group)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def check_src_data_rank(src_data_rank: object, tp_size: int) -> int | None:
    """``src_data_rank``: None, or a rank of the mesh (0 <= r < tp_size)."""
    if src_data_rank is not None and (
        not isinstance(src_data_rank, int)
        or isinstance(src_data_rank, bool)
        or not 0 <= src_data_rank < tp_size
    ):
        raise ValueError(
            f"src_data_rank: expected None or a rank of the mesh (0 <= r < {tp_size}), got {src_data_rank!r}"
        )
    return src_data_rank


def _global(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def shard_from_src(
    full: torch.Tensor, dim: int, tp_size: int, rank: int, src: int, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """This rank's chunk ``rank`` of ``tp_size`` equal chunks along ``dim`` of rank ``src``'s ``full``
    (a collective: ``dist.scatter`` from ``src``, a rank of ``group``), contiguous. fp8 travels as a
    uint8 view (gloo rejects float8); the other ranks' ``full`` is only read for its shape."""
    chunks = [c.contiguous() for c in full.chunk(tp_size, dim)]
    wire = [c.view(torch.uint8) if c.dtype in FP8_DTYPES else c for c in chunks]
    out = torch.empty_like(wire[rank])
    dist.scatter(out, wire if rank == src else None, src=_global(group, src), group=group)
    return out.view(full.dtype) if out.dtype != full.dtype else out


def shard_layer_(
    layer: Fp8BlockwiseLinear,
    kind: str,
    rank: int,
    tp_size: int,
    group: dist.ProcessGroup | None,
    src_data_rank: int | None = None,
) -> _Fp8ShardedLinear:
    """Turn ``layer`` (full tensors, or meta) into this rank's shard in place and return it.

    The caller has checked the alignment rule. ``src_data_rank`` None: real tensors are sliced
    locally and copied (``.clone()``: the full tensor can be freed), no communication. A rank r of
    ``group``: rank r's weight, scales and bias are the truth; every rank receives its shard from
    rank r (``dist.scatter``; a row-parallel layer's bias by ``dist.broadcast``), as torch's
    ``distribute_tensor(src_data_rank=r)``. Meta tensors get meta shards of the local shape and
    nothing is sent (every rank must then be meta).
    """
    if isinstance(layer, _Fp8ShardedLinear):
        raise TypeError(f"shard_layer_: the layer is already sharded ({layer.kind})")
    n, k = layer.out_features, layer.in_features
    bn, bk = layer.config.block_shape
    if kind == "colwise":
        r0, r1 = local_range(n, tp_size, rank)
        weight = layer.weight[r0:r1]
        scale = layer.weight_scale_inv[r0 // bn : r1 // bn]
        bias = None if layer.bias is None else layer.bias[r0:r1]
        cls: type[_Fp8ShardedLinear] = Fp8ColwiseLinear
        local_n, local_k = r1 - r0, k
    elif kind == "rowwise":
        c0, c1 = local_range(k, tp_size, rank)
        weight = layer.weight[:, c0:c1]
        scale = layer.weight_scale_inv[:, c0 // bk : c1 // bk]
        bias = layer.bias
        cls = Fp8RowwiseLinear
        local_n, local_k = n, c1 - c0
    else:
        raise ValueError(f"kind: expected 'colwise' or 'rowwise', got {kind!r}")
    with torch.no_grad():
        if src_data_rank is not None and layer.weight.device.type != "meta":
            dim = 0 if kind == "colwise" else 1
            weight = shard_from_src(layer.weight, dim, tp_size, rank, src_data_rank, group)
            scale = shard_from_src(layer.weight_scale_inv, dim, tp_size, rank, src_data_rank, group)
            if bias is not None and kind == "colwise":
                bias = shard_from_src(layer.bias.detach(), 0, tp_size, rank, src_data_rank, group)
            elif bias is not None:
                dist.broadcast(bias.detach(), _global(group, src_data_rank), group=group)
        layer._buffers["weight"] = weight.clone(memory_format=torch.contiguous_format)
        layer._buffers["weight_scale_inv"] = scale.clone(memory_format=torch.contiguous_format)
        if bias is not None and kind == "colwise":
            layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    layer.__class__ = cls
    layer.full_out_features, layer.full_in_features = n, k
    layer.out_features, layer.in_features = local_n, local_k
    layer.tp_rank, layer.tp_size, layer.group = rank, tp_size, group
    return layer  # type: ignore[return-value]
