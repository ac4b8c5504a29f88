"""`pip install .` ships every module, every tuned table and the demo text (package data), the CLI
entry point, and extras that bring what each target needs (libtpu for TPU VMs, the demo's loaders)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_contains_every_module_and_data_file(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "build", "*.egg-info", ".pytest_cache", ".ruff_cache"
        ),
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",  # build isolation on purpose: what `pip install .` does for a user
            "-w",
            str(tmp_path / "w"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "w").glob("torch_fp8_blockwise-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "torch_fp8_blockwise")):
        for f in files:
            if f.endswith((".py", ".json", ".txt", ".c", ".cpp")):
                expected.add(os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/"))
    assert expected - names == set()
    assert {
        "torch_fp8_blockwise/data/demo_text.txt",
        "torch_fp8_blockwise/nn.py",
        "torch_fp8_blockwise/bench.py",
    } <= names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        line.split(":", 1)[1].strip()
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    # A TPU VM needs the runtime: torch_xla's "tpu" extra pins libtpu (without it, torch_xla finds
    # no TPU and the Pallas kernels could only run interpreted).
    assert any(r.startswith("torch_xla[pallas,tpu]==2.9.0") and 'extra == "tpu"' in r for r in requires), (
        requires
    )
    assert any(r.startswith("triton") and 'extra == "gpu"' in r for r in requires), requires
    for dep in ("transformers", "gguf", "accelerate", "safetensors", "tqdm"):
        assert any(r.startswith(dep) and 'extra == "models"' in r for r in requires), (dep, requires)
    for dep in ("safetensors", "tqdm"):  # checkpoint / quantize_model_ import them
        assert any(r.startswith(dep) and "extra ==" not in r for r in requires), (dep, requires)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    eps = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "fp8-blockwise = torch_fp8_blockwise.cli:main" in eps
    # vLLM loads plugins from this group in every process (tests/test_vllm_plugin.py runs it in vLLM).
    assert (
        "[vllm.general_plugins]\nfp8_blockwise = torch_fp8_blockwise.integrations.vllm_plugin:register" in eps
    ), eps
