"""torch_xla SPMD on 4 virtual CPU devices (run by tests/test_distributed_xla.py in its own process:
``xr.use_spmd()`` is process-global). ``python tests/xla_spmd_worker.py OUT_JSON DUMP_DIR CKPT_DIR``; needs
PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 and XLA_FLAGS=--xla_dump_to=DUMP_DIR --xla_dump_hlo_as_text."""

from __future__ import annotations

import copy
import glob
import json
import os
import re
import shutil
import sys

import numpy as np
import torch
import torch_xla
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr
from tiny_models import tiny_moe as shared_tiny_moe

from torch_fp8_blockwise import checkpoint
from torch_fp8_blockwise.distributed import checkpoint as tp_checkpoint
from torch_fp8_blockwise.distributed import parallelize
from torch_fp8_blockwise.nn import Fp8Config, quantize_model_
from torch_fp8_blockwise.testing import rel_error

FUSED = ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv")
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


def tiny_moe(family: str, device: str = "cpu") -> torch.nn.Module:
    """tiny_models.tiny_moe with one layer (2 experts per device on 4 devices); Qwen3-MoE with
    hidden 512 so attention splits too (4 heads of 128); DeepSeek-V3 as it is (its attention and
    dense first layer stay replicated at tp = 4: 128 / 4 is not whole blocks)."""
    if family == "qwen3_moe":
        return shared_tiny_moe(
            family, device, hidden_size=512, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4
        )
    return shared_tiny_moe(family, device)


def experts_parallel(res: dict, mesh, dev, dump: str, ckpt_dir: str) -> None:
    """Expert parallelism over the mesh: logits vs the unsharded XLA model and the CPU model, the
    partitioned HLO of the experts layer, and a meta model filled by the checkpoint loader."""
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    runs = [("qwen3_moe", "dynamic"), ("qwen3_moe", "none"), ("deepseek_v3", "dynamic")]
    for family, activation in runs:
        tag = f"{family}_{activation}"
        model = tiny_moe(family)
        quantize_model_(model, Fp8Config(activation=activation), progress=False)
        with torch.no_grad():
            ref = model(ids).logits
            one = copy.deepcopy(model).to(dev)(ids.to(dev)).logits.cpu()
            ep = copy.deepcopy(model).to(dev)
            report = parallelize(ep, mesh)
            torch_xla.sync()
            before = set(glob.glob(f"{dump}/*after_optimizations.txt"))
            out = ep(ids.to(dev)).logits.cpu()
            res[f"{tag}_model_collectives"] = collectives(dump, before)
        res[f"{tag}_rel_vs_xla_one_device"] = rel_error(out, one)
        res[f"{tag}_rel_vs_cpu"] = rel_error(out, ref)
        res[f"{tag}_sharded"] = {k: v.kind for k, v in report.sharded.items()}
        res[f"{tag}_report"] = str(report)
        res[f"{tag}_bytes"] = [report.rank_bytes, report.full_bytes]
        experts = ep.model.layers[-1].mlp.experts
        res[f"{tag}_experts_bytes"] = sum(getattr(experts, k).nbytes for k in FUSED)
        res[f"{tag}_experts_spec"] = torch_xla._XLAC._get_xla_sharding_spec(experts.gate_up_proj)
        if tag != "qwen3_moe_dynamic":
            continue
        # The experts layer alone: one float32 all-reduce, no all-gather of the expert weights.
        h = torch.randn(16, 512).to(dev)
        idx = torch.randint(0, 8, (16, 3)).to(dev)
        w = torch.rand(16, 3).to(dev)
        torch_xla.sync()
        before = set(glob.glob(f"{dump}/*after_optimizations.txt"))
        y = experts(h, idx, w)
        torch_xla.sync()
        res["experts_collectives"] = collectives(dump, before)
        res["experts_out_shape"] = list(y.shape)
        meta_load(res, model, mesh, ckpt_dir, ids, out, dev)


def placed_pieces(fn) -> list:
    """Run ``fn()`` recording (global shape, host piece shapes) of each tensor torch_xla builds from
    per-device host pieces (``_global_tensor_from_cpu_shards``)."""
    placed = []
    from_shards = torch_xla._XLAC._global_tensor_from_cpu_shards

    def spy(shards, sharding, shape=None):
        placed.append([list(shape), [list(s.shape) for s in shards]])
        return from_shards(shards, sharding, shape)

    torch_xla._XLAC._global_tensor_from_cpu_shards = spy
    try:
        fn()
    finally:
        torch_xla._XLAC._global_tensor_from_cpu_shards = from_shards
    return placed


def meta_load(res: dict, model, mesh, ckpt_dir: str, ids, out, dev) -> None:
    """A meta model, parallelized, filled by the checkpoint loader (each tensor placed sharded)."""
    checkpoint.save(model, ckpt_dir)
    meta = tiny_moe("qwen3_moe", device="meta")
    meta_report = parallelize(meta, mesh, config=Fp8Config(activation="dynamic"))
    res["meta_placed"] = placed_pieces(lambda: tp_checkpoint.load(meta, ckpt_dir))
    meta.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(dev)  # non-persistent
    with torch.no_grad():
        loaded = meta(ids.to(dev)).logits.cpu()
    res["meta_load_equal"] = torch.equal(loaded, out)
    res["meta_load_rel"] = rel_error(loaded, out)
    res["meta_report_bytes"] = [meta_report.rank_bytes, meta_report.full_bytes]
    layer = meta.model.layers[0]
    res["meta_specs"] = {
        name: torch_xla._XLAC._get_xla_sharding_spec(t)
        for name, t in (
            ("q_proj.weight", layer.self_attn.q_proj.weight),
            ("o_proj.weight_scale_inv", layer.self_attn.o_proj.weight_scale_inv),
            ("experts.down_proj", layer.mlp.experts.down_proj),
            ("embed_tokens.weight", meta.model.embed_tokens.weight),
        )
    }
    res["meta_devices"] = sorted({t.device.type for t in [*meta.parameters(), *meta.buffers()]})
    res["resave_identical"] = resave_identical(meta, ckpt_dir)
    res["fused_keys_load_equal"] = fused_keys_load(model, mesh, ckpt_dir, ids, out, dev)
    refusals(res, model, mesh, ckpt_dir)


def _file_tensors(directory: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        out.update(load_file(f))
    return out


def resave_identical(parallel, ckpt_dir: str) -> bool:
    """distributed.checkpoint.save of the parallelized XLA model writes the checkpoint it was
    loaded from: the same keys, dtypes and bytes (fp8 codes, scales, the rest)."""
    resaved = ckpt_dir + "_resaved"
    tp_checkpoint.save(parallel, resaved)
    a, b = _file_tensors(ckpt_dir), _file_tensors(resaved)
    return sorted(a) == sorted(b) and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
    )


def fused_keys_load(model, mesh, ckpt_dir: str, ids, out, dev) -> bool:
    """The same checkpoint with each experts module's per-expert keys replaced by fused keys
    (``<experts>.gate_up_proj``, ...: transformers' FP8Experts names), read by expert rows per device."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(f"{ckpt_dir}/model.safetensors")
    experts = model.model.layers[0].mlp.experts
    prefix = "model.layers.0.mlp.experts."
    tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    tensors.update({prefix + k: getattr(experts, k).contiguous() for k in FUSED})
    fused_dir = f"{ckpt_dir}_fused"
    shutil.copytree(ckpt_dir, fused_dir)
    save_file(tensors, f"{fused_dir}/model.safetensors")
    meta = tiny_moe("qwen3_moe", device="meta")
    parallelize(meta, mesh)
    tp_checkpoint.load(meta, fused_dir)
    meta.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(dev)
    with torch.no_grad():
        return torch.equal(meta(ids.to(dev)).logits.cpu(), out)


def _error(fn) -> str:
    try:
        fn()
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def refusals(res: dict, model: torch.nn.Module, mesh, ckpt_dir: str) -> None:
    """Bad input is refused before anything moves: a CPU model, the all-to-all style, a checkpoint
    missing one per-expert key or with a sharded tensor of the wrong shape (the meta model stays
    as it was)."""
    from safetensors.torch import load_file, save_file

    cpu = copy.deepcopy(model)
    res["cpu_model_error"] = _error(lambda: parallelize(cpu, mesh))
    res["cpu_model_unchanged"] = type(cpu.model.layers[0].mlp.experts).__name__
    meta = tiny_moe("qwen3_moe", device="meta")
    res["alltoall_error"] = _error(lambda: parallelize(meta, mesh, expert_dispatch="alltoall"))
    parallelize(meta, mesh)
    tensors = load_file(f"{ckpt_dir}/model.safetensors")
    for tag, edit in (
        ("missing_expert", lambda t: t.pop("model.layers.0.mlp.experts.5.up_proj.weight")),
        (
            "bad_shape",
            lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_scale_inv": torch.ones(4, 5)}),
        ),
    ):
        broken = f"{ckpt_dir}_{tag}"
        shutil.copytree(ckpt_dir, broken)
        bad = dict(tensors)
        edit(bad)
        save_file(bad, f"{broken}/model.safetensors")
        res[f"{tag}_error"] = _error(lambda b=broken: tp_checkpoint.load(meta, b))
    layer = meta.model.layers[0]
    res["failed_load_unchanged"] = [
        t.device.type for t in (layer.self_attn.q_proj.weight, layer.mlp.experts.gate_up_proj)
    ]


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
    experts_parallel(res, mesh, dev, dump, sys.argv[3])
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
