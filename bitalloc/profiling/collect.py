"""Collecting input statistics: forward pre-hooks on a block's Linears, run block by block.

Each hooked Linear accumulates Σx² (h, the activation objective's diagonal) or XᵀX (H, the
output objective's full second moment) of its input in float64; Linears that read the same
tensor (q/k/v, gate/up) share one H. `collect_statistics` runs a model one transformer block
at a time and hands each block's statistics to the caller, which drops them before the next
block; `BlockStepper` does the same in step with a caller that runs the blocks itself. An
expert matrix that no calibration token was routed to gets flat statistics at its peers'
level (planned on its weights), with a warning.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..checkpoints.runnable import BATCH_TOKENS, BlockRunner
from ..errors import BitallocError

if TYPE_CHECKING:
    from .calibrator import Calibrator

DAMPING = 0.01  # h + DAMPING·mean(h): dead channels cannot blow the diagonal weights up


def collect_statistics(
    net: nn.Module,
    input_ids: torch.Tensor,
    modules: Sequence[str],
    consume: Callable[[list[str], dict[str, torch.Tensor]], None],
    *,
    covariance: bool = False,
    load: Callable[[str], torch.Tensor] | None = None,
    batch_tokens: int = BATCH_TOKENS,
    quiet: bool = True,
) -> None:
    """Run ``net`` over ``input_ids`` (n, context) one block at a time (parameters on the meta
    device read with ``load`` when their block runs, released after it) up to the last block
    holding one of ``modules``; after each block that holds some, ``consume(names,
    statistics)`` gets their damped h, or with ``covariance`` their H (float32)."""
    runner = BlockRunner(net, input_ids, modules, load=load, batch_tokens=batch_tokens)
    by_block: dict[int, list[str]] = {}
    for name in modules:
        by_block.setdefault(runner.block_of(name), []).append(name)
    last = max(by_block)
    for index in range(last + 1):
        names = by_block.get(index, [])
        collector = _Collector(net, names, covariance, windows=len(input_ids))
        runner.step(index, collector.hooks if names else None)
        if not quiet:
            print(f"calibrated block {index + 1}/{last + 1}", flush=True)
        if names:
            statistics = collector.result()
            del collector
            consume(names, statistics)
            del statistics


def collect_column_weights(
    net: nn.Module,
    input_ids: torch.Tensor,
    modules: Sequence[str],
    *,
    load=None,
    batch_tokens: int = BATCH_TOKENS,
) -> dict[str, torch.Tensor]:
    """Damped diag(XᵀX)/n of each named Linear's input, all in memory (`collect_statistics`)."""
    found: dict[str, torch.Tensor] = {}
    collect_statistics(net, input_ids, modules, lambda names, stats: found.update(stats), load=load,
                       batch_tokens=batch_tokens)  # fmt: skip
    return found


class BlockStepper:
    """A calibration run advanced block by block by a caller that reads and runs the blocks
    itself (`bitalloc.evaluation` runs the model over its own text): `statistics(index,
    block)` runs the calibration states through the caller's materialized block (original
    weights) and returns the statistics of the planned modules in it."""

    def __init__(self, calibrator: Calibrator, net: nn.Module, load, modules: Sequence[str]) -> None:
        self.calibrator, self.net, self.modules = calibrator, net, list(modules)
        self.runner = BlockRunner(net, calibrator.ids, self.modules, load=load,
                                  batch_tokens=calibrator.batch_tokens)  # fmt: skip
        self.last = self.runner.last_block(self.modules)

    def statistics(self, index: int) -> dict[str, torch.Tensor]:
        """Run block ``index`` (materialized by the caller) and return its statistics; blocks
        must come in order (each once), and nothing is run past the last planned one."""
        if index > self.last or index < self.runner.next:
            return {}
        while self.runner.next < index:  # blocks without planned matrices: only advance the states
            self.runner.step(self.runner.next)
        names = [m for m in self.modules if self.runner.block_of(m) == index]
        collector = _Collector(self.net, names, self.calibrator.covariance, windows=len(self.calibrator.ids))
        self.runner.step(index, collector.hooks if names else None, materialized=True)
        return collector.result() if names else {}


class _Collector:
    """Forward pre-hooks on a block's named Linears accumulating Σx² (h) or XᵀX (H) in
    float64; `result` gives them divided by the token count, as float32."""

    def __init__(self, net: nn.Module, names: Sequence[str], covariance: bool, windows: int = 0) -> None:
        self.net, self.names, self.covariance, self.windows = net, list(names), covariance, windows
        self.state: dict = {"sums": {}, "counts": {}, "groups": {}, "seen": []}

    def hooks(self, block: nn.Module) -> list:
        state = self.state
        hooks = [block.register_forward_pre_hook(lambda *_: state["seen"].clear())]
        for name in self.names:
            linear = self.net.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise BitallocError(
                    f"{name} is a {type(linear).__name__}, not an nn.Linear: cannot calibrate it"
                )
            if self.covariance:
                hooks.append(linear.register_forward_pre_hook(_covariance_accumulator(name, state)))
            else:
                accumulate = _accumulator(name, state["sums"], state["counts"])
                hooks.append(linear.register_forward_pre_hook(accumulate))
        return hooks

    def result(self) -> dict[str, torch.Tensor]:
        state, found = self.state, {}
        seen = state["groups"] if self.covariance else state["sums"]
        missing = [m for m in self.names if m not in seen]
        unrouted = [m for m in missing if is_expert(m)]  # a router sent it no calibration token
        if len(unrouted) < len(missing):
            first = next(m for m in missing if m not in unrouted)
            raise BitallocError(f"{first} never ran on the calibration tokens: no input statistics")
        if unrouted:  # planned on its weights: statistics flat, at its peers' level
            means = {}
            for name in [m for m in self.names if m in seen]:
                key = state["groups"][name] if self.covariance else name
                total = state["sums"][key].diagonal() if self.covariance else state["sums"][key]
                means[name] = float(total.mean() / state["counts"][key])
            for name in unrouted:
                size, level = self.net.get_submodule(name).in_features, unrouted_level(name, means)
                if self.covariance:
                    state["sums"][name] = torch.eye(size, dtype=torch.float64) * level
                    state["groups"][name] = name
                else:
                    state["sums"][name] = torch.full((size,), level, dtype=torch.float64)
                state["counts"][name] = 1
            warn_unrouted(unrouted, self.windows)
        if self.covariance:
            shared: dict[str, torch.Tensor] = {}
            for name in self.names:
                key = state["groups"][name]
                if key not in shared:
                    shared[key] = (state["sums"].pop(key) / state["counts"][key]).float().cpu().contiguous()
                found[name] = shared[key]
        else:
            for name in self.names:
                h = (state["sums"].pop(name) / state["counts"][name]).float().cpu()
                found[name] = (h + DAMPING * h.mean()).contiguous()
        return found


_EXPERT = re.compile(r"\.experts\.\d+\.")


def is_expert(module: str) -> bool:
    """True for one expert's matrix of a mixture-of-experts layer ("...mlp.experts.3.down_proj")."""
    return bool(_EXPERT.search(module))


def unrouted_level(module: str, means: dict[str, float]) -> float:
    """The input power per channel that stands in for an expert matrix no calibration token
    was routed to: the mean over the same matrix of the block's other experts (``means``:
    module -> mean of its input's diagonal second moment), else 1. With a flat H (or h) at
    that level, the matrix is decomposed and planned on its weights alone (the weight
    objective), at the scale of its peers' errors."""
    pattern = _EXPERT.sub(".experts.*.", module)
    peers = [v for m, v in means.items() if m != module and _EXPERT.sub(".experts.*.", m) == pattern]
    return sum(peers) / len(peers) if peers else 1.0


def warn_unrouted(modules: Sequence[str], windows: int) -> None:
    if modules:
        warnings.warn(
            f"{len(modules)} expert matrices received no calibration token in {windows} windows "
            f"(first: {modules[0]}): planned on their weights; give more or more varied calibration text",
            stacklevel=3,
        )


def _covariance_accumulator(name: str, state: dict):
    def hook(module, args):
        x = args[0]
        # the same tensor object as an earlier Linear's input in this forward: a shared input
        # (the list holds a reference, so an identity match cannot be a reused address)
        key = next((k for tensor, k in state["seen"] if tensor is x), None)
        if key is None:
            key = state["groups"].get(name, name)
            state["seen"].append((x, key))
            rows = x.detach().reshape(-1, x.shape[-1]).double()
            product = rows.T @ rows
            sums = state["sums"]
            sums[key] = sums[key] + product if key in sums else product
            state["counts"][key] = state["counts"].get(key, 0) + rows.shape[0]
        previous = state["groups"].setdefault(name, key)
        if previous != key:
            raise BitallocError(f"{name} shares its input with different Linears from one batch to the next")

    return hook


def _accumulator(name: str, sums: dict, counts: dict):
    def hook(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        squares = x.double().square().sum(dim=0)
        sums[name] = sums[name] + squares if name in sums else squares
        counts[name] = counts.get(name, 0) + x.shape[0]

    return hook
