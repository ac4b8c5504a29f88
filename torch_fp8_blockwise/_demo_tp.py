"""``fp8-blockwise demo --tp N``: SmolLM2-135M split over N CPU processes (gloo, loopback).

The parent process starts N workers (``python -m torch_fp8_blockwise._demo_tp RANK N PORT OUT``)
and prints rank 0's table. Every worker loads the fp32 model and converts it the same way; rank 0
alone first measures the one-device rows (fp32, and each FP8 variant on one process); then every
rank runs :func:`torch_fp8_blockwise.distributed.parallelize` with the default plan and the FP8
variants are measured split over N processes ("tp=N" rows; weight MB per rank).

SmolLM2's hidden size 576 is 4.5 blocks of 128: q/k/v/o cannot be split at 128-row blocks over 2
ranks, so the plan keeps attention replicated and the report says why; the MLP (1536 = 12 blocks)
is split (gate/up column-parallel, down row-parallel).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta

import torch

from . import _demo

#: A worker that waits longer than this for a collective (e.g. its peer died) stops with an error.
COLLECTIVE_TIMEOUT_S = 900
RUN_TIMEOUT_S = 3600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(
    tp: int,
    *,
    activation: str = "both",
    tokens: int | None = None,
    max_new_tokens: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[_demo.DemoRun, str, dict[str, list[float]]]:
    """Run the demo over ``tp`` gloo processes: (rows, the sharding report of rank 0, tp row name ->
    [KL(one process || tp) in nats, top-1 agreement with the one-process variant])."""
    if tp < 2:
        raise ValueError(f"tp: expected at least 2 processes, got {tp}")
    _demo.variant_names(activation)  # validates it
    _demo.find_gguf()
    _demo._require_model_deps()
    port = _free_port()
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fp8_demo_tp_{os.getpid()}_{port}.json")
    threads = max(1, (os.cpu_count() or 1) // tp)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MASTER_ADDR="127.0.0.1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    args = [activation, str(tokens or 0), str(-1 if max_new_tokens is None else max_new_tokens)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch_fp8_blockwise._demo_tp", str(r), str(tp), str(port), out, *args],
            env=env,
            stdout=None if r == 0 else subprocess.DEVNULL,
            stderr=None if r == 0 else subprocess.PIPE,
            text=True,
        )
        for r in range(tp)
    ]
    try:
        for p in procs:
            p.wait(timeout=RUN_TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        r, code = failed[0]
        err = procs[r].stderr.read()[-2000:] if procs[r].stderr else "(see above)"
        raise RuntimeError(f"demo --tp {tp}: rank {r} exited with {code}: {err}")
    with open(out) as f:
        data = json.load(f)
    os.remove(out)
    rows = [_demo.Row(**r) for r in data["rows"]]
    return _demo.DemoRun(rows, data["conversion"]), data["report"], data["agreement"]


def _worker(rank: int, world: int, port: int, out: str, activation: str, tokens: int, new: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from .distributed import parallelize

    def log(line: str) -> None:
        if rank == 0:
            print(line, file=sys.stderr, flush=True)

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    mesh = init_device_mesh("cpu", (world,))
    tokenizer, base = _demo.load_model()
    ids = _demo.demo_ids(tokenizer, tokens or None)
    max_new = _demo.DEFAULT_NEW_TOKENS if new < 0 else new
    cpu = torch.device("cpu")
    names = [n for n in _demo.variant_names(activation) if n != "bf16"]
    rows: list[_demo.Row] = []
    conversion = ""
    ref = None
    one_process: dict[str, torch.Tensor] = {}
    converted: dict[str, torch.nn.Module] = {}  # rank 0 converts each variant once
    if rank == 0:  # the one-device rows
        for name in names:
            variant, note = _demo.make_variant(base, name, progress=False)
            if name != "fp32":
                converted[name] = variant
            conversion = conversion or note
            row, logprobs = _measure(name, variant, tokenizer, ids, cpu, max_new, ref)
            ref = logprobs if ref is None else ref
            one_process[name] = logprobs
            rows.append(row)
            log(f"{name} (1 process): ppl {row.perplexity:.2f}")
    dist.barrier()
    report = ""
    agreement: dict[str, list[float]] = {}
    for name in names[1:]:
        variant = converted.pop(name, None) or _demo.make_variant(base, name, progress=False)[0]
        rep = parallelize(variant, mesh)
        report = report or str(rep)
        row, logprobs = _measure(f"{name} tp={world}", variant, tokenizer, ids, cpu, max_new, ref)
        if rank == 0:
            rows.append(row)
            _, kl, top1 = _demo.metrics(logprobs, ids, one_process[name])
            agreement[row.name] = [kl, top1]
            log(f"{row.name}: ppl {row.perplexity:.2f}; vs one process: KL {kl:.2e}, top-1 {top1:.3f}")
    if rank == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "rows": [asdict(r) for r in rows],
                    "conversion": conversion,
                    "report": report,
                    "agreement": agreement,
                },
                f,
            )
    dist.barrier()
    dist.destroy_process_group()


def _measure(name, variant, tokenizer, ids, device, max_new, ref) -> tuple[_demo.Row, torch.Tensor]:
    """(one table row, its log-probabilities [T-1, V]); ``ref``: the fp32 log-probabilities (None:
    this is the fp32 model itself)."""
    logprobs, seconds = _demo.forward_logprobs(variant, ids, device)
    ppl, kl, top1 = _demo.metrics(logprobs, ids, logprobs if ref is None else ref)
    text = _demo.generate(variant, tokenizer, device, max_new)
    row = _demo.Row(name, ppl, kl, top1, _demo.linear_weight_bytes(variant), ids.shape[1] / seconds, text)
    return row, logprobs


def report(result: _demo.DemoRun, sharding: str, tp: int, agreement: dict[str, list[float]]) -> str:
    """The printed output: title, the table (tp rows: weight MB per rank), the sharding report."""
    lines = [
        f"SmolLM2-135M-Instruct, FP8 block-wise 128x128, tensor parallel over {tp} CPU processes (gloo)",
        f"FP8 layers: {result.conversion}",
        _demo.format_table(result.rows),
        "rows 'tp=N': the model split by distributed.parallelize (default plan); weight MB is per rank;",
        "KL(p_fp32 || p) mean per token (nats); tokens/s = one forward over the text after a warm-up.",
        *(
            f"{name} vs the same variant in one process: KL {kl:.2e} nats, top-1 agreement {top1:.3f}"
            for name, (kl, top1) in agreement.items()
        ),
        "",
        sharding,
    ]
    gens = [r for r in result.rows if r.generation]
    if gens:
        lines += ["", f"greedy generation, prompt {_demo.PROMPT!r} (chat template):"]
        lines += [f"  {r.name:<16} {r.generation!r}" for r in gens]
    return "\n".join(lines)


if __name__ == "__main__":
    r_, w_, p_, o_, a_, t_, n_ = sys.argv[1:8]
    start = time.perf_counter()
    _worker(int(r_), int(w_), int(p_), o_, a_, int(t_), int(n_))
