"""`bitalloc merge OUT -o MERGED`: the streamed merge equals the in-memory ``merge_and_unload()``
and the ``apply --dequantized`` route plus PEFT's merge (the same numbers in the same dtype),
loads with transformers alone, takes a user-trained adapter, and refuses bad input with one
line, exit 2 and nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _models import make_tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_apply import TOKENS, logits
from test_bad_input import run_in_process
from test_hf import ENV
from transformers import AutoModelForCausalLM

import bitalloc
from bitalloc.artifacts.merge import dequantize_model
from bitalloc.artifacts.merge_stream import merge
from bitalloc.planning.planner import plan as make_plan
from bitalloc.profiling.profiler import profile

pytestmark = pytest.mark.usefixtures("one_thread")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tiny llama applied with a 2/4-bit plan (sharded packed files, the dequantized copy)."""
    root = tmp_path_factory.mktemp("merge_stream")
    make_tiny_llama(root / "model", shard_size=None)
    configs = ["nf2-b64-s8b256", "nf4-b64-sfp16", "int4-b32-sbf16"]
    table = profile(root / "model", configs=configs, rank=8, iters=2, device="cpu", quiet=True)
    plan = make_plan(table, 3.5)
    out = bitalloc.apply(root / "model", plan, root / "out", device="cpu", quiet=True, dequantized=True,
                         max_shard_bytes=150_000)  # fmt: skip
    return root, plan, out


def stored(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def merged_in_memory(base: Path, adapter: Path, dtype: torch.dtype):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload()
    return dequantize_model(merged)  # the packed layers the adapter does not target: plain Q


def assert_same_weights(files: dict[str, torch.Tensor], model) -> None:
    state = model.state_dict()
    assert set(files) <= set(state) and set(files) >= {n for n, _ in model.named_parameters()}
    for name, tensor in files.items():
        assert tensor.dtype == state[name].dtype, name
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)


def test_streamed_merge_equals_merge_and_unload_and_the_dequantized_route(case, tmp_path):
    root, plan, out = case
    merged = merge(out, tmp_path / "merged", max_shard_bytes=200_000, quiet=True)
    assert merged == tmp_path / "merged" and not (tmp_path / "merged.partial").exists()
    assert (merged / "model.safetensors.index.json").is_file() and len(list(merged.glob("*.safetensors"))) > 1
    files = stored(merged)
    assert {t.dtype for t in files.values()} == {torch.bfloat16}
    in_memory = merged_in_memory(out / "quantized", out / "adapter", torch.bfloat16)
    assert_same_weights(files, in_memory)
    assert_same_weights(files, merged_in_memory(out / "dequantized", out / "adapter", torch.bfloat16))
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and "transformers_weights" not in config
    assert config["dtype"] == "bfloat16"
    # the adapter really was added: the merged weight is not Q
    name = next(iter(plan.modules))
    q = stored(out / "dequantized")[f"{name}.weight"]
    assert (files[f"{name}.weight"].float() - q.float()).abs().max() > 1e-3
    # transformers alone loads it: no bitalloc import, no quantizer
    code = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\ntorch.set_num_threads(1)\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(merged)!r})\n"
        "assert getattr(m, 'hf_quantizer', None) is None and m.dtype == torch.bfloat16\n"
        f"torch.save(m(torch.tensor({TOKENS.tolist()!r})).logits, {str(tmp_path / 'logits.pt')!r})\n"
        "assert 'bitalloc' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits(in_memory))


def trained_adapter(out: Path, folder: Path, r: int = 4, **config) -> Path:
    """An adapter a user trained on OUT/quantized (random factors), saved with save_pretrained."""
    model = AutoModelForCausalLM.from_pretrained(out / "quantized")
    targets = ["q_proj", "v_proj", "down_proj", "lm_head"]  # packed and dense targets
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **config))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    peft_model.save_pretrained(folder, save_embedding_layers=False)  # lm_head: LoRA only
    return folder


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_user_trained_adapter_with_patterns_and_rslora(case, tmp_path, dtype):
    _, _, out = case
    adapter = trained_adapter(out, tmp_path / "trained", use_rslora=True,
                              rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3.0})  # fmt: skip
    merged = merge(out, tmp_path / "merged", adapter=adapter, dtype=dtype, quiet=True)
    reference = merged_in_memory(out / "quantized", adapter, DTYPES[dtype])
    files = stored(merged)
    assert_same_weights(files, reference)
    assert files["model.layers.0.mlp.down_proj.weight"].dtype == DTYPES[dtype]


def cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    result = run_in_process(folder, "merge", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitalloc: error: "), result.stderr
    return result


def copy_out(out: Path, target: Path) -> Path:
    shutil.copytree(out, target)
    return target


def foreign_adapter(folder: Path) -> None:
    """The adapter's factors renamed to a module the model does not have."""
    file = folder / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    for key in [k for k in tensors if "layers.1.mlp.up_proj" in k]:
        tensors[key.replace("layers.1.", "layers.7.")] = tensors.pop(key)
    save_file(tensors, file)


def wrong_shape(folder: Path) -> None:
    file = folder / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key][:, :64].contiguous()
    save_file(tensors, file)


def truncate(pattern: str):
    def setup(folder: Path) -> None:
        file = sorted(folder.glob(pattern))[-1]
        file.write_bytes(file.read_bytes()[:-100])

    return setup


def other_version(folder: Path) -> None:
    config = folder / "quantized" / "config.json"
    config.write_text(config.read_text().replace("bitalloc.quantized/v1", "bitalloc.quantized/v0"))


BAD = {
    "missing adapter": (lambda f: shutil.rmtree(f / "adapter"), "no LoRA adapter at"),
    "adapter for another model": (foreign_adapter, "targets model.layers.7.mlp.up_proj"),
    "adapter factors of another shape": (wrong_shape, "do not fit"),
    "corrupt packed shard": (truncate("quantized/bitalloc-model-*.safetensors"), "corrupt or truncated"),
    "corrupt adapter": (truncate("adapter/adapter_model.safetensors"), "corrupt or truncated"),
    "not an apply output": (lambda f: shutil.rmtree(f / "quantized"), "not a bitalloc apply output"),
    "another format version": (other_version, "another bitalloc version"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_left(case, tmp_path, bad):
    _, _, out = case
    setup, message = BAD[bad]
    folder = copy_out(out, tmp_path / "out")
    setup(folder)
    result = cli(tmp_path, "out", "-o", "merged", "--quiet")
    assert message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_adapter_for_another_plan_and_an_existing_output(case, tmp_path):
    """OUT/adapter replaced by one with other ranks: refused; the same folder given with
    --adapter is a user's adapter and merges. An existing output is never touched."""
    _, _, out = case
    folder = copy_out(out, tmp_path / "out")
    shutil.rmtree(folder / "adapter")
    trained_adapter(out, folder / "adapter")
    assert "an adapter for another plan or model" in cli(tmp_path, "out", "-o", "merged").stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    result = run_in_process(tmp_path, "merge", "out", "-o", "merged", "--adapter", "out/adapter", "--quiet")
    assert result.returncode == 0 and "wrote merged" in result.stdout, result.stderr
    api = merge(folder, tmp_path / "api", adapter=folder / "adapter", quiet=True)  # the CLI's twin
    assert {p.name: p.read_bytes() for p in api.iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir()
    }
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "merged").iterdir()}
    assert "already exists" in cli(tmp_path, "out", "-o", "merged", "--adapter", "out/adapter").stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "merged").iterdir()} == before
