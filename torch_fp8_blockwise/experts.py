"""Mixture-of-experts layer: :class:`Fp8Experts`, fused block-wise FP8 experts on ``fp8::grouped_matmul``.

transformers (5.x) keeps a MoE layer's routed experts fused as 3-D parameters (``Qwen3MoeExperts``,
``DeepseekV3Experts``, ``MixtralExperts``, ...): ``gate_up_proj`` [E, 2I, H] (gate rows first, then
up rows), ``down_proj`` [E, H, I], an ``act_fn``, and
``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.
:class:`Fp8Experts` has that signature and transformers' ``FP8Experts`` state_dict names:

* ``gate_up_proj``: [E, 2I, H] fp8, contiguous; ``gate_up_proj_scale_inv``: [E, 2I / bn, cdiv(H, bk)]
  float32 multipliers (``gate_up_proj[e] ~= q * scale`` per (bn, bk) block, DeepSeek's layout per expert).
* ``down_proj``: [E, H, I] fp8, contiguous; ``down_proj_scale_inv``: [E, cdiv(H, bn), cdiv(I, bk)] float32.

I must be a multiple of bn: then no scale block straddles the gate / up boundary, so the fused
scales are exactly the per-expert ``gate_proj`` and ``up_proj`` scales of a DeepSeek / Qwen3 FP8
checkpoint stacked (load and save move fp8 codes and scales as they are, bit for bit).

The forward is four small steps, each a function here so engines (vLLM MoE method, expert
parallelism) can reuse them: :func:`sort_by_expert` (token-expert pairs sorted by expert, group
sizes as a device tensor: no host sync), :func:`gather_rows`, :func:`experts_mlp` (ONE
``grouped_matmul`` per projection), :func:`combine` (routing weights applied in float32, pairs
summed back per token in a fixed order). Pairs whose expert id falls outside ``[0, E)`` (after
``expert_offset``: transformers' sentinel ``E``, or experts another rank owns) are sorted past the
last group, so the grouped op returns 0 for them.

Checkpoint key mapping (used by :mod:`.checkpoint` and :mod:`.distributed.checkpoint`):
:func:`per_expert_keys` (and its inverse :func:`parse_per_expert_key`), :func:`split_per_expert`,
:func:`plan_load`; Mixtral's original names (``block_sparse_moe.experts.{e}.w1`` / ``w3`` / ``w2``)
beside DeepSeek / Qwen3's (:func:`mixtral_block_names`, :func:`uses_mixtral_names`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import torch
from torch import nn

from . import _memory
from . import ops as _ops  # noqa: F401  (registers torch.ops.fp8.*)
from .backends import cpu_grouped
from .formats import FP8_DTYPES, HIGH_PRECISION_DTYPES, cdiv
from .nn import (
    Fp8Config,
    LayerReport,
    QuantizationSummary,
    _check_tensor,
    _dtype_name,
    _nbytes,
    apply_keeping_dtype,
    weight_sqnr_db,
)

#: The experts forward's positional parameters (transformers' experts modules, ours).
FORWARD_PARAMS: tuple[str, ...] = ("hidden_states", "top_k_index", "top_k_weights")
#: Per-expert projection names of a DeepSeek-V3 / Qwen3 checkpoint.
PROJECTIONS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
#: The same projections in Mixtral's original checkpoints (``block_sparse_moe.experts.{e}.w1`` ...):
#: w1 is the gate, w3 the up, w2 the down projection (transformers' conversion_mapping "mixtral",
#: vLLM's Mixtral loader ``ckpt_names=("w1", "w2", "w3")``).
MIXTRAL_PROJECTIONS: dict[str, str] = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
#: transformers 5 names a Mixtral layer's MoE block ``mlp``; its checkpoints (and vLLM) ``block_sparse_moe``.
MIXTRAL_BLOCK = "block_sparse_moe"
#: state_dict names of the fused tensors (transformers' FP8Experts; ours).
FUSED_KEYS: tuple[str, ...] = ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv")
#: Attributes of transformers modules whose gate is not ``act_fn(gate) * up`` (clamped / softcapped
#: SwiGLU variants); a module carrying one of them with a value is not converted.
_GATE_VARIANTS: tuple[str, ...] = (
    "limit",
    "alpha",
    "swiglu_limit",
    "swiglu_alpha",
    "gate_softcap",
    "up_softcap",
)


# ------------------------------------------------------------------------------ routing pieces
def sort_by_expert(
    top_k_index: torch.Tensor, num_experts: int, expert_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the T*k (token, slot) pairs by expert, without reading anything on the host.

    Args:
        top_k_index: [T, k] integer expert ids.
        num_experts: E, the experts this layer holds: ids ``expert_offset .. expert_offset + E - 1``.
        expert_offset: the global id of this layer's expert 0 (expert parallelism: a rank holding a
            contiguous range). Ids outside the range (and transformers' sentinel id E) own no group.

    Returns:
        order: [T*k] int64, a stable permutation of the flattened pairs: pairs of local expert 0
            first, ..., pairs of no local expert last. Pair p is token ``p // k``, slot ``p % k``.
        group_sizes: [E] int32 on the same device, the number of pairs per local expert (computed
            with scatter_add, not bincount / one_hot, which read the max id on the host on cuda).
    """
    local = top_k_index.reshape(-1).long() - expert_offset
    outside = (local < 0) | (local >= num_experts)
    ids = torch.where(outside, torch.full_like(local, num_experts), local)
    order = torch.argsort(ids, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
    return order, counts[:num_experts]


def _eager_inference(*tensors: torch.Tensor) -> bool:
    """Outside autograd (no grad needed for any of ``tensors``) and outside compilation: where the
    CPU fast paths below may write into fresh memory or call C directly."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return not grad and not torch.compiler.is_compiling()


def gather_rows(hidden_states: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, H] -> [T*k, H]: row i is the token of sorted pair ``order[i]``.

    On the CPU, outside autograd and compilation, into :func:`._memory.empty` (huge pages for a
    large result: at 512 tokens, k = 8, H = 2048, a fresh 16 MB whose page faults were most of the
    gather's ~10 ms); the same rows either way."""
    rows = torch.div(order, top_k, rounding_mode="floor")
    if hidden_states.device.type == "cpu" and _eager_inference(hidden_states):
        out = _memory.empty(rows.numel(), *hidden_states.shape[1:], dtype=hidden_states.dtype)
        return torch.index_select(hidden_states, 0, rows, out=out)
    return hidden_states.index_select(0, rows)


def experts_mlp(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_proj_scale_inv: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_scale_inv: torch.Tensor,
    group_sizes: torch.Tensor,
    config: Fp8Config,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    x_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``down(act_fn(gate(x)) * up(x))`` per expert: two ``grouped_matmul`` calls.

    x: [M, H] rows sorted by expert (bf16 / fp16 / fp32), or already quantized: float8_e4m3fn with
    ``x_scale`` [M, cdiv(H, bk)] float32 (the 1 x bk groups W8A8 would compute: expert parallelism
    moves activations as fp8); weights and scales as in :class:`Fp8Experts`; group_sizes: [E] int32.
    The gate / up product is in ``dtype`` (default x.dtype: as transformers computes it), the down
    projection in float32. Returns [M, H] float32; rows of no group are 0.
    """
    block, act = list(config.block_shape), config.activation
    dtype = x.dtype if dtype is None else dtype
    gate_up = torch.ops.fp8.grouped_matmul.default(
        x, gate_up_proj, gate_up_proj_scale_inv, group_sizes, block, x_scale, dtype, act
    )
    gate, up = gate_up.chunk(2, dim=-1)
    h = act_fn(gate)
    if _eager_inference(h, up) and h.dtype == up.dtype and h is not gate:
        h.mul_(
            up
        )  # the same products into act_fn's fresh output: one [M, I] allocation (and its page faults) less
    else:
        h = h * up
    return torch.ops.fp8.grouped_matmul.default(
        h, down_proj, down_proj_scale_inv, group_sizes, block, None, torch.float32, act
    )


def combine(
    y: torch.Tensor,
    order: torch.Tensor,
    top_k_weights: torch.Tensor,
    group_sizes: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Weighted sum of each token's k expert outputs, in float32.

    y: [T*k, H] float32 in sorted-pair order; order, group_sizes: from :func:`sort_by_expert`;
    top_k_weights: [T, k]. Returns [T, H] ``sum_j w[t, j] * y[pair (t, j)]``, summed over j in slot
    order in float32 (deterministic; no atomics) and rounded once to ``out_dtype``. Pairs of no
    local expert (sorted rows at or past sum(group_sizes)) add exactly nothing, whatever their
    weight (a nan weight of a pair some other rank computes must not turn this rank's 0 into nan);
    a valid pair's non-finite weight propagates.

    On the CPU, outside autograd and compilation, the sum is one C pass
    (:func:`.backends.cpu_grouped.combine`, the same bits as the torch form below, 2-3x faster at a
    512-token Qwen3-30B-A3B block: no gathered [T, H] copies).
    """
    t, k = top_k_weights.shape
    # inverse[p] = the sorted row of pair p (p = t * k + j); rows at or past sum(group_sizes) are
    # pairs of no local expert, whose weight is 0 here (computed on the device).
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    w = top_k_weights.float()
    ws = torch.where(inverse.view(t, k) < group_sizes.sum(), w, torch.zeros_like(w))
    # Slot by slot: row inverse[t * k + j] of y is pair (t, j). Each step gathers [T, H] rows, so no
    # [T*k, H] temporary is made (two of them, weighted and permuted, cost 44 ms of 512-token
    # Qwen3-30B-A3B prefill on one CPU thread, mostly page faults; this form 7 ms, same bits).
    slots = inverse.view(t, k).T.contiguous()  # [k, T]: slots[j, t] = the sorted row of pair (t, j)
    if y.device.type == "cpu" and y.dtype == torch.float32 and _eager_inference(y, ws):
        if (out := cpu_grouped.combine(y, slots, ws, out_dtype)) is not None:
            return out
    out = y.index_select(0, slots[0]) * ws[:, :1]
    for j in range(1, k):
        out += y.index_select(0, slots[j]) * ws[:, j : j + 1]
    return out.to(out_dtype)


# ------------------------------------------------------------------------------ eligibility
def is_fused_experts(module: nn.Module) -> bool:
    """True for a fused experts module by structure: 3-D ``gate_up_proj`` and ``down_proj`` tensors and
    a forward taking (hidden_states, top_k_index, top_k_weights). No class-name list."""
    tensors = [getattr(module, n, None) for n in ("gate_up_proj", "down_proj")]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in tensors):
        return False
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return tuple(params[:3]) == FORWARD_PARAMS


def _default_gate() -> object | None:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # older / newer transformers without the experts interface
        return None
    return _default_apply_gate


def experts_skip_reason(module: nn.Module, config: Fp8Config, *, allow_meta: bool = False) -> str | None:
    """Why a fused experts module (:func:`is_fused_experts`) cannot become an :class:`Fp8Experts`
    with ``config``, or None. Checked: layout flags of transformers' ``use_experts_implementation``
    (transposed, interleaved gate/up, no gate, biases, post-expert norm), the gate function (only
    ``act_fn(gate) * up``), shapes, dtype, meta device (unless ``allow_meta``: the structure of a
    meta module that a checkpoint will fill), and I % bn == 0."""
    flags = {
        "is_transposed": (True, "weights are stored transposed ([E, H, 2I])"),
        "is_concatenated": (False, "gate and up rows are interleaved, not concatenated"),
        "has_gate": (False, "it has no gate projection (up_proj only)"),
        "has_bias": (True, "its projections have biases"),
        "has_post_expert_norm": (True, "it applies a norm after each expert"),
    }
    for attr, (bad, why) in flags.items():
        if getattr(module, attr, not bad) == bad:
            return why
    for attr in ("gate_up_proj_bias", "down_proj_bias"):
        if getattr(module, attr, None) is not None:
            return f"it has {attr}"
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is not None and apply_gate is not _default_gate():
        return (
            f"{type(module).__name__}._apply_gate is not act_fn(gate) * up (a clamped / softcapped variant)"
        )
    for attr in _GATE_VARIANTS:
        if getattr(module, attr, None) is not None:
            return f"it has {attr}={getattr(module, attr)!r} (a clamped / softcapped SwiGLU is not supported)"
    if not callable(getattr(module, "act_fn", None)):
        return "it has no act_fn"
    gu, down = module.gate_up_proj, module.down_proj
    if not allow_meta and (gu.device.type == "meta" or down.device.type == "meta"):
        return "weights are on the meta device (no values to quantize)"
    for name, t in (("gate_up_proj", gu), ("down_proj", down)):
        if t.dtype not in HIGH_PRECISION_DTYPES:
            return f"{name} dtype {t.dtype} is not one of bfloat16 / float16 / float32"
    e, two_i, h = gu.shape
    if two_i % 2 or tuple(down.shape) != (e, h, two_i // 2) or gu.numel() == 0:
        return f"shapes gate_up_proj {tuple(gu.shape)} / down_proj {tuple(down.shape)} are not [E, 2I, H] / [E, H, I]"
    bn = config.block_shape[0]
    if (two_i // 2) % bn:
        return (
            f"intermediate size I={two_i // 2} is not a multiple of bn={bn}: a scale block would straddle "
            "the fused gate / up rows (not representable as per-expert gate_proj / up_proj scales)"
        )
    return None


# ---------------------------------------------------------------------------------- the layer
class Fp8Experts(nn.Module):
    """Fused routed experts with block-wise FP8 weights, inference only (transformers' signature).

    Buffers (transformers' FP8Experts names):
        gate_up_proj: [E, 2I, H] ``config.dtype`` (gate rows 0..I-1, up rows I..2I-1), contiguous.
        gate_up_proj_scale_inv: [E, 2I / bn, cdiv(H, bk)] float32 multipliers.
        down_proj: [E, H, I] ``config.dtype``, contiguous.
        down_proj_scale_inv: [E, cdiv(H, bn), cdiv(I, bk)] float32 multipliers.

    Forward: hidden_states [T, H] bf16 / fp16 / fp32, top_k_index [T, k] integer expert ids (ids
    outside [0, E) contribute nothing), top_k_weights [T, k] float -> [T, H] in hidden_states.dtype:
    ``sum_j w[t, j] * down_e(act_fn(gate_e(x_t)) * up_e(x_t))`` with e = top_k_index[t, j], the
    weights applied and the k terms summed in float32. W8A8 (``config.activation="dynamic"``: each
    projection's input quantized per 1 x bk group) or W8A16 (``"none"``). Two grouped_matmul calls,
    no loop over experts, no host read of routing data (CUDA / XLA graphs and torch.compile hold).

    ``.to(device)`` moves every tensor; dtype conversions (``.half()``) leave fp8 weights and float32
    scales as they are.
    """

    gate_up_proj: torch.Tensor
    gate_up_proj_scale_inv: torch.Tensor
    down_proj: torch.Tensor
    down_proj_scale_inv: torch.Tensor

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        config: Fp8Config | None = None,
        act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        config = Fp8Config() if config is None else config
        if not isinstance(config, Fp8Config):
            raise TypeError(f"config: expected an Fp8Config, got {type(config).__name__}")
        for name, value in (("num_experts", num_experts), ("hidden_dim", hidden_dim), ("intermediate_dim", intermediate_dim)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        bn, bk = config.block_shape
        if intermediate_dim % bn:
            raise ValueError(
                f"intermediate_dim: expected a multiple of bn={bn} (so gate and up rows never share a "
                f"scale block), got {intermediate_dim}"
            )
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.config = config
        self.act_fn = nn.SiLU() if act_fn is None else act_fn
        e, h, i = num_experts, hidden_dim, intermediate_dim
        self.register_buffer("gate_up_proj", torch.zeros(e, 2 * i, h, dtype=config.dtype, device=device))
        self.register_buffer(
            "gate_up_proj_scale_inv",
            torch.ones(e, 2 * i // bn, cdiv(h, bk), dtype=torch.float32, device=device),
        )
        self.register_buffer("down_proj", torch.zeros(e, h, i, dtype=config.dtype, device=device))
        self.register_buffer(
            "down_proj_scale_inv", torch.ones(e, cdiv(h, bn), cdiv(i, bk), dtype=torch.float32, device=device)
        )

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_experts(cls, module: nn.Module, config: Fp8Config | None = None) -> Fp8Experts:
        """Quantize a transformers fused experts module (``gate_up_proj`` [E, 2I, H], ``down_proj``
        [E, H, I], bf16 / fp16 / fp32) per expert at ``config.block_shape`` on its device; its
        ``act_fn`` is kept. Raises ValueError with the reason when the module cannot be converted."""
        config = Fp8Config() if config is None else config
        if not isinstance(module, nn.Module) or not is_fused_experts(module):
            raise TypeError(
                "module: expected a fused experts module (3-D gate_up_proj / down_proj, forward("
                f"hidden_states, top_k_index, top_k_weights)), got {type(module).__name__}"
            )
        reason = experts_skip_reason(module, config)
        if reason is not None:
            raise ValueError(f"module: cannot convert {type(module).__name__}: {reason}")
        block, dtype, fmt = list(config.block_shape), config.dtype, config.scale_format
        with torch.no_grad():
            gu, gu_s = torch.ops.fp8.quantize.default(module.gate_up_proj.detach(), block, dtype, fmt)
            dn, dn_s = torch.ops.fp8.quantize.default(module.down_proj.detach(), block, dtype, fmt)
        return cls.from_quantized(gu, gu_s, dn, dn_s, config, module.act_fn)

    @classmethod
    def from_quantized(
        cls,
        gate_up_proj: torch.Tensor,
        gate_up_proj_scale_inv: torch.Tensor,
        down_proj: torch.Tensor,
        down_proj_scale_inv: torch.Tensor,
        config: Fp8Config | None = None,
        act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Fp8Experts:
        """Wrap already-quantized fused tensors (layouts in the class docstring) without copying."""
        config = Fp8Config() if config is None else config
        if not isinstance(gate_up_proj, torch.Tensor) or gate_up_proj.dim() != 3:
            got = (
                tuple(gate_up_proj.shape)
                if isinstance(gate_up_proj, torch.Tensor)
                else type(gate_up_proj).__name__
            )
            raise ValueError(f"gate_up_proj: expected a 3-D [E, 2I, H] tensor, got {got}")
        e, two_i, h = gate_up_proj.shape
        if two_i % 2:
            raise ValueError(
                f"gate_up_proj: expected an even row count 2I, got shape {tuple(gate_up_proj.shape)}"
            )
        layer = cls(e, h, two_i // 2, config, act_fn, device="meta")
        tensors = dict(zip(FUSED_KEYS, (gate_up_proj, gate_up_proj_scale_inv, down_proj, down_proj_scale_inv), strict=True))  # fmt: skip
        layer._check_state(tensors, "")
        devices = {t.device for t in tensors.values()}
        if len(devices) > 1:
            raise ValueError(
                f"gate_up_proj: all four tensors must be on one device, got {sorted(map(str, devices))}"
            )
        for name, t in tensors.items():
            if name in ("gate_up_proj", "down_proj") and not t.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous row-major tensor, got strides {t.stride()}")
            layer._buffers[name] = t.detach()
        return layer

    def _check_state(self, tensors: dict[str, object], prefix: str) -> None:
        """Dtype / shape of each fused tensor present in ``tensors`` (keys without prefix); errors name
        ``prefix + key``."""
        e, h, i = self.num_experts, self.hidden_dim, self.intermediate_dim
        bn, bk = self.config.block_shape
        expected = {
            "gate_up_proj": ((e, 2 * i, h), (self.config.dtype,), ""),
            "gate_up_proj_scale_inv": (
                (e, 2 * i // bn, cdiv(h, bk)),
                (torch.float32,),
                f" (blocks {bn}x{bk})",
            ),
            "down_proj": ((e, h, i), (self.config.dtype,), ""),
            "down_proj_scale_inv": ((e, cdiv(h, bn), cdiv(i, bk)), (torch.float32,), f" (blocks {bn}x{bk})"),
        }
        for name, (shape, dtypes, what) in expected.items():
            if name in tensors:
                _check_tensor(prefix + name, tensors[name], shape, dtypes, what)

    # ----------------------------------------------------------------------------------- forward
    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self._check_inputs(hidden_states, top_k_index, top_k_weights):
            return torch.zeros_like(hidden_states)
        order, group_sizes = sort_by_expert(top_k_index, self.num_experts)
        x = gather_rows(hidden_states, order, top_k_index.shape[1])
        y = experts_mlp(
            x,
            self.gate_up_proj,
            self.gate_up_proj_scale_inv,
            self.down_proj,
            self.down_proj_scale_inv,
            group_sizes,
            self.config,
            self.act_fn,
        )
        return combine(y, order, top_k_weights, group_sizes, hidden_states.dtype)

    def _check_inputs(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> bool:
        """Validate the forward's arguments (shapes and dtypes only, no host read of values);
        True when there is nothing to compute (no token or k = 0)."""
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.hidden_dim:
            raise ValueError(
                f"hidden_states: expected [T, {self.hidden_dim}], got {tuple(hidden_states.shape)}"
            )
        if top_k_index.dim() != 2 or top_k_index.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"top_k_index: expected [T={hidden_states.shape[0]}, k], got {tuple(top_k_index.shape)}"
            )
        if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
            raise TypeError(f"top_k_index: expected an integer tensor, got {top_k_index.dtype}")
        if tuple(top_k_weights.shape) != tuple(top_k_index.shape):
            raise ValueError(
                f"top_k_weights: expected shape {tuple(top_k_index.shape)} (as top_k_index), "
                f"got {tuple(top_k_weights.shape)}"
            )
        return hidden_states.shape[0] == 0 or top_k_index.shape[1] == 0

    def dequantized_weights(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """([E, 2I, H], [E, H, I]) ``dtype`` copies of the weights (inspection, SQNR; not used in forward)."""
        block = list(self.config.block_shape)
        return (
            torch.ops.fp8.dequantize.default(self.gate_up_proj, self.gate_up_proj_scale_inv, block, dtype),
            torch.ops.fp8.dequantize.default(self.down_proj, self.down_proj_scale_inv, block, dtype),
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, block_shape={c.block_shape}, "
            f"activation={c.activation!r}, dtype={_dtype_name(c.dtype)}, scale_format={c.scale_format!r}"
        )

    # ------------------------------------------------------------------------- module plumbing
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Fp8Experts:
        """Move the fp8 weights and scales with ``fn`` but never change their dtype (as
        Fp8BlockwiseLinear._apply: ``.half()`` would otherwise cast fp8 to fp16)."""
        super_apply = super()._apply
        apply_keeping_dtype(self, lambda: super_apply(fn, recurse), fn, FUSED_KEYS)
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # nn.Module's loader copy_()s, which would silently cast a bf16 tensor into fp8.
        self._check_state({k: state_dict[prefix + k] for k in FUSED_KEYS if prefix + k in state_dict}, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


# ------------------------------------------------------------------------------ model conversion
def experts_reports(
    layer: Fp8Experts, original: nn.Module | None, bytes_before: tuple[int, int] | None = None
) -> dict[str, LayerReport]:
    """Summary rows ``gate_up_proj`` / ``down_proj`` for one converted experts module (SQNR of each
    dequantized projection vs ``original``'s, when given)."""
    e, h, i = layer.num_experts, layer.hidden_dim, layer.intermediate_dim
    deq = layer.dequantized_weights() if original is not None else (None, None)
    rows = {}
    for j, (name, n, k) in enumerate((("gate_up_proj", 2 * i, h), ("down_proj", h, i))):
        q, s = getattr(layer, name), getattr(layer, name + "_scale_inv")
        ref = None if original is None else getattr(original, name)
        rows[name] = LayerReport(
            out_features=n,
            in_features=k,
            block_shape=layer.config.block_shape,
            bytes_before=_nbytes(ref)
            if ref is not None
            else (bytes_before[j] if bytes_before else _nbytes(q, s)),
            bytes_after=_nbytes(q, s),
            sqnr_db=None if ref is None else weight_sqnr_db(deq[j], ref),
            experts=e,
        )
    return rows


def quantize_experts_(
    model: nn.Module,
    config: Fp8Config,
    filter_fn: Callable[[nn.Module, str], bool] | None,
    min_sqnr_db: float | None,
    summary: QuantizationSummary,
    logger: logging.Logger,
) -> None:
    """The experts part of :func:`torch_fp8_blockwise.nn.quantize_model_`: every fused experts module
    (:func:`is_fused_experts`) becomes an :class:`Fp8Experts` (summary rows ``<name>.gate_up_proj`` /
    ``<name>.down_proj``), or is skipped with the reason."""
    edges: dict[int, list[tuple[nn.Module, str, str]]] = {}
    modules: dict[int, nn.Module] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            fqn = f"{parent_name}.{attr}" if parent_name else attr
            if isinstance(child, Fp8Experts):
                summary.skipped[fqn] = "already an Fp8Experts"
            elif child is not None and is_fused_experts(child):
                edges.setdefault(id(child), []).append((parent, attr, fqn))
                modules[id(child)] = child
    with torch.no_grad():
        for key, places in edges.items():
            module, name = modules[key], places[0][2]
            if filter_fn is not None and not filter_fn(module, name):
                summary.skipped[name] = "filter_fn returned False"
                continue
            reason = experts_skip_reason(module, config)
            if reason is not None:
                summary.skipped[name] = reason
                logger.warning("torch_fp8_blockwise: not converting %s: %s", name, reason)
                continue
            new = Fp8Experts.from_experts(module, config)
            rows = experts_reports(new, module)
            worst = min(r.sqnr_db for r in rows.values())
            if min_sqnr_db is not None and worst < min_sqnr_db:
                reason = (
                    f"weight SQNR {worst:.1f} dB < min_sqnr_db {min_sqnr_db:g} dB; kept in "
                    f"{_dtype_name(module.gate_up_proj.dtype)}"
                )
                summary.skipped[name] = reason
                logger.warning("torch_fp8_blockwise: not converting %s: %s", name, reason)
                continue
            summary.converted.update({f"{name}.{proj}": r for proj, r in rows.items()})
            for parent, attr, _ in places:
                setattr(parent, attr, new)


def requantize_experts(layer: Fp8Experts, block: int) -> Fp8Experts:
    """A copy of ``layer`` at (block, block) weight blocks: dequantized in float32 at its blocks,
    quantized at the new ones (same dtype and scale format; for TPU's 256-deep MXUs). ValueError when
    the intermediate size is not a multiple of ``block``."""
    c = layer.config
    config = Fp8Config((block, block), c.activation, c.dtype, c.scale_format)
    if config.block_shape == c.block_shape:
        return layer
    if layer.intermediate_dim % block:
        raise ValueError(
            f"requantize_block: {block} does not divide the experts' intermediate size {layer.intermediate_dim} "
            "(gate and up rows would share a scale block)"
        )
    with torch.no_grad():
        new = [
            torch.ops.fp8.quantize.default(w, [block, block], c.dtype, c.scale_format)
            for w in layer.dequantized_weights(torch.float32)
        ]
    return Fp8Experts.from_quantized(*new[0], *new[1], config, layer.act_fn)


# ------------------------------------------------------------------------------ checkpoint keys
def per_expert_keys(name: str, expert: int, projection: str, *, mixtral: bool = False) -> tuple[str, str]:
    """(weight key, scale key) of one expert's projection (one of :data:`PROJECTIONS`) of the experts
    module registered as ``name`` in the model.

    DeepSeek-V3 / Qwen3 layout (default): ``<name>.<expert>.<projection>.weight`` and
    ``...weight_scale_inv``. ``mixtral=True``: Mixtral's original layout, the MoE block named
    ``block_sparse_moe`` (:func:`mixtral_block_names`) and the projections w1 / w3 / w2
    (:data:`MIXTRAL_PROJECTIONS`): ``model.layers.0.mlp.experts`` expert 3's gate_proj is
    ``model.layers.0.block_sparse_moe.experts.3.w1.weight``."""
    base = f"{per_expert_stem(name, mixtral=mixtral)}.{expert}.{_stored_projections(mixtral)[projection]}"
    return base + ".weight", base + ".weight_scale_inv"


def per_expert_stem(name: str, *, mixtral: bool = False) -> str:
    """What every per-expert key of experts module ``name`` starts with (before ``.<e>.``):
    ``name`` itself, or with ``mixtral`` its MoE block renamed (``model.layers.0.mlp.experts`` ->
    ``model.layers.0.block_sparse_moe.experts``)."""
    if mixtral:
        block, stored = mixtral_block_names(name)
        return stored + name[len(block) :]
    return name


def _stored_projections(mixtral: bool) -> dict[str, str]:
    """Projection (one of :data:`PROJECTIONS`) -> its name in the checkpoint's keys."""
    return MIXTRAL_PROJECTIONS if mixtral else _SAME_PROJECTIONS


_SAME_PROJECTIONS: dict[str, str] = {p: p for p in PROJECTIONS}


def parse_per_expert_key(rest: str, *, mixtral: bool = False) -> tuple[int, str, str] | None:
    """The inverse of :func:`per_expert_keys` after the stem: ``rest`` = what follows
    ``per_expert_stem(name, mixtral=mixtral) + "."`` in a key -> (expert, projection (one of
    :data:`PROJECTIONS`), "weight" or "weight_scale_inv"), exactly when :func:`per_expert_keys` gives
    that key for them (an expert id in its canonical decimal form: no sign, no leading zero); else
    None. (distributed.checkpoint maps a file's key to the local expert slot it fills.)"""
    parts = rest.split(".")
    if len(parts) != 3 or parts[2] not in ("weight", "weight_scale_inv"):
        return None
    e, stored, suffix = parts
    if not (e.isascii() and e.isdigit()) or str(int(e)) != e:
        return None
    for proj, name in _stored_projections(mixtral).items():
        if name == stored:
            return int(e), proj, suffix
    return None


def mixtral_block_names(name: str) -> tuple[str, str]:
    """(the model's name, Mixtral checkpoints' name) of the MoE block holding experts module ``name``:
    ``model.layers.0.mlp.experts`` -> ("model.layers.0.mlp", "model.layers.0.block_sparse_moe"). A
    block already named ``block_sparse_moe`` (or anything but ``mlp``) keeps its name; a top-level
    experts module has the block "" on both sides."""
    block = name.rpartition(".")[0]
    parent, _, last = block.rpartition(".")
    if last == "mlp":
        return block, f"{parent}.{MIXTRAL_BLOCK}" if parent else MIXTRAL_BLOCK
    return block, block


def uses_mixtral_names(model: nn.Module) -> bool:
    """Whether :func:`.checkpoint.save` writes ``model``'s experts under Mixtral's original names
    (:func:`per_expert_keys` with ``mixtral=True``, and the rest of each MoE block under
    ``block_sparse_moe``): a transformers model whose ``config.model_type`` is "mixtral", as
    transformers' own save_pretrained (its conversion_mapping reversed) and vLLM's Mixtral loader
    name them."""
    return getattr(getattr(model, "config", None), "model_type", None) == "mixtral"


def file_uses_mixtral_names(name: str, keys: dict | set) -> bool:
    """Whether a checkpoint (``keys``: its tensor keys) holds experts module ``name``'s experts under
    Mixtral's original names (expert 0's w1 weight or scale) and not under DeepSeek / Qwen3's."""
    deepseek = per_expert_keys(name, 0, "gate_proj")
    if deepseek[0] in keys or deepseek[1] in keys:
        return False
    return any(k in keys for k in per_expert_keys(name, 0, "gate_proj", mixtral=True))


def split_per_expert(name: str, layer: Fp8Experts, *, mixtral: bool = False) -> dict[str, torch.Tensor]:
    """The per-expert checkpoint tensors of ``layer`` (registered as ``name``): for each expert e,
    gate_proj [I, H] / up_proj [I, H] / down_proj [H, I] fp8 ``.weight`` + float32
    ``.weight_scale_inv`` (gate: scale rows [0, I/bn), up: [I/bn, 2I/bn)), named by
    :func:`per_expert_keys` (``mixtral``: Mixtral's w1 / w3 / w2 names). Copies on the CPU,
    contiguous, sharing no storage (safetensors refuses shared storage); codes and scales as they are."""
    i, bn = layer.intermediate_dim, layer.config.block_shape[0]
    gu, gu_s = layer.gate_up_proj.detach().cpu(), layer.gate_up_proj_scale_inv.detach().cpu()
    dn, dn_s = layer.down_proj.detach().cpu(), layer.down_proj_scale_inv.detach().cpu()
    out: dict[str, torch.Tensor] = {}
    for e in range(layer.num_experts):
        parts = {
            "gate_proj": (gu[e, :i], gu_s[e, : i // bn]),
            "up_proj": (gu[e, i:], gu_s[e, i // bn :]),
            "down_proj": (dn[e], dn_s[e]),
        }
        for proj, (w, s) in parts.items():
            w_key, s_key = per_expert_keys(name, e, proj, mixtral=mixtral)
            out[w_key], out[s_key] = w.clone(), s.clone()
    return out


def plan_load(
    name: str,
    module: nn.Module,
    tensors: dict[str, tuple[torch.Tensor, str]],
    config: Fp8Config,
    requantize_block: int | None,
    read_scale: Callable[[str, torch.Tensor, str], torch.Tensor],
    error: type[Exception],
    dtype_error: type[Exception],
    *,
    mixtral: bool = False,
) -> tuple[Fp8Experts | None, set[str], dict[str, LayerReport]]:
    """Build the :class:`Fp8Experts` that ``module`` (a fused experts module, float or ours, possibly
    on the meta device) becomes from a checkpoint's fp8 tensors, checking every tensor first.

    Reads either the per-expert keys (:func:`per_expert_keys`, Mixtral's names when ``mixtral``:
    gate / up stacked and fused without dequantizing) or our fused keys (``<name>.gate_up_proj`` fp8
    + ``_scale_inv``, ...).
    ``tensors``: key -> (tensor, file); ``config``: the file's format with the load's activation;
    ``requantize_block``: re-quantize to (b, b) blocks (:func:`requantize_experts`; the rows then
    report each projection's SQNR vs the file's weight, ``sqnr_vs_128_db``) or None;
    ``read_scale(key, t, file)`` -> float32 scale (the checkpoint's scale rule); ``error`` /
    ``dtype_error``: the exception classes raised, naming the key and the file.

    Returns (layer on the module's device, for meta where the tensors read are (CPU); the keys used; the summary rows
    ``<name>.gate_up_proj`` / ``<name>.down_proj``), or (None, empty, empty) when the checkpoint holds
    no fp8 experts tensors for ``name`` and the module is not an Fp8Experts (a float experts module
    loaded like any other tensor).
    """
    e, h, i = _dims(module)
    bn, bk = config.block_shape
    fused = f"{name}.gate_up_proj"
    first = per_expert_keys(name, 0, "gate_proj", mixtral=mixtral)
    if first[0] in tensors and first[1] not in tensors and tensors[first[0]][0].dtype not in FP8_DTYPES:
        t, file = tensors[first[0]]
        raise dtype_error(
            f"{first[0]} in {file}: a {t.dtype} per-expert weight without scales; only fp8 per-expert "
            "experts are read (load a high-precision checkpoint with transformers, then quantize_model_)"
        )
    if first[0] in tensors or first[1] in tensors:
        gu, gu_s, dn, dn_s, used = _stack_per_expert(
            name, e, h, i, tensors, config, read_scale, error, dtype_error, mixtral
        )
    elif fused in tensors and tensors[fused][0].dtype in FP8_DTYPES:
        used, got = set(), []
        for key in FUSED_KEYS:
            full = f"{name}.{key}"
            if full not in tensors:
                raise error(f"{full}: missing, but {fused} in {tensors[fused][1]} is fp8")
            t, file = tensors[full]
            got.append(read_scale(full, t, file) if key.endswith("scale_inv") else t)
            used.add(full)
        gu, gu_s, dn, dn_s = got
        for key, t in zip(("gate_up_proj", "down_proj"), (gu, dn), strict=True):
            if t.dtype != config.dtype:
                raise dtype_error(
                    f"{name}.{key} in {tensors[f'{name}.{key}'][1]}: expected {config.dtype}, got {t.dtype}"
                )
    elif isinstance(module, Fp8Experts):
        raise error(f"{first[0]}: missing from the checkpoint (nor {fused}), and {name} is an Fp8Experts")
    else:
        return None, set(), {}
    if i % bn:
        raise error(
            f"{first[1]}: intermediate size {i} is not a multiple of the checkpoint's bn={bn}; gate and up "
            "cannot be fused with exact scales"
        )
    layer = Fp8Experts(e, h, i, config, module.act_fn, device="meta")
    try:
        layer._check_state(dict(zip(FUSED_KEYS, (gu, gu_s, dn, dn_s), strict=True)), f"{name}.")
    except (TypeError, ValueError) as exc:
        raise error(f"{exc} (in {tensors[next(iter(sorted(used)))][1]})") from exc
    ref = module.gate_up_proj
    device = ref.device if ref.device.type != "meta" else gu.device  # meta: where the file's tensors are
    layer = Fp8Experts.from_quantized(
        gu.contiguous().to(device), gu_s.contiguous().to(device), dn.contiguous().to(device),
        dn_s.contiguous().to(device), config, module.act_fn,
    )  # fmt: skip
    file_layer = layer
    if requantize_block is not None:
        layer = requantize_experts(layer, requantize_block)
    reports = experts_reports(layer, None)
    if layer is not file_layer:  # re-quantized: what the larger blocks cost, per projection
        for r, new, old in zip(
            reports.values(), layer.dequantized_weights(), file_layer.dequantized_weights(), strict=True
        ):
            r.sqnr_vs_128_db = weight_sqnr_db(new, old)
    return layer, used, {f"{name}.{proj}": r for proj, r in reports.items()}


def _dims(module: nn.Module) -> tuple[int, int, int]:
    if isinstance(module, Fp8Experts):
        return module.num_experts, module.hidden_dim, module.intermediate_dim
    e, two_i, h = module.gate_up_proj.shape
    return e, h, two_i // 2


def _stack_per_expert(name, e, h, i, tensors, config, read_scale, error, dtype_error, mixtral):
    bn, bk = config.block_shape
    shapes = {"gate_proj": ((i, h), (cdiv(i, bn), cdiv(h, bk))), "up_proj": ((i, h), (cdiv(i, bn), cdiv(h, bk))),
              "down_proj": ((h, i), (cdiv(h, bn), cdiv(i, bk)))}  # fmt: skip
    got: dict[str, list[list[torch.Tensor]]] = {p: [[], []] for p in PROJECTIONS}
    used: set[str] = set()
    for x in range(e):
        for proj in PROJECTIONS:
            w_key, s_key = per_expert_keys(name, x, proj, mixtral=mixtral)
            for key in (w_key, s_key):
                if key not in tensors:
                    files = sorted({f for _, f in tensors.values()})
                    raise error(
                        f"{key}: missing from the checkpoint ({name} has {e} experts; files: {files})"
                    )
            (w, w_file), (s, s_file) = tensors[w_key], tensors[s_key]
            (w_shape, s_shape) = shapes[proj]
            if w.dtype != config.dtype:
                raise dtype_error(
                    f"{w_key} in {w_file}: expected {config.dtype} (fmt in config.json), got {w.dtype}"
                )
            if tuple(w.shape) != w_shape:
                raise error(
                    f"{w_key} in {w_file}: expected shape {w_shape} for the model's experts, got {tuple(w.shape)}"
                )
            s = read_scale(s_key, s, s_file)
            if tuple(s.shape) != s_shape:
                raise error(
                    f"{s_key} in {s_file}: expected shape {s_shape} (weight {w_shape} in {bn}x{bk} blocks, "
                    f"weight_block_size in config.json), got {tuple(s.shape)}"
                )
            got[proj][0].append(w)
            got[proj][1].append(s)
            used.update((w_key, s_key))
    (g, gs), (u, us), (d, ds) = (got[p] for p in PROJECTIONS)

    def codes(ts: list[torch.Tensor]) -> torch.Tensor:  # stacked as bytes: codes move as they are
        return torch.stack([t.view(torch.uint8) for t in ts])

    gu = torch.cat([codes(g), codes(u)], dim=1).view(config.dtype)
    gu_s = torch.cat([torch.stack(gs), torch.stack(us)], dim=1)
    return gu, gu_s, codes(d).view(config.dtype), torch.stack(ds), used
