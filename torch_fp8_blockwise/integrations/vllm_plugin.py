"""vLLM plugin: serve FP8 block-wise checkpoints through ``torch.ops.fp8`` (``quantization="fp8_blockwise"``).

Imported only by vLLM, through the entry point ``fp8_blockwise`` of group ``vllm.general_plugins``
(setup.py), which calls :func:`register` in every vLLM process. This module imports vLLM at the
top; nothing else in the package imports it.

What it registers (checked against vLLM 0.33.0's own classes, tests/test_vllm_plugin.py):

* :class:`Fp8BlockwiseConfig`, vLLM's ``QuantizationConfig`` named ``"fp8_blockwise"``. It reads the
  DeepSeek / HF fp8 block format (``quant_method: "fp8"``, ``weight_block_size``, dynamic
  activations; what ``checkpoint.save`` writes). A checkpoint saying ``"fp8"`` is served by vLLM's
  own fp8 method unless the user asks for ours (``--quantization fp8_blockwise``): never silently.
* :class:`Fp8BlockwiseLinearMethod` for every vLLM linear layer (column / merged / QKV / row
  parallel, replicated): the checkpoint's tensors kept as they are, one
  ``torch.ops.fp8.blockwise_matmul`` per forward (W8A8, activations quantized per 1 x bk group).
* MoE layers: not yet (the fused-experts method waits for the library's MoE layer); a model with
  routed experts is refused when vLLM builds the layer, naming it.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
from vllm.model_executor.parameter import BlockQuantScaleParameter, ModelWeightParameter
from vllm.model_executor.utils import replace_parameter, set_weight_attrs

from .. import ops as _ops  # noqa: F401  (registers torch.ops.fp8.*)
from ..formats import MATMUL_BLOCKS, cdiv

#: The name users pass: ``vllm serve MODEL --quantization fp8_blockwise`` / ``LLM(..., quantization=...)``.
NAME = "fp8_blockwise"

_registered = False


def register() -> None:
    """vLLM's general-plugin entry point: register ``"fp8_blockwise"``. vLLM calls it once in every
    process it starts; calling it again does nothing."""
    global _registered
    if _registered and NAME in QUANTIZATION_METHODS:
        return
    register_quantization_config(NAME)(Fp8BlockwiseConfig)
    _registered = True


class Fp8BlockwiseConfig(QuantizationConfig):
    """The ``fp8_blockwise`` quantization config (one per model).

    Args:
        weight_block_size: [bn, bk], each of 128, 256, 512 (the blocks ``blockwise_matmul`` runs).
        activation_scheme: "dynamic" only (activations quantized per 1 x bk group on each call).
        ignored_layers: prefixes left in high precision (the checkpoint's ``ignored_layers`` or
            ``modules_to_not_convert``), matched as vLLM's own fp8 method matches them.
    """

    def __init__(
        self,
        weight_block_size: list[int] | tuple[int, int] = (128, 128),
        activation_scheme: str = "dynamic",
        ignored_layers: list[str] | None = None,
    ) -> None:
        super().__init__()
        block = list(weight_block_size) if isinstance(weight_block_size, (list, tuple)) else None
        if block is None or len(block) != 2 or any(b not in MATMUL_BLOCKS for b in block):
            raise ValueError(
                f"fp8_blockwise: weight_block_size: expected [bn, bk], each of {MATMUL_BLOCKS}, "
                f"got {weight_block_size!r}"
            )
        if activation_scheme != "dynamic":
            raise ValueError(
                f"fp8_blockwise: activation_scheme: only 'dynamic' (per-token groups quantized on each "
                f"call) is supported, got {activation_scheme!r}"
            )
        self.weight_block_size = block
        self.activation_scheme = activation_scheme
        self.ignored_layers = list(ignored_layers or [])

    def __repr__(self) -> str:
        return f"Fp8BlockwiseConfig(weight_block_size={self.weight_block_size}, ignored_layers={self.ignored_layers})"

    @classmethod
    def get_name(cls) -> str:
        return NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 89  # CUDA: the Triton kernels' fp8 dot needs sm_89+ (CPU and TPU have no capability)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8BlockwiseConfig:
        """From the checkpoint's ``quantization_config`` (quant_method "fp8" or "fp8_blockwise")."""
        method = config.get("quant_method")
        if method not in ("fp8", NAME):
            raise ValueError(
                f"fp8_blockwise: quant_method: expected 'fp8' (a block FP8 checkpoint), got {method!r}"
            )
        fmt = config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(
                f"fp8_blockwise: fmt: only 'e4m3' weights load into vLLM's float8_e4m3fn parameters, got {fmt!r}"
            )
        if config.get("weight_block_size") is None:
            raise ValueError(
                "fp8_blockwise: the checkpoint has no weight_block_size (a per-tensor fp8 checkpoint): "
                "serve it with vLLM's own 'fp8' method"
            )
        ignored = config.get("ignored_layers") or config.get("modules_to_not_convert")
        return cls(config["weight_block_size"], config.get("activation_scheme", "dynamic"), ignored)

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        """Claim an ``"fp8"`` block checkpoint (DeepSeek-V3, Qwen3-FP8, ours) only when the user asked
        for ``fp8_blockwise``; otherwise leave it to vLLM's own fp8 method."""
        if user_quant != NAME or hf_quant_cfg.get("quant_method") not in ("fp8", NAME):
            return None
        if hf_quant_cfg.get("weight_block_size") is None:
            raise ValueError(
                "fp8_blockwise was asked for, but the checkpoint's fp8 quantization_config has no "
                "weight_block_size (per-tensor fp8): serve it with vLLM's own 'fp8' method"
            )
        return NAME

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """The model renames its modules (HF -> vLLM names): rename the ignored ones with it."""
        self.ignored_layers = hf_to_vllm_mapper.apply_list(self.ignored_layers)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            if is_layer_skipped(prefix, self.ignored_layers, fused_mapping=self.packed_modules_mapping):
                return UnquantizedLinearMethod()
            return Fp8BlockwiseLinearMethod(self)
        if isinstance(layer, RoutedExperts):
            raise NotImplementedError(
                f"fp8_blockwise: {prefix}: MoE (routed experts) layers are not supported yet; "
                "only linear layers are"
            )
        return None


def validate_partition_blocks(
    prefix: str,
    input_size: int,
    output_size: int,
    input_size_per_partition: int,
    output_partition_sizes: list[int],
    block: list[int],
) -> None:
    """Refuse a layer whose per-rank partitions cut through weight blocks (vLLM's
    ``validate_fp8_block_shape`` rules, without its mismatch allowance).

    * Row parallel (K split across ranks): each rank's K must be a multiple of bk, or a rank's
      weight would start inside a scale block.
    * Column parallel (N split): each rank's partition sizes must be multiples of bn.
    * Merged (QKV / gate-up): every partition but the last must be a multiple of bn, or the next
      partition's rows would fall into the previous one's scale block (vLLM's loaders place each
      partition's scales at row ``ceil(offset / bn)``).
    A ragged last block (N or K not a multiple of the block) is fine: it is zero-padded.
    """
    bn, bk = block
    where = f"fp8_blockwise: {prefix or 'layer'}"
    if input_size_per_partition != input_size and input_size_per_partition % bk:
        raise ValueError(
            f"{where}: input_size_per_partition = {input_size_per_partition} (of {input_size}) is not a "
            f"multiple of block_k = {bk}: the tensor-parallel split would cut K blocks"
        )
    split = sum(output_partition_sizes) != output_size
    check = output_partition_sizes if split else output_partition_sizes[:-1]
    for i, size in enumerate(check):
        if size % bn:
            raise ValueError(
                f"{where}: output partition {i} of {output_partition_sizes} has {size} rows, not a "
                f"multiple of block_n = {bn}: its scale blocks would "
                + ("straddle tensor-parallel ranks" if split else "overlap the next merged partition's")
            )


@register_weight_loader_v2_supported_method
class Fp8BlockwiseLinearMethod(LinearMethodBase):
    """A vLLM linear method holding a DeepSeek-layout FP8 weight, computed by ``torch.ops.fp8``.

    Parameters it creates on the layer (vLLM's parameter classes, so vLLM's loaders shard them):

    * ``weight``: ``ModelWeightParameter`` [N_p, K_p] float8_e4m3fn (N_p = sum of this rank's
      output partitions, K_p = its input partition), row-major.
    * ``weight_scale_inv``: ``BlockQuantScaleParameter`` [cdiv(N_p, bn), cdiv(K_p, bk)] float32
      multipliers (``w ~= weight * scale``), NaN until loaded.
    """

    def __init__(self, quant_config: Fp8BlockwiseConfig) -> None:
        self.quant_config = quant_config
        self.block = list(quant_config.weight_block_size)

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        validate_partition_blocks(
            getattr(layer, "prefix", ""),
            input_size,
            output_size,
            input_size_per_partition,
            output_partition_sizes,
            self.block,
        )
        weight_loader = extra_weight_attrs.get("weight_loader")
        n, k = sum(output_partition_sizes), input_size_per_partition
        bn, bk = self.block
        layer.logical_widths = output_partition_sizes
        layer.input_size_per_partition = k
        layer.output_size_per_partition = n
        layer.orig_dtype = params_dtype
        layer.weight_block_size = self.block  # vLLM's merged / QKV loaders split the scales by it
        weight = ModelWeightParameter(
            data=torch.empty(n, k, dtype=torch.float8_e4m3fn),
            input_dim=1,
            output_dim=0,
            weight_loader=weight_loader,
        )
        layer.register_parameter("weight", weight)
        scale = BlockQuantScaleParameter(
            data=torch.full((cdiv(n, bn), cdiv(k, bk)), float("nan"), dtype=torch.float32),
            input_dim=1,
            output_dim=0,
            weight_loader=weight_loader,
        )
        set_weight_attrs(scale, {"scale_type": "weight_scale"})
        layer.register_parameter("weight_scale_inv", scale)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Check every scale was loaded, and put weight and scales in the layout the op reads
        (row-major, float32 scales) once here, keeping vLLM's parameter objects."""
        scale = layer.weight_scale_inv.data
        bad = ~(scale.float() > 0) | ~torch.isfinite(scale.float())
        if bool(bad.any()):
            raise ValueError(
                f"fp8_blockwise: {getattr(layer, 'prefix', '') or 'layer'}.weight_scale_inv: "
                f"{int(bad.sum())} of {scale.numel()} block scales are not positive finite numbers "
                "(never loaded, or a corrupt checkpoint)"
            )
        if not layer.weight.data.is_contiguous():
            replace_parameter(layer, "weight", layer.weight.data.contiguous())
        if scale.dtype != torch.float32 or not scale.is_contiguous():
            replace_parameter(layer, "weight_scale_inv", scale.float().contiguous())

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [..., K_p] bf16 / fp16 / fp32 -> [..., N_p] in x.dtype (W8A8, bias added in fp32)."""
        return torch.ops.fp8.blockwise_matmul(
            x, layer.weight, layer.weight_scale_inv, self.block, None, bias, None, "dynamic"
        )
