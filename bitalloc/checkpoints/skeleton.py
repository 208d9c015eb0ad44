"""A checkpoint's transformers model without its weights: the skeleton built from its config
with every parameter on the meta device (no memory, no init cost), and what can be
checked against it before any work (tensors without a place, planned modules that are not
Linear layers, whether there is a tokenizer to run it on text).

`runnable(model)` yields the skeleton with a loader that reads parameters by name when
they are needed; `runnable` (the module) runs it block by block.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from ..errors import BitallocError
from . import GGUFSource, open_source
from .layout import match_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")


def can_run(model) -> bool:
    """True when ``model`` can be run on text: an HF folder with config.json and a tokenizer,
    a GGUF file with tokenizer metadata, or an in-memory transformers model whose
    ``config._name_or_path`` is such a folder. The demo model (None) is not."""
    if isinstance(model, nn.Module):
        where = getattr(getattr(model, "config", None), "_name_or_path", None)
        return bool(where) and Path(where).is_dir() and can_run(where)
    if model is None:
        return False
    path = Path(getattr(model, "path", model))
    folder = path if path.is_dir() else path.parent
    if path.suffix == ".gguf" or (path.is_file() and path.suffix != ".safetensors"):
        try:
            return GGUFSource(path, modules=[]).has_tokenizer()
        except BitallocError:
            return False
    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    return (folder / "config.json").is_file() and has_tokenizer


# Tensors old checkpoints hold that today's transformers computes instead and drops on load
# (old llama/mistral checkpoints stored each layer's rotary inverse frequencies).
HARMLESS_EXTRAS = re.compile(r"(?:^|\.)rotary_emb\.inv_freq$")


def unexpected_tensors(model, source) -> list[str]:
    """Check every tensor of ``source`` (the checkpoint of ``model``) against the model built
    from its config, before any work: the names of known-harmless extras that have no place
    in it (`HARMLESS_EXTRAS`, the class's ``_keys_to_ignore_on_load_unexpected``: a writer
    leaves them out); BitallocError for any other tensor without a place, or (safetensors)
    one whose stored shape differs from the model's."""
    with runnable(model) as (net, _, _):
        shapes = {n: tuple(p.shape) for n, p in net.named_parameters(remove_duplicate=False)}
        shapes.update((n, tuple(b.shape)) for n, b in net.named_buffers(remove_duplicate=False))
        ignored = [re.compile(p) for p in getattr(net, "_keys_to_ignore_on_load_unexpected", None) or []]
        kind = type(net).__name__
    entries = getattr(source, "_entries", None) or {}
    extras = []
    for name in source.tensor_names():
        if name in shapes:
            entry = entries.get(name)
            if entry is not None and tuple(entry.shape) != shapes[name]:
                raise BitallocError(
                    f"{source.name}: tensor {name} has shape {list(entry.shape)}, but {kind} built from "
                    f"its config.json expects {list(shapes[name])}"
                )
        elif HARMLESS_EXTRAS.search(name) or any(p.search(name) for p in ignored):
            extras.append(name)
        else:
            raise BitallocError(
                f"{source.name}: tensor {name} has no place in {kind} built from its config.json: "
                "is the config the checkpoint's own?"
            )
    return extras


def check_linears(model, names: Sequence[str]) -> None:
    """BitallocError naming the first of ``names`` that is not an ``nn.Linear`` in the model
    built from the checkpoint's config (on the meta device: no memory, no weights read)."""
    with runnable(model) as (net, _, _):
        for name in names:
            try:
                module = net.get_submodule(name)
            except AttributeError:
                module = None
            if not isinstance(module, nn.Linear):
                kind = "nothing" if module is None else f"a {type(module).__name__}"
                raise BitallocError(
                    f"{name} is {kind} in the model, not a Linear layer: only Linear layers can be "
                    "quantized and loaded (plan without it, e.g. --exclude it when profiling)"
                )


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters that this thread registers inside the block go on the meta device (no
    memory, no init cost); buffers stay real, so computed non-persistent buffers such as
    rotary frequencies keep their values. Tied parameters stay tied (a parameter already on
    meta is registered as it is). Only the calling thread is affected: torch's parameter
    registration hook is shared by the process, so it acts for this thread alone, and
    modules built meanwhile by other threads keep real parameters."""
    owner = threading.get_ident()

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.is_meta or threading.get_ident() != owner:
            return None
        return type(param)(param.to("meta"), requires_grad=param.requires_grad)

    handle = register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def model_class(config) -> type:
    """The transformers class named in ``config.architectures`` (else the base AutoModel's)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    names = [name for name in getattr(config, "architectures", None) or [] if isinstance(name, str)]
    names.append(MODEL_MAPPING_NAMES.get(getattr(config, "model_type", ""), ""))
    for name in names:
        cls = getattr(transformers, name, None) if name else None
        if cls is not None:
            return cls
    raise BitallocError(f"no transformers model class for model type {getattr(config, 'model_type', None)!r}")


@contextlib.contextmanager
def runnable(model) -> Iterator[tuple[nn.Module, Callable | None, str | None]]:
    """(module to run, loader of meta parameters or None, folder with tokenizer files or None)."""
    if isinstance(model, nn.Module):
        training = model.training
        try:
            yield model.eval(), None, None
        finally:
            model.train(training)
        return
    source = open_source(getattr(model, "path", model), modules=[])
    with tempfile.TemporaryDirectory(prefix="bitalloc-run-") as folder:
        with warnings.catch_warnings():  # e.g. a GGUF without tokenizer metadata: ids may be given
            warnings.simplefilter("ignore")
            source.write_config(Path(folder))
        net = build_skeleton(folder, source.name)
        match_checkpoint(net, source.tensor_names())
        yield net.eval(), source.load_tensor, folder


def build_skeleton(folder: str | Path, name: str) -> nn.Module:
    """The transformers model that ``folder``'s config.json describes, every parameter on
    the meta device; BitallocError (naming ``name``) when transformers cannot read the config
    (no or an unknown ``model_type``, a value it refuses) or cannot build the model from it."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # transformers raises ValueError, KeyError, OSError, ... for a bad config
        detail = " ".join(str(exc).split(". ")[0].split()).replace(str(folder), "config.json")
        raise BitallocError(
            f"{name}: transformers cannot read its config.json ({type(exc).__name__}: {detail}); "
            "it needs a model_type transformers knows"
        ) from None
    cls = model_class(config)
    try:
        with parameters_on_meta():
            return cls(config)
    except Exception as exc:  # a config whose values the model class refuses
        detail = " ".join(str(exc).split())[:300]
        raise BitallocError(f"{name}: cannot build {cls.__name__} from its config.json: {detail}") from None


def load_tokenizer(folder: str | None, model):
    from transformers import AutoTokenizer

    where = folder
    if where is None:
        where = getattr(getattr(model, "config", None), "_name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(where)
    except Exception as exc:  # transformers raises many types for a missing tokenizer
        raise BitallocError(
            f"no tokenizer to run {where or 'the model'} on text ({type(exc).__name__}): "
            "give token ids instead, or plan weight-only (objective 'weight')"
        ) from None
