"""The GPU scripts run their CPU modes: argument parsing, --dry-run plans, heuristic table writing.

(No GPU here: the timing paths of scripts/bench_triton.py and scripts/tune_triton.py are not run.)
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


def test_bench_dry_run_prints_configs_for_sm120():
    proc = _run("scripts/bench_triton.py", "--dry-run", "--arch", "120", "--cases", "small", "large")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("w8a8", "mxfp8"))]
    assert len(lines) == 12 and all("GemmConfig(" in line for line in lines)


def test_bench_without_gpu_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would benchmark instead of refusing")
    proc = _run("scripts/bench_triton.py", "--cases", "small")
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


def test_bench_rejects_bad_arguments():
    proc = _run("scripts/bench_triton.py", "--cases", "huge")
    assert proc.returncode == 2 and "invalid choice: 'huge'" in proc.stderr


def test_tune_from_heuristic_writes_a_loadable_table(tmp_path):
    out = tmp_path / "table.json"
    proc = _run(
        "scripts/tune_triton.py", "--from-heuristic", "--arch", "120", "--kernels", "w8a8",
        "--shapes", "7168x2048", "--m", "1", "4096", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = json.loads(out.read_text())
    assert "heuristic-derived" in table["note"]
    assert [(e["arch"], e["m_bucket"]) for e in table["entries"]] == [(120, 16), (120, 4096)]

    from torch_fp8_blockwise.backends.triton.configs import GemmConfig, fits

    for e in table["entries"]:
        assert fits(GemmConfig(**e["config"]), "w8a8", 120)


def test_tune_rejects_bad_shape():
    proc = _run("scripts/tune_triton.py", "--dry-run", "--shapes", "7168by2048")
    assert proc.returncode == 2 and "--shapes: expected NxK" in proc.stderr
