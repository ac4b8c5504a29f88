"""Expert parallelism for :class:`~torch_fp8_blockwise.experts.Fp8Experts` on torch.distributed.

Rank r of tp holds the contiguous experts ``[r * E / tp, (r + 1) * E / tp)`` (``E % tp == 0``, the
alignment rule's "expert"): :class:`Fp8ShardedExperts`, an Fp8Experts whose buffers are the local
experts (``num_experts`` is the local count; ``expert_offset`` the global id of local expert 0).
Its input is the MoE block's input, the same on every rank (tensor-parallel attention gives every
rank every token), and so is its output; with data-parallel attention (below) each rank's own
tokens instead. Two dispatch styles, the two the field uses:

* ``"allreduce"`` (DeepSeek-V3's reference inference): every rank runs its local experts on the
  pairs routed to them, the pairs of other ranks' experts sorted past the last local group
  (:func:`~torch_fp8_blockwise.experts.sort_by_expert` with ``expert_offset``): the grouped op's
  ``group_sizes`` cover only local experts and rows at or past ``sum(group_sizes)`` are 0 by the op
  contract, with no host read (megablox gmm's ``group_offset``, done by the sort). Routing weights
  applied in float32, ONE float32 all-reduce of the [T, H] partial outputs, one cast. No host sync.
  Cost: the grouped op's input holds all T * k rows (how many are local is known only on the
  device); the CPU kernels never touch rows of no group, Triton's M tiles past the groups only
  store zeros.
* ``"alltoall"`` (DeepEP's dispatch / combine): rank r takes its share of the tokens
  (``T = sum`` of ``ceil`` / ``floor`` shares, rank order), quantizes them ONCE per 1 x bk group
  (W8A8: float8_e4m3fn codes moved as uint8, gloo rejects float8, plus the float32 1 x bk scales,
  DeepEP's wire format; W8A16 moves the activations in their dtype, since quantizing them would
  change the numerics), sends each (token, expert) pair to the expert's owner with
  ``all_to_all_single``, the owner sorts what it received by local expert and runs the two grouped
  matmuls on the fp8 rows and their scales, the float32 outputs go back by the reverse all-to-all,
  the routing weights are applied and summed in float32, one cast, and an all-gather gives every
  rank every token. The split sizes of ``all_to_all_single`` are Python lists, so the per-rank
  pair counts are read on the host once per call (one [E]-sized all-to-all of counts, one
  ``.tolist()``): that host sync is inherent to this style (DeepEP's normal mode has it too; its
  low-latency mode pads to a fixed capacity instead). Moves each pair, not each token once per
  destination rank.

Data-parallel attention (``dp_attention=True``, "alltoall" only; vLLM's DP attention with
``--enable-expert-parallel``, SGLang's ``--enable-dp-attention``, DeepEP's dispatch / combine as
such): attention runs data-parallel, so every rank brings ITS OWN tokens to the MoE layer
(hidden_states [T_r, H] with T_r differing per rank, 0 allowed). Each rank dispatches its own
tokens' pairs (the same wire format) to the experts' owners and gets back exactly its tokens'
outputs [T_r, H]: no token share, no all-gather. A rank with no tokens still takes part in every
collective (it sends nothing and computes for the others), as vLLM's dummy forward passes do: every
rank must call the layer on every step, with the same hidden dtype.

Both styles give one device's result up to float32 summation order (tested on 2 gloo ranks within
the kernel budget). Fp8 tensors cross gloo as uint8 views (exact).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as funcol

from ..experts import Fp8Experts, combine, experts_mlp, gather_rows, sort_by_expert
from ..formats import FP8_DTYPES
from .alignment import local_range
from .layers import shard_from_src

#: Dispatch styles of :class:`Fp8ShardedExperts` / :class:`~.styles.Fp8ExpertParallel`.
DISPATCH_STYLES: tuple[str, ...] = ("allreduce", "alltoall")


def check_dispatch(dispatch: object, dp_attention: object = False) -> str:
    """``dispatch`` in DISPATCH_STYLES; ``dp_attention`` a bool, True only with "alltoall"."""
    if dispatch not in DISPATCH_STYLES:
        raise ValueError(f"dispatch: expected one of {DISPATCH_STYLES}, got {dispatch!r}")
    if not isinstance(dp_attention, bool):
        raise TypeError(f"dp_attention: expected a bool, got {type(dp_attention).__name__}")
    if dp_attention and dispatch != "alltoall":
        raise ValueError(
            f"dp_attention=True needs dispatch 'alltoall' (each rank sends its own tokens to the experts' "
            f"owners), got {dispatch!r}: the all-reduce style needs every token on every rank"
        )
    return dispatch  # type: ignore[return-value]


def token_share(tokens: int, tp_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s tokens in the all-to-all style: the first ``tokens % tp``
    ranks take ``ceil(tokens / tp)`` tokens, the others ``floor`` (every rank knows T: no sync)."""
    base, extra = divmod(tokens, tp_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def dispatch_payload(
    hidden_states: torch.Tensor, block_k: int, activation: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the all-to-all style sends per token: [T, H] -> (wire [T, H], scales [T, cdiv(H, bk)] or None).

    W8A8 (``activation="dynamic"``): the 1 x bk e4m3fn quantization the grouped op would do itself
    (``fp8.quantize`` with block [1, bk]), codes as a uint8 view + float32 multipliers. W8A16
    (``"none"``): the activations as they are, no scales.
    """
    if activation == "dynamic":
        q, s = torch.ops.fp8.quantize.default(hidden_states, [1, block_k], torch.float8_e4m3fn, "fp32")
        return q.view(torch.uint8), s
    return hidden_states, None


def _wire(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in FP8_DTYPES else t


class Fp8ShardedExperts(Fp8Experts):
    """This rank's experts of an expert-parallel :class:`Fp8Experts` (made by
    :func:`shard_experts_`; see the module docstring for the two dispatch styles).

    Buffers: the Fp8Experts layouts with E = ``num_experts`` = local experts. Attributes:
    ``full_num_experts``, ``expert_offset`` (= tp_rank * num_experts), ``tp_rank``, ``tp_size``,
    ``group`` (ProcessGroup, None on the shape-only path), ``dispatch``.

    Forward: hidden_states [T, H], top_k_index [T, k] GLOBAL expert ids, top_k_weights [T, k], the
    same on every rank -> [T, H] in hidden_states.dtype, the same on every rank. With
    ``dp_attention`` (``dispatch="alltoall"`` only): each rank's own tokens, T differing per rank
    (0 allowed) -> [T, H], this rank's tokens' outputs. Ids outside ``[0, full_num_experts)``
    contribute nothing (as on one device).
    """

    kind = "expert"
    full_num_experts: int
    expert_offset: int
    tp_rank: int
    tp_size: int
    group: dist.ProcessGroup | None
    dispatch: str
    dp_attention: bool

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, expert rank {self.tp_rank}/{self.tp_size}: experts "
            f"[{self.expert_offset}, {self.expert_offset + self.num_experts}) of {self.full_num_experts}, "
            f"dispatch={self.dispatch!r}{', dp_attention=True' if self.dp_attention else ''}"
        )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        empty = self._check_inputs(hidden_states, top_k_index, top_k_weights)
        if self.dp_attention:  # this rank's own tokens: T = 0 here still serves the other ranks
            if top_k_index.shape[1] == 0:  # k is the model's: 0 on every rank
                return torch.zeros_like(hidden_states)
            return self._dispatch_combine(hidden_states, top_k_index, top_k_weights)
        if empty:
            return torch.zeros_like(hidden_states)  # every rank has the same (empty) tokens
        if self.dispatch == "allreduce":
            return self._forward_allreduce(hidden_states, top_k_index, top_k_weights)
        return self._forward_alltoall(hidden_states, top_k_index, top_k_weights)

    def _mlp(self, x, group_sizes, x_scale=None, dtype=None) -> torch.Tensor:
        return experts_mlp(
            x, self.gate_up_proj, self.gate_up_proj_scale_inv, self.down_proj, self.down_proj_scale_inv,
            group_sizes, self.config, self.act_fn, x_scale=x_scale, dtype=dtype,
        )  # fmt: skip

    def _forward_allreduce(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        order, group_sizes = sort_by_expert(top_k_index, self.num_experts, self.expert_offset)
        y = self._mlp(gather_rows(hidden_states, order, top_k_index.shape[1]), group_sizes)
        partial = combine(y, order, top_k_weights, group_sizes)  # [T, H] float32, local pairs only
        return funcol.all_reduce(partial, "sum", self.group).to(hidden_states.dtype)

    def _forward_alltoall(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        tp, t = self.tp_size, hidden_states.shape[0]
        t0, t1 = token_share(t, tp, self.tp_rank)
        mine = self._dispatch_combine(hidden_states[t0:t1], top_k_index[t0:t1], top_k_weights[t0:t1])
        # Every rank gets every token back: equal-size all-gather of the shares padded to ceil(T / tp).
        width = -(-t // tp)
        padded = mine.new_zeros((width, mine.shape[1]))
        padded[: t1 - t0] = mine
        parts = [torch.empty_like(padded) for _ in range(tp)]
        dist.all_gather(parts, padded, group=self.group)
        spans = [token_share(t, tp, r) for r in range(tp)]
        return torch.cat([part[: b - a] for part, (a, b) in zip(parts, spans, strict=True)])

    def _dispatch_combine(self, x, idx, w) -> torch.Tensor:
        """DeepEP's dispatch / combine of THIS rank's tokens x [T_r, H] (T_r may be 0), idx / w
        [T_r, k]: -> [T_r, H] in x.dtype. A collective: every rank calls it on every step."""
        tp, e_local, k = self.tp_size, self.num_experts, idx.shape[1]
        # Pairs sorted by global expert = by destination rank (contiguous ranges); invalid ids last.
        order, counts = sort_by_expert(idx, self.full_num_experts)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [tp * E_local]: per source
        # THE host sync of this style: all_to_all_single takes its split sizes as Python lists.
        sizes = torch.cat([counts.view(tp, e_local).sum(1), recv_counts.view(tp, e_local).sum(1)]).tolist()
        send, recv = sizes[:tp], sizes[tp:]
        n_send, n_recv = sum(send), sum(recv)
        wire, scale = dispatch_payload(x, self.config.block_shape[1], self.config.activation)
        pairs = order[:n_send]
        send_x = gather_rows(wire, pairs, k)
        recv_x = send_x.new_empty((n_recv, *send_x.shape[1:]))
        dist.all_to_all_single(recv_x, send_x.contiguous(), recv, send, group=self.group)
        recv_s = None
        if scale is not None:
            send_s = gather_rows(scale, pairs, k)
            recv_s = send_s.new_empty((n_recv, send_s.shape[1]))
            dist.all_to_all_single(recv_s, send_s.contiguous(), recv, send, group=self.group)
            recv_x = recv_x.view(torch.float8_e4m3fn)
        # Received rows: per source rank, sorted by local expert. Sort them by local expert overall.
        local_ids = torch.arange(e_local, device=x.device).repeat(tp)
        ids = torch.repeat_interleave(local_ids, recv_counts.long(), output_size=n_recv)
        order_r, sizes_r = sort_by_expert(ids[:, None], e_local)
        xs = None if recv_s is None else recv_s.index_select(0, order_r)
        y_sorted = self._mlp(recv_x.index_select(0, order_r), sizes_r, xs, x.dtype)
        y_recv = torch.empty_like(y_sorted).index_copy_(0, order_r, y_sorted)  # back to received order
        y_back = y_recv.new_empty((n_send, y_recv.shape[1]))
        dist.all_to_all_single(y_back, y_recv, send, recv, group=self.group)  # float32 both ways
        y = y_back.new_zeros((order.numel(), y_back.shape[1]))
        y[:n_send] = y_back  # pairs of no expert: 0, and combine masks their weights
        if x.shape[0] == 0:  # no tokens here, but this rank took part in every collective
            return x.new_zeros((0, x.shape[1]))
        return combine(y, order, w, counts, x.dtype)  # [T_r, H]


def shard_experts_(
    layer: Fp8Experts,
    rank: int,
    tp_size: int,
    group: dist.ProcessGroup | None,
    dispatch: str,
    src_data_rank: int | None = None,
    dp_attention: bool = False,
) -> Fp8ShardedExperts:
    """Turn ``layer`` (all experts, or meta) into this rank's contiguous expert range in place.

    The caller has checked the alignment rule (``num_experts % tp_size == 0``). ``src_data_rank``
    None: real buffers are sliced locally and copied (the full ones can be freed). A rank r of
    ``group``: every rank receives its experts from rank r's buffers (``dist.scatter``, fp8 as
    uint8). Meta buffers get meta shards, nothing sent. ``dp_attention``: each rank brings its own
    tokens (see the module docstring; "alltoall" only).
    """
    if isinstance(layer, Fp8ShardedExperts):
        raise TypeError(f"shard_experts_: the layer is already expert-parallel (rank {layer.tp_rank})")
    dispatch = check_dispatch(dispatch, dp_attention)
    e0, e1 = local_range(layer.num_experts, tp_size, rank)
    send = src_data_rank is not None and layer.gate_up_proj.device.type != "meta"
    with torch.no_grad():
        for name in ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv"):
            full = layer._buffers[name]
            mine = shard_from_src(full, 0, tp_size, rank, src_data_rank, group) if send else full[e0:e1]
            layer._buffers[name] = mine.clone(memory_format=torch.contiguous_format)
    full = layer.num_experts
    layer.__class__ = Fp8ShardedExperts
    return _set_shard(layer, full, e0, rank, tp_size, group, dispatch, dp_attention)  # type: ignore[arg-type]


def _set_shard(layer, full, e0, rank, tp_size, group, dispatch, dp_attention) -> Fp8ShardedExperts:
    layer.num_experts = full // tp_size
    layer.full_num_experts, layer.expert_offset = full, e0
    layer.tp_rank, layer.tp_size, layer.group, layer.dispatch = rank, tp_size, group, dispatch
    layer.dp_attention = bool(dp_attention)
    return layer


def like_shard(layer: Fp8Experts, shard: Fp8ShardedExperts) -> Fp8ShardedExperts:
    """``layer`` (holding ``shard``'s local experts, e.g. loaded from a checkpoint) made a shard with
    ``shard``'s rank, group and dispatch, in place."""
    if layer.num_experts != shard.num_experts:
        raise ValueError(f"layer: expected {shard.num_experts} local experts, got {layer.num_experts}")
    layer.__class__ = Fp8ShardedExperts
    return _set_shard(
        layer, shard.full_num_experts, shard.expert_offset, shard.tp_rank, shard.tp_size, shard.group,
        shard.dispatch, shard.dp_attention,
    )  # fmt: skip


def meta_experts(module: nn.Module, config) -> Fp8Experts:
    """A meta :class:`Fp8Experts` of ``config`` with the shape and ``act_fn`` of a (meta) transformers
    fused experts module, for a checkpoint to fill."""
    e, two_i, h = module.gate_up_proj.shape
    return Fp8Experts(int(e), int(h), int(two_i) // 2, config, module.act_fn, device="meta")
