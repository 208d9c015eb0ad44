"""`apply --format compressed-tensors`: a pack-quantized checkpoint that transformers loads with
no bitalloc import, holding the same codes, scales and zero points as bitalloc's own format.

The model is a tiny bf16 llama (hidden 128, intermediate 256: whole groups of 64); the plan
gives 4-bit groups of 64 with bf16, fp16 and fp32 scales to different projections, LoRA rank 4
(transformers loads one bit width and group size per checkpoint: see `SCHEME_NOTE`).
The loading side runs in a subprocess in which ``import bitalloc`` fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _models import make_tiny_llama
from peft import PeftModel
from safetensors.torch import load_file

from bitalloc import BitallocError
from bitalloc.artifacts.compressed import check_expressible, pack_int32, unexpressible
from bitalloc.artifacts.nn import QuantLinear, load_quantized
from bitalloc.artifacts.writer import APPLY_FORMATS, apply
from bitalloc.checkpoints.safetensors import read_header
from bitalloc.cli import build_parser, main
from bitalloc.planning.planner import plan as make_plan
from bitalloc.profiling.profiler import profile
from bitalloc.quant import QuantConfig

pytest.importorskip("compressed_tensors")

CONFIGS = ["uint4-b64-sbf16-z4", "uint4-b64-sfp16-z4", "uint4-b64-sfp32-z4-mse"]
SCALE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}
TOKENS = [[1, 17, 42, 99, 7, 250, 3, 64], [5, 6, 7, 8, 9, 10, 11, 12]]

pytestmark = pytest.mark.usefixtures("one_thread")

# Runs with bitalloc unimportable: loads OUT/quantized (and the adapter over it) with plain
# transformers + compressed-tensors + PEFT, and saves the planned weights and the logits.
LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["bitalloc"] = None  # any `import bitalloc` now raises ImportError
    import torch
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    out, modules, result = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    tokens = torch.tensor(json.loads(sys.argv[4]))
    saved = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(out + "/quantized", dtype=dtype).eval()
        for module in modules:
            saved[f"{name}.{module}"] = model.get_submodule(module).weight.detach().clone()
        with torch.no_grad():
            saved[f"{name}.logits"] = model(tokens).logits.float()
            lora = PeftModel.from_pretrained(model, out + "/adapter").eval()
            saved[f"{name}.lora_logits"] = lora(tokens).logits.float()
    assert "bitalloc" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
    save_file({k: v.contiguous() for k, v in saved.items()}, result)
    """
)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The model, a plan mixing the three configs, and both formats applied from it."""
    root = tmp_path_factory.mktemp("ct")
    make_tiny_llama(root / "model", dtype=torch.bfloat16, shard_size=None)
    table = profile(root / "model", configs=CONFIGS, rank=4, iters=1, device="cpu", quiet=True)
    # one config per projection, so that every scale dtype is used
    pick = {"q_proj": 0, "k_proj": 0, "v_proj": 2, "o_proj": 1}
    wanted = [row.config == CONFIGS[pick.get(row.module.rsplit(".", 1)[1], 1)] for row in table.itertuples()]
    plan = make_plan(table[wanted], 8.5)
    assert {entry.config for entry in plan.modules.values()} == set(CONFIGS)
    ct = apply(root / "model", plan, root / "ct", format="compressed-tensors", dequantized=True, quiet=True)
    ours = apply(root / "model", plan, root / "ours", quiet=True)
    return root, plan, ct, ours


@pytest.fixture(scope="module")
def loaded(case, tmp_path_factory):
    """What the subprocess without bitalloc loaded from the compressed-tensors folder."""
    root, plan, ct, _ = case
    result = tmp_path_factory.mktemp("loaded") / "loaded.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not even on the path
    arguments = [str(ct), json.dumps(list(plan.modules)), str(result), json.dumps(TOKENS)]
    run = subprocess.run(
        [sys.executable, "-c", LOADER, *arguments],
        capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(str(result))


def _ours(case, dtype: torch.dtype):
    """bitalloc's own output (the default format) loaded in ``dtype``."""
    return load_quantized(case[3] / "quantized", dtype=dtype)


def test_same_weights_as_bitalloc_format(case, loaded):
    """Every planned matrix loads as compressed-tensors defines it, (q - z)·s computed in the
    scale's dtype: bit-equal to bitalloc's exact Q rounded once to that dtype; so bit-equal to
    bitalloc's QuantLinear when loaded in the scale's dtype (or with fp32 scales), else within
    one rounding of the scale's dtype."""
    _, plan, _, _ = case
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = _ours(case, dtype)
        for module, entry in plan.modules.items():
            layer = model.get_submodule(module)
            assert isinstance(layer, QuantLinear)
            exact = layer.dequantize(torch.float32)  # bitalloc's Q, exact in float32
            scale_dtype = SCALE_DTYPES[QuantConfig.parse(entry.config).scale_dtype]
            theirs = loaded[f"{name}.{module}"]
            assert theirs.dtype == dtype
            assert torch.equal(theirs, exact.to(scale_dtype).to(dtype)), (name, module)
            if scale_dtype in (dtype, torch.float32):
                assert torch.equal(theirs, layer.dequantize(dtype)), (name, module)
            # one rounding to the scale's dtype (unit roundoff u: 2^-8 bf16, 2^-11 fp16, plus half
            # fp16's subnormal spacing), and a second one to bf16 for fp16 scales in a bf16 model
            u_scale, u_model = UNIT_ROUNDOFF[scale_dtype], UNIT_ROUNDOFF[dtype]
            bound = (u_scale + u_model + u_scale * u_model) * exact.abs() + 2.0**-25
            assert bool(((theirs.float() - exact).abs() <= bound).all()), (name, module)


def test_logits_and_adapter_match_bitalloc(case, loaded):
    _, _, _, ours = case
    tokens = torch.tensor(TOKENS)
    model = _ours(case, torch.float32)
    with torch.no_grad():
        logits = model(tokens).logits
        lora = PeftModel.from_pretrained(model, ours / "adapter").eval()
        lora_logits = lora(tokens).logits
    # fp32: the weights differ from bitalloc's exact Q by the scale dtype's rounding (fp16, bf16
    # scales); measured: logits differ by 1.9e-4 at most (logits up to 0.75), the bound is 10x
    for theirs, mine in ((loaded["fp32.logits"], logits), (loaded["fp32.lora_logits"], lora_logits)):
        assert (theirs - mine).abs().max().item() < 2e-3
    assert (loaded["fp32.lora_logits"] - loaded["fp32.logits"]).abs().max().item() > 1e-2  # B·A counts


def test_folder_layout(case):
    """Unplanned tensors as bitalloc's format writes them; four tensors per planned module; a
    quantization_config compressed-tensors validates; a dequantized config without it."""
    from compressed_tensors.quantization import QuantizationConfig

    _, plan, ct, ours = case
    theirs = read_header(ct / "quantized" / "model.safetensors")
    mine = read_header(ours / "quantized" / "bitalloc-model.safetensors")
    unplanned = {n: (e.dtype, e.shape) for n, e in mine.items() if ".weight." not in n}
    assert unplanned == {n: (e.dtype, e.shape) for n, e in theirs.items() if n in unplanned}
    assert len(theirs) == len(unplanned) + 4 * len(plan.modules)
    config = json.loads((ct / "quantized" / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    assert quant["quantization_status"] == "compressed" and "lm_head" in quant["ignore"]
    validated = QuantizationConfig.model_validate(quant)
    targets = sorted(t for group in validated.config_groups.values() for t in group.targets)
    assert targets == sorted(plan.modules)
    assert "quantization_config" not in json.loads((ct / "dequantized" / "config.json").read_text())
    assert (ct / "adapter" / "adapter_config.json").is_file()
    with pytest.raises(BitallocError, match="quant_method 'compressed-tensors' .load it with transformers"):
        load_quantized(ct / "quantized")  # bitalloc's reader says what the folder is


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows, columns", [(3, 40), (37, 96), (64, 256)])
def test_packing_is_compressed_tensors(bits, rows, columns):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    codes = torch.randint(0, 2**bits, (rows, columns), generator=torch.Generator().manual_seed(bits))
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)
    for packed_dim, ours in ((1, pack_int32(codes, bits)), (0, pack_int32(codes.T, bits).T)):
        theirs = pack_to_int32(signed, bits, packed_dim=packed_dim)
        assert ours.dtype == torch.int32 and torch.equal(ours, theirs)
        chunked = pack_int32(codes, bits, chunk_rows=5) if packed_dim == 1 else pack_int32(codes.T, bits, 5).T
        assert torch.equal(chunked, theirs)  # rows a few at a time: the same words
        assert torch.equal(unpack_from_int32(ours, bits, signed.shape, packed_dim=packed_dim), signed)


@pytest.mark.parametrize(
    "config, columns, reason",
    [
        ("nf4-b64-sfp16", 128, "codebook"),
        ("int4-b64-sfp16", 128, "symmetric"),
        ("int2-b64-s8b256", 128, "symmetric"),
        ("uint4-b64-sfp16-zfp16", 128, "zero point is a float"),
        ("uint4-b96-sfp16-z4", 128, "not whole groups of 96"),
    ],
)
def test_what_cannot_be_stored(config, columns, reason):
    assert reason in unexpressible(QuantConfig.parse(config), columns)


@pytest.mark.parametrize("config", ["uint2-b32-sbf16-z2-mse", "uint3-b64-sfp16-z3", "uint8-b128-sfp32-z8"])
def test_what_can_be_stored(config):
    assert unexpressible(QuantConfig.parse(config), 256) is None


def test_refusal_names_the_first_bad_module_and_leaves_nothing(case, tmp_path, capsys):
    root, _, _, _ = case
    table = profile(root / "model", configs=["uint4-b64-sfp16-z4", "int4-b64-sfp16"], rank=0, iters=0,
                    device="cpu", quiet=True)  # fmt: skip
    plan = make_plan(table, 4.28)  # between int4 (4.25) and uint4 (4.3125): both are used
    configs = [entry.config for entry in plan.modules.values()]
    assert {"uint4-b64-sfp16-z4", "int4-b64-sfp16"} <= set(configs)
    first = next(name for name, entry in plan.modules.items() if entry.config.startswith("int"))
    with pytest.raises(BitallocError, match=f"int4-b64-sfp16 \\(module {first}\\)"):
        check_expressible(plan)
    path = plan.save(tmp_path / "plan.json")
    out = tmp_path / "out"
    code = main(["apply", str(root / "model"), "--plan", str(path), "-o", str(out), "--format",
                 "compressed-tensors", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"(module {first})" in err and "symmetric" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # no OUT, no OUT.partial


def test_mixed_bit_widths_are_refused_naming_the_first_that_differs(case):
    root, _, _, _ = case
    table = profile(root / "model", configs=["uint2-b32-sfp16-z2", "uint4-b64-sfp16-z4"], rank=0, iters=0,
                    device="cpu", quiet=True)  # fmt: skip
    plan = make_plan(table, 3.5)
    configs = [entry.config for entry in plan.modules.values()]
    assert len(set(configs)) == 2
    name, entry = next((n, e) for n, e in plan.modules.items() if e.config != configs[0])
    first = next(iter(plan.modules))
    expected = f"{entry.config} \\(module {name}\\).*{configs[0]} \\(module {first}\\)"
    with pytest.raises(BitallocError, match=expected):
        check_expressible(plan)


def test_existing_output_is_refused_and_kept(case, tmp_path):
    root, plan, _, _ = case
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(BitallocError, match="already exists"):
        apply(root / "model", plan, out, format="compressed-tensors", quiet=True)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and not (tmp_path / "out.partial").exists()
    with pytest.raises(BitallocError, match="unknown apply format"):
        apply(root / "model", plan, tmp_path / "other", format="gguf", quiet=True)


def test_cli_choices_are_the_formats():
    parser = build_parser()
    args = parser.parse_args(["apply", "m", "--plan", "p", "-o", "o", "--format", "compressed-tensors"])
    assert args.format == "compressed-tensors"
    commands = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    action = next(a for a in commands.choices["apply"]._actions if "--format" in a.option_strings)
    assert tuple(action.choices) == APPLY_FORMATS and action.default == "bitalloc"


def test_interrupted_run_resumes_without_recomputing(case, tmp_path, monkeypatch):
    """A run stopped after its matrices (here: at the check of what it wrote) leaves only
    OUT.partial; the rerun reuses every matrix and writes the same tensors, here in shards."""
    import bitalloc.artifacts.compressed as compressed
    import bitalloc.artifacts.writer as writer

    root, plan, ct, _ = case
    out = tmp_path / "out"

    def stopped(folder, plan):
        raise BitallocError("stopped after writing")

    checked = compressed.check_folder
    monkeypatch.setattr(compressed, "check_folder", stopped)
    with pytest.raises(BitallocError, match="stopped after writing"):
        apply(root / "model", plan, out, format="compressed-tensors", quiet=True)
    done = list((tmp_path / "out.partial" / "matrices").iterdir())
    assert not out.exists() and len(done) == len(plan.modules)
    monkeypatch.setattr(compressed, "check_folder", checked)
    with pytest.raises(BitallocError, match="output format"):  # the work is not reused for another format
        apply(root / "model", plan, out, quiet=True)

    def recomputed(*args, **kwargs):
        raise AssertionError("a finished matrix was decomposed again")

    monkeypatch.setattr(writer, "decompose", recomputed)
    apply(root / "model", plan, out, format="compressed-tensors", quiet=True, max_shard_bytes=100_000)
    assert not (tmp_path / "out.partial").exists()
    shards = sorted((out / "quantized").glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "quantized" / "model.safetensors.index.json").is_file()
    resumed = {name: t for shard in shards for name, t in load_file(str(shard)).items()}
    first = load_file(str(ct / "quantized" / "model.safetensors"))
    assert resumed.keys() == first.keys()
    assert all(torch.equal(resumed[name], first[name]) for name in first)


def test_check_folder_finds_a_damaged_checkpoint(case, tmp_path):
    """What `apply` checks before renaming its output into place, from the headers."""
    import shutil

    from safetensors.torch import save_file

    from bitalloc.artifacts.compressed import check_folder

    _, plan, ct, _ = case
    folder = tmp_path / "quantized"
    shutil.copytree(ct / "quantized", folder)
    tensors = load_file(str(folder / "model.safetensors"))
    module = next(iter(plan.modules))
    zero = f"{module}.weight_zero_point"
    rows, groups = tensors[f"{module}.weight_scale"].shape
    damages = [
        ({zero: None}, f"{zero} is missing"),
        ({zero: torch.zeros(rows, groups, dtype=torch.int8)}, f"{zero} is missing or not torch.int32"),
        ({"model.layers.0.extra": torch.zeros(2)}, "model.layers.0.extra has no place"),
        ({"model.norm.weight": None}, "lacks model.norm.weight"),
        ({"model.norm.weight": torch.zeros(7)}, "do not fit the model"),
    ]
    for change, message in damages:
        damaged = {**tensors, **change}
        save_file({k: v for k, v in damaged.items() if v is not None}, str(folder / "model.safetensors"))
        with pytest.raises(BitallocError, match=message):
            check_folder(folder, plan)
    save_file(tensors, str(folder / "model.safetensors"))
    check_folder(folder, plan)  # the undamaged one passes
