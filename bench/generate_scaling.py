"""`python -m ella.generate` on 1 and on N processes (accelerate): images per second and the scaling
efficiency (rate on N processes / (N x rate on 1)), on random-weight models written to a work folder.

    python -m bench.generate_scaling                 # tiny UNet (the tests' models), 64 x 64, 10 steps
    python -m bench.generate_scaling --full-unet     # SD1.5's own UNet and VAE layout (random weights)

The rate is the command's own (its closing line): images written over the seconds of the generation loop, from
the first batch to the last file, after the models are loaded. Wall seconds (start to exit, imports and loading
included) are recorded too, and the machine's load average before and after each run (other jobs may share
the machine). T5 is the tests' tiny random encoder in both cases (the connector reads its width),
so T5's share is not measured here. On a CPU each process computes with --cpu-threads 1; the row "1 process, N
threads" shows what one process makes of the same cores (its files differ in the last bits, so it is not a mode
of the byte-identical comparison). On GPUs, N processes are N GPUs."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import ROOT, write

RATE = re.compile(r"ELLA generate: (\d+) images written.*?; ([0-9.e+]+) images/s over ([0-9.]+) s on (\d+) process")


def make_models(work: Path, full_unet: bool) -> Path:
    """Write a diffusers SD folder (tiny, or SD1.5's UNet and VAE layout), a connector and a tiny T5 under `work`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from connector_fixtures import save_connector
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from t5_fixtures import make_t5_folder
    from tiny_sd import tiny_diffusers_sd

    from ella.connector import ConnectorConfig

    models = work / ("full-unet" if full_unet else "tiny")
    if (models / "sd15" / "model_index.json").exists():
        return models
    width = 768 if full_unet else 32
    if full_unet:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # SD1.5's layout, 859.5 M
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    else:
        unet, vae = tiny_diffusers_sd(width)
    StableDiffusionPipeline(vae=vae.eval(), text_encoder=None, tokenizer=None, unet=unet.eval(),
                            scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(models / "sd15")
    cfg = ConnectorConfig(width=width, num_latents=64 if full_unet else 8, num_blocks=6 if full_unet else 2,
                          input_dim=32, time_channels=320 if full_unet else 16, time_embed_dim=width)
    save_connector(models / "ella.safetensors", cfg, seed=0)
    os.symlink(make_t5_folder(models, "hf"), models / "t5")
    return models


def write_prompts(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i}.txt").write_text(f"prompt {i}: a red cube on a blue sphere beside {i % 5 + 1} green cones",
                                         encoding="utf-8")
    return folder


def run(command: list[str], out: Path) -> dict:
    """Run one generation into the empty folder `out`; its rate (closing line) and wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    found = RATE.search(done.stdout)
    if done.returncode != 0 or not found:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}")
    images, rate, seconds, processes = found.groups()
    return {"processes": int(processes), "images": int(images), "images_per_s": float(rate),
            "loop_s": float(seconds), "wall_s": round(wall, 1), "files": len(list(out.glob("*.png"))),
            "load_average_before": round(load, 2), "load_average_after": round(os.getloadavg()[0], 2)}


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.glob("*.png")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-unet", action="store_true", help="SD1.5's UNet and VAE layout instead of the tiny one")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--processes", type=int, default=2, help="N, compared with 1 (1: the one-process rate alone, "
                        "e.g. on a machine with one GPU)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "generate-work")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    models = make_models(args.work, args.full_unet)
    prompts = write_prompts(args.work / f"prompts-{args.prompts}", args.prompts)
    common = ["-m", "ella.generate", str(prompts), "OUT", "--sd", str(models / "sd15"), "--ella",
              str(models / "ella.safetensors"), "--t5", str(models / "t5"), "--per-prompt", str(args.per_prompt),
              "--resolution", str(args.resolution), "--steps", str(args.steps)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cases = {"1 process": [sys.executable]}
    if args.processes > 1:
        cases[f"{args.processes} processes"] = launch
    if args.processes > 1 and not torch.accelerator.is_available():
        cases[f"1 process, {args.processes} threads"] = [sys.executable]
    rows, first = [], None
    for name, head in cases.items():
        out = args.work / "out" / f"{'full' if args.full_unet else 'tiny'}-{name.replace(' ', '-').replace(',', '')}"
        if out.exists():
            for f in out.iterdir():
                f.unlink()
        extra = ["--cpu-threads", str(args.processes)] if "threads" in name else []
        command = [*head, *[str(out) if a == "OUT" else a for a in common], *extra]
        rows.append({"case": name, **run(command, out)})
        if first is None:
            first = out
        else:  # N processes: the files of 1, byte for byte; N threads: not expected to be
            rows[-1]["same_bytes_as_1_process"] = _files(out) == _files(first)
        sys.stderr.write(f"{name}: {rows[-1]}\n")
    one, many = rows[0]["images_per_s"], rows[1]["images_per_s"] if args.processes > 1 else None
    results = {"generate_scaling": rows, "unet": "SD1.5 layout (859.5 M, random)" if args.full_unet else "tiny (random)",
               "resolution": args.resolution, "steps": args.steps, "prompts": args.prompts,
               "per_prompt": args.per_prompt}
    if many is not None:
        results.update(speedup=round(many / one, 2), efficiency=round(many / (args.processes * one), 2))
    write(f"generate_scaling-{'full' if args.full_unet else 'tiny'}", results, args.out)
    return results


if __name__ == "__main__":
    main()
