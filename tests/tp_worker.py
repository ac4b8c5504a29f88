"""One rank of the 2-process gloo tensor-parallel checks (run by tests/test_distributed.py).

``python tests/tp_worker.py RANK WORLD PORT OUT_DIR``: every check's numbers go to
OUT_DIR/rank{RANK}.json; the test asserts on them. Loopback only; every collective has a timeout.
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
from torch_fp8_blockwise.nn import Fp8BlockwiseLinear, Fp8Config, quantize_model_
from torch_fp8_blockwise.testing import rel_error


def tiny_decoder(family: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A 2-layer transformers decoder with every linear dimension a multiple of 256."""
    import transformers

    common = dict(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    cfg = (transformers.LlamaConfig if family == "llama" else transformers.Qwen3Config)(**common)
    with torch.device(device):
        torch.manual_seed(0)
        return (transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen3ForCausalLM)(
            cfg
        ).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _src_data_rank(res: dict, mesh, rank: int) -> None:
    """Every rank starts with OTHER random weights (seed 100 + rank): with src_data_rank=0 each ends
    with its shard of rank 0's layer (scattered from rank 0), with None with its shard of its own."""
    from torch.distributed.tensor.parallel import parallelize_module

    from torch_fp8_blockwise.experts import Fp8Experts

    def layers(seed: int) -> dict[str, torch.nn.Module]:
        torch.manual_seed(seed)
        lin = lambda: Fp8BlockwiseLinear.from_linear(torch.nn.Linear(512, 768, bias=True))  # noqa: E731
        gu = torch.ops.fp8.quantize(torch.randn(4, 256, 256), [128, 128])
        dn = torch.ops.fp8.quantize(torch.randn(4, 256, 128), [128, 128])
        return {"colwise": lin(), "rowwise": lin(), "expert": Fp8Experts.from_quantized(*gu, *dn)}

    def local(module: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
        """``module``'s tensors as this rank's shard would hold them (uint8 views of fp8)."""
        if kind == "expert":
            e = module.num_experts // 2
            keys = ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv")
            return {k: getattr(module, k)[rank * e : (rank + 1) * e] for k in keys}
        w, s, b = module.weight, module.weight_scale_inv, module.bias.detach()
        if kind == "colwise":
            n, g = w.shape[0] // 2, s.shape[0] // 2
            return {"weight": w[rank * n : (rank + 1) * n], "weight_scale_inv": s[rank * g : (rank + 1) * g],
                    "bias": b[rank * n : (rank + 1) * n]}  # fmt: skip
        k, g = w.shape[1] // 2, s.shape[1] // 2
        return {"weight": w[:, rank * k : (rank + 1) * k], "weight_scale_inv": s[:, rank * g : (rank + 1) * g],
                "bias": b}  # fmt: skip

    def same(a: dict, b: dict) -> bool:
        u8 = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731
        return sorted(a) == sorted(b) and all(torch.equal(u8(a[k]), u8(b[k])) for k in a)

    styles = {
        "colwise": tpd.Fp8ColwiseParallel,
        "rowwise": tpd.Fp8RowwiseParallel,
        "expert": tpd.Fp8ExpertParallel,
    }
    truth, mine = layers(100), layers(100 + rank)  # rank 0's layers, this rank's own
    for kind, style in styles.items():
        for src in (0, None):
            module = parallelize_module(copy.deepcopy(mine[kind]), mesh, style(), src_data_rank=src)
            got = {k: v for k, v in module.state_dict().items()}
            res[f"src{src}_{kind}_is_rank0s"] = same(got, local(truth[kind], kind))
            res[f"src{src}_{kind}_is_own"] = same(got, local(mine[kind], kind))
    # parallelize(): torch's default src_data_rank=0
    model = torch.nn.Sequential(copy.deepcopy(mine["colwise"]), copy.deepcopy(mine["rowwise"]))
    tpd.parallelize(model, mesh, {"0": "colwise", "1": "rowwise"})
    res["parallelize_default_is_rank0s"] = same(
        {f"0.{k}": v for k, v in local(truth["colwise"], "colwise").items()}
        | {f"1.{k}": v for k, v in local(truth["rowwise"], "rowwise").items()},
        model.state_dict(),
    )


def main() -> None:
    rank, world, out_dir = init_worker()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    res: dict[str, object] = {}
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (2, 16))

    # ---- single layers through parallelize_module with our styles
    torch.manual_seed(2)
    full = Fp8BlockwiseLinear.from_linear(torch.nn.Linear(512, 768, bias=True).to(torch.bfloat16))
    x = torch.randn(5, 512, dtype=torch.bfloat16)
    y_full = full(x)
    col = parallelize_module(copy.deepcopy(full), mesh, tpd.Fp8ColwiseParallel())
    y_col = col(x)
    parts = [torch.empty_like(y_col) for _ in range(world)]
    dist.all_gather(parts, y_col)
    res["colwise_layer_bitexact"] = torch.equal(torch.cat(parts, -1), y_full)
    res["colwise_class"] = type(col).__name__
    row = parallelize_module(copy.deepcopy(full), mesh, tpd.Fp8RowwiseParallel())
    k0 = rank * 512 // world
    y_row = row(x[:, k0 : k0 + 512 // world])
    res["rowwise_layer_rel"] = rel_error(y_row, y_full)
    ref32 = torch.ops.fp8.blockwise_matmul(
        x.float(), full.weight, full.weight_scale_inv, [128, 128], None, full.bias
    )
    res["rowwise_layer_f32_rel"] = rel_error(row(x[:, k0 : k0 + 512 // world].float()), ref32)
    try:
        parallelize_module(copy.deepcopy(full), mesh, tpd.Fp8ColwiseParallel())  # fine: 768 % 256 == 0
        bad = Fp8BlockwiseLinear.from_linear(torch.nn.Linear(512, 384))
        parallelize_module(bad, mesh, tpd.Fp8ColwiseParallel())
        res["style_refuses"] = "no error"
    except tpd.BlockShardingError as e:
        res["style_refuses"] = str(e)

    _src_data_rank(res, mesh, rank)

    # ---- the registered DTensor rule: the op on DTensors
    w_d = distribute_tensor(full.weight, mesh, [Shard(0)], src_data_rank=None)
    s_d = distribute_tensor(full.weight_scale_inv, mesh, [Shard(0)], src_data_rank=None)
    b_d = distribute_tensor(full.bias, mesh, [Shard(0)], src_data_rank=None)
    x_d = distribute_tensor(x, mesh, [Replicate()], src_data_rank=None)
    y_d = torch.ops.fp8.blockwise_matmul(x_d, w_d, s_d, [128, 128], None, b_d)
    res["dtensor_colwise_placement"] = str(y_d.placements)
    res["dtensor_colwise_bitexact"] = torch.equal(y_d.full_tensor(), y_full)
    xs = distribute_tensor(x.float(), mesh, [Shard(1)], src_data_rank=None)
    ws = distribute_tensor(full.weight, mesh, [Shard(1)], src_data_rank=None)
    ss = distribute_tensor(full.weight_scale_inv, mesh, [Shard(1)], src_data_rank=None)
    y_r = torch.ops.fp8.blockwise_matmul(xs, ws, ss, [128, 128], None, None, torch.float32)
    res["dtensor_rowwise_placement"] = str(y_r.placements)
    ref_nobias = torch.ops.fp8.blockwise_matmul(x.float(), full.weight, full.weight_scale_inv, [128, 128])
    res["dtensor_rowwise_rel"] = rel_error(y_r.full_tensor(), ref_nobias)

    # ---- whole decoders: single device vs parallelize(model, mesh)
    for family, activation in (("llama", "dynamic"), ("qwen3", "none")):
        tag = f"{family}_{activation}"
        model = tiny_decoder(family)
        quantize_model_(model, Fp8Config(activation=activation), progress=False)
        ref = logits(model, ids)
        tp_model = copy.deepcopy(model)
        report = tpd.parallelize(tp_model, mesh)
        out = logits(tp_model, ids)
        res[f"{tag}_rel"] = rel_error(out, ref)
        res[f"{tag}_sharded"] = len(report.sharded)
        res[f"{tag}_replicated"] = len(report.replicated)
        res[f"{tag}_bytes"] = [report.rank_bytes, report.full_bytes]
        res[f"{tag}_report"] = str(report)
        # colwise layers are bit-exact: q_proj of layer 0 on the same input
        h = torch.randn(3, 256)
        q_full = model.model.layers[0].self_attn.q_proj(h)
        q_loc = tp_model.model.layers[0].self_attn.q_proj(h)
        n_loc = q_loc.shape[-1]
        res[f"{tag}_q_bitexact"] = torch.equal(q_loc, q_full[:, rank * n_loc : (rank + 1) * n_loc])
        if family == "llama":
            compiled = torch.compile(tp_model, fullgraph=True)
            with torch.no_grad():
                out_c = compiled(ids).logits.float()
            res[f"{tag}_compiled_rel"] = rel_error(out_c, ref)
            res[f"{tag}_compiled_vs_eager_rel"] = rel_error(out_c, out)

            # ---- per-rank load from a saved checkpoint, and save from the sharded model
            ck_dir = os.path.join(out_dir, "ckpt")
            if rank == 0:
                ckpt.save(model, ck_dir)
            dist.barrier()
            meta = tiny_decoder(family, device="meta")
            meta_report = tpd.parallelize(meta, mesh, config=Fp8Config(activation=activation))
            res["meta_rank_bytes"] = [meta_report.rank_bytes, meta_report.full_bytes]
            dckpt.load(meta, ck_dir, activation=activation)
            meta.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # non-persistent buffer
            res["perrank_load_equal"] = torch.equal(logits(meta, ids), out)
            res["perrank_local_weight_shape"] = list(meta.model.layers[0].mlp.down_proj.weight.shape)
            # torch.distributed.checkpoint: sharded layers as DTensors, saved and loaded in place
            import torch.distributed.checkpoint as dcp

            dcp_dir = os.path.join(out_dir, "dcp")
            dcp.save(dckpt.dtensor_state_dict(tp_model, mesh), checkpoint_id=dcp_dir)
            fresh = tiny_decoder(family)
            with torch.no_grad():
                for p in fresh.parameters():
                    p.mul_(0.5)  # different values everywhere
            quantize_model_(fresh, Fp8Config(activation=activation), progress=False)
            tpd.parallelize(fresh, mesh)
            dcp.load(dckpt.dtensor_state_dict(fresh, mesh), checkpoint_id=dcp_dir)
            res["dcp_roundtrip_equal"] = torch.equal(logits(fresh, ids), out)
            save_dir = os.path.join(out_dir, "resaved")
            dckpt.save(tp_model, save_dir)
            if rank == 0:
                from safetensors.torch import load_file

                a = load_file(os.path.join(ck_dir, "model.safetensors"))
                b = load_file(os.path.join(save_dir, "model.safetensors"))
                res["resave_same_keys"] = sorted(a) == sorted(b)
                res["resave_equal"] = all(
                    torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
                )
    finish_worker(out_dir, rank, res)


if __name__ == "__main__":
    main()
