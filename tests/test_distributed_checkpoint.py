"""Per-rank checkpoint loading without communication: rank 3 of a fake process group of world size 8
reads only its slices of each sharded tensor (safetensors get_slice, never get_tensor) and gets
exactly the rows / columns the unsharded layer holds; bad files raise CheckpointError naming the key."""

from __future__ import annotations

import pytest
import safetensors
import torch
import torch.distributed as dist
from torch import nn

from torch_fp8_blockwise import checkpoint as ckpt
from torch_fp8_blockwise.distributed import Fp8ColwiseLinear, Fp8RowwiseLinear, parallelize
from torch_fp8_blockwise.distributed import checkpoint as dckpt
from torch_fp8_blockwise.nn import Fp8Config, quantize_model_

RANK, WORLD = 3, 8


class _Mlp(nn.Module):
    def __init__(self, hidden: int = 1024, inter: int = 2048) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=True)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=True)
        self.norm = nn.LayerNorm(hidden)


@pytest.fixture
def mesh8():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=RANK, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (WORLD,))
    finally:
        dist.destroy_process_group()


class _SpyOpen:
    """safetensors.safe_open that records which keys were read whole and which by slice."""

    whole: list[str] = []
    sliced: list[str] = []

    def __init__(self, *args, **kwargs) -> None:
        self._f = _REAL_OPEN(*args, **kwargs)

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def keys(self):
        return self._f.keys()

    def get_tensor(self, key):
        _SpyOpen.whole.append(key)
        return self._f.get_tensor(key)

    def get_slice(self, key):
        _SpyOpen.sliced.append(key)
        return self._f.get_slice(key)


_REAL_OPEN = safetensors.safe_open


def test_rank_reads_only_its_slices(mesh8, tmp_path, monkeypatch):
    torch.manual_seed(0)
    full = nn.Sequential()
    full.add_module("mlp", _Mlp())
    quantize_model_(full, Fp8Config(), progress=False)
    ckpt.save(full, tmp_path)
    with torch.device("meta"):
        model = nn.Sequential()
        model.add_module("mlp", _Mlp())
    parallelize(model, mesh8)
    _SpyOpen.whole, _SpyOpen.sliced = [], []
    monkeypatch.setattr(safetensors, "safe_open", _SpyOpen)
    dckpt.load(model, tmp_path)
    sharded = {
        f"mlp.{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj") for t in ("weight", "weight_scale_inv")
    }
    sharded.add("mlp.gate_proj.bias")  # a column-parallel bias is split; a row-parallel one is not
    assert set(_SpyOpen.sliced) == sharded
    assert not sharded & set(_SpyOpen.whole)
    assert set(_SpyOpen.whole) == {"mlp.down_proj.bias", "mlp.norm.weight", "mlp.norm.bias"}

    gate, down = model.mlp.gate_proj, model.mlp.down_proj
    assert isinstance(gate, Fp8ColwiseLinear) and isinstance(down, Fp8RowwiseLinear)
    rows = slice(RANK * 256, (RANK + 1) * 256)
    u8 = torch.uint8
    assert torch.equal(gate.weight.view(u8), full.mlp.gate_proj.weight[rows].view(u8))
    assert torch.equal(gate.weight_scale_inv, full.mlp.gate_proj.weight_scale_inv[RANK * 2 : RANK * 2 + 2])
    assert torch.equal(gate.bias, full.mlp.gate_proj.bias[rows])
    assert torch.equal(down.weight.view(u8), full.mlp.down_proj.weight[:, rows].view(u8))
    assert torch.equal(down.weight_scale_inv, full.mlp.down_proj.weight_scale_inv[:, RANK * 2 : RANK * 2 + 2])
    assert torch.equal(down.bias, full.mlp.down_proj.bias)
    assert torch.equal(model.mlp.norm.weight, full.mlp.norm.weight)
    assert (
        tuple(model.mlp.up_proj.weight.shape) == (256, 1024) and model.mlp.up_proj.weight.device.type == "cpu"
    )


def test_load_refuses_a_checkpoint_of_other_shapes_or_blocks(mesh8, tmp_path):
    torch.manual_seed(0)
    small = nn.Sequential()
    small.add_module("mlp", _Mlp(1024, 1024))
    quantize_model_(small, Fp8Config(), progress=False)
    ckpt.save(small, tmp_path / "small")
    with torch.device("meta"):
        model = nn.Sequential()
        model.add_module("mlp", _Mlp())
    parallelize(model, mesh8)
    with pytest.raises(
        ckpt.CheckpointError,
        # the weight or its scales, whichever the file lists first: both have the wrong full shape
        match=r"mlp.down_proj.weight(_scale_inv)? in .*: expected shape \((1024, 2048|8, 16)\) for the model's layer",
    ):
        dckpt.load(model, tmp_path / "small")
    assert model.mlp.gate_proj.weight.device.type == "meta"  # nothing changed

    big = nn.Sequential()
    big.add_module("mlp", _Mlp())
    quantize_model_(big, Fp8Config(block_shape=(256, 256)), progress=False)
    ckpt.save(big, tmp_path / "b256")
    with pytest.raises(ckpt.CheckpointError, match=r"sharded at \(128, 128\) blocks, the checkpoint has"):
        dckpt.load(model, tmp_path / "b256")


def _moe(device: str | None = None) -> nn.Module:
    """``experts``: a transformers Qwen3MoeExperts with 16 experts of [H 256, I 128]."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(hidden_size=256, moe_intermediate_size=128, num_experts=16)
    model = nn.Sequential()
    with torch.device(device or "cpu"):
        model.add_module("experts", transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(cfg))
    if device is None:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def test_expert_parallel_rank_reads_only_its_experts(mesh8, tmp_path, monkeypatch):
    """Rank 3 of 8 holds experts 6 and 7 of 16: it opens only their per-expert keys (other ranks'
    keys are never read, and may even be missing), or the rows 6:8 of fused fp8 keys."""
    from safetensors.torch import load_file, save_file

    from torch_fp8_blockwise.distributed import Fp8ShardedExperts

    torch.manual_seed(0)
    full = _moe()
    quantize_model_(full, Fp8Config(), progress=False)
    ckpt.save(full, tmp_path / "per_expert")
    file = tmp_path / "per_expert" / "model.safetensors"
    model = _moe("meta")
    report = parallelize(model, mesh8, expert_dispatch="alltoall")
    assert report.sharded["experts"].experts == (16, 2)
    _SpyOpen.whole, _SpyOpen.sliced = [], []
    monkeypatch.setattr(safetensors, "safe_open", _SpyOpen)
    read_into, into = dckpt.read_into, []
    monkeypatch.setattr(
        dckpt, "read_into", lambda o, key, f, dst: (into.append(key), read_into(o, key, f, dst))
    )
    dckpt.load(model, tmp_path / "per_expert")
    local = {f"experts.{e}.{p}.{t}" for e in (6, 7) for p in ("gate_proj", "up_proj", "down_proj")
             for t in ("weight", "weight_scale_inv")}  # fmt: skip
    scales = {k for k in local if k.endswith("_scale_inv")}
    # weights: dtype / shape by get_slice, bytes read straight into the fused buffers; scales whole
    assert set(_SpyOpen.whole) == scales and set(_SpyOpen.sliced) == set(into) == local - scales
    ep, ref = model.experts, full.experts
    assert isinstance(ep, Fp8ShardedExperts)
    assert (ep.expert_offset, ep.num_experts, ep.full_num_experts, ep.dispatch) == (6, 2, 16, "alltoall")
    for key in ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv"):
        got, want = getattr(ep, key), getattr(ref, key)[6:8]
        assert (
            torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            if got.dtype != torch.float32
            else (torch.equal(got, want))
        )

    with pytest.raises(
        ValueError, match=r"save: experts is this rank's expert shard .*distributed.checkpoint.save"
    ):
        ckpt.save(model, tmp_path / "wrong")  # would write experts 6, 7 as experts 0, 1

    # other ranks' experts may be missing: never needed here; a local one missing names its global key
    tensors = load_file(file)
    del tensors["experts.0.up_proj.weight"]
    save_file(tensors, file)
    model = _moe("meta")
    parallelize(model, mesh8)
    dckpt.load(model, tmp_path / "per_expert")
    del tensors["experts.7.down_proj.weight_scale_inv"]
    save_file(tensors, file)
    model = _moe("meta")
    parallelize(model, mesh8)
    with pytest.raises(
        ckpt.CheckpointError, match=r"experts.7.down_proj.weight_scale_inv: missing .* \[6, 8\) of 16"
    ):
        dckpt.load(model, tmp_path / "per_expert")
    assert model.experts.gate_up_proj.device.type == "meta"  # nothing changed

    # a local expert's bad tensor is refused naming its key and file; nothing changes
    ckpt.save(full, tmp_path / "per_expert")  # every key back
    good = load_file(file)
    bad_cases = {
        "experts.6.up_proj.weight": (good["experts.6.up_proj.weight"][:64], ckpt.CheckpointError,
                                     r"experts.6.up_proj.weight in .*: expected shape \(128, 256\) for the model's experts, got \(64, 256\)"),
        "experts.7.gate_proj.weight": (good["experts.7.gate_proj.weight"].to(torch.bfloat16),
                                       ckpt.CheckpointDtypeError, r"experts.7.gate_proj.weight in .*: expected torch.float8_e4m3fn .* got BF16"),
        "experts.7.down_proj.weight": (torch.full((256, 128), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn),
                                       ckpt.CheckpointError, r"experts.7.down_proj.weight in .*: 32768 codes .* NaN or inf"),
        "experts.6.down_proj.weight_scale_inv": (-good["experts.6.down_proj.weight_scale_inv"], ckpt.CheckpointError,
                                                 r"experts.6.down_proj.weight_scale_inv in .*: scales must be finite and positive"),
    }  # fmt: skip
    for key, (value, error, match) in bad_cases.items():
        save_file({**good, key: value}, file)
        model = _moe("meta")
        parallelize(model, mesh8)
        with pytest.raises(error, match=match):
            dckpt.load(model, tmp_path / "per_expert")
        assert model.experts.gate_up_proj.device.type == "meta", key
    save_file(good, file)

    # fused fp8 keys (transformers' FP8Experts format): rows 6:8 by get_slice
    fused = {f"experts.{k}": getattr(ref, k).contiguous() for k in ("gate_up_proj", "gate_up_proj_scale_inv",
                                                                       "down_proj", "down_proj_scale_inv")}  # fmt: skip
    save_file(fused, file)
    model = _moe("meta")
    parallelize(model, mesh8)
    _SpyOpen.whole, _SpyOpen.sliced = [], []
    dckpt.load(model, tmp_path / "per_expert")
    assert set(_SpyOpen.sliced) == set(fused) and not _SpyOpen.whole
    assert torch.equal(model.experts.down_proj_scale_inv, ref.down_proj_scale_inv[6:8])
    assert torch.equal(model.experts.gate_up_proj.view(torch.uint8), ref.gate_up_proj[6:8].view(torch.uint8))


def _mixtral_block(device: str | None = None) -> nn.Module:
    """``layers.0.mlp``, a Mixtral MoE block as transformers 5 names it: ``experts`` (MixtralExperts,
    16 experts of [H 256, I 128]), its router ``gate`` and an _Mlp ``shared`` (the default plan splits
    its gate/up column- and down row-parallel); ``config.model_type`` "mixtral"."""
    import transformers

    mixtral = transformers.models.mixtral.modeling_mixtral
    cfg = transformers.MixtralConfig(hidden_size=256, intermediate_size=128, num_local_experts=16)
    model = nn.Module()
    model.config = cfg
    with torch.device(device or "cpu"):
        model.layers = nn.ModuleList([nn.Module()])
        block = model.layers[0].mlp = nn.Module()
        block.experts, block.gate = mixtral.MixtralExperts(cfg), mixtral.MixtralTopKRouter(cfg)
        block.shared = _Mlp()
    if device is None:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def test_expert_parallel_rank_reads_only_its_experts_under_mixtral_names(mesh8, tmp_path, monkeypatch):
    """A Mixtral-named file (checkpoint.save of a mixtral model: block_sparse_moe.experts.{e}.w1 / w3 /
    w2): rank 3 of 8 reads only experts 6 and 7's keys, into the slots the one-process load fills,
    the router and the split Linear's slices from block_sparse_moe.; a missing local key is named as
    the file names it; nothing changes on an error."""
    from safetensors.torch import load_file, save_file

    from torch_fp8_blockwise.distributed import Fp8ShardedExperts

    torch.manual_seed(0)
    full = _mixtral_block()
    quantize_model_(full, Fp8Config(), progress=False)
    ckpt.save(full, tmp_path)
    file = tmp_path / "model.safetensors"
    good = load_file(file)
    stored = "layers.0.block_sparse_moe"
    assert f"{stored}.experts.15.w2.weight" in good and not any(".mlp." in k for k in good)
    one = _mixtral_block("meta")
    ckpt.load(one, tmp_path)  # the one-process load: what each rank's slots must hold
    model = _mixtral_block("meta")
    report = parallelize(model, mesh8)
    assert report.sharded["layers.0.mlp.experts"].experts == (16, 2)
    assert report.sharded["layers.0.mlp.shared.gate_proj"].kind == "colwise"
    _SpyOpen.whole, _SpyOpen.sliced = [], []
    monkeypatch.setattr(safetensors, "safe_open", _SpyOpen)
    read_into, into = dckpt.read_into, []
    monkeypatch.setattr(
        dckpt, "read_into", lambda o, key, f, dst: (into.append(key), read_into(o, key, f, dst))
    )
    dckpt.load(model, tmp_path)
    local = {f"{stored}.experts.{e}.{w}.{t}" for e in (6, 7) for w in ("w1", "w2", "w3")
             for t in ("weight", "weight_scale_inv")}  # fmt: skip
    scales = {k for k in local if k.endswith("_scale_inv")}
    assert set(into) == local - scales  # fp8 weights straight into the fused local buffers
    experts_read = {k for k in _SpyOpen.whole + _SpyOpen.sliced if ".experts." in k}
    assert experts_read == local  # other ranks' experts never opened
    assert f"{stored}.gate.weight" in _SpyOpen.whole
    assert f"{stored}.shared.gate_proj.weight" in _SpyOpen.sliced  # this rank's rows only
    ep, ref = model.layers[0].mlp.experts, one.layers[0].mlp.experts
    assert isinstance(ep, Fp8ShardedExperts) and (ep.expert_offset, ep.num_experts) == (6, 2)
    for key in ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv"):
        got, want = getattr(ep, key), getattr(ref, key)[6:8]
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), key
    assert torch.equal(model.layers[0].mlp.gate.weight, one.layers[0].mlp.gate.weight)
    rows = slice(3 * 256, 4 * 256)
    got, want = model.layers[0].mlp.shared.gate_proj.weight, one.layers[0].mlp.shared.gate_proj.weight
    assert torch.equal(got.view(torch.uint8), want[rows].view(torch.uint8))

    # other ranks' experts may be missing; a local one missing is named by the file's key
    monkeypatch.setattr(safetensors, "safe_open", _REAL_OPEN)
    cases = {f"{stored}.experts.0.w3.weight": None, f"{stored}.experts.7.w2.weight_scale_inv": "missing",
             f"{stored}.experts.6.w1.weight": "missing"}  # fmt: skip
    for key, words in cases.items():
        save_file({k: v for k, v in good.items() if k != key}, file)
        model = _mixtral_block("meta")
        parallelize(model, mesh8)
        if words is None:
            dckpt.load(model, tmp_path)
            continue
        with pytest.raises(ckpt.CheckpointError, match=rf"{key}: {words} .* \[6, 8\) of 16"):
            dckpt.load(model, tmp_path)
        assert model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"  # nothing changed
    save_file(good, file)


# ---- per-rank peak memory of distributed.checkpoint.load: 2 gloo ranks (loopback, timeout)
# 48 MiB of dense fp8 weights (8 MiB tensors) + 8 experts of 6 MiB per-expert keys: 96 MiB in all
MEM_LAYERS, MEM_HIDDEN, MEM_INTER, MEM_EXPERTS, MEM_EXPERT_INTER = 2, 1024, 8192, 8, 2048
#: What the bound allows beyond the rank's tensors and one whole tensor: the kernel maps page-cache
#: readahead past the end of a row slice into the process (~2 MiB per slice measured on our VMs:
#: 4 row slices here), plus the loader's own allocations.
MEM_SLACK = 16 * 2**20


def _write_random_fp8_checkpoint(path) -> int:
    """The mlp_stack of tests/load_mem_worker.py as a DeepSeek fp8 checkpoint of random finite
    e4m3fn codes (no quantization: writing it stays cheap); returns its largest tensor's bytes."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(MEM_LAYERS):  # random finite codes, both signs (0x7F / 0xFF are NaN)
        for proj, (n, k) in {"gate_proj": (MEM_INTER, MEM_HIDDEN), "up_proj": (MEM_INTER, MEM_HIDDEN),
                             "down_proj": (MEM_HIDDEN, MEM_INTER)}.items():  # fmt: skip
            codes = torch.randint(0, 0x7F, (n, k), dtype=torch.uint8, generator=gen)
            codes |= torch.randint(0, 2, (n, k), dtype=torch.uint8, generator=gen) << 7
            tensors[f"{i}.{proj}.weight"] = codes.view(torch.float8_e4m3fn)
            tensors[f"{i}.{proj}.weight_scale_inv"] = torch.rand(n // 128, k // 128, generator=gen) + 0.5
        tensors[f"{i}.norm.weight"] = torch.ones(MEM_HIDDEN)
        tensors[f"{i}.norm.bias"] = torch.zeros(MEM_HIDDEN)
    shapes = {"gate_proj": (MEM_EXPERT_INTER, MEM_HIDDEN), "up_proj": (MEM_EXPERT_INTER, MEM_HIDDEN),
              "down_proj": (MEM_HIDDEN, MEM_EXPERT_INTER)}  # fmt: skip
    for e in range(MEM_EXPERTS):
        for proj, (n, k) in shapes.items():
            codes = torch.randint(0, 0x7F, (n, k), dtype=torch.uint8, generator=gen)
            tensors[f"moe.experts.{e}.{proj}.weight"] = codes.view(torch.float8_e4m3fn)
            tensors[f"moe.experts.{e}.{proj}.weight_scale_inv"] = (
                torch.rand(n // 128, k // 128, generator=gen) + 0.5
            )
    path.mkdir()
    save_file(tensors, path / "model.safetensors")
    return max(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.slow  # two processes, a 96 MiB checkpoint written and read 4 times: ~10-30 s
def test_per_rank_load_peak_memory_is_its_shard_plus_one_tensor(tmp_path):
    """Each of 2 gloo ranks loads a 96 MiB fp8 checkpoint (dense layers and per-expert keys) into a
    parallelized meta model: its peak RSS growth stays within its own tensors + the largest single
    tensor + MEM_SLACK, while loading the unsplit model (every rank reading everything) exceeds
    that bound (the test can fail)."""
    import json
    import os

    from gloo_ranks import free_port, run_ranks, worker_env

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:  # Linux >= 4.0 has it; the measure needs it
        pytest.skip(f"no peak-RSS reset (/proc/self/clear_refs): {e}")
    largest = _write_random_fp8_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = os.path.join(root, "tests", "load_mem_worker.py")
    dims = [str(d) for d in (MEM_LAYERS, MEM_HIDDEN, MEM_INTER, MEM_EXPERTS, MEM_EXPERT_INTER)]
    run_ranks(
        lambda r: [worker, str(r), "2", str(port), str(out), str(tmp_path / "ckpt"), *dims],
        2, worker_env(root), 300,
    )  # fmt: skip
    for r in range(2):
        res = json.loads((out / f"rank{r}.json").read_text())
        assert res["devices"] == ["cpu"]
        norms = MEM_LAYERS * 2 * MEM_HIDDEN * 4  # replicated: whole on every rank
        assert res["local_bytes"] == (res["full_bytes"] - norms) // 2 + norms
        bound = res["local_bytes"] + largest + MEM_SLACK
        assert res["sharded"]["peak"] <= bound, (r, res)
        assert res["full"]["peak"] > bound, (r, res)  # every rank reading everything: over the bound


def test_read_into_refuses_a_byte_count_mismatch_and_a_short_file(tmp_path):
    """The per-expert reader's raw read: the header's span must be the tensor's size, and a file
    that ends early (changed after safetensors checked it) is named, never half-read silently."""
    path = tmp_path / "raw.bin"
    path.write_bytes(bytes(range(16)))
    dst = torch.empty(8, dtype=torch.uint8)
    with open(path, "rb") as f:
        dckpt.read_into((f, 4, {"k": {"data_offsets": [0, 8]}}), "k", str(path), dst)
        assert dst.tolist() == list(range(4, 12))
        with pytest.raises(
            ckpt.CorruptCheckpointError,
            match="k in .*: its data_offsets span 10 bytes, its shape and dtype 8",
        ):
            dckpt.read_into((f, 4, {"k": {"data_offsets": [0, 10]}}), "k", str(path), dst)
        with pytest.raises(ckpt.CorruptCheckpointError, match="k: cannot read .*: it ends early"):
            dckpt.read_into((f, 12, {"k": {"data_offsets": [0, 8]}}), "k", str(path), dst)


@pytest.mark.slow  # two processes importing transformers: ~20 s on our shared 2-core machines
def test_mixtral_checkpoint_on_two_expert_parallel_ranks(tmp_path):
    """2 gloo ranks (tests/mixtral_ckpt_worker.py): a tiny Mixtral converted and saved with
    checkpoint.save (Mixtral's names: block_sparse_moe.experts.{e}.w1 / w3 / w2) loads per rank into
    a parallelized meta model, each rank reading only its 4 of 8 experts per layer, and gives one
    device's logits; the split model's sharded save holds checkpoint.save's keys and bytes, and the
    one-process load reads it back to the same logits."""
    import json
    import os

    from gloo_ranks import free_port, run_ranks, worker_env

    from torch_fp8_blockwise.testing import KERNEL_ERROR_BOUND

    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = os.path.join(root, "tests", "mixtral_ckpt_worker.py")
    run_ranks(lambda r: [worker, str(r), "2", str(port), str(tmp_path)], 2, worker_env(root), 300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(ranks):
        assert res["experts_split"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        assert res["experts"] == ["Fp8ShardedExperts", 4 * r, 4]
        local = {
            f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
            for layer in range(2) for e in range(4 * r, 4 * r + 4) for w in ("w1", "w2", "w3")
        }  # fmt: skip
        assert set(res["read_into"]) == local  # fp8 weights straight into the slots; only local ones
        assert res["load_equal_ep"] is True  # bit-equal to splitting the converted model in memory
        assert res["load_rel"] <= KERNEL_ERROR_BOUND
        assert res["written"] == ranks[0]["written"] and "model.safetensors.index.json" in res["written"]
    res = ranks[0]
    assert len(res["written"]) > 3  # several shards + index + config
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight_scale_inv" in res["resave_keys"]
    assert "model.layers.0.block_sparse_moe.gate.weight" in res["resave_keys"]
    assert not any(".mlp." in k for k in res["resave_keys"])
    assert res["resave_keys"] == res["saved_keys"] and res["resave_equal"] is True
    assert res["one_process_load_equal"] is True
