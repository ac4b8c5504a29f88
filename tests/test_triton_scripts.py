"""The GPU scripts run their CPU modes: argument parsing, --dry-run plans, heuristic table writing,
and bench_triton.py end to end under the Triton interpreter (--interpret).

(No GPU here: the CUDA-graph timings of scripts/bench_triton.py and scripts/tune_triton.py are not run.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed in this environment")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bench_dry_run_prints_the_rule_and_configs_for_sm120():
    proc = _run(
        "scripts/bench_triton.py",
        "--dry-run",
        "--arch",
        "120",
        "--shapes",
        "7168x2048",
        "2112x7168",
        "--m",
        "1",
        "4096",
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("w8a8", "mxfp8"))]
    assert len(lines) == 8 and all("GemmConfig(" in line for line in lines)
    assert "CUDA blockwise_matmul routing" in proc.stdout


def test_bench_without_gpu_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would benchmark instead of refusing")
    proc = _run("scripts/bench_triton.py", "--m", "1")
    assert proc.returncode == 2 and "--interpret" in proc.stderr


def test_bench_rejects_bad_arguments():
    proc = _run("scripts/bench_triton.py", "--shapes", "7168by2048")
    assert proc.returncode == 2 and "--shapes: expected NxK" in proc.stderr
    proc = _run("scripts/bench_triton.py", "--routes", "fastest")
    assert proc.returncode == 2 and "invalid choice: 'fastest'" in proc.stderr


def test_bench_interpret_runs_end_to_end_with_json_and_plot(tmp_path):
    """The whole GPU benchmark path on CPU (Triton interpreter, tiny shapes): every column,
    baselines that cannot run here reported as such, the JSON rows and the PNG."""
    out, png = tmp_path / "rows.json", tmp_path / "ratios.png"
    proc = _run(
        "scripts/bench_triton.py", "--interpret", "--shapes", "144x384", "--m", "5",
        "--routes", "routed", "triton", "mxfp8", "--host-calls", "2", "--json", str(out), "--plot", str(png),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cuBLAS block-scaled n/a" in proc.stdout
    (row,) = json.loads(out.read_text())
    assert (row["m"], row["n"], row["k"], row["cold_l2"]) == (5, 144, 384, False)
    assert row["us"]["cublas-bs"] is None and row["us"]["bf16"] > 0
    for route in ("routed", "triton", "mxfp8"):
        assert row["us"][route] > 0 and row["ratio"][route] == row["us"]["bf16"] / row["us"][route]
    assert row["host_us"] > 0 and row["host_bf16_us"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_host_prints_the_m0_proxy_against_torch_mm():
    proc = _run("scripts/bench_host.py", "--calls", "20", "--rounds", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fp8.blockwise_matmul M=0 (bf16 x, dynamic)" in proc.stdout
    assert "torch.mm bf16 M=0" in proc.stdout


def test_tune_from_heuristic_writes_a_loadable_table(tmp_path):
    out = tmp_path / "table.json"
    proc = _run(
        "scripts/tune_triton.py", "--from-heuristic", "--arch", "120", "--kernels", "w8a8",
        "--shapes", "7168x2048", "--m", "1", "4096", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = json.loads(out.read_text())
    assert "heuristic-derived" in table["note"]
    assert [(e["arch"], e["m_bucket"]) for e in table["entries"]] == [
        (120, 1),
        (120, 4096),
    ]  # decode buckets 1, 2, 4, ...

    from torch_fp8_blockwise.backends.triton.configs import GemmConfig, fits

    for e in table["entries"]:
        assert fits(GemmConfig(**e["config"]), "w8a8", 120)


def test_tune_rejects_bad_shape():
    proc = _run("scripts/tune_triton.py", "--dry-run", "--shapes", "7168by2048")
    assert proc.returncode == 2 and "--shapes: expected NxK" in proc.stderr
