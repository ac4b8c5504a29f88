"""Per-rank checkpoint I/O for a model split by :func:`~torch_fp8_blockwise.distributed.parallelize`
on a torch ``DeviceMesh``: the same DeepSeek / HF fp8 safetensors format as
:mod:`torch_fp8_blockwise.checkpoint`.

* :func:`load`: each rank reads only its slices of the sharded layers (safetensors ``get_slice``:
  a column-parallel layer's rows are read without touching the rest of the tensor; a row-parallel
  layer's column slice faults in that one tensor), only its own experts of an expert-parallel
  layer (per-expert keys of other ranks' experts are never read; fused ``gate_up_proj`` keys by
  their expert rows), and the full tensors of everything replicated.
  Peak memory per rank ~ its shard plus one tensor. The slices then go through the same checks and
  the same all-or-nothing commit as ``checkpoint.load`` (a bad file raises CheckpointError naming
  the tensor and the file, and leaves the model as it was).
* :func:`save`: gathers each sharded layer and expert-parallel experts module (fp8 moved as
  uint8: gloo rejects float8 tensors) and rank 0 writes the format ``checkpoint.save`` writes. Rank 0 holds the full model while writing.
* :func:`dtensor_state_dict`: the state dict with the sharded tensors as DTensors, for
  ``torch.distributed.checkpoint`` (each rank writes and reads its own shards).
"""

from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint as _ckpt
from .. import experts as _experts
from ..nn import Fp8BlockwiseLinear, QuantizationSummary
from .experts import Fp8ShardedExperts, like_shard
from .layers import Fp8ColwiseLinear, _Fp8ShardedLinear

_PER_EXPERT = re.compile(r"(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)")

_SAFETENSORS_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _local_slices(layer: _Fp8ShardedLinear) -> dict[str, tuple[slice, slice]]:
    """suffix -> (row slice, column slice) of the full tensor this rank holds."""
    bn, bk = layer.config.block_shape
    n, k = layer.out_features, layer.in_features
    if isinstance(layer, Fp8ColwiseLinear):
        r0 = layer.tp_rank * n
        rows = slice(r0, r0 + n)
        return {
            "weight": (rows, slice(None)),
            "weight_scale_inv": (slice(r0 // bn, (r0 + n) // bn), slice(None)),
            "bias": (rows, slice(None)),
        }
    c0 = layer.tp_rank * k
    return {
        "weight": (slice(None), slice(c0, c0 + k)),
        "weight_scale_inv": (slice(None), slice(c0 // bk, (c0 + k) // bk)),
    }


def load(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, activation: str | None = None
) -> QuantizationSummary:
    """Load a DeepSeek / HF fp8 checkpoint into a parallelized ``model`` (each rank calls it).

    ``model``: after :func:`parallelize` on a DeviceMesh, typically built on the meta device. Its
    :class:`~.layers.Fp8ColwiseLinear` / :class:`~.layers.Fp8RowwiseLinear` layers receive this
    rank's slices (the file's full shapes are checked against the layer's full shape); every other
    tensor is loaded as ``checkpoint.load`` loads it (nn.Linear layers with scales in the file
    become Fp8BlockwiseLinear). The file's block shape must be the sharded layers' block shape.
    Non-persistent buffers (e.g. rotary ``inv_freq``) are not in checkpoints: a meta model must
    recreate them. An expert-parallel experts module (:class:`~.experts.Fp8ShardedExperts`, experts
    ``[e0, e1)`` here) reads only the per-expert keys ``<name>.<e>.{gate,up,down}_proj.weight`` /
    ``.weight_scale_inv`` with e0 <= e < e1 (other ranks' keys are never opened), or the rows
    ``[e0, e1)`` of fused fp8 keys (``<name>.gate_up_proj``, ...), and stays expert-parallel.

    A model parallelized over a torch_xla SPMD ``Mesh`` is loaded by
    :func:`~torch_fp8_blockwise.distributed.xla_checkpoint.load` (each tensor placed on the devices,
    sharded, as it is read).

    Returns: the QuantizationSummary of ``checkpoint.load`` (local shapes for sharded layers).
    Raises: CheckpointError (a ValueError) naming the tensor and the file; the model is unchanged.
    """
    from . import xla_checkpoint

    if xla_checkpoint.xla_modules(model):  # parallelized over a torch_xla SPMD mesh
        return xla_checkpoint.load(model, path, strict=strict, activation=activation)
    if activation is not None:
        _ckpt.Fp8Config(activation=activation)  # validates the name
    root, files = _ckpt._files(path)
    fmt = _ckpt._read_config(root, activation)
    cfg_path = os.path.join(root, _ckpt.CONFIG_FILE)
    sharded = {name: m for name, m in model.named_modules() if isinstance(m, _Fp8ShardedLinear)}
    experts = {name: m for name, m in model.named_modules() if isinstance(m, Fp8ShardedExperts)}
    if (sharded or experts) and fmt.explicit:
        raise _ckpt.CheckpointError(
            f"{cfg_path}: a compressed-tensors checkpoint; loading it into a parallelized model is not "
            "supported yet (load it into one process, or save it in the 'fp8' format)"
        )
    slices = {
        f"{name}.{suffix}": (layer, sl)
        for name, layer in sharded.items()
        for suffix, sl in _local_slices(layer).items()
    }
    for name, layer in [*sharded.items(), *experts.items()]:
        if layer.config.block_shape != fmt.block:
            raise _ckpt.CheckpointError(
                f"{name}{_ckpt.SCALE_SUFFIX}: the model's layer was sharded at {layer.config.block_shape} "
                f"blocks, the checkpoint has weight_block_size {list(fmt.block)} ({cfg_path}); parallelize "
                "with config=Fp8Config(block_shape=...) matching the file"
            )

    def read(f, key: str, file: str) -> tuple[str, torch.Tensor] | None:
        """(key, tensor) as this rank holds it: a sharded layer's slice (get_slice reads only
        those rows), a local expert under its local number, None for another rank's expert (never
        read), every other tensor whole."""
        owner = _expert_owner(key, experts)
        if owner is not None:
            return _read_local_expert(f, key, owner, experts[owner], file)
        if key not in slices:
            return key, f.get_tensor(key)
        layer, (rows, cols) = slices[key]
        part = f.get_slice(key)
        shape = tuple(part.get_shape())
        full = _full_shape(key, layer)
        if shape != full:
            raise _ckpt.CheckpointError(
                f"{key} in {file}: expected shape {full} for the model's layer "
                f"([{layer.full_out_features}, {layer.full_in_features}] in "
                f"{fmt.block[0]}x{fmt.block[1]} blocks), got {shape}"
            )
        return key, (part[rows, cols] if len(shape) == 2 else part[rows]).contiguous()

    # The same hardened reader as checkpoint.load (files inside the directory, headers parsed and
    # checked, every error naming the file), with this rank's slices and experts.
    tensors = _ckpt._read_tensors(files, read)
    for name, layer in experts.items():
        _check_local_experts(name, layer, tensors, files)
    plan = _ckpt._plan(model, tensors, fmt, None, strict, activation)
    for name, layer in plan.new_layers.items():
        if name in experts:
            plan.new_layers[name] = like_shard(layer, experts[name])
    _ckpt._commit(model, plan)
    return plan.summary


def _expert_owner(key: str, experts: dict[str, Fp8ShardedExperts]) -> str | None:
    """The expert-parallel module a checkpoint key belongs to (per-expert or fused key), or None."""
    for name in experts:
        if key.startswith(name + "."):
            rest = key[len(name) + 1 :]
            if _PER_EXPERT.fullmatch(rest) or rest in _experts.FUSED_KEYS:
                return name
    return None


def _read_local_expert(f, key: str, name: str, layer: Fp8ShardedExperts, file: str):
    """(key under this rank's local expert numbering, tensor) for a key of ``name``, or None for
    another rank's expert (not read). Fused keys: rows [e0, e1) by get_slice."""
    rest = key[len(name) + 1 :]
    e0, e1 = layer.expert_offset, layer.expert_offset + layer.num_experts
    match = _PER_EXPERT.fullmatch(rest)
    if match is not None:
        e = int(match.group(1))
        if e >= layer.full_num_experts:  # not an expert of the model: kept, so strict load names it
            return key, f.get_tensor(key)
        if not e0 <= e < e1:
            return None
        return f"{name}.{e - e0}.{match.group(2)}.{match.group(3)}", f.get_tensor(key)
    part = f.get_slice(key)
    shape = tuple(part.get_shape())
    if len(shape) != 3 or shape[0] != layer.full_num_experts:
        raise _ckpt.CheckpointError(
            f"{key} in {file}: expected a 3-D tensor with {layer.full_num_experts} experts first, got {shape}"
        )
    return key, part[e0:e1].contiguous()


def _check_local_experts(name: str, layer: Fp8ShardedExperts, tensors: dict, files: list) -> None:
    """Every local expert's per-expert keys are present (named by their GLOBAL expert id)."""
    if f"{name}.gate_up_proj" in tensors:
        return
    for e in range(layer.num_experts):
        for proj in _experts.PROJECTIONS:
            for key in _experts.per_expert_keys(name, e, proj):
                if key not in tensors:
                    g = layer.expert_offset + e
                    missing = key.replace(f"{name}.{e}.", f"{name}.{g}.", 1)
                    raise _ckpt.CheckpointError(
                        f"{missing}: missing from the checkpoint ({name} holds experts "
                        f"[{layer.expert_offset}, {layer.expert_offset + layer.num_experts}) of "
                        f"{layer.full_num_experts} on this rank; files: {sorted(map(str, files))})"
                    )


def _full_shape(key: str, layer: _Fp8ShardedLinear) -> tuple[int, ...]:
    n, k = layer.full_out_features, layer.full_in_features
    bn, bk = layer.config.block_shape
    if key.endswith(_ckpt.SCALE_SUFFIX):
        return (-(-n // bn), -(-k // bk))
    if key.endswith(".bias"):
        return (n,)
    return (n, k)


def _gather(t: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim``; fp8 travels as uint8 (gloo rejects float8)."""
    wire = t.contiguous().view(torch.uint8) if t.dtype in _SAFETENSORS_DTYPES.values() else t.contiguous()
    parts = [torch.empty_like(wire) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, wire, group=group)
    out = torch.cat(parts, dim=dim)
    return out.view(t.dtype) if wire.dtype != t.dtype else out


def unshard_layer(layer: _Fp8ShardedLinear) -> Fp8BlockwiseLinear:
    """A full Fp8BlockwiseLinear gathered from every rank's shard (a collective: every rank calls it)."""
    dim = 0 if isinstance(layer, Fp8ColwiseLinear) else 1
    weight = _gather(layer.weight, dim, layer.group)
    scale = _gather(layer.weight_scale_inv, dim, layer.group)
    bias = layer.bias
    if bias is not None and dim == 0:
        bias = _gather(bias.detach(), 0, layer.group)
    return Fp8BlockwiseLinear.from_quantized(weight, scale, bias, layer.config)


def unshard_experts(layer: Fp8ShardedExperts) -> _experts.Fp8Experts:
    """A full Fp8Experts gathered from every rank's experts (a collective: every rank calls it)."""
    tensors = [_gather(getattr(layer, k), 0, layer.group) for k in _experts.FUSED_KEYS]
    return _experts.Fp8Experts.from_quantized(*tensors, layer.config, layer.act_fn)


def save(model: nn.Module, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> list[str]:
    """Write a parallelized ``model`` as ``checkpoint.save`` writes the unsharded one (every rank
    calls it; rank 0 writes). Returns the file names written (on every rank)."""
    sharded = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (_Fp8ShardedLinear, Fp8ShardedExperts))
    ]
    groups = {m.group for _, m in sharded}
    group = next(iter(groups)) if groups else None
    full = {
        name: unshard_experts(m) if isinstance(m, Fp8ShardedExperts) else unshard_layer(m)
        for name, m in sharded
    }
    written: list[str] = []
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    if rank == 0:
        originals = {}
        try:
            for name, layer in full.items():
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                originals[name] = (parent, attr, getattr(parent, attr))
                setattr(parent, attr, layer)
            written = _ckpt.save(model, path, max_shard_bytes=max_shard_bytes)
        finally:
            for parent, attr, layer in originals.values():
                setattr(parent, attr, layer)
    box = [written]
    if dist.is_initialized():
        dist.broadcast_object_list(
            box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group
        )
    return box[0]


def dtensor_state_dict(model: nn.Module, mesh: object) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each sharded layer's weight / scale (and a column-parallel bias)
    as a DTensor over ``mesh`` (Shard(0) column-parallel and expert-parallel, Shard(1) row-parallel)
    sharing this rank's
    memory, for ``torch.distributed.checkpoint`` (``dcp.save`` / ``dcp.load``): loading into it
    writes the sharded layers' tensors in place. Plain tensors for everything replicated."""
    from torch.distributed.tensor import DTensor, Shard

    state = model.state_dict()
    for name, layer in model.named_modules():
        if isinstance(layer, Fp8ShardedExperts):  # experts: Shard(0) over the expert dimension
            for key in _experts.FUSED_KEYS:
                local = getattr(layer, key).detach()
                full = (layer.full_num_experts, *local.shape[1:])
                state[f"{name}.{key}"] = DTensor.from_local(
                    local, mesh, [Shard(0)], run_check=False, shape=full,
                    stride=tuple(torch.empty(full, device="meta").stride()),
                )  # fmt: skip
            continue
        if not isinstance(layer, _Fp8ShardedLinear):
            continue
        dim = 0 if isinstance(layer, Fp8ColwiseLinear) else 1
        keys = ["weight", "weight_scale_inv"] + (["bias"] if dim == 0 and layer.bias is not None else [])
        for suffix in keys:
            local = getattr(layer, suffix).detach()
            full = (layer.full_out_features,) if suffix == "bias" else None
            if full is None:
                n, k = layer.full_out_features, layer.full_in_features
                if suffix == "weight_scale_inv":
                    bn, bk = layer.config.block_shape
                    n, k = -(-n // bn), -(-k // bk)
                full = (n, k)
            stride = tuple(torch.empty(full, device="meta").stride())
            state[f"{name}.{suffix}"] = DTensor.from_local(
                local,
                mesh,
                [Shard(0 if suffix == "bias" else dim)],
                run_check=False,
                shape=full,
                stride=stride,
            )
    return state
