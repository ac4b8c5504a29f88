"""`pip install .` ships every module and every tuned table (package data), and the CLI entry point."""

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
            if f.endswith((".py", ".json")):
                expected.add(os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/"))
    assert expected - names == set()
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "fp8-blockwise = torch_fp8_blockwise.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    )
