"""``from_pretrained(OUT/quantized, device_map=...)`` with layers offloaded to CPU memory and
to disk (``offload_folder``, ``offload_buffers``), and ``device_map="auto"`` with a
``max_memory`` that forces offload: the logits equal a plain CPU load's. PEFT over a
disk-offloaded model is one clear BitallocError; a bad folder is one clear error at load
with offload too, never random weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _models import make_tiny_llama
from peft import PeftModel
from test_apply import logits
from transformers import AutoModelForCausalLM

import bitalloc
from bitalloc import BitallocError
from bitalloc.artifacts.nn import QuantLinear, load_quantized
from bitalloc.planning.planner import plan as make_plan
from bitalloc.profiling.profiler import profile

pytestmark = pytest.mark.usefixtures("one_thread")
# float-scaled configs (scales stored (rows, blocks)) and 8-bit-scaled ones (flat)
CONFIGS = ["nf2-b64-s8b256", "nf4-b64-sfp16", "int4-b32-sbf16"]
SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
         "model.rotary_emb": "cpu", "lm_head": "disk"}  # fmt: skip


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    make_tiny_llama(root / "model", shard_size=None)
    table = profile(root / "model", configs=CONFIGS, rank=8, iters=2, device="cpu", quiet=True)
    plan = make_plan(table, 3.5)
    out = bitalloc.apply(root / "model", plan, root / "out", device="cpu", quiet=True,
                         max_shard_bytes=150_000)  # fmt: skip
    assert len({plan.assignments[n] for n in plan.assignments if ".layers.1." in n}) >= 2
    return out


def offloaded(model) -> list[str]:
    """QuantLinears whose packed tensors are not in memory (on the meta device)."""
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.codes.is_meta]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offload_buffers", [False, True])
def test_a_device_map_with_cpu_and_disk_layers(case, tmp_path, dtype, offload_buffers):
    """offload_buffers=True puts the packed tensors (buffers) on disk too; it used to fail
    with accelerate's shape error on the (rows, blocks) float scales."""
    reference = logits(AutoModelForCausalLM.from_pretrained(case / "quantized", dtype=dtype))
    options = {"device_map": SPLIT, "offload_folder": tmp_path, "offload_buffers": offload_buffers}
    model = AutoModelForCausalLM.from_pretrained(case / "quantized", dtype=dtype, **options)
    assert model.hf_device_map == SPLIT
    moved = offloaded(model)
    assert all(".layers.1." in name for name in moved) and (len(moved) == 7) == offload_buffers
    torch.testing.assert_close(logits(model), reference, rtol=0, atol=0)
    torch.testing.assert_close(logits(model), reference, rtol=0, atol=0)  # the hooks put the tensors back


def test_device_map_auto_with_a_max_memory_that_forces_offload(case, tmp_path):
    reference = logits(AutoModelForCausalLM.from_pretrained(case / "quantized"))
    options = {"device_map": "auto", "max_memory": {"cpu": 300_000}, "offload_buffers": True}
    model = AutoModelForCausalLM.from_pretrained(case / "quantized", offload_folder=tmp_path, **options)
    assert "disk" in set(model.hf_device_map.values()) and "cpu" in set(model.hf_device_map.values())
    assert offloaded(model)
    torch.testing.assert_close(logits(model), reference, rtol=0, atol=0)
    same = load_quantized(case / "quantized", offload_folder=tmp_path / "again", **options)
    torch.testing.assert_close(logits(same), reference, rtol=0, atol=0)


def test_peft_over_disk_offload_is_one_clear_error(case, tmp_path):
    """PEFT rewrites disk-offloaded files by '<module>.<parameter>' names (a KeyError on the
    packed names before): one BitallocError that says why and what to do."""
    model = AutoModelForCausalLM.from_pretrained(case / "quantized", device_map=SPLIT,
                                                 offload_folder=tmp_path)  # fmt: skip
    with pytest.raises(BitallocError, match="offloaded to disk.*bitalloc merge"):
        PeftModel.from_pretrained(model, case / "adapter")


def copy_quantized(case, target):
    shutil.copytree(case / "quantized", target)
    return target


def mismatch(folder):
    config = json.loads((folder / "config.json").read_text())
    modules = config["quantization_config"]["modules"]
    wrong = next(n for n, e in modules.items() if e["config"] == "nf2-b64-s8b256")
    modules[wrong]["config"] = "nf4-b64-s8b256"
    (folder / "config.json").write_text(json.dumps(config))


def truncated_shard(folder):
    shard = sorted(folder.glob("bitalloc-model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])


def missing_shard(folder):
    sorted(folder.glob("bitalloc-model-*.safetensors"))[0].unlink()


def other_version(folder):
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace("bitalloc.quantized/v1", "bitalloc.quantized/v2"))


BAD = {
    "per-module config does not match the stored tensors": (mismatch, r"\.weight\.codes is U8"),
    "truncated shard": (truncated_shard, "corrupt or truncated safetensors file"),
    "missing shard": (missing_shard, r"shard bitalloc-model-\S+ .*is missing"),
    "another format version": (other_version, "another bitalloc version"),
}


@pytest.mark.parametrize("loader", ["transformers", "bitalloc"])
@pytest.mark.parametrize("bad", list(BAD))
def test_a_bad_folder_is_one_clear_error_with_offload_too(case, tmp_path, loader, bad):
    edit, message = BAD[bad]
    folder = copy_quantized(case, tmp_path / "q")
    edit(folder)
    load = AutoModelForCausalLM.from_pretrained if loader == "transformers" else load_quantized
    with pytest.raises(BitallocError, match=message):
        load(folder, device_map=SPLIT, offload_folder=tmp_path / "offload", offload_buffers=True)
