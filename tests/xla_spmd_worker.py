"""torch_xla SPMD on 4 virtual CPU devices (run by tests/test_distributed_xla.py in its own process:
``xr.use_spmd()`` is process-global). ``python tests/xla_spmd_worker.py OUT_JSON DUMP_DIR``; needs
PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 and XLA_FLAGS=--xla_dump_to=DUMP_DIR --xla_dump_hlo_as_text."""

from __future__ import annotations

import copy
import glob
import json
import re
import sys

import numpy as np
import torch
import torch_xla
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr

from torch_fp8_blockwise.distributed import parallelize
from torch_fp8_blockwise.nn import Fp8Config, quantize_model_
from torch_fp8_blockwise.testing import rel_error

COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")


class Mlp(torch.nn.Module):
    """A decoder MLP block with the transformers names the default plan knows."""

    def __init__(self, hidden: int = 256, inter: int = 1024) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def collectives(dump: str, before: set[str]) -> dict[str, int]:
    """Collective ops in the optimized (partitioned) HLO modules compiled since ``before``."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for f in sorted(set(glob.glob(f"{dump}/*after_optimizations.txt")) - before):
        text = open(f).read()
        for op in COLLECTIVES:
            counts[op] += len(re.findall(rf"\b{op}(-start)?\(", text))
    return counts


def main() -> None:
    out_path, dump = sys.argv[1], sys.argv[2]
    xr.use_spmd()
    dev = torch_xla.device()
    n = xr.global_runtime_device_count()
    mesh = xs.Mesh(np.arange(n), (n,), ("tp",))
    res: dict[str, object] = {"devices": n}
    torch.manual_seed(0)
    x = torch.randn(2, 8, 256)
    for activation in ("dynamic", "none"):
        torch.manual_seed(1)
        model = torch.nn.Sequential()
        model.add_module("mlp", Mlp())
        quantize_model_(model, Fp8Config(activation=activation), progress=False)
        ref = model(x)
        tp_model = copy.deepcopy(model).to(dev)
        report = parallelize(tp_model, mesh)
        y = tp_model(x.to(dev))
        res[f"{activation}_rel"] = rel_error(y.cpu(), ref)
        res[f"{activation}_report"] = str(report)
        res[f"{activation}_sharded"] = {k: v.kind for k, v in report.sharded.items()}
        res[f"{activation}_bytes"] = [report.rank_bytes, report.full_bytes]
        if activation == "dynamic":  # column-parallel vs the same Pallas kernel unsharded on XLA
            one = copy.deepcopy(model).to(dev)
            g = tp_model.mlp.gate_proj(x.to(dev)).cpu()
            g_one = one.mlp.gate_proj(x.to(dev)).cpu()
            res["colwise_bitexact"] = torch.equal(g, g_one)
            res["colwise_rel"] = rel_error(g, g_one)
            torch_xla.sync()
            for name, layer, inp in (
                ("colwise", tp_model.mlp.gate_proj, x),
                ("rowwise", tp_model.mlp.down_proj, torch.randn(2, 8, 1024)),
            ):
                inp = inp.to(dev)
                torch_xla.sync()
                before = set(glob.glob(f"{dump}/*after_optimizations.txt"))
                out = layer(inp)
                torch_xla.sync()
                res[f"{name}_collectives"] = collectives(dump, before)
                res[f"{name}_out_shape"] = list(out.shape)
    # The decoder family of the gloo test (transformers Llama, W8A8), sized for 4 devices: every
    # projection splits (512 = 4 x 128 rows), attention included.
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    quantize_model_(llama, Fp8Config(), progress=False)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        one = copy.deepcopy(llama).to(dev)(ids.to(dev)).logits.cpu()
        tp_llama = copy.deepcopy(llama).to(dev)
        report = parallelize(tp_llama, mesh)
        out = tp_llama(ids.to(dev)).logits.cpu()
        res["llama_sharded"] = len(report.sharded)
        res["llama_rel_vs_xla_one_device"] = rel_error(out, one)
        res["llama_rel_vs_cpu"] = rel_error(out, llama(ids).logits)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
