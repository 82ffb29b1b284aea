"""Figure 5: where T5 lives while sampling. The real nodes load FLAN-T5-XL (fp16 single file), encode a prompt
(ComfyUI moves T5 to the GPU for it), then sample with an ELLA-patched SD1.5; a hook on the UNet records at its
first call whether T5's weights are still on the GPU and how much GPU memory is held. Run once with the whole
card free and once with a ballast tensor that leaves a small card's worth of free memory."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import ella_sd15, host, random_sd15, write
from bench.t5_loading import TINY as TINY_T5
from bench.t5_loading import make_files
from tests.connector_fixtures import RELEASED, TINY

SMALL_CARD_GIB = 5.0


def _gib(n: int) -> float:
    return round(n / 2**30, 2)


def sample_once(t5_path: Path, free_gib: float | None, tiny: bool) -> dict:
    """Load, encode, sample; report T5's device and GPU memory at the UNet's first call."""
    import comfy.model_management as mm
    from ella_pack.nodes.encode import EllaTextEncode
    from ella_pack.nodes.t5_handle import T5Handle

    import nodes

    mm.unload_all_models()
    mm.soft_empty_cache()
    cuda = torch.cuda.is_available()
    ballast = None
    if cuda and free_gib is not None:
        free, _ = torch.cuda.mem_get_info()
        ballast = torch.empty(max(0, free - int(free_gib * 2**30)), dtype=torch.uint8, device="cuda")
    cfg = TINY.__class__(**{**TINY.__dict__, "width": 768, "input_dim": TINY_T5["d_model"]}) if tiny else RELEASED
    unet = random_sd15(tiny)
    model = ella_sd15(unet, cfg)
    t5 = T5Handle(t5_path, "auto")
    encode = EllaTextEncode()
    (pos,) = encode.encode(t5, "a lighthouse on a rocky cliff at dawn, watercolor", "fixed", 128)
    (neg,) = encode.encode(t5, "", "fixed", 128)
    t5_after_encode = next(t5.encoder.model.parameters()).device.type
    seen: dict = {}

    def first_call(*_: object) -> None:
        if not seen:
            seen["t5_device"] = next(t5.encoder.model.parameters()).device.type
            seen["allocated"] = torch.cuda.memory_allocated() if cuda else 0
    hook = unet.model.diffusion_model.register_forward_pre_hook(first_call)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    latent = {"samples": torch.zeros(1, 4, 8 if tiny else 64, 8 if tiny else 64)}
    nodes.common_ksampler(model, 0, 2 if tiny else 20, 7.0, "dpmpp_2m", "karras", pos, neg, latent)
    hook.remove()
    weights = sum(p.numel() * p.element_size() for p in t5.encoder.model.parameters())
    row = {"free_gib_at_start": free_gib, "t5_weights_gib": _gib(weights), "t5_device_after_encode": t5_after_encode,
           "t5_device_while_sampling": seen["t5_device"],
           "gpu_allocated_at_first_step_gib": _gib(seen["allocated"] - (ballast.numel() if ballast is not None else 0)),
           "gpu_peak_while_sampling_gib": _gib(torch.cuda.max_memory_allocated() - (
               ballast.numel() if ballast is not None else 0)) if cuda else 0}
    del ballast, model, unet
    mm.unload_all_models()
    mm.soft_empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny models (for the test suite)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ella-bench-t5"))
    parser.add_argument("--small-card-gib", type=float, default=SMALL_CARD_GIB)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    host()
    t5_path = make_files(args.work / ("tiny" if args.tiny else "xl"), args.tiny)["single"]
    rows = [sample_once(t5_path, free, args.tiny) for free in (None, args.small_card_gib)]
    results = {"sampling_memory": rows, "tiny": args.tiny}
    write("sampling_memory", results, args.out)
    return results


if __name__ == "__main__":
    main()
