"""What the chunked scan's Pallas stages share: the launch-config lookup,
the tile product, softplus and the bounds of a chunk. Mirror:
``torch_impl/ssd_common.py``."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bridge.spec.launch_config import clip_block
from bridge.spec.ssd_launch_config import SsdLaunchConfigs, StageConfig, tile_sizes
from jax_impl import platform


SSD_CONFIGS = SsdLaunchConfigs("pallas", Path(__file__).parent / "configs")


def launch_config(stage: str) -> StageConfig:
    """The launch parameters of one chunked-scan stage on the default device
    (``bridge.spec.ssd_launch_config``; files read once per GPU)."""
    return SSD_CONFIGS.get(stage, platform.device_name())


def pallas_call(kernel, config: StageConfig, **options):
    """``pl.pallas_call`` of one stage with its launch parameters, the kernel
    traced with ``jax_enable_x64`` off: program ids are int32, and under x64
    Python ints would become int64 and clash with them in indices. The
    operands must then hold no 64-bit values (``int32_metadata``), and the
    kernels spell a constant index ``jnp.int32(i)``: an index left a Python
    int is typed when the call is lowered, which under jit is outside this
    context."""
    call = pl.pallas_call(
        kernel, compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                                     num_stages=config.num_stages),
        interpret=platform.INTERPRET, **options)

    def run(*operands):
        with jax.enable_x64(False):
            return call(*operands)
    return run


def tile_call(stage: str, kernel, size_m: int, size_n: int, size_k: int, grid, statics: dict,
              **options):
    """``pallas_call`` of a tile stage (2, 4 or 5: ``TileConfig``): its
    config's caps clipped to the (size_m, size_n) output and the size_k
    reduction, passed as block_size_m/n/k with ``statics``; ``grid(num_tiles)``
    places the tile axis. Mirror: ``torch_impl.ssd_common.launch_tiles``."""
    config = launch_config(stage)
    block_size_m, block_size_n, num_tiles = tile_sizes(config, size_m, size_n)
    kernel = functools.partial(kernel, block_size_m=block_size_m, block_size_n=block_size_n,
                               block_size_k=clip_block(size_k, config.BLOCK_SIZE_K), **statics)
    return pallas_call(kernel, config, grid=grid(num_tiles), name=f"ssd_{stage}", **options)


def int32_metadata(values, low: int, high: int):
    """Index metadata as int32 for the kernels: int64 values are first
    clipped to [low, high], so that none wraps into range."""
    return values if values.dtype == jnp.int32 else jnp.clip(values, low, high).astype(jnp.int32)


def tile_dot(a, b):
    """(M, K) @ (K, N) on the tensor cores with float32 accumulation; float32
    inputs take the exact (IEEE) path rather than TF32."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def load_rows(ref, rows, index, cols, mask_rows, mask_cols):
    """The (rows, cols) tile of head or group ``index`` of a (T, H|G, cols)
    ``ref``, 0 where masked off (no memory moved there)."""
    return plgpu.load(ref.at[rows, index, cols], mask=mask_rows[:, None] & mask_cols[None, :],
                      other=0.0)


def token_tile(k, start, length: int, block_size_k: int):
    """``(k0, offsets, mask, rows)`` of the k-th (block_size_k,) tile of the
    tokens of a chunk at ``start`` with ``length`` tokens."""
    k0 = k * block_size_k
    offs = k0 + jnp.arange(block_size_k)
    return k0, offs, offs < length, pl.ds(start + k0, block_size_k)


def softplus(x):
    """log(1 + e^x), x itself past 20 (where they agree in float32)."""
    return jnp.where(x <= 20.0, jnp.log1p(jnp.exp(x)), x)


def tile_origin(pid, size_n: int, block_size_m: int, block_size_n: int):
    """The (M, N) origin of tile ``pid`` of a grid axis flattened as
    ``pid_m * cdiv(size_n, block_size_n) + pid_n``."""
    num_blocks_n = pl.cdiv(size_n, block_size_n)
    return (pid // num_blocks_n) * block_size_m, (pid % num_blocks_n) * block_size_n


def chunk_bounds(cu_chunk_ref, chunk, num_tokens: int, chunk_size: int):
    """``(start, length, valid)`` of chunk ``chunk``: its token range clipped
    to [0, num_tokens) and to ``chunk_size`` tokens, so that no metadata
    value leads a load or store outside the token rows; ``valid`` is False
    when clipping changed the range."""
    raw_start, raw_end = cu_chunk_ref[chunk], cu_chunk_ref[chunk + 1]
    start = jnp.clip(raw_start, 0, num_tokens)
    end = jnp.clip(raw_end, start, jnp.minimum(start + chunk_size, num_tokens))
    return start, end - start, (raw_start == start) & (raw_end == end)


def sequence_of(seq_idx_ref, chunk, num_seqs: int):
    """``(seq, row, valid)`` of chunk ``chunk``: its ``seq_idx`` value, that
    value clamped to a row in [0, num_seqs) (no negative wraparound), and
    whether it was in range."""
    seq = seq_idx_ref[chunk]
    return seq, jnp.clip(seq, 0, max(num_seqs - 1, 0)), (seq >= 0) & (seq < num_seqs)


def start_state(end_states_ref, initial_states_ref, seq_idx_ref, chunk, head, rows, cols, mask,
                num_seqs: int):
    """The float32 state entering chunk ``chunk`` for one head, the (rows,
    cols) tile: the previous chunk's end state within a sequence, else the
    sequence's initial state (0 without; NaN for a ``seq_idx`` out of range),
    as the forward's chunk_scan reads it. Loads masked off move no memory."""
    seq, row, seq_ok = sequence_of(seq_idx_ref, chunk, num_seqs)
    starts_seq = (chunk == 0) | (seq_idx_ref[jnp.maximum(chunk - 1, 0)] != seq)
    previous = plgpu.load(end_states_ref.at[jnp.maximum(chunk - 1, 0), head, rows, cols],
                          mask=mask & ~starts_seq, other=0.0).astype(jnp.float32)
    initial = jnp.zeros_like(previous)
    if initial_states_ref is not None:
        initial = plgpu.load(initial_states_ref.at[row, head, rows, cols],
                             mask=mask & starts_seq & seq_ok, other=0.0).astype(jnp.float32)
    return jnp.where(starts_seq, jnp.where(seq_ok, initial, jnp.nan), previous)
