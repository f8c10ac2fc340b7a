"""The experiments run end to end (quick mode) and write what they promise,
so the main job and the tuner cannot rot."""

import json

import pytest

from experiments import compare, tune_ssu

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # interpreter / DLPack notices


@pytest.mark.slow  # about a minute in the interpreters: the GPU suite runs it
def test_compare_quick_writes_record_table_and_plots(tmp_path):
    output = tmp_path / "compare.json"
    compare.main(["--quick", "--output", output])

    record = json.loads(output.read_text())
    assert {"device", "torch", "jax", "triton", "interpreted"} <= record["environment"].keys()
    assert record["ceilings"]["copy_GBps"] > 0 and record["ceilings"]["matmul_TFLOPs"] > 0
    state_rows = [r for r in record["rows"] if r["op"] == "selective_state_update"]
    assert {r["implementation"] for r in state_rows} == set(compare.ssu_case.IMPLEMENTATIONS)
    for row in state_rows:
        assert row["max_rel_error_out"] < 1e-5 and row["max_rel_error_state"] < 1e-5, row
        assert row["median_us"] > 0 and 0 < row["fraction_of_copy"]
        assert row["index_sets"] >= 2  # steps rotate through disjoint slots
    for row in record["rows"]:
        for key in (k for k in row if k.startswith("max_rel_error")):
            assert row[key] < 5e-2, (key, row)  # bf16 inputs in the chunked scan
    mixer_rows = [r for r in record["rows"] if r["op"] == "mamba_mixer2"]
    assert {(r["implementation"], r["mode"]) for r in mixer_rows} == {
        (impl, mode) for impl in ("torch", "flax") for mode in ("prefill", "decode")}
    assert all(r["max_rel_diff_torch_vs_flax"] < 1e-4 for r in mixer_rows)  # float32 mixers

    table = output.with_suffix(".md").read_text()
    assert "| triton |" in table and "| pallas |" in table
    if record["environment"]["interpreted"]:
        assert "interpreter times" in table
    assert "state_update" in " ".join(record["plots"])
    for name in record["plots"]:
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and name in table


def test_tune_quick_writes_configs_the_lookup_reads(tmp_path, monkeypatch):
    import jax_impl
    import torch_impl

    report = tmp_path / "tune.md"
    rows = tune_ssu.main(["--quick", "--save-configs", "--output-dir", tmp_path / "configs",
                          "--report", report])

    assert {r["backend"] for r in rows} == {"triton", "pallas"}
    assert all(r["gain"] >= 1 for r in rows)  # the heuristic is a candidate
    assert "gain" in report.read_text() and report.with_suffix(".json").exists()
    monkeypatch.setenv("MAMBA_TWIN_TUNED_CONFIG_FOLDER", str(tmp_path / "configs"))
    shape = tune_ssu.CPU_SHAPE if not tune_ssu.ON_GPU else tune_ssu.ssu_case.MAMBA2_2P7B
    for package, backend in ((torch_impl, "triton"), (jax_impl, "pallas")):
        configs = package.get_ssm_configs(shape["headdim"], shape["dstate"], "float32",
                                          tune_ssu.device_name(backend))
        tuned = {r["effective_batch"]: r["best"] for r in rows if r["backend"] == backend}
        assert configs == tuned


def test_tune_ssd_quick_writes_configs_the_lookup_reads(tmp_path, monkeypatch):
    from experiments import tune_ssd
    from jax_impl import ssd_common as jax_stages
    from torch_impl import ssd_common as torch_stages

    results = tune_ssd.main(["--quick", "--save-configs", "--output-dir", str(tmp_path)])
    monkeypatch.setenv("MAMBA_TWIN_TUNED_CONFIG_FOLDER", str(tmp_path))
    device = torch_stages.platform.default_device()
    looked_up = {"triton": torch_stages.launch_config("chunk_scan", device),
                 "pallas": jax_stages.launch_config("chunk_scan")}
    for backend, stages in results.items():
        default_us, best_us, config = stages["chunk_scan"]
        assert best_us <= default_us
        assert looked_up[backend] == config


@pytest.mark.slow  # two compiles for sm_90: about 30 s
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_sass_stats_prints_the_token_loop(framework):
    """The instruction-mix tool compiles the selective scan for sm_90 on this
    host and prints the registers and the token loop's blocks, whose
    exponentials (MUFU) the recurrence needs."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "experiments.sass_stats", "--framework", framework,
                           "--batch", "4", "--seqlen", "16", "--dim", "256"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "REG:" in lines[0]
    assert any("MUFU" in line for line in lines[1:])
