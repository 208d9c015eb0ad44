"""Attaching the LoRA adapter that `bitalloc.apply` writes to the model `load_quantized` builds.

For most models ``PeftModel.from_pretrained(model, OUT/adapter)`` is all it takes. For a
mixture-of-experts model it is not: PEFT (with transformers 5) rewrites an adapter whose
targets end in the per-expert names of older checkpoints (``experts.3.w1``,
``experts.3.gate_proj``) to target the fused 3-D expert parameters instead, and renames
its tensors to match. The model `load_quantized` builds has no fused experts: each expert
matrix is its own (packed) Linear under its checkpoint name (`bitalloc.checkpoints.layout`),
so that rewrite would drop the experts' LoRA with only a warning. `load_adapter` turns the
rewrite off for such a model and checks that every target got its LoRA.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from pathlib import Path

from torch import nn

from ..checkpoints.layout import ExpertLinears
from ..errors import BitallocError


def load_adapter(model: nn.Module, adapter: str | os.PathLike, **kwargs):
    """``PeftModel.from_pretrained(model, adapter, **kwargs)`` (e.g. ``is_trainable=True``),
    with PEFT's MoE target rewrite turned off when ``model`` holds per-expert Linears;
    BitallocError if a target module of the adapter got no LoRA layer."""
    from peft import PeftModel

    path = Path(adapter)
    try:
        targets = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))["target_modules"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BitallocError(f"{path} is not a LoRA adapter folder: {exc}") from None
    unfused = any(isinstance(module, ExpertLinears) for module in model.modules())
    with _keep_per_expert_targets() if unfused else contextlib.nullcontext():
        peft_model = PeftModel.from_pretrained(model, str(path), **kwargs)
    wrapped = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    prefix = "base_model.model."
    if isinstance(targets, list):
        missing = [t for t in targets if prefix + t not in wrapped]
        if missing:
            raise BitallocError(f"the adapter in {path} targets {missing[0]}, which got no LoRA layer")
    return peft_model


# While any thread is inside `_keep_per_expert_targets`, PEFT's two conversion functions are
# wrappers that skip the conversion for the threads inside it (their depth in `_INSIDE`) and
# call PEFT's own for every other thread; the last thread out puts PEFT's own back.
_INSIDE = threading.local()
_LOCK = threading.Lock()
_ORIGINALS: dict[str, object] = {}  # name -> PEFT's function, while wrappers are installed
_USERS = [0]  # threads inside, over all threads


@contextlib.contextmanager
def _keep_per_expert_targets():
    """PEFT's v4 -> v5 MoE conversions (config and adapter tensors) as no-ops for the calling
    thread while the body runs; other threads loading adapters meanwhile convert as usual."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # a PEFT without them: nothing to turn off
        yield
        return
    with _LOCK:
        if _USERS[0] == 0:
            _install(conversion)
        _USERS[0] += 1
    _INSIDE.depth = getattr(_INSIDE, "depth", 0) + 1
    try:
        yield
    finally:
        _INSIDE.depth -= 1
        with _LOCK:
            _USERS[0] -= 1
            if _USERS[0] == 0:
                for name, function in _ORIGINALS.items():
                    setattr(conversion, name, function)
                _ORIGINALS.clear()


def _install(conversion) -> None:
    replacements = {
        "convert_peft_config_for_transformers": _no_config_change,
        "convert_peft_adapter_state_dict_for_transformers": _same_state_dict,
    }
    for name, replacement in replacements.items():
        if hasattr(conversion, name):
            _ORIGINALS[name] = original = getattr(conversion, name)
            setattr(conversion, name, _for_threads_inside(original, replacement))


def _for_threads_inside(original, replacement):
    @functools.wraps(original)
    def call(*args, **kwargs):
        chosen = replacement if getattr(_INSIDE, "depth", 0) else original
        return chosen(*args, **kwargs)

    return call


def _no_config_change(*args, **kwargs) -> None:
    return None


def _same_state_dict(*args, **kwargs):
    return kwargs["adapter_state_dict"] if "adapter_state_dict" in kwargs else args[2]
