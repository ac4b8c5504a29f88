"""Interop check against the real compressed-tensors package (not a CI dependency; run by hand).

    python -m venv /tmp/ct && /tmp/ct/bin/pip install --no-deps compressed-tensors==0.20.0 loguru
    # plus torch, safetensors, pydantic, transformers (e.g. a .pth file pointing at our `latest` venv)
    PYTHONPATH=. /tmp/ct/bin/python scripts/check_compressed_tensors.py

1. compressed-tensors writes an FP8_BLOCK checkpoint of a small bf16 model with its own scale
   rule (``calculate_qparams``) and compressor (``ModelCompressor.compress_model``,
   ``update_config``); ``checkpoint.load`` must take its codes and scales bit for bit.
2. ``checkpoint.save(..., format="compressed-tensors")`` output: compressed-tensors'
   ``QuantizationConfig`` must accept our config, and its decompressor must give
   ``codes * scale`` (in the model's dtype: it casts our float32 scales to bf16).

Prints one line per check and exits non-zero on a mismatch.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationConfig,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import load_file, save_file
from torch import nn

from torch_fp8_blockwise import checkpoint, quantize_model_
from torch_fp8_blockwise.nn import Fp8BlockwiseLinear


def tiny_model() -> nn.Module:
    """Embedding, two blocks of q / up / down projections (K = 320: a ragged K block), lm_head."""
    torch.manual_seed(0)
    model = nn.Module()
    model.embed_tokens = nn.Embedding(300, 256)
    model.layers = nn.ModuleList()
    for _ in range(2):
        block = nn.Module()
        block.q_proj, block.up_proj, block.down_proj = (
            nn.Linear(256, 256),
            nn.Linear(256, 320),
            nn.Linear(320, 256),
        )
        model.layers.append(block)
    model.lm_head = nn.Linear(256, 300, bias=False)
    model = model.to(torch.bfloat16)
    model.layers[0].up_proj.weight.data[:128, :128] = 0  # an all-zero block
    return model


def written_by_compressed_tensors(root: str) -> dict[str, torch.Tensor]:
    model = tiny_model()
    scheme = preset_name_to_scheme("FP8_BLOCK", ["Linear"])
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, ignore=["lm_head"], quantization_status="frozen"
    )
    apply_quantization_config(model, config)
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        args, w = module.quantization_scheme.weights, module.weight.data
        (bn, bk), (n, k) = args.block_structure, w.shape
        padded = torch.zeros(-(-n // bn) * bn, -(-k // bk) * bk, dtype=w.dtype)
        padded[:n, :k] = w
        blocks = padded.reshape(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
        scale, _ = calculate_qparams(blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3)), args)
        module.weight_scale.data.copy_(scale)
    compressor = ModelCompressor.from_pretrained_model(model, "float-quantized")
    compressor.compress_model(model)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(root, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({}, f)
    compressor.update_config(root)
    return tensors


def hand_recipe(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe tests/test_compressed_tensors.py writes its files with: in w's dtype, scale =
    amax / 448 (0 -> finfo.eps), q = e4m3(clamp(w / scale)), ragged edges zero-padded."""
    n, k = w.shape
    padded = torch.zeros(-(-n // block) * block, -(-k // block) * block, dtype=w.dtype)
    padded[:n, :k] = w
    blocks = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block)
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    q = (blocks / scale[:, None, :, None]).clamp(-448, 448).reshape(padded.shape)[:n, :k]
    return q.to(torch.float8_e4m3fn), scale


def main() -> int:
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        theirs = os.path.join(tmp, "theirs")
        os.makedirs(theirs)
        tensors = written_by_compressed_tensors(theirs)
        model = tiny_model()
        summary = checkpoint.load(model, theirs)
        for name in summary.converted:
            layer = model.get_submodule(name)
            ok = torch.equal(layer.weight.view(torch.uint8), tensors[f"{name}.weight"].view(torch.uint8))
            ok = ok and torch.equal(layer.weight_scale_inv, tensors[f"{name}.weight_scale"].float())
            q, scale = hand_recipe(tiny_model().get_submodule(name).weight.detach())
            same = torch.equal(q.view(torch.uint8), layer.weight.view(torch.uint8))
            same = same and torch.equal(scale, tensors[f"{name}.weight_scale"])
            failures += not (ok and same)
            print(
                f"1. {name}: its codes and bf16 scales loaded bit for bit: {ok}; = our tests' recipe: {same}"
            )

        ours = os.path.join(tmp, "ours")
        model = tiny_model()
        quantize_model_(model, filter_fn=lambda m, fqn: fqn != "lm_head", progress=False)
        checkpoint.save(model, ours, format="compressed-tensors")
        with open(os.path.join(ours, "config.json")) as f:
            config = QuantizationConfig.model_validate(json.load(f)["quantization_config"])
        print(f"2. QuantizationConfig.model_validate(our config): format {config.format}")
        ct_model = tiny_model()
        apply_quantization_config(ct_model, config)
        ct_model.load_state_dict(load_file(os.path.join(ours, "model.safetensors")))
        ModelCompressor(quantization_config=config).decompress_model(ct_model)
        for name, layer in model.named_modules():
            if not isinstance(layer, Fp8BlockwiseLinear):
                continue
            n, k = layer.weight.shape
            scale = layer.weight_scale_inv.bfloat16().repeat_interleave(128, 0).repeat_interleave(128, 1)
            ok = torch.equal(ct_model.get_submodule(name).weight, layer.weight.bfloat16() * scale[:n, :k])
            failures += not ok
            print(f"2. {name}: compressed-tensors decompresses our file to codes * bf16(scale): {ok}")
    print("FAILED" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
