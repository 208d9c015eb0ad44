"""Per-matrix loss coefficients by noise injection: streamed variants against whole-model runs."""

import math

import pytest
import torch
from _models import llama_module_names, make_tiny_llama

import bitalloc.profiling.sensitivity as sensitivity
from bitalloc.checkpoints.runnable import run_model, runnable
from bitalloc.errors import BitallocError
from bitalloc.profiling.sensitivity import layer_coefficients
from bitalloc.quant import fake_quantize

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = llama_module_names()
INIT = 0.05  # larger weights than the default init: peaked next-token distributions


def residual(name: str, weight: torch.Tensor) -> torch.Tensor:
    return weight - fake_quantize(weight, "nf3-b64-s8b256")


def scaled(factor: float):
    return lambda name, weight: factor * residual(name, weight)


def token_ids(rows: int = 3, context: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (rows, context), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny 2-block llama saved as an HF folder, and the same model in memory."""
    directory = tmp_path_factory.mktemp("sensitivity")
    model = make_tiny_llama(directory, seed=1, initializer_range=INIT)
    return str(directory), model.eval()


def direct(model, ids: torch.Tensor, name: str, delta: torch.Tensor) -> tuple[float, float]:
    """(mean ‖delta·x‖² over the tokens, mean KL(original ‖ W + delta) over every position),
    from whole-model forward passes, written independently of the streamed code."""
    linear = model.get_submodule(name)
    inputs = []
    handle = linear.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    with torch.no_grad():
        reference = torch.log_softmax(model(ids).logits.double(), dim=-1)
    handle.remove()
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs]).double()
    error = float((x @ delta.double().T).square().sum(dim=1).mean())
    saved = linear.weight.detach().clone()
    try:
        with torch.no_grad():
            linear.weight += delta
            changed = torch.log_softmax(model(ids).logits.double(), dim=-1)
    finally:
        with torch.no_grad():
            linear.weight.copy_(saved)
    kl = (reference.exp() * (reference - changed)).sum(dim=-1)
    return error, float(kl.mean())


def head_checks(monkeypatch) -> list[bool]:
    """Records whether the output layer was found computable in chunks (`_Head`'s check)."""
    found = []
    check = sensitivity._same
    monkeypatch.setattr(sensitivity, "_same", lambda *args: found.append(check(*args)) or found[-1])
    return found


def test_streamed_run_equals_a_whole_model_computation(tiny, monkeypatch):
    """One size, a matrix in each block, streamed from the folder (meta-device skeleton)."""
    folder, model = tiny
    ids, alpha = token_ids(), 0.7
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.v_proj"]
    checks = head_checks(monkeypatch)
    result = layer_coefficients(folder, names, residual, input_ids=ids, sizes=[alpha])
    assert checks == [True]  # llama's logits are its output Linear's: computed in chunks
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        error, kl = direct(model, ids, name, alpha * residual(name, weight.clone()))
        assert kl > 1e-4 and error > 1e-3  # the perturbation moves the model measurably
        [(found_error, found_kl)] = result.points[name]
        assert found_error == pytest.approx(error, rel=1e-5)
        assert found_kl == pytest.approx(kl, rel=1e-5)
        assert result.coefficients[name] == pytest.approx(kl / error, rel=2e-5)
    assert result.info["method"] == "noise-injection-kl"
    assert result.info["tokens"] == ids.numel() and result.info["context"] == 32
    assert result.info["sizes"] == [alpha] and result.info["passes"] == 1


def test_zero_residual_gives_exactly_zero(tiny):
    _, model = tiny

    def zero_one(name, weight):
        return torch.zeros_like(weight) if "up_proj" in name else residual(name, weight)

    names = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    result = layer_coefficients(model, names, zero_one, input_ids=token_ids())
    assert result.coefficients[names[0]] == 0.0
    assert result.points[names[0]] == [(0.0, 0.0), (0.0, 0.0)]
    assert result.coefficients[names[1]] > 0


def test_coefficient_does_not_depend_on_the_noise_scale(tiny):
    """KL ∝ e for small noise: c_m barely moves when E doubles, and with tiny noise KL/e is
    the same at both sizes; e itself scales exactly with α²."""
    _, model = tiny
    ids = token_ids()
    names = ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.gate_proj"]
    one = layer_coefficients(model, names, residual, input_ids=ids)
    two = layer_coefficients(model, names, scaled(2.0), input_ids=ids)
    tiny_noise = layer_coefficients(model, names, scaled(0.05), input_ids=ids)
    for name in names:
        assert two.coefficients[name] == pytest.approx(one.coefficients[name], rel=0.2)
        (e_half, kl_half), (e_full, kl_full) = tiny_noise.points[name]
        assert e_full / e_half == pytest.approx(4.0, rel=1e-5)
        assert kl_full / e_full == pytest.approx(kl_half / e_half, rel=0.02)
        assert two.points[name][1][0] == pytest.approx(4 * one.points[name][1][0], rel=1e-5)
    # the two matrices differ: the coefficient is not one number for the whole model
    assert not one.coefficients[names[0]] == pytest.approx(one.coefficients[names[1]], rel=0.2)


def test_deterministic_streamed_equals_in_memory_and_passes_agree(tiny, monkeypatch):
    folder, model = tiny
    ids = token_ids()
    first = layer_coefficients(folder, NAMES, residual, input_ids=ids)
    second = layer_coefficients(folder, NAMES, residual, input_ids=ids)
    assert first.coefficients == second.coefficients and first.points == second.points
    assert all(c > 0 for c in first.coefficients.values())
    in_memory = layer_coefficients(model, NAMES, residual, input_ids=ids)
    for name in NAMES:
        assert in_memory.coefficients[name] == pytest.approx(first.coefficients[name], rel=1e-5)
    # a small memory budget: 2 matrices (and the original) per pass; a 32-token batch per block run
    monkeypatch.setattr(sensitivity, "MEMORY_BUDGET", 5 * ids.numel() * 128 * 4)
    monkeypatch.setattr(sensitivity, "BATCH_TOKENS", 32)
    split = layer_coefficients(folder, NAMES, residual, input_ids=ids)
    assert split.info["passes"] == 7
    for name in NAMES:
        assert split.coefficients[name] == pytest.approx(first.coefficients[name], rel=1e-6)
        for (e, kl), (e0, kl0) in zip(split.points[name], first.points[name]):
            assert e == pytest.approx(e0, rel=1e-6) and kl == pytest.approx(kl0, rel=1e-6)


def test_a_model_that_transforms_its_logits_is_measured_on_them(monkeypatch):
    """Gemma-2 soft-caps its logits after the output Linear: KL is of the capped ones."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(2)
    config = Gemma2Config(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, final_logit_softcapping=2.0, initializer_range=INIT,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config).eval()
    ids, name = token_ids(2, 24), "model.layers.1.mlp.down_proj"
    checks = head_checks(monkeypatch)
    result = layer_coefficients(model, [name], residual, input_ids=ids, sizes=[1.0])
    assert checks == [False]  # the model's own (capped) logits are used
    error, kl = direct(model, ids, name, residual(name, model.get_submodule(name).weight.detach().clone()))
    assert result.points[name][0] == pytest.approx((error, kl), rel=1e-5)


def test_run_model_starts_a_variant_at_its_block(tiny):
    """`start`: a variant runs (and is prepared) only from its first block on, from the first
    variant's hidden states there; its output equals a run of every block."""
    folder, _ = tiny
    ids = [token_ids(2, 16)]
    bump = {"late": "model.layers.1.", "never": None}
    calls = []

    def prepare(variant, prefix, block):
        calls.append((variant, prefix))
        if bump.get(variant) != prefix:
            return None
        norm = block.input_layernorm
        old = norm.weight
        norm.weight = torch.nn.Parameter(old * 1.5, requires_grad=False)
        return lambda: setattr(norm, "weight", old)

    def logits_of(start):
        found = {}
        with runnable(folder) as (net, load, _):
            run_model(
                net, ids, NAMES, lambda b, r, v, out: found.__setitem__((r, v), out.logits.clone()),
                variants=["model", "late", "never"], prepare=prepare, load=load, start=start,
            )  # fmt: skip
        return found

    calls.clear()
    started = logits_of({"model": 0, "late": 1, "never": 2}.get)
    assert calls == [("model", "model.layers.0."), ("model", "model.layers.1."), ("late", "model.layers.1.")]
    calls.clear()
    everywhere = logits_of(None)
    assert len(calls) == 6
    for key, logits in everywhere.items():
        assert torch.equal(started[key], logits), key
    assert not torch.allclose(started[0, "late"], started[0, "model"])
    assert torch.equal(started[1, "never"], started[1, "model"])
    with pytest.raises(BitallocError, match="must start at block 0"):
        logits_of({"model": 1, "late": 1, "never": 1}.get)


@pytest.mark.parametrize(
    "names, fn, kwargs, message",
    [
        (["model.layers.0.mlp.nope"], residual, {}, "no module model.layers.0.mlp.nope"),
        (["model.layers.0.mlp"], residual, {}, "not an nn.Linear"),
        (["model.norm"], residual, {}, "not an nn.Linear"),
        (["lm_head"], residual, {}, "not inside a transformer block"),
        ([], residual, {}, "no modules"),
        (NAMES[:1] * 2, residual, {}, "more than once"),
        (NAMES[:1], residual, {"input_ids": torch.zeros(0, 8, dtype=torch.long)}, "non-empty"),
        (NAMES[:1], residual, {"input_ids": torch.zeros(16, dtype=torch.long)}, r"\(n, context\)"),
        (NAMES[:1], residual, {"input_ids": torch.zeros(1, 8)}, "integer token ids"),
        (NAMES[:1], residual, {"input_ids": torch.full((1, 8), 256)}, r"\[0, 256\)"),
        (NAMES[:1], residual, {"sizes": [0.5, 0.0]}, "positive"),
        (NAMES[:1], residual, {"sizes": [-1.0]}, "positive"),
        (NAMES[:1], residual, {"sizes": []}, "positive"),
        (NAMES[:1], residual, {"sizes": [math.nan]}, "positive"),
        (
            NAMES[:1],
            lambda n, w: w[:, :-1],
            {},
            r"down_proj.* shape \(128, 255\), the weight \(128, 256\)",
        ),
        (NAMES[:1], lambda n, w: w.T, {}, "has shape"),
        (NAMES[:1], lambda n, w: w * math.inf, {}, "non-finite"),
        (NAMES[:1], lambda n, w: w.numpy(), {}, "not a tensor"),
    ],
)
def test_bad_input_is_one_clear_error(tiny, names, fn, kwargs, message):
    _, model = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    arguments = {"input_ids": token_ids(1, 8), **kwargs}
    with pytest.raises(BitallocError, match=message):
        layer_coefficients(model, names, fn, **arguments)
    after = model.state_dict()  # an error half-way leaves the model as it was
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "forward" not in model.lm_head.__dict__
