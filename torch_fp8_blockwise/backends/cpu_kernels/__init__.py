"""Build-on-first-use loader of the CPU kernel library ``fp8_cpu.c`` (ctypes, no torch headers).

The first call of :func:`library` in a process compiles ``fp8_cpu.c`` with the system C compiler
(``$CC``, else ``gcc``/``cc``) into a cache directory, loads it with ctypes and keeps the handle;
every later call returns the cached handle (one dict-free global lookup). The file name carries a
hash of the source, the compiler and its flags, so an edit or another compiler builds a new file
and a stale one is never loaded. Compiling takes ~1 s; concurrent processes each compile to a
temporary file and rename it into place (atomic), so none sees a half-written library. After a
successful build a record ``<library>.sha256`` (size and sha256 of the file) is written the same
way, and a library is loaded only when its size and hash match its record: a cached file that was
truncated, zeroed or replaced since (``ctypes.CDLL`` of such a file can die of SIGBUS / SIGSEGV)
is rebuilt instead; if the rebuild fails, the torch path is used with a warning.

Environment:
    FP8_CPU_KERNELS=0         never build or load: the CPU backend uses its pure-torch path.
    FP8_CPU_KERNEL_CACHE=DIR  where the library is built (default
                              ``$XDG_CACHE_HOME/torch_fp8_blockwise/cpu_kernels``, i.e. ~/.cache/...).
    FP8_CPU_ISA=scalar|avx2|avx512bf16
                              force the portable scalar code, the AVX2 code without the
                              AVX512-BF16 GEMM, or that GEMM without AMX tiles (tests, A/B runs);
                              default: AVX2+FMA+F16C when the CPU has them, plus the AVX512-BF16
                              fused GEMM (vdpbf16ps) when it has avx512f/bw/vl/dq and avx512_bf16,
                              whose products of 2+ rows run on AMX-BF16 tiles (tdpbf16ps) when the
                              CPU has amx_tile and amx_bf16 and Linux grants them; else scalar.

Why the library could not be used is recorded once (:func:`status`) and reported in one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("fp8_cpu.c")
#: No -ffast-math: the kernels rely on IEEE nan/inf behaviour and exact division.
CFLAGS: tuple[str, ...] = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fno-strict-aliasing")

#: Codes shared with fp8_cpu.c.
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512bf16"}
#: Return codes of fp8_gemm / fp8_gemm_grouped / fp8_gemm_grouped_x (0 = done; NOT_BF16: only
#: fp8_gemm_grouped_x, whose bf16 kernels are not exact for that activation or not in use).
ERR_NOMEM, EDGE, NOT_BF16 = 1, 2, 3
#: fp8_bf16_kernel's answers: the ISA 2 kernel that takes a product (None: the fp32 kernels).
BF16_KERNELS = {0: None, 1: "gemv", 2: "tiles", 3: "packed", 4: "amx"}

_UNSET = object()
_lib: object = _UNSET
_status = "not loaded yet"


def cache_dir() -> Path:
    explicit = os.environ.get("FP8_CPU_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torch_fp8_blockwise" / "cpu_kernels"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _library_path(cc: str) -> Path:
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update("\0".join((cc, *CFLAGS)).encode())
    return cache_dir() / f"fp8_cpu-{digest.hexdigest()[:16]}.so"


def record_path(library: Path) -> Path:
    """The verification record of a built library: ``<size> <sha256>`` of its bytes."""
    return library.with_name(library.name + ".sha256")


def _fingerprint(path: Path | str) -> str:
    data = Path(path).read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def _verified(library: Path) -> bool:
    """Whether ``library`` exists and its size and sha256 are those its record wrote after the
    build. Anything else (no file, no record, a truncated, zeroed or replaced file, an unreadable
    record) is False: ``ctypes.CDLL`` of a damaged shared object can kill the process (SIGBUS,
    SIGSEGV) before any Python error, so such a file is rebuilt, never loaded."""
    try:
        return record_path(library).read_text() == _fingerprint(library)
    except (OSError, UnicodeDecodeError):
        return False


def _replace_atomically(target: Path, write) -> None:
    """write(tmp_path) into a temporary file beside ``target``, then rename it into place (atomic:
    another process sees the old file or the whole new one)."""
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile(cc: str, target: Path) -> None:
    """Build the library into ``target``, then write its record (both atomically); a damaged
    library or record left by anything earlier is replaced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    built: list[str] = []

    def build(tmp: str) -> None:
        cmd = [cc, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        built.append(_fingerprint(tmp))

    _replace_atomically(target, build)
    _replace_atomically(record_path(target), lambda tmp: Path(tmp).write_text(built[0]))


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.fp8_set_isa.argtypes, lib.fp8_set_isa.restype = [i32], i32
    lib.fp8_get_isa.argtypes, lib.fp8_get_isa.restype = [], i32
    lib.fp8_set_amx.argtypes, lib.fp8_set_amx.restype = [i32], i32
    lib.fp8_get_amx.argtypes, lib.fp8_get_amx.restype = [], i32
    lib.fp8_release_scratch.argtypes, lib.fp8_release_scratch.restype = [], None
    # (x, dt, B, R, C, br, bc, kind, ue8m0, q, scale, nthreads)
    lib.fp8_quantize.argtypes = [p, i32, i64, i64, i64, i64, i64, i32, i32, p, p, i32]
    lib.fp8_quantize.restype = None
    # (q, kind, scale, B, R, C, br, bc, out, dt, nthreads)
    lib.fp8_dequantize.argtypes = [p, i32, p, i64, i64, i64, i64, i64, p, i32, i32]
    lib.fp8_dequantize.restype = None
    # (x, xdt, xs, dynamic, M, K, bk, xf, nthreads)
    lib.fp8_prepare_x.argtypes = [p, i32, p, i32, i64, i64, i64, p, i32]
    lib.fp8_prepare_x.restype = None
    # (x, xdt, xs, dynamic, M, w, kind, ws, N, K, bn, bk, bias, bias_dt, y, ydt, nthreads)
    # returns 0, ERR_NOMEM or EDGE
    lib.fp8_gemm.argtypes = [p, i32, p, i32, i64, p, i32, p, i64, i64, i64, i64, p, i32, p, i32, i32]
    lib.fp8_gemm.restype = i32
    # (xf, L, gid, x_row, y_row, rows, w, kind, ws, N, K, bn, bk, y, ydt, nthreads)
    # returns 0 or ERR_NOMEM
    lib.fp8_gemm_grouped.argtypes = [p, i64, p, p, p, p, p, i32, p, i64, i64, i64, i64, p, i32, i32]
    lib.fp8_gemm_grouped.restype = i32
    # (x, xdt, xs, dynamic, M, L, gid, x_row, y_row, rows, w, kind, ws, G, N, K, bn, bk, y, ydt, nthreads)
    # returns 0, ERR_NOMEM, EDGE or NOT_BF16
    lib.fp8_gemm_grouped_x.argtypes = [
        p,
        i32,
        p,
        i32,
        i64,
        i64,
        p,
        p,
        p,
        p,
        p,
        i32,
        p,
        i64,
        i64,
        i64,
        i64,
        i64,
        p,
        i32,
        i32,
    ]
    lib.fp8_gemm_grouped_x.restype = i32
    # (M, N, K, kind, bk): fp8_cpu.c's bf16_pays, whether ISA 2's kernels take M rows of the weight
    lib.fp8_bf16_pays.argtypes, lib.fp8_bf16_pays.restype = [i64, i64, i64, i32, i64], i32
    # (M, N, K, kind, bk): which bf16 kernel M rows get, BF16_KERNELS[result] (fp8_cpu.c's bf16_kernel_of)
    lib.fp8_bf16_kernel.argtypes, lib.fp8_bf16_kernel.restype = [i64, i64, i64, i32, i64], i32
    # (y, slots, w, T, k, H, out, odt, nthreads) -> 0 or ERR_NOMEM
    lib.fp8_combine.argtypes = [p, p, p, i64, i64, i64, p, i32, i32]
    lib.fp8_combine.restype = i32
    # (a, adt, na, xs, nxs, ws, nws, K, kind, nthreads) -> 1 at fp32's overflow edge, else 0
    lib.fp8_overflow_edge.argtypes = [p, i32, i64, p, i64, p, i64, i64, i32, i32]
    lib.fp8_overflow_edge.restype = i32


def isa_name(lib: ctypes.CDLL) -> str:
    """The kernels in use: "scalar", "avx2", "avx512bf16" or "avx512bf16+amx"."""
    isa = lib.fp8_get_isa()
    return ISA_NAMES[isa] + ("+amx" if isa == 2 and lib.fp8_get_amx() else "")


def _load() -> ctypes.CDLL | None:
    global _status
    if os.environ.get("FP8_CPU_KERNELS", "1") == "0":
        _status = "disabled by FP8_CPU_KERNELS=0"
        return None
    cc = compiler()
    if cc is None:
        _status = "no C compiler found (set $CC or install gcc)"
    else:
        path = cache_dir() / "fp8_cpu-<hash>.so"
        try:
            path = _library_path(cc)  # reads the source: a wheel without it lands in the except
            if not _verified(path):  # missing, damaged, or from before records existed
                _compile(cc, path)
            lib = ctypes.CDLL(str(path))
            _declare(lib)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _status = f"build or load of {path} failed: {e}"
        else:
            forced = os.environ.get("FP8_CPU_ISA", "auto")
            if forced in ("scalar", "avx2"):
                lib.fp8_set_isa(0 if forced == "scalar" else 1)
            if forced == "avx512bf16":
                lib.fp8_set_amx(0)
            _status = f"compiled ({isa_name(lib)}): {path}"
            return lib
    warnings.warn(
        f"torch_fp8_blockwise CPU kernels unavailable, using the slower torch path: {_status}", stacklevel=3
    )
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (then :func:`status` says why). Built on the first call."""
    global _lib
    if _lib is _UNSET:
        _lib = _load()
    return _lib  # type: ignore[return-value]


def release_scratch() -> None:
    """Free the scratch arrays the calling thread's large products keep between calls (the bf16 /
    AMX kernels' activation copies, up to 256 MB each; made again when needed). A no-op when the
    kernels are not loaded."""
    lib = library()
    if lib is not None:
        lib.fp8_release_scratch()


def status() -> str:
    """How the CPU kernels stand: "compiled (avx2): <path>", or why they are not used."""
    library()
    return _status
