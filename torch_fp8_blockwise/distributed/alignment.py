"""The block-alignment rule: which layers can be split over how many ranks (ONE rule, every engine).

A shard of a block-wise FP8 layer is right only if its weight rows / columns and its scale rows /
columns are the same blocks. We require vLLM's rule (stricter than what even chunking needs, and the
one that keeps the 1 x bk activation groups of a row-parallel layer identical to one device's):

* ``"colwise"`` (output features split, weight [N, K] by rows): ``N % (tp * bn) == 0``;
* ``"rowwise"`` (input features split, weight by columns): ``K % (tp * bk) == 0``;
* ``"expert"`` (whole experts per rank, contiguous ranges): ``num_experts % tp == 0``.

Splitting weight and scale separately can pass every shape check and still be wrong (DeepSeek-V3's
own convert.py accepts N = 130 over 2 ranks and gives 19% relative error): this rule is checked
before anything moves, by :func:`~torch_fp8_blockwise.distributed.check_plan`, the parallel styles,
the DTensor sharding rule and the torch_xla SPMD path alike.
"""

from __future__ import annotations

KINDS: tuple[str, ...] = ("colwise", "rowwise", "expert")
#: tp sizes listed as alternatives in error messages.
CANDIDATE_TP_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


class BlockShardingError(ValueError):
    """A layer cannot be split as the plan asks: the message names the layer, its shape and blocks,
    why, and the tp sizes that would work."""


def shard_problem(
    kind: str,
    shape: tuple[int, int],
    block_shape: tuple[int, int],
    tp_size: int,
    *,
    num_experts: int | None = None,
) -> str | None:
    """Why ``kind`` over ``tp_size`` ranks would be wrong for a layer, or None when it is right.

    Args:
        kind: "colwise", "rowwise" or "expert".
        shape: the weight's (N, K) = (out_features, in_features) (for "expert": one expert's).
        block_shape: (bn, bk) weight block.
        tp_size: ranks the layer is split over (>= 1).
        num_experts: for "expert" only: experts in the layer.

    Returns: a sentence such as "ColwiseParallel over 8 ranks gives each rank 176 of 1408 output
    rows, not a whole number of 128-row blocks", or None.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tp_size: expected a positive int, got {tp_size!r}")
    n, k = shape
    bn, bk = block_shape
    if kind == "expert":
        if num_experts is None:
            raise ValueError("num_experts: required for kind='expert'")
        if num_experts % tp_size:
            return (
                f"ExpertParallel over {tp_size} ranks would give ranks unequal shares of "
                f"{num_experts} experts ({num_experts / tp_size:g} each)"
            )
        return None
    size, block, what, style = (
        (n, bn, "output rows", "Colwise") if kind == "colwise" else (k, bk, "input columns", "Rowwise")
    )
    if size % (tp_size * block) == 0:
        return None
    share = size / tp_size
    share_text = f"{share:g}" if share != int(share) else str(int(share))
    return (
        f"{style}Parallel over {tp_size} ranks gives each rank {share_text} of {size} {what}, "
        f"not a whole number of {block}-{'row' if kind == 'colwise' else 'column'} blocks"
    )


def working_tp_sizes(
    kind: str,
    shape: tuple[int, int],
    block_shape: tuple[int, int],
    *,
    num_experts: int | None = None,
    candidates: tuple[int, ...] = CANDIDATE_TP_SIZES,
) -> list[int]:
    """The tp sizes among ``candidates`` for which :func:`shard_problem` finds nothing."""
    return [
        t for t in candidates if shard_problem(kind, shape, block_shape, t, num_experts=num_experts) is None
    ]


def local_range(size: int, tp_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s equal share of ``size`` elements (size % tp_size == 0)."""
    if size % tp_size:
        raise ValueError(f"local_range: {size} does not split evenly over {tp_size} ranks")
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank: expected 0 <= rank < {tp_size}, got {rank}")
    step = size // tp_size
    return rank * step, (rank + 1) * step
