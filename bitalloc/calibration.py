"""Activation statistics for the data-aware objective: h = diag(XᵀX)/n per input channel.

What matters for a quantized layer is its output error ‖(W − Ŵ)X‖, whose diagonal
approximation is ‖(W − Ŵ)·diag(√h)‖²_F with h the second moment of each input channel
over calibration tokens. `calibrate` runs the model over those tokens GPTQ-style, one
transformer block at a time: a "catcher" records the inputs of block 0, then each block is
loaded (from the checkpoint, for a model on disk), run on the cached hidden states with
forward hooks on its Linear layers, and released, so a large model never sits whole in
memory. h is damped (h + 0.01·mean(h)) so that dead channels cannot blow the weights up.

h is stored per module in a safetensors file beside the profile (``profile.parquet`` ->
``profile.calibration.safetensors``); its sha256 goes in the profile metadata, so `apply`
can reuse exactly the same h (`load_column_weights`).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import BitallocError
from .fileio import atomic_path

DEFAULT_TEXT = "default"
DEFAULT_TOKENS = 8192
DEFAULT_CONTEXT = 512
DAMPING = 0.01
BATCH_TOKENS = 2048  # tokens per forward pass through a block
CALIBRATION_FORMAT = "bitalloc.calibration/v1"
CALIBRATION_SUFFIX = ".calibration.safetensors"
OBJECTIVES = ("weight", "activation", "auto")


@dataclass
class Calibration:
    """Damped per-input-channel second moments by module name, and what produced them."""

    column_weights: dict[str, torch.Tensor]
    info: dict  # text, text_sha256, tokens, context, damping, digest (of the safetensors bytes)
    seconds: float = field(default=0.0, compare=False)


def calibration_path(profile_path: str | os.PathLike) -> Path:
    """Where the h of a profile lives: ``profile.parquet`` -> ``profile.calibration.safetensors``."""
    path = Path(profile_path)
    return path.with_name(path.stem + CALIBRATION_SUFFIX)


def can_calibrate(model) -> bool:
    """True when ``model`` can be run on text: an HF folder with config.json and a tokenizer,
    a GGUF file with tokenizer metadata, or an in-memory transformers model whose
    ``config._name_or_path`` is such a folder. The demo model (None) is not: it stays
    weight-only unless calibration is asked for."""
    if isinstance(model, nn.Module):
        where = getattr(getattr(model, "config", None), "_name_or_path", None)
        return bool(where) and Path(where).is_dir() and can_calibrate(where)
    if model is None:
        return False
    path = Path(getattr(model, "path", model))
    folder = path if path.is_dir() else path.parent
    if path.suffix == ".gguf" or (path.is_file() and path.suffix != ".safetensors"):
        return path.is_file() and _gguf_has_tokenizer(path)
    has_tokenizer = any(
        (folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")
    )
    return (folder / "config.json").is_file() and has_tokenizer


def calibration_spec(
    text: str | os.PathLike | None = DEFAULT_TEXT,
    tokens: int = DEFAULT_TOKENS,
    context: int = DEFAULT_CONTEXT,
    input_ids: torch.Tensor | None = None,
) -> dict:
    """What identifies a calibration run (it goes in the profile settings): the text's name
    and sha256, the tokens asked for, the context and the damping. ``text`` None or
    "default" is the built-in text; ``input_ids`` (token ids given directly) replace it."""
    from .evaluate import text_digest

    if tokens <= 0 or context <= 0:
        raise BitallocError(f"calibration tokens and context must be positive, got {tokens}, {context}")
    if input_ids is not None:
        ids = input_ids.to(torch.long).contiguous()
        name, digest = "input_ids", hashlib.sha256(ids.numpy().tobytes()).hexdigest()
        context = ids.shape[-1] if ids.dim() == 2 else context
    else:
        name, digest = _text_name(text), text_digest(_read_text(text))
    return {
        "text": name,
        "text_sha256": digest,
        "tokens": int(tokens),
        "context": int(context),
        "damping": DAMPING,
    }


def _text_name(text) -> str:
    from .evaluate import text_name

    return text_name("calibration") if text is None or str(text) == DEFAULT_TEXT else Path(text).name


def _read_text(text) -> str:
    from .evaluate import calibration_text

    if text is None or str(text) == DEFAULT_TEXT:
        return calibration_text()
    path = Path(text)
    if not path.is_file():
        raise BitallocError(f"calibration text not found: {text}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BitallocError(f"cannot read calibration text {text}: {exc}") from None


def calibrate(
    model: str | os.PathLike | nn.Module,
    modules: Sequence[str] | None = None,
    *,
    text: str | os.PathLike | None = DEFAULT_TEXT,
    tokens: int = DEFAULT_TOKENS,
    context: int = DEFAULT_CONTEXT,
    input_ids: torch.Tensor | None = None,
    quiet: bool = True,
) -> Calibration:
    """h for every Linear in ``modules`` (default: what `profile` selects) of ``model``.

    ``model``: an HF folder (built on the meta device, blocks read from the safetensors one
    at a time), a GGUF file (the same, tensors dequantized one at a time), or an in-memory
    transformers model (run as it is). The tokens are the first ``tokens`` of ``text`` (a
    file, or "default": the built-in text, see `bitalloc.evaluate`) in windows of
    ``context``, or ``input_ids`` given directly ((n, context) or 1-D; no tokenizer needed).
    """
    from .evaluate import tokenize, windows
    from .sources import open_source

    start = time.perf_counter()
    if modules is None:
        with open_source(model) as source:
            modules = source.modules()
    info = calibration_spec(text, tokens, context, input_ids)
    with _runnable(model) as (net, load, tokenizer_dir):
        if input_ids is None:
            ids = tokenize(_tokenizer(tokenizer_dir, model), _read_text(text), tokens)
        else:
            ids = input_ids.to(torch.long).reshape(-1)[:tokens] if input_ids.dim() == 1 else input_ids
        ids = windows(ids, context) if ids.dim() == 1 else ids
        column_weights = collect_column_weights(net, ids, modules, load=load, quiet=quiet)
    info.update(tokens=int(ids.numel()), context=int(ids.shape[1]))
    info["digest"] = hashlib.sha256(_serialize(column_weights, info)).hexdigest()
    return Calibration(column_weights, info, time.perf_counter() - start)


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
    blocks_name, blocks = _find_blocks(net, modules)
    device = next((p.device for p in net.parameters() if not p.is_meta), torch.device("cpu"))
    input_ids = input_ids.to(device)
    batch = max(1, batch_tokens // input_ids.shape[1])
    loaded: list[tuple[nn.Module, str]] = []
    inside = {id(m) for m in blocks.modules()}
    outside = [m for m in net.modules() if id(m) not in inside]
    handles = [m.register_forward_pre_hook(_materializer(net, load, loaded)) for m in outside if _has_meta(m)]
    try:
        states = [_catch(net, blocks, input_ids[i : i + batch]) for i in range(0, len(input_ids), batch)]
    finally:
        for handle in handles:
            handle.remove()
    _release(loaded)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    last = max(int(m[len(blocks_name) + 1 :].split(".", 1)[0]) for m in modules)
    for index in range(last + 1):
        block = blocks[index]
        prefix = f"{blocks_name}.{index}."
        _materialize(block, prefix, load, loaded)
        hooks = []
        for name in [m for m in modules if m.startswith(prefix)]:
            linear = net.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise BitallocError(
                    f"{name} is a {type(linear).__name__}, not an nn.Linear: cannot calibrate it"
                )
            hooks.append(linear.register_forward_pre_hook(_accumulator(name, sums, counts)))
        try:
            with torch.inference_mode():
                states = [
                    (_hidden(block(hidden, *args, **kwargs)), args, kwargs) for hidden, args, kwargs in states
                ]
        finally:
            for hook in hooks:
                hook.remove()
        _release(loaded)
        if not quiet:
            print(f"calibrated block {index + 1}/{last + 1}", flush=True)
    result = {}
    for name in modules:
        h = (sums[name] / counts[name]).float().cpu()
        result[name] = (h + damping * h.mean()).contiguous()
    return result


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


def read_calibration(path: str | os.PathLike, digest: str | None = None) -> dict[str, torch.Tensor]:
    """h from a calibration file, checked against ``digest`` (sha256 of the file) if given."""
    from safetensors.torch import load

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BitallocError(f"calibration file {path} cannot be read: {exc}") from None
    found = hashlib.sha256(data).hexdigest()
    if digest is not None and found != digest:
        raise BitallocError(
            f"{path} does not hold the profile's calibration (sha256 {found[:12]}, expected {digest[:12]})"
        )
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise BitallocError(f"{path} is not a calibration file: {exc}") from None


def plan_calibration_path(plan_path: str | os.PathLike) -> Path:
    """Where a data-aware plan's h lives: ``plan.json`` -> ``plan.calibration.safetensors``."""
    plan_path = Path(plan_path)
    return plan_path.with_name(f"{plan_path.stem}.calibration.safetensors")


def load_column_weights(profile_table_or_path) -> dict[str, torch.Tensor]:
    """The h a data-aware profile was measured with, by module (for `apply`), digest-checked.

    Takes the profile's path, or its table (then the file is the one recorded when the
    profile was written: ``attrs["calibration"]["path"]``).
    """
    import pandas as pd

    from .profiler import read_profile

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


def resolve_objective(
    model,
    objective: str | None,
    text: str | os.PathLike | None = None,
    input_ids: torch.Tensor | None = None,
    column_weights: dict | None = None,
) -> str:
    """ "weight" or "activation" for a profile. None: activation when any calibration input is
    given; "auto": also whenever the model can be run on text (`can_calibrate`)."""
    given = text is not None or input_ids is not None or column_weights is not None
    if objective == "fisher":
        raise BitallocError("the fisher objective is not implemented yet: use activation or weight")
    if objective not in (None, *OBJECTIVES):
        raise BitallocError(f"unknown objective {objective!r}: expected weight, activation or auto")
    if objective == "weight":
        if given:
            raise BitallocError("calibration data was given with objective 'weight': drop one of them")
        return "weight"
    if not given and objective != "activation":
        return "activation" if objective == "auto" and can_calibrate(model) else "weight"
    # checked before the profile writes anything, so a failed start leaves nothing behind
    if input_ids is None and column_weights is None and model is not None and not can_calibrate(model):
        what = type(model).__name__ if isinstance(model, nn.Module) else getattr(model, "name", model)
        raise BitallocError(
            f"no tokenizer to run {what} on calibration text: "
            "pass calibration_ids or column_weights, or use objective 'weight'"
        )
    return "activation"


def calibration_settings(
    text: str | os.PathLike | None,
    tokens: int,
    input_ids: torch.Tensor | None = None,
    column_weights: dict[str, torch.Tensor] | None = None,
) -> dict:
    """The calibration part of a profile's settings (its resume identity)."""
    if column_weights is not None:
        return {"column_weights": hashlib.sha256(_serialize(column_weights, {})).hexdigest()}
    return calibration_spec(text, tokens, DEFAULT_CONTEXT, input_ids)


def prepare_calibration(
    model,
    shapes: dict[str, tuple[int, int]],
    output: str | os.PathLike | None,
    identity: dict,
    *,
    text: str | os.PathLike | None = None,
    tokens: int = DEFAULT_TOKENS,
    context: int = DEFAULT_CONTEXT,
    input_ids: torch.Tensor | None = None,
    column_weights: dict[str, torch.Tensor] | None = None,
    quiet: bool = True,
) -> Calibration:
    """The profiler's entry: h for the matrices in ``shapes`` (name -> (out, in)), saved
    beside ``output`` when given. Given ``column_weights`` are checked and used as they are;
    otherwise a calibration file made for the same model (``identity``: fingerprint, content
    digest) and spec is reused, or the model is run."""
    path = calibration_path(output) if output is not None else None
    if column_weights is not None:
        calibration = _given(column_weights, shapes)
    else:
        wanted = {"spec": calibration_spec(text, tokens, context, input_ids), **identity}
        calibration = _reuse(path, wanted, shapes) if path is not None else None
        if calibration is not None:
            return calibration
        calibration = calibrate(
            model, list(shapes), text=text, tokens=tokens, context=context, input_ids=input_ids, quiet=quiet
        )
    if path is not None:
        save_calibration(calibration, path, None if column_weights is not None else wanted)
        calibration.info["path"] = str(path.resolve())
    return calibration


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


def _reuse(path: Path, wanted: dict, shapes: dict) -> Calibration | None:
    record_file = Path(f"{path}.json")
    if not (path.is_file() and record_file.is_file()):
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, BitallocError):
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if record["identity"] == wanted:
            column_weights = read_calibration(path, record["info"]["digest"])
            if all(tuple(column_weights[m].shape) == (cols,) for m, (_, cols) in shapes.items()):
                return Calibration(column_weights, dict(record["info"], path=str(path.resolve())))
    return None


# ---- running a model block by block ----------------------------------------------------


class _Caught(Exception):
    def __init__(self, hidden, args, kwargs):
        super().__init__("caught the inputs of block 0")
        self.inputs = (hidden, args, kwargs)


class _Catcher(nn.Module):
    """Stands in for block 0: records its inputs and stops the forward pass."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden, *args, **kwargs):
        raise _Caught(hidden, args, kwargs)

    def __getattr__(self, name: str):  # models read attributes such as `attention_type`
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def _catch(net: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor):
    first = blocks[0]
    blocks[0] = _Catcher(first)
    try:
        kwargs = {"use_cache": False} if "use_cache" in inspect.signature(net.forward).parameters else {}
        with torch.inference_mode():
            net(ids, **kwargs)
    except _Caught as caught:
        return caught.inputs
    finally:
        blocks[0] = first
    raise BitallocError(f"the model never called its first block ({type(first).__name__})")


def _hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _find_blocks(net: nn.Module, modules: Sequence[str]) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks that holds every selected module."""
    best = None
    for name, child in net.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) and name:
            covered = sum(m.startswith(name + ".") for m in modules)
            if covered and (best is None or covered > best[0]):
                best = (covered, name, child)
    if best is None or best[0] < len(modules):
        outside = [m for m in modules if best is None or not m.startswith(best[1] + ".")]
        raise BitallocError(
            f"calibration runs the transformer blocks; {outside[0]} is not inside one "
            "(exclude it, or use --objective weight)"
        )
    return best[1], best[2]


def _has_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters(recurse=False))


def _materialize(module: nn.Module, prefix: str, load, loaded: list) -> None:
    """Read every meta parameter of ``module`` (named ``prefix``...) as float32."""
    for child_name, child in module.named_modules():
        for name, param in list(child._parameters.items()):
            if param is None or not param.is_meta:
                continue
            key = f"{prefix}{child_name + '.' if child_name else ''}{name}"
            _load_into(child, name, key, load, loaded)


def _load_into(module: nn.Module, name: str, key: str, load, loaded: list) -> None:
    if load is None:
        raise BitallocError(f"parameter {key} has no values (meta device) and nothing to load it from")
    try:
        tensor = load(key)
    except KeyError:
        raise BitallocError(
            f"the checkpoint has no tensor {key} for the model built from its config"
        ) from None
    param = module._parameters[name]
    if tuple(tensor.shape) != tuple(param.shape):
        raise BitallocError(
            f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, the model {tuple(param.shape)}"
        )
    module._parameters[name] = nn.Parameter(tensor.to(torch.float32), requires_grad=False)
    loaded.append((module, name))


def _materializer(net: nn.Module, load, loaded: list):
    names = {id(m): n for n, m in net.named_modules()}

    def hook(module, args):
        prefix = names[id(module)]
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                _load_into(module, name, f"{prefix}.{name}" if prefix else name, load, loaded)

    return hook


def _release(loaded: list) -> None:
    """Put parameters read from the checkpoint back on the meta device (frees their memory)."""
    for module, name in loaded:
        param = module._parameters[name]
        module._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
    loaded.clear()


def _accumulator(name: str, sums: dict, counts: dict):
    def hook(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        squares = x.double().square().sum(dim=0)
        sums[name] = sums[name] + squares if name in sums else squares
        counts[name] = counts.get(name, 0) + x.shape[0]

    return hook


@contextlib.contextmanager
def _runnable(model):
    """(module to run, loader of meta parameters or None, folder with tokenizer files or None)."""
    if isinstance(model, nn.Module):
        training = model.training
        try:
            yield model.eval(), None, None
        finally:
            model.train(training)
        return
    from transformers import AutoConfig

    from .backbones import open_backbone
    from .nn import _parameters_on_meta, model_class

    backbone = open_backbone(getattr(model, "path", model))
    with tempfile.TemporaryDirectory(prefix="bitalloc-calibration-") as folder:
        with warnings.catch_warnings():  # e.g. a GGUF without tokenizer metadata: ids may be given
            warnings.simplefilter("ignore")
            backbone.save_config(Path(folder))
        config = AutoConfig.from_pretrained(folder)
        with _parameters_on_meta():
            net = model_class(config)(config)
        yield net.eval(), backbone.load, folder


def _tokenizer(folder: str | None, model):
    from transformers import AutoTokenizer

    where = folder
    if where is None:
        where = getattr(getattr(model, "config", None), "_name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(where)
    except Exception as exc:  # transformers raises many types for a missing tokenizer
        raise BitallocError(
            f"no tokenizer for calibration text in {where or 'the model'} ({type(exc).__name__}): "
            "pass token ids (calibration_ids) or use --objective weight"
        ) from None


def _gguf_has_tokenizer(path: Path) -> bool:
    try:
        import gguf

        return gguf.GGUFReader(str(path)).get_field("tokenizer.ggml.tokens") is not None
    except Exception:  # any unreadable file: not runnable
        return False
