"""Figure 6: T5 with fp8 or int8 linear weights against fp16 and fp32, side by side in one run, from one fp16
encoder-only file of FLAN-T5-XL's architecture (random weights): peak resident memory of the load, encode
time for a 128-token prompt, and how far the features land from the full-precision (fp32) encoder.

Each case loads in a fresh process (peak RSS above the imports' baseline), times the encode there, and
leaves its features in the work folder; the parent compares them. `--layers N` measures at a reduced
depth (every layer is the same size, so ratios hold; the embedding's share grows as depth shrinks)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import ROOT, Stopwatch, median, peak_rss_mib, reset_peak_rss, write
from bench.t5_loading import TINY, XL

PROMPT = "a watercolor painting of a lighthouse on a rocky cliff at dawn, " * 12  # over 128 tokens: cut to 128
# name -> (compute dtype, storage dtype)
CASES = {
    "fp32": ("fp32", None), "fp8_e4m3fn, fp32 compute": ("fp32", "fp8_e4m3fn"),
    "fp8_e5m2, fp32 compute": ("fp32", "fp8_e5m2"),
    "fp16": ("fp16", None), "fp8_e4m3fn, fp16 compute": ("fp16", "fp8_e4m3fn"),
    "bf16": ("bf16", None), "fp8_e4m3fn, bf16 compute": ("bf16", "fp8_e4m3fn"),
    "int8": ("fp32", "int8"),  # torchao's int8 weights and kernels (CPU)
}
REFERENCE = "fp32"


def make_file(work: Path, tiny: bool, layers: int | None) -> Path:
    """One encoder-only fp16 file (the common download) with the tokenizer beside it, written once."""
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    from tests.t5_fixtures import REAL_TOKENIZER_DIR

    config = dict(TINY if tiny else XL, **({"num_layers": layers} if layers else {}))
    path = work / f"t5-{config['num_layers']}x{config['d_model']}-t5-init" / "encoder-fp16.safetensors"
    if path.exists():
        return path
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in T5EncoderModel(T5Config(**config)).state_dict().items()}
    shapes.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=gen) * _init_std(k, config) if len(s) > 1 else torch.ones(s)).half()
             for k, s in shapes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    save_file(state, str(part))
    part.rename(path)
    tokenizer = REAL_TOKENIZER_DIR / "tokenizer.json"
    (path.parent / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return path


def _init_std(name: str, c: dict) -> float:
    """The spread transformers gives a new T5's weights (T5PreTrainedModel._init_weights, factor 1): each
    layer keeps its input's scale, so 24 random layers do not amplify rounding differences chaotically
    as weights of one fixed spread (0.05: a gain of 2.3 per layer at width 2048) do."""
    fan_in = {"q": c["d_model"] * c["d_kv"], "o": c["num_heads"] * c["d_kv"], "wo": c["d_ff"], "shared": 1}
    return fan_in.get(name.split(".")[-2], c["d_model"]) ** -0.5


def measure(path: Path, case: str, reps: int, features_out: Path) -> dict:
    """In a fresh process: load (seconds, peak RSS above baseline), then median encode time; save features."""
    import transformers  # noqa: F401  (counted in the baseline)

    import ella
    from ella.t5_int8 import stored_bytes
    compute, storage = CASES[case]
    if storage == "int8":
        import torchao.quantization  # noqa: F401  (counted in the baseline, as transformers is)
    baseline = reset_peak_rss()
    with Stopwatch() as load:
        t5 = ella.load_t5(path, dtype=compute, storage_dtype=storage)
    peak = peak_rss_mib() - baseline
    stored = sum(stored_bytes(p) for p in t5.model.parameters()) / 2**20
    out = t5.encode(PROMPT, 128)  # warm-up
    times, cpu = [], []
    for _ in range(reps):
        start = time.process_time()
        with Stopwatch() as sw:
            out = t5.encode(PROMPT, 128)
        times.append(sw.seconds)
        cpu.append(time.process_time() - start)
    torch.save(out.features.float(), features_out)
    return {"case": case, "compute": compute, "storage": storage or compute, "load_s": round(load.seconds, 2),
            "peak_rss_above_baseline_mib": round(peak), "weights_mib": round(stored),
            "encode_128_tokens_median_s": round(median(times), 3),
            # CPU seconds of this process's threads: less moved than wall time by other jobs on shared cores
            "encode_128_tokens_cpu_median_s": round(median(cpu), 3), "tokens": out.features.shape[1],
            "threads": torch.get_num_threads()}


def compare(features: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Each case's features against the fp32 encoder's: |difference| over the reference's largest and mean
    magnitude (max and mean relative error), and the cosine similarity of whole feature rows (mean, min)."""
    ref = features[REFERENCE][0]
    out = {}
    for case, f in features.items():
        diff = (f[0] - ref).abs()
        cos = torch.nn.functional.cosine_similarity(f[0], ref, dim=-1)
        out[case] = {"max_rel_error": float(diff.max() / ref.abs().max()),
                     "mean_rel_error": float(diff.mean() / ref.abs().mean()),
                     "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny T5 (for the test suite)")
    parser.add_argument("--layers", type=int, default=None, help="encoder depth (default: FLAN-T5-XL's 24)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=[c for c in CASES if "bf16" not in c])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ella-bench-t5"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--measure", nargs=3, metavar=("PATH", "CASE", "FEATURES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        path, case, features_out = args.measure
        sys.stdout.write(json.dumps(measure(Path(path), case, args.reps, Path(features_out))) + "\n")
        return {}
    cases = list(dict.fromkeys([REFERENCE, *args.cases]))
    path = make_file(args.work / ("tiny" if args.tiny else "xl"), args.tiny, args.layers)
    rows, features = [], {}
    for case in cases:  # one at a time: each full-size case holds up to 5 GB
        features_out = path.parent / f"features-{case.replace(', ', '-').replace(' ', '-')}.pt"
        done = subprocess.run([sys.executable, "-m", "bench.t5_fp8", "--reps", str(args.reps), "--measure",
                               str(path), case, str(features_out)], cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"case {case!r} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        features[case] = torch.load(features_out)
    errors = compare(features)
    by_case = {r["case"]: r for r in rows}
    for r in rows:
        r.update(errors[r["case"]])
        full = by_case.get(r["compute"])  # the same compute dtype, weights not in fp8
        if full is not None and full is not r:
            r["peak_vs_same_compute"] = round(r["peak_rss_above_baseline_mib"] / full["peak_rss_above_baseline_mib"], 3)
            r["encode_vs_same_compute"] = round(r["encode_128_tokens_median_s"] / full["encode_128_tokens_median_s"], 3)
            r["encode_cpu_vs_same_compute"] = round(r["encode_128_tokens_cpu_median_s"]
                                                    / full["encode_128_tokens_cpu_median_s"], 3)
        if "fp16" in by_case:
            r["peak_vs_fp16"] = round(r["peak_rss_above_baseline_mib"] / by_case["fp16"]["peak_rss_above_baseline_mib"], 3)
    layers = TINY["num_layers"] if args.tiny and not args.layers else args.layers or XL["num_layers"]
    results = {"t5_fp8": rows, "layers": layers, "tiny": args.tiny, "file": str(path)}
    write("t5_fp8", results, args.out)
    return results


if __name__ == "__main__":
    main()
