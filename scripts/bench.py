"""Benchmark blockwise_matmul on every available backend against bf16 / fp32 matmul (same run).

Same code and flags as ``fp8-blockwise bench`` (torch_fp8_blockwise/bench.py), e.g.

    python scripts/bench.py --preset model-shapes --json out.json --plot out.png
    python scripts/bench.py --device cuda --preset large --profile trace/
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_fp8_blockwise.cli import main  # noqa: E402  (sets the interpreter flags before torch)

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
