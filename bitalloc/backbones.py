"""Every tensor of a model by checkpoint name, plus its config and tokenizer, for `apply`.

A `Source` reads only the matrices to quantize; writing a loadable checkpoint also needs
the embeddings, norms, biases and the files that describe the model. A `Backbone` lists
and reads all of them lazily, one tensor at a time, for a safetensors checkpoint, a GGUF
file (llama layout, transformers names) or an in-memory transformers model.
"""

from __future__ import annotations

import abc
import copy
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import BitallocError
from .sources import Source, demo_model_path
from .sources.gguf import SUPPORTED_ARCHITECTURES, hf_module_name, reverse_permute
from .sources.safetensors import checkpoint_files, read_header

# Files copied beside the weights: the config, generation settings and tokenizer files.
CONFIG_FILES = re.compile(
    r"^(?:config\.json|generation_config\.json|.*tokeni[sz]er.*|special_tokens_map\.json|"
    r"added_tokens\.json|vocab\.\w+|merges\.txt|.*\.model|.*\.tiktoken|chat_template\.\w+|"
    r"preprocessor_config\.json)$"
)


class Backbone(abc.ABC):
    """All tensors of a model, read lazily; ``matrices`` are the ones a plan may quantize."""

    name: str
    matrices: dict[str, tuple[int, int]]  # module name -> (out, in) of its 2-D weight
    is_causal_lm: bool

    @abc.abstractmethod
    def tensor_names(self) -> list[str]:
        """Checkpoint names of every tensor, in checkpoint order."""

    @abc.abstractmethod
    def nbytes(self, name: str) -> int:
        """Bytes of ``name`` as `load` returns it."""

    @abc.abstractmethod
    def load(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor, in its stored dtype (float32 for GGUF)."""

    @abc.abstractmethod
    def save_config(self, folder: Path) -> None:
        """Write config.json (architectures set) and tokenizer files into ``folder``."""


def open_backbone(model: str | os.PathLike | nn.Module | Source | None) -> Backbone:
    """The backbone of what `bitalloc.apply` accepts as a model (None: the demo model)."""
    if isinstance(model, Source):
        path = getattr(model, "path", None)
        if path is None:
            raise BitallocError("apply needs the model itself (a path or an nn.Module), not its Source")
        model = path
    if model is None:
        model = demo_model_path()
    if isinstance(model, nn.Module):
        return ModuleBackbone(model)
    path = Path(model)
    if not path.exists():
        raise BitallocError(f"model not found: {model} (bitalloc reads local files only)")
    if path.is_file() and path.suffix != ".safetensors":
        with open(path, "rb") as handle:
            if handle.read(4) == b"GGUF":
                return GGUFBackbone(path)
    return SafetensorsBackbone(path)


class SafetensorsBackbone(Backbone):
    """A HF checkpoint folder (or one .safetensors file with config.json beside it)."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self._entries = {}
        for file in checkpoint_files(path):
            self._entries.update(read_header(file))
        self.matrices = {
            name.removesuffix(".weight"): entry.shape
            for name, entry in self._entries.items()
            if name.endswith(".weight") and len(entry.shape) == 2
        }
        self._folder = path if path.is_dir() else path.parent
        if not (self._folder / "config.json").is_file():
            raise BitallocError(f"{self._folder} has no config.json: apply needs it to build the model")
        config = json.loads((self._folder / "config.json").read_text(encoding="utf-8"))
        self.is_causal_lm = any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])

    def tensor_names(self) -> list[str]:
        return list(self._entries)

    def nbytes(self, name: str) -> int:
        entry = self._entries[name]
        return entry.end - entry.start

    def load(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._entries[name].file, framework="pt") as handle:
            return handle.get_tensor(name)

    def save_config(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for file in sorted(self._folder.iterdir()):
            if file.is_file() and CONFIG_FILES.match(file.name):
                shutil.copyfile(file, folder / file.name)


class GGUFBackbone(Backbone):
    """A llama-layout GGUF file: tensors dequantized to float32 under transformers names
    (q/k un-permuted as `GGUFSource` does); config and tokenizer built by transformers."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.name = str(path)
        self._path = path
        reader = gguf.GGUFReader(str(path))
        architecture = reader.get_field("general.architecture")
        architecture = architecture.contents() if architecture is not None else None
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise BitallocError(f"unsupported GGUF architecture {architecture!r} in {path}")
        self._arch = architecture
        heads = reader.get_field(f"{architecture}.attention.head_count")
        kv_heads = reader.get_field(f"{architecture}.attention.head_count_kv")
        self._heads = heads.contents() if heads is not None else None
        self._kv_heads = kv_heads.contents() if kv_heads is not None else self._heads
        self._tensors = {}
        skipped = []
        for tensor in reader.tensors:
            module = hf_module_name(tensor.name)
            if module is None:
                skipped.append(tensor.name)
            else:
                self._tensors[module + ".weight"] = tensor
        if skipped:
            warnings.warn(
                f"GGUF tensors with no transformers name left out: {', '.join(skipped)}", stacklevel=3
            )
        self.matrices = {
            name.removesuffix(".weight"): self._shape(name)
            for name in self._tensors
            if len(self._shape(name)) == 2
        }
        self.is_causal_lm = True

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))  # ne is innermost first

    def nbytes(self, name: str) -> int:
        return 4 * int(np.prod(self._shape(name)))

    def load(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        values = values.reshape(self._shape(name))
        if SUPPORTED_ARCHITECTURES[self._arch] and name.endswith(("q_proj.weight", "k_proj.weight")):
            values = reverse_permute(values, self._heads if "q_proj" in name else self._kv_heads)
        return torch.from_numpy(np.ascontiguousarray(values).copy())

    def save_config(self, folder: Path) -> None:
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        folder.mkdir(parents=True, exist_ok=True)
        where, file = str(self._path.parent), self._path.name
        config = AutoConfig.from_pretrained(where, gguf_file=file)
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        if "model.embed_tokens.weight" in self._tensors:  # absent tokenizer metadata: 32000
            config.vocab_size = self._shape("model.embed_tokens.weight")[0]
        config.tie_word_embeddings = "lm_head.weight" not in self._tensors
        config.save_pretrained(folder)
        try:
            AutoTokenizer.from_pretrained(where, gguf_file=file).save_pretrained(folder)
        except Exception as exc:  # transformers raises many types for missing tokenizer data
            warnings.warn(f"no tokenizer written: {self._path} has none usable ({exc})", stacklevel=3)


class ModuleBackbone(Backbone):
    """An in-memory transformers model (a PreTrainedModel with ``.config``)."""

    def __init__(self, model: nn.Module) -> None:
        if getattr(model, "config", None) is None or not hasattr(model.config, "save_pretrained"):
            raise BitallocError(
                f"cannot write a checkpoint of a {type(model).__name__} without a transformers "
                "config: save it with save_pretrained and apply to that folder"
            )
        self.name = f"<nn.Module {type(model).__name__}>"
        self._model = model
        self.matrices = {
            name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, nn.Linear)
        }
        self._state, seen = {}, set()
        for name, tensor in model.state_dict().items():  # tied tensors once, as save_pretrained
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if tensor.numel() and key in seen:
                continue
            seen.add(key)
            self._state[name] = tensor
        self.is_causal_lm = type(model).__name__.endswith("ForCausalLM")

    def tensor_names(self) -> list[str]:
        return list(self._state)

    def nbytes(self, name: str) -> int:
        tensor = self._state[name]
        return tensor.numel() * tensor.element_size()

    def load(self, name: str) -> torch.Tensor:
        return self._state[name].detach().to("cpu", copy=True)

    def save_config(self, folder: Path) -> None:
        config = copy.deepcopy(self._model.config)
        if not getattr(config, "architectures", None):
            config.architectures = [type(self._model).__name__]
        config.save_pretrained(folder)
