"""compressed-tensors (llm-compressor FP8_BLOCK) checkpoints: files written by hand from the spec
(not by our save) load bit for bit, targets / ignore / class names / regexes are honoured, every
scheme we cannot run is refused naming config.json and the field, and save(format=
"compressed-tensors") -> load round trips exactly."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from torch_fp8_blockwise import checkpoint
from torch_fp8_blockwise.checkpoint import CheckpointError
from torch_fp8_blockwise.nn import Fp8BlockwiseLinear, Fp8Config, quantize_model_

E4M3 = torch.float8_e4m3fn


class MyLinear(nn.Linear):
    """A Linear subclass, to be named by class in targets."""


class Block(nn.Module):
    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q_proj = MyLinear(d, d, bias=True)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)  # K = 320: a ragged K block

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        return h + self.q_proj(x) + self.down_proj(torch.relu(self.up_proj(x)))


class TinyLM(nn.Module):
    """Llama-like names: model.embed_tokens, model.layers.i.{q,up,down}_proj, model.norm, lm_head."""

    def __init__(self, vocab: int = 300, d: int = 256, ff: int = 320, tie: bool = False) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(Block(d, ff) for _ in range(2))
        self.model.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h)
        return self.lm_head(self.model.norm(h))


def _bf16_model(**kw) -> TinyLM:
    model = TinyLM(**kw).to(torch.bfloat16)
    model.model.layers[0].up_proj.weight.data[:128, :128] = 0  # an all-zero block: scale = eps
    return model


def _llm_compressor_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' FP8_BLOCK recipe written out independently of the library, in the
    weight's dtype (bf16): scale = amax / 448 rounded to bf16, 0 -> finfo(bf16).eps; q = e4m3(w /
    scale) with ragged edges zero-padded."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.zeros(nb * block, kb * block, dtype=w.dtype)
    padded[:n, :k] = w
    blocks = padded.reshape(nb, block, kb, block)
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    q = (blocks / scale[:, None, :, None]).clamp(-448, 448).reshape(nb * block, kb * block)[:n, :k]
    return q.to(E4M3).contiguous(), scale.contiguous()


WEIGHTS = dict(num_bits=8, type="float", symmetric=True, group_size=None, strategy="block", dynamic=False)
WEIGHTS["block_structure"] = [128, 128]
ACTS = dict(num_bits=8, type="float", symmetric=True, group_size=128, strategy="group", dynamic=True)


def _config(groups: dict | None = None, ignore: list | None = None) -> dict:
    """quantization_config as compressed-tensors 0.20's ModelCompressor.update_config writes it."""
    if groups is None:
        groups = {"group_0": {"targets": ["Linear"], "weights": WEIGHTS, "input_activations": ACTS}}
    for g in groups.values():
        g.setdefault("output_activations", None)
        g.setdefault("format", None)
    return {
        "version": "0.20.0",
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        "config_groups": copy.deepcopy(groups),
        "format": "float-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": ["lm_head"] if ignore is None else ignore,
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
    }


def _write(model: nn.Module, root, quant: dict, fp8: set[str]) -> dict[str, torch.Tensor]:
    """A compressed-tensors file: each layer in ``fp8`` as weight (e4m3) + weight_scale (bf16),
    everything else as it is (bf16)."""
    tensors = {}
    for key, t in model.state_dict().items():
        layer = key.rpartition(".")[0]
        if layer in fp8 and key.endswith(".weight"):
            tensors[key], tensors[f"{layer}.weight_scale"] = _llm_compressor_quantize(t)
        else:
            tensors[key] = t.contiguous()
    os.makedirs(root, exist_ok=True)
    save_file(tensors, os.path.join(root, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "quantization_config": quant}, f)
    return tensors


PROJ = [f"model.layers.{i}.{p}_proj" for i in range(2) for p in ("q", "up", "down")]


def _assert_loaded_exactly(model: nn.Module, tensors: dict, name: str, activation: str) -> None:
    layer = model.get_submodule(name)
    assert isinstance(layer, Fp8BlockwiseLinear), name
    assert torch.equal(layer.weight.view(torch.uint8), tensors[f"{name}.weight"].view(torch.uint8))
    # bf16 -> fp32 is exact: the multiplier is the file's, bit for bit
    assert layer.weight_scale_inv.dtype == torch.float32
    assert torch.equal(layer.weight_scale_inv, tensors[f"{name}.weight_scale"].float())
    assert layer.config == Fp8Config((128, 128), activation)


# ------------------------------------------------------------------------------ foreign files
def test_load_llm_compressor_fp8_block(tmp_path) -> None:
    source = _bf16_model()
    tensors = _write(source, tmp_path, _config(), set(PROJ))
    assert tensors["model.layers.0.up_proj.weight_scale"][0, 0] == torch.finfo(torch.bfloat16).eps
    model = _bf16_model()
    summary = checkpoint.load(model, tmp_path)
    assert sorted(summary.converted) == sorted(PROJ)
    for name in PROJ:
        _assert_loaded_exactly(model, tensors, name, "dynamic")
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, source.lm_head.weight)
    # the forward is our op on the file's tensors, and close to the unquantized model
    ids = torch.randint(0, 300, (2, 5))
    with torch.no_grad():
        y, ref = model(ids), source(ids)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 0.05


def test_targets_regex_exact_names_and_ignore(tmp_path) -> None:
    groups = {
        "group_0": {"targets": ["re:.*q_proj$"], "weights": WEIGHTS, "input_activations": ACTS},
        "group_1": {"targets": ["re:.*(up|down)_proj$"], "weights": WEIGHTS},  # weight-only
        # an exact name beats a regex (compressed-tensors' order), whichever group comes first
        "group_2": {"targets": ["model.layers.1.up_proj"], "weights": WEIGHTS, "input_activations": ACTS},
    }
    # lm_head: matched by no target; "re:" is re.match, anchored at the start of the name, so
    # "re:layers\.1\.q_proj" does not ignore model.layers.1.q_proj
    quant = _config(groups, ignore=["model.layers.1.down_proj", r"re:layers\.1\.q_proj"])
    fp8 = set(PROJ) - {"model.layers.1.down_proj"}
    tensors = _write(_bf16_model(), tmp_path, quant, fp8)
    model = _bf16_model()
    checkpoint.load(model, tmp_path)
    expected = {
        "model.layers.0.q_proj": "dynamic",
        "model.layers.1.q_proj": "dynamic",
        "model.layers.0.up_proj": "none",
        "model.layers.0.down_proj": "none",
        "model.layers.1.up_proj": "dynamic",
    }
    for name, activation in expected.items():
        _assert_loaded_exactly(model, tensors, name, activation)
    kept = model.model.layers[1].down_proj
    assert type(kept) is nn.Linear and torch.equal(kept.weight, tensors["model.layers.1.down_proj.weight"])
    assert type(model.lm_head) is nn.Linear


def test_class_name_targets(tmp_path) -> None:
    """A class name matches that class and its subclasses (the MRO), nothing else; "Linear" also
    names an Fp8BlockwiseLinear that a model already holds (filled in place)."""
    quant = _config({"group_0": {"targets": ["MyLinear"], "weights": WEIGHTS, "input_activations": ACTS}}, [])
    q_projs = {"model.layers.0.q_proj", "model.layers.1.q_proj"}
    tensors = _write(_bf16_model(), tmp_path / "my", quant, q_projs)
    model = _bf16_model()
    assert sorted(checkpoint.load(model, tmp_path / "my").converted) == sorted(q_projs)
    assert type(model.model.layers[0].up_proj) is nn.Linear

    _write(_bf16_model(), tmp_path / "linear", _config(), set(PROJ))
    model = _bf16_model()
    quantize_model_(  # to be refilled with the file's blocks and activation
        model, Fp8Config((256, 256), activation="none"), lambda m, fqn: fqn != "lm_head", progress=False
    )
    assert isinstance(model.model.layers[0].q_proj, Fp8BlockwiseLinear)
    tensors = load_file(tmp_path / "linear" / "model.safetensors")
    checkpoint.load(model, tmp_path / "linear")
    for name in PROJ:
        _assert_loaded_exactly(model, tensors, name, "dynamic")


def test_fp8_block_preset_name_in_config_groups(tmp_path) -> None:
    quant = _config()
    quant["config_groups"] = {"FP8_BLOCK": ["Linear"]}  # QuantizationConfig expands preset names
    tensors = _write(_bf16_model(), tmp_path, quant, set(PROJ))
    model = _bf16_model()
    checkpoint.load(model, tmp_path)
    _assert_loaded_exactly(model, tensors, "model.layers.1.down_proj", "dynamic")


def test_a_target_repeated_in_a_later_group_belongs_to_that_group(tmp_path) -> None:
    groups = {
        "group_0": {"targets": ["Linear"], "weights": WEIGHTS, "input_activations": ACTS},
        "group_1": {"targets": ["Linear"], "weights": WEIGHTS},
    }
    tensors = _write(_bf16_model(), tmp_path, _config(groups), set(PROJ))
    model = _bf16_model()
    checkpoint.load(model, tmp_path)
    for name in PROJ:
        _assert_loaded_exactly(model, tensors, name, "none")


def test_load_into_meta_model(tmp_path) -> None:
    tensors = _write(_bf16_model(), tmp_path, _config(), set(PROJ))
    with torch.device("meta"):
        model = TinyLM().to(torch.bfloat16)
    checkpoint.load(model, tmp_path)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    for name in PROJ:
        _assert_loaded_exactly(model, tensors, name, "dynamic")
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])


def test_activation_argument_overrides_the_file(tmp_path) -> None:
    quant = _config()
    quant["config_groups"]["group_0"]["input_activations"] = {**ACTS, "strategy": "token", "group_size": None}
    tensors = _write(_bf16_model(), tmp_path, quant, set(PROJ))
    with pytest.raises(CheckpointError, match="pass activation="):
        checkpoint.load(_bf16_model(), tmp_path)
    model = _bf16_model()
    checkpoint.load(model, tmp_path, activation="none")
    _assert_loaded_exactly(model, tensors, "model.layers.0.q_proj", "none")


# ------------------------------------------------------------------------------- refusals
def _set(path: str, value):
    def edit(quant: dict) -> None:
        *parents, last = path.split(".")
        node = quant
        for p in parents:
            node = node[p]
        node[last] = value

    return edit


G = "config_groups.group_0"


@pytest.mark.parametrize(
    "edit, words",
    [
        (
            _set(f"{G}.weights.symmetric", False),
            f"{G}.weights.symmetric: False is not supported (an asymmetric",
        ),
        (_set(f"{G}.input_activations.symmetric", False), "zero points"),
        (_set(f"{G}.input_activations.dynamic", False), f"{G}.input_activations.dynamic: False"),
        (_set(f"{G}.weights.num_bits", 4), f"{G}.weights.num_bits: 4 is not supported"),
        (_set(f"{G}.weights.type", "int"), f"{G}.weights.type: 'int' is not supported"),
        (_set(f"{G}.weights.strategy", "channel"), "'channel' is not supported (per-channel fp8"),
        (_set(f"{G}.weights.strategy", "tensor"), "'tensor' is not supported (per-tensor fp8"),
        (_set(f"{G}.weights.block_structure", [64, 64]), f"{G}.weights.block_structure: [64, 64]"),
        (_set(f"{G}.weights.dynamic", True), f"{G}.weights.dynamic: True"),
        (_set(f"{G}.weights.actorder", "group"), "weight_g_idx"),
        (_set(f"{G}.weights.scale_dtype", "torch.float8_e4m3fn"), f"{G}.weights.scale_dtype"),
        (_set(f"{G}.weights.zero_points", True), f"{G}.weights.zero_points: unknown field"),
        (_set(f"{G}.input_activations.group_size", 64), f"{G}.input_activations.group_size: 64"),
        (_set(f"{G}.input_activations.strategy", "tensor"), f"{G}.input_activations.strategy: 'tensor'"),
        (_set(f"{G}.output_activations", ACTS), f"{G}.output_activations"),
        (_set(f"{G}.format", "pack-quantized"), f"{G}.format: 'pack-quantized' is not supported"),
        (_set("format", "naive-quantized"), "format: 'naive-quantized' is not supported"),
        (_set("format", "mixed-precision"), f"{G}.format: 'mixed-precision'"),
        (_set("quantization_status", "frozen"), "quantization_status: 'frozen' is not supported"),
        (_set("kv_cache_scheme", {**ACTS, "strategy": "tensor"}), "kv_cache_scheme"),
        (_set("transform_config", {"config_groups": {"r": {}}}), "transform_config"),
        (_set("config_groups", {}), "config_groups: expected a non-empty object"),
        (_set(f"{G}.targets", ["re:(unclosed"]), "not a valid regular expression"),
        (_set("config_groups", {"W4A16": ["Linear"]}), "preset 'W4A16' is not supported"),
    ],
)
def test_refused_schemes_name_config_json_and_the_field(tmp_path, edit, words) -> None:
    quant = _config()
    edit(quant)
    _write(_bf16_model(), tmp_path, quant, set(PROJ))
    model = _bf16_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(model, tmp_path)
    assert words in str(info.value) and "config.json" in str(info.value)
    assert all(type(model.get_submodule(n)) is not Fp8BlockwiseLinear for n in PROJ)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_file_and_config_disagree(tmp_path) -> None:
    # targeted, but the file holds no scales for it
    _write(_bf16_model(), tmp_path / "a", _config(), set(PROJ) - {"model.layers.1.up_proj"})
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(_bf16_model(), tmp_path / "a")
    assert (
        "model.layers.1.up_proj.weight_scale: missing, but the quantization_config in config.json "
        "targets model.layers.1.up_proj (config_groups.group_0)" in str(info.value)
    )
    # ignored, but the file holds fp8 scales for it
    _write(_bf16_model(), tmp_path / "b", _config(ignore=["lm_head", "re:.*layers.0.q_proj"]), set(PROJ))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(_bf16_model(), tmp_path / "b")
    assert "config.json keeps model.layers.0.q_proj in high precision" in str(info.value)
    assert "model.layers.0.q_proj.weight_scale in " in str(info.value)


# ----------------------------------------------------------------------------- round trips
def _converted(tie: bool = False, mixed: bool = False) -> TinyLM:
    model = TinyLM(tie=tie).to(torch.bfloat16)
    quantize_model_(model, filter_fn=lambda m, fqn: fqn != "model.layers.1.down_proj", progress=False)
    if mixed:  # a second and a third group: W8A16, and 256 x 256 blocks
        layers = model.model.layers
        layers[0].q_proj = Fp8BlockwiseLinear.from_linear(
            nn.Linear(256, 256).bfloat16(), Fp8Config(activation="none")
        )
        layers[1].up_proj = Fp8BlockwiseLinear.from_linear(
            nn.Linear(256, 320, bias=False), Fp8Config((256, 256))
        )
    return model


@pytest.mark.parametrize("tie, mixed, shard", [(False, False, None), (True, True, 300_000)])
def test_save_load_round_trip(tmp_path, tie, mixed, shard) -> None:
    model = _converted(tie, mixed)
    checkpoint.save(model, tmp_path, format="compressed-tensors", max_shard_bytes=shard)
    quant = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "float-quantized"
    kept = ["lm_head", "model.layers.1.down_proj"] if tie else ["model.layers.1.down_proj"]
    assert quant["ignore"] == kept
    groups = quant["config_groups"]
    if not mixed:
        assert list(groups) == ["group_0"] and groups["group_0"]["targets"] == ["Linear"]
        assert groups["group_0"]["input_activations"] == ACTS and groups["group_0"]["weights"] == WEIGHTS
    else:
        assert len(groups) == 3 and all(g["targets"] != ["Linear"] for g in groups.values())
    files = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    tensors = {k: v for f in files for k, v in load_file(tmp_path / f).items()}
    assert not any(k.endswith("weight_scale_inv") for k in tensors)
    for name, layer in model.named_modules():
        if isinstance(layer, Fp8BlockwiseLinear):  # float32 as it is: codes x scale unchanged
            assert tensors[f"{name}.weight_scale"].dtype == torch.float32
            assert torch.equal(tensors[f"{name}.weight_scale"], layer.weight_scale_inv)

    fresh = TinyLM(tie=tie).to(torch.bfloat16)
    checkpoint.load(fresh, tmp_path)
    for name, layer in model.named_modules():
        if isinstance(layer, Fp8BlockwiseLinear):
            assert fresh.get_submodule(name).config == layer.config, name
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_save_ue8m0_layers_as_plain_multipliers(tmp_path) -> None:
    """compressed-tensors has no power-of-two flag: the scales are written as they are (float32
    powers of two) and load back as scale_format "fp32", with the same outputs."""
    model = TinyLM().to(torch.bfloat16)
    quantize_model_(model, Fp8Config(scale_format="ue8m0"), lambda m, fqn: fqn != "lm_head", progress=False)
    checkpoint.save(model, tmp_path, format="compressed-tensors")
    fresh = TinyLM().to(torch.bfloat16)
    checkpoint.load(fresh, tmp_path)
    layer = fresh.model.layers[0].up_proj
    assert layer.config.scale_format == "fp32"
    assert torch.equal(layer.weight_scale_inv, model.model.layers[0].up_proj.weight_scale_inv)
    assert not (layer.weight_scale_inv.view(torch.int32) & 0x7FFFFF).any()
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_save_refuses_what_the_format_cannot_hold(tmp_path) -> None:
    model = _converted()
    with pytest.raises(ValueError, match="format: expected one of"):
        checkpoint.save(model, tmp_path, format="gptq")
    model.model.layers[0].q_proj = Fp8BlockwiseLinear.from_linear(
        nn.Linear(256, 256), Fp8Config(dtype=torch.float8_e5m2)
    )
    with pytest.raises(ValueError, match="model.layers.0.q_proj is torch.float8_e5m2"):
        checkpoint.save(model, tmp_path, format="compressed-tensors")
    assert not os.path.exists(tmp_path / "model.safetensors")
