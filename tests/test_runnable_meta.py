"""`parameters_on_meta` builds a model skeleton without touching anything outside its block."""

import threading

import torch
from torch import nn

from bitalloc.checkpoints.skeleton import parameters_on_meta


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.arange(4, dtype=torch.float32), persistent=False)


def test_parameters_go_to_meta_buffers_stay_real_ties_stay_tied():
    with parameters_on_meta():
        net = _Tied()
    assert all(p.is_meta for p in net.parameters())
    assert net.head.weight is net.embed.weight
    assert tuple(net.embed.weight.shape) == (11, 4)
    assert not net.scale.is_meta
    assert net.scale.tolist() == [0.0, 1.0, 2.0, 3.0]
    after = nn.Linear(3, 2)  # the block is over: parameters are real again
    assert not after.weight.is_meta


def test_a_module_built_by_another_thread_meanwhile_keeps_real_parameters():
    inside, built = threading.Event(), threading.Event()
    found: dict[str, nn.Module] = {}

    def build_elsewhere():
        inside.wait(timeout=30)
        found["linear"] = nn.Linear(5, 3)
        built.set()

    worker = threading.Thread(target=build_elsewhere)
    worker.start()
    with parameters_on_meta():
        inside.set()
        assert built.wait(timeout=30)
        mine = nn.Linear(5, 3)
    worker.join(timeout=30)
    assert mine.weight.is_meta and mine.bias.is_meta
    other = found["linear"]
    assert not other.weight.is_meta and not other.bias.is_meta
    assert other(torch.ones(1, 5)).shape == (1, 3)
    assert torch.isfinite(other.weight).all() and other.weight.abs().sum() > 0


def test_nested_blocks_and_parameter_subclasses():
    class Marked(nn.Parameter):
        pass

    with parameters_on_meta():
        with parameters_on_meta():
            inner = nn.Linear(2, 2)
        outer = nn.Module()
        outer.p = Marked(torch.ones(3))
    assert inner.weight.is_meta
    assert outer.p.is_meta and type(outer.p) is Marked
    assert outer.p.requires_grad
