"""Extension points: a toy format family, export target, checkpoint reader and solver, each
defined here and registered through the public registry only, then used end to end.

They prove the "Where to add" table of docs/architecture.md: a real one is the same code in
a package module plus its registration. Each toy is removed from its registry after its test.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from _models import tiny_llama

from bitalloc import apply, load_quantized
from bitalloc.checkpoints import Reader, Source, model_input_files, open_source, register_reader
from bitalloc.checkpoints.selection import select_modules
from bitalloc.errors import BitallocError
from bitalloc.export import TARGETS, Translation, export, register_target, targets
from bitalloc.planning.mckp import SOLVERS, register_solver
from bitalloc.planning.plan_file import Plan
from bitalloc.planning.planner import plan
from bitalloc.profiling.profiler import profile
from bitalloc.quant import (
    BlockCodes,
    Format,
    QuantConfig,
    QuantizedTensor,
    fake_quantize,
    format_names,
    grammar,
    pack_bits,
    register_format,
)


# ---- a format family: MX-style integers with a shared power-of-two scale per block ------------
class SharedExponentInt(Format):
    """``mxint{4|8}-b{B0}-se8m0``: integer codes q in [-(2^(k-1) - 1), 2^(k-1) - 1] stored as
    q + 2^(k-1) - 1, and one power-of-two scale 2^e per block stored as the byte e + 127 (OCP MX's
    E8M0), w = q·2^e. Structurally new: another scale grammar, scale dtype and stored part."""

    name = "mxint"
    bits = (4, 8)
    grammar = "mxint{4|8}-b{B0}-se8m0 (a power-of-two scale per block)"
    scale_pattern = r"e8m0"

    def fields(self, groups, bits):
        return {"scale_dtype": "e8m0"}

    def check(self, config):
        if config.scale_dtype != "e8m0" or config.scale_bits is not None or config.zero is not None:
            raise BitallocError("mxint configs store one e8m0 scale per block, nothing else")
        if config.search:
            raise BitallocError("mxint configs have no scale search")

    def scale_format(self, config):
        return "e8m0"

    def tail(self, config):
        return ""

    def scale_dict(self, config):
        return {"dtype": "e8m0"}

    def bits_per_param(self, config):
        return config.bits + 8 / config.block_size

    def storage_parts(self, config, n_blocks):
        return {"codes": n_blocks * config.block_size * config.bits, "scales": n_blocks * 8}

    def part_dtype(self, config, part):
        return torch.uint8

    def quantize(self, blocks, config, weights):
        top = 2 ** (config.bits - 1) - 1
        absmax = blocks.abs().amax(dim=-1)
        exponent = torch.ceil(torch.log2(absmax.clamp_min(2.0**-120) / top)).clamp_(-127, 127)
        scales = torch.exp2(exponent)
        codes = torch.round(blocks / scales.unsqueeze(-1)).clamp_(-top, top).add_(top).to(torch.uint8)
        exponents = (exponent + 127).to(torch.uint8)
        return BlockCodes(codes.reshape(*codes.shape[:-2], -1), scales, exponents, None, None)

    def dequantize(self, codes, scales, zeros, config):
        top = 2 ** (config.bits - 1) - 1
        values = codes.reshape(*scales.shape, config.block_size).float().sub_(top) * scales.unsqueeze(-1)
        return values.reshape(*values.shape[:-2], -1)

    def pack(self, parts, config, rows):
        return {"codes": pack_bits(parts.codes, config.bits), "scales": parts.scale_codes.reshape(rows, -1)}

    def scale_values(self, stored, config, shape):
        per_row = -(-shape[1] // config.block_size)
        return torch.exp2(stored["scales"].float() - 127).reshape(shape[0], per_row)


@pytest.fixture
def mxint():
    family = register_format(SharedExponentInt())
    yield family
    from bitalloc.quant import formats as registry  # test cleanup only: no public unregistering

    registry._FORMATS.pop(family.name)


def test_toy_format_parses_prints_and_stores_exactly(mxint):
    config = QuantConfig.parse("mxint4-b32-se8m0")
    assert (config.method, config.bits, config.block_size, str(config)) == (
        "mxint",
        4,
        32,
        "mxint4-b32-se8m0",
    )
    assert config.bits_per_param == 4.25
    assert config.storage_bits_parts((3, 40)) == {"codes": 3 * 2 * 32 * 4, "scales": 3 * 2 * 8}
    assert config.to_dict()["scale"] == {"dtype": "e8m0"}
    assert "mxint" in format_names() and "se8m0" in grammar()
    for bad, message in [
        ("mxint4-b32-sfp16", "unknown config string"),  # its grammar piece is its own
        ("mxint2-b32-se8m0", "unsupported bits 2: supported are 4, 8"),
        ("nf4-b32-se8m0", "unknown config string"),  # and only its own
    ]:
        with pytest.raises(BitallocError, match=message):
            QuantConfig.parse(bad)
    assert str(QuantConfig.parse("nf4-b64-sfp32")) == "nf4-b64-sfp32"  # the others are untouched


def test_toy_format_round_trip(mxint):
    torch.manual_seed(0)
    weight = torch.randn(24, 80) * torch.rand(24, 1)
    weight[3] = 0.0
    config = QuantConfig.parse("mxint4-b32-se8m0")
    packed = QuantizedTensor.from_weight(weight, config)
    values = packed.dequantize()
    scales = packed.scale_values()
    assert packed.nbytes * 8 == config.storage_bits(weight.shape) == 24 * 3 * (32 * 4 + 8)
    # each element within half a step of its block's power-of-two scale; zeros exact
    step = scales.repeat_interleave(32, dim=1)[:, :80]
    assert bool(((values - weight).abs() <= step / 2 + 1e-12).all())
    assert bool((values[3] == 0).all())
    assert torch.equal(torch.log2(scales), torch.log2(scales).round())  # powers of two
    assert torch.equal(values, fake_quantize(weight, config))
    rebuilt = QuantizedTensor.from_tensors(packed.tensors(), "mxint4-b32-se8m0", (24, 80))
    assert torch.equal(rebuilt.dequantize(), values)
    with pytest.raises(ValueError, match="scales"):  # a part of the wrong size is refused
        QuantizedTensor.from_tensors({**packed.tensors(), "scales": packed.scales[:-1]}, config, (24, 80))
    rel = float((values - weight).norm() / weight.norm())
    assert 0.01 < rel < 0.2  # 4-bit integers: a real, bounded error
    assert float((fake_quantize(weight, "mxint8-b32-se8m0") - weight).norm() / weight.norm()) < rel / 8


def test_toy_format_profiles_plans_and_saves(mxint, tmp_path):
    model = tiny_llama(seed=3)
    configs = ["mxint4-b32-se8m0", "mxint8-b32-se8m0", "nf2-b64-sfp16"]
    table = profile(model, configs=configs, rank=0, iters=1, quiet=True, include=r"layers\.0\.")
    assert sorted(set(table["config"])) == sorted(configs)
    for row in table.itertuples():
        config = QuantConfig.parse(row.config)
        shape = tuple(int(s) for s in row.shape.split("x"))
        assert row.storage_bits == config.storage_bits(shape)
        if row.config.startswith("mxint"):  # rank 0: the error is the quantization error itself
            weight = model.get_submodule(row.module).weight.detach()
            expected = float((weight - fake_quantize(weight, config)).square().sum())
            assert row.error == pytest.approx(expected, rel=1e-4)
    result = plan(table, budget=4.5)
    chosen = {entry["config"] for entry in result.modules.values()}
    assert "mxint4-b32-se8m0" in chosen
    assert result.budget["achieved_bits"] <= 4.5
    saved = Plan.load(result.save(tmp_path / "plan.json"))
    assert saved.modules == result.modules
    # apply writes the family's packed parts; load_quantized's QuantLinears read them back
    out = apply(model, tmp_path / "plan.json", tmp_path / "out", device="cpu", quiet=True)
    quantized = load_quantized(out / "quantized")
    for name, entry in saved.modules.items():
        layer = quantized.get_submodule(name)
        weight = model.get_submodule(name).weight.detach()
        expected = QuantizedTensor.from_weight(weight, entry["config"]).dequantize()  # rank 0: Q = quant(W)
        assert str(layer.config) == entry["config"]
        assert torch.equal(layer.dequantize(torch.float32), expected), name


# ---- an export target ---------------------------------------------------------------------
def _toy_translate(plan: Plan, *, header: bool = False) -> Translation:
    """One ``module config`` line per matrix; the target stores exactly bitalloc's bits."""
    lines = [f"{name} {entry['config']}" for name, entry in plan.modules.items()]
    numel = sum(entry["numel"] for entry in plan.modules.values())
    bits = sum(entry["storage_bits"] for entry in plan.modules.values()) / numel
    text = "\n".join((["# module config"] if header else []) + lines) + "\n"
    return Translation(text, [f"{len(lines)} matrices"], round(bits, 6))


@pytest.fixture
def toy_target():
    register_target("toy-lines", _toy_translate)
    yield "toy-lines"
    from bitalloc.export import api  # test cleanup only

    api._TRANSLATORS.pop("toy-lines")


def _small_plan() -> Plan:
    rows = []
    for module, shape in (
        ("model.layers.0.mlp.up_proj", (64, 32)),
        ("model.layers.0.mlp.down_proj", (32, 64)),
    ):
        for bits, error in ((2, 4.0), (4, 1.0)):
            config = QuantConfig.parse(f"nf{bits}-b32-sfp16")
            rows.append(_row(module, shape, config, error))
    return plan(pd.DataFrame(rows), budget=3.5)


def _row(module: str, shape: tuple[int, int], config: QuantConfig, error: float) -> dict:
    numel = shape[0] * shape[1]
    return {
        "module": module, "shape": list(shape), "numel": numel, "config": str(config),
        "method": config.method, "bits": config.bits, "block_size": config.block_size,
        "bits_per_param": config.bits_per_param, "storage_bits": config.storage_bits(shape),
        "error": error, "rel_error": math.sqrt(error / numel), "qlora_error": error, "rank": 0, "iters": 1,
    }  # fmt: skip


def test_toy_export_target(toy_target, tmp_path):
    small = _small_plan()
    output = tmp_path / "plan.txt"
    result = export(small, toy_target, output, header=True)
    lines = output.read_text().splitlines()
    assert lines[0] == "# module config" and len(lines) == 3
    assert {line.split()[0]: line.split()[1] for line in lines[1:]} == {
        name: entry["config"] for name, entry in small.modules.items()
    }
    assert result.notes == ["2 matrices"]
    stored = sum(e["storage_bits"] for e in small.modules.values()) / sum(
        e["numel"] for e in small.modules.values()
    )
    assert result.target_bits == pytest.approx(stored, abs=1e-6)
    assert toy_target in targets() and toy_target not in TARGETS  # TARGETS: the package's own
    with pytest.raises(BitallocError, match="takes only header, not level"):
        export(small, toy_target, level=3)
    assert export(small, toy_target).text.splitlines()[0] != "# module config"


# ---- a checkpoint format: a .npz of the model's state dict ----------------------------------
class NpzSource(Source):
    """Every tensor of a ``.npz`` (float32 arrays named as in a HF checkpoint); the matrices
    ``<module>.weight`` of the default selection."""

    def __init__(self, path, include=None, exclude=None, modules=None):
        self.name = str(path)
        self._path = path
        self._arrays = dict(np.load(path))
        self.all_matrices = {
            name.removesuffix(".weight"): tuple(array.shape)
            for name, array in self._arrays.items()
            if name.endswith(".weight") and array.ndim == 2
        }
        selected = select_modules(self.all_matrices, include, exclude, self.name, modules)
        self._shapes = {name: self.all_matrices[name] for name in selected}

    def _read(self, module):
        return torch.from_numpy(self._arrays[f"{module}.weight"].copy())

    def _stored_bytes(self, module):
        return "float32", [self._arrays[f"{module}.weight"].tobytes()]

    def _sample(self, module):
        return "float32", self._arrays[f"{module}.weight"].tobytes()

    def tensor_names(self):
        return list(self._arrays)

    def tensor_nbytes(self, name):
        return self._arrays[name].nbytes

    def load_tensor(self, name):
        return torch.from_numpy(self._arrays[name].copy())

    def write_config(self, folder):
        raise BitallocError(f"{self.name}: a .npz carries no config")

    def input_files(self):
        return [self._path]


@pytest.fixture
def npz_reader():
    register_reader(Reader("npz", "a .npz file", lambda path: path.suffix == ".npz", NpzSource))
    yield
    from bitalloc import checkpoints  # test cleanup only

    checkpoints._READERS.pop("npz")


def test_toy_checkpoint_reader_profiles_like_the_model(npz_reader, tmp_path):
    model = tiny_llama(seed=5)
    path = tmp_path / "model.npz"
    np.savez(path, **{name: tensor.numpy() for name, tensor in model.state_dict().items()})
    settings = dict(configs=["nf2-b64-sfp16", "nf4-b64-sfp16"], rank=4, iters=1, quiet=True)
    with open_source(path) as source:
        assert isinstance(source, NpzSource)
        assert source.modules() == open_source(model).modules()
    assert model_input_files(path) == [path]
    from_npz = profile(path, **settings)
    from_model = profile(model, **settings)
    assert from_npz["module"].tolist() == from_model["module"].tolist()
    assert from_npz["storage_bits"].tolist() == from_model["storage_bits"].tolist()
    np.testing.assert_allclose(from_npz["error"], from_model["error"], rtol=1e-5)
    other = tmp_path / "model.txt"
    other.write_text("not a model")
    with pytest.raises(BitallocError, match=r"expected .*, a \.gguf file or a \.npz file"):
        open_source(other)


# ---- a solver ----------------------------------------------------------------------------
def _brute_force(costs, weights, rhs, start):
    """Every combination of the restricted problem (small by construction in this test)."""
    best, best_cost = None, math.inf
    for picks in np.ndindex(*[len(group) for group in costs]):
        weight = sum(weights[g][i] for g, i in enumerate(picks))
        cost = sum(costs[g][i] for g, i in enumerate(picks))
        if weight <= rhs + 1e-12 and cost < best_cost:
            best, best_cost = list(picks), cost
    if best is None:
        raise RuntimeError("infeasible")
    return best, 0.0


@pytest.fixture
def toy_solver():
    calls = []

    def backend(costs, weights, rhs, start):
        calls.append(len(costs))
        return _brute_force(costs, weights, rhs, start)

    register_solver("toy", backend)
    yield calls
    SOLVERS.pop("toy")  # test cleanup only


def _random_table(seed: int, matrices: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(matrices):
        shape = (64 * int(rng.integers(1, 4)), 64)
        scale = rng.lognormal()
        for bits in (2, 3, 4, 8):
            config = QuantConfig.parse(f"nf{bits}-b64-sfp16")
            error = scale * 4.0**-config.bits_per_param * rng.uniform(0.8, 1.2)
            rows.append(_row(f"model.layers.{index}.mlp.up_proj", shape, config, error))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", range(4))
def test_toy_solver_finds_the_cbc_optimum(toy_solver, seed):
    table = _random_table(seed)
    for budget in (2.6, 3.3, 4.4):
        ours, cbc = plan(table, budget, solver="toy"), plan(table, budget, solver="cbc")
        assert ours.solver["name"] == "toy"
        assert ours.solver["objective"] == pytest.approx(cbc.solver["objective"], rel=1e-9)
        assert ours.budget["achieved_bits"] <= budget
    assert toy_solver, "the restricted ILP never reached the toy backend"
    with pytest.raises(BitallocError, match="cannot register solver"):
        register_solver("toy", _brute_force)


def test_highs_leaves_other_threads_output_alone(capfd, monkeypatch):
    """Nothing redirects file descriptor 1 during a solve: a line written to it by another
    thread while HiGHS runs arrives."""
    import scipy.optimize

    real_milp, written = scipy.optimize.milp, []

    def milp(*args, **kwargs):
        thread = threading.Thread(target=lambda: written.append(os.write(1, b"other thread\n")))
        thread.start()
        thread.join()
        return real_milp(*args, **kwargs)

    monkeypatch.setattr(scipy.optimize, "milp", milp)
    plan(_random_table(1), 3.3, solver="highs")
    assert written, "HiGHS was never called"
    assert capfd.readouterr().out.count("other thread\n") == len(written)
