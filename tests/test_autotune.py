"""Launch configs that travel: the batch-aware heuristic, the lookup order
(override folder, shipped files, user cache, first-use autotune, heuristic),
the autotuned cache file, no tuning under capture / tracing, the warm-up.
Timing on a CPU means nothing: the candidates' times are faked."""

import json
import warnings

import numpy as np
import pytest

from bridge.spec import launch_config as lc
from bridge.spec.ssd_launch_config import DEFAULT_STAGE_CONFIGS, SsdLaunchConfigs
from frameworks import assert_close
from ssu_cases import SsuCase, make_inputs

OP = "selective_state_update"
FILE = lc.config_file_name(64, 128, "float32", "Test_GPU")


def test_heuristic_reproduces_the_measured_winners():
    # H200, headdim 64, dstate 128, 80 heads: batch 1 / 64 / 256 (tune_ssu-triton-2026-11-30).
    assert lc.default_ssu_launch_config(64, 128, 80) == (4, 4)
    assert lc.default_ssu_launch_config(64, 128, 5120) == (16, 2)
    assert lc.default_ssu_launch_config(64, 128, 20480) == (64, 2)
    # vLLM's table for small dstate and Blackwell, at any batch.
    for rows in (80, 20480):
        assert lc.default_ssu_launch_config(64, 16, rows) == (32, 4)
        assert lc.default_ssu_launch_config(64, 32, rows) == (16, 4)
        assert lc.default_ssu_launch_config(64, 64, rows) == (8, 4)
        assert lc.default_ssu_launch_config(64, 128, rows, is_blackwell=True) == (32, 8)
    assert lc.default_ssu_launch_config(64, 256, 80) == (4, 8)
    assert lc.default_ssu_launch_config(64, 256, 20480) == (32, 2)  # tile capped at 64 x 128 elements


def test_heuristic_rule_holds_at_random_shapes(rng):
    for _ in range(200):
        headdim, rows = int(rng.integers(1, 257)), int(rng.integers(1, 200_000))
        block_m, warps = lc.default_ssu_launch_config(headdim, 128, rows)
        programs = lambda m: rows * -(-headdim // m)  # noqa: E731
        if (block_m, warps) == (4, 4):  # too few rows for tiles of 16 rows
            assert programs(16) < lc.TARGET_PROGRAMS or headdim < 16, (headdim, rows)
        else:
            assert warps == 2 and 16 <= block_m <= min(headdim, 64), (headdim, rows, block_m)
            assert programs(block_m) >= lc.TARGET_PROGRAMS, (headdim, rows, block_m)
            assert block_m == 64 or 2 * block_m > headdim or programs(2 * block_m) < lc.TARGET_PROGRAMS


class FakeTuner:
    """Times from a table keyed by the pinned config; records what it timed."""

    def __init__(self, table, times, blocked=None):
        self.table, self.times, self.reason, self.timed = table, times, blocked, []

    def blocked(self):
        return self.reason

    def scratch_timer(self, shape):
        def time_step():
            config = self.table.lookup(1, 1, 1, 1, "float32")  # the pinned candidate
            self.timed.append((shape, config))
            if config == (32, 4):
                raise RuntimeError("out of registers")  # dropped, as a compile failure is
            return self.times.get(config, 1.0)
        return time_step


def _entry(block_m, warps):
    return {"BLOCK_SIZE_M": block_m, "num_warps": warps}


def _write(folder, backend, configs):
    path = folder / backend / OP / FILE if backend else folder / OP / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(k): _entry(*v) for k, v in configs.items()}))
    return path


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Fresh override / shipped / cache folders and a table reading them."""
    monkeypatch.setenv(lc.TUNED_CONFIG_FOLDER_ENV, str(tmp_path / "override"))
    monkeypatch.setenv(lc.CACHE_HOME_ENV, str(tmp_path / "xdg"))
    monkeypatch.delenv(lc.AUTOTUNE_ENV, raising=False)
    table = lc.LaunchConfigTable("triton", OP, tmp_path / "shipped", lambda: "Test GPU")
    return table, tmp_path / "override", tmp_path / "shipped", tmp_path / "xdg" / "mamba_twin"


def test_lookup_order(folders, monkeypatch):
    _, override, shipped, cache = folders

    def lookup():
        """(config, tuner) from a fresh table: files are read once per key and process."""
        lc._read_config_file.cache_clear()
        table = lc.LaunchConfigTable("triton", OP, shipped, lambda: "Test GPU")
        tuner = FakeTuner(table, {(8, 2): 0.5})
        return table.lookup(64, 128, 2, 80, "float32", tuner=tuner), tuner.timed

    assert lookup() == ((4, 4), [])  # nothing anywhere, autotune off: the heuristic
    paths = [_write(override, "triton", {160: (64, 4)}), _write(shipped, None, {160: (32, 2)}),
             _write(cache, "triton", {160: (16, 4)})]
    for path, want in zip(paths, [(64, 4), (32, 2), (16, 4)]):
        assert lookup() == (want, [])
        path.unlink()
    monkeypatch.setenv(lc.AUTOTUNE_ENV, "1")
    config, timed = lookup()
    assert config == (8, 2) and timed  # no file: autotuned, the fastest
    monkeypatch.setenv(lc.AUTOTUNE_ENV, "0")
    monkeypatch.setenv(lc.CACHE_HOME_ENV, str(cache.parent / "empty"))
    assert lookup() == ((4, 4), [])  # switched off, nothing cached there: the heuristic


def test_shipped_file_wins_over_autotune(folders, monkeypatch):
    table, _, shipped, _ = folders
    _write(shipped, None, {80: (4, 4), 20480: (64, 2)})
    monkeypatch.setenv(lc.AUTOTUNE_ENV, "1")
    tuner = FakeTuner(table, {})
    assert table.lookup(64, 128, 200, 80, "float32", tuner=tuner) == (64, 2)
    assert not tuner.timed


def test_autotune_writes_the_cache_file_and_reads_it_back(folders, monkeypatch, rng):
    table, _, _, cache = folders
    monkeypatch.setenv(lc.AUTOTUNE_ENV, "1")
    best = [(16, 2), (8, 4), (64, 2)][rng.integers(3)]
    tuner = FakeTuner(table, {best: 0.25, (4, 4): 0.5})
    assert table.lookup(64, 128, 3, 80, "bfloat16", tuner=tuner) == best
    shapes = {shape for shape, _ in tuner.timed}
    assert shapes == {lc.SsuShape(4, 80, 64, 128, "bfloat16")}  # batch 3's bucket, the real dtype
    timed = [config for _, config in tuner.timed]
    assert timed == lc.autotune_candidates(64, 128, 320) and timed[0] == (4, 4)
    # bf16 and fp16 share the float16 file; the same format as the shipped files.
    path = cache / "triton" / OP / lc.config_file_name(64, 128, "float16", "Test_GPU")
    written = json.loads(path.read_text())
    assert written["320"] == _entry(*best) and written["tuned_with"]["device"] == "Test GPU"
    assert table.get_configs(64, 128, "float16", "Test GPU") == {320: _entry(*best)}

    tuner.timed.clear()
    assert table.lookup(64, 128, 3, 80, "bfloat16", tuner=tuner) == best  # in memory
    fresh = lc.LaunchConfigTable("triton", OP, table.bundled_dir, lambda: "Test GPU")
    fresh_tuner = FakeTuner(fresh, tuner.times)
    assert fresh.lookup(64, 128, 4, 80, "float16", tuner=fresh_tuner) == best  # from the file
    assert not tuner.timed and not fresh_tuner.timed
    assert fresh.lookup(64, 128, 64, 80, "float16", tuner=fresh_tuner) == best  # a new bucket: tuned, merged
    assert {shape.batch for shape, _ in fresh_tuner.timed} == {64}
    assert set(json.loads(path.read_text())) == {"320", "5120", "tuned_with"}


def test_blocked_tuning_falls_back_with_one_warning(folders, monkeypatch):
    table, _, _, cache = folders
    monkeypatch.setenv(lc.AUTOTUNE_ENV, "1")
    tuner = FakeTuner(table, {(16, 2): 0.1}, blocked="inside CUDA-graph capture")
    with pytest.warns(RuntimeWarning, match="capture.*warmup_launch_configs"):
        assert table.lookup(64, 128, 64, 80, "float32", tuner=tuner) == (16, 2)  # the heuristic
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert table.lookup(64, 128, 1, 80, "float32", tuner=tuner) == (4, 4)
    assert not tuner.timed and not cache.exists()
    tuner.reason = None  # the blocked answer was not kept: tuned once unblocked
    assert table.lookup(64, 128, 1, 80, "float32", tuner=tuner) == (16, 2)
    assert {shape.batch for shape, _ in tuner.timed} == {1}
    tuner.reason = "inside JAX tracing"  # blocked again: the cache's nearest entry answers
    assert table.lookup(64, 128, 256, 80, "float32", tuner=tuner) == (16, 2)
    assert {shape.batch for shape, _ in tuner.timed} == {1}


def test_warmup_checks_its_arguments(folders):
    table, *_ = folders
    tuner = FakeTuner(table, {})
    good = dict(nheads=2, headdim=16, dstate=16, state_dtype="float32", batches=[1],
                tuner=tuner, device_name="Test GPU")
    for name, bad in (("nheads", 0), ("headdim", 1.5), ("dstate", None), ("state_dtype", "int8"),
                      ("batches", []), ("batches", [2, 0]), ("batches", 4)):
        with pytest.raises(ValueError, match=f"warmup_launch_configs: `{name}`"):
            table.warmup(**dict(good, **{name: bad}))
    with pytest.raises(RuntimeError, match="not on a GPU"):
        table.warmup(**dict(good, tuner=None))
    tuner.reason = "inside CUDA-graph capture"
    with pytest.raises(RuntimeError, match="capture"):
        table.warmup(**good)


def test_ssd_lookup_reads_the_user_cache_after_shipped_files(tmp_path, monkeypatch):
    name = "device_name=Test_GPU.json"
    for folder, block_m in ((tmp_path / "override" / "triton", 128), (tmp_path / "shipped", 16),
                            (tmp_path / "xdg" / "mamba_twin" / "triton", 32)):
        (folder / "mamba_chunk_scan_combined").mkdir(parents=True)
        (folder / "mamba_chunk_scan_combined" / name).write_text(json.dumps({"chunk_scan": dict(
            BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=64, BLOCK_SIZE_K=32, num_warps=4, num_stages=2)}))
    configs = SsdLaunchConfigs("triton", tmp_path / "shipped")
    monkeypatch.setenv(lc.CACHE_HOME_ENV, str(tmp_path / "xdg"))
    monkeypatch.setenv(lc.TUNED_CONFIG_FOLDER_ENV, str(tmp_path / "override"))
    assert configs.get("chunk_scan", "Test GPU").BLOCK_SIZE_M == 128
    monkeypatch.delenv(lc.TUNED_CONFIG_FOLDER_ENV)
    assert configs.get("chunk_scan", "Test GPU").BLOCK_SIZE_M == 16
    assert SsdLaunchConfigs("triton", tmp_path / "none").get("chunk_scan", "Test GPU").BLOCK_SIZE_M == 32
    assert configs.get("chunk_state", "Test GPU") == DEFAULT_STAGE_CONFIGS["chunk_state"]


# Through each package: the kernel's launch path, the frameworks' tuners, the warm-up.

def _autotune_module(side):
    if side.name == "torch":
        from torch_impl import autotune
    else:
        from jax_impl import autotune
    return autotune


def _pretend_gpu(side, monkeypatch, times, tmp_path):
    """A GPU as far as the tuner knows, timings faked; a fresh user cache."""
    autotune = _autotune_module(side)
    monkeypatch.setattr(autotune, "on_gpu", lambda *device: True)
    if side.name == "torch":
        monkeypatch.setattr(side.torch.cuda, "is_current_stream_capturing", lambda: False)
    tuner = FakeTuner(side.impl.selective_state_update.__globals__["SSU_CONFIGS"], times)
    monkeypatch.setattr(autotune, "scratch_timer", lambda shape, *device: tuner.scratch_timer(shape))
    monkeypatch.setenv(lc.CACHE_HOME_ENV, str(tmp_path))
    monkeypatch.delenv(lc.TUNED_CONFIG_FOLDER_ENV, raising=False)
    return tuner


def _cache_files(tmp_path, side):
    backend = "triton" if side.name == "torch" else "pallas"
    return {path.name: json.loads(path.read_text())
            for path in (tmp_path / "mamba_twin" / backend / OP).glob("*.json")}


def test_first_call_autotunes_and_computes_the_same(side, monkeypatch, tmp_path, rng):
    tuner = _pretend_gpu(side, monkeypatch, {(8, 2): 0.1}, tmp_path)
    monkeypatch.setenv(lc.AUTOTUNE_ENV, "1")
    case = SsuCase(nheads=1, ngroups=1)
    arrays, dtypes, options = make_inputs(case, rng)
    inputs = side.native(arrays, dtypes)
    got_out, got_state = side.run_kernel(inputs, **options)
    want_out, want_state = side.run_reference(inputs, **options)
    assert_close(got_out, want_out, "float32", "out")
    assert_close(got_state, want_state, "float32", "state")
    name = lc.config_file_name(16, 16, "float32", lc.device_name_key(
        side.impl.selective_state_update.__globals__["platform"].device_name(
            *([side.device] if side.name == "torch" else []))))
    (written,) = _cache_files(tmp_path, side).items()
    assert written[0] == name and written[1]["4"] == _entry(8, 2)  # 3 sequences x 1 head: bucket 4
    assert {shape.batch for shape, _ in tuner.timed} == {4}


def test_no_autotune_under_capture_or_tracing(side, monkeypatch, tmp_path, rng):
    tuner = _pretend_gpu(side, monkeypatch, {(8, 2): 0.1}, tmp_path)
    monkeypatch.setenv(lc.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(side.impl.selective_state_update.__globals__["SSU_CONFIGS"], "_warned_blocked", False)
    arrays, dtypes, options = make_inputs(SsuCase(nheads=1, ngroups=1, batch=5), rng)
    inputs = side.native(arrays, dtypes)
    with pytest.warns(RuntimeWarning, match="warmup_launch_configs"):
        if side.name == "torch":
            monkeypatch.setattr(side.torch.cuda, "is_current_stream_capturing", lambda: True)
            got_out, _ = side.run_kernel(inputs, **options)
        else:
            got_out, _ = side.jax.jit(lambda kw: side.impl.selective_state_update(**kw, **options))(inputs)
    assert_close(got_out, side.run_reference(inputs, **options)[0], "float32", "out")
    assert not tuner.timed and not _cache_files(tmp_path, side)


def test_tuner_says_why_it_cannot_time(side, monkeypatch):
    autotune = _autotune_module(side)
    if side.name == "torch":
        torch = side.torch
        assert autotune.tuner(torch.device("cpu")) is None  # nothing to time: no tuning, no warning
        monkeypatch.setattr(autotune, "on_gpu", lambda device: True)
        gpu = autotune.tuner(torch.device("cuda"))
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert "CUDA-graph capture" in gpu.blocked()
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert "torch.compile" in gpu.blocked()
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
        assert gpu.blocked() is None
    else:
        monkeypatch.setattr(autotune, "on_gpu", lambda: False)
        assert autotune.tuner(False) is None  # nothing to time: no tuning, no warning
        monkeypatch.setattr(autotune, "on_gpu", lambda: True)
        assert autotune.tuner(False).blocked() is None
        assert "JAX tracing" in autotune.tuner(True).blocked()
        reasons = []
        side.jax.jit(lambda x: reasons.append(autotune.tuner(False).blocked()) or x)(1.0)
        assert "JAX tracing" in reasons[0]  # a concrete state closed over inside jit


def test_warmup_launch_configs(side, monkeypatch, tmp_path):
    tuner = _pretend_gpu(side, monkeypatch, {(16, 2): 0.1}, tmp_path)
    with monkeypatch.context() as no_gpu:
        no_gpu.setattr(_autotune_module(side), "on_gpu", lambda *device: False)
        with pytest.raises(RuntimeError, match="not on a GPU"):
            side.impl.warmup_launch_configs(nheads=2, headdim=16, dstate=128)
    got = side.impl.warmup_launch_configs(nheads=2, headdim=16, dstate=128, state_dtype="float16",
                                          batches=(1, 3, 4))
    assert got == {1: (16, 2), 3: (16, 2), 4: (16, 2)}
    assert sorted(shape.batch for shape, _ in tuner.timed if _ == (16, 2)) == [1, 4]
    (written,) = _cache_files(tmp_path, side).values()
    assert {k for k in written if k.isdigit()} == {"2", "8"}
    with pytest.raises(ValueError, match="`state_dtype`"):
        side.impl.warmup_launch_configs(nheads=2, headdim=16, dstate=128, state_dtype="int8")


def test_scratch_timer_runs_the_kernel(side, monkeypatch):
    """The real timer on scratch buffers (interpreted: the time is meaningless)."""
    autotune = _autotune_module(side)
    monkeypatch.setattr(autotune, "REPEATS", 1)
    shape = lc.SsuShape(1, 2, 16, 16, "bfloat16")
    time_step = (autotune.scratch_timer(shape, side.device) if side.name == "torch"
                 else autotune.scratch_timer(shape))
    with side.impl.override_ssm_config((8, 2)):
        seconds = time_step()
    assert np.isfinite(seconds) and seconds > 0
