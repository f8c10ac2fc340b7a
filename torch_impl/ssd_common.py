"""What the chunked scan's Triton stages share: the launch-config lookup,
the tile product, softplus and the bounds of a chunk. Mirror:
``jax_impl/ssd_common.py``."""

from __future__ import annotations

from pathlib import Path

import torch

from bridge.spec.launch_config import clip_block
from bridge.spec.ssd_launch_config import SsdLaunchConfigs, StageConfig, tile_sizes
from torch_impl import platform  # before triton: interpreter mode on CPU

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


SSD_CONFIGS = SsdLaunchConfigs("triton", Path(__file__).parent / "configs")


def launch_config(stage: str, device: torch.device) -> StageConfig:
    """The launch parameters of one chunked-scan stage on ``device``
    (``bridge.spec.ssd_launch_config``; files read once per GPU)."""
    return SSD_CONFIGS.get(stage, platform.device_name(device))


def launch(kernel, grid, config: StageConfig, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` with the config's warps and stages."""
    platform.launch(kernel, grid, *args, **meta, num_warps=config.num_warps, num_stages=config.num_stages)


def launch_tiles(kernel, stage: str, device: torch.device, grid, size_m: int, size_n: int,
                 size_k: int, *args, **meta) -> None:
    """Launch a tile stage (2, 4 or 5: ``TileConfig``): its config's caps
    clipped to the (size_m, size_n) output and the size_k reduction, passed
    as BLOCK_SIZE_M/N/K; ``grid(num_tiles)`` places the tile axis."""
    config = launch_config(stage, device)
    block_m, block_n, num_tiles = tile_sizes(config, size_m, size_n)
    launch(kernel, grid(num_tiles), config, *args, BLOCK_SIZE_M=block_m,
           BLOCK_SIZE_N=block_n, BLOCK_SIZE_K=clip_block(size_k, config.BLOCK_SIZE_K), **meta)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied exactly (no TF32): the tests hold fp32 to
    fp32 tolerances. Half-precision inputs use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


# The triton dtype of each floating torch dtype (a ``tl.constexpr`` operand dtype).
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# Triton 3.6's CPU interpreter multiplies bfloat16 operands wrongly; there
# they are widened to float32 first (exact products of the same values).
_WIDEN_BF16_DOTS = tl.constexpr(platform.INTERPRET)


@triton.jit
def tile_dot(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b on the tensor cores, float32 accumulation."""
    if _WIDEN_BF16_DOTS and a.dtype == tl.bfloat16:
        product = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        product = tl.dot(a, b, input_precision=DOT_PRECISION)
    return product


@triton.jit
def softplus(x):
    """log(1 + e^x), x itself past 20 (where they agree in float32)."""
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def tile_offsets(pid, size_n, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):
    """The (M, N) offsets of tile ``pid`` of a grid axis flattened as
    ``pid_m * cdiv(size_n, BLOCK_SIZE_N) + pid_n``."""
    num_n_blocks = tl.cdiv(size_n, BLOCK_SIZE_N)
    offs_m = (pid // num_n_blocks) * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_n = (pid % num_n_blocks) * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    return offs_m, offs_n


@triton.jit
def chunk_bounds(cu_chunk_ptr, chunk, num_tokens, CHUNK_SIZE: tl.constexpr):
    """``(start, length, valid)`` of chunk ``chunk``: its token range clipped
    to [0, num_tokens) and to CHUNK_SIZE tokens, so that no metadata value
    leads a load or store outside the token rows; ``valid`` is False when
    clipping changed the range (0 <= start <= end <= min(T, start + L) fails)."""
    raw_start = tl.load(cu_chunk_ptr + chunk).to(tl.int64)
    raw_end = tl.load(cu_chunk_ptr + chunk + 1).to(tl.int64)
    start = tl.minimum(tl.maximum(raw_start, 0), num_tokens)
    end = tl.minimum(tl.maximum(raw_end, start), tl.minimum(start + CHUNK_SIZE, num_tokens))
    valid = (raw_start == start) & (raw_end == end)
    return start, end - start, valid


@triton.jit
def sequence_of(seq_idx_ptr, chunk, num_seqs):
    """``(seq, row, valid)`` of chunk ``chunk``: its ``seq_idx`` value (int64),
    that value clamped to a row in [0, num_seqs) (no negative wraparound),
    and whether it was in range."""
    seq = tl.load(seq_idx_ptr + chunk).to(tl.int64)
    row = tl.minimum(tl.maximum(seq, 0), tl.maximum(num_seqs - 1, 0))
    return seq, row, (seq >= 0) & (seq < num_seqs)


@triton.jit
def gated_dout(dout_ptr, z_ptr, tok, head, offs_p, stride_dout_tok, stride_dout_head,
               stride_dout_dim, stride_z_tok, stride_z_head, stride_z_dim, mask,
               HAS_Z: tl.constexpr):
    """dout * silu(z) (float32) of one head at token rows ``tok`` and
    columns ``offs_p`` (broadcastable index blocks): the gradient before the
    gate (z_ptr may be None: no pointer arithmetic on it then)."""
    dy = tl.load(dout_ptr + tok * stride_dout_tok + head * stride_dout_head + offs_p * stride_dout_dim,
                 mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + tok * stride_z_tok + head * stride_z_head + offs_p * stride_z_dim,
                    mask=mask, other=0.0).to(tl.float32)
        dy = dy * z * tl.sigmoid(z)
    return dy
