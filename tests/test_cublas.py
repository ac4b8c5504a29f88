"""cuBLAS block-scaled route (backends/cublas.py): eligibility, the exact call, the probe.

On CPU ``torch._scaled_mm`` is replaced by an emulation that accepts only NOTES' working call
(tests/cublas_emulation.py), so padding, cropping, scale layouts, bias and out dtype are proven
here; the last test runs the real thing on an sm_90 GPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from cublas_emulation import EmulatedScaledMm

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise import _dispatch, reference
from torch_fp8_blockwise.backends import cublas
from torch_fp8_blockwise.formats import MATMUL_BLOCKS
from torch_fp8_blockwise.testing import assert_kernel_close

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
OK = {"block_shape": (128, 128), "n": 256, "k": 512, "x_dtype": E4M3, "w_dtype": E4M3}


def _reason(**over):
    a = {**OK, "activation": "dynamic", "out_dtype": BF16, **over}
    return cublas.ineligible_reason(
        a["block_shape"], a["n"], a["k"], a["x_dtype"], a["w_dtype"], a["activation"], a["out_dtype"]
    )


def test_eligible_exactly_when_k_is_a_multiple_of_128():
    for k in range(1, 2049):
        assert (_reason(k=k) is None) == (k % 128 == 0), k
    assert "K=576 is not a multiple of 128" in _reason(k=576)


def test_eligible_exactly_when_n_is_a_multiple_of_16():
    for n in range(1, 1025):
        assert (_reason(n=n) is None) == (n % 16 == 0), n


def test_only_128x128_blocks():
    for block in itertools.product(MATMUL_BLOCKS, MATMUL_BLOCKS):
        assert (_reason(block_shape=block) is None) == (block == (128, 128)), block


def test_dtypes_activation_and_out_dtype():
    assert _reason(w_dtype=E5M2) is None
    assert "float8_e4m3fn activations" in _reason(x_dtype=E5M2)
    for hp in (BF16, F16, F32):
        assert _reason(x_dtype=hp) is None  # dynamic: our quantizer makes e4m3fn x
        assert "W8A16" in _reason(x_dtype=hp, activation="none")
    for out in (BF16, F16, F32):
        assert _reason(out_dtype=out) is None


@pytest.fixture
def scaled_mm(monkeypatch):
    emu = EmulatedScaledMm()
    monkeypatch.setattr(torch, "_scaled_mm", emu)
    return emu


def _problem(m, n, k, w_dtype=E4M3, fmt="fp32"):
    wq, ws = reference.quantize(torch.randn(n, k) * 0.05, (128, 128), w_dtype, fmt)
    x = torch.randn(m, k, dtype=BF16)
    return x, wq, ws


@pytest.mark.parametrize(
    "m,k", [(1, 256), (2, 256), (3, 256), (4, 256), (5, 256), (8, 256), (13, 256), (32, 128)]
)
def test_rows_padded_to_a_multiple_of_4_and_cropped(scaled_mm, m, k):
    """(K = 128: a [M, 1] scale must still get strides (1, M); found by the hypothesis test.)"""
    x, wq, ws = _problem(m, 144, k)
    xq, xs = reference.quantize_activation(x.float(), 128)
    ref = reference.blockwise_matmul(xq, wq, ws, (128, 128), xs, None, BF16, "dynamic")
    y = cublas.blockwise_matmul(xq, wq, ws, (128, 128), xs, None, BF16, "dynamic")
    assert scaled_mm.calls[-1]["m"] == -(-m // 4) * 4
    assert_kernel_close(y, ref, f"M={m}")
    assert y.is_contiguous()


@pytest.mark.parametrize(
    "bias_dtype,out_dtype", [(None, BF16)] + list(itertools.product((BF16, F16, F32), (BF16, F16, F32)))
)
def test_bias_added_in_fp32_whatever_the_dtypes(scaled_mm, bias_dtype, out_dtype):
    """cuBLAS's epilogue takes the bias only when its dtype is the bf16/fp16 out_dtype; otherwise
    we ask for fp32 output and add bias.float() ourselves: the contract either way."""
    x, wq, ws = _problem(6, 272, 384, E5M2)
    bias = None if bias_dtype is None else (torch.randn(272) * 4).to(bias_dtype)
    xq, xs = reference.quantize_activation(x.float(), 128)
    ref = reference.blockwise_matmul(xq, wq, ws, (128, 128), xs, bias, out_dtype, "dynamic")
    y = cublas.blockwise_matmul(xq, wq, ws, (128, 128), xs, bias, out_dtype, "dynamic")
    call = scaled_mm.calls[-1]
    fused = bias is not None and bias_dtype == out_dtype and out_dtype != F32
    assert call["bias"] == fused
    assert call["out_dtype"] == (out_dtype if bias is None or fused else F32)
    assert_kernel_close(y, ref, f"bias {bias_dtype} out {out_dtype}")


@pytest.mark.parametrize("x_dtype", [BF16, F32])
def test_dynamic_activation_uses_our_quantizer_then_cublas(scaled_mm, x_dtype):
    x, wq, ws = _problem(5, 128, 256)
    x = x.to(x_dtype)
    ref = reference.blockwise_matmul(x, wq, ws, (128, 128), None, None, F32, "dynamic")
    y = cublas.blockwise_matmul(x, wq, ws, (128, 128), None, None, F32, "dynamic")
    assert len(scaled_mm.calls) == 1
    assert_kernel_close(y, ref, "dynamic")


def test_ue8m0_scales_are_fp32_values_too(scaled_mm):
    x, wq, ws = _problem(4, 128, 384, fmt="ue8m0")
    xq, xs = reference.quantize(x.float(), (1, 128), E4M3, "ue8m0")
    ref = reference.blockwise_matmul(xq, wq, ws, (128, 128), xs, None, BF16, "dynamic")
    assert_kernel_close(cublas.blockwise_matmul(xq, wq, ws, (128, 128), xs, None, BF16, "dynamic"), ref)


@pytest.mark.parametrize(
    "n,k,block", [(128, 576, (128, 128)), (120, 256, (128, 128)), (256, 512, (256, 128))]
)
def test_an_ineligible_call_is_refused_never_computed(scaled_mm, n, k, block):
    wq, ws = reference.quantize(torch.randn(n, k), block, E4M3, "fp32")
    xq, xs = reference.quantize(torch.randn(4, k), (1, block[1]), E4M3, "fp32")
    with pytest.raises(_dispatch.BackendUnavailable, match="backend 'cublas' cannot compute this call"):
        cublas.blockwise_matmul(xq, wq, ws, block, xs, None, BF16, "dynamic")
    assert scaled_mm.calls == []


def test_forcing_cublas_on_cpu_says_why():
    x, wq, ws = _problem(4, 128, 256)
    with pytest.raises(_dispatch.BackendUnavailable, match="runs on CUDA tensors, not cpu"):
        with tfb.use_backend("cublas"):
            tfb.blockwise_matmul(x, wq, ws)


def test_probe_call_checks_numbers_against_the_reference(monkeypatch, scaled_mm):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assert cublas._probe_call(torch.device("cpu")) is None
    assert scaled_mm.calls[0]["m"] == 4  # PROBE_SHAPE has M = 3: the padding is probed too

    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: torch.zeros(4, 144, dtype=kw["out_dtype"]))
    assert "wrong numbers" in cublas._probe_call(torch.device("cpu"))

    def rejects(*a, **kw):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(torch, "_scaled_mm", rejects)
    assert "probe call failed: RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED" in cublas._probe_call(
        torch.device("cpu")
    )


def test_probe_runs_once_per_device(monkeypatch):
    assert cublas.probe("cpu") == "cuBLAS block-scaled runs on CUDA tensors, not cpu"
    calls = []
    monkeypatch.setattr(cublas, "_probes", {})
    monkeypatch.setattr(cublas, "_arch_reason", lambda device: None)
    monkeypatch.setattr(cublas, "_probe_call", lambda device: calls.append(device.index) or None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    for _ in range(3):
        assert cublas.probe(torch.device("cuda", 0)) is None
        assert cublas.probe("cuda:1") is None
    assert calls == [0, 1]
    assert cublas.probe_results() == {0: None, 1: None}


def test_no_probe_inside_cuda_graph_capture(monkeypatch):
    """The probe synchronizes: inside a capture it waits (Triton serves those calls), uncached."""
    calls = []
    monkeypatch.setattr(cublas, "_probes", {})
    monkeypatch.setattr(cublas, "_arch_reason", lambda device: None)
    monkeypatch.setattr(cublas, "_probe_call", lambda device: calls.append(device.index) or None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert cublas.probe("cuda:0") is cublas.CAPTURING
    assert calls == [] and cublas.probe_results() == {}
    from torch_fp8_blockwise import _route

    monkeypatch.setattr(_route, "_cache", {})
    dev = torch.device("cuda", 0)
    args = (dev, 4096, 4096, 4096, (128, 128), E4M3, E4M3, "dynamic", BF16)
    assert _route.route(*args)[0] == "triton" and _route._cache == {}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert _route.route(*args)[0] == "cublas" and calls == [0] and len(_route._cache) == 1


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (the real torch._scaled_mm block-scaled call)")
@pytest.mark.parametrize("m,n,k", [(1, 2112, 7168), (3, 144, 256), (64, 4608, 1536), (257, 7168, 2048)])
@pytest.mark.parametrize(
    "bias_dtype,out_dtype", [(None, BF16), (BF16, BF16), (F32, BF16), (BF16, F32), (F16, F16)]
)
def test_real_cublas_on_sm90_meets_the_contract(m, n, k, bias_dtype, out_dtype):
    dev = torch.device("cuda")
    assert cublas.probe(dev) is None
    wq, ws = reference.quantize(torch.randn(n, k, device=dev) * 0.05, (128, 128), E4M3, "fp32")
    xq, xs = reference.quantize_activation(torch.randn(m, k, device=dev), 128)
    bias = None if bias_dtype is None else torch.randn(n, device=dev).to(bias_dtype)
    ref = reference.blockwise_matmul(xq, wq, ws, (128, 128), xs, bias, out_dtype, "dynamic")
    y = cublas.blockwise_matmul(xq, wq, ws, (128, 128), xs, bias, out_dtype, "dynamic")
    assert_kernel_close(y, ref, f"cuBLAS M={m} N={n} K={k}")
