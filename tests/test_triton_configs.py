"""Config selection for the Triton GEMMs: validation, shared-memory fit, tuned table, warn-once.

Pure Python (no kernel launches): runs wherever triton imports.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

configs = pytest.importorskip(
    "torch_fp8_blockwise.backends.triton.configs", reason="triton is not installed in this environment"
)
GemmConfig = configs.GemmConfig

M_GRID = (1, 2, 15, 16, 17, 33, 64, 65, 127, 256, 1000, 4096, 65536)
NK_GRID = ((128, 128), (512, 1024), (7168, 2048), (2048, 7168), (4096, 4096), (129024, 7168), (24576, 1536))


@pytest.mark.parametrize("arch", configs.ARCHS)
@pytest.mark.parametrize("kernel", configs.KERNELS)
def test_heuristic_fits_shared_memory_for_every_shape(arch, kernel):
    for m in M_GRID:
        for n, k in NK_GRID:
            for bk in (32, 128, 256, 512):
                cfg = configs.heuristic(kernel, arch, m, n, k).for_problem(bk, k)
                assert configs.fits(cfg, kernel, arch), (arch, kernel, m, n, k, cfg)
                assert configs.smem_estimate(cfg, kernel) <= configs.SMEM_LIMIT[arch]
                if bk > 32:
                    assert bk % cfg.block_k == 0, "a K tile must not straddle two scale blocks"
                assert cfg.split_k <= -(-k // cfg.block_k)


@pytest.mark.parametrize("arch", configs.ARCHS)
def test_fp32_x_w8a16_never_uses_a_bf16_sized_config(arch, monkeypatch):
    """fp32 x doubles the x tiles: a table entry tuned for bf16 that would overflow is replaced."""
    big = GemmConfig(block_m=128, block_n=128, block_k=128, num_stages=4, num_warps=8)
    monkeypatch.setattr(configs, "load_table", lambda: {(arch, "w8a16", 4096, 7168, 2048): big})
    monkeypatch.setattr(configs, "device_arch", lambda device: arch)
    cfg = configs.select("w8a16", torch.device("cpu"), 4096, 7168, 2048, 128, x_bytes=4)
    assert configs.fits(cfg, "w8a16", arch, x_bytes=4)
    assert not configs.fits(big, "w8a16", arch, x_bytes=4)
    for m in M_GRID:
        assert configs.fits(configs.heuristic("w8a16", arch, m, 7168, 2048, x_bytes=4), "w8a16", arch, 4)


def test_sm120_limit_is_consumer_blackwell():
    assert configs.SMEM_LIMIT[120] == 101_376
    # The seed's 128 x 128 x 128, 4-stage fp8 config (128 KB) does not fit sm_120: ours shrinks.
    big = GemmConfig(block_m=128, block_n=128, block_k=128, num_stages=4, num_warps=8)
    assert not configs.fits(big, "w8a8", 120) and configs.fits(big, "w8a8", 90)
    assert configs.fits(configs.heuristic("w8a8", 120, 4096, 7168, 2048), "w8a8", 120)


def test_decode_uses_swap_ab_and_split_k():
    cfg = configs.heuristic("w8a8", 90, 1, 2048, 7168)
    assert cfg.swap_ab and cfg.block_m == 16 and cfg.split_k > 1
    prefill = configs.heuristic("w8a8", 90, 4096, 7168, 2048)
    assert not prefill.swap_ab and prefill.split_k == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_m=48, block_n=64, block_k=64), "block_m: expected a power of two, got 48"),
        (dict(block_m=8, block_n=64, block_k=64), "must be >= 16"),
        (dict(block_m=16, block_n=64, block_k=16), "block_k: expected >= 32"),
        (dict(block_m=16, block_n=64, block_k=64, num_stages=0), "num_stages: expected >= 1"),
    ],
)
def test_config_validation_messages(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GemmConfig(**kwargs)


def test_for_problem_makes_block_k_divide_the_scale_block():
    cfg = GemmConfig(block_m=64, block_n=64, block_k=512, split_k=16)
    assert cfg.for_problem(128, 1024).block_k == 128
    assert cfg.for_problem(256, 1024).block_k == 256
    assert cfg.for_problem(32, 1024).block_k == 512  # MX: scales indexed per 32 columns in-kernel
    assert cfg.for_problem(128, 300).split_k == 2  # at most one split per K tile (3 tiles -> 2)


def test_table_file_is_documented_and_valid():
    table = configs.load_table()
    from importlib import resources

    raw = json.loads(
        resources.files("torch_fp8_blockwise").joinpath("data", "cuda", configs.TABLE_FILE).read_text()
    )
    assert "heuristic-derived" in raw["note"]
    for (arch, kernel, bucket, n, k), cfg in table.items():
        assert arch in configs.ARCHS and kernel in configs.KERNELS and bucket in configs.M_BUCKETS
        assert configs.fits(cfg, kernel, arch), (arch, kernel, bucket, n, k)


def test_select_prefers_table_and_warns_once_on_miss(monkeypatch):
    tuned = GemmConfig(block_m=32, block_n=64, block_k=128, num_stages=2)
    monkeypatch.setattr(configs, "load_table", lambda: {(90, "w8a8", 16, 512, 1024): tuned})
    monkeypatch.setattr(configs, "device_arch", lambda device: 90)
    monkeypatch.setattr(configs, "_sms", lambda index: 132)
    monkeypatch.setattr(configs, "_warned", set())
    cuda = torch.device("cuda", 0)
    assert configs.select("w8a8", cuda, 5, 512, 1024, 128) == tuned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m in (100, 200, 300):
            configs.select("w8a8", cuda, m, 512, 1024, 128)
        configs.select("w8a16", cuda, 100, 512, 1024, 128)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages  # one per (arch, kernel), not one per call
    assert "no tuned w8a8 config for sm_90" in messages[0]


def test_env_override(monkeypatch):
    monkeypatch.setenv("FP8_TRITON_CONFIG", json.dumps(dict(block_m=16, block_n=32, block_k=256)))
    cfg = configs.select("w8a8", torch.device("cpu"), 4, 64, 512, 128)
    assert (cfg.block_m, cfg.block_n, cfg.block_k) == (16, 32, 128)


def test_unavailable_reason_names_the_fix(monkeypatch):
    from torch_fp8_blockwise.backends import triton as backend

    monkeypatch.setattr(configs, "INTERPRETED_AT_IMPORT", False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backend.unavailable_reason(torch.device("cpu"))
    assert "TRITON_INTERPRET=1" in reason and "before triton kernels are defined" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # too late: the kernels were compiled for the GPU
    assert "was not when the kernels were defined" in backend.unavailable_reason(torch.device("cpu"))
    monkeypatch.setattr(configs, "INTERPRETED_AT_IMPORT", True)
    assert backend.unavailable_reason(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        assert "no working CUDA" in backend.unavailable_reason(torch.device("cuda"))
