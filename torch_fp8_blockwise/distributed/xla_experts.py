"""Expert parallelism for :class:`~torch_fp8_blockwise.experts.Fp8Experts` on torch_xla SPMD.

One process drives every device of a 1-D ``torch_xla.distributed.spmd.Mesh``. The module keeps its
GLOBAL fused tensors (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I] and their scales),
annotated with ``xs.mark_sharding`` along the expert dimension: device d holds the contiguous
experts ``[d * E / tp, (d + 1) * E / tp)`` (``E % tp == 0``, the alignment rule's "expert").

The forward is the "allreduce" style of :mod:`.experts` (DeepSeek-V3's reference inference): every
device sees every token. Inside a manual-sharding region (``xs.enable_manual_sharding`` /
``disable_manual_sharding``, as :mod:`.xla`'s linear layers) each device sees its local experts'
tensors [E / tp, ...] and its own global id of local expert 0 (a [tp] ``arange * E / tp`` tensor
sharded over the axis: [1] per device, no host value), sorts the (token, expert) pairs by LOCAL
expert with the pairs of other devices' experts past its last group
(:func:`~torch_fp8_blockwise.experts.sort_by_expert`: ``group_sizes`` cover only local experts, and
the grouped op's contract makes rows at or past ``sum(group_sizes)`` 0, megablox gmm's
``group_offset`` done by the sort, no host read), runs ONE ``fp8::grouped_matmul`` per projection
(the Pallas gmm on local shapes), applies the routing weights in float32
(:func:`~torch_fp8_blockwise.experts.combine`, pairs of other devices' experts add exactly 0), and
returns its float32 [T, H] partial. The partials leave the region stacked [tp, T, H] sharded on
dim 0 and are summed: exactly one float32 all-reduce in the partitioned HLO (tested), one cast.

The all-to-all style of :mod:`.experts` is not offered here: XLA's all-to-all needs split sizes
known at compile time, and the per-device pair counts are data.
"""

from __future__ import annotations

import torch

from ..experts import FUSED_KEYS, Fp8Experts, combine, experts_mlp, gather_rows, sort_by_expert
from .xla import _axis, mesh_size


class Fp8XlaExperts(Fp8Experts):
    """Expert-parallel :class:`Fp8Experts` over a torch_xla SPMD mesh (made by :func:`shard_experts_`).

    Buffers: the Fp8Experts layouts with E = ``num_experts`` = ALL experts (the module holds the
    global view; each device holds E / tp of them). Attributes: ``mesh``, ``tp_size``,
    ``dispatch`` ("allreduce").

    Forward: hidden_states [T, H], top_k_index [T, k] global expert ids, top_k_weights [T, k]
    (replicated) -> [T, H] in hidden_states.dtype (replicated). Ids outside ``[0, E)`` contribute
    nothing, as on one device.
    """

    kind = "expert"
    dispatch = "allreduce"
    mesh: object
    tp_size: int

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, expert parallel over {self.tp_size} devices "
            f"({self.num_experts // self.tp_size} experts each, torch_xla SPMD, dispatch='allreduce')"
        )

    def _manual(self, t: torch.Tensor, spec: tuple) -> torch.Tensor:
        import torch_xla.distributed.spmd as xs

        return xs.enable_manual_sharding(t, spec, mesh=self.mesh).global_tensor

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        import torch_xla.distributed.spmd as xs

        if self._check_inputs(hidden_states, top_k_index, top_k_weights):
            return torch.zeros_like(hidden_states)
        a, tp = _axis(self.mesh), self.tp_size
        e_local = self.num_experts // tp
        t, k = top_k_index.shape
        # Device d's global id of its local expert 0: [tp] sharded over the axis -> [1] per device.
        offsets = torch.arange(tp, dtype=torch.int64, device=hidden_states.device) * e_local
        offset = self._manual(offsets, (a,))
        x = self._manual(hidden_states, (None, None))
        local_ids = self._manual(top_k_index, (None, None)).long() - offset  # [T, k], local numbering
        weights = self._manual(top_k_weights, (None, None))
        w = [self._manual(getattr(self, name), (a, None, None)) for name in FUSED_KEYS]
        order, group_sizes = sort_by_expert(local_ids, e_local)  # other devices' experts: past the groups
        y = experts_mlp(gather_rows(x, order, k), *w, group_sizes, self.config, self.act_fn)
        partial = combine(y, order, weights, group_sizes)  # [T, H] float32, local pairs only
        full = (tp, t, self.hidden_dim)
        stacked = xs.disable_manual_sharding(partial.unsqueeze(0), (a, None, None), full, mesh=self.mesh)
        return stacked.global_tensor.sum(0).to(hidden_states.dtype)  # ONE float32 all-reduce, one cast


def shard_experts_(layer: Fp8Experts, mesh: object) -> Fp8XlaExperts:
    """Annotate ``layer``'s fused tensors (on an xla device, or meta: a checkpoint fills them) as
    sharded over ``mesh`` along the expert dimension and make it an :class:`Fp8XlaExperts`, in place.
    The caller has checked the alignment rule (``num_experts % tp == 0``)."""
    import torch_xla.distributed.spmd as xs

    if isinstance(layer, Fp8XlaExperts):
        raise TypeError("shard_experts_: the layer is already expert-parallel")
    device = layer.gate_up_proj.device.type
    if device not in ("xla", "meta"):
        raise ValueError(
            f"parallelize on a torch_xla Mesh: the experts' gate_up_proj is on {layer.gate_up_proj.device}; "
            "move the model to torch_xla's device first (or parallelize it on the meta device)"
        )
    tp = mesh_size(mesh)
    if layer.num_experts % tp:
        raise ValueError(f"shard_experts_: {layer.num_experts} experts do not split over {tp} devices")
    if device == "xla":
        for name in FUSED_KEYS:
            xs.mark_sharding(getattr(layer, name), mesh, (_axis(mesh), None, None))
    layer.__class__ = Fp8XlaExperts
    layer.mesh, layer.tp_size = mesh, tp
    return layer  # type: ignore[return-value]
