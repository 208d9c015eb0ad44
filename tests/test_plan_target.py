"""Planning in an export target's format (``plan --target``): only configs the target stores
exactly, each counted in the target's own storage, so the export is exact and its budget
re-check equals the plan's bits."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from bitalloc import BitallocError
from bitalloc.export import TargetFormat, exact_targets, export, target_format
from bitalloc.planning.budget import capacity_bits
from bitalloc.planning.pipeline import PlanConstraints, plan_files
from bitalloc.planning.plan_file import Plan
from bitalloc.planning.planner import feasible_range, plan, sweep
from bitalloc.quant import QuantConfig

TARGETS = ("gptqmodel", "autoround", "compressed-tensors", "torchao", "hqq")
SHAPES = {  # down_proj's 96 columns take groups of 32 (and 96), not 64 or 128
    "self_attn.q_proj": (128, 128),
    "self_attn.k_proj": (64, 128),
    "mlp.up_proj": (96, 128),
    "mlp.down_proj": (128, 96),
}
# What each export note that approximates starts with (`export._common.grid_notes`, torchao's NF).
APPROXIMATIONS = (
    "levels ->",
    "asymmetric integer groups",
    "scales (",
    "-mse scale search",
    "group size (",
    "rows not a multiple",
    "torchao's NF4",
)


def make_table(configs, seed=0, layers=2, shapes=SHAPES) -> pd.DataFrame:
    """A profile-like table (rank 0): error ~ numel·2^(-2·bits/param), scaled per matrix, noisy."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(layers):
        for kind, shape in shapes.items():
            scale = rng.lognormal(0.0, 1.0)
            for text in configs:
                config = QuantConfig.parse(text)
                error = (
                    scale * shape[0] * shape[1] * 2.0 ** (-2 * config.bits_per_param) * rng.uniform(0.7, 1.3)
                )
                rows.append({
                    "module": f"model.layers.{layer}.{kind}", "shape": list(shape),
                    "numel": shape[0] * shape[1], "config": str(config), "method": config.method,
                    "bits": config.bits, "block_size": config.block_size,
                    "bits_per_param": config.bits_per_param, "storage_bits": config.storage_bits(shape),
                    "error": error, "rel_error": math.sqrt(error / (shape[0] * shape[1])),
                    "qlora_error": error, "rank": 0, "iters": 0,
                })  # fmt: skip
    return pd.DataFrame(rows)


def target_total(plan_: Plan, target: str) -> int:
    """The target's own storage for the plan's matrices, summed."""
    fmt = target_format(target)
    return sum(
        fmt.storage_bits(QuantConfig.parse(entry.config), tuple(entry.shape))
        for entry in plan_.modules.values()
    )


def export_options(target: str) -> dict:
    return {"per_module": True} if target == "hqq" else {}


def check_exact_export(plan_: Plan, target: str):
    """export --to target: says exact, no approximation note, re-check bits == the plan's bits."""
    result = export(plan_, target, **export_options(target))
    assert any(note.startswith(f"exact: {target} stores the configs of all") for note in result.notes)
    approximations = [note for note in result.notes if note.startswith(APPROXIMATIONS)]
    assert approximations == []
    assert any("equal to the plan's bits" in note for note in result.notes), result.notes
    assert result.target_bits == plan_.achieved_bits  # the same float, not approximately
    return result


# ---- every target: plan in its format, export exactly ----------------------------------------------
def test_every_target_declares_an_exact_grid():
    assert set(exact_targets()) == {*TARGETS, "llamacpp"}


@pytest.mark.parametrize("target", TARGETS)
def test_plan_in_target_exports_exact(target):
    fmt = target_format(target)
    grid = fmt.grid((2, 3, 4, 8), (32, 64, 128))
    # a profile made for another purpose too: NF and plain-int rows are never candidates
    table = make_table([*grid, "nf4-b64-s8b256", "int3-b64-sfp16"], seed=len(target))
    low, high = feasible_range(table, target=fmt)
    for budget in (low + 0.3 * (high - low), low + 0.7 * (high - low)):
        result = plan(table, budget, target=fmt)
        for name, entry in result.modules.items():
            assert entry.config in grid
            assert fmt.why_not(QuantConfig.parse(entry.config), tuple(entry.shape)) is None
            if name.endswith("down_proj"):  # 96 columns: only the group that divides the row
                assert entry.block_size == 32
        total = target_total(result, target)
        assert result.target == {"name": target, "storage_bits": total}
        assert total <= capacity_bits(budget, sum(e.numel for e in result.modules.values()))
        check_exact_export(result, target)
        again = Plan.from_json(result.to_json())  # the record survives the file
        assert again.target == result.target
        check_exact_export(again, target)
    swept = sweep(table, [low, high], target=fmt)
    assert [p.target["storage_bits"] for p in swept] == [target_total(p, target) for p in swept]
    assert swept[1].achieved_bits == pytest.approx(high, abs=1e-6)
    for result in swept:
        check_exact_export(result, target)


def test_target_storage_differs_from_bitalloc_and_is_what_the_plan_counts():
    """GPTQ counts int32 g_idx per column: a plan of the same configs made without --target is
    exact in format, but its bits were bitalloc's, and the re-check says by how much."""
    fmt = target_format("gptqmodel")
    table = make_table(fmt.grid((2, 4), (32, 64)))
    low, high = feasible_range(table, target=fmt)
    budget = (low + high) / 2
    plain = plan(table, budget)
    assert plain.target is None
    result = export(plain, "gptqmodel")
    assert any("the plan's budget counted bitalloc's storage" in note for note in result.notes)
    assert not any(note.startswith(APPROXIMATIONS) for note in result.notes)
    numel = sum(e.numel for e in plain.modules.values())
    g_idx = 32 * sum(e.shape[1] for e in plain.modules.values())
    assert target_total(plain, "gptqmodel") == sum(e.storage_bits for e in plain.modules.values()) + g_idx
    assert result.target_bits == pytest.approx(plain.achieved_bits + g_idx / numel, abs=2e-6)
    # a plan that is not exact keeps today's notes
    nf = plan(make_table(["nf4-b64-s8b256", "nf2-b64-s8b256"]), 3.5)
    notes = export(nf, "gptqmodel").notes
    assert any(note.startswith("levels ->") for note in notes)
    assert not any(note.startswith("exact:") for note in notes)


# ---- the ILP with the target's accounting is optimal -----------------------------------------------
def brute_force(table: pd.DataFrame, budget: float, fmt) -> float | None:
    """Least total error over every assignment of exact configs within the budget, in the
    target's storage; None if none fits."""
    modules = list(dict.fromkeys(table["module"]))
    options = []
    for module in modules:
        rows = table[table["module"] == module]
        choice = []
        for row in rows.itertuples():
            config = QuantConfig.parse(row.config)
            if fmt.why_not(config, tuple(row.shape)) is None:
                choice.append((fmt.storage_bits(config, tuple(row.shape)), row.error))
        options.append(choice)
    numel = sum(int(table[table["module"] == m]["numel"].iloc[0]) for m in modules)
    capacity = capacity_bits(budget, numel)
    best = None
    for combo in itertools.product(*options):
        if sum(storage for storage, _ in combo) <= capacity:
            total = math.fsum(error for _, error in combo)
            best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("solver", ["cbc", "dp"])
def test_target_optimum_equals_brute_force(solver):
    fmt = target_format("gptqmodel")
    configs = [*fmt.grid((2, 3, 4), (32, 64)), "uint4-b64-sfp16-z4", "nf3-b64-sfp16"]
    table = make_table(configs, seed=3, layers=1)
    low, high = feasible_range(table, target=fmt)
    numel = sum(SHAPES[k][0] * SHAPES[k][1] for k in SHAPES)
    differs = 0
    for fraction in (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95):
        budget = low + fraction * (high - low)
        result = plan(table, budget, solver=solver, target=fmt)
        best = brute_force(table, budget, fmt)
        assert result.total_error == pytest.approx(best, rel=1e-12)
        assert result.target["storage_bits"] <= capacity_bits(budget, numel)
        # the optimum in bitalloc's accounting (the same exact configs) breaks the target's budget
        exact_rows = table[[c.startswith("uint") for c in table["config"]]]
        plain = plan(exact_rows, budget, solver=solver)
        differs += target_total(plain, "gptqmodel") > capacity_bits(budget, numel)
    assert differs > 0  # the accounting matters on this case: the test can tell


# ---- refusals: one clear line each ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from _models import make_tiny_llama

    folder = tmp_path_factory.mktemp("target") / "model"
    make_tiny_llama(folder, shard_size=None, intermediate_size=96)
    return folder


def test_a_config_the_target_does_not_store_is_refused(tiny_model, tmp_path):
    gptq = PlanConstraints(target=target_format("gptqmodel"))
    for configs, words in (
        (
            ["uint4-b64-sfp16-z4", "nf4-b64-s8b256"],
            "config 'nf4-b64-s8b256' is not stored exactly by gptqmodel",
        ),
        (["uint4-b64-sbf16-z4"], "bf16 scales; gptqmodel stores fp16 scales"),
        (["uint4-b256-sfp16-z4"], "group size 256; gptqmodel takes group sizes 16, 32, 64, 128"),
        (["uint4-b64-sfp16-zfp16"], "gptqmodel stores an integer zero point"),
    ):
        with pytest.raises(BitallocError, match=words.replace("(", r"\(")) as info:
            plan_files(tiny_model, budget=4, output=tmp_path / "p.json", constraints=gptq, configs=configs)
        assert "\n" not in str(info.value)
    hqq = PlanConstraints(target=target_format("hqq"))
    with pytest.raises(BitallocError, match="stores a float zero point"):
        plan_files(
            tiny_model, budget=4, output=tmp_path / "p.json", constraints=hqq, configs=["uint4-b64-sfp16-z4"]
        )
    with pytest.raises(BitallocError, match="chooses the format"):
        plan_files(tiny_model, budget=4, output=tmp_path / "p.json", constraints=gptq, methods=["int"])
    with pytest.raises(BitallocError, match="group size 256"):
        plan_files(tiny_model, budget=4, output=tmp_path / "p.json", constraints=gptq, block_sizes=[256])
    with pytest.raises(BitallocError, match="cannot count LoRA factors"):
        plan_files(tiny_model, budget=4, output=tmp_path / "p.json", constraints=PlanConstraints(
            count_lora=True, target=target_format("torchao")))  # fmt: skip
    assert not (tmp_path / "p.json").exists()
    assert not (tmp_path / ".bitalloc-cache").exists()  # refused before profiling


def test_planner_refusals():
    fmt = target_format("gptqmodel")
    config = QuantConfig.parse("uint4-b16-sfp16-z4")
    assert fmt.why_not(config, (64, 80)).endswith("int32 words: multiples of 32")  # 80 = 5 groups of 16
    assert target_format("compressed-tensors").why_not(config, (64, 80)) is None  # pads its words
    table = make_table(fmt.grid((2, 4), (32, 64)))
    with pytest.raises(BitallocError, match="cannot count LoRA factors"):
        plan(table, 4, target=fmt, count_lora=True)
    with pytest.raises(BitallocError, match="'nf4-b64-sfp16' is not stored exactly by gptqmodel"):
        plan(
            make_table([*fmt.grid((4,), (64,)), "nf4-b64-sfp16"]),
            5,
            target=fmt,
            pin={"q_proj": "nf4-b64-sfp16"},
        )
    with pytest.raises(BitallocError, match=r"infeasible: .* is 8\.\d+ to 8\.75 in torchao's storage"):
        plan(make_table(target_format("torchao").grid((2, 4), (32, 64))), 4, target=target_format("torchao"))
    with pytest.raises(BitallocError, match="target must be a TargetFormat"):
        plan(table, 4, target="gptqmodel")
    # a profile whose only configs for the 96-column matrices need groups of 64
    with pytest.raises(
        BitallocError, match=r"no profiled config of 'model.layers.0.mlp.down_proj' \(shape 128x96\)"
    ):
        plan(make_table(["uint4-b64-sfp16-z4-mse"]), 5, target=fmt)
    ggml = target_format("llamacpp")  # the ggml types whose block divides the row
    assert ggml.why_not(QuantConfig.parse("ggml4-b32-s0"), (128, 96)) is None
    assert "not a multiple of its block 256" in ggml.why_not(QuantConfig.parse("ggml4-b256-sk"), (128, 96))
    assert "not nf levels" in ggml.why_not(QuantConfig.parse("nf4-b64-sfp16"))
    with pytest.raises(BitallocError, match="unknown target 'nope'"):
        target_format("nope")


# ---- the command line, end to end -------------------------------------------------------------------
def run_cli(folder, *args: str) -> tuple[int, str, str]:
    from bitalloc.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(folder), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def test_cli_plan_target_then_export_is_exact(tiny_model, tmp_path):
    code, out, err = run_cli(
        tmp_path, "plan", str(tiny_model), "--budget", "4.3", "--target", "gptqmodel", "--bits", "2,4",
        "--quiet", "-o", "plan.json",
    )  # fmt: skip
    assert code == 0, err
    assert "(LoRA not counted, in gptqmodel's storage)" in out
    # the summary's uniform baseline is also in GPTQ's storage, among configs exact on every matrix:
    # 4-bit groups of 32 (the only ones that divide down_proj's 96 columns) cost 4.625 + g_idx > 4.3
    assert "best uniform config within 4.3 bits: uint2-b32-sfp16-z2-mse" in out
    result = Plan.load(tmp_path / "plan.json")
    assert result.defaults["rank"] == 0  # the target stores no LoRA correction
    grid = target_format("gptqmodel").grid((2, 4), (32, 64, 128))
    assert {entry.config for entry in result.modules.values()} <= set(grid)
    assert result.target == {"name": "gptqmodel", "storage_bits": target_total(result, "gptqmodel")}
    assert result.achieved_bits == float(round(Fraction(result.target["storage_bits"], sum(
        e.numel for e in result.modules.values())), 6))  # fmt: skip
    code, _, err = run_cli(tmp_path, "export", "plan.json", "--to", "gptqmodel", "-o", "gptq.json")
    assert code == 0, err
    notes = [
        line.removeprefix("bitalloc: note: ")
        for line in err.splitlines()
        if line.startswith("bitalloc: note:")
    ]
    assert any(note.startswith("exact: gptqmodel") for note in notes)
    assert not any(note.startswith(APPROXIMATIONS) for note in notes)
    assert (
        f"{result.achieved_bits!r} bits/param for the plan's 14 quantized matrices, equal to the plan's bits"
        in err
    )
    payload = json.loads((tmp_path / "gptq.json").read_text())
    assert payload["meta"]["bitalloc"]["target_bits"] == result.achieved_bits
    assert payload["sym"] is False
    # llama.cpp: rows of 96 and 128 take only the block-32 types, 4.5 bits at least
    code, out, err = run_cli(
        tmp_path, "plan", str(tiny_model), "--budget", "4", "--target", "llamacpp", "--quiet", "-o", "x.json"
    )
    assert code == 2 and out == "" and err.count("\n") == 1 and "infeasible" in err
    code, out, err = run_cli(
        tmp_path, "plan", str(tiny_model), "--budget", "5", "--target", "llamacpp", "--quiet", "-o", "g.json"
    )
    assert code == 0, err
    ggml_plan = Plan.load(tmp_path / "g.json")
    assert {entry.config.split("-")[0] for entry in ggml_plan.modules.values()} <= {"ggml4", "ggml5", "ggml8"}
    code, _, err = run_cli(tmp_path, "export", "g.json", "--to", "llamacpp", "-o", "types.txt")
    assert code == 0, err
    assert "bitalloc: note: exact: llamacpp stores the configs" in err
    assert f"{ggml_plan.achieved_bits!r} bits/param" in err and "equal to the plan's bits" in err
    code, _, err = run_cli(
        tmp_path,
        "plan",
        str(tiny_model),
        "--budget",
        "4",
        "--target",
        "torchao",
        "--configs",
        "nf4-b64-s8b256",
    )
    assert code == 2 and err.startswith(
        "bitalloc: error: config 'nf4-b64-s8b256' is not stored exactly by torchao"
    )


# ---- any target can declare an exact grid (the way llama.cpp's types will) --------------------------
class SymmetricInt8(TargetFormat):
    """A toy target storing ``int8-b{B}-sfp16`` with B dividing the row: a byte per weight and an
    fp16 scale per block, plus a 64-bit header per matrix (so its storage is not bitalloc's)."""

    name = "toy-exact-int8"
    description = "int8-b<B>-sfp16 with B dividing the row"

    def why_not(self, config, shape=None):
        if (config.method, config.bits, config.scale_dtype, config.scale_bits) != ("int", 8, "fp16", None):
            return "the toy stores int8 with fp16 scales only"
        if shape is not None and shape[1] % config.block_size:
            return "partial blocks"
        return None

    def storage_bits(self, config, shape):
        return shape[0] * shape[1] * 8 + shape[0] * (shape[1] // config.block_size) * 16 + 64

    def grid(self, bits, block_sizes):
        return [f"int8-b{block}-sfp16" for block in block_sizes]


def test_a_registered_target_declares_its_exact_grid():
    from bitalloc.export import Translation, register_target
    from bitalloc.export._common import begin, finish

    toy = SymmetricInt8()

    def translate(plan_: Plan) -> Translation:
        mats, notes = begin(plan_, toy.name, exact=toy)
        storage = {m.name: toy.storage_bits(m.config, (m.rows, m.columns)) for m in mats}
        return finish(
            plan_, mats, notes, toy.name, lambda m: storage[m.name], {m.name: str(m.config) for m in mats}
        )

    if toy.name not in exact_targets():
        register_target(toy.name, translate, exact=toy)
    assert target_format(toy.name) is toy
    with pytest.raises(BitallocError, match="exact must be a TargetFormat named 'toy-other'"):
        register_target("toy-other", translate, exact=toy)
    table = make_table(["int8-b32-sfp16", "int8-b64-sfp16", "int8-b128-sfp16", "nf4-b64-sfp16"])
    low, high = feasible_range(table, target=toy)
    result = plan(table, (low + high) / 2, target=toy)
    assert {e.config for e in result.modules.values()} <= {
        "int8-b32-sfp16",
        "int8-b64-sfp16",
        "int8-b128-sfp16",
    }
    assert result.target["storage_bits"] == sum(
        toy.storage_bits(QuantConfig.parse(e.config), tuple(e.shape)) for e in result.modules.values()
    )
    exported = export(result, toy.name)
    assert exported.notes[0].startswith(f"exact: {toy.name} stores the configs of all 8 matrices")
    assert exported.target_bits == result.achieved_bits


def test_scales_in_the_models_dtype_are_one_dtype_per_plan(tiny_model, tmp_path):
    """compressed-tensors, torchao and HQQ store scales in the model's dtype: fp16 or bf16 configs are
    each exact, a plan mixing them is not (and the exact note says which dtype to run)."""
    ct = target_format("compressed-tensors")
    fp16, bf16 = "uint4-b64-sfp16-z4-mse", "uint4-b32-sbf16-z4-mse"
    with pytest.raises(BitallocError, match="scales in bf16 and fp16: compressed-tensors stores every scale"):
        plan_files(
            tiny_model, budget=5, output=tmp_path / "p.json", constraints=PlanConstraints(target=ct),
            configs=[fp16, bf16],
        )  # fmt: skip
    table = make_table([fp16, bf16, "uint4-b32-sfp16-z4-mse"], shapes={"mlp.up_proj": (96, 128)})
    with pytest.raises(BitallocError, match="not stored exactly together"):
        plan(table, 5, target=ct)
    with pytest.raises(BitallocError, match="not stored exactly together"):
        plan(table, 5, target=ct, pin={"layers.0": fp16, "layers.1": bf16})
    mixed = plan(table, 5, pin={"layers.0": fp16, "layers.1": bf16})  # without --target: each one exact
    notes = export(mixed, "compressed-tensors").notes
    assert not any(note.startswith("exact:") for note in notes)
    assert any(note.startswith("scales (sbf16-z4-mse, sfp16-z4-mse)") for note in notes)
    one = plan(table, 5, target=ct, pin={"layers": fp16})
    exact = check_exact_export(one, "compressed-tensors").notes
    assert any("stores scales in the model's dtype: run the model in fp16" in note for note in exact)
    # GPTQ's scales are fp16 whatever the model: no condition
    gptq = plan(
        make_table(target_format("gptqmodel").grid((4,), (32,))), 5, target=target_format("gptqmodel")
    )
    assert not any("model's dtype" in note for note in check_exact_export(gptq, "gptqmodel").notes)
