"""The chunked scan's launch configs: one frozen config per kernel stage.

The stages, numbered and named the same in both packages (files
``torch_impl/ssd_*.py`` and their mirrors ``jax_impl/ssd_*.py``):

    1. chunk_cumsum   dt -> processed dt and the cumulative decay per chunk   ssd_chunk_state
    2. chunk_state    each chunk's state from a zero start (tensor cores)     ssd_chunk_state
    3. state_passing  carry states across chunks and sequences                ssd_state_passing
    4. bmm_chunk      C B^T per chunk and group (tensor cores)                ssd_bmm
    5. chunk_scan     outputs from the start state and the chunk             ssd_chunk_scan

and the backward's (reverse order): chunk_scan_bwd_dstates (d start state of
every chunk from the outputs; tensor cores), state_passing_bwd (carry the state
gradient back across chunks), chunk_scan_bwd (dx, ddt, dB, dC and the decay
gradient; C B^T recomputed per tile, tensor cores), chunk_cumsum_bwd (decay
gradient -> ddt, dA, d dt_bias), each beside its forward stage's file.

A tuned file for one GPU, ``<folder>/mamba_chunk_scan_combined/device_name=<dev>.json``
(``{stage: {field: value}}``), replaces a stage's default; folders are looked
up as for the state update (``bridge.spec.launch_config.config_folders``:
``$MAMBA_TWIN_TUNED_CONFIG_FOLDER/<backend>``, the package's ``configs``, the
user cache ``<cache>/<backend>``, first file found wins), so that
``experiments.tune_ssd --save-configs --output-dir <user cache>`` tunes this
GPU for good. Nothing is autotuned on first use. Files are read once per
(device, folders).
The block sizes are caps: each launcher clips them to the problem (and to
>= 16, the smallest tensor-core tile) so that small shapes still launch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Iterator, Mapping, Union

from bridge.spec.launch_config import clip_block, config_folders, device_name_key, folder_env

logger = logging.getLogger(__name__)

SSD_OP = "mamba_chunk_scan_combined"


@dataclasses.dataclass(frozen=True)
class ChunkCumsumConfig:
    """Stage 1: heads per program; the whole chunk is one tile along the tokens."""
    BLOCK_SIZE_H: int = 16
    num_warps: int = 4
    num_stages: int = 1


@dataclasses.dataclass(frozen=True)
class StatePassingConfig:
    """Stage 3: a (headdim, dstate) tile carried across the chunks of one
    head; small tiles, many programs, so that enough loads are in flight."""
    BLOCK_SIZE_M: int = 32
    BLOCK_SIZE_N: int = 32
    num_warps: int = 4
    num_stages: int = 1


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Stages 2, 4 and 5: an (M, N) output tile with K running over a
    reduction (stage 2: a (headdim, dstate) tile of a chunk's state over its
    tokens; 4: a (chunk, chunk) tile of C B^T over dstate; 5: a (tokens,
    headdim) tile of the output over the chunk's earlier tokens)."""
    BLOCK_SIZE_M: int
    BLOCK_SIZE_N: int
    BLOCK_SIZE_K: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class ChunkScanBwdConfig:
    """The backward's chunk_scan_bwd: a program owns BLOCK_SIZE_M tokens of a
    chunk (all of headdim and dstate) and walks the chunk's other tokens in
    tiles of BLOCK_SIZE_K, recomputing C B^T tile by tile."""
    BLOCK_SIZE_M: int = 64
    BLOCK_SIZE_K: int = 64
    num_warps: int = 8
    num_stages: int = 1


StageConfig = Union[ChunkCumsumConfig, StatePassingConfig, TileConfig, ChunkScanBwdConfig]

# In stage order.
DEFAULT_STAGE_CONFIGS: Mapping[str, StageConfig] = {
    "chunk_cumsum": ChunkCumsumConfig(),
    "chunk_state": TileConfig(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=32, num_warps=4,
                              num_stages=3),
    "state_passing": StatePassingConfig(),
    "bmm_chunk": TileConfig(BLOCK_SIZE_M=64, BLOCK_SIZE_N=64, BLOCK_SIZE_K=64, num_warps=4,
                            num_stages=3),
    "chunk_scan": TileConfig(BLOCK_SIZE_M=64, BLOCK_SIZE_N=64, BLOCK_SIZE_K=32, num_warps=4,
                             num_stages=2),
    # The backward (issue 12), stage names shared by both packages.
    "chunk_scan_bwd_dstates": TileConfig(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=32,
                                         num_warps=4, num_stages=3),
    "state_passing_bwd": StatePassingConfig(),
    "chunk_scan_bwd": ChunkScanBwdConfig(),
    # Triton splits stage chunk_scan_bwd in two: dC and the decay's gradient
    # from C are the second kernel (one program per block of query tokens).
    "chunk_scan_bwd_dC": ChunkScanBwdConfig(BLOCK_SIZE_K=32),
    "chunk_cumsum_bwd": ChunkCumsumConfig(),
}
STAGES = tuple(DEFAULT_STAGE_CONFIGS)


def tile_sizes(config: StageConfig, size_m: int, size_n: int) -> tuple[int, int, int]:
    """``(block_m, block_n, num_tiles)``: the config's M and N caps clipped to
    an (size_m, size_n) problem (``clip_block``) and how many tiles cover it."""
    block_m = clip_block(size_m, config.BLOCK_SIZE_M)
    block_n = clip_block(size_n, config.BLOCK_SIZE_N)
    return block_m, block_n, -(-size_m // block_m) * -(-size_n // block_n)


def ssd_config_file_name(device_name: str) -> str:
    return f"device_name={device_name_key(device_name)}.json"


def stage_config(stage: str, config: Union[StageConfig, Mapping[str, int]]) -> StageConfig:
    """``config`` (a stage config or a ``{field: value}`` dict) as the stage's
    frozen config; ValueError naming what is wrong."""
    if stage not in DEFAULT_STAGE_CONFIGS:
        raise ValueError(f"stage: unknown chunked-scan stage {stage!r}; stages: {', '.join(STAGES)}")
    config_type = type(DEFAULT_STAGE_CONFIGS[stage])
    if isinstance(config, config_type):
        return config
    fields = {f.name for f in dataclasses.fields(config_type)}
    given = dict(config)
    missing, unknown = fields - set(given), set(given) - fields
    if missing or unknown:
        raise ValueError(f"config: stage {stage!r} takes {', '.join(sorted(fields))}; "
                         f"missing {sorted(missing)}, unknown {sorted(unknown)}")
    return config_type(**{k: int(v) for k, v in given.items()})


class SsdLaunchConfigs:
    """The per-stage launch configs of one backend (``"triton"`` or ``"pallas"``)."""

    def __init__(self, backend: str, bundled_dir: Path):
        self.backend = backend
        self.bundled_dir = Path(bundled_dir)
        self._overrides: dict[str, StageConfig] = {}

    def get(self, stage: str, device_name: str) -> StageConfig:
        """The override, else the tuned entry for this GPU, else the default."""
        override = self._overrides.get(stage)
        if override is not None:
            return override
        return _stage_configs(self.backend, self.bundled_dir, device_name, folder_env())[stage]

    def file_path(self, device_name: str, folder: Path | None = None) -> Path:
        """Where the tuned file for this GPU lives under ``folder`` (the
        package's by default), as the tuner writes it."""
        return Path(folder or self.bundled_dir) / SSD_OP / ssd_config_file_name(device_name)

    @contextlib.contextmanager
    def override(self, stage: str, config: Union[StageConfig, Mapping[str, int]]) -> Iterator[None]:
        """Pin ``get(stage, ...)`` to ``config`` inside the context (the tuner's hook)."""
        pinned = stage_config(stage, config)
        previous = self._overrides.get(stage)
        self._overrides[stage] = pinned
        try:
            yield
        finally:
            if previous is None:
                del self._overrides[stage]
            else:
                self._overrides[stage] = previous


@functools.lru_cache(maxsize=64)
def _stage_configs(backend: str, bundled_dir: Path, device_name: str,
                   env: tuple) -> dict[str, StageConfig]:
    """Every stage's config for one GPU: the first tuned file found, over the
    defaults (``env``: ``folder_env()``, the cache key of the folders)."""
    configs = dict(DEFAULT_STAGE_CONFIGS)
    for folder in config_folders(backend, bundled_dir):
        path = folder / SSD_OP / ssd_config_file_name(device_name)
        if path.exists():
            logger.info("Using chunked-scan launch configs from %s", path)
            tuned = json.loads(path.read_text())
            configs.update({stage: stage_config(stage, tuned[stage]) for stage in STAGES if stage in tuned})
            break
    return configs
