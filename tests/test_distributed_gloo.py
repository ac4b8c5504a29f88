"""Tensor parallel on torch.distributed: 2 gloo ranks in subprocesses (loopback, timeouts).

tests/tp_worker.py runs every check once per rank and writes its numbers; each test below asserts
one behaviour on them. Models: tiny transformers Llama (W8A8) and Qwen3 (W8A16), every linear
dimension a multiple of 256 so all of q/k/v/o/gate/up/down split over 2 ranks at 128x128 blocks.
"""

from __future__ import annotations

import json
import os

import pytest
from gloo_ranks import free_port, run_ranks, worker_env

from torch_fp8_blockwise.testing import KERNEL_ERROR_BOUND

pytestmark = pytest.mark.slow  # two processes importing transformers + one torch.compile: ~25 s
WORLD = 2
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("tp")
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = os.path.join(root, "tests", "tp_worker.py")
    run_ranks(lambda r: [worker, str(r), str(WORLD), str(port), str(out)], WORLD, worker_env(root), TIMEOUT_S)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_colwise_style_is_bit_exact_with_one_device(ranks):
    for res in ranks:
        assert res["colwise_class"] == "Fp8ColwiseLinear"
        assert res["colwise_layer_bitexact"] is True


def test_rowwise_style_reduces_in_float32_within_budget(ranks):
    for res in ranks:
        assert res["rowwise_layer_rel"] <= 2**-7  # bf16 output: one rounding step
        assert res["rowwise_layer_f32_rel"] <= KERNEL_ERROR_BOUND


def test_style_refuses_misaligned_layer_before_moving(ranks):
    msg = ranks[0]["style_refuses"]
    assert "192 of 384 output rows, not a whole number of 128-row blocks" in msg
    assert "[384, 512] in 128x128 blocks" in msg


def test_dtensor_rule_colwise_bit_exact_and_rowwise_partial(ranks):
    for res in ranks:
        assert res["dtensor_colwise_placement"] == "(Shard(dim=1),)"
        assert res["dtensor_colwise_bitexact"] is True
        assert res["dtensor_rowwise_placement"] == "(Partial(sum),)"
        assert res["dtensor_rowwise_rel"] <= KERNEL_ERROR_BOUND


@pytest.mark.parametrize("tag", ["llama_dynamic", "qwen3_none"])
def test_parallelized_decoder_matches_one_device(ranks, tag):
    for res in ranks:
        assert res[f"{tag}_sharded"] == 14 and res[f"{tag}_replicated"] == 0
        assert res[f"{tag}_rel"] <= KERNEL_ERROR_BOUND
        assert res[f"{tag}_q_bitexact"] is True
        rank_bytes, full_bytes = res[f"{tag}_bytes"]
        assert rank_bytes < 0.7 * full_bytes  # every projection halved; embeddings / norms replicated


def test_parallelized_decoder_under_torch_compile_fullgraph(ranks):
    for res in ranks:
        assert res["llama_dynamic_compiled_rel"] <= KERNEL_ERROR_BOUND
        assert res["llama_dynamic_compiled_vs_eager_rel"] <= KERNEL_ERROR_BOUND


def test_per_rank_load_into_meta_model(ranks):
    for res in ranks:
        assert res["perrank_load_equal"] is True
        assert res["perrank_local_weight_shape"] == [256, 256]  # down_proj [256, 512] split by columns
        rank_bytes, full_bytes = res["meta_rank_bytes"]  # parallelize on the meta model, by shapes
        assert rank_bytes < full_bytes


def test_save_from_sharded_model_writes_the_unsharded_checkpoint(ranks):
    assert ranks[0]["resave_same_keys"] is True
    assert ranks[0]["resave_equal"] is True


def test_torch_distributed_checkpoint_round_trip(ranks):
    """dcp.save of dtensor_state_dict (sharded layers as DTensors) and dcp.load into a freshly
    parallelized model with other values: the same logits on every rank."""
    for res in ranks:
        assert res["dcp_roundtrip_equal"] is True


@pytest.mark.parametrize("kind", ["colwise", "rowwise", "expert"])
def test_src_data_rank_zero_scatters_rank0s_weights_none_keeps_each_ranks(ranks, kind):
    """Ranks start with different random weights: src_data_rank=0 (torch's default) gives every rank
    its shard of rank 0's layer (fp8 scattered as uint8 over gloo), None its shard of its own copy."""
    for r, res in enumerate(ranks):
        assert res[f"src0_{kind}_is_rank0s"] is True
        assert res[f"srcNone_{kind}_is_own"] is True
        assert res[f"srcNone_{kind}_is_rank0s"] is (r == 0)  # the ranks' copies really differ
        assert res["parallelize_default_is_rank0s"] is True
