#!/usr/bin/env python
"""Offline proof that every shipped kernel configuration compiles for its real target.

    python scripts/check_lowering.py --target tpu    # Pallas -> Mosaic (jax.export, platforms=("tpu",))
    python scripts/check_lowering.py --target cuda   # Triton -> PTX/cubin for sm_90, sm_100, sm_120

Prints one row per configuration and exits non-zero if any shipped configuration fails.
No TPU or GPU is needed. The checks live beside their kernels:
``torch_fp8_blockwise/backends/{pallas,triton}/lowering.py``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TARGETS = {
    "tpu": "torch_fp8_blockwise.backends.pallas.lowering",
    "cuda": "torch_fp8_blockwise.backends.triton.lowering",
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", choices=sorted(TARGETS), required=True)
    args, rest = parser.parse_known_args()
    if args.target == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter replaces @triton.jit functions, so nothing could be compiled.
        print("check_lowering: unset TRITON_INTERPRET to compile Triton kernels", file=sys.stderr)
        return 2
    if args.target == "tpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    module = importlib.import_module(TARGETS[args.target])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
