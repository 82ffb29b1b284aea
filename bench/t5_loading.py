"""Figures 3 and 4: loading FLAN-T5-XL (random weights, real architecture) from a single encoder-only
safetensors file and from a Hugging Face folder in fp16 and fp32 (wall time, peak resident memory, against
the weights' size and against transformers' own from_pretrained), and T5 encode latency."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import ROOT, Stopwatch, median, peak_rss_mib, reset_peak_rss, write

XL = dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, feed_forward_proj="gated-gelu",
          vocab_size=32128, relative_attention_num_buckets=32, relative_attention_max_distance=128,
          is_gated_act=True, dense_act_fn="gelu_new", layer_norm_epsilon=1e-6, tie_word_embeddings=False)
TINY = dict(XL, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def make_files(work: Path, tiny: bool) -> dict[str, Path]:
    """An HF folder (fp32 weights) and a single encoder-only fp16 file, with the real T5 tokenizer beside."""
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    from tests.t5_fixtures import REAL_TOKENIZER_DIR

    folder, single = work / "flan-t5-xl", work / "single" / "flan-t5-xl-encoder-fp16.safetensors"
    if not (folder / "model.safetensors").exists():
        config = T5Config(**(TINY if tiny else XL))
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in T5EncoderModel(config).state_dict().items()}
        gen = torch.Generator().manual_seed(0)
        state = {k: torch.randn(s, generator=gen) * (0.05 if len(s) > 1 else 1.0) for k, s in shapes.items()}
        state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        save_file(state, str(folder / "model.safetensors"))
        single.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.half() for k, v in state.items()}, str(single))
        tokenizer = REAL_TOKENIZER_DIR / "tokenizer.json"
        for target in (folder, single.parent):
            (target / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return {"folder": folder, "single": single}


def measure(layout: str, path: Path, dtype: str, loader: str) -> dict:
    """Run in a fresh process: load once, report seconds and peak RSS above the imports' baseline."""
    import transformers  # noqa: F401  (counted in the baseline)

    import ella
    baseline = reset_peak_rss()
    with Stopwatch() as sw:
        if loader == "ella":
            model = ella.load_t5(path, dtype=DTYPES[dtype]).model
        else:
            model = transformers.T5EncoderModel.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"layout": layout, "dtype": dtype, "loader": loader, "seconds": round(sw.seconds, 2),
            "peak_above_baseline_mib": round(peak_rss_mib() - baseline), "weights_mib": round(weights / 2**20),
            "peak_over_weights": round((peak_rss_mib() - baseline) / (weights / 2**20), 3)}


def encode_latency(path: Path, reps: int) -> list[dict]:
    """Median encode time on the GPU in fp16 when there is one, else on the CPU in fp32."""
    import ella
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    t5 = ella.load_t5(path, device=device, dtype=dtype)
    long_prompt = "a watercolor painting of a lighthouse on a rocky cliff at dawn, " * 12
    short_prompt = "a red cube on a blue ball under a golden sky"  # 16 tokens with EOS
    rows = []
    for label, text, max_length in (("fixed, 128 tokens", long_prompt, 128), ("flexible", short_prompt, None)):
        t5.encode(text, max_length)  # warm-up
        times = []
        for _ in range(reps):
            with Stopwatch() as sw:
                out = t5.encode(text, max_length)
                if device == "cuda":
                    torch.cuda.synchronize()
            times.append(sw.seconds)
        rows.append({"prompt": label, "tokens": out.features.shape[1], "device": device, "dtype": str(dtype)[6:],
                     "median_ms": round(1000 * median(times), 1)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny T5 (for the test suite)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ella-bench-t5"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--measure", nargs=4, metavar=("LAYOUT", "PATH", "DTYPE", "LOADER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        layout, path, dtype, loader = args.measure
        sys.stdout.write(json.dumps(measure(layout, Path(path), dtype, loader)) + "\n")
        return {}
    files = make_files(args.work / ("tiny" if args.tiny else "xl"), args.tiny)
    loads = []
    for layout, path in files.items():
        for dtype in DTYPES:
            for loader in ("ella", "transformers") if layout == "folder" else ("ella",):
                done = subprocess.run([sys.executable, "-m", "bench.t5_loading", "--measure", layout, str(path), dtype,
                                       loader], cwd=ROOT, capture_output=True, text=True, check=True)
                loads.append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {"t5_loading": loads, "t5_encode": encode_latency(files["folder"], args.reps), "tiny": args.tiny}
    write("t5", results, args.out)
    return results


if __name__ == "__main__":
    main()
