"""GGUF files (llama.cpp): tensors renamed to their transformers names, dequantized one at a time.

llama.cpp stores each matrix with its shape reversed (ne0 = in) and, for llama, permutes
the rows of attn_q / attn_k for its rotary layout; both are undone here exactly as
transformers does when it loads a GGUF file, so `read` returns the HF (out, in) weight.
The llama family shares one naming: llama, qwen2 (q/k/v biases) and qwen3 (q/k norms)
are read; other architectures are refused by name.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..errors import BitallocError
from .base import Source, sample_spans
from .selection import select_modules

# llama.cpp tensor names -> transformers module names, for the llama family.
LLAMA_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LLAMA_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Architectures whose names follow the llama layout (and that transformers' GGUF loader
# reads); True where llama.cpp permuted the rows of attn_q/attn_k.
SUPPORTED_ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


# Parsing a GGUF file's metadata (tens of thousands of tokenizer strings) and rebuilding its
# transformers config and tokenizer take seconds to tens of seconds, and one command opens the
# same file several times (selection, calibration, the skeleton, the writer). Both are kept
# per process, keyed by the file's identity, so that a file changed on disk is parsed again.
_CACHE_LOCK = threading.Lock()
_READERS: dict[tuple, object] = {}  # identity -> gguf.GGUFReader (the last file only)
_CONFIG_FILES: dict[tuple, tuple[dict[str, bytes], list[str]]] = {}  # identity -> (files, warnings)


def _identity(path: str) -> tuple:
    stat = os.stat(path)
    return (os.path.realpath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _reader(path: str):
    """The parsed file, shared by every source of this file in the process (read-only use)."""
    import gguf

    key = _identity(path)
    with _CACHE_LOCK:
        if key in _READERS:
            return _READERS[key]
    reader = gguf.GGUFReader(path)
    with _CACHE_LOCK:
        _READERS.clear()  # one file's tensors and fields at a time
        _READERS[key] = reader
    return reader


def hf_module_name(gguf_name: str) -> str | None:
    """transformers module name of a llama-layout GGUF weight, or None if it has none."""
    name = hf_tensor_name(gguf_name)
    return name.removesuffix(".weight") if name is not None and name.endswith(".weight") else None


def hf_tensor_name(gguf_name: str) -> str | None:
    """transformers tensor name of a llama-layout GGUF tensor (weight or bias), or None."""
    match = _BLOCK.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        hf_part = LLAMA_BLOCK_NAMES.get(part)
        return f"model.layers.{layer}.{hf_part}.{kind}" if hf_part else None
    if gguf_name.endswith(".weight"):
        top = _LLAMA_TOP_NAMES.get(gguf_name.removesuffix(".weight"))
        return f"{top}.weight" if top else None
    return None


def reverse_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q/k matrix with `n_head` heads
    (transformers' `LlamaTensorProcessor._reverse_permute_weights`)."""
    dim = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, dim, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


class GGUFSource(Source):
    """A GGUF file of a llama-family model (any quantization gguf can dequantize).

    Every tensor with a transformers name is readable (dequantized to float32, q/k
    un-permuted); the config and tokenizer are rebuilt by transformers from the metadata.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        modules: list[str] | None = None,
    ) -> None:
        self.path = str(path)
        self.name = str(path)
        if not os.path.isfile(self.path):
            raise BitallocError(f"model not found: {path}")
        try:
            self._reader = _reader(self.path)
        except Exception as err:  # gguf raises ValueError, struct.error, IndexError, ...
            raise BitallocError(f"corrupt or unreadable GGUF file {path}: {err}") from None
        self._architecture = self._field("general.architecture")
        if self._architecture not in SUPPORTED_ARCHITECTURES:
            raise BitallocError(
                f"unsupported GGUF architecture {self._architecture!r} in {path} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        self._permuted = SUPPORTED_ARCHITECTURES[self._architecture]
        if self._permuted:
            self._n_head = self._int_field(f"{self._architecture}.attention.head_count")
            self._n_head_kv = self._int_field(
                f"{self._architecture}.attention.head_count_kv", default=self._n_head
            )
        self._tensors = {}  # transformers tensor name -> gguf tensor
        self._unnamed = []  # GGUF tensors with no transformers name (not written by apply)
        self.all_matrices = {}
        for tensor in self._reader.tensors:
            name = hf_tensor_name(tensor.name)
            if name is None:
                self._unnamed.append(tensor.name)
                name = tensor.name
            self._tensors[name] = tensor
            if len(tensor.shape) == 2 and name.endswith(".weight"):
                module = name.removesuffix(".weight")
                self.all_matrices[module] = (int(tensor.shape[1]), int(tensor.shape[0]))  # ne is (in, out)
        selected = select_modules(self.all_matrices, include, exclude, self.name, modules)
        self._shapes = {m: self.all_matrices[m] for m in selected}  # type: ignore[misc]
        self.is_causal_lm = True

    def _field(self, key: str, default: object = None) -> object:
        field = self._reader.get_field(key)
        if field is None:
            if default is None:
                raise BitallocError(f"GGUF file {self.path} lacks metadata {key}")
            return default
        try:
            return field.contents()
        except Exception as err:  # a corrupt field
            raise BitallocError(f"corrupt GGUF file {self.path}: metadata {key} ({err})") from None

    def _int_field(self, key: str, default: int | None = None) -> int:
        value = self._field(key, default)
        if not isinstance(value, int):  # e.g. per-layer head counts
            raise BitallocError(f"GGUF file {self.path}: unsupported {key} = {value!r}")
        return value

    def _tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))  # ne is innermost first

    def _read(self, module: str) -> torch.Tensor:
        return self.load_tensor(module + ".weight")

    def tensor_names(self) -> list[str]:
        unnamed = set(self._unnamed)
        return [name for name in self._tensors if name not in unnamed]

    def tensor_nbytes(self, name: str) -> int:
        return 4 * int(np.prod(self._tensor_shape(name)))

    def stored_dtype(self, name: str) -> torch.dtype | None:
        """F32, F16 and BF16 tensors as such; None for the quantized types."""
        kind = self._tensors[name].tensor_type.name
        return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(kind)

    def load_tensor(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise BitallocError(
                f"cannot dequantize {tensor.tensor_type.name} tensor {tensor.name} in {self.path}"
            ) from None
        except (ValueError, IndexError) as err:
            raise BitallocError(f"corrupt GGUF file {self.path}: tensor {tensor.name} ({err})") from None
        values = np.asarray(values, dtype=np.float32).reshape(self._tensor_shape(name))
        if self._permuted and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            values = reverse_permute(values, self._n_head if "q_proj" in name else self._n_head_kv)
        if np.may_share_memory(values, tensor.data):
            values = values.copy()  # never hand out a view on the memory-mapped file
        return torch.from_numpy(np.ascontiguousarray(values))

    def write_config(self, folder: Path) -> None:
        """config.json and the tokenizer files that transformers rebuilds from the metadata
        (built once per file and process, then written again from memory)."""
        if self._unnamed:
            warnings.warn(
                f"GGUF tensors with no transformers name left out: {', '.join(self._unnamed)}", stacklevel=3
            )
        key = _identity(self.path)
        with _CACHE_LOCK:
            cached = _CONFIG_FILES.get(key)
        if cached is None:
            with tempfile.TemporaryDirectory(prefix="bitalloc-gguf-config-") as scratch:
                notes = self._build_config(Path(scratch))
                files = {p.name: p.read_bytes() for p in sorted(Path(scratch).iterdir()) if p.is_file()}
            cached = (files, notes)
            with _CACHE_LOCK:
                _CONFIG_FILES.clear()
                _CONFIG_FILES[key] = cached
        folder.mkdir(parents=True, exist_ok=True)
        files, notes = cached
        for name, data in files.items():
            (folder / name).write_bytes(data)
        for note in notes:
            warnings.warn(note, stacklevel=3)

    def _build_config(self, folder: Path) -> list[str]:
        """Writes the config and tokenizer into ``folder``; returns the warnings to give."""
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        where, file = os.path.dirname(os.path.abspath(self.path)), os.path.basename(self.path)
        try:
            config = AutoConfig.from_pretrained(where, gguf_file=file)
        except Exception as exc:  # transformers raises many types for metadata it cannot map
            raise BitallocError(f"cannot build a transformers config from {self.path}: {exc}") from None
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            kind = config.model_type
            raise BitallocError(f"{self.path}: transformers has no causal LM for model type {kind!r}")
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        if "model.embed_tokens.weight" in self._tensors:  # absent tokenizer metadata: 32000
            config.vocab_size = self._tensor_shape("model.embed_tokens.weight")[0]
        config.tie_word_embeddings = "lm_head.weight" not in self._tensors
        config.save_pretrained(folder)
        try:
            AutoTokenizer.from_pretrained(where, gguf_file=file).save_pretrained(folder)
        except Exception as exc:  # transformers raises many types for missing tokenizer data
            return [f"no tokenizer written: {self.path} has none usable ({exc})"]
        return []

    def has_tokenizer(self) -> bool:
        return self._reader.get_field("tokenizer.ggml.tokens") is not None

    def input_files(self) -> list[Path]:
        return [Path(self.path)]

    def file_stats(self) -> dict[str, list[int]]:
        return {self.path: [os.stat(self.path).st_size, os.stat(self.path).st_mtime_ns]}

    def _stored_bytes(self, module: str) -> tuple[str, Iterable]:
        tensor = self._tensors[module + ".weight"]
        raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)
        return tensor.tensor_type.name, (
            raw[i : i + (1 << 24)].tobytes() for i in range(0, raw.size, 1 << 24)
        )

    def _sample(self, module: str) -> tuple[str, bytes]:
        tensor = self._tensors[module + ".weight"]
        raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)
        spans = sample_spans(raw.size, 1)
        return tensor.tensor_type.name, b"".join(raw[o : o + n].tobytes() for o, n in spans)

    def close(self) -> None:
        super().close()
        self._reader = None
        self._tensors = {}
