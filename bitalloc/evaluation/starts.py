"""The weights of each evaluated start, matrix by matrix: LoftQ's Q + B·A and QLoRA's Q,
decomposed from the plan as `bitalloc.apply` decomposes it (`PlanStarts`) or read from an
applied folder (`applied_starts`), and swapped into the running model (`Swapper`)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..artifacts.nn import PACKED_NAMES, packed_files, read_quant_info
from ..artifacts.writer import planned_assignment
from ..errors import BitallocError
from ..lora import decompose, lora_scaling
from ..planning.plan_file import Plan
from ..profiling.calibrator import Calibrator
from ..profiling.objectives import get_objective
from ..quant import QuantConfig, QuantizedTensor
from .metrics import VARIANTS

ADAPTER_FILE = "adapter_model.safetensors"

StartWeights = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


class Swapper:
    """``prepare`` for `run_model`: puts each start's weights into the block's planned Linears
    (computed from the block's W once, when the block is read) and undoes it afterwards."""

    def __init__(self, net: nn.Module, modules: list[str], starts: StartWeights, bar) -> None:
        self.net, self.modules, self.starts, self.bar = net, modules, starts, bar
        self.prefix: str | None = None
        self.entered: str | None = None
        self.weights: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, variant: str, prefix: str, block: nn.Module):
        if prefix != self.entered:  # the block is read, its weights are the original ones
            self.entered = prefix
            if isinstance(self.starts, PlanStarts):
                self.starts.enter_block(int(prefix.rstrip(".").rsplit(".", 1)[1]))
        if variant == "original":
            return None
        names = [m for m in self.modules if m.startswith(prefix)]
        if self.prefix != prefix:
            self.prefix, self.weights = prefix, {}
            for name in names:
                linear = self._linear(name)
                self.weights[name] = self.starts(name, linear.weight.detach())
                self.bar.set_postfix_str(name, refresh=False)
        swaps = []
        for name in names:
            linear = self._linear(name)
            old = linear._parameters["weight"]
            new = self.weights[name][variant].to(device=old.device, dtype=old.dtype)
            linear._parameters["weight"] = nn.Parameter(new, requires_grad=False)
            swaps.append((linear, old))
        if variant == VARIANTS[-1]:
            self.weights = {}

        def undo() -> None:
            for linear, old in swaps:
                linear._parameters["weight"] = old

        return undo

    def _linear(self, name: str) -> nn.Linear:
        linear = self.net.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise BitallocError(f"{name} is a {type(linear).__name__}, not an nn.Linear: cannot evaluate it")
        return linear


class PlanStarts:
    """LoftQ's Q + B·A (as `bitalloc.apply` computes it: same rank, iterations, seed and
    statistics) and QLoRA's Q for a planned matrix, from its W. A data-aware plan's
    statistics are computed block by block in step with the evaluation's own run
    (`enter_block`, called when each block is read), from the calibration tokens."""

    def __init__(self, plan: Plan, statistics, device: torch.device) -> None:
        self.plan, self.statistics, self.device = plan, statistics, device
        self.objective = get_objective(plan.objective)
        self.stepper = None
        self.block: dict[str, torch.Tensor] = {}

    def attach(self, net: nn.Module, load, modules: list[str]) -> None:
        if isinstance(self.statistics, Calibrator):
            self.stepper = self.statistics.stepper(net, load, modules)

    def enter_block(self, index: int) -> None:
        if self.stepper is not None:
            self.block = {}
            self.block = self.stepper.statistics(index)

    def __call__(self, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        plan = self.plan
        if self.stepper is not None:
            statistic = self.block[name]
        else:
            statistic = None if self.statistics is None else self.statistics[name]
        assignment = planned_assignment(plan, name)
        weighting = self.objective.weighting(statistic, plan.damping)
        result = decompose(weight, [name], assignment, weighting, device=self.device)[0]
        return {
            "loftq": result.q.dequantize() + result.lowrank(),
            "qlora": nearest(weight.to(self.device), assignment.config),
        }


def nearest(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """Q = nearest rounding of W in ``config`` (QLoRA's start: no LoRA)."""
    return QuantizedTensor.from_weight(weight.float(), config).dequantize()


def applied_starts(out: Path, plan: Plan) -> StartWeights:
    """Q read from ``OUT/quantized`` plus B·A (PEFT's scaling) from ``OUT/adapter``; QLoRA's Q
    from the original W."""
    from safetensors import safe_open

    quantized = out / "quantized"
    info = read_quant_info(quantized)
    if sorted(info["modules"]) != sorted(plan.modules):
        raise BitallocError(f"{quantized}: its packed matrices are not the ones its plan lists")
    where = {}
    for file in packed_files(quantized):
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    adapter = read_adapter(out / "adapter")

    def weights(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        entry = info["modules"][name]
        config = QuantConfig.parse(entry["config"])
        parts = {}
        for part in PACKED_NAMES:
            key = f"{name}.weight.{part}"
            if key in where:
                with safe_open(str(where[key]), framework="pt") as handle:
                    parts[part] = handle.get_tensor(key)
        try:
            q = QuantizedTensor.from_tensors(parts, config, tuple(entry["shape"])).dequantize()
        except (ValueError, KeyError) as exc:
            raise BitallocError(f"{quantized}: {name}: {exc}") from None
        q = q.to(weight.device)
        if name in adapter:
            scaling, lora_a, lora_b = adapter[name]
            q = q + scaling * (lora_b.to(q.device) @ lora_a.to(q.device))
        return {"loftq": q, "qlora": nearest(weight, config)}

    return weights


def read_adapter(folder: Path) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """{module: (scaling, A, B)} of a PEFT LoRA adapter written by `bitalloc.apply`."""
    from safetensors.torch import load_file

    config_file, weights_file = folder / "adapter_config.json", folder / ADAPTER_FILE
    if not config_file.is_file():
        return {}  # every rank was 0: apply wrote no adapter
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        tensors = load_file(str(weights_file))
    except (OSError, ValueError) as exc:
        raise BitallocError(f"cannot read the adapter in {folder}: {exc}") from None
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", key)
        if match:
            factors.setdefault(match.group(1), {})[match.group(2)] = tensor.float()
    adapter = {}
    for name, pair in factors.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise BitallocError(f"{weights_file}: {name} lacks lora_A or lora_B")
        rank = _pattern(config.get("rank_pattern") or {}, name, config["r"])
        alpha = _pattern(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", rank))
        scaling = lora_scaling(rank, alpha, bool(config.get("use_rslora")))
        adapter[name] = (scaling, pair["lora_A"], pair["lora_B"])
    return adapter


def _pattern(patterns: dict, name: str, default):
    """PEFT's rank/alpha pattern lookup: a key matching the end of the module name."""
    if name in patterns:
        return patterns[name]
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
