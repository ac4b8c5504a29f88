"""Fp8BlockwiseLinear and quantize_model_: numerics vs the reference, module plumbing (state_dict,
dtype / device moves), the summary, the skip rules, and the Pallas path on torch_xla's CPU device."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise import reference
from torch_fp8_blockwise.nn import Fp8BlockwiseLinear, Fp8Config, quantize_model_
from torch_fp8_blockwise.testing import assert_kernel_close, sqnr, sqnr_floor

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _reference(layer: Fp8BlockwiseLinear, x: torch.Tensor) -> torch.Tensor:
    """The contract's result for this layer on x [..., K] (same quantized weight)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = reference.blockwise_matmul(
        x2,
        layer.weight,
        layer.weight_scale_inv,
        layer.config.block_shape,
        None,
        layer.bias,
        x.dtype,
        layer.config.activation,
    )
    return y.reshape(*x.shape[:-1], -1)


# ------------------------------------------------------------------------------------ Fp8Config
@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"block_shape": (128, 64)}, ValueError, "bn and bk must each be one of (128, 256, 512)"),
        ({"block_shape": (128,)}, ValueError, "expected a pair"),
        ({"block_shape": (128.0, 128)}, TypeError, "expected two ints"),
        ({"activation": "static"}, ValueError, "Fp8Config.activation: expected one of ('dynamic', 'none')"),
        ({"dtype": torch.bfloat16}, TypeError, "Fp8Config.dtype"),
        ({"scale_format": "e8m0"}, ValueError, "Fp8Config.scale_format"),
    ],
)
def test_config_rejects_bad_values(kwargs, exc, words) -> None:
    with pytest.raises(exc, match=None) as info:
        Fp8Config(**kwargs)
    assert words in str(info.value)


def test_config_is_frozen_and_normalizes_lists() -> None:
    c = Fp8Config(block_shape=[256, 128])
    assert c.block_shape == (256, 128)
    with pytest.raises(AttributeError):
        c.activation = "none"  # type: ignore[misc]


# ------------------------------------------------------------------------- Fp8BlockwiseLinear
@pytest.mark.parametrize(
    "n, k, lead, config, bias_dtype, x_dtype",
    [
        (300, 576, (2, 3), Fp8Config(), torch.float32, torch.float32),
        (130, 200, (5,), Fp8Config(activation="none"), None, torch.float32),
        (
            256,
            384,
            (1,),
            Fp8Config(block_shape=(256, 128), scale_format="ue8m0"),
            torch.bfloat16,
            torch.bfloat16,
        ),
        (200, 300, (4, 1), Fp8Config(dtype=E5M2), torch.float16, torch.float16),
        (129, 520, (3,), Fp8Config(block_shape=(128, 512), activation="none"), torch.float32, torch.bfloat16),
    ],
)
def test_layer_matches_reference_and_sqnr(n, k, lead, config, bias_dtype, x_dtype) -> None:
    linear = nn.Linear(k, n, bias=bias_dtype is not None)
    if bias_dtype is not None:
        linear.bias.data = linear.bias.data.to(bias_dtype)
    layer = Fp8BlockwiseLinear.from_linear(linear, config)
    q, s = torch.ops.fp8.quantize(
        linear.weight.detach(), list(config.block_shape), config.dtype, config.scale_format
    )
    assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(
        layer.weight_scale_inv, s
    )
    assert layer.weight.is_contiguous() and layer.weight.dtype == config.dtype
    assert layer.bias is None or layer.bias.dtype == bias_dtype

    x = torch.randn(*lead, k, dtype=x_dtype)
    with torch.no_grad():
        y = layer(x)
        exact = nn.functional.linear(
            x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float()
        )
    assert y.shape == (*lead, n) and y.dtype == x_dtype
    assert_kernel_close(y, _reference(layer, x), f"layer {n}x{k} {config}")
    assert sqnr(y, exact) >= sqnr_floor(config.dtype, config.scale_format)


def test_extra_repr_names_everything() -> None:
    layer = Fp8BlockwiseLinear.from_linear(nn.Linear(200, 130, bias=False), Fp8Config((256, 128), "none"))
    assert repr(layer) == (
        "Fp8BlockwiseLinear(in_features=200, out_features=130, block_shape=(256, 128), activation='none', "
        "dtype=float8_e4m3fn, scale_format='fp32', bias=None)"
    )


def test_state_dict_round_trip_gives_identical_outputs() -> None:
    config = Fp8Config(scale_format="ue8m0")
    layer = Fp8BlockwiseLinear.from_linear(nn.Linear(300, 200), config)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight_scale_inv", "bias"}
    assert sd["weight"].dtype == E4M3 and sd["weight_scale_inv"].shape == (2, 3)
    fresh = Fp8BlockwiseLinear(300, 200, bias=True, config=config)
    fresh.load_state_dict(sd)
    x = torch.randn(7, 300)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize(
    "key, value, exc, words",
    [
        (
            "weight",
            torch.zeros(200, 300, dtype=torch.bfloat16),
            TypeError,
            "weight: expected dtype in (torch.float8_e4m3fn)",
        ),
        ("weight", torch.zeros(200, 299, dtype=E4M3), ValueError, "weight: expected shape (200, 300)"),
        (
            "weight_scale_inv",
            torch.ones(2, 2),
            ValueError,
            "weight_scale_inv: expected shape (2, 3) (blocks 128x128)",
        ),
        (
            "weight_scale_inv",
            torch.ones(2, 3, dtype=torch.float64),
            TypeError,
            "weight_scale_inv: expected dtype",
        ),
        ("bias", torch.zeros(201), ValueError, "bias: expected shape (200,)"),
    ],
)
def test_load_state_dict_rejects_bad_tensors_naming_the_key(key, value, exc, words) -> None:
    model = nn.Sequential(Fp8BlockwiseLinear.from_linear(nn.Linear(300, 200)))
    sd = model.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    sd["0." + key] = value
    with pytest.raises(exc) as info:
        model.load_state_dict(sd)
    assert "0." + words in str(info.value)
    assert all(
        torch.equal(model.state_dict()[k].view(torch.uint8), v.view(torch.uint8)) for k, v in before.items()
    )


@pytest.mark.parametrize("convert", ["half", "bfloat16", "to_bf16", "to_cpu_f16", "float"])
def test_dtype_conversion_keeps_fp8_weight_and_fp32_scale(convert) -> None:
    model = nn.Sequential(nn.LayerNorm(256), Fp8BlockwiseLinear.from_linear(nn.Linear(256, 130)))
    w_bits = model[1].weight.view(torch.uint8).clone()
    scale = model[1].weight_scale_inv.clone()
    target = {
        "half": lambda m: m.half(),
        "bfloat16": lambda m: m.bfloat16(),
        "to_bf16": lambda m: m.to(torch.bfloat16),
        "to_cpu_f16": lambda m: m.to("cpu", torch.float16),
        "float": lambda m: m.float(),
    }[convert]
    target(model)
    layer = model[1]
    assert layer.weight.dtype == E4M3 and torch.equal(layer.weight.view(torch.uint8), w_bits)
    assert layer.weight_scale_inv.dtype == torch.float32 and torch.equal(layer.weight_scale_inv, scale)
    assert layer.bias.dtype == model[0].weight.dtype  # the bias follows the model, like the norm
    assert list(layer.state_dict()) == ["bias", "weight", "weight_scale_inv"]
    x = torch.randn(3, 256, dtype=model[0].weight.dtype)
    with torch.no_grad():
        y = model(x)
    assert y.dtype == x.dtype and torch.isfinite(y.float()).all()


def test_to_empty_and_meta_init() -> None:
    layer = Fp8BlockwiseLinear(256, 130, config=Fp8Config(), device="meta")
    assert layer.weight.device.type == "meta" and layer.weight.dtype == E4M3
    layer.to_empty(device="cpu")
    assert layer.weight.device.type == "cpu" and layer.weight.dtype == E4M3
    assert layer.weight_scale_inv.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_moves_buffers_and_runs() -> None:
    layer = Fp8BlockwiseLinear.from_linear(nn.Linear(256, 130))
    x = torch.randn(4, 256)
    with torch.no_grad():
        cpu = layer(x)
        layer.cuda()
        assert layer.weight.is_cuda and layer.weight.dtype == E4M3
        y = layer(x.cuda()).cpu()
    assert_kernel_close(y, cpu, "cuda vs cpu")


def test_backward_raises_inference_only() -> None:
    layer = Fp8BlockwiseLinear.from_linear(nn.Linear(128, 128))
    x = torch.randn(2, 128, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(x).sum().backward()


def test_from_linear_rejects_non_linear_and_meta() -> None:
    with pytest.raises(TypeError, match="linear: expected an nn.Linear"):
        Fp8BlockwiseLinear.from_linear(nn.Conv1d(3, 3, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="meta device"):
        Fp8BlockwiseLinear.from_linear(nn.Linear(128, 128, device="meta"))


def test_from_quantized_checks_the_grid() -> None:
    w = torch.zeros(200, 300, dtype=E4M3)
    with pytest.raises(ValueError, match=r"weight_scale_inv: expected shape \(2, 3\)"):
        Fp8BlockwiseLinear.from_quantized(w, torch.ones(2, 2))
    with pytest.raises(ValueError, match="contiguous"):
        Fp8BlockwiseLinear.from_quantized(torch.zeros(300, 200, dtype=E4M3).t(), torch.ones(2, 3))


def test_compile_fullgraph_matches_eager() -> None:
    layer = Fp8BlockwiseLinear.from_linear(nn.Linear(256, 200))
    x = torch.randn(5, 256)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled, eager)


# ------------------------------------------------------------------------------- quantize_model_
class TinyLM(nn.Module):
    """Embedding + two blocks + an lm_head tied to the embedding, plus odd extras."""

    def __init__(self, vocab: int = 300, d: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, 384)
        self.down = nn.Linear(384, d, bias=False)
        self.gate = nn.Linear(d, 130)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as in SmolLM2 / Llama-style models

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_head(h * torch.sigmoid(self.gate(h)).mean(-1, keepdim=True))


def test_quantize_model_converts_and_skips_tied_lm_head(caplog) -> None:
    model = TinyLM()
    ids = torch.randint(0, 300, (2, 5))
    with torch.no_grad():
        exact = model(ids)
    with caplog.at_level(logging.INFO, logger="torch_fp8_blockwise"):
        summary = quantize_model_(model, progress=False)
    assert sorted(summary.converted) == ["down", "gate", "up"]
    assert "lm_head" in summary.skipped and "embed.weight" in summary.skipped["lm_head"]
    assert "tied" in caplog.text and "lm_head" in caplog.text
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed.weight
    assert all(isinstance(getattr(model, n), Fp8BlockwiseLinear) for n in ("up", "down", "gate"))
    # Bytes: fp32 weights + bias before; fp8 + fp32 scales + bias after.
    up = summary.converted["up"]
    assert up.bytes_before == (384 * 256 + 384) * 4
    assert up.bytes_after == 384 * 256 + 3 * 2 * 4 + 384 * 4
    assert summary.bytes_before == sum(r.bytes_before for r in summary.converted.values())
    assert summary.bytes_after < summary.bytes_before / 3
    assert all(r.sqnr_db > 30 for r in summary.converted.values())  # randn-like init: ~31 dB for e4m3
    text = str(summary)
    assert "3 layers converted, 1 skipped" in text and "384x256" in text and "skipped lm_head" in text
    with torch.no_grad():
        y = model(ids)
    assert sqnr(y, exact) >= sqnr_floor(E4M3)

    again = quantize_model_(model, progress=False)
    assert not again.converted and again.skipped["up"] == "already an Fp8BlockwiseLinear"


def test_quantize_model_filter_and_min_sqnr(caplog) -> None:
    model = TinyLM()
    with torch.no_grad():
        # Block amax 448 gives scale 1; e4m3 steps by 2 between 16 and 32, so 17 (a midpoint) is off
        # by 1 everywhere: 4 outliers in 130 x 256, SQNR = 10 log10(17^2 + 4 * 448^2 / 33276) = 25.0 dB.
        model.gate.weight.fill_(17.0)
        model.gate.weight[::128, ::128] = 448.0
    summary = quantize_model_(
        model,
        Fp8Config(activation="none"),
        filter_fn=lambda m, fqn: fqn != "down",
        min_sqnr_db=26.0,
        progress=False,
    )
    assert sorted(summary.converted) == ["up"]
    assert summary.skipped["down"] == "filter_fn returned False"
    assert "SQNR 25.0 dB < min_sqnr_db 26 dB" in summary.skipped["gate"] and type(model.gate) is nn.Linear
    assert model.up.config.activation == "none"


def test_quantize_model_shared_module_and_mha_and_empty() -> None:
    shared = nn.Linear(128, 128)
    model = nn.ModuleDict(
        {"a": shared, "b": shared, "attn": nn.MultiheadAttention(128, 2), "empty": nn.Linear(0, 5)}
    )
    summary = quantize_model_(model, progress=False)
    assert list(summary.converted) == ["a"]
    assert model["a"] is model["b"] and isinstance(model["a"], Fp8BlockwiseLinear)
    assert "MultiheadAttention" in summary.skipped["attn.out_proj"]
    assert "empty weight" in summary.skipped["empty"]


def test_quantize_model_requantize_block_reports_cost() -> None:
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 300))
    summary = quantize_model_(model, requantize_block=256, progress=False)
    for name, layer in zip(("0", "1"), model, strict=True):
        assert layer.config.block_shape == (256, 256)
        r = summary.converted[name]
        assert r.block_shape == (256, 256) and r.sqnr_128_db is not None
        # Coarser blocks share one scale over 4x the elements: never better, and close on randn.
        assert r.sqnr_128_db - 1.0 <= r.sqnr_db <= r.sqnr_128_db + 0.5
    assert "SQNR@128 dB" in str(summary)
    x = torch.randn(3, 512)
    with torch.no_grad():
        assert_kernel_close(model[0](x), _reference(model[0], x), "requantized layer")
    with pytest.raises(ValueError, match="requantize_block: expected one of"):
        quantize_model_(nn.Linear(128, 128), requantize_block=64, progress=False)
    with pytest.raises(ValueError, match="replaces config.block_shape"):
        quantize_model_(nn.Linear(128, 128), Fp8Config((256, 128)), requantize_block=512, progress=False)


def test_package_exports() -> None:
    assert tfb.quantize_model_ is quantize_model_ and tfb.Fp8BlockwiseLinear is Fp8BlockwiseLinear
    assert tfb.Fp8Config is Fp8Config and tfb.nn.Fp8BlockwiseLinear is Fp8BlockwiseLinear


# ------------------------------------------------------------------------------- torch_xla (Pallas)
@pytest.mark.slow
def test_layer_on_xla_runs_pallas_and_matches_cpu() -> None:
    torch_xla = pytest.importorskip("torch_xla", reason="needs torch_xla (environment 'xla')")
    pytest.importorskip("jax", reason="needs jax (environment 'xla')")
    dev = torch_xla.device()
    if dev.type != "xla":
        pytest.skip(f"torch_xla.device() is {dev}, not an XLA device")
    from torch_fp8_blockwise import _dispatch

    model = nn.Sequential(nn.Linear(256, 130), nn.ReLU(), nn.Linear(130, 200))
    quantize_model_(model, progress=False)
    x = torch.randn(3, 256)
    with torch.no_grad():
        cpu = model(x)
        model.to(dev)
        assert model[0].weight.device.type == "xla" and model[0].weight.dtype == E4M3
        assert _dispatch.implementation("blockwise_matmul", model[0].weight.device)[0] == "pallas"
        y = model(x.to(dev)).cpu()
    assert_kernel_close(y, cpu, "xla (Pallas) vs cpu")
