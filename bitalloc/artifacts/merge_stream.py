"""`merge`: an `apply` output plus its LoRA adapter as one plain 16-bit checkpoint, streamed.

``merge(OUT, MERGED)`` reads ``OUT/quantized`` (or a `save_pretrained` copy of it) and the
adapter (``OUT/adapter``, or one the user trained and saved) one tensor at a time: each
packed matrix is dequantized to the compute dtype and gets its ``scaling · B · A`` added,
every other float tensor is cast to the compute dtype, and each result is written straight
into a safetensors shard whose header was laid out before any tensor was read. Memory holds
one tensor (and its A and B) at a time, never the model.

The arithmetic is the in-memory merge's (`merge.QuantLoraLinear`, PEFT's dense merge): Q from
the same dequantization as `QuantLinear`, PEFT's ``get_delta_weight`` (B @ A in float32, A
and B as PEFT holds them after loading: float32) times PEFT's scaling, added in place to Q in
the compute dtype. So the files hold the weights that ``merge_and_unload()`` of the model
loaded in that dtype gives, and those of merging into ``apply --dequantized`` (same dtype).

The output is a transformers checkpoint (config.json without the ``quantization_config``,
tokenizer and generation files copied) that loads with no bitalloc import. It is built in
``MERGED.partial/``, checked (headers, every tensor in its place, every parameter present)
and renamed to ``MERGED``; on any error the work folder is removed and nothing is left.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints.base import CONFIG_FILES
from ..checkpoints.safetensors import TORCH_DTYPES, read_header
from ..errors import BitallocError, check_path
from ..fileio import WorkFolder, check_free_space, check_name
from .hf_quantizer import check_folder, unmark_config
from .nn import PACKED_NAMES, QUANT_FILE, dequantize_parts, packed_entries, packed_files, read_quant_info
from .writer import DEQUANTIZED_DTYPES, MAX_SHARD_BYTES

ADAPTER_WEIGHTS = "adapter_model.safetensors"
SAFETENSORS_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
PEFT_PREFIX = "base_model.model."
# LoRA settings the streamed merge does not reproduce: refused rather than merged wrong.
UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save", "trainable_token_indices")


@dataclass(frozen=True)
class Lora:
    """Where one module's LoRA factors are stored (read only when its weight is merged), its
    rank, and PEFT's scaling for it."""

    file: Path
    key: str  # "base_model.model.<module>": the factors are <key>.lora_A.weight, <key>.lora_B.weight
    rank: int
    scaling: float

    def delta(self) -> torch.Tensor:
        """PEFT's ``get_delta_weight``: (B @ A) * scaling, with A and B in float32 as PEFT
        holds them after ``PeftModel.from_pretrained`` (its default ``autocast_adapter_dtype``)."""
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt") as handle:
            A = handle.get_tensor(f"{self.key}.lora_A.weight").float()
            B = handle.get_tensor(f"{self.key}.lora_B.weight").float()
        return (B @ A) * self.scaling


@dataclass(frozen=True)
class Entry:
    """One output tensor: its name, dtype, shape and how to compute it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    compute: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# shape: the public function's documented options (the merge CLI's twin)
def merge(
    out_dir: str | os.PathLike,
    merged_dir: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    dtype: str = "bf16",
    max_shard_bytes: int = MAX_SHARD_BYTES,
    quiet: bool = False,
) -> Path:
    """Write ``merged_dir``: the model of ``out_dir`` (an `apply` output) with its LoRA adapter
    merged, as a plain checkpoint in ``dtype`` (bf16, fp16 or fp32), streamed tensor by tensor
    (see the module docstring). ``adapter`` is an adapter folder to merge instead of
    ``out_dir/adapter`` (one trained from it and saved with ``save_pretrained``). Shards hold
    at most ``max_shard_bytes``. BitallocError, with nothing written, when ``merged_dir``
    exists, ``out_dir`` is not an apply output, the adapter is missing or does not fit the
    model, or a weights file is corrupt."""
    check_path(out_dir, "out_dir (a folder written by bitalloc apply)")
    check_path(merged_dir, "merged_dir")
    if dtype not in DEQUANTIZED_DTYPES:
        raise BitallocError(f"unknown dtype {dtype!r}: bf16, fp16 or fp32")
    merged = check_name(merged_dir)
    partial = Path(f"{merged}.partial")
    WorkFolder.sweep(partial)
    if merged.exists() or merged.is_symlink():
        raise BitallocError(f"output {merged} already exists: remove it or choose another -o")
    quantized, modules, files = _open_quantized(Path(out_dir))
    own = adapter is None
    if not own:
        check_path(adapter, "adapter (a LoRA adapter folder)")
    adapter_dir = Path(out_dir) / "adapter" if own else Path(adapter)
    loras = read_adapter(adapter_dir, quantized, modules, files, own)
    entries = _entries(modules, files, loras, DEQUANTIZED_DTYPES[dtype])
    check_free_space(merged, sum(e.nbytes for e in entries), f"the output {merged}")
    work = WorkFolder(partial).open()
    try:
        work.clear()
        build = partial / "build"
        _write(build, entries, quantized, max_shard_bytes, quiet, DEQUANTIZED_DTYPES[dtype])
        check_merged(build, entries, str(merged))
        if merged.exists() or merged.is_symlink():
            raise BitallocError(f"output {merged} appeared while merge ran")
        os.replace(build, merged)
    finally:
        work.remove()
    return merged


def _open_quantized(out: Path) -> tuple[Path, dict, list[Path]]:
    """``OUT/quantized`` (or ``out`` itself when it is such a folder), its packed modules and
    weights files, checked from the headers (sizes and dtypes against the per-module configs)."""
    if not out.is_dir():
        raise BitallocError(f"{out} is not a folder written by bitalloc apply")
    quantized = out / "quantized"
    if not (quantized / "config.json").is_file():
        raise BitallocError(
            f"{out} is not a bitalloc apply output: it has no quantized/config.json (give the folder "
            "apply wrote, the one holding quantized/ and adapter/)"
        )
    info = read_quant_info(quantized)
    if "weights" not in info:
        raise BitallocError(
            f"{quantized} was written by an earlier bitalloc (no quantization_config): apply again"
        )
    packed = packed_entries(info)  # the modules, and an input embedding stored packed (dense here)
    check_folder(quantized, packed, info["weights"])
    return quantized, packed, packed_files(quantized)


def read_adapter(
    folder: Path, quantized: Path, modules: dict, files: list[Path], own: bool
) -> dict[str, Lora]:
    """Every LoRA module of the adapter in ``folder`` with its factors and scaling, checked
    against the checkpoint; ``own``: it is the adapter `apply` wrote beside ``quantized``, so
    its targets and ranks must be the ones ``bitalloc_quant.json`` records."""
    from peft.utils.other import get_pattern_key

    from ..checkpoints.safetensors import FLOAT_DTYPES

    config = _adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise BitallocError(f"{folder} has no {ADAPTER_WEIGHTS} (only safetensors adapters can be merged)")
    shapes = _stored_shapes(modules, files)
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, entry in read_header(weights).items():  # a corrupt file is one error here
        module, part = _lora_key(key, folder)
        if entry.dtype not in FLOAT_DTYPES:
            raise BitallocError(f"the adapter in {folder} stores {key} as {entry.dtype}, not floats")
        factors.setdefault(module, {})[part] = tuple(entry.shape)
    loras = {}
    for module, pair in factors.items():
        if set(pair) != {"lora_A", "lora_B"} or module not in shapes:
            what = "lacks lora_A or lora_B" if module in shapes else f"is not a Linear weight of {quantized}"
            raise BitallocError(
                f"the adapter in {folder} targets {module}, which {what}: an adapter for another model"
            )
        A, B = pair["lora_A"], pair["lora_B"]
        rows, cols = shapes[module]
        if len(A) != 2 or len(B) != 2 or A[1] != cols or B[0] != rows or A[0] != B[1]:
            raise BitallocError(
                f"the adapter in {folder} has {module} factors {list(B)} x {list(A)}, which "
                f"do not fit its {rows}x{cols} weight: an adapter for another model"
            )
        r = config["rank_pattern"].get(get_pattern_key(config["rank_pattern"].keys(), module), config["r"])
        alpha = config["alpha_pattern"].get(
            get_pattern_key(config["alpha_pattern"].keys(), module), config["lora_alpha"]
        )
        if r != A[0]:
            raise BitallocError(f"the adapter in {folder}: {module} has rank {A[0]}, its config says {r}")
        scaling = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
        loras[module] = Lora(weights, PEFT_PREFIX + module, r, scaling)
    if own:
        _check_own(folder, quantized, loras)
    return loras


def _adapter_config(folder: Path) -> dict:
    """adapter_config.json with PEFT's defaults; BitallocError for a missing or unsupported one."""
    file = folder / "adapter_config.json"
    if not file.is_file():
        raise BitallocError(
            f"no LoRA adapter at {folder} (no adapter_config.json): give one with --adapter "
            "(Q alone, with no adapter, is what `apply --dequantized` writes)"
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BitallocError(f"cannot read {file}: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise BitallocError(f"{file} is not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    for option in UNSUPPORTED:
        if config.get(option):
            raise BitallocError(
                f"{file} uses {option}, which bitalloc merge does not support: merge with PEFT"
            )
    patterns = {key: config.get(key) or {} for key in ("rank_pattern", "alpha_pattern")}
    return {"r": config.get("r", 8), "lora_alpha": config.get("lora_alpha", 8), **patterns,
            "use_rslora": bool(config.get("use_rslora", False))}  # fmt: skip


def _lora_key(key: str, folder: Path) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A.weight`` -> (module, "lora_A")."""
    stem, _, last = key.rpartition(".")
    module, _, part = stem.rpartition(".")
    if not key.startswith(PEFT_PREFIX) or last != "weight" or part not in ("lora_A", "lora_B"):
        raise BitallocError(f"the adapter in {folder} holds {key}, which bitalloc merge does not handle")
    return module.removeprefix(PEFT_PREFIX), part


def _stored_shapes(modules: dict, files: list[Path]) -> dict[str, tuple[int, int]]:
    """(out, in) of every matrix in the checkpoint: packed modules and 2-D dense ``.weight``s."""
    shapes = {name: tuple(entry["shape"]) for name, entry in modules.items()}
    for file in files:
        for name, entry in read_header(file).items():
            if name.endswith(".weight") and len(entry.shape) == 2:
                shapes.setdefault(name.removesuffix(".weight"), tuple(entry.shape))
    return shapes


def _check_own(folder: Path, quantized: Path, loras: dict[str, Lora]) -> None:
    """The adapter beside ``quantized`` targets exactly its packed modules of rank > 0, at
    the recorded ranks; anything else is an adapter from another apply."""
    try:
        recorded = json.loads((quantized / QUANT_FILE).read_text(encoding="utf-8"))["modules"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a save_pretrained copy: no record to compare with
    want = {name: int(entry.get("rank", 0)) for name, entry in recorded.items() if entry.get("rank", 0)}
    have = {name: lora.rank for name, lora in loras.items()}
    if want != have:
        first = sorted(set(want.items()) ^ set(have.items()))[0][0]
        raise BitallocError(
            f"the adapter in {folder} was not made for {quantized} ({first}: rank {have.get(first)} in the "
            f"adapter, {want.get(first)} in {QUANT_FILE}): an adapter for another plan or model"
        )


def _entries(modules: dict, files: list[Path], loras: dict[str, Lora], dtype: torch.dtype) -> list[Entry]:
    """Every output tensor in checkpoint order: a packed module's parts become its merged
    ``.weight``, a dense weight with LoRA is merged, other float tensors are cast to ``dtype``."""

    headers = {file: read_header(file) for file in files}
    where = {name: file for file, header in headers.items() for name in header}
    entries, seen = [], set()
    for file, header in headers.items():
        for name, stored in header.items():
            stem, _, part = name.rpartition(".")
            module = stem.removesuffix(".weight")
            if stem.endswith(".weight") and part in PACKED_NAMES and module in modules:
                if module not in seen:
                    seen.add(module)
                    shape = tuple(modules[module]["shape"])
                    compute = _packed(
                        module, modules[module]["config"], shape, where, loras.get(module), dtype
                    )
                    entries.append(Entry(f"{module}.weight", dtype, shape, compute))
                continue
            stored_dtype = TORCH_DTYPES[stored.dtype]
            out_dtype = dtype if stored_dtype.is_floating_point else stored_dtype

            lora = loras.get(module) if name.endswith(".weight") else None
            entries.append(Entry(name, out_dtype, tuple(stored.shape), _dense(file, name, out_dtype, lora)))
    return entries


def _dense(file: Path, name: str, dtype: torch.dtype, lora: Lora | None) -> Callable[[], torch.Tensor]:
    """Loader of a stored tensor in ``dtype`` (plus the LoRA product for a weight with one)."""
    from safetensors import safe_open

    def compute() -> torch.Tensor:
        with safe_open(str(file), framework="pt") as handle:
            return _add_lora(handle.get_tensor(name).to(dtype), lora)

    return compute


def _packed(module: str, config: str, shape: tuple[int, int], where: dict[str, Path], lora: Lora | None,
            dtype: torch.dtype) -> Callable[[], torch.Tensor]:  # fmt: skip
    """Loader of a packed module's merged weight (``where``: the file of each stored tensor):
    Q as `QuantLinear` dequantizes it, plus the LoRA product."""
    from safetensors import safe_open

    from ..quant import QuantConfig

    def compute() -> torch.Tensor:
        parts = {}
        for part in PACKED_NAMES:
            key = f"{module}.weight.{part}"
            if key in where:
                with safe_open(str(where[key]), framework="pt") as handle:
                    parts[part] = handle.get_tensor(key)
        return _add_lora(dequantize_parts(parts, QuantConfig.parse(config), shape, dtype), lora)

    return compute


def _add_lora(weight: torch.Tensor, lora: Lora | None) -> torch.Tensor:
    """PEFT's unsafe merge: ``weight += (B @ A) * scaling``, B and A in float32, in place."""
    if lora is not None:
        weight += lora.delta()
    return weight


# ---- writing ----------------------------------------------------------------------------


def _shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


# shape: a build step with the run's settings, called once
def _write(build: Path, entries: list[Entry], quantized: Path, max_shard_bytes: int, quiet: bool,
           dtype: torch.dtype) -> None:  # fmt: skip
    """The shards (one tensor in memory at a time), the index, config.json and the tokenizer."""
    from tqdm.auto import tqdm

    build.mkdir(parents=True)
    shards = _shards(entries, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]  # fmt: skip
    bar = tqdm(total=len(entries), unit="tensor", desc="merge", disable=quiet, dynamic_ncols=True)
    try:
        for name, shard in zip(names, shards):
            write_safetensors(build / name, shard, bar.update)
    finally:
        bar.close()
    if len(shards) > 1:
        weight_map = {e.name: name for name, shard in zip(names, shards) for e in shard}
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
        (build / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n", encoding="utf-8"
        )
    for file in quantized.iterdir():
        if file.name == "config.json":
            unmark_config(file, build / file.name)
            config = json.loads((build / file.name).read_text(encoding="utf-8"))
            config["dtype"] = str(dtype).removeprefix("torch.")
            config.pop("torch_dtype", None)
            (build / file.name).write_text(
                json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
        elif CONFIG_FILES.match(file.name) and file.is_file():
            shutil.copyfile(file, build / file.name)


def write_safetensors(path: Path, entries: list[Entry], done: Callable[[], object] = lambda: None) -> None:
    """A safetensors file written as a stream: the header from the entries' dtypes and
    shapes, then each tensor computed and written in turn (checked against its entry)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": SAFETENSORS_NAMES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}  # fmt: skip
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for entry in entries:
            tensor = entry.compute()
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise BitallocError(f"{entry.name}: computed {tensor.dtype} {list(tensor.shape)}, expected "
                                    f"{entry.dtype} {list(entry.shape)}")  # fmt: skip
            handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
            done()
        handle.flush()
        os.fsync(handle.fileno())


def check_merged(folder: Path, entries: list[Entry], name: str) -> None:
    """What was written is what was planned (headers), every tensor has its place in the
    model its config.json describes, and every parameter of that model is present."""
    from ..checkpoints import open_source
    from ..checkpoints.skeleton import build_skeleton, unexpected_tensors

    stored = {}
    for file in sorted(folder.glob("*.safetensors")):
        stored.update(read_header(file))
    planned = {e.name: (SAFETENSORS_NAMES[e.dtype], e.shape) for e in entries}
    if {k: (v.dtype, tuple(v.shape)) for k, v in stored.items()} != planned:
        raise BitallocError(f"{folder}: the written tensors differ from the planned ones")
    reader = open_source(folder)
    unexpected_tensors(reader, reader)
    model = build_skeleton(folder, name)
    missing = [key for key, _ in model.named_parameters() if key not in stored]
    if missing:
        raise BitallocError(f"{name}: the merged checkpoint lacks {missing[0]}")
