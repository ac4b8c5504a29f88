"""torch_xla SPMD tensor parallel on 4 virtual CPU devices, in its own process (``xr.use_spmd()``
is process-global): parallelize(model, xla_mesh) on an MLP and a tiny transformers Llama equals one
device within the kernel budget, and
the partitioned HLO of a column-parallel layer has no collective, a row-parallel one exactly one
all-reduce (the Pallas kernel runs on local shapes inside manual-sharding regions). Expert
parallelism (tiny Qwen3-MoE and DeepSeek-V3, W8A8 / W8A16): logits vs the unsharded XLA model and
the CPU model, one all-reduce per experts block and no all-gather; a meta model parallelized and
filled by the checkpoint loader; refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from torch_fp8_blockwise.testing import KERNEL_ERROR_BOUND

pytest.importorskip("torch_xla", reason="needs torch_xla (environment 'xla')")
pytest.importorskip("jax", reason="needs jax (environment 'xla')")
pytestmark = pytest.mark.slow  # a fresh process with 4 XLA devices and Pallas interpret: ~1.5-2.5 min


@pytest.fixture(scope="module")
def spmd(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("spmd")
    dump = tmp / "hlo"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        PJRT_DEVICE="CPU",
        CPU_NUM_DEVICES="4",
        JAX_PLATFORMS="cpu",
        OMP_NUM_THREADS="1",
        XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text",
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    out = tmp / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "tests", "xla_spmd_worker.py"),
            str(out),
            str(dump),
            str(tmp / "ckpt"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"SPMD worker exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(out.read_text())


def test_spmd_mlp_matches_one_device(spmd):
    assert spmd["devices"] == 4
    for activation in ("dynamic", "none"):
        assert spmd[f"{activation}_sharded"] == {
            "mlp.gate_proj": "colwise",
            "mlp.up_proj": "colwise",
            "mlp.down_proj": "rowwise",
        }
        assert spmd[f"{activation}_rel"] <= KERNEL_ERROR_BOUND
        rank_bytes, full_bytes = spmd[f"{activation}_bytes"]
        assert rank_bytes * 4 <= full_bytes + 4 * 256 * 4  # only the row-parallel bias is replicated
    assert spmd["colwise_bitexact"] is True
    assert "mlp.down_proj: rowwise [256, 1024] -> [256, 256] per rank" in spmd["dynamic_report"]


def test_spmd_hlo_colwise_no_collective_rowwise_one_all_reduce(spmd):
    assert spmd["colwise_collectives"] == dict.fromkeys(
        ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter"), 0
    )
    assert spmd["rowwise_collectives"]["all-reduce"] == 1
    assert sum(spmd["rowwise_collectives"].values()) == 1
    assert spmd["colwise_out_shape"] == [2, 8, 1024] and spmd["rowwise_out_shape"] == [2, 8, 256]


def test_spmd_llama_decoder_matches_one_device(spmd):
    assert spmd["llama_sharded"] == 7  # q/k/v/o and gate/up/down of the one decoder layer
    assert spmd["llama_rel_vs_xla_one_device"] <= KERNEL_ERROR_BOUND
    assert spmd["llama_rel_vs_cpu"] <= KERNEL_ERROR_BOUND


@pytest.mark.parametrize(
    "tag",
    ["qwen3_moe_dynamic", "qwen3_moe_none", "deepseek_v3_dynamic"],
    ids=["qwen3-w8a8", "qwen3-w8a16", "dsv3-w8a8"],
)
def test_spmd_expert_parallel_matches_one_device_and_cpu(spmd, tag):
    """Experts sharded by expert over 4 devices (2 of 8 each), W8A8 and W8A16, Qwen3-MoE (attention
    split too) and DeepSeek-V3 (shared expert, dense first layer): the unsharded XLA model's and the
    CPU model's logits within the kernel budget; the whole forward compiles with one all-reduce per
    experts block (+ one per row-parallel o_proj) and no all-gather (the expert weights never move)."""
    experts = [name for name, kind in spmd[f"{tag}_sharded"].items() if kind == "expert"]
    assert experts == [f"model.layers.{1 if tag.startswith('deepseek') else 0}.mlp.experts"]
    assert spmd[f"{tag}_rel_vs_xla_one_device"] <= KERNEL_ERROR_BOUND
    assert spmd[f"{tag}_rel_vs_cpu"] <= KERNEL_ERROR_BOUND
    rowwise = sum(kind == "rowwise" for kind in spmd[f"{tag}_sharded"].values())
    assert spmd[f"{tag}_model_collectives"] == {
        **dict.fromkeys(("all-gather", "collective-permute", "all-to-all", "reduce-scatter"), 0),
        "all-reduce": 1 + rowwise,
    }
    assert spmd[f"{tag}_experts_spec"] == "{devices=[4,1,1]0,1,2,3}"
    assert "expert (allreduce) 8 experts of" in spmd[f"{tag}_report"]
    assert "-> 2 per rank" in spmd[f"{tag}_report"]
    rank_bytes, full_bytes = spmd[f"{tag}_bytes"]
    # the experts hold most of the model: a device holds a quarter of them, everything else in full
    assert full_bytes - rank_bytes >= spmd[f"{tag}_experts_bytes"] * 3 // 4


def test_spmd_experts_layer_compiles_with_exactly_one_all_reduce(spmd):
    assert spmd["experts_collectives"] == {
        **dict.fromkeys(("all-gather", "collective-permute", "all-to-all", "reduce-scatter"), 0),
        "all-reduce": 1,
    }
    assert spmd["experts_out_shape"] == [16, 512]


def test_spmd_meta_model_loaded_sharded_from_a_checkpoint(spmd):
    """meta model -> parallelize(xla mesh) -> distributed.checkpoint.load: every tensor on the xla
    device, the sharded ones with their sharding as they arrive; logits equal to the in-memory
    parallelized model's."""
    assert spmd["meta_load_equal"] is True and spmd["meta_load_rel"] == 0.0
    assert spmd["meta_devices"] == ["xla"]
    assert spmd["meta_specs"] == {
        "q_proj.weight": "{devices=[4,1]0,1,2,3}",
        "o_proj.weight_scale_inv": "{devices=[1,4]0,1,2,3}",
        "experts.down_proj": "{devices=[4,1,1]0,1,2,3}",
        "embed_tokens.weight": "",  # replicated
    }
    # Each sharded tensor was placed from 4 host pieces, one device's slice each (never whole):
    # attention's q/k/v weight rows and scale rows, o_proj's columns, 2 of 8 experts per device.
    placed = {tuple(shape): pieces for shape, pieces in spmd["meta_placed"]}
    assert [[128, 512]] * 4 in [p for s, p in spmd["meta_placed"] if s == [512, 512]]  # q/k/v
    assert [[512, 128]] * 4 in [p for s, p in spmd["meta_placed"] if s == [512, 512]]  # o_proj
    assert placed[(8, 256, 512)] == [[2, 256, 512]] * 4  # experts' gate_up_proj
    assert placed[(8, 512, 128)] == [[2, 512, 128]] * 4  # down_proj
    assert len(spmd["meta_placed"]) == 4 * 2 + 4  # q/k/v/o weight + scale, the 4 fused experts tensors
    assert spmd["fused_keys_load_equal"] is True  # fused keys in the file instead, by expert rows
    # distributed.checkpoint.save of the parallelized XLA model: the file it was loaded from, byte for byte
    assert spmd["resave_identical"] is True


def test_spmd_refusals_before_anything_moves(spmd):
    assert "experts.gate_up_proj is on cpu; on a torch_xla Mesh" in spmd["cpu_model_error"]
    assert spmd["cpu_model_unchanged"] == "Fp8Experts"
    assert spmd["alltoall_error"].startswith(
        "ValueError: expert_dispatch: 'alltoall' runs on a torch DeviceMesh"
    )
    assert spmd["missing_expert_error"].startswith(
        "CheckpointError: model.layers.0.mlp.experts.5.up_proj.weight: missing from the checkpoint"
    )
    assert "q_proj.weight_scale_inv in " in spmd["bad_shape_error"]
    assert (
        "expected shape (4, 4) for the model's layer (128x128 blocks), got (4, 5)" in spmd["bad_shape_error"]
    )
    assert spmd["failed_load_unchanged"] == ["meta", "meta"]
