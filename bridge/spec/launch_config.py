"""Tuned launch configurations, looked up the way vLLM's ``mamba_ssm`` does.

A config file holds, for one kernel shape and GPU, the best launch parameters
per *effective batch* (``batch * nheads``, the number of (sequence, head)
programs): ``{"<effective_batch>": {"BLOCK_SIZE_M": 4, "num_warps": 4}, ...}``.
Its name is ``headdim=<H>,dstate=<D>,device_name=<dev>,cache_dtype=<dt>.json``.

Where files are looked for, first hit wins:

1. ``$MAMBA_TWIN_TUNED_CONFIG_FOLDER/<backend>/<op>/<file>`` (user folder),
2. ``<package>/configs/<op>/<file>`` (shipped with the package).

Missing files fall back to a heuristic. ``override`` pins a config, which the
tuning scripts use to time candidates.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

TUNED_CONFIG_FOLDER_ENV = "MAMBA_TWIN_TUNED_CONFIG_FOLDER"

LaunchConfig = tuple[int, int]  # (BLOCK_SIZE_M, num_warps)


def canonical_cache_dtype(cache_dtype: str) -> str:
    """bf16 and fp16 states share configs: the kernel only sees the bit width."""
    return "float16" if cache_dtype == "bfloat16" else cache_dtype


def device_name_key(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3' (both frameworks
    report the same marketing name)."""
    return device_name.replace(" ", "_")


def config_file_name(headdim: int, dstate: int, cache_dtype: str, device_name: str) -> str:
    return (
        f"headdim={headdim},dstate={dstate},"
        f"device_name={device_name},cache_dtype={cache_dtype}.json"
    )


def default_ssu_launch_config(dstate: int, is_blackwell: bool) -> LaunchConfig:
    """Heuristic used when no tuned file exists: wide tiles when dstate is
    small so that a program still moves enough bytes."""
    if dstate <= 16:
        return 32, 4
    if dstate <= 32:
        return 16, 4
    if dstate <= 64:
        return 8, 4
    if is_blackwell:
        return 32, 8
    if dstate <= 128:
        return 4, 4
    return 4, 8


class LaunchConfigTable:
    """Config lookup for one (backend, op) pair, e.g. ("triton", "selective_state_update").
    ``device_name()`` names the current GPU for lookups that name none."""

    def __init__(self, backend: str, op: str, bundled_dir: Path,
                 default: Callable[[int, bool], LaunchConfig], device_name: Callable[[], str]):
        self.backend = backend
        self.op = op
        self.bundled_dir = Path(bundled_dir)
        self._default = default
        self._device_name = device_name
        self._override: LaunchConfig | None = None
        self._cache: dict[tuple, LaunchConfig] = {}

    def search_paths(self, file_name: str) -> list[Path]:
        paths = []
        user_folder = os.environ.get(TUNED_CONFIG_FOLDER_ENV)
        if user_folder:
            paths.append(Path(user_folder) / self.backend / self.op / file_name)
        paths.append(self.bundled_dir / self.op / file_name)
        return paths

    def get_configs(self, headdim: int, dstate: int, cache_dtype: str,
                    device_name: str | None = None) -> dict[int, dict] | None:
        """Tuned {effective_batch: {"BLOCK_SIZE_M", "num_warps"}} for this GPU, or None."""
        file_name = config_file_name(
            headdim, dstate, canonical_cache_dtype(cache_dtype),
            device_name_key(device_name or self._device_name()))
        return _read_first(tuple(self.search_paths(file_name)))

    def lookup(self, headdim: int, dstate: int, batch: int, nheads: int, cache_dtype: str,
               is_blackwell: bool = False, device_name: str | None = None) -> LaunchConfig:
        """(BLOCK_SIZE_M, num_warps) keyed by effective batch = batch * nheads:
        the override, else the tuned entry of the nearest effective batch, else
        the heuristic. Cached per shape key and user folder: no file-system
        work after a key's first call."""
        if self._override is not None:
            return self._override
        device_name = device_name or self._device_name()
        key = (headdim, dstate, batch * nheads, cache_dtype, device_name, is_blackwell,
               os.environ.get(TUNED_CONFIG_FOLDER_ENV))
        config = self._cache.get(key)
        if config is None:
            config = self._cache[key] = self._choose(headdim, dstate, batch * nheads, cache_dtype,
                                                     device_name, is_blackwell)
        return config

    def _choose(self, headdim, dstate, effective_batch, cache_dtype, device_name,
                is_blackwell) -> LaunchConfig:
        configs = self.get_configs(headdim, dstate, cache_dtype, device_name)
        if configs:
            nearest = min(configs, key=lambda key: abs(key - effective_batch))
            return configs[nearest]["BLOCK_SIZE_M"], configs[nearest]["num_warps"]
        return self._default(dstate, is_blackwell)

    @contextlib.contextmanager
    def override(self, config: LaunchConfig) -> Iterator[None]:
        """Pin ``lookup`` to ``config`` inside the context."""
        block_size_m, num_warps = config
        if block_size_m < 1 or block_size_m & (block_size_m - 1):
            raise ValueError(f"config: BLOCK_SIZE_M must be a power of two, got {block_size_m}")
        if num_warps < 1 or num_warps & (num_warps - 1):
            raise ValueError(f"config: num_warps must be a power of two, got {num_warps}")
        previous, self._override = self._override, (int(block_size_m), int(num_warps))
        try:
            yield
        finally:
            self._override = previous


@functools.lru_cache(maxsize=256)
def _read_first(paths: tuple[Path, ...]) -> dict[int, dict] | None:
    for path in paths:
        if path.exists():
            raw = json.loads(path.read_text())
            logger.info("Using launch configs from %s", path)
            # Non-numeric keys (e.g. "triton_version") are notes, not configs.
            return {int(key): value for key, value in raw.items() if key.isdigit()}
    logger.warning("No tuned launch config at %s; using the heuristic.",
                   ", ".join(map(str, paths)))
    return None


def clip_block(size: int, cap: int | None = None) -> int:
    """A tile edge for a dimension of ``size``: the next power of two, at
    least 16 (the smallest tensor-core tile) and at most ``cap`` (masked loads
    take care of the tile's part past ``size``)."""
    edge = 16
    while edge < size:
        edge *= 2
    return edge if cap is None else max(16, min(cap, edge))
