"""An in-memory `torch.nn.Module`: its `nn.Linear` layers inside transformer blocks."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

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
        modules: list[str] | None = None,
    ) -> None:
        self.name = f"<nn.Module {type(model).__name__}>"
        self._model = model
        self._linears = {
            name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)
        }
        self.all_matrices = {name: tuple(m.weight.shape) for name, m in self._linears.items()}
        selected = select_modules(self.all_matrices, include, exclude, self.name, modules)
        for name in selected:
            weight = self._linears[name].weight
            if weight.is_meta or not weight.is_floating_point():
                raise BitallocError(f"weight {name} of {self.name} holds no float values")
        self._shapes = {name: self.all_matrices[name] for name in selected}  # type: ignore[misc]
        self.is_causal_lm = type(model).__name__.endswith("ForCausalLM")
        self._state: dict[str, torch.Tensor] | None = None

    def _read(self, module: str) -> torch.Tensor:
        weight = self._linears[module].weight.detach()
        return weight.to(device="cpu", dtype=torch.float32, copy=True)

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The state dict with tied tensors once, as save_pretrained writes it."""
        if self._state is None:
            self._state, seen = {}, set()
            for name, tensor in self._model.state_dict().items():
                key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
                if tensor.numel() and key in seen:
                    continue
                seen.add(key)
                self._state[name] = tensor
        return self._state

    def tensor_names(self) -> list[str]:
        return list(self._tensors())

    def tensor_nbytes(self, name: str) -> int:
        tensor = self._tensors()[name]
        return tensor.numel() * tensor.element_size()

    def stored_dtype(self, name: str) -> torch.dtype:
        return self._tensors()[name].dtype

    def load_tensor(self, name: str) -> torch.Tensor:
        return self._tensors()[name].detach().to("cpu", copy=True)

    def require_config(self) -> None:
        config = getattr(self._model, "config", None)
        if config is None or not hasattr(config, "save_pretrained"):
            raise BitallocError(
                f"cannot write a checkpoint of a {type(self._model).__name__} without a transformers "
                "config: save it with save_pretrained and apply to that folder"
            )

    def write_config(self, folder: Path) -> None:
        self.require_config()
        config = copy.deepcopy(self._model.config)
        if not getattr(config, "architectures", None):
            config.architectures = [type(self._model).__name__]
        config.save_pretrained(folder)

    def config_dir(self) -> str | None:
        where = getattr(getattr(self._model, "config", None), "_name_or_path", None)
        return str(where) if where and Path(where, "config.json").is_file() else None

    def _stored_bytes(self, module: str) -> tuple[str, Iterable]:
        flat = self._linears[module].weight.detach().reshape(-1).cpu().contiguous()
        data = flat.view(torch.uint8).numpy() if flat.numel() else b""
        return str(flat.dtype).removeprefix("torch."), [memoryview(data)]

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
        self._state = None
