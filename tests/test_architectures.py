"""The architectures users bring, as tiny random transformers models saved as HF folders:
profile (weight and output objectives) -> plan -> apply -> load_quantized -> forward -> eval.

Mixture-of-experts models: every matrix of every expert is a planning unit under its
checkpoint name, calibration sees the tokens each expert was routed, and an expert no
calibration token reached is planned on its weights (with a warning).
"""

import copy
import json
import math
import warnings

import pytest
import torch
import transformers as tf
from _models import gguf_writer
from test_calibration import byte_tokenizer

import bitalloc
from bitalloc.artifacts.adapter import load_adapter
from bitalloc.artifacts.nn import QuantLinear, load_quantized
from bitalloc.checkpoints import open_source
from bitalloc.checkpoints.layout import ExpertLinears, match_checkpoint
from bitalloc.checkpoints.safetensors import read_header
from bitalloc.errors import BitallocError
from bitalloc.evaluation import evaluate
from bitalloc.planning.planner import plan
from bitalloc.profiling.calibration import calibrate
from bitalloc.texts import calibration_text, evaluation_text, tokenize, windows

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = ["nf2-b32-sfp16", "nf4-b32-sfp16"]
FAST = dict(configs=CONFIGS, rank=4, iters=1, quiet=True)
BASE = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, bos_token_id=1,
    eos_token_id=2, pad_token_id=0,
)  # fmt: skip
MOE = dict(num_experts_per_tok=2)
LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 128,
}  # fmt: skip
# name: (config class, model class, config overrides, planned matrices per block)
ARCHITECTURES = {
    "llama3": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(rope_parameters=LLAMA3_ROPE), 7),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=64), 7),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}, 7),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=32), 7),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(
        head_dim=32, sliding_window=64, final_logit_softcapping=30.0, attn_logit_softcapping=50.0), 7),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(
        head_dim=32, sliding_window=64, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "full_attention"]), 7),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}, 4),  # fused qkv_proj, gate_up_proj
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, {}, 7),
    "gptneox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(rotary_pct=0.25), 4),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(num_local_experts=4, **MOE), 4 + 4 * 3),
    "qwen3moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, dict(
        head_dim=32, moe_intermediate_size=128, num_experts=4, **MOE), 4 + 4 * 3),
}  # fmt: skip
TOKENS, CONTEXT = 256, 64


def build(arch: str, directory, seed: int = 0, **changes):
    """A random tiny ``arch`` model saved (with a byte tokenizer) to ``directory``."""
    config_class, model_class, overrides, _ = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**BASE, **overrides, **changes})).eval()
    with torch.no_grad():  # larger weights than the default init: outputs move measurably
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "norm" not in name:
                param.normal_(0, 0.05)
    model.save_pretrained(directory)
    byte_tokenizer(directory)
    return model


def planned_names(directory) -> list[str]:
    """The checkpoint's 2-D weights inside blocks that are not routers or norms."""
    names = read_header(directory / "model.safetensors")
    return sorted(
        n.removesuffix(".weight") for n, e in names.items()
        if len(e.shape) == 2 and ".layers." in n and "norm" not in n and not n.endswith("gate.weight")
    )  # fmt: skip


def eval_ids(directory) -> torch.Tensor:
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    return windows(tokenize(tokenizer, evaluation_text(), TOKENS), CONTEXT)


def native_perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[:, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(float(nll))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_pipeline(arch, tmp_path):
    directory = tmp_path / "model"
    model = build(arch, directory)
    names = planned_names(directory)
    assert len(names) == 2 * ARCHITECTURES[arch][3]
    text = tmp_path / "calibration.txt"
    text.write_text(calibration_text()[:3000], encoding="utf-8")

    weight = bitalloc.profile(str(directory), tmp_path / "w.parquet", objective="weight", **FAST)
    output = bitalloc.profile(
        str(directory), tmp_path / "o.parquet", objective="output", calibration=str(text),
        calibration_tokens=TOKENS, calibration_context=CONTEXT, **FAST,
    )  # fmt: skip
    for table in (weight, output):
        assert sorted(table["module"].unique()) == names
        assert len(table) == len(names) * len(CONFIGS)
        assert ((table["rel_error"] > 0) & (table["rel_error"] < 1)).all()
    assert (output["weighted_error"] > 0).all() and output["weighted_error"].map(math.isfinite).all()

    allocation = plan(output, 3.0)
    assert 2.5 < allocation.budget["achieved_bits"] <= 3.0 + 1e-9
    plan_path = tmp_path / "plan.json"
    allocation.save(plan_path)
    out = bitalloc.apply(str(directory), plan_path, tmp_path / "out", quiet=True)

    loaded = load_quantized(out / "quantized")
    packed = {name for name, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert packed == set(allocation.modules)
    # the reference: the original model in its checkpoint's layout, each planned matrix = Q
    reference = match_checkpoint(copy.deepcopy(model), read_header(directory / "model.safetensors"))
    with torch.no_grad():
        for name, layer in loaded.named_modules():
            if isinstance(layer, QuantLinear):
                reference.get_submodule(name).weight.copy_(layer.dequantize())
    ids = eval_ids(directory)[:2]
    with torch.no_grad():
        got, want = loaded(ids).logits, reference(ids).logits
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) < 1e-4 * scale

    result = evaluate(str(directory), plan_path, tokens=TOKENS, context=CONTEXT)["results"]
    original = result["original"]["perplexity"]
    assert original == pytest.approx(native_perplexity(model, eval_ids(directory)), rel=1e-4)
    for variant in ("loftq", "qlora"):
        assert math.isfinite(result[variant]["perplexity"]) and 0 < result[variant]["kl_mean"] < 5


@pytest.mark.parametrize("arch", ["mixtral", "qwen3moe"])
def test_unfused_experts_compute_what_the_fused_ones_do(arch, tmp_path):
    model = build(arch, tmp_path / "model", seed=3)
    unfused = match_checkpoint(copy.deepcopy(model), read_header(tmp_path / "model" / "model.safetensors"))
    experts = [m for m in unfused.modules() if isinstance(m, ExpertLinears)]
    assert len(experts) == 2 and all(len(e) == 4 for e in experts)
    assert not any(p.dim() == 3 for p in unfused.parameters())
    with open_source(tmp_path / "model") as source:  # the checkpoint's names are the model's
        state = unfused.state_dict()
        for name in source.modules():
            assert torch.equal(state[name + ".weight"], source.read(name))
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused_logits, unfused_logits = model(ids).logits, unfused(ids).logits
    assert float((fused_logits - unfused_logits).abs().max()) < 1e-5 * float(fused_logits.abs().max())


def routed_inputs(model, ids: torch.Tensor, layer: int = 0) -> dict[int, torch.Tensor]:
    """Expert -> the rows of the MoE input of ``layer`` that the router sends to it."""
    block = model.model.layers[layer].mlp
    caught = {}
    handle = block.register_forward_pre_hook(lambda m, args: caught.setdefault("x", args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    x = caught["x"].reshape(-1, caught["x"].shape[-1])
    with torch.no_grad():
        _, _, index = block.gate(x)
    return {e: x[(index == e).any(-1)] for e in range(block.experts.num_experts)}


def test_calibration_counts_the_tokens_each_expert_received(tmp_path):
    model = build("qwen3moe", tmp_path / "model", seed=4)
    ids = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    routed = routed_inputs(model, ids)
    counts = [len(rows) for rows in routed.values()]
    assert sum(counts) == 2 * ids.numel() and min(counts) > 0 and len(set(counts)) > 1
    names = [f"model.layers.0.mlp.experts.{e}.gate_proj" for e in range(4)]
    h = calibrate(str(tmp_path / "model"), names, input_ids=ids).column_weights
    for expert, name in enumerate(names):
        moments = routed[expert].double().square().mean(0).float()
        want = moments + 0.01 * moments.mean()
        torch.testing.assert_close(h[name], want, rtol=1e-4, atol=0)


def test_an_expert_without_calibration_tokens_is_planned_on_its_weights(tmp_path):
    directory = tmp_path / "model"
    build("mixtral", directory, seed=5)
    ids = torch.full((2, 32), 7)  # one token repeated: every position picks the same 2 experts
    with pytest.warns(UserWarning, match=r"expert matrices received no calibration token") as caught:
        table = bitalloc.profile(str(directory), tmp_path / "p.parquet", objective="output",
                                 calibration_ids=ids, **FAST)  # fmt: skip
    messages = [str(w.message) for w in caught if "no calibration token" in str(w.message)]
    assert all("planned on their weights" in m for m in messages)  # one warning per block
    assert sum(int(m.split(" expert matrices")[0]) for m in messages) == 12
    # a flat H decomposes as the weight objective does: the same Q + B·A as a weight-only
    # profile (equal rel_error) for the 12 unrouted matrices; a routed expert's differs
    weight = bitalloc.profile(str(directory), objective="weight", **FAST)
    both = table.merge(weight, on=["module", "config"], suffixes=("", "_weight"))
    change = (both["rel_error"] / both["rel_error_weight"] - 1).abs().groupby(both["module"]).max()
    experts = change[change.index.str.contains(".experts.")]
    flat = experts[experts < 1e-5]
    assert len(flat) == 12 and len(experts) == 24 and (experts.drop(flat.index) > 1e-3).all()
    for layer in (0, 1):  # two whole experts per layer, all three of their matrices
        unrouted = {n.split(".experts.")[1] for n in flat.index if f"layers.{layer}." in n}
        assert len({n.split(".")[0] for n in unrouted}) == 2 and len(unrouted) == 6
    allocation = plan(table, 3.0)
    assert set(flat.index) <= set(allocation.modules)


def test_checkpoint_with_fused_expert_tensors_keeps_them(tmp_path):
    """A checkpoint holding the model's own 3-D expert tensors: experts are not planned
    (not matrices), copied as they are, and the model still loads and runs."""
    from safetensors.torch import save_file

    directory = tmp_path / "model"
    model = build("qwen3moe", directory, seed=6)
    (directory / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
              | {"lm_head.weight": model.lm_head.weight.detach().clone()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    table = bitalloc.profile(str(directory), objective="weight", **FAST)
    assert not table["module"].str.contains("experts").any() and table["module"].nunique() == 8
    plan_path = tmp_path / "plan.json"
    plan(table, 3.0).save(plan_path)
    out = bitalloc.apply(str(directory), plan_path, tmp_path / "out", quiet=True)
    loaded = load_quantized(out / "quantized")
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.dim() == 3
    experts = loaded.model.layers[0].mlp.experts
    torch.testing.assert_close(experts.down_proj, model.model.layers[0].mlp.experts.down_proj)


def test_adapter_attaches_to_expert_matrices(tmp_path):
    """PEFT alone would retarget the per-expert LoRA to fused parameters the loaded model
    does not have (and drop it with a warning); `load_adapter` attaches every target."""
    from safetensors.torch import load_file

    directory = tmp_path / "model"
    build("mixtral", directory, seed=7)
    table = bitalloc.profile(str(directory), objective="weight", **FAST)
    plan_path = tmp_path / "plan.json"
    plan(table, 3.0).save(plan_path)
    out = bitalloc.apply(str(directory), plan_path, tmp_path / "out", quiet=True)
    name = "model.layers.1.block_sparse_moe.experts.3.w2"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert name in config["target_modules"] and len(config["target_modules"]) == 32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = load_adapter(load_quantized(out / "quantized"), out / "adapter")
    expert = peft_model.get_submodule(f"base_model.model.{name}")
    assert isinstance(expert.base_layer, QuantLinear)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert torch.equal(expert.lora_B["default"].weight, saved[f"base_model.model.{name}.lora_B.weight"])
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(peft_model(ids).logits).all()


def write_gguf(path, model, architecture: str) -> None:
    """``model`` as a llama.cpp GGUF file of ``architecture`` (F32 tensors, gguf's names)."""
    import gguf

    config = model.config
    writer = gguf_writer(path, config, architecture)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        base, _, kind = name.rpartition(".")
        writer.add_tensor(f"{names.get_name(base)}.{kind}", tensor.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_gguf_of_the_llama_family(arch, tmp_path):
    # transformers reads no head size from a GGUF file: Qwen3's default (128) it is
    model = build(arch, tmp_path / "hf", seed=8, **({"head_dim": 128} if arch == "qwen3" else {}))
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, model, arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name)
    state = {**model.state_dict(), **native.state_dict()}
    with open_source(path) as source:
        names = source.tensor_names()
        assert sorted(source.modules()) == planned_names(tmp_path / "hf")
        assert any(n.endswith("q_proj.bias") for n in names) == (arch == "qwen2")
        assert any(n.endswith("q_norm.weight") for n in names) == (arch == "qwen3")
        for name in names:  # the names and values transformers' own GGUF loader gives
            torch.testing.assert_close(source.load_tensor(name), native.state_dict()[name], rtol=0, atol=0)
            torch.testing.assert_close(source.load_tensor(name), state[name], rtol=0, atol=0)
    ids = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    profile_path = tmp_path / "p.parquet"
    table = bitalloc.profile(str(path), profile_path, objective="output", calibration_ids=ids, **FAST)
    assert table["module"].nunique() == 14 and (table["weighted_error"] > 0).all()
    plan_path = tmp_path / "plan.json"
    plan(table, 3.0).save(plan_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer metadata in this file
        out = bitalloc.apply(str(path), plan_path, tmp_path / "out", quiet=True, calibration_ids=ids)
    loaded = load_quantized(out / "quantized")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in loaded.named_modules():
            if isinstance(layer, QuantLinear):
                reference.get_submodule(name).weight.copy_(layer.dequantize())
        got, want = loaded(ids).logits, reference(ids).logits
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


def test_gguf_of_another_architecture_is_refused_by_name(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "phi3.gguf"), "phi3")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.attn_qkv.weight", torch.zeros(384, 128).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BitallocError, match=r"unsupported GGUF architecture 'phi3'.*llama, qwen2, qwen3"):
        open_source(tmp_path / "phi3.gguf")


def test_fused_experts_of_another_kind_are_refused_by_name(tmp_path):
    model = build("qwen3moe", tmp_path / "model", seed=9)
    model.model.layers[1].mlp.experts.has_bias = True  # e.g. gpt-oss: biases on every expert
    names = read_header(tmp_path / "model" / "model.safetensors")
    message = r"unsupported mixture-of-experts layer model\.layers\.1\.mlp\.experts \(Qwen3MoeExperts\): bias"
    with pytest.raises(BitallocError, match=message):
        match_checkpoint(model, names)
