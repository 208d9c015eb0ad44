"""Data-aware profiling: activation statistics h, block-at-a-time runs, the weighted objective."""

import hashlib
import json
import math

import pytest
import torch
from _models import llama_module_names, make_tiny_gguf, make_tiny_llama

import bitalloc.profiling.collect as collect_module
from bitalloc.checkpoints.runnable import can_run
from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.evaluation import perplexity
from bitalloc.lora import loftq
from bitalloc.planning.planner import plan
from bitalloc.profiling.calibration import calibrate, collect_column_weights
from bitalloc.profiling.profiler import profile
from bitalloc.profiling.table import read_profile
from bitalloc.texts import calibration_text, evaluation_text, windows

NAMES = llama_module_names()
CONFIGS = ["nf2-b64-s8b256", "nf4-b128-s8b256"]
FAST = dict(configs=CONFIGS, rank=4, iters=2, quiet=True)


def calibration_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (6, 64), generator=torch.Generator().manual_seed(seed))


def direct_h(model, ids: torch.Tensor, damping: float = 0.01) -> dict[str, torch.Tensor]:
    """diag(XᵀX)/n + damping·mean from one whole-model forward with hooks on every Linear."""
    sums = {}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(dim=0)

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in NAMES]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    result = {}
    for name, total in sums.items():
        h = total / ids.numel()
        result[name] = (h + damping * h.mean()).float()
    return result


def assert_same_h(found: dict, expected: dict) -> None:
    assert sorted(found) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(
            found[name], expected[name], rtol=1e-5, atol=1e-7 * float(expected[name].max())
        )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    model = make_tiny_llama(directory, seed=1)
    return directory, model.eval()


def test_h_matches_a_direct_whole_model_computation(tiny_dir):
    _, model = tiny_dir
    ids = calibration_ids()
    result = calibrate(model, NAMES, input_ids=ids)
    assert_same_h(result.column_weights, direct_h(model, ids))
    assert result.info["tokens"] == ids.numel() and result.info["context"] == 64


def test_block_at_a_time_from_disk_equals_whole_model(tiny_dir, tmp_path):
    directory, model = tiny_dir
    ids = calibration_ids()
    expected = direct_h(model, ids)
    assert_same_h(calibrate(directory, input_ids=ids).column_weights, expected)
    gguf = tmp_path / "tiny.gguf"
    make_tiny_gguf(gguf, model)
    assert_same_h(calibrate(gguf, input_ids=ids).column_weights, expected)


def test_only_one_block_is_ever_in_memory(tiny_dir):
    """Built on the meta device, each block's weights are read when it runs and dropped after;
    the LM head (never needed) is never read."""
    from safetensors.torch import load_file

    from bitalloc.checkpoints.runnable import parameters_on_meta

    directory, model = tiny_dir
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    with parameters_on_meta():
        net = type(model)(model.config)
    reads, resident = [], []

    def load(name):
        reads.append(name)
        layers = {
            n.split(".")[2]
            for n, p in net.named_parameters()
            if n.startswith("model.layers.") and not p.is_meta
        }
        resident.append(len(layers))
        return state[name]

    ids = calibration_ids()
    found = collect_column_weights(net, ids, NAMES, load=load, batch_tokens=128)
    assert_same_h(found, direct_h(model, ids))
    assert max(resident) <= 1
    assert not any(name.startswith("lm_head") or name.startswith("model.norm") for name in reads)
    assert all(p.is_meta for p in net.parameters())  # everything released again


@pytest.fixture(scope="module")
def calibrated_profile(tiny_dir, tmp_path_factory):
    directory, _ = tiny_dir
    output = tmp_path_factory.mktemp("profile") / "profile.parquet"
    table = profile(directory, output, calibration_ids=calibration_ids(), objective="activation", **FAST)
    return table, output


def test_profile_with_calibration(calibrated_profile, tiny_dir):
    table, output = calibrated_profile
    assert table.attrs["objective"] == "activation"
    assert "weighted_error" in table.columns and bool((table["weighted_error"] > 0).all())
    info = read_profile(output).attrs["calibration"]
    assert sorted(p.name for p in output.parent.iterdir()) == ["profile.parquet"]  # no statistics on disk
    assert (info["tokens"], info["context"], info["text"]) == (6 * 64, 64, "input_ids")
    ids = calibration_ids()
    assert info["text_sha256"] == info["ids_sha256"] == hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    result = plan(table, 3.0)
    assert result.objective == "activation"
    chosen = table.set_index(["module", "config"]).loc[list(result.assignments.items()), "weighted_error"]
    assert result.total_error == pytest.approx(float(chosen.sum()), rel=1e-9)


def test_weighted_errors_agree_with_the_core(calibrated_profile, tiny_dir):
    from bitalloc.checkpoints import open_source
    from bitalloc.lora import module_seed

    table, output = calibrated_profile
    weights = calibrate(tiny_dir[0], NAMES, input_ids=calibration_ids()).column_weights
    source = open_source(tiny_dir[0])
    name, config = "model.layers.1.mlp.down_proj", CONFIGS[0]
    result = loftq(
        source.read(name), config, 4, 2, seed=module_seed(name, config), column_weights=weights[name]
    )
    row = table[(table.module == name) & (table.config == config)].iloc[0]
    assert row["weighted_error"] == pytest.approx(result.weighted_error, rel=1e-5)
    assert row["error"] == pytest.approx(result.error, rel=1e-5)


def test_calibrated_profile_resumes_and_calibrates_only_unfinished_blocks(
    calibrated_profile, tiny_dir, tmp_path, monkeypatch
):
    import bitalloc.profiling.profiler as profiler_module

    reference, _ = calibrated_profile
    output = tmp_path / "profile.parquet"
    real = profiler_module.decompose
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 8 * len(CONFIGS):  # block 0's 7 matrices and one of block 1 are done
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(profiler_module, "decompose", interrupted)
    with pytest.raises(KeyboardInterrupt):
        profile(tiny_dir[0], output, calibration_ids=calibration_ids(), objective="activation", **FAST)
    monkeypatch.setattr(profiler_module, "decompose", real)
    assert not output.exists()
    hooked: list[str] = []
    real_hooks = collect_module._Collector.hooks

    def hooks(self, block):
        hooked.extend(self.names)
        return real_hooks(self, block)

    monkeypatch.setattr(collect_module._Collector, "hooks", hooks)
    resumed = profile(tiny_dir[0], output, calibration_ids=calibration_ids(), objective="activation", **FAST)
    assert hooked == NAMES[8:]  # only the unfinished matrices' statistics were computed again
    for column in ("error", "weighted_error"):
        assert resumed[column].tolist() == pytest.approx(reference[column].tolist(), rel=1e-5)
    assert resumed.attrs["calibration"] == reference.attrs["calibration"]
    with pytest.raises(BitallocError, match="calibration"):  # other calibration tokens: no mixing
        profile(tiny_dir[0], output, calibration_ids=calibration_ids(seed=1), objective="activation", **FAST)
    with pytest.raises(BitallocError, match="calibration"):  # nor a weight-only profile
        profile(tiny_dir[0], output, **FAST)


def test_weighted_decomposition_lowers_the_output_error():
    """On inputs with skewed channel scales, weighting by h = diag(XᵀX)/n lowers the true
    output error ||(W - Ŵ) Xᵀ||² (not only the diagonal proxy) against plain LoftQ."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 256, generator=generator) * 0.02
    scales = torch.exp(1.5 * torch.randn(256, generator=generator))
    inputs = torch.randn(2048, 256, generator=generator) * scales
    h = inputs.square().mean(dim=0)
    plain = loftq(weight, "nf2-b64-s8b256", rank=16, iters=5, seed=1)
    weighted = loftq(weight, "nf2-b64-s8b256", rank=16, iters=5, seed=1, column_weights=h)

    def output_error(result):
        approx = result.q.dequantize() + result.lowrank()
        return float(((weight - approx) @ inputs.T).square().sum())

    plain_weighted = float(((weight - plain.q.dequantize() - plain.lowrank()).square() * h).sum())
    assert weighted.weighted_error < 0.8 * plain_weighted
    assert output_error(weighted) < 0.8 * output_error(plain)
    assert weighted.error > plain.error  # it trades weight error for output error


def test_unit_h_is_exactly_plain_loftq(tiny_dir):
    weight = tiny_dir[1].get_submodule(NAMES[0]).weight.detach()
    plain = loftq(weight, "nf3-b64-s8b256", rank=8, iters=3, seed=7)
    ones = loftq(
        weight, "nf3-b64-s8b256", rank=8, iters=3, seed=7, column_weights=torch.ones(weight.shape[1])
    )
    assert torch.equal(plain.lora_A, ones.lora_A) and torch.equal(plain.lora_B, ones.lora_B)
    assert torch.equal(plain.q.dequantize(), ones.q.dequantize())
    assert ones.weighted_error == plain.error and ones.errors == plain.errors
    unit = {name: torch.ones(tiny_dir[1].get_submodule(name).in_features) for name in NAMES}
    weighted = profile(tiny_dir[0], column_weights=unit, **FAST)
    assert weighted["weighted_error"].tolist() == weighted["error"].tolist()


def test_objective_resolution(tiny_dir, tmp_path):
    directory, model = tiny_dir
    assert not can_run(model) and not can_run(directory)  # no tokenizer files
    table = profile(directory, include=r"layers\.0\.mlp\.up_proj", objective="auto", **FAST)
    assert table.attrs["objective"] == "weight"
    output = tmp_path / "profile.parquet"
    with pytest.raises(BitallocError, match="no tokenizer"):
        profile(directory, output, include=r"up_proj", objective="activation", **FAST)
    assert not list(tmp_path.iterdir())  # refused before anything was written
    with pytest.raises(BitallocError, match="no tokenizer"):
        profile(model, include=r"up_proj", objective="activation", **FAST)
    with pytest.raises(BitallocError, match="objective 'weight'"):
        profile(directory, objective="weight", calibration_ids=calibration_ids(), **FAST)
    with pytest.raises(BitallocError, match="has 128 values, the matrix 256 columns"):
        profile(directory, column_weights={NAMES[0]: torch.ones(128)}, **FAST)  # down_proj: in 256
    with pytest.raises(BitallocError, match="no entry for model.layers.0.mlp.gate_proj"):
        profile(directory, column_weights={NAMES[0]: torch.ones(256)}, **FAST)


def byte_tokenizer(directory) -> None:
    """A 256-token byte-level tokenizer (ids = bytes) saved to ``directory``: text in, no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(directory)


def test_cli_profile_and_plan_with_calibration_text(tmp_path, capsys):
    model_dir = tmp_path / "model"
    make_tiny_llama(model_dir, seed=2)
    byte_tokenizer(model_dir)
    assert can_run(model_dir)
    text = tmp_path / "notes.txt"
    text.write_text(calibration_text()[:4000], encoding="utf-8")
    common = ["--configs", ",".join(CONFIGS), "--rank", "4", "--iters", "1", "--quiet"]
    out = tmp_path / "profile.parquet"
    args = [
        "profile",
        str(model_dir),
        "-o",
        str(out),
        "--calibration",
        str(text),
        "--calibration-tokens",
        "1024",
        "--objective",
        "activation",
    ]
    assert main(args + common) == 0
    attrs = read_profile(out).attrs
    assert attrs["objective"] == "activation"
    assert (attrs["calibration"]["text"], attrs["calibration"]["tokens"]) == ("notes.txt", 1024)
    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--profile", str(out), "--budget", "3", "-o", str(plan_path)]) == 0
    plan_data = json.loads(plan_path.read_text())
    assert plan_data["objective"] == "activation"
    # the plan records the text (path and sha256) and its token windows, no side file; apply
    # computes h again and rebuilds the weighted decomposition
    assert plan_data["calibration"]["text_path"] == str(text.resolve())
    assert plan_data["calibration"]["ids_sha256"] == attrs["calibration"]["ids_sha256"]
    assert not list(tmp_path.glob("*.safetensors"))
    assert (
        main(["apply", str(model_dir), "--plan", str(plan_path), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    )
    from safetensors.torch import load_file

    from bitalloc.checkpoints import open_source
    from bitalloc.lora import module_seed

    adapter = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    h = calibrate(model_dir, NAMES, text=text, tokens=1024).column_weights
    module = "model.layers.1.mlp.down_proj"
    config = plan_data["modules"][module]["config"]
    with open_source(model_dir) as source:
        weight = source.read(module)
    direct = loftq(weight, config, rank=4, iters=1, lora_alpha=4, seed=module_seed(module, config),
                   column_weights=h[module])  # fmt: skip
    key = f"base_model.model.{module}.lora_B.weight"
    assert torch.allclose(adapter[key], direct.lora_B, atol=1e-6)
    plain = loftq(weight, config, rank=4, iters=1, seed=module_seed(module, config))
    assert not torch.allclose(adapter[key], plain.lora_B, atol=1e-3)
    # an edited calibration text is refused before anything is written
    original = text.read_text(encoding="utf-8")
    text.write_text(original.replace("the", "a"), encoding="utf-8")
    assert main(["apply", str(model_dir), "--plan", str(plan_path), "-o", str(tmp_path / "out2")]) == 2
    assert "is not the plan's calibration text" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.partial").exists()
    text.write_text(original, encoding="utf-8")
    weight_plan = tmp_path / "weight.json"
    assert (
        main(
            [
                "plan",
                str(model_dir),
                "--budget",
                "3",
                "-o",
                str(weight_plan),
                "--objective",
                "weight",
                *common,
            ]
        )
        == 0
    )
    assert json.loads(weight_plan.read_text())["objective"] == "weight"
    assert (
        main(["profile", str(model_dir), "-o", str(tmp_path / "x.parquet"), "--calibration", "missing.txt"])
        == 2
    )
    assert "calibration text not found" in capsys.readouterr().err


def test_texts_are_disjoint_and_perplexity_is_the_mean_nll(tiny_dir):
    from pydoc_data.topics import topics

    calibration, evaluation = calibration_text(), evaluation_text()
    assert len(calibration) > 150_000 and len(evaluation) > 150_000
    calibration_paragraphs = {p.strip() for p in calibration.split("\n\n")}
    assert not any(p.strip() in calibration_paragraphs for p in evaluation.split("\n\n"))
    assert topics["yield"].split("\n\n")[-1] in evaluation  # the last topic's own text stays
    _, model = tiny_dir
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(3))
    nll, count = 0.0, 0
    for window in windows(ids, 128):  # two whole windows; the last 44 tokens are left out
        with torch.no_grad():
            loss = model(window.unsqueeze(0), labels=window.unsqueeze(0)).loss
        nll, count = nll + float(loss) * 127, count + 127
    assert perplexity(model, None, ids, context=128) == pytest.approx(math.exp(nll / count), rel=1e-5)
    with torch.no_grad():
        first_window = model(ids[None, :128], labels=ids[None, :128]).loss
    assert perplexity(model, None, ids, context=128, max_tokens=128) == pytest.approx(
        math.exp(float(first_window)), rel=1e-5
    )
