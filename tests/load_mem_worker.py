"""One rank of the 2-process per-rank load memory check (run by tests/test_distributed_checkpoint.py).

``python tests/load_mem_worker.py RANK WORLD PORT OUT_DIR CKPT_DIR LAYERS HIDDEN INTER EXPERTS EXPERT_INTER``: builds the
MLP stack of :func:`mlp_stack` on the meta device, parallelizes it over the gloo ranks, and measures
the peak RSS growth of ``distributed.checkpoint.load`` (then, in the same process, of
``checkpoint.load`` of the unsplit model: every rank reading everything). Writes
OUT_DIR/rank{RANK}.json.

Measure: Linux's peak RSS (``VmHWM``), reset to the current RSS just before each load by writing 5
to ``/proc/self/clear_refs``; growth = ``VmHWM`` after - ``VmRSS`` before. RSS counts anonymous
memory and the mapped pages of the checkpoint file (safetensors maps it), so a tensor kept as a
view of the file and a copied one both count, once each.
"""

from __future__ import annotations

import gc
import sys

import torch
from gloo_ranks import finish_worker, init_worker
from torch import nn


def mlp_stack(
    layers: int, hidden: int, inter: int, experts: int, expert_inter: int, device: str
) -> nn.Module:
    """``{i}.gate_proj`` / ``{i}.up_proj`` [inter, hidden] (colwise), ``{i}.down_proj`` [hidden,
    inter] (rowwise), ``{i}.norm`` LayerNorm(hidden), no biases; ``moe.experts``: an Fp8Experts of
    ``experts`` experts [hidden -> expert_inter] (expert-parallel; per-expert keys in the file)."""
    from torch_fp8_blockwise.experts import Fp8Experts
    from torch_fp8_blockwise.nn import Fp8Config

    model = nn.Sequential()
    with torch.device(device):
        for i in range(layers):
            block = nn.Module()
            block.gate_proj = nn.Linear(hidden, inter, bias=False)
            block.up_proj = nn.Linear(hidden, inter, bias=False)
            block.down_proj = nn.Linear(inter, hidden, bias=False)
            block.norm = nn.LayerNorm(hidden)
            model.add_module(str(i), block)
    moe = nn.Module()
    moe.experts = Fp8Experts(experts, hidden, expert_inter, Fp8Config(), nn.functional.silu, device=device)
    model.add_module("moe", moe)
    return model


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def peak_growth(fn) -> dict[str, int]:
    """Run ``fn()``; return its peak RSS growth and what it still holds after (bytes)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status()
    fn()
    after = _status()
    return {
        "peak": after["VmHWM"] - before["VmRSS"],
        "held": after["VmRSS"] - before["VmRSS"],
        "held_file_pages": after["RssFile"] - before["RssFile"],
    }


def main() -> None:
    rank, world, out_dir = init_worker()
    ckpt_dir, dims = sys.argv[5], [int(a) for a in sys.argv[6:11]]
    from torch.distributed.device_mesh import init_device_mesh

    from torch_fp8_blockwise import checkpoint as ckpt
    from torch_fp8_blockwise import distributed as tpd
    from torch_fp8_blockwise.distributed import checkpoint as dckpt
    from torch_fp8_blockwise.distributed.parallelize import model_bytes

    mesh = init_device_mesh("cpu", (world,))
    sharded = mlp_stack(*dims, "meta")
    tpd.parallelize(sharded, mesh)
    res = {"sharded": peak_growth(lambda: dckpt.load(sharded, ckpt_dir)), "local_bytes": model_bytes(sharded)}
    res["devices"] = sorted({t.device.type for t in sharded.state_dict().values()})
    full = mlp_stack(*dims, "meta")
    res["full"] = peak_growth(lambda: ckpt.load(full, ckpt_dir))
    res["full_bytes"] = model_bytes(full)
    finish_worker(out_dir, rank, res)


if __name__ == "__main__":
    main()
