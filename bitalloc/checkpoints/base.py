"""The `Source` interface: one reader per checkpoint format.

A source lists and reads every tensor of a model lazily, one at a time (what `apply`
writes back), selects the weight matrices to quantize (what `profile` measures), and
writes the files that describe the model (config, tokenizer).
"""

from __future__ import annotations

import abc
import copy
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..errors import BitallocError

# The digest of an older profile (digest format 1) sampled at most this many elements of
# each matrix, in this many spans; `legacy_content_digest` re-checks such profiles.
SAMPLE_ELEMENTS = 4096
SAMPLE_SPANS = 16
# Files copied beside the weights: the config, generation settings and tokenizer files.
CONFIG_FILES = re.compile(
    r"^(?:config\.json|generation_config\.json|.*tokeni[sz]er.*|special_tokens_map\.json|"
    r"added_tokens\.json|vocab\.\w+|merges\.txt|.*\.model|.*\.tiktoken|chat_template\.\w+|"
    r"preprocessor_config\.json)$"
)


def sample_spans(numel: int, itemsize: int) -> list[tuple[int, int]]:
    """Byte (offset, length) spans of a tensor's raw data that `legacy_content_digest` hashes.

    Small tensors are hashed whole; larger ones in SAMPLE_SPANS evenly spaced runs of
    SAMPLE_ELEMENTS // SAMPLE_SPANS elements, first and last elements included.
    """
    if numel <= SAMPLE_ELEMENTS:
        return [(0, numel * itemsize)]
    run = SAMPLE_ELEMENTS // SAMPLE_SPANS
    last = numel - run
    starts = [k * last // (SAMPLE_SPANS - 1) for k in range(SAMPLE_SPANS)]
    return [(start * itemsize, run * itemsize) for start in starts]


def combine_digests(digests: dict[str, str]) -> str:
    """One sha256 over per-matrix digests, in their order."""
    return hashlib.sha256(json.dumps(list(digests.items()), separators=(",", ":")).encode()).hexdigest()


class Source(abc.ABC):
    """A model's weight matrices, read lazily: nothing but names and shapes stay in memory.

    Subclasses fill `_shapes` (selected module name -> (out, in), in natural order) and
    `all_matrices` (every 2-D weight by module name), and implement `_read` (the raw
    matrix, any float dtype), `_sample` (dtype + raw bytes for the content digest),
    `tensor_names`/`tensor_nbytes`/`load_tensor` (every tensor, for writing a checkpoint)
    and `write_config`.
    """

    name: str
    _shapes: dict[str, tuple[int, int]]
    all_matrices: dict[str, tuple[int, int]]
    is_causal_lm: bool = False
    # tensors a checkpoint writer leaves out (harmless extras: `skeleton.unexpected_tensors`)
    dropped_tensors: frozenset[str] = frozenset()

    def modules(self) -> list[str]:
        """Selected matrix module names, e.g. "model.layers.0.self_attn.q_proj"."""
        return list(self._shapes)

    def shape(self, module: str) -> tuple[int, int]:
        """(out, in) of a selected matrix, without reading its data."""
        return self._shapes[self._check(module)]

    def read(self, module: str) -> torch.Tensor:
        """The matrix as a fresh float32 (out, in) CPU tensor; BitallocError on NaN/Inf."""
        return self._checked(module, self._read(self._check(module)))

    def _checked(self, module: str, weight: torch.Tensor) -> torch.Tensor:
        """float32, the expected shape, finite values, at least one element."""
        if weight.dtype != torch.float32:
            weight = weight.to(torch.float32)
        if tuple(weight.shape) != self._shapes[module]:
            raise BitallocError(
                f"weight {module} in {self.name} has shape {tuple(weight.shape)}, "
                f"expected {self._shapes[module]}"
            )
        if not np.isfinite(weight.numpy()).all():  # numpy: no thread-pool start-up per call
            raise BitallocError(f"NaN or Inf values in weight {module} of {self.name}")
        return weight

    def with_modules(self, modules: list[str]) -> Source:
        """A copy of this source selecting exactly ``modules`` (e.g. a plan's matrices)."""
        from .selection import select_modules

        selected = select_modules(self.all_matrices, None, None, self.name, modules)
        other = copy.copy(self)
        other._shapes = {name: self.all_matrices[name] for name in selected}
        return other

    def fingerprint(self) -> str:
        """sha256 of the selected (name, shape) list: the same model gives the same value
        whatever kind of source it comes from."""
        listing = [[name, list(shape)] for name, shape in self._shapes.items()]
        return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()

    def tensor_digest(self, module: str) -> str:
        """sha256 of a selected matrix's stored bytes (with its name, shape and dtype): every
        byte counts, so a single edited value gives another digest."""
        digest = hashlib.sha256()
        dtype, chunks = self._stored_bytes(self._check(module))
        digest.update(json.dumps([module, list(self._shapes[module]), dtype]).encode())
        for chunk in chunks:
            digest.update(chunk)
        return digest.hexdigest()

    def read_with_digest(self, module: str) -> tuple[torch.Tensor, str]:
        """`read` and `tensor_digest` together (formats that can hash while reading read once)."""
        return self.read(module), self.tensor_digest(module)

    def content_digest(self) -> str:
        """sha256 over every selected matrix's `tensor_digest` (reads all the weights)."""
        return combine_digests({m: self.tensor_digest(m) for m in self._shapes})

    def legacy_content_digest(self) -> str:
        """The sampled digest that profiles of digest format 1 recorded (to re-check them)."""
        digest = hashlib.sha256()
        for module, shape in self._shapes.items():
            dtype, data = self._sample(module)
            digest.update(json.dumps([module, list(shape), dtype]).encode())
            digest.update(data)
        return digest.hexdigest()

    def file_stats(self) -> dict[str, list[int]]:
        """{file: [size, mtime_ns]} of the files the selected matrices are stored in ({} for
        an in-memory model): unchanged stats let a resume trust recorded digests."""
        return {}

    def changed_modules(self, digests: dict[str, str], stats: dict, verify: bool = False) -> list[str]:
        """Which of ``digests`` (module -> recorded digest) no longer match the weights. Only
        matrices whose files changed since ``stats`` were recorded are re-hashed (all with
        ``verify``); an in-memory model is always re-hashed."""
        current = self.file_stats()
        if not verify and current and current == stats:
            return []
        return [m for m, d in digests.items() if m not in self._shapes or self.tensor_digest(m) != d]

    def config_dir(self) -> str | None:
        """A directory with config.json (and tokenizer files), or None."""
        return None

    def input_files(self) -> list[Path]:
        """Every file this source reads (weights, config, tokenizer; [] for an in-memory
        model): the inputs that no output of a command may overwrite."""
        return []

    # ---- every tensor (for writing a checkpoint) -----------------------------------------
    @abc.abstractmethod
    def tensor_names(self) -> list[str]:
        """Checkpoint names of every tensor, in checkpoint order."""

    @abc.abstractmethod
    def tensor_nbytes(self, name: str) -> int:
        """Bytes of ``name`` as `load_tensor` returns it."""

    def stored_dtype(self, name: str) -> torch.dtype | None:
        """The float dtype ``name`` is stored in, None for a quantized storage type (a GGUF's
        Q8_0...) that `load_tensor` expands to float32; by default `load_tensor`'s dtype."""
        return self.load_tensor(name).dtype

    @abc.abstractmethod
    def load_tensor(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor by checkpoint name, in its stored dtype (float32 for GGUF)."""

    def require_config(self) -> None:  # noqa: B027 (most formats always can)
        """BitallocError unless `write_config` can work (checked before any long work)."""

    @abc.abstractmethod
    def write_config(self, folder: Path) -> None:
        """Write config.json (architectures set) and the tokenizer files into ``folder``;
        BitallocError when the model has no config to build it from."""

    def close(self) -> None:
        """Release open files; the source is unusable afterwards."""
        self._shapes = {}

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self._shapes)} matrices)"

    def _check(self, module: str) -> str:
        if module not in self._shapes:
            raise BitallocError(f"no selected weight matrix {module!r} in {self.name}")
        return module

    @abc.abstractmethod
    def _read(self, module: str) -> torch.Tensor:
        """The raw (out, in) tensor in its stored float dtype (owned, not a view on a file)."""

    @abc.abstractmethod
    def _stored_bytes(self, module: str) -> tuple[str, Iterable]:
        """(dtype name, chunks of the stored bytes) of a selected matrix, for `tensor_digest`."""

    @abc.abstractmethod
    def _sample(self, module: str) -> tuple[str, bytes]:
        """(dtype name, bytes at `sample_spans` of the stored data) for `content_digest`."""
