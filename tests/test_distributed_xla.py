"""torch_xla SPMD tensor parallel on 4 virtual CPU devices, in its own process (``xr.use_spmd()``
is process-global): parallelize(model, xla_mesh) on an MLP and a tiny transformers Llama equals one
device within the kernel budget, and
the partitioned HLO of a column-parallel layer has no collective, a row-parallel one exactly one
all-reduce (the Pallas kernel runs on local shapes inside manual-sharding regions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from torch_fp8_blockwise.testing import KERNEL_ERROR_BOUND

pytest.importorskip("torch_xla", reason="needs torch_xla (environment 'xla')")
pytest.importorskip("jax", reason="needs jax (environment 'xla')")
pytestmark = pytest.mark.slow  # a fresh process with 4 XLA devices and Pallas interpret: ~40-70 s


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
        [sys.executable, os.path.join(root, "tests", "xla_spmd_worker.py"), str(out), str(dump)],
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
