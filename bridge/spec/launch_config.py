"""Launch configurations of the state update, looked up the way vLLM's
``mamba_ssm`` does, tuned on first use where nothing is shipped.

A config file holds, for one kernel shape and GPU, the best launch parameters
per *effective batch* (``batch * nheads``, the number of (sequence, head)
rows): ``{"<effective_batch>": {"BLOCK_SIZE_M": 4, "num_warps": 4}, ...}``
(non-numeric keys are notes). Its name is
``headdim=<H>,dstate=<D>,device_name=<dev>,cache_dtype=<dt>.json``.

Where a config comes from, first hit wins (``config_folders``):

1. ``$MAMBA_TWIN_TUNED_CONFIG_FOLDER/<backend>/<op>/<file>`` (override folder),
2. ``<package>/configs/<op>/<file>`` (shipped with the package),
3. ``<user cache>/<backend>/<op>/<file>`` (``$XDG_CACHE_HOME/mamba_twin``, else
   ``~/.cache/mamba_twin``: what autotuning and the warm-up write; tuner
   files from ``experiments.tune_ssu --output-dir <user cache>`` read alike),
4. with ``$MAMBA_TWIN_AUTOTUNE=1`` (or the explicit warm-up): a one-time
   autotune on scratch buffers (never the caller's state), written to 3.,
5. the heuristic ``default_ssu_launch_config``.

An entry of the nearest effective batch answers from a file; autotuning adds
the entry of the batch's power-of-two bucket to the user cache when missing.
It never runs under CUDA-graph capture, torch.compile or JAX tracing (the
frameworks' tuners say when): there the user cache's nearest entry, else the
heuristic, answers, with a one-time warning. ``override`` pins a config (the tuners' hook).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Protocol, Sequence

import numpy as np

from bridge.spec import checks

logger = logging.getLogger(__name__)

TUNED_CONFIG_FOLDER_ENV = "MAMBA_TWIN_TUNED_CONFIG_FOLDER"
AUTOTUNE_ENV = "MAMBA_TWIN_AUTOTUNE"
CACHE_HOME_ENV = "XDG_CACHE_HOME"
STATE_DTYPES = ("float32", "float16", "bfloat16")
WARMUP_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# The heuristic's rule (see default_ssu_launch_config).
TARGET_PROGRAMS = 20_000
MAX_TILE_ELEMENTS = 64 * 128  # the largest winning (BLOCK_SIZE_M, dstate) tile measured
# Scratch state a timing rotates through: more than twice the L2 of an
# H100 / H200 / B200, so the timed steps read their state from memory.
SCRATCH_ROTATE_BYTES = 256 * 2**20
MAX_SCRATCH_SETS = 64

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


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mamba_twin``, else ``~/.cache/mamba_twin``."""
    return Path(os.environ.get(CACHE_HOME_ENV) or Path.home() / ".cache") / "mamba_twin"


def folder_env() -> tuple[Optional[str], Optional[str]]:
    """The variables that move the config folders (part of every cache key)."""
    return os.environ.get(TUNED_CONFIG_FOLDER_ENV), os.environ.get(CACHE_HOME_ENV)


def config_folders(backend: str, bundled_dir: Path) -> list[Path]:
    """The folders searched, first hit wins: override, shipped, user cache."""
    override = os.environ.get(TUNED_CONFIG_FOLDER_ENV)
    return ([Path(override) / backend] if override else []) + [
        Path(bundled_dir), user_cache_dir() / backend]


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


def _block_sizes(headdim: int, dstate: int) -> list[int]:
    """BLOCK_SIZE_M candidates: powers of two up to headdim and to the tile cap."""
    cap = min(headdim, max(1, MAX_TILE_ELEMENTS // (1 << (dstate - 1).bit_length())))
    return [1 << k for k in range(cap.bit_length()) if 1 << k <= cap]


def default_ssu_launch_config(headdim: int, dstate: int, effective_batch: int,
                              is_blackwell: bool = False) -> LaunchConfig:
    """(BLOCK_SIZE_M, num_warps) when nothing is tuned for the shape and GPU.

    dstate <= 64 and Blackwell: vLLM's table (wide tiles when dstate is small,
    so that a program still moves enough bytes). Otherwise the largest
    BLOCK_SIZE_M (a power of two <= headdim, tile <= 64 x 128 elements) that
    keeps ``effective_batch * cdiv(headdim, BLOCK_SIZE_M)`` programs at or
    above TARGET_PROGRAMS, with 2 warps, if that is >= 16; else vLLM's (4, 4)
    (dstate <= 128) or (4, 8). From the H200 sweep
    (experiments/results/tune_ssu-triton-2026-11-30-NVIDIA_H200.md, headdim
    64, dstate 128, float32): the winners were (4, 4) at 80 rows, (16, 2) at
    5120 and (64, 2) at 20480, 1.7x faster than (4, 4) at the last two; the
    H100's file agrees ((8, 2) at 5120, (64, 4) at 20480). Larger dstate keeps
    the same tile size per warp (an extrapolation, not measured)."""
    if dstate <= 16:
        return 32, 4
    if dstate <= 32:
        return 16, 4
    if dstate <= 64:
        return 8, 4
    if is_blackwell:
        return 32, 8
    for block_size_m in reversed(_block_sizes(headdim, dstate)):
        if effective_batch * -(-headdim // block_size_m) >= TARGET_PROGRAMS:
            if block_size_m >= 16:
                return block_size_m, 2
            break
    return (4, 4) if dstate <= 128 else (4, 8)


def autotune_candidates(headdim: int, dstate: int, effective_batch: int,
                        is_blackwell: bool = False) -> list[LaunchConfig]:
    """What autotuning times: the heuristic first, then BLOCK_SIZE_M from 4
    (or less where headdim is smaller) up to the tile cap x 2 and 4 warps."""
    heuristic = default_ssu_launch_config(headdim, dstate, effective_batch, is_blackwell)
    sizes = _block_sizes(headdim, dstate)
    grid = [(m, w) for m in sizes if m >= min(4, sizes[-1]) for w in (2, 4)]
    return [heuristic] + [config for config in grid if config != heuristic]


@dataclasses.dataclass(frozen=True)
class SsuShape:
    """One decode step to time: ``batch`` sequences of one token, a state of
    (nheads, headdim, dstate) per sequence in ``state_dtype``, one group."""
    batch: int
    nheads: int
    headdim: int
    dstate: int
    state_dtype: str

    def scratch_sets(self, rotate_bytes: int) -> int:
        """Disjoint index sets (at least 2) that a timing rotates through so
        that it reads at least ``rotate_bytes`` of state."""
        itemsize = 4 if self.state_dtype == "float32" else 2
        set_bytes = self.batch * self.nheads * self.headdim * self.dstate * itemsize
        return max(2, min(MAX_SCRATCH_SETS, math.ceil(rotate_bytes / set_bytes)))

    def scratch_inputs(self, sets: int) -> dict[str, np.ndarray]:
        """The step's inputs (float32; timing does not depend on the values)
        and ``index_sets`` (sets, batch) int32: disjoint slots of a cache of
        ``1 + sets * batch`` slots, slot 0 (the null block) left out."""
        b, h, p, n = self.batch, self.nheads, self.headdim, self.dstate
        full = lambda *dims: np.full(dims, 0.5, np.float32)  # noqa: E731
        return dict(x=full(b, h, p), dt=full(b, h), A=-full(h), B=full(b, 1, n), C=full(b, 1, n),
                    D=full(h), dt_bias=full(h), z=full(b, h, p),
                    index_sets=np.arange(1, 1 + sets * b, dtype=np.int32).reshape(sets, b))


class SsuTuner(Protocol):
    """What a framework gives autotuning (``torch_impl.autotune`` / ``jax_impl.autotune``)."""

    def blocked(self) -> Optional[str]:
        """Why nothing can be timed now (capture, tracing), else None."""

    def scratch_timer(self, shape: SsuShape) -> Callable[[], float]:
        """Seconds per step of the state update on scratch buffers of ``shape``,
        with the config the lookup gives (the candidate pinned by ``override``)."""


def write_configs(path: Path, configs: Mapping[int, Mapping[str, int]], notes: Mapping) -> None:
    """Merge ``{effective_batch: {"BLOCK_SIZE_M", "num_warps"}}`` and ``notes``
    into the config file at ``path`` (made with its folder): numeric keys
    sorted, then the notes. Written to a temporary file and renamed, so a
    concurrent reader never sees half a file."""
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update({str(batch): dict(config) for batch, config in configs.items()})
    merged.update(notes)
    numeric = sorted((k for k in merged if k.isdigit()), key=int)
    ordered = {k: merged[k] for k in numeric + [k for k in merged if not k.isdigit()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(ordered, indent=1) + "\n")
    os.replace(temporary, path)
    _read_config_file.cache_clear()


class LaunchConfigTable:
    """Config lookup for one (backend, op) pair, e.g. ("triton", "selective_state_update").
    ``device_name()`` names the current GPU for lookups that name none."""

    def __init__(self, backend: str, op: str, bundled_dir: Path, device_name: Callable[[], str]):
        self.backend = backend
        self.op = op
        self.bundled_dir = Path(bundled_dir)
        self._device_name = device_name
        self._override: Optional[LaunchConfig] = None
        self._cache: dict[tuple, LaunchConfig] = {}
        self._warned_blocked = False

    def search_paths(self, file_name: str) -> list[Path]:
        return [folder / self.op / file_name for folder in config_folders(self.backend, self.bundled_dir)]

    def file_name(self, headdim: int, dstate: int, cache_dtype: str, device_name: Optional[str]) -> str:
        return config_file_name(headdim, dstate, canonical_cache_dtype(cache_dtype),
                                device_name_key(device_name or self._device_name()))

    def get_configs(self, headdim: int, dstate: int, cache_dtype: str,
                    device_name: Optional[str] = None) -> Optional[dict[int, dict]]:
        """Tuned {effective_batch: {"BLOCK_SIZE_M", "num_warps"}} for this GPU, or None."""
        for path in self.search_paths(self.file_name(headdim, dstate, cache_dtype, device_name)):
            configs = _read_config_file(path)
            if configs:
                return configs
        return None

    def lookup(self, headdim: int, dstate: int, batch: int, nheads: int, cache_dtype: str,
               is_blackwell: bool = False, device_name: Optional[str] = None,
               tuner: Optional[SsuTuner] = None, autotune: Optional[bool] = None) -> LaunchConfig:
        """(BLOCK_SIZE_M, num_warps) for batch x nheads rows: the override,
        else as the module docstring says. ``tuner`` times candidates when
        autotuning (``autotune``, default ``$MAMBA_TWIN_AUTOTUNE``) is on;
        without one nothing is timed. Cached per shape key and folder: no
        file-system work after a key's first call."""
        if self._override is not None:
            return self._override
        device_name = device_name or self._device_name()
        autotune = autotune_enabled() if autotune is None else autotune
        key = (headdim, dstate, batch * nheads, cache_dtype, device_name, is_blackwell,
               folder_env(), autotune and tuner is not None)
        config = self._cache.get(key)
        if config is None:
            config, keep = self._choose(headdim, dstate, batch, nheads, cache_dtype, device_name,
                                        is_blackwell, tuner if autotune else None)
            if keep:
                self._cache[key] = config
        return config

    def _choose(self, headdim, dstate, batch, nheads, cache_dtype, device_name, is_blackwell,
                tuner) -> tuple[LaunchConfig, bool]:
        """(config, whether to remember it): only an answer given while
        tuning was blocked is asked again."""
        effective_batch = batch * nheads
        bucket_rows = nheads << (batch - 1).bit_length()  # batch rounded up to a power of two

        def nearest(configs) -> LaunchConfig:
            entry = configs[min(configs, key=lambda rows: abs(rows - effective_batch))]
            return entry["BLOCK_SIZE_M"], entry["num_warps"]

        paths = self.search_paths(self.file_name(headdim, dstate, cache_dtype, device_name))
        fallback = default_ssu_launch_config(headdim, dstate, effective_batch, is_blackwell)
        for path in paths:
            configs = _read_config_file(path)
            if not configs:
                continue
            # The user cache answers for an autotuned lookup once it has this batch's bucket.
            if tuner is None or path != paths[-1] or bucket_rows in configs:
                logger.info("Using launch configs from %s", path)
                return nearest(configs), True
            fallback = nearest(configs)
        if tuner is None:
            logger.info("No tuned launch config at %s; using the heuristic %s",
                        ", ".join(map(str, paths)), fallback)
            return fallback, True
        reason = tuner.blocked()
        if reason is not None:
            if not self._warned_blocked:
                self._warned_blocked = True
                warnings.warn(
                    f"{self.op}: launch-config autotuning skipped ({reason}); using {fallback} "
                    "(the user cache's nearest entry, else the heuristic). Tune before capturing "
                    "or tracing: warmup_launch_configs(...)", RuntimeWarning, stacklevel=4)
            return fallback, False
        config = self._autotune(headdim, dstate, batch, nheads, cache_dtype, device_name,
                                is_blackwell, tuner, paths[-1])
        return config, True

    def _autotune(self, headdim, dstate, batch, nheads, cache_dtype, device_name, is_blackwell,
                  tuner, path) -> LaunchConfig:
        """Time the candidates at the batch's power-of-two bucket, write the
        fastest into the user-cache file ``path``, return it."""
        bucket = 1 << (batch - 1).bit_length()
        candidates = autotune_candidates(headdim, dstate, bucket * nheads, is_blackwell)
        time_step = tuner.scratch_timer(SsuShape(bucket, nheads, headdim, dstate, cache_dtype))
        timed = {}
        for config in candidates:
            with self.override(config):
                try:
                    timed[config] = time_step()
                except Exception as error:  # noqa: BLE001  (a config the compiler rejects)
                    logger.info("%s config %s dropped: %s: %s", self.op, config,
                                type(error).__name__, error)
        if not timed:
            raise RuntimeError(f"{self.op}: no launch config of {candidates} ran on {device_name}")
        best = min(timed, key=timed.get)
        write_configs(path, {bucket * nheads: dict(BLOCK_SIZE_M=best[0], num_warps=best[1])},
                      {"tuned_with": dict(by="mamba_twin autotune", device=device_name,
                                          date=datetime.date.today().isoformat())})
        self._cache.clear()  # nearest-entry answers from the old file are stale
        logger.info("%s: autotuned %s at batch %d x %d heads on %s (%d candidates); wrote %s",
                    self.op, best, bucket, nheads, device_name, len(timed), path)
        return best

    def warmup(self, *, nheads: int, headdim: int, dstate: int, state_dtype: str,
               batches: Sequence[int], tuner: Optional[SsuTuner], device_name: str,
               is_blackwell: bool = False) -> dict[int, LaunchConfig]:
        """{batch: config} for each batch, autotuning now (on ``tuner``; None:
        no GPU) the ones no file answers; RuntimeError when nothing can be
        timed here."""
        op = "warmup_launch_configs"
        sizes = {name: checks.as_int(op, name, value, minimum=1)
                 for name, value in dict(nheads=nheads, headdim=headdim, dstate=dstate).items()}
        checks.expect_dtype(op, "state_dtype", state_dtype, STATE_DTYPES)
        if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence) or not batches:
            checks.fail(op, "batches", f"must be a non-empty sequence of batch sizes, got {batches!r}")
        batches = [checks.as_int(op, "batches", batch, minimum=1) for batch in batches]
        reason = "not on a GPU" if tuner is None else tuner.blocked()
        if reason is not None:
            raise RuntimeError(f"{op}: cannot time launch configs here ({reason})")
        return {batch: self.lookup(sizes["headdim"], sizes["dstate"], batch, sizes["nheads"],
                                   state_dtype, is_blackwell, device_name, tuner, autotune=True)
                for batch in batches}

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
def _read_config_file(path: Path) -> Optional[dict[int, dict]]:
    """The numeric entries of a config file, None where there is none."""
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return {int(key): value for key, value in raw.items() if key.isdigit()}


def clip_block(size: int, cap: int | None = None) -> int:
    """A tile edge for a dimension of ``size``: the next power of two, at
    least 16 (the smallest tensor-core tile) and at most ``cap`` (masked loads
    take care of the tile's part past ``size``)."""
    edge = 16
    while edge < size:
        edge *= 2
    return edge if cap is None else max(16, min(cap, edge))
