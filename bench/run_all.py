"""Run every benchmark and write bench/results/*.json plus a short markdown table (results/latest.md).

    python bench/run_all.py                      # full-size random models (slow on CPU)
    python bench/run_all.py --quick              # 256x256 and 512x512 at batch 1, 2 repetitions
    python bench/run_all.py --tiny               # tiny models: checks the scripts run (the test suite)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sampling_overhead
import t5_loading
from common import machine


def table(sampling: dict, t5: dict) -> str:
    m = machine()
    lines = [f"Machine: {m['device']}, {m['threads']} threads, torch {m['torch']}, {m['date']}.", "",
             "| size | batch | steps | CLIP-only s | ELLA s | ratio | connector rows / evaluations |",
             "|---|---|---|---|---|---|---|"]
    for r in sampling["sampling_overhead"]:
        lines.append(f"| {r['size']} | {r['batch']} | {r['steps']} | {r['clip_s']} | {r['ella_s']} | {r['ratio']} | "
                     f"{r['connector_rows']} / {r['model_evaluations']} ({r['distinct_prompts']} prompts) |")
    lines += ["", "| T5 from | dtype | loader | seconds | peak RSS above baseline | weights | peak / weights |",
              "|---|---|---|---|---|---|---|"]
    for r in t5["t5_loading"]:
        lines.append(f"| {r['layout']} | {r['dtype']} | {r['loader']} | {r['seconds']} | {r['peak_above_baseline_mib']} MiB | "
                     f"{r['weights_mib']} MiB | {r['peak_over_weights']} |")
    lines += ["", "| T5 encode (fp32) | tokens | median ms |", "|---|---|---|"]
    lines += [f"| {r['prompt']} | {r['tokens']} | {r['median_ms']} |" for r in t5["t5_encode"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    out = ["--out", str(args.out)]
    if args.tiny:
        sampling = sampling_overhead.main(["--tiny", "--sizes", "64", "--batches", "1", "2", "--steps", "2",
                                           "--reps", "1", *out])
        t5 = t5_loading.main(["--tiny", "--reps", "1", *out])
    else:
        quick = ["--batches", "1", "--reps", "2"] if args.quick else []
        sampling = sampling_overhead.main([*quick, *out])
        t5 = t5_loading.main(out)
    text = table(sampling, t5)
    (args.out / "latest.md").write_text(text)
    return text


if __name__ == "__main__":
    import sys
    sys.stdout.write(main())
