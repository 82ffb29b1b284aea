"""Figures 1 and 2: sampling time with ELLA vs CLIP-only conditioning through ComfyUI's real KSampler
(interleaved repetitions, median ratio), for prompts never sampled before and for the same prompts sampled
again (a new seed); connector rows computed vs model evaluations."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import Stopwatch, compute_dtype, ella_sd15, host, median, random_sd15, write
from tests.connector_fixtures import RELEASED, TINY

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def connector_call_ms(connector, pos: list, neg: list, batch: int, calls: int = 50) -> dict[str, float]:
    """Milliseconds per connector call for one evaluation's rows (both prompts, `batch` rows each), with and
    without CUDA graphs, synchronised: what an evaluation runs when its rows are not among those computed up
    front for the run (a sigma off the schedule, or a run with more rows than the cache holds)."""
    from ella_pack.nodes.context import ContextBuilder
    from ella_pack.nodes.payload import KEY
    from ella_pack.nodes.row_cache import RowCache

    builder = ContextBuilder(connector, RowCache(max_rows=0))  # a cache keeping nothing: every call runs the connector
    prompts = [c[0][1]["model_conds"][KEY].cond[0] for c in (pos, neg) for _ in range(batch)]
    timesteps = torch.full((len(prompts),), 500.0, device=connector.device)
    out = {}
    for label, enabled in (("graphs", True), ("eager", False)) if torch.cuda.is_available() else (("eager", False),):
        builder.graphed.enabled = enabled
        builder.rows(prompts, timesteps)
        _sync()
        with Stopwatch() as sw:
            for _ in range(calls):
                builder.rows(prompts, timesteps)
            _sync()
        out[label] = round(1000 * sw.seconds / calls, 3)
    return out


class HookClock:
    """Host seconds spent inside ELLA's hook during sampling, not counting the model call it wraps: on a GPU,
    the time the host adds before each evaluation's UNet kernels are queued (including the wait, at the
    hook's one read of the sigma, for GPU work already queued)."""

    def __enter__(self) -> HookClock:
        from ella_pack.nodes import hooks

        self.per_call: list[float] = []
        self._saved = hooks.CondBatchHook.__call__
        hooks.CondBatchHook.__call__ = self._timed(self._saved)
        return self

    def __exit__(self, *exc: object) -> None:
        from ella_pack.nodes import hooks

        hooks.CondBatchHook.__call__ = self._saved

    def _timed(self, call):
        clock = self

        def timed(hook, inner, *args):
            start, wrapped = time.perf_counter(), _Untimed(inner)
            try:
                return call(hook, wrapped, *args)
            finally:
                clock.per_call.append(time.perf_counter() - start - wrapped.seconds)
        return timed


class _Untimed:
    """Calls `inner` and records how long it took."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny models (for the test suite)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--unet-dtype", choices=sorted(DTYPES), help="store and compute the UNet in this dtype "
                        "(default: what ComfyUI picks for SD1.5 on this device)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    host()
    from ella_pack.nodes.patch import ella_builder
    from ella_pack.nodes.payload import KEY, STAND_IN, EllaCond, EllaPrompt

    import nodes

    cfg = TINY.__class__(**{**TINY.__dict__, "width": 768}) if args.tiny else RELEASED
    unet = random_sd15(args.tiny, DTYPES.get(args.unet_dtype))
    ella_model = ella_sd15(unet, cfg)
    connector = ella_builder(ella_model).connector
    gen = torch.Generator().manual_seed(0)

    def ella_cond(length: int) -> list:
        prompt = EllaPrompt(torch.randn(1, length, cfg.input_dim, generator=gen), torch.ones(1, length, dtype=torch.bool))
        return [[torch.zeros(1, STAND_IN, 768), {"model_conds": {KEY: EllaCond((prompt,))}}]]  # as ELLA Text Encode

    warm_up = (ella_cond(128), ella_cond(1))  # prompts of the untimed runs, so timed "new" prompts stay new
    clip_pos, clip_neg = ([[torch.randn(1, 77, 768, generator=gen), {}]] for _ in range(2))
    evaluations = []
    counter = unet.model.diffusion_model.register_forward_pre_hook(lambda *a: evaluations.append(1))
    builder = ella_builder(ella_model)
    # arms: CLIP-only; ELLA with prompts never sampled before; ELLA again on the prompts just sampled (a new
    # seed: rows kept from the run before)
    arms = ["clip", "ella", "ella_repeat"]
    rows = []
    for size in args.sizes:
        for batch in args.batches:
            latent = {"samples": torch.zeros(batch, 4, size // 8, size // 8)}
            times: dict[str, list[float]] = {arm: [] for arm in arms}
            # per run: the hook's (mean, median) ms per evaluation, and its seconds in all
            hook_ms: dict[str, list[tuple[float, float]]] = {"ella": [], "ella_repeat": []}
            hook_s: dict[str, list[float]] = {"ella": [], "ella_repeat": []}
            counted: dict[str, tuple[int, int]] = {}
            for _ in range(args.reps):
                prompts = (ella_cond(128), ella_cond(1))
                for arm in arms:
                    if arm == "clip":
                        model, (pos, neg), warm = unet, (clip_pos, clip_neg), (clip_pos, clip_neg)
                    else:
                        model, (pos, neg), warm = ella_model, prompts, warm_up
                    # untimed one-step run: ComfyUI moves the weights when the sampled ModelPatcher changes
                    nodes.common_ksampler(model, 0, 1, 7.0, "dpmpp_2m", "karras", *warm, latent)
                    before_rows, evaluations[:] = builder.rows_computed, []
                    with Stopwatch() as sw, HookClock() as hook:
                        nodes.common_ksampler(model, 0, args.steps, 7.0, "dpmpp_2m", "karras", pos, neg, latent)
                    times[arm].append(sw.seconds)
                    if arm in hook_ms:
                        counted[arm] = (builder.rows_computed - before_rows, len(evaluations))
                        hook_ms[arm].append((1000 * sum(hook.per_call) / len(hook.per_call), 1000 * median(hook.per_call)))
                        hook_s[arm].append(sum(hook.per_call))
            per_call = connector_call_ms(builder.connector, *prompts, batch)
            ratio = {arm: round(median(times[arm]) / median(times["clip"]), 4) for arm in arms}
            rows.append({"size": size, "batch": batch, "steps": args.steps, "reps": args.reps,
                         "clip_s": round(median(times["clip"]), 3), "ella_s": round(median(times["ella"]), 3),
                         "ella_repeat_s": round(median(times["ella_repeat"]), 3),
                         "ratio": ratio["ella"], "ratio_repeat": ratio["ella_repeat"],
                         "hook_host_ms_per_evaluation": {arm: {"mean": round(median([m for m, _ in ms]), 3),
                                                               "median": round(median([m for _, m in ms]), 3)}
                                                         for arm, ms in hook_ms.items()},
                         # on a CPU the host time is ELLA's whole cost; on a GPU, only what the host waits for
                         "hook_host_s_per_run": {arm: round(median(ts), 4) for arm, ts in hook_s.items()},
                         "runs_s": {arm: [round(t, 3) for t in ts] for arm, ts in times.items()},
                         "context_ms_per_evaluation": per_call,
                         "connector_rows": counted["ella"][0], "connector_rows_repeat": counted["ella_repeat"][0],
                         "model_evaluations": counted["ella"][1], "distinct_prompts": 2})
    counter.remove()
    results = {"sampling_overhead": rows, "tiny": args.tiny, "unet_dtype": str(compute_dtype(unet)),
               "connector_dtype": str(connector.dtype), "connector_parameters": sum(
        p.numel() for p in connector.parameters()), "unet_parameters": sum(
        p.numel() for p in unet.model.diffusion_model.parameters())}
    write("sampling_overhead", results, args.out)
    return results


if __name__ == "__main__":
    main()
