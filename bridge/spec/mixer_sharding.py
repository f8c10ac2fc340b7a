"""Tensor-parallel sharding of a Mamba-2 mixer, as vLLM's ``MambaMixer2``
does it, in numpy (framework-neutral; the mixers use ``MixerDims`` with
``tp_size=1`` to check their configuration).

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


def mamba_v2_sharded_weight_loader(shard_spec: ShardSpec, tp_size: int,
                                   tp_rank: int) -> Callable[[np.ndarray, np.ndarray], None]:
    """A loader ``loader(param, loaded_weight)`` that copies rank ``tp_rank``'s
    rows of a checkpoint tensor (parts stacked along dim 0 at their
    ``full_dim - extra`` checkpoint sizes) into ``param`` in place: per part,
    ``full_dim / tp_size`` rows, from the rank's own slice, or from slice 0 when
    ``duplicate_groups`` (a replicated group); rows past the checkpoint's end
    of the part stay as they were."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"mamba_v2_sharded_weight_loader: `tp_rank` {tp_rank} outside [0, {tp_size})")

    def loader(param: np.ndarray, loaded_weight: np.ndarray) -> None:
        expected = sum(full - extra for full, extra, _ in shard_spec)
        if loaded_weight.shape[0] != expected:
            raise ValueError(f"mamba_v2_sharded_weight_loader: `loaded_weight` has {loaded_weight.shape[0]} "
                             f"rows, the shard spec describes {expected}")
        if param.shape[0] != sum(full // tp_size for full, _, _ in shard_spec):
            raise ValueError(f"mamba_v2_sharded_weight_loader: `param` has {param.shape[0]} rows, "
                             f"expected {sum(full // tp_size for full, _, _ in shard_spec)}")
        boundary = loaded_boundary = 0
        for full_dim, extra, duplicate_groups in shard_spec:
            shard_size = full_dim // tp_size
            skip = (0 if duplicate_groups else tp_rank) * shard_size
            take = min(shard_size, full_dim - extra - skip)
            start = loaded_boundary + skip
            param[boundary:boundary + take] = loaded_weight[start:start + take]
            boundary += shard_size
            loaded_boundary += full_dim - extra

    return loader


def shard_mixer_weights(weights: Mapping[str, np.ndarray], dims: MixerDims,
                        tp_rank: int) -> dict[str, np.ndarray]:
    """Rank ``tp_rank``'s shard of a mixer checkpoint (Hugging Face / mamba_ssm
    key names, unsharded: ``in_proj.weight (2I + 2GN + H, hidden)``,
    ``conv1d.weight (conv_dim, 1, W)`` or ``(conv_dim, W)``, ``conv1d.bias``,
    ``in_proj.bias``, ``dt_bias``, ``A_log``, ``D`` ``(H,)``, ``norm.weight
    (I,)``, ``out_proj.weight (hidden, I)``, ``out_proj.bias``). Returns the
    same keys with the rank's rows (``out_proj.weight``: columns;
    ``out_proj.bias`` only on rank 0, the partial sums' owner)."""
    tp = dims.tp_size

    def merged(key, spec):
        full = np.asarray(weights[key])
        param = np.zeros((sum(f // tp for f, _, _ in spec),) + full.shape[1:], full.dtype)
        mamba_v2_sharded_weight_loader(spec, tp, tp_rank)(param, full)
        return param

    def rows(key, size):
        return np.asarray(weights[key])[tp_rank * size:(tp_rank + 1) * size]

    shard = {"in_proj.weight": merged("in_proj.weight", dims.in_proj_shard_spec()),
             "conv1d.weight": merged("conv1d.weight", dims.conv_shard_spec())}
    for key, spec in (("in_proj.bias", dims.in_proj_shard_spec()), ("conv1d.bias", dims.conv_shard_spec())):
        if key in weights:
            shard[key] = merged(key, spec)
    for key in ("dt_bias", "A_log", "D"):
        shard[key] = rows(key, dims.local("num_heads"))
    channels = dims.local("intermediate_size")
    if "norm.weight" in weights:
        shard["norm.weight"] = rows("norm.weight", channels)
    shard["out_proj.weight"] = np.asarray(weights["out_proj.weight"])[
        :, tp_rank * channels:(tp_rank + 1) * channels]
    if "out_proj.bias" in weights and tp_rank == 0:
        shard["out_proj.bias"] = np.asarray(weights["out_proj.bias"])
    return shard
