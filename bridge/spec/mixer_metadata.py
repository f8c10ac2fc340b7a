"""Per-step forward metadata of a Mamba-2 mixer (the fields of vLLM's
``Mamba2AttentionMetadata`` that the forward reads), built once per batch in
numpy and shared by every layer and both frameworks; and the checkpoint
layout of a mixer's weights (Hugging Face / mamba_ssm key names).

A batch holds ``num_decodes`` decode requests first (1 token each, or
``1 + num_spec`` with speculative decoding), then ``num_prefills`` prefill
requests; rows past ``num_actual_tokens`` are padding (their outputs are
unspecified). A request whose state slot is the null block
(``NULL_BLOCK_ID``) is a padding request: its state is left alone.

``check_batch`` checks a metadata against one mixer call before anything is
written; both mixers call it first.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from bridge.spec.checks import as_int, dtype_name, expect_dtype, expect_shape, fail, shape_of
from bridge.spec.mixer_sharding import MixerDims
from bridge.spec.ssd_contract import INDEX_DTYPES, SsdLayout, check_chunk_metadata_values, chunk_metadata
from bridge.spec.ssu_contract import NULL_BLOCK_ID

OP = "MambaMixer2"


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

    Both (speculative decoding with prefix caching): the decodes' block
    tables also hold their per-token states. A decode of ``w = 1 + num_spec``
    tokens writes the SSM state after its token t to column
    ``block_idx_last_scheduled_token + t`` and its conv state (every drafted
    input kept) to ``block_idx_last_scheduled_token``; it continues from the
    previous step's, ``block_idx_last_scheduled_token_prev_step (requests,)``
    (decodes, then prefills, as in vLLM): the SSM state of column ``prev +
    num_accepted_tokens - 1`` and the conv state of column ``prev`` read
    ``num_accepted_tokens - 1`` positions in.
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
    block_idx_last_scheduled_token_prev_step: Optional[object] = None

    ARRAY_FIELDS = ("query_start_loc_p", "state_indices_tensor_p", "has_initial_states_p",
                    "cu_chunk_seqlen_p", "seq_idx_p", "last_chunk_indices_p",
                    "state_indices_tensor_d", "num_accepted_tokens", "query_start_loc_d",
                    "block_idx_last_computed_token", "block_idx_last_scheduled_token",
                    "block_idx_first_scheduled_token_p", "num_computed_tokens_p",
                    "block_state_chunks_p", "block_state_slots_p",
                    "block_idx_last_scheduled_token_prev_step")

    @property
    def is_mamba_cache_all(self) -> bool:
        return self.mamba_block_size is not None

    @property
    def num_actual_tokens(self) -> int:
        return self.num_decode_tokens + self.num_prefill_tokens

    @property
    def is_spec_decode(self) -> bool:
        return self.num_accepted_tokens is not None

    @property
    def max_decode_query_len(self) -> int:
        """Tokens per decode request (1, or 1 + num_spec)."""
        if not self.is_spec_decode or not self.num_decodes:
            return 1
        return self.num_decode_tokens // self.num_decodes

    def arrays(self) -> dict:
        """The index arrays given, by field name."""
        return {name: getattr(self, name) for name in self.ARRAY_FIELDS if getattr(self, name) is not None}

    def map_arrays(self, convert: Callable) -> "Mamba2Metadata":
        """The same metadata with every index array passed through ``convert``
        (e.g. to device tensors once per step, for all layers)."""
        return dataclasses.replace(self, **{name: convert(a) for name, a in self.arrays().items()})


def _field(name: str) -> str:
    return f"metadata.{name}"


def _expected_shapes(m: Mamba2Metadata, num_spec: int) -> dict:
    """Shape of every array the metadata's counts call for."""
    nd, npf = m.num_decodes, m.num_prefills
    table = m.state_indices_tensor_d if nd else m.state_indices_tensor_p
    blocks = (shape_of(table) or (0, 0))[-1] if m.is_mamba_cache_all else None
    shapes = {}
    if nd:
        spec = m.is_spec_decode
        shapes["state_indices_tensor_d"] = ((nd, blocks) if blocks else (nd, 1 + num_spec) if spec
                                            else (nd,))
        if spec:
            shapes.update(num_accepted_tokens=(nd,), query_start_loc_d=(nd + 1,))
            if blocks:
                shapes["block_idx_last_scheduled_token_prev_step"] = (nd + npf,)
    if npf:
        chunks = shape_of(m.cu_chunk_seqlen_p)
        if chunks is None or len(chunks) != 1 or chunks[0] < 2:
            fail(OP, _field("cu_chunk_seqlen_p"), f"has shape {chunks}, expected (num_chunks + 1,)")
        shapes.update(query_start_loc_p=(npf + 1,), has_initial_states_p=(npf,),
                      state_indices_tensor_p=(npf, blocks) if blocks else (npf,),
                      seq_idx_p=(chunks[0] - 1,), last_chunk_indices_p=(npf,))
    if blocks:
        shapes.update(block_idx_last_computed_token=(nd + npf,), block_idx_last_scheduled_token=(nd + npf,))
        if npf:
            boundaries = (shape_of(m.block_state_slots_p) or (-1,))[0]
            shapes.update(block_idx_first_scheduled_token_p=(npf,), num_computed_tokens_p=(npf,),
                          block_state_chunks_p=(boundaries,), block_state_slots_p=(boundaries,))
    return shapes


def _slots_per_request(m: Mamba2Metadata, host: Mapping) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(field, slots read, slots written) per request, decodes first, null-block entries left out."""
    rows = []
    width = m.max_decode_query_len
    for kind, offset in (("d", 0), ("p", m.num_decodes)):
        name = f"state_indices_tensor_{kind}"
        if name not in host:
            continue
        table = np.asarray(host[name], np.int64)
        for q, row in enumerate(table.reshape(len(table), -1)):
            if m.is_mamba_cache_all:
                last = host["block_idx_last_scheduled_token"][offset + q]
                if kind == "d" and m.is_spec_decode:  # the previous step's states, this step's per token
                    prev = host["block_idx_last_scheduled_token_prev_step"][q]
                    reads = row[[prev, prev + host["num_accepted_tokens"][q] - 1]]
                    writes = row[last:last + width]
                else:
                    read = row[host["block_idx_last_computed_token"][offset + q]]
                    first = host["block_idx_first_scheduled_token_p"][q] if kind == "p" else last
                    reads, writes = np.array([read]), row[first:last + 1]
            else:
                reads = writes = row
            rows.append((_field(name), reads[reads != NULL_BLOCK_ID], writes[writes != NULL_BLOCK_ID]))
    return rows


def _check_columns(m: Mamba2Metadata, host: Mapping) -> None:
    """Prefix caching: every block-table column the metadata points at lies
    in the tables (a speculative decode's, with its per-token columns after it)."""
    nd = m.num_decodes
    blocks = (m.state_indices_tensor_d if nd else m.state_indices_tensor_p).shape[1]
    tail = m.max_decode_query_len - 1
    ranges = [(name, host.get(name), blocks) for name in ("block_idx_last_computed_token",
                                                          "block_idx_first_scheduled_token_p")]
    last = host["block_idx_last_scheduled_token"]
    ranges += [("block_idx_last_scheduled_token", last[:nd], blocks - tail),
               ("block_idx_last_scheduled_token", last[nd:], blocks)]
    if m.is_spec_decode:
        ranges.append(("block_idx_last_scheduled_token_prev_step",
                       host["block_idx_last_scheduled_token_prev_step"][:nd], blocks - tail))
    for name, columns, limit in ranges:
        if columns is not None and ((columns < 0) | (columns >= limit)).any():
            after = (f" (a speculative decode's per-token states take the {tail} columns after "
                     f"its own)" if limit < blocks else "")
            fail(OP, _field(name), f"must hold block-table columns in [0, {limit}){after}, got "
                                   f"{np.asarray(columns).tolist()[:8]}")


def _check_values(m: Mamba2Metadata, host: Mapping, num_slots: int, chunk_size: int) -> None:
    """Value checks on host (numpy) copies of the metadata's arrays."""
    if m.num_prefills:
        renames = {"cu_seqlens": "query_start_loc_p", "cu_chunk_seqlens": "cu_chunk_seqlen_p",
                   "seq_idx": "seq_idx_p", "last_chunk_indices": "last_chunk_indices_p"}
        layout = SsdLayout(num_tokens=m.num_prefill_tokens, nheads=1, headdim=1, ngroups=1, dstate=1,
                           num_seqs=m.num_prefills, num_chunks=len(host["seq_idx_p"]),
                           chunk_size=chunk_size, D_per_head=False)
        try:
            check_chunk_metadata_values(layout, **{arg: host[name] for arg, name in renames.items()})
        except ValueError as error:  # named as the caller passed them
            message = str(error).split(": ", 1)[-1]
            for arg, name in renames.items():
                message = message.replace(f"`{arg}`", f"`{_field(name)}`")
            raise ValueError(f"{OP}: {message}") from None
    if m.is_spec_decode and m.num_decodes:
        width, accepted = m.max_decode_query_len, host["num_accepted_tokens"]
        if ((accepted < 1) | (accepted > width)).any():
            fail(OP, _field("num_accepted_tokens"), f"must lie in [1, {width}], got {accepted.tolist()}")
        if not np.array_equal(host["query_start_loc_d"], np.arange(m.num_decodes + 1) * width):
            fail(OP, _field("query_start_loc_d"), f"must be 0, {width}, 2 * {width}, ... (one "
                                                  f"request per {width} decode tokens)")
    if m.is_mamba_cache_all:
        _check_columns(m, host)
        if "block_state_chunks_p" in host:
            chunks = host["block_state_chunks_p"]
            if ((chunks < 0) | (chunks >= len(host["seq_idx_p"]))).any():
                fail(OP, _field("block_state_chunks_p"), "must hold chunk numbers of this batch")
            slots = host["block_state_slots_p"]
            if ((slots < 0) | (slots >= num_slots)).any():
                fail(OP, _field("block_state_slots_p"), f"must hold slots in [0, {num_slots})")
    # One request per slot in a call: no slot written twice, none read that another request writes.
    owners = {}
    requests = _slots_per_request(m, host)
    for r, (name, reads, writes) in enumerate(requests):
        outside = np.concatenate([reads, writes])
        outside = outside[(outside < 0) | (outside >= num_slots)]
        if len(outside):
            fail(OP, name, f"holds slot {int(outside[0])} (request {r}) outside the cache's "
                           f"[0, {num_slots})")
        for slot in writes.tolist():
            if slot in owners:
                fail(OP, name, f"gives slot {slot} to two writes in one call (requests "
                               f"{owners[slot]} and {r}, counting decodes first)")
            owners[slot] = r
    for r, (name, reads, _) in enumerate(requests):
        for slot in reads.tolist():
            if owners.get(slot, r) != r:
                fail(OP, name, f"has request {r} read slot {slot}, which request {owners[slot]} "
                               f"writes in the same call (counting decodes first)")


def check_batch(metadata: Mamba2Metadata, *, num_tokens: int, num_slots: int, chunk_size: int,
                num_spec: int, host: Optional[Mapping] = None) -> None:
    """Checks ``metadata`` against one mixer call (``num_tokens`` rows of
    ``hidden_states``, ``num_slots`` cache blocks) before anything is written:
    the counts and every array's shape always; with ``host`` (numpy copies of
    the arrays: the debug mode) the values too: slots and block-table
    columns in range, chunk metadata consistent, and one request per slot
    (no slot written twice, none read that another request writes).
    ValueError naming the field."""
    m = metadata
    if m.chunk_size != chunk_size:
        fail(OP, _field("chunk_size"), f"is {m.chunk_size}, the mixer's chunk_size is {chunk_size}")
    counts = (m.num_decodes, m.num_decode_tokens, m.num_prefills, m.num_prefill_tokens)
    if min(counts) < 0 or (m.num_prefills == 0) != (m.num_prefill_tokens == 0):
        fail(OP, "metadata", f"has inconsistent counts (decodes, their tokens, prefills, their "
                             f"tokens) = {counts}")
    width = 1 + num_spec if m.is_spec_decode else 1
    if m.num_decode_tokens != m.num_decodes * width:
        fail(OP, _field("num_decode_tokens"), f"is {m.num_decode_tokens}, expected {width} per decode "
                                              f"request (the mixer's num_spec is {num_spec})")
    if num_tokens < m.num_actual_tokens:
        fail(OP, "hidden_states", f"has {num_tokens} tokens, the metadata schedules "
                                  f"{m.num_actual_tokens}")
    for name, shape in _expected_shapes(m, num_spec).items():
        expect_shape(OP, _field(name), shape_of(getattr(m, name)), shape)
        expect_dtype(OP, _field(name), dtype_name(getattr(m, name)),
                     ("bool",) if name == "has_initial_states_p" else INDEX_DTYPES)
    if host is not None:
        _check_values(m, {k: np.asarray(v) for k, v in host.items()}, num_slots, chunk_size)


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
                          mamba_block_size: Optional[int] = None,
                          padding: Optional[Sequence[bool]] = None,
                          prev_last_scheduled_idx: Optional[Sequence[int]] = None) -> Mamba2Metadata:
    """Metadata of one batch: ``query_lens``, ``num_computed_tokens`` and
    ``state_indices`` per request (decodes first; ``state_indices (R,)``, or
    ``(R, 1 + num_spec)`` with ``num_accepted_tokens`` given for the
    decodes: spec decoding, the prefills use column 0; or block tables
    ``(R, max_blocks)`` with ``mamba_block_size``: prefix caching, a multiple
    of ``chunk_size``). ``padding (R,)``: True for a padding request, whose
    slots are the null block; any other request on the null block is refused.

    Both (speculative decoding with prefix caching): block tables, a
    decode's wide enough for the ``1 + num_spec`` columns of its per-token
    states after its last scheduled block and after the previous step's
    (see ``Mamba2Metadata``); ``prev_last_scheduled_idx (R,)``: the column
    of each request's last scheduled token in the previous step where that
    step was a speculative decode of it, -1 elsewhere (the default: then
    the column of the last computed token, as vLLM falls back)."""
    op = "build_mamba2_metadata"
    chunk_size = as_int(op, "chunk_size", chunk_size, minimum=1)
    num_decodes = as_int(op, "num_decodes", num_decodes)
    lens = np.asarray(query_lens, np.int64)
    computed = np.asarray(num_computed_tokens, np.int64)
    slots = np.asarray(state_indices, np.int32)
    num_requests = len(lens)
    if computed.shape != (num_requests,) or slots.shape[0] != num_requests:
        raise ValueError(f"{op}: `num_computed_tokens` {computed.shape} and `state_indices` "
                         f"{slots.shape} must have one entry per request ({num_requests})")
    if not 0 <= num_decodes <= num_requests:
        raise ValueError(f"{op}: `num_decodes` {num_decodes} outside [0, {num_requests}]")
    spec, cache_all = num_accepted_tokens is not None, mamba_block_size is not None
    if cache_all and (isinstance(mamba_block_size, bool) or not isinstance(mamba_block_size, numbers.Integral)
                      or mamba_block_size < chunk_size or mamba_block_size % chunk_size):
        raise ValueError(f"{op}: `mamba_block_size` ({mamba_block_size!r}) must be a multiple of "
                         f"chunk_size ({chunk_size})")
    if (spec or cache_all) != (slots.ndim == 2):
        raise ValueError(f"{op}: `state_indices` must be 2-D (one slot per speculative token, or a "
                         "block table) exactly when `num_accepted_tokens` or `mamba_block_size` is given")
    if prev_last_scheduled_idx is not None and not (spec and cache_all):
        raise ValueError(f"{op}: `prev_last_scheduled_idx` belongs to speculative decoding with "
                         "prefix caching (`num_accepted_tokens` and `mamba_block_size`)")
    decode_lens, prefill_lens = lens[:num_decodes], lens[num_decodes:]
    width = 1
    if spec:  # a block table's width says nothing of the decodes' tokens
        width = max(int(decode_lens.max(initial=1)), 1) if cache_all else slots.shape[1]
    if (decode_lens != width).any():
        raise ValueError(f"{op}: decode requests must have {width} tokens each, got `query_lens` "
                         f"{decode_lens.tolist()}")
    if (prefill_lens < 1).any():
        raise ValueError(f"{op}: prefill requests need at least one token")
    spans = prev_step = None
    if cache_all:
        last_computed, first, last = prefix_block_indices(computed, lens, mamba_block_size)
        spans = [last_computed.astype(np.int64), last.astype(np.int64)]
        if spec:
            given = np.full(num_requests, -1) if prev_last_scheduled_idx is None else np.asarray(
                prev_last_scheduled_idx)
            if given.shape != (num_requests,) or given.dtype.kind not in "iu":
                raise ValueError(f"{op}: `prev_last_scheduled_idx` must be integer ({num_requests},), "
                                 f"got {given.dtype} of shape {given.shape}")
            prev_step = np.where(given >= 0, given, last_computed).astype(np.int32)
            # A decode spans the previous step's per-token columns and this step's.
            spans[0][:num_decodes] = np.minimum(prev_step, last)[:num_decodes]
            spans[1][:num_decodes] = np.maximum(prev_step, last)[:num_decodes] + width - 1
        if (spans[1] >= slots.shape[1]).any():
            raise ValueError(f"{op}: the block tables have {slots.shape[1]} columns, requests reach "
                             f"column {int(spans[1].max())}")
    _check_null_block(slots, padding, spans, num_decodes)
    fields = dict(num_prefills=num_requests - num_decodes, num_prefill_tokens=int(prefill_lens.sum()),
                  num_decodes=num_decodes, num_decode_tokens=int(decode_lens.sum()),
                  chunk_size=chunk_size, prep_initial_states=bool((computed[num_decodes:] > 0).any()))
    as_i32 = lambda a: np.ascontiguousarray(a, dtype=np.int32)  # noqa: E731
    if num_decodes:
        fields["state_indices_tensor_d"] = as_i32(slots[:num_decodes])
        if spec:
            accepted = np.asarray(num_accepted_tokens, np.int32)
            if accepted.shape != (num_decodes,):
                raise ValueError(f"{op}: `num_accepted_tokens` has shape {accepted.shape}, "
                                 f"expected ({num_decodes},)")
            fields["num_accepted_tokens"] = accepted
            fields["query_start_loc_d"] = as_i32(np.arange(num_decodes + 1) * width)
            if cache_all:
                fields["block_idx_last_scheduled_token_prev_step"] = prev_step
    if num_requests > num_decodes:
        cu = np.concatenate([[0], np.cumsum(prefill_lens)])
        chunks = chunk_metadata(cu, chunk_size, computed[num_decodes:])
        fields.update(query_start_loc_p=as_i32(cu),
                      state_indices_tensor_p=as_i32(slots[num_decodes:, 0] if spec and not cache_all
                                                    else slots[num_decodes:]),
                      has_initial_states_p=computed[num_decodes:] > 0,
                      cu_chunk_seqlen_p=chunks.cu_chunk_seqlens, seq_idx_p=chunks.seq_idx,
                      last_chunk_indices_p=chunks.last_chunk_indices)
    if cache_all:
        fields.update(mamba_block_size=int(mamba_block_size), block_idx_last_computed_token=last_computed,
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


def _check_null_block(slots, padding, spans, num_decodes) -> None:
    """Only requests marked as padding may use the null block (the slots a
    request reads or writes: its row, column 0 for a prefill with
    speculative decoding, or the block-table columns it spans, ``spans``
    (first, last) per request)."""
    num_requests = len(slots)
    marked = np.zeros(num_requests, bool) if padding is None else np.asarray(padding, bool)
    if marked.shape != (num_requests,):
        raise ValueError(f"build_mamba2_metadata: `padding` has shape {marked.shape}, "
                         f"expected ({num_requests},)")
    used = slots.reshape(num_requests, -1 if num_requests else 1) == NULL_BLOCK_ID
    if spans is not None:
        columns = np.arange(slots.shape[1])
        used &= (columns >= spans[0][:, None]) & (columns <= spans[1][:, None])
    else:
        used[num_decodes:, 1:] = False
    bad = np.flatnonzero(used.any(axis=1) & ~marked)
    if len(bad):
        raise ValueError(f"build_mamba2_metadata: requests {bad.tolist()} use the null block "
                         f"(slot {NULL_BLOCK_ID}) but are not marked as `padding`")


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


def check_checkpoint(weights: Mapping, expected: Mapping[str, tuple[int, ...]], prefix: str = "") -> None:
    """ValueError naming the first missing, unexpected, mis-shaped or complex
    tensor of ``weights`` (torch, jax or numpy arrays by key; ``conv1d.weight``
    may also be 2-D ``(conv_dim, width)``)."""
    for key, shape in expected.items():
        got = shape_of(weights.get(prefix + key))
        if got is None:
            raise ValueError(f"MambaMixer2.load_weights: checkpoint lacks `{prefix + key}` {shape}")
        allowed = (shape, (shape[0], shape[2])) if key == "conv1d.weight" else (shape,)
        if tuple(got) not in allowed:
            raise ValueError(f"MambaMixer2.load_weights: `{prefix + key}` has shape {tuple(got)}, "
                             f"expected {shape}")
        if "complex" in dtype_name(weights[prefix + key]):
            raise ValueError(f"MambaMixer2.load_weights: `{prefix + key}` is complex "
                             f"({dtype_name(weights[prefix + key])}); the weights are real")
    extra = sorted(k for k in weights if k.startswith(prefix) and k[len(prefix):] not in expected)
    if extra:
        raise ValueError(f"MambaMixer2.load_weights: unexpected checkpoint keys {extra}")
