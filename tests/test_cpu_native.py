"""The C++ CPU kernel of fp8::blockwise_matmul (backends/cpu_native.py, cpu_kernels/fp8_ops_cpu.cpp).

* It gives the bits of the Python path (the C++ fast path on vs off, same process) over a grid of
  shapes, dtypes, blocks, bias, out_dtype, activations, batch dims and strides, and it did serve
  the calls it should (its counter of fast calls).
* Every bad call gets the same exception, word for word, with it on and off (the cases of
  test_validation.py and test_argument_kinds.py), with autograd keys and under inference_mode.
* Gradients, use_backend, fake tensors and the overflow edge still take the Python path.
* The fixed cost guard: an M = 0 or M = 1 call enters no Python function of ours (sys.setprofile).
* Without the extension (FP8_CPU_KERNELS=0) the op keeps its Python kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise import reference
from torch_fp8_blockwise.backends import cpu, cpu_native

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
OP = torch.ops.fp8.blockwise_matmul.default


@pytest.fixture(scope="module")
def ext():
    """The installed extension. A machine with a C++ compiler and ninja must build it (a failure
    fails); elsewhere the tests skip, saying why."""
    cpu_native.install()
    if not cpu_native.installed():
        can_build = cpu_native._why_not(cpu.cpu_kernels.library()) is None
        if can_build:
            pytest.fail(f"the C++ kernel should build here: {cpu_native.status()}")
        pytest.skip(cpu_native.status())
    yield cpu_native._ext
    cpu_native.set_enabled(True)


def _both(ext, fn):
    """(fn() with the C++ fast path, fn() on the Python path, fast calls the first one made)."""
    cpu_native.set_enabled(True)
    before = ext.fast_calls()
    on = fn()
    served = ext.fast_calls() - before
    cpu_native.set_enabled(False)
    try:
        off = fn()
    finally:
        cpu_native.set_enabled(True)
    return on, off, served


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    assert torch.equal(a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b)


def _operands(n, k, block, w_dtype, x_kind, lead, seed):
    g = torch.Generator().manual_seed(seed)
    wq, ws = reference.quantize(torch.randn(n, k, generator=g), block, w_dtype, "fp32")
    x = torch.randn(*lead, k, generator=g)
    if x_kind in (E4M3, E5M2):  # x [*lead, K] with at least two dims here
        xq, xs = reference.quantize(x, (1, block[1]), x_kind, "fp32")
        return xq, wq, ws, xs
    return x.to(x_kind), wq, ws, None


GRID = [
    # (n, k, block, w dtype, x dtype, lead dims, activation, bias dtype, out_dtype)
    (256, 384, (128, 128), E4M3, torch.bfloat16, (1,), "none", None, None),
    (256, 384, (128, 128), E4M3, torch.bfloat16, (1,), "dynamic", None, None),
    (200, 300, (128, 128), E5M2, torch.float32, (3,), "dynamic", torch.bfloat16, None),
    (200, 300, (256, 128), E4M3, torch.float16, (2, 3), "none", torch.float32, torch.float32),
    (130, 520, (128, 512), E4M3, E4M3, (5,), "dynamic", None, None),
    (130, 520, (512, 256), E5M2, E5M2, (1, 1), "dynamic", torch.float16, torch.float16),
    (576, 576, (128, 128), E4M3, torch.bfloat16, (1, 1), "none", torch.bfloat16, torch.bfloat16),
    (192, 576, (128, 128), E4M3, torch.float32, (cpu.SMALL_M,), "dynamic", None, torch.bfloat16),
    (256, 256, (128, 128), E4M3, torch.bfloat16, (0,), "none", None, None),  # M = 0: an empty result
    (256, 256, (128, 128), E4M3, E4M3, (2, 0), "dynamic", torch.float32, torch.float32),
]


@pytest.mark.parametrize("case", GRID, ids=[f"case{i}" for i in range(len(GRID))])
def test_cpp_and_python_give_the_same_bits(ext, case):
    n, k, block, w_dtype, x_kind, lead, activation, bias_dtype, out_dtype = case
    x, wq, ws, xs = _operands(n, k, block, w_dtype, x_kind, lead, seed=n + k)
    bias = None if bias_dtype is None else torch.randn(n).to(bias_dtype)
    args = (x, wq, ws, list(block), xs, bias, out_dtype, activation)
    with torch.no_grad():
        on, off, served = _both(ext, lambda: OP(*args))
    _same(on, off)
    assert served == 1
    with torch.inference_mode():  # the CPU key's kernel (inference_mode skips the Autograd keys)
        on, off, served = _both(ext, lambda: OP(*args))
    _same(on, off)
    assert served == 1


def test_strided_operands_give_the_same_bits(ext):
    wq, ws = reference.quantize(torch.randn(256, 384), (128, 128), E4M3, "fp32")
    x = torch.randn(384, 4).T  # strides (1, 4)
    bias = torch.randn(512)[::2]  # stride 2
    ws_t = ws.T.contiguous().T  # column-major scales
    on, off, served = _both(
        ext, lambda: tfb.blockwise_matmul(x, wq, ws_t, bias=bias, out_dtype=torch.float32)
    )
    _same(on, off)
    assert served == 1
    xq, xs = reference.quantize(torch.randn(3, 384), (1, 128), E4M3, "fp32")
    xs_t = xs.T.contiguous().T
    on, off, served = _both(ext, lambda: tfb.blockwise_matmul(xq, wq, ws, x_scale=xs_t))
    _same(on, off)
    assert served == 1


def test_calls_outside_the_fused_rule_take_the_python_path(ext, monkeypatch):
    """Large M (the panel path), K = 0, use_backend: the Python kernels answer, same bits."""
    wq, ws = reference.quantize(torch.randn(1100, 256), (128, 128), E4M3, "fp32")
    x = torch.randn(cpu.SMALL_WEIGHT_MAX_M + 1, 256, dtype=torch.bfloat16)
    on, off, served = _both(ext, lambda: tfb.blockwise_matmul(x, wq, ws))
    _same(on, off)
    assert served == 0
    w0, ws0 = torch.empty(4, 0, dtype=E4M3), torch.empty(1, 0)
    on, off, served = _both(ext, lambda: tfb.blockwise_matmul(torch.randn(2, 0), w0, ws0, bias=torch.ones(4)))
    _same(on, off)
    assert served == 0 and torch.equal(on, torch.ones(2, 4))
    seen = []
    real = reference.blockwise_matmul
    monkeypatch.setattr(reference, "blockwise_matmul", lambda *a: seen.append(1) or real(*a))
    monkeypatch.setattr(tfb._dispatch, "_impl_cache", {})
    before = ext.fast_calls()
    with tfb.use_backend("reference"):
        tfb.blockwise_matmul(torch.randn(2, 256), wq, ws)
    assert ext.fast_calls() == before and seen == [1]
    before = ext.fast_calls()
    tfb.blockwise_matmul(torch.randn(2, 256), wq, ws)  # the context closed: C++ again
    assert ext.fast_calls() == before + 1


def test_overflow_edge_gets_the_reference_through_the_python_path(ext):
    wq, ws = reference.quantize(torch.randn(256, 256), (128, 128), E4M3, "fp32")
    ws = ws * 1e36  # products near fp32's limit: only the reference's order of scaling is the contract
    x = torch.randn(2, 256) * 1e3
    on, off, served = _both(ext, lambda: tfb.blockwise_matmul(x, wq, ws, out_dtype=torch.float32))
    _same(on, off)
    assert served == 0
    _same(on, reference.blockwise_matmul(x, wq, ws, (128, 128), None, None, torch.float32, "dynamic"))


def test_gradients_and_fake_tensors_keep_the_python_kernels(ext):
    wq, ws = reference.quantize(torch.randn(256, 256), (128, 128), E4M3, "fp32")
    x = torch.randn(2, 256, requires_grad=True)
    before = ext.fast_calls()
    y = tfb.blockwise_matmul(x, wq, ws)
    assert y.requires_grad and ext.fast_calls() == before + 1  # forward: the op without autograd
    with pytest.raises(RuntimeError, match=r"fp8::blockwise_matmul is inference-only and has no gradient"):
        y.sum().backward()
    with torch.no_grad():
        _same(tfb.blockwise_matmul(x, wq, ws), y.detach())
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fx, fw, fws = mode.from_tensor(x.detach()), mode.from_tensor(wq), mode.from_tensor(ws)
    with mode:
        before = ext.fast_calls()
        fy = tfb.blockwise_matmul(fx, fw, fws, out_dtype=torch.float16)
        assert ext.fast_calls() == before
    assert fy.shape == (2, 256) and fy.dtype == torch.float16


def _error_cases():
    import test_argument_kinds as kinds
    import test_validation as validation

    cases = [(f"validation-{c[0]}", c[1]) for c in validation.CASES]
    cases += [(f"kinds-{i}", c[0]) for i, c in enumerate(kinds.WRAPPER_CASES)]
    cases += [(f"ops-{i}", c[0]) for i, c in enumerate(kinds.OP_CASES)]
    return cases


def _outcome(call):
    try:
        y = call()
    except Exception as e:  # the comparison is of whatever comes out, exception or result
        return type(e), str(e)
    return "result", y


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_every_bad_call_gets_the_same_error_either_way(ext):
    cases = _error_cases()
    assert len(cases) >= 60
    for grad_mode in (torch.no_grad, torch.enable_grad, torch.inference_mode):
        for name, call in cases:
            with grad_mode():
                on, off, _ = _both(ext, lambda call=call: _outcome(call))
            assert on[0] == off[0], (name, grad_mode.__name__, on, off)
            if on[0] == "result":
                results_on = on[1] if isinstance(on[1], tuple) else (on[1],)
                results_off = off[1] if isinstance(off[1], tuple) else (off[1],)
                for a, b in zip(results_on, results_off, strict=True):
                    _same(a, b)
            else:
                assert on[1] == off[1], (name, grad_mode.__name__, on, off)


def _python_functions(fn) -> list[str]:
    """Python functions entered while running fn() (sys.setprofile), fn itself left out."""
    entered: list[str] = []

    def prof(frame, event, arg):
        if event == "call":
            entered.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}")

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return entered[1:]


@pytest.mark.parametrize("m", [0, 1])
def test_a_decode_call_enters_no_python_function(ext, m):
    """The fixed cost guard: an eager CPU call at M = 0 or 1 (x [1, m, K] as a model passes it)
    runs torch's OpOverload.__call__ and nothing else in Python: no step of ours can creep back
    onto the path without failing here (the Python kernels' path is pinned in test_host_overhead)."""
    wq, ws = reference.quantize(torch.randn(576, 576), (128, 128), E4M3, "fp32")
    x = torch.randn(1, m, 576, dtype=torch.bfloat16)
    bias = torch.randn(576, dtype=torch.bfloat16)
    for activation in ("none", "dynamic"):
        args = (x, wq, ws, [128, 128], None, bias, None, activation)
        with torch.no_grad():
            OP(*args)
            assert _python_functions(lambda a=args: OP(*a)) == ["_ops.py:__call__"]
        with torch.inference_mode():
            assert _python_functions(lambda a=args: OP(*a)) == ["_ops.py:__call__"]


@pytest.mark.parametrize("env", ["FP8_CPU_KERNELS", "FP8_CPU_OPS_CPP"])
def test_without_the_extension_the_op_keeps_its_python_kernels(tmp_path, env):
    """FP8_CPU_KERNELS=0 (no C kernels) or FP8_CPU_OPS_CPP=0 (the C kernels alone), the state of a
    machine without a compiler or ninja: nothing C++ builds, the op's kernels are the Python ones
    (their first step, ops.py's Autograd kernel, runs), results match the reference."""
    code = (
        "import sys, torch, torch_fp8_blockwise as tfb\n"
        "from torch_fp8_blockwise.backends import cpu_native\n"
        "from torch_fp8_blockwise import reference\n"
        "wq, ws = reference.quantize(torch.randn(256, 256), (128, 128), torch.float8_e4m3fn, 'fp32')\n"
        "x = torch.randn(3, 256)\n"
        "y = tfb.blockwise_matmul(x, wq, ws, activation='none')\n"
        "r = reference.blockwise_matmul(x, wq, ws, (128, 128), None, None, torch.float32, 'none')\n"
        "torch.testing.assert_close(y, r, rtol=1e-4, atol=1e-3)\n"
        "seen = []\n"
        "sys.setprofile(lambda f, e, a: seen.append(f.f_code.co_name) if e == 'call' else None)\n"
        "tfb.blockwise_matmul(x, wq, ws, activation='none')\n"
        "sys.setprofile(None)\n"
        "assert 'kernel' in seen and '_blockwise_matmul_impl' in seen, seen\n"
        "assert not cpu_native.installed()\n"
        "print(cpu_native.status())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env_vars = {**os.environ, "PYTHONPATH": root, env: "0", "FP8_CPU_KERNEL_CACHE": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env_vars, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Python kernels: disabled by {env}=0" in proc.stdout
    assert not any(p.name.startswith("fp8_ops_cpu") for p in tmp_path.rglob("*"))


def _run_ok(code: str) -> None:
    """Run ``code`` in a fresh Python process (this checkout first on its path); it must exit 0."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root},
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_second_process_loads_the_built_extension_without_building(ext):
    """The cache: a process that finds the verified file imports it; it never calls the build."""
    code = (
        "import torch, torch.utils.cpp_extension as cpp_extension, torch_fp8_blockwise as tfb\n"
        "from torch_fp8_blockwise.backends import cpu_native\n"
        "def no_build(*a, **k):\n"
        "    raise AssertionError('built again')\n"
        "cpp_extension.load = no_build\n"
        "assert cpu_native.install(), cpu_native.status()\n"
    )
    _run_ok(code)


def test_status_names_the_built_file(ext):
    assert cpu_native.status().startswith("C++ kernel: ")
    assert os.path.exists(cpu_native.status().split(": ", 1)[1])


def test_a_library_swapped_out_at_the_first_call_defers_the_install(ext):
    """A test that replaces cpu_kernels._lib (None: the torch path; a spy) before any CPU call of the
    process: nothing installs then (no C++ kernel bound to a stand-in), the first call with the
    real library installs it."""
    code = (
        "import torch, torch_fp8_blockwise as tfb\n"
        "from torch_fp8_blockwise.backends import cpu_kernels, cpu_native\n"
        "real = cpu_kernels.library()\n"
        "w, ws = tfb.quantize(torch.randn(256, 256), (128, 128))\n"
        "cpu_kernels._lib = None\n"
        "tfb.blockwise_matmul(torch.randn(2, 256), w, ws)\n"
        "assert not cpu_native.installed()\n"
        "cpu_kernels._lib = real\n"
        "tfb.blockwise_matmul(torch.randn(2, 256), w, ws)\n"
        "assert cpu_native.installed(), cpu_native.status()\n"
    )
    _run_ok(code)
