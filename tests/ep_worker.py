"""One rank of the 2-process gloo expert-parallel checks (run by tests/test_distributed_experts.py).

``python tests/ep_worker.py RANK WORLD PORT OUT_DIR``: every check's numbers go to
OUT_DIR/rank{RANK}.json; the test asserts on them. Loopback only; every collective has a timeout.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from gloo_ranks import finish_worker, init_worker
from tiny_models import tiny_moe

from torch_fp8_blockwise import checkpoint as ckpt
from torch_fp8_blockwise import distributed as tpd
from torch_fp8_blockwise.distributed import checkpoint as dckpt
from torch_fp8_blockwise.experts import Fp8Experts
from torch_fp8_blockwise.nn import Fp8Config, quantize_model_
from torch_fp8_blockwise.testing import rel_error


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _checkpoints(res, model, ep_model, ids, mesh, out_dir, rank) -> None:
    """Per-rank load of a saved checkpoint into a meta model, save from the split model, dcp."""
    out = logits(ep_model, ids)
    ck_dir = os.path.join(out_dir, "ckpt")
    if rank == 0:
        ckpt.save(model, ck_dir)
    dist.barrier()
    meta = tiny_moe("qwen3_moe", device="meta")
    tpd.parallelize(meta, mesh, expert_dispatch="alltoall")
    dckpt.load(meta, ck_dir)
    meta.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # non-persistent buffer
    res["perrank_load_equal"] = torch.equal(logits(meta, ids), out)
    experts = meta.model.layers[0].mlp.experts
    res["perrank_experts"] = [type(experts).__name__, experts.expert_offset, experts.num_experts]
    save_dir = os.path.join(out_dir, "resaved")
    dckpt.save(ep_model, save_dir)
    if rank == 0:
        from safetensors.torch import load_file

        a = load_file(os.path.join(ck_dir, "model.safetensors"))
        b = load_file(os.path.join(save_dir, "model.safetensors"))
        res["resave_same_keys"] = sorted(a) == sorted(b)
        res["resave_equal"] = all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    import torch.distributed.checkpoint as dcp

    dcp_dir = os.path.join(out_dir, "dcp")
    dcp.save(dckpt.dtensor_state_dict(ep_model, mesh), checkpoint_id=dcp_dir)
    fresh = tiny_moe("qwen3_moe")
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(0.5)  # different values everywhere
    quantize_model_(fresh, Fp8Config(), progress=False)
    tpd.parallelize(fresh, mesh, expert_dispatch="alltoall")
    dcp.load(dckpt.dtensor_state_dict(fresh, mesh), checkpoint_id=dcp_dir)
    res["dcp_roundtrip_equal"] = torch.equal(logits(fresh, ids), out)


def _dp_attention(res: dict, mesh, rank: int) -> None:
    """Data-parallel attention: each rank brings its OWN tokens (T per rank differs, 0 on one rank)
    and must get one device's layer on its tokens; W8A8 and W8A16. Then a whole Qwen3-MoE with
    only its experts split, each rank feeding its own batch."""
    from torch.distributed.tensor.parallel import parallelize_module

    e, h, i = 8, 256, 128
    for activation in ("dynamic", "none"):
        torch.manual_seed(5)
        full = Fp8Experts.from_quantized(
            *torch.ops.fp8.quantize(torch.randn(e, 2 * i, h) * 0.05, [128, 128]),
            *torch.ops.fp8.quantize(torch.randn(e, h, i) * 0.05, [128, 128]),
            Fp8Config(activation=activation),
        )
        style = tpd.Fp8ExpertParallel("alltoall", dp_attention=True)
        ep = parallelize_module(copy.deepcopy(full), mesh, style)
        for tokens in ((5, 0), (3, 7), (0, 2)):  # (rank 0's T, rank 1's T)
            t = tokens[rank]
            torch.manual_seed(100 * rank + t)  # every rank its own tokens and routing
            x = torch.randn(t, h)
            idx = torch.randint(0, e + 1, (t, 3))  # e: the sentinel, contributes nothing
            w = torch.rand(t, 3)
            for dtype in (torch.float32, torch.bfloat16):
                got, want = ep(x.to(dtype), idx, w), full(x.to(dtype), idx, w)
                tag = f"dp_{activation}_{tokens[0]}_{tokens[1]}_{str(dtype)[6:]}"
                res[f"{tag}_shape"] = [list(got.shape), list(want.shape), str(got.dtype)]
                res[f"{tag}_rel"] = rel_error(got, want) if t else 0.0
    model = tiny_moe("qwen3_moe")
    quantize_model_(model, Fp8Config(), progress=False)
    dp_model = copy.deepcopy(model)
    report = tpd.parallelize(dp_model, mesh, expert_dispatch="alltoall", dp_attention=True)
    res["dp_model_sharded"] = sorted(report.sharded)
    torch.manual_seed(20 + rank)
    ids = torch.randint(0, 128, (1 + rank, 9 - 4 * rank))  # rank 0: [1, 9], rank 1: [2, 5]
    res["dp_model_rel"] = rel_error(logits(dp_model, ids), logits(model, ids))


def main() -> None:
    rank, world, out_dir = init_worker()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    res: dict[str, object] = {}

    # ---- the layer alone: random routing incl. transformers' sentinel id E and T < tp / uneven T
    torch.manual_seed(3)
    e, h, i = 8, 256, 128
    full = Fp8Experts.from_quantized(
        *torch.ops.fp8.quantize(torch.randn(e, 2 * i, h) * 0.05, [128, 128]),
        *torch.ops.fp8.quantize(torch.randn(e, h, i) * 0.05, [128, 128]),
        Fp8Config(),
    )
    for t in (1, 7):
        x = torch.randn(t, h, dtype=torch.bfloat16)
        idx = torch.randint(0, e + 1, (t, 2))  # e: the sentinel, contributes nothing
        w = torch.rand(t, 2)
        ref = full(x.float(), idx, w)
        for dispatch in ("allreduce", "alltoall"):
            ep = parallelize_module(copy.deepcopy(full), mesh, tpd.Fp8ExpertParallel(dispatch))
            res["layer_class"] = type(ep).__name__
            res[f"layer_{dispatch}_t{t}_rel"] = rel_error(ep(x.float(), idx, w), ref)
            res[f"layer_{dispatch}_t{t}_bf16_rel"] = rel_error(ep(x, idx, w), full(x, idx, w))
            res[f"layer_{dispatch}_local"] = [ep.expert_offset, ep.num_experts, ep.full_num_experts]

    _dp_attention(res, mesh, rank)

    # ---- whole MoE decoders: one device vs parallelize(model, mesh) in both dispatch styles
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 12))
    for family, activation in (("qwen3_moe", "dynamic"), ("qwen3_moe", "none"), ("deepseek_v3", "dynamic")):
        model = tiny_moe(family)
        unquantized = logits(model, ids)
        quantize_model_(model, Fp8Config(activation=activation), progress=False)
        ref = logits(model, ids)
        res[f"{family}_{activation}_quant_rel"] = rel_error(ref, unquantized)
        for dispatch in ("allreduce", "alltoall"):
            tag = f"{family}_{activation}_{dispatch}"
            ep_model = copy.deepcopy(model)
            report = tpd.parallelize(ep_model, mesh, expert_dispatch=dispatch)
            res[f"{tag}_rel"] = rel_error(logits(ep_model, ids), ref)
            res[f"{tag}_experts"] = sorted(n for n, s in report.sharded.items() if s.kind == "expert")
            res[f"{tag}_bytes"] = [report.rank_bytes, report.full_bytes]
            res[f"{tag}_report"] = str(report)
            if (family, activation, dispatch) == ("qwen3_moe", "dynamic", "alltoall"):
                _checkpoints(res, model, ep_model, ids, mesh, out_dir, rank)
    finish_worker(out_dir, rank, res)


if __name__ == "__main__":
    main()
