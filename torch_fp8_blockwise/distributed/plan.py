"""Plans: module-name patterns -> how each layer is split, and :func:`check_plan`, the pure shape check.

A plan is a dict ``{pattern: kind}``: ``pattern`` is an ``fnmatch`` pattern over qualified module
names (``"*.q_proj"``, ``"model.layers.*.mlp.down_proj"``; ``*`` also matches dots, and ``"*.q_proj"`` also matches a
top-level ``q_proj``); ``kind`` is
``"colwise"``, ``"rowwise"``, ``"expert"`` or None (replicated). The first matching pattern wins.
``"colwise"`` / ``"rowwise"`` apply to linear layers (Fp8BlockwiseLinear, or nn.Linear on the meta
device, which :func:`parallelize` turns into a meta Fp8BlockwiseLinear); ``"expert"`` to a fused
experts module (a ``num_experts`` attribute or 3-D [E, ., .] weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from ..experts import Fp8Experts, experts_skip_reason, is_fused_experts
from ..nn import DEFAULT_BLOCK, Fp8BlockwiseLinear, Fp8Config
from .alignment import KINDS, BlockShardingError, shard_problem, working_tp_sizes

#: The default plan for the transformers decoder families we test (Llama, Qwen2/3, Mistral, SmolLM2,
#: DeepSeek's MLP / experts): q/k/v/gate/up column-parallel, o/down row-parallel, experts expert-parallel.
DEFAULT_PLAN: dict[str, str | None] = {
    "*.q_proj": "colwise",
    "*.k_proj": "colwise",
    "*.v_proj": "colwise",
    "*.o_proj": "rowwise",
    "*.gate_proj": "colwise",
    "*.up_proj": "colwise",
    "*.down_proj": "rowwise",
    "*.experts": "expert",
}


@dataclass(frozen=True)
class PlannedLayer:
    """One module a plan splits: ``shape`` (N, K) (for "expert": one expert's), ``block`` (bn, bk),
    ``num_experts`` for "expert"."""

    kind: str
    shape: tuple[int, int]
    block: tuple[int, int]
    num_experts: int | None = None


def _validate_plan(plan: object) -> dict[str, str | None]:
    if not isinstance(plan, dict):
        raise TypeError(f"plan: expected a dict {{pattern: kind}}, got {type(plan).__name__}")
    for pattern, kind in plan.items():
        if not isinstance(pattern, str):
            raise TypeError(f"plan: keys must be module-name patterns (str), got {pattern!r}")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"plan[{pattern!r}]: expected one of {KINDS} or None, got {kind!r}")
    return plan  # type: ignore[return-value]


def _kind_for(name: str, plan: dict[str, str | None]) -> tuple[bool, str | None]:
    for pattern, kind in plan.items():
        if fnmatchcase(name, pattern) or fnmatchcase("." + name, pattern):
            return True, kind
    return False, None


def _expert_count(module: nn.Module) -> tuple[int, tuple[int, int]] | None:
    """(num_experts, one expert's (N, K)) of a fused experts module, else None."""
    for p in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if p.dim() == 3:
            return int(getattr(module, "num_experts", p.shape[0])), (int(p.shape[1]), int(p.shape[2]))
    return None


def planned_layers(
    model: nn.Module, plan: dict[str, str | None], block_shape: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[dict[str, PlannedLayer], dict[str, str]]:
    """(name -> PlannedLayer for every module the plan splits, name -> problem for matches the plan
    cannot apply to). Containers (ModuleList / ModuleDict) are never matched; nn.Linear layers use
    ``block_shape`` (they have none yet)."""
    plan = _validate_plan(plan)
    layers: dict[str, PlannedLayer] = {}
    problems: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        matched, kind = _kind_for(name, plan)
        if not matched or kind is None:
            continue
        if kind == "expert":
            found = _expert_count(module)
            if found is None:
                problems[name] = f"{type(module).__name__} has no 3-D [E, ., .] expert weights for 'expert'"
                continue
            layers[name] = PlannedLayer(kind, found[1], block_shape, num_experts=found[0])
        elif isinstance(module, Fp8BlockwiseLinear):
            layers[name] = PlannedLayer(
                kind, (module.out_features, module.in_features), module.config.block_shape
            )
        elif isinstance(module, nn.Linear):
            layers[name] = PlannedLayer(kind, (module.out_features, module.in_features), block_shape)
        else:
            problems[name] = f"{type(module).__name__} is not a linear layer; {kind!r} splits linear layers"
    return layers, problems


def layer_problem(name: str, layer: PlannedLayer, tp_size: int) -> str | None:
    """One line naming the layer, its shape and blocks, why it cannot be split and the tp sizes
    that would work; None when it can be split."""
    why = shard_problem(layer.kind, layer.shape, layer.block, tp_size, num_experts=layer.num_experts)
    if why is None:
        return None
    n, k = layer.shape
    bn, bk = layer.block
    ok = [
        t
        for t in working_tp_sizes(layer.kind, layer.shape, layer.block, num_experts=layer.num_experts)
        if t > 1
    ]
    sizes = f"tp sizes that work for {layer.kind}: {ok}" if ok else f"no tp size > 1 works for {layer.kind}"
    experts = f"{layer.num_experts} experts of " if layer.num_experts is not None else ""
    return (
        f"{name} {experts}[{n}, {k}] in {bn}x{bk} blocks: {why}; {sizes}; "
        "or keep it replicated (plan value None), or keep it in high precision"
    )


def check_plan(
    model: nn.Module,
    plan: dict[str, str | None] | None,
    tp_size: int,
    *,
    block_shape: tuple[int, int] = DEFAULT_BLOCK,
) -> dict[str, str]:
    """Check that every layer ``plan`` splits can be split over ``tp_size`` ranks, before anything moves.

    A pure shape check: no process group, no tensor is read (works on meta models). All or
    nothing: every problem is collected and raised together.

    Args:
        plan: ``{pattern: kind}`` (see the module docstring); None: :data:`DEFAULT_PLAN`.
        tp_size: ranks of the tensor-parallel dimension.
        block_shape: (bn, bk) assumed for nn.Linear layers not converted yet (Fp8BlockwiseLinear
            layers use their own).

    Returns: qualified module name -> kind, for every module the plan splits.

    Raises: :class:`BlockShardingError` (a ValueError) naming each layer, its shape and blocks, why
    (e.g. "ColwiseParallel over 8 ranks gives each rank 176 of 1408 output rows, not a whole number
    of 128-row blocks") and the tp sizes that would work.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tp_size: expected a positive int, got {tp_size!r}")
    layers, problems = planned_layers(model, DEFAULT_PLAN if plan is None else plan, block_shape)
    lines = [f"{name}: {why}" for name, why in problems.items()]
    for name, layer in layers.items():
        why = layer_problem(name, layer, tp_size)
        if why is not None:
            lines.append(why)
    if lines:
        head = f"check_plan: {len(lines)} layer(s) cannot be split over {tp_size} ranks as planned:"
        raise BlockShardingError("\n  ".join([head, *lines]))
    return {name: layer.kind for name, layer in layers.items()}


def default_assignment(
    model: nn.Module, tp_size: int, block_shape: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[dict[str, str], dict[str, str]]:
    """The default plan, made safe: (name -> kind to apply, name -> why kept replicated).

    Layers are split in groups, the children of one parent (an attention or MLP block): a group is
    split only if it has column-parallel layers feeding row-parallel ones, every member satisfies
    the alignment rule, and (for attention, a parent with ``head_dim``) every rank gets whole heads.
    Otherwise the whole group stays replicated with the reason (splitting q_proj but not o_proj
    would feed o_proj a partial input). An experts module is split by whole experts when
    ``num_experts % tp_size == 0`` and it is (or, on the meta device, can become) an Fp8Experts;
    otherwise it stays replicated with the reason (:func:`expert_problem`).
    """
    layers, problems = planned_layers(model, DEFAULT_PLAN, block_shape)
    replicated = dict(problems)
    groups: dict[str, dict[str, PlannedLayer]] = {}
    assigned: dict[str, str] = {}
    for name, layer in layers.items():
        if layer.kind == "expert":
            why = expert_problem(name, model.get_submodule(name), layer, tp_size, block_shape)
            if why is None:
                assigned[name] = "expert"
            else:
                replicated[name] = f"experts kept replicated because {why}"
            continue
        groups.setdefault(name.rpartition(".")[0], {})[name] = layer
    for parent, members in groups.items():
        reason = _group_problem(model.get_submodule(parent) if parent else model, members, tp_size)
        if reason is None:
            assigned.update({name: layer.kind for name, layer in members.items()})
        else:
            replicated.update(dict.fromkeys(members, reason))
    return assigned, replicated


def expert_problem(
    name: str, module: nn.Module, layer: PlannedLayer, tp_size: int, block_shape: tuple[int, int]
) -> str | None:
    """Why ``module`` cannot be made expert-parallel over ``tp_size`` ranks, or None: the alignment
    rule (``num_experts % tp_size``), then the module: an Fp8Experts, or a fused experts module on
    the meta device that can become one (a checkpoint fills it). A float module with values is
    refused (convert it first with quantize_model_)."""
    why = layer_problem(name, layer, tp_size)
    if why is not None:
        return why
    if isinstance(module, Fp8Experts):
        return None
    if not is_fused_experts(module):
        return (
            f"{name} ({type(module).__name__}) is not a fused experts module (3-D gate_up_proj / down_proj)"
        )
    if module.gate_up_proj.device.type != "meta":
        return (
            f"{name} is a high-precision {type(module).__name__} (not converted to fp8); convert it with "
            "quantize_model_ first"
        )
    reason = experts_skip_reason(module, Fp8Config(tuple(block_shape)), allow_meta=True)
    return None if reason is None else f"{name} cannot become an Fp8Experts: {reason}"


def _group_problem(parent: nn.Module, members: dict[str, PlannedLayer], tp_size: int) -> str | None:
    kinds = {layer.kind for layer in members.values()}
    if kinds != {"colwise", "rowwise"}:
        (only,) = kinds
        return f"the block has only {only} layers in the default plan (no colwise -> rowwise pair), kept replicated"
    for name, layer in members.items():
        module = parent.get_submodule(name.rpartition(".")[2])
        if isinstance(module, nn.Linear) and module.weight.device.type != "meta":
            return f"{name} is a high-precision nn.Linear (not converted to fp8), so its block is kept replicated"
        why = layer_problem(name, layer, tp_size)
        if why is not None:
            return f"the block is kept replicated because {why}"
    head_dim = getattr(parent, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        for name, layer in members.items():
            if layer.kind == "colwise" and (layer.shape[0] // tp_size) % head_dim:
                return (
                    f"the block is kept replicated because {name} over {tp_size} ranks gives each rank "
                    f"{layer.shape[0] // tp_size} output rows, not whole heads of {head_dim}"
                )
    return None
