"""DeepSeek-V3 / HF "fp8" safetensors checkpoints: :func:`save` and :func:`load`.

The format (what DeepSeek-V3/R1, transformers' FineGrainedFP8 and vLLM/SGLang read and write):

* ``<layer>.weight``: [N, K] float8_e4m3fn (out_features, in_features), row-major.
* ``<layer>.weight_scale_inv``: [cdiv(N, bn), cdiv(K, bk)] float32, a MULTIPLIER:
  ``weight ~= weight.float() * weight_scale_inv`` broadcast over (bn, bk) blocks.
* every other tensor (norms, embeddings, biases, layers kept in high precision) as it is.
* ``config.json`` with ``"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
  "activation_scheme": "dynamic", "weight_block_size": [bn, bk]}`` and, for power-of-two scales,
  ``"scale_fmt": "ue8m0"`` (DeepSeek V3.1; the scales stay float32 in the file).
* one ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` with
  ``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {key: file}}``).

:func:`load` reads everything, checks everything, builds the new layers, and only then touches the
model: a bad file raises (:class:`CheckpointError`, naming the tensor and the file) and leaves the
model exactly as it was. safetensors is imported by these functions, not by the package.

compressed-tensors (llm-compressor ``FP8_BLOCK``) checkpoints load too, and ``save(...,
format="compressed-tensors")`` writes them: :mod:`.compressed_tensors` reads and writes their
``quantization_config`` (``quant_method: "compressed-tensors"``; scales named ``weight_scale``).
"""

from __future__ import annotations

import json
import os
import re
import reprlib
import stat
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import BinaryIO

import torch
from torch import nn

from . import compressed_tensors as _ct
from . import experts as _experts
from .formats import (
    E8M0_NAN,
    FP8_DTYPES,
    HIGH_PRECISION_DTYPES,
    MATMUL_BLOCKS,
    cdiv,
    e8m0_to_float,
    fp8_max,
    round_scale_ue8m0,
)
from .nn import (
    DEFAULT_BLOCK,
    Fp8BlockwiseLinear,
    Fp8Config,
    LayerReport,
    QuantizationSummary,
    _nbytes,
    fp8_ineligible_reason,
    logger,
    module_parents,
    requantize,
    storage_key,
    weight_sqnr_db,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
SCALE_SUFFIX = ".weight_scale_inv"
#: Bound on a safetensors header, as safetensors itself sets it (its MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
#: Bound on config.json and the index (they hold names and settings, not tensors).
MAX_JSON_BYTES = 64 << 20

_FMT_DTYPES: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
#: save(format=...): quant_method of the config.json written.
FORMATS = ("fp8", _ct.QUANT_METHOD)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the tensor key and the file."""


class CheckpointDtypeError(CheckpointError, TypeError):
    """A tensor of the checkpoint has the wrong dtype."""


class CorruptCheckpointError(CheckpointError, RuntimeError):
    """safetensors could not read a file (truncated, corrupt header, missing tensor)."""


# ------------------------------------------------------------------------------------------ save
def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
    format: str = "fp8",
) -> list[str]:
    """Write ``model`` to directory ``path`` in the DeepSeek / HF fp8 format (or compressed-tensors).

    Fp8BlockwiseLinear layers become ``weight`` (fp8) + ``weight_scale_inv`` (float32); Fp8Experts
    become per-expert keys ``<experts>.<e>.{gate_proj,up_proj,down_proj}.weight`` +
    ``.weight_scale_inv`` (DeepSeek-V3 / Qwen3), or for a transformers Mixtral model
    (``config.model_type == "mixtral"``) Mixtral's original names, which transformers' own
    save_pretrained writes and vLLM's Mixtral loader reads: ``<layer>.block_sparse_moe.experts.<e>.w1``
    (gate) / ``w3`` (up) / ``w2`` (down), and the rest of each such MoE block (the router's
    ``gate.weight``) under ``block_sparse_moe.`` too (vLLM's Mixtral has no ``mlp`` module); all other
    state (norms, embeddings, biases, nn.Linear layers left in high precision) is written as it is.
    Tied tensors (an lm_head sharing the embedding) are written once, under their first name, as
    transformers does. ``config.json`` gets the ``quantization_config``: merged into
    ``model.config.to_dict()`` for a transformers model, else into an existing ``path/config.json``,
    else written alone. All fp8 layers must share one block shape, fp8 dtype and scale format (the
    format has one ``weight_block_size``). Layers left in high precision (every nn.Linear) are
    listed in ``modules_to_not_convert``, an empty list when there are none.

    Args:
        max_shard_bytes: split into shards of at most this many bytes (a tensor larger than that
            gets a shard of its own) plus ``model.safetensors.index.json``; None: one file.
        format: "fp8" (DeepSeek / HF: ``weight_scale_inv``, ``quant_method: "fp8"``) or
            "compressed-tensors" (llm-compressor's FP8_BLOCK layout, which vLLM's compressed-tensors
            path reads: scales named ``weight_scale``, written in float32, one config group per
            block shape and activation; float8_e5m2 layers and Fp8Experts are refused). Layers left
            in high precision are listed in ``ignore`` there.

    Returns: the names of the files written (relative to ``path``).
    """
    from safetensors.torch import save_file

    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0):
        raise ValueError(f"max_shard_bytes: expected a positive int or None, got {max_shard_bytes!r}")
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    fp8_types = (Fp8BlockwiseLinear, _experts.Fp8Experts)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, fp8_types)}
    for name, m in layers.items():  # a torch.distributed shard holds a slice: this file would be wrong
        if getattr(m, "kind", "") in ("colwise", "rowwise", "expert") and hasattr(m, "tp_rank"):
            raise ValueError(
                f"save: {name} is this rank's {m.kind} shard ({type(m).__name__}); save a parallelized "
                "model with torch_fp8_blockwise.distributed.checkpoint.save (every rank calls it)"
            )
    linears = {name: m for name, m in layers.items() if isinstance(m, Fp8BlockwiseLinear)}
    if format == _ct.QUANT_METHOD:
        experts = sorted(set(layers) - set(linears))
        if experts:
            raise ValueError(
                f"save(format='compressed-tensors'): {experts[0]} is an Fp8Experts; MoE experts are "
                "written in the 'fp8' (DeepSeek) format only for now"
            )
        quant = _ct.quantization_config(model, linears)
    else:
        quant = _quantization_config(model, layers)

    tensors: dict[str, torch.Tensor] = {}
    ties = _tie_groups(model)
    seen: set[tuple] = set()
    for key, t in model.state_dict().items():
        if t.device.type == "meta":
            raise ValueError(f"save: {key} is on the meta device (no values to write)")
        # Tied tensors (same Parameter object, or the same memory): safetensors refuses shared
        # storage, so the first name is written and transformers / load() re-tie the others.
        group = ties.get(key, frozenset((key,)))
        view = (storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in seen or any(k in tensors for k in group if k != key):
            continue
        seen.add(view)
        tensors[key] = t.detach().to("cpu").contiguous()
    # Fp8Experts: per-expert keys (DeepSeek / Qwen3 / vLLM / SGLang read those), not the fused ones.
    mixtral = _experts.uses_mixtral_names(model)
    blocks: dict[str, str] = {}  # Mixtral: the model's MoE block name -> the checkpoint's
    for name, m in layers.items():
        if isinstance(m, _experts.Fp8Experts):
            for k in _experts.FUSED_KEYS:
                tensors.pop(f"{name}.{k}", None)
            tensors.update(_experts.split_per_expert(name, m, mixtral=mixtral))
            block, stored = _experts.mixtral_block_names(name)
            if mixtral and block != stored:
                blocks[block] = stored
    if blocks:
        tensors = {_stored_key(key, blocks): t for key, t in tensors.items()}
        if quant is not None:  # the names the file uses
            quant["modules_to_not_convert"] = sorted(
                _stored_key(n, blocks) for n in quant["modules_to_not_convert"]
            )
    if format == _ct.QUANT_METHOD:
        tensors = {_ct.checkpoint_key(key, t, linears): t for key, t in tensors.items()}

    os.makedirs(path, exist_ok=True)
    shards = _shard(tensors, max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1 and max_shard_bytes is None
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    _remove_stale(path, keep=names)
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    written = list(names)
    if max_shard_bytes is not None:
        index = {
            "metadata": {"total_size": _nbytes(*tensors.values())},
            "weight_map": {key: name for name, shard in zip(names, shards, strict=True) for key in shard},
        }
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        written.append(INDEX_FILE)

    config = _base_config(model, path)
    if quant is not None:
        config["quantization_config"] = quant
    else:
        config.pop("quantization_config", None)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    written.append(CONFIG_FILE)
    return written


def _remove_stale(path: str | os.PathLike, keep: list[str]) -> None:
    """Delete weight files an earlier save() left in ``path`` that this one does not rewrite: a stale
    index would make load() read the old shards."""
    for name in os.listdir(path):
        ours = name in (SINGLE_FILE, INDEX_FILE) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name)
        if ours and name not in keep:
            os.remove(os.path.join(path, name))


def _quantization_config(model: nn.Module, layers: dict[str, nn.Module]) -> dict | None:
    if not layers:
        return None
    configs = {(m.config.block_shape, m.config.dtype, m.config.scale_format) for m in layers.values()}
    if len(configs) > 1:
        raise ValueError(
            "save: the fp8 format has one weight_block_size / fmt / scale_fmt per checkpoint, but the "
            f"model's Fp8BlockwiseLinear layers mix {sorted(str(c) for c in configs)}"
        )
    ((block, dtype, scale_format),) = configs
    fmt = {v: k for k, v in _FMT_DTYPES.items()}[dtype]
    quant = {
        "quant_method": "fp8",
        "fmt": fmt,
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    if scale_format == "ue8m0":
        quant["scale_fmt"] = "ue8m0"
    # Always written, empty or not: without it transformers applies its own default skip list
    # (lm_head), and its GPU path then loads an fp8 lm_head's codes into a bf16 nn.Linear.
    quant["modules_to_not_convert"] = sorted(
        name for name, m in model.named_modules() if isinstance(m, nn.Linear)
    )
    return quant


def _base_config(model: nn.Module, path: str | os.PathLike) -> dict:
    hf_config = getattr(model, "config", None)
    if hf_config is not None and callable(getattr(hf_config, "to_dict", None)):
        return dict(hf_config.to_dict())
    existing = os.path.join(path, CONFIG_FILE)
    if os.path.lexists(existing):
        return _read_json(existing, CONFIG_FILE)
    return {}


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if max_bytes is None:
        return [tensors]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = _nbytes(t)
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


# ---------------------------------------------------------------------------------- load: files
# Everything load() opens is found here. The rule: an index entry is a relative name with no ".."
# (and no NUL), and every file, once symlinks are resolved, lives inside the checkpoint directory,
# or in the "blobs" folder of the Hugging Face cache repository the directory is a snapshot of
# (<repo>/snapshots/<revision>/<file> -> ../../blobs/<hash>), and is a regular file (a FIFO would
# block open() forever, a device or a directory is no checkpoint).


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def _allowed_dirs(root: str) -> list[str]:
    """Real paths under which the files of checkpoint directory ``root`` may live."""
    real_root = os.path.realpath(root)
    dirs = [real_root]
    for start in (os.path.abspath(root), real_root):
        d = start
        while os.path.dirname(d) != d:
            parent = os.path.dirname(d)
            if os.path.basename(parent) == "snapshots":
                blobs = os.path.join(os.path.dirname(parent), "blobs")
                # A "blobs" that is itself a symlink could point anywhere (even at /): not the cache.
                if os.path.isdir(blobs) and not os.path.islink(blobs):
                    dirs.append(os.path.realpath(blobs))
                break
            d = parent
    return dirs


def _member(root: str, name: object, where: str) -> str:
    """Path of file ``name`` (relative to checkpoint directory ``root``) after the containment
    checks above; ``where`` names the file and field the name came from."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where}: expected a file name (a non-empty string), got {_show(name)}")
    if "\x00" in name or os.path.isabs(name) or any(part in ("", "..") for part in name.split("/")):
        raise CheckpointError(
            f"{where}: {name!r} is not a plain relative file name inside the checkpoint directory "
            "(no absolute path, no '..', no empty or NUL component)"
        )
    path = os.path.normpath(os.path.join(root, name))
    _check_contained(path, root, where)
    return path


def _check_contained(path: str, root: str, where: str) -> None:
    real = os.path.realpath(path)
    allowed = _allowed_dirs(root)
    if not any(_inside(real, d) for d in allowed):
        raise CheckpointError(
            f"{where}: {path} resolves to {real}, outside the checkpoint directory "
            f"{allowed[0]} (a symlink may only point inside it, or into the Hugging Face cache's "
            "blobs folder of the snapshot); copy the file into the checkpoint directory"
        )


def _open_regular(path: str, what: str) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file; ``what`` names it in errors.

    Checked by name before open() (opening some devices has effects) and by descriptor after it
    (the file may be swapped in between); O_NONBLOCK makes open() of a FIFO return at once instead
    of waiting for a writer."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e}") from e
    _check_regular(st, path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e}") from e
    try:
        _check_regular(os.fstat(fd), path, what)
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _check_regular(st: os.stat_result, path: str, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = {
            stat.S_IFIFO: "a FIFO",
            stat.S_IFDIR: "a directory",
            stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device",
            stat.S_IFSOCK: "a socket",
        }.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise CheckpointError(f"{path}: {what} is {kind}, expected a regular file")


def _files(path: str | os.PathLike) -> tuple[str, dict[str, list[str]]]:
    """(root directory, file -> keys the index says it holds; [] = read the file's own list)."""
    path = os.fspath(path)
    if os.path.isfile(path):  # a file the caller named: trusted where it is, checked for kind
        root = os.path.dirname(path)
        if path.endswith(".json"):
            return root, _index(path, root)
        return root, {path: []}
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint.load: {path} is neither a checkpoint directory nor a file")
    index = os.path.join(path, INDEX_FILE)
    if os.path.lexists(index):
        _check_contained(index, path, INDEX_FILE)
        return path, _index(index, path)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.lexists(single):
        _check_contained(single, path, SINGLE_FILE)
        return path, {single: []}
    raise FileNotFoundError(f"checkpoint.load: no {SINGLE_FILE} or {INDEX_FILE} in {path}")


# ----------------------------------------------------------------------------------- load: json
def _show(value: object) -> str:
    """``value`` for an error message: its JSON type and a bounded repr."""
    return f"{type(value).__name__} {reprlib.repr(value)}"


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    pass


def _parse_json(data: bytes, where: str, error: type[CheckpointError] = CheckpointError) -> dict:
    """A JSON object from ``data``: UTF-8, no key twice at any depth (parsers disagree on which copy
    wins), nesting within Python's recursion limit. Any failure raises ``error`` naming ``where``."""
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text ({e})") from e
    except _DuplicateKey as e:
        raise error(f"{where}: key {e.args[0]!r} appears more than once") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and ints of more than 4300 digits
        raise error(f"{where}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise error(f"{where}: expected a JSON object, got {_show(value)}")
    return value


def _read_json(path: str, what: str) -> dict:
    with _open_regular(path, what) as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {what} is larger than {MAX_JSON_BYTES} bytes")
    return _parse_json(data, path)


def _index(index: str, root: str) -> dict[str, list[str]]:
    data = _read_json(index, "the safetensors index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index}: weight_map: expected an object {{tensor name: file name}}, got {_show(weight_map)}"
        )
    if not isinstance(data.get("metadata", {}), (dict, type(None))):
        raise CheckpointError(f"{index}: metadata: expected an object, got {_show(data['metadata'])}")
    files: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        files.setdefault(_member(root, name, f"{index}: weight_map[{reprlib.repr(key)}]"), []).append(key)
    return files


@dataclass(frozen=True)
class _FileFormat:
    """The DeepSeek / HF fp8 format: one block shape for the file; a layer is fp8 when the file
    holds its ``weight_scale_inv`` (not ``explicit``). The compressed-tensors reader
    (:class:`.compressed_tensors.CompressedTensorsFormat`) has the same interface, with a
    per-layer scheme that its config, not the file, decides."""

    block: tuple[int, int]
    dtype: torch.dtype
    scale_format: str
    activation: str = "dynamic"
    scale_suffix: str = SCALE_SUFFIX
    explicit: bool = False

    def layer(self, name: str, module: nn.Module) -> _FileFormat:
        return self


_DEFAULT_FORMAT = _FileFormat(DEFAULT_BLOCK, torch.float8_e4m3fn, "fp32")


def _choice(quant: dict, name: str, default: str | None, allowed: tuple, where: str) -> str | None:
    """quantization_config[name] (``default`` when absent), which must be one of ``allowed``."""
    value = quant.get(name, default)
    if not (value is None or isinstance(value, str)) or value not in allowed:
        raise CheckpointError(
            f"{where}.{name}: expected one of {', '.join(map(repr, allowed))}, got {_show(value)}"
        )
    return value


def _read_config(root: str, activation: str | None = None) -> _FileFormat | _ct.CompressedTensorsFormat:
    """The checkpoint's fp8 format from config.json (DeepSeek defaults when it has none);
    ``activation`` (None: the file's) is what compressed-tensors' activation checks allow."""
    cfg_path = os.path.join(root, CONFIG_FILE)
    if not os.path.lexists(cfg_path):
        return _DEFAULT_FORMAT
    _check_contained(cfg_path, root, CONFIG_FILE)
    quant = _read_json(cfg_path, CONFIG_FILE).get("quantization_config")
    if quant is None:
        return _DEFAULT_FORMAT
    where = f"{cfg_path}: quantization_config"
    if not isinstance(quant, dict):
        raise CheckpointError(f"{where}: expected an object, got {_show(quant)}")
    if quant.get("quant_method") == _ct.QUANT_METHOD:
        try:
            return _ct.parse_quantization_config(quant, activation)
        except _ct.ConfigError as e:
            raise CheckpointError(f"{where}.{e}") from e
    _choice(quant, "quant_method", "fp8", FORMATS, where)
    block = quant.get("weight_block_size", list(DEFAULT_BLOCK))
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(type(b) is int and b in MATMUL_BLOCKS for b in block)
    ):
        raise CheckpointError(
            f"{where}.weight_block_size: {_show(block)} is not supported; blockwise_matmul runs blocks "
            f"with bn and bk each in {MATMUL_BLOCKS} (a per-tensor/per-channel fp8 checkpoint has no "
            "block size)"
        )
    fmt = _choice(quant, "fmt", "e4m3", tuple(_FMT_DTYPES), where)
    # Only "dynamic": activations are quantized per 1 x bk group at run time (no static scales).
    _choice(quant, "activation_scheme", "dynamic", ("dynamic",), where)
    scale_fmt = _choice(quant, "scale_fmt", None, (None, "float", "ue8m0"), where)
    skip = quant.get("modules_to_not_convert")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(m, str) for m in skip)):
        raise CheckpointError(
            f"{where}.modules_to_not_convert: expected a list of module names, got {_show(skip)}"
        )
    return _FileFormat((block[0], block[1]), _FMT_DTYPES[fmt], "ue8m0" if scale_fmt == "ue8m0" else "fp32")


# ------------------------------------------------------------------------------ load: tensors
def _header_keys(file: str) -> list[str]:
    """Tensor names of a safetensors file, from its header as we parse it ourselves before
    safetensors opens the file: [8-byte little-endian length n][n bytes of JSON][data]. Checked:
    n within the file and MAX_HEADER_BYTES, UTF-8, a JSON object, no key twice (safetensors' parser
    silently keeps the last copy of a duplicated tensor name)."""
    return [k for k in _header(file)[1] if k != "__metadata__"]


def _header(file: str) -> tuple[int, dict]:
    """(offset of the data section = 8 + n, the parsed header) of a safetensors file, checked as
    :func:`_header_keys` says. A tensor's bytes are ``[offset + a, offset + b)`` for its
    ``data_offsets`` [a, b] (safetensors checks those when it opens the file)."""
    with _open_regular(file, "a safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 <= n <= min(MAX_HEADER_BYTES, size - 8):
            raise CorruptCheckpointError(
                f"{file}: the header length {n} does not fit the file ({size} bytes; at most "
                f"{MAX_HEADER_BYTES}): truncated or not a safetensors file?"
            )
        header = _parse_json(f.read(n), f"{file}: safetensors header", CorruptCheckpointError)
    return 8 + n, header


def _read_tensors(
    files: dict[str, list[str]],
    read: Callable[[object, str, str], tuple[str, torch.Tensor] | None] | None = None,
) -> dict[str, tuple[torch.Tensor, str]]:
    """key -> (tensor on CPU, file), every read error wrapped with the file's name. ``read(f, key,
    file)`` reads one tensor from the open safetensors file ``f`` as (key, tensor), or None to skip
    it (default: (key, all of it); distributed.checkpoint reads a rank's slices and experts)."""
    from safetensors import safe_open

    out: dict[str, tuple[torch.Tensor, str]] = {}
    for file, expected in files.items():
        keys = _header_keys(file)
        missing = sorted(set(expected) - set(keys))
        if missing:
            raise CorruptCheckpointError(
                f"{missing[0]}: listed in the index for {file}, but that file does not hold it "
                f"({len(missing)} such keys)"
            )
        key = None
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                if sorted(f.keys()) != sorted(keys):
                    raise CorruptCheckpointError(
                        f"{file}: safetensors reads other keys than its header lists"
                    )
                for key in keys:
                    got = (key, f.get_tensor(key)) if read is None else read(f, key, file)
                    if got is None:  # not this rank's (distributed.checkpoint): never read
                        continue
                    if got[0] in out:
                        raise CheckpointError(f"{got[0]}: in both {out[got[0]][1]} and {file}")
                    out[got[0]] = (got[1], file)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises SafetensorError / OSError for bad files
            what = f"{key}: " if key is not None else ""
            raise CorruptCheckpointError(f"{what}cannot read {file} (truncated or corrupt?): {e}") from e
    return out


def max_scale(dtype: torch.dtype, scale_format: str) -> float:
    """The largest ``weight_scale_inv`` a producer can write for fp8 ``dtype``: a scale is
    amax / fp8_max, and amax is at most float32's largest finite value (3.4028e38; bfloat16's and
    float16's are smaller), so 3.4028e38 / 448 = 7.6e35 for float8_e4m3fn and 5.9e33 for
    float8_e5m2 (computed in float32), rounded up to a power of two for ue8m0 (2^120, 2^113).
    A larger scale turns fp8 codes into inf: load() refuses it."""
    bound = torch.tensor(torch.finfo(torch.float32).max) / fp8_max(dtype)
    if scale_format == "ue8m0":
        bound = round_scale_ue8m0(bound)
    return bound.item()


def _scale_as_float32(key: str, scale: torch.Tensor, file: str, fmt: _FileFormat) -> torch.Tensor:
    """weight_scale_inv as float32: float32 as it is; bfloat16 / float16 upcast (exact);
    E8M0 (float8_e8m0fnu, or uint8 bits with scale_fmt ue8m0) decoded to powers of two. Each scale
    must be in (0, max_scale] (NaN fails)."""
    if scale.dtype == torch.float32:
        out = scale
    elif scale.dtype in (torch.bfloat16, torch.float16):
        out = scale.float()
    elif scale.dtype == getattr(torch, "float8_e8m0fnu", None) or (
        scale.dtype == torch.uint8 and fmt.scale_format == "ue8m0"
    ):
        bits = scale.view(torch.uint8)
        if (bits == E8M0_NAN).any():
            raise CheckpointError(f"{key} in {file}: E8M0 scale holds NaN (255)")
        out = e8m0_to_float(bits)
    else:
        raise CheckpointDtypeError(
            f"{key} in {file}: expected float32 scales (or bfloat16 / float16 / E8M0), got {scale.dtype}"
        )
    bound = max_scale(fmt.dtype, fmt.scale_format)
    bad = ~((out > 0) & (out <= bound))
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(
            f"{key} in {file}: scales must be finite and positive, and at most {bound:.4g} (float32's "
            f"max / fp8 max of {fmt.dtype}): {int(bad.sum())} are not, e.g. {out[where].item()} at {where}"
        )
    if fmt.scale_format == "ue8m0" and (out.view(torch.int32) & 0x7FFFFF).any():
        raise CheckpointError(f"{key} in {file}: scale_fmt is 'ue8m0' but some scales are not powers of two")
    return out.contiguous()


def _check_fp8_codes(key: str, t: torch.Tensor, file: str) -> None:
    """Refuse non-finite fp8 codes. float8_e4m3fn: NaN is 0x7F / 0xFF (no inf). float8_e5m2: inf
    0x7C / 0xFC, NaN 0x7D-0x7F / 0xFD-0xFF. Either way every non-finite code is >= ``top`` within
    its sign's half, so two reductions with no temporaries find them: the max of the int8 view
    (positive half) and of the uint8 view (negative half). Measured on a shared 2-core CPU:
    130-370 ms per GiB in memory (0.75x a memcpy of the same bytes, interleaved); on a page-cached
    0.5 GiB checkpoint load() takes 130-400 ms instead of 3-15 ms, since safetensors maps tensors
    lazily and this is the first read of every byte (a forward or .to(device) reads them anyway)."""
    if t.numel() == 0:
        return
    top = 0x7F if t.dtype == torch.float8_e4m3fn else 0x7C
    bits = t.view(torch.uint8)
    if int(bits.view(torch.int8).max()) < top and int(bits.max()) < 0x80 | top:
        return
    bad = (bits & 0x7F) >= top
    where = tuple(int(i) for i in bad.nonzero()[0])
    raise CheckpointError(
        f"{key} in {file}: {int(bad.sum())} codes of this {t.dtype} weight are NaN or inf, e.g. "
        f"0x{int(bits[where]):02X} at {where} (a corrupt file: a quantizer never writes them)"
    )


# ------------------------------------------------------------------------------- load: the plan
@dataclass
class _Plan:
    """Everything load() will do to the model, built and checked before any change."""

    new_layers: dict[str, nn.Module]  # Fp8BlockwiseLinear / Fp8Experts
    fill_layers: dict[str, Fp8BlockwiseLinear]  # existing layer name -> layer holding the new tensors
    rest: dict[str, torch.Tensor]
    summary: QuantizationSummary
    assign: bool


def load(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    requantize_block: int | None = None,
    strict: bool = True,
    activation: str | None = None,
) -> QuantizationSummary:
    """Load a DeepSeek / HF fp8 checkpoint (directory, ``.safetensors`` file or index json) into ``model``.

    Each ``nn.Linear`` whose weight has a ``weight_scale_inv`` in the checkpoint becomes an
    :class:`Fp8BlockwiseLinear` holding the file's fp8 tensors as they are (no dequantize, no
    re-quantize); each existing Fp8BlockwiseLinear gets the file's tensors (and the file's block
    shape / scale format). Which modules may take an fp8 weight is
    :func:`~torch_fp8_blockwise.nn.fp8_ineligible_reason`, the rule quantize_model_ uses. Each fused
    MoE experts module (transformers' float one or an :class:`~torch_fp8_blockwise.experts.Fp8Experts`)
    becomes an Fp8Experts built from the per-expert keys
    ``<experts>.<e>.{gate_proj,up_proj,down_proj}.weight`` / ``.weight_scale_inv`` (gate and up stacked
    and fused as they are, bit-exact), from Mixtral's original names (transformers 5's
    ``model.layers.{l}.mlp.experts`` read from ``model.layers.{l}.block_sparse_moe.experts.{e}.w1`` (gate)
    / ``w3`` (up) / ``w2`` (down), and the rest of that MoE block, its router ``gate.weight``, from
    ``block_sparse_moe.``), or from fused fp8 keys (``<experts>.gate_up_proj`` + ``_scale_inv``, ...).
    Everything else is loaded like ``load_state_dict``: floating-point tensors
    into the model's dtype (also on the meta device, where they are assigned), every other tensor
    (int, bool) only in its own dtype. Layers are created on the device of the Linear they replace
    (CPU for meta).

    Files: every shard the index names, config.json and the index itself must be regular files
    inside the checkpoint directory once symlinks are resolved (or in the Hugging Face cache's
    ``blobs`` folder of the snapshot given); index entries are relative names without ``..``.
    Values: fp8 weights holding NaN (or e5m2 inf) codes and scales outside (0, :func:`max_scale`]
    are refused.

    Args:
        requantize_block: 128, 256 or 512: re-quantize every fp8 weight to (b, b) blocks (dequantize
            in float32 at the file's blocks, quantize at the new ones). For TPU, where a 128-deep K
            block can use at most half of a 256-deep MXU. The summary reports each layer's SQNR vs the
            file's weight (``sqnr_vs_128_db``; for experts one row per fused projection).
        strict: every model tensor must be in the checkpoint and every checkpoint tensor must be used
            (tied tensors count once).
        activation: "dynamic" (W8A8) or "none" (W8A16) for every fp8 layer; None: as the
            checkpoint says (DeepSeek format: "dynamic"; compressed-tensors: each group's
            ``input_activations``, "none" where it has none).

    Returns: a :class:`QuantizationSummary` of the fp8 layers loaded.

    Raises: :class:`CheckpointError` (a ValueError; :class:`CheckpointDtypeError` is also a TypeError,
    :class:`CorruptCheckpointError` also a RuntimeError) naming the tensor key or field and the
    file. On any error the model is unchanged.
    """
    if requantize_block is not None and requantize_block not in MATMUL_BLOCKS:
        raise ValueError(
            f"requantize_block: expected one of {MATMUL_BLOCKS} or None, got {requantize_block!r}"
        )
    if activation is not None:
        Fp8Config(activation=activation)  # validates the name
    # Validation: read and check everything, build the new layers.
    root, files = _files(path)
    fmt = _read_config(root, activation)
    tensors = _read_tensors(files)
    plan = _plan(model, tensors, fmt, requantize_block, strict, activation)
    # Commit: only steps that cannot fail on checked input.
    _commit(model, plan)
    return plan.summary


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _tie_groups(model: nn.Module) -> dict[str, frozenset[str]]:
    """state_dict key -> every key holding the same tensor (same Parameter / buffer object)."""
    by_id: dict[int, set[str]] = {}
    for name, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        by_id.setdefault(id(t), set()).add(name)
    return {name: frozenset(group) for group in by_id.values() for name in group}


def _plan(
    model: nn.Module,
    tensors: dict[str, tuple[torch.Tensor, str]],
    fmt: _FileFormat | _ct.CompressedTensorsFormat,
    requantize_block: int | None,
    strict: bool,
    activation: str | None,
    file_keys: Collection[str] | None = None,
) -> _Plan:
    """Read and check everything :func:`load` will do (nothing changes). ``file_keys``: every key of
    the checkpoint's files, which decide per experts module whether the file uses Mixtral's names
    (:func:`_mixtral_experts`); default: the keys of ``tensors`` (distributed.checkpoint.load passes
    the files' keys: it reads local experts' per-expert keys into fused tensors and never reads
    other ranks')."""
    summary = QuantizationSummary()
    used: set[str] = set()
    new_layers: dict[str, nn.Module] = {}
    fill_layers: dict[str, Fp8BlockwiseLinear] = {}
    parents = module_parents(model)
    handled: set[str] = set()  # experts modules: their keys are planned by experts.py
    experts = {name for name, m in model.named_modules() if _experts.is_fused_experts(m)}
    # Experts stored under Mixtral's original names; their MoE blocks' other keys (the router) too.
    mixtral = _mixtral_experts(experts, tensors if file_keys is None else file_keys)
    aliases = _mixtral_aliases(mixtral)
    stored = {name: _stored_key(name, aliases) for name in experts}
    # Each key's dotted prefixes looked up once (not every key tested per experts module: DeepSeek-V3
    # has 58 of them and ~90k keys).
    under = _keys_under(tensors, set(stored.values()))

    for name, module in model.named_modules():
        if name in experts:  # MoE experts: per-expert or fused fp8 keys (experts.py)
            for key in under[stored[name]]:  # the same value checks as a Linear's weight
                t, file = tensors[key]
                if t.dtype in FP8_DTYPES:
                    if fmt.explicit:
                        raise CheckpointError(
                            f"{key} in {file}: MoE experts in a compressed-tensors checkpoint are not "
                            "supported yet (the 'fp8' / DeepSeek format's per-expert keys are)"
                        )
                    _check_fp8_codes(key, t, file)
            file_config = Fp8Config(fmt.block, activation or fmt.activation, fmt.dtype, fmt.scale_format)
            layer, keys, reports = _experts.plan_load(
                name, module, tensors, file_config, requantize_block,
                lambda key, t, file: _scale_as_float32(key, t, file, fmt), CheckpointError, CheckpointDtypeError,
                mixtral=name in mixtral,
            )  # fmt: skip
            if layer is not None:
                used.update(keys)
                summary.converted.update(reports)
                handled.add(name)
                new_layers[name] = layer
            continue
        if not isinstance(module, (nn.Linear, Fp8BlockwiseLinear)):
            continue
        key_name = _stored_key(name, aliases)  # a Linear inside a Mixtral MoE block: block_sparse_moe.
        layer_fmt = _layer_format(key_name, module, tensors, fmt, parents.get(id(module), []))
        if layer_fmt is None:
            continue  # a Linear kept in high precision: loaded with the rest
        file_config = Fp8Config(
            layer_fmt.block, activation or layer_fmt.activation, layer_fmt.dtype, layer_fmt.scale_format
        )
        layer, report, keys = _plan_layer(key_name, module, tensors, layer_fmt, file_config, strict, fmt)
        if requantize_block is not None and layer_fmt.block != (requantize_block, requantize_block):
            old = layer
            layer = requantize(old, requantize_block)
            report.block_shape = layer.config.block_shape
            report.bytes_after = _nbytes(layer.weight, layer.weight_scale_inv, layer.bias)
            report.sqnr_vs_128_db = weight_sqnr_db(layer.dequantized_weight(), old.dequantized_weight())
        summary.converted[name] = report
        used.update(keys)
        (fill_layers if isinstance(module, Fp8BlockwiseLinear) else new_layers)[name] = layer

    rest, any_meta = _plan_rest(model, tensors, handled | set(summary.converted), used, strict, aliases)
    unexpected = sorted(set(tensors) - used)
    if strict and unexpected:
        key = unexpected[0]
        raise CheckpointError(
            f"{key} in {tensors[key][1]}: unexpected, the model has no such tensor ({len(unexpected)} unexpected keys)"
        )
    if unexpected:
        logger.warning("checkpoint.load: ignored %d unexpected keys, e.g. %s", len(unexpected), unexpected[0])
    return _Plan(new_layers, fill_layers, rest, summary, assign=any_meta)


def _mixtral_experts(experts: Iterable[str], keys: Collection[str]) -> set[str]:
    """The experts modules (model names in ``experts``) whose per-expert keys a checkpoint holding
    ``keys`` stores under Mixtral's original names (:func:`.experts.file_uses_mixtral_names`)."""
    return {name for name in experts if _experts.file_uses_mixtral_names(name, keys)}


def _mixtral_aliases(mixtral: Iterable[str]) -> dict[str, str]:
    """Model module name -> the checkpoint's name (:func:`_stored_key`) of each MoE block holding an
    experts module of ``mixtral``: ``model.layers.0.mlp`` -> ``model.layers.0.block_sparse_moe``
    (the whole block is stored there: its router, a Linear in it)."""
    aliases = dict(_experts.mixtral_block_names(name) for name in mixtral)
    return {block: stored for block, stored in aliases.items() if block != stored}


def _keys_under(tensors: dict[str, object], names: set[str]) -> dict[str, list[str]]:
    """name -> the keys of ``tensors`` that start with ``name + "."``, for every name in ``names``: one
    pass over the keys, each key's dotted prefixes looked up in a set (O(keys x depth), not
    O(keys x names))."""
    out: dict[str, list[str]] = {name: [] for name in names}
    for key in tensors:
        dot = key.find(".")
        while dot != -1:
            found = out.get(key[:dot])
            if found is not None:
                found.append(key)
            dot = key.find(".", dot + 1)
    return out


def _under_any(key: str, names: set[str]) -> bool:
    """Whether ``key.startswith(name + ".")`` for some ``name`` in ``names``: each of the key's dotted
    prefixes looked up once (O(depth) per key, not O(len(names)): DeepSeek-V3 has ~1,400 state keys
    and ~1,000 fp8 layers)."""
    dot = key.find(".")
    while dot != -1:
        if key[:dot] in names:
            return True
        dot = key.find(".", dot + 1)
    return False


def _stored_key(key: str, aliases: dict[str, str]) -> str:
    """The checkpoint's name of model key (or module name) ``key``: its shortest dotted prefix found in
    ``aliases`` (model module name -> checkpoint name: ``model.layers.0.mlp`` ->
    ``model.layers.0.block_sparse_moe`` for Mixtral) replaced; ``key`` itself when none is."""
    if aliases:
        for prefix in _prefixes(key):
            if prefix in aliases:
                return aliases[prefix] + key[len(prefix) :]
    return key


def _prefixes(key: str) -> list[str]:
    """``"a.b.c"`` -> ["a", "a.b", "a.b.c"]."""
    parts = key.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _layer_format(
    name: str,
    module: nn.Module,
    tensors: dict[str, tuple[torch.Tensor, str]],
    fmt: _FileFormat | _ct.CompressedTensorsFormat,
    parents: list[nn.Module],
) -> _FileFormat | _ct.LayerScheme | None:
    """How Linear ``name`` is stored (None: in high precision). DeepSeek format: fp8 when its
    weight_scale_inv is in the file. compressed-tensors: as config.json's targets / ignore say,
    and the file must agree."""
    if not fmt.explicit:
        return fmt if _has_fp8_weight(name, module, tensors, parents) else None
    s_key = f"{name}{fmt.scale_suffix}"
    scheme = fmt.layer(name, module)
    if (scheme is None) == (s_key in tensors):
        raise CheckpointError(_config_disagrees(name, s_key, tensors, scheme))
    if scheme is None:
        if isinstance(module, Fp8BlockwiseLinear):
            raise CheckpointError(
                f"{name}: an Fp8BlockwiseLinear, but the quantization_config in config.json keeps it "
                "in high precision (no target matches it, or ignore does)"
            )
        return None
    reason = fp8_ineligible_reason(module, parents)
    if reason is not None:
        raise CheckpointError(
            f"{name}: {tensors[s_key][1]} stores it in fp8 ({s_key}), but it cannot be an "
            f"Fp8BlockwiseLinear: it is {reason}"
        )
    if f"{name}.weight" not in tensors:
        raise CheckpointError(f"{name}.weight: missing, but {s_key} is in {tensors[s_key][1]}")
    return scheme


def _config_disagrees(
    name: str, s_key: str, tensors: dict[str, tuple[torch.Tensor, str]], scheme: _ct.LayerScheme | None
) -> str:
    """The message when config.json's targets / ignore and the file's tensors disagree on ``name``."""
    if scheme is None:
        return (
            f"{s_key} in {tensors[s_key][1]}: the quantization_config in config.json keeps {name} in "
            "high precision (no target matches it, or ignore does), but the file holds its fp8 scales"
        )
    return (
        f"{s_key}: missing, but the quantization_config in config.json targets {name} "
        f"(config_groups.{scheme.group}) (files: {sorted({f for _, f in tensors.values()})})"
    )


def _has_fp8_weight(
    name: str, module: nn.Module, tensors: dict[str, tuple[torch.Tensor, str]], parents: list[nn.Module]
) -> bool:
    """Whether the checkpoint stores Linear ``name`` in fp8 (its weight_scale_inv is there); raises
    when that is inconsistent: an fp8 weight without its scales, an fp8 layer of the model
    without them, or a layer that cannot be an Fp8BlockwiseLinear (fp8_ineligible_reason)."""
    w_key, s_key = f"{name}.weight", f"{name}{SCALE_SUFFIX}"
    weight = tensors.get(w_key)
    fp8_weight = weight is not None and weight[0].dtype in FP8_DTYPES
    if s_key in tensors or fp8_weight:
        reason = fp8_ineligible_reason(module, parents)
        if reason is not None:
            where = tensors[s_key if s_key in tensors else w_key][1]
            raise CheckpointError(
                f"{name}: {where} stores it in fp8 ({s_key if s_key in tensors else w_key}), but it "
                f"cannot be an Fp8BlockwiseLinear: it is {reason}"
            )
    if s_key in tensors:
        if weight is None:
            raise CheckpointError(f"{w_key}: missing, but {s_key} is in {tensors[s_key][1]}")
        return True
    if fp8_weight:
        found = f"{name}.weight_scale"
        if found in tensors:
            raise CheckpointError(
                f"{s_key}: missing; found {found} in {tensors[found][1]} instead, which is "
                "compressed-tensors' name, but config.json declares the 'fp8' format, whose block "
                "scales are called weight_scale_inv"
            )
        raise CheckpointError(
            f"{s_key}: missing, but {w_key} in {weight[1]} is {weight[0].dtype} "
            "(an fp8 weight needs its block scales)"
        )
    if isinstance(module, Fp8BlockwiseLinear):
        raise CheckpointError(
            f"{s_key}: missing from the checkpoint, and {name} is an Fp8BlockwiseLinear "
            f"(files: {sorted({f for _, f in tensors.values()})})"
        )
    return False


def _plan_layer(
    name: str,
    module: nn.Module,
    tensors: dict[str, tuple[torch.Tensor, str]],
    fmt: _FileFormat | _ct.LayerScheme,
    file_config: Fp8Config,
    strict: bool,
    file_fmt: _FileFormat | _ct.CompressedTensorsFormat,
) -> tuple[Fp8BlockwiseLinear, LayerReport, list[str]]:
    """The Fp8BlockwiseLinear for layer ``name`` from its checked weight, scales and bias; its
    report; the checkpoint keys it used."""
    w_key, s_key, b_key = f"{name}.weight", f"{name}{file_fmt.scale_suffix}", f"{name}.bias"
    (weight, w_file), (scale, s_file) = tensors[w_key], tensors[s_key]
    n, k = module.out_features, module.in_features
    if weight.dtype != fmt.dtype:
        raise CheckpointDtypeError(
            f"{w_key} in {w_file}: expected {fmt.dtype} (fmt in config.json), got {weight.dtype}"
        )
    if tuple(weight.shape) != (n, k):
        raise CheckpointError(
            f"{w_key} in {w_file}: expected shape ({n}, {k}) for the model's layer "
            f"(out_features={n}, in_features={k}), got {tuple(weight.shape)}"
        )
    _check_fp8_codes(w_key, weight, w_file)
    scale = _scale_as_float32(s_key, scale, s_file, fmt)
    bn, bk = fmt.block
    grid = (cdiv(n, bn), cdiv(k, bk))
    if tuple(scale.shape) != grid:
        raise CheckpointError(
            f"{s_key} in {s_file}: expected shape {grid} (weight [{n}, {k}] in {bn}x{bk} blocks, "
            f"{'block_structure' if file_fmt.explicit else 'weight_block_size'} in config.json), "
            f"got {tuple(scale.shape)}"
        )
    keys = [w_key, s_key]
    bias = None
    if module.bias is not None:
        if b_key not in tensors:
            if strict:
                raise CheckpointError(f"{b_key}: missing from the checkpoint (the model's {name} has a bias)")
            bias = module.bias.detach()
        else:
            bias, b_file = tensors[b_key]
            if bias.dtype not in HIGH_PRECISION_DTYPES or tuple(bias.shape) != (n,):
                raise CheckpointError(
                    f"{b_key} in {b_file}: expected a ({n},) float tensor, got {tuple(bias.shape)} {bias.dtype}"
                )
            keys.append(b_key)
            bias = bias.to(module.bias.dtype)  # the model's dtype, also on the meta device
    elif b_key in tensors and strict:
        raise CheckpointError(f"{b_key} in {tensors[b_key][1]}: unexpected, the model's {name} has no bias")

    # A meta layer is created where the file's tensors are (CPU; the xla device for
    # distributed.xla_checkpoint, which places each tensor on the device as it is read).
    device = module.weight.device if module.weight.device.type != "meta" else weight.device
    bias = None if bias is None else bias.to(device)
    layer = Fp8BlockwiseLinear.from_quantized(weight.to(device), scale.to(device), bias, file_config)
    size = _nbytes(weight, scale, bias)
    report = LayerReport(n, k, fmt.block, bytes_before=size, bytes_after=size, sqnr_db=None)
    return layer, report, keys


def _plan_rest(
    model: nn.Module,
    tensors: dict[str, tuple[torch.Tensor, str]],
    handled: set[str],
    used: set[str],
    strict: bool,
    aliases: dict[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], bool]:
    """Every other model tensor, like load_state_dict but checked before anything changes:
    (key -> tensor in the model's dtype, whether any target is on the meta device). ``handled``:
    names of the modules already planned (fp8 layers, experts), whose keys (``<name>.``...) are
    skipped. ``aliases``: model module name -> the checkpoint's name of it (:func:`_stored_key`);
    errors name the checkpoint's key."""
    aliases = aliases or {}
    ties = _tie_groups(model)
    rest: dict[str, torch.Tensor] = {}
    any_meta = False
    for key, target in model.state_dict().items():
        if _under_any(key, handled):
            continue
        stored = _stored_key(key, aliases)
        if stored not in tensors:
            if strict and not any(_stored_key(k, aliases) in tensors for k in ties.get(key, ())):
                raise CheckpointError(
                    f"{stored}: missing from the checkpoint (files: {sorted({f for _, f in tensors.values()})})"
                )
            continue
        t, file = tensors[stored]
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{stored} in {file}: expected shape {tuple(target.shape)}, got {tuple(t.shape)}"
            )
        _check_dtype(model, key, t, file, target.dtype, stored)
        any_meta = any_meta or target.device.type == "meta"
        rest[key] = t.to(target.dtype)  # only float -> float gets here with another dtype
        used.add(stored)
    return rest, any_meta


def _check_dtype(
    model: nn.Module, key: str, t: torch.Tensor, file: str, target: torch.dtype, stored: str | None = None
) -> None:
    """A checkpoint tensor may differ in dtype from the model's only when both are high-precision
    floating point (then it is cast, as load_state_dict does); no fp8, int or bool is cast. ``key``:
    the model's key; ``stored``: the checkpoint's name of it (errors name that), default ``key``."""
    owner_key, key = key, stored or key
    if t.dtype in FP8_DTYPES and target not in FP8_DTYPES:
        owner_name = owner_key.rpartition(".")[0]
        owner = model.get_submodule(owner_name) if owner_name else model
        reason = fp8_ineligible_reason(owner) or "not an Fp8BlockwiseLinear"
        raise CheckpointDtypeError(
            f"{key} in {file}: is {t.dtype}, but the model's tensor is {target}: "
            f"{owner_name or 'the model'} is {reason}"
        )
    if t.dtype == target:
        if t.dtype in FP8_DTYPES:
            _check_fp8_codes(key, t, file)
        if t.dtype == torch.bool and t.numel() and int(t.view(torch.uint8).max()) > 1:
            raise CheckpointError(f"{key} in {file}: a bool tensor holds bytes other than 0 and 1")
        return
    if not (t.dtype.is_floating_point and target.is_floating_point and target not in FP8_DTYPES):
        raise CheckpointDtypeError(
            f"{key} in {file}: expected {target} (the model's dtype), got {t.dtype}; only floating-point "
            "tensors are converted to the model's dtype (no int, bool or fp8 cast)"
        )


def _commit(model: nn.Module, plan: _Plan) -> None:
    """Apply a checked plan. Only steps that cannot fail on checked input happen here."""
    for name, layer in plan.new_layers.items():
        parent, attr = _owner(model, name)
        setattr(parent, attr, layer)
    for name, layer in plan.fill_layers.items():
        target = model.get_submodule(name)
        target.config = layer.config
        target._buffers["weight"] = layer.weight
        target._buffers["weight_scale_inv"] = layer.weight_scale_inv
        if layer.bias is not None:
            target.bias = layer.bias
    if plan.rest:  # every key is a model key of the checked shape and dtype: this cannot half-fail
        model.load_state_dict(plan.rest, strict=False, assign=plan.assign)
