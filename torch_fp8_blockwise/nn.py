"""Model-level API: :class:`Fp8BlockwiseLinear` and :func:`quantize_model_`.

A converted layer holds the DeepSeek-V3 layout as buffers, so its ``state_dict`` keys and tensors
are those of a DeepSeek / HF "fp8" checkpoint:

* ``weight``: [N, K] (out_features, in_features) float8_e4m3fn (or e5m2), contiguous row-major.
* ``weight_scale_inv``: [cdiv(N, bn), cdiv(K, bk)] float32, row-major; a MULTIPLIER:
  ``weight ~= weight.float() * weight_scale_inv`` broadcast over (bn, bk) blocks.
* ``bias``: [N] in the dtype it came with (optional).

The forward is one call of ``torch.ops.fp8.blockwise_matmul``: the weight is never dequantized, and
the op's device dispatch (cpu / cuda -> Triton / xla -> Pallas), its torch.compile support and its
inference-only autograd apply unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops as _ops  # noqa: F401  (registers torch.ops.fp8.*)
from ._validate import ACTIVATIONS
from .formats import FP8_DTYPES, HIGH_PRECISION_DTYPES, MATMUL_BLOCKS, SCALE_FORMATS, cdiv

logger = logging.getLogger("torch_fp8_blockwise")

DEFAULT_BLOCK: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class Fp8Config:
    """How a Linear layer is quantized and run.

    Attributes:
        block_shape: (bn, bk) weight block, each of 128, 256, 512 (DeepSeek checkpoints: (128, 128)).
            Activations are quantized in 1 x bk groups.
        activation: "dynamic" quantizes activations per 1 x bk group to float8_e4m3fn on every call
            (W8A8, the op's rule whatever the weight dtype); "none" keeps them at their precision
            (W8A16, weight-only).
        dtype: fp8 dtype of the weight: torch.float8_e4m3fn (max 448, DeepSeek's) or
            torch.float8_e5m2 (max 57344, 2 mantissa bits: about 4 dB less SQNR).
        scale_format: "fp32" or "ue8m0" (scales rounded up to powers of two, DeepSeek V3.1).
    """

    block_shape: tuple[int, int] = DEFAULT_BLOCK
    activation: str = "dynamic"
    dtype: torch.dtype = torch.float8_e4m3fn
    scale_format: str = "fp32"

    def __post_init__(self) -> None:
        block = self.block_shape
        if not isinstance(block, (tuple, list)) or len(block) != 2:
            raise ValueError(f"Fp8Config.block_shape: expected a pair (bn, bk), got {block!r}")
        if not all(isinstance(b, int) and not isinstance(b, bool) for b in block):
            raise TypeError(f"Fp8Config.block_shape: expected two ints, got {block!r}")
        if block[0] not in MATMUL_BLOCKS or block[1] not in MATMUL_BLOCKS:
            raise ValueError(
                f"Fp8Config.block_shape: bn and bk must each be one of {MATMUL_BLOCKS} "
                f"(the blocks blockwise_matmul runs), got {tuple(block)}"
            )
        object.__setattr__(self, "block_shape", (int(block[0]), int(block[1])))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Fp8Config.activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        if self.dtype not in FP8_DTYPES:
            raise TypeError(
                f"Fp8Config.dtype: expected one of ({', '.join(map(str, FP8_DTYPES))}), got {self.dtype}"
            )
        if self.scale_format not in SCALE_FORMATS:
            raise ValueError(
                f"Fp8Config.scale_format: expected one of {SCALE_FORMATS}, got {self.scale_format!r}"
            )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def apply_keeping_dtype(
    module: nn.Module,
    apply_rest: Callable[[], object],
    fn: Callable[[torch.Tensor], torch.Tensor],
    names: tuple[str, ...],
) -> None:
    """``nn.Module._apply`` for a module whose buffers ``names`` (fp8 weights, their scales) may
    move between devices but never change dtype: ``apply_rest()`` (the module's ``super()._apply``)
    runs with those buffers taken out; ``fn`` is then applied to an empty probe of each to learn its
    target, and when it would change the dtype the buffer only moves to the target device. The
    buffers go back first (buffer order is state_dict key order)."""
    saved = {name: module._buffers.pop(name) for name in names}
    try:
        apply_rest()
        for name, buf in saved.items():
            probe = fn(torch.empty(0, dtype=buf.dtype, device=buf.device))
            if probe.dtype == buf.dtype:
                saved[name] = fn(buf)
            elif probe.device != buf.device:
                saved[name] = buf.to(device=probe.device)
    finally:
        rest = dict(module._buffers)
        module._buffers.clear()
        module._buffers.update(saved)
        module._buffers.update(rest)


class Fp8BlockwiseLinear(nn.Module):
    """``y = x @ dequant(weight).T + bias`` with a block-wise FP8 weight, inference only.

    Buffers (DeepSeek names, so ``state_dict`` keys match DeepSeek / HF fp8 checkpoints):
        weight: [out_features, in_features] ``config.dtype``, contiguous row-major.
        weight_scale_inv: [cdiv(out_features, bn), cdiv(in_features, bk)] float32 multipliers.
        bias: [out_features] bfloat16 / float16 / float32, or None.

    Forward: x [..., in_features] bfloat16 / float16 / float32 -> [..., out_features] in x.dtype.

    ``.to(device)`` / ``.cuda()`` move every tensor. A dtype conversion of the module
    (``.half()``, ``.to(torch.bfloat16)``, ``.float()``) casts only the bias: the fp8 weight and its
    float32 scales keep their dtypes (casting them would destroy the quantization).
    """

    weight: torch.Tensor
    weight_scale_inv: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: Fp8Config | None = None,
        *,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        config = Fp8Config() if config is None else config
        if not isinstance(config, Fp8Config):
            raise TypeError(f"config: expected an Fp8Config, got {type(config).__name__}")
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
        if bias_dtype not in HIGH_PRECISION_DTYPES:
            raise TypeError(f"bias_dtype: expected one of {HIGH_PRECISION_DTYPES}, got {bias_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        bn, bk = config.block_shape
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=config.dtype, device=device)
        )
        self.register_buffer(
            "weight_scale_inv",
            torch.ones(cdiv(out_features, bn), cdiv(in_features, bk), dtype=torch.float32, device=device),
        )
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Fp8Config | None = None) -> Fp8BlockwiseLinear:
        """Quantize ``linear.weight`` ([N, K] bfloat16 / float16 / float32) with
        ``torch.ops.fp8.quantize`` at ``config.block_shape`` on its own device; the bias is kept
        as it is (same dtype, no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        config = Fp8Config() if config is None else config
        w = linear.weight
        if w.device.type == "meta":
            raise ValueError(
                "linear.weight: is on the meta device (no values to quantize); materialize it first"
            )
        if w.dtype not in HIGH_PRECISION_DTYPES:
            raise TypeError(f"linear.weight: expected dtype in {HIGH_PRECISION_DTYPES}, got {w.dtype}")
        with torch.no_grad():
            q, scale = torch.ops.fp8.quantize.default(
                w.detach(), list(config.block_shape), config.dtype, config.scale_format
            )
        return cls.from_quantized(q, scale, linear.bias, config)

    @classmethod
    def from_quantized(
        cls,
        weight: torch.Tensor,
        weight_scale_inv: torch.Tensor,
        bias: torch.Tensor | None = None,
        config: Fp8Config | None = None,
    ) -> Fp8BlockwiseLinear:
        """Wrap already-quantized tensors (e.g. read from a DeepSeek checkpoint) without copying.

        weight: [N, K] ``config.dtype`` contiguous; weight_scale_inv: [cdiv(N, bn), cdiv(K, bk)]
        float32; bias: [N] high precision or None. All on one device.
        """
        config = Fp8Config() if config is None else config
        _check_quantized("weight", weight, "weight_scale_inv", weight_scale_inv, bias, "bias", config)
        n, k = weight.shape
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.config = k, n, config
        layer.register_buffer("weight", weight.detach())
        layer.register_buffer("weight_scale_inv", weight_scale_inv.detach())
        if bias is None:
            layer.register_parameter("bias", None)
        else:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return layer

    # ----------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fp8.blockwise_matmul.default(  # the overload: no packet resolution per call
            x,
            self.weight,
            self.weight_scale_inv,
            list(self.config.block_shape),
            None,
            self.bias,
            None,
            self.config.activation,
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] ``dtype`` copy of the weight (for inspection and SQNR; never used in forward)."""
        return torch.ops.fp8.dequantize.default(
            self.weight, self.weight_scale_inv, list(self.config.block_shape), dtype
        )

    def extra_repr(self) -> str:
        c = self.config
        bias = "None" if self.bias is None else _dtype_name(self.bias.dtype)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"block_shape={c.block_shape}, activation={c.activation!r}, dtype={_dtype_name(c.dtype)}, "
            f"scale_format={c.scale_format!r}, bias={bias}"
        )

    # ------------------------------------------------------------------------- module plumbing
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Fp8BlockwiseLinear:
        """Let ``fn`` move the fp8 weight and its scales between devices but never change their dtype.

        nn.Module's ``.half()`` / ``.to(dtype)`` cast every floating tensor, and fp8 counts as
        floating: the weight would silently become fp16 and the op would reject it. ``fn`` is first
        applied to an empty probe to learn its target; when it would change the dtype, the buffer
        only moves to the target device.
        """
        super_apply = super()._apply
        apply_keeping_dtype(self, lambda: super_apply(fn, recurse), fn, ("weight", "weight_scale_inv"))
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # nn.Module's loader copy_()s into the existing buffer, which would silently cast e.g. a
        # bfloat16 weight into fp8: check dtypes and shapes first, naming the key.
        weight, scale = state_dict.get(prefix + "weight"), state_dict.get(prefix + "weight_scale_inv")
        bias = state_dict.get(prefix + "bias")
        if weight is not None:
            _check_tensor(
                prefix + "weight", weight, (self.out_features, self.in_features), (self.weight.dtype,)
            )
        if scale is not None:
            bn, bk = self.config.block_shape
            grid = (cdiv(self.out_features, bn), cdiv(self.in_features, bk))
            _check_tensor(prefix + "weight_scale_inv", scale, grid, (torch.float32,), f" (blocks {bn}x{bk})")
        if bias is not None:
            if self.bias is None:
                raise ValueError(f"{prefix}bias: this layer has no bias, but the state dict has one")
            _check_tensor(prefix + "bias", bias, (self.out_features,), HIGH_PRECISION_DTYPES)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _check_tensor(
    key: str, t: object, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], what: str = ""
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{key}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{key}: expected dtype in ({', '.join(map(str, dtypes))}), got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{key}: expected shape {tuple(shape)}{what}, got {tuple(t.shape)}")


def _check_quantized(
    w_key: str,
    weight: torch.Tensor,
    s_key: str,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    b_key: str,
    config: Fp8Config,
) -> None:
    """Checks for an fp8 weight + scale pair in the DeepSeek layout; errors name the keys."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{w_key}: expected a 2-D [N, K] tensor, got {shape}")
    n, k = weight.shape
    _check_tensor(w_key, weight, (n, k), (config.dtype,))
    if not weight.is_contiguous():
        raise ValueError(
            f"{w_key}: expected a contiguous row-major [N, K] weight, got strides {weight.stride()}"
        )
    bn, bk = config.block_shape
    _check_tensor(
        s_key,
        scale,
        (cdiv(n, bn), cdiv(k, bk)),
        (torch.float32,),
        f" (weight [{n}, {k}] in {bn}x{bk} blocks)",
    )
    if bias is not None:
        _check_tensor(b_key, bias, (n,), HIGH_PRECISION_DTYPES)
    devices = {t.device for t in (weight, scale, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(
            f"{w_key}: weight, scale and bias must be on one device, got {sorted(map(str, devices))}"
        )


def requantize(layer: Fp8BlockwiseLinear, block: int) -> Fp8BlockwiseLinear:
    """A copy of ``layer`` re-quantized to (block, block) weight blocks: dequantize in float32 at the
    old blocks, quantize at the new ones (same dtype and scale format). For TPU, where a 128-deep
    K block uses at most half of a 256-deep MXU."""
    if block not in MATMUL_BLOCKS:
        raise ValueError(f"requantize_block: expected one of {MATMUL_BLOCKS}, got {block!r}")
    c = layer.config
    config = Fp8Config((block, block), c.activation, c.dtype, c.scale_format)
    with torch.no_grad():
        w = layer.dequantized_weight(torch.float32)
        q, scale = torch.ops.fp8.quantize.default(w, [block, block], c.dtype, c.scale_format)
    return Fp8BlockwiseLinear.from_quantized(q, scale, layer.bias, config)


def weight_sqnr_db(approx: torch.Tensor, ref: torch.Tensor) -> float:
    """10 log10(sum ref^2 / sum (approx - ref)^2) in dB, computed on the tensors' device in float32
    (inf when equal)."""
    ref = ref.detach().float()
    noise = (approx.detach().float() - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# ------------------------------------------------------------------------------- quantize_model_
@dataclass
class LayerReport:
    """One converted layer: shape, blocks, bytes and the weight's SQNR (dB, dequantized vs original)."""

    out_features: int
    in_features: int
    block_shape: tuple[int, int]
    bytes_before: int
    bytes_after: int
    sqnr_db: float | None
    #: With a requantize_block: SQNR of the same weight at 128x128 blocks (vs the original when it
    #: is known, as in quantize_model_), so ``sqnr_128_db - sqnr_db`` is the cost of the larger block.
    sqnr_128_db: float | None = None
    #: checkpoint.load with requantize_block: SQNR of the re-quantized weight vs the file's 128x128 one.
    sqnr_vs_128_db: float | None = None
    #: Fused MoE experts (``Fp8Experts``): the number of experts E; the row is one projection of all
    #: of them, shape [E, N, K].
    experts: int | None = None


@dataclass
class QuantizationSummary:
    """What :func:`quantize_model_` (or ``checkpoint.load``) did. ``str()`` is a readable table: its
    header counts layers (a MoE experts module once), its rows are those of ``converted``.

    ``converted``: one row per Linear layer, and per fused projection of an experts module
    (``<name>.gate_up_proj``, ``<name>.down_proj``: ``experts`` set); ``skipped``: module -> why."""

    converted: dict[str, LayerReport] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def bytes_before(self) -> int:
        """Bytes of the converted layers' weight + bias before (high precision)."""
        return sum(r.bytes_before for r in self.converted.values())

    @property
    def bytes_after(self) -> int:
        """Bytes of the converted layers' fp8 weight + float32 scales + bias after."""
        return sum(r.bytes_after for r in self.converted.values())

    def __str__(self) -> str:
        def db(v: float | None) -> str:
            return "-" if v is None else ("inf" if math.isinf(v) else f"{v:.1f}")

        extra = any(
            r.sqnr_128_db is not None or r.sqnr_vs_128_db is not None for r in self.converted.values()
        )
        head = ["layer", "shape [N, K]", "block", "bytes before", "bytes after", "SQNR dB"]
        if extra:
            head += ["SQNR@128 dB", "vs 128 dB"]
        rows = []
        for name, r in self.converted.items():
            row = [
                name,
                ("" if r.experts is None else f"{r.experts}x") + f"{r.out_features}x{r.in_features}",
                f"{r.block_shape[0]}x{r.block_shape[1]}",
                f"{r.bytes_before:,}",
                f"{r.bytes_after:,}",
                db(r.sqnr_db),
            ]
            if extra:
                row += [db(r.sqnr_128_db), db(r.sqnr_vs_128_db)]
            rows.append(row)
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        # An experts module is one layer with one row per fused projection (<name>.gate_up_proj, ...).
        experts = {name.rpartition(".")[0] for name, r in self.converted.items() if r.experts is not None}
        linear = sum(r.experts is None for r in self.converted.values())
        count = linear + len(experts)
        what = f"{count} layer{'s' * (count != 1)} converted"
        if experts:
            projections = (len(self.converted) - linear) // len(experts)
            what += (
                f" ({linear} Linear, {len(experts)} MoE experts module{'s' * (len(experts) != 1)}"
                f" of {projections} projections{' each' * (len(experts) != 1)})"
            )
        lines = [f"fp8 block-wise: {what}, {len(self.skipped)} skipped"]
        if rows:
            lines += [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
            lines += [fmt.format(*r) for r in rows]
        before, after = self.bytes_before, self.bytes_after
        ratio = f" ({after / before:.3f}x)" if before else ""
        lines.append(f"converted layers: {before:,} bytes -> {after:,} bytes{ratio}")
        for name, reason in self.skipped.items():
            lines.append(f"skipped {name}: {reason}")
        return "\n".join(lines)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def storage_key(t: torch.Tensor) -> tuple:
    """Identifies the memory a tensor lives in: (device, data_ptr) where storage pointers exist
    (cpu, cuda), else the tensor object itself (xla tensors expose no data pointer; tied
    parameters there are still the same Parameter object)."""
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except RuntimeError:
        return ("object", id(t))


def _tensor_owners(model: nn.Module) -> dict[tuple, set[str]]:
    """storage key -> qualified names of every parameter / buffer that lives in it
    (including duplicates: a tied lm_head shows up under both names)."""
    owners: dict[tuple, set[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        tensors = list(module._parameters.items()) + list(module._buffers.items())
        for t_name, t in tensors:
            if t is None or t.device.type == "meta" or t.numel() == 0:
                continue
            owners.setdefault(storage_key(t), set()).add(f"{mod_name}.{t_name}" if mod_name else t_name)
    return owners


def _parents(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module, str]]:
    """(parent, attribute name, child, qualified name) for every edge of the module tree."""
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if child is not None:
                yield parent, child_name, child, f"{parent_name}.{child_name}" if parent_name else child_name


def module_parents(model: nn.Module) -> dict[int, list[nn.Module]]:
    """id(module) -> every module that holds it as a direct child (a shared module has several)."""
    parents: dict[int, list[nn.Module]] = {}
    for parent, _, child, _ in _parents(model):
        parents.setdefault(id(child), []).append(parent)
    return parents


def fp8_ineligible_reason(module: nn.Module, parents: Iterable[nn.Module] = ()) -> str | None:
    """Why ``module`` cannot be an :class:`Fp8BlockwiseLinear`, by its kind and its place in the
    model; None when it can. The one rule that :func:`quantize_model_` (which modules to convert)
    and ``checkpoint.load`` (which modules may take an fp8 weight from a file) share.

    ``parents``: the modules holding ``module`` as a direct child (see :func:`module_parents`).
    Eligible: an ``nn.Linear`` (or an existing Fp8BlockwiseLinear) whose parents all call it. Not
    eligible: any other module kind, and the ``out_proj`` of ``nn.MultiheadAttention``, which reads
    ``out_proj.weight`` directly (``F.multi_head_attention_forward``) instead of calling the layer.
    Data-dependent reasons (meta or empty weights, tied weights, SQNR) are quantize_model_'s own.
    """
    if not isinstance(module, (nn.Linear, Fp8BlockwiseLinear)):
        return (
            f"of type {type(module).__name__}, not an nn.Linear (only nn.Linear layers become "
            "Fp8BlockwiseLinear; every other module keeps its weights in bfloat16 / float16 / float32)"
        )
    if any(isinstance(p, nn.MultiheadAttention) for p in parents):
        return "inside nn.MultiheadAttention, which reads out_proj.weight directly instead of calling it"
    return None


def _quantize_skip_reason(
    module: nn.Module, aliases: list[str], owners: dict[tuple, set[str]], parents: list[nn.Module]
) -> str | None:
    reason = fp8_ineligible_reason(module, parents)
    if reason is not None:
        return reason
    w = module.weight
    if w.device.type == "meta":
        return "weight is on the meta device (no values to quantize)"
    if w.dtype not in HIGH_PRECISION_DTYPES:
        return f"weight dtype {w.dtype} is not one of bfloat16 / float16 / float32"
    if w.numel() == 0:
        return f"empty weight {tuple(w.shape)}"
    mine = {f"{a}.weight" for a in aliases}
    others = owners.get(storage_key(w), set()) - mine
    if others:
        return f"weight is shared with {', '.join(sorted(others))} (tied); converting would untie it"
    return None


def quantize_model_(
    model: nn.Module,
    config: Fp8Config | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    min_sqnr_db: float | None = None,
    requantize_block: int | None = None,
    progress: bool = True,
) -> QuantizationSummary:
    """Replace eligible ``nn.Linear`` layers of ``model`` in place by :class:`Fp8BlockwiseLinear`,
    and fused MoE experts modules (transformers' ``Qwen3MoeExperts``, ``DeepseekV3Experts``, ...,
    found by structure) by :class:`~torch_fp8_blockwise.experts.Fp8Experts` (summary rows
    ``<name>.gate_up_proj`` / ``<name>.down_proj``; skip reasons in ``experts.experts_skip_reason``).

    Like torchao's ``quantize_``: ``filter_fn(module, fqn) -> bool`` picks layers (default: every
    nn.Linear). Not converted, with the reason logged on logger "torch_fp8_blockwise" and kept in
    the summary: layers the filter rejects, weights tied to another module (e.g. an lm_head sharing
    the embedding's storage), empty or meta weights, non-float weights, layers already converted,
    the out_proj of nn.MultiheadAttention, and, with ``min_sqnr_db``, layers whose quantized
    weight's SQNR falls below it or is nan (they stay in high precision).

    Args:
        config: quantization settings (default :class:`Fp8Config`()).
        requantize_block: 256 or 512 (or 128): quantize with (b, b) blocks instead of
            ``config.block_shape`` (for TPU, where 256/512-deep blocks fill the MXU); the summary then
            also reports each weight's SQNR at 128x128 blocks, so the cost of the larger block is visible.
        progress: show a tqdm bar.

    Returns: a :class:`QuantizationSummary` (converted layer reports, skipped name -> reason, bytes).
    """
    config = Fp8Config() if config is None else config
    if not isinstance(config, Fp8Config):
        raise TypeError(f"config: expected an Fp8Config, got {type(config).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError(
            "model: is itself an nn.Linear, which cannot be replaced in place; use "
            "Fp8BlockwiseLinear.from_linear(model, config) or pass its parent module"
        )
    if requantize_block is not None:
        if requantize_block not in MATMUL_BLOCKS:
            raise ValueError(f"requantize_block: expected one of {MATMUL_BLOCKS}, got {requantize_block!r}")
        if config.block_shape != DEFAULT_BLOCK:
            raise ValueError(
                f"requantize_block={requantize_block} replaces config.block_shape, which must then stay "
                f"{DEFAULT_BLOCK}; got {config.block_shape}"
            )
        c = config
        config = Fp8Config((requantize_block, requantize_block), c.activation, c.dtype, c.scale_format)
    if min_sqnr_db is not None:
        if not isinstance(min_sqnr_db, (int, float)) or isinstance(min_sqnr_db, bool):
            raise TypeError(f"min_sqnr_db: expected a number (dB) or None, got {type(min_sqnr_db).__name__}")
        if math.isnan(min_sqnr_db):
            raise ValueError("min_sqnr_db: expected a number (dB) or None, got nan (no layer would pass)")

    summary = QuantizationSummary()
    # Fused MoE experts modules (3-D gate_up_proj / down_proj): experts.py, which builds on this file.
    from .experts import quantize_experts_

    quantize_experts_(model, config, filter_fn, min_sqnr_db, summary, logger)
    owners = _tensor_owners(model)
    # A module registered under several names is converted once and re-attached under each name.
    edges: dict[int, list[tuple[nn.Module, str, str]]] = {}
    modules: dict[int, nn.Module] = {}
    for parent, attr, child, fqn in _parents(model):
        if isinstance(child, Fp8BlockwiseLinear):
            summary.skipped[fqn] = "already an Fp8BlockwiseLinear"
            logger.info("torch_fp8_blockwise: skipping %s: already converted", fqn)
        elif isinstance(child, nn.Linear):
            edges.setdefault(id(child), []).append((parent, attr, fqn))
            modules[id(child)] = child

    from tqdm.auto import tqdm

    with torch.no_grad():
        for key in tqdm(list(edges), desc="fp8 quantize", unit="layer", disable=not progress):
            module, places = modules[key], edges[key]
            name, aliases = places[0][2], [fqn for _, _, fqn in places]
            if filter_fn is not None and not filter_fn(module, name):
                summary.skipped[name] = "filter_fn returned False"
                logger.debug("torch_fp8_blockwise: skipping %s: filter_fn returned False", name)
                continue
            reason = _quantize_skip_reason(module, aliases, owners, [p for p, _, _ in places])
            if reason is not None:
                summary.skipped[name] = reason
                logger.warning("torch_fp8_blockwise: not converting %s: %s", name, reason)
                continue
            new = Fp8BlockwiseLinear.from_linear(module, config)
            sqnr = weight_sqnr_db(new.dequantized_weight(), module.weight)
            if min_sqnr_db is not None and not sqnr >= min_sqnr_db:  # nan (a NaN / inf weight) fails
                why = "nan (the weight holds NaN or inf)" if math.isnan(sqnr) else f"{sqnr:.1f} dB"
                reason = f"weight SQNR {why} < min_sqnr_db {min_sqnr_db:g} dB; kept in {_dtype_name(module.weight.dtype)}"
                summary.skipped[name] = reason
                logger.warning("torch_fp8_blockwise: not converting %s: %s", name, reason)
                continue
            sqnr_128 = None
            if requantize_block is not None:
                ref = Fp8BlockwiseLinear.from_linear(
                    module, Fp8Config(DEFAULT_BLOCK, dtype=config.dtype, scale_format=config.scale_format)
                )
                sqnr_128 = weight_sqnr_db(ref.dequantized_weight(), module.weight)
            summary.converted[name] = LayerReport(
                out_features=module.out_features,
                in_features=module.in_features,
                block_shape=config.block_shape,
                bytes_before=_nbytes(module.weight, module.bias),
                bytes_after=_nbytes(new.weight, new.weight_scale_inv, new.bias),
                sqnr_db=sqnr,
                sqnr_128_db=sqnr_128,
            )
            for parent, attr, _ in places:
                setattr(parent, attr, new)
    return summary


def __getattr__(name: str) -> object:
    # nn.Fp8Experts: experts.py imports this module, so it is re-exported lazily (no import circle).
    if name == "Fp8Experts":
        from .experts import Fp8Experts

        return Fp8Experts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
