"""Activation statistics for the data-aware objective: h = diag(XᵀX)/n per input channel.

What matters for a quantized layer is its output error ‖(W − Ŵ)X‖, whose diagonal
approximation is ‖(W − Ŵ)·diag(√h)‖²_F with h the second moment of each input channel
over calibration tokens. `calibrate` runs the model over those tokens one transformer
block at a time (`bitalloc.checkpoints.runnable`), with forward hooks on the Linear layers,
so a large model never sits whole in memory. h is damped (h + 0.01·mean(h)) so that
dead channels cannot blow the weights up.

h is stored per module in a safetensors file beside the profile (``profile.parquet`` ->
``profile.calibration.safetensors``); its sha256 goes in the profile metadata, so `apply`
can reuse exactly the same h (`load_column_weights`).

The output objective needs the full second moment H = XᵀX/n (in x in) of each Linear's
input instead. Linears that read the same tensor (q/k/v, gate/up) share one H. It is
accumulated in float64 one block at a time, written to the same kind of file as float32
(one tensor per shared input; `Covariances` reads them back one at a time), so memory
holds one block's H and the file holds all of them: 4·d_in² bytes per distinct input.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import open_source
from ..checkpoints.runnable import BATCH_TOKENS, can_run, load_tokenizer, run_blocks, runnable
from ..errors import BitallocError
from ..fileio import atomic_path
from ..texts import DEFAULT_TEXT, describe_text, read_text, text_digest, tokenize, windows
from .settings import DEFAULT_CONTEXT, DEFAULT_TOKENS, OBJECTIVES, CalibrationSettings

DAMPING = 0.01
CALIBRATION_FORMAT = "bitalloc.calibration/v1"
COVARIANCE_FORMAT = "bitalloc.covariance/v1"
CHUNK = 1 << 24  # bytes per read when hashing or copying a (large) calibration file
CALIBRATION_SUFFIX = ".calibration.safetensors"


@dataclass
class Calibration:
    """Damped per-input-channel second moments by module name (or, for the output objective,
    the full input covariances), and what produced them."""

    column_weights: dict[str, torch.Tensor] | None
    info: dict  # text, text_sha256, tokens, context, damping, digest (of the safetensors bytes)
    seconds: float = field(default=0.0, compare=False)
    covariances: Covariances | None = field(default=None, compare=False, repr=False)

    @property
    def statistics(self) -> dict[str, torch.Tensor] | Covariances:
        """What the decomposition is weighted with: h by module, or the covariances."""
        return self.covariances if self.covariances is not None else self.column_weights


class Covariances:
    """The input covariances H of a calibration file, read one at a time (a large model's do
    not fit in memory together). ``covariances[module]`` is H (in, in), float32; modules
    reading the same input share one tensor in the file. The file's sha256 is checked
    against ``digest`` (streamed) when it is opened. ``damping`` (λ, a fraction of mean
    diag H) is what the decompositions add: a profile setting, carried along here."""

    def __init__(self, path: str | os.PathLike, digest: str | None = None, damping: float = DAMPING):
        from safetensors import safe_open

        self.path, self.damping = Path(path), damping
        self.digest = file_digest(self.path)
        if digest is not None and self.digest != digest:
            raise BitallocError(
                f"{self.path} does not hold the expected input covariances "
                f"(sha256 {self.digest[:12]}, expected {digest[:12]})"
            )
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                metadata = json.loads((handle.metadata() or {}).get("bitalloc", "{}"))
                names = set(handle.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise BitallocError(f"{self.path} is not a calibration file: {exc}") from None
        if metadata.get("format") != COVARIANCE_FORMAT or not isinstance(metadata.get("groups"), dict):
            raise BitallocError(f"{self.path} holds no input covariances (a diagonal calibration file?)")
        self.groups: dict[str, str] = metadata["groups"]
        self.info: dict = metadata.get("info", {})
        missing = sorted(set(self.groups.values()) - names)
        if missing:
            raise BitallocError(f"{self.path} is incomplete: no tensor {missing[0]}")
        self._cached: tuple[str, torch.Tensor] | None = None

    def __contains__(self, module: object) -> bool:
        return module in self.groups

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def keys(self):
        return self.groups.keys()

    def __getitem__(self, module: str) -> torch.Tensor:
        from safetensors import safe_open

        if module not in self.groups:
            raise BitallocError(f"calibration file {self.path} has no input covariance for {module}")
        key = self.groups[module]
        if self._cached is None or self._cached[0] != key:
            with safe_open(str(self.path), framework="pt") as handle:
                self._cached = (key, handle.get_tensor(key))
        return self._cached[1]

    def shape(self, module: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as handle:
            return tuple(handle.get_slice(self.groups[module]).get_shape())


def weighting(statistics, module: str) -> dict:
    """The keyword arguments that weight `loftq`'s decomposition of ``module`` as its profile
    did: ``column_weights`` (h), ``input_covariance`` and ``damping`` (H), or nothing."""
    if statistics is None:
        return {}
    if isinstance(statistics, Covariances):
        return {"input_covariance": statistics[module], "damping": statistics.damping}
    return {"column_weights": statistics[module]}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise BitallocError(f"calibration file {path} cannot be read: {exc.strerror or exc}") from None
    return digest.hexdigest()


def copy_verified(source: str | os.PathLike, target: str | os.PathLike, digest: str | None) -> None:
    """Put a copy of calibration file ``source`` at ``target`` atomically, checked against
    ``digest``: a hard link where the file system allows (no second copy of what may be
    gigabytes), else a chunked copy. The copy's bytes are hashed before it is renamed in."""
    source, target = Path(source), Path(target)
    with atomic_path(target) as temp:
        try:
            temp.unlink()
            os.link(source, temp)
        except OSError:
            try:
                with open(source, "rb") as reader, open(temp, "wb") as writer:
                    while chunk := reader.read(CHUNK):
                        writer.write(chunk)
            except OSError as exc:
                raise BitallocError(
                    f"calibration file {source} cannot be copied: {exc.strerror or exc}"
                ) from None
        found = file_digest(temp)
        if digest is not None and found != digest:
            raise BitallocError(
                f"{source} does not hold the plan's calibration (sha256 {found[:12]}, expected {digest[:12]})"
            )


def calibration_path(path: str | os.PathLike) -> Path:
    """Where the h of a profile or plan lives: ``profile.parquet`` ->
    ``profile.calibration.safetensors``, ``plan.json`` -> ``plan.calibration.safetensors``."""
    path = Path(path)
    return path.with_name(path.stem + CALIBRATION_SUFFIX)


def calibration_spec(
    text: str | os.PathLike | None = DEFAULT_TEXT,
    tokens: int = DEFAULT_TOKENS,
    context: int = DEFAULT_CONTEXT,
    input_ids: torch.Tensor | None = None,
    covariance: bool = False,
) -> dict:
    """What identifies a calibration run (it goes in the profile settings): the text's name
    and sha256, the tokens asked for, the context and the damping (and, for full input
    covariances, ``statistic``). ``text`` None or "default" is the built-in text;
    ``input_ids`` (token ids given directly) replace it."""
    if tokens <= 0 or context <= 0:
        raise BitallocError(f"calibration tokens and context must be positive, got {tokens}, {context}")
    if input_ids is not None:
        ids = input_ids.to(torch.long).contiguous()
        name, digest = "input_ids", hashlib.sha256(ids.numpy().tobytes()).hexdigest()
        context = ids.shape[-1] if ids.dim() == 2 else context
    else:
        name, digest = describe_text(text), text_digest(read_text(text))
    spec = {
        "text": name,
        "text_sha256": digest,
        "tokens": int(tokens),
        "context": int(context),
        "damping": DAMPING,
    }
    if covariance:  # H is stored undamped: λ is the profile's setting, not the file's
        spec.update(statistic="covariance", damping=0.0)
    return spec


def calibrate(
    model: str | os.PathLike | nn.Module,
    modules: Sequence[str] | None = None,
    *,
    text: str | os.PathLike | None = DEFAULT_TEXT,
    tokens: int = DEFAULT_TOKENS,
    context: int = DEFAULT_CONTEXT,
    input_ids: torch.Tensor | None = None,
    quiet: bool = True,
    covariance: bool = False,
    path: str | os.PathLike | None = None,
) -> Calibration:
    """h for every Linear in ``modules`` (default: what `profile` selects) of ``model``, or
    with ``covariance`` the full input covariances H, written to ``path`` (a calibration
    file; default: a temporary file that lives as long as the returned value).

    ``model``: an HF folder (built on the meta device, blocks read from the safetensors one
    at a time), a GGUF file (the same, tensors dequantized one at a time), or an in-memory
    transformers model (run as it is). The tokens are the first ``tokens`` of ``text`` (a
    file, or "default": the built-in text, see `bitalloc.texts`) in windows of
    ``context``, or ``input_ids`` given directly ((n, context) or 1-D; no tokenizer needed).
    """
    start = time.perf_counter()
    if modules is None:
        with open_source(model) as source:
            modules = source.modules()
    info = calibration_spec(text, tokens, context, input_ids, covariance)
    with runnable(model) as (net, load, tokenizer_dir):
        ids = token_windows(model, tokenizer_dir, text, tokens, context, input_ids)
        info.update(tokens=int(ids.numel()), context=int(ids.shape[1]))
        if covariance:
            keeper = None
            if path is None:
                keeper = tempfile.TemporaryDirectory(prefix="bitalloc-covariance-")
                path = Path(keeper.name) / "calibration.safetensors"
            writer = CovarianceWriter(path)
            collect_covariances(net, ids, modules, writer, load=load, quiet=quiet)
            info["digest"] = writer.finish(info)
            covariances = Covariances(path, info["digest"])
            covariances._keeper = keeper  # the temporary folder goes when the reader does
            return Calibration(None, info, time.perf_counter() - start, covariances)
        column_weights = collect_column_weights(net, ids, modules, load=load, quiet=quiet)
    info["digest"] = hashlib.sha256(_serialize(column_weights, info)).hexdigest()
    return Calibration(column_weights, info, time.perf_counter() - start)


def token_windows(model, tokenizer_dir, text, tokens: int, context: int, input_ids=None) -> torch.Tensor:
    """The calibration tokens as (n, context) windows: the first ``tokens`` of ``text``
    (tokenized with the model's tokenizer), or ``input_ids`` (1-D: cut and windowed; 2-D:
    as given)."""
    if input_ids is None:
        ids = tokenize(load_tokenizer(tokenizer_dir, model), read_text(text), tokens)
    elif input_ids.dim() == 1:
        ids = input_ids.to(torch.long).reshape(-1)[:tokens]
    else:
        return input_ids.to(torch.long)
    return windows(ids, context)


def collect_column_weights(
    net: nn.Module,
    input_ids: torch.Tensor,
    modules: Sequence[str],
    *,
    load: Callable[[str], torch.Tensor] | None = None,
    damping: float = DAMPING,
    batch_tokens: int = BATCH_TOKENS,
    quiet: bool = True,
) -> dict[str, torch.Tensor]:
    """Damped diag(XᵀX)/n of each named Linear's input over ``input_ids`` (n, context),
    running ``net`` one block at a time. Parameters still on the meta device are read with
    ``load(name)`` when their module runs and released after their block."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def on_block(prefix: str, block: nn.Module) -> list:
        hooks = []
        for name in [m for m in modules if m.startswith(prefix)]:
            linear = net.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise BitallocError(
                    f"{name} is a {type(linear).__name__}, not an nn.Linear: cannot calibrate it"
                )
            hooks.append(linear.register_forward_pre_hook(_accumulator(name, sums, counts)))
        return hooks

    run_blocks(net, input_ids, modules, on_block, load=load, batch_tokens=batch_tokens, quiet=quiet)
    means = {name: float(sums[name].mean() / counts[name]) for name in sums}
    unrouted = [name for name in modules if name not in sums and is_expert(name)]
    for name in unrouted:  # planned on its weights: h flat, at its peers' level
        sums[name] = torch.full((net.get_submodule(name).in_features,), unrouted_level(name, means))
        counts[name] = 1
    warn_unrouted(unrouted, len(input_ids))
    result = {}
    for name in modules:
        h = (sums[name] / counts[name]).float().cpu()
        result[name] = (h + damping * h.mean()).contiguous()
    return result


def collect_covariances(
    net: nn.Module,
    input_ids: torch.Tensor,
    modules: Sequence[str],
    writer: CovarianceWriter,
    *,
    load: Callable[[str], torch.Tensor] | None = None,
    batch_tokens: int = BATCH_TOKENS,
    quiet: bool = True,
) -> None:
    """XᵀX/n (float64 sums, written as float32) of each named Linear's input over
    ``input_ids``, one block at a time: each block's covariances go to ``writer`` when the
    next block starts, so memory holds one block's. Linears whose forward receives the very
    same input tensor (q/k/v, gate/up) share one accumulator and one stored tensor."""
    state: dict = {"sums": {}, "counts": {}, "groups": {}, "seen": [], "unrouted": []}

    def flush() -> None:
        groups: dict[str, str] = state["groups"]
        for key in dict.fromkeys(groups.values()):
            covariance = (state["sums"][key] / state["counts"][key]).float()
            writer.add(key, covariance, [m for m, k in groups.items() if k == key])
        means = {m: float(state["sums"][k].diagonal().mean() / state["counts"][k]) for m, k in groups.items()}
        for name in [m for m in state.get("block", []) if m not in groups and is_expert(m)]:
            # an expert no calibration token reached: planned on its weights (H flat, at its peers' level)
            size = net.get_submodule(name).in_features
            writer.add(name, torch.eye(size) * unrouted_level(name, means), [name])
            state["unrouted"].append(name)
        state.update(sums={}, counts={}, groups={}, seen=[])

    def on_block(prefix: str, block: nn.Module) -> list:
        flush()
        state["block"] = [m for m in modules if m.startswith(prefix)]
        hooks = [block.register_forward_pre_hook(lambda *_: state["seen"].clear())]
        for name in [m for m in modules if m.startswith(prefix)]:
            linear = net.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise BitallocError(
                    f"{name} is a {type(linear).__name__}, not an nn.Linear: cannot calibrate it"
                )
            hooks.append(linear.register_forward_pre_hook(_covariance_accumulator(name, state)))
        return hooks

    run_blocks(net, input_ids, modules, on_block, load=load, batch_tokens=batch_tokens, quiet=quiet)
    flush()
    warn_unrouted(state["unrouted"], len(input_ids))
    missing = [m for m in modules if m not in writer.groups]
    if missing:
        raise BitallocError(f"{missing[0]} never ran on the calibration tokens: no input covariance")


_EXPERT = re.compile(r"\.experts\.\d+\.")


def is_expert(module: str) -> bool:
    """True for one expert's matrix of a mixture-of-experts layer ("...mlp.experts.3.down_proj")."""
    return bool(_EXPERT.search(module))


def unrouted_level(module: str, means: dict[str, float]) -> float:
    """The input power per channel that stands in for an expert matrix no calibration token
    was routed to: the mean over the same matrix of the block's other experts (``means``:
    module -> mean of its input's diagonal second moment), else 1. With a flat H (or h) at
    that level, the matrix is decomposed and planned on its weights alone (the weight
    objective), at the scale of its peers' errors."""
    pattern = _EXPERT.sub(".experts.*.", module)
    peers = [v for m, v in means.items() if m != module and _EXPERT.sub(".experts.*.", m) == pattern]
    return sum(peers) / len(peers) if peers else 1.0


def warn_unrouted(modules: Sequence[str], windows: int) -> None:
    if modules:
        warnings.warn(
            f"{len(modules)} expert matrices received no calibration token in {windows} windows "
            f"(first: {modules[0]}): planned on their weights; give more or more varied calibration text",
            stacklevel=3,
        )


def _covariance_accumulator(name: str, state: dict):
    def hook(module, args):
        x = args[0]
        # the same tensor object as an earlier Linear's input in this forward: a shared input
        # (the list holds a reference, so an identity match cannot be a reused address)
        key = next((k for tensor, k in state["seen"] if tensor is x), None)
        if key is None:
            key = state["groups"].get(name, name)
            state["seen"].append((x, key))
            rows = x.detach().reshape(-1, x.shape[-1]).double()
            product = rows.T @ rows
            sums = state["sums"]
            sums[key] = sums[key] + product if key in sums else product
            state["counts"][key] = state["counts"].get(key, 0) + rows.shape[0]
        previous = state["groups"].setdefault(name, key)
        if previous != key:
            raise BitallocError(f"{name} shares its input with different Linears from one batch to the next")

    return hook


class CovarianceWriter:
    """Writes covariances to a safetensors file as they come, one block at a time: the
    tensor bytes go to a side file first (the safetensors header, which lists every tensor,
    must come first), then header and bytes are joined into ``path`` atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: list[tuple[str, list[int], int, int]] = []  # key, shape, begin, end
        self.groups: dict[str, str] = {}
        self._spool = tempfile.TemporaryFile(dir=self.path.parent if self.path.parent.is_dir() else None)
        self._size = 0

    def add(self, key: str, covariance: torch.Tensor, modules: Sequence[str]) -> None:
        data = covariance.to(torch.float32).contiguous().numpy().tobytes()
        self._spool.write(data)
        self.entries.append((key, list(covariance.shape), self._size, self._size + len(data)))
        self._size += len(data)
        self.groups.update(dict.fromkeys(modules, key))

    def finish(self, info: dict) -> str:
        """Write the file; returns its sha256."""
        meta = {k: v for k, v in info.items() if k not in ("digest", "path")}
        metadata = {"format": COVARIANCE_FORMAT, "groups": self.groups, "info": meta}
        header = {"__metadata__": {"bitalloc": json.dumps(metadata, sort_keys=True)}}
        for key, shape, begin, end in self.entries:
            header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        digest = hashlib.sha256()
        self._spool.seek(0)
        with atomic_path(self.path) as temp, open(temp, "wb") as out:
            for chunk in (len(encoded).to_bytes(8, "little"), encoded):
                out.write(chunk)
                digest.update(chunk)
            while chunk := self._spool.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
        self._spool.close()
        return digest.hexdigest()


# ---- files -----------------------------------------------------------------------------


def _serialize(column_weights: dict[str, torch.Tensor], info: dict) -> bytes:
    from safetensors.torch import save

    meta = {k: v for k, v in info.items() if k not in ("digest", "path")}
    # one metadata key: safetensors writes several in a random order, and the digest is of the bytes
    metadata = {"bitalloc": json.dumps({"format": CALIBRATION_FORMAT, "info": meta}, sort_keys=True)}
    return save({k: column_weights[k] for k in sorted(column_weights)}, metadata=metadata)


def save_calibration(calibration: Calibration, path: str | os.PathLike, identity: dict | None = None) -> None:
    """Write h atomically; ``identity`` (model fingerprint, spec) lets a rerun reuse the file."""
    data = _serialize(calibration.column_weights, calibration.info)
    if hashlib.sha256(data).hexdigest() != calibration.info["digest"]:
        raise BitallocError("calibration digest does not match its tensors")  # a bug if reached
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    record = Path(f"{path}.json")  # what `prepare_calibration` compares before reusing the file
    if identity is None:
        record.unlink(missing_ok=True)
        return
    with atomic_path(record) as temp:
        temp.write_text(json.dumps({"identity": identity, "info": calibration.info}, sort_keys=True))


def read_verified(path: str | os.PathLike, digest: str | None = None, check_only: bool = False) -> bytes:
    """The bytes of a calibration file, checked against ``digest`` (its sha256) if given;
    ``check_only``: the check alone (streamed; returns b"")."""
    path = Path(path)
    if check_only:
        data, found = b"", file_digest(path)
    else:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BitallocError(f"calibration file {path} cannot be read: {exc.strerror or exc}") from None
        found = hashlib.sha256(data).hexdigest()
    if digest is not None and found != digest:
        raise BitallocError(
            f"{path} does not hold the plan's calibration (sha256 {found[:12]}, expected {digest[:12]})"
        )
    return data


def read_calibration(path: str | os.PathLike, digest: str | None = None) -> dict[str, torch.Tensor]:
    """h from a calibration file, checked against ``digest`` (sha256 of the file) if given."""
    from safetensors.torch import load

    data = read_verified(path, digest)
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise BitallocError(f"{path} is not a calibration file: {exc}") from None


def load_column_weights(profile_table_or_path) -> dict[str, torch.Tensor]:
    """The h a data-aware profile was measured with, by module (for `apply`), digest-checked.

    Takes the profile's path, or its table (then the file is the one recorded when the
    profile was written: ``attrs["calibration"]["path"]``).
    """
    import pandas as pd

    from .table import read_profile

    if isinstance(profile_table_or_path, pd.DataFrame):
        attrs, file = profile_table_or_path.attrs, None
    else:
        attrs = read_profile(profile_table_or_path).attrs
        file = calibration_path(profile_table_or_path)
    info = attrs.get("calibration")
    if not info:
        raise BitallocError("the profile is not data-aware: it has no calibration")
    if file is None:
        if not info.get("path"):
            raise BitallocError("this profile was not written to a file: its h was not saved")
        file = Path(info["path"])
    return read_calibration(file, info["digest"])


def load_input_statistics(profile_table_or_path):
    """What a data-aware profile's decompositions were weighted with (for `apply`-like
    rebuilds): h by module (objective activation, as `load_column_weights`), or a
    `Covariances` reader with the profile's λ (objective output); digest-checked."""
    import pandas as pd

    from .table import read_profile

    if isinstance(profile_table_or_path, pd.DataFrame):
        attrs = profile_table_or_path.attrs
    else:
        attrs = read_profile(profile_table_or_path).attrs
    if attrs.get("objective") != "output":
        return load_column_weights(profile_table_or_path)
    info = attrs.get("calibration") or {}
    if isinstance(profile_table_or_path, pd.DataFrame):
        if not info.get("path"):
            raise BitallocError("this profile was not written to a file: its covariances were not saved")
        file = Path(info["path"])
    else:
        file = calibration_path(profile_table_or_path)
    return Covariances(file, info.get("digest"), float(info.get("lambda", DAMPING)))


def resolve_objective(model, calibration: CalibrationSettings) -> str:
    """ "weight", "activation" (diagonal h) or "output" (full input covariance H) for a
    profile. Objective None: output when calibration text or ids are given, activation when
    h itself is; "auto": also output whenever the model can be run on text."""
    objective, given = calibration.objective, calibration.given
    if objective not in (None, *OBJECTIVES):
        raise BitallocError(f"unknown objective {objective!r}: expected weight, activation, output or auto")
    if objective == "weight":
        if given:
            raise BitallocError("calibration data was given with objective 'weight': drop one of them")
        return "weight"
    if calibration.column_weights is not None:
        if objective == "output":
            raise BitallocError("column_weights are a diagonal: the output objective needs text or token ids")
        return "activation"
    data_aware = "output" if objective in (None, "auto") else objective
    if not given and objective not in ("activation", "output"):
        return data_aware if objective == "auto" and can_run(model) else "weight"
    # checked before the profile writes anything, so a failed start leaves nothing behind
    needs_model = calibration.input_ids is None and calibration.column_weights is None
    if needs_model and model is not None and not can_run(model):
        what = type(model).__name__ if isinstance(model, nn.Module) else getattr(model, "name", model)
        raise BitallocError(
            f"no tokenizer (or no config) to run {what} on calibration text: "
            "give token ids or activation statistics instead, or use objective 'weight'"
        )
    return data_aware


def calibration_settings(calibration: CalibrationSettings, objective: str = "activation") -> dict:
    """The calibration part of a profile's settings (its resume identity)."""
    if calibration.column_weights is not None:
        return {"column_weights": hashlib.sha256(_serialize(calibration.column_weights, {})).hexdigest()}
    return calibration_spec(
        calibration.text,
        calibration.tokens,
        calibration.context,
        calibration.input_ids,
        objective == "output",
    )


def prepare_calibration(
    model,
    shapes: dict[str, tuple[int, int]],
    output: str | os.PathLike | None,
    identity: dict,
    calibration: CalibrationSettings,
    *,
    quiet: bool = True,
    objective: str = "activation",
) -> Calibration:
    """The profiler's entry: h (or, for the output objective, H) for the matrices in
    ``shapes`` (name -> (out, in)), saved beside ``output`` when given. Given
    ``column_weights`` are checked and used as they are; otherwise a calibration file made
    for the same model (``identity``: fingerprint, content digest) and spec is reused, or
    the model is run."""
    path = calibration_path(output) if output is not None else None
    covariance = objective == "output"
    if calibration.column_weights is not None:
        result = _given(calibration.column_weights, shapes)
    else:
        spec = calibration_spec(
            calibration.text, calibration.tokens, calibration.context, calibration.input_ids, covariance
        )
        wanted = {"spec": spec, **identity}
        result = _reuse(path, wanted, shapes, calibration.damping) if path is not None else None
        if result is not None:
            return result
        result = calibrate(
            model, list(shapes), text=calibration.text, tokens=calibration.tokens,
            context=calibration.context, input_ids=calibration.input_ids, quiet=quiet,
            covariance=covariance, path=path,
        )  # fmt: skip
        if covariance:
            result.covariances.damping = calibration.damping
            if path is not None:
                _write_record(path, wanted, result.info)
                result.info["path"] = str(path.resolve())
            return result
    if path is not None:
        save_calibration(result, path, None if calibration.column_weights is not None else wanted)
        result.info["path"] = str(path.resolve())
    return result


def _given(column_weights: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]]) -> Calibration:
    checked = {}
    for name, (_, cols) in shapes.items():
        h = column_weights.get(name)
        if h is None:
            raise BitallocError(f"column_weights has no entry for {name}")
        h = torch.as_tensor(h, dtype=torch.float32).reshape(-1).contiguous()
        if h.numel() != cols:
            raise BitallocError(f"column_weights[{name!r}] has {h.numel()} values, the matrix {cols} columns")
        if not bool(torch.isfinite(h).all()) or bool((h <= 0).any()):
            raise BitallocError(f"column_weights[{name!r}] must be finite and positive")
        checked[name] = h
    info = {"text": "column_weights"}
    info["digest"] = hashlib.sha256(_serialize(checked, info)).hexdigest()
    return Calibration(checked, info)


def _write_record(path: Path, identity: dict, info: dict) -> None:
    with atomic_path(Path(f"{path}.json")) as temp:
        temp.write_text(json.dumps({"identity": identity, "info": info}, sort_keys=True))


def _reuse(path: Path, wanted: dict, shapes: dict, damping: float = DAMPING) -> Calibration | None:
    record_file = Path(f"{path}.json")
    if not (path.is_file() and record_file.is_file()):
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, BitallocError):
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if record["identity"] == wanted and wanted["spec"].get("statistic") == "covariance":
            covariances = Covariances(path, record["info"]["digest"], damping)
            if all(covariances.shape(m) == (cols, cols) for m, (_, cols) in shapes.items()):
                info = dict(record["info"], path=str(path.resolve()))
                return Calibration(None, info, covariances=covariances)
            return None
        if record["identity"] == wanted:
            column_weights = read_calibration(path, record["info"]["digest"])
            if all(tuple(column_weights[m].shape) == (cols,) for m, (_, cols) in shapes.items()):
                return Calibration(column_weights, dict(record["info"], path=str(path.resolve())))
    return None


def _accumulator(name: str, sums: dict, counts: dict):
    def hook(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        squares = x.double().square().sum(dim=0)
        sums[name] = sums[name] + squares if name in sums else squares
        counts[name] = counts.get(name, 0) + x.shape[0]

    return hook
