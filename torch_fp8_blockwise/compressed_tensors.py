"""compressed-tensors (llm-compressor) FP8 block checkpoints: the ``quantization_config`` reader,
the targets / ignore matcher and the config writer that :mod:`.checkpoint` uses.

What llm-compressor's ``FP8_BLOCK`` scheme writes (compressed-tensors 0.19-0.20):

* ``<layer>.weight``: [N, K] float8_e4m3fn, row-major (as in the DeepSeek format).
* ``<layer>.weight_scale``: [cdiv(N, bn), cdiv(K, bk)] in the model's dtype (e.g. bfloat16); a
  MULTIPLIER like DeepSeek's ``weight_scale_inv``: ``weight ~= weight.float() * weight_scale``.
  An all-zero block gets ``finfo(scale dtype).eps`` (its codes are 0).
* ``config.json`` ``quantization_config``::

    {"quant_method": "compressed-tensors", "format": "float-quantized",
     "quantization_status": "compressed", "ignore": ["lm_head"],
     "config_groups": {"group_0": {"targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128],
                    "symmetric": true, "dynamic": false},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128,
                              "symmetric": true, "dynamic": true}}}}

  ``targets`` / ``ignore`` entries are exact module names, ``"re:<pattern>"`` (``re.match`` on the
  module name) or class names (any class in the module's MRO; ``"Linear"`` also names an
  :class:`Fp8BlockwiseLinear`, which stands in for an ``nn.Linear``). A module matched by several
  groups gets, as in compressed-tensors, the scheme of its first target in the order exact name,
  regex, class name (each alphabetical); a target repeated in a later group belongs to that group.

What we run: weights as above; ``input_activations`` dynamic per 1 x ``group_size`` group with
``group_size == bk`` -> ``Fp8Config.activation = "dynamic"`` (W8A8), none -> ``"none"`` (W8A16).
Everything else is refused with the field and the reason (:class:`ConfigError`): asymmetric
schemes (zero points), static or per-token / per-tensor activation scales, ``num_bits`` != 8,
``type`` int, weight strategies other than block, ``quantization_status`` other than compressed,
``format`` other than float-quantized, kv-cache / output-activation / sparsity / transform configs.

Scales: load upcasts the file's bfloat16 / float16 multipliers to our float32 ``weight_scale_inv``,
exactly (every bf16 / fp16 value is a float32). Save writes our float32 scales as they are, not
rounded to the model's dtype: our codes were computed against the float32 scale, and rounding it
to bf16 (8 significant bits) would scale every weight of a block by a factor off by up to 2^-8.
vLLM creates float32 ``weight_scale`` parameters whatever the file holds, so it reads them
exactly; compressed-tensors' own loader (transformers) casts them to the model's dtype, i.e. it
dequantizes ``codes * bf16(scale)`` in a bf16 model (checked with compressed-tensors 0.20.0).

This module imports no safetensors and nothing from :mod:`.checkpoint` (which imports it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .formats import FP8_DTYPES, MATMUL_BLOCKS
from .nn import Fp8BlockwiseLinear

QUANT_METHOD = "compressed-tensors"
FORMAT = "float-quantized"
SCALE_SUFFIX = ".weight_scale"

#: The fields compressed-tensors' QuantizationArgs knows (it forbids others; so do we: an unknown
#: field could change what the numbers mean).
_ARGS_FIELDS = frozenset(
    {
        "num_bits",
        "type",
        "symmetric",
        "group_size",
        "strategy",
        "block_structure",
        "dynamic",
        "actorder",
        "scale_dtype",
        "zp_dtype",
        "observer",
        "observer_kwargs",
    }
)
_SCHEME_FIELDS = frozenset({"targets", "weights", "input_activations", "output_activations", "format"})
_FLOAT_SCALE_DTYPES = ("float32", "bfloat16", "float16")
#: compressed-tensors' preset, as a config_groups entry may name it: {"FP8_BLOCK": ["Linear"]}.
_FP8_BLOCK_PRESET = {
    "weights": {
        "num_bits": 8,
        "type": "float",
        "strategy": "block",
        "block_structure": [128, 128],
        "symmetric": True,
        "dynamic": False,
    },
    "input_activations": {
        "num_bits": 8,
        "type": "float",
        "strategy": "group",
        "group_size": 128,
        "symmetric": True,
        "dynamic": True,
    },
}


class ConfigError(ValueError):
    """A compressed-tensors ``quantization_config`` we cannot honour; the message starts with the
    field (``config_groups.group_0.weights.symmetric``) and says why. :mod:`.checkpoint` re-raises
    it as a ``CheckpointError`` naming config.json."""


@dataclass(frozen=True)
class LayerScheme:
    """How one layer of the file is stored and run (what :class:`.nn.Fp8Config` gets)."""

    group: str
    block: tuple[int, int]
    activation: str  # "dynamic" | "none"
    dtype: torch.dtype = torch.float8_e4m3fn
    scale_format: str = "fp32"


@dataclass(frozen=True)
class CompressedTensorsFormat:
    """A parsed ``quantization_config``: which layers are fp8 and how.

    ``targets`` maps each target string to the scheme of the (last) group naming it; unlike the
    DeepSeek format, the config, not the presence of a scale tensor, says which layers are fp8
    (``explicit``): :mod:`.checkpoint` refuses a file whose tensors disagree with it.
    """

    targets: tuple[tuple[str, LayerScheme], ...]
    ignore: tuple[str, ...]
    scale_suffix: str = SCALE_SUFFIX
    explicit: bool = True

    def layer(self, name: str, module: nn.Module) -> LayerScheme | None:
        """The scheme of module ``name`` (an nn.Linear or Fp8BlockwiseLinear), or None when no
        target matches it or ``ignore`` does (kept in high precision)."""
        if any(matches(name, module, t) for t in self.ignore):
            return None
        by_target = dict(self.targets)
        names = sorted(t for t in by_target if not t.startswith("re:"))
        regexes = sorted(t for t in by_target if t.startswith("re:"))
        for target in (*names, *regexes):
            if _match_name(name, target):
                return by_target[target]
        for target in names:
            if _match_class(module, target):
                return by_target[target]
        return None


def matches(name: str, module: nn.Module, target: str) -> bool:
    """compressed-tensors' rule: ``target`` equals ``name``, or is ``"re:<pattern>"`` and
    ``re.match(pattern, name)``, or is the name of a class in ``type(module).__mro__``."""
    return _match_name(name, target) or _match_class(module, target)


def _match_name(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def _match_class(module: nn.Module, target: str) -> bool:
    if target == "Linear" and isinstance(module, Fp8BlockwiseLinear):
        return True  # our fp8 layer stands in for the nn.Linear the producer quantized
    return any(cls.__name__ == target for cls in type(module).__mro__ if issubclass(cls, nn.Module))


# ------------------------------------------------------------------------------------------- read
def parse_quantization_config(
    quant: Mapping[str, Any], activation: str | None = None
) -> CompressedTensorsFormat:
    """Check a compressed-tensors ``quantization_config`` (the dict under that key in config.json)
    and return what :func:`.checkpoint.load` needs.

    Args:
        quant: the dict; ``quant_method`` must be "compressed-tensors".
        activation: None: each group's ``input_activations`` decide ("dynamic" / "none"), and one
            we cannot run is refused; "dynamic" / "none": the caller overrides them, so they are
            not interpreted (static scales in the file are then unexpected tensors).

    Raises: :class:`ConfigError` naming the field.
    """
    if not isinstance(quant, Mapping):
        raise ConfigError(f"quantization_config: expected an object, got {type(quant).__name__}")
    if quant.get("quant_method") != QUANT_METHOD:
        raise ConfigError(f"quant_method: expected {QUANT_METHOD!r}, got {quant.get('quant_method')!r}")
    status = quant.get("quantization_status")
    if status != "compressed":
        raise ConfigError(
            f"quantization_status: {status!r} is not supported; only 'compressed' files hold fp8 "
            "weights with their scales ('frozen' / 'decompressed' / 'initialized' ones hold high-precision "
            "weights)"
        )
    top_format = quant.get("format")
    if top_format not in (FORMAT, "mixed-precision"):
        raise ConfigError(
            f"format: {top_format!r} is not supported; only {FORMAT!r} (fp8 weights + weight_scale) is"
        )
    for key in ("kv_cache_scheme", "moe_sparsity_config", "sparsity_config", "transform_config"):
        if quant.get(key):
            raise ConfigError(
                f"{key}: {quant[key]!r} is not supported (we run fp8 block-wise Linear layers only; "
                "kv-cache quantization, sparsity and rotations would change the results)"
            )
    ignore = _string_list(quant.get("ignore") or [], "ignore")
    groups = quant.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise ConfigError(f"config_groups: expected a non-empty object, got {groups!r}")
    targets: dict[str, LayerScheme] = {}
    for group, scheme in groups.items():
        field = f"config_groups.{group}"
        if isinstance(scheme, list):  # a preset name with its targets
            if group != "FP8_BLOCK":
                raise ConfigError(f"{field}: preset {group!r} is not supported (only FP8_BLOCK)")
            scheme = {"targets": scheme, **_FP8_BLOCK_PRESET}
        if not isinstance(scheme, Mapping):
            raise ConfigError(f"{field}: expected an object, got {type(scheme).__name__}")
        parsed = _parse_scheme(group, scheme, top_format, activation)
        for target in _string_list(scheme.get("targets"), f"{field}.targets", nonempty=True):
            targets[target] = parsed  # a later group's target wins, as in compressed-tensors
    return CompressedTensorsFormat(tuple(targets.items()), tuple(ignore))


def _parse_scheme(
    group: str, scheme: Mapping[str, Any], top_format: str, activation: str | None
) -> LayerScheme:
    field = f"config_groups.{group}"
    unknown = sorted(set(scheme) - _SCHEME_FIELDS)
    if unknown:
        raise ConfigError(
            f"{field}.{unknown[0]}: unknown field (compressed-tensors knows {sorted(_SCHEME_FIELDS)})"
        )
    fmt = scheme.get("format") or top_format
    if fmt != FORMAT:
        raise ConfigError(
            f"{field}.format: {fmt!r} is not supported; only {FORMAT!r} (fp8 weights + weight_scale) is"
        )
    if scheme.get("output_activations") is not None:
        raise ConfigError(f"{field}.output_activations: output quantization is not supported")
    weights = scheme.get("weights")
    if weights is None:
        raise ConfigError(f"{field}.weights: missing; a group without weight quantization is not supported")
    block = _parse_weights(weights, f"{field}.weights")
    if activation is not None:
        return LayerScheme(str(group), block, activation)
    acts = scheme.get("input_activations")
    if acts is None:
        return LayerScheme(str(group), block, "none")
    _parse_activations(acts, f"{field}.input_activations", block[1])
    return LayerScheme(str(group), block, "dynamic")


def _common_args(args: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(args, Mapping):
        raise ConfigError(f"{field}: expected an object, got {type(args).__name__}")
    unknown = sorted(set(args) - _ARGS_FIELDS)
    if unknown:
        raise ConfigError(
            f"{field}.{unknown[0]}: unknown field (compressed-tensors knows {sorted(_ARGS_FIELDS)})"
        )
    if args.get("num_bits", 8) != 8:
        raise ConfigError(f"{field}.num_bits: {args['num_bits']!r} is not supported (only 8: fp8)")
    kind = str(args.get("type", "int")).lower()  # compressed-tensors' default type is int
    if kind != "float":
        raise ConfigError(
            f"{field}.type: {args.get('type', 'int')!r} is not supported (only 'float': fp8 e4m3)"
        )
    if args.get("symmetric", True) is not True:
        raise ConfigError(
            f"{field}.symmetric: {args['symmetric']!r} is not supported (an asymmetric scheme has zero "
            "points; blockwise_matmul runs symmetric scales only)"
        )
    scale_dtype = args.get("scale_dtype")
    if scale_dtype is not None and str(scale_dtype).removeprefix("torch.") not in _FLOAT_SCALE_DTYPES:
        raise ConfigError(
            f"{field}.scale_dtype: {scale_dtype!r} is not supported (only {_FLOAT_SCALE_DTYPES})"
        )
    return args


def _parse_weights(args: Any, field: str) -> tuple[int, int]:
    args = _common_args(args, field)
    strategy = str(args.get("strategy")).lower()
    if strategy != "block":
        what = {"tensor": "per-tensor", "channel": "per-channel", "group": "per-group"}.get(strategy, "this")
        raise ConfigError(
            f"{field}.strategy: {args.get('strategy')!r} is not supported ({what} fp8 weights have no "
            "block scales; only 'block' is)"
        )
    block = args.get("block_structure")
    if isinstance(block, str) and re.fullmatch(r"\d+x\d+", block):  # compressed-tensors' old "128x128"
        block = [int(b) for b in block.split("x")]
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b in MATMUL_BLOCKS for b in block)
    ):
        raise ConfigError(
            f"{field}.block_structure: {block!r} is not supported; blockwise_matmul runs [bn, bk] with "
            f"each in {MATMUL_BLOCKS}"
        )
    if args.get("dynamic", False) is not False:
        raise ConfigError(
            f"{field}.dynamic: {args['dynamic']!r} is not supported (weights need stored scales)"
        )
    if args.get("group_size") is not None:
        raise ConfigError(
            f"{field}.group_size: {args['group_size']!r} is not supported with strategy 'block'"
        )
    if args.get("actorder") in (True, "group", "dynamic"):
        raise ConfigError(
            f"{field}.actorder: {args['actorder']!r} is not supported (it permutes K with a weight_g_idx)"
        )
    return int(block[0]), int(block[1])


def _parse_activations(args: Any, field: str, bk: int) -> None:
    args = _common_args(args, field)
    override = (
        "; pass activation='dynamic' (per 1 x bk group, as vLLM runs block weights) or 'none' to override"
    )
    dynamic = args.get("dynamic", False)
    if dynamic is not True:
        raise ConfigError(
            f"{field}.dynamic: {dynamic!r} is not supported (static activation scales; blockwise_matmul "
            f"quantizes activations at run time){override}"
        )
    strategy = str(args.get("strategy")).lower()
    if strategy != "group":
        raise ConfigError(
            f"{field}.strategy: {args.get('strategy')!r} is not supported (blockwise_matmul quantizes "
            f"activations per 1 x {bk} group){override}"
        )
    if args.get("group_size") != bk:
        raise ConfigError(
            f"{field}.group_size: {args.get('group_size')!r} is not supported; it must equal the weight "
            f"block's bk = {bk} (activations are quantized per 1 x bk group){override}"
        )


def _string_list(value: Any, field: str, nonempty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (nonempty and not value):
        raise ConfigError(
            f"{field}: expected a{' non-empty' if nonempty else ''} list of strings, got {value!r}"
        )
    for v in value:
        if v.startswith("re:"):
            try:
                re.compile(v[3:])
            except re.error as e:
                raise ConfigError(f"{field}: {v!r} is not a valid regular expression: {e}") from e
    return value


# ------------------------------------------------------------------------------------------ write
def quantization_config(model: nn.Module, layers: Mapping[str, Fp8BlockwiseLinear]) -> dict | None:
    """The ``quantization_config`` for ``model``'s Fp8BlockwiseLinear ``layers`` (name -> layer),
    as llm-compressor writes it: one group per (block shape, activation); a single group targets
    ``"Linear"``, several name their layers. Every ``nn.Linear`` left in high precision is listed in
    ``ignore`` (vLLM needs each of its linear layers to match a target or ``ignore``).

    Raises ValueError for layers the format cannot express (float8_e5m2 weights: compressed-tensors'
    8-bit float is e4m3). ``scale_format="ue8m0"`` layers are written as the float32 powers of two
    they hold (the format has no flag for it: they load back as "fp32", same numbers).
    """
    if not layers:
        return None
    e5m2 = sorted(name for name, m in layers.items() if m.config.dtype != torch.float8_e4m3fn)
    if e5m2:
        raise ValueError(
            f"save(format='compressed-tensors'): {e5m2[0]} is {layers[e5m2[0]].config.dtype}; "
            "compressed-tensors' 8-bit float is float8_e4m3fn only"
        )
    by_scheme: dict[tuple[tuple[int, int], str], list[str]] = {}
    for name, m in layers.items():
        by_scheme.setdefault((m.config.block_shape, m.config.activation), []).append(name)
    groups = {}
    for i, ((block, activation), names) in enumerate(sorted(by_scheme.items())):
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(by_scheme) == 1 else sorted(names),
            "weights": {
                "num_bits": 8,
                "type": "float",
                "symmetric": True,
                "group_size": None,
                "strategy": "block",
                "block_structure": list(block),
                "dynamic": False,
            },
            "input_activations": None
            if activation == "none"
            else {
                "num_bits": 8,
                "type": "float",
                "symmetric": True,
                "group_size": block[1],
                "strategy": "group",
                "dynamic": True,
            },
            "output_activations": None,
            "format": None,
        }
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear)),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def checkpoint_key(key: str, t: torch.Tensor, layers: Mapping[str, Fp8BlockwiseLinear]) -> str:
    """The file's name for state_dict entry ``key`` (tensor ``t``): ``<layer>.weight_scale_inv`` ->
    ``<layer>.weight_scale`` for the fp8 ``layers``, every other key as it is.

    Raises ValueError for an fp8 tensor that is not an Fp8BlockwiseLinear's weight: this writer
    knows no other fp8 layer's names.
    """
    layer, _, attr = key.rpartition(".")
    if layer in layers and attr == "weight_scale_inv":
        return f"{layer}{SCALE_SUFFIX}"
    if t.dtype in FP8_DTYPES and not (layer in layers and attr == "weight"):
        raise ValueError(
            f"save(format='compressed-tensors'): {key} is {t.dtype} but not the weight of an "
            "Fp8BlockwiseLinear; this format writer has no name for it"
        )
    return key
