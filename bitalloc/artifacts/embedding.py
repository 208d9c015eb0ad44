"""An input embedding stored quantized on disk (``apply --embedding CONFIG``).

The plan covers Linear layers; the input embedding of a small model is often the largest
tensor outside it (SmolLM2-135M: 28 M of its 135 M parameters, 56.6 MB in bf16). With an
``embedding_config`` the writer stores it packed in that config, as
``<embedding>.weight.codes``/``.scales``..., and lists it under ``embeddings`` in the
``quantization_config``. Loading dequantizes it once into the model's ordinary
``nn.Embedding`` in the compute dtype (transformers' loader runs the dequantization as a
weight conversion; `load_quantized`'s own reader does the same), so tied output embeddings,
``device_map`` and PEFT see a plain dense model there: the saving is on disk, not in memory.
The loaded model's ``quantization_config`` then lists no embeddings, so its
``save_pretrained`` writes the embedding dense, as it holds it.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoints import Source
from ..checkpoints.skeleton import build_skeleton
from ..errors import BitallocError
from ..quant import QuantConfig, QuantizedTensor

Item = tuple[str, int, Callable[[], torch.Tensor]]  # (tensor name, bytes, loader), as the writer's


def parse_embedding_config(config: str | QuantConfig | None) -> QuantConfig | None:
    """The embedding's config, parsed (BitallocError naming the option for a bad string)."""
    if config is None or isinstance(config, QuantConfig):
        return config
    if not isinstance(config, str):
        raise BitallocError(f"embedding_config must be a config string, got {type(config).__name__}")
    try:
        return QuantConfig.parse(config)
    except BitallocError as exc:
        raise BitallocError(f"embedding config: {exc}") from None


def input_embedding(source: Source, planned: set[str]) -> tuple[str, tuple[int, int]]:
    """The module name and (rows, dim) shape of ``source``'s input embedding (transformers'
    ``get_input_embeddings`` of the model its config describes); BitallocError when it has none
    stored, or it is planned."""
    with tempfile.TemporaryDirectory(prefix="bitalloc-embedding-") as folder:
        source.write_config(Path(folder))
        net = build_skeleton(folder, str(source))
    embedding = net.get_input_embeddings() if hasattr(net, "get_input_embeddings") else None
    name = next((n for n, module in net.named_modules() if module is embedding), None)
    if embedding is None or name is None or not isinstance(embedding, torch.nn.Embedding):
        raise BitallocError(f"{source}: the model has no input embedding to store quantized")
    if name in planned:
        raise BitallocError(f"{name} is in the plan: --embedding is for an embedding outside it")
    if f"{name}.weight" not in source.tensor_names():
        raise BitallocError(f"{source}: its input embedding {name}.weight is not stored in the checkpoint")
    return name, (embedding.num_embeddings, embedding.embedding_dim)


def embedding_items(source: Source, name: str, shape: tuple[int, int], config: QuantConfig) -> list[Item]:
    """The packed parts of embedding ``name`` in ``config`` as writer items: the matrix is read
    and quantized once, when its first part is written, and each part is released once written."""
    parts = config.storage_bits_parts(shape)
    packed: dict[str, torch.Tensor] = {}

    def load(part: str) -> torch.Tensor:
        if not packed:
            weight = source.load_tensor(f"{name}.weight").float()
            if tuple(weight.shape) != shape:
                raise BitallocError(f"{name}.weight is {tuple(weight.shape)}, the model's embedding {shape}")
            packed.update(QuantizedTensor.from_weight(weight, config).tensors())
            del weight
        return packed.pop(part)

    return [
        (f"{name}.weight.{part}", math.ceil(bits / 8), lambda part=part: load(part))
        for part, bits in parts.items()
    ]  # fmt: skip
