"""bitalloc's packed format as a transformers quantization method (``quant_method: "bitalloc"``).

``OUT/quantized/config.json`` carries a ``quantization_config`` (the format version, the
weights file and every packed module's config and shape). With this module registered,
``AutoModelForCausalLM.from_pretrained(path, device_map=..., dtype=...)`` builds a
`QuantLinear` for every packed module and loads the packed tensors through transformers' own
loader, so ``device_map`` ("auto", "cpu", per-module maps), ``dtype`` and
``low_cpu_mem_usage`` behave as for any transformers model. Offloading to CPU or disk is
transformers' and accelerate's: the packed tensors are buffers (offloaded to disk with
``offload_buffers=True``), each created in the shape it is stored in, because accelerate's
hooks put stored tensors back into buffers and refuse a shape change. PEFT cannot attach an
adapter over disk-offloaded packed layers (it rewrites the offloaded files by
``<module>.<parameter>`` names): `_patch_peft_offload` makes that one clear error.

Without bitalloc, transformers cannot load the folder: config.json names its weights as
``import-bitalloc-to-load-this-model.safetensors`` (transformers' ``transformers_weights``
key), a file that does not exist, so the error names the missing import; the quantizer
replaces the name with the real weights file. The packed files are checked against the
per-module configs (from their headers, before anything is allocated): a mismatch, a missing
shard or another format version is one `BitallocError`, never random weights.

A model loaded this way keeps the guard when saved: its ``save_pretrained`` writes the
placeholder name into the saved config.json too, so the saved folder loads (to the same
logits) with bitalloc, and fails loudly without it.

Registration: importing bitalloc must stay light, and transformers' quantizer registry costs
seconds to import, so `bitalloc/__init__` calls `register_when_imported`: it registers at once
when transformers' registry is already imported, and otherwise installs an import hook that
registers the moment it is (whatever the import order of bitalloc and transformers). The
same hook adapts PEFT when it is imported: an adapter's relative base path resolves against
the adapter folder, and LoRA merges into QuantLinears dequantize (`merge`).
"""

from __future__ import annotations

import importlib.abc
import json
import math
import sys
import types
from pathlib import Path

QUANT_METHOD = "bitalloc"
PLACEHOLDER_WEIGHTS = "import-bitalloc-to-load-this-model.safetensors"
_REGISTRY_MODULE = "transformers.quantizers.auto"
_PEFT_CONFIG_MODULE = "peft.config"
_PEFT_LORA_MODULE = "peft.tuners.lora.model"
_PEFT_MODEL_MODULE = "peft.peft_model"
DISK_OFFLOAD_ERROR = (
    "PEFT cannot attach an adapter to a bitalloc model with layers offloaded to disk: it rewrites the "
    "offloaded safetensors files assuming '<module>.<parameter>' names, and packed matrices are stored as "
    "'<module>.weight.codes'; keep the layers in memory (CPU offload), or merge first with `bitalloc merge`"
)


def quantization_config_dict(modules: dict[str, dict], weights: str, embeddings: dict | None = None) -> dict:
    """The ``quantization_config`` entry of config.json: format, weights file, per-module
    ``{"config", "shape"}``, and the same for input embeddings stored packed (``embeddings``,
    only when there are any; they load dense, see `artifacts.embedding`)."""
    from .nn import QUANT_FORMAT

    def entries(table: dict[str, dict]) -> dict[str, dict]:
        return {
            name: {"config": str(entry["config"]), "shape": [int(n) for n in entry["shape"]]}
            for name, entry in table.items()
        }

    out = {
        "quant_method": QUANT_METHOD,
        "format": QUANT_FORMAT,
        "weights": weights,
        "modules": entries(modules),
    }
    if embeddings:
        out["embeddings"] = entries(embeddings)
    return out


def mark_config(
    config_file: Path, modules: dict[str, dict], weights: str, embeddings: dict | None = None
) -> None:
    """Add the ``quantization_config`` and the placeholder weights name to a config.json."""
    from ..fileio import atomic_path

    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["quantization_config"] = quantization_config_dict(modules, weights, embeddings)
    config["transformers_weights"] = PLACEHOLDER_WEIGHTS
    with atomic_path(config_file) as temp:
        temp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def unmark_config(config_file: Path, target: Path) -> None:
    """Copy a config.json without the bitalloc marks (for a plain 16-bit checkpoint)."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD:
        del config["quantization_config"]
    if config.get("transformers_weights") == PLACEHOLDER_WEIGHTS:
        del config["transformers_weights"]
    target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---- registration -------------------------------------------------------------------------


def register(auto: types.ModuleType | None = None) -> None:
    """Register the config and quantizer classes with transformers (idempotent); ``auto`` is
    transformers.quantizers.auto (imported here when not given)."""
    if auto is None:
        import transformers.quantizers.auto as auto
    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return
    config_class, quantizer_class = _classes()
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = config_class
    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = quantizer_class


def register_when_imported() -> None:
    """Register now if transformers' registry is imported, else when it is; likewise make
    PEFT resolve an adapter's relative base path against the adapter folder and merge LoRA
    into QuantLinears (`merge`)."""
    hooks = ((_REGISTRY_MODULE, register), (_PEFT_CONFIG_MODULE, _patch_peft_config),
             (_PEFT_LORA_MODULE, _patch_peft_lora), (_PEFT_MODEL_MODULE, _patch_peft_offload))  # fmt: skip
    for module, action in hooks:
        if module in sys.modules:
            action(sys.modules[module])
        elif not any(isinstance(f, _AfterImport) and f.name == module for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport(module, action))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of one module to run ``action`` after it."""

    def __init__(self, name: str, action) -> None:
        self.name, self.action = name, action

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = None
        for finder in sys.meta_path:  # the finder that would have found it without this hook
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, action = spec.loader, self.action

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                module.__loader__ = loader
                action(module)

        spec.loader = Loader()
        return spec


def _patch_peft_config(module: types.ModuleType) -> None:
    """``base_model_name_or_path`` "../quantized" (what `apply` writes) names a folder
    relative to the adapter; PEFT reads it relative to the working directory. Resolve it
    against the adapter folder when it does not exist relative to the working directory,
    so ``AutoPeftModelForCausalLM.from_pretrained("OUT/adapter")`` works from any directory."""
    mixin = module.PeftConfigMixin
    if getattr(mixin.from_pretrained, "_bitalloc", False):
        return
    original = mixin.from_pretrained.__func__

    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        config = original(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        base = getattr(config, "base_model_name_or_path", None)
        folder = Path(pretrained_model_name_or_path, subfolder or "")
        if isinstance(base, str) and base.startswith(("./", "../")) and folder.is_dir():
            if not Path(base).is_dir() and (folder / base).is_dir():
                config.base_model_name_or_path = str((folder / base).resolve())
        return config

    from_pretrained._bitalloc = True
    mixin.from_pretrained = classmethod(from_pretrained)


def _patch_peft_lora(module: types.ModuleType) -> None:
    """PEFT's LoRA layer for QuantLinear (merge dequantizes), see `merge`."""
    from .merge import patch_peft_dispatch

    patch_peft_dispatch(module)


def _patch_peft_offload(module: types.ModuleType) -> None:
    """PEFT's handling of disk-offloaded layers (``PeftModel._update_offload``) looks each
    stored tensor's module up by cutting the name at its last dot, which fails with a
    KeyError for packed tensors: a one-line BitallocError instead, before PEFT touches the
    offloaded files."""
    peft_model = module.PeftModel
    original = peft_model._update_offload
    if getattr(original, "_bitalloc", False):
        return

    def _update_offload(self, offload_index, adapters_weights):
        from ..errors import BitallocError
        from .nn import QuantLinear

        if offload_index and any(isinstance(m, QuantLinear) for m in self.get_base_model().modules()):
            raise BitallocError(DISK_OFFLOAD_ERROR)
        return original(self, offload_index, adapters_weights)

    _update_offload._bitalloc = True
    peft_model._update_offload = _update_offload


# ---- the classes (built on first registration: they subclass transformers' bases) ----------

_CLASSES: tuple | None = None


def _classes() -> tuple[type, type]:
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _build_classes()
    return _CLASSES


def _build_classes() -> tuple[type, type]:
    config_class, quantizer_class = _config_class(), _quantizer_class()
    config_class.__module__ = quantizer_class.__module__ = __name__
    return config_class, quantizer_class


def _config_class() -> type:
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from ..errors import BitallocError
    from ..quant import QuantConfig
    from .nn import QUANT_FORMAT

    class BitallocConfig(QuantizationConfigMixin):
        """``quantization_config`` of a bitalloc folder: format, weights file, packed modules."""

        def __init__(self, format: str | None = None, modules: dict | None = None,
                     weights: str | None = None, embeddings: dict | None = None,
                     **kwargs) -> None:  # fmt: skip
            self.quant_method = QUANT_METHOD
            if format != QUANT_FORMAT:
                raise BitallocError(
                    f"quantization_config format {format!r} is not {QUANT_FORMAT!r}: this folder was written "
                    "by another bitalloc version; load it with that version or apply again"
                )
            if not isinstance(modules, dict) or not modules:
                raise BitallocError("quantization_config of a bitalloc model lists no packed modules")
            if embeddings is not None and not isinstance(embeddings, dict):
                raise BitallocError("quantization_config: embeddings must map module names to entries")
            for name, entry in {**modules, **(embeddings or {})}.items():
                try:
                    QuantConfig.parse(entry["config"])
                    rows, cols = (int(n) for n in entry["shape"])
                except Exception as exc:
                    raise BitallocError(f"quantization_config: bad entry for {name}: {exc}") from None
            self.format, self.modules, self.weights = format, modules, weights
            self.embeddings = dict(embeddings or {})

        def packed_tensors(self) -> dict[str, dict]:
            """Every entry stored packed: the modules and the embeddings."""
            return {**self.modules, **self.embeddings}

        def to_dict(self) -> dict:
            return quantization_config_dict(self.modules, self.weights, self.embeddings)

    return BitallocConfig


# shape: the class subclasses transformers' HfQuantizer, imported only when it is first registered
def _quantizer_class() -> type:
    import torch
    from transformers.quantizers.base import HfQuantizer

    from ..errors import BitallocError
    from .nn import PACKED_NAMES, QuantLinear

    class BitallocQuantizer(HfQuantizer):
        """Builds QuantLinears before loading; transformers' loader fills their packed buffers."""

        requires_calibration = True  # only pre-quantized folders: bitalloc apply makes them

        def __init__(self, quantization_config, **kwargs) -> None:
            super().__init__(quantization_config, **kwargs)
            self.compute_dtype = None
            self.stored: dict | None = None  # the tensors in the files (name -> header entry), when read

        def update_attn_implementation(self, config):
            # The only hook that sees the model config before the weights files are looked up:
            # point transformers at the real file, checked against the per-module configs.
            folder = getattr(config, "_name_or_path", None)
            weights = self.quantization_config.weights
            if folder and Path(folder).is_dir():
                self.stored = check_folder(Path(folder), self.quantization_config.packed_tensors(), weights)
            config.transformers_weights = weights
            return config

        def preprocess_model(self, model, dtype=None, **kwargs):
            self.compute_dtype = dtype
            return super().preprocess_model(model, dtype=dtype, **kwargs)

        def _process_model_before_weight_loading(self, model, **kwargs):
            dtype = self.compute_dtype or torch.get_default_dtype()
            files = kwargs.get("checkpoint_files")
            if self.stored is None and files:  # the folder was not known before: check the files now
                self.stored = check_files(Path(files[0]).parent, [Path(f) for f in files],
                                          self.quantization_config.packed_tensors())  # fmt: skip
            if self.stored is not None and needs_layout(model, self.stored):
                # transformers would load these (renamed modules, fused experts) through its own
                # weight conversions, which know nothing of packed tensors
                raise BitallocError(
                    "this model's checkpoint layout differs from transformers' (renamed modules or "
                    "mixture-of-experts experts stored one Linear each): load it with "
                    "bitalloc.load_quantized(path)"
                )
            _replace_linears(model, self.quantization_config.modules, self.stored, dtype)
            model.config.quantization_config = self.quantization_config
            return model

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            # Float scales may be stored (rows, blocks) or flat: no shape check for packed
            # parts (their sizes were checked against the configs from the headers).
            return param_name.rpartition(".")[2] in PACKED_NAMES

        def update_weight_conversions(self, weight_conversions, model):
            from transformers.core_model_loading import WeightRenaming

            # On disk "<module>.weight.codes"; the module's buffer is "<module>.codes".
            renames = [WeightRenaming(f"weight.{part}", part) for part in PACKED_NAMES]
            dense = [
                _embedding_converter(self, name, entry)
                for name, entry in self.quantization_config.embeddings.items()
            ]
            return dense + super().update_weight_conversions(weight_conversions, model) + renames

        def _process_model_after_weight_loading(self, model, **kwargs):
            for name, module in model.named_modules():
                if isinstance(module, QuantLinear):  # buffers keep their stored shape (`QuantLinear.packed`)
                    try:
                        module.quantized()
                    except ValueError as exc:
                        raise BitallocError(f"{name}: {exc}") from None
            # packed embeddings were loaded dense: the model in memory (and what it saves) holds them so,
            # and saving must not try to reverse their dequantization
            self.quantization_config.embeddings = {}
            conversions = getattr(model, "_weight_conversions", None)
            if conversions:
                model._weight_conversions = [
                    c
                    for c in conversions
                    if not any(getattr(op, "dense_on_load", False) for op in getattr(c, "operations", ()))
                ]
            if not getattr(model.save_pretrained, "_bitalloc", False):
                model.save_pretrained = types.MethodType(_save_pretrained, model)
            return model

        def _dequantize(self, model, dtype=None):
            from .merge import dequantize_model

            return dequantize_model(model, dtype)

        def is_serializable(self, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True  # adapters (LoRA) train on top of the frozen packed weights

        @property
        def is_qat_trainable(self) -> bool:
            return False

    return BitallocQuantizer


def _embedding_converter(quantizer, name: str, entry: dict):
    """A transformers weight conversion that loads embedding ``name``'s packed parts (renamed
    ``<name>.<part>`` by then) into ``<name>.weight``, dequantized in that parameter's dtype."""
    from transformers.core_model_loading import ConversionOps, WeightConverter

    from ..quant import QuantConfig
    from .nn import dequantize_parts

    config, shape = QuantConfig.parse(entry["config"]), tuple(int(n) for n in entry["shape"])

    class DenseOnLoad(ConversionOps):
        # transformers casts no input of an op that has its quantizer: the stored scales keep their dtype
        hf_quantizer = quantizer
        dense_on_load = True

        def convert(self, input_dict, source_patterns, target_patterns, full_layer_name=None, **kwargs):
            parts = {key.rpartition(".")[2]: value[0] if isinstance(value, list) else value
                     for key, value in input_dict.items()}  # fmt: skip
            dtype = kwargs["model"].get_parameter(full_layer_name).dtype
            return {full_layer_name: dequantize_parts(parts, config, shape, dtype)}

    sources = [f"{name}.{part}" for part in config.storage_bits_parts(shape)]
    return WeightConverter(sources, f"{name}.weight", [DenseOnLoad()])


def _replace_linears(model, modules: dict, stored: dict | None, dtype) -> None:
    """Put an empty (meta) QuantLinear in place of every packed module's Linear, checked
    against the model: transformers' loader then fills their packed buffers. Each buffer
    takes the shape its tensor is stored in (``stored``: the header entries), so that
    accelerate's offload hooks, which put stored tensors into buffers and refuse a shape
    change, find the shape they expect."""
    import torch

    from ..errors import BitallocError
    from .nn import QuantLinear, replace_linear

    for name, entry in modules.items():
        rows, cols = entry["shape"]
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise BitallocError(f"quantization_config names {name}, which the model lacks") from None
        if not isinstance(old, torch.nn.Linear) or (old.out_features, old.in_features) != (rows, cols):
            raise BitallocError(
                f"quantization_config: {name} is {rows}x{cols} {entry['config']}, the model has "
                f"{type(old).__name__} {getattr(old, 'weight', torch.empty(0)).shape}"
            )
        layer = QuantLinear(cols, rows, entry["config"], old.bias is not None, device="meta",
                            dtype=dtype, name=name)  # fmt: skip
        if old.bias is not None and stored is not None and f"{name}.bias" not in stored:
            raise BitallocError(f"the checkpoint lacks {name}.bias")
        for part, buffer in list(layer._buffers.items()):
            entry = (stored or {}).get(f"{name}.weight.{part}")
            if entry is not None and math.prod(entry.shape) == buffer.numel():
                layer._buffers[part] = buffer.reshape(tuple(entry.shape))
        layer._is_hf_initialized = True  # loaded, never initialized at random
        replace_linear(model, name, layer)


def _save_pretrained(self, save_directory, *args, **kwargs):
    """transformers' save_pretrained, then the bitalloc marks in the saved config.json: the
    placeholder weights name (an unregistered transformers fails loudly) and the real one."""
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    folder = Path(save_directory)
    index = folder / "model.safetensors.index.json"
    weights = index.name if index.is_file() else "model.safetensors"
    config = getattr(self.config, "quantization_config", None)
    if (folder / "config.json").is_file() and config is not None:
        mark_config(folder / "config.json", config.modules, weights)


_save_pretrained._bitalloc = True


def check_folder(folder: Path, modules: dict[str, dict], weights: str | None) -> dict:
    """The weights file (or index and every shard) exists and every packed module's tensors
    are in it with the sizes and dtypes its config gives, read from the headers alone;
    returns the stored tensors' header entries by name."""
    from ..checkpoints.safetensors import index_shards
    from ..errors import BitallocError

    if not weights or Path(weights).name != weights:
        raise BitallocError(f"{folder}: quantization_config names no weights file")
    path = folder / weights
    if not path.is_file():
        raise BitallocError(f"{folder}: the weights file {weights} is missing")
    files = index_shards(path) if weights.endswith(".index.json") else [path]
    return check_files(folder, files, modules)


def check_files(folder, files: list[Path], modules: dict[str, dict]) -> dict:
    """`check_folder` for a given list of safetensors files."""
    from ..checkpoints.safetensors import TORCH_DTYPES, read_header
    from ..errors import BitallocError
    from ..quant import QuantConfig
    from .nn import PACKED_NAMES, packed_dtype

    entries = {}
    for file in files:
        if not Path(file).is_file():
            raise BitallocError(f"{folder}: shard {Path(file).name} is missing")
        entries.update(read_header(file))
    for name, module in modules.items():
        config = QuantConfig.parse(module["config"])
        parts = config.storage_bits_parts(tuple(module["shape"]))
        if f"{name}.weight" in entries:
            raise BitallocError(f"{folder}: {name} is stored dense, but quantization_config says {config}")
        for part, bits in parts.items():
            key = f"{name}.weight.{part}"
            entry = entries.get(key)
            if entry is None:
                raise BitallocError(f"{folder}: the checkpoint lacks {key} ({config})")
            want_dtype = packed_dtype(config, part)
            want = -(-bits // 8)
            if TORCH_DTYPES.get(entry.dtype) != want_dtype or entry.end - entry.start != want:
                raise BitallocError(
                    f"{folder}: {key} is {entry.dtype} {list(entry.shape)}, but quantization_config's "
                    f"{config} for a {module['shape'][0]}x{module['shape'][1]} matrix needs {want} bytes "
                    f"of {str(want_dtype).removeprefix('torch.')}"
                )
    packed = {key.rsplit(".weight.", 1)[0] for key in entries if key.rsplit(".", 1)[-1] in PACKED_NAMES
              and ".weight." in key}  # fmt: skip
    extra = sorted(packed - set(modules))
    if extra:
        raise BitallocError(f"{folder}: {extra[0]} is stored packed but quantization_config does not list it")
    return entries


def needs_layout(model, stored) -> bool:
    """Whether ``model`` (as transformers builds it, on the meta device) must be renamed or
    unfused to carry the names of the packed checkpoint tensors ``stored`` (`checkpoints.layout`)."""
    import copy

    from ..checkpoints.layout import match_checkpoint

    before = {name for name, _ in model.named_modules()}
    probe = match_checkpoint(copy.deepcopy(model), _weight_names(stored))
    return {name for name, _ in probe.named_modules()} != before


def _weight_names(stored) -> list[str]:
    """Checkpoint tensor names with each packed part (``X.weight.codes``...) read as ``X.weight``."""
    from .nn import PACKED_NAMES

    names = []
    for name in stored:
        stem, _, part = name.rpartition(".")
        names.append(stem if part in PACKED_NAMES and stem.endswith(".weight") else name)
    return names
