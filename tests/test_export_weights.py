"""``export --weights``: the plan's quantized weights in the target's own format, loaded by the
target's own library (in a subprocess in which ``import bitalloc`` fails) and compared with
bitalloc's dequantized Q of the same plan, bit for bit.

The model is a tiny fp16 llama (hidden 128, intermediate 256: whole groups of 64 and 32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _models import make_tiny_llama, tiny_llama
from safetensors.torch import load_file

from bitalloc import BitallocError
from bitalloc.artifacts.nn import load_quantized
from bitalloc.artifacts.writer import apply
from bitalloc.cli import main
from bitalloc.export.weights import HQQ_PACKING, export_weights, hqq_state, pack_hqq
from bitalloc.planning.planner import plan as make_plan
from bitalloc.profiling.profiler import profile
from bitalloc.quant import QuantizedTensor

pytest.importorskip("hqq")

# one bit width per projection kind, so every HQQ packing is used (2 and 3 bits: 8 and 10 codes a word)
HQQ_CONFIGS = [
    "uint4-b64-sfp16-zfp16",
    "uint2-b64-sfp16-zfp16-mse",
    "uint3-b32-sfp16-zfp16",
    "uint8-b64-sfp16-zfp16",
]
HQQ_PICK = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "o_proj": 3, "gate_proj": 1, "up_proj": 2, "down_proj": 0}
GPTQ_CONFIGS = ["uint4-b64-sfp16-z4", "uint3-b32-sfp16-z3", "uint2-b128-sfp16-z2-mse", "uint8-b32-sfp16-z8"]
CT_CONFIGS = ["uint4-b64-sfp16-z4", "uint4-b64-sbf16-z4-mse"]
TOKENS = [[1, 17, 42, 99, 7, 250, 3, 64]]

pytestmark = pytest.mark.usefixtures("one_thread")

# Runs with bitalloc unimportable: HQQ's own loader, each planned module's dequantize() and the logits.
HQQ_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["bitalloc"] = None
    import torch
    from hqq.core.quantize import HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel
    from safetensors.torch import save_file
    folder, modules, result = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    model = AutoHQQHFModel.from_quantized(folder, compute_dtype=torch.float16, device="cpu")
    saved = {}
    for module in modules:
        layer = model.get_submodule(module)
        assert isinstance(layer, HQQLinear), type(layer)
        saved[module] = layer.dequantize().clone()
    with torch.no_grad():
        saved["logits"] = model(torch.tensor(json.loads(sys.argv[4]))).logits.float()
    save_file({k: v.contiguous() for k, v in saved.items()}, result)
    """
)
CT_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["bitalloc"] = None
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    folder, modules, result = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    save_file({m: model.get_submodule(m).weight.detach().contiguous() for m in modules}, result)
    """
)


def _run_without_bitalloc(script: str, *arguments: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", script, *arguments],
        capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


def _plan(model, configs, pick, rank=0, keep=()):
    table = profile(model, configs=configs, rank=rank, iters=1, device="cpu", quiet=True)
    wanted = [row.config == configs[pick(row.module.rsplit(".", 1)[1])] for row in table.itertuples()]
    return make_plan(table[wanted], 16.0, keep=keep)


@pytest.fixture(scope="module")
def hqq_case(tmp_path_factory):
    """A rank-0 plan of HQQ-exact configs, exported as HQQ weights and applied in bitalloc's format."""
    root = tmp_path_factory.mktemp("hqq")
    make_tiny_llama(root / "model", dtype=torch.float16, shard_size=None)
    plan = _plan(root / "model", HQQ_CONFIGS, HQQ_PICK.get, keep=[r"layers\.1\.mlp\.down_proj"])
    assert {entry.config for entry in plan.modules.values()} == set(HQQ_CONFIGS)
    assert plan.kept == ["model.layers.1.mlp.down_proj"]  # a Linear left in 16 bits, stored as is
    result = export_weights(plan, "hqq", root / "hqq", root / "model", device="cpu", quiet=True)
    ours = apply(root / "model", plan, root / "ours", quiet=True, device="cpu")
    return root, plan, result, ours


def test_pack_hqq_is_hqq_bitpack():
    """Every packing equals HQQ's own BitPack (and unpacks back), odd row counts included at 3 bits."""
    from hqq.core.quantize import Quantizer

    generator = torch.Generator().manual_seed(0)
    for bits, (name, per_word, _) in HQQ_PACKING.items():
        rows = 10 * per_word + (3 if bits == 3 else 0)
        codes = torch.randint(0, 2**bits, (rows, 16), generator=generator, dtype=torch.uint8)
        ours = pack_hqq(codes, bits)
        theirs = Quantizer.pack[name](codes)
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), bits
        assert torch.equal(Quantizer.unpack[name](ours)[:rows], codes)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_hqq_linear_from_state_equals_q(dtype):
    """An HQQLinear loaded from `hqq_state` dequantizes (in the scale's dtype, the compute dtype)
    to bitalloc's Q bit for bit, at every bit width, bf16 and fp16, with offset rows."""
    from hqq.core.quantize import HQQLinear

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    weight = torch.randn(64, 192, generator=torch.Generator().manual_seed(1))
    weight[:4] += 3.0  # positive groups: zero points at the range's end
    for bits in HQQ_PACKING:
        config = f"uint{bits}-b64-s{dtype}-z{dtype}-mse"
        packed = QuantizedTensor.from_weight(weight, config)
        layer = HQQLinear(None, quant_config=None, compute_dtype=torch_dtype, device="cpu")
        layer.load_state_dict(hqq_state(packed))
        theirs = layer.dequantize()
        assert theirs.dtype == torch_dtype and theirs.shape == (64, 192)
        assert torch.equal(theirs, packed.dequantize(torch_dtype)), config


def test_hqq_dequantizes_to_bitalloc_q(hqq_case, tmp_path):
    """HQQ's loader (no bitalloc) gives every planned module's Q equal to bitalloc's Q computed
    in the scale's dtype, and the model's logits equal bitalloc's own model's up to fp16 kernels."""
    root, plan, result, ours = hqq_case
    assert sorted(p.name for p in result.path.iterdir()) == [
        "bitalloc_plan.json",
        "config.json",
        "generation_config.json",
        "qmodel.pt",
    ]
    assert result.notes[0].startswith("exact: hqq stores")
    loaded = tmp_path / "loaded.safetensors"
    _run_without_bitalloc(
        HQQ_LOADER, str(result.path), json.dumps(list(plan.modules)), str(loaded), json.dumps(TOKENS)
    )
    theirs = load_file(str(loaded))
    model = load_quantized(ours / "quantized", dtype=torch.float16)
    for module in plan.modules:
        q = model.get_submodule(module).quantized().dequantize(torch.float16)
        assert theirs[module].dtype == torch.float16
        assert torch.equal(theirs[module], q), module
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS)).logits.float()
    scale = logits.abs().max().item()
    assert (theirs["logits"] - logits).abs().max().item() < 2e-2 * scale


def test_hqq_other_tensors_kept(hqq_case):
    """qmodel.pt holds each non-planned module's tensors as the checkpoint stores them."""
    root, plan, result, _ = hqq_case
    weights = torch.load(result.path / "qmodel.pt", weights_only=True)
    original = load_file(str(root / "model" / "model.safetensors"))
    for key, tensor in original.items():
        module, _, leaf = key.rpartition(".")
        if module in plan.modules:
            assert weights[module]["nbits"] == int(plan.modules[module].config[4])
        else:
            assert torch.equal(weights[module][leaf], tensor), key


def test_compressed_tensors_weights_load_without_bitalloc(tmp_path):
    """compressed-tensors weights are apply's pack-quantized checkpoint: transformers alone loads
    each planned module as bitalloc's Q (float32 load: (q - z)·s rounded once to the scale dtype)."""
    make_tiny_llama(tmp_path / "model", dtype=torch.bfloat16, shard_size=None)
    plan = _plan(tmp_path / "model", CT_CONFIGS, lambda kind: int(kind.startswith("mlp") or kind == "o_proj"))
    result = export_weights(
        plan, "compressed-tensors", tmp_path / "ct", tmp_path / "model", device="cpu", quiet=True
    )
    config = json.loads((result.path / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    ours = apply(tmp_path / "model", plan, tmp_path / "ours", quiet=True, device="cpu")
    loaded = tmp_path / "loaded.safetensors"
    _run_without_bitalloc(CT_LOADER, str(result.path), json.dumps(list(plan.modules)), str(loaded))
    theirs = load_file(str(loaded))
    model = load_quantized(ours / "quantized", dtype=torch.float32)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    for module, entry in plan.modules.items():
        dtype = dtypes[entry.config.split("-")[2][1:]]
        q = model.get_submodule(module).quantized().dequantize(torch.float32).to(dtype).float()
        assert torch.equal(theirs[module], q), module
    assert not list(tmp_path.glob(".ct.*")), "the work folder is removed"


def test_refused_before_any_work(tmp_path):
    """A config the target cannot store names its module; another target, an existing output:
    one-line errors, and nothing is written."""
    make_tiny_llama(tmp_path / "model", dtype=torch.float16, shard_size=None)
    plan = _plan(
        tmp_path / "model",
        ["uint4-b64-sfp16-z4", "uint4-b64-sfp16-zfp16"],
        lambda kind: int(kind != "k_proj"),
    )
    first = next(name for name, entry in plan.modules.items() if entry.config.endswith("-z4"))
    with pytest.raises(BitallocError, match=f"module {first}.*zero point"):
        export_weights(plan, "hqq", tmp_path / "out", tmp_path / "model")
    with pytest.raises(BitallocError, match="of compressed-tensors, hqq, gptqmodel only, not 'torchao'"):
        export_weights(plan, "torchao", tmp_path / "out", tmp_path / "model")
    (tmp_path / "taken").mkdir()
    hqq_only = make_plan(profile(tmp_path / "model", configs=["uint4-b64-sfp16-zfp16"], rank=0, iters=1,
                                 device="cpu", quiet=True), 16.0)  # fmt: skip
    with pytest.raises(BitallocError, match="already exists"):
        export_weights(hqq_only, "hqq", tmp_path / "taken", tmp_path / "model")
    # a failure during the work (the model is not the plan's): the work folder goes too
    make_tiny_llama(tmp_path / "other", dtype=torch.float16, shard_size=None, intermediate_size=192)
    with pytest.raises(BitallocError):
        export_weights(hqq_only, "hqq", tmp_path / "out", tmp_path / "other", device="cpu", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "other", "taken"]


def test_rank_warning_tied_embeddings_and_cli(tmp_path, capsys):
    """The CLI writes the folder (and the config with -o); a rank > 0 plan warns that its LoRA
    factors are not in the weights; a tied lm_head (absent from the checkpoint) gets its own entry,
    so that HQQ's loader, which fills only the modules qmodel.pt names, builds a whole model."""
    make_tiny_llama(tmp_path / "model", dtype=torch.float16, shard_size=None, tie_word_embeddings=True)
    table = profile(
        tmp_path / "model", configs=["uint4-b64-sfp16-zfp16"], rank=2, iters=1, device="cpu", quiet=True
    )
    plan = make_plan(table, 16.0)
    plan.save(tmp_path / "plan.json")
    model = ["--model", str(tmp_path / "model"), "--device", "cpu"]
    arguments = ["export", str(tmp_path / "plan.json"), "--to", "hqq", "--weights", str(tmp_path / "w")]
    assert main([*arguments, *model, "-o", str(tmp_path / "hqq.json")]) in (0, None)
    printed = capsys.readouterr()
    assert "wrote" in printed.out
    assert "LoRA factors (rank 2) are not part of the hqq weights" in " ".join(printed.err.split())
    assert set(json.loads((tmp_path / "hqq.json").read_text())) == set(plan.modules) | set(plan.kept)
    weights = torch.load(tmp_path / "w" / "qmodel.pt", weights_only=True)
    assert torch.equal(weights["lm_head"]["weight"], weights["model.embed_tokens"]["weight"])
    loaded = tmp_path / "loaded.safetensors"
    modules = json.dumps(list(plan.modules))
    _run_without_bitalloc(HQQ_LOADER, str(tmp_path / "w"), modules, str(loaded), json.dumps(TOKENS))
    assert torch.isfinite(load_file(str(loaded))["logits"]).all()
    assert main([*arguments, *model]) == 2  # the output exists now
    assert main(arguments) == 2  # --weights without --model
    assert "needs --model" in capsys.readouterr().err


def unpack_words(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """GPTQ's packing read back along dim 0 of int32 ``words``: value k at bit k·bits of the
    column's little-endian stream of 32-bit words (a value may straddle two words at 3 bits),
    written from GPTQ's documented layout, independently of bitalloc's packer."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    offsets = torch.arange(count) * bits
    word, shift = offsets // 32, (offsets % 32).unsqueeze(1)
    low = u[word] >> shift
    spill = (shift + bits > 32).squeeze(1)
    high = torch.zeros_like(low)
    nxt = torch.clamp(word + 1, max=u.shape[0] - 1)
    high[spill] = u[nxt[spill]] << (32 - shift[spill])
    return (low | high) & (2**bits - 1)


def gptq_reference(tensors: dict, module: str, bits: int, shape) -> torch.Tensor:
    """GPTQModel's dequantization (``dequantize_weight``) of a gptq_v2 module: the integer
    difference q - z times the fp16 scale of the input's group, as (out, in)."""
    rows, columns = shape
    qweight, qzeros = tensors[f"{module}.qweight"], tensors[f"{module}.qzeros"]
    scales, g_idx = tensors[f"{module}.scales"], tensors[f"{module}.g_idx"]
    assert qweight.dtype == qzeros.dtype == g_idx.dtype == torch.int32 and scales.dtype == torch.float16
    assert torch.equal(g_idx, torch.arange(columns, dtype=torch.int32) // (columns // scales.shape[0]))
    g_idx = g_idx.long()
    weight = unpack_words(qweight, bits, columns)  # (in, out)
    zeros = unpack_words(qzeros.T, bits, rows).T  # (groups, out)
    return (scales[g_idx] * (weight - zeros[g_idx]).to(torch.int16)).T


def test_gptq_weights_match_reference_dequantization(tmp_path):
    """gptq_v2 weights (GPTQModel is not installed: its build needs CUDA) dequantized by a reference
    written from GPTQModel's documented layout equal bitalloc's Q in fp16, at 2, 3, 4 and 8 bits,
    zero points of 0 included (which the v1 format cannot hold)."""
    model = tiny_llama(0, torch.float16)
    with torch.no_grad():  # rows of positive weights: groups whose zero point is 0
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight[:8] = layer.self_attn.q_proj.weight[:8].abs() + 0.01
    model.save_pretrained(tmp_path / "model")
    plan = _plan(tmp_path / "model", GPTQ_CONFIGS, HQQ_PICK.get)
    assert {entry.config for entry in plan.modules.values()} == set(GPTQ_CONFIGS)
    result = export_weights(
        plan, "gptqmodel", tmp_path / "gptq", tmp_path / "model", device="cpu", quiet=True
    )
    config = json.loads((result.path / "quantize_config.json").read_text())
    assert (config["format"], config["sym"], config["desc_act"]) == ("gptq_v2", False, False)
    assert json.loads((result.path / "config.json").read_text())["quantization_config"] == config
    tensors = load_file(str(result.path / "model.safetensors"))
    ours = apply(tmp_path / "model", plan, tmp_path / "ours", quiet=True, device="cpu")
    model = load_quantized(ours / "quantized", dtype=torch.float32)
    zero_points = 0
    for module in plan.modules:
        packed = model.get_submodule(module).quantized()
        zero_points += int((packed.zero_values() == 0).sum())
        theirs = gptq_reference(tensors, module, packed.config.bits, packed.shape)
        assert theirs.dtype == torch.float16
        assert torch.equal(theirs, packed.dequantize(torch.float32).half()), module
        assert f"{module}.weight" not in tensors
    assert zero_points > 0
