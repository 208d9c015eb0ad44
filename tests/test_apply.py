"""bitalloc apply: the packed backbone, the PEFT adapter and the dequantized checkpoint.

The models are tiny (llama: hidden 128, 2 layers) so every check runs the real pipeline:
profile -> plan -> apply -> load_quantized + PeftModel, compared with an in-memory model
whose planned weights are replaced by Q + scaling * B @ A computed independently.
"""

from __future__ import annotations

import copy
import json
import math
import struct
import warnings
from pathlib import Path

import pytest
import torch
from _models import make_tiny_gguf, make_tiny_llama, tiny_llama
from peft import PeftModel
from transformers import AutoModel, AutoModelForCausalLM

import bitalloc.artifacts.writer as artifacts
from bitalloc import BitallocError, QuantConfig
from bitalloc.artifacts.nn import QuantLinear, load_quantized
from bitalloc.artifacts.writer import apply
from bitalloc.checkpoints import demo_model_path
from bitalloc.cli import main
from bitalloc.lora import loftq, module_seed
from bitalloc.planning.planner import plan as make_plan
from bitalloc.profiling.profiler import profile

CONFIGS = ["nf2-b64-s8b256", "nf4-b64-s8b256"]
TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, read without loading any tensor."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def tensor_bytes(header: dict) -> dict[str, int]:
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def loftq_reference(model, plan, lora_alpha=None, use_rslora=False, q_dtype=None):
    """A copy of ``model`` with every planned weight replaced by Q + scaling * B @ A."""
    model = copy.deepcopy(model)
    for name, entry in plan.modules.items():
        layer = model.get_submodule(name)
        rank = entry["rank"]
        result = loftq(
            layer.weight.detach().float(), entry["config"], rank=rank, iters=plan.defaults["iters"],
            lora_alpha=rank if lora_alpha is None else lora_alpha, use_rslora=use_rslora,
            seed=module_seed(name, entry["config"]),
        )  # fmt: skip
        q = result.q.dequantize()
        if q_dtype is not None:
            q = q.to(q_dtype).float()
        layer.weight.data = q + result.lowrank()
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture(scope="module")
def llama_case(tmp_path_factory):
    """A tiny llama on disk, a mixed 2/4-bit plan with mixed ranks, and its applied OUT."""
    root = tmp_path_factory.mktemp("apply")
    model = make_tiny_llama(root / "model", shard_size=None)
    table = profile(root / "model", configs=CONFIGS, rank=8, iters=2, device="cpu", quiet=True)
    plan = make_plan(table, 3.0)
    for name, entry in plan.modules.items():
        if ".layers.1.mlp." in name:
            entry.rank = 4  # different ranks: the adapter needs rank_pattern/alpha_pattern
    plan_path = root / "plan.json"
    plan.save(plan_path)
    out = apply(root / "model", plan_path, root / "out", dequantized=True, device="cpu", quiet=True)
    return root, model, plan, out


def test_plan_is_mixed(llama_case):
    _, _, plan, _ = llama_case
    assert set(plan.assignments.values()) == set(CONFIGS)
    assert {entry["rank"] for entry in plan.modules.values()} == {4, 8}


def test_quantized_plus_adapter_equals_loftq_in_memory(llama_case):
    root, model, plan, out = llama_case
    quantized = load_quantized(out / "quantized")
    packed = {n for n, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    assert packed == set(plan.modules)
    peft_model = PeftModel.from_pretrained(quantized, out / "adapter")
    expected = logits(loftq_reference(model, plan))
    torch.testing.assert_close(logits(peft_model), expected, rtol=1e-4, atol=1e-5)
    # the LoRA part matters: without it the logits are clearly different
    with peft_model.disable_adapter():
        assert (logits(peft_model) - expected).abs().max() > 1e-3


def test_adapter_config_has_patterns_and_default_alpha(llama_case):
    _, _, plan, out = llama_case
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == list(plan.modules)
    assert config["r"] == 8 and config["lora_alpha"] == 8 and config["use_rslora"] is False
    layer1 = {name: 4 for name in plan.modules if ".layers.1.mlp." in name}
    assert config["rank_pattern"] == layer1 and config["alpha_pattern"] == layer1
    header = safetensors_header(out / "adapter" / "adapter_model.safetensors")
    name = "model.layers.1.mlp.up_proj"
    assert header[f"base_model.model.{name}.lora_A.weight"]["shape"] == [4, 128]
    assert header[f"base_model.model.{name}.lora_B.weight"]["shape"] == [256, 4]


def test_dequantized_checkpoint_plus_adapter(llama_case):
    _, model, plan, out = llama_case
    header = safetensors_header(out / "dequantized" / "model.safetensors")
    assert header["model.layers.0.mlp.up_proj.weight"]["dtype"] == "BF16"
    assert header["model.norm.weight"]["dtype"] == "F32"  # untouched tensors as they were
    base = AutoModelForCausalLM.from_pretrained(out / "dequantized", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    expected = logits(loftq_reference(model, plan, q_dtype=torch.bfloat16))
    torch.testing.assert_close(logits(peft_model), expected, rtol=1e-4, atol=1e-5)


def test_packed_storage_is_the_planned_storage(llama_case):
    root, _, plan, out = llama_case
    sizes = tensor_bytes(safetensors_header(out / "quantized" / "bitalloc-model.safetensors"))
    packed_bits = 0
    for name, entry in plan.modules.items():
        parts = QuantConfig.parse(entry["config"]).storage_bits_parts(entry["shape"])
        assert name + ".weight" not in sizes
        for part, bits in parts.items():
            assert sizes[f"{name}.weight.{part}"] == math.ceil(bits / 8)
            packed_bits += 8 * sizes[f"{name}.weight.{part}"]
        assert sum(parts.values()) == entry["storage_bits"]
    planned_bits = sum(entry["storage_bits"] for entry in plan.modules.values())
    assert planned_bits <= packed_bits < planned_bits + 8 * 3 * len(plan.modules)
    numel = sum(entry["numel"] for entry in plan.modules.values())
    assert planned_bits / numel == pytest.approx(plan.achieved_bits, abs=1e-6)
    # untouched tensors are copied byte for byte
    source = tensor_bytes(safetensors_header(root / "model" / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"):
        assert sizes[name] == source[name]
    info = json.loads((out / "quantized" / "bitalloc_quant.json").read_text())
    assert {n: e["config"] for n, e in info["modules"].items()} == plan.assignments
    assert json.loads((out / "quantized" / "bitalloc_plan.json").read_text()) == plan.to_dict()
    assert not Path(f"{out}.partial").exists()


def test_training_changes_only_lora_and_reloads(llama_case, tmp_path):
    _, _, _, out = llama_case
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(load_quantized(out / "quantized"), out / "adapter", is_trainable=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    codes_before = {n: b.clone() for n, b in model.named_buffers() if n.endswith((".codes", ".scales"))}
    optimizer = torch.optim.AdamW(trainable.values(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=TOKENS, labels=TOKENS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(not torch.equal(before[n], p) for n, p in trainable.items())
    assert all(torch.equal(codes_before[n], b) for n, b in model.named_buffers() if n in codes_before)
    model.eval()
    model.save_pretrained(tmp_path / "trained")
    reloaded = PeftModel.from_pretrained(load_quantized(out / "quantized"), tmp_path / "trained")
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)


def test_interrupted_apply_resumes_and_shards(llama_case, tmp_path, monkeypatch):
    root, _, plan, out = llama_case
    calls = []

    def failing_loftq(*args, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(1)
        return real_loftq(*args, **kwargs)

    real_loftq = artifacts.decompose
    monkeypatch.setattr(artifacts, "decompose", failing_loftq)
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        apply(root / "model", plan, target, device="cpu", quiet=True)
    assert not target.exists()
    assert len(list(Path(f"{target}.partial", "matrices").glob("*.safetensors"))) == 5
    with pytest.raises(BitallocError, match="holds work for another"):
        apply(root / "model", plan, target, lora_alpha=2.0, device="cpu", quiet=True)
    calls.clear()
    monkeypatch.setattr(artifacts, "decompose", lambda *a, **k: calls.append(1) or real_loftq(*a, **k))
    apply(root / "model", plan, target, device="cpu", quiet=True, max_shard_bytes=150_000)
    assert len(calls) == len(plan.modules) - 5
    assert not Path(f"{target}.partial").exists()
    index = json.loads((target / "quantized" / "bitalloc-model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    adapter = "adapter/adapter_model.safetensors"
    assert (target / adapter).read_bytes() == (out / adapter).read_bytes()
    configs = [json.loads((folder / "adapter/adapter_config.json").read_text()) for folder in (target, out)]
    assert configs[0].pop("base_model_name_or_path") == "../quantized"  # relative: the folder can move
    assert configs[1].pop("base_model_name_or_path") == "../quantized"
    assert configs[0] == configs[1]
    torch.testing.assert_close(
        logits(load_quantized(target / "quantized")),
        logits(load_quantized(out / "quantized")),
        rtol=0,
        atol=0,
    )


def test_alpha_and_rslora_keep_the_product(llama_case, tmp_path):
    root, model, plan, _ = llama_case
    out = apply(
        root / "model", plan, tmp_path / "out", lora_alpha=32, use_rslora=True, device="cpu", quiet=True
    )
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 32 and config["use_rslora"] and config["alpha_pattern"] == {}
    peft_model = PeftModel.from_pretrained(load_quantized(out / "quantized"), out / "adapter")
    expected = logits(loftq_reference(model, plan, lora_alpha=32, use_rslora=True))
    torch.testing.assert_close(logits(peft_model), expected, rtol=1e-4, atol=1e-5)


def test_gguf_source(tmp_path):
    model = tiny_llama(1)
    make_tiny_gguf(tmp_path / "tiny.gguf", model)
    table = profile(  # layer 1 stays untouched: its q/k are un-permuted by the copy, not the Source
        tmp_path / "tiny.gguf",
        configs=CONFIGS,
        rank=4,
        iters=1,
        include=r"layers\.0\.",
        device="cpu",
        quiet=True,
    )
    plan = make_plan(table, 2.8)
    assert len(plan.modules) == 7
    with pytest.warns(UserWarning, match="no tokenizer written"):
        out = apply(tmp_path / "tiny.gguf", plan, tmp_path / "out", device="cpu", quiet=True)
    config = json.loads((out / "quantized" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 256
    peft_model = PeftModel.from_pretrained(load_quantized(out / "quantized"), out / "adapter")
    torch.testing.assert_close(logits(peft_model), logits(loftq_reference(model, plan)), rtol=1e-4, atol=1e-5)


@pytest.fixture
def demo_case(tmp_path):
    table = profile(
        None, configs=CONFIGS, rank=4, iters=1, include=r"layer\.[01]\.", device="cpu", quiet=True
    )
    return make_plan(table, 3.2), tmp_path


def test_demo_bert_apply_and_load(demo_case):
    plan, tmp_path = demo_case
    assert len(plan.modules) == 12 and set(plan.assignments.values()) == set(CONFIGS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the subset plan's fingerprint matches
        out = apply(None, plan, tmp_path / "out", device="cpu", quiet=True)
    assert (out / "quantized" / "tokenizer.json").is_file()
    quantized = load_quantized(out / "quantized")
    assert type(quantized).__name__ == "BertModel"
    peft_model = PeftModel.from_pretrained(quantized, out / "adapter")
    reference = loftq_reference(AutoModel.from_pretrained(demo_model_path()), plan)
    tokens = {"input_ids": torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])}
    with torch.no_grad():
        got = peft_model(**tokens).last_hidden_state
        expected = reference(**tokens).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_edited_plan_is_refused(llama_case, tmp_path):
    """A plan whose matrices no longer match its profile's fingerprint (one removed by hand)
    is refused before any work, instead of leaving that matrix silently unquantized."""
    root, _, plan, _ = llama_case
    other = copy.deepcopy(plan)
    other.modules.pop(next(iter(other.modules)))
    with pytest.raises(BitallocError, match="added to or removed from the plan by hand"):
        apply(root / "model", other, tmp_path / "out", device="cpu", quiet=True)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---- bad input through the CLI: exit 2, one line, nothing damaged -------------------------


def edited_plan(llama_case, tmp_path, edit) -> Path:
    _, _, plan, _ = llama_case
    data = plan.to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


def rename_module(data):
    data["modules"]["model.layers.7.mlp.up_proj"] = data["modules"].pop("model.layers.1.mlp.up_proj")


def reshape_module(data):
    data["modules"]["model.layers.0.self_attn.q_proj"].update(shape=[64, 256], numel=64 * 256)


def other_format(data):
    data["format"] = "bitalloc.plan/v9"


@pytest.mark.parametrize(
    "edit, message",
    [
        (rename_module, "plan module model.layers.7.mlp.up_proj not in model"),
        (reshape_module, "shape mismatch for model.layers.0.self_attn.q_proj: plan 64x256, model 128x128"),
        (other_format, "unsupported plan format 'bitalloc.plan/v9'"),
    ],
)
def test_cli_rejects_bad_plans(llama_case, tmp_path, capsys, edit, message):
    root = llama_case[0]
    plan_path = edited_plan(llama_case, tmp_path, edit)
    code = main(
        ["apply", str(root / "model"), "--plan", str(plan_path), "-o", str(tmp_path / "out"), "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_cli_refuses_existing_output(llama_case, tmp_path, capsys):
    root = llama_case[0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    args = ["apply", str(root / "model"), "--plan", str(root / "plan.json"), "-o", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "out.partial").exists()


def test_cli_apply_writes_everything(llama_case, tmp_path, capsys):
    root = llama_case[0]
    args = ["apply", str(root / "model"), "--plan", str(root / "plan.json"), "-o", str(tmp_path / "out"),
            "--dequantized", "--dequantized-dtype", "fp16", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    header = safetensors_header(tmp_path / "out" / "dequantized" / "model.safetensors")
    assert header["model.layers.0.mlp.up_proj.weight"]["dtype"] == "F16"


def test_missing_quant_info_is_a_clear_error(llama_case):
    with pytest.raises(BitallocError, match="not a bitalloc quantized model"):
        load_quantized(llama_case[3] / "dequantized")


def test_load_in_bf16_keeps_the_packed_scales(llama_case):
    out = llama_case[3]
    model = load_quantized(out / "quantized", dtype=torch.bfloat16)
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    assert layer.weight.dtype == torch.bfloat16 and layer.scales2.dtype == torch.float32
    assert model.get_submodule("model.norm").weight.dtype == torch.bfloat16
    reference = logits(load_quantized(out / "quantized"))
    torch.testing.assert_close(logits(model).float(), reference, rtol=0, atol=0.1)


def test_corrupt_packed_tensor_is_a_clear_error(llama_case, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "quantized"
    folder.mkdir()
    for file in (llama_case[3] / "quantized").iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    tensors = load_file(folder / "bitalloc-model.safetensors")
    name = "model.layers.1.self_attn.v_proj.weight.codes"
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, folder / "bitalloc-model.safetensors")
    with pytest.raises(BitallocError, match="model.layers.1.self_attn.v_proj.weight.codes is U8"):
        load_quantized(folder)
