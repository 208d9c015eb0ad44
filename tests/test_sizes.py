"""Tensors outside the plan keep their stored dtype (a bf16 checkpoint stays 16-bit); a GGUF's
quantized ones (Q8_0 embedding) become bf16 instead of float32; --unplanned-dtype casts."""

from __future__ import annotations

import warnings

import gguf
import pytest
import torch
from _models import make_tiny_gguf, make_tiny_llama, tiny_llama
from peft import PeftModel
from test_apply import CONFIGS, logits, safetensors_header
from transformers import AutoModelForCausalLM

import bitalloc
from bitalloc import BitallocError
from bitalloc.checkpoints import open_source
from bitalloc.planning.planner import plan as make_plan
from bitalloc.profiling.profiler import profile

pytestmark = pytest.mark.usefixtures("one_thread")


def applied(source, tmp_path, name="out", **kwargs):
    table = profile(
        source, configs=CONFIGS, rank=4, iters=1, include=r"layers\.0\.", device="cpu", quiet=True
    )
    plan = make_plan(table, 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a GGUF has no tokenizer to copy
        return plan, bitalloc.apply(source, plan, tmp_path / name, device="cpu", quiet=True, **kwargs)


def dtypes(out) -> dict[str, str]:
    header = safetensors_header(out / "quantized" / "bitalloc-model.safetensors")
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_bf16_checkpoint_stays_16_bit(tmp_path):
    make_tiny_llama(tmp_path / "model", dtype=torch.bfloat16, shard_size=None)
    plan, out = applied(tmp_path / "model", tmp_path)
    found = dtypes(out)
    unplanned = {k: v for k, v in found.items() if ".weight." not in k}
    assert unplanned and set(unplanned.values()) == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(out / "quantized")  # dtype "auto": the stored bf16
    assert model.get_submodule("model.embed_tokens").weight.dtype == torch.bfloat16
    peft_model = PeftModel.from_pretrained(model, out / "adapter")
    assert torch.isfinite(logits(peft_model)).all()


def test_gguf_quantized_embedding_becomes_bf16(tmp_path):
    model = tiny_llama(1)
    make_tiny_gguf(
        tmp_path / "tiny.gguf", model, quantize={"model.embed_tokens": gguf.GGMLQuantizationType.Q8_0}
    )
    source = open_source(tmp_path / "tiny.gguf")
    expected = source.load_tensor("model.embed_tokens.weight")  # Q8_0 expanded to float32
    _, out = applied(tmp_path / "tiny.gguf", tmp_path)
    found = dtypes(out)
    assert found["model.embed_tokens.weight"] == "BF16"  # was F32: twice the bytes
    assert found["model.norm.weight"] == "F32" and found["model.layers.1.mlp.up_proj.weight"] == "F32"
    loaded = AutoModelForCausalLM.from_pretrained(out / "quantized", dtype=torch.float32)
    assert torch.equal(loaded.get_submodule("model.embed_tokens").weight, expected.bfloat16().float())
    _, cast = applied(tmp_path / "tiny.gguf", tmp_path, "fp32", unplanned_dtype="fp32")
    assert dtypes(cast)["model.embed_tokens.weight"] == "F32"
    with pytest.raises(BitallocError, match="unplanned dtype 'int8'"):
        applied(tmp_path / "tiny.gguf", tmp_path, "bad", unplanned_dtype="int8")
