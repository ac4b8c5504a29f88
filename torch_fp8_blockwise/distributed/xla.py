"""Tensor parallel on torch_xla SPMD: the same plans, on a 1-D ``torch_xla.distributed.spmd.Mesh``.

One process drives every device. A layer keeps its GLOBAL weight, scales and bias, annotated with
``xs.mark_sharding`` (weight / scale rows for column-parallel, columns for row-parallel). Its forward
runs the op inside a manual-sharding region (``xs.enable_manual_sharding`` /
``disable_manual_sharding``, the pattern of torch_xla's ``flash_attention(partition_spec=, mesh=)``):
there, ``call_jax`` lowers the Pallas kernel on the LOCAL shapes. Without the region the kernel is
lowered on global shapes and the partitioner puts collectives inside its loop (measured: 8
all-gathers, 8 all-reduces and 54 collective-permutes for one sharded matmul).

* :class:`Fp8XlaColwiseLinear`: x [..., K] replicated -> [..., N] sharded on the last dim; no collective.
* :class:`Fp8XlaRowwiseLinear`: x [..., K] (sharded or not on the last dim) -> [..., N] replicated:
  float32 partials stacked [tp, ..., N], summed by the partitioner with exactly one all-reduce, bias
  added once, one cast.

Experts: :mod:`.xla_experts` (expert parallel, one all-reduce). Meta models: :mod:`.xla_checkpoint`.
The alignment rule is the one of :mod:`.alignment` (checked by :func:`parallelize`). jax
``custom_partitioning`` is avoided on purpose (reported broken on TPU, jax-ml/jax#38196).
"""

from __future__ import annotations

import torch
from torch import nn

from ..experts import FUSED_KEYS
from ..nn import Fp8BlockwiseLinear


def mesh_size(mesh: object) -> int:
    """Devices of a 1-D torch_xla SPMD Mesh (ValueError for other shapes)."""
    shape = tuple(mesh.mesh_shape)
    if len(shape) != 1:
        raise ValueError(f"mesh: expected a 1-D torch_xla Mesh, got shape {shape}")
    return int(shape[0])


def _axis(mesh: object) -> str | int:
    names = getattr(mesh, "axis_names", None)
    return names[0] if names else 0


class _Fp8XlaShardedLinear(Fp8BlockwiseLinear):
    """Global tensors annotated as sharded over ``mesh`` (``in_features`` / ``out_features`` stay
    the full sizes: on XLA the module holds the global view)."""

    kind = ""
    mesh: object
    tp_size: int

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.kind} over {self.tp_size} devices (torch_xla SPMD)"

    def _manual(self, t: torch.Tensor, spec: tuple) -> torch.Tensor:
        import torch_xla.distributed.spmd as xs

        return xs.enable_manual_sharding(t, spec, mesh=self.mesh).global_tensor

    def _matmul(self, x, w, s, bias, out_dtype):
        return torch.ops.fp8.blockwise_matmul.default(
            x, w, s, list(self.config.block_shape), None, bias, out_dtype, self.config.activation
        )


class Fp8XlaColwiseLinear(_Fp8XlaShardedLinear):
    kind = "colwise"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch_xla.distributed.spmd as xs

        a = _axis(self.mesh)
        rest = (None,) * (x.dim() - 1)
        y = self._matmul(
            self._manual(x, (*rest, None)),
            self._manual(self.weight, (a, None)),
            self._manual(self.weight_scale_inv, (a, None)),
            None if self.bias is None else self._manual(self.bias, (a,)),
            None,
        )
        full = (*x.shape[:-1], self.out_features)
        return xs.disable_manual_sharding(y, (*rest, a), full, mesh=self.mesh).global_tensor


class Fp8XlaRowwiseLinear(_Fp8XlaShardedLinear):
    kind = "rowwise"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch_xla.distributed.spmd as xs

        a = _axis(self.mesh)
        rest = (None,) * (x.dim() - 1)
        partial = self._matmul(
            self._manual(x, (*rest, a)),
            self._manual(self.weight, (None, a)),
            self._manual(self.weight_scale_inv, (None, a)),
            None,  # the bias is added once, after the sum
            torch.float32,
        )
        full = (self.tp_size, *x.shape[:-1], self.out_features)
        stacked = xs.disable_manual_sharding(partial.unsqueeze(0), (a, *rest, None), full, mesh=self.mesh)
        y = stacked.global_tensor.sum(0)  # one all-reduce, in float32
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def shard_layer_(layer: Fp8BlockwiseLinear, kind: str, mesh: object) -> _Fp8XlaShardedLinear:
    """Annotate ``layer``'s tensors (on an xla device) as sharded over ``mesh`` and make it a
    manual-region layer, in place. The caller has checked the alignment rule."""
    import torch_xla.distributed.spmd as xs

    if layer.weight.device.type not in ("xla", "meta"):
        raise ValueError(
            f"parallelize on a torch_xla Mesh: the layer's weight is on {layer.weight.device}; move the "
            "model to torch_xla's device first (or parallelize it on the meta device and fill it with "
            "torch_fp8_blockwise.distributed.checkpoint.load)"
        )
    a = _axis(mesh)
    if kind == "colwise":
        w_spec, b_spec, cls = (a, None), (a,), Fp8XlaColwiseLinear
    elif kind == "rowwise":
        w_spec, b_spec, cls = (None, a), (None,), Fp8XlaRowwiseLinear
    else:
        raise ValueError(f"kind: expected 'colwise' or 'rowwise', got {kind!r}")
    if layer.weight.device.type == "xla":  # meta: the checkpoint loader places each tensor sharded
        xs.mark_sharding(layer.weight, mesh, w_spec)
        xs.mark_sharding(layer.weight_scale_inv, mesh, w_spec)
        if layer.bias is not None:
            xs.mark_sharding(layer.bias, mesh, b_spec)
    layer.__class__ = cls
    layer.mesh, layer.tp_size = mesh, mesh_size(mesh)
    return layer  # type: ignore[return-value]


def sharded_dim(module: nn.Module, name: str) -> int | None:
    """The dimension along which tensor ``name`` of ``module`` is split over the mesh, or None
    (replicated): column-parallel weight / scale / bias rows (0), row-parallel weight / scale
    columns (1), expert-parallel fused tensors' experts (0)."""
    from .xla_experts import Fp8XlaExperts

    if isinstance(module, Fp8XlaColwiseLinear):
        return 0 if name in ("weight", "weight_scale_inv", "bias") else None
    if isinstance(module, Fp8XlaRowwiseLinear):
        return 1 if name in ("weight", "weight_scale_inv") else None
    if isinstance(module, Fp8XlaExperts):
        return 0 if name in FUSED_KEYS else None
    return None


def rank_bytes(model: nn.Module) -> int:
    """Bytes one device holds: sharded tensors (:func:`sharded_dim`) count 1 / tp, everything else
    in full (meta tensors counted by shape, shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            n = t.numel() * t.element_size()
            if sharded_dim(module, name) is not None:
                n //= module.tp_size
            total += n
    return total
