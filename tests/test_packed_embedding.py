"""``apply --embedding CONFIG``: the input embedding stored packed, loaded dense.

On disk the embedding takes its config's storage instead of 16 or 32 bits per value; every
loader (transformers with bitalloc imported, `load_quantized`, `check_quantized`) gives the
same dense embedding, the dequantized Q of the stored codes, and a tied output embedding
follows it. The loaded model's `save_pretrained` writes it dense, and that folder loads to
the same logits.
"""

from __future__ import annotations

import json
import warnings

import gguf
import pytest
import torch
from _models import make_tiny_gguf, make_tiny_llama, tiny_llama
from test_apply import logits, safetensors_header
from transformers import AutoModelForCausalLM

import bitalloc
from bitalloc import BitallocError
from bitalloc.artifacts.nn import check_quantized
from bitalloc.cli import main
from bitalloc.planning.planner import plan as make_plan
from bitalloc.profiling.profiler import profile
from bitalloc.quant import QuantConfig, QuantizedTensor

pytestmark = pytest.mark.usefixtures("one_thread")
EMBEDDING = "int8-b32-sfp16"


def applied(source, tmp_path, name="out", **kwargs):
    table = profile(source, configs=["nf4-b64-s8b256"], rank=4, iters=1, device="cpu", quiet=True)
    plan = make_plan(table, 4.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a GGUF has no tokenizer to copy
        return plan, bitalloc.apply(source, plan, tmp_path / name, device="cpu", quiet=True, **kwargs)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tiny tied-embedding llama applied twice: embedding dense (default) and packed."""
    tmp_path = tmp_path_factory.mktemp("packed_embedding")
    model = make_tiny_llama(tmp_path / "model", tie_word_embeddings=True, shard_size=None)
    _, dense = applied(tmp_path / "model", tmp_path, "dense")
    _, packed = applied(tmp_path / "model", tmp_path, "packed", embedding_config=EMBEDDING)
    return model, dense, packed


def stored_bytes(out) -> dict[str, int]:
    header = safetensors_header(out / "quantized" / "bitalloc-model.safetensors")
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def expected_embedding(model) -> torch.Tensor:
    weight = model.get_input_embeddings().weight.detach().float()
    return QuantizedTensor.from_weight(weight, EMBEDDING).dequantize()


def test_embedding_is_stored_in_its_config(tied):
    model, dense, packed = tied
    sizes = stored_bytes(packed)
    assert "model.embed_tokens.weight" not in sizes
    parts = {k.rsplit(".", 1)[1]: v for k, v in sizes.items() if k.startswith("model.embed_tokens.weight.")}
    config = QuantConfig.parse(EMBEDDING)
    shape = tuple(model.get_input_embeddings().weight.shape)
    assert sum(parts.values()) * 8 == config.storage_bits(shape)  # 8.5 bits per value, exactly
    saved = stored_bytes(dense)["model.embed_tokens.weight"] - sum(parts.values())
    total = sum(stored_bytes(dense).values()) - sum(sizes.values())
    assert saved == total > 0  # only the embedding changed
    quant = json.loads((packed / "quantized" / "config.json").read_text())["quantization_config"]
    assert quant["embeddings"] == {"model.embed_tokens": {"config": EMBEDDING, "shape": list(shape)}}
    plain = json.loads((dense / "quantized" / "config.json").read_text())["quantization_config"]
    assert "embeddings" not in plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_pretrained_loads_it_dense_and_tied(tied, dtype):
    model, _, packed = tied
    loaded = AutoModelForCausalLM.from_pretrained(packed / "quantized", dtype=dtype)
    embedding = loaded.get_input_embeddings().weight
    assert embedding.dtype == dtype
    assert torch.equal(embedding, expected_embedding(model).to(dtype))
    assert loaded.get_output_embeddings().weight is embedding  # tied, as in the source
    assert loaded.config.quantization_config.embeddings == {}  # held dense in memory


def test_every_loader_agrees_and_save_pretrained_round_trips(tied, tmp_path):
    model, dense, packed = tied
    from_hf = AutoModelForCausalLM.from_pretrained(packed / "quantized", dtype=torch.float32)
    own = bitalloc.load_quantized(packed / "quantized")
    check_quantized(packed / "quantized")  # the header-only check accepts the packed parts
    assert torch.equal(own.get_input_embeddings().weight, from_hf.get_input_embeddings().weight)
    reference = logits(from_hf)
    assert torch.allclose(logits(own), reference, atol=1e-5)
    dense_model = AutoModelForCausalLM.from_pretrained(dense / "quantized", dtype=torch.float32)
    # 8-bit embedding: close to the dense one, not equal
    difference = (logits(dense_model) - reference).abs().max().item()
    assert 0 < difference < 0.05 * reference.abs().max().item()
    from_hf.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert "embeddings" not in saved
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert torch.allclose(logits(again), reference, atol=1e-5)


def test_gguf_q8_0_embedding_is_smaller_than_bf16(tmp_path):
    model = tiny_llama(1, tie_word_embeddings=True)
    make_tiny_gguf(
        tmp_path / "tiny.gguf", model, quantize={"model.embed_tokens": gguf.GGMLQuantizationType.Q8_0}
    )
    _, dense = applied(tmp_path / "tiny.gguf", tmp_path, "dense")
    _, packed = applied(tmp_path / "tiny.gguf", tmp_path, "packed", embedding_config=EMBEDDING)
    bf16 = stored_bytes(dense)["model.embed_tokens.weight"]
    eight = sum(v for k, v in stored_bytes(packed).items() if k.startswith("model.embed_tokens.weight."))
    assert eight / bf16 == pytest.approx(8.5 / 16)
    loaded = AutoModelForCausalLM.from_pretrained(packed / "quantized", dtype=torch.float32)
    assert torch.isfinite(logits(loaded)).all()
    # in llama.cpp's own q8_0 the GGUF's Q8_0 embedding is stored again without loss
    source = bitalloc.open_source(tmp_path / "tiny.gguf").load_tensor("model.embed_tokens.weight")
    _, same = applied(tmp_path / "tiny.gguf", tmp_path, "q8_0", embedding_config="ggml8-b32-s0")
    reloaded = AutoModelForCausalLM.from_pretrained(same / "quantized", dtype=torch.float32)
    assert torch.equal(reloaded.get_input_embeddings().weight, source)
    assert not torch.equal(loaded.get_input_embeddings().weight, source)  # int8's grid is another


def test_bad_embedding_config_is_refused_before_any_work(tmp_path, capsys):
    make_tiny_llama(tmp_path / "model", shard_size=None)
    with pytest.raises(BitallocError, match="embedding config"):
        applied(tmp_path / "model", tmp_path, "bad", embedding_config="nf9-b64-s8b256")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
    table = profile(tmp_path / "model", configs=["nf4-b64-s8b256"], rank=0, iters=1, device="cpu", quiet=True)
    make_plan(table, 4.2).save(tmp_path / "plan.json")
    capsys.readouterr()
    code = main(["apply", str(tmp_path / "model"), "--plan", str(tmp_path / "plan.json"), "-o",
                 str(tmp_path / "cli"), "--embedding", "int8-b32", "--quiet"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bitalloc: error: embedding config")


def test_missing_part_is_one_error_not_random_weights(tied, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, _, packed = tied
    copy = tmp_path / "copy"
    shutil.copytree(packed / "quantized", copy)
    file = copy / "bitalloc-model.safetensors"
    tensors = load_file(file)
    del tensors["model.embed_tokens.weight.scales"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(BitallocError, match="lacks model.embed_tokens.weight.scales"):
        AutoModelForCausalLM.from_pretrained(copy)
    with pytest.raises(BitallocError, match="lacks model.embed_tokens.weight.scales"):
        bitalloc.load_quantized(copy)


def test_streamed_merge_writes_it_dense(tied, tmp_path):
    model, _, packed = tied
    merged = bitalloc.merge(packed, tmp_path / "merged", dtype="fp32", quiet=True)
    loaded = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert torch.equal(loaded.get_input_embeddings().weight, expected_embedding(model))
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
