"""GGUF files (llama.cpp): tensors renamed to their transformers names, dequantized one at a time.

llama.cpp stores each matrix with its shape reversed (ne0 = in) and, for llama, permutes
the rows of attn_q / attn_k for its rotary layout; both are undone here exactly as
transformers does when it loads a GGUF file, so `read` returns the HF (out, in) weight.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

from ..errors import BitallocError
from .base import Source, sample_spans
from .selection import select_modules

# llama.cpp tensor names -> transformers module names, per architecture family.
_LLAMA_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
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
# Architectures whose names follow the llama layout; True where attn_q/attn_k are permuted.
SUPPORTED_ARCHITECTURES = {"llama": True}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")


def hf_module_name(gguf_name: str) -> str | None:
    """transformers module name of a llama-layout GGUF weight, or None if it has none."""
    match = _BLOCK.fullmatch(gguf_name)
    if match:
        layer, part = match.groups()
        hf_part = _LLAMA_BLOCK_NAMES.get(part)
        return f"model.layers.{layer}.{hf_part}" if hf_part else None
    if gguf_name.endswith(".weight"):
        return _LLAMA_TOP_NAMES.get(gguf_name.removesuffix(".weight"))
    return None


def reverse_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q/k matrix with `n_head` heads
    (transformers' `LlamaTensorProcessor._reverse_permute_weights`)."""
    dim = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, dim, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


class GGUFSource(Source):
    """A GGUF file of a llama-architecture model (any quantization gguf can dequantize)."""

    def __init__(
        self,
        path: str | os.PathLike,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
    ) -> None:
        import gguf

        self.path = str(path)
        self.name = str(path)
        if not os.path.isfile(self.path):
            raise BitallocError(f"model not found: {path}")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as err:  # gguf raises ValueError, struct.error, IndexError, ...
            raise BitallocError(f"corrupt or unreadable GGUF file {path}: {err}") from None
        architecture = self._field("general.architecture")
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise BitallocError(
                f"unsupported GGUF architecture {architecture!r} in {path} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        self._permuted = SUPPORTED_ARCHITECTURES[architecture]
        if self._permuted:
            self._n_head = self._int_field(f"{architecture}.attention.head_count")
            self._n_head_kv = self._int_field(f"{architecture}.attention.head_count_kv", default=self._n_head)
        self._tensors = {}
        matrices = {}
        for tensor in self._reader.tensors:
            if len(tensor.shape) != 2:
                continue
            hf_name = hf_module_name(tensor.name) or tensor.name.removesuffix(".weight")
            self._tensors[hf_name] = tensor
            matrices[hf_name] = (int(tensor.shape[1]), int(tensor.shape[0]))  # ne is (in, out)
        selected = select_modules(matrices, include, exclude, self.name)
        self._shapes = {m: matrices[m] for m in selected}  # type: ignore[misc]

    def _field(self, key: str, default: object = None) -> object:
        field = self._reader.get_field(key)
        if field is None:
            if default is None:
                raise BitallocError(f"GGUF file {self.path} lacks metadata {key}")
            return default
        return field.contents()

    def _int_field(self, key: str, default: int | None = None) -> int:
        value = self._field(key, default)
        if not isinstance(value, int):  # e.g. per-layer head counts
            raise BitallocError(f"GGUF file {self.path}: unsupported {key} = {value!r}")
        return value

    def _read(self, module: str) -> torch.Tensor:
        from gguf.quants import dequantize

        tensor = self._tensors[module]
        try:
            weight = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise BitallocError(
                f"cannot dequantize {tensor.tensor_type.name} tensor {tensor.name} in {self.path}"
            ) from None
        weight = np.asarray(weight, dtype=np.float32).reshape(self._shapes[module])
        if self._permuted and module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            n_head = self._n_head if module.endswith("q_proj") else self._n_head_kv
            weight = reverse_permute(weight, n_head)
        if np.may_share_memory(weight, tensor.data):
            weight = weight.copy()  # never hand out a view on the memory-mapped file
        return torch.from_numpy(np.ascontiguousarray(weight))

    def _sample(self, module: str) -> tuple[str, bytes]:
        tensor = self._tensors[module]
        raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)
        spans = sample_spans(raw.size, 1)
        return tensor.tensor_type.name, b"".join(raw[o : o + n].tobytes() for o, n in spans)

    def close(self) -> None:
        super().close()
        self._reader = None
        self._tensors = {}
