"""The Pallas backend on torch_xla's CPU device (PJRT_DEVICE=CPU): ops dispatched by device type
"xla", kernels staged into the lazy graph with call_jax, Pallas in interpret mode.

Checks numerics of every op and mode on odd shapes against the reference (same bounds as
tests/test_ops.py), that call_jax traces once per (shape bucket, config), that E8M0 scales cross
as uint8, and that torch.compile(backend="openxla") captures one graph with no breaks.
"""

from __future__ import annotations

import importlib

import pytest
import torch

torch_xla = pytest.importorskip("torch_xla", reason="needs torch_xla (environment 'xla')")
pytest.importorskip("jax", reason="needs jax (environment 'xla')")

import torch_fp8_blockwise as tfb  # noqa: E402
from torch_fp8_blockwise import reference  # noqa: E402
from torch_fp8_blockwise.testing import assert_kernel_close, sqnr, sqnr_floor  # noqa: E402

bridge = importlib.import_module("torch_fp8_blockwise.backends.pallas.bridge")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.fixture(scope="module")
def dev() -> torch.device:
    d = torch_xla.device()
    if d.type != "xla":
        pytest.skip(f"torch_xla.device() is {d}, not an XLA device")
    return d


def test_dispatch_table_names_pallas(dev) -> None:
    row = tfb.backend_table(dev)["pallas"]
    assert row["status"] == "available"
    assert {row[op] for op in ("quantize", "dequantize", "blockwise_matmul")} == {"pallas"}


@pytest.mark.parametrize(
    "m, n, k, mode, wdtype, fmt, block, out_dtype, bias",
    [
        (2, 576, 1000, "dynamic", E4M3, "fp32", (128, 128), torch.float32, True),
        (13, 576, 1000, "fp8_x", E4M3, "ue8m0", (128, 128), torch.bfloat16, False),
        (67, 130, 520, "w8a16", E5M2, "fp32", (128, 256), torch.float32, True),
        (40, 300, 700, "dynamic", E4M3, "fp32", (256, 128), torch.float16, False),
    ],
)
def test_blockwise_matmul_on_xla(dev, m, n, k, mode, wdtype, fmt, block, out_dtype, bias) -> None:
    w_true = torch.randn(n, k)
    wq, ws = reference.quantize(w_true, block, wdtype, fmt)
    x_true = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(n) if bias else None
    x, xs, act = x_true, None, "dynamic"
    if mode == "fp8_x":
        x, xs = reference.quantize(x_true.float(), (1, block[1]), E4M3, fmt)
    elif mode == "w8a16":
        act = "none"
    ref = reference.blockwise_matmul(x, wq, ws, block, xs, b, out_dtype, act)
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    y = tfb.blockwise_matmul(to(x), to(wq), to(ws), block, to(xs), to(b), out_dtype, act)
    assert y.device.type == "xla"
    y = y.cpu()
    assert_kernel_close(y, ref, f"xla {mode} {m}x{n}x{k}")
    exact = x_true.float() @ w_true.T + (0 if b is None else b)
    assert sqnr(y, exact) >= sqnr_floor(wdtype, fmt)


@pytest.mark.parametrize(
    "shape, block, dtype, fmt",
    [
        ((3, 70, 300), (1, 128), E4M3, "fp32"),
        ((130, 260), (128, 128), E5M2, "ue8m0"),
        ((2, 300, 520), (256, 512), E4M3, "ue8m0"),
    ],
)
def test_quantize_dequantize_bits_on_xla(dev, shape, block, dtype, fmt) -> None:
    x = torch.randn(shape) * 5
    x.view(-1)[7], x.view(-1)[11] = float("inf"), float("nan")
    q, s = tfb.quantize(x.to(dev), block, dtype, fmt)
    q_ref, s_ref = reference.quantize(x, block, dtype, fmt)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s.cpu(), s_ref)
    y = tfb.dequantize(q, s, block, torch.float32).cpu()
    y_ref = reference.dequantize(q_ref, s_ref, block, torch.float32)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and torch.equal(y.nan_to_num(), y_ref.nan_to_num())


def test_one_trace_for_100_calls_and_one_per_bucket(dev) -> None:
    n, k = 256, 384
    wq, ws = reference.quantize(torch.randn(n, k), (128, 128), E4M3, "fp32")
    w, s = wq.to(dev), ws.to(dev)
    x = torch.randn(5, k, dtype=torch.bfloat16).to(dev)
    before = bridge.TRACE_COUNTS["blockwise_matmul"]
    for _ in range(100):
        y = tfb.blockwise_matmul(x, w, s)
    torch_xla.sync()
    assert bridge.TRACE_COUNTS["blockwise_matmul"] - before == 1
    # M = 1, 17, 32 share the 32-row bucket: still one trace.
    for m in (1, 17, 32):
        y = tfb.blockwise_matmul(torch.randn(m, k, dtype=torch.bfloat16).to(dev), w, s)
        assert y.shape == (m, n)
    torch_xla.sync()
    assert bridge.TRACE_COUNTS["blockwise_matmul"] - before == 1
    y = tfb.blockwise_matmul(torch.randn(33, k, dtype=torch.bfloat16).to(dev), w, s)  # next bucket
    torch_xla.sync()
    assert bridge.TRACE_COUNTS["blockwise_matmul"] - before == 2


def test_e8m0_scales_cross_as_uint8(dev) -> None:
    """float8_e8m0fnu cannot move to XLA; the bridge bit-casts it to uint8 and decodes in JAX."""
    wq, ws = reference.quantize(torch.randn(1, 256, 384), (128, 128), E4M3, "ue8m0")
    ws_e8m0 = ws.to(torch.float8_e8m0fnu)  # exact: ue8m0 scales are powers of two
    assert torch.equal(ws_e8m0.float(), ws)
    ref = reference.dequantize(wq, ws, (128, 128), torch.float32)
    y_cpu = bridge.dequantize(wq, ws_e8m0, (128, 128), torch.float32)  # CPU tensors
    assert torch.equal(y_cpu, ref)
    y_xla = bridge.dequantize(wq.to(dev), ws_e8m0.view(torch.uint8).to(dev), (128, 128), torch.float32)
    assert torch.equal(y_xla.cpu(), ref)
    x = torch.randn(7, 384, dtype=torch.bfloat16)
    y = bridge.blockwise_matmul(
        x.to(dev), wq[0].to(dev), ws_e8m0[0].view(torch.uint8).to(dev), (128, 128), None, None,
        torch.float32, "dynamic",
    )  # fmt: skip
    ref_mm = reference.blockwise_matmul(x, wq[0], ws[0], (128, 128), None, None, torch.float32, "dynamic")
    assert_kernel_close(y.cpu(), ref_mm, "e8m0 weight scales")


@pytest.mark.slow
def test_torch_compile_openxla_one_graph_no_breaks(dev) -> None:
    import torch._dynamo as dynamo

    wq, ws = reference.quantize(torch.randn(256, 384), (128, 128), E4M3, "fp32")
    w, s, b = wq.to(dev), ws.to(dev), torch.randn(256).to(dev)

    def layer(x: torch.Tensor) -> torch.Tensor:
        h = tfb.blockwise_matmul(x, w, s, bias=b)
        return torch.nn.functional.silu(h)

    x = torch.randn(2, 5, 384, dtype=torch.bfloat16)
    dynamo.reset()
    explanation = dynamo.explain(layer)(x.to(dev))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation
    compiled = torch.compile(layer, backend="openxla", fullgraph=True)
    y = compiled(x.to(dev)).cpu()
    ref = torch.nn.functional.silu(
        reference.blockwise_matmul(
            x.reshape(10, 384), wq, ws, (128, 128), None, b.cpu(), torch.bfloat16, "dynamic"
        )
    ).reshape(2, 5, 256)
    assert_kernel_close(y, ref, "torch.compile(openxla)")
