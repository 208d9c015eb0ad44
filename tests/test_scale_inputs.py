"""Bad input at scale: an output that cannot fit the disk is refused before the work; a GPU
that runs out of memory mid-profile gets smaller batches, or a resumable stop with one line."""

import collections

import pytest
import torch
from _models import make_tiny_llama

import bitalloc
from bitalloc.artifacts.writer import _bytes_to_write
from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.planning.plan_file import Plan
from bitalloc.planning.planner import plan
from bitalloc.profiling import profiler

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(configs=["nf2-b64-s8b256", "nf4-b64-s8b256"], rank=4, iters=1, quiet=True, objective="weight")
Usage = collections.namedtuple("Usage", "total used free")


@pytest.fixture
def planned(tmp_path):
    make_tiny_llama(tmp_path / "model", seed=4)
    table = bitalloc.profile(str(tmp_path / "model"), **FAST)
    plan(table, 3.0).save(tmp_path / "plan.json")
    return tmp_path


def test_apply_refuses_an_output_the_disk_cannot_hold(planned, monkeypatch, capsys):
    out = planned / "out"
    monkeypatch.setattr("bitalloc.fileio.shutil.disk_usage", lambda path: Usage(10**9, 10**9 - 5000, 5000))
    with pytest.raises(BitallocError, match=r"not enough disk space for the output .*0\.00 GB are free"):
        bitalloc.apply(str(planned / "model"), planned / "plan.json", out, quiet=True)
    code = main(["apply", str(planned / "model"), "--plan", str(planned / "plan.json"), "-o", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "not enough disk space" in err[0]
    assert not out.exists() and not (planned / "out.partial").exists()


def test_the_free_space_estimate_covers_what_apply_writes(planned):
    from bitalloc.checkpoints import open_source

    saved = Plan.load(planned / "plan.json")
    ranks = {name: 4 for name in saved.modules}
    with open_source(planned / "model") as source:
        needed = _bytes_to_write(saved, source, ranks, planned / "none", "bf16", False)
        with_dense = _bytes_to_write(saved, source, ranks, planned / "none", "bf16", True)
    out = bitalloc.apply(str(planned / "model"), planned / "plan.json", planned / "out", quiet=True)
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert written < needed < 3 * written
    assert with_dense - needed > 14 * 128 * 128 * 2  # the 16-bit matrices at least


def test_out_of_memory_splits_the_batch(planned, monkeypatch):
    expected = bitalloc.profile(str(planned / "model"), **FAST)
    real = profiler.decompose
    sizes = []

    def small_device(weights, *args, **kwargs):
        sizes.append(weights.shape[0])
        if weights.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(weights, *args, **kwargs)

    def by_shape(modules, source, device):  # what a GPU run batches together
        groups = collections.defaultdict(list)
        for module in modules:
            groups[source.shape(module)].append(module)
        return list(groups.values())

    monkeypatch.setattr(profiler, "decompose", small_device)
    monkeypatch.setattr(profiler, "_batches", by_shape)
    table = bitalloc.profile(str(planned / "model"), **FAST)
    assert max(sizes) == 4 and sizes.count(1) == 14 * 2  # q/o: 4 alike, split down to single matrices
    assert list(table["module"]) == list(expected["module"])
    torch.testing.assert_close(
        torch.tensor(table["error"].to_numpy()), torch.tensor(expected["error"].to_numpy()), rtol=1e-6, atol=0
    )


def test_out_of_memory_on_one_matrix_stops_resumably(planned, monkeypatch, capsys):
    real = profiler.decompose
    seen = []

    def tight_device(weights, *args, **kwargs):
        seen.append(weights.shape)
        if len(seen) > 2 * 8:  # the 9th matrix of 14 does not fit
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(weights, *args, **kwargs)

    monkeypatch.setattr(profiler, "decompose", tight_device)
    output = planned / "resumed.parquet"
    configs = "nf2-b64-s8b256,nf4-b64-s8b256"
    code = main(["profile", str(planned / "model"), "-o", str(output), "--configs", configs,
                 "--rank", "4", "--iters", "1", "--objective", "weight", "--quiet"])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert (
        code == 2 and len(err) == 1 and "ran out of memory on model.layers.1" in err[0] and "resume" in err[0]
    )
    assert not output.exists()
    monkeypatch.setattr(profiler, "decompose", real)
    calls = []
    monkeypatch.setattr(profiler, "decompose", lambda w, *a, **k: calls.append(1) or real(w, *a, **k))
    resumed = bitalloc.profile(str(planned / "model"), output, **FAST)
    assert len(calls) == 2 * (14 - 8)  # only the matrices not finished before the stop
    fresh = bitalloc.profile(str(planned / "model"), **FAST)
    torch.testing.assert_close(
        torch.tensor(resumed["error"].to_numpy()), torch.tensor(fresh["error"].to_numpy()), rtol=1e-6, atol=0
    )
