"""Shared by the CPU kernel tests: the compiled library (or a failure where it should exist) and a
spy that records every C call."""

from __future__ import annotations

import contextlib
import os

import pytest

from torch_fp8_blockwise.backends import cpu, cpu_kernels, cpu_native


def compiled_or_fail():
    """The loaded C library. A machine with a C compiler must build it (a failure fails, it does not
    skip); without a compiler, or with FP8_CPU_KERNELS=0, the test is skipped."""
    lib = cpu_kernels.library()
    if lib is None and cpu_kernels.compiler() is not None and os.environ.get("FP8_CPU_KERNELS") != "0":
        pytest.fail(f"a C compiler exists but the kernels did not build: {cpu.kernel_status()}")
    if lib is None:
        pytest.skip(f"compiled kernels unavailable here: {cpu.kernel_status()}")
    return lib


#: The C library's ISA codes (fp8_set_isa) and why a CPU may lack one. "amx": ISA 2 with its 2+ row
#: groups on AMX tiles (fp8_set_amx(1)); "avx512bf16": ISA 2 with the tiles off.
ISA = {"scalar": 0, "avx2": 1, "avx512bf16": 2, "amx": 2}
_MISSING = {
    "avx2": "this CPU has no AVX2 + FMA + F16C",
    "avx512bf16": "this CPU (or the compiler, gcc < 10 / clang < 9) has no AVX512-F/BW/VL/DQ + AVX512_BF16: "
    "the vdpbf16ps kernels cannot run here",
    "amx": "this CPU (or the OS, or the compiler: gcc < 11 / clang < 12) has no AMX-BF16 tiles: the "
    "tdpbf16ps kernel cannot run here",
}


def use_isa(lib, name: str) -> tuple[int, int]:
    """Switch the library to ISA ``name`` ("scalar", "avx2": AVX2 without the bf16 GEMM,
    "avx512bf16": with it, AMX tiles off, "amx": with them on); returns what restore_isa needs
    afterwards. Skips where the CPU lacks it."""
    before = (lib.fp8_get_isa(), lib.fp8_get_amx())
    amx = name == "amx"
    if lib.fp8_set_isa(ISA[name]) != ISA[name] or lib.fp8_set_amx(amx) != amx:
        restore_isa(lib, before)
        pytest.skip(_MISSING[name])
    return before


def restore_isa(lib, before: tuple[int, int]) -> None:
    """Undo use_isa."""
    lib.fp8_set_isa(before[0])
    lib.fp8_set_amx(before[1])


@contextlib.contextmanager
def on_isa(name: str):
    """The compiled library (compiled_or_fail) switched to ISA ``name`` for the block (skips where
    the CPU lacks it, as use_isa), the ISA before it restored afterwards."""
    lib = compiled_or_fail()
    before = use_isa(lib, name)
    try:
        yield lib
    finally:
        restore_isa(lib, before)


class CallSpy:
    """Stands in for the ctypes library: records (function name, nthreads = last argument) of every
    kernel call (not the ISA queries ``fp8_get_isa`` / ``fp8_set_isa`` / ``fp8_bf16_pays``); ``names`` lists the names alone."""

    def __init__(self, lib) -> None:
        self.lib, self.calls = lib, []

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def __getattr__(self, name):
        fn = getattr(self.lib, name)
        if name in ("fp8_get_isa", "fp8_set_isa", "fp8_bf16_pays"):
            return fn

        def call(*args):
            self.calls.append((name, args[-1]))
            return fn(*args)

        return call


class _CppFastPath:
    """cpu_native's on / off switch as an attribute, so that ``monkeypatch`` can set and undo it."""

    @property
    def enabled(self) -> bool:
        return cpu_native.enabled()

    @enabled.setter
    def enabled(self, on: bool) -> None:
        cpu_native.set_enabled(on)


CPP_FAST_PATH = _CppFastPath()


def python_kernels_only(monkeypatch) -> None:
    """Until the test's teardown, every CPU blockwise_matmul call runs the op's Python kernels and
    the Python backend (cpu.py): the C++ fast path (backends/cpu_native.py) is installed, then off.
    For tests of the Python path itself: its C calls (a spy in ``cpu_kernels._lib``), the torch path
    (``_lib`` None), its Python steps."""
    cpu_native.install()
    monkeypatch.setattr(CPP_FAST_PATH, "enabled", False)
