"""Safetensors checkpoints (one file, a directory, sharded with an index), read tensor by tensor.

No memory map stays open (mapped pages count in RSS): the header is parsed here and each
read seeks to one tensor's bytes and reads exactly those into a fresh torch buffer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BitallocError
from .base import CONFIG_FILES, Source, sample_spans
from .selection import module_name, select_modules

# Float dtypes a weight may be stored in (what `read` converts to float32).
FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_DTYPES = {
    **FLOAT_DTYPES, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
ITEMSIZE = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Names of the safetensors side files bitalloc writes beside a plan or profile (never shards).
SIDE_SUFFIXES = (".calibration.safetensors",)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file, dtype, shape and absolute byte range."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Parse and validate a safetensors header; BitallocError naming the file if corrupt."""
    path = str(path)
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise BitallocError(f"corrupt safetensors file {path}: shorter than its header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(file_size - 8, MAX_HEADER_BYTES):
            raise BitallocError(
                f"corrupt or truncated safetensors file {path}: header length {header_len} "
                f"does not fit in {file_size} bytes"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BitallocError(f"corrupt safetensors file {path}: bad header JSON ({err})") from None
    if not isinstance(header, dict):
        raise BitallocError(f"corrupt safetensors file {path}: header is not a JSON object")
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start, file_size)
    _check_coverage(path, entries, data_start, file_size)
    return entries


def _check_coverage(path: str, entries: dict[str, TensorEntry], data_start: int, file_size: int) -> None:
    """The tensors tile the data section exactly, as the safetensors format requires: no
    shared or overlapping byte ranges, no gaps, no trailing bytes."""
    position = data_start
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != position:
            problem = "overlaps another tensor" if entry.start < position else "leaves a gap before it"
            raise BitallocError(f"corrupt safetensors file {path}: tensor {name} {problem}")
        position = entry.end
    if position != file_size:
        raise BitallocError(
            f"corrupt safetensors file {path}: {file_size - position} bytes after the last tensor"
        )


def _entry(path: str, name: str, info: object, data_start: int, file_size: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        shape = tuple(int(d) for d in shape)
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError):
        raise BitallocError(f"corrupt safetensors file {path}: bad entry for {name}") from None
    if not 0 <= begin <= end or data_start + end > file_size:
        raise BitallocError(
            f"corrupt or truncated safetensors file {path}: tensor {name} lies at bytes "
            f"{data_start + begin}..{data_start + end} of a {file_size}-byte file"
        )
    numel = 1
    for dim in shape:
        numel *= dim
    if dtype in ITEMSIZE and end - begin != numel * ITEMSIZE[dtype]:
        raise BitallocError(
            f"corrupt safetensors file {path}: tensor {name} has {end - begin} bytes, "
            f"expected {numel * ITEMSIZE[dtype]} for {dtype} {list(shape)}"
        )
    return TensorEntry(path, dtype, shape, data_start + begin, data_start + end)


def index_shards(index: Path) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` names (sorted); BitallocError if any is missing."""
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise BitallocError(f"corrupt index file {index}") from None
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise BitallocError(f"shard {missing[0]} named in {index} is missing")
    return [index.parent / s for s in shards]


def is_side_file(path: Path) -> bool:
    """Whether a ``*.safetensors`` file is one of bitalloc's own side files (calibration
    statistics, covariances) rather than a model shard: its name ends in one of
    `SIDE_SUFFIXES`, or its header metadata carries the ``bitalloc`` key they all write."""
    if path.name.endswith(SIDE_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(os.path.getsize(path) - 8, MAX_HEADER_BYTES):
                return False
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError):
        return False  # not readable as a side file: the reader reports it as a shard
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and "bitalloc" in metadata


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: a single file, the shards an index names,
    model.safetensors, or else every *.safetensors in the directory that is not one of
    bitalloc's side files (a plan or profile written into the model folder)."""
    if path.is_file():
        return [path]
    index = path / INDEX_FILE
    if index.is_file():
        return index_shards(index)
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = [file for file in sorted(path.glob("*.safetensors")) if not is_side_file(file)]
    if not files:
        ggufs = sorted(path.glob("*.gguf"))
        hint = ""
        if ggufs:
            hint = f" (found {ggufs[0].name}: pass that file)"
        elif any(path.glob("pytorch_model*.bin")):
            hint = " (found pytorch_model.bin: convert it to safetensors)"
        raise BitallocError(f"not a model directory: no *.safetensors files in {path}{hint}")
    return files


def input_files(path: str | os.PathLike) -> list[Path]:
    """Every file a `SafetensorsSource` of ``path`` (a folder or one .safetensors file) reads:
    the weights, the shard index, and the config, generation settings and tokenizer files
    beside them (`CONFIG_FILES`). A command must not write over any of them."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    files = list(checkpoint_files(path))
    if path.is_dir() and (folder / INDEX_FILE).is_file():
        files.append(folder / INDEX_FILE)
    files += [f for f in sorted(folder.iterdir()) if CONFIG_FILES.match(f.name) and f.is_file()]
    return files


class SafetensorsSource(Source):
    """A safetensors checkpoint: a HF model directory (sharded or not) or one file."""

    def __init__(
        self,
        path: str | os.PathLike,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        name: str | None = None,
        modules: list[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.name = name or str(path)
        if not self.path.exists():
            raise BitallocError(f"model not found: {path}")
        self._folder = self.path if self.path.is_dir() else self.path.parent
        self._entries: dict[str, TensorEntry] = {}
        for file in checkpoint_files(self.path):
            for tensor, entry in read_header(file).items():
                if tensor in self._entries:
                    raise BitallocError(f"tensor {tensor} appears twice in {self.name}")
                self._entries[tensor] = entry
        self.all_matrices = {
            module_name(t): e.shape
            for t, e in self._entries.items()
            if t.endswith(".weight") and len(e.shape) == 2
        }
        selected = select_modules(self.all_matrices, include, exclude, self.name, modules)
        for module in selected:
            entry = self._entries[module + ".weight"]
            if entry.dtype not in FLOAT_DTYPES:
                raise BitallocError(
                    f"weight {module} in {entry.file} is stored as {entry.dtype}, not a float "
                    f"type (already quantized?)"
                )
        self._shapes = {m: self.all_matrices[m] for m in selected}  # type: ignore[misc]
        self.is_causal_lm = any(a.endswith("ForCausalLM") for a in self._config().get("architectures") or [])

    def _config(self) -> dict:
        """config.json beside the weights ({} when there is none); BitallocError if corrupt."""
        file = self._folder / "config.json"
        if not file.is_file():
            return {}
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BitallocError(f"corrupt {file}: {exc}") from None
        if not isinstance(config, dict):
            raise BitallocError(f"corrupt {file}: not a JSON object")
        return config

    def config_dir(self) -> str | None:
        return str(self._folder) if (self._folder / "config.json").is_file() else None

    def _read(self, module: str) -> torch.Tensor:
        return self.load_tensor(module + ".weight")

    def tensor_names(self) -> list[str]:
        return list(self._entries)

    def tensor_nbytes(self, name: str) -> int:
        entry = self._entries[name]
        return entry.end - entry.start

    def stored_dtype(self, name: str) -> torch.dtype:
        return TORCH_DTYPES[self._entries[name].dtype]

    def load_tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        out = torch.empty(entry.shape, dtype=TORCH_DTYPES[entry.dtype])
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else bytearray()
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            got = f.readinto(buffer)
        if got != entry.end - entry.start:
            raise BitallocError(f"truncated safetensors file {entry.file}: cannot read {name}")
        return out

    def require_config(self) -> None:
        if not (self._folder / "config.json").is_file():
            raise BitallocError(f"{self._folder} has no config.json: the model cannot be rebuilt without it")

    def write_config(self, folder: Path) -> None:
        self.require_config()
        folder.mkdir(parents=True, exist_ok=True)
        for file in sorted(self._folder.iterdir()):
            if file.is_file() and CONFIG_FILES.match(file.name):
                shutil.copyfile(file, folder / file.name)

    def input_files(self) -> list[Path]:
        return input_files(self.path)

    def file_stats(self) -> dict[str, list[int]]:
        files = sorted({self._entries[m + ".weight"].file for m in self._shapes})
        return {f: [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files}

    def _stored_bytes(self, module: str) -> tuple[str, Iterable]:
        entry = self._entries[module + ".weight"]

        def chunks():
            with open(entry.file, "rb") as f:
                f.seek(entry.start)
                left = entry.end - entry.start
                while left > 0:
                    chunk = f.read(min(left, 1 << 24))
                    if not chunk:
                        raise BitallocError(f"truncated safetensors file {entry.file}: cannot read {module}")
                    left -= len(chunk)
                    yield chunk

        return entry.dtype, chunks()

    def read_with_digest(self, module: str) -> tuple[torch.Tensor, str]:
        """One read: the stored bytes are hashed before the float32 conversion."""
        raw = self.load_tensor(self._check(module) + ".weight")
        entry = self._entries[module + ".weight"]
        digest = hashlib.sha256(json.dumps([module, list(self._shapes[module]), entry.dtype]).encode())
        if raw.numel():
            digest.update(memoryview(raw.view(-1).view(torch.uint8).numpy()))
        return self._checked(module, raw), digest.hexdigest()

    def _sample(self, module: str) -> tuple[str, bytes]:
        entry = self._entries[module + ".weight"]
        numel = (entry.end - entry.start) // ITEMSIZE[entry.dtype]
        chunks = []
        with open(entry.file, "rb") as f:
            for offset, length in sample_spans(numel, ITEMSIZE[entry.dtype]):
                f.seek(entry.start + offset)
                chunks.append(f.read(length))
        return entry.dtype, b"".join(chunks)
