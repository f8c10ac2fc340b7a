"""State shapes of Mamba-type layers and the conv-state layout, as vLLM's
``mamba_utils`` computes them (names and signatures from the spec). Shapes are
per cache block; a cache holds ``(num_blocks, *shape)`` for each state.

Framework-neutral: imports neither torch nor jax.
"""

from __future__ import annotations

import os
from typing import Literal

CONV_STATE_LAYOUT_ENV = "MAMBA_TWIN_CONV_STATE_LAYOUT"
ConvStateLayoutType = Literal["SD", "DS"]
CONV_STATE_LAYOUTS = ("SD", "DS")


def get_conv_state_layout() -> ConvStateLayoutType:
    """The conv-state layout per block, from ``$MAMBA_TWIN_CONV_STATE_LAYOUT``:

    - ``"SD"`` (default): ``(state_len, dim)``, dim contiguous;
    - ``"DS"``: ``(dim, state_len)``, the TP-sharded dim first, like the SSM state.

    Read on every call (vLLM caches it; reading is cheap and lets a process
    switch layouts between caches).
    """
    layout = os.environ.get(CONV_STATE_LAYOUT_ENV)
    if layout is None or layout == "":
        return "SD"
    if layout not in CONV_STATE_LAYOUTS:
        raise ValueError(f"${CONV_STATE_LAYOUT_ENV} is {layout!r}; expected one of {CONV_STATE_LAYOUTS}")
    return layout  # type: ignore[return-value]


def is_conv_state_dim_first() -> bool:
    """True when the conv state is stored as (dim, state_len) per block (DS)."""
    return get_conv_state_layout() == "DS"


def divide(numerator: int, denominator: int, what: str = "numerator") -> int:
    """Exact division for tensor-parallel sharding: ValueError naming ``what``
    when ``denominator`` does not divide it."""
    if denominator < 1:
        raise ValueError(f"tp_world_size must be >= 1, got {denominator}")
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by tp_world_size={denominator}")
    return numerator // denominator


class MambaStateShapeCalculator:
    """Per-block state shapes of each layer type, for one tensor-parallel rank.
    Every method returns a tuple of shapes, conv state(s) first."""

    @classmethod
    def linear_attention_state_shape(cls, num_heads: int, tp_size: int,
                                     head_dim: int) -> tuple[tuple[int, int, int], ...]:
        """((num_heads // tp_size, head_dim, head_dim),) — floor division, as in the spec."""
        return ((num_heads // tp_size, head_dim, head_dim),)

    @staticmethod
    def _conv_shape(tp_world_size: int, dim: int, what: str, state_len: int) -> tuple[int, int]:
        """The conv state of ``dim / tp`` channels: (dim / tp, state_len) in
        the DS layout, (state_len, dim / tp) in SD."""
        dim = divide(dim, tp_world_size, what)
        return (dim, state_len) if is_conv_state_dim_first() else (state_len, dim)

    @classmethod
    def mamba1_state_shape(cls, tp_world_size: int, intermediate_size: int, state_size: int,
                           conv_kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """conv (conv_kernel - 1, intermediate_size / tp) [SD], temporal
        (intermediate_size / tp, state_size)."""
        conv_state_shape = cls._conv_shape(tp_world_size, intermediate_size, "intermediate_size",
                                           conv_kernel - 1)
        return conv_state_shape, (divide(intermediate_size, tp_world_size, "intermediate_size"), state_size)

    @classmethod
    def mamba2_state_shape(cls, tp_world_size: int, intermediate_size: int, n_groups: int,
                           num_heads: int, head_dim: int, state_size: int, conv_kernel: int,
                           num_spec: int = 0) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """conv (conv_kernel - 1 + num_spec, conv_dim / tp) [SD] with
        conv_dim = intermediate_size + 2 * padded_groups * state_size;
        temporal (num_heads / tp, head_dim, state_size).

        Groups are padded to a multiple of the TP size when it does not divide
        them (``extra_groups_for_head_shards``), so that each rank holds the
        groups its heads read; speculative decoding keeps ``num_spec`` extra
        conv positions.
        """
        n_groups = n_groups + cls.extra_groups_for_head_shards(n_groups, tp_world_size)
        conv_state_shape = cls._conv_shape(
            tp_world_size, intermediate_size + 2 * n_groups * state_size,
            "conv_dim (intermediate_size + 2 * n_groups * state_size)", conv_kernel - 1 + num_spec)
        return conv_state_shape, (divide(num_heads, tp_world_size, "num_heads"), head_dim, state_size)

    @classmethod
    def short_conv_state_shape(cls, tp_world_size: int, intermediate_size: int,
                               conv_kernel: int) -> tuple[tuple[int, int]]:
        """((conv_kernel - 1, intermediate_size / tp) [SD],)."""
        return (cls._conv_shape(tp_world_size, intermediate_size, "intermediate_size", conv_kernel - 1),)

    @classmethod
    def extra_groups_for_head_shards(cls, ngroups: int, tp_size: int) -> int:
        """Groups added so that every TP rank holds the groups of its heads:
        0 when tp_size divides ngroups, else tp_size - ngroups (the groups are
        replicated; vLLM supports this for ngroups == 1)."""
        if ngroups % tp_size == 0:
            return 0
        return tp_size - ngroups

    @classmethod
    def gated_delta_net_state_shape(cls, tp_world_size: int, num_k_heads: int, num_v_heads: int,
                                    head_k_dim: int, head_v_dim: int, conv_kernel_size: int,
                                    num_spec: int = 0) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """conv (conv_kernel_size - 1 + num_spec, conv_dim / tp) [SD] with
        conv_dim = 2 * head_k_dim * num_k_heads + head_v_dim * num_v_heads;
        temporal (num_v_heads / tp, head_v_dim, head_k_dim)."""
        conv_state_shape = cls._conv_shape(
            tp_world_size, head_k_dim * num_k_heads * 2 + head_v_dim * num_v_heads,
            "conv_dim (2 * head_k_dim * num_k_heads + head_v_dim * num_v_heads)",
            conv_kernel_size - 1 + num_spec)
        return conv_state_shape, (divide(num_v_heads, tp_world_size, "num_v_heads"), head_v_dim, head_k_dim)

    @classmethod
    def kda_state_shape(cls, tp_world_size: int, num_heads: int, head_dim: int,
                        num_k_heads: int | None = None, head_k_dim: int | None = None,
                        conv_kernel_size: int = 4, num_spec: int = 0,
                        ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int, int]]:
        """(q conv, k conv, v conv, recurrent): q conv (conv_kernel_size - 1,
        num_heads * head_dim / tp) [SD]; k and v conv (conv_kernel_size - 1,
        num_k_heads * head_k_dim / tp) [SD]; recurrent (num_heads / tp,
        head_dim, head_dim). ``num_spec`` is accepted and, as in the spec,
        adds no conv positions."""
        num_k_heads = num_heads if num_k_heads is None else num_k_heads
        head_k_dim = head_dim if head_k_dim is None else head_k_dim
        conv_state_shape = cls._conv_shape(tp_world_size, num_heads * head_dim, "num_heads * head_dim",
                                           conv_kernel_size - 1)
        conv_state_k_shape = cls._conv_shape(tp_world_size, num_k_heads * head_k_dim,
                                             "num_k_heads * head_k_dim", conv_kernel_size - 1)
        recurrent_state_shape = (divide(num_heads, tp_world_size, "num_heads"), head_dim, head_dim)
        return conv_state_shape, conv_state_k_shape, conv_state_k_shape, recurrent_state_shape
