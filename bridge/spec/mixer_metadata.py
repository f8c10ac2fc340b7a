"""Per-step forward metadata of a Mamba-2 mixer (the fields of vLLM's
``Mamba2AttentionMetadata`` that the forward reads), built once per batch in
numpy and shared by every layer and both frameworks; and the checkpoint
layout of a mixer's weights (Hugging Face / mamba_ssm key names).

A batch holds ``num_decodes`` decode requests first (1 token each, or
``1 + num_spec`` with speculative decoding), then ``num_prefills`` prefill
requests; rows past ``num_actual_tokens`` are padding (their outputs are
unspecified). A request whose state slot is the null block
(``NULL_BLOCK_ID``) is a padding request: its state is left alone.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from bridge.spec.mixer_sharding import MixerDims
from bridge.spec.ssd_contract import chunk_metadata


@dataclasses.dataclass(frozen=True)
class Mamba2Metadata:
    """Index arrays are numpy int32 (bool for ``has_initial_states_p``), or
    framework arrays after ``map_arrays``.

    num_prefills, num_prefill_tokens, num_decodes, num_decode_tokens: counts.
    query_start_loc_p (num_prefills + 1,): prefill tokens, from 0 at the first prefill token.
    state_indices_tensor_p (num_prefills,), state_indices_tensor_d (num_decodes,) or
        (num_decodes, 1 + num_spec): cache slots (spec decoding: one per token).
    has_initial_states_p (num_prefills,): the prefill resumes a cached state.
    prep_initial_states: any of them does.
    chunk_size, cu_chunk_seqlen_p, seq_idx_p, last_chunk_indices_p: the chunked
        scan's metadata (``bridge.spec.ssd_contract.chunk_metadata``, resumed
        prefills aligned on their computed tokens).
    num_accepted_tokens (num_decodes,), query_start_loc_d (num_decodes + 1,):
        speculative decoding only (else None).

    Prefix caching ("all" mode, ``mamba_block_size`` set): the state indices
    are block tables ``(requests, max_blocks)``; ``block_idx_last_computed_token``
    and ``block_idx_last_scheduled_token`` (decodes, then prefills),
    ``block_idx_first_scheduled_token_p`` and ``num_computed_tokens_p`` as in
    vLLM (``prefix_block_indices``). Derived here once per step rather than
    in every layer's forward: ``block_state_chunks_p`` / ``block_state_slots_p``,
    the chunk (of the chunked scan's intermediate states) whose end is each
    block boundary a prefill crosses, and the slot that stores it.
    """

    num_prefills: int
    num_prefill_tokens: int
    num_decodes: int
    num_decode_tokens: int
    chunk_size: int
    prep_initial_states: bool
    query_start_loc_p: Optional[object] = None
    state_indices_tensor_p: Optional[object] = None
    has_initial_states_p: Optional[object] = None
    cu_chunk_seqlen_p: Optional[object] = None
    seq_idx_p: Optional[object] = None
    last_chunk_indices_p: Optional[object] = None
    state_indices_tensor_d: Optional[object] = None
    num_accepted_tokens: Optional[object] = None
    query_start_loc_d: Optional[object] = None
    mamba_block_size: Optional[int] = None
    block_idx_last_computed_token: Optional[object] = None
    block_idx_last_scheduled_token: Optional[object] = None
    block_idx_first_scheduled_token_p: Optional[object] = None
    num_computed_tokens_p: Optional[object] = None
    block_state_chunks_p: Optional[object] = None
    block_state_slots_p: Optional[object] = None

    ARRAY_FIELDS = ("query_start_loc_p", "state_indices_tensor_p", "has_initial_states_p",
                    "cu_chunk_seqlen_p", "seq_idx_p", "last_chunk_indices_p",
                    "state_indices_tensor_d", "num_accepted_tokens", "query_start_loc_d",
                    "block_idx_last_computed_token", "block_idx_last_scheduled_token",
                    "block_idx_first_scheduled_token_p", "num_computed_tokens_p",
                    "block_state_chunks_p", "block_state_slots_p")

    @property
    def is_mamba_cache_all(self) -> bool:
        return self.mamba_block_size is not None

    @property
    def num_actual_tokens(self) -> int:
        return self.num_decode_tokens + self.num_prefill_tokens

    @property
    def max_decode_query_len(self) -> int:
        """Tokens per decode request (1, or 1 + num_spec)."""
        if self.num_accepted_tokens is None:
            return 1
        return int(self.state_indices_tensor_d.shape[1])

    def map_arrays(self, convert: Callable) -> "Mamba2Metadata":
        """The same metadata with every index array passed through ``convert``
        (e.g. to device tensors once per step, for all layers)."""
        return dataclasses.replace(self, **{
            name: convert(getattr(self, name)) for name in self.ARRAY_FIELDS
            if getattr(self, name) is not None})


def prefix_block_indices(num_computed_tokens, query_lens, block_size: int):
    """Prefix caching ("all" mode): block k of a request holds the state after
    its token ``(k + 1) * block_size - 1`` (the last block: after its last
    token). Returns int32 ``(block_idx_last_computed_token,
    block_idx_first_scheduled_token, block_idx_last_scheduled_token)``: the
    blocks of the last computed token (0 when none), of the first and of
    the last scheduled token."""
    computed = np.asarray(num_computed_tokens, np.int64)
    lens = np.asarray(query_lens, np.int64)
    as_i32 = lambda a: a.astype(np.int32)  # noqa: E731
    return (as_i32(np.maximum(computed - 1, 0) // block_size), as_i32(computed // block_size),
            as_i32((computed + np.maximum(lens, 1) - 1) // block_size))


def build_mamba2_metadata(query_lens: Sequence[int], num_computed_tokens: Sequence[int],
                          state_indices, num_decodes: int, chunk_size: int,
                          num_accepted_tokens: Optional[Sequence[int]] = None,
                          mamba_block_size: Optional[int] = None) -> Mamba2Metadata:
    """Metadata of one batch: ``query_lens``, ``num_computed_tokens`` and
    ``state_indices`` per request (decodes first; ``state_indices (R,)``, or
    ``(R, 1 + num_spec)`` with ``num_accepted_tokens`` given for the
    decodes: spec decoding, the prefills use column 0; or block tables
    ``(R, max_blocks)`` with ``mamba_block_size``: prefix caching, a multiple
    of ``chunk_size``)."""
    lens = np.asarray(query_lens, np.int64)
    computed = np.asarray(num_computed_tokens, np.int64)
    slots = np.asarray(state_indices, np.int32)
    num_requests = len(lens)
    if computed.shape != (num_requests,) or slots.shape[0] != num_requests:
        raise ValueError(f"build_mamba2_metadata: `num_computed_tokens` {computed.shape} and "
                         f"`state_indices` {slots.shape} must have one entry per request ({num_requests})")
    if not 0 <= num_decodes <= num_requests:
        raise ValueError(f"build_mamba2_metadata: `num_decodes` {num_decodes} outside [0, {num_requests}]")
    spec, cache_all = num_accepted_tokens is not None, mamba_block_size is not None
    if spec and cache_all:
        raise ValueError("build_mamba2_metadata: `num_accepted_tokens` with `mamba_block_size` "
                         "(speculative decoding with prefix caching) is not supported")
    if cache_all and (not isinstance(mamba_block_size, int) or mamba_block_size < chunk_size
                      or mamba_block_size % chunk_size):
        raise ValueError(f"build_mamba2_metadata: `mamba_block_size` ({mamba_block_size!r}) must be a "
                         f"multiple of chunk_size ({chunk_size})")
    if (spec or cache_all) != (slots.ndim == 2):
        raise ValueError("build_mamba2_metadata: `state_indices` must be 2-D (one slot per "
                         "speculative token, or a block table) exactly when `num_accepted_tokens` "
                         "or `mamba_block_size` is given")
    decode_lens, prefill_lens = lens[:num_decodes], lens[num_decodes:]
    max_decode = slots.shape[1] if spec else 1
    if (decode_lens != max_decode).any():
        raise ValueError(f"build_mamba2_metadata: decode requests must have {max_decode} tokens "
                         f"each, got `query_lens` {decode_lens.tolist()}")
    if (prefill_lens < 1).any():
        raise ValueError("build_mamba2_metadata: prefill requests need at least one token")
    fields = dict(num_prefills=num_requests - num_decodes, num_prefill_tokens=int(prefill_lens.sum()),
                  num_decodes=num_decodes, num_decode_tokens=int(decode_lens.sum()),
                  chunk_size=chunk_size, prep_initial_states=bool((computed[num_decodes:] > 0).any()))
    as_i32 = lambda a: np.ascontiguousarray(a, dtype=np.int32)  # noqa: E731
    if num_decodes:
        fields["state_indices_tensor_d"] = as_i32(slots[:num_decodes])
        if spec:
            accepted = np.asarray(num_accepted_tokens, np.int32)
            if accepted.shape != (num_decodes,):
                raise ValueError(f"build_mamba2_metadata: `num_accepted_tokens` has shape {accepted.shape}, "
                                 f"expected ({num_decodes},)")
            fields["num_accepted_tokens"] = accepted
            fields["query_start_loc_d"] = as_i32(np.arange(num_decodes + 1) * max_decode)
    if num_requests > num_decodes:
        cu = np.concatenate([[0], np.cumsum(prefill_lens)])
        chunks = chunk_metadata(cu, chunk_size, computed[num_decodes:])
        fields.update(query_start_loc_p=as_i32(cu),
                      state_indices_tensor_p=as_i32(slots[num_decodes:, 0] if spec else slots[num_decodes:]),
                      has_initial_states_p=computed[num_decodes:] > 0,
                      cu_chunk_seqlen_p=chunks.cu_chunk_seqlens, seq_idx_p=chunks.seq_idx,
                      last_chunk_indices_p=chunks.last_chunk_indices)
    if cache_all:
        last_computed, first, last = prefix_block_indices(computed, lens, mamba_block_size)
        if (last >= slots.shape[1]).any():
            raise ValueError(f"build_mamba2_metadata: the block tables have {slots.shape[1]} columns, "
                             f"requests reach block {int(last.max())}")
        fields.update(mamba_block_size=mamba_block_size, block_idx_last_computed_token=last_computed,
                      block_idx_last_scheduled_token=last)
        if num_requests > num_decodes:
            chunk_ends = fields["cu_chunk_seqlen_p"][1:]
            chunk_list, slot_list = [], []
            for q in range(num_requests - num_decodes):
                r = num_decodes + q
                for block in range(first[r], last[r]):
                    end = cu[q] + (block + 1) * mamba_block_size - computed[r]
                    chunk_list.append(int(np.searchsorted(chunk_ends, end)))
                    slot_list.append(slots[r, block])
            fields.update(block_idx_first_scheduled_token_p=first[num_decodes:],
                          num_computed_tokens_p=as_i32(computed[num_decodes:]),
                          block_state_chunks_p=as_i32(chunk_list), block_state_slots_p=as_i32(slot_list))
    return Mamba2Metadata(**fields)


def checkpoint_shapes(dims: MixerDims, hidden_size: int, conv_kernel_size: int, *, use_bias: bool,
                      use_conv_bias: bool, use_rms_norm: bool) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors of a (tp_size 1) mixer by Hugging Face / mamba_ssm name."""
    I, H = dims.intermediate_size, dims.num_heads
    shapes = {"in_proj.weight": (I + dims.conv_dim + H, hidden_size),
              "conv1d.weight": (dims.conv_dim, 1, conv_kernel_size),
              "dt_bias": (H,), "A_log": (H,), "D": (H,), "out_proj.weight": (hidden_size, I)}
    if use_conv_bias:
        shapes["conv1d.bias"] = (dims.conv_dim,)
    if use_bias:
        shapes.update({"in_proj.bias": (I + dims.conv_dim + H,), "out_proj.bias": (hidden_size,)})
    if use_rms_norm:
        shapes["norm.weight"] = (I,)
    return shapes


def check_checkpoint(shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                     prefix: str = "") -> None:
    """ValueError naming the first missing, unexpected or mis-shaped key
    (``conv1d.weight`` may also be 2-D ``(conv_dim, width)``)."""
    for key, shape in expected.items():
        got = shapes.get(prefix + key)
        if got is None:
            raise ValueError(f"MambaMixer2.load_weights: checkpoint lacks `{prefix + key}` {shape}")
        allowed = (shape, (shape[0], shape[2])) if key == "conv1d.weight" else (shape,)
        if tuple(got) not in allowed:
            raise ValueError(f"MambaMixer2.load_weights: `{prefix + key}` has shape {tuple(got)}, "
                             f"expected {shape}")
    extra = sorted(k for k in shapes if k.startswith(prefix) and k[len(prefix):] not in expected)
    if extra:
        raise ValueError(f"MambaMixer2.load_weights: unexpected checkpoint keys {extra}")
