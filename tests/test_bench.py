"""``fp8-blockwise bench`` / scripts/bench.py: runs, times against same-run baselines, writes JSON, PNG
and a profiler trace. Tiny shapes: this checks the harness, not the speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from torch_fp8_blockwise import bench, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_small_preset_writes_table_json_plot_and_trace(tmp_path, capsys):
    out_json, out_png, trace = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "trace"
    argv = [
        "bench",
        "--preset",
        "small",
        "--shapes",
        "192x576,130x256",
        "--m",
        "1,3",
        "--repeats",
        "2",
        "--json",
        str(out_json),
        "--plot",
        str(out_png),
        "--profile",
        str(trace),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "speed vs bf16" in table and "cpu/w8a8" in table

    payload = json.loads(out_json.read_text())
    assert payload["schema"] == "torch_fp8_blockwise.bench/1"
    assert payload["preset"] == "small" and payload["block"] == [128, 128]
    assert {"device", "torch", "cpu_threads"} <= set(payload["environment"])
    results = payload["results"]
    ops = {"bf16", "fp32", "cpu/w8a8", "cpu/w8a8-fp8x", "cpu/w8a16"}
    points = {(m, n, k) for m in (1, 3) for n, k in ((192, 576), (130, 256))}
    assert {(r["op"], r["m"], r["n"], r["k"]) for r in results} == {(op, *p) for op in ops for p in points}
    for r in results:
        assert set(r) == {"op", "m", "n", "k", "ms", "tflops", "speed_vs_bf16", "error"}
        assert r["error"] is None and r["ms"] > 0 and math.isfinite(r["ms"])
        bf16 = next(
            b for b in results if b["op"] == "bf16" and (b["m"], b["n"], b["k"]) == (r["m"], r["n"], r["k"])
        )
        assert r["speed_vs_bf16"] == pytest.approx(bf16["ms"] / r["ms"])
        assert r["tflops"] == pytest.approx(2 * r["m"] * r["n"] * r["k"] / (r["ms"] * 1e-3) / 1e12)

    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = json.loads((trace / "trace.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"bf16", "cpu/w8a8", "cpu/w8a16"} <= names  # one record_function range per op


def test_presets_hold_the_model_shapes():
    shapes, ms = bench.PRESETS["model-shapes"]
    assert (7168, 18432) in shapes and (57344, 8192) in shapes and (576, 576) in shapes
    assert len(shapes) == 5 + 4 + 4 and ms == [1, 16, 128]
    assert set(bench.PRESETS) == {"small", "medium", "large", "model-shapes"}


def test_interpreters_join_only_on_request():
    import torch

    cpu = torch.device("cpu")
    assert list(bench.backends_for(cpu, None, interpreters=False)) == ["cpu"]
    assert list(bench.backends_for(cpu, None, interpreters=True)) == ["cpu", "triton", "pallas"]
    with pytest.raises(ValueError, match="--backends: unknown"):
        bench.backends_for(cpu, ["cuBLAS"], interpreters=False)


@pytest.mark.parametrize(
    "argv",
    [
        ["--shapes", "576"],
        ["--shapes", "0x576"],
        ["--m", "1,x"],
        ["--m", "0"],
        ["--modes", "w4a4"],
        ["--preset", "huge"],
    ],
)
def test_bad_bench_flags_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["bench", *argv])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_script_is_the_same_command(tmp_path):
    out_json = tmp_path / "r.json"
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "bench.py"),
            "--shapes",
            "128x128",
            "--m",
            "2",
            "--modes",
            "w8a16",
            "--repeats",
            "1",
            "--json",
            str(out_json),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ops = [r["op"] for r in json.loads(out_json.read_text())["results"]]
    assert ops == ["bf16", "fp32", "cpu/w8a16"]
