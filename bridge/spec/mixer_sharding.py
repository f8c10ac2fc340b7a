"""Tensor-parallel sharding of a Mamba-2 mixer, as vLLM's ``MambaMixer2``
does it (framework-neutral: index arithmetic in numpy).

- Heads are sharded: each rank holds ``num_heads / tp`` heads, i.e. the
  matching ``intermediate_size / tp`` channels of the gate, x, the norm and
  the input of ``out_proj`` (row-parallel: each rank's product is a partial
  sum, all-reduced).
- Groups (of B and C) are sharded with the heads when ``tp`` divides
  ``n_groups``. Otherwise (supported for ``n_groups == 1`` only) the single
  group is replicated: the groups are padded to ``tp``
  (``extra_groups_for_head_shards``) and every rank loads group 0.
- The projections concatenate several outputs (``in_proj``: gate, x, B, C,
  dt; ``conv1d``: x, B, C); each part is sharded separately
  (``mamba_v2_sharded_weight_loader``), so a rank's rows split into its own
  gate, x, B, C, dt.
- The gated norm normalises groups of ``intermediate_size / n_groups``
  channels: within a rank when ``tp`` divides ``n_groups``, across ranks
  (an all-reduce of the sums of squares) when ``n_groups == 1``.
- ``out_proj`` is row-parallel: each rank multiplies its channels, the
  partial sums are all-reduced, the (replicated) bias added once after.

The mixers (``torch_impl`` / ``jax_impl``) run these rules: ``MixerDims``
with their ``tp_size``, ``shard_mixer_weights`` in their ``load_weights``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from bridge.spec.state_shapes import MambaStateShapeCalculator

ShardSpec = Sequence[tuple[int, int, bool]]  # (full_dim, extra, duplicate_groups) per part


@dataclasses.dataclass(frozen=True)
class MixerDims:
    """Sizes of one rank's shard of a mixer; ``check`` validates the config."""

    intermediate_size: int
    n_groups: int  # as configured
    num_heads: int
    head_dim: int
    ssm_state_size: int
    tp_size: int = 1

    def __post_init__(self):
        if self.tp_size < 1:
            raise ValueError(f"MambaMixer2: `tp_size` must be >= 1, got {self.tp_size}")
        if self.head_dim * self.num_heads != self.intermediate_size:
            raise ValueError(f"MambaMixer2: `intermediate_size` ({self.intermediate_size}) must equal "
                             f"head_dim * num_heads = {self.head_dim} * {self.num_heads}")
        if self.num_heads % self.tp_size:
            raise ValueError(f"MambaMixer2: `num_heads` ({self.num_heads}) is not divisible by "
                             f"the tensor-parallel size {self.tp_size}")
        if self.n_groups < 1 or self.num_heads % self.n_groups:
            raise ValueError(f"MambaMixer2: `n_groups` ({self.n_groups}) must divide "
                             f"num_heads ({self.num_heads})")
        if self.n_groups % self.tp_size and self.n_groups != 1:
            raise ValueError(f"MambaMixer2: `n_groups` ({self.n_groups}) must be 1 or divisible by "
                             f"the tensor-parallel size {self.tp_size}")

    @property
    def padded_groups(self) -> int:
        """Groups after replication for the head shards (vLLM's ``self.n_groups``)."""
        return self.n_groups + MambaStateShapeCalculator.extra_groups_for_head_shards(
            self.n_groups, self.tp_size)

    @property
    def conv_dim(self) -> int:
        """Channels of the conv, all ranks: x, then B, then C."""
        return self.intermediate_size + 2 * self.padded_groups * self.ssm_state_size

    def local(self, size: str) -> int:
        """One rank's share of ``num_heads``, ``intermediate_size``,
        ``padded_groups`` or ``conv_dim`` (all divisible by ``tp_size``)."""
        return getattr(self, size) // self.tp_size

    @property
    def norm_group_size(self) -> int:
        """Channels per normalised group (the configured groups, not the padded ones)."""
        return self.intermediate_size // self.n_groups

    @property
    def norm_is_local(self) -> bool:
        """True when every norm group lies inside one rank's channels."""
        return self.norm_group_size <= self.local("intermediate_size")

    def conv_shard_spec(self) -> list[tuple[int, int, bool]]:
        """Parts of ``conv1d`` (x, B, C) for ``mamba_v2_sharded_weight_loader``."""
        group = (self.padded_groups * self.ssm_state_size,
                 (self.padded_groups - self.n_groups) * self.ssm_state_size, self.n_groups == 1)
        return [(self.intermediate_size, 0, False), group, group]

    def in_proj_shard_spec(self) -> list[tuple[int, int, bool]]:
        """Parts of ``in_proj`` (gate, x, B, C, dt)."""
        return ([(self.intermediate_size, 0, False)] + self.conv_shard_spec()
                + [(self.num_heads, 0, False)])

    def checkpoint_rows(self, key: str, tp_rank: int) -> np.ndarray | None:
        """The rows (``out_proj.weight``: columns) of checkpoint tensor ``key``
        that rank ``tp_rank`` holds, in its order (None: the whole tensor,
        replicated). ``conv1d``'s rows are also the conv state's channels."""
        spec = {"in_proj": self.in_proj_shard_spec(), "conv1d": self.conv_shard_spec()}.get(key.split(".")[0])
        if spec is not None:
            dst, src = sharded_rows(spec, self.tp_size, tp_rank)
            if len(dst) != sum(full // self.tp_size for full, _, _ in spec):
                raise AssertionError(f"MixerDims: rank {tp_rank} would leave rows of `{key}` unloaded")
            return src
        if key == "out_proj.bias":
            return None
        size = self.local("num_heads") if key in ("dt_bias", "A_log", "D") else self.local("intermediate_size")
        return np.arange(tp_rank * size, (tp_rank + 1) * size)

    def gather_rows(self, key: str) -> np.ndarray | None:
        """The inverse of ``checkpoint_rows``: for each row (``out_proj.weight``:
        column) of checkpoint tensor ``key``, where it lies in the ranks'
        shards concatenated in rank order (None: replicated)."""
        per_rank = [self.checkpoint_rows(key, rank) for rank in range(self.tp_size)]
        if per_rank[0] is None:
            return None
        where = np.empty(max(int(rows.max()) for rows in per_rank) + 1, np.int64)
        for rank, rows in enumerate(per_rank):  # a replicated group: any rank's copy
            where[rows] = rank * len(rows) + np.arange(len(rows))
        return where


def sharded_rows(shard_spec: ShardSpec, tp_size: int, tp_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Where rank ``tp_rank``'s rows come from: ``(dst, src)`` int64 arrays,
    ``param[dst] = loaded_weight[src]`` (``mamba_v2_sharded_weight_loader``'s
    rule: per part, ``full_dim / tp_size`` rows from the rank's own slice, or
    from slice 0 when ``duplicate_groups``; rows past the checkpoint's end of
    the part are not in ``dst``)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"mamba_v2_sharded_weight_loader: `tp_rank` {tp_rank} outside [0, {tp_size})")
    dst, src = [], []
    boundary = loaded_boundary = 0
    for full_dim, extra, duplicate_groups in shard_spec:
        shard_size = full_dim // tp_size
        skip = (0 if duplicate_groups else tp_rank) * shard_size
        take = max(min(shard_size, full_dim - extra - skip), 0)
        dst.append(np.arange(boundary, boundary + take))
        src.append(np.arange(loaded_boundary + skip, loaded_boundary + skip + take))
        boundary += shard_size
        loaded_boundary += full_dim - extra
    return np.concatenate(dst), np.concatenate(src)


def mamba_v2_sharded_weight_loader(shard_spec: ShardSpec, tp_size: int,
                                   tp_rank: int) -> Callable[[np.ndarray, np.ndarray], None]:
    """A loader ``loader(param, loaded_weight)`` that copies rank ``tp_rank``'s
    rows of a checkpoint tensor (parts stacked along dim 0 at their
    ``full_dim - extra`` checkpoint sizes) into ``param`` in place
    (``sharded_rows``); rows past the checkpoint's end of a part stay as they were."""
    dst, src = sharded_rows(shard_spec, tp_size, tp_rank)

    def loader(param: np.ndarray, loaded_weight: np.ndarray) -> None:
        expected = sum(full - extra for full, extra, _ in shard_spec)
        if loaded_weight.shape[0] != expected:
            raise ValueError(f"mamba_v2_sharded_weight_loader: `loaded_weight` has {loaded_weight.shape[0]} "
                             f"rows, the shard spec describes {expected}")
        if param.shape[0] != sum(full // tp_size for full, _, _ in shard_spec):
            raise ValueError(f"mamba_v2_sharded_weight_loader: `param` has {param.shape[0]} rows, "
                             f"expected {sum(full // tp_size for full, _, _ in shard_spec)}")
        param[dst] = loaded_weight[src]

    return loader


def shard_mixer_weights(weights: Mapping, dims: MixerDims, tp_rank: int) -> dict:
    """Rank ``tp_rank``'s shard of a mixer checkpoint (Hugging Face / mamba_ssm
    key names, unsharded: ``in_proj.weight (2I + 2GN + H, hidden)``,
    ``conv1d.weight (conv_dim, 1, W)`` or ``(conv_dim, W)``, ``conv1d.bias``,
    ``in_proj.bias``, ``dt_bias``, ``A_log``, ``D`` ``(H,)``, ``norm.weight
    (I,)``, ``out_proj.weight (hidden, I)``, ``out_proj.bias``). Returns the
    same keys with the rank's rows (``out_proj.weight``: columns;
    ``out_proj.bias`` whole on every rank: added once, after the reduction).

    Any array type with numpy indexing (numpy, torch, jax): the shards are
    gathers of the checkpoint's rows (a valid ``MixerDims`` leaves no row of
    a shard unloaded, replicated groups included), on the arrays' device."""
    shard = {}
    for key, value in weights.items():
        if key not in PARAM_SHARD_AXIS:
            raise ValueError(f"shard_mixer_weights: unknown checkpoint key `{key}`")
        rows = dims.checkpoint_rows(key, tp_rank)
        shard[key] = value if rows is None else (
            value[rows] if PARAM_SHARD_AXIS[key] == 0 else value[:, rows])
    return shard


# The axis each checkpoint tensor is sharded on (None: replicated).
PARAM_SHARD_AXIS = {"in_proj.weight": 0, "in_proj.bias": 0, "conv1d.weight": 0, "conv1d.bias": 0,
                    "dt_bias": 0, "A_log": 0, "D": 0, "norm.weight": 0, "out_proj.weight": 1,
                    "out_proj.bias": None}
