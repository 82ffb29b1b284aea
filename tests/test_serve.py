"""The README's main-job command: scripts/serve.sh sets up a host with the pack and starts it; without
the released weights it says which files to put where."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from comfy_host import ROOT
from comfy_server import free_port

SCRIPT = ROOT / "scripts"


def test_missing_model_files_are_named_with_sizes_links_and_folders(tmp_path):
    out = subprocess.run([sys.executable, SCRIPT / "check_models.py", tmp_path], capture_output=True, text=True,
                         check=True).stdout
    assert "models/ella/ella-sd1.5-tsc-t5xl.safetensors  (134 MB)" in out
    assert "models--google--flan-t5-xl--text_encoder/  (folder, about 2.4 GB)" in out
    assert "https://huggingface.co/QQGYLab/ELLA" in out and "models/checkpoints/" in out and str(tmp_path) in out
    assert "Traceback" not in out


def test_present_model_files_are_recognised(tmp_path):
    (tmp_path / "ella").mkdir()
    (tmp_path / "ella" / "ella-sd1.5-tsc-t5xl.safetensors").write_bytes(b"x")
    (tmp_path / "text_encoders" / "models--google--flan-t5-xl--text_encoder").mkdir(parents=True)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "sd15.safetensors").write_bytes(b"x")
    out = subprocess.run([sys.executable, SCRIPT / "check_models.py", tmp_path], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "ELLA: model files found."


@pytest.mark.skipif(bool(os.environ.get("ELLA_COMFYUI")) or not (ROOT / ".venv" / "bin" / "python").exists(),
                    reason="checks the embedded host set up in .venv (the CI host)")
def test_serve_sets_up_the_embedded_host_and_starts_it(tmp_path):
    env = {**os.environ, "ELLA_HOST_DIR": str(tmp_path / "host")}
    done = subprocess.run(["bash", SCRIPT / "serve.sh", "--check", "--port", str(free_port())], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "ELLA: server answered with the ELLA nodes" in done.stdout
    assert "these model files are missing" in done.stdout and "Traceback" not in done.stdout
    assert (tmp_path / "host" / "ComfyUI" / "custom_nodes" / "comfyui-ella-nodes").resolve() == ROOT
