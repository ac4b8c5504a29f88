"""Test setup: CPU-only environment variables, backend discovery, shared fixtures.

Backends run on CPU tensors here: Triton under TRITON_INTERPRET=1, Pallas with interpret=True
(and on torch_xla's CPU device, PJRT_DEVICE=CPU). A backend whose package is missing in this
environment is skipped with the reason naming the component.
"""

import os

# Must be set before triton / torch_xla / jax are imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from torch_fp8_blockwise import _dispatch  # noqa: E402

ALL_BACKENDS = tuple(_dispatch.BACKEND_MODULES)


def backend_params(*names: str, op: str | None = None) -> list:
    """pytest params for backends, skipped (with the reason) where unavailable here.

    With ``op``, a backend that falls back to the reference for that op is skipped too, so a test
    never presents the reference as a kernel's pass.
    """
    params = []
    for name in names or ALL_BACKENDS:
        reason = _dispatch.unavailable_reason(name, "cpu")
        if reason is None and op is not None and not hasattr(_dispatch._module(name), op):
            reason = f"backend {name!r} has no {op} kernel (it would fall back to the reference)"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
