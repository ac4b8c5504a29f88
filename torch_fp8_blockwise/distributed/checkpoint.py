"""Per-rank checkpoint I/O for a model split by :func:`~torch_fp8_blockwise.distributed.parallelize`
on a torch ``DeviceMesh``: the same DeepSeek / HF fp8 safetensors format as
:mod:`torch_fp8_blockwise.checkpoint`.

* :func:`load`: each rank reads only its slices of the sharded layers (safetensors ``get_slice``:
  a column-parallel layer's rows are read without touching the rest of the tensor; a row-parallel
  layer's column slice faults in that one tensor), and the full tensors of everything replicated.
  Peak memory per rank ~ its shard plus one tensor. The slices then go through the same checks and
  the same all-or-nothing commit as ``checkpoint.load`` (a bad file raises CheckpointError naming
  the tensor and the file, and leaves the model as it was).
* :func:`save`: gathers each sharded layer (fp8 moved as uint8: gloo rejects float8 tensors) and
  rank 0 writes the format ``checkpoint.save`` writes. Rank 0 holds the full model while writing.
* :func:`dtensor_state_dict`: the state dict with the sharded tensors as DTensors, for
  ``torch.distributed.checkpoint`` (each rank writes and reads its own shards).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint as _ckpt
from ..nn import Fp8BlockwiseLinear, QuantizationSummary
from .layers import Fp8ColwiseLinear, _Fp8ShardedLinear

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
    recreate them.

    Returns: the QuantizationSummary of ``checkpoint.load`` (local shapes for sharded layers).
    Raises: CheckpointError (a ValueError) naming the tensor and the file; the model is unchanged.
    """
    if activation is not None:
        _ckpt.Fp8Config(activation=activation)  # validates the name
    root, files = _ckpt._files(path)
    fmt = _ckpt._read_config(root, activation)
    cfg_path = os.path.join(root, _ckpt.CONFIG_FILE)
    sharded = {name: m for name, m in model.named_modules() if isinstance(m, _Fp8ShardedLinear)}
    if sharded and fmt.explicit:
        raise _ckpt.CheckpointError(
            f"{cfg_path}: a compressed-tensors checkpoint; loading it into a parallelized model is not "
            "supported yet (load it into one process, or save it in the 'fp8' format)"
        )
    slices = {
        f"{name}.{suffix}": (layer, sl)
        for name, layer in sharded.items()
        for suffix, sl in _local_slices(layer).items()
    }
    for name, layer in sharded.items():
        if layer.config.block_shape != fmt.block:
            raise _ckpt.CheckpointError(
                f"{name}{_ckpt.SCALE_SUFFIX}: the model's layer was sharded at {layer.config.block_shape} "
                f"blocks, the checkpoint has weight_block_size {list(fmt.block)} ({cfg_path}); parallelize "
                "with config=Fp8Config(block_shape=...) matching the file"
            )

    def read(f, key: str, file: str) -> torch.Tensor:
        """This rank's slice of a sharded layer's tensor (get_slice reads only those rows); every
        other tensor whole."""
        if key not in slices:
            return f.get_tensor(key)
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
        return (part[rows, cols] if len(shape) == 2 else part[rows]).contiguous()

    # The same hardened reader as checkpoint.load (files inside the directory, headers parsed and
    # checked, every error naming the file), with this rank's slices.
    tensors = _ckpt._read_tensors(files, read)
    plan = _ckpt._plan(model, tensors, fmt, None, strict, activation)
    _ckpt._commit(model, plan)
    return plan.summary


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


def save(model: nn.Module, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> list[str]:
    """Write a parallelized ``model`` as ``checkpoint.save`` writes the unsharded one (every rank
    calls it; rank 0 writes). Returns the file names written (on every rank)."""
    sharded = [(name, m) for name, m in model.named_modules() if isinstance(m, _Fp8ShardedLinear)]
    groups = {m.group for _, m in sharded}
    group = next(iter(groups)) if groups else None
    full = {name: unshard_layer(m) for name, m in sharded}
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
    as a DTensor over ``mesh`` (Shard(0) column-parallel, Shard(1) row-parallel) sharing this rank's
    memory, for ``torch.distributed.checkpoint`` (``dcp.save`` / ``dcp.load``): loading into it
    writes the sharded layers' tensors in place. Plain tensors for everything replicated."""
    from torch.distributed.tensor import DTensor, Shard

    state = model.state_dict()
    for name, layer in model.named_modules():
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
