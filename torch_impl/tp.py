"""Tensor parallelism of this package's modules over a ``torch.distributed``
process group (NCCL on GPUs, gloo on CPU), as Megatron-LM and vLLM run it:
every rank holds its shard of the weights and states
(``bridge.spec.mixer_sharding``), the same input, and, after the reduction
of the row-parallel ``out_proj``, the same output. Mirror: ``jax_impl/tp.py``.

The collectives are autograd-aware, so the training forward's gradients are
those of the unsharded module: ``copy_to_ranks`` (identity; gradients summed
over the ranks, each of which holds a partial one), ``reduce_from_ranks``
(sum; the gradient of the replicated result passes unchanged) and
``sum_over_ranks`` (sum both ways: a partial sum that every rank's outputs read).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from bridge.spec.checks import fail


def resolve(tp_size: Optional[int], process_group, op: str = "MambaMixer2") -> tuple[int, int, object]:
    """``(tp_size, tp_rank, group)`` of a module built with ``tp_size`` (None
    or 1: unsharded) and ``process_group`` (None: the default group when
    ``tp_size`` > 1; ``group`` is None when unsharded)."""
    if process_group is None and tp_size in (None, 1):
        return 1, 0, None
    if not dist.is_available() or not dist.is_initialized():
        fail(op, "tp_size" if process_group is None else "process_group",
             "needs torch.distributed initialised (torch.distributed.init_process_group, e.g. under torchrun)")
    group = dist.group.WORLD if process_group is None else process_group
    size = dist.get_world_size(group)
    if tp_size not in (None, size):
        fail(op, "tp_size", f"is {tp_size}, but the process group has {size} ranks")
    return size, dist.get_rank(group), None if size == 1 else group


class _CopyToRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        dist.all_reduce(x, group=group)  # in place: x is the rank's fresh partial sum
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to_ranks(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` (the same on every rank) entering rank-local work; ``group`` None: ``x``."""
    return x if group is None else _CopyToRanks.apply(x, group)


def reduce_from_ranks(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of every rank's ``x`` (partial sums of a replicated result), in place; ``group`` None: ``x``."""
    return x if group is None else _ReduceFromRanks.apply(x.contiguous(), group)


def sum_over_ranks(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of every rank's ``x``, which every rank then reads; ``group`` None: ``x``."""
    return x if group is None else _SumOverRanks.apply(x, group)


def gather_from_ranks(x: torch.Tensor, group, axis: int) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``axis`` in rank order (no gradient); ``group`` None: ``x``."""
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, axis)
