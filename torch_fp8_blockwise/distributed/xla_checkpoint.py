"""Checkpoint loading into a model parallelized over a torch_xla SPMD mesh, typically built on the meta device.

``with torch.device("meta"): model = ...``; ``parallelize(model, xla_mesh)``; then :func:`load`
(or :func:`torch_fp8_blockwise.distributed.checkpoint.load`, which hands such a model here) reads
the DeepSeek / HF fp8 safetensors format that ``checkpoint.save`` writes, one tensor at a time,
and puts each tensor on the XLA devices as it is read, already sharded:

* a sharded layer's weight / scales / bias (:func:`~.xla.sharded_dim`): each addressable device's
  slice is read with safetensors ``get_slice`` and the global tensor is built from the per-device
  host pieces (``torch_xla._XLAC._global_tensor_from_cpu_shards``: no replicated copy is ever
  made, and a host of a multi-host mesh would read only its own devices' slices);
* an expert-parallel experts module (:class:`~.xla_experts.Fp8XlaExperts`): fused keys
  (``<name>.gate_up_proj``, ...) by their expert rows per device; per-expert keys
  (``<name>.<e>.{gate,up,down}_proj.weight`` / ``.weight_scale_inv``, what ``checkpoint.save``
  writes) are checked on the host as they arrive (dtype, shape, fp8 codes, scales) and held until
  the fused tensor they belong to is complete (all experts' gate and up, or all down), which then
  goes to the devices sharded by expert: the host holds the pieces of at most about one fused
  tensor (one layer's experts of gate + up, or of down) and the device slices built from them;
* every other tensor whole, replicated (``tensor.to(xla)``).

The host therefore never holds the model: about one tensor at a time (twice one fused experts
tensor at the peak).
The device tensors then go through ``checkpoint.load``'s own plan (the same shape, dtype, fp8-code
and scale checks, run on the devices, and the same all-or-nothing commit: on any error the model
is unchanged) and finally every sharded tensor is (re-)annotated with its sharding.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .. import checkpoint as _ckpt
from .. import experts as _experts
from ..formats import cdiv
from ..nn import QuantizationSummary
from .xla import _axis, _Fp8XlaShardedLinear, sharded_dim
from .xla_experts import Fp8XlaExperts

_PER_EXPERT = re.compile(r"(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)")


def xla_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> every module of ``model`` that :func:`parallelize` split over a torch_xla mesh."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (_Fp8XlaShardedLinear, Fp8XlaExperts))}


def _positions(mesh: object) -> list[int]:
    """For each addressable device, in the order ``_global_tensor_from_cpu_shards`` takes shards
    (torch_xla's runtime devices), its position along the 1-D mesh: the slice it holds."""
    import torch_xla

    ids = [int(i) for i in np.asarray(mesh.device_ids).reshape(-1)]
    local = [int(d.rsplit(":", 1)[1]) for d in torch_xla._XLAC._xla_get_runtime_devices()]
    return [ids.index(d) for d in local]


def place_sharded(
    read: Callable[[tuple[slice, ...]], torch.Tensor], shape: tuple[int, ...], dim: int, mesh: object
) -> torch.Tensor:
    """A global xla tensor of ``shape`` sharded along ``dim`` over the 1-D ``mesh``, built from the
    host pieces ``read(index)`` of each addressable device (``index``: one slice per dimension;
    ``shape[dim] % tp == 0``)."""
    import torch_xla

    tp = len(np.asarray(mesh.device_ids).reshape(-1))
    step = shape[dim] // tp
    shards = []
    for p in _positions(mesh):
        index = [slice(None)] * len(shape)
        index[dim] = slice(p * step, (p + 1) * step)
        shards.append(read(tuple(index)).contiguous())
    spec = tuple(_axis(mesh) if d == dim else None for d in range(len(shape)))
    return torch_xla._XLAC._global_tensor_from_cpu_shards(shards, mesh.get_op_sharding(spec), list(shape))


def _expected_shape(layer: nn.Module, suffix: str) -> tuple[int, ...]:
    if isinstance(layer, Fp8XlaExperts):  # the fused tensors' global shapes (meta or not)
        return tuple(getattr(layer, suffix).shape)
    n, k = layer.out_features, layer.in_features
    bn, bk = layer.config.block_shape
    return {"weight": (n, k), "weight_scale_inv": (cdiv(n, bn), cdiv(k, bk)), "bias": (n,)}[suffix]


class _ExpertStash:
    """Per-expert tensors of one Fp8XlaExperts, checked on the host, held until a fused tensor is
    complete, then placed sharded by expert."""

    def __init__(self, name: str, layer: Fp8XlaExperts, fmt) -> None:
        self.name, self.layer, self.fmt = name, layer, fmt
        self.got: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        e, h, i = layer.num_experts, layer.hidden_dim, layer.intermediate_dim
        bn, bk = fmt.block
        self.shapes = {
            ("gate_proj", "weight"): (i, h), ("up_proj", "weight"): (i, h), ("down_proj", "weight"): (h, i),
            ("gate_proj", "weight_scale_inv"): (cdiv(i, bn), cdiv(h, bk)),
            ("up_proj", "weight_scale_inv"): (cdiv(i, bn), cdiv(h, bk)),
            ("down_proj", "weight_scale_inv"): (cdiv(h, bn), cdiv(i, bk)),
        }  # fmt: skip
        self.e = e
        self.done: set[str] = set()  # fused tensors placed

    def add(self, key: str, e: int, proj: str, what: str, t: torch.Tensor, file: str):
        """Check one per-expert tensor; returns (fused key, sharded xla tensor) when it completes one."""
        if what == "weight":
            if t.dtype != self.fmt.dtype:
                raise _ckpt.CheckpointDtypeError(
                    f"{key} in {file}: expected {self.fmt.dtype} (fmt in config.json), got {t.dtype}"
                )
            _ckpt._check_fp8_codes(key, t, file)
        else:
            t = _ckpt._scale_as_float32(key, t, file, self.fmt)
        shape = self.shapes[(proj, what)]
        if tuple(t.shape) != shape:
            raise _ckpt.CheckpointError(
                f"{key} in {file}: expected shape {shape} for the model's experts "
                f"({self.fmt.block[0]}x{self.fmt.block[1]} blocks), got {tuple(t.shape)}"
            )
        got = self.got.setdefault((proj, what), {})
        if e in got or _fused_name(proj, what) in self.done:
            raise _ckpt.CheckpointError(f"{key} in {file}: read twice (the files hold it more than once)")
        got[e] = t
        parts = ("gate_proj", "up_proj") if proj != "down_proj" else ("down_proj",)
        if not all(len(self.got.get((p, what), {})) == self.e for p in parts):
            return None
        pieces = [self.got.pop((p, what)) for p in parts]
        rows = sum(piece[0].shape[0] for piece in pieces)
        shape3 = (self.e, rows, pieces[0][0].shape[1])

        def device_shard(
            index: tuple[slice, ...],
        ) -> torch.Tensor:  # one device's experts; gate rows, then up
            return torch.stack([torch.cat([piece[x] for piece in pieces]) for x in range(self.e)[index[0]]])

        fused_name = _fused_name(proj, what)
        self.done.add(fused_name)
        return f"{self.name}.{fused_name}", place_sharded(device_shard, shape3, 0, self.layer.mesh)

    def missing(self) -> str | None:
        """The first per-expert key never seen, when some of this module's keys were."""
        if not self.got and not self.done:
            return None
        for x in range(self.e):
            for proj in _experts.PROJECTIONS:
                keys = _experts.per_expert_keys(self.name, x, proj)
                for key, what in zip(keys, ("weight", "weight_scale_inv"), strict=True):
                    if _fused_name(proj, what) not in self.done and x not in self.got.get((proj, what), {}):
                        return key
        return None


def _fused_name(proj: str, what: str) -> str:
    """The fused tensor a per-expert tensor goes into: gate / up -> gate_up_proj, down -> down_proj."""
    return ("down_proj" if proj == "down_proj" else "gate_up_proj") + (
        "" if what == "weight" else "_scale_inv"
    )


def load(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, activation: str | None = None
) -> QuantizationSummary:
    """Load a DeepSeek / HF fp8 checkpoint into a model parallelized over a torch_xla SPMD mesh.

    ``model``: after :func:`~torch_fp8_blockwise.distributed.parallelize` on a torch_xla ``Mesh``,
    typically on the meta device (its :class:`~.xla.Fp8XlaColwiseLinear` /
    ``Fp8XlaRowwiseLinear`` / :class:`~.xla_experts.Fp8XlaExperts` hold meta tensors of the global
    shapes). Each tensor is read, placed on torch_xla's device with its sharding, and checked (see
    the module docstring); every other tensor is loaded as ``checkpoint.load`` loads it, onto the
    xla device (meta nn.Linear layers with scales in the file become Fp8BlockwiseLinear there).
    Non-persistent buffers (rotary ``inv_freq``) are not in checkpoints: a meta model must recreate
    them. The file's block shape must be the sharded layers' block shape.

    Returns: ``checkpoint.load``'s QuantizationSummary (global shapes).
    Raises: CheckpointError (a ValueError) naming the tensor and the file; the model is unchanged.
    """
    import torch_xla
    import torch_xla.distributed.spmd as xs

    if activation is not None:
        _ckpt.Fp8Config(activation=activation)  # validates the name
    device = torch_xla.device()
    root, files = _ckpt._files(path)
    fmt = _ckpt._read_config(root, activation)
    cfg_path = os.path.join(root, _ckpt.CONFIG_FILE)
    modules = xla_modules(model)
    if modules and fmt.explicit:
        raise _ckpt.CheckpointError(
            f"{cfg_path}: a compressed-tensors checkpoint; loading it into a parallelized model is not "
            "supported yet (load it into one process, or save it in the 'fp8' format)"
        )
    for name, layer in modules.items():
        if layer.config.block_shape != fmt.block:
            raise _ckpt.CheckpointError(
                f"{name}: the model's layer was sharded at {layer.config.block_shape} blocks, the checkpoint "
                f"has weight_block_size {list(fmt.block)} ({cfg_path}); parallelize with "
                "config=Fp8Config(block_shape=...) matching the file"
            )
    sharded = {
        f"{name}.{suffix}": (layer, suffix)
        for name, layer in modules.items()
        for suffix in ("weight", "weight_scale_inv", "bias", *_experts.FUSED_KEYS)
        if sharded_dim(layer, suffix) is not None and getattr(layer, suffix, None) is not None
    }
    stashes = {n: _ExpertStash(n, m, fmt) for n, m in modules.items() if isinstance(m, Fp8XlaExperts)}

    def read(f, key: str, file: str) -> tuple[str, torch.Tensor] | None:
        if key in sharded:
            layer, suffix = sharded[key]
            part = f.get_slice(key)
            shape, expected = tuple(part.get_shape()), _expected_shape(layer, suffix)
            if shape != expected:
                raise _ckpt.CheckpointError(
                    f"{key} in {file}: expected shape {expected} for the model's layer "
                    f"({fmt.block[0]}x{fmt.block[1]} blocks), got {shape}"
                )
            dim = sharded_dim(layer, suffix)
            return key, place_sharded(
                lambda index: part[index if len(shape) > 1 else index[0]], shape, dim, layer.mesh
            )
        for name, stash in stashes.items():
            match = _PER_EXPERT.fullmatch(key[len(name) + 1 :]) if key.startswith(name + ".") else None
            if match is not None and int(match.group(1)) < stash.e:
                return stash.add(
                    key, int(match.group(1)), match.group(2), match.group(3), f.get_tensor(key), file
                )
        return key, f.get_tensor(key).to(device)

    tensors = _ckpt._read_tensors(files, read)
    for stash in stashes.values():
        key = stash.missing()
        if key is not None:
            raise _ckpt.CheckpointError(
                f"{key}: missing from the checkpoint ({stash.name} has {stash.e} experts; files: "
                f"{sorted(map(str, files))})"
            )
    plan = _ckpt._plan(model, tensors, fmt, None, strict, activation)
    for name, layer in plan.new_layers.items():
        if name in stashes:  # the Fp8Experts built from the sharded tensors: expert-parallel again
            layer.__class__ = Fp8XlaExperts
            layer.mesh, layer.tp_size = modules[name].mesh, modules[name].tp_size
    _ckpt._commit(model, plan)
    for name, old in modules.items():
        layer = model.get_submodule(name)
        for suffix in ("weight", "weight_scale_inv", "bias", *_experts.FUSED_KEYS):
            t = getattr(layer, suffix, None)
            dim = sharded_dim(layer, suffix)
            if t is None or dim is None or torch_xla._XLAC._get_xla_sharding_spec(t):
                continue
            spec = tuple(_axis(old.mesh) if d == dim else None for d in range(t.dim()))
            xs.mark_sharding(t, old.mesh, spec)  # a tensor converted on the device (e.g. bf16 scales)
    return plan.summary
