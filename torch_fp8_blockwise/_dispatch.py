"""Which backend runs an op: by the tensors' device, or forced with :func:`use_backend`.

    device type   backend     module
    -----------   ---------   ----------------------------------------
    cpu           cpu         torch_fp8_blockwise.backends.cpu
    cuda          triton      torch_fp8_blockwise.backends.triton (blockwise_matmul routed, see _route)
    xla           pallas      torch_fp8_blockwise.backends.pallas
    (forced)      reference   torch_fp8_blockwise.reference
    (forced)      cublas      torch_fp8_blockwise.backends.cublas (blockwise_matmul W8A8 only)

A backend module implements any of the op functions with the canonical signatures documented in
:mod:`torch_fp8_blockwise.reference` (validated arguments, batch dims flattened, no empty sizes).
An op a backend does not implement runs the reference on the same device, and
:func:`backend_table` shows which.

A backend module may define ``unavailable_reason(device) -> str | None`` for run-time conditions
(e.g. Triton on CPU tensors needs ``TRITON_INTERPRET=1``); an ImportError while importing it is
recorded and reported as the reason, never swallowed.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch

BACKEND_MODULES: dict[str, str] = {
    "reference": "torch_fp8_blockwise.reference",
    "cpu": "torch_fp8_blockwise.backends.cpu",
    "triton": "torch_fp8_blockwise.backends.triton",
    "pallas": "torch_fp8_blockwise.backends.pallas",
    "cublas": "torch_fp8_blockwise.backends.cublas",
}

DEVICE_BACKENDS: dict[str, str] = {"cpu": "cpu", "cuda": "triton", "xla": "pallas"}

OPS: tuple[str, ...] = (
    "quantize",
    "dequantize",
    "blockwise_matmul",
    "mxfp8_quantize",
    "mxfp8_matmul",
    "grouped_matmul",
    "grouped_matmul_transposed",
)

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fp8_backend", default=None)
_modules: dict[str, ModuleType] = {}
#: implementation() answers that succeeded, per (op, device, forced backend): availability of a
#: backend on a device does not change within a process, and this keeps the hot path one lookup.
_impl_cache: dict[tuple[str, torch.device, str | None], tuple[str, Callable[..., Any]]] = {}
_import_errors: dict[str, str] = {}
#: use_backend contexts open in this process (every thread), and the functions told of each change
#: (+1 / -1): the C++ CPU kernel (backends/cpu_native.py) cannot read the context variable, so it
#: leaves every call to the Python path while any context is open.
_open_contexts = 0
_force_listeners: list[Callable[[int], object]] = []
_count_lock = threading.Lock()


def add_force_listener(fn: Callable[[int], object]) -> None:
    """Call ``fn(+1)`` / ``fn(-1)`` as use_backend contexts open and close (first ``fn(n)`` for the
    n open now)."""
    with _count_lock:
        if _open_contexts:
            fn(_open_contexts)
        _force_listeners.append(fn)


def _count_contexts(delta: int) -> None:
    global _open_contexts
    with _count_lock:
        _open_contexts += delta
        for fn in _force_listeners:
            fn(delta)


class BackendUnavailable(RuntimeError):
    """A backend was asked to run but cannot (missing package, wrong device, ...)."""


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every fp8 op in this context to run on backend ``name``.

    ``name`` is one of "reference", "cpu", "triton", "pallas", "cublas". Lets tests run a GPU or
    TPU kernel on CPU tensors: Triton under ``TRITON_INTERPRET=1``, Pallas with ``interpret=True``.
    On CUDA, "triton" and "cublas" bypass the routing rule (``_route``): "triton" runs the Triton
    kernel for every call, "cublas" runs cuBLAS block-scaled and raises for a call it cannot
    compute correctly (e.g. K % 128 != 0).
    """
    if name not in BACKEND_MODULES:
        raise ValueError(f"use_backend: expected one of {tuple(BACKEND_MODULES)}, got {name!r}")
    token = _forced.set(name)
    _count_contexts(1)
    try:
        yield
    finally:
        _count_contexts(-1)
        _forced.reset(token)


def forced_backend() -> str | None:
    return _forced.get()


def _module(name: str) -> ModuleType:
    if name in _modules:
        return _modules[name]
    if name in _import_errors:
        raise BackendUnavailable(f"backend {name!r} is unavailable: {_import_errors[name]}")
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
    except ImportError as e:  # record the reason; report it on every use
        _import_errors[name] = f"import of {BACKEND_MODULES[name]} failed: {e}"
        raise BackendUnavailable(f"backend {name!r} is unavailable: {_import_errors[name]}") from e
    _modules[name] = module
    return module


def unavailable_reason(name: str, device: torch.device | str = "cpu") -> str | None:
    """None if backend ``name`` can run ops on tensors of ``device``, else why not."""
    try:
        module = _module(name)
    except BackendUnavailable as e:
        return str(e)
    check = getattr(module, "unavailable_reason", None)
    return check(torch.device(device)) if check is not None else None


def select(device: torch.device) -> str:
    """Backend name for tensors on ``device`` (the forced one inside :func:`use_backend`)."""
    forced = _forced.get()
    if forced is not None:
        return forced
    try:
        return DEVICE_BACKENDS[device.type]
    except KeyError:
        raise BackendUnavailable(
            f"no fp8 backend for device type {device.type!r}; supported: {tuple(DEVICE_BACKENDS)}, "
            "or force one with torch_fp8_blockwise.use_backend(...)"
        ) from None


def implementation(op: str, device: torch.device) -> tuple[str, Callable[..., Any]]:
    """(backend name, function) that runs ``op`` for tensors on ``device``."""
    key = (op, device, _forced.get())
    hit = _impl_cache.get(key)
    if hit is not None:
        return hit
    name = select(device)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailable(f"fp8::{op} on {device}: backend {name!r} cannot run: {reason}")
    fn = getattr(_module(name), op, None)
    hit = (name, fn) if fn is not None else ("reference", getattr(_module("reference"), op))
    _impl_cache[key] = hit
    return hit


def clear_cache() -> None:
    """Forget cached implementation() answers (tests that change DEVICE_BACKENDS)."""
    _impl_cache.clear()


def backend_table(device: torch.device | str = "cpu") -> dict[str, dict[str, str]]:
    """For each backend: status on ``device`` and which backend runs each op (for docs and demos)."""
    table: dict[str, dict[str, str]] = {}
    for name in BACKEND_MODULES:
        reason = unavailable_reason(name, device)
        row = {"status": "available" if reason is None else f"unavailable: {reason}"}
        if reason is None:
            for op in OPS:
                row[op] = name if hasattr(_module(name), op) else "reference (fallback)"
        table[name] = row
    return table
