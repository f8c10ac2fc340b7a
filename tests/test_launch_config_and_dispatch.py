"""Tuned launch-config lookup and backend dispatch, for both frameworks."""

import json

import numpy as np
import pytest

from bridge.spec.launch_config import TUNED_CONFIG_FOLDER_ENV
from frameworks import assert_close
from ssu_cases import SsuCase, make_inputs

BACKENDS = {"torch": ("triton", "reference"), "jax": ("pallas", "xla")}


def test_config_file_name(side):
    assert side.impl.get_ssm_config_file_name(64, 128, "float16", "NVIDIA_H100") == (
        "headdim=64,dstate=128,device_name=NVIDIA_H100,cache_dtype=float16.json")


def test_heuristic_without_tuned_files(side, monkeypatch, tmp_path):
    monkeypatch.setenv(TUNED_CONFIG_FOLDER_ENV, str(tmp_path))
    lookup = side.impl.try_get_optimal_ssm_config
    assert lookup(64, 16, 8, 8, "float32", device_name="No GPU 1") == (32, 4)
    assert lookup(64, 64, 8, 8, "float32", device_name="No GPU 1") == (8, 4)
    assert lookup(64, 128, 8, 8, "float32", device_name="No GPU 1") == (4, 4)
    assert lookup(64, 128, 8, 8, "float32", True, device_name="No GPU 1") == (32, 8)


def test_user_folder_nearest_effective_batch(side, monkeypatch, tmp_path):
    backend = BACKENDS[side.name][0]
    folder = tmp_path / backend / "selective_state_update"
    folder.mkdir(parents=True)
    configs = {"64": {"BLOCK_SIZE_M": 8, "num_warps": 2},
               "1024": {"BLOCK_SIZE_M": 16, "num_warps": 8}, "triton_version": "3.6.0"}
    # bf16 and fp16 states share the float16 file.
    (folder / "headdim=64,dstate=128,device_name=Test_GPU,cache_dtype=float16.json").write_text(
        json.dumps(configs))
    monkeypatch.setenv(TUNED_CONFIG_FOLDER_ENV, str(tmp_path))
    lookup = side.impl.try_get_optimal_ssm_config
    assert side.impl.get_ssm_configs(64, 128, "bfloat16", "Test GPU") == {
        64: configs["64"], 1024: configs["1024"]}
    assert lookup(64, 128, 2, 16, "bfloat16", device_name="Test GPU") == (8, 2)      # 32 -> 64
    assert lookup(64, 128, 16, 48, "float16", device_name="Test GPU") == (16, 8)     # 768 -> 1024
    assert lookup(64, 128, 16, 48, "float32", device_name="Test GPU") == (4, 4)      # no file
    with side.impl.override_ssm_config((2, 1)):
        assert lookup(64, 128, 2, 16, "bfloat16", device_name="Test GPU") == (2, 1)
    assert lookup(64, 128, 2, 16, "bfloat16", device_name="Test GPU") == (8, 2)
    with pytest.raises(ValueError, match="BLOCK_SIZE_M"):
        with side.impl.override_ssm_config((3, 4)):
            pass


def test_lookup_touches_the_file_system_once_per_key(side, monkeypatch, tmp_path):
    """The eager hot path: after a key's first lookup, no file is looked for;
    a new user folder is a new key."""
    import pathlib
    monkeypatch.setenv(TUNED_CONFIG_FOLDER_ENV, str(tmp_path))
    lookup = side.impl.try_get_optimal_ssm_config
    first = lookup(64, 32, 3, 8, "float16", device_name="Cache GPU")

    def no_file_system(self):
        raise AssertionError(f"file-system work on a cached lookup: {self}")

    monkeypatch.setattr(pathlib.Path, "exists", no_file_system)
    assert lookup(64, 32, 3, 8, "float16", device_name="Cache GPU") == first
    monkeypatch.setenv(TUNED_CONFIG_FOLDER_ENV, str(tmp_path / "other"))
    with pytest.raises(AssertionError, match="file-system work"):
        lookup(64, 32, 3, 8, "float16", device_name="Cache GPU")


def test_pinned_config_gives_the_same_result(side, rng):
    """A non-default block size (several programs per head, masked tail)
    computes the same thing."""
    arrays, dtypes, options = make_inputs(SsuCase(dim=24), rng)
    inputs = side.native(arrays, dtypes)
    want_out, want_state = side.run_reference(inputs, **options)
    with side.impl.override_ssm_config((8, 2)):
        got_out, got_state = side.run_kernel(inputs, **options)
    assert_close(got_out, want_out, "float32", "out")
    assert_close(got_state, want_state, "float32", "state")


def _dispatch(side):
    if side.name == "torch":
        from torch_impl import ssu_dispatch
    else:
        from jax_impl import ssu_dispatch
    return ssu_dispatch


def test_unknown_backend_lists_the_valid_ones(side):
    from bridge.spec.backends import MambaConfig
    with pytest.raises(ValueError, match="Valid options") as error:
        _dispatch(side).initialize_mamba_ssu_backend(MambaConfig(backend="cuda-magic"))
    for name in BACKENDS[side.name]:
        assert name in str(error.value)


def test_uninitialized_backend_raises(side, monkeypatch):
    dispatch = _dispatch(side)
    monkeypatch.setattr(dispatch._REGISTRY, "_active", None)
    with pytest.raises(RuntimeError, match="initialize_mamba_ssu_backend"):
        dispatch.get_mamba_ssu_backend()


def test_flashinfer_backend_names_its_package():
    pytest.importorskip("torch_impl")
    from bridge.spec.backends import MambaConfig
    from torch_impl import ssu_dispatch
    try:
        import flashinfer  # noqa: F401
        pytest.skip("flashinfer is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="flashinfer-python"):
        ssu_dispatch.initialize_mamba_ssu_backend(MambaConfig(backend="flashinfer"))


@pytest.mark.parametrize("which", [0, 1])
def test_dispatched_backends_match_the_reference(side, which, rng):
    from bridge.spec.backends import MambaConfig
    dispatch = _dispatch(side)
    dispatch.initialize_mamba_ssu_backend(MambaConfig(backend=BACKENDS[side.name][which]))
    assert dispatch.get_mamba_ssu_backend().name == BACKENDS[side.name][which]
    arrays, dtypes, options = make_inputs(SsuCase(spec=True, indices="dst"), rng)
    inputs = side.native(arrays, dtypes)
    want_out, want_state = side.run_reference(inputs, **options)
    if side.name == "torch":
        inputs = {k: v.clone() for k, v in inputs.items()}
        out = dispatch.selective_state_update(**inputs, **options)
        got_out, got_state = side.numpy(out), side.numpy(inputs["state"])
    else:
        out, state = dispatch.selective_state_update(**inputs, **options)
        got_out, got_state = side.numpy(out), side.numpy(state)
    assert_close(got_out, want_out, "float32", "out")
    assert_close(got_state, want_state, "float32", "state")
    assert np.isfinite(got_out).all()


def test_direct_launch_matches_tritons_path_and_skips_its_binding(monkeypatch):
    """torch_impl.platform.launch: the first call of a signature goes through
    Triton's own launch path, later ones call the compiled launcher directly,
    with the same results as Triton's path, for fresh data each call."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("the direct launch is the compiled path (a CUDA GPU)")
    from triton.runtime.jit import JITFunction

    import torch_impl
    from frameworks import TorchSide

    side, rng = TorchSide(), np.random.default_rng(0)
    case = SsuCase(batch=5, nheads=4, dim=32, dstate=32)
    bound = []
    triton_run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: bound.append(1) or triton_run(self, *a, **k))
    outputs = {}
    for direct in (False, True, True):
        monkeypatch.setattr(torch_impl.platform, "_DIRECT", direct)
        arrays, dtypes, options = make_inputs(case, rng)
        inputs = side.native(arrays, dtypes)
        got_direct = side.run_kernel(inputs, **options)
        monkeypatch.setattr(torch_impl.platform, "_DIRECT", False)
        outputs[direct] = (got_direct, side.run_kernel(inputs, **options))
        for got, want in zip(*outputs[direct]):
            np.testing.assert_array_equal(got, want)
        assert_close(got_direct[0], side.run_reference(inputs, **options)[0], "float32", "out")
    # Triton's path: the four calls with _DIRECT off and the first direct call (which plans).
    assert len(bound) == 5
