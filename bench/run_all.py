"""Run every benchmark (figures 1 to 6) and write bench/results/*.json plus a short markdown table (results/latest.md).

    python -m bench.run_all                      # full-size random models (slow on CPU)
    python -m bench.run_all --quick              # 256x256 and 512x512 at batch 1, 2 repetitions
    python -m bench.run_all --tiny               # tiny models: checks the scripts run (the test suite)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import sampling_memory, sampling_overhead, t5_fp8, t5_loading
from bench.common import machine


def table(sampling: dict, t5: dict, memory: dict, fp8: dict | None = None) -> str:
    m = sampling.get("machine") or machine()
    dtypes = (f" UNet {sampling['unet_dtype']}, connector {sampling['connector_dtype']} (as Apply ELLA gives it)."
              if "connector_dtype" in sampling else "")  # figures from before it was recorded lack it
    # older GPU figures (bench/figures/h200-2026-11-26/) have a ratio without CUDA graphs; the bench no longer measures it
    eager = any(r.get("ratio_without_cuda_graphs") for r in sampling["sampling_overhead"])
    lines = [f"Machine: {m['device']}, {m['threads']} threads, torch {m['torch']}, {m['date']}.{dtypes}", "",
             "| size | batch | steps | CLIP-only s | ELLA s, new prompts | ratio | ELLA s, same prompts again | ratio | "
             + ("ratio without CUDA graphs | " if eager else "")
             + "ELLA hook host ms per evaluation, new (mean, median) / again (mean) | "
             "connector ms per call, synchronised | connector rows / evaluations, new / again |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if eager else "") + "---|---|---|"]
    for r in sampling["sampling_overhead"]:
        lines.append(f"| {r['size']} | {r['batch']} | {r['steps']} | {r['clip_s']} | {r['ella_s']} | {r['ratio']} | "
                     f"{r.get('ella_repeat_s', 'n/a')} | {r.get('ratio_repeat', 'n/a')} | "
                     + (f"{r.get('ratio_without_cuda_graphs') or 'n/a'} | " if eager else "") + f"{_hook_ms(r)} | "
                     f"{', '.join(f'{k} {v}' for k, v in r['context_ms_per_evaluation'].items())} | "
                     f"{r['connector_rows']} / {r['model_evaluations']} ({r['distinct_prompts']} prompts) / "
                     f"{r.get('connector_rows_repeat', 'n/a')} |")
    lines += ["", "| T5 from | dtype | loader | seconds | peak RSS above baseline | weights | peak / weights |",
              "|---|---|---|---|---|---|---|"]
    for r in t5["t5_loading"]:
        lines.append(f"| {r['layout']} | {r['dtype']} | {r['loader']} | {r['seconds']} | {r['peak_above_baseline_mib']} MiB | "
                     f"{r['weights_mib']} MiB | {r['peak_over_weights']} |")
    lines += ["", "| T5 encode | tokens | device, dtype | median ms |", "|---|---|---|---|"]
    lines += [f"| {r['prompt']} | {r['tokens']} | {r['device']}, {r['dtype']} | {r['median_ms']} |" for r in t5["t5_encode"]]
    lines += ["", "| free GPU memory at start | T5 after encode | T5 while sampling | GPU held at first step | "
              "GPU peak while sampling |", "|---|---|---|---|---|"]
    for r in memory["sampling_memory"]:
        free = "whole card" if r["free_gib_at_start"] is None else f"{r['free_gib_at_start']} GiB"
        lines.append(f"| {free} | {r['t5_device_after_encode']} | {r['t5_device_while_sampling']} | "
                     f"{r['gpu_allocated_at_first_step_gib']} GiB | {r['gpu_peak_while_sampling_gib']} GiB |")
    if fp8:  # results from before figure 6 lack it
        lines += ["", f"| T5 as ({fp8['layers']} layers) | load s | peak RSS above baseline | vs fp16 | vs same compute, "
                  "weights not fp8 | encode 128 tokens s | vs same compute | max / mean rel. error vs fp32 |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['load_s']} | {r['peak_rss_above_baseline_mib']} MiB | {r.get('peak_vs_fp16', 'n/a')} | "
                  f"{r.get('peak_vs_same_compute', '')} | {r['encode_128_tokens_median_s']} | "
                  f"{r.get('encode_vs_same_compute', '')} | {r['max_rel_error']:.4f} / {r['mean_rel_error']:.4f} |"
                  for r in fp8["t5_fp8"]]
    return "\n".join(lines) + "\n"


def _hook_ms(row: dict) -> str:
    hook = row.get("hook_host_ms_per_evaluation")  # figures from before it was measured lack it
    return f"{hook['ella']['mean']}, {hook['ella']['median']} / {hook['ella_repeat']['mean']}" if hook else "n/a"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--table-only", action="store_true", help="rewrite latest.md from the JSON files in --out")
    args = parser.parse_args(argv)
    out = ["--out", str(args.out)]
    if args.table_only:
        sampling, t5, memory = (json.loads((args.out / f"{name}.json").read_text())
                                for name in ("sampling_overhead", "t5", "sampling_memory"))
        fp8_file = args.out / "t5_fp8.json"
        fp8 = json.loads(fp8_file.read_text()) if fp8_file.exists() else None
    elif args.tiny:
        # a bf16 UNet, so that a connector not given the UNet's dtype shows even on a CPU
        sampling = sampling_overhead.main(["--tiny", "--sizes", "64", "--batches", "1", "2", "--steps", "2",
                                           "--reps", "1", "--unet-dtype", "bf16", *out])
        t5 = t5_loading.main(["--tiny", "--reps", "1", *out])
        fp8 = t5_fp8.main(["--tiny", "--reps", "1", "--cases", "fp16", "fp8_e4m3fn, fp16 compute", "int8",
                             *out])
        memory = sampling_memory.main(["--tiny", *out])
    else:
        quick = ["--batches", "1", "--reps", "2"] if args.quick else []
        sampling = sampling_overhead.main([*quick, *out])
        t5 = t5_loading.main(out)
        fp8 = t5_fp8.main(out)
        memory = sampling_memory.main(out)
    text = table(sampling, t5, memory, fp8)
    (args.out / "latest.md").write_text(text)
    return text


if __name__ == "__main__":
    import sys
    sys.stdout.write(main())
