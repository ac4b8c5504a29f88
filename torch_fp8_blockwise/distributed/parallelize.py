""":func:`parallelize`: one plan, applied on a torch ``DeviceMesh`` (gloo / NCCL) or a torch_xla SPMD ``Mesh``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..experts import Fp8Experts
from ..nn import Fp8BlockwiseLinear, Fp8Config
from .alignment import BlockShardingError
from .experts import check_dispatch, meta_experts, shard_experts_
from .layers import check_src_data_rank, shard_layer_
from .plan import check_plan, default_assignment, expert_problem, planned_layers


@dataclass(frozen=True)
class ShardedLayer:
    """How one layer was split: full and local weight shapes [N, K] (for "expert": one expert's
    gate_up_proj [2I, H], the same on every rank), block (bn, bk); for "expert" also
    ``experts`` = (all experts, experts per rank), the ``dispatch`` style and ``dp_attention``."""

    kind: str
    full_shape: tuple[int, int]
    local_shape: tuple[int, int]
    block: tuple[int, int]
    experts: tuple[int, int] | None = None
    dispatch: str | None = None
    dp_attention: bool = False


@dataclass
class ShardingReport:
    """What :func:`parallelize` did. ``str()`` is a readable table.

    ``rank_bytes``: bytes of every parameter and buffer one rank holds after (meta tensors counted
    by shape, shared tensors once); ``full_bytes``: the same before (one device's model).
    """

    engine: str
    tp_size: int
    sharded: dict[str, ShardedLayer] = field(default_factory=dict)
    replicated: dict[str, str] = field(default_factory=dict)
    full_bytes: int = 0
    rank_bytes: int = 0

    def __str__(self) -> str:
        lines = [
            f"tensor parallel ({self.engine}, tp={self.tp_size}): {len(self.sharded)} layers sharded, "
            f"{len(self.replicated)} kept replicated"
        ]
        # Decoder layers repeat: one line per (name with layer indices as *, what happened), counted.
        entries: dict[tuple[str, str], int] = {}
        for name, s in self.sharded.items():
            what = (
                f"{s.kind} [{s.full_shape[0]}, {s.full_shape[1]}] -> "
                f"[{s.local_shape[0]}, {s.local_shape[1]}] per rank ({s.block[0]}x{s.block[1]} blocks)"
            )
            if s.experts is not None:
                style = f"{s.dispatch}, dp attention" if s.dp_attention else s.dispatch
                what = (
                    f"expert ({style}) {s.experts[0]} experts of [{s.full_shape[0]}, {s.full_shape[1]}] "
                    f"-> {s.experts[1]} per rank ({s.block[0]}x{s.block[1]} blocks)"
                )
            key = (_generic(name), what)
            entries[key] = entries.get(key, 0) + 1
        for name, reason in self.replicated.items():
            key = (_generic(name), f"replicated: {_generic(reason)}")
            entries[key] = entries.get(key, 0) + 1
        for (name, what), count in entries.items():
            lines.append(f"  {name}{f' (x{count})' if count > 1 else ''}: {what}")
        ratio = f" ({self.rank_bytes / self.full_bytes:.3f}x)" if self.full_bytes else ""
        lines.append(f"bytes per rank: {self.rank_bytes:,} (one device: {self.full_bytes:,}){ratio}")
        return "\n".join(lines)


def _generic(text: str) -> str:
    """Layer indices in module names as '*' ("model.layers.3.mlp" -> "model.layers.*.mlp")."""
    return re.sub(r"\.\d+(?=\.)", ".*", text)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each tensor object once; meta counted by shape)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _is_xla_mesh(mesh: object) -> bool:
    return type(mesh).__module__.startswith("torch_xla")


def _meta_fp8(linear: nn.Linear, config: Fp8Config) -> Fp8BlockwiseLinear:
    return Fp8BlockwiseLinear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        config=config,
        device="meta",
        bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32,
    )


DP_ATTENTION = (
    "data-parallel attention (dp_attention=True): each rank runs its own tokens through a full copy"
)


def _assignment(
    model: nn.Module,
    plan: dict[str, str | None] | None,
    tp: int,
    config: Fp8Config,
    dp_attention: bool = False,
) -> tuple[dict[str, str], dict[str, str]]:
    if plan is None:
        assigned, replicated = default_assignment(model, tp, config.block_shape)
        if dp_attention:  # only the experts are split; everything else runs data-parallel
            for name in [n for n, kind in assigned.items() if kind != "expert"]:
                replicated[name] = DP_ATTENTION
                del assigned[name]
        return assigned, replicated
    assigned = check_plan(model, plan, tp, block_shape=config.block_shape)
    split = sorted(name for name, kind in assigned.items() if kind != "expert")
    if dp_attention and split:
        raise ValueError(
            f"plan: {split[0]} asks for {assigned[split[0]]!r}, but with dp_attention=True every rank brings "
            "its own tokens, so only experts can be split ('expert'); map the others to None"
        )
    experts = sorted(name for name, kind in assigned.items() if kind == "expert")
    layers, _ = planned_layers(model, {name: "expert" for name in experts}, config.block_shape)
    for name in experts:
        why = expert_problem(name, model.get_submodule(name), layers[name], tp, config.block_shape)
        if why is not None:
            raise TypeError(f"plan: {name} asks for 'expert', but {why}; or map it to None (replicated)")
    for name in assigned:
        if assigned[name] == "expert":
            continue
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear) and module.weight.device.type != "meta":
            raise TypeError(
                f"plan: {name} is a high-precision nn.Linear with values; convert it with quantize_model_ "
                "first, or map it to None (replicated)"
            )
    return assigned, {}


def parallelize(
    model: nn.Module,
    mesh: object,
    plan: dict[str, str | None] | None = None,
    *,
    config: Fp8Config | None = None,
    expert_dispatch: str = "allreduce",
    dp_attention: bool = False,
    src_data_rank: int | None = 0,
) -> ShardingReport:
    """Split ``model``'s FP8 layers over the ranks of ``mesh`` in place, and report what was done.

    Args:
        model: a model whose linear layers are :class:`Fp8BlockwiseLinear` (after quantize_model_),
            or a model on the meta device (its planned nn.Linear layers become meta
            Fp8BlockwiseLinear shards of ``config``; fill them with
            :func:`torch_fp8_blockwise.distributed.checkpoint.load`, so no rank holds the full model;
            on a torch_xla Mesh that loader places each tensor on the devices, sharded, as it is
            read: :mod:`.xla_checkpoint`). Every rank must call this with the same model structure
            (values: see ``src_data_rank``). On a torch_xla Mesh the model is on torch_xla's device
            or meta.
        mesh: a 1-D ``torch.distributed.device_mesh.DeviceMesh`` (this process is one rank: the
            layers become :class:`Fp8ColwiseLinear` / :class:`Fp8RowwiseLinear` holding local
            shards, collectives on the mesh's process group), or a 1-D torch_xla SPMD
            ``torch_xla.distributed.spmd.Mesh`` (one process drives every device: the layers become
            :class:`~.xla.Fp8XlaColwiseLinear` / ``Fp8XlaRowwiseLinear`` and experts
            :class:`~.xla_experts.Fp8XlaExperts`, running the kernels on local shapes inside
            manual-sharding regions).
        plan: ``{pattern: "colwise" | "rowwise" | "expert" | None}``, checked by :func:`check_plan`
            (all or nothing: :class:`BlockShardingError` before anything moves). None: the default
            plan (:data:`DEFAULT_PLAN`), made safe: an attention / MLP block whose layers do not all
            satisfy the alignment rule (or would split heads) stays replicated, with the reason in the
            report; experts are split by whole experts (:class:`~.experts.Fp8ShardedExperts`,
            :class:`~.xla_experts.Fp8XlaExperts` on a torch_xla Mesh) when ``num_experts % tp == 0``,
            else kept replicated with the reason.
        config: Fp8Config for meta nn.Linear layers and meta experts modules (default Fp8Config()).
        expert_dispatch: "allreduce" (all tokens on every rank, one float32 all-reduce, no host
            sync) or "alltoall" (fp8 activations + scales with all_to_all_single; one host read of
            the split sizes per call): see :mod:`torch_fp8_blockwise.distributed.experts`. A
            torch_xla Mesh takes "allreduce" only (ValueError otherwise).
        dp_attention: data-parallel attention (vLLM's DP attention + expert parallel, SGLang's
            ``--enable-dp-attention``): every rank runs its own requests (its own tokens, T per rank
            may differ, 0 allowed) through full copies of everything but the experts, which are
            split with ``expert_dispatch="alltoall"`` (required) and return each rank its own
            tokens' outputs. The default plan then splits only experts (the rest replicated, with
            the reason); an explicit plan may only ask for "expert". Every rank must run every
            forward step, with no tokens if it has none (vLLM's dummy batches).
        src_data_rank: on a DeviceMesh, as torch's ``parallelize_module`` / ``distribute_tensor``:
            0 (the default, torch's) makes rank 0's full weights the truth, every rank receiving its
            shards from rank 0 (``dist.scatter``, fp8 as uint8), so ranks whose copies differ (e.g.
            random init with different seeds) still compute one device's model; None sends nothing
            (each rank slices its own copy: every rank must hold the same weights). Layers kept
            replicated are left as they are (as torch leaves modules outside the plan). A meta model
            sends nothing either way. Ignored on a torch_xla Mesh (one process holds every shard).

    Returns: a :class:`ShardingReport` (layers sharded how, layers kept replicated and why, bytes per rank).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    config = Fp8Config() if config is None else config
    check_dispatch(expert_dispatch, dp_attention)
    if _is_xla_mesh(mesh) and dp_attention:
        raise ValueError(
            "dp_attention=True: data-parallel attention needs the 'alltoall' dispatch of a torch "
            "DeviceMesh (each rank its own tokens); a torch_xla SPMD Mesh is one program over every "
            "device, whose experts use 'allreduce'"
        )
    if _is_xla_mesh(mesh):
        from . import xla, xla_experts

        tp = xla.mesh_size(mesh)
        engine = "torch_xla SPMD"
    else:
        from torch.distributed.device_mesh import DeviceMesh

        if not isinstance(mesh, DeviceMesh):
            raise TypeError(
                f"mesh: expected a torch DeviceMesh or a torch_xla SPMD Mesh, got {type(mesh).__name__}"
            )
        if mesh.ndim != 1:
            raise ValueError(
                f"mesh: expected a 1-D mesh, got {mesh.ndim}-D {tuple(mesh.shape)}; pass mesh['tp']"
            )
        tp = mesh.size()
        engine = f"torch.distributed {mesh.get_group().name()}"
        check_src_data_rank(src_data_rank, tp)
    if _is_xla_mesh(mesh) and expert_dispatch != "allreduce":
        raise ValueError(
            f"expert_dispatch: {expert_dispatch!r} runs on a torch DeviceMesh only; on a torch_xla Mesh "
            "experts use 'allreduce' (XLA's all-to-all needs split sizes known at compile time)"
        )
    for name, module in model.named_modules():  # refuse before anything moves
        if isinstance(module, (Fp8BlockwiseLinear, Fp8Experts)) and getattr(module, "kind", "") in (
            "colwise", "rowwise", "expert",
        ):  # fmt: skip
            raise ValueError(f"model: {name} is already split ({type(module).__name__}); parallelize once")
    assigned, replicated = _assignment(model, plan, tp, config, dp_attention)
    for name, kind in assigned.items():
        module = model.get_submodule(name)
        key = "gate_up_proj" if kind == "expert" else "weight"
        device = getattr(module, key).device
        if _is_xla_mesh(mesh) and device.type not in ("xla", "meta"):
            raise ValueError(
                f"model: {name}.{key} is on {device}; on a torch_xla Mesh the model must be on torch_xla's "
                "device, or on the meta device (then fill it with torch_fp8_blockwise.distributed.checkpoint.load)"
            )

    layers: dict[str, nn.Module] = {}
    for name, kind in assigned.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, attr)
        if kind == "expert" and not isinstance(layer, Fp8Experts):  # meta fused experts (checked above)
            layer = meta_experts(layer, config)
            setattr(parent, attr, layer)
        elif kind != "expert" and not isinstance(layer, Fp8BlockwiseLinear):  # a meta nn.Linear (checked)
            layer = _meta_fp8(layer, config)
            setattr(parent, attr, layer)
        layers[name] = layer
    # "one device": the fp8 model unsplit (meta float layers counted as the fp8 layers they become)
    report = ShardingReport(engine, tp, replicated=replicated, full_bytes=model_bytes(model))
    for name, kind in assigned.items():
        layer = layers[name]
        if kind == "expert":
            full_e = layer.num_experts
            shape = (2 * layer.intermediate_dim, layer.hidden_dim)
            if _is_xla_mesh(mesh):  # the module holds every expert; each device E / tp of them
                layer = xla_experts.shard_experts_(layer, mesh)
            else:
                layer = shard_experts_(
                    layer,
                    mesh.get_local_rank(),
                    tp,
                    mesh.get_group(),
                    expert_dispatch,
                    src_data_rank,
                    dp_attention,
                )
            report.sharded[name] = ShardedLayer(
                kind, shape, shape, layer.config.block_shape, (full_e, full_e // tp), expert_dispatch,
                dp_attention,
            )  # fmt: skip
            continue
        full = (layer.out_features, layer.in_features)
        if _is_xla_mesh(mesh):
            layer = xla.shard_layer_(layer, kind, mesh)
        else:
            layer = shard_layer_(layer, kind, mesh.get_local_rank(), tp, mesh.get_group(), src_data_rank)
        local = (layer.out_features, layer.in_features)
        if _is_xla_mesh(mesh):  # the module holds the global view; each device its shard
            local = (full[0] // tp, full[1]) if kind == "colwise" else (full[0], full[1] // tp)
        report.sharded[name] = ShardedLayer(kind, full, local, layer.config.block_shape)
    report.rank_bytes = model_bytes(model)
    if _is_xla_mesh(mesh):
        report.rank_bytes = xla.rank_bytes(model)
    return report


__all__ = ["BlockShardingError", "ShardedLayer", "ShardingReport", "model_bytes", "parallelize"]
