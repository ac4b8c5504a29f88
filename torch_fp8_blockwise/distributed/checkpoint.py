"""Per-rank checkpoint I/O for a model split by :func:`~torch_fp8_blockwise.distributed.parallelize`
on a torch ``DeviceMesh``: the same DeepSeek / HF fp8 safetensors format as
:mod:`torch_fp8_blockwise.checkpoint`, with its names (Mixtral's original expert names included:
the rule stays in checkpoint.py / experts.py).

* :func:`load`: each rank reads only its slices of the sharded layers (safetensors ``get_slice``:
  a column-parallel layer's rows are read without touching the rest of the tensor; a row-parallel
  layer's column slice faults in that one tensor), only its own experts of an expert-parallel
  layer (per-expert keys of other ranks' experts are never read; fused ``gate_up_proj`` keys by
  their expert rows), and the full tensors of everything replicated.
  Peak memory per rank ~ its shard plus one tensor: row slices and replicated tensors stay views
  of the mapped file (their pages count once, when first read); a column slice is copied out
  through a mapping of its own that ends with the copy (else the whole tensor's pages would stay
  mapped for the model's lifetime); a local expert's per-expert fp8 weight is read from the file
  straight into its slot of the fused local buffers (no mapping; stacking per-expert tensors
  afterwards held the local experts twice). Measured (tests/load_mem_worker.py, 2 gloo ranks, 48
  MiB of dense fp8 in 8 MiB tensors + 48 MiB of per-expert keys, peak RSS growth): 58.8 / 51.1
  MiB per rank for a 48.0 MiB shard (before: 91.0 / 83.5); loading the unsplit model in one
  process with ``checkpoint.load``: 160.4 MiB for 96.0 MiB (its experts stacked from mapped
  per-expert keys). Beyond the shard: page-cache readahead the kernel maps past a row slice's end
  (~2 MiB per slice here). The slices then go through the same checks and
  the same all-or-nothing commit as ``checkpoint.load`` (a bad file raises CheckpointError naming
  the tensor and the file, and leaves the model as it was).
* :func:`save`: gathers each sharded layer and expert-parallel experts module (fp8 moved as
  uint8: gloo rejects float8 tensors) and rank 0 writes the format ``checkpoint.save`` writes. Rank 0 holds the full model while writing.
* :func:`dtensor_state_dict`: the state dict with the sharded tensors as DTensors, for
  ``torch.distributed.checkpoint`` (each rank writes and reads its own shards).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint as _ckpt
from .. import experts as _experts
from ..nn import Fp8BlockwiseLinear, QuantizationSummary
from .experts import Fp8ShardedExperts, like_shard
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
    recreate them. An expert-parallel experts module (:class:`~.experts.Fp8ShardedExperts`, experts
    ``[e0, e1)`` here) reads only the per-expert keys ``<name>.<e>.{gate,up,down}_proj.weight`` /
    ``.weight_scale_inv`` with e0 <= e < e1 (other ranks' keys are never opened), or the rows
    ``[e0, e1)`` of fused fp8 keys (``<name>.gate_up_proj``, ...), and stays expert-parallel.
    Mixtral's original names are read as ``checkpoint.load`` reads them, decided the same way on the
    files' keys: ``<layer>.block_sparse_moe.experts.<e>.w1`` (gate) / ``w3`` (up) / ``w2`` (down)
    for ``<layer>.mlp.experts`` (only the local experts' keys, as above), and the rest of that MoE
    block (the router; a sharded Linear's slices too) under ``block_sparse_moe.``.

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
    # Which experts modules the file stores under Mixtral's names: checkpoint.load's rule on every key
    # of the files (the tensors read below lack the per-expert keys, local ones read into fused
    # buffers, other ranks' never read), and the MoE blocks stored under block_sparse_moe. with them.
    file_keys, mixtral, aliases = None, set(), {}
    if sharded or experts:
        file_keys = {key for file in files for key in _ckpt._header_keys(file)}
        fused = [name for name, m in model.named_modules() if _experts.is_fused_experts(m)]
        mixtral = _ckpt._mixtral_experts(fused, file_keys)
        aliases = _ckpt._mixtral_aliases(mixtral)
    expert_keys = _ExpertKeys(experts, mixtral)
    for name, layer in [*sharded.items(), *experts.items()]:
        if layer.config.block_shape != fmt.block:
            raise _ckpt.CheckpointError(
                f"{name}{_ckpt.SCALE_SUFFIX}: the model's layer was sharded at {layer.config.block_shape} "
                f"blocks, the checkpoint has weight_block_size {list(fmt.block)} ({cfg_path}); parallelize "
                "with config=Fp8Config(block_shape=...) matching the file"
            )
    slices = {  # the file's key (Mixtral: block_sparse_moe.) -> (layer, this rank's (rows, columns))
        _ckpt._stored_key(f"{name}.{suffix}", aliases): (layer, sl)
        for name, layer in sharded.items()
        for suffix, sl in _local_slices(layer).items()
    }

    buffers: dict[str, _LocalExperts] = {}  # per-expert keys go straight into the fused buffers

    def read(f, key: str, file: str) -> tuple[str, torch.Tensor] | None:
        """(key, tensor) as this rank holds it: a sharded layer's slice (get_slice reads only
        those rows), None for a per-expert key (another rank's: never read; a local one: read
        into this rank's fused experts buffers), every other tensor whole."""
        owner = expert_keys.owner(key)
        if owner is not None:
            name, parsed = owner
            if name not in buffers:
                buffers[name] = _LocalExperts(name, experts[name], fmt, name in expert_keys.mixtral)
            return _read_local_expert(f, key, parsed, experts[name], file, buffers[name])
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
        if len(shape) == 1:
            return key, part[rows]
        if cols == slice(None):  # rows of a row-major tensor: a view of the mapped file, read lazily
            return key, part[rows, cols]
        return key, _column_slice(file, key, rows, cols)

    # The same hardened reader as checkpoint.load (files inside the directory, headers parsed and
    # checked, every error naming the file), with this rank's slices and experts.
    try:
        tensors = _ckpt._read_tensors(files, read)
    finally:
        for buf in buffers.values():
            buf.close()
    for name, layer in experts.items():
        if name in buffers and buffers[name].filled:
            buffers[name].publish(tensors, files)
        else:
            _check_local_experts(name, layer, tensors, files, name in expert_keys.mixtral)
    plan = _ckpt._plan(model, tensors, fmt, None, strict, activation, file_keys)
    for name, layer in plan.new_layers.items():
        if name in experts:
            plan.new_layers[name] = like_shard(layer, experts[name])
    _ckpt._commit(model, plan)
    return plan.summary


def _column_slice(file: str, key: str, rows: slice, cols: slice) -> torch.Tensor:
    """A contiguous copy of ``key[rows, cols]`` read through a mapping of ``file`` of its own.

    A column slice of a row-major tensor touches every row, so the whole tensor's file pages get
    mapped into this process (counted in its RSS). Through the load's one mapping of the file,
    which the other tensors' views keep alive, they would stay mapped until the model is freed:
    every row-parallel weight whole, on top of the shard. This mapping ends with the copy, so the
    transient cost is one tensor.
    """
    from safetensors import safe_open

    with safe_open(file, framework="pt", device="cpu") as f:
        return f.get_slice(key)[rows, cols].contiguous()


class _ExpertKeys:
    """Which expert-parallel module a checkpoint key belongs to, by one dict lookup per key (not
    every key tested against every module: DeepSeek-V3 has 58 of them): a per-expert key by its stem
    (:func:`~torch_fp8_blockwise.experts.per_expert_stem`, Mixtral's names for the modules in
    ``mixtral``) and :func:`~torch_fp8_blockwise.experts.parse_per_expert_key`, a fused key
    (``<name>.gate_up_proj`` ...) by the module's name."""

    def __init__(self, experts: dict[str, Fp8ShardedExperts], mixtral: set[str]) -> None:
        self.mixtral = mixtral
        self.names = set(experts)
        self.stems = {_experts.per_expert_stem(name, mixtral=name in mixtral): name for name in experts}

    def owner(self, key: str) -> tuple[str, tuple[int, str, str] | None] | None:
        """(module name, (expert, projection, suffix) of a per-expert key or None for a fused key), or
        None when ``key`` is neither of an expert-parallel module."""
        parts = key.rsplit(".", 3)
        if len(parts) == 4 and parts[0] in self.stems:
            name = self.stems[parts[0]]
            rest = key[len(parts[0]) + 1 :]
            parsed = _experts.parse_per_expert_key(rest, mixtral=name in self.mixtral)
            if parsed is not None:
                return name, parsed
        name, _, last = key.rpartition(".")
        if name in self.names and last in _experts.FUSED_KEYS:
            return name, None
        return None


class _LocalExperts:
    """This rank's fused experts tensors (the :class:`~torch_fp8_blockwise.experts.Fp8Experts`
    layouts, CPU) filled key by key from per-expert keys: each fp8 weight is read from the file
    straight into its slot (no mapping, no second copy: stacking per-expert tensors afterwards
    held every local expert twice), each scale checked and copied in. Then :meth:`publish` hands
    them to the loader as the fused keys ``<name>.gate_up_proj`` ..., whose path checks them again.
    """

    def __init__(self, name: str, layer: Fp8ShardedExperts, fmt, mixtral: bool) -> None:
        self.name, self.layer, self.fmt, self.mixtral = name, layer, fmt, mixtral
        self._tensors: dict[str, torch.Tensor] = {}  # allocated by the first per-expert key read
        self.filled: dict[tuple[int, str, str], str] = {}  # (local e, proj, suffix) -> file
        self._files: dict[str, tuple[object, int, dict]] = {}  # file -> (raw handle, data offset, header)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if not self._tensors:
            e, h, i = self.layer.num_experts, self.layer.hidden_dim, self.layer.intermediate_dim
            (bn, bk), dtype = self.fmt.block, self.fmt.dtype
            self._tensors = {
                "gate_up_proj": torch.empty(e, 2 * i, h, dtype=dtype),
                "gate_up_proj_scale_inv": torch.empty(e, 2 * i // bn, -(-h // bk)),
                "down_proj": torch.empty(e, h, i, dtype=dtype),
                "down_proj_scale_inv": torch.empty(e, -(-h // bn), -(-i // bk)),
            }
        return self._tensors

    def slot(self, e: int, proj: str, suffix: str) -> torch.Tensor:
        """Local expert ``e``'s ``proj`` weight / scales inside the fused tensors (a contiguous view:
        gate rows first, then up rows, as Fp8Experts fuses them)."""
        scale = suffix == "weight_scale_inv"
        if proj == "down_proj":
            return self.tensors["down_proj_scale_inv" if scale else "down_proj"][e]
        fused = self.tensors["gate_up_proj_scale_inv" if scale else "gate_up_proj"][e]
        half = fused.shape[0] // 2
        return fused[:half] if proj == "gate_proj" else fused[half:]

    def read(self, f, key: str, file: str, e: int, proj: str, suffix: str) -> None:
        dst = self.slot(e, proj, suffix)
        if suffix == "weight_scale_inv":  # small: through safetensors, then the checkpoint's scale rule
            t = _ckpt._scale_as_float32(key, f.get_tensor(key), file, self.fmt)
            if tuple(t.shape) != tuple(dst.shape):
                raise _ckpt.CheckpointError(
                    f"{key} in {file}: expected shape {tuple(dst.shape)} (the model's experts in "
                    f"{self.fmt.block[0]}x{self.fmt.block[1]} blocks), got {tuple(t.shape)}"
                )
            dst.copy_(t)
        else:
            part = f.get_slice(key)  # dtype and shape only: nothing is read through safetensors
            shape, dtype = tuple(part.get_shape()), part.get_dtype()
            if _SAFETENSORS_DTYPES.get(dtype) != self.fmt.dtype:
                raise _ckpt.CheckpointDtypeError(
                    f"{key} in {file}: expected {self.fmt.dtype} (fmt in config.json), got {dtype}"
                )
            if shape != tuple(dst.shape):
                raise _ckpt.CheckpointError(
                    f"{key} in {file}: expected shape {tuple(dst.shape)} for the model's experts, got {shape}"
                )
            read_into(self._file(file), key, file, dst)
            _ckpt._check_fp8_codes(key, dst, file)
        self.filled[(e, proj, suffix)] = file

    def _file(self, file: str) -> tuple[object, int, dict]:
        if file not in self._files:
            offset, header = _ckpt._header(file)
            self._files[file] = (_ckpt._open_regular(file, "a safetensors file"), offset, header)
        return self._files[file]

    def close(self) -> None:
        for handle, _, _ in self._files.values():
            handle.close()
        self._files.clear()

    def publish(self, tensors: dict, files) -> None:
        """Check every local key was read (missing ones named by their GLOBAL expert id), then put
        the fused tensors into ``tensors`` under the fused keys."""
        layer, e0 = self.layer, self.layer.expert_offset
        for e in range(layer.num_experts):
            for proj in _experts.PROJECTIONS:
                for suffix in ("weight", "weight_scale_inv"):
                    if (e, proj, suffix) not in self.filled:
                        w_key, s_key = _experts.per_expert_keys(self.name, e0 + e, proj, mixtral=self.mixtral)
                        raise _ckpt.CheckpointError(
                            f"{w_key if suffix == 'weight' else s_key}: missing from the checkpoint ({self.name} "
                            f"holds experts [{e0}, {e0 + layer.num_experts}) of {layer.full_num_experts} "
                            f"on this rank; files: {sorted(map(str, files))})"
                        )
        file = self.filled[(0, "gate_proj", "weight")]
        for key, t in self.tensors.items():
            full = f"{self.name}.{key}"
            if full in tensors:
                raise _ckpt.CheckpointError(
                    f"{full} in {tensors[full][1]}: the checkpoint holds {self.name}'s experts both "
                    f"fused and per expert (e.g. in {file})"
                )
            tensors[full] = (t, file)


def read_into(opened: tuple[object, int, dict], key: str, file: str, dst: torch.Tensor) -> None:
    """Read tensor ``key``'s bytes from the open safetensors ``file`` straight into the contiguous
    CPU tensor ``dst`` (same byte count; ``opened``: (raw handle, data offset, header))."""
    handle, offset, header = opened
    a, b = header[key]["data_offsets"]
    out = memoryview(dst.view(torch.uint8).reshape(-1).numpy())
    if b - a != len(out):
        raise _ckpt.CorruptCheckpointError(
            f"{key} in {file}: its data_offsets span {b - a} bytes, its shape and dtype {len(out)}"
        )
    handle.seek(offset + a)
    done = 0
    while done < len(out):
        got = handle.readinto(out[done:])
        if not got:
            raise _ckpt.CorruptCheckpointError(f"{key}: cannot read {file}: it ends early (truncated?)")
        done += got


def _read_local_expert(
    f,
    key: str,
    parsed: tuple[int, str, str] | None,
    layer: Fp8ShardedExperts,
    file: str,
    local: _LocalExperts,
):
    """For a key of ``layer``: a per-expert key (``parsed``: (expert, projection, suffix)) of a local
    expert is read into ``local`` (returns None), another rank's is never read (None); fused keys
    (``parsed`` None): (key, rows [e0, e1) by get_slice)."""
    e0, e1 = layer.expert_offset, layer.expert_offset + layer.num_experts
    if parsed is not None:
        e, proj, suffix = parsed
        if e >= layer.full_num_experts:  # not an expert of the model: kept, so strict load names it
            return key, f.get_tensor(key)
        if not e0 <= e < e1:
            return None
        local.read(f, key, file, e - e0, proj, suffix)
        return None
    part = f.get_slice(key)
    shape = tuple(part.get_shape())
    if len(shape) != 3 or shape[0] != layer.full_num_experts:
        raise _ckpt.CheckpointError(
            f"{key} in {file}: expected a 3-D tensor with {layer.full_num_experts} experts first, got {shape}"
        )
    return key, part[e0:e1].contiguous()


def _check_local_experts(
    name: str, layer: Fp8ShardedExperts, tensors: dict, files: list, mixtral: bool
) -> None:
    """Every local expert's per-expert keys are present (named by their GLOBAL expert id, as the
    file names them: Mixtral's names with ``mixtral``)."""
    if f"{name}.gate_up_proj" in tensors:
        return
    for e in range(layer.expert_offset, layer.expert_offset + layer.num_experts):
        for proj in _experts.PROJECTIONS:
            for key in _experts.per_expert_keys(name, e, proj, mixtral=mixtral):
                if key not in tensors:
                    raise _ckpt.CheckpointError(
                        f"{key}: missing from the checkpoint ({name} holds experts "
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
    calls it; rank 0 writes: ``checkpoint.save`` on the model with the gathered layers swapped in,
    so the same keys, e.g. Mixtral's names for a Mixtral model). Returns the file names written (on
    every rank)."""
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
