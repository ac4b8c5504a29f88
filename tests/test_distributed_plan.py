"""Plans without communication: the alignment rule (hypothesis vs brute force), check_plan's errors,
and parallelize on meta models with DeepSeek-V3 / Qwen3 layer shapes over a fake process group of
world size 8 (torch's testing fake_pg: collectives are no-ops, no process is started)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_fp8_blockwise.distributed import (
    DEFAULT_PLAN,
    BlockShardingError,
    Fp8ColwiseLinear,
    Fp8RowwiseLinear,
    Fp8ShardedExperts,
    check_plan,
    parallelize,
    shard_problem,
    working_tp_sizes,
)
from torch_fp8_blockwise.nn import Fp8BlockwiseLinear


def _brute_force_ok(size: int, block: int, tp: int) -> bool:
    """Split ``size`` rows evenly over tp ranks and look at every row: each rank must get the same
    number of rows, every block's rows one owner, and every block must be whole (no ragged edge)."""
    if size % tp:
        return False
    share = size // tp
    owners: dict[int, set[int]] = {}
    for i in range(size):
        owners.setdefault(i // block, set()).add(i // share)
    rows_in_block: dict[int, int] = {}
    for i in range(size):
        rows_in_block[i // block] = rows_in_block.get(i // block, 0) + 1
    return all(len(o) == 1 for o in owners.values()) and all(c == block for c in rows_in_block.values())


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 4096),
    block=st.sampled_from([128, 256, 512]),
    tp=st.integers(1, 8),
    kind=st.sampled_from(["colwise", "rowwise"]),
)
def test_alignment_rule_matches_brute_force(size, block, tp, kind):
    shape = (size, 640) if kind == "colwise" else (640, size)
    blocks = (block, 128) if kind == "colwise" else (128, block)
    assert (shard_problem(kind, shape, blocks, tp) is None) == _brute_force_ok(size, block, tp)


def test_alignment_messages_and_working_sizes():
    why = shard_problem("colwise", (1408, 2048), (128, 128), 8)
    assert why == (
        "ColwiseParallel over 8 ranks gives each rank 176 of 1408 output rows, not a whole number of "
        "128-row blocks"
    )
    assert working_tp_sizes("colwise", (1408, 2048), (128, 128)) == [1]
    assert working_tp_sizes("rowwise", (7168, 18432), (128, 128))[-1] == 16
    assert shard_problem("expert", (2048, 7168), (128, 128), 8, num_experts=256) is None
    assert "unequal shares of 60 experts" in shard_problem("expert", (1, 1), (128, 128), 8, num_experts=60)
    with pytest.raises(ValueError, match="kind"):
        shard_problem("diagonal", (256, 256), (128, 128), 2)


class _Mlp(nn.Module):
    def __init__(self, hidden: int, inter: int, device="meta") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False, device=device)
        self.up_proj = nn.Linear(hidden, inter, bias=False, device=device)
        self.down_proj = nn.Linear(inter, hidden, bias=False, device=device)


def test_check_plan_names_every_bad_layer_all_or_nothing():
    model = nn.Sequential()
    model.add_module("dense", _Mlp(7168, 18432))
    model.add_module("lite", _Mlp(2048, 1408))  # DeepSeek-V2-Lite's expert width
    assert check_plan(model.dense, DEFAULT_PLAN, 8) == {
        "gate_proj": "colwise",
        "up_proj": "colwise",
        "down_proj": "rowwise",
    }
    with pytest.raises(BlockShardingError) as e:
        check_plan(model, None, 8)
    msg = str(e.value)
    assert "3 layer(s) cannot be split over 8 ranks" in msg
    assert (
        "lite.gate_proj [1408, 2048] in 128x128 blocks: ColwiseParallel over 8 ranks gives each rank 176"
        in msg
    )
    assert "lite.down_proj [2048, 1408] in 128x128 blocks: RowwiseParallel over 8 ranks" in msg
    assert "no tp size > 1 works" in msg and "keep it replicated" in msg
    assert "dense." not in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(ValueError, match="expected one of"):
        check_plan(model, {"*.up_proj": "sideways"}, 2)
    with pytest.raises(TypeError, match="plan"):
        check_plan(model, ["*.up_proj"], 2)


def test_check_plan_refuses_non_linear_targets():
    model = nn.Sequential(nn.LayerNorm(256))
    with pytest.raises(BlockShardingError, match="LayerNorm is not a linear layer"):
        check_plan(model, {"0": "colwise"}, 2)


@pytest.fixture
def fake_world8():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=8)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (8,))
    finally:
        dist.destroy_process_group()


def _meta_model(config) -> nn.Module:
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def test_deepseek_v3_shapes_on_meta_over_8_ranks(fake_world8):
    import transformers

    cfg = transformers.DeepseekV3Config(
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_shared_experts=1,
        num_attention_heads=128,
        num_key_value_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        vocab_size=1024,
    )
    model = _meta_model(cfg)
    assert check_plan(model, {"*.experts": "expert"}, 8) == {"model.layers.1.mlp.experts": "expert"}
    with pytest.raises(BlockShardingError, match=r"unequal shares of 256 experts \(42.6667 each\)"):
        check_plan(model, {"*.experts": "expert"}, 6)
    report = parallelize(model, fake_world8)
    dense = model.model.layers[0].mlp
    assert isinstance(dense.gate_proj, Fp8ColwiseLinear) and isinstance(dense.down_proj, Fp8RowwiseLinear)
    assert tuple(dense.gate_proj.weight.shape) == (18432 // 8, 7168)
    assert tuple(dense.down_proj.weight_scale_inv.shape) == (56, 144 // 8)
    assert dense.gate_proj.weight.device.type == "meta" and dense.gate_proj.tp_rank == 3
    shared = model.model.layers[1].mlp.shared_experts
    assert tuple(shared.up_proj.weight.shape) == (2048 // 8, 7168)
    # MLA: only o_proj matches the default plan, so the attention block stays replicated, and says why
    o = "model.layers.0.self_attn.o_proj"
    assert o in report.replicated and "no colwise -> rowwise pair" in report.replicated[o]
    # 256 routed experts over 8 ranks: rank 3 holds experts [96, 128), meta, as Fp8Experts shards
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, Fp8ShardedExperts) and experts.gate_up_proj.device.type == "meta"
    assert (experts.num_experts, experts.expert_offset, experts.full_num_experts) == (32, 96, 256)
    assert tuple(experts.gate_up_proj.shape) == (32, 4096, 7168)
    assert tuple(experts.down_proj_scale_inv.shape) == (32, 56, 16)
    assert report.sharded["model.layers.1.mlp.experts"].experts == (256, 32)
    assert "mlp.experts: expert (allreduce) 256 experts of [4096, 7168] -> 32 per rank" in str(report)
    assert report.rank_bytes < report.full_bytes
    # the experts' fp8 bytes per rank are 1/8 of one device's (7168 x 2048 x 3 per expert + scales)
    per_expert = 3 * 7168 * 2048 + 4 * (2 * 16 * 56 + 56 * 16)
    assert report.full_bytes - report.rank_bytes >= 224 * per_expert
    assert "model.layers.*.mlp.down_proj: rowwise [7168, 18432] -> [7168, 2304] per rank" in str(report)


def test_qwen3_shapes_on_meta_over_8_ranks(fake_world8):
    import transformers

    dense = transformers.Qwen3Config(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=1024,
    )
    model = _meta_model(dense)
    report = parallelize(model, fake_world8)
    assert len(report.sharded) == 7 and not report.replicated
    assert tuple(model.model.layers[0].self_attn.k_proj.weight.shape) == (128, 4096)  # one kv head per rank

    moe_kw = dict(
        hidden_size=4096,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=64,
        num_key_value_heads=4,
        head_dim=128,
        num_experts_per_tok=2,
        vocab_size=1024,
    )
    moe = transformers.Qwen3MoeConfig(num_experts=8, **moe_kw)
    model = _meta_model(moe)
    report = parallelize(model, fake_world8, expert_dispatch="alltoall")
    experts = model.model.layers[0].mlp.experts
    assert (experts.num_experts, experts.expert_offset, experts.dispatch) == (1, 3, "alltoall")
    assert tuple(experts.down_proj.shape) == (1, 4096, 1536)
    k = "model.layers.0.self_attn.k_proj"
    # 4 kv heads over 8 ranks: 512 rows give each rank 64, not whole 128-row blocks -> replicated
    assert "64 of 512 output rows" in report.replicated[k]
    assert "model.layers.0.self_attn.q_proj" in report.replicated
    with pytest.raises(BlockShardingError, match="k_proj"):
        check_plan(model, {"*.k_proj": "colwise"}, 8)
    # 60 experts (Qwen1.5-MoE's count) over 8 ranks: the default plan keeps them replicated and says
    # why; an explicit plan is refused, naming the tp sizes that work
    odd = _meta_model(transformers.Qwen3MoeConfig(num_experts=60, **moe_kw))
    report = parallelize(odd, fake_world8)
    why = report.replicated["model.layers.0.mlp.experts"]
    assert "unequal shares of 60 experts (7.5 each)" in why and "[2, 4]" in why
    with pytest.raises(BlockShardingError, match=r"60 experts of \[3072, 4096\] in 128x128 blocks"):
        check_plan(odd, {"*.experts": "expert"}, 8)


def test_dp_attention_splits_only_experts(fake_world8):
    """dp_attention=True (each rank its own tokens): the default plan splits the experts only, the
    rest stays replicated with the reason; a plan asking for more, the all-reduce style or a
    non-bool are refused before anything moves."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=8, num_key_value_heads=8, head_dim=128, num_experts=16, vocab_size=256,
    )  # fmt: skip
    model = _meta_model(cfg)
    report = parallelize(model, fake_world8, expert_dispatch="alltoall", dp_attention=True)
    assert list(report.sharded) == ["model.layers.0.mlp.experts"]
    experts = model.model.layers[0].mlp.experts
    assert (experts.num_experts, experts.dispatch, experts.dp_attention) == (2, "alltoall", True)
    assert "dp_attention=True" in repr(experts)
    assert "expert (alltoall, dp attention) 16 experts" in str(report)
    assert "data-parallel attention" in report.replicated["model.layers.0.self_attn.q_proj"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # untouched
    with pytest.raises(ValueError, match="dp_attention=True needs dispatch 'alltoall'"):
        parallelize(_meta_model(cfg), fake_world8, dp_attention=True)
    with pytest.raises(TypeError, match="dp_attention: expected a bool, got int"):
        parallelize(_meta_model(cfg), fake_world8, expert_dispatch="alltoall", dp_attention=1)
    fresh = _meta_model(cfg)
    with pytest.raises(ValueError, match=r"q_proj asks for 'colwise', but with dp_attention=True"):
        parallelize(fresh, fake_world8, {"*.q_proj": "colwise", "*.experts": "expert"},
                    expert_dispatch="alltoall", dp_attention=True)  # fmt: skip
    assert isinstance(fresh.model.layers[0].self_attn.q_proj, nn.Linear)


def test_explicit_plan_is_all_or_nothing_and_expert_refused(fake_world8):
    model = nn.Sequential()
    model.add_module("a", _Mlp(1024, 2048))
    model.add_module("b", _Mlp(1024, 1408))
    with pytest.raises(BlockShardingError):
        parallelize(model, fake_world8, {"*_proj": "colwise"})
    assert type(model.a.gate_proj) is nn.Linear  # nothing moved
    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(torch.empty(8, 4096, 1024, device="meta"))
    moe = nn.Sequential()
    moe.add_module("experts", experts)
    assert check_plan(moe, {"experts": "expert"}, 8) == {"experts": "expert"}
    with pytest.raises(BlockShardingError, match="unequal shares of 8 experts"):
        check_plan(moe, {"experts": "expert"}, 16)
    with pytest.raises(TypeError, match="not a fused experts module"):
        parallelize(moe, fake_world8, {"experts": "expert"})
    assert experts.gate_up_proj.shape == (8, 4096, 1024)  # nothing moved
    real = nn.Sequential(_Mlp(1024, 2048, device="cpu"))
    with pytest.raises(TypeError, match="quantize_model_"):
        parallelize(real, fake_world8, {"*.gate_proj": "colwise"})
    with pytest.raises(TypeError, match="mesh"):
        parallelize(model, "cpu")


def test_default_plan_keeps_unconverted_blocks_replicated(fake_world8):
    model = nn.Sequential(_Mlp(1024, 2048, device="cpu"))
    report = parallelize(model, fake_world8)
    assert not report.sharded
    assert "high-precision nn.Linear" in report.replicated["0.gate_proj"]
    import transformers

    cfg = transformers.Qwen3MoeConfig(hidden_size=256, moe_intermediate_size=128, num_experts=8)
    moe = nn.Sequential()
    moe.add_module("experts", transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(cfg))
    report = parallelize(moe, fake_world8)
    assert "high-precision Qwen3MoeExperts" in report.replicated["experts"]
    with pytest.raises(TypeError, match="quantize_model_"):
        parallelize(moe, fake_world8, {"experts": "expert"})
    cfg.moe_intermediate_size = 192  # I not a multiple of bn: no Fp8Experts (gate / up blocks straddle)
    with torch.device("meta"):
        moe.experts = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(cfg)
    report = parallelize(moe, fake_world8)
    assert "intermediate size I=192 is not a multiple of bn=128" in report.replicated["experts"]


def test_style_on_a_real_layer_slices_weight_scale_and_bias(fake_world8):
    from torch.distributed.tensor.parallel import parallelize_module

    from torch_fp8_blockwise.distributed import Fp8ColwiseParallel, Fp8RowwiseParallel

    torch.manual_seed(0)
    full = Fp8BlockwiseLinear.from_linear(nn.Linear(2048, 1024))
    torch.manual_seed(0)
    col = parallelize_module(
        Fp8BlockwiseLinear.from_linear(nn.Linear(2048, 1024)),
        fake_world8,
        Fp8ColwiseParallel(),
        src_data_rank=None,
    )  # a fake process group moves no data: each rank slices its own copy
    rows = slice(3 * 128, 4 * 128)
    assert torch.equal(col.weight.view(torch.uint8), full.weight[rows].view(torch.uint8))
    assert torch.equal(col.weight_scale_inv, full.weight_scale_inv[3:4])
    assert torch.equal(col.bias, full.bias[rows])
    torch.manual_seed(0)
    row = parallelize_module(
        Fp8BlockwiseLinear.from_linear(nn.Linear(2048, 1024)),
        fake_world8,
        Fp8RowwiseParallel(),
        src_data_rank=None,
    )
    assert torch.equal(row.weight.view(torch.uint8), full.weight[:, 768:1024].view(torch.uint8))
    assert torch.equal(row.weight_scale_inv, full.weight_scale_inv[:, 6:8])
    assert torch.equal(row.bias, full.bias)
    with pytest.raises(TypeError, match="Fp8BlockwiseLinear"):
        parallelize_module(nn.Linear(2048, 1024), fake_world8, Fp8ColwiseParallel())
    layer = Fp8BlockwiseLinear.from_linear(nn.Linear(2048, 1024))
    for bad in (8, -1, True, "0"):
        with pytest.raises(
            ValueError, match=r"src_data_rank: expected None or a rank of the mesh \(0 <= r < 8\)"
        ):
            parallelize_module(layer, fake_world8, Fp8RowwiseParallel(), src_data_rank=bad)
        assert type(layer) is Fp8BlockwiseLinear  # nothing moved
    with pytest.raises(ValueError, match="src_data_rank: expected None or a rank"):
        parallelize(nn.Sequential(layer), fake_world8, {"0": "rowwise"}, src_data_rank=8)
    assert type(layer) is Fp8BlockwiseLinear


def test_dtensor_rule_offers_partial_only_for_float32_without_bias(fake_world8):
    """Sharding propagation alone (fake process group): a row-parallel call gives Partial only when
    the output is float32 and there is no bias; a misaligned colwise weight is redistributed."""
    from torch.distributed.tensor import Shard, distribute_tensor

    layer = Fp8BlockwiseLinear.from_linear(nn.Linear(2048, 1024))
    x = torch.randn(4, 2048)

    def dt(t, dim):
        return distribute_tensor(t, fake_world8, [Shard(dim)], src_data_rank=None)

    xs, ws, ss = dt(x, 1), dt(layer.weight, 1), dt(layer.weight_scale_inv, 1)
    y = torch.ops.fp8.blockwise_matmul(xs, ws, ss, [128, 128], None, None, torch.float32)
    assert str(y.placements) == "(Partial(sum),)"
    y = torch.ops.fp8.blockwise_matmul(xs, ws, ss, [128, 128], None, None, torch.bfloat16)
    assert "Partial" not in str(y.placements)  # a bf16 Partial would be summed in bf16
    bias = distribute_tensor(layer.bias, fake_world8, [Shard(0)], src_data_rank=None)
    y = torch.ops.fp8.blockwise_matmul(xs, ws, ss, [128, 128], None, bias, torch.float32)
    assert "Partial" not in str(y.placements)  # the bias would be added 8 times
    # 1024 output rows over 8 ranks = 128: aligned -> Shard(-1); 2048 cols -> colwise needs 1024 % 1024
    w0, s0 = dt(layer.weight, 0), dt(layer.weight_scale_inv, 0)
    xr = distribute_tensor(x, fake_world8, [torch.distributed.tensor.Replicate()], src_data_rank=None)
    assert str(torch.ops.fp8.blockwise_matmul(xr, w0, s0, [128, 128]).placements) == "(Shard(dim=1),)"
    narrow = Fp8BlockwiseLinear.from_linear(nn.Linear(2048, 512))  # 64 rows per rank: not offered
    w1, s1 = dt(narrow.weight, 0), dt(narrow.weight_scale_inv, 0)
    assert "Shard" not in str(torch.ops.fp8.blockwise_matmul(xr, w1, s1, [128, 128]).placements)


def test_parallelize_twice_is_refused_before_anything_moves(fake_world8):
    model = nn.Sequential(_Mlp(1024, 2048))
    parallelize(model, fake_world8)
    shapes = {n: tuple(b.shape) for n, b in model.named_buffers()}
    with pytest.raises(ValueError, match="already split"):
        parallelize(model, fake_world8)
    assert shapes == {n: tuple(b.shape) for n, b in model.named_buffers()}


def test_expert_style_keeps_a_contiguous_expert_range_and_refuses_before_moving(fake_world8):
    from torch.distributed.tensor.parallel import parallelize_module

    from torch_fp8_blockwise.distributed import Fp8ExpertParallel
    from torch_fp8_blockwise.experts import Fp8Experts

    def experts(e: int) -> Fp8Experts:
        torch.manual_seed(0)
        gu = torch.ops.fp8.quantize(torch.randn(e, 256, 128), [128, 128])
        dn = torch.ops.fp8.quantize(torch.randn(e, 128, 128), [128, 128])
        return Fp8Experts.from_quantized(*gu, *dn)

    full = experts(16)
    ep = parallelize_module(experts(16), fake_world8, Fp8ExpertParallel("alltoall"), src_data_rank=None)
    assert isinstance(ep, Fp8ShardedExperts) and (ep.expert_offset, ep.num_experts) == (6, 2)
    assert torch.equal(ep.down_proj.view(torch.uint8), full.down_proj[6:8].view(torch.uint8))
    assert torch.equal(ep.gate_up_proj_scale_inv, full.gate_up_proj_scale_inv[6:8])
    assert "experts [6, 8) of 16, dispatch='alltoall'" in repr(ep)
    odd = experts(12)
    with pytest.raises(
        BlockShardingError, match=r"unequal shares of 12 experts \(1.5 each\); tp sizes that work"
    ):
        parallelize_module(odd, fake_world8, Fp8ExpertParallel())
    assert odd.num_experts == 12 and type(odd) is Fp8Experts  # nothing moved
    with pytest.raises(TypeError, match="unsplit Fp8Experts"):
        parallelize_module(ep, fake_world8, Fp8ExpertParallel())
    with pytest.raises(TypeError, match="unsplit Fp8Experts"):
        parallelize_module(nn.Linear(256, 256), fake_world8, Fp8ExpertParallel())
    with pytest.raises(ValueError, match="dispatch: expected one of"):
        Fp8ExpertParallel("broadcast")
    with pytest.raises(ValueError, match="dispatch: expected one of"):
        parallelize(nn.Sequential(_Mlp(1024, 2048)), fake_world8, expert_dispatch="all2all")


def test_expert_plan_on_meta_makes_a_meta_shard(fake_world8):
    """The default plan and an explicit "expert" plan both split a meta transformers experts module
    (the same assignment on a DeviceMesh and a torch_xla Mesh); on a DeviceMesh it becomes a meta
    Fp8Experts shard."""
    import transformers

    from torch_fp8_blockwise.distributed.parallelize import _assignment
    from torch_fp8_blockwise.nn import Fp8Config

    cfg = transformers.Qwen3MoeConfig(hidden_size=256, moe_intermediate_size=128, num_experts=16)
    moe = nn.Sequential()
    with torch.device("meta"):
        moe.add_module("experts", transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(cfg))
    assert _assignment(moe, None, 8, Fp8Config()) == ({"experts": "expert"}, {})
    assert _assignment(moe, {"experts": "expert"}, 8, Fp8Config()) == ({"experts": "expert"}, {})
    report = parallelize(moe, fake_world8, {"experts": "expert"}, config=Fp8Config(activation="none"))
    assert isinstance(moe.experts, Fp8ShardedExperts) and moe.experts.config.activation == "none"
    assert (moe.experts.expert_offset, moe.experts.num_experts) == (6, 2)
    assert report.rank_bytes * 7 < report.full_bytes  # experts are (nearly) the whole model
