"""An in-memory `torch.nn.Module`: its `nn.Linear` layers inside transformer blocks."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BitallocError
from .base import Source, sample_spans
from .selection import select_modules


class ModuleSource(Source):
    """Weights of a live module, named as in `named_modules()` (so as in its checkpoint)."""

    def __init__(
        self,
        model: nn.Module,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
    ) -> None:
        self.name = f"<nn.Module {type(model).__name__}>"
        self._linears = {
            name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)
        }
        matrices = {name: tuple(m.weight.shape) for name, m in self._linears.items()}
        selected = select_modules(matrices, include, exclude, self.name)
        for name in selected:
            weight = self._linears[name].weight
            if weight.is_meta or not weight.is_floating_point():
                raise BitallocError(f"weight {name} of {self.name} holds no float values")
        self._shapes = {name: matrices[name] for name in selected}  # type: ignore[misc]

    def _read(self, module: str) -> torch.Tensor:
        weight = self._linears[module].weight.detach()
        return weight.to(device="cpu", dtype=torch.float32, copy=True)

    def _sample(self, module: str) -> tuple[str, bytes]:
        flat = self._linears[module].weight.detach().reshape(-1)
        chunks = [
            flat[offset : offset + length].cpu().contiguous().view(torch.uint8).numpy().tobytes()
            for offset, length in sample_spans(flat.numel(), 1)
        ]
        return str(flat.dtype).removeprefix("torch."), b"".join(chunks)

    def close(self) -> None:
        super().close()
        self._linears = {}
