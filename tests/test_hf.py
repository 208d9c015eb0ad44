"""Hugging Face-native artifacts: `from_pretrained` with bitalloc's quantizer, `device_map`,
`dtype`, `save_pretrained` round trips, AutoPeftModel from another directory, the error
without ``import bitalloc``, and bad folders (one BitallocError, never random weights).

Every check runs on a tiny llama applied once (2/4-bit mixed plan, some float-scaled
configs), compared with logits computed independently (LoftQ in memory).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _models import make_tiny_llama
from peft import AutoPeftModelForCausalLM, PeftModel
from test_apply import loftq_reference, logits
from transformers import AutoModelForCausalLM

import bitalloc
from bitalloc import BitallocError
from bitalloc.artifacts.nn import QuantLinear, load_quantized
from bitalloc.planning.planner import plan as make_plan
from bitalloc.profiling.profiler import profile

CONFIGS = ["nf2-b64-s8b256", "nf4-b64-sfp16", "int4-b32-sbf16"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    model = make_tiny_llama(root / "model", shard_size=None)
    table = profile(root / "model", configs=CONFIGS, rank=8, iters=2, device="cpu", quiet=True)
    plan = make_plan(table, 3.5)
    out = bitalloc.apply(
        root / "model", plan, root / "out", device="cpu", quiet=True, max_shard_bytes=150_000
    )
    expected = logits(loftq_reference(model, plan))
    return root, model, plan, out, expected


def packed(model) -> dict[str, str]:
    return {n: str(m.config) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_config_json_carries_the_quantization_config(case):
    _, _, plan, out, _ = case
    config = json.loads((out / "quantized" / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "bitalloc" and quant["format"] == "bitalloc.quantized/v1"
    assert quant["weights"] == "bitalloc-model.safetensors.index.json"  # sharded (max_shard_bytes)
    assert {n: e["config"] for n, e in quant["modules"].items()} == plan.assignments
    assert {n: e["shape"] for n, e in quant["modules"].items()} == {
        n: e["shape"] for n, e in plan.modules.items()
    }
    assert config["transformers_weights"] == "import-bitalloc-to-load-this-model.safetensors"
    assert len(set(plan.assignments.values())) >= 2


@pytest.mark.parametrize("kwargs", [{}, {"device_map": "cpu"}, {"device_map": "auto"},
                                    {"low_cpu_mem_usage": True, "dtype": torch.float32}])  # fmt: skip
def test_from_pretrained_plus_adapter_equals_loftq(case, kwargs):
    _, _, plan, out, expected = case
    model = AutoModelForCausalLM.from_pretrained(out / "quantized", **kwargs)
    assert packed(model) == plan.assignments
    assert model.hf_quantizer.quantization_config.quant_method == "bitalloc"
    peft_model = PeftModel.from_pretrained(model, out / "adapter")
    torch.testing.assert_close(logits(peft_model), expected, rtol=1e-4, atol=1e-5)


def test_bf16_and_load_quantized_keywords(case):
    _, _, plan, out, expected = case
    model = AutoModelForCausalLM.from_pretrained(out / "quantized", dtype=torch.bfloat16, device_map="cpu")
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    assert (
        layer.compute_dtype == torch.bfloat16
        and model.get_submodule("model.norm").weight.dtype == torch.bfloat16
    )
    assert layer.codes.dtype == torch.uint8
    alias = load_quantized(out / "quantized", torch_dtype=torch.bfloat16, device_map="cpu")
    torch.testing.assert_close(logits(alias), logits(model), rtol=0, atol=0)
    peft_model = PeftModel.from_pretrained(model, out / "adapter")
    error = (logits(peft_model).float() - expected).abs().max().item()
    assert error < 0.1 * expected.abs().max().item()  # bf16 compute, the same model
    with pytest.raises(BitallocError, match="device or device_map"):
        load_quantized(out / "quantized", device="cpu", device_map="cpu")


def test_save_pretrained_round_trip(case, tmp_path):
    """A loaded model's save_pretrained folder loads back (transformers and bitalloc) to the
    same logits; it used to hold packed tensors transformers filled at random."""
    _, _, plan, out, _ = case
    model = AutoModelForCausalLM.from_pretrained(out / "quantized")
    reference = logits(model)
    model.save_pretrained(tmp_path / "saved")
    for loaded in (
        AutoModelForCausalLM.from_pretrained(tmp_path / "saved"),
        load_quantized(tmp_path / "saved"),
    ):
        assert packed(loaded) == plan.assignments
        torch.testing.assert_close(logits(loaded), reference, rtol=0, atol=0)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["transformers_weights"] == "import-bitalloc-to-load-this-model.safetensors"
    assert saved["quantization_config"]["weights"] == "model.safetensors"
    # and again, sharded by transformers, from a bitalloc-loaded model
    load_quantized(tmp_path / "saved").save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(logits(load_quantized(tmp_path / "sharded")), reference, rtol=0, atol=0)


def test_without_import_bitalloc_the_error_says_so(case, tmp_path):
    _, _, _, out, _ = case
    load_quantized(out / "quantized").save_pretrained(tmp_path / "saved")
    folders = [str(out / "quantized"), str(tmp_path / "saved")]
    code = (  # both folders in one interpreter: a start-up costs more than the loads
        "import sys, traceback\nfrom transformers import AutoModelForCausalLM\n"
        f"for folder in {folders!r}:\n"
        "    try:\n        AutoModelForCausalLM.from_pretrained(folder)\n"
        "    except Exception as exc:\n"
        "        print('ERROR', traceback.format_exception_only(exc)[-1].strip().splitlines()[-1])\n"
        "    else:\n        print('LOADED')\n"
        "assert 'bitalloc' not in sys.modules"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()[-2:]
    assert len(lines) == 2 and all(line.startswith("ERROR") for line in lines), result.stdout
    assert all("import-bitalloc-to-load-this-model" in line for line in lines), lines


@pytest.mark.parametrize("order", ["bitalloc first", "transformers first"])
def test_import_registers_in_either_order_and_stays_light(case, tmp_path, order):
    _, _, plan, out, _ = case
    imports = ["import bitalloc", "from transformers import AutoModelForCausalLM"]
    if order == "transformers first":
        imports.reverse()
    code = "\n".join([
        "import sys", "import bitalloc" if order == "bitalloc first" else "pass",
        "assert 'transformers' not in sys.modules or 'bitalloc first' != " + repr(order),
        *imports,
        f"m = AutoModelForCausalLM.from_pretrained({str(out / 'quantized')!r})",
        "print(sum(type(x).__name__ == 'QuantLinear' for x in m.modules()))",
    ])  # fmt: skip
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == str(len(plan.modules))


def test_auto_peft_model_from_another_directory_after_a_move(case, tmp_path):
    _, _, _, out, expected = case
    moved = tmp_path / "moved" / "run1"
    shutil.copytree(out, moved)
    assert json.loads((moved / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "../quantized"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    here = os.getcwd()
    try:
        os.chdir(elsewhere)
        model = AutoPeftModelForCausalLM.from_pretrained(str(moved / "adapter"))
    finally:
        os.chdir(here)
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-5)


def copy_quantized(out: Path, target: Path) -> Path:
    shutil.copytree(out / "quantized", target)
    return target


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("loader", ["transformers", "bitalloc"])
def test_bad_folders_are_one_clear_error(case, tmp_path, loader):
    _, _, plan, out, _ = case
    load = AutoModelForCausalLM.from_pretrained if loader == "transformers" else load_quantized
    wrong = next(n for n, c in plan.assignments.items() if c == "nf2-b64-s8b256")

    def config_mismatch(config):
        config["quantization_config"]["modules"][wrong]["config"] = "nf4-b64-s8b256"

    def other_version(config):
        config["quantization_config"]["format"] = "bitalloc.quantized/v0"

    def unknown_module(config):
        config["quantization_config"]["modules"]["model.layers.0.mlp.nope"] = {"config": "nf4-b64-s8b256",
                                                                               "shape": [8, 8]}  # fmt: skip

    def unlisted(config):
        del config["quantization_config"]["modules"][wrong]

    cases = [(config_mismatch, f"{wrong}.weight.codes is U8"), (other_version, "another bitalloc version"),
             (unknown_module, "nope"), (unlisted, f"{wrong} is stored packed")]  # fmt: skip
    for i, (edit, message) in enumerate(cases):
        folder = copy_quantized(out, tmp_path / f"q{i}")
        edit_config(folder, edit)
        with pytest.raises(BitallocError, match=message):
            load(folder)
    folder = copy_quantized(out, tmp_path / "shard")
    shard = sorted(folder.glob("bitalloc-model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(BitallocError, match=f"shard {shard.name} .* is missing"):
        load(folder)


def test_folder_from_an_earlier_bitalloc_is_refused(case, tmp_path):
    """Before the quantization_config, only bitalloc_quant.json said what was packed."""
    folder = copy_quantized(case[3], tmp_path / "old")
    edit_config(
        folder, lambda config: [config.pop("quantization_config"), config.pop("transformers_weights")]
    )
    with pytest.raises(BitallocError, match="earlier bitalloc .*apply again"):
        load_quantized(folder)
