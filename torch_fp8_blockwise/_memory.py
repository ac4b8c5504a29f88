"""Host memory for large kernel outputs: :func:`empty` (CPU only; no torch_fp8_blockwise imports)."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

#: Outputs of this many bytes or more ask the kernel for transparent huge pages (``empty``);
#: FP8_CPU_HUGEPAGES=0 turns it off.
HUGEPAGE_MIN_BYTES = 4 << 20
_HUGE = 1 << 21
_MADV_HUGEPAGE = 14
_madvise = None


def _libc_madvise():
    """libc's madvise through ctypes, or False where there is none (not Linux / not glibc)."""
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform == "linux" and os.environ.get("FP8_CPU_HUGEPAGES", "1") != "0":
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
            except (OSError, AttributeError):
                return False
            fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            _madvise = fn
    return _madvise


def empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(*shape, dtype=dtype)`` on the CPU for a kernel's output, whose pages the kernel then
    writes first. A large fresh allocation is a new mapping (glibc maps anything over 32 MB, and
    smaller blocks until a free raises its threshold), and each 4 KB page costs a fault on first
    write: 14.7 ms to fill a fresh [4096, 2048] float32 on one Zen 4 thread, 3.9 ms after
    ``madvise(MADV_HUGEPAGE)`` of its 2 MB-aligned interior (512x fewer faults), the advice this
    gives for outputs of HUGEPAGE_MIN_BYTES or more. Only advice: where transparent huge pages are
    off the kernel ignores it (and any error is ignored); values are not touched."""
    y = torch.empty(*shape, dtype=dtype)
    nbytes = y.numel() * y.element_size()
    if nbytes >= HUGEPAGE_MIN_BYTES and (madvise := _libc_madvise()):
        lo = (y.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
        hi = (y.data_ptr() + nbytes) & ~(_HUGE - 1)
        if hi > lo:
            madvise(lo, hi - lo, _MADV_HUGEPAGE)
    return y
