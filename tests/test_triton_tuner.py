"""scripts/tune_triton.py's correctness gate, run on CPU under TRITON_INTERPRET=1 with tiny shapes.

On the H100 the tuner rejected every W8A16 candidate: its reference quantized x ("dynamic") while the
kernel keeps x in bf16. Here the gate must accept the kernel's correct W8A16 output and reject a
wrong one, and the old reference must be shown to have been the culprit.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from conftest import backend_params

from torch_fp8_blockwise import reference

pytestmark = pytest.mark.parametrize("backend", backend_params("triton", op="blockwise_matmul"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tuner():
    spec = importlib.util.spec_from_file_location(
        "tune_triton", os.path.join(ROOT, "scripts", "tune_triton.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cfg():
    from torch_fp8_blockwise.backends.triton.configs import GemmConfig

    return GemmConfig(block_m=16, block_n=64, block_k=128, group_m=1, split_k=2, swap_ab=True)


@pytest.mark.parametrize("kernel", ["w8a16", "w8a8"])
def test_gate_accepts_a_correct_candidate_and_rejects_a_wrong_one(backend, kernel):
    tuner = _tuner()
    run, ref = tuner.make_problem(kernel, 3, 64, 256, "cpu")
    y = run(_cfg())
    assert y.dtype == ref.dtype == torch.bfloat16 and y.shape == ref.shape == (3, 64)
    assert tuner.correct(y, ref)
    assert not tuner.correct(y * 1.05, ref)  # 5 % off: a wrong kernel
    assert not tuner.correct(y[:, :32], ref)  # wrong shape
    wrong = y.clone()
    wrong[:, ::2] = 0  # half the columns missing (e.g. a masking bug)
    assert not tuner.correct(wrong, ref)


def test_the_old_w8a16_reference_rejected_correct_kernels(backend):
    """The H100 bug: the same correct W8A16 output checked against a reference that quantizes x
    ("dynamic") fails the gate, so no candidate could ever win."""
    tuner = _tuner()
    torch.manual_seed(1)
    run, ref = tuner.make_problem("w8a16", 3, 64, 256, "cpu")
    y = run(_cfg())
    assert tuner.correct(y, ref)
    torch.manual_seed(1)  # make_problem draws the same w_true, x_true again
    w_true, x_true = torch.randn(64, 256), torch.randn(3, 256)
    wq, ws = reference.quantize(w_true, (128, 128), torch.float8_e4m3fn, "fp32")
    x = x_true.to(torch.bfloat16)
    assert torch.equal(
        reference.blockwise_matmul(x, wq, ws, (128, 128), None, None, torch.bfloat16, "none"), ref
    )
    old_ref = reference.blockwise_matmul(x, wq, ws, (128, 128), None, None, torch.bfloat16, "dynamic")
    assert not tuner.correct(y, old_ref)


def test_default_m_covers_every_bucket(backend):
    from torch_fp8_blockwise.backends.triton import configs

    assert tuple(_tuner().DEFAULT_M) == configs.M_BUCKETS
