"""Tests of `python -m ella.generate` (DPG-Bench images under accelerate) with tiny random-weight models of the
real architectures: one process against two, resuming after a kill, bad prompt files, metadata, --help."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="ella.generate needs diffusers (requirements-test.txt)")
pytest.importorskip("accelerate", reason="ella.generate needs accelerate (requirements-test.txt)")

from connector_fixtures import save_connector  # noqa: E402
from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402
from t5_fixtures import make_t5_folder  # noqa: E402
from tiny_sd import tiny_diffusers_sd  # noqa: E402

from ella.connector import ConnectorConfig  # noqa: E402
from ella.generate import DEFAULTS, main, noise_seed  # noqa: E402
from ella.generate_models import ModelFiles, load_pipeline  # noqa: E402
from ella.image_files import TEMP_SUFFIX, write_png  # noqa: E402
from ella.prompt_files import MAX_PROMPT_BYTES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONNECTOR = ConnectorConfig(width=32, num_latents=8, num_blocks=2, input_dim=32, time_channels=16, time_embed_dim=32)
SIZE, STEPS, PER_PROMPT = 32, 3, 4
PROMPTS = {  # DPG-Bench-like names; lengths differ (flexible T5 length), brackets stay literal text
    "1": "a cat",
    "12": "A red cube on a blue sphere (made of glass) beside a green cone.",
    "103": "Two red apples and a green pear on a wooden table next to a blue ceramic vase, morning light.",
    "256": "an astronaut riding a horse on the moon",
    "9": "a watercolor painting of a lighthouse on a rocky cliff at dawn, seagulls circling above the waves",
    "partiprompts_44": "three small boats on a calm lake",
}
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the command's default --cpu-threads 1, for runs made here
BAD = {"empty.txt": b"  \n", "latin1.txt": "café au lait".encode("latin-1"), "huge.txt": b"a cat " * 4000}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD1.5-architecture diffusers folder, connector, T5 (real vocabulary), and a DPG-Bench-style prompt
    folder: the good prompts, three bad prompt files and a file that is not a prompt."""
    tmp = tmp_path_factory.mktemp("generate")
    unet, vae = tiny_diffusers_sd(CONNECTOR.width)
    StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                            scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp / "sd15")
    save_connector(tmp / "ella.safetensors", CONNECTOR, seed=0)
    (tmp / "t5").symlink_to(make_t5_folder(tmp, "hf"))
    prompts = tmp / "prompts"
    prompts.mkdir()
    for name, text in PROMPTS.items():
        (prompts / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
    for name, data in BAD.items():
        (prompts / name).write_bytes(data)
    (prompts / "README.md").write_text("not a prompt")
    return tmp


def args(work: Path, out: Path, *extra: str) -> list[str]:
    return [str(work / "prompts"), str(out), "--sd", str(work / "sd15"), "--ella", str(work / "ella.safetensors"),
            "--t5", str(work / "t5"), "--resolution", str(SIZE), "--steps", str(STEPS), *extra]


@pytest.fixture(scope="module")
def reference(work: Path) -> tuple[Path, int]:
    """One process, in this process, asked to leave torch at two threads: (output folder, exit status). The command
    computes with --cpu-threads (1) whatever it is given, as the processes of the two-process run do."""
    out = work / "one"
    torch.set_num_threads(2)
    try:
        return out, main(args(work, out))
    finally:
        torch.set_num_threads(1)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}


def accelerate(*argv: str) -> list[str]:
    """`accelerate launch` of this venv: the script beside sys.executable, else the module."""
    script = Path(sys.executable).with_name("accelerate")
    return [str(script), "launch", *argv] if script.exists() else [sys.executable, "-m", "accelerate.commands.launch", *argv]


def pngs(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_two_processes_write_the_same_files_byte_for_byte(work: Path, reference: tuple[Path, int]) -> None:
    one, _ = reference
    out = work / "two"
    # accelerate 1.15 starts one process for `--cpu --num_processes 2` (without MPI); --multi_gpu starts two through
    # torchrun, and ella.generate puts them on the CPU (no accelerator here, ACCELERATE_USE_CPU) joined by gloo
    done = subprocess.run(accelerate("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                                     "no", "--dynamo_backend", "no", "-m", "ella.generate", *args(work, out)),
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert "on 2 process(es)" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "24 images written, 0 skipped (already there), 0 failed, 3 prompt files refused" in done.stdout
    assert sorted(pngs(out)) == sorted(f"{name}.png" for name in PROMPTS)
    assert pngs(out) == pngs(one)


def test_each_file_is_a_2x2_grid_of_the_pipeline_run_alone_on_its_prompt(work: Path,
                                                                          reference: tuple[Path, int]) -> None:
    one, _ = reference
    pipe = load_pipeline(ModelFiles(work / "sd15", work / "ella.safetensors", work / "t5"), device=torch.device("cpu"),
                         dtype=torch.float32, t5_dtype=torch.float32, t5_storage=None, fixed_tokens=None,
                         scheduler=DEFAULTS["scheduler"])
    tiles_seen = []
    for name, text in PROMPTS.items():
        generators = [torch.Generator().manual_seed(noise_seed(DEFAULTS["seed"], name, i)) for i in range(PER_PROMPT)]
        alone = pipe(text, num_images_per_prompt=PER_PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                     guidance_scale=DEFAULTS["cfg"], generator=generators).images  # PIL, as diffusers rounds
        grid = np.asarray(Image.open(one / f"{name}.png"))
        assert grid.shape == (2 * SIZE, 2 * SIZE, 3)
        for i, image in enumerate(alone):
            r, c = divmod(i, 2)  # row by row: the crops DPG-Bench's scorer takes
            tile = grid[r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE]
            assert np.array_equal(tile, np.asarray(image)), f"{name}.png tile {i}"
            tiles_seen.append(tile.tobytes())
    assert len(set(tiles_seen)) == len(tiles_seen)  # every image has noise of its own


def test_bad_prompt_files_are_named_and_skipped(work: Path, reference: tuple[Path, int],
                                               caplog: pytest.LogCaptureFixture) -> None:
    folder, out = work / "bad-only", work / "bad-out"
    folder.mkdir()
    for name, data in BAD.items():
        (folder / name).write_bytes(data)
    (folder / "README.md").write_text("not a prompt")
    with caplog.at_level("WARNING", logger="ELLA"):
        status = main([str(folder), *args(work, out)[1:]])
    text = caplog.text
    assert "empty.txt: empty (no prompt text); skipped." in text
    assert "latin1.txt: not UTF-8 text (byte 3 is 0xe9)" in text
    assert f"huge.txt: {len(BAD['huge.txt'])} bytes, over the limit of {MAX_PROMPT_BYTES} bytes" in text
    assert "README.md" not in text
    assert status == 1 and list(out.iterdir()) == []
    # beside good prompts (the reference run's folder): those run, and the status says some did not
    assert reference[1] == 1 and sorted(pngs(reference[0])) == sorted(f"{name}.png" for name in PROMPTS)


def test_the_png_says_how_it_was_made(reference: tuple[Path, int]) -> None:
    image = Image.open(reference[0] / "12.png")
    assert image.text["Description"] == PROMPTS["12"]
    made = json.loads(image.text["ella"])
    assert made["prompt"] == PROMPTS["12"] and made["name"] == "12" and made["images"] == [0, 1, 2, 3]
    assert made["noise_seeds"] == [noise_seed(DEFAULTS["seed"], "12", i) for i in range(4)]
    assert made["models"] == {"sd": "sd15", "ella": "ella.safetensors", "t5": "t5"}
    assert {k: made[k] for k in ("seed", "steps", "cfg", "scheduler", "width", "token_length", "negative")} == {
        "seed": 1001, "steps": STEPS, "cfg": 12.0, "scheduler": "dpmpp_2m", "width": SIZE, "token_length": "flexible",
        "negative": ""}


def test_noise_seeds_depend_on_seed_name_and_index_only() -> None:
    assert noise_seed(1001, "12", 0) == 8953731587488342185  # a stable hash: this value never changes
    seeds = {noise_seed(s, n, i) for s in (0, 1) for n in ("1", "12") for i in range(3)}
    assert len(seeds) == 12


def test_a_run_killed_midway_resumes_to_the_same_bytes(work: Path, reference: tuple[Path, int]) -> None:
    one, _ = reference
    out = work / "killed"
    run = subprocess.Popen([sys.executable, "-m", "ella.generate", *args(work, out)], cwd=ROOT, env=child_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out.is_dir() and any(out.glob("*.png"))) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    _, err = run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL, err.decode()[-3000:]
    done = pngs(out)
    written = {n: b for n, b in done.items() if n.endswith(".png")}
    assert 0 < len(written) < len(PROMPTS)
    assert all(b == (one / n).read_bytes() for n, b in written.items())  # no half-written file is visible
    (out / f".9.12345{TEMP_SUFFIX}").write_bytes(b"\x89PNG half")  # what a kill during a write leaves
    status = main(args(work, out))
    assert status == 1  # the bad prompt files
    assert pngs(out) == pngs(one)  # finished, the same bytes, and no temporaries left
    for name, data in written.items():
        assert (out / name).read_bytes() == data


def test_existing_files_are_skipped_not_redone(work: Path, reference: tuple[Path, int],
                                              capsys: pytest.CaptureFixture) -> None:
    out = work / "skip"
    out.mkdir()
    (out / "1.png").write_bytes(b"kept")  # the command trusts a file that exists: it was written whole
    main(args(work, out))
    assert (out / "1.png").read_bytes() == b"kept"
    assert "20 images written, 4 skipped (already there), 0 failed" in capsys.readouterr().out
    assert pngs(out) | {"1.png": b""} == pngs(reference[0]) | {"1.png": b""}


def test_a_write_that_fails_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(self, fp, *a, **k) -> None:
        fp.write(b"\x89PNG\r\n\x1a\n half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_png(tmp_path / "1.png", np.zeros((8, 8, 3), np.uint8), {"Description": "x"})
    assert list(tmp_path.iterdir()) == []


def test_a_prompt_per_line_gives_numbered_files_and_no_grid_gives_one_file_per_image(work: Path) -> None:
    lines = work / "lines.txt"
    lines.write_text("a cat\n\na dog\n", encoding="utf-8")
    out = work / "lines"
    assert main([str(lines), str(out), *args(work, out)[2:], "--per-prompt", "2", "--no-grid", "--steps", "1"]) == 0
    assert sorted(f.name for f in out.iterdir()) == ["00001_0.png", "00001_1.png", "00003_0.png", "00003_1.png"]
    assert Image.open(out / "00003_1.png").size == (SIZE, SIZE)


def test_an_unreadable_model_stops_before_any_work(work: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "ella.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    argv = args(work, tmp_path / "out")
    argv[argv.index("--ella") + 1] = str(broken)
    with caplog.at_level("ERROR", logger="ELLA"):
        assert main(argv) == 2
    assert str(broken) in caplog.text
    assert not list((tmp_path / "out").glob("*.png"))


def test_a_single_file_checkpoint_without_configs_says_what_to_pass(work: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    argv = args(work, tmp_path / "out")
    argv[argv.index("--sd") + 1] = str(work / "sd15/unet/diffusion_pytorch_model.safetensors")
    with caplog.at_level("ERROR", logger="ELLA"):
        assert main(argv) == 2
    assert "a single-file checkpoint needs SD1.5's config files, which diffusers would download: pass --sd-config" \
        in caplog.text
    argv += ["--sd-config", str(work / "sd15")]  # configs, but the file is a UNet alone
    with caplog.at_level("ERROR", logger="ELLA"):
        assert main(argv) == 2
    assert f"cannot read a single-file SD1.5 checkpoint with the configs of {work / 'sd15'}, which must be" in caplog.text


def test_help_lists_the_authors_defaults(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("images per prompt (default: 4)", "(default: 512)", "sampling steps (default: 50)",
                     "guidance scale (default: 12.0)", "(default: dpmpp_2m, DPM-Solver++ 2M",
                     "(default: flexible)", "T5 tokens in fixed mode (default: 128)", "(default: 1001)",
                     "negative prompt, through T5 like the prompt (default: empty", "DPG-Bench's layout; default: on"):
        assert expected in text, expected


def test_model_options_reach_the_pipeline(work: Path) -> None:
    from ella.pipelines import EllaFixedDiffusionPipeline

    pipe = load_pipeline(ModelFiles(work / "sd15", work / "ella.safetensors", work / "t5"), device=torch.device("cpu"),
                         dtype=torch.bfloat16, t5_dtype=torch.float32, t5_storage="fp8_e4m3fn", fixed_tokens=64,
                         scheduler="euler_a")
    assert isinstance(pipe, EllaFixedDiffusionPipeline) and pipe.t5_max_length == 64
    assert pipe.t5.storage_dtype == torch.float8_e4m3fn and pipe.t5.dtype == torch.float32
    assert pipe.unet.dtype == torch.bfloat16 and type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert not pipe.weighted_prompts  # benchmark prompts are literal: "(glass)" is text, not a weight
