"""Host overhead of an eager call: structural guards (counts, not timings; timings are in
scripts/bench_host.py).

* The ops are registered through torch.library.Library define/impl, not torch.library.custom_op
  (whose per-call wrapper costs ~3x a Library kernel: NOTES section 6).
* An M=0 call runs a fixed, short list of Python functions and of built-ins called by our code
  (both recorded with sys.setprofile): 4 functions and 7 built-ins, bf16 or fp8 x alike.
* Validation is memoized: a repeated call does not re-run the checks, yet a bad call still gets the
  same error word for word.
* The backend receives the caller's tensors themselves: no copy, cast or zero-fill on the way.

These pin the op's Python kernels (the path of every call where the C++ CPU kernel of
backends/cpu_native.py is not built, and of every call it hands over): the C++ fast path is off
here; its own guard (no Python function at all on an M = 0 / 1 call) is in test_cpu_native.py.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise import _dispatch, _validate, ops, reference

E4M3 = torch.float8_e4m3fn
_PACKAGE_DIR = os.path.dirname(tfb.__file__) + os.sep


@pytest.fixture(autouse=True)
def _python_kernels(monkeypatch):
    from cpu_kernel_helpers import python_kernels_only

    python_kernels_only(monkeypatch)


def _weights(n=256, k=256):
    return reference.quantize(torch.randn(n, k), (128, 128), E4M3, "fp32")


def test_ops_are_library_kernels_not_custom_op_wrappers():
    from torch._library.custom_ops import OPDEFS

    for name in ops.SCHEMAS:
        qualname = f"fp8::{name}"
        assert qualname not in OPDEFS, qualname
        for key in ("CompositeExplicitAutograd", "Autograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), (qualname, key)


def _calls(fn) -> tuple[list[str], list[str]]:
    """(Python functions entered, built-in (C) functions called by our package's code) while
    running fn(), in order; each as file:function or file:builtin."""
    py: list[str] = []
    builtin: list[str] = []

    def prof(frame, event, arg):
        where = frame.f_code.co_filename.rsplit("/", 1)[-1]
        if event == "call":
            py.append(f"{where}:{frame.f_code.co_name}")
        elif event == "c_call" and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            builtin.append(f"{where}:{getattr(arg, '__name__', repr(arg))}")

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return py[1:], builtin  # the first entry is fn itself


def _python_calls(fn) -> list[str]:
    return _calls(fn)[0]


def test_an_empty_call_runs_four_python_functions():
    w, ws = _weights()
    x = torch.empty(0, 256, dtype=torch.bfloat16)
    op = torch.ops.fp8.blockwise_matmul.default
    op(x, w, ws, [128, 128], None, None, None, "dynamic")  # fill the caches
    calls, builtins = _calls(lambda: op(x, w, ws, [128, 128], None, None, None, "dynamic"))
    assert calls == [
        "_ops.py:__call__",  # OpOverload.__call__ -> the C++ dispatcher
        "ops.py:kernel",  # our Autograd-key kernel: no grad needed, plain keyset -> impl directly
        "ops.py:_blockwise_matmul_impl",  # M == 0: returns the empty result itself
        "_validate.py:matmul_args_cached",  # one tuple, one dict lookup
    ], calls
    # Every built-in our code calls on this path (attribute reads do not count): the grad check,
    # the keyset lookup, the cache lookup and the one allocation of the result.
    assert builtins == [
        "ops.py:is_grad_enabled",
        "ops.py:_any_requires_grad",
        "ops.py:raw_repr",
        "ops.py:get",
        "_validate.py:is_contiguous",
        "_validate.py:get",
        "ops.py:empty_like",
    ], builtins


def test_an_empty_fp8_call_with_bias_and_batch_dims_runs_the_same_functions():
    w, ws = _weights()
    xq, xs = reference.quantize(torch.randn(2, 3, 256), (1, 128), E4M3, "fp32")
    xq, xs = xq[:, :0], xs[:, :0]  # [2, 0, K]: M = 0 with two lead dims
    bias = torch.randn(256)
    op = torch.ops.fp8.blockwise_matmul.default
    args = (xq, w, ws, [128, 128], xs, bias, torch.float32, "dynamic")
    y = op(*args)
    assert y.shape == (2, 0, 256) and y.dtype == torch.float32
    calls, builtins = _calls(lambda: op(*args))
    assert calls == [
        "_ops.py:__call__",
        "ops.py:kernel",
        "ops.py:_blockwise_matmul_impl",
        "_validate.py:matmul_args_cached",
    ], calls
    assert len(builtins) == 7, builtins


def test_a_real_call_adds_only_the_dispatch_lookups_and_the_backend():
    w, ws = _weights()
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    tfb.blockwise_matmul(x, w, ws)
    op = torch.ops.fp8.blockwise_matmul.default
    calls = _python_calls(lambda: op(x, w, ws, [128, 128], None, None, None, "dynamic"))
    ops_layer = [
        c for c in calls if c.split(":")[0] in ("ops.py", "_validate.py", "_dispatch.py", "_route.py")
    ]
    assert ops_layer == [
        "ops.py:kernel",
        "ops.py:_blockwise_matmul_impl",
        "_validate.py:matmul_args_cached",
        "ops.py:_run_matmul",
        "_dispatch.py:implementation",  # cached: one dict lookup
    ], ops_layer


def test_a_decode_call_on_cpu_runs_a_fixed_list_of_python_steps():
    """M = 1 on the CPU backend, x [1, 1, K] as a transformers model passes it at decode: the whole
    Python path from the op to the C kernel, pinned (functions entered, and every built-in our code
    calls). 210 of these run per SmolLM2 token, so a new step on this path (a lookup, a copy, a
    cast of the scales) is a cost per token: it must show up here, not only in a timing."""
    from cpu_kernel_helpers import compiled_or_fail

    compiled_or_fail()
    w, ws = _weights(576, 576)
    x = torch.randn(1, 1, 576, dtype=torch.bfloat16)
    op = torch.ops.fp8.blockwise_matmul.default
    for activation in ("none", "dynamic"):
        op(x, w, ws, [128, 128], None, None, None, activation)  # fill the caches
        calls, builtins = _calls(lambda a=activation: op(x, w, ws, [128, 128], None, None, None, a))
        assert calls == [
            "_ops.py:__call__",
            "ops.py:kernel",
            "ops.py:_blockwise_matmul_impl",
            "_validate.py:matmul_args_cached",
            "ops.py:_run_matmul",
            "_dispatch.py:implementation",
            "cpu.py:blockwise_matmul",
            "cpu.py:_lib",
            "cpu.py:_c",  # x, w, w_scale: the one layout boundary to C (issue 17), one check each
            "cpu.py:_c",
            "cpu.py:_c",
            "cpu.py:uses_fused_gemm",
        ], calls
        assert builtins == [
            "ops.py:is_grad_enabled",
            "ops.py:_any_requires_grad",
            "ops.py:raw_repr",
            "ops.py:get",
            "_validate.py:is_contiguous",
            "_validate.py:get",
            "_dispatch.py:get",
            "_dispatch.py:get",
            "ops.py:reshape",  # [1, 1, K] -> [1, K]
            "ops.py:contiguous",  # w_scale (a no-op for a contiguous one)
            "cpu.py:contiguous",  # x, w, w_scale in _c (no-ops for contiguous tensors)
            "cpu.py:contiguous",
            "cpu.py:contiguous",
            "cpu.py:get_num_threads",
            "cpu.py:empty",  # y
            "cpu.py:data_ptr",  # x, w, w_scale, y: then the one C call
            "cpu.py:data_ptr",
            "cpu.py:data_ptr",
            "cpu.py:data_ptr",
            "ops.py:reshape",  # y [1, N] -> [1, 1, N]
        ], builtins


def test_validation_runs_once_per_argument_metadata(monkeypatch):
    w, ws = _weights()
    full = []
    real = _validate.matmul_args
    monkeypatch.setattr(_validate, "matmul_args", lambda *a: full.append(1) or real(*a))
    monkeypatch.setattr(_validate, "_matmul_cache", {})
    for m in (3, 3, 3, 5, 5, 3):
        tfb.blockwise_matmul(torch.randn(m, 256), w, ws)
    assert len(full) == 2
    tfb.blockwise_matmul(torch.randn(3, 256, dtype=torch.bfloat16), w, ws)  # dtype is in the key
    assert len(full) == 3
    with pytest.raises(ValueError, match=r"w_scale: expected shape \(2, 2\)"):
        tfb.blockwise_matmul(torch.randn(3, 256), w, ws[:1])
    wt = torch.empty_strided((256, 256), (1, 256), dtype=E4M3)  # same shape, transposed strides
    with pytest.raises(ValueError, match="w: expected a contiguous row-major"):
        tfb.blockwise_matmul(torch.randn(3, 256), wt, ws)


def test_backend_gets_the_callers_tensors_without_copies(monkeypatch):
    seen = {}

    def backend(x, w, w_scale, block, x_scale, bias, out_dtype, activation):
        seen.update(x=x, w=w, w_scale=w_scale, x_scale=x_scale, bias=bias, out_dtype=out_dtype)
        return torch.empty(x.shape[0], w.shape[0], dtype=out_dtype)

    monkeypatch.setattr(reference, "blockwise_matmul", backend)
    monkeypatch.setattr(_dispatch, "_impl_cache", {})
    w, ws = _weights()
    xq, xs = reference.quantize(torch.randn(6, 256), (1, 128), E4M3, "fp32")
    bias = torch.randn(256, dtype=torch.bfloat16)
    with tfb.use_backend("reference"):
        y = tfb.blockwise_matmul(xq, w, ws, x_scale=xs, bias=bias)
    assert y.shape == (6, 256)
    for name, t in (("x", xq), ("w", w), ("w_scale", ws), ("x_scale", xs), ("bias", bias)):
        assert seen[name] is t, name
    assert seen["out_dtype"] == torch.bfloat16


def test_bench_host_breakdown_times_each_part_of_an_empty_call():
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "scripts", "bench_host.py"), "--calls", "20", "--rounds", "1",
         "--breakdown"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = proc.stdout.split("parts of the M=0 call")[1]
    for name in ("dispatcher floor", "matmul_args_cached (fp8 x)", "empty_like", "full checks, a miss"):
        line = next(line for line in parts.splitlines() if name in line)
        assert float(line.split()[-2]) > 0, line
