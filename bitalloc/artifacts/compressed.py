"""`apply --format compressed-tensors`: the backbone as a compressed-tensors ``pack-quantized``
checkpoint, which transformers (with the compressed-tensors package) and servers that read
compressed-tensors load without bitalloc.

compressed-tensors stores an asymmetric integer group as unsigned ``num_bits`` codes q and an
integer zero point z, w = (q - z)·s, with one float scale s per group of ``group_size`` inputs
(``compressed_tensors.quantization.lifecycle.forward.dequantize``: computed in the scale's
dtype). That is bitalloc's ``uint{k}-b{B}-s{fp32|fp16|bf16}-z{k}``: the same codes, scales and
zero points, so nothing is quantized again. Per planned module the checkpoint holds

``weight_packed``      int32 (out, ceil(in·k/32)): each row's codes, element i at bit i·k of
                       the row's little-endian bit stream (``pack_to_int32`` of q - 2^(k-1))
``weight_scale``       (out, in/B) in the config's scale dtype
``weight_zero_point``  int32 (ceil(out·k/32), in/B): the zero points packed along the rows
``weight_shape``       int64 (out, in)

Everything else is refused before any work: NF codebooks, bitalloc's symmetric ``int``
(levels ``linspace(-1, 1, 2^k)``: an integer grid around a half-integer zero point), float
zero points, quantized scales, rows that are not whole groups (compressed-tensors'
``_process_group`` raises on a partial last group), and plans mixing bit widths or group
sizes (`SCHEME_NOTE`).
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import torch

from ..checkpoints import Source
from ..checkpoints.layout import match_checkpoint
from ..checkpoints.safetensors import TORCH_DTYPES, index_shards, read_header
from ..checkpoints.skeleton import build_skeleton
from ..errors import BitallocError
from ..fileio import atomic_path
from ..planning.plan_file import Plan
from ..quant import QuantConfig, QuantizedTensor, format_of
from ..quant.formats import TORCH_DTYPES as SCALE_DTYPES
from ..quant.packing import pack_bits
from .writer import PLAN_FILE, Item, _items, _write_checkpoint

FORMAT = "compressed-tensors"
WEIGHTS = "model.safetensors"  # transformers' own name: the folder is a plain HF checkpoint


def check_expressible(plan: Plan) -> None:
    """BitallocError naming the first module (in plan order) whose config compressed-tensors
    cannot store exactly, and why, or whose bit width or group size differs from the first
    module's (see `SCHEME_NOTE`); nothing is read or written."""
    first = None
    for name, entry in plan.modules.items():
        config = QuantConfig.parse(entry.config)
        reason = unexpressible(config, int(entry.shape[1]))
        if reason is None and first is not None and _scheme(config) != _scheme(first[1]):
            reason = f"its bit width or group size differs from {first[1]} (module {first[0]}); {SCHEME_NOTE}"
        if reason is not None:
            raise BitallocError(
                f"format {FORMAT} cannot take {config} (module {name}): {reason}; plan with "
                "uint{k}-b{B}-s{fp16|bf16|fp32}-z{k} configs of one k and one B that divides the rows "
                "(e.g. uint4-b64-sfp16-z4), or apply in bitalloc's format"
            )
        first = first or (name, config)


# Why one scheme: transformers (5.x, with compressed-tensors 0.20) cannot load asymmetric
# pack-quantized layers compressed (it expects weight_zero_point unpacked and refuses the
# packed one), and dequantizing at load it decompresses every dense layer with the first
# config group's bits and group size.
SCHEME_NOTE = (
    "transformers loads asymmetric pack-quantized layers only by dequantizing all of them with one "
    "bit width and group size (the scale dtype may differ per module)"
)


def _scheme(config: QuantConfig) -> tuple[int, int]:
    return config.bits, config.block_size


def unexpressible(config: QuantConfig, columns: int) -> str | None:
    """Why compressed-tensors' pack-quantized format cannot hold ``config`` for rows of
    ``columns`` inputs exactly, or None when it can."""
    if not format_of(config).uniform:
        return "its levels are a codebook, not integer codes"
    if not config.asymmetric:
        return "its levels are symmetric: int's linspace(-1, 1, 2^k) has a half-integer zero point"
    if config.zero != "int":
        return "its zero point is a float; compressed-tensors stores an integer zero point"
    if config.scale_bits is not None or config.scale_dtype not in SCALE_DTYPES:
        return "its scales are quantized; compressed-tensors stores float scales"
    if not 1 <= config.bits <= 8:
        return f"pack-quantized holds 1 to 8 bits, not {config.bits}"
    if columns % config.block_size:
        return (
            f"rows of {columns} inputs are not whole groups of {config.block_size} "
            "(compressed-tensors refuses a partial last group)"
        )
    if not _affine(str(config)):
        return "its dequantization is not (q - z)·s"
    return None


@functools.lru_cache(maxsize=64)
def _affine(text: str) -> bool:
    """Whether the family of ``text`` stores exactly codes, float scales and integer zero
    points and dequantizes them as (q - z)·s, checked on a small fixed matrix (so that a
    format family is judged by what it does, not by its name)."""
    config = QuantConfig.parse(text)
    rows, columns = 4, 2 * config.block_size
    probe = torch.sin(torch.arange(rows * columns, dtype=torch.float32) * 0.37).reshape(rows, columns)
    probe[0] += 1.5  # one row with a large offset: the zero point matters
    packed = QuantizedTensor.from_weight(probe, config)
    if set(packed.tensors()) != {"codes", "scales", "zeros"} or packed.zero_values().dtype != torch.uint8:
        return False
    codes, zeros = packed.unpacked_codes().float(), packed.zero_values().float()
    scales = packed.scales.float()
    expected = (codes - zeros.repeat_interleave(config.block_size, 1)) * scales.repeat_interleave(
        config.block_size, 1
    )
    return bool(torch.equal(expected, packed.dequantize()))


def pack_int32(codes: torch.Tensor, bits: int, chunk_rows: int = 1024) -> torch.Tensor:
    """compressed-tensors' ``pack_to_int32`` of the signed codes ``codes - 2^(bits-1)``, from
    the unsigned codes (rows, n): int32 (rows, ceil(n·bits/32)), element i of a row at bit
    i·bits of that row's little-endian stream (which is how it stores them: offset back to
    unsigned). Independent of the machine's byte order; ``chunk_rows`` rows at a time."""
    rows, n = codes.shape
    padded = -(-n // 32) * 32  # whole 32-code groups: each row's stream is whole 4-byte words
    out = torch.empty(rows, -(-n * bits // 32), dtype=torch.int32)
    for start in range(0, rows, chunk_rows):
        chunk = torch.nn.functional.pad(codes[start : start + chunk_rows].to(torch.uint8), (0, padded - n))
        stream = pack_bits(chunk, bits).reshape(chunk.shape[0], -1, 4).to(torch.int64)
        words = stream[..., 0] | stream[..., 1] << 8 | stream[..., 2] << 16 | stream[..., 3] << 24
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        out[start : start + chunk_rows] = words[:, : out.shape[1]]
    return out


def module_tensors(packed: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one matrix (names without the module prefix)."""
    rows, columns = packed.shape
    bits = packed.config.bits
    return {
        "weight_packed": pack_int32(packed.unpacked_codes()[:, :columns], bits),
        "weight_scale": packed.scales.reshape(rows, -1).contiguous(),
        "weight_zero_point": pack_int32(packed.zero_values().T, bits).T.contiguous(),
        "weight_shape": torch.tensor([rows, columns], dtype=torch.int64),
    }


def expected_tensors(config: QuantConfig, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple]]:
    """(dtype, shape) of each tensor `module_tensors` writes for a ``shape`` matrix."""
    rows, columns = shape
    bits, groups = config.bits, columns // config.block_size
    return {
        "weight_packed": (torch.int32, (rows, math.ceil(columns * bits / 32))),
        "weight_scale": (SCALE_DTYPES[config.scale_dtype], (rows, groups)),
        "weight_zero_point": (torch.int32, (math.ceil(rows * bits / 32), groups)),
        "weight_shape": (torch.int64, (2,)),
    }


def packed_items(work, plan: Plan, module: str) -> list[Item]:
    """The writer's items for one planned module, read from its finished work file once."""
    entry = plan.modules[module]
    config, shape = QuantConfig.parse(entry.config), tuple(entry.shape)
    ready: dict[str, torch.Tensor] = {}

    def load(part: str) -> torch.Tensor:
        if part not in ready:
            ready.update(module_tensors(work.quantized(module, plan)))
        return ready.pop(part)

    return [
        (f"{module}.{part}", math.prod(size) * dtype.itemsize, lambda part=part: load(part))
        for part, (dtype, size) in expected_tensors(config, shape).items()
    ]


def quantization_config(plan: Plan) -> dict:
    """config.json's ``quantization_config``: one config group per (bits, group size) (one,
    after `check_expressible`) whose targets are the exact module names; kept modules and
    ``lm_head`` are ignored. ``dequantize`` asks transformers to dequantize at load (see
    `SCHEME_NOTE`); servers ignore it."""
    targets: dict[tuple[int, int], list[str]] = {}
    for name, entry in plan.modules.items():
        config = QuantConfig.parse(entry.config)
        targets.setdefault((config.bits, config.block_size), []).append(name)
    groups = {
        f"group_{index}": {
            "targets": names,
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": False,
                "strategy": "group",
                "group_size": group,
                "dynamic": False,
            },  # fmt: skip
            "input_activations": None,
            "output_activations": None,
        }
        for index, ((bits, group), names) in enumerate(sorted(targets.items()))
    }
    ignore = [*plan.kept, *([] if "lm_head" in plan.modules else ["lm_head"])]
    return {
        "quant_method": FORMAT,
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": list(dict.fromkeys(ignore)),
        "dequantize": True,
    }


def write(folder: Path, source: Source, plan: Plan, work, max_shard_bytes: int,
          unplanned_dtype: str | None) -> None:  # fmt: skip
    """The compressed-tensors backbone in ``folder`` (weights, config.json with its
    ``quantization_config``, tokenizer, the plan), checked as `check_folder` does."""
    items = _items(source, plan, lambda module: packed_items(work, plan, module), unplanned_dtype)
    _write_checkpoint(folder, items, max_shard_bytes)
    source.write_config(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["quantization_config"] = quantization_config(plan)
    with atomic_path(config_file) as temp:
        temp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / PLAN_FILE).write_text(plan.to_json(), encoding="utf-8")
    check_folder(folder, plan)


def unmark(config_file: Path, target: Path) -> None:
    """Copy a config.json without its compressed-tensors ``quantization_config``."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if (config.get("quantization_config") or {}).get("quant_method") == FORMAT:
        del config["quantization_config"]
    target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_folder(folder: Path, plan: Plan) -> None:
    """From the safetensors headers (no tensor data): every planned module has its four
    tensors with the dtype and shape its config gives and no dense weight, and every other
    tensor has its place and shape in the model config.json describes, which lacks none.
    BitallocError naming the first problem."""
    index = folder / f"{WEIGHTS}.index.json"
    files = index_shards(index) if index.is_file() else [folder / WEIGHTS]
    found = {name: (file, entry) for file in files for name, entry in read_header(file).items()}
    for module, entry in plan.modules.items():
        config, shape = QuantConfig.parse(entry.config), tuple(entry.shape)
        for part, want in expected_tensors(config, shape).items():
            got = found.pop(f"{module}.{part}", (None, None))[1]
            if got is None or (TORCH_DTYPES[got.dtype], tuple(got.shape)) != want:
                raise BitallocError(f"{folder}: {module}.{part} is missing or not {want[0]} {want[1]}")
    model = match_checkpoint(build_skeleton(folder, str(folder)), found)
    meta = {
        name: torch.empty(entry.shape, dtype=TORCH_DTYPES[entry.dtype], device="meta")
        for name, (_, entry) in found.items()
    }
    try:
        result = model.load_state_dict(meta, strict=False, assign=True)
    except RuntimeError as exc:  # size mismatches
        raise BitallocError(f"{folder}: tensors do not fit the model: {' '.join(str(exc).split())}") from None
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    buffers = dict(model.named_buffers())
    for key in result.unexpected_keys:
        if key not in buffers and not any(p.search(key) for p in ignored):
            raise BitallocError(f"{folder}: tensor {key} has no place in the model")
    model.tie_weights()
    planned = {f"{module}.weight" for module in plan.modules}
    persistent = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name in module._buffers
        if name not in module._non_persistent_buffers_set
    }
    missing = set(result.missing_keys)
    for key in [name for name, _ in model.named_parameters()] + sorted(persistent):
        if key in missing and key not in planned:
            raise BitallocError(f"{folder}: the checkpoint lacks {key}")
