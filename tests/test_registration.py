"""Op registration: schemas (Python == C++ stubs), opcheck, torch.compile, inference-only autograd."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.library import opcheck

import torch_fp8_blockwise as tfb
from torch_fp8_blockwise.ops import SCHEMAS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPP = os.path.join(ROOT, "csrc_stubs", "fp8_ops.cpp")


def _cpp_schemas() -> dict[str, str]:
    """The m.def("...") strings of csrc_stubs/fp8_ops.cpp (adjacent C++ literals joined)."""
    src = open(CPP).read()
    out = {}
    for body in re.findall(r"m\.def\(\s*((?:\"(?:[^\"\\]|\\.)*\"\s*)+)\)", src):
        text = "".join(
            bytes(s, "utf-8").decode("unicode_escape") for s in re.findall(r"\"((?:[^\"\\]|\\.)*)\"", body)
        )
        out[text.split("(", 1)[0]] = text
    return out


def test_cpp_stub_schemas_equal_python_registrations():
    cpp = _cpp_schemas()
    assert sorted(cpp) == sorted(SCHEMAS)
    for name, text in cpp.items():
        # Compare parsed schemas: the printer normalizes defaults ([128,128] prints as 128).
        registered = getattr(torch.ops.fp8, name).default._schema
        assert str(torch._C.parse_schema(f"fp8::{text}")) == str(registered), name


@pytest.mark.slow
def test_cpp_stubs_build_and_register_the_same_schemas(tmp_path):
    """Build csrc_stubs with torch.utils.cpp_extension in a fresh process (our package not
    imported there, since an op may be defined once) and read back the schemas it registered."""
    script = textwrap.dedent(
        f"""
        import torch
        from torch.utils.cpp_extension import load
        load(name="fp8_ops_stubs", sources=[{CPP!r}], build_directory={str(tmp_path)!r},
             is_python_module=False, verbose=False)
        for name in {sorted(SCHEMAS)!r}:
            print(getattr(torch.ops.fp8, name).default._schema)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    built = sorted(line for line in out.stdout.splitlines() if line.startswith("fp8::"))
    registered = sorted(str(getattr(torch.ops.fp8, n).default._schema) for n in SCHEMAS)
    assert built == registered


def _opcheck_cases():
    w, ws = tfb.quantize(torch.randn(256, 384), (128, 128))
    x = torch.randn(3, 384)
    xq, xs = tfb.quantize(x, (1, 128))
    mw, mws = tfb.mxfp8_quantize(torch.randn(256, 384))
    mxq, mxs = tfb.mxfp8_quantize(x)
    ops = torch.ops.fp8
    return {
        "quantize": (ops.quantize.default, (x, [1, 128], torch.float8_e5m2, "ue8m0")),
        "dequantize": (ops.dequantize.default, (xq, xs, [1, 128], torch.bfloat16)),
        "matmul-dynamic": (
            ops.blockwise_matmul.default,
            (x, w, ws, [128, 128], None, torch.randn(256), None, "dynamic"),
        ),
        "matmul-w8a16": (
            ops.blockwise_matmul.default,
            (x, w, ws, [128, 128], None, None, torch.float32, "none"),
        ),
        "matmul-fp8-x": (ops.blockwise_matmul.default, (xq, w, ws, [128, 128], xs, None, None, "dynamic")),
        "mxfp8_quantize": (ops.mxfp8_quantize.default, (x, torch.float8_e4m3fn)),
        "mxfp8_matmul": (ops.mxfp8_matmul.default, (mxq, mw, mws, mxs, None, None)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    # opcheck's test_schema clones the inputs and compares them after the call; with an fp8 CPU
    # input torch itself fails there ('"mul_cpu_reduced_float" not implemented for
    # Float8_e4m3fn', torch 2.9 and 2.13), before looking at our op. Run it whenever no input is
    # fp8, and the other three checks always.
    has_fp8 = any(isinstance(a, torch.Tensor) and a.dtype in tfb.FP8_DTYPES for a in args)
    utils = ["test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"]
    if not has_fp8:
        utils.insert(0, "test_schema")
    opcheck(op, args, test_utils=utils)


class _Linear(torch.nn.Module):
    def __init__(self, n: int, k: int) -> None:
        super().__init__()
        w, ws = tfb.quantize(torch.randn(n, k), (128, 128))
        self.register_buffer("w", w)
        self.register_buffer("ws", ws)
        self.bias = torch.nn.Parameter(torch.randn(n), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(tfb.blockwise_matmul(x, self.w, self.ws, bias=self.bias))


def _count_graphs(fn, inputs, backend: str) -> tuple[int, int]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)
    for x in inputs:
        torch.testing.assert_close(compiled(x), fn(x), rtol=1e-2, atol=1e-2)
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _model_fn():
    lin = _Linear(256, 384)

    def fn(x: torch.Tensor) -> torch.Tensor:
        y = lin(x)
        q, s = tfb.quantize(y.float(), (1, 128))
        return tfb.dequantize(q, s, (1, 128), torch.bfloat16) * 2

    return fn


def test_compile_fullgraph_dynamic_m_no_breaks_no_recompiles():
    inputs = [torch.randn(m, 384, dtype=torch.bfloat16) for m in (3, 7, 19, 64)]
    graphs, breaks = _count_graphs(_model_fn(), inputs, backend="aot_eager")
    assert (graphs, breaks) == (1, 0)


@pytest.mark.slow
def test_compile_inductor_fullgraph_dynamic_m():
    inputs = [torch.randn(m, 384, dtype=torch.bfloat16) for m in (5, 33)]
    graphs, breaks = _count_graphs(_model_fn(), inputs, backend="inductor")
    assert (graphs, breaks) == (1, 0)


def test_compile_reports_bad_input_at_trace_time():
    w, ws = tfb.quantize(torch.randn(256, 384), (128, 128))

    def fn(x):
        return tfb.blockwise_matmul(x, w, ws[:1])

    with pytest.raises(Exception, match=r"w_scale: expected shape \(2, 3\)"):
        torch.compile(fn, backend="aot_eager", fullgraph=True)(torch.randn(2, 384))


@pytest.mark.parametrize("op", ["quantize", "dequantize", "blockwise_matmul", "mxfp8_matmul"])
def test_backward_is_a_clear_error_not_a_zero_gradient(op):
    x = torch.randn(4, 256, requires_grad=True)
    if op == "quantize":
        out = tfb.quantize(x, (1, 128))[1]
    elif op == "dequantize":
        q, s = tfb.quantize(x.detach(), (1, 128))
        s.requires_grad_()
        out = tfb.dequantize(q, s, (1, 128))
    elif op == "blockwise_matmul":
        w, ws = tfb.quantize(torch.randn(128, 256), (128, 128))
        out = tfb.blockwise_matmul(x, w, ws)
    else:
        w, ws = tfb.mxfp8_quantize(torch.randn(128, 256))
        out = tfb.mxfp8_matmul(x, w, ws)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match=rf"fp8::{op} is inference-only"):
        out.sum().backward()


def test_backend_table_names_every_backend_and_why():
    table = tfb.backend_table("cpu")
    assert set(table) == {"reference", "cpu", "triton", "pallas", "cublas"}
    assert table["cpu"]["blockwise_matmul"] == "cpu"
    assert table["cublas"]["status"] == "unavailable: cuBLAS block-scaled runs on CUDA tensors, not cpu"
    for row in table.values():
        assert row["status"] == "available" or row["status"].startswith("unavailable: ")
