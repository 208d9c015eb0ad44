"""`bitalloc eval`: perplexity, KL to the original and top-1 agreement of a plan's LoftQ and
QLoRA starts, streamed one block at a time; embedding cosine for the demo encoder."""

import json
import math

import pytest
import torch
from _models import make_tiny_llama
from transformers import AutoTokenizer, LlamaForCausalLM

import bitalloc
from bitalloc.artifacts.writer import apply
from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.evaluation import evaluate, evaluation_sentences, perplexity
from bitalloc.lora import loftq, module_seed
from bitalloc.planning.plan_file import Plan
from bitalloc.planning.planner import plan
from bitalloc.profiling.calibration import calibrate
from bitalloc.quant import QuantizedTensor
from bitalloc.texts import evaluation_text, tokenize, windows

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = ["nf2-b64-s8b256", "nf8-b64-s8b256"]
TOKENS, CONTEXT = 1024, 128  # 8 windows
# A random llama with larger weights than the default init (0.02), so that its next-token
# distributions are not flat and quantization moves them measurably.
INIT = 0.05


def byte_tokenizer(directory) -> None:
    """A 256-token byte-level tokenizer (ids = bytes) saved to ``directory``: no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(directory)


def make_model(directory, **overrides):
    make_tiny_llama(directory, seed=1, initializer_range=INIT, **overrides)
    byte_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama with a tokenizer; plans (all 2-bit / all 8-bit) from a weight-only and a
    data-aware profile, saved as files."""
    root = tmp_path_factory.mktemp("eval")
    model_dir = make_model(root / "model")
    plans = {}
    for objective, extra in (("weight", {}), ("activation", {"calibration_tokens": 1024})):
        table = bitalloc.profile(
            str(model_dir), root / f"{objective}.parquet", configs=CONFIGS, rank=8, iters=2, quiet=True,
            objective=objective, **extra,
        )  # fmt: skip
        for name, budget in (("2bit", 2.2), ("8bit", 8.2)):
            path = root / f"{objective}-{name}.json"
            plan(table, budget).save(path)
            plans[objective, name] = path
    return {"root": root, "model": model_dir, "plans": plans}


def run(tiny, plan_path, **kwargs):
    return evaluate(str(tiny["model"]), plan_path, tokens=TOKENS, context=CONTEXT, **kwargs)


def test_8bit_plan_is_close_to_the_original(tiny, tmp_path):
    out = tmp_path / "eval.json"
    result = run(tiny, tiny["plans"]["weight", "8bit"], output=out)
    assert result["data"]["tokens"] == 8 * (CONTEXT - 1) and result["data"]["windows"] == 8
    base = result["results"]["original"]["perplexity"]
    for variant in ("loftq", "qlora"):
        row = result["results"][variant]
        assert 0 <= row["kl_mean"] < 1e-3
        assert row["kl_mean"] <= row["kl_p99"] <= row["kl_max"]
        assert abs(row["perplexity"] / base - 1) < 0.005
        assert row["ppl_ratio"] == pytest.approx(row["perplexity"] / base, rel=1e-9)
        assert row["top1_agreement"] > 0.9
    # strict JSON (no NaN/Infinity) holding the same numbers
    saved = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert saved["results"] == result["results"] and saved["format"] == "bitalloc.eval/v1"
    assert saved["plan"]["configs"] == {"nf8-b64-s8b256": 14} and saved["model"]["kind"] == "causal-lm"


def test_loftq_start_is_closer_than_qlora_at_2_bits(tiny):
    result = run(tiny, tiny["plans"]["weight", "2bit"])["results"]
    loftq_kl, qlora_kl = result["loftq"]["kl_mean"], result["qlora"]["kl_mean"]
    assert qlora_kl > 0.05  # 2 bits move the distributions: the 8-bit bound above can fail
    assert loftq_kl < 0.8 * qlora_kl
    assert result["loftq"]["perplexity"] < result["qlora"]["perplexity"]


def whole_model_numbers(model_dir, plan_path, ids: torch.Tensor) -> dict:
    """The same numbers from the whole model in memory: W <- Q + B·A (LoftQ, with the plan's
    h) or Q (QLoRA) in every planned Linear, logits of each window in float64."""
    saved = Plan.load(plan_path)
    record = saved.calibration  # the plan's h, computed independently of eval's block stepping
    h = calibrate(
        model_dir, list(saved.modules), tokens=record["tokens"], context=record["context"]
    ).column_weights
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    original = {name: model.get_submodule(name).weight.detach().clone() for name in saved.modules}
    starts = {"loftq": {}, "qlora": {}}
    for name, entry in saved.modules.items():
        weight = original[name]
        result = loftq(
            weight, entry["config"], rank=entry["rank"], iters=saved.defaults["iters"],
            seed=module_seed(name, entry["config"]), column_weights=h[name],
        )  # fmt: skip
        starts["loftq"][name] = result.q.dequantize() + result.lowrank()
        starts["qlora"][name] = QuantizedTensor.from_weight(weight, entry["config"]).dequantize()

    def log_probs(weights):
        for name, weight in weights.items():
            model.get_submodule(name).weight.data.copy_(weight)
        with torch.no_grad():
            return [torch.log_softmax(model(w[None]).logits[0, :-1].double(), -1) for w in ids]

    reference = log_probs(original)
    numbers = {"original": _nll_ppl(reference, ids)}
    for variant, weights in starts.items():
        logp = log_probs(weights)
        kl = torch.cat([(r.exp() * (r - q)).sum(-1) for r, q in zip(reference, logp)])
        agree = torch.cat([(r.argmax(-1) == q.argmax(-1)) for r, q in zip(reference, logp)])
        numbers[variant] = {
            **_nll_ppl(logp, ids), "kl_mean": float(kl.mean()), "kl_p99": float(torch.quantile(kl, 0.99)),
            "kl_max": float(kl.max()), "top1_agreement": float(agree.double().mean()),
        }  # fmt: skip
    return numbers


def _nll_ppl(logp, ids) -> dict:
    nll = torch.cat([-lp.gather(-1, w[1:, None])[:, 0] for lp, w in zip(logp, ids)])
    return {"nll": float(nll.mean()), "perplexity": math.exp(float(nll.mean()))}


def test_streamed_eval_equals_whole_model_in_memory(tiny, tmp_path):
    """A data-aware plan (its h computed again in step with eval's own run of the blocks),
    streamed block by block and window by window,
    against a whole-model computation written independently."""
    plan_path = tiny["plans"]["activation", "2bit"]
    first = run(tiny, plan_path, output=tmp_path / "a.json")
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    ids = windows(tokenize(tokenizer, evaluation_text(), TOKENS), CONTEXT)
    expected = whole_model_numbers(tiny["model"], plan_path, ids)
    for variant, numbers in expected.items():
        for key, value in numbers.items():
            assert first["results"][variant][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (variant, key)
    assert first["results"]["qlora"]["kl_mean"] > 0.05
    # the existing in-memory perplexity agrees on the original
    model = LlamaForCausalLM.from_pretrained(tiny["model"]).eval()
    assert first["results"]["original"]["perplexity"] == pytest.approx(
        perplexity(model, None, ids.reshape(-1), context=CONTEXT), rel=1e-5
    )
    # deterministic: a second run writes the same bytes
    run(tiny, plan_path, output=tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_eval_of_an_applied_folder_equals_the_plan_eval(tiny, tmp_path):
    plan_path = tiny["plans"]["weight", "2bit"]
    moved = Plan.load(plan_path)
    moved.model["source"] = str(tmp_path / "moved-away")  # the recorded model is gone
    out = apply(str(tiny["model"]), moved, tmp_path / "out", quiet=True)
    with pytest.raises(BitallocError, match="--reference"):
        evaluate(out, tokens=TOKENS, context=CONTEXT)
    applied = evaluate(out, reference=str(tiny["model"]), tokens=TOKENS, context=CONTEXT)
    planned = run(tiny, plan_path)
    assert applied["plan"]["applied"] and not planned["plan"]["applied"]
    for variant in ("original", "loftq", "qlora"):
        for key, value in planned["results"][variant].items():
            assert applied["results"][variant][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (
                variant,
                key,
            )


def test_tied_embeddings_are_read_under_their_twin_name(tmp_path):
    """A checkpoint with tied embeddings has no lm_head.weight: the head reads embed_tokens."""
    model_dir = make_model(tmp_path / "tied", tie_word_embeddings=True)
    table = bitalloc.profile(
        str(model_dir), configs=CONFIGS[1:], rank=4, iters=1, quiet=True, objective="weight"
    )
    result = evaluate(str(model_dir), plan(table, 8.2), tokens=512, context=CONTEXT)
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenize(AutoTokenizer.from_pretrained(model_dir), evaluation_text(), 512)
    expected = perplexity(model, None, ids, context=CONTEXT)
    assert result["results"]["original"]["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_demo_encoder_cosine_of_mean_pooled_embeddings():
    table = bitalloc.profile(None, configs=CONFIGS, rank=4, iters=1, quiet=True, include=r"layer\.[0-2]\.")
    low = evaluate(None, plan(table, 2.2), tokens=200)
    high = evaluate(None, plan(table, 8.2), tokens=200)
    assert low["model"] == {"source": "demo:all-MiniLM-L6-v2", "kind": "encoder"}
    assert low["data"]["sentences"] >= 6 and low["data"]["tokens"] >= 200
    assert low["plan"]["matrices"] == 18
    assert high["results"]["loftq"]["cosine_mean"] > 0.999 and high["results"]["qlora"]["cosine_min"] > 0.99
    two = low["results"]
    assert two["qlora"]["cosine_mean"] < 0.9  # 2 bits everywhere wreck this small encoder
    assert two["loftq"]["cosine_mean"] > two["qlora"]["cosine_mean"]
    assert two["loftq"]["cosine_min"] <= two["loftq"]["cosine_p01"] <= two["loftq"]["cosine_mean"] <= 1


def test_evaluation_sentences_are_prose():
    text = (
        "Intro line. Not enough\n\n    code = example(1, 2)  # indented code\n\n"
        "The first sentence is long enough here. And a second sentence follows it now! Too short."
    )
    assert evaluation_sentences(text) == [
        "The first sentence is long enough here.",
        "And a second sentence follows it now!",
    ]
    sentences = evaluation_sentences(evaluation_text())
    assert len(sentences) > 200 and len(set(sentences)) == len(sentences)


# ---- the command line ----------------------------------------------------------------------


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_cli_eval_writes_the_default_file_and_prints_a_table(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    plan_path = tiny["plans"]["weight", "8bit"]
    args = ["eval", str(tiny["model"]), "--plan", str(plan_path), "--tokens", "512", "--context", "128"]
    assert main([*args, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "508 tokens scored (4 windows of 128)" in printed
    assert all(word in printed for word in ("original", "loftq", "qlora", "KL mean", "eval.json"))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["data"]["tokens"] == 508 and saved["results"]["loftq"]["kl_mean"] < 1e-3


def test_cli_eval_bad_input_is_one_error_line(tiny, tmp_path, capsys):
    model = str(tiny["model"])
    plan_path = str(tiny["plans"]["weight", "2bit"])
    other = make_tiny_llama(tmp_path / "other", hidden_size=64, intermediate_size=128)
    byte_tokenizer(tmp_path / "other")
    del other
    capsys.readouterr()  # the progress bar of writing the model
    cases = [
        (["eval", model, "--plan", str(tmp_path / "missing.json")], "cannot read plan"),
        (["eval", str(tmp_path / "other"), "--plan", plan_path], "shape mismatch"),
        (["eval", model], "give a plan"),
        (["eval", model, "--plan", plan_path, "-o", plan_path], "overwrite the plan"),
        (["eval", model, "--plan", plan_path, "--context", "1"], "context"),
    ]
    for args, message in cases:
        assert main([*args, "--quiet"]) == 2, args
        lines = error_lines(capsys)
        assert len(lines) == 1 and lines[0].startswith("bitalloc: error:") and message in lines[0], lines
    assert json.loads((tiny["plans"]["weight", "2bit"]).read_text())["format"] == "bitalloc.plan/v2"
