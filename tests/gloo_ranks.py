"""Multi-process test plumbing shared by the distributed tests: a free loopback port, launching one
worker process per rank (bounded by a timeout, every process killed when the test stops), and the
workers' gloo set-up. Loopback only: MASTER_ADDR / init_method are 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from datetime import timedelta


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv: Callable[[int], list[str]], world: int, env: Mapping[str, str], timeout_s: float) -> None:
    """Start ``sys.executable *argv(rank)`` for every rank, wait at most ``timeout_s`` for each,
    kill whatever still runs, and raise AssertionError with the log tail of a rank that failed."""
    procs = [
        subprocess.Popen(
            [sys.executable, *argv(rank)],
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout_s)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        if p.returncode != 0:
            raise AssertionError(f"rank {rank} exited with {p.returncode}:\n{log[-4000:]}")


def worker_env(root: str, **extra: str) -> dict[str, str]:
    """The environment of a worker: this process's, one OpenMP thread, loopback, the repo on
    PYTHONPATH (before what was there)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def init_worker() -> tuple[int, int, str]:
    """In a worker started as ``worker.py RANK WORLD PORT OUT_DIR``: join the gloo group on
    127.0.0.1:PORT (120 s timeout) and return (rank, world, out_dir)."""
    import torch.distributed as dist

    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    return rank, world, out_dir


def finish_worker(out_dir: str, rank: int, res: dict) -> None:
    """The end of a worker: its results as ``OUT_DIR/rank{rank}.json`` (what the test reads), then
    a barrier (no rank leaves while another still needs the group) and the group's teardown."""
    import json

    import torch.distributed as dist

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
