"""`bitalloc report`: figures (PNG), the data behind them (CSV) and README.md, from a profile,
plans and eval results; the output folder is never a foreign one."""

import csv
import json
import math
import sys

import numpy as np
import pytest
import torch
from _models import llama_module_names, make_tiny_llama

import bitalloc
from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.evaluation import evaluate, report
from bitalloc.planning.plan_file import Plan
from bitalloc.planning.planner import feasible_range, plan, sweep
from bitalloc.planning.report import first_k_layers_baseline, uniform_baselines
from bitalloc.profiling.table import read_profile

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = ["nf2-b64-s8b256", "nf4-b64-s8b256", "nf8-b64-s8b256"]
BUDGETS = (2.5, 4.0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A weight-only profile of a tiny llama, plans at 2.5 and 4 bits, and their eval results."""
    root = tmp_path_factory.mktemp("report-inputs")
    model_dir = root / "model"
    make_tiny_llama(model_dir, seed=1, initializer_range=0.05)
    profile_path = root / "profile.parquet"
    table = bitalloc.profile(str(model_dir), profile_path, configs=CONFIGS, rank=4, iters=1, quiet=True)
    plans, evals = [], []
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 64))
    for budget in BUDGETS:
        path = plan(table, budget).save(root / f"plan-{budget:g}.json")
        plans.append(path)
        evals.append(root / f"eval-{budget:g}.json")
        evaluate(str(model_dir), path, input_ids=torch.from_numpy(ids), output=evals[-1])
    return {"profile": profile_path, "plans": plans, "evals": evals, "root": root}


def rows_of(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def assert_drawn(path, min_colors: int = 40) -> None:
    """A real figure: many distinct colours and a good share of non-white pixels."""
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500, image.shape
    pixels = (image[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3)
    colors = len(np.unique(pixels, axis=0))
    ink = float((pixels.min(axis=1) < 200).mean())
    assert colors >= min_colors and ink > 0.01, (path.name, colors, ink)


def test_report_writes_every_figure_with_its_data(inputs, tmp_path):
    all_inputs = [inputs["profile"], *inputs["plans"], *inputs["evals"]]
    files = report(all_inputs, tmp_path / "report")
    folder = tmp_path / "report"
    assert files.folder == folder
    expected = {"frontier", "error-vs-bits", "heatmap-plan-2.5", "heatmap-plan-4", "eval"}
    assert set(files.figures) == expected
    for png, data in files.figures.values():
        assert png.parent == folder and png.is_file() and data.is_file()
        assert_drawn(png)
    table = read_profile(inputs["profile"])

    # frontier: the ILP sweep, each uniform config, each k of the LoftQ mix, the given plans
    rows = rows_of(folder / "frontier.csv")
    ilp = [r for r in rows if r["series"] == "ILP plan"]
    budgets = [float(r["budget"]) for r in ilp]
    low, high = feasible_range(table)
    assert len(ilp) >= 20 and budgets[0] == low and budgets[-1] == high
    for row, expected_plan in zip(ilp, sweep(table, budgets)):
        assert float(row["total_error"]) == pytest.approx(expected_plan.total_error, rel=1e-9)
        assert float(row["bits_per_param"]) == expected_plan.achieved_bits <= float(row["budget"])
    errors = [float(r["total_error"]) for r in ilp]
    assert all(a >= b for a, b in zip(errors, errors[1:])) and errors[0] > 20 * errors[-1]
    uniform = {r["name"]: float(r["total_error"]) for r in rows if r["series"] == "uniform"}
    assert uniform == pytest.approx({b.name: b.error for b in uniform_baselines(table, 64.0)}, rel=1e-9)
    assert sorted(uniform) == CONFIGS
    mix = [r for r in rows if r["series"] == "first-k"]
    assert [r["name"].split(" layers")[0] for r in mix] == ["first 0", "first 1", "first 2"]
    k1 = first_k_layers_baseline(table, float(mix[1]["bits_per_param"]) + 1e-6)
    assert float(mix[1]["total_error"]) == pytest.approx(k1.error, rel=1e-9) and k1.name.startswith(
        "first 1 "
    )
    plans = {r["name"]: r for r in rows if r["series"] == "plan"}
    for path in inputs["plans"]:
        saved = Plan.load(path)
        assert float(plans[path.name]["total_error"]) == pytest.approx(saved.total_error, rel=1e-9)
        # the ILP plan is never worse than a uniform config that fits the same budget
        fits = [e for name, e in uniform.items() if float(saved.target_bits) >= _bits(rows, name)]
        assert saved.total_error <= min(fits) + 1e-9

    # heatmap: one row per matrix, the plan's config, bits and block size
    for path in inputs["plans"]:
        saved = Plan.load(path)
        heat = rows_of(folder / f"heatmap-{path.stem}.csv")
        assert [r["module"] for r in heat] == llama_module_names()
        for r in heat:
            entry = saved.modules[r["module"]]
            assert (r["config"], int(r["bits"]), int(r["block_size"])) == (
                entry["config"], entry["bits"], entry["block_size"],
            )  # fmt: skip
            assert int(r["layer"]) == int(r["module"].split(".")[2])
        assert {r["kind"] for r in heat} == {name.rsplit(".", 1)[-1] for name in llama_module_names()}

    # error vs bits: pooled relative error per matrix type and config, from the table
    errs = rows_of(folder / "error-vs-bits.csv")
    assert len(errs) == 7 * len(CONFIGS)
    for r in errs:
        part = table[(table["config"] == r["config"]) & table["module"].str.endswith("." + r["kind"])]
        norm_sq = part["error"] / part["rel_error"] ** 2
        assert int(r["matrices"]) == 2
        assert float(r["rel_error"]) == pytest.approx(
            math.sqrt(part["error"].sum() / norm_sq.sum()), rel=1e-6
        )
        assert float(r["qlora_rel_error"]) == pytest.approx(
            math.sqrt(part["qlora_error"].sum() / norm_sq.sum()), rel=1e-6
        )
        assert float(r["bits_per_param"]) == pytest.approx(part["storage_bits"].sum() / part["numel"].sum())
        assert float(r["rel_error"]) < float(r["qlora_rel_error"])

    # eval: the numbers of each eval file
    evals = rows_of(folder / "eval.csv")
    assert len(evals) == 3 * len(inputs["evals"])
    for path in inputs["evals"]:
        data = json.loads(path.read_text())
        for variant, numbers in data["results"].items():
            (row,) = [r for r in evals if r["file"] == path.name and r["variant"] == variant]
            assert float(row["perplexity"]) == numbers["perplexity"]
            assert float(row["achieved_bits"]) == data["plan"]["achieved_bits"]
            if variant != "original":
                assert float(row["kl_mean"]) == numbers["kl_mean"]

    readme = (folder / "README.md").read_text()
    for png, data in files.figures.values():
        assert f"({png.name})" in readme and f"`{data.name}`" in readme
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(
        png.name for png, _ in files.figures.values()
    )


def _bits(rows, config) -> float:
    return float(next(r["bits_per_param"] for r in rows if r["series"] == "uniform" and r["name"] == config))


def test_a_blank_figure_fails_the_check(tmp_path):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5))
    figure.subplots().set_axis_off()
    figure.savefig(tmp_path / "blank.png")
    with pytest.raises(AssertionError):
        assert_drawn(tmp_path / "blank.png")


def test_output_folder_rules(inputs, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BitallocError, match="not written by `bitalloc report`"):
        report([inputs["profile"]], foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    # an input inside the output folder is never overwritten
    with pytest.raises(BitallocError, match="inside the output folder"):
        report([inputs["plans"][0]], inputs["root"])
    # a folder an earlier report wrote is replaced whole (its old figures go), unless it
    # holds a file the report did not write: that is the user's, never deleted
    out = tmp_path / "report"
    report([inputs["plans"][0]], out)
    (out / "stale.png").write_text("the user's")
    with pytest.raises(BitallocError, match="stale.png"):
        report([inputs["plans"][1]], out)
    (out / "stale.png").unlink()
    files = report([inputs["plans"][1]], out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".bitalloc-report", "README.md", "heatmap-plan-4.png", "heatmap-plan-4.csv"]
    )
    assert set(files.figures) == {"heatmap-plan-4"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_missing_matplotlib_is_a_clear_error(inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(BitallocError, match=r"pip install 'bitalloc\[report\]'"):
        report([inputs["profile"]], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_report_of_a_profile_alone(inputs, tmp_path, capsys):
    """Without plans the heatmap shows the sweep's plan at the middle budget (a note says so)."""
    out = tmp_path / "figures"
    assert main(["report", str(inputs["profile"]), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "frontier.png" in captured.out and "error-vs-bits.png" in captured.out
    assert captured.err.startswith("bitalloc: note: no plan given")
    (heat,) = out.glob("heatmap-ilp-*.png")
    assert_drawn(heat)
    assert "eval.png" not in captured.out and f"({heat.name})" in (out / "README.md").read_text()
    bad = tmp_path / "other.json"
    bad.write_text('{"format": "something else"}')
    for args in (["report", str(bad), "-o", str(tmp_path / "x")], ["report", str(tmp_path / "nope.parquet")]):
        assert main(args) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("bitalloc: error:"), lines
