"""The C++ registration of ``fp8::blockwise_matmul``'s CPU kernel (``cpu_kernels/fp8_ops_cpu.cpp``).

Why: the ops' kernels are Python functions registered with ``torch.library``; the dispatcher boxes
each call's 8 arguments into the interpreter (4 of the 6.5 us an M = 0 call cost, 8.2-9.1x a
``torch.mm`` of the same). 210 such calls run per SmolLM2 token. The C++ kernel takes the calls
the fused C GEMM serves (M up to :func:`cpu.uses_fused_gemm`'s bound, every argument valid, no
gradient, no ``use_backend``) from the dispatcher straight to ``fp8_gemm``, the function of the
library that the Python path calls through ctypes: the same bits. Every other call (errors
included) goes to the Python path unchanged; the .cpp file lists them.

Built on the first CPU ``blockwise_matmul`` call of a process (:func:`install`, from
``cpu.blockwise_matmul``) with ``torch.utils.cpp_extension`` (ninja and a C++ compiler; ~16 s
on 2 cores, once per machine and torch version) into the C kernels' cache directory, a file named by
the hash of the source, torch's version, the Python ABI and the compiler; later processes load the
verified file (size + sha256 record, as ``cpu_kernels`` does) without building. Without a
compiler or ninja, when the build fails, with ``FP8_CPU_KERNELS=0`` (no C kernels at all) or
``FP8_CPU_OPS_CPP=0`` (the C kernels without this registration: no build), the op keeps its Python
kernels (:func:`status` says why; a failed build warns once).

The C++ kernel reads nothing of Python per call: a test that swaps ``cpu_kernels._lib`` or maps
the cpu device to another backend (``_dispatch.DEVICE_BACKENDS``) turns it off first
(:func:`set_enabled`; ``tests/cpu_kernel_helpers.python_kernels_only``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from . import cpu_kernels

SOURCE = Path(cpu_kernels.__file__).with_name("fp8_ops_cpu.cpp")
CFLAGS: tuple[str, ...] = ("-O2",)

_lock = threading.Lock()
_ext: ModuleType | None = None
_tried = False
_status = "not installed yet (installs on the first CPU blockwise_matmul call)"


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX") or "c++")


def _ninja() -> str | None:
    """ninja on PATH, else the one installed beside this Python (a venv's bin, not always on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), "ninja")
    return shutil.which("ninja") or (beside if os.access(beside, os.X_OK) else None)


def _name(cxx: str) -> str:
    """The extension's module name: the hash of everything the built file depends on."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (torch.__version__, torch.version.git_version, sys.implementation.cache_tag,
                 sysconfig.get_config_var("EXT_SUFFIX") or "", cxx, *CFLAGS):  # fmt: skip
        digest.update(b"\0" + str(part).encode())
    return f"fp8_ops_cpu_{digest.hexdigest()[:16]}"


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_or_build(cxx: str) -> ModuleType:
    """The extension module: loaded from the cache when its record verifies it, else built there."""
    name = _name(cxx)
    build_dir = cpu_kernels.cache_dir() / name
    library = build_dir / f"{name}.so"
    if cpu_kernels._verified(library):
        return _import(name, library)
    from torch.utils import cpp_extension  # only to build: its import costs ~0.3 s

    build_dir.mkdir(parents=True, exist_ok=True)
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:  # the venv's ninja, not on PATH (python run by its full path)
        os.environ["PATH"] = os.path.dirname(_ninja()) + os.pathsep + path
    try:
        module = cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=list(CFLAGS),
            build_directory=str(build_dir),
            verbose=False,
        )
    finally:
        os.environ["PATH"] = path
    fingerprint = cpu_kernels._fingerprint(library)
    cpu_kernels._replace_atomically(
        cpu_kernels.record_path(library), lambda tmp: Path(tmp).write_text(fingerprint)
    )
    return module


def _why_not(lib) -> str | None:
    """Why the C++ kernel cannot be built here (None: it can)."""
    if os.environ.get("FP8_CPU_KERNELS", "1") == "0":
        return "disabled by FP8_CPU_KERNELS=0"
    if os.environ.get("FP8_CPU_OPS_CPP", "1") == "0":
        return "disabled by FP8_CPU_OPS_CPP=0"
    if lib is None:
        return f"the C kernels are not loaded ({cpu_kernels.status()})"
    if _cxx() is None:
        return "no C++ compiler found (set $CXX or install g++)"
    if _ninja() is None:
        return "ninja not found (pip install ninja)"
    return None


def install() -> bool:
    """Build or load the extension and register its kernels, once per process; True when they run."""
    global _ext, _tried, _status
    with _lock:
        if _tried:
            return _ext is not None
        lib = cpu_kernels.library()
        if not isinstance(lib, ctypes.CDLL) and cpu_kernels.status().startswith("compiled"):
            return False  # the loaded library is swapped out for now (a test's spy or None): not yet
        _tried = True
        reason = _why_not(lib)
        if reason is not None:
            _status = f"Python kernels: {reason}"
            return False
        try:
            ext = _load_or_build(_cxx())
        except Exception as e:  # any build or load failure: keep the Python path, say why
            _status = f"Python kernels: build or load of {SOURCE.name} failed: {type(e).__name__}: {e}"[:3000]
            warnings.warn(f"torch_fp8_blockwise: {_status}", stacklevel=3)
            return False
        from .. import _dispatch, ops
        from . import cpu

        op = torch.ops.fp8.blockwise_matmul.default
        ext.install(
            ctypes.cast(lib.fp8_gemm, ctypes.c_void_p).value,
            ops._blockwise_matmul_impl,
            functools.partial(ops._InferenceOnly.apply, "blockwise_matmul", op),
            cpu.SMALL_M, cpu.SMALL_WEIGHT_MAX_M, cpu.SMALL_WEIGHT,
        )  # fmt: skip
        _dispatch.add_force_listener(ext.forced)
        _ext = ext
        _status = f"C++ kernel: {ext.__file__}"
        return True


def installed() -> bool:
    """Whether the C++ kernels are registered in this process."""
    return _ext is not None


def set_enabled(on: bool) -> bool:
    """Register (True) or deregister (False) the C++ kernels: off, every call runs the op's Python
    kernels exactly as in a process without the extension. Returns the previous state. For tests
    and A/B benchmarks, not while another thread runs the op; a no-op before :func:`install`."""
    return bool(_ext.set_enabled(on)) if _ext is not None else False


def enabled() -> bool:
    """Whether the C++ kernels are installed and registered."""
    return _ext is not None and bool(_ext.is_enabled())


def status() -> str:
    """Which kernels serve CPU blockwise_matmul calls: "C++ kernel: <path>" or why Python's."""
    return _status
