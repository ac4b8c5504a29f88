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
* :class:`Fp8BlockwiseMoEMethod` for vLLM's routed experts (``RoutedExperts``, built by
  ``FusedMoEFactory``): the per-expert checkpoint tensors loaded by vLLM's expert weight loader into
  fused ``w13`` / ``w2`` parameters, and the forward of the library's MoE layer
  (:mod:`torch_fp8_blockwise.experts`: sort by expert, one ``grouped_matmul`` per projection,
  weighted sum in float32) on the routing vLLM's router computed. SiLU-gated experts only.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import (
    FusedMoEMethodBase,
    FusedMoeWeightScaleSupported,
    MoEActivation,
    RoutedExperts,
    UnquantizedFusedMoEMethod,
)
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
from ..experts import combine, experts_mlp, gather_rows, sort_by_expert
from ..formats import MATMUL_BLOCKS, cdiv
from ..nn import Fp8Config

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
            if is_layer_skipped(prefix, self.ignored_layers, fused_mapping=self.packed_modules_mapping):
                return UnquantizedFusedMoEMethod(layer.moe_config)
            return Fp8BlockwiseMoEMethod(self, layer)
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


def check_scales_loaded(scale: torch.Tensor, name: str) -> None:
    """Refuse block scales that are not all positive finite numbers: the parameters are created
    NaN-filled, so a block the checkpoint never filled stays NaN (a corrupt file may hold 0, a
    negative or inf). ``scale``: any shape, float32 / bf16 / fp16; ``name``: the parameter, for the
    ValueError (which counts the bad blocks)."""
    values = scale.float()
    bad = ~(values > 0) | ~torch.isfinite(values)
    if bool(bad.any()):
        raise ValueError(
            f"fp8_blockwise: {name}: {int(bad.sum())} of {scale.numel()} block scales are not positive "
            "finite numbers (never loaded, or a corrupt checkpoint)"
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
        check_scales_loaded(scale, f"{getattr(layer, 'prefix', '') or 'layer'}.weight_scale_inv")
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


def validate_moe_partition(
    prefix: str, intermediate_size_per_partition: int, tp_size: int, block: list[int]
) -> None:
    """Refuse routed experts whose per-rank intermediate size cuts weight blocks (vLLM's
    ``validate_fp8_block_shape_moe`` rules).

    * I_p % bn == 0 always: gate and up rows are fused in one ``w13`` per expert, and each rank's
      gate / up rows must start on a scale-block row (the gate's last block must not hold up rows).
    * I_p % bk == 0 at tensor parallel > 1: ``w2`` (down) is split along its K = I, and a rank's
      slice must start on a scale-block column.
    """
    bn, bk = block
    where = f"fp8_blockwise: {prefix or 'experts'}"
    if intermediate_size_per_partition % bn:
        raise ValueError(
            f"{where}: intermediate_size_per_partition = {intermediate_size_per_partition} (tensor parallel "
            f"{tp_size}) is not a multiple of block_n = {bn}: gate / up scale blocks would straddle "
            + ("tensor-parallel ranks and " if tp_size > 1 else "")
            + "the fused gate / up rows"
        )
    if tp_size > 1 and intermediate_size_per_partition % bk:
        raise ValueError(
            f"{where}: intermediate_size_per_partition = {intermediate_size_per_partition} (tensor parallel "
            f"{tp_size}) is not a multiple of block_k = {bk}: the down projection's K split would cut "
            "scale blocks"
        )


class Fp8BlockwiseMoEMethod(FusedMoEMethodBase):
    """A vLLM fused-MoE method for routed experts with DeepSeek-layout FP8 block weights, computed
    by the library's grouped path (``torch.ops.fp8.grouped_matmul``, as :class:`..experts.Fp8Experts`).

    Parameters it creates on the ``RoutedExperts`` layer (vLLM's fp8 MoE names, so vLLM's expert
    weight loader fills them per expert and per shard w1 / w3 / w2, split for tensor parallelism):

    * ``w13_weight``: [E, 2 I_p, H] float8_e4m3fn, gate rows (w1) 0..I_p-1 then up rows (w3);
      I_p = intermediate size / TP.
    * ``w13_weight_scale_inv``: [E, 2 I_p / bn, cdiv(H, bk)] float32 multipliers, NaN until loaded.
    * ``w2_weight``: [E, H, I_p] float8_e4m3fn (down; this rank's K slice).
    * ``w2_weight_scale_inv``: [E, cdiv(H, bn), I_p / bk] float32 (cdiv at TP 1), NaN until loaded.

    Forward (:meth:`apply`): x [T, H] bf16 / fp16 / fp32, vLLM's router output topk_weights [T, k]
    float32 and topk_ids [T, k] int -> [T, H] in x.dtype: this rank's partial sum over its I_p
    slice (vLLM's MoE runner all-reduces across ranks). W8A8: each projection's input quantized per
    1 x bk group; gate / up product in x.dtype, down product and the weighted sum in float32.

    Refused when vLLM builds the layer, naming it: activations other than SiLU-gated ("silu"),
    expert biases, clamped / scaled SwiGLU (swiglu_limit / alpha / beta), router weights applied on
    the input, expert parallelism, and partitions that cut blocks (:func:`validate_moe_partition`).
    """

    def __init__(self, quant_config: Fp8BlockwiseConfig, layer: RoutedExperts) -> None:
        super().__init__(layer.moe_config)
        self.quant_config = quant_config
        self.block = list(quant_config.weight_block_size)
        self.config = Fp8Config(tuple(self.block), "dynamic")
        where = f"fp8_blockwise: {getattr(layer, 'layer_name', '') or 'experts'}"
        moe = layer.moe_config
        if moe.activation != MoEActivation.SILU:
            raise NotImplementedError(
                f"{where}: activation {moe.activation.value!r} is not supported: the grouped experts "
                "compute silu(gate) * up only ('silu')"
            )
        refused = {
            "has_bias": (moe.has_bias, "expert biases"),
            "swiglu_limit": (getattr(layer, "swiglu_limit", None) is not None, "a clamped SwiGLU"),
            "swiglu_alpha": (getattr(layer, "swiglu_alpha", None) is not None, "a scaled SwiGLU"),
            "swiglu_beta": (getattr(layer, "swiglu_beta", None) is not None, "a shifted SwiGLU"),
            "apply_router_weight_on_input": (
                bool(getattr(layer, "apply_router_weight_on_input", False)),
                "router weights applied to the input",
            ),
            "expert parallelism": (moe.moe_parallel_config.use_ep, "experts split across ranks"),
        }
        for name, (bad, what) in refused.items():
            if bad:
                raise NotImplementedError(f"{where}: {name}: {what} is not supported")

    def maybe_roundup_sizes(
        self,
        hidden_size: int,
        intermediate_size_per_partition: int,
        act_dtype: torch.dtype,
        moe_parallel_config: Any,
    ) -> tuple[int, int]:
        """No padding: the parameters keep the checkpoint's H and I_p (a padded H would need
        padded scale grids; the padding serves all-to-all kernels this method does not use)."""
        return hidden_size, intermediate_size_per_partition

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        tp_size = self.moe.moe_parallel_config.tp_size
        validate_moe_partition(
            getattr(layer, "layer_name", ""), intermediate_size_per_partition, tp_size, self.block
        )
        bn, bk = self.block
        e, h, i = num_experts, hidden_size, intermediate_size_per_partition
        layer.num_experts = num_experts
        layer.orig_dtype = params_dtype
        layer.weight_block_size = self.block
        attrs = {k: v for k, v in extra_weight_attrs.items() if k == "weight_loader"}
        for name, shape in (("w13_weight", (e, 2 * i, h)), ("w2_weight", (e, h, i))):
            param = torch.nn.Parameter(torch.empty(shape, dtype=torch.float8_e4m3fn), requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(param, attrs)
        scale_attrs = {**attrs, "quant_method": FusedMoeWeightScaleSupported.BLOCK.value}
        for name, shape in (
            ("w13_weight_scale_inv", (e, 2 * (i // bn), cdiv(h, bk))),
            ("w2_weight_scale_inv", (e, cdiv(h, bn), cdiv(i, bk))),
        ):
            param = torch.nn.Parameter(
                torch.full(shape, float("nan"), dtype=torch.float32), requires_grad=False
            )
            layer.register_parameter(name, param)
            set_weight_attrs(param, scale_attrs)
        layer.w13_input_scale = None
        layer.w2_input_scale = None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Check every block scale was loaded (NaN until then); weights and scales stay vLLM's
        parameters, made contiguous float32 scales only where they are not."""
        for name in ("w13_weight_scale_inv", "w2_weight_scale_inv"):
            scale = getattr(layer, name).data
            check_scales_loaded(scale, f"{getattr(layer, 'layer_name', '') or 'experts'}.{name}")
            if scale.dtype != torch.float32 or not scale.is_contiguous():
                replace_parameter(layer, name, scale.float().contiguous())
        for name in ("w13_weight", "w2_weight"):
            if not getattr(layer, name).data.is_contiguous():
                replace_parameter(layer, name, getattr(layer, name).data.contiguous())

    def get_fused_moe_quant_config(self, layer: torch.nn.Module) -> None:
        """None: no vLLM modular kernel runs these experts (:meth:`apply` computes them)."""
        return None

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Any,
        shared_experts_input: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [T, H], topk_weights [T, k] float, topk_ids [T, k] int (vLLM's router) -> [T, H] in
        x.dtype, this rank's partial (see the class docstring). Shared experts, if any, are run by
        vLLM's MoE runner (this method has no kernel that overlaps them)."""
        if x.shape[0] == 0 or topk_ids.shape[1] == 0:
            return torch.zeros_like(x)
        order, group_sizes = sort_by_expert(topk_ids, layer.w13_weight.shape[0])
        rows = gather_rows(x, order, topk_ids.shape[1])
        y = experts_mlp(
            rows,
            layer.w13_weight,
            layer.w13_weight_scale_inv,
            layer.w2_weight,
            layer.w2_weight_scale_inv,
            group_sizes,
            self.config,
            torch.nn.functional.silu,
        )
        return combine(y, order, topk_weights, group_sizes, x.dtype)
