"""Bad input to the grouped ops: TypeError/ValueError naming the argument, the expectation and what
came; the same checks run in the fake implementations (torch.compile reports them at trace time)."""

from __future__ import annotations

import pytest
import torch

import torch_fp8_blockwise  # noqa: F401  (registers the ops)
from torch_fp8_blockwise import reference
from torch_fp8_blockwise.ops import grouped_matmul, grouped_matmul_transposed

E4M3 = torch.float8_e4m3fn
G, N, K, M = 3, 256, 384, 10
W, WS = reference.quantize(torch.randn(G, N, K), (128, 128), E4M3, "fp32")
X = torch.randn(M, K, dtype=torch.bfloat16)
XQ, XS = reference.quantize_activation(X.float(), 128)
GS = torch.tensor([4, 0, 5], dtype=torch.int32)
DY = torch.randn(M, 64)


def gmm(**over):
    args = {"x": X, "w": W, "w_scale": WS, "group_sizes": GS}
    args.update(over)
    return lambda: grouped_matmul(**args)


def tgmm(**over):
    args = {"x": X, "dy": DY, "group_sizes": GS}
    args.update(over)
    return lambda: grouped_matmul_transposed(**args)


CASES = [
    ("x-not-tensor", gmm(x=[1.0]), TypeError, r"x: expected a torch.Tensor, got list"),
    ("x-3d", gmm(x=X[None]), ValueError, r"x: expected 2 dims \[M, K\].*got shape \(1, 10, 384\)"),
    ("x-int", gmm(x=torch.ones(M, K, dtype=torch.int32)), TypeError, r"x: expected dtype in .*torch.int32"),
    ("k-mismatch", gmm(x=torch.randn(M, K + 1)), ValueError, r"x: expected last dim K=384"),
    ("w-2d", gmm(w=W[0]), ValueError, r"w: expected 3 dims \[G, N, K\].*got shape \(256, 384\)"),
    ("w-bf16", gmm(w=W.float().bfloat16()), TypeError, r"w: expected dtype in .*got torch.bfloat16"),
    ("w-transposed", gmm(w=W.transpose(1, 2)), ValueError, r"w: expected a contiguous row-major \[G, N, K\]"),
    ("w_scale-shape", gmm(w_scale=WS[:, :1]), ValueError, r"w_scale: expected shape \(3, 2, 3\)"),
    ("w_scale-dtype", gmm(w_scale=WS.double()), TypeError, r"w_scale: expected dtype in \(torch.float32\)"),
    ("gs-not-tensor", gmm(group_sizes=[4, 0, 5]), TypeError, r"group_sizes: expected a torch.Tensor, got list"),
    ("gs-int64", gmm(group_sizes=GS.long()), TypeError, r"group_sizes: expected dtype in \(torch.int32\)"),
    ("gs-len", gmm(group_sizes=GS[:2]), ValueError, r"group_sizes: expected shape \(3,\).*got \(2,\)"),
    ("gs-negative", gmm(group_sizes=torch.tensor([4, -1, 5], dtype=torch.int32)), ValueError,
     r"group_sizes: expected sizes >= 0, got \[4, -1, 5\]"),
    ("gs-sum-above-m", gmm(group_sizes=torch.tensor([4, 3, 5], dtype=torch.int32)), ValueError,
     r"group_sizes: expected sum\(group_sizes\) <= M=10.*got sum 12"),
    ("block", gmm(block_shape=[128, 64]), ValueError, r"block_shape: block rows must be one of"),
    ("activation", gmm(activation="static"), ValueError, r"activation: expected one of \('dynamic', 'none'\)"),
    ("fp8-x-no-scale", gmm(x=XQ), ValueError, r"x_scale: required when x is fp8"),
    ("fp8-x-w8a16", gmm(x=XQ, x_scale=XS, activation="none"), ValueError, r"activation: 'none' keeps x"),
    ("x_scale-shape", gmm(x=XQ, x_scale=XS[:, :2]), ValueError, r"x_scale: expected shape \(10, 3\)"),
    ("x_scale-for-bf16", gmm(x_scale=XS), ValueError, r"x_scale: only for fp8 x"),
    ("out_dtype", gmm(out_dtype=torch.int8), TypeError, r"out_dtype: expected one of .*got torch.int8"),
    ("tg-x-fp8", tgmm(x=XQ), TypeError, r"x: expected dtype in .*got torch.float8_e4m3fn"),
    ("tg-dy-1d", tgmm(dy=DY[:, 0]), ValueError, r"dy: expected 2 dims \[M, N\], got shape \(10,\)"),
    ("tg-rows", tgmm(dy=DY[:9]), ValueError, r"dy: expected 10 rows"),
    ("tg-block_m", tgmm(block_m=64), ValueError, r"block_m: expected one of \(128, 256, 512\), got 64"),
    ("tg-block_m-float", tgmm(block_m=128.0), TypeError, r"block_m: expected an int, got 128.0"),
    ("tg-gs-2d", tgmm(group_sizes=GS[None]), ValueError, r"group_sizes: expected 1 dim \(G,\)"),
    ("tg-gs-dtype", tgmm(group_sizes=GS.float()), TypeError, r"group_sizes: expected dtype in \(torch.int32\)"),
    ("tg-sum-above-m", tgmm(group_sizes=torch.tensor([9, 9], dtype=torch.int32)), ValueError,
     r"sum\(group_sizes\) <= M=10"),
    ("tg-out_dtype", tgmm(out_dtype=torch.float8_e4m3fn), TypeError, r"out_dtype: expected one of"),
]  # fmt: skip


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_devices_must_match():
    meta_gs = GS.to("meta")
    with pytest.raises(ValueError, match=r"group_sizes: expected a tensor on cpu .*got one on meta"):
        torch.ops.fp8.grouped_matmul(X, W, WS, meta_gs)


def test_fake_runs_the_same_checks_at_trace_time():
    def fn(x):
        return grouped_matmul(x, W, WS[:, :1], GS)

    with pytest.raises(Exception, match=r"w_scale: expected shape \(3, 2, 3\)"):
        torch.compile(fn, backend="aot_eager", fullgraph=True)(X)
