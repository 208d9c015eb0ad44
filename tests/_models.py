"""Tiny random models written to a temp dir, for tests (import as `from _models import ...`).

Sizes are divisible by the usual block sizes and small enough to build in
milliseconds. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# The 7 Linear layers of a llama block, in natural (sorted) order.
LLAMA_BLOCK_LINEARS = (
    "mlp.down_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "self_attn.k_proj",
    "self_attn.o_proj",
    "self_attn.q_proj",
    "self_attn.v_proj",
)


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    """A 2-layer llama: hidden 128, intermediate 256, 4 heads, 2 kv heads, vocab 256."""
    settings = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A random tiny llama in memory (deterministic for a given seed)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype).eval()


def llama_module_names(num_layers: int = 2) -> list[str]:
    """The selected matrix names of a llama with `num_layers` blocks, in natural order."""
    return [f"model.layers.{layer}.{linear}" for layer in range(num_layers) for linear in LLAMA_BLOCK_LINEARS]


def make_tiny_llama(
    directory: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    shard_size: str | None = "200KB",
    seed: int = 0,
    **overrides: object,
) -> LlamaForCausalLM:
    """Save a random tiny llama as a HF directory (sharded safetensors + index when
    `shard_size` is set, else one model.safetensors) and return the model."""
    model = tiny_llama(seed, dtype, **overrides)
    kwargs = {"max_shard_size": shard_size} if shard_size else {"max_shard_size": "10GB"}
    model.save_pretrained(directory, **kwargs)
    return model


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row permutation of q/k (convert_hf_to_gguf.py `permute`)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_writer(path: str | os.PathLike, config, architecture: str):
    """A `gguf.GGUFWriter` for ``path`` with the block hyper-parameters of ``config`` written."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    return writer


def make_tiny_gguf(
    path: str | os.PathLike,
    model: LlamaForCausalLM,
    architecture: str = "llama",
    quantize: dict[str, object] | None = None,
) -> None:
    """Write `model` as a llama.cpp GGUF file: llama names, F32 tensors, q/k permuted.

    `quantize` maps HF module names to a `gguf.GGMLQuantizationType` to store them in.
    """
    import gguf

    config = model.config
    writer = gguf_writer(path, config, architecture)
    for name, tensor in model.state_dict().items():
        module = name.removesuffix(".weight")
        array = tensor.detach().float().numpy()
        if module == "model.embed_tokens":
            gguf_name = "token_embd"
        elif module == "model.norm":
            gguf_name = "output_norm"
        elif module == "lm_head":
            gguf_name = "output"
        else:
            _, _, layer, part = module.split(".", 3)
            gguf_name = f"blk.{layer}.{_GGUF_NAMES[part]}"
            if part == "self_attn.q_proj":
                array = llama_cpp_permute(array, config.num_attention_heads)
            elif part == "self_attn.k_proj":
                array = llama_cpp_permute(array, config.num_key_value_heads)
        qtype = (quantize or {}).get(module)
        if qtype is not None:
            writer.add_tensor(f"{gguf_name}.weight", gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(f"{gguf_name}.weight", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_repeated_safetensors(path: str | os.PathLike, names: Iterable[str], tensor: torch.Tensor) -> int:
    """Stream a safetensors file holding `tensor` under every name (builds a large file
    without holding it in memory); returns the file size."""
    names = list(names)
    tensor = tensor.contiguous()
    data = tensor.view(-1).view(torch.uint8).numpy().tobytes()
    dtype = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[tensor.dtype]
    header = {
        name: {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "data_offsets": [i * len(data), (i + 1) * len(data)],
        }
        for i, name in enumerate(names)
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _ in names:
            f.write(data)
    return os.path.getsize(path)
