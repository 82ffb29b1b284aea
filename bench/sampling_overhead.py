"""Figures 1 and 2: sampling time with ELLA vs CLIP-only conditioning through ComfyUI's real KSampler
(interleaved repetitions, median ratio), and connector rows computed vs model evaluations."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import Stopwatch, host, median, random_sd15, write
from connector_fixtures import RELEASED, TINY, random_connector_state


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny models (for the test suite)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    host()
    from ella_pack.ella import Connector
    from ella_pack.nodes.patch import apply_ella, ella_builder
    from ella_pack.nodes.payload import KEY, EllaCond, EllaPrompt

    import nodes

    cfg = TINY.__class__(**{**TINY.__dict__, "width": 768}) if args.tiny else RELEASED
    connector = Connector(cfg)
    connector.load_state_dict(random_connector_state(cfg))
    connector.eval().requires_grad_(False)
    unet = random_sd15(args.tiny)
    ella_model = apply_ella(unet, connector)
    gen = torch.Generator().manual_seed(0)

    def ella_cond(length: int) -> list:
        prompt = EllaPrompt(torch.randn(1, length, cfg.input_dim, generator=gen), torch.ones(1, length, dtype=torch.bool))
        return [[torch.zeros(1, cfg.num_latents, 768), {"model_conds": {KEY: EllaCond((prompt,))}}]]

    ella_pos, ella_neg = ella_cond(128), ella_cond(1)
    clip_pos, clip_neg = ([[torch.randn(1, 77, 768, generator=gen), {}]] for _ in range(2))
    evaluations = []
    counter = unet.model.diffusion_model.register_forward_pre_hook(lambda *a: evaluations.append(1))
    rows = []
    for size in args.sizes:
        for batch in args.batches:
            latent = {"samples": torch.zeros(batch, 4, size // 8, size // 8)}
            times: dict[str, list[float]] = {"clip": [], "ella": []}
            for model, pos, neg in ((unet, clip_pos, clip_neg), (ella_model, ella_pos, ella_neg)):  # warm-up
                nodes.common_ksampler(model, 0, 1, 7.0, "dpmpp_2m", "karras", pos, neg, latent)
            for _ in range(args.reps):
                for name, model, pos, neg in (("clip", unet, clip_pos, clip_neg), ("ella", ella_model, ella_pos, ella_neg)):
                    before_rows, evaluations[:] = ella_builder(ella_model).rows_computed, []
                    with Stopwatch() as sw:
                        nodes.common_ksampler(model, 0, args.steps, 7.0, "dpmpp_2m", "karras", pos, neg, latent)
                    times[name].append(sw.seconds)
                    if name == "ella":
                        counted = (ella_builder(ella_model).rows_computed - before_rows, len(evaluations))
            rows.append({"size": size, "batch": batch, "steps": args.steps, "reps": args.reps,
                         "clip_s": round(median(times["clip"]), 3), "ella_s": round(median(times["ella"]), 3),
                         "ratio": round(median(times["ella"]) / median(times["clip"]), 4),
                         "connector_rows": counted[0], "model_evaluations": counted[1], "distinct_prompts": 2})
    counter.remove()
    results = {"sampling_overhead": rows, "tiny": args.tiny, "connector_parameters": sum(
        p.numel() for p in connector.parameters()), "unet_parameters": sum(
        p.numel() for p in unet.model.diffusion_model.parameters())}
    write("sampling_overhead", results, args.out)
    return results


if __name__ == "__main__":
    main()
