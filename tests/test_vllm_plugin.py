"""The vLLM plugin inside the real vLLM (environment 'vllm': scripts/venv.sh vllm, vLLM 0.33.0 on CPU).

vLLM's own ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear and RowParallelLinear
are built with our config, loaded through vLLM's weight_loader_v2 from a checkpoint written by our
checkpoint.save, at tensor parallel 1 and 2 (two processes, gloo on loopback, distributed state as
vLLM's tests/conftest.py dist_init sets it up). Each rank's weights equal its shard of the file bit for
bit and its output equals torch.ops.fp8.blockwise_matmul on that shard bit for bit; the gathered
result meets the reference's kernel-error bound. Skipped (with the reason) where vLLM is not installed.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP_REASON = "needs vLLM (environment 'vllm': scripts/venv.sh vllm; scripts/test_all.sh runs it there)"
BLOCK = [128, 128]
K, N_COL, INTER, HEADS, KV_HEADS, HEAD = 256, 512, 256, 4, 2, 128
RAGGED_K, RAGGED_N = 200, 300  # TP 1 only: at TP 2 a rank's 150 rows would cut a 128-row block


class _Source(torch.nn.Module):
    """The high-precision model our checkpoint.save writes: one Linear per checkpoint tensor name."""

    def __init__(self) -> None:
        super().__init__()
        L = torch.nn.Linear
        self.col, self.ragged = L(K, N_COL), L(RAGGED_K, RAGGED_N)
        self.gate_proj, self.up_proj = L(K, INTER, bias=False), L(K, INTER, bias=False)
        self.q_proj = L(K, HEADS * HEAD, bias=False)
        self.k_proj, self.v_proj = L(K, KV_HEADS * HEAD, bias=False), L(K, KV_HEADS * HEAD, bias=False)
        self.down_proj = L(2 * INTER, K)


def _save_checkpoint(path: pathlib.Path) -> None:
    from torch_fp8_blockwise import checkpoint, quantize_model_

    torch.manual_seed(0)
    model = _Source()
    quantize_model_(model, progress=False)
    checkpoint.save(model, path)


# ----------------------------------------------------------------------------- in one process

BLOCK_CFG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


def test_entry_point_registers_fp8_blockwise_in_vllm(tmp_path) -> None:
    """`pip install` the package (no deps) and let vLLM's own plugin loader find and call the entry
    point, twice (vLLM calls it in every process; it must be idempotent)."""
    pytest.importorskip("vllm", reason=SKIP_REASON)
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    for item in ("setup.py", "README.md"):
        shutil.copy(ROOT / item, src / item)
    shutil.copytree(ROOT / "torch_fp8_blockwise", src / "torch_fp8_blockwise",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    out = subprocess.run(
        [*pip, "--target", str(tmp_path / "site"), str(src)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    code = (
        "import vllm.plugins as p\n"
        "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS as Q\n"
        "p.load_general_plugins(); p.plugins_loaded = False; p.load_general_plugins()\n"
        "from torch_fp8_blockwise.integrations import vllm_plugin as v\n"
        f"print(Q.count('fp8_blockwise'), v.__file__.startswith({str(tmp_path / 'site')!r}))"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), VLLM_TARGET_DEVICE="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["1", "True"], out.stdout


def test_override_claims_block_fp8_only_when_asked() -> None:
    pytest.importorskip("vllm", reason=SKIP_REASON)
    from torch_fp8_blockwise.integrations.vllm_plugin import Fp8BlockwiseConfig

    claim = Fp8BlockwiseConfig.override_quantization_method
    assert claim(BLOCK_CFG, "fp8_blockwise") == "fp8_blockwise"
    assert claim(BLOCK_CFG, None) is None  # vLLM's own fp8 method keeps it unless the user asks
    assert claim(BLOCK_CFG, "fp8") is None
    assert claim({"quant_method": "gptq"}, "fp8_blockwise") is None
    with pytest.raises(ValueError, match="no weight_block_size"):
        claim({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8_blockwise")


@pytest.mark.slow
def test_vllm_model_config_picks_fp8_blockwise_only_when_asked(tmp_path) -> None:
    """vLLM's own selection (ModelConfig._verify_quantization) on a checkpoint written by our
    checkpoint.save (quant_method "fp8" + weight_block_size): ours when asked, vLLM's fp8 otherwise."""
    pytest.importorskip("vllm", reason=SKIP_REASON)
    transformers = pytest.importorskip("transformers")
    from vllm.config import ModelConfig

    from torch_fp8_blockwise import checkpoint, quantize_model_
    from torch_fp8_blockwise.integrations import vllm_plugin

    vllm_plugin.register()
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=256, intermediate_size=384, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    quantize_model_(model, progress=False)
    checkpoint.save(model, tmp_path)
    asked = ModelConfig(model=str(tmp_path), quantization="fp8_blockwise", skip_tokenizer_init=True)
    assert asked.quantization == "fp8_blockwise"
    assert ModelConfig(model=str(tmp_path), skip_tokenizer_init=True).quantization == "fp8"


def test_moe_layers_are_refused_naming_the_layer() -> None:
    pytest.importorskip("vllm", reason=SKIP_REASON)
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    from torch_fp8_blockwise.integrations.vllm_plugin import Fp8BlockwiseConfig

    experts = RoutedExperts.__new__(RoutedExperts)  # only its type matters to get_quant_method
    torch.nn.Module.__init__(experts)
    with pytest.raises(NotImplementedError, match="model.layers.3.mlp.experts: MoE"):
        Fp8BlockwiseConfig().get_quant_method(experts, "model.layers.3.mlp.experts")
    assert Fp8BlockwiseConfig().get_quant_method(torch.nn.Module(), "model.norm") is None


@pytest.mark.parametrize(
    "change, words",
    [
        ({"weight_block_size": [64, 128]}, "weight_block_size: expected [bn, bk], each of (128, 256, 512)"),
        ({"activation_scheme": "static"}, "only 'dynamic'"),
        ({"fmt": "e5m2"}, "fmt: only 'e4m3'"),
        ({"quant_method": "awq"}, "quant_method: expected 'fp8'"),
        ({"weight_block_size": None}, "no weight_block_size"),
    ],
)
def test_config_refuses_what_it_cannot_serve(change, words) -> None:
    pytest.importorskip("vllm", reason=SKIP_REASON)
    from torch_fp8_blockwise.integrations.vllm_plugin import Fp8BlockwiseConfig

    with pytest.raises(ValueError) as info:
        Fp8BlockwiseConfig.from_config({**BLOCK_CFG, **change})
    assert words in str(info.value)


def test_config_reads_ignored_layers_and_blocks() -> None:
    pytest.importorskip("vllm", reason=SKIP_REASON)
    from torch_fp8_blockwise.integrations.vllm_plugin import Fp8BlockwiseConfig

    cfg = Fp8BlockwiseConfig.from_config(
        {**BLOCK_CFG, "weight_block_size": [256, 128], "modules_to_not_convert": ["lm_head"]}
    )
    assert cfg.weight_block_size == [256, 128] and cfg.ignored_layers == ["lm_head"]
    assert cfg.get_name() == "fp8_blockwise"
    from vllm.model_executor.models.utils import WeightsMapper

    cfg.apply_vllm_mapper(WeightsMapper(orig_to_new_prefix={"lm_head": "language_model.lm_head"}))
    assert cfg.ignored_layers == ["language_model.lm_head"]


@pytest.mark.parametrize(
    "args, words",
    [
        (
            (512, 512, 192, [512]),
            "input_size_per_partition = 192 (of 512) is not a multiple of block_k = 128",
        ),
        ((256, 640, 256, [320]), "output partition 0 of [320] has 320 rows"),
        ((256, 704, 256, [576, 128]), "overlap the next merged partition"),
    ],
)
def test_partitions_that_cut_blocks_are_refused(args, words) -> None:
    pytest.importorskip("vllm", reason=SKIP_REASON)
    from torch_fp8_blockwise.integrations.vllm_plugin import validate_partition_blocks

    with pytest.raises(ValueError) as info:
        validate_partition_blocks("model.x", *args, [128, 128])
    assert words in str(info.value) and "model.x" in str(info.value)
    # Allowed: a ragged last merged partition, ragged dims without a split.
    validate_partition_blocks("ok", 256, 704, 256, [128, 576], [128, 128])
    validate_partition_blocks("ok", 200, 300, 200, [300], [128, 128])


# ----------------------------------------------------------------------------- the worker (one rank)


def _worker(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    from safetensors.torch import load_file
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        cleanup_dist_env_and_memory,
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.parameter import BlockQuantScaleParameter, ModelWeightParameter

    from torch_fp8_blockwise.integrations import vllm_plugin

    torch.manual_seed(1)  # the same activations on every rank
    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    quant = json.load(open(os.path.join(ckpt, "config.json")))["quantization_config"]
    results: dict[str, torch.Tensor] = {}
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=world,
            rank=rank,
            distributed_init_method=f"tcp://127.0.0.1:{port}",
            local_rank=rank,
            backend="gloo",
        )
        initialize_model_parallel(world, 1)
        try:
            vllm_plugin.register()
            cfg = vllm_plugin.Fp8BlockwiseConfig.from_config(quant)
            layers = {
                "col": ColumnParallelLinear(K, N_COL, bias=True, quant_config=cfg, prefix="col"),
                "gate_up": MergedColumnParallelLinear(K, [INTER, INTER], bias=False, quant_config=cfg, prefix="gate_up"),
                "qkv": QKVParallelLinear(K, HEAD, HEADS, KV_HEADS, bias=False, quant_config=cfg, prefix="qkv"),
                "down": RowParallelLinear(2 * INTER, K, bias=True, quant_config=cfg, prefix="down"),
            }  # fmt: skip
            if world == 1:
                layers["ragged"] = ColumnParallelLinear(
                    RAGGED_K, RAGGED_N, bias=True, quant_config=cfg, prefix="ragged"
                )
                # A layer whose scales were never loaded is refused after loading, not run.
                unloaded = ColumnParallelLinear(K, N_COL, bias=False, quant_config=cfg, prefix="unloaded")
                unloaded.weight.weight_loader(unloaded.weight, tensors["col.weight"])
                try:
                    unloaded.quant_method.process_weights_after_loading(unloaded)
                    results["unloaded_refused"] = torch.tensor(False)
                except ValueError as e:
                    results["unloaded_refused"] = torch.tensor("unloaded.weight_scale_inv: 8 of 8" in str(e))
            else:
                try:
                    ColumnParallelLinear(RAGGED_K, RAGGED_N, quant_config=cfg, prefix="ragged")
                    results["ragged_refused"] = torch.tensor(False)
                except ValueError as e:
                    results["ragged_refused"] = torch.tensor("block_n = 128" in str(e) and "ragged" in str(e))
            sources = {
                "col": [("col", None)],
                "ragged": [("ragged", None)],
                "gate_up": [("gate_proj", 0), ("up_proj", 1)],
                "qkv": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
                "down": [("down_proj", None)],
            }
            for name, layer in layers.items():
                method = layer.quant_method
                assert type(method).__name__ == "Fp8BlockwiseLinearMethod", type(method)
                assert layer.weight.weight_loader.__func__ is type(layer).weight_loader_v2
                for src, shard in sources[name]:
                    for suffix in ("weight", "weight_scale_inv"):
                        param = getattr(layer, suffix)
                        args = () if shard is None else (shard,)
                        param.weight_loader(param, tensors[f"{src}.{suffix}"], *args)
                    if layer.bias is not None:
                        layer.bias.weight_loader(layer.bias, tensors[f"{src}.bias"])
                weight_before, scale_before = layer.weight, layer.weight_scale_inv
                method.process_weights_after_loading(layer)
                assert layer.weight is weight_before and isinstance(layer.weight, ModelWeightParameter)
                assert layer.weight_scale_inv is scale_before
                assert isinstance(layer.weight_scale_inv, BlockQuantScaleParameter)
                x = torch.randn(5, layer.input_size_per_partition)
                # What this rank computes (before the row-parallel all-reduce), as vLLM's forward calls it.
                bias = None if (layer.bias is None or (name == "down" and rank > 0)) else layer.bias
                results[f"{name}.x"] = x
                results[f"{name}.y"] = method.apply(layer, x, bias)
                results[f"{name}.forward"] = layer(x)[0]
                results[f"{name}.weight"] = layer.weight.data.view(torch.uint8).clone()
                results[f"{name}.scale"] = layer.weight_scale_inv.data.clone()
                results[f"{name}.bias"] = torch.empty(0) if layer.bias is None else layer.bias.data.clone()
                results[f"{name}.bias_applied"] = torch.tensor(bias is not None)
                results[f"{name}.y_bf16"] = method.apply(
                    layer, x.bfloat16(), None if bias is None else bias.bfloat16()
                )
        finally:
            cleanup_dist_env_and_memory()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


# ----------------------------------------------------------------------------- what each rank must hold


def _shard(tensors: dict, name: str, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (weight, scale) of a layer, cut from the checkpoint by hand."""

    def rows(src: str, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        w, s = tensors[f"{src}.weight"], tensors[f"{src}.weight_scale_inv"]
        return w[r0:r1], s[r0 // BLOCK[0] : -(-r1 // BLOCK[0])]

    def split(src: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return rows(src, rank * n // world, (rank + 1) * n // world)

    if name in ("col", "ragged"):
        parts = [split(name, tensors[f"{name}.weight"].shape[0])]
    elif name == "gate_up":
        parts = [split("gate_proj", INTER), split("up_proj", INTER)]
    elif name == "qkv":
        parts = [
            split("q_proj", HEADS * HEAD),
            split("k_proj", KV_HEADS * HEAD),
            split("v_proj", KV_HEADS * HEAD),
        ]
    else:  # row parallel: K split
        w, s = tensors["down_proj.weight"], tensors["down_proj.weight_scale_inv"]
        k = w.shape[1] // world
        return w[:, rank * k : (rank + 1) * k], s[:, rank * k // BLOCK[1] : (rank + 1) * k // BLOCK[1]]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _bias_shard(tensors: dict, name: str, rank: int, world: int) -> torch.Tensor | None:
    if name in ("col", "ragged"):
        b = tensors[f"{name}.bias"]
        n = b.shape[0] // world
        return b[rank * n : (rank + 1) * n]
    return tensors["down_proj.bias"] if name == "down" else None


def _run(world: int, tmp_path: pathlib.Path) -> list[dict]:
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    _save_checkpoint(ckpt)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), VLLM_TARGET_DEVICE="cpu", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(world), str(port), str(ckpt), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_vllm_parallel_linear_layers_match_our_op_per_shard(world, tmp_path) -> None:
    pytest.importorskip("vllm", reason=SKIP_REASON)
    from safetensors.torch import load_file

    from torch_fp8_blockwise import reference
    from torch_fp8_blockwise.testing import assert_kernel_close

    results = _run(world, tmp_path)
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    names = ["col", "gate_up", "qkv", "down"] + (["ragged"] if world == 1 else [])
    for rank, res in enumerate(results):
        for name in names:
            w, s = _shard(tensors, name, rank, world)
            assert torch.equal(res[f"{name}.weight"], w.view(torch.uint8)), (
                f"{name} rank {rank}: weight shard"
            )
            assert torch.equal(res[f"{name}.scale"], s), f"{name} rank {rank}: scale shard"
            bias = _bias_shard(tensors, name, rank, world) if bool(res[f"{name}.bias_applied"]) else None
            x = res[f"{name}.x"]
            ours = torch.ops.fp8.blockwise_matmul(
                x, w.contiguous(), s.contiguous(), BLOCK, None, bias, None, "dynamic"
            )
            assert torch.equal(res[f"{name}.y"], ours), f"{name} rank {rank}: output differs from our op"
            ours16 = torch.ops.fp8.blockwise_matmul(x.bfloat16(), w.contiguous(), s.contiguous(), BLOCK, None,
                                                    None if bias is None else bias.bfloat16(), None, "dynamic")  # fmt: skip
            assert res[f"{name}.y_bf16"].dtype == torch.bfloat16 and torch.equal(
                res[f"{name}.y_bf16"], ours16
            )
            if name != "down" or world == 1:  # forward = this rank's product (column split: no reduction)
                assert torch.equal(res[f"{name}.forward"], ours), f"{name} rank {rank}: forward"
            ref = reference.blockwise_matmul(x, w, s, tuple(BLOCK), None, bias, torch.float32, "dynamic")
            assert_kernel_close(res[f"{name}.y"], ref, f"{name} rank {rank} vs reference")
    if world == 1:
        assert bool(results[0]["unloaded_refused"])
    if world == 2:
        assert all(bool(r["ragged_refused"]) for r in results)
        # Row parallel: vLLM's all-reduce (gloo) sums the two ranks' products; the sum meets the
        # reference's bound for the whole layer.
        partial_sum = results[0]["down.y"] + results[1]["down.y"]
        assert all(torch.equal(r["down.forward"], partial_sum) for r in results)
        x_full = torch.cat([results[0]["down.x"], results[1]["down.x"]], dim=-1)
        w, s = tensors["down_proj.weight"], tensors["down_proj.weight_scale_inv"]
        full = reference.blockwise_matmul(x_full, w, s, tuple(BLOCK), None, tensors["down_proj.bias"], torch.float32, "dynamic")  # fmt: skip
        assert_kernel_close(partial_sum, full, "row parallel sum vs reference")


if __name__ == "__main__":  # a rank of the test above: RANK WORLD PORT CHECKPOINT OUT
    sys.path.insert(0, str(ROOT))
    rank_, world_, port_ = (int(a) for a in sys.argv[1:4])
    _worker(rank_, world_, port_, sys.argv[4], sys.argv[5])
