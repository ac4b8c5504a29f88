"""checkpoint.save / checkpoint.load: a DeepSeek-style checkpoint written by hand (as a foreign
producer would) loads without dequantizing; save -> load round trips (single file, sharded, ue8m0,
tied lm_head, meta-device model); every bad input raises naming the key and the file and leaves
the model exactly as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from torch_fp8_blockwise import checkpoint, reference
from torch_fp8_blockwise.checkpoint import CheckpointDtypeError, CheckpointError, CorruptCheckpointError
from torch_fp8_blockwise.nn import Fp8BlockwiseLinear, Fp8Config, quantize_model_
from torch_fp8_blockwise.testing import assert_kernel_close, sqnr, sqnr_floor

E4M3 = torch.float8_e4m3fn


class Block(nn.Module):
    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d, bias=True)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        return h + self.q_proj(x) + self.down_proj(torch.relu(self.up_proj(x)))


class TinyDeepSeekish(nn.Module):
    """DeepSeek-like names: model.embed_tokens, model.layers.i.*, model.norm, lm_head."""

    def __init__(
        self, vocab: int = 300, d: int = 256, ff: int = 320, layers: int = 2, tie: bool = False
    ) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(Block(d, ff) for _ in range(layers))
        self.model.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h)
        return self.lm_head(self.model.norm(h))


def _foreign_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's recipe written out independently of the library: per 128x128 block,
    scale = amax / 448, q = (w / scale) cast to e4m3 (ragged edges padded with zeros)."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.zeros(nb * block, kb * block)
    padded[:n, :k] = w
    blocks = padded.reshape(nb, block, kb, block)
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0
    q = (blocks / scale[:, None, :, None]).reshape(nb * block, kb * block)[:n, :k]
    return q.to(E4M3).contiguous(), scale.float()


def _write_foreign_checkpoint(
    model: nn.Module, root, shard: bool = False, config_extra: dict | None = None
) -> dict:
    """What a producer outside this library writes: fp8 + weight_scale_inv for the decoder's Linear
    layers, lm_head / norms / embeddings in bf16, a DeepSeek-V3 style config.json."""
    tensors: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key.startswith("model.layers.") and key.endswith("proj.weight"):
            q, s = _foreign_quantize(t)
            tensors[key], tensors[key.replace(".weight", ".weight_scale_inv")] = q, s
        else:
            tensors[key] = t.to(torch.bfloat16).contiguous()
    os.makedirs(root, exist_ok=True)
    if shard:
        keys = sorted(tensors)
        halves = {
            "model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2],
        }
        for name, ks in halves.items():
            save_file({k: tensors[k] for k in ks}, os.path.join(root, name), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: name for name, ks in halves.items() for k in ks}}
        with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)
    else:
        save_file(tensors, os.path.join(root, "model.safetensors"), metadata={"format": "pt"})
    quant = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    quant.update(config_extra or {})
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"architectures": ["DeepseekV3ForCausalLM"], "quantization_config": quant}, f)
    return tensors


def _snapshot(model: nn.Module) -> tuple[dict[str, type], dict[str, torch.Tensor]]:
    types = {name: type(m) for name, m in model.named_modules()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return types, state


def _assert_unchanged(model: nn.Module, snap) -> None:
    types, state = snap
    assert {name: type(m) for name, m in model.named_modules()} == types
    now = model.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        bits = now[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)
        assert now[k].dtype == v.dtype and torch.equal(*bits), k


# ------------------------------------------------------------------------- a foreign checkpoint
@pytest.mark.parametrize("shard", [False, True])
def test_load_foreign_deepseek_checkpoint(tmp_path, shard) -> None:
    source = TinyDeepSeekish()
    tensors = _write_foreign_checkpoint(source, tmp_path, shard=shard)
    model = TinyDeepSeekish()  # different random init: everything must come from the file
    summary = checkpoint.load(model, tmp_path)

    assert len(summary.converted) == 6 and not summary.skipped
    layer = model.model.layers[1].up_proj
    assert isinstance(layer, Fp8BlockwiseLinear) and layer.config.block_shape == (128, 128)
    file_w = tensors["model.layers.1.up_proj.weight"]
    assert torch.equal(layer.weight.view(torch.uint8), file_w.view(torch.uint8))  # bits as in the file
    assert torch.equal(layer.weight_scale_inv, tensors["model.layers.1.up_proj.weight_scale_inv"])
    assert (
        type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    )  # into the model's dtype
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"].float())

    x = torch.randn(5, 256)
    with torch.no_grad():
        ref = reference.blockwise_matmul(
            x, file_w, layer.weight_scale_inv, (128, 128), None, None, torch.float32, "dynamic"
        )
        assert_kernel_close(layer(x), ref, "foreign layer vs reference")
        ids = torch.randint(0, 300, (2, 7))
        y = model(ids)
        exact = source.to(torch.bfloat16).float()(ids)  # the producer's model at the file's precision
    assert sqnr(y, exact) >= sqnr_floor(E4M3) - 6  # error of 6 stacked fp8 layers, measured ~26 dB


def test_load_fills_existing_fp8_layers_and_requantizes_for_tpu(tmp_path) -> None:
    source = TinyDeepSeekish()
    _write_foreign_checkpoint(source, tmp_path)
    model = TinyDeepSeekish()
    quantize_model_(
        model, Fp8Config(activation="none"), filter_fn=lambda m, fqn: fqn != "lm_head", progress=False
    )
    q_proj = model.model.layers[0].q_proj
    summary = checkpoint.load(model, tmp_path, requantize_block=256, activation="none")
    assert model.model.layers[0].q_proj is q_proj  # filled, not replaced
    assert q_proj.config.block_shape == (256, 256) and q_proj.weight_scale_inv.shape == (1, 1)
    for report in summary.converted.values():
        assert report.block_shape == (256, 256)
        # One more fp8 rounding at coarser blocks: >= ~30 dB on randn; nn.Linear's uniform init has
        # nearly equal block maxima, so most values re-round to themselves (~86 dB here).
        assert 25.0 < report.sqnr_vs_128_db < float("inf")
    assert "vs 128 dB" in str(summary)
    x = torch.randn(3, 256)
    with torch.no_grad():
        ref = reference.blockwise_matmul(
            x, q_proj.weight, q_proj.weight_scale_inv, (256, 256), None, q_proj.bias, torch.float32, "none"
        )
        assert_kernel_close(q_proj(x), ref, "requantized layer")


# ------------------------------------------------------------------------------ our own format
@pytest.mark.parametrize(
    "config, shard_bytes, tie",
    [
        (Fp8Config(), None, True),
        (Fp8Config(scale_format="ue8m0"), None, False),
        (Fp8Config(block_shape=(256, 128)), 150_000, True),
    ],
)
def test_save_load_round_trip(tmp_path, config, shard_bytes, tie) -> None:
    model = TinyDeepSeekish(tie=tie)
    quantize_model_(model, config, progress=False)
    written = checkpoint.save(model, tmp_path, max_shard_bytes=shard_bytes)

    with open(tmp_path / "config.json") as f:
        quant = json.load(f)["quantization_config"]
    assert (
        quant["quant_method"] == "fp8" and quant["fmt"] == "e4m3" and quant["activation_scheme"] == "dynamic"
    )
    assert quant["weight_block_size"] == list(config.block_shape)
    assert quant.get("scale_fmt") == ("ue8m0" if config.scale_format == "ue8m0" else None)
    if shard_bytes is None:
        assert written == ["model.safetensors", "config.json"]
        on_disk = load_file(tmp_path / "model.safetensors")
    else:
        shards = [w for w in written if w.endswith(".safetensors")]
        with open(tmp_path / "model.safetensors.index.json") as f:
            weight_map = json.load(f)["weight_map"]
        files = [load_file(tmp_path / s) for s in shards]
        # A shard holds at most shard_bytes of tensors, or one tensor larger than that (the embedding).
        sizes = [sum(t.numel() * t.element_size() for t in f.values()) for f in files]
        assert len(shards) > 2 and all(
            b <= shard_bytes or len(f) == 1 for b, f in zip(sizes, files, strict=True)
        )
        on_disk = {k: v for f in files for k, v in f.items()}
        assert set(weight_map) == set(on_disk)
    w = on_disk["model.layers.0.up_proj.weight"]
    s = on_disk["model.layers.0.up_proj.weight_scale_inv"]
    assert w.dtype == E4M3 and w.shape == (320, 256)
    assert s.dtype == torch.float32 and s.shape == (-(-320 // config.block_shape[0]), 2)
    assert ("lm_head.weight" in on_disk) != tie  # a tied lm_head is written once, as the embedding
    if config.scale_format == "ue8m0":
        assert not (s.view(torch.int32) & 0x7FFFFF).any()

    fresh = TinyDeepSeekish(tie=tie)
    checkpoint.load(fresh, tmp_path)
    assert fresh.model.layers[0].up_proj.config == config
    assert (fresh.lm_head.weight is fresh.model.embed_tokens.weight) == tie
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_save_over_an_older_sharded_save_leaves_no_stale_index(tmp_path) -> None:
    model = TinyDeepSeekish()
    quantize_model_(model, progress=False)
    checkpoint.save(model, tmp_path, max_shard_bytes=150_000)
    model.model.norm.weight.data.fill_(2.0)
    assert checkpoint.save(model, tmp_path) == ["model.safetensors", "config.json"]
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    fresh = TinyDeepSeekish()
    checkpoint.load(fresh, tmp_path)
    assert torch.equal(fresh.model.norm.weight, model.model.norm.weight)


def test_load_into_meta_model(tmp_path) -> None:
    model = TinyDeepSeekish()
    quantize_model_(model, progress=False)
    checkpoint.save(model, tmp_path)
    with torch.device("meta"):
        fresh = TinyDeepSeekish()
    checkpoint.load(fresh, tmp_path)
    assert all(t.device.type == "cpu" for t in fresh.state_dict().values())
    ids = torch.randint(0, 300, (1, 4))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_load_e8m0_scales_as_transformers_v4_stores_them(tmp_path) -> None:
    model = TinyDeepSeekish()
    quantize_model_(model, Fp8Config(scale_format="ue8m0"), progress=False)
    checkpoint.save(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for key in [k for k in tensors if k.endswith("weight_scale_inv")]:
        tensors[key] = tensors[key].to(torch.float8_e8m0fnu)  # 1 byte per scale, exact for powers of two
    save_file(tensors, tmp_path / "model.safetensors")
    fresh = TinyDeepSeekish()
    checkpoint.load(fresh, tmp_path)
    ids = torch.randint(0, 300, (1, 4))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_save_rejects_mixed_formats(tmp_path) -> None:
    model = TinyDeepSeekish()
    quantize_model_(model, progress=False)
    model.model.layers[1].q_proj = Fp8BlockwiseLinear.from_linear(nn.Linear(256, 256), Fp8Config((256, 256)))
    with pytest.raises(ValueError, match="one weight_block_size"):
        checkpoint.save(model, tmp_path)


# ------------------------------------------------------------------------------ bad checkpoints
def _break(tensors: dict, root, key: str, value) -> None:
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    save_file(tensors, os.path.join(root, "model.safetensors"))


LAST = "model.layers.1.down_proj"  # the last fp8 layer: a loader that swaps as it goes would half-load


@pytest.mark.parametrize(
    "key, value, exc, words",
    [
        (f"{LAST}.weight_scale_inv", None, CheckpointError, f"{LAST}.weight_scale_inv: missing"),
        (
            f"{LAST}.weight_scale_inv",
            torch.ones(2, 2),
            CheckpointError,
            "expected shape (2, 3) (weight [256, 320] in 128x128 blocks",
        ),
        (
            f"{LAST}.weight_scale_inv",
            torch.ones(2, 3, dtype=torch.float64),
            CheckpointDtypeError,
            "expected float32 scales",
        ),
        (f"{LAST}.weight_scale_inv", -torch.ones(2, 3), CheckpointError, "finite and positive"),
        (
            f"{LAST}.weight",
            torch.zeros(256, 320, dtype=torch.bfloat16),
            CheckpointDtypeError,
            "expected torch.float8_e4m3fn",
        ),
        (f"{LAST}.weight", torch.zeros(256, 300, dtype=E4M3), CheckpointError, "expected shape (256, 320)"),
        ("model.norm.bias", None, CheckpointError, "model.norm.bias: missing"),
        ("model.extra.weight", torch.zeros(3), CheckpointError, "model.extra.weight in "),
        (
            "lm_head.weight",
            torch.zeros(300, 256, dtype=E4M3),
            CheckpointError,
            "lm_head.weight_scale_inv: missing",
        ),
    ],
)
def test_bad_tensor_raises_naming_key_and_file_and_leaves_model_unchanged(
    tmp_path, key, value, exc, words
) -> None:
    tensors = _write_foreign_checkpoint(TinyDeepSeekish(), tmp_path)
    _break(tensors, tmp_path, key, value)
    model = TinyDeepSeekish()
    quantize_model_(model, filter_fn=lambda m, fqn: "q_proj" in fqn, progress=False)  # a mix of both kinds
    snap = _snapshot(model)
    with pytest.raises(exc) as info:
        checkpoint.load(model, tmp_path)
    message = str(info.value)
    assert words in message and "model.safetensors" in message, message
    _assert_unchanged(model, snap)


def test_strict_false_tolerates_missing_and_unexpected(tmp_path) -> None:
    tensors = _write_foreign_checkpoint(TinyDeepSeekish(), tmp_path)
    tensors["model.extra.weight"] = torch.zeros(3)
    _break(tensors, tmp_path, "model.norm.bias", None)
    model = TinyDeepSeekish()
    bias = model.model.norm.bias.detach().clone()
    checkpoint.load(model, tmp_path, strict=False)
    assert torch.equal(model.model.norm.bias, bias) and isinstance(
        model.model.layers[0].q_proj, Fp8BlockwiseLinear
    )


def test_truncated_file_names_the_file(tmp_path) -> None:
    _write_foreign_checkpoint(TinyDeepSeekish(), tmp_path, shard=True)
    victim = tmp_path / "model-00002-of-00002.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    model = TinyDeepSeekish()
    snap = _snapshot(model)
    with pytest.raises(CorruptCheckpointError) as info:
        checkpoint.load(model, tmp_path)
    assert "model-00002-of-00002.safetensors" in str(info.value) and isinstance(info.value, RuntimeError)
    _assert_unchanged(model, snap)


def test_index_naming_a_key_the_shard_lacks(tmp_path) -> None:
    _write_foreign_checkpoint(TinyDeepSeekish(), tmp_path, shard=True)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.q_proj.weight_scale_inv"] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CorruptCheckpointError, match="model.layers.0.q_proj.weight_scale_inv: listed in the index"
    ):
        checkpoint.load(TinyDeepSeekish(), tmp_path)


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"weight_block_size": [64, 64]}, "weight_block_size: list [64, 64] is not supported"),
        ({"fmt": "int8"}, "quantization_config.fmt: expected one of 'e4m3', 'e5m2', got str 'int8'"),
        ({"activation_scheme": "static"}, "activation_scheme: expected one of 'dynamic', got str 'static'"),
        (
            {"quant_method": "gptq"},
            "quant_method: expected one of 'fp8', 'compressed-tensors', got str 'gptq'",
        ),
        ({"scale_fmt": "ue8m0"}, "not powers of two"),  # the file's scales are amax/448, not 2^k
    ],
)
def test_bad_config_json(tmp_path, extra, words) -> None:
    _write_foreign_checkpoint(TinyDeepSeekish(), tmp_path, config_extra=extra)
    model = TinyDeepSeekish()
    snap = _snapshot(model)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(model, tmp_path)
    assert words in str(info.value)
    assert "config.json" in str(info.value) or "model.safetensors" in str(info.value)
    _assert_unchanged(model, snap)


def test_package_import_does_not_import_safetensors_or_transformers() -> None:
    code = "import sys, torch_fp8_blockwise; print(sorted(m for m in ('safetensors', 'transformers') if m in sys.modules))"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_transformers_reads_our_checkpoint(tmp_path) -> None:
    """Our save() output is a valid HF fp8 checkpoint: transformers (on CPU it dequantizes) gets our
    dequantized weights."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=256, intermediate_size=384, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    summary = quantize_model_(model, progress=False)
    assert "lm_head" in summary.skipped
    checkpoint.save(model, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ours = model.model.layers[0].mlp.down_proj
    theirs = loaded.model.layers[0].mlp.down_proj
    w = theirs.weight
    if w.dtype == E4M3:  # kept quantized: same bits and scales as ours
        assert torch.equal(w.view(torch.uint8), ours.weight.view(torch.uint8))
    else:  # dequantized on CPU
        assert_kernel_close(w.float(), ours.dequantized_weight().to(w.dtype).float(), "transformers' weight")
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():  # theirs runs the same fp8 weights (W16A16 on CPU), ours W8A8: ~29 dB
        assert sqnr(model(ids).logits, loaded(ids).logits) >= sqnr_floor(E4M3)


@pytest.mark.slow
def test_load_into_a_model_on_xla(tmp_path) -> None:
    """Layers are built on the device of the Linear they replace; the forward runs the Pallas kernels."""
    torch_xla = pytest.importorskip("torch_xla", reason="needs torch_xla (environment 'xla')")
    pytest.importorskip("jax", reason="needs jax (environment 'xla')")
    dev = torch_xla.device()
    if dev.type != "xla":
        pytest.skip(f"torch_xla.device() is {dev}, not an XLA device")
    model = TinyDeepSeekish(layers=1)
    quantize_model_(model, progress=False)
    checkpoint.save(model, tmp_path)
    fresh = TinyDeepSeekish(layers=1).to(dev)
    checkpoint.load(fresh, tmp_path)
    layer = fresh.model.layers[0].up_proj
    assert isinstance(layer, Fp8BlockwiseLinear) and layer.weight.device.type == "xla"
    assert layer.weight.dtype == E4M3 and layer.weight_scale_inv.device.type == "xla"
    ids = torch.randint(0, 300, (1, 3))
    with torch.no_grad():
        assert_kernel_close(
            fresh(ids.to(dev)).cpu(), model(ids), "xla model loaded from the checkpoint vs cpu"
        )


def test_keys_under_groups_keys_by_dotted_prefix_as_startswith_would() -> None:
    """checkpoint._keys_under (one pass, each key's dotted prefixes looked up) gives, for every name,
    exactly the keys ``key.startswith(name + ".")`` selects (the per-module scan it replaced)."""
    keys = [
        "model.layers.1.mlp.experts.0.gate_proj.weight",
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts2.x",  # a longer sibling name is not under "experts"
        "model.layers.1.mlp.experts",  # the name itself is not under it
        "model.layers.11.mlp.experts.3.w1.weight",
        "experts.0.up_proj.weight",
        "lm_head.weight",
    ]
    names = {"model.layers.1.mlp.experts", "model.layers.11.mlp.experts", "experts", "model", "nothing"}
    tensors = dict.fromkeys(keys)
    got = checkpoint._keys_under(tensors, names)
    assert got == {name: [k for k in keys if k.startswith(name + ".")] for name in names}
    assert got["model.layers.1.mlp.experts"] == keys[:2] and got["nothing"] == []


def test_under_any_selects_exactly_what_startswith_selected() -> None:
    """checkpoint._under_any (each dotted prefix of the key looked up in a set), which _plan_rest uses
    to skip the keys of planned layers, selects exactly what its old scan selected:
    ``any(key.startswith(name + ".") for name in names)``; on random keys built from segments that
    are prefixes of one another ("1" / "10", "experts" / "experts2"), empty segments included, and a
    name "" (whose "." prefix matches only keys starting with a dot)."""
    import random

    rng = random.Random(0)
    segments = ["model", "layers", "1", "10", "mlp", "experts", "experts2", "gate_up_proj", "weight", ""]
    keys = {".".join(rng.choice(segments) for _ in range(rng.randint(1, 6))) for _ in range(3000)}
    for _ in range(30):
        names = {".".join(rng.choice(segments) for _ in range(rng.randint(1, 4))) for _ in range(8)}
        names |= set(rng.sample(sorted(keys), 4)) | {""}
        for key in keys:
            old = any(key.startswith(p) for p in [n + "." for n in names])
            assert checkpoint._under_any(key, names) == old, (key, names)
    assert checkpoint._under_any("model.layers.1.mlp.weight", {"model.layers.1"})
    assert not checkpoint._under_any("model.layers.10.mlp.weight", {"model.layers.1"})
    assert not checkpoint._under_any("model.layers.1", {"model.layers.1"})  # the name itself
    assert checkpoint._under_any(".weight", {""}) and not checkpoint._under_any("weight", {""})
