"""QuantLinear, a Linear layer that keeps only its packed weight, and loading a quantized model.

`QuantLinear` subclasses `torch.nn.Linear`, so PEFT wraps it with LoRA like any Linear; its
forward dequantizes the packed codes on the fly inside an autograd Function that saves only
the packed tensors for backward (the weight is frozen, the gradient flows to the input), so
training memory stays near the packed size. `load_quantized` rebuilds a transformers model
from the ``quantized/`` folder that `bitalloc.apply` writes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.layout import match_checkpoint
from ..checkpoints.runnable import build_skeleton, model_class
from ..checkpoints.safetensors import index_shards, read_header
from ..errors import BitallocError, check_path
from ..quant import PARTS, QuantConfig, QuantizedTensor, format_of

QUANT_FILE = "bitalloc_quant.json"  # which modules are packed, with which config
QUANT_FORMAT = "bitalloc.quantized/v1"
PACKED_NAMES = PARTS  # stored as "<module>.weight.<name>"
# Weight files are named bitalloc-model*.safetensors, not model*.safetensors, so that
# AutoModel.from_pretrained fails loudly instead of filling the packed layers at random.
PACKED_STEM = "bitalloc-model"

MERGE_ERROR = (
    "QuantLinear {} keeps only the packed quantized weight: it has no dense weight to read or "
    "write; use its dequantize(), PEFT's merge_and_unload (which dequantizes, with bitalloc "
    "imported), or `bitalloc apply --dequantized`"
)

_T = torch.Tensor
# What PEFT and transformers may ask of a Linear's weight without needing its values.
_METADATA = frozenset(
    [_T.shape.__get__, _T.dtype.__get__, _T.device.__get__, _T.ndim.__get__, _T.layout.__get__,
     _T.requires_grad.__get__, _T.is_meta.__get__, _T.is_cuda.__get__, _T.size, _T.dim,
     _T.numel, _T.nelement, _T.is_floating_point, _T.is_complex, _T.element_size]
)  # fmt: skip


class PackedWeight(torch.Tensor):
    """Stands in for ``QuantLinear.weight``: shape, dtype and device, but no values.

    Anything that needs the values (``.data``, arithmetic, PEFT's merge) raises a
    RuntimeError that says why and what to do instead.
    """

    _layer_name: str = ""

    @classmethod
    def create(cls, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, name: str):
        stand_in = torch.zeros((), dtype=dtype, device=device).expand(shape)  # one element
        weight = torch.Tensor._make_subclass(cls, stand_in)
        weight._layer_name = name
        return weight

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        name = next((a._layer_name for a in args if isinstance(a, PackedWeight)), "")
        raise RuntimeError(MERGE_ERROR.format(name or "(packed)"))

    def __repr__(self, *args, **kwargs) -> str:
        return f"PackedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, no dense values)"

    def __format__(self, spec: str) -> str:
        return repr(self)


class _PackedLinear(torch.autograd.Function):
    """y = x Qᵀ + b with Q dequantized from the packed tensors in forward and again in
    backward: only the packed tensors are saved, never Q or the input."""

    @staticmethod
    def forward(ctx, x, bias, config, shape, *packed):
        weight = _dequantize(config, shape, packed, x.dtype)
        ctx.config, ctx.shape, ctx.input_dtype = config, shape, x.dtype
        ctx.save_for_backward(*packed)
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        packed = ctx.saved_tensors
        grad_input = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _dequantize(ctx.config, ctx.shape, packed, grad_output.dtype)
            grad_input = (grad_output @ weight).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_input, grad_bias, None, None, *([None] * len(packed))


def packed_dtype(config: QuantConfig, part: str) -> torch.dtype:
    """The dtype a packed part is stored in, as the config's format family says: uint8 codes,
    float or uint8 scales, float scales2, uint8 (integer) or float zero points."""
    return format_of(config).part_dtype(config, part)


def dequantize_parts(
    parts: dict[str, torch.Tensor], config: QuantConfig, shape, dtype: torch.dtype
) -> torch.Tensor:
    """The dense matrix that packed ``parts`` (by name, any shape, float parts in any float
    dtype: they are cast back losslessly to the config's) stand for; ValueError on a bad size."""
    stored = {part: tensor.reshape(-1).to(packed_dtype(config, part)) for part, tensor in parts.items()}
    return QuantizedTensor.from_tensors(stored, config, tuple(shape)).dequantize(dtype)


def packed_entries(info: dict) -> dict[str, dict]:
    """Every entry a quantized folder's info stores packed: its modules and its embeddings."""
    return {**info["modules"], **(info.get("embeddings") or {})}


def _dequantize(config: QuantConfig, shape, packed, dtype: torch.dtype) -> torch.Tensor:
    parts = dict(zip([p for p in PACKED_NAMES if p in config.storage_bits_parts(shape)], packed, strict=True))
    return QuantizedTensor(
        config, shape, parts["codes"], parts["scales"], parts.get("scales2"), parts.get("zeros")
    ).dequantize(dtype)


class QuantLinear(nn.Linear):
    """A frozen Linear whose weight is stored packed (``codes``, ``scales``[, ``scales2``][, ``zeros``]).

    ``weight`` is a `PackedWeight` stand-in with the right shape, dtype (the compute dtype)
    and device; the state dict holds ``codes``, ``scales``[, ``scales2``] and ``bias``, and
    loads ``weight.codes`` etc. too: files name the packed tensors ``<module>.weight.<part>``
    (transformers renames them on load and back on save). ``.to(dtype)`` changes the compute
    dtype, never the stored scales.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: QuantConfig | str,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        name: str = "",
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no dense weight is ever allocated
        self.in_features, self.out_features = in_features, out_features
        self.config = QuantConfig.parse(config)
        self.module_name = name
        # An empty tensor that follows .to(device/dtype): the compute dtype and device.
        self.register_buffer("compute_ref", torch.empty(0, dtype=dtype, device=device), persistent=False)
        for part, bits in self.config.storage_bits_parts(self.shape).items():
            part_dtype = packed_dtype(self.config, part)
            count = -(-bits // (8 * part_dtype.itemsize))
            self.register_buffer(part, torch.empty(count, dtype=part_dtype, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_quantized(
        cls, quantized: QuantizedTensor, bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32, name: str = "",
    ) -> QuantLinear:  # fmt: skip
        """A layer holding ``quantized`` (and a copy of ``bias``), on its device."""
        device = quantized.codes.device
        out_features, in_features = quantized.shape
        layer = cls(in_features, out_features, quantized.config, bias is not None, device, dtype, name)
        for part, tensor in quantized.tensors().items():
            setattr(layer, part, tensor.reshape(getattr(layer, part).shape).clone())
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.compute_ref.dtype

    @property
    def weight(self) -> PackedWeight:
        return PackedWeight.create(self.shape, self.compute_dtype, self.codes.device, self.module_name)

    @weight.setter
    def weight(self, value) -> None:
        raise RuntimeError(MERGE_ERROR.format(self.module_name))

    def packed(self) -> tuple[torch.Tensor, ...]:
        """The packed tensors, flat. transformers' loader may leave a buffer in its stored shape
        (float scales are stored (rows, blocks)); it stays so, because accelerate's offload
        hooks put the stored tensor back into the buffer and refuse a shape change."""
        return tuple(getattr(self, p).reshape(-1) for p in PACKED_NAMES if getattr(self, p, None) is not None)

    def quantized(self) -> QuantizedTensor:
        """The packed weight as a `QuantizedTensor` (ValueError if a tensor has a wrong size)."""
        parts = {p: getattr(self, p).reshape(-1) for p in PACKED_NAMES if getattr(self, p, None) is not None}
        return QuantizedTensor.from_tensors(parts, self.config, self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) matrix Q, materialized on demand."""
        return _dequantize(self.config, self.shape, self.packed(), dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return _PackedLinear.apply(x, bias, self.config, self.shape, *self.packed())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, config={self.config}"
        )

    # ---- the packed buffers keep their dtype; files name them weight.<part> -----------
    def _apply(self, fn, recurse: bool = True):
        before = {part: self._buffers[part] for part in PACKED_NAMES if part in self._buffers}
        super()._apply(fn, recurse)
        for part, tensor in before.items():
            moved = self._buffers[part]
            if moved.dtype != tensor.dtype:  # a dtype cast: keep the stored dtype, follow the device
                self._buffers[part] = tensor.to(moved.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for part in PACKED_NAMES:
            if prefix + "weight." + part in state_dict:
                tensor = state_dict.pop(prefix + "weight." + part)
                buffer = self._buffers.get(part)
                if buffer is not None and tensor.dim() != 1 and tensor.numel() == buffer.numel():
                    tensor = tensor.reshape(-1)  # float scales are stored (rows, blocks)
                state_dict[prefix + part] = tensor
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def replace_linear(model: nn.Module, name: str, layer: nn.Module) -> nn.Module:
    """Put ``layer`` at dotted path ``name`` in ``model``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    if not isinstance(old, nn.Linear):
        kind = "nothing" if old is None else type(old).__name__
        raise BitallocError(f"cannot pack {name}: the model has {kind} there, not an nn.Linear")
    setattr(parent, child, layer)
    return old


def read_quant_info(path: str | os.PathLike) -> dict:
    """Which modules are packed, with which config: config.json's ``quantization_config``
    (``bitalloc_quant.json`` for folders without one); BitallocError if absent or foreign."""
    path = Path(path)
    config = _read_json(path / "config.json", missing_ok=True) or {}
    info = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(info, dict) or info.get("quant_method") != "bitalloc":
        other = info.get("quant_method") if isinstance(info, dict) else None
        info = _read_json(path / QUANT_FILE, missing_ok=True)
        if info is None:
            found = "no quantization_config in config.json"
            if isinstance(other, str):  # e.g. apply --format compressed-tensors
                found = f"its quantization_config is quant_method {other[:60]!r} (load it with transformers)"
            raise BitallocError(f"{path} is not a bitalloc quantized model: {found} and no {QUANT_FILE}")
    found = info.get("format") if isinstance(info, dict) else None
    if found != QUANT_FORMAT or not isinstance(info.get("modules"), dict):
        raise BitallocError(
            f"{path}: bitalloc format {found!r}, expected {QUANT_FORMAT!r}: written by another bitalloc "
            "version; load it with that version or apply again"
        )
    return info


def _read_json(file: Path, missing_ok: bool = False):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise BitallocError(f"{file} is missing") from None
    except (OSError, ValueError) as exc:
        raise BitallocError(f"cannot read {file}: {exc}") from None


def load_quantized(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = torch.float32,
    **from_pretrained_kwargs,
) -> nn.Module:
    """The model in ``path`` (an ``OUT/quantized`` folder, or a `save_pretrained` copy of one)
    with every packed matrix as a `QuantLinear`: transformers' ``from_pretrained`` with
    bitalloc's quantizer registered, in eval mode. ``dtype`` (or ``torch_dtype``) is the
    compute dtype and the dtype of the other tensors; ``device`` one device ("auto": CUDA if
    available); any other keyword (``device_map``, ``low_cpu_mem_usage``, ``max_memory``,
    ``offload_folder``...) goes to ``from_pretrained``. Attach the LoRA adapter with
    ``PeftModel.from_pretrained``."""
    from .hf_quantizer import check_folder, needs_layout, register

    check_path(path, "path (an OUT/quantized folder)")
    register()
    path = Path(path)
    info = read_quant_info(path)
    if "weights" not in info:  # only bitalloc_quant.json: transformers would not find the weights
        raise BitallocError(
            f"{path} was written by an earlier bitalloc (no quantization_config in config.json): apply again"
        )
    check_folder(path, packed_entries(info), info["weights"])
    dtype = from_pretrained_kwargs.pop("torch_dtype", dtype)
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises many types for a bad config
        raise BitallocError(f"{path}: cannot read config.json ({type(exc).__name__}: {exc})") from None
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    skeleton = build_skeleton(path, str(path))
    if needs_layout(skeleton, [n for file in packed_files(path) for n in read_header(file)]):
        # renamed modules or one Linear per MoE expert: bitalloc's own reader lays the model out
        # as its checkpoint (transformers' weight conversions know nothing of packed tensors)
        if set(from_pretrained_kwargs) - {"low_cpu_mem_usage"}:
            raise BitallocError(
                f"{path}: a model whose layout bitalloc changes (mixture-of-experts experts, renamed "
                f"modules) loads with device= and dtype= only, not {sorted(from_pretrained_kwargs)}"
            )
        from safetensors.torch import load_file

        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
        model = _assemble(path, torch_dtype, load_file).to(torch_dtype)
        return (model.to(device) if device is not None else model).eval()
    if device is not None:
        if "device_map" in from_pretrained_kwargs:
            raise BitallocError("load_quantized: give device or device_map, not both")
        from_pretrained_kwargs["device_map"] = {"": str(device)}
    model = model_class(hf_config).from_pretrained(path, dtype=dtype, **from_pretrained_kwargs)
    return model.eval()


def check_quantized(path: str | os.PathLike) -> None:
    """What `load_quantized` checks, from the safetensors headers alone (no tensor data is
    read, nothing is allocated): every tensor has its place and shape in the model, every
    parameter and packed buffer is present. `apply` runs it before renaming its output."""
    from ..checkpoints.safetensors import TORCH_DTYPES

    def meta_tensors(file: Path) -> dict[str, torch.Tensor]:
        return {
            name: torch.empty(entry.shape, dtype=TORCH_DTYPES[entry.dtype], device="meta")
            for name, entry in read_header(file).items()
        }

    from .hf_quantizer import check_folder

    info = read_quant_info(path)
    if "weights" in info:
        check_folder(Path(path), packed_entries(info), info["weights"])
    _assemble(Path(path), torch.float32, meta_tensors, device="meta")


def _assemble(path: Path, dtype: torch.dtype, read, device: str | None = None) -> nn.Module:
    """The model skeleton with QuantLinears, filled from every packed file by ``read(file)``;
    BitallocError for a tensor without a place, a size mismatch or a missing tensor."""
    info = read_quant_info(path)
    model = build_skeleton(path, str(path))
    files = packed_files(path)
    match_checkpoint(model, [name for file in files for name in read_header(file)])
    for name, entry in info["modules"].items():
        rows, cols = entry["shape"]
        old = model.get_submodule(name) if _has_module(model, name) else None
        has_bias = getattr(old, "bias", None) is not None
        layer = QuantLinear(cols, rows, entry["config"], has_bias, device=device, dtype=dtype, name=name)
        old = replace_linear(model, name, layer)
        if (old.out_features, old.in_features) != (rows, cols):
            raise BitallocError(
                f"shape mismatch for {name}: {QUANT_FILE} {rows}x{cols}, "
                f"model {old.out_features}x{old.in_features}"
            )
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    buffers = dict(model.named_buffers())  # old checkpoints hold now non-persistent buffers
    persistent = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name in module._buffers
        if name not in module._non_persistent_buffers_set
    }
    expected = {name for name, _ in model.named_parameters(remove_duplicate=False)} | persistent
    loaded: set[str] = set()
    embeddings = info.get("embeddings") or {}
    pending: dict[str, torch.Tensor] = {}  # the embeddings' packed parts, loaded dense after the files
    for file in files:
        tensors = read(file)
        for key in [k for k in tensors if k.rsplit(".weight.", 1)[0] in embeddings and ".weight." in k]:
            pending[key] = tensors.pop(key)
        try:
            result = model.load_state_dict(tensors, strict=False, assign=True)
        except RuntimeError as exc:  # size mismatches
            detail = " ".join(str(exc).split("\n", 1)[-1].split())
            raise BitallocError(f"{file}: tensors do not fit the model: {detail}") from None
        for key in result.unexpected_keys:
            if key not in buffers and not any(p.search(key) for p in ignored):
                raise BitallocError(f"{path}: tensor {key} has no place in the model")
        loaded |= expected - set(result.missing_keys)
    for name, entry in embeddings.items():
        loaded |= _load_dense(model, name, entry, pending, dtype, device)
    model.tie_weights()
    for key in [name for name, _ in model.named_parameters()] + sorted(persistent):
        if key not in loaded:
            raise BitallocError(f"{path}: the checkpoint lacks {key}")
    return model


def _load_dense(model: nn.Module, name: str, entry: dict, pending: dict, dtype, device) -> set[str]:
    """Load embedding ``name`` from its packed parts in ``pending`` as a dense weight (on the
    meta device: its shape only); the names it loaded."""
    config, shape = QuantConfig.parse(entry["config"]), tuple(int(n) for n in entry["shape"])
    parts = {part: pending.pop(f"{name}.weight.{part}", None) for part in config.storage_bits_parts(shape)}
    if any(tensor is None for tensor in parts.values()):
        return set()  # missing parts: reported as a missing weight
    if device == "meta":
        weight = torch.empty(shape, dtype=dtype, device="meta")
    else:
        weight = dequantize_parts(parts, config, shape, dtype)
    result = model.load_state_dict({f"{name}.weight": weight}, strict=False, assign=True)
    if f"{name}.weight" in result.unexpected_keys:
        raise BitallocError(f"{name} is listed as a packed embedding, but the model has no {name}.weight")
    return {f"{name}.weight"}


def packed_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a quantized folder: the file (or the shards of the index) its
    ``quantization_config`` names, else ``bitalloc-model*.safetensors``."""
    path = Path(path)
    weights = read_quant_info(path).get("weights")
    if isinstance(weights, str) and weights:
        if Path(weights).name != weights or not (path / weights).is_file():
            raise BitallocError(f"{path}: the weights file {weights} is missing")
        return index_shards(path / weights) if weights.endswith(".index.json") else [path / weights]
    index = path / f"{PACKED_STEM}.safetensors.index.json"
    if index.is_file():
        return index_shards(index)
    single = path / f"{PACKED_STEM}.safetensors"
    if not single.is_file():
        raise BitallocError(f"{path} has no {single.name}")
    return [single]


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
