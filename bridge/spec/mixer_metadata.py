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
        spec = m.num_accepted_tokens is not None
        shapes["state_indices_tensor_d"] = ((nd, blocks) if blocks else (nd, 1 + num_spec) if spec
                                            else (nd,))
        if spec:
            shapes.update(num_accepted_tokens=(nd,), query_start_loc_d=(nd + 1,))
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
    for kind, offset in (("d", 0), ("p", m.num_decodes)):
        name = f"state_indices_tensor_{kind}"
        if name not in host:
            continue
        table = np.asarray(host[name], np.int64)
        for q, row in enumerate(table.reshape(len(table), -1)):
            if m.is_mamba_cache_all:
                read = row[host["block_idx_last_computed_token"][offset + q]]
                last = host["block_idx_last_scheduled_token"][offset + q]
                first = host["block_idx_first_scheduled_token_p"][q] if kind == "p" else last
                reads, writes = np.array([read]), row[first:last + 1]
            else:
                reads = writes = row
            rows.append((_field(name), reads[reads != NULL_BLOCK_ID], writes[writes != NULL_BLOCK_ID]))
    return rows


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
    if m.num_accepted_tokens is not None:
        width, accepted = m.max_decode_query_len, host["num_accepted_tokens"]
        if ((accepted < 1) | (accepted > width)).any():
            fail(OP, _field("num_accepted_tokens"), f"must lie in [1, {width}], got {accepted.tolist()}")
        if not np.array_equal(host["query_start_loc_d"], np.arange(m.num_decodes + 1) * width):
            fail(OP, _field("query_start_loc_d"), f"must be 0, {width}, 2 * {width}, ... (one "
                                                  f"request per {width} decode tokens)")
    if m.is_mamba_cache_all:
        blocks = (m.state_indices_tensor_d if m.num_decodes else m.state_indices_tensor_p).shape[1]
        for name in ("block_idx_last_computed_token", "block_idx_last_scheduled_token",
                     "block_idx_first_scheduled_token_p"):
            if name in host and ((host[name] < 0) | (host[name] >= blocks)).any():
                fail(OP, _field(name), f"must hold block-table columns in [0, {blocks})")
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
    the arrays: the debug mode) the values too: slots in range, chunk
    metadata consistent, and one request per slot (no slot written twice,
    none read that another request writes). ValueError naming the field."""
    m = metadata
    if m.chunk_size != chunk_size:
        fail(OP, _field("chunk_size"), f"is {m.chunk_size}, the mixer's chunk_size is {chunk_size}")
    counts = (m.num_decodes, m.num_decode_tokens, m.num_prefills, m.num_prefill_tokens)
    if min(counts) < 0 or (m.num_prefills == 0) != (m.num_prefill_tokens == 0):
        fail(OP, "metadata", f"has inconsistent counts (decodes, their tokens, prefills, their "
                             f"tokens) = {counts}")
    if m.num_decode_tokens != m.num_decodes * m.max_decode_query_len:
        fail(OP, _field("num_decode_tokens"), f"is {m.num_decode_tokens}, expected "
                                              f"{m.max_decode_query_len} per decode request")
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
                          padding: Optional[Sequence[bool]] = None) -> Mamba2Metadata:
    """Metadata of one batch: ``query_lens``, ``num_computed_tokens`` and
    ``state_indices`` per request (decodes first; ``state_indices (R,)``, or
    ``(R, 1 + num_spec)`` with ``num_accepted_tokens`` given for the
    decodes: spec decoding, the prefills use column 0; or block tables
    ``(R, max_blocks)`` with ``mamba_block_size``: prefix caching, a multiple
    of ``chunk_size``). ``padding (R,)``: True for a padding request, whose
    slots are the null block; any other request on the null block is refused."""
    chunk_size = as_int("build_mamba2_metadata", "chunk_size", chunk_size, minimum=1)
    num_decodes = as_int("build_mamba2_metadata", "num_decodes", num_decodes)
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
    if cache_all and (isinstance(mamba_block_size, bool) or not isinstance(mamba_block_size, numbers.Integral)
                      or mamba_block_size < chunk_size or mamba_block_size % chunk_size):
        raise ValueError(f"build_mamba2_metadata: `mamba_block_size` ({mamba_block_size!r}) must be a "
                         f"multiple of chunk_size ({chunk_size})")
    if (spec or cache_all) != (slots.ndim == 2):
        raise ValueError("build_mamba2_metadata: `state_indices` must be 2-D (one slot per "
                         "speculative token, or a block table) exactly when `num_accepted_tokens` "
                         "or `mamba_block_size` is given")
    _check_null_block(slots, lens, computed, padding, mamba_block_size, num_decodes)
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


def _check_null_block(slots, lens, computed, padding, mamba_block_size, num_decodes) -> None:
    """Only requests marked as padding may use the null block (the slots a
    request reads or writes: its row, column 0 for a prefill with
    speculative decoding, or the block-table columns it spans)."""
    marked = np.zeros(len(lens), bool) if padding is None else np.asarray(padding, bool)
    if marked.shape != (len(lens),):
        raise ValueError(f"build_mamba2_metadata: `padding` has shape {marked.shape}, "
                         f"expected ({len(lens)},)")
    used = slots.reshape(len(lens), -1 if len(lens) else 1) == NULL_BLOCK_ID
    if mamba_block_size is not None:
        last_computed, _, last = prefix_block_indices(computed, lens, mamba_block_size)
        columns = np.arange(slots.shape[1])
        used &= (columns >= last_computed[:, None]) & (columns <= last[:, None])
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
