"""Tensor parallelism of this package's modules over a ``jax.sharding.Mesh``
axis (the mirror of ``torch_impl/tp.py``): the parameters and states are
global arrays laid out rank by rank (rank r's shard, as
``bridge.spec.mixer_sharding`` defines it, is block r along the sharded
axis) and placed with ``NamedSharding``; the per-rank computation runs under
``jax.shard_map`` (the Pallas kernels on each device's shard), the
reductions are ``jax.lax.psum`` over the axis. A mesh spanning several
processes (``jax.distributed.initialize``) runs the same code.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P


def spec(axis: Optional[int], ndim: int, tp_axis: str) -> P:
    """The PartitionSpec of an ``ndim``-D array sharded on ``axis`` over ``tp_axis`` (None: replicated)."""
    return P() if axis is None else P(*(tp_axis if d == axis else None for d in range(ndim)))


def put(value, sharding: NamedSharding) -> jax.Array:
    """A host value (numpy, or any array ``np.asarray`` reads; the same in
    every process) as a global array laid out by ``sharding`` (each process
    places its own devices' blocks)."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def run_sharded(module: nnx.Module, param_specs: Callable[[str, int], P], fn: Callable, args: tuple,
                in_specs: tuple, out_specs):
    """``fn(module, *args)`` per rank under ``jax.shard_map`` over
    ``module.mesh``: the module's parameters split by ``param_specs(attr,
    ndim)`` (its attribute names), ``args`` by ``in_specs``, the results
    assembled by ``out_specs``."""
    graphdef, state = nnx.split(module)
    state_specs = jax.tree_util.tree_map_with_path(lambda path, leaf: param_specs(path[0].key, leaf.ndim), state)

    def local(state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    return jax.shard_map(local, mesh=module.mesh, in_specs=(state_specs, *in_specs), out_specs=out_specs,
                         check_vma=False)(state, *args)


def first_rank_only(x, tp_axis: Optional[str]):
    """``x`` on rank 0 of ``tp_axis``, zeros elsewhere (a term added once to partial sums); None: ``x``."""
    if tp_axis is None:
        return x
    return jax.numpy.where(jax.lax.axis_index(tp_axis) == 0, x, 0).astype(x.dtype)


def reduce_from_ranks(x, tp_axis: Optional[str]):
    """The sum of every rank's ``x`` (partial sums of a replicated result); None: ``x``."""
    return x if tp_axis is None else jax.lax.psum(x, tp_axis)


sum_over_ranks = reduce_from_ranks  # the gated norm's sum of squares (torch tells the two apart for autograd)
