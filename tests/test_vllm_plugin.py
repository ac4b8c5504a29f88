"""The vLLM plugin inside the real vLLM (environment 'vllm': scripts/venv.sh vllm, vLLM 0.33.0 on CPU).

vLLM's own ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear and RowParallelLinear
are built with our config, loaded through vLLM's weight_loader_v2 from a checkpoint written by our
checkpoint.save, at tensor parallel 1 and 2 (two processes, gloo on loopback, distributed state as
vLLM's tests/conftest.py dist_init sets it up). Each rank's weights equal its shard of the file bit for
bit and its output equals torch.ops.fp8.blockwise_matmul on that shard bit for bit; the gathered
result meets the reference's kernel-error bound. In the same processes (vLLM's import dominates the
time), vLLM's routed experts (FusedMoEFactory: its router, RoutedExperts, MoERunner) with our MoE
method, loaded through vLLM's expert weight loader from the per-expert tensors checkpoint.save wrote
for an Fp8Experts: each rank's output equals an Fp8Experts on that rank's shard bit for bit (same
routing), the all-reduced sum meets the kernel-error bound against the whole Fp8Experts. Skipped
(with the reason) where vLLM is not installed.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402
from gloo_ranks import free_port, run_ranks  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP_REASON = "needs vLLM (environment 'vllm': scripts/venv.sh vllm; scripts/test_all.sh runs it there)"
BLOCK = [128, 128]
K, N_COL, INTER, HEADS, KV_HEADS, HEAD = 256, 512, 256, 4, 2, 128
RAGGED_K, RAGGED_N = 200, 300  # TP 1 only: at TP 2 a rank's 150 rows would cut a 128-row block
MOE_E, MOE_TOPK, MOE_I, MOE_T = 4, 2, 256, 9  # routed experts: hidden size K; I_p = 128 at TP 2


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


def _save_checkpoint(path: pathlib.Path) -> torch.nn.Module:
    """Our Linear layers plus an Fp8Experts at ``experts`` (written per expert: experts.<e>.gate_proj /
    up_proj / down_proj .weight + .weight_scale_inv, DeepSeek's names); returns the saved model."""
    from torch_fp8_blockwise import checkpoint, quantize_model_
    from torch_fp8_blockwise.experts import Fp8Experts

    torch.manual_seed(0)
    model = _Source()
    quantize_model_(model, progress=False)
    gate_up, down = torch.randn(MOE_E, 2 * MOE_I, K) / 16, torch.randn(MOE_E, K, MOE_I) / 16
    q = [torch.ops.fp8.quantize(w, BLOCK, torch.float8_e4m3fn, "fp32") for w in (gate_up, down)]
    model.experts = Fp8Experts.from_quantized(*q[0], *q[1])
    checkpoint.save(model, path)
    return model


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


def test_other_layers_get_no_method() -> None:
    pytest.importorskip("vllm", reason=SKIP_REASON)
    from torch_fp8_blockwise.integrations.vllm_plugin import Fp8BlockwiseConfig

    assert Fp8BlockwiseConfig().get_quant_method(torch.nn.Module(), "model.norm") is None


def test_scale_check_counts_blocks_not_positive_finite() -> None:
    """The one check both methods' process_weights_after_loading run (NaN: never loaded)."""
    pytest.importorskip("vllm", reason=SKIP_REASON)
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED

    from torch_fp8_blockwise.integrations.vllm_plugin import check_scales_loaded

    assert "Fp8BlockwiseLinearMethod" in WEIGHT_LOADER_V2_SUPPORTED  # the decorator sits on the class
    check_scales_loaded(torch.rand(2, 3, 4) + 0.1, "ok")
    check_scales_loaded(torch.ones(3, 2, dtype=torch.bfloat16), "ok")
    bad = torch.tensor([[1.0, float("nan"), 0.0], [-1.0, float("inf"), 2.0]])
    with pytest.raises(ValueError, match=r"fp8_blockwise: model.x.w2_weight_scale_inv: 4 of 6 block scales"):
        check_scales_loaded(bad, "model.x.w2_weight_scale_inv")


@pytest.mark.parametrize(
    "args, words",
    [
        ((192, 1, [128, 128]), "intermediate_size_per_partition = 192 (tensor parallel 1) is not a multiple of block_n = 128"),
        ((64, 2, [128, 128]), "straddle tensor-parallel ranks"),
        ((256, 2, [128, 512]), "is not a multiple of block_k = 512: the down projection's K split"),
    ],
)  # fmt: skip
def test_moe_partitions_that_cut_blocks_are_refused(args, words) -> None:
    pytest.importorskip("vllm", reason=SKIP_REASON)
    from torch_fp8_blockwise.integrations.vllm_plugin import validate_moe_partition

    with pytest.raises(ValueError) as info:
        validate_moe_partition("model.layers.3.mlp.experts", *args)
    assert words in str(info.value) and "model.layers.3.mlp.experts" in str(info.value)
    # Allowed: I_p a multiple of bn (and of bk at TP > 1); at TP 1 a ragged K of down is fine.
    validate_moe_partition("ok", 256, 2, [128, 128])
    validate_moe_partition("ok", 256, 1, [256, 512])


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
    vllm_config = VllmConfig()
    with set_current_vllm_config(vllm_config):
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
            _moe_cases(world, cfg, tensors, vllm_config, results)
        finally:
            cleanup_dist_env_and_memory()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def _moe_cases(world: int, cfg, tensors: dict, vllm_config, results: dict) -> None:
    """vLLM's routed experts with our method at this rank; what it holds and computes go to results."""
    from vllm.forward_context import set_forward_context
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory

    def build(prefix: str, intermediate: int = MOE_I, **kw):
        kw = {"top_k": MOE_TOPK, "quant_config": cfg, **kw}
        return FusedMoEFactory(
            num_experts=MOE_E, hidden_size=K, intermediate_size=intermediate, params_dtype=torch.float32,
            renormalize=True, prefix=prefix, **kw,
        )  # fmt: skip

    def checkpoint_weights(
        prefix: str, skip: str = ""
    ):  # names relative to the layer, as vLLM's loader passes them
        return (
            (n.removeprefix("experts."), t)
            for n, t in tensors.items()
            if n.startswith("experts.") and n != skip
        )

    runner = build("experts")
    experts, method = runner.routed_experts, runner.routed_experts.quant_method
    assert type(method).__name__ == "Fp8BlockwiseMoEMethod", type(method)
    names = ("w13_weight", "w13_weight_scale_inv", "w2_weight", "w2_weight_scale_inv")
    loaded = set(runner.load_weights(checkpoint_weights("experts")))
    assert loaded == {f"routed_experts.{n}" for n in names}, loaded
    params = {n: getattr(experts, n) for n in names}
    method.process_weights_after_loading(experts)
    assert all(getattr(experts, n) is p for n, p in params.items())  # vLLM's parameters kept
    x, logits = torch.randn(MOE_T, K), torch.randn(MOE_T, MOE_E)
    topk_weights, topk_ids = runner.router.select_experts(hidden_states=x, router_logits=logits)
    results.update(
        {"moe.x": x, "moe.logits": logits, "moe.topk_weights": topk_weights, "moe.topk_ids": topk_ids}
    )
    results["moe.y"] = method.apply(experts, x, topk_weights, topk_ids, None, None)
    results["moe.y_bf16"] = method.apply(experts, x.bfloat16(), topk_weights, topk_ids, None, None)
    with set_forward_context(None, vllm_config):
        results["moe.forward"] = runner(x, logits)  # router, our apply, the TP all-reduce
    for n in names:
        t = getattr(experts, n).data
        results[f"moe.{n}"] = t.view(torch.uint8).clone() if t.dtype == torch.float8_e4m3fn else t.clone()

    def refusal(key: str, words: list[str], fn) -> None:
        try:
            fn()
            results[key] = torch.tensor(False)
        except (ValueError, NotImplementedError) as e:
            results[key] = torch.tensor(all(w in str(e) for w in words))
            if not bool(results[key]):
                print(f"{key}: {e}")

    if world == 1:
        refusals = {
            "gelu": ({"activation": "gelu"}, "activation 'gelu' is not supported"),
            "bias": ({"has_bias": True}, "has_bias: expert biases"),
            "limit": ({"swiglu_limit": 7.0}, "swiglu_limit: a clamped SwiGLU"),
            "on_input": ({"apply_router_weight_on_input": True, "top_k": 1}, "apply_router_weight_on_input"),
        }
        for name, (kw, words) in refusals.items():
            results[f"moe.refused.{name}"] = torch.tensor(False)
            refusal(
                f"moe.refused.{name}",
                [f"{name}.experts", words],
                lambda kw=kw, name=name: build(f"{name}.experts", **kw),
            )
        ignored_cfg = type(cfg)(ignored_layers=["model.ignored.experts"])
        ignored = build("model.ignored.experts", quant_config=ignored_cfg)
        results["moe.ignored_unquantized"] = torch.tensor(
            type(ignored.routed_experts.quant_method).__name__ == "UnquantizedFusedMoEMethod"
        )

        def partial() -> None:  # expert 3's down scales never loaded
            r = build("partial.experts")
            list(
                r.load_weights(
                    checkpoint_weights("partial.experts", skip="experts.3.down_proj.weight_scale_inv")
                )
            )
            r.routed_experts.quant_method.process_weights_after_loading(r.routed_experts)

        refusal("moe.unloaded_refused", ["partial.experts.w2_weight_scale_inv: 4 of 16"], partial)
    else:
        refusal(
            "moe.narrow_refused", ["narrow.experts", "block_n = 128"], lambda: build("narrow.experts", 128)
        )
        vllm_config.parallel_config.enable_expert_parallel = True  # experts split across the 2 ranks
        try:
            refusal("moe.ep_refused", ["ep.experts", "expert parallelism"], lambda: build("ep.experts"))
        finally:
            vllm_config.parallel_config.enable_expert_parallel = False


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


_RUNS: dict[int, tuple[list[dict], pathlib.Path, torch.nn.Module]] = {}


def _run_once(world: int, tmp_path_factory) -> tuple[list[dict], pathlib.Path, torch.nn.Module]:
    """The ranks' results, the checkpoint directory and the saved model, computed once per world
    size for the Linear and the MoE test (the workers' time is mostly vLLM's import)."""
    if world not in _RUNS:
        tmp = tmp_path_factory.mktemp(f"vllm_tp{world}")
        results, model = _run(world, tmp)
        _RUNS[world] = results, tmp / "ckpt", model
    return _RUNS[world]


def _run(world: int, tmp_path: pathlib.Path) -> tuple[list[dict], torch.nn.Module]:
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    model = _save_checkpoint(ckpt)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), VLLM_TARGET_DEVICE="cpu", OMP_NUM_THREADS="1")
    run_ranks(lambda rank: [__file__, str(rank), str(world), str(port), str(ckpt), str(out)], world, env, 240)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)], model


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_vllm_parallel_linear_layers_match_our_op_per_shard(world, tmp_path_factory) -> None:
    pytest.importorskip("vllm", reason=SKIP_REASON)
    from safetensors.torch import load_file

    from torch_fp8_blockwise import reference
    from torch_fp8_blockwise.testing import assert_kernel_close

    results, ckpt, _ = _run_once(world, tmp_path_factory)
    tensors = load_file(ckpt / "model.safetensors")
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


def _experts_shard(tensors: dict, rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's w13 / w2 weights and scales, cut by hand from the per-expert checkpoint tensors:
    gate and up rows [r I_p, (r+1) I_p) stacked (gate first), down columns [r I_p, (r+1) I_p)."""
    i_p, (bn, bk) = MOE_I // world, BLOCK
    out: dict[str, list[torch.Tensor]] = {n: [] for n in ("w13_weight", "w13_weight_scale_inv", "w2_weight", "w2_weight_scale_inv")}  # fmt: skip
    for e in range(MOE_E):
        t = {p: (tensors[f"experts.{e}.{p}.weight"], tensors[f"experts.{e}.{p}.weight_scale_inv"])
             for p in ("gate_proj", "up_proj", "down_proj")}  # fmt: skip
        rows, srows = slice(rank * i_p, (rank + 1) * i_p), slice(rank * i_p // bn, (rank + 1) * i_p // bn)
        out["w13_weight"].append(
            torch.cat([t["gate_proj"][0][rows], t["up_proj"][0][rows]]).view(torch.uint8)
        )
        out["w13_weight_scale_inv"].append(torch.cat([t["gate_proj"][1][srows], t["up_proj"][1][srows]]))
        out["w2_weight"].append(t["down_proj"][0][:, rows].view(torch.uint8))
        out["w2_weight_scale_inv"].append(t["down_proj"][1][:, rank * i_p // bk : (rank + 1) * i_p // bk])
    return {n: torch.stack(v).contiguous() for n, v in out.items()}


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_vllm_routed_experts_match_fp8experts_per_shard(world, tmp_path_factory) -> None:
    """vLLM's FusedMoEFactory layer with our method: each rank holds its shard of the per-expert
    checkpoint bit for bit, its output equals an Fp8Experts on that shard bit for bit (the same
    computation: sort, gather, one grouped_matmul per projection, fp32 weighted sum), fp32 and bf16
    activations; vLLM's forward (its router, our apply, its all-reduce) equals the sum of the ranks'
    outputs; at TP 1 that is the saved Fp8Experts' output bit for bit, at TP 2 within the kernel-error
    bound of it (the down projection's K is summed in two parts)."""
    pytest.importorskip("vllm", reason=SKIP_REASON)
    from safetensors.torch import load_file

    from torch_fp8_blockwise.experts import Fp8Experts
    from torch_fp8_blockwise.testing import assert_kernel_close

    results, ckpt, model = _run_once(world, tmp_path_factory)
    tensors = load_file(ckpt / "model.safetensors")
    x, ids, w = (results[0][f"moe.{n}"] for n in ("x", "topk_ids", "topk_weights"))
    assert ids.shape == (MOE_T, MOE_TOPK) and w.dtype == torch.float32
    # vLLM's router chose the top-k logits, weighted by their softmax (renormalize=True).
    top = torch.topk(results[0]["moe.logits"], MOE_TOPK, dim=-1)
    by_id, top_by_id = ids.long().argsort(-1), top.indices.argsort(-1)
    assert torch.equal(ids.long().gather(1, by_id), top.indices.gather(1, top_by_id))
    torch.testing.assert_close(w.gather(1, by_id), torch.softmax(top.values, -1).gather(1, top_by_id))
    for rank, res in enumerate(results):
        assert all(
            torch.equal(res[f"moe.{n}"], results[0][f"moe.{n}"])
            for n in ("x", "logits", "topk_ids", "topk_weights")
        )
        shard = _experts_shard(tensors, rank, world)
        for name, t in shard.items():
            assert torch.equal(res[f"moe.{name}"], t), f"rank {rank}: {name} is not the checkpoint's shard"
        f8 = torch.float8_e4m3fn
        ours = Fp8Experts.from_quantized(shard["w13_weight"].view(f8), shard["w13_weight_scale_inv"],
                                         shard["w2_weight"].view(f8), shard["w2_weight_scale_inv"])  # fmt: skip
        assert torch.equal(res["moe.y"], ours(x, ids, w)), f"rank {rank}: output differs from Fp8Experts"
        y16 = ours(x.bfloat16(), ids, w)
        assert res["moe.y_bf16"].dtype == torch.bfloat16 and torch.equal(res["moe.y_bf16"], y16)
    total = sum(r["moe.y"] for r in results[1:]) + results[0]["moe.y"]
    assert all(torch.equal(r["moe.forward"], total) for r in results), "forward != sum of the ranks' outputs"
    whole = model.experts(x, ids, w)
    if world == 1:
        assert torch.equal(total, whole)
        assert bool(results[0]["moe.unloaded_refused"]) and bool(results[0]["moe.ignored_unquantized"])
        refused = [k for k in results[0] if k.startswith("moe.refused.")]
        assert len(refused) == 4 and all(bool(results[0][k]) for k in refused), refused
    else:
        assert_kernel_close(total, whole, "TP 2 sum vs the whole Fp8Experts")
        assert all(bool(r["moe.narrow_refused"]) and bool(r["moe.ep_refused"]) for r in results)


if __name__ == "__main__":  # a rank of the test above: RANK WORLD PORT CHECKPOINT OUT
    sys.path.insert(0, str(ROOT))
    rank_, world_, port_ = (int(a) for a in sys.argv[1:4])
    _worker(rank_, world_, port_, sys.argv[4], sys.argv[5])
