"""Images for a folder of prompt files (DPG-Bench's layout) with ELLA-SD1.5, on one or many processes.

    python -m ella.generate PROMPTS OUT --sd SD15 --ella ELLA.safetensors --t5 FLAN-T5-XL
    accelerate launch --num_processes 8 -m ella.generate PROMPTS OUT --sd ... --ella ... --t5 ...

PROMPTS is a folder of .txt files, one prompt each (the output takes the file's name: 12.txt gives 12.png),
or one text file with a prompt per line (outputs numbered by line: 00001.png, ...). With --grid (the default),
the --per-prompt images of a prompt are tiled into one file, 2 x 2 for 4: what DPG-Bench's scorer reads.
Each image's noise is drawn from (seed, prompt name, image index) alone, so every output file has the same
bytes whatever the number of processes, the order of work or an interruption (on the same kind of device,
with the same --batch-size and, on CPUs, the same --cpu-threads). Existing outputs are
skipped: running again after a crash finishes the rest. The defaults are the authors' settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import EllaError
from .generate_models import SCHEDULERS, ModelFiles, load_pipeline
from .image_files import remove_stale_temporaries, tile_grid, to_uint8, write_png
from .prompt_files import Prompt, read_prompts
from .t5 import T5_MAX_TOKENS, resolve_dtype

if TYPE_CHECKING:
    from accelerate import PartialState

    from .pipelines import _EllaPipeline

__all__ = ["DEFAULTS", "Output", "build_parser", "main", "noise_seed", "outputs_of"]

log = logging.getLogger("ELLA")

# The authors' settings (their inference script: DPM-Solver++, 50 steps, guidance 12, 512 x 512, flexible token
# length, empty negative prompt, seed 1001; DPG-Bench's guide: 4 images per prompt in a 2 x 2 grid).
DEFAULTS = {"steps": 50, "cfg": 12.0, "scheduler": "dpmpp_2m", "resolution": 512, "token_length": "flexible",
            "fixed_tokens": 128, "seed": 1001, "per_prompt": 4, "grid": True, "negative": "", "batch_size": 1,
            "dtype": "auto", "t5_dtype": "auto", "cpu_threads": 1}
_DTYPES = ("auto", "fp16", "bf16", "fp32")


@dataclass(frozen=True)
class Output:
    """One output file of a prompt and the indices of the prompt's images it holds (all of them in a grid)."""

    path: Path
    indices: tuple[int, ...]


def outputs_of(prompt: Prompt, out: Path, per_prompt: int, grid: bool) -> list[Output]:
    """The files a prompt's images go to: `<name>.png` (a grid of all, or the one image), else `<name>_<i>.png`."""
    if grid or per_prompt == 1:
        return [Output(out / f"{prompt.name}.png", tuple(range(per_prompt)))]
    return [Output(out / f"{prompt.name}_{i}.png", (i,)) for i in range(per_prompt)]


def noise_seed(seed: int, name: str, index: int) -> int:
    """The seed of the noise of image `index` of the prompt called `name`: a stable hash of the three,
    independent of the machine, the process and the order of work (a 63-bit torch.Generator seed)."""
    digest = hashlib.sha256(json.dumps([seed, name, index]).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m ella.generate`; --help lists every default."""
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="python -m ella.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", type=Path, help="a folder of .txt prompt files, or a text file with one prompt per line")
    p.add_argument("out", type=Path, help="the folder the PNG files go to (made if missing)")
    m = p.add_argument_group("models (local files only; nothing is downloaded)")
    m.add_argument("--sd", type=Path, required=True,
                   help="SD1.5 as a diffusers folder (its CLIP is not loaded; a folder written by save_pretrained "
                        "holds ELLA/ and t5/ too), or a single-file .safetensors checkpoint (then see --sd-config)")
    m.add_argument("--ella", type=Path, help="the ELLA connector: ella-sd1.5-tsc-t5xl.safetensors, or a diffusers-"
                                             "format ELLA folder (default: the --sd folder's ELLA/)")
    m.add_argument("--t5", type=Path, help="FLAN-T5-XL: any folder or file ella.load_t5 reads (HF folder or cache, the "
                                           "authors' folder, an encoder-only file, fp8 included; default: --sd's t5/)")
    m.add_argument("--t5-tokenizer", type=Path, help="the T5 tokenizer.json or spiece.model, if not beside --t5")
    m.add_argument("--sd-config", type=Path, help="for a single-file --sd: a diffusers SD1.5 folder whose config files "
                                                  "describe it (diffusers needs them and may not download them)")
    m.add_argument("--dtype", choices=_DTYPES, default=d["dtype"],
                   help="UNet, VAE and connector dtype (default: %(default)s = fp16 on CUDA, fp32 on CPU)")
    m.add_argument("--t5-dtype", choices=_DTYPES, default=d["t5_dtype"],
                   help="T5 compute dtype (default: %(default)s = fp16 on CUDA, as the authors ran it; fp32 on CPU)")
    m.add_argument("--t5-fp8", choices=("e4m3fn", "e5m2"),
                   help="store T5's linear weights in fp8 (about 1.3 GB instead of 2.4); default: as loaded")
    s = p.add_argument_group("sampling (defaults: the authors' settings)")
    s.add_argument("--per-prompt", type=int, default=d["per_prompt"], help="images per prompt (default: %(default)s)")
    s.add_argument("--grid", action=argparse.BooleanOptionalAction, default=d["grid"],
                   help="tile a prompt's images into one file, row by row, 2 x 2 for 4 (DPG-Bench's layout; default: "
                        "on); --no-grid writes <name>_<i>.png")
    s.add_argument("--resolution", type=int, default=d["resolution"],
                   help="image width and height in pixels, a multiple of 8 (default: %(default)s)")
    s.add_argument("--steps", type=int, default=d["steps"], help="sampling steps (default: %(default)s)")
    s.add_argument("--cfg", type=float, default=d["cfg"], help="classifier-free guidance scale (default: %(default)s)")
    s.add_argument("--scheduler", choices=tuple(SCHEDULERS), default=d["scheduler"],
                   help="the sampler, built from the checkpoint's scheduler config (default: %(default)s, "
                        "DPM-Solver++ 2M, the authors' DPMSolverMultistepScheduler)")
    s.add_argument("--token-length", choices=("flexible", "fixed"), default=d["token_length"],
                   help="flexible: each prompt at its own T5 length (the authors' advice); fixed: padded or cut to "
                        "--fixed-tokens, the training setting (default: %(default)s)")
    s.add_argument("--fixed-tokens", type=int, default=d["fixed_tokens"],
                   help="T5 tokens in fixed mode (default: %(default)s)")
    s.add_argument("--seed", type=int, default=d["seed"],
                   help="base seed; image i of prompt NAME gets noise from (seed, NAME, i) (default: %(default)s)")
    s.add_argument("--negative", default=d["negative"],
                   help="negative prompt, through T5 like the prompt (default: empty, as the authors)")
    p.add_argument("--cpu-threads", type=int, default=d["cpu_threads"],
                   help="torch threads per process when computing on the CPU (default: %(default)s; run more processes "
                        "to use more cores). The bytes of the files depend on it; keep it when resuming")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="prompts per pipeline call on each process; each gives --per-prompt images "
                        "(default: %(default)s). The bytes of the files depend on it; keep it when resuming")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name, low in (("per_prompt", 1), ("steps", 1), ("batch_size", 1), ("resolution", 8), ("cpu_threads", 1)):
        if getattr(args, name) < low:
            raise EllaError(f"--{name.replace('_', '-')} must be at least {low}; got {getattr(args, name)}.")
    if args.resolution % 8:
        raise EllaError(f"--resolution must be a multiple of 8 (the VAE's scale); got {args.resolution}.")
    if not 1 <= args.fixed_tokens <= T5_MAX_TOKENS:
        raise EllaError(f"--fixed-tokens must be from 1 to {T5_MAX_TOKENS} (T5's limit); got {args.fixed_tokens}.")
    if args.out.exists() and not args.out.is_dir():
        raise EllaError(f"{args.out}: exists and is not a folder; OUT is the folder the PNG files go to.")


def _on_cpu() -> bool:
    """Whether the processes compute on the CPU: asked for (accelerate's ACCELERATE_USE_CPU, which `accelerate
    launch --cpu` sets) or no accelerator present. accelerate then joins several processes with gloo."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return not torch.accelerator.is_available()


def _dtype(name: str, device: torch.device) -> torch.dtype:
    return resolve_dtype(None if name == "auto" else name, device)


def _settings(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, t5_dtype: torch.dtype) -> dict:
    """What goes into every file's metadata besides the prompt: sampling settings and model file names."""
    fixed = args.token_length == "fixed"
    return {"device": device.type, "seed": args.seed, "steps": args.steps, "cfg": args.cfg, "scheduler": args.scheduler,
            "width": args.resolution, "height": args.resolution, "token_length": args.token_length,
            "fixed_tokens": args.fixed_tokens if fixed else None, "negative": args.negative,
            "per_prompt": args.per_prompt, "grid": args.grid, "batch_size": args.batch_size,
            "cpu_threads": args.cpu_threads if device.type == "cpu" else None,
            "dtype": str(dtype).removeprefix("torch."), "t5_dtype": str(t5_dtype).removeprefix("torch."),
            "t5_fp8": args.t5_fp8,
            "models": {"sd": args.sd.name, "ella": args.ella.name if args.ella else f"{args.sd.name}/ELLA",
                       "t5": args.t5.name if args.t5 else f"{args.sd.name}/t5"}}


def _metadata(prompt: Prompt, output: Output, settings: dict) -> dict[str, str]:
    seeds = [noise_seed(settings["seed"], prompt.name, i) for i in output.indices]
    data = {"prompt": prompt.text, "name": prompt.name, "images": list(output.indices), "noise_seeds": seeds,
            **settings}
    return {"Description": prompt.text, "Software": "ELLA ella.generate", "ella": json.dumps(data, sort_keys=True)}


class _Run:
    """One process's share of the work: batches of prompts through the pipeline, files written as they come."""

    def __init__(self, pipe: _EllaPipeline, args: argparse.Namespace, out: Path, settings: dict) -> None:
        self.pipe, self.args, self.out, self.settings = pipe, args, out, settings

    def batch(self, prompts: Sequence[Prompt]) -> tuple[int, int]:
        """Generate the images of `prompts` and write their missing files: (images written, images failed)."""
        a, n = self.args, self.args.per_prompt
        missing = [[o for o in outputs_of(p, self.out, n, a.grid) if not o.path.exists()] for p in prompts]
        try:
            generators = [torch.Generator().manual_seed(noise_seed(a.seed, p.name, i)) for p in prompts for i in range(n)]
            with torch.inference_mode():
                images = self.pipe([p.text for p in prompts], negative_prompt=a.negative, num_images_per_prompt=n,
                                   height=a.resolution, width=a.resolution, num_inference_steps=a.steps,
                                   guidance_scale=a.cfg, generator=generators, output_type="np").images
            pixels = to_uint8(images)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001  (one failed batch must not stop the others)
            log.error("ELLA generate: failed on %s: %s: %s", ", ".join(p.name for p in prompts), type(e).__name__, e)
            return 0, sum(len(o.indices) for outs in missing for o in outs)
        written = failed = 0
        for k, (prompt, outs) in enumerate(zip(prompts, missing, strict=True)):
            tiles = pixels[k * n:(k + 1) * n]
            for o in outs:
                try:
                    image = tile_grid([tiles[i] for i in o.indices]) if a.grid else tiles[o.indices[0]]
                    write_png(o.path, image, _metadata(prompt, o, self.settings))
                    written += len(o.indices)
                except OSError as e:
                    log.error("ELLA generate: cannot write %s: %s", o.path, e)
                    failed += len(o.indices)
        return written, failed


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit status: 0 when every prompt has its files, 1 when some prompt files were
    refused or images failed, 2 when nothing could run (bad arguments, unreadable models)."""
    args = build_parser().parse_args(argv)
    try:
        from accelerate import PartialState
    except ImportError as e:
        log.error("ELLA generate needs the `accelerate` package, which could not be imported (%s): "
                  "pip install accelerate diffusers", e)
        return 2
    state = PartialState(cpu=_on_cpu())
    try:
        _check_args(args)
        prompts, problems = read_prompts(args.prompts)
    except EllaError as e:
        if state.is_main_process:
            log.error("ELLA generate: %s", e)
        return 2
    return _generate(args, prompts, problems, state)


@dataclass(frozen=True)
class _Plan:
    """The work left: batches of prompts with at least one missing file, the images to write, those already there."""

    pending: list[list[Prompt]]
    to_write: int
    skipped: int


def _plan(prompts: list[Prompt], out: Path, args: argparse.Namespace) -> _Plan:
    """Batches are cut from the whole prompt list, whatever exists, so a batch holds the same prompts in every run
    (and gives the same bytes); a batch with any file missing runs whole and writes only what is missing."""
    n = args.per_prompt
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    todo = {p.name: sum(len(o.indices) for o in outputs_of(p, out, n, args.grid) if not o.path.exists())
            for p in prompts}
    to_write = sum(todo.values())
    return _Plan([b for b in batches if any(todo[p.name] for p in b)], to_write, len(prompts) * n - to_write)


def _load(args: argparse.Namespace, device: torch.device) -> _Run:
    dtype, t5_dtype = _dtype(args.dtype, device), _dtype(args.t5_dtype, device)
    given = [None if p is None else p.expanduser() for p in (args.ella, args.t5, args.t5_tokenizer, args.sd_config)]
    pipe = load_pipeline(ModelFiles(args.sd.expanduser(), *given), device=device, dtype=dtype, t5_dtype=t5_dtype,
                         t5_storage=args.t5_fp8 and f"fp8_{args.t5_fp8}",
                         fixed_tokens=args.fixed_tokens if args.token_length == "fixed" else None,
                         scheduler=args.scheduler)
    return _Run(pipe, args, args.out.expanduser(), _settings(args, device, dtype, t5_dtype))


def _work(run: _Run, plan: _Plan, state: PartialState) -> tuple[int, int, float]:
    """This process's share of `plan` (accelerate's split of the batches): (images written, failed, seconds), summed
    over all processes. Every process takes part in each round's gather, which feeds the first one's progress bar."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    bar = tqdm(total=plan.to_write, unit="image", desc="ELLA generate", disable=not state.is_main_process)
    written = failed = 0
    start = time.perf_counter()
    with state.split_between_processes(plan.pending) as mine:
        mine = list(mine)
    for r in range(math.ceil(len(plan.pending) / state.num_processes)):
        gathered = gather_object([run.batch(mine[r]) if r < len(mine) else (0, 0)])
        bar.update(sum(w + f for w, f in gathered))
        written += sum(w for w, _ in gathered)
        failed += sum(f for _, f in gathered)
    bar.close()
    return written, failed, time.perf_counter() - start


def _generate(args: argparse.Namespace, prompts: list[Prompt], problems: list[str], state: PartialState) -> int:
    out = args.out.expanduser()
    if state.is_main_process:
        for problem in problems:
            log.warning("ELLA generate: %s", problem)
        out.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temporaries(out)
        if removed:
            log.info("ELLA generate: removed %d unfinished temporary file(s) of an interrupted run.", removed)
    state.wait_for_everyone()
    plan = _plan(prompts, out, args)
    state.wait_for_everyone()  # every process has seen what exists before anything is written
    written = failed = 0
    seconds = 0.0
    if plan.pending:
        threads = torch.get_num_threads()
        if state.device.type == "cpu":  # CPU kernels may sum in another order with another thread count
            torch.set_num_threads(args.cpu_threads)
        try:
            run = _load(args, state.device)
            written, failed, seconds = _work(run, plan, state)
        except EllaError as e:  # the models (a failing batch is counted, not raised)
            if state.is_main_process:
                log.error("ELLA generate: %s", e)
            return 2
        finally:
            torch.set_num_threads(threads)
    if state.is_main_process:
        rate = f"{written / seconds:.3g} images/s over {seconds:.1f} s" if seconds else "nothing to generate"
        sys.stdout.write(f"ELLA generate: {written} images written, {plan.skipped} skipped (already there), {failed} "
                         f"failed, {len(problems)} prompt files refused; {rate} on {state.num_processes} process(es); "
                         f"{out}\n")
        sys.stdout.flush()
    state.wait_for_everyone()  # a launcher stops the others when one process ends with an error status
    return 1 if (failed or problems) and state.is_main_process else 0  # the first process speaks for all


def _cli() -> int:
    """Entry point: log to stderr (warnings only on processes other than the first), run, give the status."""
    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(message)s")
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(_cli())

