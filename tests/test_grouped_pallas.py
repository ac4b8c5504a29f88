"""Pallas grouped kernels (gmm, tgmm) in interpret mode: on CPU tensors (use_backend("pallas")) and
on torch_xla's CPU device through call_jax, vs the reference (kernel error bound) and the
unquantized product (cosine, SQNR). tgmm runs every tiling tile_m in {128, 256, 512} x
tile_k in {128, 512, 1024} (tokamax's sub-channel bug broke tile_m > 128)."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import backend_params
from grouped_cases import (
    assert_quantization_loss_ok,
    check_gmm,
    check_tgmm,
    gmm_inputs,
    pattern_cases,
    pattern_sizes,
    unquantized_gmm,
    unquantized_tgmm,
)

import torch_fp8_blockwise  # noqa: F401  (registers the ops)
from torch_fp8_blockwise import reference, testing

pytestmark = pytest.mark.parametrize("backend", backend_params("pallas", op="grouped_matmul"))
F32 = torch.float32


def _mods():
    bridge = importlib.import_module("torch_fp8_blockwise.backends.pallas.bridge")
    gp = importlib.import_module("torch_fp8_blockwise.backends.pallas.grouped")
    bm = importlib.import_module("torch_fp8_blockwise.backends.pallas.blockwise_matmul")
    return bridge, gp, bm


def _small_gmm_config(mode: str):
    _, _, bm = _mods()
    x_dtype = "float8_e4m3fn" if mode == "fp8" else "float32"
    return bm.MatmulConfig(
        tm=32, tn=128, tk=128, bn=128, bk=128, x_dtype=x_dtype, w_dtype="float8_e4m3fn", out_dtype="float32",
        x_mode=mode,
    )  # fmt: skip


def _pallas_gmm(args: dict, config) -> torch.Tensor:
    bridge, _, _ = _mods()
    a = args
    return bridge.grouped_matmul(
        a["x"], a["w"], a["w_scale"], a["group_sizes"], tuple(a["block_shape"]), a["x_scale"], F32,
        a["activation"], config=config,
    )  # fmt: skip


def _ref_gmm(args: dict) -> torch.Tensor:
    a = args
    return reference.grouped_matmul(
        a["x"], a["w"], a["w_scale"], a["group_sizes"], tuple(a["block_shape"]), a["x_scale"], F32,
        a["activation"],
    )  # fmt: skip


def _sweep_gmm(mode: str, patterns) -> None:
    cfg = _small_gmm_config("fp8" if mode == "fp8" else mode)
    for pattern, case in pattern_cases(mode, n=40, k=128, sizes=(3, 37, 1, 9), extra_rows=5):
        if pattern in patterns:
            y = _pallas_gmm(case["args"], cfg)
            testing.assert_kernel_close(y, _ref_gmm(case["args"]), f"{mode} {pattern:08b}")


def _tgmm(x, dy, sizes, block_m, tm, tk, tn=128, prequantize=True) -> torch.Tensor:
    bridge, gp, _ = _mods()
    cfg = gp.TgmmConfig(tm=tm, tk=tk, tn=tn, block_m=block_m, prequantize=prequantize)
    return bridge.grouped_matmul_transposed(
        x, dy, torch.tensor(sizes, dtype=torch.int32), block_m, F32, config=cfg
    )


SUBSET = (0, 255, 1, 128, 0b01010101, 0b10101010, 0b00111100)


@pytest.mark.parametrize("mode", ["dynamic", "fp8", "none"])
def test_gmm_patterns_subset(backend, mode):
    _sweep_gmm(mode, SUBSET)


@pytest.mark.slow
def test_gmm_every_zero_nonzero_pattern_of_8_groups(backend):
    _sweep_gmm("fp8", range(256))


def _sweep_tgmm(patterns) -> None:
    for pattern in patterns:
        sizes = pattern_sizes(pattern, 8, (40, 130, 7, 90))
        m = sum(sizes) + 3
        x, dy = torch.randn(m, 24), torch.randn(m, 20)
        ref = reference.grouped_matmul_transposed(x, dy, torch.tensor(sizes, dtype=torch.int32), 128, F32)
        testing.assert_kernel_close(_tgmm(x, dy, sizes, 128, 128, 128), ref, f"{pattern:08b}")


def test_tgmm_patterns_subset(backend):
    _sweep_tgmm(SUBSET)


@pytest.mark.slow
def test_tgmm_every_zero_nonzero_pattern_of_8_groups(backend):
    _sweep_tgmm(range(256))


@pytest.mark.parametrize("tile_k", [128, 512, 1024])
@pytest.mark.parametrize("tile_m", [128, 256, 512])
def test_tgmm_every_tiling(backend, tile_m, tile_k):
    # block_m = 128 < tile_m is the tokamax case: tile_m / 128 quantization blocks per M tile.
    sizes = [300, 0, 457, 1, 200]
    m = sum(sizes) + 5
    x, dy = torch.randn(m, 136), torch.randn(m, 72)
    out = _tgmm(x, dy, sizes, 128, tile_m, tile_k)
    gs = torch.tensor(sizes, dtype=torch.int32)
    testing.assert_kernel_close(out, reference.grouped_matmul_transposed(x, dy, gs, 128, F32), "tiling")
    keep = [0, 2, 4]
    assert_quantization_loss_ok(out[keep], unquantized_tgmm(x, dy, sizes)[keep], f"{tile_m}x{tile_k}")


@pytest.mark.parametrize("block_m,tile_m", [(128, 256), (128, 512), (256, 512)])
def test_tgmm_skipped_blocks_at_block_edges(backend, block_m, tile_m):
    # The kernel skips the dot of a quantization block holding no row of the visit's group: group
    # edges one row either side of a block edge (last row = a block's first row, a group ending
    # exactly at a block edge, a one-row group at a block start) must keep every needed block.
    sizes = [129, 127, 256, 1, 255, 0, 2]
    m = sum(sizes) + 1
    x, dy = torch.randn(m, 24), torch.randn(m, 16)
    gs = torch.tensor(sizes, dtype=torch.int32)
    ref = reference.grouped_matmul_transposed(x, dy, gs, block_m, F32)
    testing.assert_kernel_close(_tgmm(x, dy, sizes, block_m, tile_m, 128), ref, f"{block_m}/{tile_m}")


@pytest.mark.parametrize("block_m,tile_m", [(256, 128), (256, 512), (512, 128), (512, 512)])
def test_tgmm_block_m_vs_tile_m(backend, block_m, tile_m):
    sizes = [300, 0, 457, 200]
    m = sum(sizes)
    x, dy = torch.randn(m, 40), torch.randn(m, 24)
    gs = torch.tensor(sizes, dtype=torch.int32)
    ref = reference.grouped_matmul_transposed(x, dy, gs, block_m, F32)
    testing.assert_kernel_close(_tgmm(x, dy, sizes, block_m, tile_m, 128), ref, f"{block_m}/{tile_m}")


#: In-kernel quantization needs whole quantization blocks in a tile: every tile_m >= block_m.
IN_KERNEL = [(tm, bm) for tm in (128, 256, 512) for bm in (128, 256, 512) if tm >= bm]


@pytest.mark.parametrize("tile_m,block_m", IN_KERNEL)
def test_tgmm_in_kernel_quantization(backend, tile_m, block_m):
    # Group boundaries inside quantization blocks and one on a block edge (512), an empty group, a
    # one-row group, rows past sum(group_sizes). Group 0's rows are 100x larger than group 2's that
    # share block 0 with them: the reference's one scale per block (amax over all its rows, masked
    # or not) quantizes group 2's rows there coarsely; a per-group amax would miss the error bound.
    sizes = [100, 0, 157, 1, 254, 0, 40]
    m = sum(sizes) + 30
    x, dy = torch.randn(m, 136).bfloat16(), torch.randn(m, 72).bfloat16()
    x[:100] *= 100
    dy[600:] *= 50  # the last block's rows past the sum set its scale
    gs = torch.tensor(sizes, dtype=torch.int32)
    ref = reference.grouped_matmul_transposed(x, dy, gs, block_m, F32)
    out = _tgmm(x, dy, sizes, block_m, tile_m, 128, 128, prequantize=False)
    testing.assert_kernel_close(out, ref, f"in-kernel {tile_m}/{block_m}")
    assert not out[[1, 5]].any()
    keep = [0, 2, 4, 6]
    assert_quantization_loss_ok(out[keep], unquantized_tgmm(x, dy, sizes)[keep], f"{tile_m}/{block_m}")


@pytest.mark.parametrize("dtype", [F32, torch.float16])
def test_tgmm_in_kernel_inf_nan_as_the_reference(backend, dtype):
    # inf / nan inside groups (inf saturates to 448 * scale, nan propagates to its row / column of
    # the group's output) and past sum(group_sizes) in a block shared with real rows (left out of
    # the amax and masked: no effect).
    sizes = [70, 0, 100, 30]
    x, dy = torch.randn(230, 40, dtype=dtype), torch.randn(230, 24, dtype=dtype)
    x[5, 3], x[80, 7], x[120, 9], x[215, 1] = float("inf"), float("-inf"), float("nan"), float("inf")
    dy[90, 2], dy[210, 5], dy[3, 4] = float("nan"), float("nan"), float("inf")
    gs = torch.tensor(sizes, dtype=torch.int32)
    ref = reference.grouped_matmul_transposed(x, dy, gs, 128, F32)
    assert ref[2].isnan().any() and not ref[[0, 3]].isnan().any()
    for prequantize in (False, True):
        out = _tgmm(x, dy, sizes, 128, 256, 128, 128, prequantize=prequantize)
        testing.assert_kernel_close(out, ref, f"{dtype} prequantize={prequantize}")


#: (tile_m, tile_k, tile_n, block_m, prequantize) that tuning.tgmm_select returns for the MoE shapes
#: and the tests' shapes on some generation (lowering.tgmm_configs' "chosen" rows, all Mosaic-lowered
#: by check_lowering.py); test_every_chosen_tgmm_tiling_is_tested keeps this list complete.
CHOSEN_TGMM_TILINGS = [
    (128, 1792, 2048, 128, False), (128, 1792, 2048, 256, True), (256, 1024, 1792, 128, False),
    (256, 1024, 1408, 128, False), (256, 1024, 2048, 128, True), (256, 1792, 1024, 128, False), (256, 1792, 2048, 128, False),
    (256, 2048, 768, 128, False), (256, 2048, 1792, 128, False), (512, 128, 128, 128, False),
    (512, 128, 128, 256, False), (512, 1024, 1408, 128, False), (512, 1024, 1408, 256, False),
    (512, 1024, 1792, 128, False), (512, 1024, 2048, 128, True), (512, 1024, 2048, 256, True),
    (512, 1792, 1024, 128, False), (512, 1792, 2048, 128, False), (512, 1792, 2048, 256, False),
    (512, 2048, 768, 128, False), (512, 2048, 768, 256, False), (512, 2048, 1408, 128, False),
    (512, 2048, 1408, 256, False), (512, 2048, 1792, 256, False), (512, 2048, 2048, 128, False),
]  # fmt: skip
#: Run by default (interpret mode): non-power-of-two tiles, 2 K tiles, both block_m, both places.
FAST_CHOSEN = {(512, 1024, 1408, 128, False), (512, 2048, 768, 256, False), (512, 128, 128, 256, False),
               (256, 1024, 2048, 128, True)}  # fmt: skip


def test_every_chosen_tgmm_tiling_is_tested(backend):
    lowering = importlib.import_module("torch_fp8_blockwise.backends.pallas.lowering")
    tuning = importlib.import_module("torch_fp8_blockwise.backends.pallas.tuning")
    chosen = {
        (c.tm, c.tk, c.tn, c.block_m, c.prequantize)
        for gen in tuning.GENERATIONS
        for c, origin, _ in lowering.tgmm_configs(gen)
        if origin == "chosen"
    }
    assert chosen <= set(CHOSEN_TGMM_TILINGS), sorted(chosen - set(CHOSEN_TGMM_TILINGS))


@pytest.mark.parametrize(
    "tile_m,tile_k,tile_n,block_m,prequantize",
    [t if t in FAST_CHOSEN else pytest.param(*t, marks=pytest.mark.slow) for t in CHOSEN_TGMM_TILINGS],
)
def test_tgmm_chosen_tilings(backend, tile_m, tile_k, tile_n, block_m, prequantize):
    # K spans 2 tiles for the smaller K tiles (the accumulator restarts per (K, N) tile), one padded
    # tile for 2048; N is one padded tile: the big tiles at the cost of one output tile per group.
    sizes = [300, 0, 257, 140]
    m = sum(sizes) + 3
    k = tile_k + 100 if tile_k <= 1024 else tile_k - 60
    x, dy = torch.randn(m, k), torch.randn(m, tile_n - 24)
    if not prequantize:  # the in-kernel kernel reads bf16 tiles (the MoE gradient dtype)
        x, dy = x.bfloat16(), dy.bfloat16()
    out = _tgmm(x, dy, sizes, block_m, tile_m, tile_k, tile_n, prequantize)
    gs = torch.tensor(sizes, dtype=torch.int32)
    ref = reference.grouped_matmul_transposed(x, dy, gs, block_m, F32)
    testing.assert_kernel_close(out, ref, f"{tile_m}x{tile_k}x{tile_n}/{block_m}/{prequantize}")
    keep = [0, 2, 3]
    assert_quantization_loss_ok(
        out[keep], unquantized_tgmm(x, dy, sizes)[keep], f"{tile_m}x{tile_k}x{tile_n}"
    )


@pytest.mark.parametrize(
    "mode,x_dtype,out_dtype",
    [("dynamic", torch.bfloat16, None), ("fp8", F32, torch.float16), ("none", torch.bfloat16, F32)],
)
def test_gmm_default_config_through_the_op(backend, mode, x_dtype, out_dtype):
    sizes = [100, 0, 157, 1]
    case = gmm_inputs(sizes, n=200, k=384, mode=mode, x_dtype=x_dtype, extra_rows=3)
    y = check_gmm(backend, case, out_dtype, what=mode)
    assert_quantization_loss_ok(y, unquantized_gmm(case["x_f"].float(), case["w_f"], sizes), mode)


def test_tgmm_default_config_through_the_op(backend):
    sizes = [300, 0, 157, 1]
    m = sum(sizes) + 5
    x, dy = torch.randn(m, 72).bfloat16(), torch.randn(m, 40).bfloat16()
    check_tgmm(backend, x, dy, sizes, 128, F32)


def test_sum_above_m_truncates_on_the_device_path(backend):
    case = gmm_inputs([5, 9], n=40, k=128, mode="fp8")
    args = dict(case["args"], group_sizes=torch.tensor([5, 30], dtype=torch.int32))
    testing.assert_kernel_close(_pallas_gmm(args, _small_gmm_config("fp8")), _ref_gmm(args), "gmm")
    x, dy = torch.randn(14, 16), torch.randn(14, 32)
    gs = torch.tensor([5, 30], dtype=torch.int32)
    ref = reference.grouped_matmul_transposed(x, dy, gs, 128, F32)
    testing.assert_kernel_close(_tgmm(x, dy, [5, 30], 128, 128, 128), ref, "tgmm")
    # Truncation that empties whole groups: their one (zero-storing) visit sits past row M.
    gs = torch.tensor([20, 7, 0], dtype=torch.int32)
    ref = reference.grouped_matmul_transposed(x, dy, gs, 128, F32)
    out = _tgmm(x, dy, [20, 7, 0], 128, 256, 128)
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    testing.assert_kernel_close(out, ref, "tgmm truncated to empty")


def test_one_trace_serves_every_group_sizes(backend):
    """group_sizes is data, not a static argument: new sizes reuse the compiled kernel."""
    bridge, _, _ = _mods()
    case = gmm_inputs([5, 0, 9], n=40, k=128, mode="fp8", extra_rows=2)
    cfg = _small_gmm_config("fp8")
    _pallas_gmm(case["args"], cfg)
    before = dict(bridge.TRACE_COUNTS)
    for sizes in ([0, 0, 14], [14, 0, 0], [1, 12, 1]):
        args = dict(case["args"], group_sizes=torch.tensor(sizes, dtype=torch.int32))
        testing.assert_kernel_close(_pallas_gmm(args, cfg), _ref_gmm(args), str(sizes))
    assert dict(bridge.TRACE_COUNTS) == before


# ------------------------------------------------------------------ torch_xla's CPU device (call_jax)
def _xla_device():
    torch_xla = pytest.importorskip("torch_xla", reason="needs torch_xla (environment 'xla')")
    d = torch_xla.device()
    if d.type != "xla":
        pytest.skip(f"torch_xla.device() is {d}, not an XLA device")
    return d


def _to(args: dict, dev) -> dict:
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.parametrize("mode", ["dynamic", "fp8"])
def test_gmm_on_xla_device_without_host_sync(backend, mode):
    import torch_xla.debug.metrics as met

    from torch_fp8_blockwise.ops import grouped_matmul

    dev = _xla_device()
    sizes = [37, 0, 90, 1]
    case = gmm_inputs(sizes, n=136, k=256, mode=mode, x_dtype=torch.bfloat16, extra_rows=4)
    ref = _ref_gmm(case["args"]).to(torch.bfloat16)
    xargs = _to(case["args"], dev)
    met.clear_all()
    y = grouped_matmul(**xargs)  # dispatched by device type "xla": no use_backend
    # Nothing was read back to the host while staging the op (group_sizes stays on the device).
    assert "TransferFromDeviceTime" not in met.metric_names()
    testing.assert_kernel_close(y.cpu(), ref, mode)
    assert_quantization_loss_ok(
        y.cpu().float(), unquantized_gmm(case["x_f"].float(), case["w_f"], sizes), mode
    )


def test_tgmm_on_xla_device_without_host_sync(backend):
    import torch_xla.debug.metrics as met

    from torch_fp8_blockwise.ops import grouped_matmul_transposed

    dev = _xla_device()
    sizes = [200, 0, 157, 1]
    x, dy = torch.randn(360, 72), torch.randn(360, 40)
    gs = torch.tensor(sizes, dtype=torch.int32)
    ref = reference.grouped_matmul_transposed(x, dy, gs, 128, F32)
    met.clear_all()
    out = grouped_matmul_transposed(x.to(dev), dy.to(dev), gs.to(dev))
    assert "TransferFromDeviceTime" not in met.metric_names()
    testing.assert_kernel_close(out.cpu(), ref, "tgmm xla")


@pytest.mark.parametrize("edge", ["x 1e38", "x_scale 3e38"])
def test_gmm_overflow_edge_follows_the_reference_order(backend, edge):
    """gmm scales a K block's partial product by x_scale, then by w_scale, as the reference (it
    multiplied by x_scale * w_scale: finite outputs where the reference gives inf)."""
    g = torch.Generator().manual_seed(0)
    m, n, k = 24, 128, 256
    x = torch.randn(m, k, generator=g)
    if edge == "x 1e38":
        x[:, 5] = 1e38
    xq, xs = reference.quantize_activation(x, 128)
    if edge == "x_scale 3e38":
        xs[:, 1] = 3e38
    wq, ws = reference.quantize(torch.randn(2, n, k, generator=g), (128, 128), torch.float8_e4m3fn, "fp32")
    args = {"x": xq, "w": wq, "w_scale": ws, "group_sizes": torch.tensor([10, 14], dtype=torch.int32),
            "block_shape": (128, 128), "x_scale": xs, "activation": "dynamic"}  # fmt: skip
    y, ref = _pallas_gmm(args, _small_gmm_config("fp8")), _ref_gmm(args)
    assert not torch.isfinite(ref).all()
    for fn in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(fn(y), fn(ref)), (fn.__name__, int(fn(y).sum()), int(fn(ref).sum()))
    fin = torch.isfinite(ref)
    testing.assert_kernel_close(y[fin], ref[fin], "finite part at the overflow edge")
