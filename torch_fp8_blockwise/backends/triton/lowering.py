"""Offline proof that every shipped Triton configuration compiles for sm_90, sm_100 and sm_120.

``python scripts/check_lowering.py --target cuda [--arch 90 100 120] [--quick] [--jobs N]``

For each (kernel, config, target) it runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))`` (no GPU or driver needed) and reads:

* the MMA instruction in the PTX, which must match :func:`expected_mma` (e.g. ``wgmma ... e4m3``
  for the fp8 GEMM on sm_90, ``tcgen05.mma ... kind::mxf8f6f4.block_scale`` for MXFP8 on sm_100);
* dynamic shared memory (``metadata.shared``), which must be <= the arch's opt-in limit;
* registers and local memory from ``cuobjdump -res-usage`` on the cubin: LOCAL > 0 (or a PTX
  ``.local`` declaration) means spills, which fail the check.

"Shipped" configs = every entry of the tuned table + the heuristic's choice for
:data:`PROBLEMS` (decode and prefill M, DeepSeek-V3 N/K), deduplicated, + the quantize kernels.
Exit status 0 only if every row passes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

#: (M, N, K) problems whose heuristic configs ship: decode M = 1..64 (block_n 128 and 64), prefill
#: M = 128 (64 x 128), 256 at N=2112 (64 x 64: a 128 x 128 grid would fill a quarter of the SMs), 4096.
PROBLEMS: tuple[tuple[int, int, int], ...] = (
    (1, 7168, 2048),
    (1, 2048, 7168),
    (32, 7168, 2048),
    (64, 4096, 7168),
    (128, 7168, 2048),
    (256, 2112, 7168),
    (4096, 7168, 2048),
)
QUICK_PROBLEMS: tuple[tuple[int, int, int], ...] = ((1, 2048, 7168), (4096, 7168, 2048))

#: Regex the PTX must contain, per (kernel, arch). sm_120 (consumer Blackwell) has neither wgmma
#: nor tcgen05: its tensor cores take mma.sync, with native e4m3 operands.
MMA_PATTERNS: dict[tuple[str, int], str] = {
    ("w8a8", 90): r"wgmma\.mma_async\S*\.e4m3\.e4m3",
    ("w8a8", 100): r"tcgen05\.mma\S*kind::f8f6f4",
    ("w8a8", 120): r"mma\.sync\.aligned\S*\.e4m3\.e4m3",
    ("w8a16", 90): r"wgmma\.mma_async\S*\.bf16\.bf16",
    ("w8a16", 100): r"tcgen05\.mma\S*kind::f16",
    ("w8a16", 120): r"mma\.sync\.aligned\S*\.bf16\.bf16",
    ("mxfp8", 90): r"wgmma\.mma_async\S*\.bf16\.bf16",
    ("mxfp8", 100): r"tcgen05\.mma\S*kind::mxf8f6f4\.block_scale",
    ("mxfp8", 120): r"mma\.sync\.aligned\S*\.bf16\.bf16",
}
#: W8A16 decode tiles run unswapped with block_m < 64 rows, below wgmma's / tcgen05's 64-row minimum:
#: Triton lowers them to mma.sync on every arch (memory-bound there; configs.heuristic says why).
SMALL_M_MMA = r"mma\.sync\.aligned\S*\.bf16\.bf16"


def expected_mma(job: Job) -> str | None:
    """Regex the job's PTX must contain (None: no MMA, e.g. quantizers and the IEEE fp32 dot)."""
    consts = dict(job.constexprs)
    if job.kernel == "w8a16" and not consts.get("SWAP_AB") and consts.get("BLOCK_M", 64) < 64:
        return SMALL_M_MMA
    # Grouped kernels are named "<op>.<kind>" (e.g. "gmm.w8a8") and expect their kind's MMA.
    return MMA_PATTERNS.get((job.kernel.rsplit(".", 1)[-1], job.arch))


@dataclass(frozen=True)
class Job:
    """One compilation: a kernel name, its config label, target arch and compile arguments."""

    kernel: str  # w8a8 | w8a16 | w8a16_f32 | mxfp8 | quant_group | quant_mx | quant_block | dequant
    label: str
    arch: int
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int


@dataclass
class Row:
    kernel: str
    label: str
    arch: int
    mma: str
    smem: int
    regs: int
    local: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


_DIV16 = ("ptr", "stride", "N", "K", "cols")


def _kernel_fn(kernel: str):
    if "." in kernel:  # grouped.py's kernels, "<op>.<mma kind>"
        from .grouped import kernel_fn

        return kernel_fn(kernel)
    if kernel in ("w8a8", "w8a16", "w8a16_f32"):
        from .blockwise_matmul import _blockwise_gemm_kernel

        return _blockwise_gemm_kernel
    if kernel == "mxfp8":
        from .mxfp8 import _mxfp8_gemm_kernel

        return _mxfp8_gemm_kernel
    from .quantize import _block_quant_kernel, _dequant_kernel, _group_quant_kernel

    return {
        "quant_group": _group_quant_kernel,
        "quant_mx": _group_quant_kernel,
        "quant_block": _block_quant_kernel,
        "dequant": _dequant_kernel,
    }[kernel]


def _gemm_jobs(arch: int, problems: tuple[tuple[int, int, int], ...]) -> list[Job]:
    from .configs import GemmConfig, heuristic, load_table

    chosen: dict[tuple[str, GemmConfig], None] = {}
    for kernel in ("w8a8", "w8a16", "mxfp8"):
        for m, n, k in problems:
            bk = 32 if kernel == "mxfp8" else 128
            chosen[(kernel, heuristic(kernel, arch, m, n, k).for_problem(bk, k))] = None
    # W8A16 with fp32 x: IEEE fp32 dot (CUDA-core FMA, no MMA to require), fp32 tiles in smem.
    for m, n, k in problems:
        chosen[("w8a16_f32", heuristic("w8a16", arch, m, n, k, x_bytes=4).for_problem(128, k))] = None
    for (a, kernel, _mb, _n, k), cfg in load_table().items():
        if a == arch:
            chosen[(kernel, cfg.for_problem(32 if kernel == "mxfp8" else 128, k))] = None
    jobs = []
    for kernel, cfg in chosen:
        label = (
            f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} s{cfg.num_stages} w{cfg.num_warps}"
            f" sk{cfg.split_k}{' swap' if cfg.swap_ab else ''}"
        )
        common = {
            "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n,
            "BLOCK_K": cfg.block_k,
            "GROUP_M": cfg.group_m,
            "SPLIT_K": cfg.split_k,
            "SWAP_AB": cfg.swap_ab,
            "DOT_F32": False,
            "HAS_BIAS": True,
        }
        ints = {
            n: "i32"
            for n in ("M", "N", "K", "stride_xm", "stride_wn", "stride_xsm", "stride_wsn", "stride_ym")
        }
        y_type = "*fp32" if cfg.split_k > 1 else "*bf16"
        if kernel == "mxfp8":
            sig = {"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "xs_ptr": "*u8", "ws_ptr": "*u8"}
            consts = {**common, "NATIVE": arch == 100, "X_FMT": "e4m3", "W_FMT": "e4m3"}
            label += " native" if arch == 100 else " explicit"
        else:
            x_type = {"w8a8": "*fp8e4nv", "w8a16": "*bf16", "w8a16_f32": "*fp32"}[kernel]
            sig = {"x_ptr": x_type, "w_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "ws_ptr": "*fp32"}
            consts = {
                **common,
                "SCALE_BN": 128,
                "SCALE_BK": 128,
                "W8A16": kernel != "w8a8",
                "IEEE_F32": kernel == "w8a16_f32",
            }
            if kernel == "w8a16_f32":
                label += " ieee"
        sig.update({"bias_ptr": "*bf16", "y_ptr": y_type, **ints})
        jobs.append(_job(kernel, label, arch, sig, consts, cfg.num_warps, cfg.num_stages))
    return jobs


def _quant_jobs(arch: int) -> list[Job]:
    from ...formats import SCALE_EPS
    from .quantize import BLOCK_CHUNK_ELEMS, GROUP_TILE_ELEMS

    jobs = []
    ints = {n: "i32" for n in ("rows", "cols", "stride_x", "stride_q", "stride_s")}
    for kernel, group, bits in (("quant_group", 128, False), ("quant_mx", 32, True)):
        sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*u8" if bits else "*fp32", **ints}
        consts = {
            "GROUP": group,
            "ROWS": GROUP_TILE_ELEMS // group,
            "FP8_MAX": 448.0,
            "EPS": SCALE_EPS,
            "UE8M0": bits,
            "SCALE_E8M0_BITS": bits,
        }
        jobs.append(_job(kernel, f"1x{group} bf16->e4m3", arch, sig, consts, 4, 3))
    block_ints = (
        "rows",
        "cols",
        "stride_xb",
        "stride_xr",
        "stride_qb",
        "stride_qr",
        "stride_sb",
        "stride_sr",
    )
    for br, bc in ((128, 128), (512, 512)):
        sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", **{n: "i32" for n in block_ints}}
        consts = {
            "BR": br,
            "BC": bc,
            "CHUNK": min(br, BLOCK_CHUNK_ELEMS // bc),
            "FP8_MAX": 448.0,
            "EPS": SCALE_EPS,
            "UE8M0": False,
        }
        jobs.append(_job("quant_block", f"{br}x{bc} bf16->e4m3", arch, sig, consts, 8, 3))
    deq_ints = ("rows", "cols", "stride_qb", "stride_qr", "stride_sb", "stride_sr", "stride_yb", "stride_yr")
    # The same kernel writes dequant_mm.py's weight panels in x's dtype (bf16, fp16, fp32).
    for q_type, y_type, label in (
        ("*fp8e4nv", "*bf16", "e4m3->bf16"),
        ("*fp8e5", "*fp16", "e5m2->fp16"),
        ("*fp8e4nv", "*fp32", "e4m3->fp32"),
    ):
        sig = {"q_ptr": q_type, "s_ptr": "*fp32", "y_ptr": y_type, **{n: "i32" for n in deq_ints}}
        consts = {"BR": 128, "BC": 128, "TILE_R": 32, "TILE_C": 128}
        jobs.append(_job("dequant", f"32x128 {label}", arch, sig, consts, 4, 3))
    return jobs


def _job(kernel: str, label: str, arch: int, sig: dict, consts: dict, warps: int, stages: int) -> Job:
    return Job(kernel, label, arch, tuple(sig.items()), tuple(consts.items()), warps, stages)


def _cuobjdump() -> str | None:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def compile_kernel(job: Job):
    """triton.compile of one job for its target (no GPU needed); raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel_fn(job.kernel)
    types = dict(job.signature)
    consts = dict(job.constexprs)
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    missing = [n for n in fn.arg_names if n not in types and n not in consts]
    if missing:
        raise ValueError(f"no value for {missing}")
    # Pointers and K-sized ints divisible by 16, as the JIT's specialization would see them on a
    # real launch (aligned torch allocations, K and N multiples of 128): it enables 16-byte loads.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name in types and any(name.startswith(p) or name.endswith(p) for p in _DIV16) and name != "M"
    }
    return triton.compile(
        ASTSource(fn, signature, consts, attrs),
        target=GPUTarget("cuda", job.arch, 32),
        options={"num_warps": job.num_warps, "num_stages": job.num_stages},
    )


def compile_job(job: Job) -> Row:
    """Compile one job offline and measure it (runs in a worker process)."""
    from .configs import SMEM_LIMIT

    try:
        compiled = compile_kernel(job)
    except Exception as e:  # report, do not hide: the row fails
        return Row(
            job.kernel, job.label, job.arch, "-", 0, 0, 0, f"compile failed: {type(e).__name__}: {e}"[:300]
        )
    ptx = compiled.asm["ptx"]
    smem = int(compiled.metadata.shared)
    regs, local = _resource_usage(compiled.asm["cubin"])
    if re.search(r"^\s*\.local\b", ptx, re.MULTILINE):
        local = max(local, 1)
    pattern = expected_mma(job)
    mma = "-"
    errors = []
    if pattern is not None:
        found = re.search(pattern, ptx)
        if found:
            mma = found.group(0)
        else:
            seen = re.search(r"(wgmma\.mma_async|tcgen05\.mma|mma\.sync)\S*", ptx)
            errors.append(f"expected /{pattern}/, found {seen.group(0) if seen else 'no MMA'}")
    if smem > SMEM_LIMIT[job.arch]:
        errors.append(f"shared memory {smem} B > limit {SMEM_LIMIT[job.arch]} B")
    if local:
        errors.append(f"local memory {local} B (register spills)")
    return Row(job.kernel, job.label, job.arch, mma, smem, regs, local, "; ".join(errors))


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local bytes per thread) from ``cuobjdump -res-usage``; -1 if unknown."""
    tool = _cuobjdump()
    if tool is None:
        return -1, 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    spill = (int(local.group(1)) if local else 0) + (int(stack.group(1)) if stack else 0)
    return (int(reg.group(1)) if reg else -1), spill


def shipped_jobs(archs: tuple[int, ...], quick: bool = False) -> list[Job]:
    from .grouped import lowering_jobs as grouped_jobs

    jobs: list[Job] = []
    for arch in archs:
        jobs += _gemm_jobs(arch, QUICK_PROBLEMS if quick else PROBLEMS)
        jobs += _quant_jobs(arch)
        jobs += grouped_jobs(arch, quick)
    return jobs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="check_lowering.py --target cuda")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 100, 120], choices=[90, 100, 120])
    parser.add_argument("--quick", action="store_true", help="two problems per kernel instead of six")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compilations")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("lowering: unset TRITON_INTERPRET; the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    import triton

    jobs = shipped_jobs(tuple(args.arch), args.quick)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(compile_job, jobs))
    header = f"{'kernel':<12} {'config':<38} {'target':<7} {'MMA instruction':<58} {'smem B':>7} {'regs':>5} {'spill':>5}  status"
    print(f"triton {triton.__version__}; shared-memory limits: sm_90/sm_100 232448 B, sm_120 101376 B")
    print(header)
    print("-" * len(header))
    for r in rows:
        status = "ok" if r.ok else f"FAIL: {r.error}"
        print(
            f"{r.kernel:<12} {r.label:<38} sm_{r.arch:<4} {r.mma[:58]:<58} {r.smem:>7} {r.regs:>5} {r.local:>5}  {status}"
        )
    failed = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)}/{len(rows)} configurations pass")
    return 1 if failed else 0
