"""Pallas blockwise_matmul kernel on CPU tensors (interpret mode), with explicit kernel configs.

Covers both execution modes (aligned: kernel block = quantization block; large: several
quantization blocks per grid step), every activation mode (dynamic W8A8, pre-quantized fp8 x,
W8A16), both MXU paths (native fp8 for v7x, bf16-widened for v5e / v6e), odd shapes (M, N, K not
multiples of any block), and the two numerics budgets of torch_fp8_blockwise.testing.
The XLA-device path is in test_pallas_xla.py; the generic op tests (tests/test_ops.py) run this
backend with the tuned / heuristic configs.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("jax", reason="the Pallas backend needs jax (environment 'xla')")

from torch_fp8_blockwise import reference  # noqa: E402
from torch_fp8_blockwise.testing import SQNR_FLOOR_DB, assert_kernel_close, sqnr  # noqa: E402

bridge = importlib.import_module("torch_fp8_blockwise.backends.pallas.bridge")
bm = importlib.import_module("torch_fp8_blockwise.backends.pallas.blockwise_matmul")

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _name(dtype: torch.dtype) -> str:
    return bridge.dtype_name(dtype)


def make_weight(n: int, k: int, block: tuple[int, int], dtype: torch.dtype = E4M3):
    """Unquantized w [N, K] f32 and its quantization (w_q [N, K] fp8, w_scale [NB, KB] f32)."""
    w = torch.randn(n, k)
    w_q, w_s = reference.quantize(w[None], block, dtype, "fp32")
    return w, w_q[0], w_s[0]


def run_case(
    m: int,
    n: int,
    k: int,
    *,
    tm: int,
    tn: int,
    tk: int,
    block: tuple[int, int] = (128, 128),
    x_mode: str = "dynamic",
    x_dtype: torch.dtype = torch.bfloat16,
    w_dtype: torch.dtype = E4M3,
    out_dtype: torch.dtype = torch.float32,
    mxu: str = "fp8",
    bias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kernel output, reference on the same quantized inputs, unquantized product)."""
    x_hp = torch.randn(m, k)
    w, w_q, w_s = make_weight(n, k, block, w_dtype)
    b = torch.randn(n) if bias else None
    x, x_s, activation = x_hp.to(x_dtype), None, "dynamic" if x_mode != "none" else "none"
    if x_mode == "fp8":
        x, x_s = reference.quantize(x_hp, (1, block[1]), x_dtype, "fp32")
    # float16 runs as float32 inside the kernel (Mosaic has no f16): the bridge widens / narrows.
    kx, ko = bm.kernel_dtype(_name(x.dtype)), bm.kernel_dtype(_name(out_dtype))
    cfg = bm.MatmulConfig(tm, tn, tk, *block, kx, _name(w_dtype), ko, x_mode, mxu, bias)
    y = bridge.blockwise_matmul(x, w_q, w_s, block, x_s, b, out_dtype, activation, config=cfg)
    ref = reference.blockwise_matmul(x, w_q, w_s, block, x_s, b, out_dtype, activation)
    x_true = x_hp if x_mode == "fp8" else x_hp.to(x_dtype).float()
    exact = x_true @ w.T + (0 if b is None else b)
    return y, ref, exact


# (tm, tn, tk, block): aligned and large-block configurations.
ALIGNED = (32, 128, 128, (128, 128))
LARGE = (32, 384, 256, (128, 128))  # 3 x 2 quantization blocks per step


@pytest.mark.parametrize("cfg", [ALIGNED, LARGE], ids=["aligned", "large"])
@pytest.mark.parametrize(
    "x_mode, x_dtype",
    [
        ("dynamic", torch.bfloat16),
        ("dynamic", torch.float32),
        ("fp8", E4M3),
        ("none", torch.bfloat16),
        ("none", torch.float32),
    ],
)
@pytest.mark.parametrize("m, n, k", [(1, 200, 328), (2, 576, 1000), (67, 130, 520)])
def test_modes_odd_shapes(cfg, x_mode, x_dtype, m, n, k) -> None:
    tm, tn, tk, block = cfg
    y, ref, exact = run_case(m, n, k, tm=tm, tn=tn, tk=tk, block=block, x_mode=x_mode, x_dtype=x_dtype)
    assert_kernel_close(y, ref, f"{x_mode} {x_dtype} {m}x{n}x{k}")
    # SQNR is a statistic: 200 outputs (M = 1) scatter +-1 dB around W8A8's ~28.5 dB on randn, for
    # the reference too (27.9 dB at 1 x 1000 x 328), so the quantization budget is checked on M > 1.
    if m > 1:
        assert sqnr(y, exact) >= SQNR_FLOOR_DB


@pytest.mark.parametrize(
    "x_mode, x_dtype, w_dtype, out_dtype, mxu",
    [
        ("fp8", E5M2, E4M3, torch.bfloat16, "fp8"),  # mixed fp8 types: widened to bf16 in VMEM
        ("fp8", E4M3, E5M2, torch.float32, "fp8"),
        ("fp8", E4M3, E4M3, torch.bfloat16, "bf16"),  # v5e / v6e path: fp8 tiles widened in VMEM
        ("dynamic", torch.float16, E4M3, torch.float16, "bf16"),
        ("none", torch.float16, E5M2, torch.float16, "fp8"),
    ],
)
def test_dtypes_and_mxu_paths(x_mode, x_dtype, w_dtype, out_dtype, mxu) -> None:
    y, ref, _ = run_case(
        13, 300, 400, tm=32, tn=256, tk=256, x_mode=x_mode, x_dtype=x_dtype, w_dtype=w_dtype,
        out_dtype=out_dtype, mxu=mxu, bias=True,
    )  # fmt: skip
    assert_kernel_close(y, ref, f"{x_mode} x={x_dtype} w={w_dtype} out={out_dtype} mxu={mxu}")


@pytest.mark.parametrize(
    "tm, tn, tk, block",
    [
        (32, 256, 256, (256, 256)),  # aligned, 256 blocks
        (32, 512, 512, (512, 512)),  # aligned, 512 blocks
        (32, 512, 512, (256, 128)),  # large: 2 x 4 blocks
        (64, 256, 1024, (128, 512)),  # large along K only
    ],
)
def test_quant_blocks(tm, tn, tk, block) -> None:
    y, ref, exact = run_case(40, 600, 1100, tm=tm, tn=tn, tk=tk, block=block, bias=True)
    assert_kernel_close(y, ref, f"block {block} tile {(tm, tn, tk)}")
    assert sqnr(y, exact) >= SQNR_FLOOR_DB


def test_scales_applied_per_k_block() -> None:
    """Scales that differ wildly between K blocks: scaling after the K loop would be off by ~1e3x."""
    m, n, k = 8, 256, 512
    x_q, x_s = reference.quantize(torch.randn(m, k), (1, 128), E4M3, "fp32")
    w_q, w_s = reference.quantize(torch.randn(1, n, k), (128, 128), E4M3, "fp32")
    w_q, w_s = w_q[0], w_s[0] * torch.tensor([1.0, 1e3, 1e-3, 7.0])  # per K block
    cfg = bm.MatmulConfig(32, 256, 512, 128, 128, "float8_e4m3fn", "float8_e4m3fn", "float32", "fp8")
    y = bridge.blockwise_matmul(x_q, w_q, w_s, (128, 128), x_s, None, torch.float32, "dynamic", config=cfg)
    ref = reference.blockwise_matmul(x_q, w_q, w_s, (128, 128), x_s, None, torch.float32, "dynamic")
    assert_kernel_close(y, ref, "per-K-block scales")


@pytest.mark.parametrize("m", [3, 40])
def test_dynamic_as_quantize_pass_plus_fp8_kernel(m) -> None:
    """Dynamic W8A8 run as the Pallas quantize kernel + the fp8-x kernel (tuning may pick it)."""
    x = torch.randn(m, 600, dtype=torch.bfloat16)
    _, w_q, w_s = make_weight(300, 600, (128, 128))
    cfg = bm.MatmulConfig(32, 384, 256, 128, 128, "float8_e4m3fn", "float8_e4m3fn", "float32", "fp8")
    y = bridge.blockwise_matmul(x, w_q, w_s, (128, 128), None, None, torch.float32, "dynamic", config=cfg)
    ref = reference.blockwise_matmul(x, w_q, w_s, (128, 128), None, None, torch.float32, "dynamic")
    assert_kernel_close(y, ref, "quantize pass + fp8 kernel")
    with pytest.raises(ValueError, match="config: x_mode 'fp8' cannot run a 'none' call"):
        bridge.blockwise_matmul(x, w_q, w_s, (128, 128), None, None, torch.float32, "none", config=cfg)


def test_nonfinite_activation_matches_reference() -> None:
    """inf saturates in its element only and nan stays in its row, as the reference defines."""
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    x[1, 3], x[2, 200] = float("inf"), float("nan")
    _, w_q, w_s = make_weight(128, 256, (128, 128))
    cfg = bm.MatmulConfig(32, 128, 256, 128, 128, "bfloat16", "float8_e4m3fn", "float32", "dynamic")
    y = bridge.blockwise_matmul(x, w_q, w_s, (128, 128), None, None, torch.float32, "dynamic", config=cfg)
    ref = reference.blockwise_matmul(x, w_q, w_s, (128, 128), None, None, torch.float32, "dynamic")
    assert_kernel_close(y, ref, "non-finite activations")
    assert torch.isnan(y[2]).all() and torch.isfinite(y[1]).all()


@pytest.mark.slow
@pytest.mark.parametrize("m", [1, 2, 13, 67, 130])
@pytest.mark.parametrize(
    "x_mode, x_dtype", [("dynamic", torch.bfloat16), ("fp8", E4M3), ("none", torch.bfloat16)]
)
def test_tuned_path_many_m(m, x_mode, x_dtype) -> None:
    """The default (tuned table / heuristic) config for a range of M buckets, ragged N and K."""
    x_hp = torch.randn(m, 1000)
    _, w_q, w_s = make_weight(700, 1000, (128, 128))
    x, x_s = x_hp.to(x_dtype) if x_mode != "fp8" else x_hp, None
    if x_mode == "fp8":
        x, x_s = reference.quantize(x_hp, (1, 128), E4M3, "fp32")
    act = "none" if x_mode == "none" else "dynamic"
    y = bridge.blockwise_matmul(x, w_q, w_s, (128, 128), x_s, None, torch.bfloat16, act)
    ref = reference.blockwise_matmul(x, w_q, w_s, (128, 128), x_s, None, torch.bfloat16, act)
    assert_kernel_close(y, ref, f"tuned path M={m} {x_mode}")


# ------------------------------------------------------------------------------ static validation
@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"bn": 64}, "MatmulConfig.bn: expected one of (128, 256, 512), got 64"),
        ({"bk": 384}, "MatmulConfig.bk: expected one of (128, 256, 512), got 384"),
        ({"tm": 12}, "MatmulConfig.tm (batch block): expected a positive multiple of 32"),
        (
            {"tn": 192},
            "MatmulConfig.tn (out block): expected a positive multiple of 128 and of bn=128, got 192",
        ),
        (
            {"tk": 384, "bk": 256},
            "MatmulConfig.tk (in block): expected a positive multiple of 128 and of bk=256",
        ),
        ({"tn": 4096, "tk": 1024}, "quantization blocks per grid step exceeds 128"),
        ({"x_mode": "int8"}, "MatmulConfig.x_mode: expected one of ('fp8', 'dynamic', 'none')"),
        ({"x_dtype": "bfloat16"}, "MatmulConfig.x_dtype: x_mode='fp8' expects one of"),
        ({"mxu": "int8"}, "MatmulConfig.mxu: expected one of ('fp8', 'bf16')"),
        (
            {"out_dtype": "float16"},
            "MatmulConfig.out_dtype: expected one of ('bfloat16', 'float32') (Mosaic has no f16",
        ),
    ],
)
def test_config_validation(kwargs, words) -> None:
    base = dict(
        tm=32, tn=256, tk=256, bn=128, bk=128, x_dtype="float8_e4m3fn", w_dtype="float8_e4m3fn",
        out_dtype="bfloat16", x_mode="fp8",
    )  # fmt: skip
    with pytest.raises(ValueError) as info:
        bm.MatmulConfig(**{**base, **kwargs})
    assert words in str(info.value)


def test_modes_named() -> None:
    def mk(tn: int, tk: int) -> bm.MatmulConfig:
        return bm.MatmulConfig(32, tn, tk, 128, 128, "bfloat16", "float8_e4m3fn", "bfloat16", "dynamic")

    assert mk(128, 128).mode == "aligned" and mk(256, 128).mode == "large" and mk(128, 512).mode == "large"
    assert mk(128, 128).dot_dtype == "float8_e4m3fn"


def _overflow_edge_inputs(edge: str, m: int, n: int, k: int, seed: int = 0):
    """Pre-quantized W8A8 operands at fp32's overflow edge (x [m, k] e4m3fn, x_scale, w, w_scale)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if edge == "x 1e38":
        x[:, 5] = 1e38
    xq, xs = reference.quantize_activation(x, 128)
    wq, ws = reference.quantize(torch.randn(1, n, k, generator=g), (128, 128), E4M3, "fp32")
    wq, ws = wq[0], ws[0].clone()
    if edge == "x_scale 3e38":
        xs[:, 1] = 3e38
    elif edge == "w_scale inf":
        ws[0, 1] = float("inf")
    return xq, xs, wq, ws


def assert_same_nonfinite(y: torch.Tensor, ref: torch.Tensor) -> None:
    for fn in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(fn(y), fn(ref)), (fn.__name__, int(fn(y).sum()), int(fn(ref).sum()))
    fin = torch.isfinite(ref)
    assert_kernel_close(y[fin], ref[fin], "finite part at the overflow edge")


@pytest.mark.parametrize("edge", ["x 1e38", "x_scale 3e38", "w_scale inf"])
@pytest.mark.parametrize("tn", [128, 256], ids=["aligned", "large"])
def test_w8a8_overflow_edge_follows_the_reference_order(edge, tn) -> None:
    """At fp32's edge the order of scaling decides between finite and inf: the kernel scales a K
    block's partial product by x_scale, then by w_scale, as the reference does (it multiplied by
    x_scale * w_scale: an x element of 1e38 or an x_scale of 3e38 gave finite outputs where the
    reference gives inf)."""
    m, n, k = 8, 256, 256
    xq, xs, wq, ws = _overflow_edge_inputs(edge, m, n, k)
    cfg = bm.MatmulConfig(32, tn, 256, 128, 128, "float8_e4m3fn", "float8_e4m3fn", "float32", "fp8")
    y = bridge.blockwise_matmul(xq, wq, ws, (128, 128), xs, None, torch.float32, "dynamic", config=cfg)
    ref = reference.blockwise_matmul(xq, wq, ws, (128, 128), xs, None, torch.float32, "dynamic")
    assert not torch.isfinite(ref).all()
    assert_same_nonfinite(y, ref)


def test_dynamic_w8a8_overflow_edge_follows_the_reference_order() -> None:
    """The same with x quantized inside the kernel (x_mode "dynamic": its x_scale of 1e38 / 448)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 256, generator=g)
    x[:, 5] = 1e38
    _, w_q, w_s = make_weight(256, 256, (128, 128))
    cfg = bm.MatmulConfig(32, 256, 256, 128, 128, "float32", "float8_e4m3fn", "float32", "dynamic")
    y = bridge.blockwise_matmul(x, w_q, w_s, (128, 128), None, None, torch.float32, "dynamic", config=cfg)
    ref = reference.blockwise_matmul(x, w_q, w_s, (128, 128), None, None, torch.float32, "dynamic")
    assert not torch.isfinite(ref).all()
    assert_same_nonfinite(y, ref)
