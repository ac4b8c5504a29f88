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
from dataclasses import dataclass

import torch
from torch import nn

from . import compressed_tensors as _ct
from .formats import E8M0_NAN, FP8_DTYPES, HIGH_PRECISION_DTYPES, MATMUL_BLOCKS, cdiv, e8m0_to_float
from .nn import (
    DEFAULT_BLOCK,
    Fp8BlockwiseLinear,
    Fp8Config,
    LayerReport,
    QuantizationSummary,
    _nbytes,
    logger,
    requantize,
    storage_key,
    weight_sqnr_db,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
SCALE_SUFFIX = ".weight_scale_inv"

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

    Fp8BlockwiseLinear layers become ``weight`` (fp8) + ``weight_scale_inv`` (float32); all other
    state (norms, embeddings, biases, nn.Linear layers left in high precision) is written as it is.
    Tied tensors (an lm_head sharing the embedding) are written once, under their first name, as
    transformers does. ``config.json`` gets the ``quantization_config``: merged into
    ``model.config.to_dict()`` for a transformers model, else into an existing ``path/config.json``,
    else written alone. All fp8 layers must share one block shape, fp8 dtype and scale format (the
    format has one ``weight_block_size``). Layers left in high precision are listed in
    ``modules_to_not_convert``.

    Args:
        max_shard_bytes: split into shards of at most this many bytes (a tensor larger than that
            gets a shard of its own) plus ``model.safetensors.index.json``; None: one file.
        format: "fp8" (DeepSeek / HF: ``weight_scale_inv``, ``quant_method: "fp8"``) or
            "compressed-tensors" (llm-compressor's FP8_BLOCK layout, which vLLM's compressed-tensors
            path reads: scales named ``weight_scale``, written in float32, one config group per
            block shape and activation; float8_e5m2 layers are refused). Layers left in high
            precision are listed in ``ignore`` there.

    Returns: the names of the files written (relative to ``path``).
    """
    from safetensors.torch import save_file

    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0):
        raise ValueError(f"max_shard_bytes: expected a positive int or None, got {max_shard_bytes!r}")
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Fp8BlockwiseLinear)}
    quant = _quantization_config(model, layers) if format == "fp8" else _ct.quantization_config(model, layers)

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
    if format == _ct.QUANT_METHOD:
        tensors = {_ct.checkpoint_key(key, t, layers): t for key, t in tensors.items()}

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


def _quantization_config(model: nn.Module, layers: dict[str, Fp8BlockwiseLinear]) -> dict | None:
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
    kept = sorted(name for name, m in model.named_modules() if type(m) is nn.Linear)
    if kept:
        quant["modules_to_not_convert"] = kept
    return quant


def _base_config(model: nn.Module, path: str | os.PathLike) -> dict:
    hf_config = getattr(model, "config", None)
    if hf_config is not None and callable(getattr(hf_config, "to_dict", None)):
        return dict(hf_config.to_dict())
    existing = os.path.join(path, CONFIG_FILE)
    if os.path.exists(existing):
        with open(existing) as f:
            return json.load(f)
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


# ------------------------------------------------------------------------------------------ load
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


def _read_config(
    root: str, activation: str | None = None
) -> tuple[_FileFormat | _ct.CompressedTensorsFormat, str]:
    """The checkpoint's fp8 format from config.json (DeepSeek defaults when it has none)."""
    cfg_path = os.path.join(root, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        return _FileFormat(DEFAULT_BLOCK, torch.float8_e4m3fn, "fp32"), "(no config.json)"
    try:
        with open(cfg_path) as f:
            quant = json.load(f).get("quantization_config")
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read it as JSON: {e}") from e
    if quant is None:
        return _FileFormat(DEFAULT_BLOCK, torch.float8_e4m3fn, "fp32"), cfg_path
    where = f"quantization_config in {cfg_path}"
    if isinstance(quant, dict) and quant.get("quant_method") == _ct.QUANT_METHOD:
        try:
            return _ct.parse_quantization_config(quant, activation), cfg_path
        except _ct.ConfigError as e:
            raise CheckpointError(f"{where}: {e}") from e
    if quant.get("quant_method", "fp8") != "fp8":
        raise CheckpointError(f"{where}: quant_method {quant.get('quant_method')!r} is not 'fp8'")
    block = quant.get("weight_block_size", list(DEFAULT_BLOCK))
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and b in MATMUL_BLOCKS for b in block)
    ):
        raise CheckpointError(
            f"{where}: weight_block_size {block!r} is not supported; blockwise_matmul runs blocks with "
            f"bn and bk each in {MATMUL_BLOCKS} (a per-tensor/per-channel fp8 checkpoint has no block size)"
        )
    fmt = quant.get("fmt", "e4m3")
    if fmt not in _FMT_DTYPES:
        raise CheckpointError(f"{where}: fmt {fmt!r} is not one of {tuple(_FMT_DTYPES)}")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError(
            f"{where}: activation_scheme {quant['activation_scheme']!r} is not supported "
            "(only 'dynamic': activations are quantized per 1 x bk group at run time)"
        )
    scale_fmt = quant.get("scale_fmt")
    if scale_fmt not in (None, "float", "ue8m0"):
        raise CheckpointError(f"{where}: scale_fmt {scale_fmt!r} is not one of 'float', 'ue8m0'")
    scale_format = "ue8m0" if scale_fmt == "ue8m0" else "fp32"
    return _FileFormat((block[0], block[1]), _FMT_DTYPES[fmt], scale_format), cfg_path


def _files(path: str | os.PathLike) -> tuple[str, dict[str, list[str]]]:
    """(root directory, file -> keys it should hold; None keys = read the file's own list)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".json"):
            root = os.path.dirname(path)
            return root, _index(path, root)
        return os.path.dirname(path), {path: []}
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        return path, _index(index, path)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(single):
        return path, {single: []}
    raise FileNotFoundError(f"checkpoint.load: no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def _index(index: str, root: str) -> dict[str, list[str]]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index with a weight_map: {e}") from e
    files: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        files.setdefault(os.path.join(root, name), []).append(key)
    return files


def _read_tensors(files: dict[str, list[str]]) -> dict[str, tuple[torch.Tensor, str]]:
    """key -> (tensor on CPU, file), every read error wrapped with the file's name."""
    from safetensors import safe_open

    out: dict[str, tuple[torch.Tensor, str]] = {}
    for file, expected in files.items():
        key = None
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                keys = list(f.keys())
                missing = sorted(set(expected) - set(keys))
                if missing:
                    raise CorruptCheckpointError(
                        f"{missing[0]}: listed in the index for {file}, but that file does not hold it "
                        f"({len(missing)} such keys)"
                    )
                for key in keys:
                    if key in out:
                        raise CheckpointError(f"{key}: in both {out[key][1]} and {file}")
                    out[key] = (f.get_tensor(key), file)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises SafetensorError / OSError for bad files
            what = f"{key}: " if key is not None else ""
            raise CorruptCheckpointError(f"{what}cannot read {file} (truncated or corrupt?): {e}") from e
    return out


def _scale_as_float32(key: str, scale: torch.Tensor, file: str, fmt: _FileFormat) -> torch.Tensor:
    """weight_scale_inv as float32: float32 as it is; bfloat16 / float16 upcast (exact);
    E8M0 (float8_e8m0fnu, or uint8 bits with scale_fmt ue8m0) decoded to powers of two."""
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
    if not torch.isfinite(out).all() or not (out > 0).all():
        raise CheckpointError(f"{key} in {file}: scales must be finite and positive")
    if fmt.scale_format == "ue8m0" and (out.view(torch.int32) & 0x7FFFFF).any():
        raise CheckpointError(f"{key} in {file}: scale_fmt is 'ue8m0' but some scales are not powers of two")
    return out.contiguous()


@dataclass
class _Plan:
    """Everything load() will do to the model, built and checked before any change."""

    new_layers: dict[str, Fp8BlockwiseLinear]
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
    """Load a DeepSeek / HF fp8 or a compressed-tensors FP8 block checkpoint (directory,
    ``.safetensors`` file or index json) into ``model``.

    Each ``nn.Linear`` whose weight has a ``weight_scale_inv`` in the checkpoint becomes an
    :class:`Fp8BlockwiseLinear` holding the file's fp8 tensors as they are (no dequantize, no
    re-quantize); each existing Fp8BlockwiseLinear gets the file's tensors (and the file's block
    shape / scale format). Everything else is loaded like ``load_state_dict`` (into the model's dtype;
    assigned when the model's tensors are on the meta device). Layers are created on the device of
    the Linear they replace (CPU for meta).

    compressed-tensors (``quant_method: "compressed-tensors"``, llm-compressor's FP8_BLOCK): the
    config's ``targets`` / ``ignore`` say which layers are fp8 (their scales are ``weight_scale``,
    bf16 / fp16 / fp32, upcast exactly); a file whose tensors disagree with it, or a scheme we
    cannot run (:mod:`.compressed_tensors` lists them), raises naming config.json and the field.

    Args:
        requantize_block: 128, 256 or 512: re-quantize every fp8 weight to (b, b) blocks (dequantize
            in float32 at the file's blocks, quantize at the new ones). For TPU, where a 128-deep K
            block can use at most half of a 256-deep MXU. The summary reports each layer's SQNR vs the
            file's weight (``sqnr_vs_128_db``).
        strict: every model tensor must be in the checkpoint and every checkpoint tensor must be used
            (tied tensors count once).
        activation: "dynamic" (W8A8) or "none" (W8A16) for every fp8 layer; None: as the
            checkpoint says (DeepSeek format: "dynamic"; compressed-tensors: each group's
            ``input_activations``, "none" where it has none).

    Returns: a :class:`QuantizationSummary` of the fp8 layers loaded.

    Raises: :class:`CheckpointError` (a ValueError; :class:`CheckpointDtypeError` is also a TypeError,
    :class:`CorruptCheckpointError` also a RuntimeError) naming the tensor key and the file. On any
    error the model is unchanged.
    """
    if requantize_block is not None and requantize_block not in MATMUL_BLOCKS:
        raise ValueError(
            f"requantize_block: expected one of {MATMUL_BLOCKS} or None, got {requantize_block!r}"
        )
    if activation is not None:
        Fp8Config(activation=activation)  # validates the name
    root, files = _files(path)
    fmt, _ = _read_config(root, activation)
    tensors = _read_tensors(files)
    plan = _plan(model, tensors, fmt, requantize_block, strict, activation)
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
) -> _Plan:
    summary = QuantizationSummary()
    used: set[str] = set()
    new_layers: dict[str, Fp8BlockwiseLinear] = {}
    fill_layers: dict[str, Fp8BlockwiseLinear] = {}
    handled_prefixes: list[str] = []

    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Fp8BlockwiseLinear)):
            continue
        w_key, s_key, b_key = f"{name}.weight", f"{name}{fmt.scale_suffix}", f"{name}.bias"
        layer_fmt = fmt.layer(name, module) if fmt.explicit or s_key in tensors else None
        if fmt.explicit and (layer_fmt is None) == (s_key in tensors):
            raise CheckpointError(_config_disagrees(name, s_key, tensors, layer_fmt))
        if layer_fmt is None:
            if w_key in tensors and tensors[w_key][0].dtype in FP8_DTYPES:
                raise CheckpointError(
                    f"{s_key}: missing, but {w_key} in {tensors[w_key][1]} is {tensors[w_key][0].dtype} "
                    "(an fp8 weight needs its block scales)"
                )
            if isinstance(module, Fp8BlockwiseLinear):
                raise CheckpointError(
                    f"{s_key}: missing from the checkpoint, and {name} is an Fp8BlockwiseLinear "
                    f"(files: {sorted({f for _, f in tensors.values()})})"
                )
            continue  # a Linear kept in high precision: loaded with the rest
        if w_key not in tensors:
            raise CheckpointError(f"{w_key}: missing, but {s_key} is in {tensors[s_key][1]}")
        (weight, w_file), (scale, s_file) = tensors[w_key], tensors[s_key]
        n, k = module.out_features, module.in_features
        if weight.dtype != layer_fmt.dtype:
            raise CheckpointDtypeError(
                f"{w_key} in {w_file}: expected {layer_fmt.dtype} (fmt in config.json), got {weight.dtype}"
            )
        if tuple(weight.shape) != (n, k):
            raise CheckpointError(
                f"{w_key} in {w_file}: expected shape ({n}, {k}) for the model's layer "
                f"(out_features={n}, in_features={k}), got {tuple(weight.shape)}"
            )
        scale = _scale_as_float32(s_key, scale, s_file, layer_fmt)
        bn, bk = layer_fmt.block
        grid = (cdiv(n, bn), cdiv(k, bk))
        if tuple(scale.shape) != grid:
            raise CheckpointError(
                f"{s_key} in {s_file}: expected shape {grid} (weight [{n}, {k}] in {bn}x{bk} blocks, "
                f"{'block_structure' if fmt.explicit else 'weight_block_size'} in config.json), "
                f"got {tuple(scale.shape)}"
            )
        bias = None
        if module.bias is not None:
            if b_key not in tensors:
                if strict:
                    raise CheckpointError(
                        f"{b_key}: missing from the checkpoint (the model's {name} has a bias)"
                    )
                bias = module.bias.detach()
            else:
                bias, b_file = tensors[b_key]
                if bias.dtype not in HIGH_PRECISION_DTYPES or tuple(bias.shape) != (n,):
                    raise CheckpointError(
                        f"{b_key} in {b_file}: expected a ({n},) float tensor, got {tuple(bias.shape)} {bias.dtype}"
                    )
                used.add(b_key)
                if module.bias.device.type != "meta":
                    bias = bias.to(module.bias.dtype)
        elif b_key in tensors and strict:
            raise CheckpointError(
                f"{b_key} in {tensors[b_key][1]}: unexpected, the model's {name} has no bias"
            )
        used.update((w_key, s_key))

        device = module.weight.device if module.weight.device.type != "meta" else torch.device("cpu")
        bias = None if bias is None else bias.to(device)
        file_config = Fp8Config(
            layer_fmt.block, activation or layer_fmt.activation, layer_fmt.dtype, layer_fmt.scale_format
        )
        layer = Fp8BlockwiseLinear.from_quantized(weight.to(device), scale.to(device), bias, file_config)
        report = LayerReport(
            out_features=n,
            in_features=k,
            block_shape=layer_fmt.block,
            bytes_before=_nbytes(weight, scale, bias),
            bytes_after=_nbytes(weight, scale, bias),
            sqnr_db=None,
        )
        if requantize_block is not None and layer_fmt.block != (requantize_block, requantize_block):
            old = layer
            layer = requantize(old, requantize_block)
            report.block_shape = layer.config.block_shape
            report.bytes_after = _nbytes(layer.weight, layer.weight_scale_inv, layer.bias)
            report.sqnr_vs_128_db = weight_sqnr_db(layer.dequantized_weight(), old.dequantized_weight())
        summary.converted[name] = report
        handled_prefixes.append(name + ".")
        if isinstance(module, Fp8BlockwiseLinear):
            fill_layers[name] = layer
        else:
            new_layers[name] = layer

    # Everything else: like load_state_dict, checked before anything changes.
    model_state = model.state_dict()
    ties = _tie_groups(model)
    rest: dict[str, torch.Tensor] = {}
    any_meta = False
    for key, target in model_state.items():
        if any(key.startswith(p) for p in handled_prefixes):
            continue
        if key not in tensors:
            if strict and not any(k in tensors for k in ties.get(key, ())):
                raise CheckpointError(
                    f"{key}: missing from the checkpoint (files: {sorted({f for _, f in tensors.values()})})"
                )
            continue
        t, file = tensors[key]
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{key} in {file}: expected shape {tuple(target.shape)}, got {tuple(t.shape)}"
            )
        if t.dtype in FP8_DTYPES and target.dtype not in FP8_DTYPES:
            raise CheckpointDtypeError(
                f"{key} in {file}: is {t.dtype}, but the model's tensor is {target.dtype} and no "
                f"{key.rpartition('.')[0]}{fmt.scale_suffix} says how to scale it"
            )
        if t.is_floating_point() != target.is_floating_point():
            raise CheckpointDtypeError(f"{key} in {file}: expected a {target.dtype} tensor, got {t.dtype}")
        any_meta = any_meta or target.device.type == "meta"
        rest[key] = t
        used.add(key)
    unexpected = sorted(set(tensors) - used)
    if strict and unexpected:
        key = unexpected[0]
        raise CheckpointError(
            f"{key} in {tensors[key][1]}: unexpected, the model has no such tensor ({len(unexpected)} unexpected keys)"
        )
    if unexpected:
        logger.warning("checkpoint.load: ignored %d unexpected keys, e.g. %s", len(unexpected), unexpected[0])
    return _Plan(new_layers, fill_layers, rest, summary, assign=any_meta)


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
    if plan.rest:  # every key is a model key of the checked shape: this cannot half-fail
        model.load_state_dict(plan.rest, strict=False, assign=plan.assign)
