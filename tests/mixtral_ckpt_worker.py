"""One rank of the 2-process gloo check of Mixtral checkpoints on an expert-parallel model (run by
tests/test_distributed_checkpoint.py).

``python tests/mixtral_ckpt_worker.py RANK WORLD PORT OUT_DIR``: a tiny transformers Mixtral
converted with quantize_model_ and saved with checkpoint.save (Mixtral's original names), loaded per
rank into a parallelized meta model, then saved sharded from the split model; the numbers go to
OUT_DIR/rank{RANK}.json and the test asserts on them. Loopback only; every collective has a timeout.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from gloo_ranks import finish_worker, init_worker

from torch_fp8_blockwise import checkpoint as ckpt
from torch_fp8_blockwise import distributed as tpd
from torch_fp8_blockwise.distributed import checkpoint as dckpt
from torch_fp8_blockwise.nn import Fp8Config, quantize_model_
from torch_fp8_blockwise.testing import rel_error


def tiny_mixtral(device: str = "cpu") -> torch.nn.Module:
    """2 layers of 8 experts (top-2) of [H 128, I 128]: the experts split 4 + 4 over 2 ranks; the
    attention (128 wide, one block) stays replicated."""
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def main() -> None:
    rank, world, out_dir = init_worker()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    res: dict[str, object] = {}
    model = tiny_mixtral()
    quantize_model_(model, Fp8Config(), progress=False)
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, 10))
    ref = logits(model, ids)  # one device
    ep_model = copy.deepcopy(model)
    tpd.parallelize(ep_model, mesh)
    ck_dir = os.path.join(out_dir, "ckpt")
    if rank == 0:
        ckpt.save(model, ck_dir)
    dist.barrier()

    # per-rank load into a parallelized meta model: only this rank's experts' keys are read
    meta = tiny_mixtral(device="meta")
    report = tpd.parallelize(meta, mesh)
    res["experts_split"] = sorted(n for n, s in report.sharded.items() if s.kind == "expert")
    read_into, into = dckpt.read_into, []
    dckpt.read_into = lambda o, key, f, dst: (into.append(key), read_into(o, key, f, dst))
    try:
        dckpt.load(meta, ck_dir)
    finally:
        dckpt.read_into = read_into
    res["read_into"] = sorted(into)
    meta.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # non-persistent buffer
    got = logits(meta, ids)
    res["load_rel"] = rel_error(got, ref)
    res["load_equal_ep"] = torch.equal(got, logits(ep_model, ids))
    experts = meta.model.layers[1].mlp.experts
    res["experts"] = [type(experts).__name__, experts.expert_offset, experts.num_experts]

    # sharded save from the split model: rank 0 writes Mixtral's keys; the one-process load reads it
    save_dir = os.path.join(out_dir, "resaved")
    written = dckpt.save(meta, save_dir, max_shard_bytes=1 << 18)
    res["written"] = written
    if rank == 0:
        from safetensors.torch import load_file

        a = load_file(os.path.join(ck_dir, "model.safetensors"))
        b: dict[str, torch.Tensor] = {}
        for name in written:
            if name.endswith(".safetensors"):
                b.update(load_file(os.path.join(save_dir, name)))
        res["resave_keys"] = sorted(b)
        res["saved_keys"] = sorted(a)
        res["resave_equal"] = sorted(a) == sorted(b) and all(
            torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
        )
        fresh = tiny_mixtral()
        with torch.no_grad():
            for p in fresh.parameters():
                p.mul_(0.5)  # different values everywhere
        ckpt.load(fresh, save_dir)
        res["one_process_load_equal"] = torch.equal(logits(fresh, ids), ref)
    finish_worker(out_dir, rank, res)


if __name__ == "__main__":
    main()
