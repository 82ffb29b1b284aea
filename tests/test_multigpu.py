"""ELLA under ComfyUI's own MultiGPU CFG Split, through its real sampling code, with two devices simulated on the
CPU: `get_all_torch_devices` gives cpu and cpu:0, which compare unequal, so the node really deep-clones the UNet
and the sampler really hands the cond and uncond batches to two worker threads (device mix-ups are not caught
here: both are the CPU)."""

from __future__ import annotations

import threading

import pytest
import test_nodes_sampling as sampling
import torch
from test_nodes_sampling import encode, sample

env = sampling.env
pytestmark = sampling.pytestmark


@pytest.fixture
def two_devices(env, monkeypatch):
    """The host's MultiGPU nodes, with two devices; afterwards nothing of the run stays loaded."""
    try:
        import comfy_extras.nodes_multigpu as multigpu
    except ImportError:
        pytest.skip("this ComfyUI has no MultiGPU CFG Split (comfy_extras/nodes_multigpu.py: 0.3.75 has none, 0.33.0 has it)")
    import comfy.model_management as mm
    monkeypatch.setattr(mm, "get_all_torch_devices",
                        lambda exclude_current=False: [torch.device("cpu"), torch.device("cpu", 0)])
    yield multigpu
    mm.unload_all_models()


def split(multigpu, model, max_gpus=2):
    return multigpu.MultiGPUCFGSplitNode.execute(model, max_gpus)[0]


def with_ella(env, order, multigpu):
    """Apply ELLA and MultiGPU CFG Split in either order."""
    apply = env.pack.nodes.apply.ApplyElla().apply
    if order == "ella first":
        return split(multigpu, apply(env.unet, env.ella)[0])
    return apply(split(multigpu, env.unet), env.ella)[0]


def device_copies(model):
    """MultiGPU CFG Split's copies of the UNet for the extra devices."""
    return model.get_additional_models_with_key("multigpu")


class ThreadSpy:
    """Every call of each UNet module: (module index, thread, timesteps, context, cond_or_uncond)."""

    def __init__(self, unets):
        self.calls = []
        self.handles = [u.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, u in enumerate(unets)]

    def _hook(self, index):
        def record(module, args, kwargs):
            t = kwargs.get("timesteps", args[1] if len(args) > 1 else None)
            self.calls.append((index, threading.current_thread(), t.clone(),
                               kwargs["context"].clone(), list(kwargs["transformer_options"]["cond_or_uncond"])))
        return record

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def scenario(env, name):
    """(sampler, positive entries by name, negative)."""
    import nodes
    if name == "euler":
        return "euler", {"pos": encode(env, "a red cube on a blue sphere")}, encode(env, "")
    a, b = encode(env, "a lighthouse on a cliff"), encode(env, "storm clouds at dusk")
    negative = encode(env, "blurry", clip=[[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5)), {}]])
    return "dpm_2", {"a": a, "b": b, "combined": nodes.ConditioningCombine().combine(a, b)[0]}, negative


def check_rows(env, spy, named, negative):
    """Each row's context is the connector's output for its own entry at that call's timestep, and its side's."""
    pool = {k: v for k, v in named.items() if k != "combined"}
    for _, _, t, context, sides in spy.calls:
        size = context.shape[0] // len(sides)
        for row in range(context.shape[0]):
            side = sides[row // size]
            candidates = pool if side == 0 else {"neg": negative}
            hits = [n for n, cond in candidates.items() if context.shape[1] == sampling._length(cond)
                    and sampling._row_matches(env, cond, context[row], t[row])]
            assert len(hits) == 1, f"row {row} (side {side}) at t={float(t[row])} matched {hits}"


class SideBySide:
    """CALC_COND_BATCH wrapper for the single-device reference: each side in UNet calls of its own, as
    MultiGPU CFG Split hands the cond and the uncond batch to a device each."""

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        outs = [executor(model, [c if i == j else None for i, c in enumerate(conds)], x_in, timestep, model_options)[j]
                for j in range(len(conds))]
        return outs


def reference(env, positive, negative, sampler, seed):
    import comfy.patcher_extension as ext
    model = env.pack.nodes.apply.ApplyElla().apply(env.unet, env.ella)[0]
    model.add_wrapper_with_key(ext.WrappersMP.CALC_COND_BATCH, "test_side_by_side", SideBySide())
    return sample(model, positive, negative, sampler=sampler, steps=3, seed=seed)


@pytest.mark.parametrize("name", ["euler", "dpm_2 combine"])
@pytest.mark.parametrize("order", ["ella first", "split first"])
def test_cfg_split_runs_both_sides_at_once_with_each_rows_own_context(env, two_devices, order, name, monkeypatch):
    sampler, named, negative = scenario(env, name)
    positive = named.get("combined", named.get("pos"))
    model = with_ella(env, order, two_devices)
    builder = env.pack.nodes.patch.ella_builder(model)
    # the UNet modules are known once ComfyUI has matched the copies to this MODEL: sample once first
    first = sample(model, positive, negative, sampler=sampler, steps=3, seed=7)
    (copy,) = device_copies(model)
    unets = [model.model.diffusion_model, copy.model.diffusion_model]
    assert unets[0] is not unets[1]
    computed = builder.rows_computed
    hook_threads = set()
    real_lookup = builder.lookup
    monkeypatch.setattr(builder, "lookup", lambda *a: (hook_threads.add(threading.current_thread()), real_lookup(*a))[1])
    with ThreadSpy(unets) as spy:
        again = sample(model, positive, negative, sampler=sampler, steps=3, seed=7)
    # ELLA's hook and its row cache are used from the main thread only, before ComfyUI hands the work out
    assert hook_threads == {threading.main_thread()}
    assert builder.rows_computed == computed  # the same MODEL sampled again: the connector does not run
    assert torch.equal(again, first)  # repeats are bitwise identical
    threads = {index: {th for i, th, *_ in spy.calls if i == index} for index in (0, 1)}
    assert all(threads.values()), "both UNet modules ran"
    assert threading.main_thread() not in threads[0] | threads[1]  # in MultiGPU's worker threads
    assert not threads[0] & threads[1]
    check_rows(env, spy, named, negative)
    assert torch.equal(first, reference(env, positive, negative, sampler, seed=7))


def test_no_connector_copy_on_a_device_that_computes_no_rows(env, two_devices):
    import comfy.model_management as mm
    model = with_ella(env, "ella first", two_devices)
    sample(model, encode(env, "a kite"), encode(env, ""), steps=2)
    connector = env.pack.nodes.patch.ella_builder(model).connector
    (copy,) = device_copies(model)
    key = env.pack.nodes.host.KEY
    (stand_in,) = copy.get_additional_models_with_key(key)
    assert stand_in.model is not connector
    assert stand_in.model_size() == 0 and not list(stand_in.model.parameters())
    # what ComfyUI holds loaded for ELLA: the connector once, on the primary device
    loaded = [m.model for m in mm.current_loaded_models if m.model is not None]
    assert sum(p.model is connector for p in loaded) == 1
    assert all(p.load_device == model.load_device for p in loaded if p.model is connector)


@pytest.mark.parametrize("order", ["ella first", "split first"])
def test_one_run_start_and_end_per_run_and_rows_survive_the_copies(env, two_devices, order, monkeypatch):
    import comfy.model_management as mm
    model = with_ella(env, order, two_devices)
    builder = env.pack.nodes.patch.ella_builder(model)
    calls = []
    for name in ("start_run", "end_run"):
        real = getattr(builder, name)
        monkeypatch.setattr(builder, name, lambda real=real, name=name: (calls.append(name), real())[1])
    pos, neg = encode(env, f"a harbour at night, {order}"), encode(env, "")
    sample(model, pos, neg, steps=2)
    assert calls == ["start_run", "end_run"]
    kept = len(builder.cache)
    assert kept > 0
    # ComfyUI unloads the copy for the extra device (another graph needs the memory): the primary's rows stay
    (copy,) = device_copies(model)
    on_copy = [m for m in mm.current_loaded_models if m.model is not None and m.device == copy.load_device]
    assert on_copy
    mm.free_memory(1e30, copy.load_device)
    assert not any(m in mm.current_loaded_models for m in on_copy)
    assert len(builder.cache) == kept
    computed = builder.rows_computed
    sample(model, pos, neg, steps=2, seed=3)
    assert builder.rows_computed == computed


@pytest.mark.parametrize("first", ["other dtype", "plain"])
def test_connector_dtype_follows_the_model_clone_it_is_applied_to(env, first):
    """Model Compute Dtype is an object patch of its clone: Apply ELLA must read it from the clone, not from
    the UNet all clones share (which holds whichever copy ComfyUI loaded last)."""
    import comfy.model_management as mm
    from comfy_extras.nodes_model_advanced import ModelComputeDtype
    apply, builder = env.pack.nodes.apply.ApplyElla().apply, env.pack.nodes.patch.ella_builder
    half = ModelComputeDtype().patch(env.unet, "fp16")[0]
    plain = env.unet
    ran, then = (half, plain) if first == "other dtype" else (plain, half)
    clip = [[torch.zeros(1, 77, 768), {}]]
    sample(ran, clip, clip, steps=1)  # that copy is loaded now
    want = torch.float16 if then is half else torch.float32
    assert builder(apply(then, env.ella)[0]).connector.dtype == want
    mm.unload_all_models()
    assert builder(apply(then, env.ella)[0]).connector.dtype == want
